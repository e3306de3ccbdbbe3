//! Histogram bucket bounds, in seconds.

/// Storage latencies (a commit, an fsync): 50 µs to 5 s.
pub const STORAGE_SECONDS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Work that takes seconds to hours (a command on a host, a job across hosts): 10 ms to
/// one hour.
pub const JOB_SECONDS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// An HTTP request, from a lookup (milliseconds) to a sync call that waits for its hosts
/// (minutes): 1 ms to 2 min.
pub const HTTP_SECONDS: &[f64] =
    &[0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
