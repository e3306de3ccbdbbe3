//! Targets: which hosts a job runs on, said in the tree's terms.
//!
//! ```json
//! {"nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}, "hosts": ["db-07"],
//!  "exclude": {"hosts": ["web-03"]}}
//! ```
//!
//! selects the hosts under any listed node (at any depth) that carry every listed label,
//! plus the hosts named, minus what `exclude` selects (a selector of the same shape:
//! its nodes' hosts with its labels, plus its hosts). Labels without nodes match across
//! the whole fleet. The resolved list is sorted by host id.
//!
//! The level a job was targeted at is the broadest level it names: a product, service or
//! component node, the whole fleet (labels alone, counted as a product), or hosts by name.
//! The queue priority follows it (see [`queue_priority`]).

use super::{tree, valid_path, Level};
use crate::db::Connection;
use crate::error::ApiError;
use crate::request::{reject_unknown_fields, type_name, MAX_HOSTS};
use crate::store::{self, Context as _, NewJob};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::host_id::is_valid_host_id;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Priority of host-level work somebody waits for (`sync.*`); lower runs first.
pub const SYNC_PRIORITY: u32 = 100;
/// Priority of host-level async work.
pub const ASYNC_PRIORITY: u32 = 1024;
/// What each level of breadth adds to the priority: host 0, component 1, service 2,
/// product 3 steps.
pub const PRIORITY_STEP: u32 = 10_000;
/// Most nodes one selector may list.
pub const MAX_TARGET_NODES: usize = 1000;

/// The beanstalk priority of a job targeted at `level` (lower runs first): host-level
/// work before component-level before service-level before product-level, and within a
/// level sync before async. Host lists keep the priorities they always had (100 sync,
/// 1024 async).
///
/// | level | sync | async |
/// | --- | --- | --- |
/// | host | 100 | 1024 |
/// | component | 10100 | 11024 |
/// | service | 20100 | 21024 |
/// | product | 30100 | 31024 |
pub fn queue_priority(level: Level, sync: bool) -> u32 {
    PRIORITY_STEP * level.breadth() + if sync { SYNC_PRIORITY } else { ASYNC_PRIORITY }
}

/// Nodes, labels and hosts; what a target includes, or what it excludes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Node paths: the hosts under any of them, at any depth.
    pub nodes: Vec<String>,
    /// Labels a host must all carry (with `nodes`, among their hosts; else fleet-wide).
    pub labels: BTreeMap<String, String>,
    /// Hosts by id, added whatever their nodes and labels.
    pub hosts: Vec<String>,
}

impl Selector {
    /// Whether it names nothing at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.labels.is_empty() && self.hosts.is_empty()
    }

    fn to_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        if !self.nodes.is_empty() {
            map.insert("nodes".into(), json!(self.nodes));
        }
        if !self.labels.is_empty() {
            map.insert("labels".into(), json!(self.labels));
        }
        if !self.hosts.is_empty() {
            map.insert("hosts".into(), json!(self.hosts));
        }
        map
    }
}

/// A validated `target`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// What it selects.
    pub include: Selector,
    /// What it then removes.
    pub exclude: Selector,
}

impl Target {
    /// The target as a job records it: the fields it was given, empty ones left out.
    pub fn to_json(&self) -> Value {
        let mut map = self.include.to_json();
        if !self.exclude.is_empty() {
            map.insert("exclude".into(), Value::Object(self.exclude.to_json()));
        }
        Value::Object(map)
    }
}

/// Validates a `target` object; `field` is where it sits in the request (`target`).
pub fn parse(value: &Value, field: &str) -> Result<Target, ApiError> {
    let Value::Object(map) = value else {
        return Err(ApiError::field(
            Code::WrongType,
            field,
            format!("{field} must be an object with nodes, labels, hosts and exclude, got {}", type_name(value)),
        ));
    };
    let include = parse_selector(map, field, true)?;
    let exclude = match map.get("exclude") {
        None | Some(Value::Null) => Selector::default(),
        Some(Value::Object(inner)) => parse_selector(inner, &format!("{field}.exclude"), false)?,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                format!("{field}.exclude"),
                format!("{field}.exclude must be an object with nodes, labels and hosts, got {}", type_name(other)),
            ));
        }
    };
    if include.is_empty() {
        return Err(ApiError::field(
            Code::EmptyTarget,
            field,
            format!("{field} names no nodes, labels or hosts, so it selects nothing"),
        ));
    }
    Ok(Target { include, exclude })
}

