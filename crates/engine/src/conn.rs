//! Connections as the engine knows them: [`ConnId`], the per-connection state
//! (used tube, watch list, reserved jobs, a pending wait), and how connections
//! come and go.

use crate::job::{JobId, JobList};
use crate::sink::ReplySink;
use crate::state::Engine;
use crate::tube::{Multiset, TubeKey};
use crate::Nanos;
use polaris_proto::reply;

/// A client connection, as the engine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// A blocked `reserve`.
#[derive(Debug)]
pub(crate) struct Wait {
    /// When `reserve-with-timeout` gives up.
    pub(crate) timeout_at: Option<Nanos>,
    /// The entry in `wait_timers`, if any.
    pub(crate) timer: Option<Nanos>,
}

/// What the engine keeps per connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) use_tube: TubeKey,
    pub(crate) watch: Multiset<TubeKey>,
    pub(crate) reserved: JobList,
    pub(crate) wait: Option<Wait>,
    pub(crate) producer: bool,
    pub(crate) worker: bool,
    /// The id assigned when the header of a `put` was read, for its body.
    pub(crate) pending_put: Option<JobId>,
}

impl Engine {
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
}
