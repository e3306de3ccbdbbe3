//! The rollout: which held-back hosts of a job start now, and what a finished attempt
//! leads to. It runs on the enqueuer thread before every round of puts, and works only
//! from the database, so a dispatcher restarted in the middle of a rollout goes on from
//! the batch it was in (the batch, the hosts released and the attempts are all rows).
//!
//! Two steps, each in one transaction:
//! - **settle**: a final answer of a job that retries is looked at once: its attempt is
//!   archived in `host_attempts`, and if the failure is of a kind the job retries and
//!   attempts are left (and neither the job nor the host was cancelled), the host goes
//!   back to `waiting` with the next attempt and the time it may start;
//! - **release**: `waiting` hosts become `pending` (the enqueuer then puts them) when the
//!   job's start time has come and: every host (no batches, no cap); the next batch once
//!   every host of the batches before has settled and the interval has passed; or, with a
//!   concurrency cap, as many as leave at most that many running. Retries are released at
//!   their time. Once more hosts failed than the threshold allows, no host that has not
//!   started does, ever: they end `skipped`.
//!
//! A released host gets its own start deadline (now plus `ttl`, or the timeout), so a
//! late batch has as long to start as the first.

use crate::db::{params, Connection};
use crate::policy::{Policy, RetryOn};
use crate::store::{Context as _, HostState, Outcome, Store, StoreError};
use polaris_ops_wire::codes::Code;

/// One host of a job, as the release step sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Where it stands.
    pub state: HostState,
    /// Its batch, in a batched job.
    pub batch: Option<u32>,
    /// When its retry may start, for a host waiting to retry.
    pub retry_at: Option<i64>,
    /// Whether its final answer counts as a failure (failed, expired, cancelled, or a
    /// non-zero exit status).
    pub failed: bool,
    /// Whether the settle step has looked at its final answer.
    pub settled: bool,
}

impl HostView {
    /// Never released yet (as opposed to waiting for a retry).
    fn fresh(&self) -> bool {
        self.state == HostState::Waiting && self.retry_at.is_none()
    }

    /// Done for good: final and settled.
    fn done(&self) -> bool {
        self.state.is_final() && self.settled
    }

    /// Counts against a concurrency cap: queued, running, retrying, or just answered.
    fn in_flight(&self) -> bool {
        matches!(self.state, HostState::Pending | HostState::Ready | HostState::Reserved)
            || (self.state == HostState::Waiting && self.retry_at.is_some())
            || (self.state.is_final() && !self.settled)
    }
}

/// A job, as the release step sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// Its policy.
    pub policy: Policy,
    /// No host starts before this.
    pub not_before_ms: Option<i64>,
    /// The batch running, once the first started.
    pub current_batch: Option<u32>,
    /// When the current batch was seen complete.
    pub batch_done_at_ms: Option<i64>,
    /// Why no further host starts, once the threshold was crossed.
    pub halted: Option<String>,
    /// Its hosts, in target order.
    pub hosts: Vec<HostView>,
}

/// What the release step does to one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Hosts (by index) that start now.
    pub release: Vec<usize>,
    /// Hosts that will never start (the threshold was crossed).
    pub skip: Vec<usize>,
    /// The batch now running, when it changes.
    pub current_batch: Option<u32>,
    /// The new "batch complete at" mark: `Some(Some(t))` to set, `Some(None)` to clear.
    pub batch_done_at_ms: Option<Option<i64>>,
    /// Why the job stops starting hosts, when it just crossed its threshold.
    pub halted: Option<String>,
}

