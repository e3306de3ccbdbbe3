//! The fuzz targets' bodies, as plain functions of the input bytes.
//!
//! `fuzz/` (a nightly-only package outside the workspace) hands each of these to
//! libFuzzer; `tests/replay.rs` runs every file of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` through the same function on the stable toolchain,
//! so what the fuzzers found stays fixed. A target panics when it finds a bug.
//!
//! # Layout
//! - [`decoder`]: the framing decoder, however its input is split.
//! - [`engine`]: random command sequences over a few connections and tubes, with the
//!   engine's invariants checked after every step.
//! - [`dispatch_request`]: the dispatcher's REST body validation.
//! - [`envelope`]: signed envelopes and their JSON payloads.
//! - `input`: how targets read their parameters from the fuzzer's bytes.

#![deny(unsafe_code)]

mod decoder;
mod dispatch;
mod engine;
mod envelope;
mod input;

pub use decoder::decoder;
pub use dispatch::dispatch_request;
pub use engine::engine;
pub use envelope::envelope;

/// A target: panics when its input finds a bug.
pub type Target = fn(&[u8]);

/// Every target by the name of its directory under `fuzz/corpus/` and `fuzz/regressions/`
/// (and of its binary in `fuzz/fuzz_targets/`).
pub const TARGETS: &[(&str, Target)] =
    &[("decoder", decoder), ("engine", engine), ("dispatch_request", dispatch_request), ("envelope", envelope)];