fn parse_selector(map: &Map<String, Value>, field: &str, top: bool) -> Result<Selector, ApiError> {
    let known: &[&str] = if top { &["nodes", "labels", "hosts", "exclude"] } else { &["nodes", "labels", "hosts"] };
    reject_unknown_fields(map, known).map_err(|e| match e.field {
        Some(name) => ApiError { field: Some(format!("{field}.{name}")), ..e },
        None => e,
    })?;
    let nodes = string_list(map.get("nodes"), &format!("{field}.nodes"), MAX_TARGET_NODES)?;
    for (index, path) in nodes.iter().enumerate() {
        valid_path(path, &format!("{field}.nodes[{index}]"))?;
    }
    let labels = parse_labels(map.get("labels"), &format!("{field}.labels"))?;
    let hosts = string_list(map.get("hosts"), &format!("{field}.hosts"), MAX_HOSTS)?;
    for (index, host) in hosts.iter().enumerate() {
        if !is_valid_host_id(host) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("{field}.hosts[{index}]"),
                format!("{host:?} is not a valid host id"),
            ));
        }
    }
    Ok(Selector { nodes, labels, hosts })
}

/// An optional array of at most `max` distinct strings, found at `field`.
pub(crate) fn string_list(value: Option<&Value>, field: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                field,
                format!("{field} must be an array of strings, got {}", type_name(other)),
            ));
        }
    };
    if items.len() > max {
        return Err(ApiError::field(
            Code::InvalidValue,
            field,
            format!("{field} lists {} entries; at most {max} are allowed", items.len()),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let Value::String(s) = item else {
            return Err(ApiError::field(
                Code::WrongType,
                at.clone(),
                format!("{at} must be a string, got {}", type_name(item)),
            ));
        };
        if out.contains(s) {
            return Err(ApiError::field(Code::InvalidValue, at, format!("{s:?} is listed twice")));
        }
        out.push(s.clone());
    }
    Ok(out)
}

/// An optional `{"key": "value"}` object of labels at `field`.
pub fn parse_labels(value: Option<&Value>, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                field,
                format!("{field} must be an object of string labels, got {}", type_name(other)),
            ));
        }
    };
    if map.len() > super::MAX_LABELS {
        return Err(ApiError::field(
            Code::InvalidValue,
            field,
            format!("{field} has {} labels; at most {} are allowed", map.len(), super::MAX_LABELS),
        ));
    }
    let mut labels = BTreeMap::new();
    for (key, value) in map {
        let at = format!("{field}.{key}");
        super::check_label_key(key).map_err(|why| ApiError::field(Code::InvalidValue, at.clone(), why))?;
        let Value::String(value) = value else {
            return Err(ApiError::field(
                Code::WrongType,
                at.clone(),
                format!("{at} must be a string, got {}", type_name(value)),
            ));
        };
        super::check_label_value(value).map_err(|why| ApiError::field(Code::InvalidValue, at.clone(), why))?;
        labels.insert(key.clone(), value.clone());
    }
    Ok(labels)
}

/// The hosts a target selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The selected hosts, sorted by id.
    pub hosts: Vec<String>,
    /// The level the target was aimed at.
    pub level: Level,
    /// The selected hosts whose agent has not registered (a job answers them `0x0201`).
    pub unregistered: Vec<String>,
}

/// The hosts a selector selects, and the broadest level it names (`None`: hosts only).
fn select(conn: &Connection, selector: &Selector, field: &str) -> Result<(BTreeSet<String>, Option<Level>), ApiError> {
    let mut level = None;
    let mut candidates: Option<BTreeSet<String>> = None;
    if !selector.nodes.is_empty() {
        let mut under = BTreeSet::new();
        for (index, path) in selector.nodes.iter().enumerate() {
            let node = tree::node(conn, path)?.ok_or_else(|| {
                ApiError::field(Code::UnknownNode, format!("{field}.nodes[{index}]"), format!("no node {path}"))
            })?;
            level = Some(level.map_or(node.level, |l: Level| l.min(node.level)));
            under.extend(tree::hosts_at_or_below(conn, path)?);
        }
        candidates = Some(under);
    }
    if !selector.labels.is_empty() {
        let labelled = tree::hosts_with_labels(conn, &selector.labels)?;
        candidates = Some(match candidates {
            Some(under) => under.intersection(&labelled).cloned().collect(),
            None => {
                // Labels alone span the fleet: as broad as a product.
                level = Some(Level::Product);
                labelled
            }
        });
    }
    let mut selected = candidates.unwrap_or_default();
    selected.extend(selector.hosts.iter().cloned());
    Ok((selected, level))
}

