//! The whole inventory as one document, in and out.
//!
//! ```json
//! {"nodes": [{"path": "ECS", "level": "product"}, {"path": "ECS/OpenStack", "level": "service"}],
//!  "hosts": [{"id": "web-01", "nodes": ["ECS/OpenStack"], "labels": {"role": "web"}}]}
//! ```
//!
//! `GET /v1/fleet` answers the current inventory in this shape, and `POST /v1/fleet/import`
//! makes the tree agree with such a document: nodes missing from the tree are created and
//! levels that differ are changed; each host listed gets exactly the nodes and labels the
//! document gives it. Applying a document twice changes nothing the second time. With
//! `prune`, what the document leaves out goes too: nodes not listed are deleted, hosts not
//! listed leave the inventory. With `dry_run`, the same changes are computed and answered,
//! and nothing is written. All of it happens in one transaction, recorded in the audit
//! log; a document with any error changes nothing.

use super::audit::{self, Action, Change};
use super::tree::{self, host_change};
use super::{level_fits, level_misfit, parent_of, valid_path, Actor, Level, Placement};
use crate::error::ApiError;
use crate::request::{parse_object, reject_unknown_fields, type_name};
use crate::store::{Context as _, Store, StoreError};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::host_id::is_valid_host_id;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Most nodes one document may list.
pub const MAX_DOCUMENT_NODES: usize = 10_000;
/// Most hosts one document may list.
pub const MAX_DOCUMENT_HOSTS: usize = 100_000;

/// A validated inventory document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Nodes in document order.
    pub nodes: Vec<(String, Level)>,
    /// Hosts in document order.
    pub hosts: Vec<HostEntry>,
}

/// A host of an inventory document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostEntry {
    /// The host id.
    pub id: String,
    /// Its nodes, in document order.
    pub nodes: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl HostEntry {
    fn placement(&self) -> Placement {
        Placement { nodes: self.nodes.iter().cloned().collect(), labels: self.labels.clone() }
    }
}

/// How to import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Compute and answer the changes; write nothing.
    pub dry_run: bool,
    /// Also delete nodes and remove hosts the document does not list.
    pub prune: bool,
}

/// What an import did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportReport {
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Whether what the document leaves out was removed.
    pub prune: bool,
    /// How many changes of each kind.
    pub summary: Summary,
    /// Every change, in the order applied.
    pub changes: Vec<Change>,
}

/// Counts of an import's changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Nodes created.
    pub nodes_created: usize,
    /// Nodes whose level changed.
    pub nodes_updated: usize,
    /// Nodes deleted (prune only).
    pub nodes_deleted: usize,
    /// Hosts whose nodes or labels changed (or that left the inventory).
    pub hosts_updated: usize,
}

fn array<'a>(map: &'a Map<String, Value>, key: &str, max: usize) -> Result<&'a [Value], ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) if items.len() <= max => Ok(items),
        Some(Value::Array(items)) => Err(ApiError::field(
            Code::InvalidValue,
            key,
            format!("{key} lists {} entries; at most {max} are allowed", items.len()),
        )),
        Some(other) => {
            Err(ApiError::field(Code::WrongType, key, format!("{key} must be an array, got {}", type_name(other))))
        }
    }
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        other => {
            Err(ApiError::field(Code::WrongType, field, format!("{field} must be an object, got {}", type_name(other))))
        }
    }
}

fn string<'a>(map: &'a Map<String, Value>, key: &str, field: &str) -> Result<&'a str, ApiError> {
    let at = format!("{field}.{key}");
    match map.get(key) {
        None | Some(Value::Null) => Err(ApiError::field(Code::MissingField, at.clone(), format!("{at} is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ApiError::field(
            Code::WrongType,
            at.clone(),
            format!("{at} must be a string, got {}", type_name(other)),
        )),
    }
}

