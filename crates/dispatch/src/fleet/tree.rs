//! The product tree and host placements in SQLite.
//!
//! The free functions at the top read and write rows on a connection or transaction the
//! caller holds; the operations below ([`create_node`], [`update_node`], [`delete_node`],
//! [`change_host`], …) each run one transaction on the store that checks the tree's rules,
//! applies the change and records it in the audit log, so a refused request changes nothing
//! and every change is logged.

use super::audit::{self, Action, Change};
use super::{is_at_or_below, level_fits, level_misfit, name_of, parent_of, Actor, Level, Placement};
use crate::db::{params, Connection, OptionalExtension};
use crate::error::ApiError;
use crate::store::{Context as _, Store, StoreError};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::unix_now_ms;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its row id, kept through renames and moves.
    pub id: i64,
    /// Its parent's row id; `None` for a root.
    pub parent_id: Option<i64>,
    /// Its path, e.g. `ECS/OpenStack/Console`.
    pub path: String,
    /// Its level.
    pub level: Level,
    /// Unix milliseconds of its creation.
    pub created_at_ms: i64,
    /// Unix milliseconds of its last rename, move or level change.
    pub updated_at_ms: i64,
}

impl Node {
    fn to_json(&self) -> Value {
        json!({ "path": self.path, "level": self.level })
    }
}

const NODE_COLUMNS: &str = "id, parent_id, path, level, created_at, updated_at";

fn node_from_row(row: &crate::db::Row) -> crate::db::Result<Result<Node, StoreError>> {
    let level: String = row.get(3)?;
    let path: String = row.get(2)?;
    let Some(level) = Level::parse_node_level(&level) else {
        return Ok(Err(StoreError::Corrupt(format!("fleet_nodes {path}: unknown level {level:?}"))));
    };
    Ok(Ok(Node {
        id: row.get(0)?,
        parent_id: row.get(1)?,
        path,
        level,
        created_at_ms: row.get(4)?,
        updated_at_ms: row.get(5)?,
    }))
}

/// The node at `path`, if any.
pub fn node(conn: &Connection, path: &str) -> Result<Option<Node>, StoreError> {
    conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM fleet_nodes WHERE path = ?1"))
        .and_then(|mut s| s.query_row([path], node_from_row).optional())
        .ctx("read node")?
        .transpose()
}

/// Every node, by path (so parents come before their children).
pub fn nodes(conn: &Connection) -> Result<Vec<Node>, StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM fleet_nodes ORDER BY path")).ctx("list nodes")?;
    let rows = stmt.query_map((), node_from_row).ctx("list nodes")?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.ctx("list nodes")??);
    }
    Ok(out)
}

/// The node at `path` and every node below it, deepest first.
fn subtree(conn: &Connection, path: &str) -> Result<Vec<Node>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {NODE_COLUMNS} FROM fleet_nodes
             WHERE path = ?1 OR substr(path, 1, length(?1) + 1) = ?1 || '/'
             ORDER BY length(path) - length(replace(path, '/', '')) DESC, path"
        ))
        .ctx("list subtree")?;
    let rows = stmt.query_map([path], node_from_row).ctx("list subtree")?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.ctx("list subtree")??);
    }
    Ok(out)
}

/// Hosts attached to the node at `path` or to any node below it.
pub fn hosts_at_or_below(conn: &Connection, path: &str) -> Result<BTreeSet<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT DISTINCT p.host FROM fleet_placements p JOIN fleet_nodes n ON n.id = p.node_id
             WHERE n.path = ?1 OR substr(n.path, 1, length(?1) + 1) = ?1 || '/'",
        )
        .ctx("list hosts below a node")?;
    let rows = stmt.query_map([path], |row| row.get::<_, String>(0)).ctx("list hosts below a node")?;
    rows.collect::<crate::db::Result<BTreeSet<_>>>().ctx("list hosts below a node")
}

/// Hosts attached to the node `node_id` itself.
fn direct_hosts(conn: &Connection, node_id: i64) -> Result<BTreeSet<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT host FROM fleet_placements WHERE node_id = ?1").ctx("list hosts of a node")?;
    let rows = stmt.query_map([node_id], |row| row.get::<_, String>(0)).ctx("list hosts of a node")?;
    rows.collect::<crate::db::Result<BTreeSet<_>>>().ctx("list hosts of a node")
}

