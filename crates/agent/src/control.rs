//! The control thread: signed [`ControlMessage`]s from the dispatcher, on a queue
//! connection of its own.
//!
//! The serve loop's connection is busy for as long as a command runs (it reserved the job
//! and touches it), so a cancel put on `host.<id>` would wait behind the very command it
//! is meant to stop. This thread watches only `control.<host>` (and ignores `default`) on a
//! second connection to the same queue (TLS when the agent's is), in a
//! reserve-with-timeout loop, so the reserve returns the moment the dispatcher puts a
//! message. For each message it:
//!
//! 1. verifies the signature with the shared secret (an unverifiable message is buried,
//!    never acted on), parses it, and checks that it is for this host and not older than
//!    [`MAX_CONTROL_AGE_SECS`] (else it is deleted and ignored, with a warning);
//! 2. records the cancel in the ledger, durably, so an envelope it covers that comes later
//!    (not yet started, or a later attempt when the cancel names none) is refused and
//!    never run;
//! 3. if the command running now is the job (and attempt) it names, raises the run's
//!    cancel flag: the runner, which looks every 20 ms, kills the command's whole unit
//!    with SIGKILL and reports `cancelled` (0x0104) with its output so far;
//! 4. deletes the message.
//!
//! Lock order: [`Shared::running`] before [`Shared::ledger`], here and in the serve loop,
//! so that a cancel and the start of its job cannot miss each other: either the cancel
//! sees the job running, or the serve loop sees the cancel in the ledger.

use crate::ledger::{Cancelled, Ledger};
use crate::shard::QueueAddress;
use polaris_ops_wire::wire::{self, control_tube, ControlKind, ControlMessage, Secret};
use polaris_proto::client::{self, Client};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Control messages older than this (by their `issued_at`) are ignored: a cancel that old
/// was for a job long over, and acting on it could only surprise.
pub const MAX_CONTROL_AGE_SECS: u64 = 3600;

/// How long a cancel is remembered for envelopes that come later: past the longest an
/// envelope of the job can still be valid (the dispatcher's longest timeout is a day).
pub const CANCEL_KEEP_SECS: u64 = 2 * 86_400;

/// Priority for buried control messages.
const BURY_PRIORITY: u32 = 100;

/// The job the serve loop is running now.
#[derive(Debug, Clone)]
pub struct RunningJob {
    /// The dispatch job id.
    pub job_id: String,
    /// The envelope's host (this host).
    pub host: String,
    /// The envelope's attempt.
    pub attempt: u32,
    /// Raised by a cancel; the runner's tick sees it.
    pub cancel: Arc<AtomicBool>,
    /// When the cancel was heard, for the latency in the log.
    pub cancel_heard: Arc<Mutex<Option<Instant>>>,
}

/// What the serve loop and the control thread share.
#[derive(Debug)]
pub struct Shared {
    /// The job running now, if any.
    pub running: Mutex<Option<RunningJob>>,
    /// The ledger (see [`crate::ledger`]).
    pub ledger: Mutex<Ledger>,
}

impl Shared {
    /// Shares `ledger`, nothing running.
    pub fn new(ledger: Ledger) -> Shared {
        Shared { running: Mutex::new(None), ledger: Mutex::new(ledger) }
    }

    /// The running job slot (a poisoned lock still holds a usable value).
    pub fn running(&self) -> MutexGuard<'_, Option<RunningJob>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ledger.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the control thread needs.
pub struct Control {
    /// The queue, as the serve loop connects to it (it moves with the host's shard).
    pub queue: Arc<QueueAddress>,
    /// This host's id.
    pub host_id: String,
    /// The shared secret.
    pub secret: Secret,
    /// State shared with the serve loop.
    pub shared: Arc<Shared>,
    /// Set once the serve loop has stopped (after SIGTERM/SIGINT and the drain).
    pub shutdown: Arc<AtomicBool>,
}

/// Starts the control thread.
pub fn spawn(control: Control) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("control".into()).spawn(move || control.serve())
}

/// What became of one control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// It cancelled the running command (and was recorded).
    CancelledRunning,
    /// It was recorded for an envelope that may still come.
    Recorded,
    /// It was ignored (another host, too old); the reason.
    Ignored(String),
}

impl Control {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// A connection watching the control tube, and the queue generation it was made at.
    fn connect(&self) -> client::Result<(Client, u64)> {
        let (endpoint, generation) = self.queue.current();
        let mut conn = endpoint.connect(Duration::from_secs(2))?;
        conn.watch(&control_tube(&self.host_id))?;
        conn.ignore("default")?;
        Ok((conn, generation))
    }

