//! Tubes: the [`Tube`] record, the small multiset beanstalkd uses for tube
//! lists and waiters, and how the engine finds, makes and frees tubes
//! (reference counting).

use crate::conn::ConnId;
use crate::heap::{JobHeap, Order};
use crate::job::JobList;
use crate::state::Engine;
use crate::Nanos;
use polaris_proto::TubeName;
use std::collections::HashMap;
use std::hash::Hash;

/// Index of a tube in the engine's tube slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TubeKey(pub(crate) u32);

impl TubeKey {
    pub(crate) fn idx(self) -> usize {
        self.0 as usize
    }

    pub(crate) fn from_idx(idx: usize) -> TubeKey {
        TubeKey(u32::try_from(idx).expect("fewer than 2^32 tubes"))
    }
}

/// beanstalkd's `ms`: an unordered set kept in a vector, where removal moves the
/// last item into the hole and `take` hands out items from a rotating cursor.
///
/// The exact behaviour is client-visible: it decides the order of `list-tubes`
/// and `list-tubes-watched`, and which of several blocked `reserve`s gets the
/// next job. Copying it is how waiters are served in beanstalkd's order.
///
/// beanstalkd finds an item by scanning the vector, so closing a connection that
/// watches n tubes costs O(n²) (each freed tube is searched for in the list of all
/// tubes). Here a set that grows past [`INDEX_FROM`] items also keeps each item's
/// position, so finding and removing are O(1) while the order stays exactly the same.
#[derive(Debug)]
pub(crate) struct Multiset<T> {
    items: Vec<T>,
    cursor: usize,
    /// Position of each item in `items`, once there are more than [`INDEX_FROM`].
    index: Option<HashMap<T, usize>>,
}

/// Below this many items a linear scan is as fast as a hash lookup and costs no memory
/// (most connections watch one or two tubes).
pub(crate) const INDEX_FROM: usize = 32;

impl<T> Default for Multiset<T> {
    fn default() -> Self {
        Multiset { items: Vec::new(), cursor: 0, index: None }
    }
}

impl<T: Copy + Eq + Hash> Multiset<T> {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn position(&self, item: T) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(&item).copied(),
            None => self.items.iter().position(|&x| x == item),
        }
    }

    pub(crate) fn contains(&self, item: T) -> bool {
        self.position(item).is_some()
    }

    /// Adds `item`, which must not be in the set yet (callers check with `contains`).
    pub(crate) fn push(&mut self, item: T) {
        debug_assert!(!self.contains(item), "Multiset holds each item once");
        self.items.push(item);
        match &mut self.index {
            Some(index) => {
                index.insert(item, self.items.len() - 1);
            }
            None if self.items.len() > INDEX_FROM => {
                self.index = Some(self.items.iter().enumerate().map(|(i, &x)| (x, i)).collect());
            }
            None => {}
        }
    }

    /// `swap_remove` at `i`, keeping the index in step: the last item moves into the hole.
    fn swap_remove_at(&mut self, i: usize) -> T {
        let item = self.items.swap_remove(i);
        if let Some(index) = &mut self.index {
            index.remove(&item);
            if let Some(&moved) = self.items.get(i) {
                index.insert(moved, i);
            }
        }
        item
    }

    /// Removes `item` if present (swap with the last item).
    pub(crate) fn remove(&mut self, item: T) -> bool {
        match self.position(item) {
            Some(i) => {
                self.swap_remove_at(i);
                true
            }
            None => false,
        }
    }

    /// Removes the item at index 0, as `ms_clear` does repeatedly.
    pub(crate) fn remove_first(&mut self) -> Option<T> {
        (!self.items.is_empty()).then(|| self.swap_remove_at(0))
    }

    /// Takes the item under the rotating cursor.
    pub(crate) fn take(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        self.cursor %= self.items.len();
        let item = self.swap_remove_at(self.cursor);
        self.cursor += 1;
        Some(item)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.items.iter().copied()
    }
}

/// Per-tube counters that `stats-tube` reports and that are not derived from
/// the tube's lists.
#[derive(Debug, Default)]
pub(crate) struct TubeCounters {
    /// Ready jobs with priority below 1024.
    pub(crate) urgent: u32,
    pub(crate) reserved: u32,
    pub(crate) total_jobs: u64,
    pub(crate) deletes: u64,
    pub(crate) pauses: u64,
    /// Extension: jobs that expired here.
    pub(crate) expired: u64,
    /// Extension: jobs revoked here.
    pub(crate) revoked: u64,
}

/// A named queue.
#[derive(Debug)]
pub(crate) struct Tube {
    pub(crate) name: TubeName,
    /// References from connections (use, watch), jobs, and the server itself
    /// for `default`. The tube is freed when this drops to zero.
    pub(crate) refs: u32,
    pub(crate) ready: JobHeap,
    pub(crate) delayed: JobHeap,
    pub(crate) buried: JobList,
    /// Connections blocked in `reserve` that watch this tube.
    pub(crate) waiting: Multiset<ConnId>,
    pub(crate) using: u32,
    pub(crate) watching: u32,
    pub(crate) counters: TubeCounters,
    /// Length of the current pause in nanoseconds; 0 when not paused.
    pub(crate) pause: Nanos,
    pub(crate) unpause_at: Nanos,
}