/// Hosts that carry every label in `labels` (none for an empty map).
pub fn hosts_with_labels(conn: &Connection, labels: &BTreeMap<String, String>) -> Result<BTreeSet<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT host FROM fleet_labels WHERE key = ?1 AND value = ?2")
        .ctx("list hosts by label")?;
    let mut matching: Option<BTreeSet<String>> = None;
    for (key, value) in labels {
        let rows = stmt.query_map([key, value], |row| row.get::<_, String>(0)).ctx("list hosts by label")?;
        let hosts = rows.collect::<crate::db::Result<BTreeSet<_>>>().ctx("list hosts by label")?;
        matching = Some(match matching {
            None => hosts,
            Some(before) => before.intersection(&hosts).cloned().collect(),
        });
        if matching.as_ref().is_some_and(BTreeSet::is_empty) {
            break;
        }
    }
    Ok(matching.unwrap_or_default())
}

/// Where `host` sits and its labels.
pub fn placement(conn: &Connection, host: &str) -> Result<Placement, StoreError> {
    let mut nodes_stmt = conn
        .prepare_cached(
            "SELECT n.path FROM fleet_placements p JOIN fleet_nodes n ON n.id = p.node_id WHERE p.host = ?1",
        )
        .ctx("read host placement")?;
    let nodes = nodes_stmt
        .query_map([host], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<crate::db::Result<BTreeSet<_>>>())
        .ctx("read host placement")?;
    let mut labels_stmt =
        conn.prepare_cached("SELECT key, value FROM fleet_labels WHERE host = ?1").ctx("read host labels")?;
    let labels = labels_stmt
        .query_map([host], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
        .and_then(|rows| rows.collect::<crate::db::Result<BTreeMap<_, _>>>())
        .ctx("read host labels")?;
    Ok(Placement { nodes, labels })
}

/// Every host in the inventory (attached to a node or carrying a label), by id.
pub fn placements(conn: &Connection) -> Result<BTreeMap<String, Placement>, StoreError> {
    let mut out: BTreeMap<String, Placement> = BTreeMap::new();
    let mut stmt = conn
        .prepare_cached("SELECT p.host, n.path FROM fleet_placements p JOIN fleet_nodes n ON n.id = p.node_id")
        .ctx("list placements")?;
    let rows =
        stmt.query_map((), |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))).ctx("list placements")?;
    for row in rows {
        let (host, path) = row.ctx("list placements")?;
        out.entry(host).or_default().nodes.insert(path);
    }
    let mut stmt = conn.prepare_cached("SELECT host, key, value FROM fleet_labels").ctx("list labels")?;
    let rows = stmt
        .query_map((), |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?)))
        .ctx("list labels")?;
    for row in rows {
        let (host, key, value) = row.ctx("list labels")?;
        out.entry(host).or_default().labels.insert(key, value);
    }
    Ok(out)
}

/// Creates a node row under `parent_id`; returns its id.
pub(crate) fn insert_node(
    tx: &Connection,
    path: &str,
    level: Level,
    parent_id: Option<i64>,
) -> Result<i64, StoreError> {
    let now = unix_now_ms();
    tx.query_row(
        "INSERT INTO fleet_nodes (parent_id, path, level, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         RETURNING id",
        params![parent_id, path, level.as_str(), now],
        |row| row.get(0),
    )
    .ctx("create node")
}

/// Gives node `id` another level.
pub(crate) fn set_level(tx: &Connection, id: i64, level: Level) -> Result<(), StoreError> {
    tx.prepare_cached("UPDATE fleet_nodes SET level = ?2, updated_at = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, level.as_str(), unix_now_ms()]))
        .ctx("change node level")?;
    Ok(())
}

/// Deletes node `id`, which has no children and no hosts left.
pub(crate) fn remove_node(tx: &Connection, id: i64) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM fleet_nodes WHERE id = ?1").and_then(|mut s| s.execute([id])).ctx("delete node")?;
    Ok(())
}

