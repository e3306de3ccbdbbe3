//! The dispatcher's blocking threads:
//! - the enqueuer puts pending host jobs on the queue (each on its host's shard) and
//!   expires overdue ones, and moves the work no agent has taken off shards that died;
//! - a results consumer per queue shard records agents' results from its reply tube;
//! - the scheduler fires due `schedule` tasks as jobs ([`crate::fleet::schedule`]);
//! - on PostgreSQL, the listener hears of host jobs other dispatchers changed.
//!
//! They read their work from the database and the queue, never from memory, which is what
//! makes a restart lose nothing: the enqueuer picks up what was pending, the consumer drains
//! results that waited in the reply tube while the dispatcher was down.
//!
//! Several dispatchers may share one PostgreSQL database. The enqueuer's and the
//! scheduler's work is then done by one of them at a time, the holder of its lease
//! ([`crate::store::Store::hold_lease`]); every dispatcher consumes results (the queue
//! hands each to one of them, and recording one is a conditional update), and the
//! listener wakes the sync calls waiting on this dispatcher when another one recorded
//! their results.

use crate::fleet::Level;
use crate::metrics::QueueUser;
use crate::shard::Shard;
use crate::store::{DatabaseLocation, HostState, Outcome, PendingHostJob, QueueRef, StoreError};
use crate::Dispatcher;
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, host_tube, unix_now_ms, JobEnvelope};
use polaris_proto::client::{self, Client};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Host jobs the enqueuer puts before recording them `ready` in one transaction.
const ENQUEUE_BATCH: usize = 100;
/// The shortest time between two enqueuer steps, however often it is woken: what a new
/// job may wait, at most, for its envelopes to be put.
const MIN_STEP_INTERVAL: Duration = Duration::from_millis(25);
/// How often the enqueuer looks for pending and overdue host jobs when nobody wakes it.
const ENQUEUER_TICK: Duration = Duration::from_millis(500);
/// Extra TTR on top of the job's timeout; the agent also touches long jobs.
const TTR_MARGIN_SECS: u32 = 60;
/// Most results the consumer records in one transaction.
const RESULT_BATCH: usize = 256;
/// Priority a result that could not be recorded goes back to the reply tube with.
const RESULT_RETRY_PRIORITY: u32 = 1024;
/// Priority for burying a result that cannot be read.
const BURY_PRIORITY: u32 = 0;

/// How often the scheduler looks for due schedules.
const SCHEDULER_TICK: Duration = Duration::from_millis(500);

/// The lease of the enqueuer's work.
const ENQUEUER_LEASE: &str = "enqueuer";
/// The lease of the scheduler's work.
const SCHEDULER_LEASE: &str = "scheduler";

/// Whether this dispatcher holds one lease, renewed at every look.
struct Lease<'d> {
    name: &'static str,
    dispatcher: &'d Dispatcher,
    held: bool,
    failing: bool,
}

impl<'d> Lease<'d> {
    fn new(name: &'static str, dispatcher: &'d Dispatcher) -> Lease<'d> {
        Lease { name, dispatcher, held: false, failing: false }
    }

    /// Takes or renews the lease; answers whether this dispatcher holds it. A database
    /// that cannot say counts as "no": the work waits rather than risk being done twice.
    fn hold(&mut self) -> bool {
        let d = self.dispatcher;
        let ttl_ms = i64::try_from(d.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let held = match d.store.hold_lease(self.name, &d.instance_id, ttl_ms) {
            Ok(held) => {
                self.failing = false;
                held
            }
            Err(e) => {
                if !self.failing {
                    log::error!("cannot renew the {} lease: {e}", self.name);
                }
                self.failing = true;
                false
            }
        };
        if held != self.held {
            match held {
                true => log::info!("this dispatcher now does the {} work (lease taken)", self.name),
                false => log::info!("another dispatcher does the {} work (lease not held)", self.name),
            }
        }
        self.held = held;
        held
    }
}

/// Gives up this dispatcher's leases (it is stopping), so another takes over at once.
pub(crate) fn release_leases(dispatcher: &Dispatcher) {
    for name in [ENQUEUER_LEASE, SCHEDULER_LEASE] {
        if let Err(e) = dispatcher.store.release_lease(name, &dispatcher.instance_id) {
            log::warn!("cannot release the {name} lease (it runs out by itself): {e}");
        }
    }
}

/// Starts the threads.
pub(crate) fn spawn(
    dispatcher: &Arc<Dispatcher>,
    database: &DatabaseLocation,
    wake: mpsc::Receiver<()>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let enqueuer = {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        std::thread::Builder::new().name("enqueuer".into()).spawn(move || run_enqueuer(&dispatcher, &wake, &stop))?
    };
    let scheduler = {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        std::thread::Builder::new().name("scheduler".into()).spawn(move || run_scheduler(&dispatcher, &stop))?
    };
    let mut threads = vec![enqueuer, scheduler];
    for index in 0..dispatcher.queues.all().len() {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("results-{index}"))
                .spawn(move || run_results_consumer(&dispatcher, index, &stop))?,
        );
    }
    if let DatabaseLocation::Postgres(url) = database {
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        let url = url.clone();
        threads.push(std::thread::Builder::new().name("listener".into()).spawn(move || {
            crate::db::postgres::listen(&url, &stop, |job_id| {
                dispatcher.waiters.notify(job_id);
                // New pending host jobs, or finished ones a rollout may follow up on.
                dispatcher.wake_enqueuer();
            })
        })?);
    }
    Ok(threads)
}

