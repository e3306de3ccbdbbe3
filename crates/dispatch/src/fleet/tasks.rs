//! Standing tasks: named work attached to a node of the tree or to one host, which every
//! host below inherits.
//!
//! A task is keyed by its name and its attach point, so the same name may be attached at
//! several levels; a host's *effective* tasks ([`effective`]) are the union of those of
//! every node it sits under (its nodes and their ancestors) and its own, where the lowest
//! level defining a name wins (host over component over service over product). Two nodes
//! of that same lowest level defining the name (a host attached to two components) are a
//! conflict: reported, never resolved by picking one.
//!
//! Kinds: `schedule` (a command run every N seconds or on a cron expression), and
//! `integrity` and `log`, whose `spec` the agent runs ([`check_integrity_spec`],
//! [`check_log_spec`]).

use super::audit::{self, Action, Change};
use super::{check_path, parent_of, tree, Actor, Level};
use crate::db::{params, Connection};
use crate::error::ApiError;
use crate::request::{type_name, MAX_CMD_BYTES};
use crate::store::{Context as _, Store, StoreError};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::host_id::is_valid_host_id;
use polaris_ops_wire::wire::{unix_now_ms, Method};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Longest task name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Shortest `every`, in seconds.
pub const MIN_EVERY_SECS: u64 = 1;
/// Longest `every`, in seconds (a week).
pub const MAX_EVERY_SECS: u64 = 7 * 24 * 3600;

/// Where a task is attached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachPoint {
    /// A node, by path.
    Node(String),
    /// One host, by id.
    Host(String),
}

impl AttachPoint {
    /// `{"node": path}` or `{"host": id}`.
    pub fn to_json(&self) -> Value {
        match self {
            AttachPoint::Node(path) => json!({ "node": path }),
            AttachPoint::Host(id) => json!({ "host": id }),
        }
    }
}

/// A task as stored: its name, attach point, kind and spec (the kind's fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Its name.
    pub name: String,
    /// Where it is attached.
    pub attach_to: AttachPoint,
    /// `schedule`, `integrity` or `log`.
    pub kind: String,
    /// The kind's fields: `every` or `cron`, `method`, `cmd` (and `timeout`) for a schedule;
    /// `{"spec": {…}}` for the others.
    pub spec: Map<String, Value>,
    /// Unix milliseconds of its creation.
    pub created_at_ms: i64,
    /// Unix milliseconds of its last change.
    pub updated_at_ms: i64,
}

impl Task {
    /// As JSON, for replies and the audit log.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("name".into(), json!(self.name));
        out.insert("attach_to".into(), self.attach_to.to_json());
        out.insert("kind".into(), json!(self.kind));
        out.extend(self.spec.clone());
        out.insert("created_at_ms".into(), json!(self.created_at_ms));
        out.insert("updated_at_ms".into(), json!(self.updated_at_ms));
        Value::Object(out)
    }

    fn audit_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("attach_to".into(), self.attach_to.to_json());
        out.insert("kind".into(), json!(self.kind));
        out.extend(self.spec.clone());
        Value::Object(out)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(Code::InvalidTask, field, message)
}

/// Checks a task name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, not starting with `-` or `.`.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with(['-', '.'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ApiError::field(
            Code::InvalidTask,
            "name",
            format!("{name:?} is not a valid task name: 1 to {MAX_NAME_LEN} bytes of A-Z a-z 0-9 . _ -, not starting with - or ."),
        ))
    }
}

/// Parses `{"node": path}` or `{"host": id}`.
pub fn parse_attach_point(value: Option<&Value>, field: &str) -> Result<AttachPoint, ApiError> {
    let map = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::field(Code::MissingField, field, format!("{field} is required")));
        }
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                field,
                format!("{field} must be {{\"node\": path}} or {{\"host\": id}}, got {}", type_name(other)),
            ));
        }
    };
    match (map.len(), map.get("node"), map.get("host")) {
        (1, Some(Value::String(path)), None) => {
            super::valid_path(path, &format!("{field}.node"))?;
            Ok(AttachPoint::Node(path.clone()))
        }
        (1, None, Some(Value::String(id))) => {
            if !is_valid_host_id(id) {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    format!("{field}.host"),
                    format!("{id:?} is not a valid host id"),
                ));
            }
            Ok(AttachPoint::Host(id.clone()))
        }
        _ => Err(invalid(field, format!("{field} must be exactly one of {{\"node\": path}} or {{\"host\": id}}"))),
    }
}