/// Rewrites `host`'s rows from `before` to `after`; `node_ids` maps every path of
/// `after.nodes` to its node id.
pub(crate) fn write_placement(
    tx: &Connection,
    host: &str,
    before: &Placement,
    after: &Placement,
    node_ids: &BTreeMap<String, i64>,
) -> Result<(), StoreError> {
    let now = unix_now_ms();
    for path in before.nodes.difference(&after.nodes) {
        tx.prepare_cached(
            "DELETE FROM fleet_placements WHERE host = ?1 AND node_id = (SELECT id FROM fleet_nodes WHERE path = ?2)",
        )
        .and_then(|mut s| s.execute(params![host, path]))
        .ctx("detach host")?;
    }
    for path in after.nodes.difference(&before.nodes) {
        let id = node_ids.get(path).ok_or_else(|| StoreError::Corrupt(format!("node {path} has no id")))?;
        tx.prepare_cached(
            "INSERT INTO fleet_placements (host, node_id, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![host, id, now]))
        .ctx("attach host")?;
    }
    for key in before.labels.keys().filter(|k| !after.labels.contains_key(*k)) {
        tx.prepare_cached("DELETE FROM fleet_labels WHERE host = ?1 AND key = ?2")
            .and_then(|mut s| s.execute(params![host, key]))
            .ctx("remove label")?;
    }
    for (key, value) in &after.labels {
        if before.labels.get(key) != Some(value) {
            tx.prepare_cached(
                "INSERT INTO fleet_labels (host, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (host, key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute(params![host, key, value]))
            .ctx("set label")?;
        }
    }
    Ok(())
}

fn is_registered(conn: &Connection, host: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM hosts WHERE id = ?1").and_then(|mut s| s.exists([host])).ctx("look up host")
}

fn no_such_node(path: &str) -> ApiError {
    ApiError::general(Code::NoSuchNode, format!("no node {path}"))
}

/// A node in the whole-tree listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TreeNode {
    /// Its path.
    pub path: String,
    /// Its last name.
    pub name: String,
    /// Its level.
    pub level: Level,
    /// Distinct hosts attached to it or to any node below it.
    pub host_count: usize,
    /// Hosts attached to it directly.
    pub direct_host_count: usize,
    /// The nodes right below it, by name.
    pub children: Vec<TreeNode>,
}

/// The whole tree, roots by name, with host counts.
pub fn tree(store: &Store) -> Result<Vec<TreeNode>, ApiError> {
    let conn = store.conn();
    let all = nodes(&conn)?;
    // A node's parent always exists, so every ancestor of a host's node is a node.
    let mut below: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut direct: BTreeMap<String, usize> = BTreeMap::new();
    for (host, placement) in placements(&conn)? {
        for path in &placement.nodes {
            *direct.entry(path.clone()).or_default() += 1;
            let mut at = Some(path.as_str());
            while let Some(p) = at {
                below.entry(p.to_string()).or_default().insert(host.clone());
                at = parent_of(p);
            }
        }
    }
    fn build(
        parent: Option<&str>,
        all: &[Node],
        below: &BTreeMap<String, BTreeSet<String>>,
        direct: &BTreeMap<String, usize>,
    ) -> Vec<TreeNode> {
        all.iter()
            .filter(|n| parent_of(&n.path) == parent)
            .map(|n| TreeNode {
                path: n.path.clone(),
                name: name_of(&n.path).to_string(),
                level: n.level,
                host_count: below.get(&n.path).map_or(0, BTreeSet::len),
                direct_host_count: direct.get(&n.path).copied().unwrap_or(0),
                children: build(Some(&n.path), all, below, direct),
            })
            .collect()
    }
    Ok(build(None, &all, &below, &direct))
}

/// A host attached to a node, as `GET /v1/nodes/{path}` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachedHost {
    /// The host id.
    pub id: String,
    /// Whether its agent has registered.
    pub registered: bool,
}

/// A child in `GET /v1/nodes/{path}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildNode {
    /// Its path.
    pub path: String,
    /// Its level.
    pub level: Level,
    /// Distinct hosts at or below it.
    pub host_count: usize,
}

/// One node in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeDetail {
    /// Its path.
    pub path: String,
    /// Its last name.
    pub name: String,
    /// Its level.
    pub level: Level,
    /// Its parent's path (`null` for a product).
    pub parent: Option<String>,
    /// Unix milliseconds of its creation.
    pub created_at_ms: i64,
    /// Unix milliseconds of its last rename, move or level change.
    pub updated_at_ms: i64,
    /// Distinct hosts attached to it or below it.
    pub host_count: usize,
    /// The nodes right below it.
    pub children: Vec<ChildNode>,
    /// The hosts attached to it directly.
    pub hosts: Vec<AttachedHost>,
}

fn detail(conn: &Connection, path: &str) -> Result<NodeDetail, ApiError> {
    let node = node(conn, path)?.ok_or_else(|| no_such_node(path))?;
    let mut children = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM fleet_nodes WHERE parent_id = ?1 ORDER BY path"))
            .ctx("list children")?;
        let rows = stmt.query_map([node.id], node_from_row).ctx("list children")?;
        for row in rows {
            let child = row.ctx("list children")??;
            let host_count = hosts_at_or_below(conn, &child.path)?.len();
            children.push(ChildNode { path: child.path, level: child.level, host_count });
        }
    }
    let mut hosts = Vec::new();
    for id in direct_hosts(conn, node.id)? {
        let registered = is_registered(conn, &id)?;
        hosts.push(AttachedHost { id, registered });
    }
    Ok(NodeDetail {
        name: name_of(&node.path).to_string(),
        parent: parent_of(&node.path).map(str::to_string),
        host_count: hosts_at_or_below(conn, &node.path)?.len(),
        path: node.path,
        level: node.level,
        created_at_ms: node.created_at_ms,
        updated_at_ms: node.updated_at_ms,
        children,
        hosts,
    })
}

