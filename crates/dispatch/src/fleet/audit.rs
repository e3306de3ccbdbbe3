//! The fleet's change log: every change to the tree, a host's placement or its labels, with
//! who made it (the token's name and the client's address) and when, written in the same
//! transaction as the change itself, so the log and the tree never disagree.

use super::Actor;
use crate::db::{params, Connection};
use crate::store::{Context as _, StoreError};
use polaris_ops_wire::wire::unix_now_ms;
use serde::Serialize;
use serde_json::Value;

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A node was created.
    NodeCreate,
    /// A node was renamed, moved or given another level.
    NodeUpdate,
    /// A node was deleted.
    NodeDelete,
    /// A host's nodes or labels changed (attach, detach, labels, removal from the inventory).
    HostUpdate,
    /// A standing task was created or changed at one attach point.
    TaskSet,
    /// A standing task was deleted from one attach point.
    TaskDelete,
}

impl Action {
    /// The name used in the log and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::NodeCreate => "node.create",
            Action::NodeUpdate => "node.update",
            Action::NodeDelete => "node.delete",
            Action::HostUpdate => "host.update",
            Action::TaskSet => "task.set",
            Action::TaskDelete => "task.delete",
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One change: its subject (a node path or a host id) before and after. A created node has
/// no `before`, a deleted one no `after`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// What happened.
    pub action: Action,
    /// The node path (its path before, for a rename) or the host id.
    pub subject: String,
    /// The subject before the change.
    pub before: Option<Value>,
    /// The subject after the change.
    pub after: Option<Value>,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Its position in the log (increasing).
    pub seq: i64,
    /// Unix milliseconds of the change.
    pub at_ms: i64,
    /// The token's name; `null` when tokens are off.
    pub actor: Option<String>,
    /// The client's address.
    pub client: Option<String>,
    /// The change.
    #[serde(flatten)]
    pub change: Change,
}

/// Writes `changes` to the log, on the caller's transaction.
pub fn record(tx: &Connection, actor: &Actor, changes: &[Change]) -> Result<(), StoreError> {
    let now = unix_now_ms();
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO fleet_audit (at, actor, client, action, subject, before, after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .ctx("prepare audit insert")?;
    for change in changes {
        insert
            .execute(params![
                now,
                actor.token,
                actor.client,
                change.action.as_str(),
                change.subject,
                change.before.as_ref().map(Value::to_string),
                change.after.as_ref().map(Value::to_string)
            ])
            .ctx("record a change in the audit log")?;
    }
    Ok(())
}

/// A page of the log, newest first, and how many entries match; only those about `subject`
/// when it is given.
pub fn list(
    conn: &Connection,
    limit: u32,
    offset: u64,
    subject: Option<&str>,
) -> Result<(Vec<Entry>, u64), StoreError> {
    let total: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM fleet_audit WHERE ?1 IS NULL OR subject = ?1")
        .and_then(|mut s| s.query_row([subject], |row| row.get(0)))
        .ctx("count audit entries")?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, at, actor, client, action, subject, before, after FROM fleet_audit
             WHERE ?1 IS NULL OR subject = ?1 ORDER BY seq DESC LIMIT ?2 OFFSET ?3",
        )
        .ctx("list audit entries")?;
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(params![subject, limit, offset], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, Option<String>>(6)?,
                row.get::<_, Option<String>>(7)?,
            ))
        })
        .ctx("list audit entries")?;
    let mut entries = Vec::new();
    for row in rows {
        let (seq, at_ms, actor, client, action, subject, before, after) = row.ctx("list audit entries")?;
        let action = match action.as_str() {
            "node.create" => Action::NodeCreate,
            "node.update" => Action::NodeUpdate,
            "node.delete" => Action::NodeDelete,
            "host.update" => Action::HostUpdate,
            "task.set" => Action::TaskSet,
            "task.delete" => Action::TaskDelete,
            other => return Err(StoreError::Corrupt(format!("fleet_audit row {seq}: unknown action {other:?}"))),
        };
        let json = |text: Option<String>, column: &str| -> Result<Option<Value>, StoreError> {
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("fleet_audit row {seq}, column {column}: {e}")))
        };
        let change = Change { action, subject, before: json(before, "before")?, after: json(after, "after")? };
        entries.push(Entry { seq, at_ms, actor, client, change });
    }
    Ok((entries, total as u64))
}
