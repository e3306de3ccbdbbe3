//! `polaris-agent`: runs the jobs of one host.
//!
//! It watches `host.<id>`, verifies each envelope's signature and expiry (bad ones are
//! buried, never run, and reported when their reply tube is known), runs `bash -c` through
//! [`exec`] — in a cgroup of its own where the agent can make one ([`contain`]), with the
//! envelope's memory and CPU limits — or answers `sync.query` through [`query`], puts the
//! signed result on the reply tube (cutting output further if the queue refuses it as too
//! big), then deletes the job. Each envelope (job, host and attempt) runs at most once:
//! [`ledger`] remembers, durably, what ran, and a copy put on the queue again is buried
//! and reported, never run. A second connection watches `control.<id>` ([`control`]): a
//! signed cancel kills the running command's whole unit at once, or keeps its envelope
//! from ever running. On SIGTERM or SIGINT it stops reserving; a running command may
//! finish within the drain timeout, else it is killed and reported (`agent_restarted`). A
//! command left running by an agent that died is ended, with its whole cgroup, by the next
//! one to start ([`orphans`]). `integrity.*` and `log.*` jobs run the agent's own code, on
//! its own configuration ([`config`]), never a command.
//!
//! # Layout
//! - this file: the configuration, the serve loop (reserve, verify, check limits and
//!   cancels, run, report, delete) and the steps that keep the ledger.
//! - [`ledger`]: the append-only file of envelopes run, runs unfinished (with their
//!   cgroups) and jobs cancelled before they started.
//! - [`control`]: the control thread (signed cancels on `control.<id>`, its own queue
//!   connection) and the state it shares with the serve loop.
//! - [`contain`]: cgroup discovery (`/proc/self/mountinfo`, `/proc/self/cgroup`), per-run
//!   cgroups (v2 unit, v1 memory/cpu limits), killing a whole unit, OOM-kill counts.
//! - [`orphans`]: at start, ends what a dead predecessor left running, and says so.
//! - [`heartbeat`]: registration with the dispatcher, then a heartbeat every `--heartbeat`.
//! - [`shard`]: the queue address in force, which follows the shard the dispatcher names.
//! - [`standing`]: the host's standing tasks, fetched signed from the dispatcher, verified,
//!   cached, and followed every `--tasks-poll`.
//! - [`watch`]: the runners of agent-side standing tasks (continuous integrity, log
//!   watch), each a thread with its own queue connection, reporting on `--reply-tube`.
//! - [`exec`]: runs `bash -c` in its own process group (and cgroup unit, entered through a
//!   gate before it runs anything), with a timeout, cancel, bounded output capture, and no
//!   child left behind.
//! - [`query`]: the host facts `sync.query` answers with, parsed from `/proc` text.
//! - [`integrity`]: `integrity.init`/`check`/`update`: aide.conf rules, the scan, the
//!   signed baseline, the capped JSON report.
//! - [`logs`]: `log.tail` and `log.grep`, confined to the configured log roots.
//! - [`config`]: the `--config` TOML file (integrity rules, log roots, caps), reloaded on
//!   SIGHUP.
//! - [`facts`]: what the host is (OS, CPUs, memory, addresses), sent when it registers.
//! - [`metrics`]: `--metrics`: jobs by method and outcome, durations, timeouts, refusals,
//!   the queue connection; served by [`polaris_metrics`]'s one-thread responder.
//! - [`identity`]: the host id: given, or generated once and kept in the state file.
//! - `sys` (private): every call into the operating system (pipes, `waitid`, process and
//!   process-group signals, utmpx), the only module allowed `unsafe`.

#![deny(unsafe_code)]

pub mod config;
pub mod contain;
pub mod control;
pub mod exec;
pub mod facts;
pub mod heartbeat;
pub mod identity;
pub mod integrity;
pub mod ledger;
pub mod logs;
pub mod metrics;
pub mod orphans;
pub mod query;
pub mod shard;
pub mod standing;
#[allow(unsafe_code)]
mod sys;
pub mod watch;

use anyhow::Context as _;
use contain::{Containment, UnitLimits};
use control::{RunningJob, Shared};
use exec::{ExecLimits, Termination, Tick};
use ledger::Ledger;
use orphans::Adopted;
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, host_tube, Encoding, HostResult, JobEnvelope, Method, OutputData, Resp, Secret};
use polaris_proto::client::{self, Client, Endpoint, TlsClientFiles};
use shard::QueueAddress;
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The env variable holding the bearer token used to register with the dispatcher.
pub const TOKEN_ENV: &str = "POLARIS_TOKEN";

/// beanstalkd's default max job size, assumed until `stats` says otherwise.
const DEFAULT_MAX_JOB_SIZE: usize = 65_535;
/// Priority of results (low: someone may be waiting) and of buried envelopes.
const RESULT_PRIORITY: u32 = 100;
/// TTR of result jobs; the dispatcher handles one in milliseconds.
const RESULT_TTR: u32 = 60;
/// Largest live output chunk, in bytes of output.
const LIVE_CHUNK_BYTES: usize = 16 * 1024;
/// Priority of live output chunks: behind results, which someone may be waiting for.
const LIVE_OUTPUT_PRIORITY: u32 = RESULT_PRIORITY + 100;
/// Shortest interval between touches of a running job.
const MIN_TOUCH_INTERVAL: Duration = Duration::from_millis(500);
/// The smallest `memory_max` the agent takes: below it not even `bash` starts, and the
/// command would only be killed at once for its limit.
pub const MIN_MEMORY_MAX: u64 = 4 * 1024 * 1024;