/// The node at `path` in detail, or `no_such_node`.
pub fn show_node(store: &Store, path: &str) -> Result<NodeDetail, ApiError> {
    detail(&store.conn(), path)
}

/// Creates the node `path` with `level`. Its parent must exist, and the level must fit:
/// products at the root, every other node strictly below its parent.
pub fn create_node(store: &Store, path: &str, level: Level, actor: &Actor) -> Result<NodeDetail, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin create node")?;
    if node(&tx, path)?.is_some() {
        return Err(ApiError::field(Code::NodeExists, "path", format!("node {path} already exists")));
    }
    let parent = match parent_of(path) {
        None => None,
        Some(parent_path) => Some(node(&tx, parent_path)?.ok_or_else(|| {
            ApiError::field(
                Code::UnknownNode,
                "path",
                format!("the parent of {path}, {parent_path}, does not exist; create it first"),
            )
        })?),
    };
    if !level_fits(level, parent.as_ref().map(|p| p.level)) {
        return Err(ApiError::field(
            Code::LevelOutOfOrder,
            "level",
            level_misfit(path, level, parent.as_ref().map(|p| (p.path.as_str(), p.level))),
        ));
    }
    insert_node(&tx, path, level, parent.map(|p| p.id))?;
    let change = Change {
        action: Action::NodeCreate,
        subject: path.to_string(),
        before: None,
        after: Some(json!({ "path": path, "level": level })),
    };
    audit::record(&tx, actor, &[change])?;
    let detail = detail(&tx, path)?;
    tx.commit().ctx("commit create node")?;
    Ok(detail)
}

/// What `PATCH /v1/nodes/{path}` changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUpdate {
    /// A new path: a rename (same parent) or a move (another parent).
    pub path: Option<String>,
    /// A new level.
    pub level: Option<Level>,
    /// Hosts to attach to the node.
    pub attach: Vec<String>,
    /// Hosts to detach from it.
    pub detach: Vec<String>,
}

/// Renames, moves or re-levels the node at `path`, and attaches or detaches hosts. The
/// node keeps its id, its hosts and its children, whose paths follow it.
pub fn update_node(store: &Store, path: &str, update: &NodeUpdate, actor: &Actor) -> Result<NodeDetail, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin update node")?;
    let current = node(&tx, path)?.ok_or_else(|| no_such_node(path))?;
    let new_path = update.path.clone().unwrap_or_else(|| current.path.clone());
    let new_level = update.level.unwrap_or(current.level);
    let mut changes = Vec::new();

    if new_path != current.path || new_level != current.level {
        if new_path != current.path {
            if is_at_or_below(&new_path, &current.path) {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "path",
                    format!("{path} cannot move below itself ({new_path})"),
                ));
            }
            if node(&tx, &new_path)?.is_some() {
                return Err(ApiError::field(Code::NodeExists, "path", format!("node {new_path} already exists")));
            }
        }
        let parent = match parent_of(&new_path) {
            None => None,
            Some(parent_path) => Some(node(&tx, parent_path)?.ok_or_else(|| {
                ApiError::field(Code::UnknownNode, "path", format!("the new parent {parent_path} does not exist"))
            })?),
        };
        if !level_fits(new_level, parent.as_ref().map(|p| p.level)) {
            let field = if update.level.is_some() { "level" } else { "path" };
            return Err(ApiError::field(
                Code::LevelOutOfOrder,
                field,
                level_misfit(&new_path, new_level, parent.as_ref().map(|p| (p.path.as_str(), p.level))),
            ));
        }
        let children: Vec<Node> =
            subtree(&tx, &current.path)?.into_iter().filter(|n| n.parent_id == Some(current.id)).collect();
        if let Some(child) = children.iter().find(|c| !level_fits(c.level, Some(new_level))) {
            return Err(ApiError::field(
                Code::LevelOutOfOrder,
                "level",
                format!(
                    "{} is a {}, which cannot sit below a {}; change or move it first",
                    child.path,
                    child.level.as_str(),
                    new_level.as_str()
                ),
            ));
        }
        let now = unix_now_ms();
        // Descendants first: their new paths are under `new_path`, where nothing exists.
        tx.prepare_cached(
            "UPDATE fleet_nodes SET path = ?2 || substr(path, length(?1) + 1), updated_at = ?3
             WHERE substr(path, 1, length(?1) + 1) = ?1 || '/'",
        )
        .and_then(|mut s| s.execute(params![current.path, new_path, now]))
        .ctx("move descendants")?;
        tx.prepare_cached(
            "UPDATE fleet_nodes SET path = ?2, parent_id = ?3, level = ?4, updated_at = ?5 WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![current.id, new_path, parent.map(|p| p.id), new_level.as_str(), now]))
        .ctx("update node")?;
        changes.push(Change {
            action: Action::NodeUpdate,
            subject: current.path.clone(),
            before: Some(current.to_json()),
            after: Some(json!({ "path": new_path, "level": new_level })),
        });
    }

    let node_ids = BTreeMap::from([(new_path.clone(), current.id)]);
    // host → (attach or detach, its index in that list)
    let mut hosts: BTreeMap<&str, (bool, usize)> = BTreeMap::new();
    for (index, host) in update.attach.iter().enumerate() {
        hosts.insert(host, (true, index));
    }
    for (index, host) in update.detach.iter().enumerate() {
        if let Some((_, at)) = hosts.get(host.as_str()) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("detach[{index}]"),
                format!("host {host:?} is also in attach[{at}]"),
            ));
        }
        hosts.insert(host, (false, index));
    }
    for (host, (attach, _)) in hosts {
        let before = placement(&tx, host)?;
        let mut after = before.clone();
        if attach {
            after.nodes.insert(new_path.clone());
        } else {
            after.nodes.remove(&new_path);
        }
        if after != before {
            write_placement(&tx, host, &before, &after, &node_ids)?;
            changes.push(host_change(host, &before, &after));
        }
    }
    audit::record(&tx, actor, &changes)?;
    let detail = detail(&tx, &new_path)?;
    tx.commit().ctx("commit update node")?;
    Ok(detail)
}

