//! The queue as a synchronous state machine: tubes, jobs, heaps and timers.
//!
//! # Layout
//!
//! - `config`: [`Config`], [`Instance`], [`Rusage`], and the engine's unit of time
//!   ([`Nanos`], [`SECOND`]).
//! - `sink`: how the engine answers: [`ReplySink`] and [`Outcome`].
//! - `state`: the [`Engine`] struct (every table, heap and timer set) and its constructor.
//! - `conn`: [`ConnId`] and the per-connection state; connect, disconnect, abort a wait.
//! - `commands`: decoded input ([`Engine::feed`]) and each command ([`Engine::apply`]).
//! - `mechanics`: queue mechanics after beanstalkd's `prot.c`: enqueue, hand ready jobs
//!   to waiters, reserve, bury, kick, pause, waits.
//! - `tube`: tubes, beanstalkd's multiset, and tube reference counting.
//! - `timers`: [`Engine::next_deadline`] and [`Engine::tick`].
//! - `persist`: [`Changes`], [`JobRecord`] and [`BinlogStats`]; what the store
//!   takes and restores.
//! - `stats`: the counters behind `stats` and the YAML bodies of the `stats*` and
//!   `list-tubes*` replies.
//! - `metrics`: [`Engine::metrics_snapshot`], the gauges and counters a scrape shows
//!   ([`MetricsSnapshot`]), with jobs by tube for the busiest tubes only.
//! - `invariants`: [`Engine::check_invariants`], the consistency rules the tests and
//!   the fuzz targets check after every step.
//! - `job`, `heap`, `tombstone`: the job record and id index, the intrusive job
//!   heaps, and the final states of finished jobs.
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

#![deny(unsafe_code)]

mod commands;
mod config;
mod conn;
mod heap;
mod invariants;
mod job;
mod mechanics;
mod metrics;
mod persist;
mod sink;
mod state;
mod stats;
mod timers;
mod tombstone;
mod tube;

pub use config::{Config, Instance, Nanos, Rusage, SECOND};
pub use conn::ConnId;
pub use job::{IdHashBuilder, JobCounters, JobId, JobState};
pub use metrics::{MetricsSnapshot, TubeJobs};
pub use persist::{BinlogStats, Changes, JobRecord, LoopStats};
pub use sink::{Outcome, ReplySink};
pub use state::Engine;
pub use tombstone::{FinalState, Tombstone};

#[cfg(test)]
mod tests;