/// Decides what starts now (see the module's documentation).
pub fn decide(job: &JobView, now_ms: i64) -> Decision {
    let mut out = Decision::default();
    if job.not_before_ms.is_some_and(|t| now_ms < t) {
        return out;
    }
    for (i, h) in job.hosts.iter().enumerate() {
        if h.state == HostState::Waiting && h.retry_at.is_some_and(|t| t <= now_ms) {
            out.release.push(i);
        }
    }
    let fresh = |i: &usize| job.hosts[*i].fresh();
    let all: Vec<usize> = (0..job.hosts.len()).collect();
    if job.halted.is_none() {
        let failed = job.hosts.iter().filter(|h| h.done() && h.failed).count();
        if let Some(threshold) = job.policy.threshold.filter(|t| t.crossed(failed, job.hosts.len())) {
            let rule = match threshold {
                crate::policy::Threshold::MaxFailures(n) => format!("max_failures {n}"),
                crate::policy::Threshold::MaxFailurePercent(p) => format!("max_failure_percent {p}"),
            };
            out.halted = Some(format!("{failed} of {} hosts failed, past the job's {rule}", job.hosts.len()));
        }
    }
    if job.halted.is_some() || out.halted.is_some() {
        out.skip = all.iter().copied().filter(fresh).collect();
        return out;
    }
    if let Some(batch) = &job.policy.batch {
        let next = |after: Option<u32>| {
            job.hosts
                .iter()
                .filter(|h| h.fresh())
                .filter_map(|h| h.batch)
                .filter(|b| after.is_none_or(|a| *b > a))
                .min()
        };
        let start = match job.current_batch {
            None => next(None),
            Some(current) => {
                let complete = job.hosts.iter().filter(|h| h.batch.is_some_and(|b| b <= current)).all(HostView::done);
                match next(Some(current)) {
                    Some(following) if complete => {
                        let done_at = job.batch_done_at_ms.unwrap_or(now_ms);
                        if job.batch_done_at_ms.is_none() {
                            out.batch_done_at_ms = Some(Some(now_ms));
                        }
                        let interval_ms = i64::from(batch.interval_secs) * 1000;
                        (now_ms >= done_at + interval_ms).then_some(following)
                    }
                    _ => None,
                }
            }
        };
        if let Some(b) = start {
            out.current_batch = Some(b);
            out.batch_done_at_ms = Some(None);
            out.release.extend(all.iter().copied().filter(fresh).filter(|i| job.hosts[*i].batch == Some(b)));
        }
    } else if let Some(cap) = job.policy.concurrency {
        let running = job.hosts.iter().filter(|h| h.in_flight()).count() + out.release.len();
        let room = (cap as usize).saturating_sub(running);
        out.release.extend(all.iter().copied().filter(fresh).take(room));
    } else {
        out.release.extend(all.iter().copied().filter(fresh));
    }
    out
}

/// Which kind of failure a final answer is, for `retry.on`.
fn failure_kind(state: HostState, retcode: Option<u32>) -> Option<RetryOn> {
    let code = |c: Code| retcode == Some(u32::from(c.value()));
    match state {
        HostState::Success if retcode.is_some_and(|r| r != 0) => Some(RetryOn::Nonzero),
        HostState::Failed if code(Code::ExecTimeout) => Some(RetryOn::Timeout),
        HostState::Expired | HostState::Failed if code(Code::HostNoAnswer) || code(Code::QueueUnavailable) => {
            Some(RetryOn::NoAnswer)
        }
        _ => None,
    }
}

/// Whether a final answer counts against a failure threshold.
fn is_failure(state: HostState, retcode: Option<u32>) -> bool {
    match state {
        HostState::Success => retcode.is_some_and(|r| r != 0),
        HostState::Failed | HostState::Expired | HostState::Cancelled => true,
        _ => false,
    }
}

/// Runs both steps once; answers the jobs whose hosts changed (to wake their waiters) and
/// whether any host was released (to put it at once).
pub fn step(store: &Store, now_ms: i64) -> Result<(Vec<String>, bool), StoreError> {
    let mut conn = store.conn();
    let mut touched = settle(&mut conn, now_ms)?;
    let (released_jobs, released) = release(&mut conn, now_ms)?;
    touched.extend(released_jobs);
    touched.sort();
    touched.dedup();
    Ok((touched, released))
}

struct Unsettled {
    job_id: String,
    host: String,
    state: HostState,
    attempt: u32,
    resp: Option<String>,
    retcode: Option<u32>,
    message: Option<String>,
    queued_at: Option<i64>,
    finished_at: Option<i64>,
    cancelled: bool,
    policy: Option<String>,
}

