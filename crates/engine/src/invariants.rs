//! [`Engine::check_invariants`]: the consistency rules every table, heap, list,
//! timer set and counter of the engine keeps between two calls into it. The
//! engine's tests and the fuzz targets call it after every step; the server
//! never does.
//!
//! Every count is recomputed from the structures themselves and compared with
//! the counter the engine keeps, and with what `stats` and `stats-tube` print.

use crate::conn::ConnId;
use crate::heap::JobHeap;
use crate::job::{JobKey, JobState};
use crate::mechanics::{SAFETY_MARGIN, URGENT_THRESHOLD};
use crate::state::Engine;
use crate::tube::TubeKey;
use crate::Nanos;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Where a live job was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Ready(TubeKey),
    Delayed(TubeKey),
    Buried(TubeKey),
    Reserved(ConnId),
}

/// Counts recomputed from the structures, per tube.
#[derive(Debug, Default)]
struct TubeCounts {
    ready: u64,
    urgent: u64,
    delayed: u64,
    buried: u64,
    reserved: u64,
    jobs: u64,
    using: u64,
    watching: u64,
    waiting: u64,
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// The value of `key` in a flat `stats*` YAML body.
fn yaml_field<'a>(yaml: &'a [u8], key: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(yaml).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(": "))
}

fn expect_reported(yaml: &[u8], what: &str, key: &str, want: u64) -> Result<(), String> {
    let got = yaml_field(yaml, key).ok_or_else(|| format!("{what} has no {key}"))?;
    ensure(got == want.to_string(), || format!("{what} reports {key}: {got}, the structures hold {want}"))
}