fn run_scheduler(dispatcher: &Dispatcher, stop: &AtomicBool) {
    let mut failing = false;
    let mut lease = Lease::new(SCHEDULER_LEASE, dispatcher);
    while !stop.load(Ordering::SeqCst) {
        let tick =
            if lease.hold() { crate::fleet::schedule::tick(&dispatcher.store, unix_now_ms()) } else { Ok(vec![]) };
        match tick {
            Ok(runs) => {
                failing = false;
                for run in &runs {
                    log::info!(
                        "schedule {} at {}: {} ({} host(s), {} missed slot(s)){}",
                        run.name,
                        run.from,
                        run.outcome,
                        run.hosts,
                        run.missed,
                        run.job_id.as_deref().map(|id| format!(", job {id}")).unwrap_or_default()
                    );
                }
                if runs.iter().any(|r| r.job_id.is_some()) {
                    dispatcher.wake_enqueuer();
                }
            }
            Err(e) => {
                if !failing {
                    log::error!("scheduler: {e}");
                }
                failing = true;
            }
        }
        // Short sleeps, so a stop is noticed at once.
        let end = std::time::Instant::now() + SCHEDULER_TICK;
        while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn run_enqueuer(dispatcher: &Dispatcher, wake: &mpsc::Receiver<()>, stop: &AtomicBool) {
    let mut queue_was_down = false;
    // Per shard, the queue instance whose ids its `ready` rows were last checked against.
    let mut checked_instances: HashMap<String, String> = HashMap::new();
    // Which shards were dead when the work was last put where it belongs (`None`: not since
    // the lease was taken).
    let mut placement: Option<Vec<bool>> = None;
    let mut lease = Lease::new(ENQUEUER_LEASE, dispatcher);
    while !stop.load(Ordering::SeqCst) {
        let held_before = lease.held;
        if !lease.hold() {
            // Not woken early: the work is the lease holder's.
            std::thread::sleep(ENQUEUER_TICK);
            continue;
        }
        let step_started = std::time::Instant::now();
        if !held_before {
            // Whoever held the lease may have seen the queue change meanwhile.
            checked_instances.clear();
            placement = None;
        }
        let step = check_queue_instances(dispatcher, &mut checked_instances)
            .and_then(|()| move_misplaced_work(dispatcher, &mut placement))
            .and_then(|()| advance_rollouts(dispatcher))
            .and_then(|()| enqueue_pending(dispatcher, &mut lease))
            .and_then(|()| send_cancels(dispatcher))
            .and_then(|()| expire_overdue(dispatcher));
        match step {
            Ok(()) => {
                dispatcher.metrics.queue_state(QueueUser::Enqueuer, true, queue_was_down);
                if queue_was_down {
                    log::info!("queue reachable again");
                    queue_was_down = false;
                }
            }
            Err(StepError::Queue(e)) => {
                dispatcher.metrics.queue_state(QueueUser::Enqueuer, false, false);
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
        // Wake-ups can come as fast as rows change (on PostgreSQL every commit of every
        // dispatcher notifies), and a step reads every pending, ready and overdue row: at
        // most one step per MIN_STEP_INTERVAL, or a fan-out to N hosts costs N full steps.
        let since = step_started.elapsed();
        if since < MIN_STEP_INTERVAL {
            std::thread::sleep(MIN_STEP_INTERVAL - since);
        }
    }
}

/// Releases held-back hosts and settles finished attempts ([`crate::rollout`]), and wakes
/// the sync calls of the jobs that changed.
fn advance_rollouts(dispatcher: &Dispatcher) -> Result<(), StepError> {
    let (touched, _released) = crate::rollout::step(&dispatcher.store, unix_now_ms())?;
    for job_id in &touched {
        dispatcher.host_jobs_changed(job_id);
    }
    Ok(())
}

/// Priority of control messages: ahead of everything else on the control tube.
const CONTROL_PRIORITY: u32 = 0;
/// TTL of a control message on polarisd: an agent that was away that long restarted, and
/// its ledger already keeps what it ran.
const CONTROL_TTL_SECS: u32 = 3600;

/// Tells the agents running hosts of cancelled jobs (or cancelled hosts) to stop: a
/// signed [`wire::ControlMessage`] on `control.<host>`, which the agent watches on a
/// connection of its own while it runs a command. Sent once per attempt; the host stays
/// `reserved` until the agent's result (`0x0104`, with the output so far) arrives, or
/// expires like any host whose agent went silent.
fn send_cancels(dispatcher: &Dispatcher) -> Result<(), StepError> {
    for (job_id, host, attempt) in dispatcher.store.cancels_to_send()? {
        let message = wire::ControlMessage {
            v: 1,
            kind: wire::ControlKind::Cancel,
            job_id: job_id.clone(),
            host: host.clone(),
            attempt: (attempt > 1).then_some(attempt),
            issued_at: wire::unix_now(),
        };
        let payload = serde_json::to_vec(&message).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let body = wire::sign(&dispatcher.secret, &payload);
        let tube = wire::control_tube(&host);
        // Where the host's agent is (or is going): its control thread watches there.
        dispatcher.queues.for_host(&host).with_conn(|c, info| {
            c.use_tube(&tube)?;
            if info.extensions {
                c.put_with_ttl(CONTROL_PRIORITY, 0, RESULT_TTR_FOR_CONTROL, CONTROL_TTL_SECS, &body)
            } else {
                c.put(CONTROL_PRIORITY, 0, RESULT_TTR_FOR_CONTROL, &body)
            }
        })?;
        dispatcher.store.mark_cancel_sent(&job_id, &host, attempt)?;
        log::info!("job {job_id} host {host}: told the agent to cancel attempt {attempt}");
    }
    Ok(())
}

/// TTR of a control message: the agent handles one in milliseconds.
const RESULT_TTR_FOR_CONTROL: u32 = 60;

/// A worker step failed on the queue (retried later) or on the database.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error(transparent)]
    Queue(#[from] client::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Notices a queue restart and sorts out the `ready` host jobs it affects.
///
/// Queue job ids mean something only to the queue instance that issued them; an in-memory
/// queue that restarts issues the same ids again, to other jobs. So when a new instance
/// answers, every `ready` row queued on another instance is looked up by its id: if the
/// queue holds our very envelope there (a queue that kept its data), the row is adopted
/// by the new instance; if the id is free, or holds somebody else's job, the envelope was
/// lost with the old queue and the row becomes `pending` again, to be put anew (or
/// `expired` if its start deadline has passed). Nothing is ever deleted here.
///
/// Each shard is checked on its own; one that does not answer is left for the next tick
/// (its consumer notes the outage), so it never holds up the others.
fn check_queue_instances(dispatcher: &Dispatcher, checked: &mut HashMap<String, String>) -> Result<(), StepError> {
    for (index, shard) in dispatcher.queues.all().iter().enumerate() {
        match check_queue_instance(dispatcher, shard, index == 0, checked.get(&shard.name)) {
            Ok(Some(instance)) => {
                checked.insert(shard.name.clone(), instance);
            }
            Ok(None) => {}
            Err(StepError::Queue(e)) if dispatcher.queues.is_sharded() => {
                log::debug!("queue shard {} not checked: {e}", shard.name);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`check_queue_instances`] for one shard (`first`: the first, which also holds the rows
/// stored before shards); answers the instance its rows now agree with, if they all do.
fn check_queue_instance(
    dispatcher: &Dispatcher,
    shard: &Shard,
    first: bool,
    checked: Option<&String>,
) -> Result<Option<String>, StepError> {
    // A live command, so a connection to a queue that died is found out now.
    let instance = shard.with_conn(|c, info| {
        c.stats()?;
        Ok(info.instance.clone())
    })?;
    if checked == Some(&instance) {
        return Ok(None);
    }
    for row in dispatcher.store.ready_elsewhere(&shard.name, first, Some(&instance))? {
        let (job_id, host, queued) = (&row.job_id, &row.host, &row.queued);
        let found = shard.with_conn(|c, info| {
            if info.instance != instance {
                return Ok(None); // restarted once more: start over at the next tick
            }
            find(c, &dispatcher.secret, queued, job_id, host).map(Some)
        })?;
        match found {
            None => return Ok(None),
            Some(Found::Ours) => {
                dispatcher.store.adopt(job_id, host, queued.id, &instance)?;
            }
            // Rows of unknown instance (stored by an older version) whose id is free keep
            // the old reading: an agent may have taken them; the sweeper decides.
            Some(Found::Gone) if queued.instance.is_none() => {}
            Some(Found::Gone | Found::Stranger) => {
                log::warn!("job {job_id} host {host}: queue job {} was lost when the queue restarted", queued.id);
                if row.cancelled {
                    let outcome =
                        Outcome::failed(Code::Revoked, format!("Revoked; {}", LOST_BEFORE_TAKEN.to_lowercase()));
                    if dispatcher.store.finish_queued(job_id, host, queued.id, HostState::Revoked, &outcome)? {
                        dispatcher.host_jobs_changed(job_id);
                    }
                } else if row.start_by_ms > unix_now_ms() {
                    dispatcher.store.requeue(job_id, host, queued.id)?;
                } else {
                    let outcome = Outcome::failed(Code::HostNoAnswer, LOST_BEFORE_TAKEN);
                    if dispatcher.store.finish_queued(job_id, host, queued.id, HostState::Expired, &outcome)? {
                        dispatcher.host_jobs_changed(job_id);
                    }
                }
            }
        }
    }
    if checked.is_some() {
        log::info!("queue shard {} instance changed to {instance}; stored queue job ids checked", shard.name);
    }
    Ok(Some(instance))
}

/// Makes `rows` `pending` again (those still `ready` under the same queue job), noting
/// their jobs in `changed`.
fn requeue_all(
    dispatcher: &Dispatcher,
    rows: &[crate::store::QueuedHostJob],
    changed: &mut HashSet<String>,
) -> Result<(), StepError> {
    for row in rows {
        if dispatcher.store.requeue(&row.job_id, &row.host, row.queued.id)? {
            changed.insert(row.job_id.clone());
        }
    }
    Ok(())
}

/// Keeps the host jobs no agent has taken yet on their hosts' shards. It acts when the
/// set of dead shards differs from `placement`, the one it last acted on (and so when the
/// lease is taken): nothing new is put on a dead shard, so between changes there is
/// nothing to move.
///
/// - The `ready` host jobs of a shard unreachable past the grace period (while another is
///   up), and of shards no longer in `--queue`, become `pending` again, and the enqueuer
///   puts them on the shard each host now hashes to, where its agent follows (it is told at
///   its next heartbeat). An agent may have reserved such an envelope just before its shard
///   died: it then runs it once, the copy put on the new shard is refused by its ledger
///   (`0x0408`, not recorded as an answer), and the result it could not put on the dead
///   shard is put on the new one.
/// - Host jobs `ready` on a live shard that is no longer their host's (a shard came back, or
///   was added, and its hosts left the others) are moved too, but only after their
///   envelope is deleted from the shard that holds it: one an agent has taken stays.
fn move_misplaced_work(dispatcher: &Dispatcher, placement: &mut Option<Vec<bool>>) -> Result<(), StepError> {
    let queues = &dispatcher.queues;
    let dead: Vec<bool> = queues.all().iter().map(|s| queues.is_dead(s)).collect();
    if placement.as_ref() == Some(&dead) || dead.iter().all(|&d| d) {
        return Ok(()); // nothing changed, or nowhere to go: the work waits
    }
    let mut changed: HashSet<String> = HashSet::new();
    for name in dispatcher.store.ready_shards()? {
        if queues.named(Some(&name)).is_none() {
            let rows = dispatcher.store.ready_elsewhere(&name, false, None)?;
            log::warn!("queue shard {name} is not in --queue any more: {} host job(s) not yet taken move", rows.len());
            requeue_all(dispatcher, &rows, &mut changed)?;
        }
    }
    for (index, shard) in queues.all().iter().enumerate() {
        if dead[index] {
            let rows = dispatcher.store.ready_elsewhere(&shard.name, index == 0, None)?;
            requeue_all(dispatcher, &rows, &mut changed)?;
            if !rows.is_empty() {
                log::warn!(
                    "queue shard {} unreachable for {:.0}s: {} host job(s) not yet taken move to the other shards",
                    shard.name,
                    shard.down_for().unwrap_or_default().as_secs_f64(),
                    rows.len()
                );
            }
        } else if queues.is_sharded() {
            let mut moved = 0usize;
            for row in dispatcher.store.ready_elsewhere(&shard.name, index == 0, None)? {
                if queues.for_host(&row.host).name == shard.name {
                    continue;
                }
                if let TakeBack::Deleted { .. } = delete_if_ours(dispatcher, &row.queued, &row.job_id, &row.host)? {
                    if dispatcher.store.requeue(&row.job_id, &row.host, row.queued.id)? {
                        changed.insert(row.job_id.clone());
                        moved += 1;
                    }
                }
            }
            if moved > 0 {
                log::info!(
                    "{moved} host job(s) not yet taken move from queue shard {} to their hosts' shards",
                    shard.name
                );
            }
        }
    }
    *placement = Some(dead);
    for job_id in &changed {
        dispatcher.host_jobs_changed(job_id);
    }
    Ok(())
}

/// The message of a host job whose envelope the queue lost before any agent took it.
const LOST_BEFORE_TAKEN: &str = "The queue lost the job (it restarted) before the host's agent took it";

/// Puts every pending host job whose deadline is ahead on its host's tube, in batches:
/// each batch's envelopes are put one by one, then recorded `ready` in one transaction
/// (one sync to disk per batch, not per host). Before each put the enqueuer makes sure the
/// job was not cancelled meanwhile, so a cancel stops it after at most the put in flight.
/// The lease is renewed before every batch after the first, and the work stops if it was
/// lost (a batch that took longer than the lease lasts).
///
/// A put that fails leaves that shard's hosts `pending` for this pass and the others go
/// on; a batch in which nothing could be put ends the pass (the next tick tries again).
fn enqueue_pending(dispatcher: &Dispatcher, lease: &mut Lease<'_>) -> Result<(), StepError> {
    let mut first = true;
    // Shards a put failed on during this pass.
    let mut unreachable: HashSet<String> = HashSet::new();
    loop {
        if !std::mem::take(&mut first) && !lease.hold() {
            return Ok(());
        }
        let batch = dispatcher.store.pending(unix_now_ms(), ENQUEUE_BATCH)?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut cancellations = dispatcher.cancellations.load(Ordering::SeqCst);
        // Jobs of this batch known to be live or cancelled since `cancellations` was read.
        let mut live: HashSet<String> = HashSet::new();
        let mut cancelled: HashSet<String> = HashSet::new();
        let mut queued: Vec<(String, String, QueueRef)> = Vec::with_capacity(batch.len());
        let mut failure = None;
        for pending in &batch {
            let shard = dispatcher.queues.for_host(&pending.host);
            if unreachable.contains(&shard.name) {
                continue;
            }
            let job = &pending.job;
            let now = dispatcher.cancellations.load(Ordering::SeqCst);
            if now != cancellations {
                cancellations = now;
                live.clear();
            }
            if cancelled.contains(&job.id) {
                continue;
            }
            if !live.contains(&job.id) {
                if dispatcher.store.job_cancelled(&job.id)? {
                    log::info!("job {}: cancelled, its remaining envelopes are not put", job.id);
                    cancelled.insert(job.id.clone());
                    continue;
                }
                live.insert(job.id.clone());
            }
            match put_envelope(dispatcher, shard, pending) {
                Ok(Some(place)) => queued.push((job.id.clone(), pending.host.clone(), place)),
                Ok(None) => {}
                Err(StepError::Queue(e)) => {
                    // The other shards' hosts go on; this one's wait (moving after the grace).
                    unreachable.insert(shard.name.clone());
                    failure = Some(StepError::Queue(e));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // What was put is recorded even when a later put failed.
        let marked = dispatcher.store.mark_queued_batch(&queued)?;
        for ((job_id, host, place), marked) in queued.iter().zip(marked) {
            if marked {
                log::debug!("job {job_id} host {host}: queued as {}", place.id);
                continue;
            }
            // Revoked while we were putting it: take it back off the queue.
            log::info!("job {job_id} host {host}: revoked during enqueue, deleting queue job {}", place.id);
            if delete_if_ours(dispatcher, place, job_id, host)? == TakeBack::Taken {
                // Too late: an agent has it. Say so, so its result is recorded.
                log::warn!("job {job_id} host {host}: an agent took queue job {} before it was revoked", place.id);
                dispatcher.store.revoked_but_taken(job_id, host, place)?;
            }
        }
        let mut put_for: Vec<&str> = queued.iter().map(|(job_id, _, _)| job_id.as_str()).collect();
        put_for.dedup();
        for job_id in put_for {
            dispatcher.metrics.envelopes_put(&dispatcher.store, job_id)?;
        }
        if let Some(e) = failure {
            if queued.is_empty() || !matches!(e, StepError::Queue(_)) || batch.len() < ENQUEUE_BATCH {
                return Err(e);
            }
            continue;
        }
        if batch.len() < ENQUEUE_BATCH {
            return Ok(());
        }
    }
}

/// Puts one host job's envelope on its tube on `shard`; `None` if it was refused as too big
/// (and so recorded as failed).
fn put_envelope(
    dispatcher: &Dispatcher,
    shard: &Shard,
    pending: &PendingHostJob,
) -> Result<Option<QueueRef>, StepError> {
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
        expires_at: u64::try_from(pending.start_by_ms / 1000).unwrap_or(0),
        kill_grace_ms: Some(u64::try_from(dispatcher.kill_grace.as_millis()).unwrap_or(u64::MAX)),
        // Attempt 1 leaves the field out, so envelopes of jobs that never retry are as
        // they always were.
        attempt: (pending.attempt > 1).then_some(pending.attempt),
        memory_max: job.policy.memory_max,
        cpu_max_milli: job.policy.cpu_max_milli,
        args: job
            .args
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job args: {e}")))?,
    };
    let payload = serde_json::to_vec(&envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let body = wire::sign(&dispatcher.secret, &payload);
    let mac = wire::signature_of(&body).map(str::to_string);
    // Jobs stored before priorities were recorded were all host lists.
    let priority =
        job.priority.unwrap_or_else(|| crate::fleet::target::queue_priority(Level::Host, job.method.is_sync()));
    let kill_grace_secs = u32::try_from(dispatcher.kill_grace.as_millis().div_ceil(1000)).unwrap_or(u32::MAX);
    let ttr = job.timeout_secs.saturating_add(kill_grace_secs).saturating_add(TTR_MARGIN_SECS);
    let tube = host_tube(&pending.host);
    // On polarisd the job also carries a TTL up to its start deadline, so
    // the queue itself drops it if no agent takes it in time.
    let left_ms = (pending.start_by_ms - wire::unix_now_ms()).max(1000);
    let ttl = u32::try_from((left_ms + 999) / 1000).unwrap_or(u32::MAX);
    let put = shard.with_conn(|c, info| {
        c.use_tube(&tube)?;
        let id = if info.extensions {
            c.put_with_ttl(priority, 0, ttr, ttl, &body)
        } else {
            c.put(priority, 0, ttr, &body)
        }?;
        Ok(QueueRef { id, shard: Some(shard.name.clone()), instance: Some(info.instance.clone()), mac: mac.clone() })
    });
    match put {
        Ok(place) => Ok(Some(place)),
        Err(client::Error::JobTooBig) => {
            let outcome = Outcome::failed(
                Code::EnvelopeTooBig,
                format!("The signed job ({} bytes) is larger than the queue's max job size", body.len()),
            );
            finish(dispatcher, &job.id, &pending.host, HostState::Pending, HostState::Failed, &outcome)?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Marks host jobs past their deadline as expired; a ready one is first taken off the queue
/// so that no agent runs it after it was reported as not answered.
fn expire_overdue(dispatcher: &Dispatcher) -> Result<(), StepError> {
    // A taken job may run its timeout, then the kill grace, then its result travels.
    let grace_ms = i64::try_from((dispatcher.result_grace + dispatcher.kill_grace).as_millis()).unwrap_or(i64::MAX);
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
                take_back(dispatcher, job_id, host, overdue.queued.as_ref(), HostState::Expired, &outcome)?;
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

/// Why a job that an agent had taken came back unanswered: its connection dropped (the
/// agent died or was killed) or its TTR ran out. A restarted agent reports more (`0x0103`).
const ABANDONED: &str =
    "The host's agent took the job but did not finish it (it stopped or lost its queue connection); the job was taken off the queue so it does not run again";

/// What the queue holds under a stored queue job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Our envelope (ready, delayed, buried or reserved).
    Ours,
    /// Another job: the id was issued again by a restarted queue.
    Stranger,
    /// Nothing.
    Gone,
}

/// Looks up `queued` with `peek` and tells whether it is still the envelope we put: its
/// signature is the one we stored (or, for rows stored without one, it is a validly
/// signed envelope for this job and host).
pub(crate) fn find(
    c: &mut Client,
    secret: &wire::Secret,
    queued: &QueueRef,
    job_id: &str,
    host: &str,
) -> client::Result<Found> {
    let job = match c.peek(queued.id) {
        Ok(job) => job,
        Err(client::Error::NotFound) => return Ok(Found::Gone),
        Err(e) => return Err(e),
    };
    let ours = match &queued.mac {
        Some(mac) => wire::signature_of(&job.body) == Some(mac.as_str()),
        None => wire::open(secret, &job.body)
            .ok()
            .and_then(|payload| serde_json::from_slice::<JobEnvelope>(payload).ok())
            .is_some_and(|envelope| envelope.job_id == job_id && envelope.host == host),
    };
    Ok(if ours { Found::Ours } else { Found::Stranger })
}

/// What [`delete_if_ours`] found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TakeBack {
    /// Our envelope was on the queue and is deleted: no agent will run it. `taken_before`:
    /// an agent had reserved it and it came back (the agent's connection dropped, or its
    /// TTR ran out), so "the agent did not take it" would be false.
    Deleted {
        /// The queue counted at least one reserve of it.
        taken_before: bool,
    },
    /// An agent has it, or had it (and its result is on the way).
    Taken,
    /// polarisd dropped it when its TTL ran out: no agent ever had it.
    ExpiredInQueue,
    /// The queue that held it is gone (it restarted without its data): no agent will run it.
    Lost,
}

/// Deletes our envelope from the queue, but only with proof that the id still names it:
/// `peek` on the same connection as the `delete` must show our signature, and a free id
/// means "taken" only on the queue instance that issued it. Another job under the id (a
/// restarted queue issued it again) is never touched. A shard no longer in `--queue` is
/// as good as lost.
pub(crate) fn delete_if_ours(
    dispatcher: &Dispatcher,
    queued: &QueueRef,
    job_id: &str,
    host: &str,
) -> client::Result<TakeBack> {
    let Some(shard) = dispatcher.queues.named(queued.shard.as_deref()) else { return Ok(TakeBack::Lost) };
    shard.with_conn(|c, info| {
        // Unknown for rows stored by older versions: assume the same instance, as they did.
        let same_instance = queued.instance.as_deref().is_none_or(|i| i == info.instance);
        match find(c, &dispatcher.secret, queued, job_id, host)? {
            Found::Ours => {
                let taken_before =
                    c.stats_job(queued.id).ok().and_then(|s| s.get_u64("reserves")).is_some_and(|n| n > 0);
                match c.delete(queued.id) {
                    Ok(()) => Ok(TakeBack::Deleted { taken_before }),
                    // Reserved by an agent between our peek and delete.
                    Err(client::Error::NotFound) => Ok(TakeBack::Taken),
                    Err(e) => Err(e),
                }
            }
            Found::Stranger => Ok(TakeBack::Lost),
            Found::Gone if !same_instance => Ok(TakeBack::Lost),
            Found::Gone => {
                // Gone from the queue that issued the id: an agent took it, unless polarisd
                // says its TTL ran out first, in which case no agent will ever run it.
                if info.extensions && matches!(c.job_state(queued.id).as_deref(), Ok("expired")) {
                    Ok(TakeBack::ExpiredInQueue)
                } else {
                    Ok(TakeBack::Taken)
                }
            }
        }
    })
}

/// Takes a `ready` host job back off the queue and gives it the final state `to`. If an
/// agent has it (or has answered and the result is on its way), it becomes `reserved` and
/// waits for its result. Returns the state afterwards, or `None` if the row changed
/// meanwhile (queued again, answered) and nothing was written.
fn take_back(
    dispatcher: &Dispatcher,
    job_id: &str,
    host: &str,
    queued: Option<&QueueRef>,
    to: HostState,
    outcome: &Outcome,
) -> Result<Option<HostState>, StepError> {
    let Some(queued) = queued else {
        let done = dispatcher.store.finish(job_id, host, HostState::Ready, to, outcome)?;
        if done {
            dispatcher.host_jobs_changed(job_id);
        }
        return Ok(done.then_some(to));
    };
    let (state, outcome) = match delete_if_ours(dispatcher, queued, job_id, host)? {
        TakeBack::Deleted { taken_before: false } => (to, outcome.clone()),
        TakeBack::Deleted { taken_before: true } => (to, Outcome::failed(Code::HostNoAnswer, ABANDONED)),
        TakeBack::Lost => {
            log::warn!("job {job_id} host {host}: queue job {} was lost when the queue restarted", queued.id);
            let message = format!("{}; {}", outcome.message, LOST_BEFORE_TAKEN.to_lowercase());
            (to, Outcome { message, ..outcome.clone() })
        }
        TakeBack::ExpiredInQueue => (
            HostState::Expired,
            Outcome::failed(Code::HostNoAnswer, "The host's agent did not take the job before it expired in the queue"),
        ),
        TakeBack::Taken => {
            let moved = dispatcher.store.reserve_queued(job_id, host, queued.id)?;
            return Ok(moved.then_some(HostState::Reserved));
        }
    };
    let done = dispatcher.store.finish_queued(job_id, host, queued.id, state, &outcome)?;
    if done {
        log::info!("job {job_id} host {host}: {} ({})", state.as_str(), outcome.message);
        dispatcher.host_jobs_changed(job_id);
    }
    Ok(done.then_some(state))
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
        dispatcher.host_jobs_changed(job_id);
    }
    Ok(())
}

fn connect_reply_consumer(shard: &Shard, reply_tube: &str) -> client::Result<Client> {
    let mut conn = shard.pool.endpoint().connect(Duration::from_secs(2))?;
    conn.watch(reply_tube)?;
    conn.ignore("default")?;
    Ok(conn)
}

/// Consumes the reply tube of shard `index`; its connection attempts are also what tells
/// whether the shard is up ([`Shard::reachable`]), traffic or not.
fn run_results_consumer(dispatcher: &Dispatcher, index: usize, stop: &AtomicBool) {
    let shard = &dispatcher.queues.all()[index];
    let addr = &shard.name;
    let mut conn: Option<Client> = None;
    let mut queue_was_down = false;
    // A connection was lost since the last one was made (for the reconnect counter).
    let mut lost = false;
    while !stop.load(Ordering::SeqCst) {
        let client = match conn.as_mut() {
            Some(client) => client,
            None => match connect_reply_consumer(shard, &dispatcher.reply_tube) {
                Ok(client) => {
                    shard.reachable();
                    if queue_was_down {
                        log::info!("results consumer reconnected to {addr}");
                    }
                    dispatcher.metrics.queue_state(QueueUser::Results, true, queue_was_down || lost);
                    queue_was_down = false;
                    lost = false;
                    conn.insert(client)
                }
                Err(e) => {
                    shard.unreachable();
                    dispatcher.metrics.queue_state(QueueUser::Results, false, false);
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
            Ok(None) | Err(client::Error::DeadlineSoon) => shard.reachable(),
            Ok(Some(job)) => {
                shard.reachable();
                // Whatever else waits on the tube, up to a batch, is recorded with it in
                // one transaction: one sync to disk per batch, not per host.
                let mut jobs = vec![job];
                let mut drained = Ok(());
                while jobs.len() < RESULT_BATCH {
                    match client.reserve_with_timeout(0) {
                        Ok(Some(job)) => jobs.push(job),
                        Ok(None) | Err(client::Error::DeadlineSoon) => break,
                        Err(e) => {
                            drained = Err(e);
                            break;
                        }
                    }
                }
                // A connection lost while draining gives its reserved results back to the
                // tube by itself; they are read again after the reconnect.
                if let Err(e) = drained.and_then(|()| handle_results(dispatcher, client, jobs)) {
                    log::warn!("results consumer: {e}");
                    dispatcher.metrics.queue_state(QueueUser::Results, false, false);
                    lost = true;
                    conn = None;
                }
            }
            Err(e) => {
                if crate::shard::is_unreachable(&e) {
                    shard.unreachable();
                }
                log::warn!("results consumer lost the queue at {addr}: {e}");
                dispatcher.metrics.queue_state(QueueUser::Results, false, false);
                lost = true;
                conn = None;
            }
        }
    }
}

/// Records a batch of replies off the reply tube, then deletes them from the queue (record
/// first: a crash in between re-records the same results, which is harmless; the other order
/// could lose them). Host results are recorded together in one transaction; the other kinds
/// of reply one by one ([`handle_other`]).
fn handle_results(dispatcher: &Dispatcher, conn: &mut Client, jobs: Vec<client::Job>) -> client::Result<()> {
    let mut results: Vec<(u64, wire::HostResult)> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let reply = wire::open(&dispatcher.secret, &job.body)
            .map_err(|e| e.to_string())
            .and_then(|payload| wire::Reply::parse(payload).map_err(|e| format!("bad result JSON: {e}")));
        let other = match reply {
            Ok(wire::Reply::Result(result)) => {
                results.push((job.id, result));
                continue;
            }
            Ok(wire::Reply::Output(chunk)) => OtherReply::Output(chunk),
            Ok(wire::Reply::Integrity(report)) => OtherReply::Integrity(report),
            Ok(wire::Reply::Log(batch)) => OtherReply::Log(batch),
            Err(reason) => OtherReply::Unreadable(reason),
        };
        handle_other(dispatcher, conn, job.id, other)?;
    }
    if results.is_empty() {
        return Ok(());
    }
    let batch: Vec<&wire::HostResult> = results.iter().map(|(_, result)| result).collect();
    let outcomes = match dispatcher.store.record_results(&batch) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            // Kept on the queue; retried after a short delay.
            log::error!("cannot record {} result(s): {e}", results.len());
            for (id, _) in &results {
                conn.release(*id, RESULT_RETRY_PRIORITY, 1)?;
            }
            return Ok(());
        }
    };
    let mut changed: Vec<&str> = Vec::new();
    for ((_, result), outcome) in results.iter().zip(outcomes) {
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
                if !changed.contains(&result.job_id.as_str()) {
                    changed.push(&result.job_id);
                }
            }
            AlreadyFinal => log::debug!("job {} host {}: duplicate result ignored", result.job_id, result.host),
            Unknown => log::warn!("result for unknown job {} host {} dropped", result.job_id, result.host),
            Replayed => log::info!(
                "job {} host {}: the agent refused a copy of an envelope it already ran (its own result counts)",
                result.job_id,
                result.host
            ),
        }
    }
    for job_id in changed {
        dispatcher.host_jobs_changed(job_id);
    }
    for (id, _) in &results {
        conn.delete(*id)?;
    }
    Ok(())
}

/// A reply on the reply tube that is not a host result.
enum OtherReply {
    /// Live output of a running command.
    Output(wire::OutputChunk),
    /// A standing integrity task's report.
    Integrity(wire::IntegrityReport),
    /// Lines of a watched log file.
    Log(wire::LogBatch),
    /// Not signed, or not JSON of any known kind: why.
    Unreadable(String),
}

/// Records one [`OtherReply`] and deletes it, or buries it.
fn handle_other(dispatcher: &Dispatcher, conn: &mut Client, id: u64, reply: OtherReply) -> client::Result<()> {
    match reply {
        OtherReply::Output(chunk) => {
            // Liveness only (the result carries the whole output): a chunk that cannot be
            // recorded is dropped, never retried ahead of results.
            if let Err(e) = dispatcher.store.record_output(&chunk) {
                log::warn!("job {} host {}: output chunk dropped: {e}", chunk.job_id, chunk.host);
            }
            conn.delete(id)
        }
        OtherReply::Integrity(report) => {
            // Recorded first, then deleted: a crash in between records a copy, which the
            // store recognises and skips. A store failure leaves it on the queue (released
            // by TTR) to be tried again.
            match dispatcher.store.record_integrity_report(&report) {
                Ok(true) => log::info!(
                    "host {} integrity task {}: report {}: {}",
                    report.host,
                    report.task,
                    report.seq,
                    report.message
                ),
                Ok(false) => log::debug!("host {} integrity task {}: copy ignored", report.host, report.task),
                Err(e) => {
                    log::warn!("host {} integrity task {}: cannot record the report: {e}", report.host, report.task);
                    return Ok(());
                }
            }
            conn.delete(id)
        }
        OtherReply::Log(batch) => {
            match dispatcher.store.record_log_batch(&batch, dispatcher.log_retention) {
                Ok(added) => log::debug!("host {} log {}: {added} new line(s)", batch.host, batch.path),
                Err(crate::store::StoreError::Corrupt(e)) => {
                    log::warn!("burying log batch {id}: {e}");
                    return conn.bury(id, BURY_PRIORITY);
                }
                Err(e) => {
                    log::warn!("host {} log {}: cannot record lines: {e}", batch.host, batch.path);
                    return Ok(());
                }
            }
            conn.delete(id)
        }
        OtherReply::Unreadable(reason) => {
            log::warn!("burying unreadable result {id} on {}: {reason}", dispatcher.reply_tube);
            conn.bury(id, BURY_PRIORITY)
        }
    }
}
