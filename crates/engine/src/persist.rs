//! What the store needs: the [`Changes`] recorded since the last commit, the
//! [`JobRecord`] of a live job, restoring jobs, tombstones and tube TTLs read
//! back at start, and forgetting jobs whose commit failed.

use crate::job::{IdHashBuilder, Job, JobCounters, JobId, JobState};
use crate::sink::NoReplies;
use crate::state::Engine;
use crate::tombstone::Tombstone;
use crate::{Nanos, SECOND};
use polaris_proto::TubeName;
use std::collections::HashSet;

/// Counters of the persistence layer, printed as `binlog-*` in `stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct BinlogStats {
    /// Records written since start.
    pub records_written: u64,
    /// Records rewritten by compaction.
    pub records_migrated: u64,
}

/// The server's own figures about its loop and commit pipeline, printed by `polaris-stats`
/// (the engine only reports them; the server measures them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// The longest event-loop turn since start, in microseconds.
    pub longest_turn_us: u64,
    /// Turns whose changes are handed to the store's writer and not yet durable.
    pub commits_in_flight: u64,
    /// Bytes those changes hold.
    pub uncommitted_bytes: u64,
    /// The bound on them (`--max-uncommitted`) past which commands are no longer read.
    pub max_uncommitted_bytes: u64,
}

/// What changed since the last [`Engine::take_changes`], for the store.
#[derive(Debug, Default)]
pub struct Changes {
    /// Jobs whose record must be rewritten (or removed, if no longer live).
    pub jobs: HashSet<JobId, IdHashBuilder>,
    /// Jobs created since the last call, still live (a subset of `jobs`).
    pub inserted: HashSet<JobId, IdHashBuilder>,
    /// New tombstones.
    pub tombstones: Vec<Tombstone>,
    /// Tombstones to forget.
    pub forgotten: Vec<JobId>,
    /// Tube TTL defaults that changed (0 = removed).
    pub tube_ttls: Vec<(TubeName, u32)>,
}

impl Changes {
    /// True when there is nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.tombstones.is_empty() && self.forgotten.is_empty() && self.tube_ttls.is_empty()
    }
}

/// A live job as the store writes it (`B = &[u8]`, borrowed from the engine)
/// and reads it back (`B = Box<[u8]>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord<B> {
    /// Id.
    pub id: JobId,
    /// Tube name.
    pub tube: TubeName,
    /// Priority.
    pub pri: u32,
    /// Delay of the last put/release, seconds.
    pub delay_secs: u32,
    /// TTR, seconds.
    pub ttr_secs: u32,
    /// TTL, nanoseconds, while it still applies (until the first reserve).
    pub ttl: Option<Nanos>,
    /// Ready jobs with an armed TTL: nanoseconds until it runs out.
    pub ttl_left: Option<Nanos>,
    /// State; `Reserved` comes back as ready.
    pub state: JobState,
    /// Delayed jobs: nanoseconds of delay left.
    pub delay_left: Nanos,
    /// Counters.
    pub counters: JobCounters,
    /// Age in nanoseconds.
    pub age: Nanos,
    /// Body.
    pub body: B,
}

impl Engine {
    /// Takes the changes recorded since the last call (empty without persistence).
    pub fn take_changes(&mut self) -> Changes {
        match &mut self.changes {
            Some(changes) => std::mem::take(changes),
            None => Changes::default(),
        }
    }

    /// The record of a live job, for the store.
    pub fn job_record(&self, id: JobId, now: Nanos) -> Option<JobRecord<&[u8]>> {
        let job = &self.jobs[self.ids.get(id, &self.jobs)?.idx()];
        let ttl = self.ttls.get(&id).copied();
        Some(JobRecord {
            id,
            tube: self.tubes[job.tube.idx()].name.clone(),
            pri: job.pri,
            delay_secs: job.delay_secs,
            ttr_secs: job.ttr_secs,
            ttl,
            ttl_left: ttl.filter(|_| job.state == JobState::Ready).map(|_| job.deadline.saturating_sub(now)),
            state: job.state,
            delay_left: if job.state == JobState::Delayed { job.deadline.saturating_sub(now) } else { 0 },
            counters: job.counters,
            age: now.saturating_sub(job.created_at),
            body: &job.body,
        })
    }

