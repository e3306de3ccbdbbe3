//! The scheduler: due `schedule` tasks become ordinary jobs.
//!
//! Each `schedule` definition (a name at one attach point) keeps its next due slot in
//! `fleet_tasks.next_due_at`. A slot is a point on the task's cadence: for `every: N` the
//! multiples of N seconds since the Unix epoch (so every dispatcher, before and after a
//! restart, agrees on them), for `cron` the expression's matches, in UTC. When a slot is
//! due, one transaction creates one job for every host whose effective task of that name
//! is this very definition (hosts that override it, or sit in a sibling conflict, do not
//! run it), records the firing in `fleet_task_runs`, and moves `next_due_at` to the first
//! slot after now — with a compare-and-set on the old value, so a slot fires once even if
//! two dispatchers look at it.
//!
//! Missed slots (the dispatcher was down, or too busy) never come as a burst: at most one
//! job is fired per look, whatever number of slots passed. The task's `missed` policy
//! says what happens when the latest passed slot is older than [`grace`]: `run_once` (the
//! default) fires one job now, `skip` fires nothing and waits for the next slot. Either
//! way the firing's row says how many slots were missed.

use super::tasks::{self, AttachPoint, Task};
use super::{tree, Level};
use crate::db::{params, Connection, OptionalExtension};
use crate::store::{self, Context as _, NewJob, StoreError, TaskOrigin};
use polaris_ops_wire::wire::{unix_now_ms, Method};
use serde::Serialize;
use serde_json::Value;

/// Timeout of a scheduled command when its task gives none, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u32 = 60;
/// Most slots counted when reporting how many were missed (a cron expression matching
/// every second over a week-long outage would otherwise take a long walk).
pub const MAX_COUNTED_SLOTS: u64 = 100_000;
/// The longest a slot may be late and still count as on time.
pub const MAX_GRACE_MS: i64 = 60_000;
/// The shortest such grace: the scheduler looks every half second, and a busy moment
/// must not make a one-second schedule skip.
pub const MIN_GRACE_MS: i64 = 5_000;

/// What to do when slots passed while nobody fired them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedPolicy {
    /// Fire one job now for all of them (the default).
    RunOnce,
    /// Fire nothing; the next slot runs as usual.
    Skip,
}

impl MissedPolicy {
    /// `run_once` or `skip`.
    pub fn parse(name: &str) -> Option<MissedPolicy> {
        match name {
            "run_once" => Some(MissedPolicy::RunOnce),
            "skip" => Some(MissedPolicy::Skip),
            _ => None,
        }
    }
}

/// When a schedule's slots are.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// Every N seconds, at multiples of N since the epoch.
    Every(u64),
    /// The matches of a cron expression, in UTC.
    Cron(Box<croner::Cron>),
}

impl Cadence {
    /// The cadence of a stored schedule spec.
    pub fn of(spec: &serde_json::Map<String, Value>) -> Result<Cadence, String> {
        if let Some(every) = spec.get("every").and_then(Value::as_u64) {
            if every == 0 {
                return Err("every is 0".into());
            }
            return Ok(Cadence::Every(every));
        }
        if let Some(expr) = spec.get("cron").and_then(Value::as_str) {
            let cron = croner::Cron::new(expr).with_seconds_optional().parse().map_err(|e| format!("{e}"))?;
            return Ok(Cadence::Cron(Box::new(cron)));
        }
        Err("neither every nor cron".into())
    }

    /// The first slot strictly after `after_ms`, in Unix milliseconds (`None`: never).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Cadence::Every(secs) => {
                let period = i64::try_from(secs.checked_mul(1000)?).ok()?;
                after_ms.div_euclid(period).checked_add(1)?.checked_mul(period)
            }
            Cadence::Cron(cron) => {
                // Cron works in whole seconds: the first second after `after_ms`.
                let secs = after_ms.div_euclid(1000);
                let start = chrono::DateTime::from_timestamp(secs, 0)?;
                let next = cron.find_next_occurrence(&start, false).ok()?;
                next.timestamp().checked_mul(1000)
            }
        }
    }
}