fn settle(conn: &mut Connection, now_ms: i64) -> Result<Vec<String>, StoreError> {
    let rows: Vec<Unsettled> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT h.job_id, h.host, h.state, h.attempt, h.resp, h.retcode, h.message, h.queued_at, h.finished_at,
                        h.cancelled_at IS NOT NULL OR j.cancelled_at IS NOT NULL, j.policy
                 FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE h.settled = 0 AND h.state IN ('success', 'failed', 'revoked', 'expired', 'skipped', 'cancelled')
                 ORDER BY j.seq, h.position LIMIT 500",
            )
            .ctx("list unsettled host jobs")?;
        let rows = stmt
            .query_map((), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<u32>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, bool>(9)?,
                    r.get::<_, Option<String>>(10)?,
                ))
            })
            .ctx("list unsettled host jobs")?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, host, state, attempt, resp, retcode, message, queued_at, finished_at, cancelled, policy) =
                row.ctx("list unsettled host jobs")?;
            out.push(Unsettled {
                job_id,
                host,
                state: HostState::parse(&state)?,
                attempt,
                resp,
                retcode,
                message,
                queued_at,
                finished_at,
                cancelled,
                policy,
            });
        }
        out
    };
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let tx = conn.transaction().ctx("begin settle")?;
    let mut touched = Vec::new();
    for row in &rows {
        tx.prepare_cached(
            "INSERT INTO host_attempts (job_id, host, attempt, queued_at, finished_at, state, resp, retcode, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (job_id, host, attempt) DO UPDATE SET queued_at = excluded.queued_at,
                 finished_at = excluded.finished_at, state = excluded.state, resp = excluded.resp,
                 retcode = excluded.retcode, message = excluded.message",
        )
        .and_then(|mut s| {
            s.execute(params![
                row.job_id,
                row.host,
                row.attempt,
                row.queued_at,
                row.finished_at.unwrap_or(now_ms),
                row.state.as_str(),
                row.resp,
                row.retcode,
                row.message
            ])
        })
        .ctx("archive attempt")?;
        let policy: Policy = match row.policy.as_deref().map(serde_json::from_str).transpose() {
            Ok(policy) => policy.unwrap_or_default(),
            Err(e) => return Err(StoreError::Corrupt(format!("job {} policy: {e}", row.job_id))),
        };
        let retry = policy.retry.as_ref().filter(|retry| {
            !row.cancelled
                && row.attempt <= retry.max
                && failure_kind(row.state, row.retcode).is_some_and(|k| retry.on.contains(&k))
        });
        match retry {
            Some(retry) => {
                let at = now_ms + i64::from(retry.delay_secs) * 1000;
                tx.prepare_cached(
                    "UPDATE host_job SET state = 'waiting', attempt = attempt + 1, retry_at = ?4, resp = NULL,
                            retcode = NULL, message = NULL, data = NULL, truncated = 0, encoding = NULL,
                            output_bytes = NULL, queue_job_id = NULL, queue_instance = NULL, envelope_mac = NULL,
                            queue_shard = NULL, finished_at = NULL, queued_at = NULL, start_by = NULL, updated_at = ?5
                     WHERE job_id = ?1 AND host = ?2 AND attempt = ?3 AND settled = 0",
                )
                .and_then(|mut s| s.execute(params![row.job_id, row.host, row.attempt, at, now_ms]))
                .ctx("schedule a retry")?;
                log::info!(
                    "job {} host {}: attempt {} {} ({}); attempt {} in {}s",
                    row.job_id,
                    row.host,
                    row.attempt,
                    row.state.as_str(),
                    row.message.as_deref().unwrap_or(""),
                    row.attempt + 1,
                    retry.delay_secs
                );
            }
            None => {
                tx.prepare_cached("UPDATE host_job SET settled = 1 WHERE job_id = ?1 AND host = ?2 AND attempt = ?3")
                    .and_then(|mut s| s.execute(params![row.job_id, row.host, row.attempt]))
                    .ctx("settle a host job")?;
            }
        }
        touched.push(row.job_id.clone());
    }
    tx.commit().ctx("commit settle")?;
    Ok(touched)
}