/// Checks a cron expression (five fields, or six with seconds first).
pub fn check_cron(expr: &str) -> Result<(), String> {
    croner::Cron::new(expr).with_seconds_optional().parse().map(|_| ()).map_err(|e| format!("{e}"))
}

/// Bounds of an `integrity` task's `every`, in seconds.
pub const INTEGRITY_EVERY: (u64, u64) = (2, 7 * 86_400);
/// Bounds of a `log` task's `every` (how often the files are looked at), in seconds.
pub const LOG_EVERY: (u64, u64) = (1, 3600);
/// Most paths one `log` task follows.
pub const MAX_LOG_PATHS: usize = 64;
/// Longest path a `log` task may name, in bytes.
pub const MAX_LOG_PATH_BYTES: usize = 4096;

fn spec_field(name: &str) -> String {
    format!("spec.{name}")
}

fn every_within(spec: &Map<String, Value>, (low, high): (u64, u64), required: bool) -> Result<(), ApiError> {
    match spec.get("every") {
        None if !required => Ok(()),
        None | Some(Value::Null) => {
            Err(ApiError::field(Code::MissingField, spec_field("every"), "spec.every (seconds) is required"))
        }
        Some(v) => match v.as_u64() {
            Some(n) if (low..=high).contains(&n) => Ok(()),
            Some(n) => Err(ApiError::field(
                Code::InvalidValue,
                spec_field("every"),
                format!("spec.every must be from {low} to {high} seconds, got {n}"),
            )),
            None => Err(ApiError::field(
                Code::WrongType,
                spec_field("every"),
                format!("spec.every must be a whole number of seconds, got {v}"),
            )),
        },
    }
}

