//! `polarisd`'s command line: beanstalkd's flags, so it drops into existing
//! deployments, plus long options for the limits beanstalkd leaves implicit.

use crate::server::{Listen, ServerConfig};
use crate::store::{Durability, FsyncPolicy};
use crate::tls::TlsSettings;
use clap::Parser;
use polaris_engine::{self as engine, SECOND};
use polaris_proto::{self as proto, TubeName};
use std::path::PathBuf;

/// polarisd's flags; `about` below is what -h prints.
#[derive(Parser, Debug)]
#[command(
    name = "polarisd",
    disable_version_flag = true,
    about = "polarisd: the Polaris queue server. Speaks the beanstalkd 1.12 protocol byte for byte and takes \
             beanstalkd's flags; with -b every change is committed to SQLite before it is acknowledged.",
    long_about = None,
    after_help = "Logging: warnings by default, -V for more (repeatable); RUST_LOG (env_logger syntax, e.g. \
                  RUST_LOG=debug) overrides it.\n\
                  Signals: SIGTERM and SIGINT stop accepting, commit and exit 0; SIGUSR1 enters drain mode \
                  (put answers DRAINING).\n\
                  TLS: plain TCP by default; --tls-cert and --tls-key serve TLS on the listener, or on a \
                  second one with --tls-listen; --tls-client-ca requires client certificates (protocol.md § TLS).\n\
                  Protocol and extensions: protocol.md; flags and limits: README.md."
)]
pub struct Args {
    /// Listen on address (`unix:/path` for a Unix socket). Ignored under systemd
    /// socket activation (LISTEN_FDS).
    #[arg(short = 'l', value_name = "ADDR", default_value = "127.0.0.1")]
    pub listen: String,
    /// Listen on port; 0 picks a free one (the actual address is printed first).
    #[arg(short = 'p', value_name = "PORT", default_value_t = 11300)]
    pub port: u16,
    /// Persist jobs in a SQLite database in DIR (created if missing).
    #[arg(short = 'b', value_name = "DIR")]
    pub binlog_dir: Option<PathBuf>,
    /// fsync at most once every MS milliseconds; -f0 fsyncs before every acknowledgement.
    #[arg(short = 'f', value_name = "MS", default_value_t = 50)]
    pub fsync_ms: u64,
    /// Never fsync (the OS writes data back when it likes).
    #[arg(short = 'F')]
    pub never_fsync: bool,
    /// Maximum job size in bytes (at most 1073741824; with -b at most 999990000).
    #[arg(short = 'z', value_name = "BYTES", default_value_t = proto::DEFAULT_MAX_JOB_SIZE,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(proto::MAX_JOB_SIZE_LIMIT)))]
    pub max_job_size: u32,
    /// Size hint for the write-ahead log: the WAL is checkpointed when it grows past it, and
    /// its file is written out to it (at most 64 MiB) when the store opens.
    #[arg(short = 's', value_name = "BYTES", default_value_t = 10_485_760)]
    pub binlog_size: u64,
    /// Largest size of the database file in bytes (0: unbounded); beyond it the store is
    /// full as on a full disk: put answers OUT_OF_MEMORY, reads and deletes go on.
    #[arg(long, default_value_t = 0)]
    pub max_db_bytes: u64,
    /// Start even though the database's write-ahead log is damaged (committed changes after
    /// the damage are lost; a copy of the log is kept) or the database file is empty.
    #[arg(long)]
    pub salvage: bool,
    /// Become this user (and its group) after binding.
    #[arg(short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Increase verbosity (repeatable).
    #[arg(short = 'V', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Show version information and exit.
    #[arg(short = 'v', long = "version")]
    pub version: bool,
    /// Length of the listen queue: connections the kernel holds before polarisd accepts
    /// them (beanstalkd: 1024).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..))]
    pub listen_backlog: i32,
    /// Most simultaneous client connections; more are accepted and closed at once.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Longest command line in bytes, `\r\n` included (beanstalkd: 224).
    #[arg(long, default_value_t = proto::DEFAULT_MAX_LINE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..=65536))]
    pub max_line: usize,
    /// Most bytes of job bodies held by all jobs together; `put` beyond it answers OUT_OF_MEMORY.
    #[arg(long, default_value_t = 8 << 30)]
    pub max_job_bytes: u64,
    /// Most bytes of replies queued for one connection before the server stops
    /// reading its commands until the client catches up.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_output_buffer: usize,
    /// With -b: most bytes of changes (job bodies and rows) handed to the store's writer and
    /// not yet committed; past it polarisd reads no more commands until commits catch up,
    /// so a disk slower than the clients slows them down instead of filling memory.
    #[arg(long, value_name = "BYTES", default_value_t = crate::server::DEFAULT_MAX_UNCOMMITTED,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_uncommitted: usize,
    /// With -b: a turn's changes smaller than this are committed on the event loop itself
    /// while nothing else is being committed, instead of being handed to the writer thread
    /// (which costs two thread wake-ups); 0 hands every commit to the writer.
    #[arg(long, value_name = "BYTES", default_value_t = crate::server::DEFAULT_INLINE_COMMIT_BELOW)]
    pub inline_commit_below: usize,
    /// Seconds a final job state (success, failed, revoked, expired) is kept.
    #[arg(long, default_value_t = 3600)]
    pub retention: u64,
    /// Most final job states kept (in memory and, with -b, on disk).
    #[arg(long, default_value_t = 100_000)]
    pub max_tombstones: usize,
    /// Most tubes one connection may watch; `watch` of one more answers OUT_OF_MEMORY.
    #[arg(long, default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_watched_tubes: usize,
    /// Most tube names with a default TTL (`tube-ttl`, kept with -b); one more answers OUT_OF_MEMORY.
    #[arg(long, default_value_t = 10_000)]
    pub max_tube_ttls: usize,
    /// Default TTL for jobs put in a tube, as TUBE=SECONDS (repeatable).
    #[arg(long = "tube-ttl", value_name = "TUBE=SECONDS", value_parser = parse_tube_ttl)]
    pub tube_ttls: Vec<(TubeName, u32)>,
    /// Serve TLS with this certificate chain (PEM, leaf first), on the main listener or,
    /// with --tls-listen, on a second one. Needs --tls-key. Plain TCP is the default.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by a CA of this PEM bundle.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve TLS on a second listener at HOST:PORT while -l/-p stay plain; port 0 picks a
    /// free one (the second stdout line is `listening for TLS on ADDR`).
    #[arg(long, value_name = "HOST:PORT", requires = "tls_cert", value_parser = parse_host_port)]
    pub tls_listen: Option<(String, u16)>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT; port 0 picks a free one,
    /// printed as `metrics on URL`). Off by default. See docs/METRICS.md.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Tubes shown by name in polarisd_jobs, those holding the most jobs; the rest are added
    /// up under tube="*other*", so a tube per host still gives a bounded number of series.
    #[arg(long, value_name = "N", default_value_t = 20, requires = "metrics")]
    pub metrics_top_tubes: usize,
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or("expected HOST:PORT")?;
    let port = port.parse::<u16>().map_err(|e| format!("invalid port {port:?}: {e}"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err("expected HOST:PORT, e.g. 0.0.0.0:11400".into());
    }
    Ok((host.to_string(), port))
}

fn parse_tube_ttl(s: &str) -> Result<(TubeName, u32), String> {
    let (name, secs) = s.split_once('=').ok_or("expected TUBE=SECONDS")?;
    let name = TubeName::parse(name.as_bytes()).ok_or_else(|| format!("invalid tube name {name:?}"))?;
    let secs = secs.parse::<u32>().map_err(|e| format!("invalid seconds {secs:?}: {e}"))?;
    Ok((name, secs))
}

impl Args {
    /// The server configuration these flags describe.
    pub fn server_config(&self) -> ServerConfig {
        let listen = match self.listen.strip_prefix("unix:") {
            Some(path) => Listen::Unix(PathBuf::from(path)),
            None => Listen::Tcp { host: self.listen.clone(), port: self.port },
        };
        let fsync = if self.never_fsync {
            FsyncPolicy::Never
        } else if self.fsync_ms == 0 {
            FsyncPolicy::Always
        } else {
            FsyncPolicy::Interval(std::time::Duration::from_millis(self.fsync_ms))
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsSettings { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() })
            }
            _ => None,
        };
        ServerConfig {
            listen,
            tls,
            tls_listen: self.tls_listen.clone(),
            max_connections: self.max_connections,
            limits: proto::Limits { max_line: self.max_line, max_job_size: self.max_job_size },
            max_output_buffer: self.max_output_buffer,
            max_uncommitted: self.max_uncommitted,
            inline_commit_below: self.inline_commit_below,
            listen_backlog: self.listen_backlog,
            durability: self.binlog_dir.clone().map(|dir| Durability {
                dir,
                fsync,
                wal_size: self.binlog_size,
                max_bytes: self.max_db_bytes,
                salvage: self.salvage,
            }),
            user: self.user.clone(),
            engine: engine::Config {
                max_job_size: self.max_job_size,
                max_job_bytes: self.max_job_bytes,
                retention: self.retention.saturating_mul(SECOND),
                max_tombstones: self.max_tombstones,
                max_watched_tubes: self.max_watched_tubes,
                max_tube_ttls: self.max_tube_ttls,
                tube_ttls: self.tube_ttls.clone(),
                binlog_max_size: self.binlog_size,
                ..engine::Config::default()
            },
            metrics: self
                .metrics
                .clone()
                .map(|listen| crate::metrics::MetricsConfig { listen, top_tubes: self.metrics_top_tubes }),
        }
    }
}
