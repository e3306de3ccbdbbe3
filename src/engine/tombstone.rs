//! Final states of jobs that have left the queue, kept for a retention window
//! and bounded in count so memory stays bounded.

use super::job::JobId;
use super::Nanos;
use std::collections::{HashMap, VecDeque};

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

/// Tombstones in the order they were made (which is also time order).
#[derive(Debug)]
pub(crate) struct Tombstones {
    by_id: HashMap<JobId, Tombstone>,
    order: VecDeque<JobId>,
    retention: Nanos,
    max_count: usize,
}

impl Tombstones {
    pub(crate) fn new(retention: Nanos, max_count: usize) -> Tombstones {
        Tombstones { by_id: HashMap::new(), order: VecDeque::new(), retention, max_count }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn get(&self, id: JobId) -> Option<&Tombstone> {
        self.by_id.get(&id)
    }

    /// Records `t`, evicting the oldest tombstones beyond the count bound.
    /// Returns the ids evicted.
    pub(crate) fn insert(&mut self, t: Tombstone) -> Vec<JobId> {
        if self.max_count == 0 || self.retention == 0 {
            return vec![t.id];
        }
        if self.by_id.insert(t.id, t).is_none() {
            self.order.push_back(t.id);
        }
        let mut evicted = Vec::new();
        while self.by_id.len() > self.max_count {
            match self.order.pop_front() {
                Some(id) => {
                    self.by_id.remove(&id);
                    evicted.push(id);
                }
                None => break,
            }
        }
        evicted
    }

    /// Drops tombstones older than the retention window; returns their ids.
    pub(crate) fn expire(&mut self, now: Nanos) -> Vec<JobId> {
        let mut evicted = Vec::new();
        while let Some(&id) = self.order.front() {
            let at = self.by_id.get(&id).map_or(0, |t| t.at);
            if at.saturating_add(self.retention) > now {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&id);
            evicted.push(id);
        }
        evicted
    }

    /// When the oldest tombstone leaves the window.
    pub(crate) fn next_expiry(&self) -> Option<Nanos> {
        let id = self.order.front()?;
        Some(self.by_id.get(id)?.at.saturating_add(self.retention))
    }

    /// All tombstones, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Tombstone> + '_ {
        self.order.iter().filter_map(|id| self.by_id.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u64, at: Nanos) -> Tombstone {
        Tombstone { id: JobId(id), state: FinalState::Success, at }
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