fn reject_unknown_spec_fields(spec: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match spec.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::field(
            Code::UnknownField,
            spec_field(unknown),
            format!("unknown field spec.{unknown}; the spec takes {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// An `integrity` task's spec: `{"every": SECONDS}` and nothing else (the rules come only
/// from each agent's own configuration).
pub fn check_integrity_spec(spec: &Map<String, Value>) -> Result<(), ApiError> {
    reject_unknown_spec_fields(spec, &["every"])?;
    every_within(spec, INTEGRITY_EVERY, true)
}

/// A `log` task's spec: `{"paths": [ABSOLUTE PATH, …], "every": SECONDS}` (`every`
/// optional, 2 by default); whether a path may be read is the agent's to say.
pub fn check_log_spec(spec: &Map<String, Value>) -> Result<(), ApiError> {
    reject_unknown_spec_fields(spec, &["paths", "every"])?;
    every_within(spec, LOG_EVERY, false)?;
    let paths = match spec.get("paths") {
        None | Some(Value::Null) => {
            return Err(ApiError::field(Code::MissingField, spec_field("paths"), "spec.paths is required"))
        }
        Some(Value::Array(paths)) => paths,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                spec_field("paths"),
                format!("spec.paths must be an array of paths, got {}", type_name(other)),
            ))
        }
    };
    if paths.is_empty() || paths.len() > MAX_LOG_PATHS {
        return Err(ApiError::field(
            Code::InvalidValue,
            spec_field("paths"),
            format!("spec.paths must name 1 to {MAX_LOG_PATHS} files, got {}", paths.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        let Some(text) = path.as_str() else {
            return Err(ApiError::field(
                Code::WrongType,
                spec_field("paths"),
                format!("spec.paths must hold strings, got {}", type_name(path)),
            ));
        };
        let bad = if !text.starts_with('/') {
            Some("is not an absolute path")
        } else if text.len() > MAX_LOG_PATH_BYTES {
            Some("is too long")
        } else if text.contains('\0') {
            Some("holds a NUL")
        } else if !seen.insert(text) {
            Some("is named twice")
        } else {
            None
        };
        if let Some(bad) = bad {
            return Err(ApiError::field(Code::InvalidValue, spec_field("paths"), format!("{text:?} {bad}")));
        }
    }
    Ok(())
}

/// Parses the body of `PUT /v1/tasks/{name}` (without `attach_to`): the kind and its spec.
pub fn parse_spec(map: &Map<String, Value>) -> Result<(String, Map<String, Value>), ApiError> {
    let kind = match map.get("kind") {
        None | Some(Value::Null) => return Err(ApiError::field(Code::MissingField, "kind", "kind is required")),
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "kind",
                format!("kind must be a string, got {}", type_name(other)),
            ))
        }
    };
    let mut spec = Map::new();
    match kind {
        "schedule" => {
            let known: Vec<&str> = ["attach_to", "kind", "every", "cron", "method", "cmd", "timeout", "missed", "args"]
                .into_iter()
                .chain(crate::policy::FIELDS.iter().copied().filter(|f| *f != "start_at"))
                .collect();
            crate::request::reject_unknown_fields(map, &known)?;
            match (map.get("every"), map.get("cron")) {
                (Some(every), None) => {
                    let secs =
                        every.as_u64().filter(|s| (MIN_EVERY_SECS..=MAX_EVERY_SECS).contains(s)).ok_or_else(|| {
                            invalid(
                                "every",
                                format!(
                                    "every must be a whole number of seconds from {MIN_EVERY_SECS} to {MAX_EVERY_SECS}"
                                ),
                            )
                        })?;
                    spec.insert("every".into(), json!(secs));
                }
                (None, Some(Value::String(expr))) => {
                    check_cron(expr)
                        .map_err(|why| invalid("cron", format!("{expr:?} is not a cron expression: {why}")))?;
                    spec.insert("cron".into(), json!(expr));
                }
                (None, Some(other)) => {
                    return Err(ApiError::field(
                        Code::WrongType,
                        "cron",
                        format!("cron must be a string, got {}", type_name(other)),
                    ))
                }
                (Some(_), Some(_)) => return Err(invalid("cron", "give every or cron, not both")),
                (None, None) => {
                    return Err(ApiError::field(Code::MissingField, "every", "a schedule needs every or cron"))
                }
            }
            let method = match map.get("method") {
                None | Some(Value::Null) => Method::AsyncBash,
                Some(Value::String(name)) => Method::parse(name).ok_or_else(|| {
                    ApiError::field(Code::UnknownMethod, "method", format!("unknown method {name:?}"))
                })?,
                Some(other) => {
                    return Err(ApiError::field(
                        Code::WrongType,
                        "method",
                        format!("method must be a string, got {}", type_name(other)),
                    ))
                }
            };
            spec.insert("method".into(), json!(method.as_str()));
            match map.get("cmd") {
                Some(Value::String(cmd)) if method.runs_command() => {
                    if cmd.is_empty() {
                        return Err(invalid("cmd", "cmd is empty"));
                    }
                    if cmd.len() > MAX_CMD_BYTES {
                        return Err(ApiError::field(
                            Code::CmdTooLarge,
                            "cmd",
                            format!("cmd is {} bytes; at most {MAX_CMD_BYTES} are allowed", cmd.len()),
                        ));
                    }
                    spec.insert("cmd".into(), json!(cmd));
                }
                None | Some(Value::Null) if !method.runs_command() => {}
                None | Some(Value::Null) => return Err(ApiError::field(Code::MissingField, "cmd", "cmd is required")),
                Some(Value::String(_)) => return Err(invalid("cmd", format!("{} takes no cmd", method.as_str()))),
                Some(other) => {
                    return Err(ApiError::field(
                        Code::WrongType,
                        "cmd",
                        format!("cmd must be a string, got {}", type_name(other)),
                    ))
                }
            }
            match map.get("timeout") {
                None | Some(Value::Null) => {}
                Some(t) => {
                    let secs = t.as_u64().filter(|s| (1..=86_400).contains(s)).ok_or_else(|| {
                        ApiError::field(
                            Code::InvalidValue,
                            "timeout",
                            "timeout must be a whole number of seconds from 1 to 86400",
                        )
                    })?;
                    spec.insert("timeout".into(), json!(secs));
                }
            }
            // The execution policy each firing's job gets (batches, retries, limits, …),
            // kept as given and checked now as a job request would be.
            // Nobody waits for a scheduled job, so a sync method may roll out too.
            crate::policy::parse(map, unix_now_ms(), false)?;
            if let Some(args) = crate::request::parse_args(method, map.get("args"))? {
                spec.insert("args".into(), args);
            }
            for field in crate::policy::FIELDS {
                if let Some(value) = map.get(*field).filter(|v| !v.is_null()) {
                    spec.insert((*field).to_string(), value.clone());
                }
            }
            match map.get("missed") {
                None | Some(Value::Null) => {}
                Some(Value::String(policy)) if super::schedule::MissedPolicy::parse(policy).is_some() => {
                    spec.insert("missed".into(), json!(policy));
                }
                Some(other) => {
                    return Err(invalid("missed", format!("missed must be \"run_once\" or \"skip\", got {other}")))
                }
            }
        }
        "integrity" | "log" => {
            crate::request::reject_unknown_fields(map, &["attach_to", "kind", "spec"])?;
            match map.get("spec") {
                None | Some(Value::Null) => {
                    return Err(ApiError::field(
                        Code::MissingField,
                        "spec",
                        format!("a {kind} task needs a spec object"),
                    ))
                }
                Some(Value::Object(inner)) => {
                    if kind == "integrity" {
                        check_integrity_spec(inner)?;
                    } else {
                        check_log_spec(inner)?;
                    }
                    spec.insert("spec".into(), Value::Object(inner.clone()));
                }
                Some(other) => {
                    return Err(ApiError::field(
                        Code::WrongType,
                        "spec",
                        format!("spec must be an object, got {}", type_name(other)),
                    ))
                }
            }
        }
        other => {
            return Err(invalid("kind", format!("unknown kind {other:?}; a task is a schedule, integrity or log")));
        }
    }
    Ok((kind.to_string(), spec))
}