fn scoped(e: ApiError, field: &str) -> ApiError {
    match e.field {
        Some(name) => ApiError { field: Some(format!("{field}.{name}")), ..e },
        None => e,
    }
}

/// Validates an inventory document (everything that does not need the tree).
pub fn parse_inventory(body: &[u8]) -> Result<Inventory, ApiError> {
    let map = parse_object(body)?;
    reject_unknown_fields(&map, &["nodes", "hosts"])?;
    let mut inventory = Inventory::default();
    let mut seen_paths = BTreeMap::new();
    for (index, item) in array(&map, "nodes", MAX_DOCUMENT_NODES)?.iter().enumerate() {
        let field = format!("nodes[{index}]");
        let entry = object(item, &field)?;
        reject_unknown_fields(entry, &["path", "level"]).map_err(|e| scoped(e, &field))?;
        let path = string(entry, "path", &field)?;
        valid_path(path, &format!("{field}.path"))?;
        let name = string(entry, "level", &field)?;
        let level = Level::parse_node_level(name).ok_or_else(|| {
            ApiError::field(
                Code::InvalidValue,
                format!("{field}.level"),
                format!("unknown level {name:?}; a node is a product, service or component"),
            )
        })?;
        if let Some(first) = seen_paths.insert(path.to_string(), index) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("{field}.path"),
                format!("{path} is listed twice (also nodes[{first}])"),
            ));
        }
        inventory.nodes.push((path.to_string(), level));
    }
    let mut seen_hosts = BTreeMap::new();
    for (index, item) in array(&map, "hosts", MAX_DOCUMENT_HOSTS)?.iter().enumerate() {
        let field = format!("hosts[{index}]");
        let entry = object(item, &field)?;
        reject_unknown_fields(entry, &["id", "nodes", "labels"]).map_err(|e| scoped(e, &field))?;
        let id = string(entry, "id", &field)?;
        if !is_valid_host_id(id) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("{field}.id"),
                format!("{id:?} is not a valid host id"),
            ));
        }
        if let Some(first) = seen_hosts.insert(id.to_string(), index) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("{field}.id"),
                format!("host {id} is listed twice (also hosts[{first}])"),
            ));
        }
        let mut host = HostEntry { id: id.to_string(), ..HostEntry::default() };
        for (n, path) in
            array(entry, "nodes", super::target::MAX_TARGET_NODES).map_err(|e| scoped(e, &field))?.iter().enumerate()
        {
            let at = format!("{field}.nodes[{n}]");
            let Value::String(path) = path else {
                return Err(ApiError::field(Code::WrongType, at.clone(), format!("{at} must be a string")));
            };
            valid_path(path, &at)?;
            if host.nodes.contains(path) {
                return Err(ApiError::field(Code::InvalidValue, at, format!("{path} is listed twice")));
            }
            host.nodes.push(path.clone());
        }
        host.labels = super::target::parse_labels(entry.get("labels"), &format!("{field}.labels"))?;
        inventory.hosts.push(host);
    }
    Ok(inventory)
}

/// An inventory document as `GET /v1/fleet` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    /// Every node, by path (parents first).
    pub nodes: Vec<DocumentNode>,
    /// Every host in the inventory, by id.
    pub hosts: Vec<DocumentHost>,
}

/// A node of a [`Document`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocumentNode {
    /// Its path.
    pub path: String,
    /// Its level.
    pub level: Level,
}

/// A host of a [`Document`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocumentHost {
    /// The host id.
    pub id: String,
    /// Its nodes' paths.
    pub nodes: BTreeSet<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// The current inventory as a document that [`import`] would leave unchanged.
pub fn export(store: &Store) -> Result<Document, StoreError> {
    let conn = store.conn();
    let nodes = tree::nodes(&conn)?.into_iter().map(|n| DocumentNode { path: n.path, level: n.level }).collect();
    let hosts = tree::placements(&conn)?
        .into_iter()
        .map(|(id, p)| DocumentHost { id, nodes: p.nodes, labels: p.labels })
        .collect();
    Ok(Document { nodes, hosts })
}