pub(crate) fn host_change(host: &str, before: &Placement, after: &Placement) -> Change {
    Change {
        action: Action::HostUpdate,
        subject: host.to_string(),
        before: Some(before.to_json()),
        after: Some(after.to_json()),
    }
}

/// What a delete removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// The nodes deleted, deepest first.
    pub deleted: Vec<String>,
    /// The hosts detached from them.
    pub detached: Vec<String>,
}

/// Deletes the node at `path`. Refused (`node_not_empty`) while it has children or hosts,
/// unless `cascade`: then its whole subtree goes and its hosts are detached from it (they
/// stay in the inventory with their other nodes and labels).
pub fn delete_node(store: &Store, path: &str, cascade: bool, actor: &Actor) -> Result<Deleted, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin delete node")?;
    let doomed = subtree(&tx, path)?;
    if doomed.is_empty() {
        return Err(no_such_node(path));
    }
    let hosts = hosts_at_or_below(&tx, path)?;
    if !cascade && (doomed.len() > 1 || !hosts.is_empty()) {
        return Err(ApiError::general(
            Code::NodeNotEmpty,
            format!(
                "{path} still has {} node(s) below it and {} host(s) at or below it; \
                 detach and delete them first, or delete with ?cascade=true",
                doomed.len() - 1,
                hosts.len()
            ),
        ));
    }
    let mut changes = Vec::new();
    for host in &hosts {
        let before = placement(&tx, host)?;
        let mut after = before.clone();
        after.nodes.retain(|p| !is_at_or_below(p, path));
        write_placement(&tx, host, &before, &after, &BTreeMap::new())?;
        changes.push(host_change(host, &before, &after));
    }
    let mut deleted = Vec::new();
    for node in &doomed {
        remove_node(&tx, node.id)?;
        changes.push(Change {
            action: Action::NodeDelete,
            subject: node.path.clone(),
            before: Some(node.to_json()),
            after: None,
        });
        deleted.push(node.path.clone());
    }
    audit::record(&tx, actor, &changes)?;
    tx.commit().ctx("commit delete node")?;
    Ok(Deleted { deleted, detached: hosts.into_iter().collect() })
}

/// A change to one host's placement: what `PUT` and `PATCH /v1/hosts/{id}` ask for. Each
/// node path comes with the request field it came from, for errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostChange {
    /// The host's nodes, replacing its current ones.
    pub nodes: Option<Vec<(String, String)>>,
    /// Nodes to attach the host to.
    pub attach: Vec<(String, String)>,
    /// Nodes to detach it from.
    pub detach: Vec<(String, String)>,
    /// Its labels, replacing its current ones.
    pub labels: Option<BTreeMap<String, String>>,
    /// Labels to set (`Some`) or remove (`None`), the others kept.
    pub label_changes: BTreeMap<String, Option<String>>,
}

/// A host's placement as `PUT`/`PATCH /v1/hosts/{id}` answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPlacement {
    /// The host id.
    pub id: String,
    /// Whether its agent has registered.
    pub registered: bool,
    /// Paths of its nodes.
    pub nodes: BTreeSet<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Changes where `host` sits and its labels. Every node named must exist