const TASK_SELECT: &str = "SELECT t.name, n.path, t.host, t.kind, t.spec, t.created_at, t.updated_at
     FROM fleet_tasks t LEFT JOIN fleet_nodes n ON n.id = t.node_id
     WHERE (t.node_id IS NULL OR n.id IS NOT NULL)";

fn tasks_where(conn: &Connection, filter: &str, args: &[&dyn crate::db::ToValue]) -> Result<Vec<Task>, StoreError> {
    let sql = format!("{TASK_SELECT} {filter} ORDER BY t.name, n.path IS NULL, n.path, t.host");
    let mut stmt = conn.prepare_cached(&sql).ctx("list tasks")?;
    let rows = stmt
        .query_map(args, |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, i64>(6)?,
            ))
        })
        .ctx("list tasks")?;
    let mut out = Vec::new();
    for row in rows {
        let (name, path, host, kind, spec, created_at_ms, updated_at_ms) = row.ctx("list tasks")?;
        let attach_to = match (path, host) {
            (Some(path), _) => AttachPoint::Node(path),
            (None, Some(host)) => AttachPoint::Host(host),
            (None, None) => return Err(StoreError::Corrupt(format!("fleet_tasks {name}: no attach point"))),
        };
        let spec = match serde_json::from_str(&spec) {
            Ok(Value::Object(map)) => map,
            _ => return Err(StoreError::Corrupt(format!("fleet_tasks {name}: spec is not a JSON object"))),
        };
        out.push(Task { name, attach_to, kind, spec, created_at_ms, updated_at_ms });
    }
    Ok(out)
}

/// Every task, by name and attach point.
pub fn list(conn: &Connection) -> Result<Vec<Task>, StoreError> {
    tasks_where(conn, "", &[])
}

/// The attachments of the task `name`.
pub fn by_name(conn: &Connection, name: &str) -> Result<Vec<Task>, StoreError> {
    tasks_where(conn, "AND t.name = ?1", &[&name])
}

fn no_such_task(name: &str, at: Option<&AttachPoint>) -> ApiError {
    match at {
        None => ApiError::general(Code::NoSuchTask, format!("no task {name}")),
        Some(AttachPoint::Node(path)) => ApiError::general(Code::NoSuchTask, format!("no task {name} on node {path}")),
        Some(AttachPoint::Host(host)) => ApiError::general(Code::NoSuchTask, format!("no task {name} on host {host}")),
    }
}

/// The task `name` as the API shows it: every attachment, or 404.
pub fn show(store: &Store, name: &str) -> Result<Vec<Task>, ApiError> {
    let tasks = by_name(&store.conn(), name)?;
    if tasks.is_empty() {
        return Err(no_such_task(name, None));
    }
    Ok(tasks)
}

fn audit_subject(name: &str) -> String {
    format!("task:{name}")
}