fn release(conn: &mut Connection, now_ms: i64) -> Result<(Vec<String>, bool), StoreError> {
    let jobs: Vec<String> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT DISTINCT h.job_id FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE h.state = 'waiting' AND j.cancelled_at IS NULL",
            )
            .ctx("list waiting jobs")?;
        let rows = stmt.query_map((), |r| r.get::<_, String>(0)).ctx("list waiting jobs")?;
        rows.collect::<crate::db::Result<_>>().ctx("list waiting jobs")?
    };
    let mut touched = Vec::new();
    let mut released_any = false;
    for job_id in jobs {
        let tx = conn.transaction().ctx("begin release")?;
        let Some((view, hosts, timeout_secs)) = job_view(&tx, &job_id)? else { continue };
        let decision = decide(&view, now_ms);
        if decision == Decision::default() {
            continue;
        }
        let window_ms = i64::from(view.policy.ttl_secs.unwrap_or(timeout_secs)) * 1000;
        for &i in &decision.release {
            tx.prepare_cached(
                "UPDATE host_job SET state = 'pending', start_by = ?3, retry_at = NULL, updated_at = ?4
                 WHERE job_id = ?1 AND host = ?2 AND state = 'waiting'",
            )
            .and_then(|mut s| s.execute(params![job_id, hosts[i], now_ms + window_ms, now_ms]))
            .ctx("release a host job")?;
        }
        if let Some(reason) = decision.halted.as_ref().or(view.halted.as_ref()) {
            let skipped = Outcome::failed(Code::Skipped, format!("Not started: {reason}"));
            for &i in &decision.skip {
                tx.prepare_cached(
                    "UPDATE host_job SET state = 'skipped', resp = ?3, retcode = ?4, message = ?5, data = '',
                            updated_at = ?6, finished_at = ?6, settled = 1
                     WHERE job_id = ?1 AND host = ?2 AND state = 'waiting'",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        job_id,
                        hosts[i],
                        skipped.resp.as_str(),
                        skipped.retcode,
                        skipped.message,
                        now_ms
                    ])
                })
                .ctx("skip a host job")?;
            }
        }
        if let Some(reason) = &decision.halted {
            log::warn!("job {job_id}: {reason}; {} host(s) will not start", decision.skip.len());
            tx.prepare_cached("UPDATE jobs SET halted = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![job_id, reason]))
                .ctx("halt a job")?;
        }
        if let Some(batch) = decision.current_batch {
            log::info!("job {job_id}: batch {} starts ({} host(s))", batch + 1, decision.release.len());
            tx.prepare_cached("UPDATE jobs SET current_batch = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![job_id, batch]))
                .ctx("start a batch")?;
        }
        if let Some(done_at) = decision.batch_done_at_ms {
            tx.prepare_cached("UPDATE jobs SET batch_done_at = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![job_id, done_at]))
                .ctx("mark a batch complete")?;
        }
        tx.commit().ctx("commit release")?;
        released_any |= !decision.release.is_empty();
        touched.push(job_id);
    }
    Ok((touched, released_any))
}

/// The job `job_id` as [`decide`] sees it, its host ids in the same order, and its timeout.
fn job_view(conn: &Connection, job_id: &str) -> Result<Option<(JobView, Vec<String>, u32)>, StoreError> {
    let head = conn
        .prepare_cached(
            "SELECT policy, not_before, current_batch, batch_done_at, halted, timeout_secs FROM jobs WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([job_id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<u32>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, u32>(5)?,
                ))
            })
        });
    let (policy, not_before_ms, current_batch, batch_done_at_ms, halted, timeout_secs) = match head {
        Ok(head) => head,
        Err(crate::db::DbError::NoRows) => return Ok(None),
        Err(e) => return Err(e).ctx("read job for release"),
    };
    let policy: Policy = policy
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("job {job_id} policy: {e}")))?
        .unwrap_or_default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT host, state, batch, retry_at, retcode, settled FROM host_job WHERE job_id = ?1 ORDER BY position",
        )
        .ctx("read hosts for release")?;
    let rows = stmt
        .query_map([job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<u32>>(4)?,
                r.get::<_, bool>(5)?,
            ))
        })
        .ctx("read hosts for release")?;
    let mut ids = Vec::new();
    let mut hosts = Vec::new();
    for row in rows {
        let (host, state, batch, retry_at, retcode, settled) = row.ctx("read hosts for release")?;
        let state = HostState::parse(&state)?;
        ids.push(host);
        hosts.push(HostView { state, batch, retry_at, failed: is_failure(state, retcode), settled });
    }
    Ok(Some((JobView { policy, not_before_ms, current_batch, batch_done_at_ms, halted, hosts }, ids, timeout_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Batch, Threshold};

    fn host(state: HostState, batch: Option<u32>) -> HostView {
        HostView { state, batch, retry_at: None, failed: false, settled: true }
    }

    fn batched(size: u32, interval_secs: u32, threshold: Option<Threshold>, states: &[HostState]) -> JobView {
        JobView {
            policy: Policy {
                batch: Some(Batch { size: Some(size), percent: None, interval_secs }),
                threshold,
                ..Policy::default()
            },
            not_before_ms: None,
            current_batch: None,
            batch_done_at_ms: None,
            halted: None,
            hosts: states.iter().enumerate().map(|(i, s)| host(*s, Some(i as u32 / size))).collect(),
        }
    }

    use HostState::*;

    #[test]
    fn batches_start_in_order_and_never_overlap() {
        let mut job = batched(2, 0, None, &[Waiting, Waiting, Waiting, Waiting, Waiting]);
        let first = decide(&job, 0);
        assert_eq!((first.release.clone(), first.current_batch), (vec![0, 1], Some(0)));
        job.current_batch = Some(0);
        job.hosts[0].state = Success;
        job.hosts[1].state = Reserved;
        assert_eq!(decide(&job, 1).release, Vec::<usize>::new(), "batch 1 still runs");
        job.hosts[1].state = Success;
        let second = decide(&job, 2);
        assert_eq!((second.release, second.current_batch), (vec![2, 3], Some(1)));
    }

    #[test]
    fn the_interval_separates_batches() {
        let mut job = batched(1, 10, None, &[Success, Waiting]);
        job.current_batch = Some(0);
        let seen = decide(&job, 1_000);
        assert_eq!((seen.release.len(), seen.batch_done_at_ms), (0, Some(Some(1_000))));
        job.batch_done_at_ms = Some(1_000);
        assert!(decide(&job, 10_999).release.is_empty());
        assert_eq!(decide(&job, 11_000).release, vec![1]);
    }

    #[test]
    fn a_crossed_threshold_skips_every_host_not_started() {
        let mut job = batched(2, 0, Some(Threshold::MaxFailures(0)), &[Failed, Success, Waiting, Waiting]);
        job.current_batch = Some(0);
        job.hosts[0].failed = true;
        let got = decide(&job, 5);
        assert_eq!(got.skip, vec![2, 3]);
        assert!(got.release.is_empty());
        assert!(got.halted.as_deref().is_some_and(|r| r.contains("1 of 4 hosts failed")), "{got:?}");
    }

    #[test]
    fn a_concurrency_cap_counts_what_runs() {
        let job = JobView {
            policy: Policy { concurrency: Some(2), ..Policy::default() },
            not_before_ms: None,
            current_batch: None,
            batch_done_at_ms: None,
            halted: None,
            hosts: vec![host(Reserved, None), host(Success, None), host(Waiting, None), host(Waiting, None)],
        };
        assert_eq!(decide(&job, 0).release, vec![2]);
    }

    #[test]
    fn nothing_starts_before_the_start_time_and_retries_wait_their_turn() {
        let mut job = JobView {
            policy: Policy { start_at_ms: Some(100), ..Policy::default() },
            not_before_ms: Some(100),
            current_batch: None,
            batch_done_at_ms: None,
            halted: None,
            hosts: vec![host(Waiting, None), HostView { retry_at: Some(200), ..host(Waiting, None) }],
        };
        assert!(decide(&job, 99).release.is_empty());
        assert_eq!(decide(&job, 100).release, vec![0]);
        job.hosts[0].state = Success;
        assert_eq!(decide(&job, 200).release, vec![1]);
    }

    #[test]
    fn failures_are_classified_for_retry_on() {
        let code = |c: Code| Some(u32::from(c.value()));
        assert_eq!(failure_kind(Success, Some(3)), Some(RetryOn::Nonzero));
        assert_eq!(failure_kind(Success, Some(0)), None);
        assert_eq!(failure_kind(Failed, code(Code::ExecTimeout)), Some(RetryOn::Timeout));
        assert_eq!(failure_kind(Expired, code(Code::HostNoAnswer)), Some(RetryOn::NoAnswer));
        assert_eq!(failure_kind(Failed, code(Code::BadSignature)), None);
        assert_eq!(failure_kind(Cancelled, code(Code::Cancelled)), None);
        assert!(is_failure(Cancelled, code(Code::Cancelled)));
        assert!(!is_failure(Revoked, code(Code::Revoked)));
    }
}
