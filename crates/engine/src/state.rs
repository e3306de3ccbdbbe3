//! The [`Engine`] itself: every table, heap and timer set of the queue, and
//! its constructor.

use crate::config::{Config, Nanos, SECOND};
use crate::conn::{Conn, ConnId};
use crate::heap::{JobHeap, Order};
use crate::job::{IdHashBuilder, Job, JobId, JobIndex};
use crate::persist::{BinlogStats, Changes, LoopStats};
use crate::stats::Counters;
use crate::tombstone::Tombstones;
use crate::tube::{Multiset, Tube, TubeKey};
use polaris_proto::TubeName;
use slab::Slab;
use std::collections::{BTreeSet, HashMap};

/// The queue.
#[derive(Debug)]
pub struct Engine {
    pub(crate) cfg: Config,
    pub(crate) jobs: Slab<Job>,
    pub(crate) ids: JobIndex,
    /// TTLs of jobs that have not been reserved yet (most jobs have none).
    pub(crate) ttls: HashMap<JobId, Nanos, IdHashBuilder>,
    pub(crate) next_id: u64,
    pub(crate) tubes: Slab<Tube>,
    /// All tubes in beanstalkd's order (creation order, disturbed by frees).
    pub(crate) tube_order: Multiset<TubeKey>,
    pub(crate) tube_index: HashMap<TubeName, TubeKey>,
    pub(crate) tube_ttls: HashMap<TubeName, Nanos>,
    pub(crate) default_tube: TubeKey,
    pub(crate) conns: Slab<Conn>,
    /// Reserved jobs by TTR deadline.
    pub(crate) ttr_heap: JobHeap,
    pub(crate) delay_timers: BTreeSet<(Nanos, JobId)>,
    pub(crate) ttl_timers: BTreeSet<(Nanos, JobId)>,
    pub(crate) pause_timers: BTreeSet<(Nanos, TubeKey)>,
    pub(crate) wait_timers: BTreeSet<(Nanos, ConnId)>,
    /// Tubes that have at least one waiting connection.
    pub(crate) tubes_with_waiters: BTreeSet<TubeKey>,
    pub(crate) tombstones: Tombstones,
    pub(crate) counters: Counters,
    pub(crate) job_bytes: u64,
    pub(crate) draining: bool,
    pub(crate) started_at: Nanos,
    pub(crate) binlog: BinlogStats,
    pub(crate) loop_stats: LoopStats,
    pub(crate) changes: Option<Changes>,
    /// Changes recorded for the store so far (see [`Engine::mutation_count`]).
    pub(crate) mutations: u64,
}

impl Engine {
    /// A new, empty queue whose clock starts at `now`. With `persist`, the engine
    /// records changes for [`Engine::take_changes`].
    pub fn new(cfg: Config, now: Nanos, persist: bool) -> Engine {
        let tube_ttls =
            cfg.tube_ttls.iter().filter(|(_, s)| *s > 0).map(|(n, s)| (n.clone(), u64::from(*s) * SECOND)).collect();
        let tombstones = Tombstones::new(cfg.retention, cfg.max_tombstones);
        let mut engine = Engine {
            cfg,
            jobs: Slab::new(),
            ids: JobIndex::default(),
            ttls: HashMap::default(),
            next_id: 1,
            tubes: Slab::new(),
            tube_order: Multiset::default(),
            tube_index: HashMap::new(),
            tube_ttls,
            default_tube: TubeKey(0),
            conns: Slab::new(),
            ttr_heap: JobHeap::new(Order::Deadline),
            delay_timers: BTreeSet::new(),
            ttl_timers: BTreeSet::new(),
            pause_timers: BTreeSet::new(),
            wait_timers: BTreeSet::new(),
            tubes_with_waiters: BTreeSet::new(),
            tombstones,
            counters: Counters::default(),
            job_bytes: 0,
            draining: false,
            started_at: now,
            binlog: BinlogStats::default(),
            loop_stats: LoopStats::default(),
            changes: persist.then(Changes::default),
            mutations: 0,
        };
        let default = TubeName::parse(b"default").expect("`default` is a valid tube name");
        // The server's own reference keeps `default` alive forever.
        engine.default_tube = engine.tube_ref(&default);
        engine
    }

    /// Enters drain mode: `put` answers `DRAINING` from now on.
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// True in drain mode.
    pub fn draining(&self) -> bool {
        self.draining
    }
}