/// Creates or replaces the task `name` at `at`; `true` when it was created.
pub fn put(
    store: &Store,
    name: &str,
    at: &AttachPoint,
    kind: &str,
    spec: &Map<String, Value>,
    actor: &Actor,
) -> Result<(Task, bool), ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin put task")?;
    let (node_id, host) = match at {
        AttachPoint::Node(path) => {
            let node = tree::node(&tx, path)?
                .ok_or_else(|| ApiError::field(Code::UnknownNode, "attach_to.node", format!("no node {path}")))?;
            (Some(node.id), None)
        }
        AttachPoint::Host(host) => (None, Some(host.clone())),
    };
    let before = find(&tx, name, at)?;
    let now = unix_now_ms();
    let spec_text = Value::Object(spec.clone()).to_string();
    if before.is_some() {
        tx.prepare_cached(
            "UPDATE fleet_tasks SET kind = ?4, spec = ?5, updated_at = ?6,
                 -- A changed schedule counts its next slot from now; an unchanged one keeps it.
                 next_due_at = CASE WHEN kind = ?4 AND spec = ?5 THEN next_due_at ELSE NULL END
             WHERE name = ?1 AND node_id IS NOT DISTINCT FROM ?2 AND host IS NOT DISTINCT FROM ?3",
        )
        .and_then(|mut s| s.execute(params![name, node_id, host, kind, spec_text, now]))
        .ctx("update task")?;
    } else {
        tx.prepare_cached(
            "INSERT INTO fleet_tasks (name, node_id, host, kind, spec, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )
        .and_then(|mut s| s.execute(params![name, node_id, host, kind, spec_text, now]))
        .ctx("create task")?;
    }
    let after = find(&tx, name, at)?.ok_or_else(|| StoreError::Corrupt(format!("task {name} vanished")))?;
    if before.as_ref().map(Task::audit_json) != Some(after.audit_json()) {
        let change = Change {
            action: Action::TaskSet,
            subject: audit_subject(name),
            before: before.as_ref().map(Task::audit_json),
            after: Some(after.audit_json()),
        };
        audit::record(&tx, actor, &[change])?;
    }
    tx.commit().ctx("commit put task")?;
    Ok((after, before.is_none()))
}

fn find(conn: &Connection, name: &str, at: &AttachPoint) -> Result<Option<Task>, StoreError> {
    Ok(by_name(conn, name)?.into_iter().find(|t| &t.attach_to == at))
}

/// Deletes the task `name` at `at`, or at every attach point; answers what was deleted.
pub fn delete(store: &Store, name: &str, at: Option<&AttachPoint>, actor: &Actor) -> Result<Vec<Task>, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin delete task")?;
    let doomed: Vec<Task> = by_name(&tx, name)?.into_iter().filter(|t| at.is_none_or(|a| &t.attach_to == a)).collect();
    if doomed.is_empty() {
        return Err(no_such_task(name, at));
    }
    let mut changes = Vec::new();
    for task in &doomed {
        match &task.attach_to {
            AttachPoint::Node(path) => tx
                .prepare_cached(
                    "DELETE FROM fleet_tasks WHERE name = ?1 AND node_id = (SELECT id FROM fleet_nodes WHERE path = ?2)",
                )
                .and_then(|mut s| s.execute(params![name, path])),
            AttachPoint::Host(host) => tx
                .prepare_cached("DELETE FROM fleet_tasks WHERE name = ?1 AND host = ?2")
                .and_then(|mut s| s.execute(params![name, host])),
        }
        .ctx("delete task")?;
        changes.push(Change {
            action: Action::TaskDelete,
            subject: audit_subject(name),
            before: Some(task.audit_json()),
            after: None,
        });
    }
    audit::record(&tx, actor, &changes)?;
    tx.commit().ctx("commit delete task")?;
    Ok(doomed)
}

/// A task attached somewhere above a host (or to it), with the level it was attached at.
#[derive(Debug, Clone, PartialEq)]
pub struct Inherited {
    /// The task.
    pub task: Task,
    /// The level of its attach point ([`Level::Host`] for a host).
    pub level: Level,
}

/// One of a host's effective tasks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Effective {
    /// The task's name.
    pub name: String,
    /// The node path it comes from, or `"host"`.
    pub from: String,
    /// The paths of the broader definitions it hides, broadest first.
    pub overrides: Vec<String>,
    /// Its kind.
    pub kind: String,
    /// The kind's fields.
    #[serde(flatten)]
    pub spec: Map<String, Value>,
}