/// How late a slot may be and still count as on time: one period (the gap from the slot
/// to the next), within [`MIN_GRACE_MS`] and [`MAX_GRACE_MS`].
pub fn grace(cadence: &Cadence, slot_ms: i64) -> i64 {
    let period = cadence.next_after(slot_ms).map_or(MAX_GRACE_MS, |next| next - slot_ms);
    period.clamp(MIN_GRACE_MS, MAX_GRACE_MS)
}

/// What the scheduler does about a slot that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The latest slot at or before now: the one a fired job is for.
    pub slot_ms: i64,
    /// Whether to fire a job.
    pub fire: bool,
    /// Slots that passed before `slot_ms` without a job (at most [`MAX_COUNTED_SLOTS`]).
    pub missed: u64,
    /// The next slot after now (`None`: the cadence has no more).
    pub next_due_ms: Option<i64>,
}

/// Plans the firing of a schedule whose next slot `due_ms` is at or before `now_ms`.
pub fn plan(cadence: &Cadence, due_ms: i64, now_ms: i64, policy: MissedPolicy) -> Plan {
    debug_assert!(due_ms <= now_ms);
    // Walk from the due slot to the latest one at or before now.
    let (slot_ms, passed) = match cadence {
        Cadence::Every(secs) => {
            let period = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX).max(1);
            let latest = due_ms + (now_ms - due_ms) / period * period;
            (latest, u64::try_from((latest - due_ms) / period).unwrap_or(u64::MAX))
        }
        Cadence::Cron(_) => {
            let mut slot = due_ms;
            let mut passed = 0u64;
            while passed < MAX_COUNTED_SLOTS {
                match cadence.next_after(slot) {
                    Some(next) if next <= now_ms => {
                        slot = next;
                        passed += 1;
                    }
                    _ => break,
                }
            }
            (slot, passed)
        }
    };
    let on_time = now_ms - slot_ms <= grace(cadence, slot_ms);
    Plan {
        slot_ms,
        fire: on_time || policy == MissedPolicy::RunOnce,
        missed: passed.min(MAX_COUNTED_SLOTS),
        next_due_ms: cadence.next_after(now_ms),
    }
}

/// One firing of a schedule, as `GET /v1/tasks/{name}/runs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// The task's name.
    pub name: String,
    /// The definition that fired: its node path, or `host:ID`.
    pub from: String,
    /// The slot it fired for, Unix milliseconds.
    pub due_at_ms: i64,
    /// When it fired.
    pub fired_at_ms: i64,
    /// The job it became; `None` when no host inherits it or the slot was skipped.
    pub job_id: Option<String>,
    /// Hosts the job runs on.
    pub hosts: u64,
    /// Slots before this one that passed without a job.
    pub missed: u64,
    /// `fired`, `no_hosts` or `skipped`.
    pub outcome: String,
}

/// What a definition is recorded as in runs and jobs: the node path, or `host:ID` (the
/// host's own definitions; a job's `task.from` says `host`, as effective tasks do).
fn origin_of(at: &AttachPoint) -> String {
    match at {
        AttachPoint::Node(path) => path.clone(),
        AttachPoint::Host(host) => format!("host:{host}"),
    }
}

/// A `schedule` definition with its stored next slot.
#[derive(Debug, Clone)]
struct Scheduled {
    task: Task,
    node_id: Option<i64>,
    next_due_at: Option<i64>,
}

/// A `fleet_tasks` row of a schedule: name, node id, host, next due time.
type ScheduleRow = (String, Option<i64>, Option<String>, Option<i64>);

fn scheduled(conn: &Connection) -> Result<Vec<Scheduled>, StoreError> {
    let ids: Vec<ScheduleRow> = {
        let mut stmt = conn
            .prepare_cached("SELECT name, node_id, host, next_due_at FROM fleet_tasks WHERE kind = 'schedule'")
            .ctx("list schedules")?;
        let rows = stmt.query_map((), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).ctx("list schedules")?;
        rows.collect::<crate::db::Result<_>>().ctx("list schedules")?
    };
    let all = tasks::list(conn)?;
    let nodes: std::collections::HashMap<i64, String> =
        tree::nodes(conn)?.into_iter().map(|n| (n.id, n.path)).collect();
    let mut out = Vec::new();
    for (name, node_id, host, next_due_at) in ids {
        let at = match (node_id.and_then(|id| nodes.get(&id)), host) {
            (Some(path), _) => AttachPoint::Node(path.clone()),
            (None, Some(host)) => AttachPoint::Host(host),
            (None, None) => continue,
        };
        if let Some(task) = all.iter().find(|t| t.name == name && t.attach_to == at) {
            out.push(Scheduled { task: task.clone(), node_id, next_due_at });
        }
    }
    Ok(out)
}

