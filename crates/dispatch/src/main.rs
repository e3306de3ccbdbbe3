//! `polaris-dispatch`: the REST dispatcher. See `docs/DISPATCH.md`.

#![deny(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

// The dispatcher's flags; `about` below is what -h prints.
#[derive(Parser, Debug)]
#[command(
    name = "polaris-dispatch",
    version,
    about = "polaris-dispatch: the Polaris REST/JSON dispatcher. Takes \"run this on these hosts\" calls, stores them \
             in SQLite (or PostgreSQL, --database), puts one signed job per host on the queue (polarisd or beanstalkd) and collects the agents' \
             results.",
    after_help = "Environment: POLARIS_SECRET holds the shared envelope secret unless --secret-file is given; \
                  RUST_LOG sets the log level (env_logger syntax; default info).\n\
                  Signals: SIGTERM and SIGINT stop accepting calls, finish the ones in flight and exit.\n\
                  API, result codes and security model: docs/DISPATCH.md."
)]
struct Args {
    /// HTTP listen address (port 0 picks a free port; the first stdout line names it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[command(flatten)]
    queue: polaris_ops_wire::queue_flags::QueueFlags,
    /// Directory of the SQLite database (created if missing); unused with --database.
    #[arg(long, default_value = "polaris-dispatch-data")]
    data: PathBuf,
    /// Store everything in this PostgreSQL database instead of SQLite
    /// (postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME); several dispatchers may share it.
    #[arg(long, value_name = "postgres://…", value_parser = parse_database_url)]
    database: Option<String>,
    /// File holding the shared envelope secret (default: env POLARIS_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// JSON file of bearer tokens and their allow-lists; authentication is off without it.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Tube the agents put their results on.
    #[arg(long, default_value = polaris_ops_wire::wire::DEFAULT_REPLY_TUBE)]
    reply_tube: String,
    /// Seconds a sync call waits for answers past the job's timeout plus the kill grace.
    #[arg(long, default_value_t = 5)]
    sync_grace: u64,
    /// Milliseconds from SIGTERM to SIGKILL for a command past its timeout, sent in every
    /// envelope (agents use the smaller of this and their own --kill-grace-ms).
    #[arg(long, default_value_t = 5000)]
    kill_grace_ms: u64,
    /// Seconds past deadline plus timeout that a taken job may still answer before it expires.
    #[arg(long, default_value_t = 30)]
    result_grace: u64,
    /// Client address or network (CIDR) allowed to call the API; repeatable. Without any,
    /// every client may call it (tokens, if configured, still apply).
    #[arg(long = "allow-client", value_name = "IP|CIDR", value_parser = parse_client_net)]
    allow_client: Vec<ipnet::IpNet>,
    /// Serve GET /metrics without a bearer token even when --tokens is given (by default any
    /// valid token may scrape); --allow-client still applies. See docs/METRICS.md.
    #[arg(long)]
    metrics_without_token: bool,
    /// Most lines of an agent's watched log file kept per host and path (older ones are
    /// dropped as new ones arrive).
    #[arg(long, default_value_t = 10_000)]
    log_retention_lines: u64,
    /// Seconds a watched log line is kept after it is received.
    #[arg(long, default_value_t = 7 * 86_400)]
    log_retention_age: u64,
    /// Seconds a dispatcher's lease on the background work (enqueueing, expiring,
    /// rollouts, cancels, schedules) lasts unless renewed: how soon another dispatcher on
    /// the same --database takes over from one that died.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_secs: u64,
    /// Seconds a queue shard (one of several --queue addresses) may be unreachable before
    /// its hosts, and their work no agent has taken yet, move to the other shards.
    #[arg(long, default_value_t = polaris_dispatch::DEFAULT_SHARD_GRACE_SECS, value_name = "SECS")]
    shard_grace: u64,
}

fn parse_client_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("not an IP address or CIDR network: {s:?}"))
}

fn parse_database_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_string())
    } else {
        Err(format!("not a postgres:// URL: {s:?} (SQLite, the default, is set with --data)"))
    }
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let (queue, queue_tls) = args.queue.into_parts();
    polaris_dispatch::run(polaris_dispatch::DispatchConfig {
        listen: args.listen,
        queue,
        queue_tls,
        database: match args.database {
            Some(url) => polaris_dispatch::store::DatabaseLocation::Postgres(url),
            None => polaris_dispatch::store::DatabaseLocation::SqliteDir(args.data),
        },
        secret_file: args.secret_file,
        tokens_file: args.tokens,
        reply_tube: args.reply_tube,
        sync_grace: Duration::from_secs(args.sync_grace),
        kill_grace: Duration::from_millis(args.kill_grace_ms),
        result_grace: Duration::from_secs(args.result_grace),
        allowed_clients: args.allow_client,
        metrics_without_token: args.metrics_without_token,
        log_retention: polaris_dispatch::store::LogRetention {
            max_lines: args.log_retention_lines.max(1),
            max_age_ms: i64::try_from(args.log_retention_age.saturating_mul(1000)).unwrap_or(i64::MAX),
        },
        lease_ttl: Duration::from_secs(args.lease_secs),
        shard_grace: Duration::from_secs(args.shard_grace),
    })
}