/// A name defined by several nodes of the same (lowest) level above one host: not run,
/// reported until one of the definitions is removed or the host overrides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The task's name.
    pub name: String,
    /// The level the definitions sit at.
    pub level: Level,
    /// The paths defining it at that level.
    pub paths: Vec<String>,
    /// The paths of broader definitions they hide.
    pub overrides: Vec<String>,
}

/// What `GET /v1/hosts/{id}/tasks` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EffectiveTasks {
    /// The tasks the host runs, by name.
    pub tasks: Vec<Effective>,
    /// Names it cannot run until a conflict is resolved.
    pub conflicts: Vec<Conflict>,
}

fn from_of(at: &AttachPoint) -> String {
    match at {
        AttachPoint::Node(path) => path.clone(),
        AttachPoint::Host(_) => "host".to_string(),
    }
}

/// The precedence rules: for each name, the lowest level wins; several definitions at that
/// level are a conflict.
pub fn resolve(inherited: Vec<Inherited>) -> EffectiveTasks {
    let mut by_name: BTreeMap<String, Vec<Inherited>> = BTreeMap::new();
    for item in inherited {
        by_name.entry(item.task.name.clone()).or_default().push(item);
    }
    let mut out = EffectiveTasks::default();
    for (name, mut defs) in by_name {
        // Lowest level first; within a level by path; broader ones last.
        defs.sort_by(|a, b| a.level.breadth().cmp(&b.level.breadth()).then(a.task.attach_to.cmp(&b.task.attach_to)));
        let lowest = defs[0].level;
        let (winners, hidden): (Vec<_>, Vec<_>) = defs.into_iter().partition(|d| d.level == lowest);
        let mut overrides: Vec<(u32, String)> =
            hidden.iter().map(|d| (d.level.breadth(), from_of(&d.task.attach_to))).collect();
        overrides.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let overrides: Vec<String> = overrides.into_iter().map(|(_, p)| p).collect();
        if winners.len() > 1 {
            out.conflicts.push(Conflict {
                name,
                level: lowest,
                paths: winners.iter().map(|w| from_of(&w.task.attach_to)).collect(),
                overrides,
            });
            continue;
        }
        let winner = winners.into_iter().next().expect("a name has a definition");
        out.tasks.push(Effective {
            name,
            from: from_of(&winner.task.attach_to),
            overrides,
            kind: winner.task.kind,
            spec: winner.task.spec,
        });
    }
    out
}

/// Every task and the level of every node, read once to resolve many hosts' tasks.
#[derive(Debug, Clone)]
pub struct TaskIndex {
    tasks: Vec<Task>,
    levels: BTreeMap<String, Level>,
}

impl TaskIndex {
    /// Reads every task and node.
    pub fn load(conn: &Connection) -> Result<TaskIndex, StoreError> {
        let levels = tree::nodes(conn)?.into_iter().map(|n| (n.path, n.level)).collect();
        Ok(TaskIndex { tasks: list(conn)?, levels })
    }

    /// Every task attached to `host` or to a node it sits under, with its level.
    pub fn inherited(&self, conn: &Connection, host: &str) -> Result<Vec<Inherited>, StoreError> {
        let placement = tree::placement(conn, host)?;
        let mut paths = BTreeSet::new();
        for path in &placement.nodes {
            let mut at = Some(path.as_str());
            while let Some(p) = at {
                paths.insert(p.to_string());
                at = parent_of(p);
            }
        }
        let mut out = Vec::new();
        for task in &self.tasks {
            let level = match &task.attach_to {
                AttachPoint::Host(h) if h == host => Level::Host,
                AttachPoint::Node(path) if paths.contains(path) => match self.levels.get(path) {
                    Some(level) => *level,
                    None => continue,
                },
                AttachPoint::Node(_) | AttachPoint::Host(_) => continue,
            };
            debug_assert!(
                matches!(&task.attach_to, AttachPoint::Host(_)) || check_path(&from_of(&task.attach_to)).is_ok()
            );
            out.push(Inherited { task: task.clone(), level });
        }
        Ok(out)
    }
}

/// Every task attached to `host` or to a node it sits under, with its level.
pub fn inherited(conn: &Connection, host: &str) -> Result<Vec<Inherited>, StoreError> {
    TaskIndex::load(conn)?.inherited(conn, host)
}

