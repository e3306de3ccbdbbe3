//! A binary min-heap of jobs that records each job's position in the job itself,
//! so that removing an arbitrary job is O(log n), as beanstalkd's `heap.c` does
//! with `setpos`.

use super::job::{Job, JobKey};
use slab::Slab;

/// How a heap orders its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Ready jobs: lowest priority number first, then lowest id.
    Priority,
    /// Delayed or reserved jobs: earliest deadline first, then lowest id.
    Deadline,
}

/// Heap of job keys; each job's `heap_pos` is kept equal to its index here.
#[derive(Debug)]
pub(crate) struct JobHeap {
    order: Order,
    items: Vec<JobKey>,
}

impl JobHeap {
    pub(crate) fn new(order: Order) -> JobHeap {
        JobHeap { order, items: Vec::new() }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The jobs in heap order (index `i` holds the job whose `heap_pos` is `i`).
    pub(crate) fn items(&self) -> &[JobKey] {
        &self.items
    }

    /// Whether job `a` belongs above job `b` in this heap.
    pub(crate) fn orders_before(&self, jobs: &Slab<Job>, a: JobKey, b: JobKey) -> bool {
        self.less(jobs, a, b)
    }

    /// The first job, without removing it.
    pub(crate) fn peek(&self) -> Option<JobKey> {
        self.items.first().copied()
    }

    fn less(&self, jobs: &Slab<Job>, a: JobKey, b: JobKey) -> bool {
        let (ja, jb) = (&jobs[a.idx()], &jobs[b.idx()]);
        match self.order {
            Order::Priority => (ja.pri, ja.id) < (jb.pri, jb.id),
            Order::Deadline => (ja.deadline, ja.id) < (jb.deadline, jb.id),
        }
    }

    fn set(&mut self, jobs: &mut Slab<Job>, pos: usize, key: JobKey) {
        self.items[pos] = key;
        jobs[key.idx()].heap_pos = pos as u32;
    }

    /// Adds a job.
    pub(crate) fn push(&mut self, jobs: &mut Slab<Job>, key: JobKey) {
        self.items.push(key);
        let pos = self.items.len() - 1;
        jobs[key.idx()].heap_pos = pos as u32;
        self.sift_up(jobs, pos);
    }

    /// Removes and returns the first job.
    #[cfg(test)]
    pub(crate) fn pop(&mut self, jobs: &mut Slab<Job>) -> Option<JobKey> {
        let first = self.peek()?;
        self.remove(jobs, first);
        Some(first)
    }

    /// Removes `key`, which must be in this heap.
    pub(crate) fn remove(&mut self, jobs: &mut Slab<Job>, key: JobKey) {
        let pos = jobs[key.idx()].heap_pos as usize;
        debug_assert_eq!(self.items.get(pos), Some(&key), "job not in this heap");
        let last = self.items.len() - 1;
        self.items.swap(pos, last);
        self.items.pop();
        if pos < self.items.len() {
            let moved = self.items[pos];
            jobs[moved.idx()].heap_pos = pos as u32;
            // The moved job may belong above or below its new place.
            self.sift_up(jobs, pos);
            self.sift_down(jobs, jobs[moved.idx()].heap_pos as usize);
        }
    }

    fn sift_up(&mut self, jobs: &mut Slab<Job>, mut pos: usize) {
        let key = self.items[pos];
        while pos > 0 {
            let parent = (pos - 1) / 2;
            let parent_key = self.items[parent];
            if !self.less(jobs, key, parent_key) {
                break;
            }
            self.set(jobs, pos, parent_key);
            pos = parent;
        }
        self.set(jobs, pos, key);
    }

    fn sift_down(&mut self, jobs: &mut Slab<Job>, mut pos: usize) {
        let key = self.items[pos];
        let len = self.items.len();
        loop {
            let left = 2 * pos + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.less(jobs, self.items[right], self.items[left]) { right } else { left };
            if !self.less(jobs, self.items[child], key) {
                break;
            }
            let child_key = self.items[child];
            self.set(jobs, pos, child_key);
            pos = child;
        }
        self.set(jobs, pos, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::job_with;
    use proptest::prelude::*;

    proptest! {
        /// Pushing, removing arbitrary jobs and popping always yields sorted order,
        /// and every job's recorded position stays right.
        #[test]
        fn heap_matches_sorted_model(
            pris in proptest::collection::vec(0u32..20, 1..80),
            removals in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut jobs = Slab::new();
            let mut heap = JobHeap::new(Order::Priority);
            let mut model = Vec::new();
            for (i, pri) in pris.iter().enumerate() {
                let key = JobKey::from_idx(jobs.insert(job_with(i as u64 + 1, *pri)));
                heap.push(&mut jobs, key);
                model.push((*pri, i as u64 + 1, key));
            }
            for r in removals {
                if model.is_empty() { break; }
                let (_, _, key) = model.remove(r.index(model.len()));
                heap.remove(&mut jobs, key);
                for (pos, k) in heap.items.iter().enumerate() {
                    prop_assert_eq!(jobs[k.idx()].heap_pos as usize, pos);
                }
            }
            model.sort();
            let mut popped = Vec::new();
            while let Some(k) = heap.pop(&mut jobs) {
                popped.push(k);
            }
            let expected: Vec<JobKey> = model.iter().map(|m| m.2).collect();
            prop_assert_eq!(popped, expected);
        }
    }
}
