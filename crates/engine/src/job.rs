//! Jobs, their ids and states, and the intrusive FIFO lists that hold buried
//! jobs (per tube) and reserved jobs (per connection).

use super::tube::TubeKey;
use super::ConnId;
use super::{Nanos, SECOND};
use slab::Slab;

/// A job id as clients see it. Ids start at 1 and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// Index of a job in the engine's job slab (internal, reused after a job is freed).
/// 32 bits: the engine holds at most 4 billion jobs, and every job stores a few
/// of these, so their size is a large part of the memory per job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JobKey(pub(crate) u32);

impl JobKey {
    pub(crate) fn idx(self) -> usize {
        self.0 as usize
    }

    pub(crate) fn from_idx(idx: usize) -> JobKey {
        JobKey(u32::try_from(idx).expect("fewer than 2^32 live jobs"))
    }
}

/// "No job" in a link field.
const NIL: u32 = u32::MAX;

/// Where a live job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// In its tube's ready heap.
    Ready,
    /// In its tube's delay heap until `deadline`.
    Delayed,
    /// Held by a connection until `deadline` (its TTR).
    Reserved,
    /// In its tube's buried list.
    Buried,
}

impl JobState {
    /// The name `stats-job` and `job-state` print.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Delayed => "delayed",
            JobState::Reserved => "reserved",
            JobState::Buried => "buried",
        }
    }
}

/// The per-job counters that `stats-job` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounters {
    /// Times reserved.
    pub reserves: u32,
    /// Times its TTR ran out.
    pub timeouts: u32,
    /// Times released.
    pub releases: u32,
    /// Times buried.
    pub buries: u32,
    /// Times kicked.
    pub kicks: u32,
}

/// Links of an intrusive doubly linked list (`NIL` for none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Links {
    prev: u32,
    next: u32,
}

impl Default for Links {
    fn default() -> Self {
        Links { prev: NIL, next: NIL }
    }
}

fn key_of(link: u32) -> Option<JobKey> {
    (link != NIL).then_some(JobKey(link))
}

fn link_of(key: Option<JobKey>) -> u32 {
    key.map_or(NIL, |k| k.0)
}

/// A live job, laid out compactly: a million queued jobs cost about a
/// hundred bytes each here, plus their bodies.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: JobId,
    pub(crate) created_at: Nanos,
    /// Delayed: when it becomes ready. Reserved: when its TTR runs out.
    /// Ready with an armed TTL: when it expires.
    pub(crate) deadline: Nanos,
    pub(crate) body: Box<[u8]>,
    pub(crate) tube: TubeKey,
    pub(crate) pri: u32,
    /// The delay of the last `put` or `release`, in seconds.
    pub(crate) delay_secs: u32,
    /// Time to run in seconds (at least 1).
    pub(crate) ttr_secs: u32,
    /// The connection holding the job while it is reserved.
    reserver: u32,
    /// Position in whichever heap holds the job (ready, delay or TTR).
    pub(crate) heap_pos: u32,
    /// Links in whichever list holds the job (buried or reserved).
    pub(crate) links: Links,
    pub(crate) counters: JobCounters,
    pub(crate) state: JobState,
}

impl Job {
    /// A new ready job in `tube`.
    pub(crate) fn new(
        id: JobId,
        tube: TubeKey,
        pri: u32,
        delay_secs: u32,
        ttr_secs: u32,
        body: Box<[u8]>,
        created_at: Nanos,
    ) -> Job {
        Job {
            id,
            created_at,
            deadline: 0,
            body,
            tube,
            pri,
            delay_secs,
            ttr_secs,
            reserver: NIL,
            heap_pos: 0,
            links: Links::default(),
            counters: JobCounters::default(),
            state: JobState::Ready,
        }
    }

    pub(crate) fn delay(&self) -> Nanos {
        Nanos::from(self.delay_secs) * SECOND
    }

    pub(crate) fn ttr(&self) -> Nanos {
        Nanos::from(self.ttr_secs) * SECOND
    }

    pub(crate) fn reserver(&self) -> Option<ConnId> {
        (self.reserver != NIL).then_some(ConnId(self.reserver as usize))
    }

    pub(crate) fn set_reserver(&mut self, conn: Option<ConnId>) {
        self.reserver = conn.map_or(NIL, |c| u32::try_from(c.0).unwrap_or(NIL));
    }
}

/// Hashes job ids (and other integer keys) with one multiplication. Job ids
/// are sequential, so this spreads them perfectly, and it costs a fraction of
/// the default SipHash, which guards against a flooding attack that cannot be
/// made with ids the server itself assigns.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

/// 2^64 divided by the golden ratio: multiplying by it spreads consecutive integers.
const FIBONACCI_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(FIBONACCI_MULTIPLIER);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(FIBONACCI_MULTIPLIER);
    }
}

/// Builds [`IdHasher`]s, for maps and sets keyed by [`JobId`].
pub type IdHashBuilder = std::hash::BuildHasherDefault<IdHasher>;

/// Job id -> slab key. The table stores only the 4-byte keys and finds a job by
/// comparing ids in the slab, so the index costs about 5 bytes per job.
#[derive(Debug, Default)]
pub(crate) struct JobIndex {
    table: hashbrown::HashTable<JobKey>,
}