/// The SHA-256 (hex) of an effective task set as JSON: what an agent reports it applied,
/// and the `ETag` of the signed set.
pub fn digest(effective: &EffectiveTasks) -> String {
    use sha2::Digest as _;
    // Serialising a struct of strings, vectors and JSON maps cannot fail.
    let text = serde_json::to_vec(effective).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(&text))
}

/// The signed task set an agent fetches: `host`, when it was issued, the digest and the
/// set itself, as a JSON payload the agent verifies before it uses any of it.
#[derive(Debug, Clone, Serialize)]
pub struct SignedSet<'a> {
    /// Format version.
    pub v: u32,
    /// The host it is for.
    pub host: &'a str,
    /// Unix seconds when the dispatcher issued it (agents refuse sets older than one they
    /// hold, and sets issued too far from their clock).
    pub issued_at: u64,
    /// [`digest`] of the set.
    pub digest: &'a str,
    /// The set.
    #[serde(flatten)]
    pub effective: &'a EffectiveTasks,
}

/// The effective tasks of `host`.
pub fn effective(store: &Store, host: &str) -> Result<EffectiveTasks, StoreError> {
    Ok(resolve(inherited(&store.conn(), host)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, at: AttachPoint, level: Level, cmd: &str) -> Inherited {
        let mut spec = Map::new();
        spec.insert("every".into(), json!(60));
        spec.insert("cmd".into(), json!(cmd));
        Inherited {
            task: Task {
                name: name.into(),
                attach_to: at,
                kind: "schedule".into(),
                spec,
                created_at_ms: 0,
                updated_at_ms: 0,
            },
            level,
        }
    }

    fn node(p: &str) -> AttachPoint {
        AttachPoint::Node(p.into())
    }

    #[test]
    fn the_lowest_level_wins_and_lists_what_it_hides() {
        let got = resolve(vec![
            def("uptime", node("ECS"), Level::Product, "p"),
            def("uptime", node("ECS/OpenStack"), Level::Service, "s"),
            def("uptime", node("ECS/OpenStack/Console"), Level::Component, "c"),
            def("disk", node("ECS"), Level::Product, "df"),
            def("uptime", AttachPoint::Host("h1".into()), Level::Host, "h"),
        ]);
        assert!(got.conflicts.is_empty());
        assert_eq!(got.tasks.len(), 2);
        assert_eq!(got.tasks[0].name, "disk");
        assert_eq!(got.tasks[0].from, "ECS");
        assert!(got.tasks[0].overrides.is_empty());
        assert_eq!(got.tasks[1].from, "host");
        assert_eq!(got.tasks[1].spec["cmd"], "h");
        assert_eq!(got.tasks[1].overrides, ["ECS", "ECS/OpenStack", "ECS/OpenStack/Console"]);
    }

    #[test]
    fn a_component_overrides_its_product() {
        let got = resolve(vec![
            def("uptime", node("ECS/OpenStack/Console"), Level::Component, "c"),
            def("uptime", node("ECS"), Level::Product, "p"),
        ]);
        assert_eq!(got.tasks[0].from, "ECS/OpenStack/Console");
        assert_eq!(got.tasks[0].spec["cmd"], "c");
        assert_eq!(got.tasks[0].overrides, ["ECS"]);
    }

    #[test]
    fn siblings_of_the_lowest_level_conflict_and_the_host_settles_it() {
        let defs = vec![
            def("uptime", node("ECS/OpenStack/Console"), Level::Component, "a"),
            def("uptime", node("ECS/OpenStack/DB"), Level::Component, "b"),
            def("uptime", node("ECS"), Level::Product, "p"),
        ];
        let got = resolve(defs.clone());
        assert!(got.tasks.is_empty());
        assert_eq!(
            got.conflicts,
            [Conflict {
                name: "uptime".into(),
                level: Level::Component,
                paths: vec!["ECS/OpenStack/Console".into(), "ECS/OpenStack/DB".into()],
                overrides: vec!["ECS".into()],
            }]
        );
        let mut with_host = defs;
        with_host.push(def("uptime", AttachPoint::Host("h1".into()), Level::Host, "h"));
        let got = resolve(with_host);
        assert!(got.conflicts.is_empty());
        assert_eq!(got.tasks[0].overrides, ["ECS", "ECS/OpenStack/Console", "ECS/OpenStack/DB"]);
    }

    #[test]
    fn specs_are_checked() {
        let parse = |v: Value| parse_spec(v.as_object().unwrap()).map_err(|e| (e.code, e.field));
        let (kind, spec) = parse(json!({"kind": "schedule", "every": 60, "cmd": "uptime"})).unwrap();
        assert_eq!(kind, "schedule");
        assert_eq!(spec["method"], "async.bash");
        assert!(parse(json!({"kind": "schedule", "cron": "*/5 * * * *", "method": "sync.bash", "cmd": "id"})).is_ok());
        assert!(parse(json!({"kind": "schedule", "every": 60, "method": "sync.query"})).is_ok());
        assert_eq!(
            parse(json!({"kind": "schedule", "cron": "61 * * * *", "cmd": "x"})).unwrap_err().0,
            Code::InvalidTask
        );
        assert_eq!(
            parse(json!({"kind": "schedule", "every": 5, "cron": "* * * * *", "cmd": "x"})).unwrap_err().0,
            Code::InvalidTask
        );
        assert_eq!(parse(json!({"kind": "schedule", "cmd": "x"})).unwrap_err().0, Code::MissingField);
        assert_eq!(parse(json!({"kind": "schedule", "every": 0, "cmd": "x"})).unwrap_err().0, Code::InvalidTask);
        assert_eq!(parse(json!({"kind": "cleanup"})).unwrap_err().0, Code::InvalidTask);
        assert!(parse(json!({"kind": "integrity", "spec": {"every": 300}})).is_ok());
        assert_eq!(parse(json!({"kind": "integrity", "spec": {"paths": ["/etc"]}})).unwrap_err().0, Code::UnknownField);
        assert_eq!(parse(json!({"kind": "integrity", "spec": {}})).unwrap_err().0, Code::MissingField);
        assert_eq!(parse(json!({"kind": "integrity", "spec": {"every": 1}})).unwrap_err().0, Code::InvalidValue);
        assert_eq!(parse(json!({"kind": "integrity", "spec": {"every": "5m"}})).unwrap_err().0, Code::WrongType);
        assert!(parse(json!({"kind": "log", "spec": {"paths": ["/var/log/syslog"], "every": 2}})).is_ok());
        assert!(parse(json!({"kind": "log", "spec": {"paths": ["/var/log/syslog"]}})).is_ok());
        assert_eq!(parse(json!({"kind": "log", "spec": 3})).unwrap_err().0, Code::WrongType);
        assert_eq!(parse(json!({"kind": "log", "spec": {}, "cmd": "x"})).unwrap_err().0, Code::UnknownField);
        assert_eq!(parse(json!({"kind": "log", "spec": {}})).unwrap_err().0, Code::MissingField);
        for bad in [json!([]), json!(["rel/x"]), json!(["/a", "/a"]), json!(["/a\u{0}b"])] {
            assert_eq!(parse(json!({"kind": "log", "spec": {"paths": bad}})).unwrap_err().0, Code::InvalidValue);
        }
        assert_eq!(parse(json!({"kind": "log", "spec": {"paths": [3]}})).unwrap_err().0, Code::WrongType);
        assert_eq!(
            parse(json!({"kind": "log", "spec": {"paths": ["/a"], "every": 0}})).unwrap_err().0,
            Code::InvalidValue
        );
        assert_eq!(
            parse(json!({"kind": "log", "spec": {"paths": ["/a"], "grep": "x"}})).unwrap_err(),
            (Code::UnknownField, Some("spec.grep".to_string()))
        );
        let (_, rolling) =
            parse(json!({"kind": "schedule", "every": 60, "cmd": "x", "batch": {"size": 1, "max_failures": 0}}))
                .unwrap();
        assert_eq!(rolling["batch"], json!({"size": 1, "max_failures": 0}));
        assert_eq!(
            parse(json!({"kind": "schedule", "every": 60, "cmd": "x", "start_at": "2026-01-01T00:00:00Z"}))
                .unwrap_err()
                .0,
            Code::UnknownField
        );
        assert_eq!(
            parse(json!({"kind": "schedule", "every": 60, "cmd": "x", "batch": {"size": 0}})).unwrap_err(),
            (Code::InvalidValue, Some("batch.size".to_string()))
        );
        assert!(check_name("nightly.backup-1").is_ok());
        for bad in ["", "-x", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