/// Everything `polaris-agent` is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Queue address, e.g. `127.0.0.1:11300`.
    pub queue: String,
    /// TLS to the queue (`--queue-ca` and the rest); `None` is plain TCP.
    pub queue_tls: Option<TlsClientFiles>,
    /// The host id; `None` uses (or creates) the one in `state_file`.
    pub host_id: Option<String>,
    /// Where the generated host id is kept.
    pub state_file: PathBuf,
    /// Dispatcher base URL to register with, e.g. `http://127.0.0.1:8080`.
    pub dispatch_url: Option<String>,
    /// File holding the shared envelope secret; `None` reads env `POLARIS_SECRET`.
    pub secret_file: Option<PathBuf>,
    /// File holding the bearer token for registration; `None` reads env `POLARIS_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL for a command past its timeout.
    pub kill_grace: Duration,
    /// How long a running command may go on after the agent is asked to stop.
    pub drain_timeout: Duration,
    /// Time between heartbeats to the dispatcher; zero registers once.
    pub heartbeat: Duration,
    /// Time between fetches of the host's standing tasks; zero fetches none.
    pub tasks_poll: Duration,
    /// Time between live output chunks of a running command; zero sends none.
    pub live_output: Duration,
    /// The `--config` TOML file (integrity rules, log roots); `None`: those methods are
    /// refused as not configured.
    pub config_file: Option<PathBuf>,
    /// The largest `memory_max` an envelope may ask for (bytes); `None`: the host's total
    /// memory.
    pub max_memory: Option<u64>,
    /// The largest `cpu_max_milli` an envelope may ask for; `None`: 1000 per CPU.
    pub max_cpu_milli: Option<u32>,
    /// Containment to use instead of detecting it (tests); `None` detects.
    pub containment: Option<Containment>,
    /// Where to serve Prometheus metrics (`--metrics HOST:PORT`); `None` serves none.
    pub metrics: Option<String>,
    /// The tube standing tasks report on (`--reply-tube`: the dispatcher's).
    pub reply_tube: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            queue: "127.0.0.1:11300".into(),
            queue_tls: None,
            host_id: None,
            state_file: PathBuf::from("polaris-agent.json"),
            dispatch_url: None,
            secret_file: None,
            token_file: None,
            kill_grace: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(30),
            tasks_poll: Duration::from_secs(5),
            live_output: Duration::from_millis(500),
            config_file: None,
            max_memory: None,
            max_cpu_milli: None,
            containment: None,
            metrics: None,
            reply_tube: wire::DEFAULT_REPLY_TUBE.into(),
        }
    }
}

/// The fields of an envelope needed to report on it, read when the whole envelope
/// cannot be.
#[derive(serde::Deserialize)]
struct EnvelopeHeader {
    job_id: String,
    reply_tube: String,
    #[serde(default)]
    method: Option<String>,
}

struct Agent {
    host_id: String,
    /// The queue, and how to connect to it (it moves with the host's shard).
    queue: Arc<QueueAddress>,
    secret: Secret,
    config: AgentConfig,
    shutdown: Arc<AtomicBool>,
    /// What ran here ([`ledger`]) and what runs now, shared with the control thread.
    shared: Arc<Shared>,
    /// The cgroups commands run in ([`contain`]).
    containment: Containment,
    /// The largest `memory_max` and `cpu_max_milli` envelopes may ask for, as the flags
    /// say (they win over the config file's `[limits]`, read again on SIGHUP)...
    max_memory: Option<u64>,
    max_cpu_milli: Option<u32>,
    /// ...and when neither says: the host's memory and CPUs.
    host_memory: u64,
    host_cpu_milli: u32,
    /// Runs of a dead predecessor, ended, whose results are still to be put.
    adopted: RefCell<Vec<Adopted>>,
    /// The `--config` file's settings in force.
    settings: RefCell<config::Settings>,
    /// The same, for the runners of agent-side standing tasks ([`watch`]).
    watch_settings: Arc<std::sync::Mutex<config::Settings>>,
    /// Set by SIGHUP: read the config file again.
    reload: Arc<AtomicBool>,
    /// What it did, for `--metrics`.
    metrics: metrics::AgentMetrics,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    let secret = Secret::load(config.secret_file.as_deref())?;
    let queue = Arc::new(QueueAddress::new(
        Endpoint::from_flags(&config.queue, config.queue_tls.as_ref())?,
        config.queue_tls.clone(),
    ));
    let agent_metrics = metrics::AgentMetrics::new();
    if let Some(addr) = &config.metrics {
        let served = agent_metrics.clone();
        let server = polaris_metrics::serve(addr, move || served.render())?;
        log::info!("metrics on http://{}/metrics", server.local_addr());
    }
    let host_id = identity::resolve_host_id(config.host_id.as_deref(), &config.state_file)?;
    let token = match &config.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(TOKEN_ENV).ok(),
    };
    let settings = match &config.config_file {
        Some(path) => config::load(path, &config.state_file)?,
        None => config::Settings::default(),
    };
    let ledger = Ledger::open(&config.state_file, wire::unix_now())?;
    let containment = config.containment.clone().unwrap_or_else(Containment::detect);
    log::info!("containment: {}", containment.describe());
    // Before anything else: end what a predecessor that died left running.
    let adopted: Vec<Adopted> =
        ledger.unfinished().iter().map(|run| orphans::adopt(run, &host_id, &containment)).collect();
    let (flag_max_memory, flag_max_cpu_milli) = (config.max_memory, config.max_cpu_milli);
    let host_memory = {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        query::parse_meminfo(&meminfo).total_kib.saturating_mul(1024)
    };
    let host_cpu_milli = {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        u32::try_from(cpus).unwrap_or(u32::MAX / 1000).saturating_mul(1000)
    };
    log::info!(
        "ceilings: memory_max up to {} bytes, cpu_max_milli up to {}",
        config.max_memory.or(settings.limits.max_memory).unwrap_or(host_memory),
        config.max_cpu_milli.or(settings.limits.max_cpu_milli).unwrap_or(host_cpu_milli)
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, shutdown.clone()).context("installing signal handlers")?;
    }
    let standing = Arc::new(standing::Standing::default());
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone()).context("installing signal handlers")?;
    let dispatchers = match config.dispatch_url.as_deref() {
        Some(list) => Some(Arc::new(
            heartbeat::DispatchUrls::parse(list).with_context(|| format!("--dispatch {list:?} names no URL"))?,
        )),
        None => None,
    };
    if let Some(dispatchers) = dispatchers {
        let follows = !config.tasks_poll.is_zero();
        if follows {
            let follow = standing::Follow {
                dispatchers: dispatchers.clone(),
                host_id: host_id.clone(),
                token: token.clone(),
                secret: secret.clone(),
                every: config.tasks_poll,
                cache: standing::cache_path(&config.state_file),
            };
            standing::load_cache(&follow, &standing);
            standing::spawn(follow, standing.clone(), shutdown.clone()).context("starting the task follower")?;
        }
        let registration = heartbeat::Registration {
            dispatchers,
            host_id: host_id.clone(),
            token,
            every: config.heartbeat,
            standing: follows.then(|| standing.clone()),
            queue: queue.clone(),
        };
        heartbeat::spawn(registration, shutdown.clone()).context("starting the heartbeat thread")?;
    }
    let shared = Arc::new(Shared::new(ledger));
    // Not `shutdown`: a command draining after SIGTERM can still be cancelled, so the
    // control thread stops only once the serve loop has.
    let serving_done = Arc::new(AtomicBool::new(false));
    let control = control::spawn(control::Control {
        queue: queue.clone(),
        host_id: host_id.clone(),
        secret: secret.clone(),
        shared: shared.clone(),
        shutdown: serving_done.clone(),
    })
    .context("starting the control thread")?;
    if !client::is_valid_tube_name(&config.reply_tube) {
        anyhow::bail!("--reply-tube {:?} is not a valid tube name", config.reply_tube);
    }
    let watch_settings = Arc::new(std::sync::Mutex::new(settings.clone()));
    let watcher = watch::spawn(
        watch::Watch {
            host_id: host_id.clone(),
            queue: queue.clone(),
            reply_tube: config.reply_tube.clone(),
            secret: secret.clone(),
            state_file: config.state_file.clone(),
            settings: watch_settings.clone(),
            shutdown: shutdown.clone(),
        },
        standing.clone(),
    )
    .context("starting the standing task runners")?;
    log::info!("polaris-agent {host_id} serving tube {} on {queue}", host_tube(&host_id));
    let agent = Agent {
        host_id,
        queue,
        secret,
        config,
        shutdown,
        shared,
        containment,
        max_memory: flag_max_memory,
        max_cpu_milli: flag_max_cpu_milli,
        host_memory,
        host_cpu_milli,
        adopted: RefCell::new(adopted),
        settings: RefCell::new(settings),
        watch_settings,
        reload,
        metrics: agent_metrics,
    };
    agent.serve();
    serving_done.store(true, Ordering::SeqCst);
    // It notices within its one-second reserve timeout (or its connect timeout).
    if control.join().is_err() {
        log::warn!("the control thread panicked");
    }
    if watcher.join().is_err() {
        log::warn!("the standing task runners panicked");
    }
    log::info!("polaris-agent {} stopped", agent.host_id);
    Ok(())
}

