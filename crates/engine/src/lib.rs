//! The queue as a synchronous state machine: tubes, jobs, heaps and timers.
//!
//! The engine never touches a socket, a file or the system clock. The server
//! hands it commands with the current time and a [`ReplySink`]; the engine
//! writes replies (to the caller, and to any blocked connection it wakes) into
//! the sink. [`Engine::tick`] fires timers and [`Engine::next_deadline`] says
//! when the next one is due, which the server uses as its poll timeout.
//!
//! The data structures mirror beanstalkd's so that every observable order is
//! the same: per-tube ready heaps by (priority, id), delay heaps by (deadline,
//! id), buried FIFO lists, and beanstalkd's multiset for tube lists and waiting
//! connections (see [`tube::Multiset`]).

mod heap;
mod job;
mod stats;
mod tombstone;
mod tube;

use job::JobIndex;
pub use job::{IdHashBuilder, JobCounters, JobId, JobState};
pub use tombstone::{FinalState, Tombstone};

use heap::{JobHeap, Order};
use job::{Job, JobKey, JobList};
use polaris_proto::{reply, Command, Counted, PutOptions, ReplyLine, TubeName};
use slab::Slab;
use std::collections::{BTreeSet, HashMap, HashSet};
use tombstone::Tombstones;
use tube::{Multiset, Tube, TubeKey};

/// Engine time: nanoseconds on a monotonic clock chosen by the caller.
pub type Nanos = u64;
/// One second in [`Nanos`].
pub const SECOND: Nanos = 1_000_000_000;
/// A reserved job inside its last second makes `reserve` answer `DEADLINE_SOON`.
const SAFETY_MARGIN: Nanos = SECOND;
/// Ready jobs with a priority below this count as urgent.
const URGENT_THRESHOLD: u32 = 1024;

/// A client connection, as the engine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// Where the engine writes replies.
pub trait ReplySink {
    /// Appends `bytes` to the output of `conn`.
    fn send(&mut self, conn: ConnId, bytes: &[u8]);
}

/// What the server should do with the connection after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command was answered; go on with the next one.
    Done,
    /// The connection waits in `reserve`; read no further commands from it
    /// until the engine sends it a reply.
    Blocked,
    /// Close the connection (`quit`).
    Close,
}

/// Facts about this server process that `stats` prints.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Process id.
    pub pid: u32,
    /// Random instance id (16 hex digits).
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Kernel version string.
    pub os: String,
    /// Machine architecture.
    pub platform: String,
    /// Version string (printed quoted).
    pub version: String,
}

/// CPU time used by the process: (user, system), each as (seconds, microseconds).
pub type Rusage = ((u64, u32), (u64, u32));

/// Engine settings. Every limit is explicit.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest job body in bytes (`-z`).
    pub max_job_size: u32,
    /// Most body bytes held in memory by all jobs together; a `put` beyond it
    /// answers `OUT_OF_MEMORY`.
    pub max_job_bytes: u64,
    /// How long final states are kept.
    pub retention: Nanos,
    /// Most final states kept.
    pub max_tombstones: usize,
    /// Default TTL per tube name, in seconds (from `--tube-ttl`).
    pub tube_ttls: Vec<(TubeName, u32)>,
    /// Printed as `binlog-max-size` (`-s`).
    pub binlog_max_size: u64,
    /// Identity printed by `stats`.
    pub instance: Instance,
    /// Reads the process's CPU usage for `stats`.
    pub rusage: fn() -> Rusage,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_job_size: polaris_proto::DEFAULT_MAX_JOB_SIZE,
            max_job_bytes: u64::MAX,
            retention: 3600 * SECOND,
            max_tombstones: 100_000,
            tube_ttls: Vec::new(),
            binlog_max_size: 10_485_760,
            instance: Instance {
                pid: 0,
                id: "0000000000000000".into(),
                hostname: "localhost".into(),
                os: String::new(),
                platform: String::new(),
                version: "1.12".into(),
            },
            rusage: || ((0, 0), (0, 0)),
        }
    }
}

/// Counters of the persistence layer, printed as `binlog-*` in `stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct BinlogStats {
    /// Records written since start.
    pub records_written: u64,
    /// Records rewritten by compaction.
    pub records_migrated: u64,
}

