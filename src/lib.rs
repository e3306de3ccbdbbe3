//! `polarisd`: a beanstalkd-compatible job-queue server made durable with SQLite.
//!
//! The protocol and the queue itself live in their own crates, which do no I/O of their
//! own; this crate owns the sockets, the files and the process.
//!
//! # Layout
//! - [`server`]: the `mio` event loop that owns sockets and feeds the engine.
//! - [`store`]: durability in SQLite: the turns' changes as owned batches, written in one
//!   transaction per commit (group commit).
//! - [`pipeline`]: the store's writer thread, which commits while the loop goes on.
//! - [`wal`]: reads SQLite's write-ahead log before SQLite does, to refuse hidden damage.
//! - [`metrics`]: `--metrics`: Prometheus metrics from a thread of their own, fed by
//!   snapshots the event loop publishes when a scrape asks (it never waits for one).
//! - [`config`]: the command line (beanstalkd's flags plus our own).
//! - [`tls`]: TLS on a listener (rustls): the server configuration and one connection's
//!   session over its non-blocking socket.
//! - `sys` (private): every call into the operating system, the only module allowed `unsafe`.
//! - [`polaris_proto`] (crate): the wire protocol: framing, commands, replies; and the client.
//! - [`polaris_engine`] (crate): the queue state machine (tubes, heaps, timers), clock injected.

#![deny(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod store;
#[allow(unsafe_code)]
mod sys;
pub mod tls;
pub mod wal;