/// The hosts whose effective task `name` is the definition at `at`, sorted.
pub fn inheriting_hosts(conn: &Connection, name: &str, at: &AttachPoint) -> Result<Vec<String>, StoreError> {
    let candidates: Vec<String> = match at {
        AttachPoint::Node(path) => tree::hosts_at_or_below(conn, path)?.into_iter().collect(),
        AttachPoint::Host(host) => vec![host.clone()],
    };
    let want_from = match at {
        AttachPoint::Node(path) => path.as_str(),
        AttachPoint::Host(_) => "host",
    };
    // The tree and the tasks once, not once per candidate host.
    let index = tasks::TaskIndex::load(conn)?;
    let mut out = Vec::new();
    for host in candidates {
        let effective = tasks::resolve(index.inherited(conn, &host)?);
        if effective.tasks.iter().any(|t| t.name == name && t.from == want_from) {
            out.push(host);
        }
    }
    Ok(out)
}

/// Moves `next_due_at` from `expected` to `next` if nobody moved it meanwhile.
fn compare_and_set_due(
    conn: &Connection,
    s: &Scheduled,
    expected: Option<i64>,
    next: Option<i64>,
) -> Result<bool, StoreError> {
    let host = match &s.task.attach_to {
        AttachPoint::Host(h) => Some(h.as_str()),
        AttachPoint::Node(_) => None,
    };
    let changed = conn
        .prepare_cached(
            "UPDATE fleet_tasks SET next_due_at = ?4
             WHERE name = ?1 AND node_id IS NOT DISTINCT FROM ?2 AND host IS NOT DISTINCT FROM ?3
               AND next_due_at IS NOT DISTINCT FROM ?5 AND updated_at = ?6",
        )
        .and_then(|mut st| st.execute(params![s.task.name, s.node_id, host, next, expected, s.task.updated_at_ms]))
        .ctx("move a schedule's next slot")?;
    Ok(changed == 1)
}

/// Looks at every schedule once: plans the ones never planned, fires the due ones.
/// Returns the runs recorded, in no particular order.
pub fn tick(store: &store::Store, now_ms: i64) -> Result<Vec<Run>, StoreError> {
    let mut fired = Vec::new();
    let mut conn = store.conn();
    for s in scheduled(&conn)? {
        let cadence = match Cadence::of(&s.task.spec) {
            Ok(cadence) => cadence,
            Err(why) => {
                log::error!("schedule {} at {}: unreadable cadence: {why}", s.task.name, origin_of(&s.task.attach_to));
                continue;
            }
        };
        let Some(due) = s.next_due_at else {
            // New or changed: its first slot is the next one after now.
            compare_and_set_due(&conn, &s, None, cadence.next_after(now_ms))?;
            continue;
        };
        if due > now_ms {
            continue;
        }
        let policy = s.task.spec.get("missed").and_then(Value::as_str).and_then(MissedPolicy::parse);
        let plan = plan(&cadence, due, now_ms, policy.unwrap_or(MissedPolicy::RunOnce));
        let tx = conn.transaction().ctx("begin fire schedule")?;
        if !compare_and_set_due(&tx, &s, Some(due), plan.next_due_ms)? {
            continue; // changed or fired meanwhile; the transaction rolls back
        }
        let run = fire(&tx, &s.task, &plan, now_ms)?;
        tx.commit().ctx("commit fire schedule")?;
        fired.push(run);
    }
    Ok(fired)
}

