//! `polaris-agent`: runs the jobs of one host. See `docs/DISPATCH.md`.

#![deny(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

// The agent's flags; `about` below is what -h prints.
#[derive(Parser, Debug)]
#[command(
    name = "polaris-agent",
    version,
    about = "polaris-agent: the Polaris host agent. Takes the signed jobs queued for this host from its tube on the \
             queue, runs them contained and bounded, and puts signed results back.",
    after_help = "Environment: POLARIS_SECRET holds the shared envelope secret unless --secret-file is given; \
                  POLARIS_TOKEN the registration token unless --token-file is given; RUST_LOG sets the log level \
                  (env_logger syntax; default info).\n\
                  Signals: SIGTERM and SIGINT stop taking jobs; a running command may finish within \
                  --drain-timeout, else it is killed and reported (agent_restarted), not run again. \
                  SIGHUP re-reads --config (a bad file keeps the old one in force).\n\
                  Containment: each command runs in a cgroup of its own where the agent can make one \
                  (root, cgroupfs), so children that leave its process group (setsid) are killed with it \
                  and memory_max/cpu_max_milli are enforced; else in a process group only (logged at \
                  start).\n\
                  Control: a second queue connection watches control.<host-id> for signed cancels.\n\
                  Files next to --state-file: <name>.ledger (the envelopes run here, so none runs twice, \
                  cancels of jobs not started yet, and the running command's process group and cgroup, \
                  ended by the next start if the agent dies), \
                  <name>.lock (one agent per state file), <name>.tasks (the last signed set of standing \
                  tasks, used until the dispatcher answers); integrity.baseline (the signed baseline of \
                  integrity.init) in --config's state_dir, by default the same directory.\n\
                  See docs/DISPATCH.md."
)]
struct Args {
    #[command(flatten)]
    queue: polaris_ops_wire::queue_flags::QueueFlags,
    /// This host's id (its tube is host.<id>); generated and kept in --state-file if absent.
    #[arg(long)]
    host_id: Option<String>,
    /// Where the generated host id is kept.
    #[arg(long, default_value = "polaris-agent.json")]
    state_file: PathBuf,
    /// Dispatcher URL to register this host with, e.g. http://127.0.0.1:8080; several,
    /// comma-separated (dispatchers sharing one database), are used in turn when one stops
    /// answering.
    #[arg(long)]
    dispatch: Option<String>,
    /// File holding the shared envelope secret (default: env POLARIS_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// File holding the bearer token for registration (default: env POLARIS_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Milliseconds between SIGTERM and SIGKILL for a command past its timeout.
    #[arg(long, default_value_t = 5000)]
    kill_grace_ms: u64,
    /// Seconds a running command may go on after SIGTERM before it is killed.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Seconds between heartbeats to --dispatch (re-registration, which moves the host's
    /// last_seen_ms); 0 registers once.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    heartbeat: u64,
    /// Seconds between fetches of this host's standing tasks from --dispatch (a 304 when
    /// nothing changed); 0 fetches none.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    tasks_poll: u64,
    /// Milliseconds between chunks of a running command's output sent to the dispatcher as
    /// it is printed (each at most 16 KiB, 64 KiB in all); 0 sends none.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    live_output_ms: u64,
    /// TOML file configuring the integrity.* and log.* methods (integrity rules in
    /// aide.conf syntax, log roots, caps); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The largest memory_max (bytes) an envelope may ask for; above it the job is refused
    /// (limit_above_ceiling). Default: the host's total memory.
    #[arg(long, value_name = "BYTES")]
    max_memory: Option<u64>,
    /// The largest cpu_max_milli (thousandths of a CPU) an envelope may ask for; above it
    /// the job is refused (limit_above_ceiling). Default: 1000 per CPU.
    #[arg(long, value_name = "N")]
    max_cpu_milli: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT): jobs by method and
    /// outcome, durations, timeouts, refusals. Off by default. See docs/METRICS.md.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Tube for what standing tasks report (continuous integrity, watched log lines): the
    /// dispatcher's --reply-tube. Job results go where each envelope says.
    #[arg(long, default_value = polaris_ops_wire::wire::DEFAULT_REPLY_TUBE, value_name = "TUBE")]
    reply_tube: String,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let (queue, queue_tls) = args.queue.into_parts();
    polaris_agent::run(polaris_agent::AgentConfig {
        queue,
        queue_tls,
        host_id: args.host_id,
        state_file: args.state_file,
        dispatch_url: args.dispatch,
        secret_file: args.secret_file,
        token_file: args.token_file,
        kill_grace: Duration::from_millis(args.kill_grace_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        heartbeat: Duration::from_secs(args.heartbeat),
        tasks_poll: Duration::from_secs(args.tasks_poll),
        live_output: Duration::from_millis(args.live_output_ms),
        config_file: args.config,
        max_memory: args.max_memory,
        max_cpu_milli: args.max_cpu_milli,
        containment: None,
        metrics: args.metrics,
        reply_tube: args.reply_tube,
    })
}