/// Ids are sequential, so a multiplicative hash spreads them perfectly.
pub(crate) fn hash_id(id: JobId) -> u64 {
    id.0.wrapping_mul(FIBONACCI_MULTIPLIER)
}

impl JobIndex {
    pub(crate) fn get(&self, id: JobId, jobs: &Slab<Job>) -> Option<JobKey> {
        self.table.find(hash_id(id), |k| jobs[k.idx()].id == id).copied()
    }

    /// Adds `key`, whose job (already in `jobs`) has id `id`.
    pub(crate) fn insert(&mut self, id: JobId, key: JobKey, jobs: &Slab<Job>) {
        self.table.insert_unique(hash_id(id), key, |k| hash_id(jobs[k.idx()].id));
    }

    /// How many ids the index holds.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Removes `id`; its job must still be in `jobs`.
    pub(crate) fn remove(&mut self, id: JobId, jobs: &Slab<Job>) {
        if let Ok(entry) = self.table.find_entry(hash_id(id), |k| jobs[k.idx()].id == id) {
            entry.remove();
        }
    }
}

/// An intrusive FIFO list of jobs: O(1) push, pop and removal from the middle.
#[derive(Debug, Default)]
pub(crate) struct JobList {
    head: Option<JobKey>,
    tail: Option<JobKey>,
    len: usize,
}

impl JobList {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn first(&self) -> Option<JobKey> {
        self.head
    }

    /// Appends `key` at the tail.
    pub(crate) fn push_back(&mut self, jobs: &mut Slab<Job>, key: JobKey) {
        jobs[key.idx()].links = Links { prev: link_of(self.tail), next: NIL };
        match self.tail {
            Some(tail) => jobs[tail.idx()].links.next = key.0,
            None => self.head = Some(key),
        }
        self.tail = Some(key);
        self.len += 1;
    }

    /// Unlinks `key`, which must be in this list.
    pub(crate) fn remove(&mut self, jobs: &mut Slab<Job>, key: JobKey) {
        let Links { prev, next } = std::mem::take(&mut jobs[key.idx()].links);
        match key_of(prev) {
            Some(p) => jobs[p.idx()].links.next = next,
            None => self.head = key_of(next),
        }
        match key_of(next) {
            Some(n) => jobs[n.idx()].links.prev = prev,
            None => self.tail = key_of(prev),
        }
        self.len -= 1;
    }

    /// Walks the list from head to tail checking every link (each `prev` points
    /// back, the tail is the last job, the length is right) and returns its jobs.
    pub(crate) fn checked_keys(&self, jobs: &Slab<Job>) -> Result<Vec<JobKey>, String> {
        let mut keys = Vec::with_capacity(self.len);
        let mut prev: Option<JobKey> = None;
        let mut cur = self.head;
        while let Some(key) = cur {
            if keys.len() > self.len {
                return Err(format!("list walks past its length {} (a cycle?)", self.len));
            }
            let job = jobs.get(key.idx()).ok_or_else(|| format!("list links to a free slab slot {}", key.0))?;
            if key_of(job.links.prev) != prev {
                return Err(format!("job {} has a wrong prev link in its list", job.id.0));
            }
            keys.push(key);
            prev = Some(key);
            cur = key_of(job.links.next);
        }
        if self.tail != prev {
            return Err("list tail is not its last job".into());
        }
        if keys.len() != self.len {
            return Err(format!("list holds {} jobs but says {}", keys.len(), self.len));
        }
        Ok(keys)
    }

    /// The jobs from head to tail.
    pub(crate) fn iter<'a>(&self, jobs: &'a Slab<Job>) -> impl Iterator<Item = JobKey> + 'a {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            let key = cur?;
            cur = key_of(jobs[key.idx()].links.next);
            Some(key)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ready job with the given id and priority, for data-structure tests.
    pub(crate) fn job_with(id: u64, pri: u32) -> Job {
        Job::new(JobId(id), TubeKey(0), pri, 0, 1, Box::default(), 0)
    }

    #[test]
    fn a_job_stays_small() {
        assert!(std::mem::size_of::<Job>() <= 96, "Job grew to {} bytes", std::mem::size_of::<Job>());
    }

    #[test]
    fn list_keeps_fifo_order_across_removals() {
        let mut jobs = Slab::new();
        let keys: Vec<JobKey> = (1..=5).map(|i| JobKey::from_idx(jobs.insert(job_with(i, 0)))).collect();
        let mut list = JobList::default();
        for &k in &keys {
            list.push_back(&mut jobs, k);
        }
        list.remove(&mut jobs, keys[0]);
        list.remove(&mut jobs, keys[2]);
        list.remove(&mut jobs, keys[4]);
        let order: Vec<JobKey> = list.iter(&jobs).collect();
        assert_eq!(order, vec![keys[1], keys[3]]);
        assert_eq!(list.len(), 2);
        list.remove(&mut jobs, keys[1]);
        list.remove(&mut jobs, keys[3]);
        assert!(list.is_empty() && list.first().is_none());
    }
}