/// (`unknown_node`). A host left with no node and no label leaves the inventory.
pub fn change_host(store: &Store, host: &str, change: &HostChange, actor: &Actor) -> Result<HostPlacement, ApiError> {
    let mut conn = store.conn();
    let tx = conn.transaction().ctx("begin change host")?;
    let before = placement(&tx, host)?;
    let mut after = before.clone();
    let mut node_ids = BTreeMap::new();
    let mut known = |path: &str, field: &str| -> Result<(), ApiError> {
        let node =
            node(&tx, path)?.ok_or_else(|| ApiError::field(Code::UnknownNode, field, format!("no node {path}")))?;
        node_ids.insert(node.path, node.id);
        Ok(())
    };
    if let Some(nodes) = &change.nodes {
        after.nodes.clear();
        for (path, field) in nodes {
            known(path, field)?;
            after.nodes.insert(path.clone());
        }
    }
    for (path, field) in &change.attach {
        known(path, field)?;
        after.nodes.insert(path.clone());
    }
    for (path, field) in &change.detach {
        known(path, field)?;
        after.nodes.remove(path);
    }
    if let Some(labels) = &change.labels {
        after.labels = labels.clone();
    }
    for (key, value) in &change.label_changes {
        match value {
            Some(value) => after.labels.insert(key.clone(), value.clone()),
            None => after.labels.remove(key),
        };
    }
    if after.labels.len() > super::MAX_LABELS {
        return Err(ApiError::field(
            Code::InvalidValue,
            "labels",
            format!("the host would carry {} labels; at most {} are allowed", after.labels.len(), super::MAX_LABELS),
        ));
    }
    if after != before {
        write_placement(&tx, host, &before, &after, &node_ids)?;
        audit::record(&tx, actor, &[host_change(host, &before, &after)])?;
    }
    let registered = is_registered(&tx, host)?;
    tx.commit().ctx("commit change host")?;
    Ok(HostPlacement { id: host.to_string(), registered, nodes: after.nodes, labels: after.labels })
}

/// A registered host as `GET /v1/hosts` shows it: its registration, the facts its agent
/// reported, and where it sits in the fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    /// The host id.
    pub id: String,
    /// The hostname the agent reported.
    pub hostname: String,
    /// Unix milliseconds of the first registration.
    pub registered_at_ms: i64,
    /// Unix milliseconds of the latest registration.
    pub last_seen_ms: i64,
    /// The facts the agent reported at its latest registration (`null` if it sent none).
    pub facts: Option<Value>,
    /// Unix milliseconds of those facts.
    pub facts_at_ms: Option<i64>,
    /// Paths of its nodes.
    pub nodes: BTreeSet<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The effective task set its agent last said it applied.
    pub tasks_applied: Option<AppliedTasks>,
}

/// What an agent reported of its standing tasks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppliedTasks {
    /// The digest of the signed set it runs (see `GET /v1/hosts/{id}/tasks/signed`).
    pub digest: String,
    /// Unix milliseconds when it first reported this digest.
    pub since_ms: Option<i64>,
    /// Whether that is the set the tree gives it now (only in `GET /v1/hosts/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<bool>,
}

fn host_views(conn: &Connection, only: Option<&str>) -> Result<Vec<HostView>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, hostname, registered_at, last_seen, facts, facts_at, tasks_digest, tasks_digest_at FROM hosts
             WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        )
        .ctx("list hosts")?;
    let rows = stmt
        .query_map([only], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, Option<i64>>(5)?,
                row.get::<_, Option<String>>(6)?,
                row.get::<_, Option<i64>>(7)?,
            ))
        })
        .ctx("list hosts")?;
    let mut all = match only {
        Some(host) => BTreeMap::from([(host.to_string(), placement(conn, host)?)]),
        None => placements(conn)?,
    };
    let mut out = Vec::new();
    for row in rows {
        let (id, hostname, registered_at_ms, last_seen_ms, facts, facts_at_ms, digest, since_ms) =
            row.ctx("list hosts")?;
        let tasks_applied = digest.map(|digest| AppliedTasks { digest, since_ms, current: None });
        let facts = facts
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("hosts {id}: facts: {e}")))?;
        let Placement { nodes, labels } = all.remove(&id).unwrap_or_default();
        out.push(HostView {
            id,
            hostname,
            registered_at_ms,
            last_seen_ms,
            facts,
            facts_at_ms,
            nodes,
            labels,
            tasks_applied,
        });
    }
    Ok(out)
}

/// Every registered host, by id.
pub fn registered_hosts(store: &Store) -> Result<Vec<HostView>, StoreError> {
    host_views(&store.conn(), None)
}

