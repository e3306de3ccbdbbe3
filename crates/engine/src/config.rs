//! Engine settings ([`Config`], [`Instance`], [`Rusage`]) and the engine's unit of
//! time ([`Nanos`], [`SECOND`]).

use polaris_proto::TubeName;

/// Engine time: nanoseconds on a monotonic clock chosen by the caller.
pub type Nanos = u64;
/// One second in [`Nanos`].
pub const SECOND: Nanos = 1_000_000_000;

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
    /// The beanstalkd version `stats` reports (printed quoted): "1.12", as clients expect.
    pub version: String,
    /// polarisd's own version, reported by `polaris-stats` as `polaris-version`.
    pub server_version: String,
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
    /// Most tubes one connection may watch; `watch` of one more answers `OUT_OF_MEMORY`.
    pub max_watched_tubes: usize,
    /// Most tube names with a default TTL (`tube-ttl`); one more answers `OUT_OF_MEMORY`.
    pub max_tube_ttls: usize,
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
            max_watched_tubes: 10_000,
            max_tube_ttls: 10_000,
            tube_ttls: Vec::new(),
            binlog_max_size: 10_485_760,
            instance: Instance {
                pid: 0,
                id: "0000000000000000".into(),
                hostname: "localhost".into(),
                os: String::new(),
                platform: String::new(),
                version: "1.12".into(),
                server_version: String::new(),
            },
            rusage: || ((0, 0), (0, 0)),
        }
    }
}