    /// Puts a job read back from the store into the queue, as it was: ready,
    /// delayed (with the delay it had left) or buried. Reserved jobs come back
    /// ready. New ids continue above every restored one.
    pub fn restore_job(&mut self, rec: JobRecord<Box<[u8]>>, now: Nanos) {
        // Restoring is not a change to write back.
        let changes = self.changes.take();
        let tube = self.tube_find_or_make(&rec.tube);
        let mut job =
            Job::new(rec.id, tube, rec.pri, rec.delay_secs, rec.ttr_secs.max(1), rec.body, now.saturating_sub(rec.age));
        job.counters = rec.counters;
        let key = self.insert_job(job);
        if let Some(ttl) = rec.ttl {
            self.ttls.insert(rec.id, ttl);
        }
        self.next_id = self.next_id.max(rec.id.0 + 1);
        self.counters.total_jobs += 1;
        self.tubes[tube.idx()].counters.total_jobs += 1;
        let mut sink = NoReplies;
        match rec.state {
            JobState::Buried => self.place_buried(key),
            JobState::Delayed => self.enqueue(key, rec.delay_left.max(1), now, &mut sink),
            JobState::Ready | JobState::Reserved => {
                self.enqueue(key, 0, now, &mut sink);
                // Re-arm an armed TTL with the time it had left, not afresh.
                if let (Some(left), true) = (rec.ttl_left, self.ttls.contains_key(&rec.id)) {
                    let armed = self.jobs[key.idx()].deadline;
                    self.ttl_timers.remove(&(armed, rec.id));
                    let at = now.saturating_add(left);
                    self.jobs[key.idx()].deadline = at;
                    self.ttl_timers.insert((at, rec.id));
                }
            }
        }
        self.changes = changes;
    }

    /// Makes sure new ids start above `id` (ids are never reused, even across restarts).
    pub fn reserve_ids_through(&mut self, id: u64) {
        self.next_id = self.next_id.max(id.saturating_add(1));
    }

    /// The highest id handed out so far (0 if none).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    /// Puts a tombstone read back from the store.
    pub fn restore_tombstone(&mut self, t: Tombstone) {
        self.tombstones.insert(t);
        self.next_id = self.next_id.max(t.id.0 + 1);
    }

    /// Sets a tube TTL default read back from the store.
    pub fn restore_tube_ttl(&mut self, name: TubeName, secs: u32) {
        if secs > 0 {
            self.tube_ttls.insert(name, u64::from(secs) * SECOND);
        }
    }

    /// Updates the persistence counters shown by `stats`.
    pub fn set_binlog_stats(&mut self, stats: BinlogStats) {
        self.binlog = stats;
    }

    /// Sets the loop and pipeline figures `polaris-stats` prints.
    pub fn set_loop_stats(&mut self, stats: LoopStats) {
        self.loop_stats = stats;
    }

    pub(crate) fn mark_dirty(&mut self, id: JobId) {
        if let Some(changes) = self.recording() {
            changes.jobs.insert(id);
        }
    }

    /// The changes to record into, counting the change (`None` without persistence).
    pub(crate) fn recording(&mut self) -> Option<&mut Changes> {
        let changes = self.changes.as_mut()?;
        self.mutations += 1;
        Some(changes)
    }

    /// How many changes for the store the engine has recorded since it started. A command
    /// that moves this counter changed something durable; one that leaves it alone only
    /// read (or changed what is never persisted, like a reservation). The server holds the
    /// replies of the former until their commit succeeds.
    pub fn mutation_count(&self) -> u64 {
        self.mutations
    }

    /// Forgets jobs whose creation could not be committed: they were never
    /// acknowledged, so they vanish without a final state.
    pub fn discard_jobs(&mut self, ids: &[JobId]) {
        for &id in ids {
            let Some(key) = self.ids.get(id, &self.jobs) else { continue };
            match (self.jobs[key.idx()].state, self.jobs[key.idx()].reserver()) {
                (JobState::Reserved, Some(conn)) => self.remove_reserved(conn, key),
                (JobState::Reserved, None) => {}
                _ => self.unlink_unreserved(key),
            }
            let tube = self.jobs[key.idx()].tube;
            self.counters.total_jobs -= 1;
            self.tubes[tube.idx()].counters.total_jobs -= 1;
            self.free_job(key);
        }
    }
}