impl Tube {
    pub(crate) fn new(name: TubeName) -> Tube {
        Tube {
            name,
            refs: 0,
            ready: JobHeap::new(Order::Priority),
            delayed: JobHeap::new(Order::Deadline),
            buried: JobList::default(),
            waiting: Multiset::default(),
            using: 0,
            watching: 0,
            counters: TubeCounters::default(),
            pause: 0,
            unpause_at: 0,
        }
    }
}

// ----- tube lifetime ---------------------------------------------------------

impl Engine {
    /// Finds or makes the tube `name` and takes a reference to it.
    pub(crate) fn tube_ref(&mut self, name: &TubeName) -> TubeKey {
        let key = self.tube_find_or_make(name);
        self.incref(key);
        key
    }

    /// Finds or makes the tube `name` without taking a reference: the caller
    /// must attach something that holds one (a job) before anything can free it.
    pub(crate) fn tube_find_or_make(&mut self, name: &TubeName) -> TubeKey {
        match self.tube_index.get(name) {
            Some(&key) => key,
            None => {
                let key = TubeKey::from_idx(self.tubes.insert(Tube::new(name.clone())));
                self.tube_index.insert(name.clone(), key);
                self.tube_order.push(key);
                key
            }
        }
    }

    pub(crate) fn incref(&mut self, t: TubeKey) {
        self.tubes[t.idx()].refs += 1;
    }

    /// Drops a reference; a tube nobody refers to is freed.
    pub(crate) fn decref(&mut self, t: TubeKey) {
        let tube = &mut self.tubes[t.idx()];
        tube.refs -= 1;
        if tube.refs > 0 {
            return;
        }
        let tube = self.tubes.remove(t.idx());
        if tube.pause > 0 {
            self.pause_timers.remove(&(tube.unpause_at, t));
        }
        self.tube_index.remove(&tube.name);
        self.tube_order.remove(t);
        self.tubes_with_waiters.remove(&t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiset_take_rotates_and_swaps() {
        let mut m = Multiset::default();
        for i in 1..=5 {
            m.push(i);
        }
        // cursor 0: takes 1, 5 moves into slot 0 -> [5,2,3,4]
        assert_eq!(m.take(), Some(1));
        // cursor 1: takes 2, 4 moves into slot 1 -> [5,4,3]
        assert_eq!(m.take(), Some(2));
        // cursor 2: takes 3 -> [5,4]
        assert_eq!(m.take(), Some(3));
        // cursor 3 % 2 = 1: takes 4 -> [5]
        assert_eq!(m.take(), Some(4));
        assert_eq!(m.take(), Some(5));
        assert_eq!(m.take(), None);
    }

    /// beanstalkd's `ms` as it is written: a vector searched linearly.
    #[derive(Default)]
    struct PlainMultiset {
        items: Vec<u16>,
        cursor: usize,
    }

    impl PlainMultiset {
        fn remove(&mut self, item: u16) -> bool {
            self.items.iter().position(|&x| x == item).map(|i| self.items.swap_remove(i)).is_some()
        }
        fn take(&mut self) -> Option<u16> {
            if self.items.is_empty() {
                return None;
            }
            self.cursor %= self.items.len();
            let item = self.items.swap_remove(self.cursor);
            self.cursor += 1;
            Some(item)
        }
    }

    proptest::proptest! {
        /// The index never changes the order: the same operations leave the same items in
        /// the same places as the plain vector, on both sides of `INDEX_FROM`.
        #[test]
        fn indexed_multiset_keeps_beanstalkds_order(ops in proptest::collection::vec((0u8..4, 0u16..80), 0..600)) {
            let mut indexed = Multiset::default();
            let mut plain = PlainMultiset::default();
            for (op, item) in ops {
                match op {
                    0 | 1 => {
                        if !indexed.contains(item) {
                            indexed.push(item);
                            plain.items.push(item);
                        }
                    }
                    2 => proptest::prop_assert_eq!(indexed.remove(item), plain.remove(item)),
                    _ => {
                        if item % 2 == 0 {
                            proptest::prop_assert_eq!(indexed.take(), plain.take());
                        } else {
                            let first = indexed.remove_first();
                            let expected = (!plain.items.is_empty()).then(|| plain.items.swap_remove(0));
                            proptest::prop_assert_eq!(first, expected);
                        }
                    }
                }
                proptest::prop_assert_eq!(indexed.iter().collect::<Vec<_>>(), plain.items.clone());
                for &x in &plain.items {
                    proptest::prop_assert!(indexed.contains(x));
                }
            }
        }
    }
}
