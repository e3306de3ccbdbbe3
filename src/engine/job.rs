//! Jobs, their ids and states, and the intrusive FIFO lists that hold buried
//! jobs (per tube) and reserved jobs (per connection).

use super::tube::TubeKey;
use super::ConnId;
use super::Nanos;
use bytes::Bytes;
use slab::Slab;

/// A job id as clients see it. Ids start at 1 and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// Index of a job in the engine's job slab (internal, reused after a job is freed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JobKey(pub(crate) usize);

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

/// Links of an intrusive doubly linked list.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Links {
    prev: Option<JobKey>,
    next: Option<JobKey>,
}

/// A live job.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: JobId,
    pub(crate) tube: TubeKey,
    pub(crate) pri: u32,
    /// The delay of the last `put` or `release`, in nanoseconds.
    pub(crate) delay: Nanos,
    /// Time to run, in nanoseconds (at least one second).
    pub(crate) ttr: Nanos,
    pub(crate) body: Bytes,
    pub(crate) state: JobState,
    pub(crate) created_at: Nanos,
    /// Delayed: when it becomes ready. Reserved: when its TTR runs out.
    pub(crate) deadline: Nanos,
    /// Time to live in nanoseconds: how long it may stay ready before its first reserve.
    pub(crate) ttl: Option<Nanos>,
    /// When the TTL runs out, while it is armed.
    pub(crate) ttl_deadline: Option<Nanos>,
    pub(crate) reserver: Option<ConnId>,
    pub(crate) counters: JobCounters,
    /// Position in whichever heap holds the job (ready, delay or TTR).
    pub(crate) heap_pos: usize,
    /// Links in whichever list holds the job (buried or reserved).
    pub(crate) links: Links,
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
        jobs[key.0].links = Links { prev: self.tail, next: None };
        match self.tail {
            Some(tail) => jobs[tail.0].links.next = Some(key),
            None => self.head = Some(key),
        }
        self.tail = Some(key);
        self.len += 1;
    }

    /// Unlinks `key`, which must be in this list.
    pub(crate) fn remove(&mut self, jobs: &mut Slab<Job>, key: JobKey) {
        let Links { prev, next } = std::mem::take(&mut jobs[key.0].links);
        match prev {
            Some(p) => jobs[p.0].links.next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => jobs[n.0].links.prev = prev,
            None => self.tail = prev,
        }
        self.len -= 1;
    }

    /// The jobs from head to tail.
    pub(crate) fn iter<'a>(&self, jobs: &'a Slab<Job>) -> impl Iterator<Item = JobKey> + 'a {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            let key = cur?;
            cur = jobs[key.0].links.next;
            Some(key)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ready job with the given id and priority, for data-structure tests.
    pub(crate) fn job_with(id: u64, pri: u32) -> Job {
        Job {
            id: JobId(id),
            tube: TubeKey(0),
            pri,
            delay: 0,
            ttr: 1,
            body: Bytes::new(),
            state: JobState::Ready,
            created_at: 0,
            deadline: 0,
            ttl: None,
            ttl_deadline: None,
            reserver: None,
            counters: JobCounters::default(),
            heap_pos: 0,
            links: Links::default(),
        }
    }

    #[test]
    fn list_keeps_fifo_order_across_removals() {
        let mut jobs = Slab::new();
        let keys: Vec<JobKey> = (1..=5).map(|i| JobKey(jobs.insert(job_with(i, 0)))).collect();
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
