//! Queue mechanics, after beanstalkd's `prot.c`: jobs enter and leave the
//! ready, delayed, buried and reserved sets; ready jobs go to waiting
//! connections; kicks, pauses and waits.

use crate::conn::{ConnId, Wait};
use crate::job::{Job, JobId, JobKey, JobState};
use crate::sink::ReplySink;
use crate::state::Engine;
use crate::tombstone::{FinalState, Tombstone};
use crate::tube::TubeKey;
use crate::{Nanos, SECOND};
use polaris_proto::reply;

/// A reserved job inside its last second makes `reserve` answer `DEADLINE_SOON`.
pub(crate) const SAFETY_MARGIN: Nanos = SECOND;
/// Ready jobs with a priority below this count as urgent.
pub(crate) const URGENT_THRESHOLD: u32 = 1024;

impl Engine {
    pub(crate) fn insert_job(&mut self, job: Job) -> JobKey {
        let (id, tube, len) = (job.id, job.tube, job.body.len() as u64);
        let key = JobKey::from_idx(self.jobs.insert(job));
        self.ids.insert(id, key, &self.jobs);
        self.incref(tube);
        self.job_bytes += len;
        self.mark_dirty(id);
        if let Some(changes) = self.recording() {
            changes.inserted.insert(id);
        }
        key
    }

    /// Removes a job that is in no queue from the engine and returns it.
    pub(crate) fn free_job(&mut self, key: JobKey) -> Job {
        let id = self.jobs[key.idx()].id;
        self.ids.remove(id, &self.jobs);
        self.ttls.remove(&id);
        let job = self.jobs.remove(key.idx());
        self.job_bytes -= job.body.len() as u64;
        self.decref(job.tube);
        job
    }

    pub(crate) fn set_producer(&mut self, conn: ConnId) {
        if !self.conns[conn.0].producer {
            self.conns[conn.0].producer = true;
            self.counters.producers += 1;
        }
    }

    pub(crate) fn set_worker(&mut self, conn: ConnId) {
        if !self.conns[conn.0].worker {
            self.conns[conn.0].worker = true;
            self.counters.workers += 1;
        }
    }

    /// Puts a job into its tube: ready at once, or delayed by `delay`.
    /// Then hands ready jobs to waiting connections.
    pub(crate) fn enqueue(&mut self, key: JobKey, delay: Nanos, now: Nanos, out: &mut dyn ReplySink) {
        let job = &mut self.jobs[key.idx()];
        job.set_reserver(None);
        let (id, tube, pri) = (job.id, job.tube, job.pri);
        if delay > 0 {
            job.deadline = now.saturating_add(delay);
            job.state = JobState::Delayed;
            let deadline = job.deadline;
            self.tubes[tube.idx()].delayed.push(&mut self.jobs, key);
            self.delay_timers.insert((deadline, id));
            self.counters.delayed += 1;
        } else {
            job.state = JobState::Ready;
            // The TTL clock starts when the job becomes ready (a job with a TTL
            // becomes ready only once: its first reserve removes the TTL).
            if let Some(&ttl) = self.ttls.get(&id) {
                let at = now.saturating_add(ttl);
                job.deadline = at;
                self.ttl_timers.insert((at, id));
            }
            self.tubes[tube.idx()].ready.push(&mut self.jobs, key);
            self.counters.ready += 1;
            if pri < URGENT_THRESHOLD {
                self.counters.urgent += 1;
                self.tubes[tube.idx()].counters.urgent += 1;
            }
        }
        self.process_queue(now, out);
    }

    /// While some waiting connection watches a tube with a ready job, give the
    /// most urgent such job to the tube's next waiter (beanstalkd's `process_queue`).
    pub(crate) fn process_queue(&mut self, now: Nanos, out: &mut dyn ReplySink) {
        loop {
            let mut best: Option<JobKey> = None;
            for &t in &self.tubes_with_waiters {
                let tube = &self.tubes[t.idx()];
                if tube.pause > 0 && tube.unpause_at > now {
                    continue;
                }
                if let Some(candidate) = tube.ready.peek() {
                    let c = &self.jobs[candidate.idx()];
                    let better = match best {
                        None => true,
                        Some(b) => (c.pri, c.id) < (self.jobs[b.idx()].pri, self.jobs[b.idx()].id),
                    };
                    if better {
                        best = Some(candidate);
                    }
                }
            }
            let Some(key) = best else { return };
            let tube = self.jobs[key.idx()].tube;
            self.remove_ready(key);
            let conn = self.tubes[tube.idx()].waiting.take().expect("tube with waiters has a waiter");
            self.remove_waiting_conn(conn);
            self.reserve_to(conn, key, now, out);
        }
    }