/// A blocked `reserve`.
#[derive(Debug)]
struct Wait {
    /// When `reserve-with-timeout` gives up.
    timeout_at: Option<Nanos>,
    /// The entry in `wait_timers`, if any.
    timer: Option<Nanos>,
}

#[derive(Debug)]
struct Conn {
    use_tube: TubeKey,
    watch: Multiset<TubeKey>,
    reserved: JobList,
    wait: Option<Wait>,
    producer: bool,
    worker: bool,
    /// The id assigned when the header of a `put` was read, for its body.
    pending_put: Option<JobId>,
}

/// Commands counted in `stats` as `cmd-*`.
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
enum Op {
    Put,
    Peek,
    PeekReady,
    PeekDelayed,
    PeekBuried,
    Reserve,
    ReserveWithTimeout,
    Delete,
    Release,
    Use,
    Watch,
    Ignore,
    Bury,
    Kick,
    Touch,
    Stats,
    StatsJob,
    StatsTube,
    ListTubes,
    ListTubeUsed,
    ListTubesWatched,
    PauseTube,
    Count,
}

#[derive(Debug, Default)]
struct Counters {
    ops: [u64; Op::Count as usize],
    job_timeouts: u64,
    total_jobs: u64,
    total_connections: u64,
    producers: u32,
    workers: u32,
    waiting: u32,
    urgent: u32,
    ready: u32,
    reserved: u32,
    delayed: u32,
    buried: u32,
    expired: u64,
    revoked: u64,
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

/// The queue.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    jobs: Slab<Job>,
    ids: JobIndex,
    /// TTLs of jobs that have not been reserved yet (most jobs have none).
    ttls: HashMap<JobId, Nanos, IdHashBuilder>,
    next_id: u64,
    tubes: Slab<Tube>,
    /// All tubes in beanstalkd's order (creation order, disturbed by frees).
    tube_order: Multiset<TubeKey>,
    tube_index: HashMap<TubeName, TubeKey>,
    tube_ttls: HashMap<TubeName, Nanos>,
    default_tube: TubeKey,
    conns: Slab<Conn>,
    /// Reserved jobs by TTR deadline.
    ttr_heap: JobHeap,
    delay_timers: BTreeSet<(Nanos, JobId)>,
    ttl_timers: BTreeSet<(Nanos, JobId)>,
    pause_timers: BTreeSet<(Nanos, TubeKey)>,
    wait_timers: BTreeSet<(Nanos, ConnId)>,
    /// Tubes that have at least one waiting connection.
    tubes_with_waiters: BTreeSet<TubeKey>,
    tombstones: Tombstones,
    counters: Counters,
    job_bytes: u64,
    draining: bool,
    started_at: Nanos,
    binlog: BinlogStats,
    changes: Option<Changes>,
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
            changes: persist.then(Changes::default),
        };
        let default = TubeName::parse(b"default").expect("`default` is a valid tube name");
        // The server's own reference keeps `default` alive forever.
        engine.default_tube = engine.tube_ref(&default);
        engine
    }

    // ----- connections -------------------------------------------------------

    /// Registers a new connection: it uses and watches `default`.
    pub fn connect(&mut self) -> ConnId {
        let default = self.default_tube;
        self.incref(default);
        self.incref(default);
        self.tubes[default.idx()].using += 1;
        self.tubes[default.idx()].watching += 1;
        let mut watch = Multiset::default();
        watch.push(default);
        self.counters.total_connections += 1;
        ConnId(self.conns.insert(Conn {
            use_tube: default,
            watch,
            reserved: JobList::default(),
            wait: None,
            producer: false,
            worker: false,
            pending_put: None,
        }))
    }

    /// Forgets a connection: its wait ends, its reserved jobs return to ready
    /// (waking other waiters, who get replies through `out`).
    pub fn disconnect(&mut self, conn: ConnId, now: Nanos, out: &mut dyn ReplySink) {
        if !self.conns.contains(conn.0) {
            return;
        }
        {
            let c = &self.conns[conn.0];
            if c.producer {
                self.counters.producers -= 1;
            }
            if c.worker {
                self.counters.workers -= 1;
            }
        }
        self.remove_waiting_conn(conn);
        while let Some(key) = self.conns[conn.0].reserved.first() {
            self.remove_reserved(conn, key);
            self.enqueue(key, 0, now, out);
        }
        // Drop watches in beanstalkd's `ms_clear` order: it decides which tubes
        // are freed first, and so the order of `list-tubes` afterwards.
        while let Some(t) = self.conns[conn.0].watch.remove_first() {
            self.tubes[t.idx()].watching -= 1;
            self.decref(t);
        }
        let use_tube = self.conns[conn.0].use_tube;
        self.tubes[use_tube.idx()].using -= 1;
        self.decref(use_tube);
        self.conns.remove(conn.0);
    }

    /// The client of a waiting connection hung up: as beanstalkd does, end the
    /// wait with `TIMED_OUT` (the server closes the connection after sending it).
    pub fn abort_wait(&mut self, conn: ConnId, out: &mut dyn ReplySink) {
        if self.conns.get(conn.0).is_some_and(|c| c.wait.is_some()) {
            self.remove_waiting_conn(conn);
            out.send(conn, reply::TIMED_OUT);
        }
    }

    /// Enters drain mode: `put` answers `DRAINING` from now on.
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// True in drain mode.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Updates the persistence counters shown by `stats`.
    pub fn set_binlog_stats(&mut self, stats: BinlogStats) {
        self.binlog = stats;
    }

    // ----- commands ----------------------------------------------------------

    /// A valid `put` header arrived: as beanstalkd does at this point, count
    /// the put, mark the connection a producer and assign the job's id (which
    /// is used up even if the body then turns out malformed).
    pub fn begin_put(&mut self, conn: ConnId) {
        self.count(Op::Put);
        self.set_producer(conn);
        self.conns[conn.0].pending_put = Some(self.allocate_id());
    }

    /// A refused command that beanstalkd counts all the same.
    pub fn count_refused(&mut self, what: Counted) {
        self.count(match what {
            Counted::Put => Op::Put,
            Counted::PauseTube => Op::PauseTube,
        });
    }

    fn allocate_id(&mut self) -> JobId {
        let id = JobId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Executes `cmd` for `conn` at time `now`, writing replies into `out`.
    pub fn apply(&mut self, conn: ConnId, cmd: Command, now: Nanos, out: &mut dyn ReplySink) -> Outcome {
        use Command as C;
        let line: ReplyLine;
        let msg: &[u8] = match cmd {
            C::Put { pri, delay, ttr, body, opts } => {
                self.put(conn, pri, delay, ttr, body, opts, now, out);
                return Outcome::Done;
            }
            C::Reserve => return self.reserve(conn, None, Op::Reserve, now, out),
            C::ReserveWithTimeout(secs) => {
                let deadline = secs.map(|s| now.saturating_add(u64::from(s) * SECOND));
                return self.reserve(conn, deadline, Op::ReserveWithTimeout, now, out);
            }
            C::ReserveJob(id) => {
                self.reserve_job_by_id(conn, JobId(id), now, out);
                return Outcome::Done;
            }
            C::Delete(id) => {
                self.count(Op::Delete);
                self.delete(conn, JobId(id), now)
            }
            C::Release { id, pri, delay } => {
                self.count(Op::Release);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.remove_reserved(conn, key);
                        let job = &mut self.jobs[key.idx()];
                        job.pri = pri;
                        job.delay_secs = delay;
                        job.counters.releases += 1;
                        let (delay, id) = (job.delay(), job.id);
                        self.mark_dirty(id);
                        self.enqueue(key, delay, now, out);
                        reply::RELEASED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Bury { id, pri } => {
                self.count(Op::Bury);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.remove_reserved(conn, key);
                        self.jobs[key.idx()].pri = pri;
                        self.bury(key);
                        reply::BURIED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Touch(id) => {
                self.count(Op::Touch);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.ttr_heap.remove(&mut self.jobs, key);
                        let job = &mut self.jobs[key.idx()];
                        job.deadline = now + job.ttr();
                        self.ttr_heap.push(&mut self.jobs, key);
                        reply::TOUCHED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Use(name) => {
                self.count(Op::Use);
                // Make (or find) the new tube before freeing the old one, as
                // beanstalkd does: the order of `list-tubes` depends on it.
                let new = self.tube_ref(&name);
                let old = self.conns[conn.0].use_tube;
                self.tubes[old.idx()].using -= 1;
                self.conns[conn.0].use_tube = new;
                self.incref(new);
                self.decref(old);
                self.tubes[new.idx()].using += 1;
                self.decref(new);
                line = ReplyLine::text(reply::USING_PREFIX, name.as_str());
                line.as_bytes()
            }
            C::Watch(name) => {
                self.count(Op::Watch);
                let t = self.tube_ref(&name);
                if !self.conns[conn.0].watch.contains(t) {
                    self.conns[conn.0].watch.push(t);
                    self.tubes[t.idx()].watching += 1;
                    self.incref(t);
                }
                self.decref(t);
                line = ReplyLine::number(reply::WATCHING_PREFIX, self.conns[conn.0].watch.len() as u64);
                line.as_bytes()
            }
            C::Ignore(name) => {
                self.count(Op::Ignore);
                let found = self.tube_index.get(&name).copied().filter(|&t| self.conns[conn.0].watch.contains(t));
                match found {
                    Some(_) if self.conns[conn.0].watch.len() < 2 => reply::NOT_IGNORED,
                    found => {
                        if let Some(t) = found {
                            self.conns[conn.0].watch.remove(t);
                            self.tubes[t.idx()].watching -= 1;
                            self.decref(t);
                        }
                        line = ReplyLine::number(reply::WATCHING_PREFIX, self.conns[conn.0].watch.len() as u64);
                        line.as_bytes()
                    }
                }
            }
            C::Peek(id) => {
                self.count(Op::Peek);
                let key = self.ids.get(JobId(id), &self.jobs);
                return self.reply_found(conn, key, out);
            }
            C::PeekReady => {
                self.count(Op::PeekReady);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].ready.peek();
                return self.reply_found(conn, key, out);
            }
            C::PeekDelayed => {
                self.count(Op::PeekDelayed);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].delayed.peek();
                return self.reply_found(conn, key, out);
            }
            C::PeekBuried => {
                self.count(Op::PeekBuried);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].buried.first();
                return self.reply_found(conn, key, out);
            }
            C::Kick(bound) => {
                self.count(Op::Kick);
                let tube = self.conns[conn.0].use_tube;
                let kicked = self.kick(tube, bound, now, out);
                line = ReplyLine::number(reply::KICKED_PREFIX, u64::from(kicked));
                line.as_bytes()
            }
            C::KickJob(id) => match self.ids.get(JobId(id), &self.jobs) {
                Some(key) if matches!(self.jobs[key.idx()].state, JobState::Buried | JobState::Delayed) => {
                    self.kick_one(key, now, out);
                    reply::KICKED
                }
                _ => reply::NOT_FOUND,
            },
            C::StatsJob(id) => {
                self.count(Op::StatsJob);
                match self.ids.get(JobId(id), &self.jobs) {
                    Some(key) => {
                        let yaml = self.stats_job_yaml(key, now);
                        return self.reply_yaml(conn, &yaml, out);
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::StatsTube(name) => {
                self.count(Op::StatsTube);
                match self.tube_index.get(&name).copied() {
                    Some(t) => {
                        let yaml = self.stats_tube_yaml(t, now);
                        return self.reply_yaml(conn, &yaml, out);
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Stats => {
                self.count(Op::Stats);
                let yaml = self.stats_yaml(now);
                return self.reply_yaml(conn, &yaml, out);
            }
            C::ListTubes => {
                self.count(Op::ListTubes);
                let yaml = self.tube_list_yaml(self.tube_order.iter());
                return self.reply_yaml(conn, &yaml, out);
            }
            C::ListTubeUsed => {
                self.count(Op::ListTubeUsed);
                line =
                    ReplyLine::text(reply::USING_PREFIX, self.tubes[self.conns[conn.0].use_tube.idx()].name.as_str());
                line.as_bytes()
            }
            C::ListTubesWatched => {
                self.count(Op::ListTubesWatched);
                let yaml = self.tube_list_yaml(self.conns[conn.0].watch.iter());
                return self.reply_yaml(conn, &yaml, out);
            }
            C::PauseTube { name, delay } => {
                self.count(Op::PauseTube);
                match self.tube_index.get(&name).copied() {
                    Some(t) => {
                        self.pause_tube(t, u64::from(delay) * SECOND, now, out);
                        reply::PAUSED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Quit => return Outcome::Close,
            C::PolarisStats => {
                let yaml = self.stats_ext_yaml();
                return self.reply_yaml(conn, &yaml, out);
            }
            C::Revoke(id) => match self.ids.get(JobId(id), &self.jobs) {
                Some(key) if self.jobs[key.idx()].state == JobState::Reserved => reply::NOT_REVOKED,
                Some(key) => {
                    self.unlink_unreserved(key);
                    let tube = self.jobs[key.idx()].tube;
                    self.tubes[tube.idx()].counters.revoked += 1;
                    self.counters.revoked += 1;
                    self.finish(key, FinalState::Revoked, now);
                    reply::REVOKED
                }
                None => reply::NOT_FOUND,
            },
            C::JobState(id) => {
                let name = match self.ids.get(JobId(id), &self.jobs) {
                    Some(key) => Some(self.jobs[key.idx()].state.name()),
                    None => self.tombstones.get(JobId(id)).map(|t| t.state.name()),
                };
                match name {
                    Some(name) => {
                        line = ReplyLine::text(reply::STATE_PREFIX, name);
                        line.as_bytes()
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::TubeTtl { name, ttl } => {
                if ttl == 0 {
                    self.tube_ttls.remove(&name);
                } else {
                    self.tube_ttls.insert(name.clone(), u64::from(ttl) * SECOND);
                }
                if let Some(changes) = &mut self.changes {
                    changes.tube_ttls.push((name, ttl));
                }
                reply::TTL_SET
            }
        };
        out.send(conn, msg);
        Outcome::Done
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        conn: ConnId,
        pri: u32,
        delay: u32,
        ttr: u32,
        body: Box<[u8]>,
        opts: PutOptions,
        now: Nanos,
        out: &mut dyn ReplySink,
    ) {
        // Normally the header already assigned the id (see `begin_put`).
        if self.conns[conn.0].pending_put.is_none() {
            self.begin_put(conn);
        }
        let Some(id) = self.conns[conn.0].pending_put.take() else { return };
        if self.draining {
            return out.send(conn, reply::DRAINING);
        }
        if self.job_bytes.saturating_add(body.len() as u64) > self.cfg.max_job_bytes {
            log::warn!("job memory limit of {} bytes reached; refusing a put", self.cfg.max_job_bytes);
            return out.send(conn, reply::OUT_OF_MEMORY);
        }
        let tube = self.conns[conn.0].use_tube;
        let ttl = match opts.ttl {
            Some(0) => None,
            Some(secs) => Some(u64::from(secs) * SECOND),
            None => self.tube_ttls.get(&self.tubes[tube.idx()].name).copied(),
        };
        if let Some(ttl) = ttl {
            self.ttls.insert(id, ttl);
        }
        // beanstalkd raises a TTR below one second to one second.
        let key = self.insert_job(Job::new(id, tube, pri, delay, ttr.max(1), body, now));
        let delay = u64::from(delay) * SECOND;
        self.counters.total_jobs += 1;
        self.tubes[tube.idx()].counters.total_jobs += 1;
        self.enqueue(key, delay, now, out);
        out.send(conn, ReplyLine::number(reply::INSERTED_PREFIX, id.0).as_bytes());
    }

    fn insert_job(&mut self, job: Job) -> JobKey {
        let (id, tube, len) = (job.id, job.tube, job.body.len() as u64);
        let key = JobKey::from_idx(self.jobs.insert(job));
        self.ids.insert(id, key, &self.jobs);
        self.incref(tube);
        self.job_bytes += len;
        self.mark_dirty(id);
        if let Some(changes) = &mut self.changes {
            changes.inserted.insert(id);
        }
        key
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

    /// Removes a job that is in no queue from the engine and returns it.
    fn free_job(&mut self, key: JobKey) -> Job {
        let id = self.jobs[key.idx()].id;
        self.ids.remove(id, &self.jobs);
        self.ttls.remove(&id);
        let job = self.jobs.remove(key.idx());
        self.job_bytes -= job.body.len() as u64;
        self.decref(job.tube);
        job
    }

    fn reserve(
        &mut self,
        conn: ConnId,
        timeout_at: Option<Nanos>,
        op: Op,
        now: Nanos,
        out: &mut dyn ReplySink,
    ) -> Outcome {
        self.count(op);
        self.set_worker(conn);
        if self.deadline_soon(conn, now) && !self.conn_has_ready(conn) {
            out.send(conn, reply::DEADLINE_SOON);
            return Outcome::Done;
        }
        self.wait_for_job(conn, timeout_at);
        self.process_queue(now, out);
        if self.conns[conn.0].wait.is_some() {
            Outcome::Blocked
        } else {
            Outcome::Done
        }
    }

    /// `reserve-job`: takes a ready, delayed or buried job from any tube.
    fn reserve_job_by_id(&mut self, conn: ConnId, id: JobId, now: Nanos, out: &mut dyn ReplySink) {
        match self.ids.get(id, &self.jobs) {
            Some(key) if self.jobs[key.idx()].state != JobState::Reserved => {
                self.unlink_unreserved(key);
                self.set_worker(conn);
                self.reserve_to(conn, key, now, out);
            }
            _ => out.send(conn, reply::NOT_FOUND),
        }
    }

    fn delete(&mut self, conn: ConnId, id: JobId, now: Nanos) -> &'static [u8] {
        let Some(key) = self.ids.get(id, &self.jobs) else { return reply::NOT_FOUND };
        let final_state = match self.jobs[key.idx()].state {
            JobState::Reserved if self.jobs[key.idx()].reserver() == Some(conn) => {
                self.remove_reserved(conn, key);
                FinalState::Success
            }
            JobState::Reserved => return reply::NOT_FOUND,
            JobState::Buried => {
                self.unlink_unreserved(key);
                FinalState::Failed
            }
            JobState::Ready | JobState::Delayed => {
                self.unlink_unreserved(key);
                FinalState::Revoked
            }
        };
        let tube = self.jobs[key.idx()].tube;
        self.tubes[tube.idx()].counters.deletes += 1;
        self.finish(key, final_state, now);
        reply::DELETED
    }

    fn reply_found(&mut self, conn: ConnId, key: Option<JobKey>, out: &mut dyn ReplySink) -> Outcome {
        match key {
            Some(key) => self.send_job(conn, reply::FOUND_PREFIX, key, out),
            None => out.send(conn, reply::NOT_FOUND),
        }
        Outcome::Done
    }

    fn send_job(&self, conn: ConnId, prefix: &[u8], key: JobKey, out: &mut dyn ReplySink) {
        let job = &self.jobs[key.idx()];
        out.send(conn, ReplyLine::job_header(prefix, job.id.0, job.body.len()).as_bytes());
        out.send(conn, &job.body);
        out.send(conn, reply::CRLF);
    }

    fn reply_yaml(&self, conn: ConnId, yaml: &[u8], out: &mut dyn ReplySink) -> Outcome {
        out.send(conn, ReplyLine::number(reply::OK_PREFIX, yaml.len() as u64).as_bytes());
        out.send(conn, yaml);
        out.send(conn, reply::CRLF);
        Outcome::Done
    }

    // ----- queue mechanics (beanstalkd's prot.c) ------------------------------

    fn count(&mut self, op: Op) {
        self.counters.ops[op as usize] += 1;
    }

    fn set_producer(&mut self, conn: ConnId) {
        if !self.conns[conn.0].producer {
            self.conns[conn.0].producer = true;
            self.counters.producers += 1;
        }
    }

    fn set_worker(&mut self, conn: ConnId) {
        if !self.conns[conn.0].worker {
            self.conns[conn.0].worker = true;
            self.counters.workers += 1;
        }
    }

    fn mark_dirty(&mut self, id: JobId) {
        if let Some(changes) = &mut self.changes {
            changes.jobs.insert(id);
        }
    }

    /// Puts a job into its tube: ready at once, or delayed by `delay`.
    /// Then hands ready jobs to waiting connections.
    fn enqueue(&mut self, key: JobKey, delay: Nanos, now: Nanos, out: &mut dyn ReplySink) {
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
    fn process_queue(&mut self, now: Nanos, out: &mut dyn ReplySink) {
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
    fn reserve_to(&mut self, conn: ConnId, key: JobKey, now: Nanos, out: &mut dyn ReplySink) {
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

    fn bury(&mut self, key: JobKey) {
        self.jobs[key.idx()].counters.buries += 1;
        self.place_buried(key);
        self.mark_dirty(self.jobs[key.idx()].id);
    }

    /// Appends a job that is in no queue to its tube's buried list.
    fn place_buried(&mut self, key: JobKey) {
        let job = &mut self.jobs[key.idx()];
        job.state = JobState::Buried;
        job.set_reserver(None);
        let tube = job.tube;
        self.tubes[tube.idx()].buried.push_back(&mut self.jobs, key);
        self.counters.buried += 1;
    }

    fn remove_ready(&mut self, key: JobKey) {
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

    fn remove_delayed(&mut self, key: JobKey) {
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
    fn unlink_unreserved(&mut self, key: JobKey) {
        match self.jobs[key.idx()].state {
            JobState::Ready => self.remove_ready(key),
            JobState::Delayed => self.remove_delayed(key),
            JobState::Buried => self.remove_buried(key),
            JobState::Reserved => unreachable!("reserved jobs are unlinked with remove_reserved"),
        }
    }

    /// The job `id` if `conn` has it reserved.
    fn reserved_by(&self, conn: ConnId, id: JobId) -> Option<JobKey> {
        let key = self.ids.get(id, &self.jobs)?;
        let job = &self.jobs[key.idx()];
        (job.state == JobState::Reserved && job.reserver() == Some(conn)).then_some(key)
    }

    fn remove_reserved(&mut self, conn: ConnId, key: JobKey) {
        self.ttr_heap.remove(&mut self.jobs, key);
        self.conns[conn.0].reserved.remove(&mut self.jobs, key);
        let tube = self.jobs[key.idx()].tube;
        self.jobs[key.idx()].set_reserver(None);
        self.counters.reserved -= 1;
        self.tubes[tube.idx()].counters.reserved -= 1;
    }

    /// Frees a job that is in no queue and records how it ended.
    fn finish(&mut self, key: JobKey, state: FinalState, now: Nanos) {
        let job = self.free_job(key);
        if let Some(changes) = &mut self.changes {
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
        if let Some(changes) = &mut self.changes {
            changes.tombstones.push(tombstone);
            changes.forgotten.extend(evicted);
        }
    }

    fn kick(&mut self, tube: TubeKey, bound: u32, now: Nanos, out: &mut dyn ReplySink) -> u32 {
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

    fn kick_one(&mut self, key: JobKey, now: Nanos, out: &mut dyn ReplySink) {
        self.unlink_unreserved(key);
        self.jobs[key.idx()].counters.kicks += 1;
        self.mark_dirty(self.jobs[key.idx()].id);
        self.enqueue(key, 0, now, out);
    }

    fn pause_tube(&mut self, t: TubeKey, pause: Nanos, now: Nanos, out: &mut dyn ReplySink) {
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

    fn wait_for_job(&mut self, conn: ConnId, timeout_at: Option<Nanos>) {
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
    fn schedule_wait(&mut self, conn: ConnId) {
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

    fn remove_waiting_conn(&mut self, conn: ConnId) {
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

    fn deadline_soon(&self, conn: ConnId, now: Nanos) -> bool {
        self.soonest_deadline(conn).is_some_and(|d| now >= d.saturating_sub(SAFETY_MARGIN))
    }

    fn conn_has_ready(&self, conn: ConnId) -> bool {
        self.conns[conn.0].watch.iter().any(|t| !self.tubes[t.idx()].ready.is_empty())
    }

    // ----- tubes ---------------------------------------------------------------

    /// Finds or makes the tube `name` and takes a reference to it.
    fn tube_ref(&mut self, name: &TubeName) -> TubeKey {
        let key = self.tube_find_or_make(name);
        self.incref(key);
        key
    }

    /// Finds or makes the tube `name` without taking a reference: the caller
    /// must attach something that holds one (a job) before anything can free it.
    fn tube_find_or_make(&mut self, name: &TubeName) -> TubeKey {
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

    fn incref(&mut self, t: TubeKey) {
        self.tubes[t.idx()].refs += 1;
    }

    /// Drops a reference; a tube nobody refers to is freed.
    fn decref(&mut self, t: TubeKey) {
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

    // ----- timers --------------------------------------------------------------

    /// When [`Engine::tick`] next has work, if ever.
    pub fn next_deadline(&self) -> Option<Nanos> {
        [
            self.delay_timers.first().map(|t| t.0),
            self.ttl_timers.first().map(|t| t.0),
            self.pause_timers.first().map(|t| t.0),
            self.ttr_heap.peek().map(|k| self.jobs[k.idx()].deadline),
            self.wait_timers.first().map(|t| t.0),
            self.tombstones.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires every timer due at `now`: delayed jobs become ready, TTLs expire
    /// jobs, pauses end, TTRs return jobs, waits answer `DEADLINE_SOON` or
    /// `TIMED_OUT`, and old tombstones are dropped.
    pub fn tick(&mut self, now: Nanos, out: &mut dyn ReplySink) {
        while let Some(&(at, id)) = self.delay_timers.first() {
            if at > now {
                break;
            }
            let key = self.ids.get(id, &self.jobs).expect("timers name live jobs");
            self.remove_delayed(key);
            self.enqueue(key, 0, now, out);
        }
        while let Some(&(at, id)) = self.ttl_timers.first() {
            if at > now {
                break;
            }
            let key = self.ids.get(id, &self.jobs).expect("timers name live jobs");
            self.remove_ready(key);
            let tube = self.jobs[key.idx()].tube;
            self.tubes[tube.idx()].counters.expired += 1;
            self.counters.expired += 1;
            self.finish(key, FinalState::Expired, now);
        }
        while let Some(&(at, t)) = self.pause_timers.first() {
            if at > now {
                break;
            }
            self.pause_timers.remove(&(at, t));
            self.tubes[t.idx()].pause = 0;
            self.process_queue(now, out);
        }
        while let Some(key) = self.ttr_heap.peek() {
            if self.jobs[key.idx()].deadline > now {
                break;
            }
            let Some(conn) = self.jobs[key.idx()].reserver() else { break };
            self.remove_reserved(conn, key);
            self.jobs[key.idx()].counters.timeouts += 1;
            self.counters.job_timeouts += 1;
            self.enqueue(key, 0, now, out);
            self.schedule_wait(conn);
        }
        while let Some(&(at, conn)) = self.wait_timers.first() {
            if at > now {
                break;
            }
            self.wait_timers.remove(&(at, conn));
            if let Some(wait) = self.conns[conn.0].wait.as_mut() {
                wait.timer = None;
            }
            self.wait_timeout(conn, now, out);
        }
        let forgotten = self.tombstones.expire(now);
        if let Some(changes) = &mut self.changes {
            changes.forgotten.extend(forgotten);
        }
    }

    fn wait_timeout(&mut self, conn: ConnId, now: Nanos, out: &mut dyn ReplySink) {
        let Some(wait) = &self.conns[conn.0].wait else { return };
        let timed_out = wait.timeout_at.is_some_and(|at| at <= now);
        if self.deadline_soon(conn, now) {
            self.remove_waiting_conn(conn);
            out.send(conn, reply::DEADLINE_SOON);
        } else if timed_out {
            self.remove_waiting_conn(conn);
            out.send(conn, reply::TIMED_OUT);
        } else {
            self.schedule_wait(conn);
        }
    }

    // ----- persistence ---------------------------------------------------------

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
}

/// A sink for contexts where no connection can be waiting (restore).
struct NoReplies;

impl ReplySink for NoReplies {
    fn send(&mut self, _conn: ConnId, _bytes: &[u8]) {}
}

#[cfg(test)]
mod tests;
