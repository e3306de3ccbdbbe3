//! Final states of jobs that have left the queue, kept for a retention window
//! and bounded in count so memory stays bounded.

use super::job::{hash_id, JobId};
use super::Nanos;
use hashbrown::HashTable;
use std::collections::VecDeque;

/// How a job left the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalState {
    /// Deleted by the worker that reserved it.
    Success,
    /// Deleted while buried.
    Failed,
    /// Cancelled before it was reserved (`revoke`, or `delete` of a ready or delayed job).
    Revoked,
    /// Its TTL ran out before anyone reserved it.
    Expired,
}

impl FinalState {
    /// The name `job-state` prints.
    pub fn name(self) -> &'static str {
        match self {
            FinalState::Success => "success",
            FinalState::Failed => "failed",
            FinalState::Revoked => "revoked",
            FinalState::Expired => "expired",
        }
    }

    /// Parses a name written by [`FinalState::name`].
    pub fn from_name(name: &str) -> Option<FinalState> {
        Some(match name {
            "success" => FinalState::Success,
            "failed" => FinalState::Failed,
            "revoked" => FinalState::Revoked,
            "expired" => FinalState::Expired,
            _ => return None,
        })
    }
}

/// A job's final state and when it was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tombstone {
    /// The job.
    pub id: JobId,
    /// How it ended.
    pub state: FinalState,
    /// When it ended (engine clock).
    pub at: Nanos,
}

/// Tombstones in the order they were made (which is also time order), with an
/// index by id. About 40 bytes per tombstone: a million of them fit in 40 MB.
#[derive(Debug)]
pub(crate) struct Tombstones {
    /// Oldest first; `entries[0]` has sequence number `first_seq`.
    entries: VecDeque<Tombstone>,
    first_seq: u64,
    /// Job id -> sequence number of its entry.
    index: HashTable<u64>,
    retention: Nanos,
    max_count: usize,
}

impl Tombstones {
    pub(crate) fn new(retention: Nanos, max_count: usize) -> Tombstones {
        Tombstones { entries: VecDeque::new(), first_seq: 0, index: HashTable::new(), retention, max_count }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn position(&self, id: JobId) -> Option<usize> {
        let (entries, first) = (&self.entries, self.first_seq);
        self.index.find(hash_id(id), |&seq| entries[(seq - first) as usize].id == id).map(|&seq| (seq - first) as usize)
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Tombstone> {
        self.position(id).map(|i| &self.entries[i])
    }

    /// Records `t`, evicting the oldest tombstones beyond the count bound.
    /// Returns the ids evicted.
    pub(crate) fn insert(&mut self, t: Tombstone) -> Vec<JobId> {
        if self.max_count == 0 || self.retention == 0 {
            return vec![t.id];
        }
        if let Some(i) = self.position(t.id) {
            self.entries[i].state = t.state;
            return Vec::new();
        }
        let seq = self.first_seq + self.entries.len() as u64;
        self.entries.push_back(t);
        let (entries, first) = (&self.entries, self.first_seq);
        self.index.insert_unique(hash_id(t.id), seq, |&s| hash_id(entries[(s - first) as usize].id));
        let mut evicted = Vec::new();
        while self.entries.len() > self.max_count {
            evicted.push(self.pop_oldest());
        }
        evicted
    }

    fn pop_oldest(&mut self) -> JobId {
        let oldest = self.entries.pop_front().expect("pop_oldest on a non-empty set");
        let seq = self.first_seq;
        if let Ok(entry) = self.index.find_entry(hash_id(oldest.id), |&s| s == seq) {
            entry.remove();
        }
        self.first_seq += 1;
        oldest.id
    }

    /// Drops tombstones older than the retention window; returns their ids.
    pub(crate) fn expire(&mut self, now: Nanos) -> Vec<JobId> {
        let mut evicted = Vec::new();
        while self.entries.front().is_some_and(|t| t.at.saturating_add(self.retention) <= now) {
            evicted.push(self.pop_oldest());
        }
        evicted
    }

    /// When the oldest tombstone leaves the window.
    pub(crate) fn next_expiry(&self) -> Option<Nanos> {
        self.entries.front().map(|t| t.at.saturating_add(self.retention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u64, at: Nanos) -> Tombstone {
        Tombstone { id: JobId(id), state: FinalState::Success, at }
    }

    proptest::proptest! {
        /// The index agrees with a plain list under any mix of inserts and expiry.
        #[test]
        fn index_matches_a_list(steps in proptest::collection::vec((0u64..50, 0u64..5), 1..200)) {
            let mut ts = Tombstones::new(20, 10);
            let mut model: Vec<Tombstone> = Vec::new();
            let mut now = 0;
            for (id, dt) in steps {
                now += dt;
                let id = JobId(id);
                if model.iter().all(|t| t.id != id) {
                    ts.insert(t(id.0, now));
                    model.push(t(id.0, now));
                    if model.len() > 10 {
                        model.remove(0);
                    }
                }
                ts.expire(now);
                model.retain(|t| t.at + 20 > now);
                for probe in 0..50 {
                    let want = model.iter().find(|t| t.id == JobId(probe));
                    proptest::prop_assert_eq!(ts.get(JobId(probe)), want);
                }
                proptest::prop_assert_eq!(ts.len(), model.len());
            }
        }
    }

    #[test]
    fn bounded_by_count_and_time() {
        let mut ts = Tombstones::new(100, 3);
        for i in 1..=4 {
            ts.insert(t(i, i * 10));
        }
        assert!(ts.get(JobId(1)).is_none(), "count bound evicts the oldest");
        assert_eq!(ts.len(), 3);
        assert_eq!(ts.next_expiry(), Some(120));
        assert!(ts.expire(119).is_empty());
        assert_eq!(ts.expire(120), vec![JobId(2)]);
        assert_eq!(ts.expire(1000), vec![JobId(3), JobId(4)]);
        assert_eq!(ts.next_expiry(), None);
    }
}