fn depth(path: &str) -> usize {
    path.matches('/').count()
}

/// Makes the tree agree with `inventory` (see the module's documentation); answers the
/// changes, applied or (dry run) not.
pub fn import(
    store: &Store,
    inventory: &Inventory,
    options: ImportOptions,
    actor: &Actor,
) -> Result<ImportReport, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin import")?;
    let current: BTreeMap<String, tree::Node> = tree::nodes(&tx)?.into_iter().map(|n| (n.path.clone(), n)).collect();
    let doc_index: BTreeMap<&str, usize> =
        inventory.nodes.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i)).collect();

    // The tree as it will be: the document's nodes, plus (without prune) the others.
    let mut desired: BTreeMap<String, Level> = inventory.nodes.iter().cloned().collect();
    if !options.prune {
        for (path, node) in &current {
            desired.entry(path.clone()).or_insert(node.level);
        }
    }
    for (path, level) in &desired {
        // A node the document does not list fits where it was, unless the document changed
        // its parent's level: then the parent's entry is at fault.
        let field_of = |path: &str| doc_index.get(path).map(|i| format!("nodes[{i}]"));
        match parent_of(path) {
            None if !level_fits(*level, None) => {
                let field = field_of(path).unwrap_or_else(|| "nodes".into());
                return Err(ApiError::field(
                    Code::LevelOutOfOrder,
                    format!("{field}.level"),
                    level_misfit(path, *level, None),
                ));
            }
            None => {}
            Some(parent) => {
                let Some(parent_level) = desired.get(parent) else {
                    let field = field_of(path).unwrap_or_else(|| "nodes".into());
                    let why = if options.prune {
                        "is not in the document (and prune would delete it)"
                    } else {
                        "is neither in the document nor in the tree"
                    };
                    return Err(ApiError::field(
                        Code::UnknownNode,
                        format!("{field}.path"),
                        format!("the parent of {path}, {parent}, {why}"),
                    ));
                };
                if !level_fits(*level, Some(*parent_level)) {
                    let field = field_of(path).or_else(|| field_of(parent)).unwrap_or_else(|| "nodes".into());
                    return Err(ApiError::field(
                        Code::LevelOutOfOrder,
                        format!("{field}.level"),
                        level_misfit(path, *level, Some((parent, *parent_level))),
                    ));
                }
            }
        }
    }
    for (index, host) in inventory.hosts.iter().enumerate() {
        for (n, path) in host.nodes.iter().enumerate() {
            if !desired.contains_key(path) {
                return Err(ApiError::field(
                    Code::UnknownNode,
                    format!("hosts[{index}].nodes[{n}]"),
                    format!(
                        "host {} names {path}, which is neither in the document nor {}",
                        host.id,
                        if options.prune { "kept by prune" } else { "in the tree" }
                    ),
                ));
            }
        }
    }

    // The changes, in the order they can be applied: creates (parents first), level
    // changes, hosts, then (prune) deletes (children first).
    let mut changes = Vec::new();
    let mut summary = Summary::default();
    let mut creates: Vec<(&String, &Level)> = desired.iter().filter(|(p, _)| !current.contains_key(*p)).collect();
    creates.sort_by_key(|(p, _)| (depth(p), (*p).clone()));
    let mut node_ids: BTreeMap<String, i64> = current.iter().map(|(p, n)| (p.clone(), n.id)).collect();
    for (path, level) in creates {
        if !options.dry_run {
            let parent_id = parent_of(path)
                .map(|p| node_ids.get(p).copied().ok_or_else(|| StoreError::Corrupt(format!("{p} has no id"))))
                .transpose()?;
            let id = tree::insert_node(&tx, path, *level, parent_id)?;
            node_ids.insert(path.clone(), id);
        }
        summary.nodes_created += 1;
        changes.push(Change {
            action: Action::NodeCreate,
            subject: path.clone(),
            before: None,
            after: Some(json!({ "path": path, "level": level })),
        });
    }
    for (path, node) in &current {
        if let Some(level) = desired.get(path).filter(|l| **l != node.level) {
            if !options.dry_run {
                tree::set_level(&tx, node.id, *level)?;
            }
            summary.nodes_updated += 1;
            changes.push(Change {
                action: Action::NodeUpdate,
                subject: path.clone(),
                before: Some(json!({ "path": path, "level": node.level })),
                after: Some(json!({ "path": path, "level": level })),
            });
        }
    }
    let mut present = tree::placements(&tx)?;
    let listed: BTreeSet<&str> = inventory.hosts.iter().map(|h| h.id.as_str()).collect();
    let mut host_updates: Vec<(String, Placement, Placement)> = Vec::new();
    for host in &inventory.hosts {
        let before = present.remove(&host.id).unwrap_or_default();
        let after = host.placement();
        if before != after {
            host_updates.push((host.id.clone(), before, after));
        }
    }
    if options.prune {
        for (host, before) in present.into_iter().filter(|(h, _)| !listed.contains(h.as_str())) {
            host_updates.push((host, before, Placement::default()));
        }
    }
    for (host, before, after) in host_updates {
        if !options.dry_run {
            tree::write_placement(&tx, &host, &before, &after, &node_ids)?;
        }
        summary.hosts_updated += 1;
        changes.push(host_change(&host, &before, &after));
    }
    if options.prune {
        let mut deletes: Vec<&tree::Node> = current.values().filter(|n| !desired.contains_key(&n.path)).collect();
        deletes.sort_by_key(|n| (std::cmp::Reverse(depth(&n.path)), n.path.clone()));
        for node in deletes {
            if !options.dry_run {
                tree::remove_node(&tx, node.id)?;
            }
            summary.nodes_deleted += 1;
            changes.push(Change {
                action: Action::NodeDelete,
                subject: node.path.clone(),
                before: Some(json!({ "path": node.path, "level": node.level })),
                after: None,
            });
        }
    }
    if !options.dry_run {
        audit::record(&tx, actor, &changes)?;
        tx.commit().ctx("commit import")?;
    }
    Ok(ImportReport { dry_run: options.dry_run, prune: options.prune, summary, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(value: Value) -> Inventory {
        parse_inventory(value.to_string().as_bytes()).expect("valid document")
    }

    fn inventory() -> Inventory {
        doc(json!({
            "nodes": [
                {"path": "ECS/OpenStack/Console", "level": "component"},
                {"path": "ECS", "level": "product"},
                {"path": "ECS/OpenStack", "level": "service"},
            ],
            "hosts": [
                {"id": "h1", "nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}},
                {"id": "h2", "nodes": ["ECS/OpenStack"]},
            ]
        }))
    }

    #[test]
    fn import_twice_changes_nothing_the_second_time_and_dry_runs_write_nothing() {
        let store = Store::open_for_test();
        let actor = Actor::default();
        let dry = import(&store, &inventory(), ImportOptions { dry_run: true, prune: false }, &actor).expect("dry run");
        assert_eq!(dry.summary, Summary { nodes_created: 3, nodes_updated: 0, nodes_deleted: 0, hosts_updated: 2 });
        assert_eq!(dry.changes[0].subject, "ECS", "parents first");
        assert!(tree::nodes(&store.conn()).expect("nodes").is_empty(), "a dry run writes nothing");
        let applied = import(&store, &inventory(), ImportOptions::default(), &actor).expect("apply");
        assert_eq!(applied.changes, dry.changes);
        let again = import(&store, &inventory(), ImportOptions::default(), &actor).expect("again");
        assert!(again.changes.is_empty(), "{:?}", again.changes);
        // What export answers imports as no change, with or without prune.
        let exported = serde_json::to_value(export(&store).expect("export")).expect("json");
        let round =
            import(&store, &doc(exported), ImportOptions { dry_run: false, prune: true }, &actor).expect("round");
        assert!(round.changes.is_empty(), "{:?}", round.changes);
        let (_, total) = audit::list(&store.conn(), 10, 0, None).expect("audit");
        assert_eq!(total, 5);
    }

    #[test]
    fn prune_removes_what_the_document_leaves_out() {
        let store = Store::open_for_test();
        let actor = Actor::default();
        import(&store, &inventory(), ImportOptions::default(), &actor).expect("apply");
        let smaller = doc(json!({
            "nodes": [{"path": "ECS", "level": "product"}, {"path": "ECS/OpenStack", "level": "service"}],
            "hosts": [{"id": "h2", "nodes": ["ECS/OpenStack"], "labels": {"role": "db"}}]
        }));
        let merged = import(&store, &smaller, ImportOptions { dry_run: true, prune: false }, &actor).expect("merge");
        assert_eq!(merged.summary.hosts_updated, 1);
        assert_eq!(merged.summary.nodes_deleted, 0);
        let pruned = import(&store, &smaller, ImportOptions { dry_run: false, prune: true }, &actor).expect("prune");
        assert_eq!(pruned.summary, Summary { nodes_created: 0, nodes_updated: 0, nodes_deleted: 1, hosts_updated: 2 });
        assert_eq!(pruned.changes.last().map(|c| c.action), Some(Action::NodeDelete));
        assert!(tree::placement(&store.conn(), "h1").expect("h1").is_empty());
    }

    #[test]
    fn bad_documents_change_nothing_and_name_the_entry() {
        let store = Store::open_for_test();
        let cases: Vec<(Value, Code, &str)> = vec![
            (json!({"nodes": [{"path": "ECS/", "level": "product"}]}), Code::InvalidPath, "nodes[0].path"),
            (json!({"nodes": [{"path": "ECS", "level": "team"}]}), Code::InvalidValue, "nodes[0].level"),
            (json!({"nodes": [{"path": "ECS"}]}), Code::MissingField, "nodes[0].level"),
            (json!({"nodes": [{"path": "ECS", "level": "product", "x": 1}]}), Code::UnknownField, "nodes[0].x"),
            (json!({"hosts": [{"id": "h 1"}]}), Code::InvalidValue, "hosts[0].id"),
            (json!({"hosts": [{"id": "h1"}, {"id": "h1"}]}), Code::InvalidValue, "hosts[1].id"),
            (json!({"hosts": [{"id": "h1", "labels": {"r": 1}}]}), Code::WrongType, "hosts[0].labels.r"),
            (json!({"nodes": {}}), Code::WrongType, "nodes"),
        ];
        for (value, code, field) in cases {
            let e = parse_inventory(value.to_string().as_bytes()).expect_err("refused");
            assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{value}: {}", e.message);
        }
        let tree_errors: Vec<(Value, Code, &str)> = vec![
            (json!({"nodes": [{"path": "ECS/OpenStack", "level": "service"}]}), Code::UnknownNode, "nodes[0].path"),
            (json!({"nodes": [{"path": "ECS", "level": "service"}]}), Code::LevelOutOfOrder, "nodes[0].level"),
            (
                json!({"nodes": [{"path": "ECS", "level": "product"}, {"path": "ECS/A", "level": "product"}]}),
                Code::LevelOutOfOrder,
                "nodes[1].level",
            ),
            (json!({"hosts": [{"id": "h1", "nodes": ["ECS"]}]}), Code::UnknownNode, "hosts[0].nodes[0]"),
        ];
        for (value, code, field) in tree_errors {
            let e =
                import(&store, &doc(value.clone()), ImportOptions::default(), &Actor::default()).expect_err("refused");
            assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{value}: {}", e.message);
        }
        assert!(tree::nodes(&store.conn()).expect("nodes").is_empty());
    }
}