impl Agent {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// A connection watching the host's tube, its max job size, and the queue generation
    /// it was made at.
    fn connect(&self) -> client::Result<(Client, usize, u64)> {
        let (endpoint, generation) = self.queue.current();
        let mut conn = endpoint.connect(Duration::from_secs(2))?;
        conn.watch(&host_tube(&self.host_id))?;
        conn.ignore("default")?;
        let max_job_size =
            conn.stats()?.get_u64("max-job-size").and_then(|n| usize::try_from(n).ok()).unwrap_or(DEFAULT_MAX_JOB_SIZE);
        Ok((conn, max_job_size, generation))
    }

    /// Reads the config file again after a SIGHUP; a bad one leaves the old in force.
    fn reload_if_asked(&self) {
        if !self.reload.swap(false, Ordering::SeqCst) {
            return;
        }
        let Some(path) = &self.config.config_file else {
            log::info!("SIGHUP: no --config file to reload");
            return;
        };
        match config::load(path, &self.config.state_file) {
            Ok(settings) => {
                *self.watch_settings.lock().unwrap_or_else(|p| p.into_inner()) = settings.clone();
                *self.settings.borrow_mut() = settings;
                log::info!("SIGHUP: reloaded {}", path.display());
            }
            Err(e) => log::error!("SIGHUP: keeping the configuration in force: {e}"),
        }
    }