/// Creates the job of one firing (when it fires and hosts inherit it) and its run row.
fn fire(tx: &Connection, task: &Task, plan: &Plan, now_ms: i64) -> Result<Run, StoreError> {
    let origin = origin_of(&task.attach_to);
    let hosts = if plan.fire { inheriting_hosts(tx, &task.name, &task.attach_to)? } else { Vec::new() };
    let (outcome, job_id) = match (plan.fire, hosts.is_empty()) {
        (false, _) => ("skipped", None),
        (true, true) => ("no_hosts", None),
        (true, false) => ("fired", Some(create_job(tx, task, &hosts)?)),
    };
    let run = Run {
        name: task.name.clone(),
        from: origin,
        due_at_ms: plan.slot_ms,
        fired_at_ms: now_ms,
        job_id,
        hosts: hosts.len() as u64,
        missed: plan.missed,
        outcome: outcome.to_string(),
    };
    tx.prepare_cached(
        "INSERT INTO fleet_task_runs (name, origin, due_at, fired_at, job_id, hosts, missed, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            run.name,
            run.from,
            run.due_at_ms,
            run.fired_at_ms,
            run.job_id,
            run.hosts as i64,
            i64::try_from(run.missed).unwrap_or(i64::MAX),
            run.outcome
        ])
    })
    .ctx("record a schedule run")?;
    Ok(run)
}

/// The level a definition sits at, which sets its jobs' priority.
fn level_of(tx: &Connection, at: &AttachPoint) -> Result<Level, StoreError> {
    match at {
        AttachPoint::Host(_) => Ok(Level::Host),
        AttachPoint::Node(path) => Ok(tree::node(tx, path)?.map_or(Level::Product, |n| n.level)),
    }
}

fn create_job(tx: &Connection, task: &Task, hosts: &[String]) -> Result<String, StoreError> {
    let method = task.spec.get("method").and_then(Value::as_str).and_then(Method::parse).unwrap_or(Method::AsyncBash);
    let cmd = task.spec.get("cmd").and_then(Value::as_str).unwrap_or_default().to_string();
    let timeout_secs = task
        .spec
        .get("timeout")
        .and_then(Value::as_u64)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let level = level_of(tx, &task.attach_to)?;
    let target = match &task.attach_to {
        AttachPoint::Node(path) => serde_json::json!({ "nodes": [path] }),
        AttachPoint::Host(host) => serde_json::json!({ "hosts": [host] }),
    };
    let from = match &task.attach_to {
        AttachPoint::Node(path) => path.clone(),
        AttachPoint::Host(_) => "host".to_string(),
    };
    // The task's policy fields were checked when it was saved; a `delay` counts from now.
    let policy = crate::policy::parse(&task.spec, unix_now_ms(), false)
        .map_err(|e| StoreError::Corrupt(format!("task {} policy: {}", task.name, e.message)))?;
    let window_secs = policy.ttl_secs.unwrap_or(timeout_secs);
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    let job = NewJob {
        id: id.clone(),
        method,
        cmd,
        timeout_secs,
        hosts: hosts.to_vec(),
        token_name: None,
        target: Some(target.to_string()),
        level: level.as_str().to_string(),
        priority: super::target::queue_priority(level, method.is_sync()),
        task: Some(TaskOrigin { name: task.name.clone(), from }),
        policy,
        args: task.spec.get("args").map(Value::to_string),
    };
    let start_by_ms = job.policy.start_at_ms.unwrap_or_else(unix_now_ms).saturating_add(i64::from(window_secs) * 1000);
    if !store::insert_job(tx, &job, start_by_ms)? {
        return Err(StoreError::Corrupt(format!("a fresh job id {id} was used before")));
    }
    Ok(id)
}

/// A page of the runs of task `name`, newest first, and how many there are.
pub fn runs(conn: &Connection, name: &str, limit: u32, offset: u64) -> Result<(Vec<Run>, u64), StoreError> {
    let total: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM fleet_task_runs WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)))
        .ctx("count schedule runs")?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT name, origin, due_at, fired_at, job_id, hosts, missed, outcome FROM fleet_task_runs
             WHERE name = ?1 ORDER BY seq DESC LIMIT ?2 OFFSET ?3",
        )
        .ctx("list schedule runs")?;
    let rows = stmt
        .query_map(params![name, limit, i64::try_from(offset).unwrap_or(i64::MAX)], |r| {
            Ok(Run {
                name: r.get(0)?,
                from: r.get(1)?,
                due_at_ms: r.get(2)?,
                fired_at_ms: r.get(3)?,
                job_id: r.get(4)?,
                hosts: r.get::<_, i64>(5)?.max(0) as u64,
                missed: r.get::<_, i64>(6)?.max(0) as u64,
                outcome: r.get(7)?,
            })
        })
        .ctx("list schedule runs")?;
    let runs = rows.collect::<crate::db::Result<Vec<_>>>().ctx("list schedule runs")?;
    Ok((runs, total.max(0) as u64))
}

