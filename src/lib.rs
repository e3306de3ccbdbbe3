//! Polaris: a beanstalkd-compatible job queue made durable with SQLite, plus a
//! REST dispatcher and a host agent that run commands across a fleet.
//!
//! # Layout
//! - [`proto`]: the beanstalk wire protocol: framing, command parsing, reply bytes. Pure.
//! - [`engine`]: the queue state machine (tubes, heaps, timers). No I/O; the clock is injected.
//! - [`server`]: the `mio` event loop that owns sockets and feeds the engine.
//! - [`store`]: durability in SQLite: one transaction per loop turn (group commit).
//! - [`config`]: `polarisd`'s command line (beanstalkd's flags plus our own).
//! - [`client`]: a small blocking beanstalk client used by the agent, the dispatcher and tests.
//! - [`dispatch`]: the REST/JSON dispatcher (`polaris-dispatch`).
//! - [`agent`]: the per-host agent (`polaris-agent`).
//! - [`loadgen`]: `polaris-bench`, a load generator and benchmark reporter for any beanstalk server.

pub mod agent;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod loadgen;
pub mod proto;
pub mod server;
pub mod store;
