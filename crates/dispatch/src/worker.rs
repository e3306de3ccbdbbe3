//! The dispatcher's two blocking threads:
//! - the enqueuer puts pending host jobs on the queue and expires overdue ones;
//! - the results consumer records agents' results from the reply tube.
//!
//! Both read their work from SQLite and the queue, never from memory, which is what makes
//! a restart lose nothing: the enqueuer picks up what was pending, the consumer drains
//! results that waited in the reply tube while the dispatcher was down.

use crate::store::{HostState, Outcome, StoreError};
use crate::Dispatcher;
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, host_tube, unix_now_ms, HostResult, JobEnvelope};
use polaris_proto::client::{self, Client, Endpoint};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the enqueuer looks for pending and overdue host jobs when nobody wakes it.
const ENQUEUER_TICK: Duration = Duration::from_millis(500);
/// Extra TTR on top of the job's timeout; the agent also touches long jobs.
const TTR_MARGIN_SECS: u32 = 60;
/// Priority of jobs somebody waits for (sync) and of async jobs; lower runs first.
const SYNC_PRIORITY: u32 = 100;
const ASYNC_PRIORITY: u32 = 1024;
/// Priority for burying a result that cannot be read.
const BURY_PRIORITY: u32 = 0;

/// Starts both threads.
pub(crate) fn spawn(
    dispatcher: &Arc<Dispatcher>,
    queue: Endpoint,
    wake: mpsc::Receiver<()>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let enqueuer = {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        std::thread::Builder::new().name("enqueuer".into()).spawn(move || run_enqueuer(&dispatcher, &wake, &stop))?
    };
    let consumer = {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("results".into())
            .spawn(move || run_results_consumer(&dispatcher, &queue, &stop))?
    };
    Ok(vec![enqueuer, consumer])
}