/// The next slot of each `schedule` definition of `name`, by origin (`None`: not planned).
pub fn next_due(conn: &Connection, name: &str) -> Result<Vec<(String, Option<i64>)>, StoreError> {
    let mut out = Vec::new();
    for s in scheduled(conn)?.into_iter().filter(|s| s.task.name == name) {
        out.push((origin_of(&s.task.attach_to), s.next_due_at));
    }
    Ok(out)
}

/// Whether any task of `name` exists (runs outlive a deleted task, and stay listable).
pub fn has_runs(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM fleet_task_runs WHERE name = ?1 LIMIT 1")
        .and_then(|mut s| s.query_row([name], |_| Ok(())).optional())
        .map(|found| found.is_some())
        .ctx("look up schedule runs")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn every_slots_are_multiples_of_the_period_since_the_epoch() {
        let every = Cadence::Every(60);
        assert_eq!(every.next_after(0), Some(MIN));
        assert_eq!(every.next_after(MIN - 1), Some(MIN));
        assert_eq!(every.next_after(MIN), Some(2 * MIN));
        assert_eq!(Cadence::Every(u64::MAX).next_after(5), None);
    }

    #[test]
    fn cron_slots_are_its_matches_in_utc() {
        let mut spec = serde_json::Map::new();
        spec.insert("cron".into(), "*/5 * * * *".into());
        let cron = Cadence::of(&spec).expect("cron");
        // 1970-01-01 00:03:00 → 00:05:00; exactly on a slot → the next one.
        assert_eq!(cron.next_after(3 * MIN), Some(5 * MIN));
        assert_eq!(cron.next_after(5 * MIN), Some(10 * MIN));
        assert_eq!(grace(&cron, 5 * MIN), MAX_GRACE_MS);
    }

    #[test]
    fn an_on_time_slot_fires_once() {
        let every = Cadence::Every(60);
        let got = plan(&every, 10 * MIN, 10 * MIN + 300, MissedPolicy::Skip);
        assert_eq!(got, Plan { slot_ms: 10 * MIN, fire: true, missed: 0, next_due_ms: Some(11 * MIN) });
    }

    #[test]
    fn an_outage_fires_one_job_or_none_never_a_burst() {
        let every = Cadence::Every(60);
        // Down from 10:00 to 15:30: slots 10..=15 passed; 15:00 is 30 s late, in grace.
        let now = 15 * MIN + 30_000;
        let got = plan(&every, 10 * MIN, now, MissedPolicy::Skip);
        assert_eq!(got, Plan { slot_ms: 15 * MIN, fire: true, missed: 5, next_due_ms: Some(16 * MIN) });
        // Back at 16:30 with a five-minute cadence: the latest slot (15:00) is 90 s late,
        // past its grace of 60 s.
        let five = Cadence::Every(300);
        let now = 16 * MIN + 30_000;
        let skipped = plan(&five, 5 * MIN, now, MissedPolicy::Skip);
        assert_eq!(skipped, Plan { slot_ms: 15 * MIN, fire: false, missed: 2, next_due_ms: Some(20 * MIN) });
        let once = plan(&five, 5 * MIN, now, MissedPolicy::RunOnce);
        assert_eq!(once, Plan { fire: true, ..skipped });
    }

    #[test]
    fn grace_is_one_period_within_bounds() {
        assert_eq!(grace(&Cadence::Every(1), 0), MIN_GRACE_MS);
        assert_eq!(grace(&Cadence::Every(30), 0), 30_000);
        assert_eq!(grace(&Cadence::Every(3600), 0), MAX_GRACE_MS);
    }

    #[test]
    fn missed_policies_have_wire_names() {
        assert_eq!(MissedPolicy::parse("run_once"), Some(MissedPolicy::RunOnce));
        assert_eq!(MissedPolicy::parse("skip"), Some(MissedPolicy::Skip));
        assert_eq!(MissedPolicy::parse("burst"), None);
    }
}
