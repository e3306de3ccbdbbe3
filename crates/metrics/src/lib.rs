//! Prometheus metrics in the text exposition format (version 0.0.4), the one way every
//! Polaris program serves them.
//!
//! Metric values live in [`prometheus`] types (lock-free counters, gauges and
//! histograms); this crate renders a registry and, for the programs that run no async
//! runtime (polarisd, polaris-agent), answers `GET /metrics` from one small std thread.
//! The dispatcher renders through [`render`] inside its own HTTP server.
//!
//! # Layout
//! - [`render`]: a registry as exposition text, and its `Content-Type`.
//! - [`http`]: the responder: binds `--metrics ADDR`, then answers one connection at a time
//!   with whatever a render function returns.
//! - [`buckets`]: the histogram bucket bounds the programs share, so dashboards can compare
//!   latencies across them.

#![deny(unsafe_code)]

pub mod buckets;
pub mod http;
pub mod render;

pub use http::{bind, serve, BoundListener, MetricsServer, ServeError};
pub use render::{render, CONTENT_TYPE};