    fn serve(&self) {
        let mut conn: Option<(Client, u64)> = None;
        let mut queue_was_down = false;
        while !self.stopping() {
            if conn.as_ref().is_some_and(|(_, generation)| self.queue.is_stale(*generation)) {
                // The host moved to another shard; so do its cancels.
                conn = None;
            }
            let client = match conn.as_mut() {
                Some((client, _)) => client,
                None => match self.connect() {
                    Ok(c) => {
                        log::info!("watching {} for cancels on {}", control_tube(&self.host_id), self.queue);
                        queue_was_down = false;
                        &mut conn.insert(c).0
                    }
                    Err(e) => {
                        if !queue_was_down {
                            log::warn!("control: cannot reach the queue at {}, will retry: {e}", self.queue);
                            queue_was_down = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let outcome = match client.reserve_with_timeout(1) {
                Ok(None) | Err(client::Error::DeadlineSoon) => Ok(()),
                Ok(Some(job)) => self.handle(client, job),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                log::warn!("control: queue connection lost: {e}");
                conn = None;
            }
        }
    }

    fn handle(&self, conn: &mut Client, job: client::Job) -> client::Result<()> {
        let payload = match wire::open(&self.secret, &job.body) {
            Ok(payload) => payload,
            Err(e) => {
                log::warn!("control: burying job {}: {e}; not acted on", job.id);
                return conn.bury(job.id, BURY_PRIORITY);
            }
        };
        let message: ControlMessage = match serde_json::from_slice(payload) {
            Ok(message) => message,
            Err(e) => {
                log::warn!("control: burying job {}: malformed control message: {e}", job.id);
                return conn.bury(job.id, BURY_PRIORITY);
            }
        };
        match apply(&self.shared, &self.host_id, &message, wire::unix_now()) {
            Ok(Handled::Ignored(why)) => log::warn!("control: job {} ignored: {why}", job.id),
            Ok(Handled::CancelledRunning) => {
                log::info!("control: cancelling job {} (attempt {:?}) while it runs", message.job_id, message.attempt)
            }
            Ok(Handled::Recorded) => log::info!(
                "control: job {} (attempt {:?}) cancelled before it started here; it will not run",
                message.job_id,
                message.attempt
            ),
            Err(e) => {
                // Released, not deleted: the next try may write the ledger.
                log::warn!("control: cannot record the cancel of job {}: {e}; retrying", message.job_id);
                return conn.release(job.id, BURY_PRIORITY, 1);
            }
        }
        conn.delete(job.id)
    }
}

/// Acts on a verified control message for `host_id` at `now` (Unix seconds).
pub fn apply(shared: &Shared, host_id: &str, message: &ControlMessage, now: u64) -> std::io::Result<Handled> {
    if message.host != host_id {
        return Ok(Handled::Ignored(format!("it is for host {:?}, not {host_id:?}", message.host)));
    }
    if now > message.issued_at.saturating_add(MAX_CONTROL_AGE_SECS) {
        return Ok(Handled::Ignored(format!(
            "issued {}s ago, more than {MAX_CONTROL_AGE_SECS}s",
            now - message.issued_at
        )));
    }
    match message.kind {
        ControlKind::Cancel => {}
    }
    let running = shared.running();
    shared.ledger().cancel(Cancelled {
        job_id: message.job_id.clone(),
        host: message.host.clone(),
        attempt: message.attempt,
        issued_at: message.issued_at,
        until: now.max(message.issued_at).saturating_add(CANCEL_KEEP_SECS),
    })?;
    if let Some(job) = running.as_ref() {
        let attempt_matches = message.attempt.is_none() || message.attempt == Some(job.attempt);
        if job.job_id == message.job_id && job.host == message.host && attempt_matches {
            *job.cancel_heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            job.cancel.store(true, Ordering::SeqCst);
            return Ok(Handled::CancelledRunning);
        }
    }
    Ok(Handled::Recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(job_id: &str, attempt: Option<u32>, issued_at: u64) -> ControlMessage {
        ControlMessage { v: 1, kind: ControlKind::Cancel, job_id: job_id.into(), host: "h".into(), attempt, issued_at }
    }

    #[test]
    fn a_cancel_stops_the_running_attempt_or_is_kept_for_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = Shared::new(Ledger::open(&dir.path().join("a.json"), 1000).expect("ledger"));
        let cancel = Arc::new(AtomicBool::new(false));
        *shared.running() = Some(RunningJob {
            job_id: "run".into(),
            host: "h".into(),
            attempt: 2,
            cancel: cancel.clone(),
            cancel_heard: Arc::default(),
        });
        // Another attempt of the running job: kept, the running one goes on.
        assert_eq!(apply(&shared, "h", &message("run", Some(1), 1000), 1000).expect("apply"), Handled::Recorded);
        assert!(!cancel.load(Ordering::SeqCst));
        assert_eq!(apply(&shared, "h", &message("run", None, 1000), 1000).expect("apply"), Handled::CancelledRunning);
        assert!(cancel.load(Ordering::SeqCst));
        assert_eq!(apply(&shared, "h", &message("later", Some(1), 1000), 1000).expect("apply"), Handled::Recorded);
        assert!(shared.ledger().cancelled("later", "h", 1).is_some());
        assert!(shared.ledger().cancelled("later", "h", 2).is_none());
        assert!(matches!(apply(&shared, "other", &message("x", None, 1000), 1000), Ok(Handled::Ignored(_))));
        let stale = message("old", None, 1000);
        assert!(matches!(apply(&shared, "h", &stale, 1001 + MAX_CONTROL_AGE_SECS), Ok(Handled::Ignored(_))));
        assert!(shared.ledger().cancelled("old", "h", 1).is_none());
    }
}