fn run_enqueuer(dispatcher: &Dispatcher, wake: &mpsc::Receiver<()>, stop: &AtomicBool) {
    let mut queue_was_down = false;
    while !stop.load(Ordering::SeqCst) {
        let step = enqueue_pending(dispatcher).and_then(|()| expire_overdue(dispatcher));
        match step {
            Ok(()) => {
                if queue_was_down {
                    log::info!("queue reachable again");
                    queue_was_down = false;
                }
            }
            Err(StepError::Queue(e)) => {
                // Logged once per outage, not every tick.
                if !queue_was_down {
                    log::warn!("queue unavailable, will retry: {e}");
                    queue_was_down = true;
                }
            }
            Err(StepError::Store(e)) => log::error!("enqueuer: {e}"),
        }
        match wake.recv_timeout(ENQUEUER_TICK) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}

/// A worker step failed on the queue (retried later) or on the database.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error(transparent)]
    Queue(#[from] client::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Puts every pending host job whose deadline is ahead on its host's tube.
fn enqueue_pending(dispatcher: &Dispatcher) -> Result<(), StepError> {
    for pending in dispatcher.store.pending(unix_now_ms())? {
        let job = &pending.job;
        let envelope = JobEnvelope {
            v: 1,
            job_id: job.id.clone(),
            host: pending.host.clone(),
            method: job.method,
            cmd: job.cmd.clone(),
            timeout: job.timeout_secs,
            reply_tube: dispatcher.reply_tube.clone(),
            issued_at: wire::unix_now(),
            expires_at: u64::try_from(job.start_by_ms / 1000).unwrap_or(0),
        };
        let payload = serde_json::to_vec(&envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let body = wire::sign(&dispatcher.secret, &payload);
        let priority = if job.method.is_sync() { SYNC_PRIORITY } else { ASYNC_PRIORITY };
        let ttr = job.timeout_secs.saturating_add(TTR_MARGIN_SECS);
        let tube = host_tube(&pending.host);
        // On polarisd the job also carries a TTL up to its start deadline, so
        // the queue itself drops it if no agent takes it in time.
        let left_ms = (job.start_by_ms - wire::unix_now_ms()).max(1000);
        let ttl = u32::try_from((left_ms + 999) / 1000).unwrap_or(u32::MAX);
        let with_ttl = dispatcher.queue.has_extensions();
        let put = dispatcher.queue.with(|c| {
            c.use_tube(&tube)?;
            if with_ttl {
                c.put_with_ttl(priority, 0, ttr, ttl, &body)
            } else {
                c.put(priority, 0, ttr, &body)
            }
        });
        match put {
            Ok(queue_id) => {
                if !dispatcher.store.transition(
                    &job.id,
                    &pending.host,
                    HostState::Pending,
                    HostState::Ready,
                    Some(queue_id),
                )? {
                    // Revoked while we were putting it: take it back off the queue.
                    log::info!(
                        "job {} host {}: revoked during enqueue, deleting queue job {queue_id}",
                        job.id,
                        pending.host
                    );
                    dispatcher.queue.with(|c| c.delete(queue_id)).or_else(ignore_not_found)?;
                }
                log::debug!("job {} host {}: queued as {queue_id}", job.id, pending.host);
            }
            Err(client::Error::JobTooBig) => {
                let outcome = Outcome::failed(
                    Code::EnvelopeTooBig,
                    format!("The signed job ({} bytes) is larger than the queue's max job size", body.len()),
                );
                finish(dispatcher, &job.id, &pending.host, HostState::Pending, HostState::Failed, &outcome)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn ignore_not_found(e: client::Error) -> Result<(), client::Error> {
    match e {
        client::Error::NotFound => Ok(()),
        other => Err(other),
    }
}

/// Marks host jobs past their deadline as expired; a ready one is first taken off the queue
/// so that no agent runs it after it was reported as not answered.
fn expire_overdue(dispatcher: &Dispatcher) -> Result<(), StepError> {
    let grace_ms = i64::try_from(dispatcher.result_grace.as_millis()).unwrap_or(i64::MAX);
    for overdue in dispatcher.store.overdue(unix_now_ms(), grace_ms)? {
        let (job_id, host, timeout) = (&overdue.job_id, &overdue.host, overdue.timeout_secs);
        match overdue.state {
            HostState::Pending => {
                let outcome = Outcome::failed(
                    Code::QueueUnavailable,
                    format!("The job could not be put on the queue within its timeout of {timeout}s"),
                );
                finish(dispatcher, job_id, host, HostState::Pending, HostState::Expired, &outcome)?;
            }
            HostState::Ready => {
                let outcome = Outcome::failed(
                    Code::HostNoAnswer,
                    format!("The host's agent did not take the job within its timeout of {timeout}s"),
                );
                take_back(dispatcher, job_id, host, overdue.queue_job_id, HostState::Expired, &outcome)?;
            }
            HostState::Reserved => {
                let outcome = Outcome::failed(
                    Code::HostNoAnswer,
                    format!("The host's agent took the job but sent no result within its timeout of {timeout}s"),
                );
                finish(dispatcher, job_id, host, HostState::Reserved, HostState::Expired, &outcome)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Takes a `ready` host job back off the queue and gives it the final state `to`. If the
/// queue answers `NOT_FOUND`, an agent has it (or has answered and the result is on its
/// way), so it becomes `reserved` and waits for its result. Returns the state afterwards.
pub(crate) fn take_back(
    dispatcher: &Dispatcher,
    job_id: &str,
    host: &str,
    queue_job_id: Option<u64>,
    to: HostState,
    outcome: &Outcome,
) -> Result<HostState, StepError> {
    let deleted = match queue_job_id {
        Some(queue_id) => dispatcher.queue.with(|c| c.delete(queue_id)),
        None => Ok(()),
    };
    match deleted {
        Ok(()) => {
            finish(dispatcher, job_id, host, HostState::Ready, to, outcome)?;
            Ok(to)
        }
        Err(client::Error::NotFound) => {
            // Gone from the queue: an agent took it, unless polarisd says its TTL
            // ran out first, in which case no agent will ever run it.
            let expired = match queue_job_id {
                Some(queue_id) if dispatcher.queue.has_extensions() => {
                    matches!(dispatcher.queue.with(|c| c.job_state(queue_id)).as_deref(), Ok("expired"))
                }
                _ => false,
            };
            if expired {
                let timeout = Outcome::failed(
                    Code::HostNoAnswer,
                    "The host's agent did not take the job before it expired in the queue",
                );
                finish(dispatcher, job_id, host, HostState::Ready, HostState::Expired, &timeout)?;
                return Ok(HostState::Expired);
            }
            dispatcher.store.transition(job_id, host, HostState::Ready, HostState::Reserved, None)?;
            Ok(HostState::Reserved)
        }
        Err(e) => Err(e.into()),
    }
}

fn finish(
    dispatcher: &Dispatcher,
    job_id: &str,
    host: &str,
    from: HostState,
    to: HostState,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    if dispatcher.store.finish(job_id, host, from, to, outcome)? {
        log::info!("job {job_id} host {host}: {} ({})", to.as_str(), outcome.message);
        dispatcher.waiters.notify(job_id);
    }
    Ok(())
}

fn connect_reply_consumer(queue: &Endpoint, reply_tube: &str) -> client::Result<Client> {
    let mut conn = queue.connect(Duration::from_secs(2))?;
    conn.watch(reply_tube)?;
    conn.ignore("default")?;
    Ok(conn)
}

fn run_results_consumer(dispatcher: &Dispatcher, addr: &Endpoint, stop: &AtomicBool) {
    let mut conn: Option<Client> = None;
    let mut queue_was_down = false;
    while !stop.load(Ordering::SeqCst) {
        let client = match conn.as_mut() {
            Some(client) => client,
            None => match connect_reply_consumer(addr, &dispatcher.reply_tube) {
                Ok(client) => {
                    if queue_was_down {
                        log::info!("results consumer reconnected to {addr}");
                    }
                    queue_was_down = false;
                    conn.insert(client)
                }
                Err(e) => {
                    if !queue_was_down {
                        log::warn!("results consumer cannot reach the queue at {addr}, will retry: {e}");
                        queue_was_down = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        match client.reserve_with_timeout(1) {
            Ok(None) | Err(client::Error::DeadlineSoon) => {}
            Ok(Some(job)) => {
                if let Err(e) = handle_result(dispatcher, client, job) {
                    log::warn!("results consumer: {e}");
                    conn = None;
                }
            }
            Err(e) => {
                log::warn!("results consumer lost the queue: {e}");
                conn = None;
            }
        }
    }
}

/// Records one result and then deletes it from the queue (record first: a crash in between
/// re-records the same result, which is harmless; the other order could lose it).
fn handle_result(dispatcher: &Dispatcher, conn: &mut Client, job: client::Job) -> client::Result<()> {
    let result = wire::open(&dispatcher.secret, &job.body)
        .map_err(|e| e.to_string())
        .and_then(|payload| serde_json::from_slice::<HostResult>(payload).map_err(|e| format!("bad result JSON: {e}")));
    let result = match result {
        Ok(result) => result,
        Err(reason) => {
            log::warn!("burying unreadable result {} on {}: {reason}", job.id, dispatcher.reply_tube);
            return conn.bury(job.id, BURY_PRIORITY);
        }
    };
    match dispatcher.store.record_result(&result) {
        Ok(outcome) => {
            use crate::store::RecordOutcome::*;
            match outcome {
                Recorded => {
                    log::info!(
                        "job {} host {}: {} retcode {} ({})",
                        result.job_id,
                        result.host,
                        result.resp.as_str(),
                        result.retcode,
                        result.message
                    );
                    dispatcher.waiters.notify(&result.job_id);
                }
                AlreadyFinal => log::debug!("job {} host {}: duplicate result ignored", result.job_id, result.host),
                Unknown => log::warn!("result for unknown job {} host {} dropped", result.job_id, result.host),
            }
            conn.delete(job.id)
        }
        Err(e) => {
            // Keep the result on the queue; it is retried after a short delay.
            log::error!("cannot record result {}: {e}", job.id);
            conn.release(job.id, ASYNC_PRIORITY, 1)
        }
    }
}