/// Resolves `target` against the tree (on the caller's connection or transaction). A node
/// that does not exist is `unknown_node`; a target that selects nothing is `empty_target`.
pub fn resolve(conn: &Connection, target: &Target, field: &str) -> Result<Resolution, ApiError> {
    let (included, level) = select(conn, &target.include, field)?;
    let (excluded, _) = select(conn, &target.exclude, &format!("{field}.exclude"))?;
    let hosts: Vec<String> = included.difference(&excluded).cloned().collect();
    if hosts.is_empty() {
        return Err(ApiError::field(
            Code::EmptyTarget,
            field,
            format!(
                "{field} selects no hosts ({} before exclusions, {} excluded)",
                included.len(),
                included.intersection(&excluded).count()
            ),
        ));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(ApiError::field(
            Code::InvalidValue,
            field,
            format!("{field} selects {} hosts; one job may run on at most {MAX_HOSTS}", hosts.len()),
        ));
    }
    let mut unregistered = Vec::new();
    {
        let mut known = conn.prepare_cached("SELECT 1 FROM hosts WHERE id = ?1").ctx("look up host")?;
        for host in &hosts {
            if !known.exists([host]).ctx("look up host")? {
                unregistered.push(host.clone());
            }
        }
    }
    Ok(Resolution { hosts, level: level.unwrap_or(Level::Host), unregistered })
}

/// Stores a job aimed at `target`: resolves it and stores the job with the hosts it gave,
/// in one transaction, so the job holds exactly what the tree said at that moment. The
/// job records the target, the level and the priority (`priority` when the request gave
/// one, else the level's). Returns whether the job id was new, and the resolution.
pub fn create_job(
    store: &store::Store,
    mut job: NewJob,
    target: &Target,
    priority: Option<u32>,
    start_by_ms: i64,
) -> Result<(bool, Resolution), ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin create job")?;
    let resolution = resolve(&tx, target, "target")?;
    job.hosts = resolution.hosts.clone();
    job.target = Some(target.to_json().to_string());
    job.level = resolution.level.as_str().to_string();
    job.priority = priority.unwrap_or_else(|| queue_priority(resolution.level, job.method.is_sync()));
    if !store::insert_job(&tx, &job, start_by_ms)? {
        return Ok((false, resolution));
    }
    tx.commit().ctx("commit create job")?;
    Ok((true, resolution))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(value: Value) -> ApiError {
        parse(&value, "target").expect_err("should be refused")
    }

    #[test]
    fn priorities_follow_the_level_and_keep_the_seed_values_for_hosts() {
        assert_eq!(queue_priority(Level::Host, true), 100);
        assert_eq!(queue_priority(Level::Host, false), 1024);
        assert_eq!(queue_priority(Level::Component, true), 10_100);
        assert_eq!(queue_priority(Level::Service, false), 21_024);
        assert_eq!(queue_priority(Level::Product, false), 31_024);
        // Narrower work always runs first, sync or not.
        assert!(queue_priority(Level::Host, false) < queue_priority(Level::Component, true));
        assert!(queue_priority(Level::Service, false) < queue_priority(Level::Product, true));
    }

    #[test]
    fn targets_parse_and_record_what_was_given() {
        let target = parse(
            &json!({"nodes": ["ECS/OpenStack"], "labels": {"role": "web"}, "exclude": {"hosts": ["h2"]}}),
            "target",
        )
        .expect("valid");
        assert_eq!(target.include.nodes, ["ECS/OpenStack"]);
        assert_eq!(target.exclude.hosts, ["h2"]);
        assert_eq!(
            target.to_json(),
            json!({"nodes": ["ECS/OpenStack"], "labels": {"role": "web"}, "exclude": {"hosts": ["h2"]}})
        );
    }

    #[test]
    fn target_errors_name_their_field() {
        let cases: Vec<(Value, Code, &str)> = vec![
            (json!([]), Code::WrongType, "target"),
            (json!({}), Code::EmptyTarget, "target"),
            (json!({"nodes": [], "exclude": {"hosts": ["a"]}}), Code::EmptyTarget, "target"),
            (json!({"nodes": ["ECS//x"]}), Code::InvalidPath, "target.nodes[0]"),
            (json!({"nodes": ["ECS", "ECS"]}), Code::InvalidValue, "target.nodes[1]"),
            (json!({"nodes": "ECS"}), Code::WrongType, "target.nodes"),
            (json!({"labels": {"role": 1}}), Code::WrongType, "target.labels.role"),
            (json!({"labels": {"bad key": "x"}}), Code::InvalidValue, "target.labels.bad key"),
            (json!({"hosts": ["web 01"]}), Code::InvalidValue, "target.hosts[0]"),
            (json!({"host": ["a"]}), Code::UnknownField, "target.host"),
            (json!({"hosts": ["a"], "exclude": {"exclude": {}}}), Code::UnknownField, "target.exclude.exclude"),
            (json!({"hosts": ["a"], "exclude": ["b"]}), Code::WrongType, "target.exclude"),
        ];
        for (value, code, field) in cases {
            let e = err(value.clone());
            assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{value}: {}", e.message);
        }
    }
}