impl Engine {
    /// Checks that the engine is consistent; `Err` says what is not.
    ///
    /// - Every live job is in exactly one place, the one its state names: its
    ///   tube's ready heap, its tube's delay heap, its tube's buried list, or the
    ///   reserved list of the one connection that holds it (and then the TTR heap).
    /// - Heaps keep the heap order and every job's `heap_pos`; lists are well linked.
    /// - The id index holds exactly the jobs of the slab.
    /// - The timer sets hold exactly the deadlines of the jobs, tubes and waits
    ///   they time, and no waiting connection can miss its wake-up.
    /// - Waiting connections are exactly the ones in their watched tubes' waiter
    ///   sets, and none of them could be handed a ready job now.
    /// - Tube reference counts, the global and per-tube counters, and what
    ///   `stats` and `stats-tube` report agree with the structures.
    ///
    /// It costs time linear in the size of the queue: for tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_tube_tables()?;
        let places = self.check_places()?;
        let per_tube = self.check_jobs(&places)?;
        self.check_timers()?;
        self.check_conns()?;
        self.check_counts(&per_tube)?;
        self.check_reported_stats(&per_tube)?;
        self.check_changes()
    }

    /// Whether `conn` is blocked in `reserve` (for tests and fuzzing, which
    /// hold it against the [`crate::Outcome`]s and replies they saw).
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.conns.get(conn.0).is_some_and(|c| c.wait.is_some())
    }

    fn check_tube_tables(&self) -> Result<(), String> {
        let order: Vec<TubeKey> = self.tube_order.iter().collect();
        let distinct: HashSet<TubeKey> = order.iter().copied().collect();
        ensure(distinct.len() == order.len(), || "a tube is listed twice in the tube order".into())?;
        ensure(order.len() == self.tubes.len(), || {
            format!("the tube order lists {} tubes, the slab holds {}", order.len(), self.tubes.len())
        })?;
        for t in &order {
            ensure(self.tubes.contains(t.idx()), || format!("the tube order lists a freed tube {}", t.0))?;
        }
        ensure(self.tube_index.len() == self.tubes.len(), || {
            format!("the tube index has {} names, the slab {} tubes", self.tube_index.len(), self.tubes.len())
        })?;
        for (name, t) in &self.tube_index {
            let tube = self.tubes.get(t.idx()).ok_or_else(|| format!("tube index names freed tube {name}"))?;
            ensure(&tube.name == name, || format!("tube index maps {name} to tube {}", tube.name))?;
        }
        let default = self.tubes.get(self.default_tube.idx()).ok_or("the default tube was freed")?;
        ensure(default.name.as_str() == "default", || format!("the default tube is named {}", default.name))?;
        Ok(())
    }

    fn check_heap(&self, heap: &JobHeap, what: &str) -> Result<(), String> {
        let items = heap.items();
        for (pos, &key) in items.iter().enumerate() {
            let job = self.jobs.get(key.idx()).ok_or_else(|| format!("{what} holds a freed job slot"))?;
            ensure(job.heap_pos as usize == pos, || {
                format!("job {} sits at {pos} in the {what} but records heap_pos {}", job.id.0, job.heap_pos)
            })?;
            if pos > 0 {
                let parent = items[(pos - 1) / 2];
                ensure(!heap.orders_before(&self.jobs, key, parent), || {
                    format!("job {} is above its parent job {} in the {what}", job.id.0, self.jobs[parent.idx()].id.0)
                })?;
            }
        }
        Ok(())
    }

    /// Finds every job in the queues and checks that each is found once.
    fn check_places(&self) -> Result<HashMap<usize, Place>, String> {
        let mut places: HashMap<usize, Place> = HashMap::with_capacity(self.jobs.len());
        let jobs = &self.jobs;
        let mut place = |key: JobKey, at: Place| -> Result<(), String> {
            let job = jobs.get(key.idx()).ok_or_else(|| format!("{at:?} holds a freed job slot {}", key.0))?;
            match places.insert(key.idx(), at) {
                Some(before) => Err(format!("job {} is in two places: {before:?} and {at:?}", job.id.0)),
                None => Ok(()),
            }
        };
        for (idx, tube) in &self.tubes {
            let t = TubeKey::from_idx(idx);
            self.check_heap(&tube.ready, &format!("ready heap of {}", tube.name))?;
            self.check_heap(&tube.delayed, &format!("delay heap of {}", tube.name))?;
            for &key in tube.ready.items() {
                place(key, Place::Ready(t))?;
            }
            for &key in tube.delayed.items() {
                place(key, Place::Delayed(t))?;
            }
            for key in tube.buried.checked_keys(jobs).map_err(|e| format!("buried list of {}: {e}", tube.name))? {
                place(key, Place::Buried(t))?;
            }
        }
        for (idx, conn) in &self.conns {
            let keys = conn.reserved.checked_keys(jobs).map_err(|e| format!("reserved list of conn {idx}: {e}"))?;
            for key in keys {
                place(key, Place::Reserved(ConnId(idx)))?;
            }
        }
        if let Some((_, job)) = self.jobs.iter().find(|(idx, _)| !places.contains_key(idx)) {
            return Err(format!("job {} ({}) is in no queue", job.id.0, job.state.name()));
        }
        Ok(places)
    }

    /// Checks each job against where it was found, the id index and the TTR
    /// heap; returns the per-tube counts of jobs.
    fn check_jobs(&self, places: &HashMap<usize, Place>) -> Result<HashMap<TubeKey, TubeCounts>, String> {
        let mut per_tube: HashMap<TubeKey, TubeCounts> =
            self.tubes.iter().map(|(idx, _)| (TubeKey::from_idx(idx), TubeCounts::default())).collect();
        ensure(self.ids.len() == self.jobs.len(), || {
            format!("the id index holds {} ids, the slab {} jobs", self.ids.len(), self.jobs.len())
        })?;
        self.check_heap(&self.ttr_heap, "TTR heap")?;
        let in_ttr_heap: HashSet<usize> = self.ttr_heap.items().iter().map(|k| k.idx()).collect();
        let mut bytes = 0u64;
        for (idx, job) in &self.jobs {
            let id = job.id.0;
            ensure(self.ids.get(job.id, &self.jobs).map(|k| k.idx()) == Some(idx), || {
                format!("the id index does not lead to job {id}")
            })?;
            ensure(id >= 1 && id < self.next_id, || format!("job {id} is not below the next id {}", self.next_id))?;
            ensure(job.ttr_secs >= 1, || format!("job {id} has a TTR of 0"))?;
            let counts = per_tube.get_mut(&job.tube).ok_or_else(|| format!("job {id} is in a freed tube"))?;
            counts.jobs += 1;
            let at = places[&idx];
            let matches = match (job.state, at) {
                (JobState::Ready, Place::Ready(t)) => {
                    counts.ready += 1;
                    counts.urgent += u64::from(job.pri < URGENT_THRESHOLD);
                    t == job.tube
                }
                (JobState::Delayed, Place::Delayed(t)) => {
                    counts.delayed += 1;
                    t == job.tube
                }
                (JobState::Buried, Place::Buried(t)) => {
                    counts.buried += 1;
                    t == job.tube
                }
                (JobState::Reserved, Place::Reserved(c)) => {
                    counts.reserved += 1;
                    job.reserver() == Some(c)
                }
                _ => false,
            };
            ensure(matches, || {
                format!("job {id} is {} but found in {at:?} (its tube is {:?})", job.state.name(), job.tube)
            })?;
            ensure((job.state == JobState::Reserved) == job.reserver().is_some(), || {
                format!("job {id} is {} with reserver {:?}", job.state.name(), job.reserver())
            })?;
            ensure((job.state == JobState::Reserved) == in_ttr_heap.contains(&idx), || {
                format!("job {id} is {} and in the TTR heap: {}", job.state.name(), in_ttr_heap.contains(&idx))
            })?;
            bytes += job.body.len() as u64;
        }
        ensure(in_ttr_heap.len() == self.ttr_heap.items().len(), || "a job is twice in the TTR heap".into())?;
        ensure(bytes == self.job_bytes, || {
            format!("job bodies hold {bytes} bytes, job_bytes says {}", self.job_bytes)
        })?;
        Ok(per_tube)
    }

    fn check_timers(&self) -> Result<(), String> {
        let mut delays = BTreeSet::new();
        let mut ttls = BTreeSet::new();
        for (_, job) in &self.jobs {
            match job.state {
                JobState::Delayed => {
                    delays.insert((job.deadline, job.id));
                }
                JobState::Ready if self.ttls.contains_key(&job.id) => {
                    ttls.insert((job.deadline, job.id));
                }
                _ => {}
            }
        }
        ensure(delays == self.delay_timers, || {
            format!("delay timers {:?} are not the delayed jobs' deadlines {delays:?}", self.delay_timers)
        })?;
        ensure(ttls == self.ttl_timers, || {
            format!("TTL timers {:?} are not the ready TTL jobs' deadlines {ttls:?}", self.ttl_timers)
        })?;
        for id in self.ttls.keys() {
            let key = self.ids.get(*id, &self.jobs).ok_or_else(|| format!("a TTL is kept for gone job {}", id.0))?;
            let state = self.jobs[key.idx()].state;
            ensure(matches!(state, JobState::Ready | JobState::Delayed), || {
                format!("job {} is {} but still has a TTL", id.0, state.name())
            })?;
        }
        let pauses: BTreeSet<(Nanos, TubeKey)> = self
            .tubes
            .iter()
            .filter(|(_, t)| t.pause > 0)
            .map(|(idx, t)| (t.unpause_at, TubeKey::from_idx(idx)))
            .collect();
        ensure(pauses == self.pause_timers, || {
            format!("pause timers {:?} are not the paused tubes' ends {pauses:?}", self.pause_timers)
        })?;
        let waits: BTreeSet<(Nanos, ConnId)> =
            self.conns.iter().filter_map(|(idx, c)| c.wait.as_ref()?.timer.map(|at| (at, ConnId(idx)))).collect();
        ensure(waits == self.wait_timers, || {
            format!("wait timers {:?} are not the waits' timers {waits:?}", self.wait_timers)
        })?;
        Ok(())
    }

    fn check_conns(&self) -> Result<(), String> {
        for (idx, conn) in &self.conns {
            ensure(self.tubes.contains(conn.use_tube.idx()), || format!("conn {idx} uses a freed tube"))?;
            ensure(!conn.watch.is_empty(), || format!("conn {idx} watches no tube"))?;
            let watched: HashSet<TubeKey> = conn.watch.iter().collect();
            ensure(watched.len() == conn.watch.len(), || format!("conn {idx} watches a tube twice"))?;
            for t in &watched {
                ensure(self.tubes.contains(t.idx()), || format!("conn {idx} watches a freed tube"))?;
            }
            if let Some(id) = conn.pending_put {
                ensure(id.0 < self.next_id && self.ids.get(id, &self.jobs).is_none(), || {
                    format!("conn {idx} holds put id {} that is live or not yet handed out", id.0)
                })?;
            }
            let Some(wait) = &conn.wait else { continue };
            let c = ConnId(idx);
            for t in &watched {
                let tube = &self.tubes[t.idx()];
                ensure(tube.waiting.contains(c), || {
                    format!("waiting conn {idx} is not among {}'s waiters", tube.name)
                })?;
                // Waiters are served as soon as a job is ready in a tube that is not paused.
                ensure(tube.ready.is_empty() || tube.pause > 0, || {
                    format!("conn {idx} waits although {} has a ready job", tube.name)
                })?;
            }
            // The wait's timer fires no later than its timeout or the start of the
            // safety margin of its soonest reserved job.
            let soon = conn.reserved.iter(&self.jobs).map(|k| self.jobs[k.idx()].deadline).min();
            let due = match (wait.timeout_at, soon.map(|d| d.saturating_sub(SAFETY_MARGIN))) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(due) = due {
                ensure(wait.timer.is_some_and(|at| at <= due), || {
                    format!("conn {idx} waits until {due} but its timer is {:?}", wait.timer)
                })?;
            }
        }
        let mut with_waiters = BTreeSet::new();
        for (idx, tube) in &self.tubes {
            let waiters: Vec<ConnId> = tube.waiting.iter().collect();
            let distinct: HashSet<ConnId> = waiters.iter().copied().collect();
            ensure(distinct.len() == waiters.len(), || format!("a conn waits twice on {}", tube.name))?;
            for c in waiters {
                let conn = self.conns.get(c.0).ok_or_else(|| format!("a closed conn waits on {}", tube.name))?;
                ensure(conn.wait.is_some(), || {
                    format!("conn {} is among {}'s waiters but not waiting", c.0, tube.name)
                })?;
                ensure(conn.watch.contains(TubeKey::from_idx(idx)), || {
                    format!("conn {} waits on {} without watching it", c.0, tube.name)
                })?;
            }
            if !tube.waiting.is_empty() {
                with_waiters.insert(TubeKey::from_idx(idx));
            }
        }
        ensure(with_waiters == self.tubes_with_waiters, || {
            format!("tubes_with_waiters {:?} should be {with_waiters:?}", self.tubes_with_waiters)
        })
    }

    fn check_counts(&self, per_tube: &HashMap<TubeKey, TubeCounts>) -> Result<(), String> {
        let mut per_tube_conns: HashMap<TubeKey, (u64, u64, u64)> = HashMap::new();
        let (mut producers, mut workers, mut waiting) = (0u64, 0u64, 0u64);
        for (_, conn) in &self.conns {
            per_tube_conns.entry(conn.use_tube).or_default().0 += 1;
            for t in conn.watch.iter() {
                let entry = per_tube_conns.entry(t).or_default();
                entry.1 += 1;
                entry.2 += u64::from(conn.wait.is_some());
            }
            producers += u64::from(conn.producer);
            workers += u64::from(conn.worker);
            waiting += u64::from(conn.wait.is_some());
        }
        let c = &self.counters;
        let global = [
            ("producers", producers, u64::from(c.producers)),
            ("workers", workers, u64::from(c.workers)),
            ("waiting", waiting, u64::from(c.waiting)),
            ("ready", per_tube.values().map(|t| t.ready).sum(), u64::from(c.ready)),
            ("urgent", per_tube.values().map(|t| t.urgent).sum(), u64::from(c.urgent)),
            ("delayed", per_tube.values().map(|t| t.delayed).sum(), u64::from(c.delayed)),
            ("buried", per_tube.values().map(|t| t.buried).sum(), u64::from(c.buried)),
            ("reserved", per_tube.values().map(|t| t.reserved).sum(), u64::from(c.reserved)),
        ];
        for (what, want, got) in global {
            ensure(want == got, || format!("the {what} counter is {got}, the structures hold {want}"))?;
        }
        for (idx, tube) in &self.tubes {
            let t = TubeKey::from_idx(idx);
            let counts = &per_tube[&t];
            let (using, watching, _) = per_tube_conns.get(&t).copied().unwrap_or_default();
            let name = &tube.name;
            let checks = [
                ("urgent", counts.urgent, u64::from(tube.counters.urgent)),
                ("reserved", counts.reserved, u64::from(tube.counters.reserved)),
                ("using", using, u64::from(tube.using)),
                ("watching", watching, u64::from(tube.watching)),
            ];
            for (what, want, got) in checks {
                ensure(want == got, || {
                    format!("tube {name}: the {what} counter is {got}, the structures hold {want}")
                })?;
            }
            // References: each user, watcher and job, and the server's own for `default`.
            let refs = using + watching + counts.jobs + u64::from(t == self.default_tube);
            ensure(refs == u64::from(tube.refs), || format!("tube {name} has {} refs, {refs} referents", tube.refs))?;
        }
        Ok(())
    }

    /// What `stats` and `stats-tube` print agrees with the structures.
    fn check_reported_stats(&self, per_tube: &HashMap<TubeKey, TubeCounts>) -> Result<(), String> {
        let now = self.started_at;
        let stats = self.stats_yaml(now);
        let sum = |f: fn(&TubeCounts) -> u64| per_tube.values().map(f).sum::<u64>();
        let count = |f: fn(&crate::conn::Conn) -> bool| self.conns.iter().filter(|(_, c)| f(c)).count() as u64;
        let global = [
            ("current-jobs-urgent", sum(|t| t.urgent)),
            ("current-jobs-ready", sum(|t| t.ready)),
            ("current-jobs-reserved", sum(|t| t.reserved)),
            ("current-jobs-delayed", sum(|t| t.delayed)),
            ("current-jobs-buried", sum(|t| t.buried)),
            ("current-tubes", self.tubes.len() as u64),
            ("current-connections", self.conns.len() as u64),
            ("current-producers", count(|c| c.producer)),
            ("current-workers", count(|c| c.worker)),
            ("current-waiting", count(|c| c.wait.is_some())),
        ];
        for (key, want) in global {
            expect_reported(&stats, "stats", key, want)?;
        }
        let mut per_tube_conns: HashMap<TubeKey, TubeCounts> = HashMap::new();
        for (_, conn) in &self.conns {
            per_tube_conns.entry(conn.use_tube).or_default().using += 1;
            for t in conn.watch.iter() {
                let entry = per_tube_conns.entry(t).or_default();
                entry.watching += 1;
                entry.waiting += u64::from(conn.wait.is_some());
            }
        }
        let none = TubeCounts::default();
        for (idx, tube) in &self.tubes {
            let t = TubeKey::from_idx(idx);
            let yaml = self.stats_tube_yaml(t, now);
            let what = format!("stats-tube {}", tube.name);
            ensure(yaml_field(&yaml, "name") == Some(tube.name.as_str()), || format!("{what} reports another name"))?;
            let jobs = &per_tube[&t];
            let conns = per_tube_conns.get(&t).unwrap_or(&none);
            let fields = [
                ("current-jobs-urgent", jobs.urgent),
                ("current-jobs-ready", jobs.ready),
                ("current-jobs-reserved", jobs.reserved),
                ("current-jobs-delayed", jobs.delayed),
                ("current-jobs-buried", jobs.buried),
                ("current-using", conns.using),
                ("current-watching", conns.watching),
                ("current-waiting", conns.waiting),
            ];
            for (key, want) in fields {
                expect_reported(&yaml, &what, key, want)?;
            }
        }
        Ok(())
    }

    /// Recorded changes name live jobs as new only while they are new.
    fn check_changes(&self) -> Result<(), String> {
        let Some(changes) = &self.changes else { return Ok(()) };
        for id in &changes.inserted {
            ensure(changes.jobs.contains(id), || format!("new job {} is not among the changed jobs", id.0))?;
            ensure(self.ids.get(*id, &self.jobs).is_some(), || format!("job {} is recorded new but gone", id.0))?;
        }
        Ok(())
    }
}