    fn serve(&self) {
        let mut conn: Option<(Client, usize, u64)> = None;
        let mut queue_was_down = false;
        while !self.stopping() {
            self.reload_if_asked();
            if conn.as_ref().is_some_and(|(_, _, generation)| self.queue.is_stale(*generation)) {
                // The dispatcher moved this host to another shard. Nothing is reserved
                // between jobs, so the old connection can go.
                conn = None;
            }
            let (client, max_job_size) = match conn.as_mut() {
                Some((client, max, _)) => (client, *max),
                None => match self.connect() {
                    Ok(c) => {
                        log::info!("connected to the queue at {} (max job size {})", self.queue, c.1);
                        self.metrics.queue_connection(true);
                        queue_was_down = false;
                        let (client, max, _) = conn.insert(c);
                        (client, *max)
                    }
                    Err(e) => {
                        if !queue_was_down {
                            log::warn!("cannot reach the queue at {}, will retry: {e}", self.queue);
                            queue_was_down = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            if !self.adopted.borrow().is_empty() {
                if let Err(e) = self.report_adopted(client, max_job_size) {
                    log::warn!("queue connection lost: {e}");
                    self.metrics.queue_connection(false);
                    conn = None;
                    continue;
                }
            }
            let outcome = match client.reserve_with_timeout(1) {
                Ok(None) | Err(client::Error::DeadlineSoon) => Ok(()),
                Ok(Some(job)) => self.handle(client, job, max_job_size),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                log::warn!("queue connection lost: {e}");
                self.metrics.queue_connection(false);
                conn = None;
            }
        }
    }

    /// Handles one reserved job, start to finish.
    fn handle(&self, conn: &mut Client, job: client::Job, max_job_size: usize) -> client::Result<()> {
        let payload = match wire::open(&self.secret, &job.body) {
            Ok(payload) => payload,
            Err(e) => {
                log::warn!("burying job {}: {e}; it will not run", job.id);
                self.metrics.refused(Code::BadSignature);
                conn.bury(job.id, RESULT_PRIORITY)?;
                // The envelope cannot be trusted, but if it names a reply tube, saying
                // "refused" there lets its job show `failed` instead of waiting.
                let claimed =
                    wire::unverified_payload(&job.body).and_then(|p| serde_json::from_slice::<EnvelopeHeader>(p).ok());
                if let Some(claimed) = claimed {
                    let message = format!("Refused: envelope signature invalid ({e}); job buried, not run");
                    self.report_refusal(
                        conn,
                        &claimed.job_id,
                        &claimed.reply_tube,
                        Code::BadSignature,
                        message,
                        max_job_size,
                    )?;
                }
                return Ok(());
            }
        };
        let envelope: JobEnvelope = match serde_json::from_slice(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                log::warn!("burying job {}: malformed envelope: {e}", job.id);
                conn.bury(job.id, RESULT_PRIORITY)?;
                // Signed but unreadable (e.g. a newer dispatcher's method): report it if
                // the envelope still says where to.
                let header = serde_json::from_slice::<EnvelopeHeader>(payload).ok();
                let code = match header.as_ref().and_then(|h| h.method.as_deref()).map(Method::parse) {
                    Some(None) => Code::UnsupportedMethod,
                    _ => Code::MalformedEnvelope,
                };
                self.metrics.refused(code);
                let Some(header) = header else { return Ok(()) };
                let message = format!("Refused: cannot read the envelope ({e}); job buried, not run");
                return self.report_refusal(conn, &header.job_id, &header.reply_tube, code, message, max_job_size);
            }
        };
        if envelope.host != self.host_id {
            log::warn!("burying job {}: it is for host {:?}, not {:?}", job.id, envelope.host, self.host_id);
            let message = format!("Refused: envelope is for host {:?}, delivered to {:?}", envelope.host, self.host_id);
            return self.refuse(conn, job.id, &envelope, Code::WrongHost, message, max_job_size);
        }
        let now = wire::unix_now();
        if now > envelope.expires_at {
            let late = now - envelope.expires_at;
            log::warn!("burying job {} (dispatch job {}): expired {late}s ago", job.id, envelope.job_id);
            let message = format!("Refused: envelope expired {late}s before the agent took it; job buried, not run");
            return self.refuse(conn, job.id, &envelope, Code::EnvelopeExpired, message, max_job_size);
        }

        let attempt = envelope.attempt();
        let prior = self.shared.ledger().find(&envelope.job_id, &envelope.host, attempt).cloned();
        if let Some(prior) = prior {
            log::warn!(
                "burying job {} (dispatch job {}): a copy of an envelope that ran here {}s ago as queue job {}",
                job.id,
                envelope.job_id,
                now.saturating_sub(prior.ran_at),
                prior.queue_job_id
            );
            let message = format!(
                "Refused: this envelope already ran on this host ({}s ago, as queue job {}); the copy is buried, \
                 not run",
                now.saturating_sub(prior.ran_at),
                prior.queue_job_id
            );
            return self.refuse(conn, job.id, &envelope, Code::EnvelopeReplayed, message, max_job_size);
        }
        if let Err((code, message)) = self.check_limits(&envelope) {
            log::warn!("burying job {} (dispatch job {}): {message}", job.id, envelope.job_id);
            return self.refuse(conn, job.id, &envelope, code, message, max_job_size);
        }
        // Recorded (fsynced) before it runs, so that it never runs twice.
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let ran = ledger::Ran {
            job_id: envelope.job_id.clone(),
            host: envelope.host.clone(),
            attempt,
            method: envelope.method.as_str().to_string(),
            expires_at: envelope.expires_at,
            ran_at: now,
            run_id: run_id.clone(),
            queue_job_id: job.id,
            reply_tube: envelope.reply_tube.clone(),
        };
        let running = RunningJob {
            job_id: envelope.job_id.clone(),
            host: envelope.host.clone(),
            attempt,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_heard: Arc::default(),
        };
        {
            // Running slot, then ledger: the control thread's order (see `control`).
            let mut slot = self.shared.running();
            let mut ledger = self.shared.ledger();
            if let Some(cancel) = ledger.cancelled(&envelope.job_id, &envelope.host, attempt).cloned() {
                drop(ledger);
                drop(slot);
                log::warn!(
                    "burying job {} (dispatch job {} attempt {attempt}): cancelled before it started; it will not run",
                    job.id,
                    envelope.job_id
                );
                let message = format!(
                    "Cancelled before it started (the cancel was issued {}s ago); job buried, not run",
                    now.saturating_sub(cancel.issued_at)
                );
                return self.refuse(conn, job.id, &envelope, Code::Cancelled, message, max_job_size);
            }
            if let Err(e) = ledger.begin(ran.clone()) {
                drop(ledger);
                drop(slot);
                log::error!("burying job {} (dispatch job {}): cannot write the ledger: {e}", job.id, envelope.job_id);
                let message = format!("Not run: the agent cannot record it in its ledger ({e}); job buried");
                return self.refuse(conn, job.id, &envelope, Code::ExecError, message, max_job_size);
            }
            *slot = Some(running.clone());
        }

        match &envelope.args {
            Some(args) => {
                log::info!(
                    "job {} ({}) attempt {attempt}: {} {args}",
                    envelope.job_id,
                    job.id,
                    envelope.method.as_str()
                )
            }
            None => log::info!(
                "job {} ({}) attempt {attempt}: {} {:?}",
                envelope.job_id,
                job.id,
                envelope.method.as_str(),
                envelope.cmd
            ),
        }
        let started = Instant::now();
        self.metrics.started();
        let mut result = match envelope.method {
            Method::SyncQuery => query_result(&envelope),
            Method::SyncBash | Method::AsyncBash => self.run_command(conn, job.id, &envelope, &run_id, &running),
            Method::IntegrityInit | Method::IntegrityCheck | Method::IntegrityUpdate => {
                self.run_integrity(conn, job.id, &envelope, max_job_size)
            }
            Method::LogTail | Method::LogGrep => self.run_log(conn, job.id, &envelope),
        };
        *self.shared.running() = None;
        result.attempt = envelope.attempt;
        self.metrics.finished(envelope.method, &result, started.elapsed());
        if let Err(e) = put_result(conn, &self.secret, &envelope.reply_tube, result.clone(), max_job_size) {
            // The queue went away while it ran (its shard died, say): the result is kept
            // and put on the next connection, wherever the host's shard is by then.
            self.adopted.borrow_mut().push(Adopted { run: ledger::UnfinishedRun { ran, started: None }, result });
            return Err(e);
        }
        conn.delete(job.id)?;
        self.finish_run(&run_id);
        Ok(())
    }

    /// Closes a run in the ledger once its result is out and its job deleted.
    fn finish_run(&self, run_id: &str) {
        if let Err(e) = self.shared.ledger().done(run_id, wire::unix_now()) {
            // Harmless: the next start reports the run again, and the real result wins.
            log::warn!("cannot close run {run_id} in the ledger: {e}");
        }
    }

    /// Reports the runs a dead predecessor left (see [`orphans`]): puts their results,
    /// deletes their queue jobs if they still carry the same envelopes, closes the runs.
    fn report_adopted(&self, conn: &mut Client, max_job_size: usize) -> client::Result<()> {
        loop {
            let Some(adopted) = self.adopted.borrow().first().cloned() else { return Ok(()) };
            let ran = &adopted.run.ran;
            if client::is_valid_tube_name(&ran.reply_tube) {
                put_result(conn, &self.secret, &ran.reply_tube, adopted.result.clone(), max_job_size)?;
            }
            // The id may name another job by now (a queue that restarted): delete it only
            // if it still carries this envelope.
            match conn.peek(ran.queue_job_id) {
                Ok(job) => {
                    let same = wire::open(&self.secret, &job.body)
                        .ok()
                        .and_then(|payload| serde_json::from_slice::<JobEnvelope>(payload).ok())
                        .is_some_and(|e| e.job_id == ran.job_id && e.host == ran.host);
                    if same {
                        match conn.delete(ran.queue_job_id) {
                            Ok(()) | Err(client::Error::NotFound) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(client::Error::NotFound) => {}
                Err(e) => return Err(e),
            }
            log::info!("job {} (queue job {}): reported {:?}", ran.job_id, ran.queue_job_id, adopted.result.message);
            self.finish_run(&ran.run_id);
            self.adopted.borrow_mut().remove(0);
        }
    }

    /// Puts a `failed` result for a job the agent refused to run.
    fn report_refusal(
        &self,
        conn: &mut Client,
        job_id: &str,
        reply_tube: &str,
        code: Code,
        message: String,
        max_job_size: usize,
    ) -> client::Result<()> {
        if !client::is_valid_tube_name(reply_tube) {
            return Ok(());
        }
        let result = failure(job_id, &self.host_id, code, message);
        put_result(conn, &self.secret, reply_tube, result, max_job_size)
    }

    /// Buries a verified envelope's queue job, never to run, and reports why on its reply tube.
    fn refuse(
        &self,
        conn: &mut Client,
        queue_job_id: u64,
        envelope: &JobEnvelope,
        code: Code,
        message: String,
        max_job_size: usize,
    ) -> client::Result<()> {
        self.metrics.refused(code);
        conn.bury(queue_job_id, RESULT_PRIORITY)?;
        if !client::is_valid_tube_name(&envelope.reply_tube) {
            return Ok(());
        }
        let result =
            HostResult { attempt: envelope.attempt, ..failure(&envelope.job_id, &self.host_id, code, message) };
        put_result(conn, &self.secret, &envelope.reply_tube, result, max_job_size)
    }

    /// Whether the envelope's limits can be honoured here: within the agent's ceilings,
    /// and with a controller to enforce each. Never run with a limit left unenforced.
    fn check_limits(&self, envelope: &JobEnvelope) -> Result<(), (Code, String)> {
        if !envelope.method.runs_command() {
            return Ok(());
        }
        let limits = self.settings.borrow().limits;
        let max_memory = self.max_memory.or(limits.max_memory).unwrap_or(self.host_memory);
        let max_cpu_milli = self.max_cpu_milli.or(limits.max_cpu_milli).unwrap_or(self.host_cpu_milli);
        if let Some(bytes) = envelope.memory_max {
            if bytes < MIN_MEMORY_MAX {
                return Err((
                    Code::MalformedEnvelope,
                    format!("Refused: memory_max {bytes} is below the {MIN_MEMORY_MAX} bytes a command needs; job buried, not run"),
                ));
            }
            if bytes > max_memory {
                return Err((
                    Code::LimitAboveCeiling,
                    format!(
                        "Refused: memory_max {bytes} is above this agent's ceiling of {max_memory} bytes \
                         (--max-memory, [limits] max_memory); job buried, not run"
                    ),
                ));
            }
            if !self.containment.limits_memory() {
                return Err((
                    Code::LimitUnavailable,
                    format!(
                        "Refused: memory_max cannot be enforced on this host ({}); job buried, not run",
                        self.containment.describe()
                    ),
                ));
            }
        }
        if let Some(milli) = envelope.cpu_max_milli {
            if milli == 0 {
                return Err((Code::MalformedEnvelope, "Refused: cpu_max_milli is 0; job buried, not run".to_string()));
            }
            if milli > max_cpu_milli {
                return Err((
                    Code::LimitAboveCeiling,
                    format!(
                        "Refused: cpu_max_milli {milli} is above this agent's ceiling of {max_cpu_milli} \
                         (--max-cpu-milli, [limits] max_cpu_milli); job buried, not run"
                    ),
                ));
            }
            if !self.containment.limits_cpu() {
                return Err((
                    Code::LimitUnavailable,
                    format!(
                        "Refused: cpu_max_milli cannot be enforced on this host ({}); job buried, not run",
                        self.containment.describe()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs `work` on a thread of its own, touching the queue job meanwhile so a long scan
    /// does not see it released to run again. If the agent is asked to stop, `work` may
    /// go on for the drain timeout; then it is abandoned (it ends with the process) and
    /// reported `agent_restarted`, as a command would be.
    fn run_touching<T: Send + 'static>(
        &self,
        conn: &mut Client,
        queue_job_id: u64,
        envelope: &JobEnvelope,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, (Code, String)> {
        let ttr = conn
            .stats_job(queue_job_id)
            .ok()
            .and_then(|s| s.get_u64("ttr"))
            .unwrap_or(u64::from(envelope.timeout) + 60);
        let touch_every = Duration::from_millis(ttr * 500).max(MIN_TOUCH_INTERVAL);
        // Woken often enough to notice a stop request.
        let tick = touch_every.min(Duration::from_millis(500));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name(envelope.method.as_str().to_string())
            .spawn(move || {
                let _ = done_tx.send(work());
            })
            .map_err(|e| (Code::IntegrityFailed, format!("cannot start a thread: {e}")))?;
        let mut next_touch = Instant::now() + touch_every;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            match done_rx.recv_timeout(tick) {
                Ok(value) => {
                    let _ = worker.join();
                    return Ok(value);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if now >= next_touch {
                        if let Err(e) = conn.touch(queue_job_id) {
                            log::warn!("cannot touch job {queue_job_id}: {e}");
                        }
                        next_touch = now + touch_every;
                    }
                    if self.stopping() {
                        let deadline = *drain_deadline.get_or_insert(now + self.config.drain_timeout);
                        if now >= deadline {
                            return Err((
                                Code::AgentRestarted,
                                format!(
                                    "Stopped: the agent was stopped while {} ran (still running {}s after SIGTERM \
                                     reached the agent)",
                                    envelope.method.as_str(),
                                    self.config.drain_timeout.as_secs()
                                ),
                            ));
                        }
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err((Code::IntegrityFailed, "the worker thread panicked".into()));
                }
            }
        }
    }

    /// `integrity.init`, `integrity.check`, `integrity.update`, on the agent's own rules.
    fn run_integrity(
        &self,
        conn: &mut Client,
        queue_job_id: u64,
        envelope: &JobEnvelope,
        max_job_size: usize,
    ) -> HostResult {
        let Some(settings) = self.settings.borrow().integrity.clone() else {
            let message = match &self.config.config_file {
                Some(path) => format!("Not configured: {} has no [integrity] section", path.display()),
                None => "Not configured: the agent runs without --config, so it has no integrity rules".into(),
            };
            return failure(&envelope.job_id, &self.host_id, Code::IntegrityNotConfigured, message);
        };
        let operation = match envelope.method {
            Method::IntegrityInit => integrity::Operation::Init,
            Method::IntegrityUpdate => integrity::Operation::Update,
            _ => integrity::Operation::Check,
        };
        // Room for the report inside the signed result: the queue's limit less the other
        // fields and the signature.
        let max_bytes = max_job_size.saturating_sub(4096).max(1024);
        let (secret, host) = (self.secret.clone(), self.host_id.clone());
        let outcome = self.run_touching(conn, queue_job_id, envelope, move || {
            integrity::run(operation, &settings, &secret, &host, max_bytes)
        });
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err((code, message)) => return failure(&envelope.job_id, &self.host_id, code, message),
        };
        log::info!("job {}: {}", envelope.job_id, outcome.message);
        let (resp, retcode) = match outcome.status {
            Ok(bits) => (Resp::Success, bits),
            Err(code) => (Resp::Failed, u32::from(code.value())),
        };
        HostResult {
            v: 1,
            job_id: envelope.job_id.clone(),
            host: self.host_id.clone(),
            resp,
            retcode,
            message: outcome.message,
            output_bytes: outcome.data.len() as u64,
            data: outcome.data,
            encoding: None,
            truncated: false,
            attempt: envelope.attempt,
        }
    }

    /// `log.tail` and `log.grep`, within the configured log roots.
    fn run_log(&self, conn: &mut Client, queue_job_id: u64, envelope: &JobEnvelope) -> HostResult {
        let Some(settings) = self.settings.borrow().log.clone() else {
            let message = match &self.config.config_file {
                Some(path) => format!("Not configured: {} has no [log] section", path.display()),
                None => "Not configured: the agent runs without --config, so it has no log roots".into(),
            };
            return failure(&envelope.job_id, &self.host_id, Code::LogsNotConfigured, message);
        };
        let args = envelope.args.clone().unwrap_or(serde_json::Value::Null);
        let method = envelope.method;
        let outcome = self.run_touching(conn, queue_job_id, envelope, move || match method {
            Method::LogTail => logs::tail(&args, &settings),
            _ => logs::grep(&args, &settings),
        });
        let output = match outcome {
            Ok(Ok(output)) => output,
            Ok(Err((code, message))) => {
                return failure(&envelope.job_id, &self.host_id, code, format!("Refused: {message}"))
            }
            Err((code, message)) => return failure(&envelope.job_id, &self.host_id, code, message),
        };
        let data = OutputData::new(&output.output, output.truncated);
        HostResult {
            v: 1,
            job_id: envelope.job_id.clone(),
            host: self.host_id.clone(),
            resp: Resp::Success,
            retcode: output.retcode,
            message: output.message,
            data: data.data,
            encoding: data.encoding,
            truncated: output.truncated,
            output_bytes: output.output.len() as u64,
            attempt: envelope.attempt,
        }
    }

    /// Runs the envelope's command, touching the queue job as it runs, and records its
    /// process group in the ledger. Killed (and reported so) if the agent is shutting down
    /// and the command outlives the drain timeout.
    /// Puts the output printed since `sent` bytes on the reply tube as one
    /// [`wire::OutputChunk`] (so people can watch it as it happens); answers how many
    /// bytes it sent. A chunk that cannot be put is only logged: the result carries the
    /// whole output anyway.
    fn send_live_output(
        &self,
        conn: &mut Client,
        envelope: &JobEnvelope,
        live: &exec::LiveOutput,
        sent: usize,
    ) -> usize {
        let piece = live.since(sent, LIVE_CHUNK_BYTES);
        if piece.is_empty() {
            return 0;
        }
        let data = OutputData::new(&piece, false);
        let chunk = wire::OutputChunk {
            v: 1,
            kind: wire::OUTPUT_CHUNK_KIND.to_string(),
            job_id: envelope.job_id.clone(),
            host: self.host_id.clone(),
            attempt: envelope.attempt,
            offset: sent as u64,
            data: data.data,
            encoding: data.encoding,
        };
        let put = serde_json::to_vec(&chunk)
            .map_err(|e| client::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
            .and_then(|payload| {
                let body = wire::sign(&self.secret, &payload);
                conn.use_tube(&envelope.reply_tube)?;
                conn.put(LIVE_OUTPUT_PRIORITY, 0, RESULT_TTR, &body)
            });
        match put {
            Ok(_) => piece.len(),
            Err(e) => {
                log::warn!("job {}: cannot send live output: {e}", envelope.job_id);
                0
            }
        }
    }

    fn run_command(
        &self,
        conn: &mut Client,
        queue_job_id: u64,
        envelope: &JobEnvelope,
        run_id: &str,
        running: &RunningJob,
    ) -> HostResult {
        let base = HostResult {
            v: 1,
            job_id: envelope.job_id.clone(),
            host: self.host_id.clone(),
            resp: Resp::Success,
            retcode: 0,
            message: String::new(),
            data: String::new(),
            encoding: None,
            truncated: false,
            output_bytes: 0,
            attempt: None,
        };
        let unit_limits = UnitLimits { memory_max: envelope.memory_max, cpu_max_milli: envelope.cpu_max_milli };
        let unit = match self.containment.create(run_id, &unit_limits) {
            Ok(unit) => unit,
            Err(contain::ContainError::Unavailable(why)) => {
                return HostResult {
                    resp: Resp::Failed,
                    retcode: u32::from(Code::LimitUnavailable.value()),
                    message: format!("Not run: {why}"),
                    ..base
                };
            }
            Err(e) if unit_limits != UnitLimits::default() => {
                return HostResult {
                    resp: Resp::Failed,
                    retcode: u32::from(Code::ExecError.value()),
                    message: format!("Not run: cannot create the cgroup that enforces its limits: {e}"),
                    ..base
                };
            }
            Err(e) => {
                // No limit depends on it: run it in a process group, as without cgroups.
                log::warn!(
                    "job {}: cannot create its cgroup ({e}); running it in a process group only",
                    envelope.job_id
                );
                None
            }
        };
        let record_group = |pid: u32| {
            let recorded = match orphans::describe(run_id, pid) {
                Some(mut started) => {
                    started.cgroups = unit.as_ref().map(|u| u.dirs()).unwrap_or_default();
                    self.shared.ledger().started(started).map_err(|e| e.to_string())
                }
                None => Err("its /proc entry is unreadable".to_string()),
            };
            if let Err(e) = recorded {
                // The run id in its environment still identifies it after a crash.
                log::warn!("cannot record the process group of job {}: {e}", envelope.job_id);
            }
        };
        let env = [(orphans::RUN_ID_ENV, run_id)];
        let ttr = conn
            .stats_job(queue_job_id)
            .ok()
            .and_then(|s| s.get_u64("ttr"))
            .unwrap_or(u64::from(envelope.timeout) + 60);
        // Touch at half the TTR, so a slow tick never lets the job fall back to ready.
        let touch_every = Duration::from_millis(ttr * 500).max(MIN_TOUCH_INTERVAL);
        let mut next_touch = Instant::now() + touch_every;
        let mut drain_deadline: Option<Instant> = None;
        let limits = ExecLimits {
            timeout: Duration::from_secs(u64::from(envelope.timeout)),
            kill_grace: kill_grace(self.config.kill_grace, envelope),
            max_output: exec::MAX_OUTPUT_BYTES,
        };
        // Output is sent on as it is printed (see `send_live_output`), at most every
        // `--live-output-ms`, in chunks of at most LIVE_CHUNK_BYTES.
        let live = exec::LiveOutput::default();
        let mut live_sent = 0usize;
        let live_every = self.config.live_output;
        let mut next_live = Instant::now() + live_every;
        let outcome = exec::run_bash_live(&envelope.cmd, &limits, &env, unit.as_ref(), &live, record_group, || {
            let now = Instant::now();
            if running.cancel.load(Ordering::SeqCst) {
                return Tick::Cancel;
            }
            if !live_every.is_zero() && now >= next_live {
                live_sent += self.send_live_output(conn, envelope, &live, live_sent);
                next_live = now + live_every;
            }
            if now >= next_touch {
                if let Err(e) = conn.touch(queue_job_id) {
                    log::warn!("cannot touch job {queue_job_id}: {e}");
                }
                next_touch = now + touch_every;
            }
            if self.stopping() {
                let deadline = *drain_deadline.get_or_insert_with(|| {
                    log::info!("stopping: giving the running command {:?} to finish", self.config.drain_timeout);
                    now + self.config.drain_timeout
                });
                if now >= deadline {
                    return Tick::Abort;
                }
            }
            Tick::Continue
        });
        if let Some(unit) = &unit {
            if let Err(e) = unit.remove() {
                log::warn!("job {}: cannot remove its cgroup: {e}", envelope.job_id);
            }
        }
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                return HostResult {
                    resp: Resp::Failed,
                    retcode: u32::from(Code::ExecError.value()),
                    message: format!("Could not run the command: {e}"),
                    ..base
                };
            }
        };
        let (resp, retcode, mut message) = match outcome.termination.clone() {
            Termination::Cancelled { killed } => {
                let heard = *running.cancel_heard.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(heard) = heard {
                    log::info!(
                        "job {}: cancelled; {killed} process(es) killed and gone {} ms after the cancel was heard",
                        envelope.job_id,
                        heard.elapsed().as_millis()
                    );
                }
                (
                    Resp::Failed,
                    u32::from(Code::Cancelled.value()),
                    format!(
                        "Cancelled while it ran (DELETE /v1/jobs/{}); killed {killed} process(es)",
                        envelope.job_id
                    ),
                )
            }
            Termination::OutputFailed(error) => (
                Resp::Failed,
                u32::from(Code::ExecError.value()),
                format!("Killed with SIGKILL: reading its output failed ({error})"),
            ),
            _ if outcome.oom_kills > 0 => (
                Resp::Failed,
                u32::from(Code::MemoryLimit.value()),
                format!(
                    "Killed by its memory limit (memory_max {} bytes): the kernel killed {} process(es) of it",
                    envelope.memory_max.unwrap_or(0),
                    outcome.oom_kills
                ),
            ),
            Termination::Aborted => (
                Resp::Failed,
                u32::from(Code::AgentRestarted.value()),
                format!(
                    "Killed: the agent was stopped while the command ran (still running {}s after SIGTERM \
                     reached the agent)",
                    self.config.drain_timeout.as_secs()
                ),
            ),
            Termination::Exited(code) => (Resp::Success, code as u32, "Normal termination".to_string()),
            Termination::Signaled(sig) => {
                (Resp::Success, 128 + sig as u32, format!("Terminated by signal {sig} ({})", exec::signal_name(sig)))
            }
            Termination::TimedOut { killed_by } => {
                self.metrics.timed_out(&exec::signal_name(killed_by));
                (
                    Resp::Failed,
                    u32::from(Code::ExecTimeout.value()),
                    format!(
                        "Timed out after {}s: process group killed with {}",
                        envelope.timeout,
                        exec::signal_name(killed_by)
                    ),
                )
            }
        };
        // The bytes as printed: text when they are UTF-8, else base64 (never U+FFFD).
        let output = OutputData::new(&outcome.output, outcome.truncated);
        if outcome.truncated {
            message.push_str(&format!("; output truncated to {} of {} bytes", output.kept, outcome.output_bytes));
        }
        HostResult {
            resp,
            retcode,
            message,
            data: output.data,
            encoding: output.encoding,
            truncated: outcome.truncated,
            output_bytes: outcome.output_bytes,
            ..base
        }
    }
}

/// A `failed` result with `code`, no output.
pub(crate) fn failure(job_id: &str, host: &str, code: Code, message: String) -> HostResult {
    HostResult {
        v: 1,
        job_id: job_id.to_string(),
        host: host.to_string(),
        resp: Resp::Failed,
        retcode: u32::from(code.value()),
        message,
        data: String::new(),
        encoding: None,
        truncated: false,
        output_bytes: 0,
        attempt: None,
    }
}

/// The SIGTERM → SIGKILL delay for `envelope`: the agent's own setting, but never more
/// than the dispatcher sized its waits for, so the kill path reports in time.
fn kill_grace(own: Duration, envelope: &JobEnvelope) -> Duration {
    match envelope.kill_grace_ms {
        Some(ms) => own.min(Duration::from_millis(ms)),
        None => own,
    }
}

fn query_result(envelope: &JobEnvelope) -> HostResult {
    let facts = query::collect()
        .map_err(|e| e.to_string())
        .and_then(|facts| serde_json::to_string(&facts).map_err(|e| e.to_string()));
    let (resp, retcode, message, data) = match facts {
        Ok(json) => (Resp::Success, 0, "Query answered".to_string(), json),
        Err(e) => (Resp::Failed, u32::from(Code::QueryFailed.value()), format!("Query failed: {e}"), String::new()),
    };
    let output_bytes = data.len() as u64;
    HostResult {
        v: 1,
        job_id: envelope.job_id.clone(),
        host: envelope.host.clone(),
        resp,
        retcode,
        message,
        data,
        encoding: None,
        truncated: false,
        output_bytes,
        attempt: None,
    }
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn json_escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0C}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The longest prefix of `data` whose JSON-escaped form fits in `budget` bytes.
fn prefix_within(data: &str, budget: usize) -> &str {
    let mut used = 0;
    for (index, c) in data.char_indices() {
        used += json_escaped_len(c);
        if used > budget {
            return &data[..index];
        }
    }
    data
}

/// Signs and puts `result` on `tube`. If it is larger than the queue's max job size (as
/// read from `stats`, or learnt from a `JOB_TOO_BIG`), its data is cut to fit and the
/// message says so, so a result is never lost for its size.
pub fn put_result(
    conn: &mut Client,
    secret: &Secret,
    tube: &str,
    mut result: HostResult,
    max_job_size: usize,
) -> client::Result<()> {
    conn.use_tube(tube)?;
    let mut limit = max_job_size;
    let original_message = result.message.clone();
    loop {
        let payload = serde_json::to_vec(&result)
            .map_err(|e| client::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let body = wire::sign(secret, &payload);
        if body.len() <= limit {
            match conn.put(RESULT_PRIORITY, 0, RESULT_TTR, &body) {
                Ok(_) => return Ok(()),
                Err(client::Error::JobTooBig) => {
                    log::warn!("queue refused a {}-byte result as too big; cutting its output", body.len());
                    // Ask the queue for its real limit; if it does not say (or says
                    // something that just failed), halve, so this ends in a few rounds.
                    let reported = conn
                        .stats()
                        .ok()
                        .and_then(|s| s.get_u64("max-job-size"))
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|&n| n < body.len());
                    limit = reported.unwrap_or(body.len() / 2);
                }
                Err(e) => return Err(e),
            }
        }
        if result.data.is_empty() {
            // Nothing left to cut: the queue cannot take even an empty result.
            return Err(client::Error::JobTooBig);
        }
        // Room for the data: the limit minus everything else, with slack for the longer
        // message set below.
        let escaped_data: usize = result.data.chars().map(json_escaped_len).sum();
        let others = body.len() - escaped_data;
        let budget = limit.saturating_sub(others + 120);
        let base64 = result.encoding == Some(Encoding::Base64);
        // Base64 is cut at whole 4-character groups, so what is left still decodes to
        // exactly the first bytes of the output.
        let whole = |n: usize| if base64 { n / 4 * 4 } else { n };
        let mut kept = whole(prefix_within(&result.data, budget).len());
        if kept == result.data.len() {
            // Only the message grew; make sure every round still shrinks the data.
            kept = whole(prefix_within(&result.data, escaped_data / 2).len());
        }
        result.data.truncate(kept);
        let kept_bytes = if base64 { kept / 4 * 3 } else { kept };
        result.truncated = true;
        result.message = format!(
            "{original_message}; output cut to {kept_bytes} of {} bytes to fit the queue's max job size",
            result.output_bytes
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_caps_the_kill_grace() {
        let mut envelope = JobEnvelope {
            v: 1,
            job_id: "j".into(),
            host: "h".into(),
            method: Method::SyncBash,
            cmd: "true".into(),
            timeout: 1,
            reply_tube: "r".into(),
            issued_at: 0,
            expires_at: 0,
            kill_grace_ms: None,
            attempt: None,
            memory_max: None,
            cpu_max_milli: None,
            args: None,
        };
        let own = Duration::from_secs(5);
        assert_eq!(kill_grace(own, &envelope), own);
        envelope.kill_grace_ms = Some(2000);
        assert_eq!(kill_grace(own, &envelope), Duration::from_secs(2));
        envelope.kill_grace_ms = Some(9000);
        assert_eq!(kill_grace(own, &envelope), own);
    }

    #[test]
    fn escaped_lengths_match_serde_json() {
        let sample = "plain \"quoted\" back\\slash\nnew\ttab \u{1} ünï 😀";
        let escaped: usize = sample.chars().map(json_escaped_len).sum();
        assert_eq!(escaped + 2, serde_json::to_string(sample).expect("json").len());
        assert_eq!(prefix_within("ab\"cd", 3), "ab");
        assert_eq!(prefix_within("ab\"cd", 4), "ab\"");
        assert_eq!(prefix_within("😀x", 3), "");
    }
}