    /// Hands a job that is in no queue to `conn` and sends it.
    pub(crate) fn reserve_to(&mut self, conn: ConnId, key: JobKey, now: Nanos, out: &mut dyn ReplySink) {
        let job = &mut self.jobs[key.idx()];
        job.deadline = now.saturating_add(job.ttr());
        job.state = JobState::Reserved;
        job.set_reserver(Some(conn));
        job.counters.reserves += 1;
        let (tube, id) = (job.tube, job.id);
        self.ttr_heap.push(&mut self.jobs, key);
        self.conns[conn.0].reserved.push_back(&mut self.jobs, key);
        self.counters.reserved += 1;
        self.tubes[tube.idx()].counters.reserved += 1;
        // The store keeps reserved jobs as ready, so a reserve writes nothing,
        // except the first one of a job with a TTL, which no longer applies.
        if self.ttls.remove(&id).is_some() {
            self.mark_dirty(id);
        }
        self.send_job(conn, reply::RESERVED_PREFIX, key, out);
    }

    pub(crate) fn bury(&mut self, key: JobKey) {
        self.jobs[key.idx()].counters.buries += 1;
        self.place_buried(key);
        self.mark_dirty(self.jobs[key.idx()].id);
    }

    /// Appends a job that is in no queue to its tube's buried list.
    pub(crate) fn place_buried(&mut self, key: JobKey) {
        let job = &mut self.jobs[key.idx()];
        job.state = JobState::Buried;
        job.set_reserver(None);
        let tube = job.tube;
        self.tubes[tube.idx()].buried.push_back(&mut self.jobs, key);
        self.counters.buried += 1;
    }

    pub(crate) fn remove_ready(&mut self, key: JobKey) {
        let job = &mut self.jobs[key.idx()];
        let (tube, pri, id) = (job.tube, job.pri, job.id);
        // A ready job leaves only to be reserved or to end: either way its TTL
        // timer stops.
        if self.ttls.contains_key(&id) {
            self.ttl_timers.remove(&(job.deadline, id));
        }
        self.tubes[tube.idx()].ready.remove(&mut self.jobs, key);
        self.counters.ready -= 1;
        if pri < URGENT_THRESHOLD {
            self.counters.urgent -= 1;
            self.tubes[tube.idx()].counters.urgent -= 1;
        }
    }

    pub(crate) fn remove_delayed(&mut self, key: JobKey) {
        let job = &self.jobs[key.idx()];
        let (tube, deadline, id) = (job.tube, job.deadline, job.id);
        self.tubes[tube.idx()].delayed.remove(&mut self.jobs, key);
        self.delay_timers.remove(&(deadline, id));
        self.counters.delayed -= 1;
    }

    fn remove_buried(&mut self, key: JobKey) {
        let tube = self.jobs[key.idx()].tube;
        self.tubes[tube.idx()].buried.remove(&mut self.jobs, key);
        self.counters.buried -= 1;
    }

    /// Takes a ready, delayed or buried job out of its tube.
    pub(crate) fn unlink_unreserved(&mut self, key: JobKey) {
        match self.jobs[key.idx()].state {
            JobState::Ready => self.remove_ready(key),
            JobState::Delayed => self.remove_delayed(key),
            JobState::Buried => self.remove_buried(key),
            JobState::Reserved => unreachable!("reserved jobs are unlinked with remove_reserved"),
        }
    }

    /// The job `id` if `conn` has it reserved.
    pub(crate) fn reserved_by(&self, conn: ConnId, id: JobId) -> Option<JobKey> {
        let key = self.ids.get(id, &self.jobs)?;
        let job = &self.jobs[key.idx()];
        (job.state == JobState::Reserved && job.reserver() == Some(conn)).then_some(key)
    }

    pub(crate) fn remove_reserved(&mut self, conn: ConnId, key: JobKey) {
        self.ttr_heap.remove(&mut self.jobs, key);
        self.conns[conn.0].reserved.remove(&mut self.jobs, key);
        let tube = self.jobs[key.idx()].tube;
        self.jobs[key.idx()].set_reserver(None);
        self.counters.reserved -= 1;
        self.tubes[tube.idx()].counters.reserved -= 1;
    }