/// The registered host `id`, if it is.
pub fn registered_host(store: &Store, id: &str) -> Result<Option<HostView>, StoreError> {
    Ok(host_views(&store.conn(), Some(id))?.pop())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor() -> Actor {
        Actor { token: Some("ops".into()), client: Some("127.0.0.1".into()) }
    }

    fn tree_store() -> Store {
        let store = Store::open_for_test();
        for (path, level) in [
            ("ECS", Level::Product),
            ("ECS/OpenStack", Level::Service),
            ("ECS/OpenStack/Console", Level::Component),
            ("ECS/OpenStack/DB", Level::Component),
            ("RDS", Level::Product),
        ] {
            create_node(&store, path, level, &actor()).expect(path);
        }
        store
    }

    fn attach(store: &Store, host: &str, paths: &[&str]) {
        let change = HostChange {
            nodes: Some(paths.iter().map(|p| (p.to_string(), "nodes".to_string())).collect()),
            ..HostChange::default()
        };
        change_host(store, host, &change, &actor()).expect("attach");
    }

    #[test]
    fn nodes_need_their_parent_and_a_level_below_it() {
        let store = tree_store();
        let e = create_node(&store, "ECS", Level::Product, &actor()).expect_err("exists");
        assert_eq!((e.code, e.field.as_deref()), (Code::NodeExists, Some("path")));
        let e = create_node(&store, "ECS/Nova/API", Level::Component, &actor()).expect_err("no parent");
        assert_eq!((e.code, e.field.as_deref()), (Code::UnknownNode, Some("path")));
        let e = create_node(&store, "ECS/OpenStack/Console/X", Level::Component, &actor());
        assert_eq!(e.map_err(|e| e.code).err(), Some(Code::LevelOutOfOrder));
        let e = create_node(&store, "OSS", Level::Service, &actor()).expect_err("root service");
        assert_eq!((e.code, e.field.as_deref()), (Code::LevelOutOfOrder, Some("level")));
        let e = create_node(&store, "ECS/Nova", Level::Product, &actor()).expect_err("product below");
        assert_eq!(e.code, Code::LevelOutOfOrder);
        // A component straight under a product (no separate services) is fine.
        create_node(&store, "RDS/Proxy", Level::Component, &actor()).expect("component under product");
    }

    #[test]
    fn counts_and_details_see_hosts_at_any_depth() {
        let store = tree_store();
        attach(&store, "h1", &["ECS/OpenStack/Console"]);
        attach(&store, "h2", &["ECS/OpenStack/Console", "ECS/OpenStack/DB"]);
        attach(&store, "h3", &["ECS/OpenStack"]);
        let roots = tree(&store).expect("tree");
        assert_eq!(roots.iter().map(|n| n.path.as_str()).collect::<Vec<_>>(), ["ECS", "RDS"]);
        let ecs = &roots[0];
        assert_eq!((ecs.host_count, ecs.direct_host_count), (3, 0));
        let openstack = &ecs.children[0];
        assert_eq!((openstack.host_count, openstack.direct_host_count), (3, 1));
        assert_eq!(openstack.children.iter().map(|c| c.host_count).collect::<Vec<_>>(), [2, 1]);
        let detail = show_node(&store, "ECS/OpenStack").expect("show");
        assert_eq!(detail.parent.as_deref(), Some("ECS"));
        assert_eq!(detail.hosts, [AttachedHost { id: "h3".into(), registered: false }]);
        assert_eq!(detail.children.len(), 2);
        assert_eq!(show_node(&store, "ECS/Nope").map_err(|e| e.code).err(), Some(Code::NoSuchNode));
    }

    #[test]
    fn rename_and_move_carry_children_and_hosts() {
        let store = tree_store();
        attach(&store, "h1", &["ECS/OpenStack/Console"]);
        let update = NodeUpdate { path: Some("RDS/OpenStack".into()), ..NodeUpdate::default() };
        let moved = update_node(&store, "ECS/OpenStack", &update, &actor()).expect("move");
        assert_eq!(moved.host_count, 1);
        assert_eq!(
            placement(&store.conn(), "h1").expect("placement").nodes,
            BTreeSet::from(["RDS/OpenStack/Console".to_string()])
        );
        assert!(node(&store.conn(), "RDS/OpenStack/DB").expect("read").is_some());
        assert!(node(&store.conn(), "ECS/OpenStack").expect("read").is_none());
        // Below itself, onto an existing node, under a missing parent, out of level order.
        let cases = [
            ("RDS/OpenStack", "RDS/OpenStack/Console/X", Code::InvalidValue),
            ("RDS/OpenStack", "ECS", Code::NodeExists),
            ("RDS/OpenStack", "OSS/OpenStack", Code::UnknownNode),
            ("RDS/OpenStack/Console", "Console", Code::LevelOutOfOrder),
        ];
        for (from, to, code) in cases {
            let update = NodeUpdate { path: Some(to.into()), ..NodeUpdate::default() };
            let e = update_node(&store, from, &update, &actor()).expect_err(to);
            assert_eq!((e.code, e.field.as_deref()), (code, Some("path")), "{to}: {}", e.message);
        }
        // A service with components cannot become a component.
        let update = NodeUpdate { level: Some(Level::Component), ..NodeUpdate::default() };
        let e = update_node(&store, "RDS/OpenStack", &update, &actor()).expect_err("children");
        assert_eq!((e.code, e.field.as_deref()), (Code::LevelOutOfOrder, Some("level")));
        // Attach and detach through the node.
        let update = NodeUpdate { attach: vec!["h2".into()], detach: vec!["h1".into()], ..NodeUpdate::default() };
        let detail = update_node(&store, "RDS/OpenStack/Console", &update, &actor()).expect("attach");
        assert_eq!(detail.hosts.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["h2"]);
        assert!(placement(&store.conn(), "h1").expect("placement").is_empty());
    }

    #[test]
    fn delete_refuses_non_empty_nodes_unless_cascading() {
        let store = tree_store();
        attach(&store, "h1", &["ECS/OpenStack/Console", "RDS"]);
        let e = delete_node(&store, "ECS/OpenStack", false, &actor()).expect_err("children");
        assert_eq!(e.code, Code::NodeNotEmpty);
        let e = delete_node(&store, "ECS/OpenStack/Console", false, &actor()).expect_err("hosts");
        assert_eq!(e.code, Code::NodeNotEmpty);
        delete_node(&store, "ECS/OpenStack/DB", false, &actor()).expect("empty leaf");
        let deleted = delete_node(&store, "ECS", true, &actor()).expect("cascade");
        assert_eq!(deleted.deleted, ["ECS/OpenStack/Console", "ECS/OpenStack", "ECS"]);
        assert_eq!(deleted.detached, ["h1"]);
        assert_eq!(placement(&store.conn(), "h1").expect("placement").nodes, BTreeSet::from(["RDS".to_string()]));
        assert_eq!(delete_node(&store, "ECS", true, &actor()).map_err(|e| e.code).err(), Some(Code::NoSuchNode));
    }

    #[test]
    fn host_changes_replace_or_merge_and_are_logged_only_when_they_change_something() {
        let store = tree_store();
        let change = HostChange {
            nodes: Some(vec![("ECS/OpenStack/Console".into(), "nodes[0]".into())]),
            labels: Some(BTreeMap::from([("role".into(), "web".into()), ("dc".into(), "hz1".into())])),
            ..HostChange::default()
        };
        let placed = change_host(&store, "h1", &change, &actor()).expect("put");
        assert!(!placed.registered);
        change_host(&store, "h1", &change, &actor()).expect("same again");
        let merge = HostChange {
            attach: vec![("ECS/OpenStack/DB".into(), "attach[0]".into())],
            label_changes: BTreeMap::from([("dc".into(), None), ("tier".into(), Some("1".into()))]),
            ..HostChange::default()
        };
        let placed = change_host(&store, "h1", &merge, &actor()).expect("patch");
        assert_eq!(placed.nodes.len(), 2);
        assert_eq!(placed.labels, BTreeMap::from([("role".into(), "web".into()), ("tier".into(), "1".into())]));
        let bad = HostChange { attach: vec![("ECS/Nope".into(), "attach[0]".into())], ..HostChange::default() };
        let e = change_host(&store, "h1", &bad, &actor()).expect_err("unknown node");
        assert_eq!((e.code, e.field.as_deref()), (Code::UnknownNode, Some("attach[0]")));
        let (entries, total) = audit::list(&store.conn(), 50, 0, Some("h1")).expect("audit");
        assert_eq!(total, 2, "{entries:?}");
        assert_eq!(entries[0].actor.as_deref(), Some("ops"));
        assert_eq!(entries[0].change.after.as_ref().expect("after")["labels"]["tier"], "1");
        // Registration never touches the placement.
        store.upsert_host_with_facts("h1", "h1.example", Some(r#"{"cpu_count": 4}"#)).expect("register");
        store.upsert_host("h1", "h1.example").expect("register again without facts");
        let view = registered_host(&store, "h1").expect("read").expect("registered");
        assert_eq!(view.nodes.len(), 2);
        assert_eq!(view.facts, Some(json!({"cpu_count": 4})));
    }
}