    /// Frees a job that is in no queue and records how it ended.
    pub(crate) fn finish(&mut self, key: JobKey, state: FinalState, now: Nanos) {
        let job = self.free_job(key);
        if let Some(changes) = self.recording() {
            // Born and gone within one loop turn: its row was never written, so
            // there is nothing to remove either.
            if changes.inserted.remove(&job.id) {
                changes.jobs.remove(&job.id);
            } else {
                changes.jobs.insert(job.id);
            }
        }
        let tombstone = Tombstone { id: job.id, state, at: now };
        let evicted = self.tombstones.insert(tombstone);
        if let Some(changes) = self.recording() {
            changes.tombstones.push(tombstone);
            changes.forgotten.extend(evicted);
        }
    }

    pub(crate) fn kick(&mut self, tube: TubeKey, bound: u32, now: Nanos, out: &mut dyn ReplySink) -> u32 {
        let mut kicked = 0;
        let from_buried = !self.tubes[tube.idx()].buried.is_empty();
        while kicked < bound {
            let next =
                if from_buried { self.tubes[tube.idx()].buried.first() } else { self.tubes[tube.idx()].delayed.peek() };
            let Some(key) = next else { break };
            self.kick_one(key, now, out);
            kicked += 1;
        }
        kicked
    }

    pub(crate) fn kick_one(&mut self, key: JobKey, now: Nanos, out: &mut dyn ReplySink) {
        self.unlink_unreserved(key);
        self.jobs[key.idx()].counters.kicks += 1;
        self.mark_dirty(self.jobs[key.idx()].id);
        self.enqueue(key, 0, now, out);
    }

    pub(crate) fn pause_tube(&mut self, t: TubeKey, pause: Nanos, now: Nanos, out: &mut dyn ReplySink) {
        let tube = &mut self.tubes[t.idx()];
        if tube.pause > 0 {
            self.pause_timers.remove(&(tube.unpause_at, t));
        }
        tube.pause = pause;
        tube.unpause_at = now.saturating_add(pause);
        tube.counters.pauses += 1;
        if pause > 0 {
            self.pause_timers.insert((tube.unpause_at, t));
        } else {
            // beanstalkd leaves waiters of a tube unpaused with 0 blocked until
            // something else happens; serve them at once.
            self.process_queue(now, out);
        }
    }

    pub(crate) fn wait_for_job(&mut self, conn: ConnId, timeout_at: Option<Nanos>) {
        self.counters.waiting += 1;
        let watched: Vec<TubeKey> = self.conns[conn.0].watch.iter().collect();
        for t in watched {
            self.tubes[t.idx()].waiting.push(conn);
            self.tubes_with_waiters.insert(t);
        }
        self.conns[conn.0].wait = Some(Wait { timeout_at, timer: None });
        self.schedule_wait(conn);
    }

    /// (Re)arms the timer of a waiting connection: its `reserve-with-timeout`
    /// deadline or the start of its soonest reserved job's safety margin.
    pub(crate) fn schedule_wait(&mut self, conn: ConnId) {
        let soon = self.soonest_deadline(conn).map(|d| d.saturating_sub(SAFETY_MARGIN));
        let Some(wait) = self.conns[conn.0].wait.as_mut() else { return };
        if let Some(old) = wait.timer.take() {
            self.wait_timers.remove(&(old, conn));
        }
        let at = match (wait.timeout_at, soon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            wait.timer = Some(at);
            self.wait_timers.insert((at, conn));
        }
    }

    pub(crate) fn remove_waiting_conn(&mut self, conn: ConnId) {
        let Some(wait) = self.conns[conn.0].wait.take() else { return };
        if let Some(at) = wait.timer {
            self.wait_timers.remove(&(at, conn));
        }
        self.counters.waiting -= 1;
        let watched: Vec<TubeKey> = self.conns[conn.0].watch.iter().collect();
        for t in watched {
            let tube = &mut self.tubes[t.idx()];
            tube.waiting.remove(conn);
            if tube.waiting.is_empty() {
                self.tubes_with_waiters.remove(&t);
            }
        }
    }

    fn soonest_deadline(&self, conn: ConnId) -> Option<Nanos> {
        self.conns[conn.0].reserved.iter(&self.jobs).map(|k| self.jobs[k.idx()].deadline).min()
    }

    pub(crate) fn deadline_soon(&self, conn: ConnId, now: Nanos) -> bool {
        self.soonest_deadline(conn).is_some_and(|d| now >= d.saturating_sub(SAFETY_MARGIN))
    }

    pub(crate) fn conn_has_ready(&self, conn: ConnId) -> bool {
        self.conns[conn.0].watch.iter().any(|t| !self.tubes[t.idx()].ready.is_empty())
    }
}
