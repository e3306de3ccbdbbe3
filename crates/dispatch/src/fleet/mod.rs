//! The fleet model: the product tree and the hosts placed in it.
//!
//! Ops teams think in a tree, not in host lists: products sold outside (ECS, RDS, …) and
//! internal platforms at the top, services (one team each) below them, components
//! (Console, DB, Server, …) below those, and hosts at the bottom. A node is addressed by
//! its path (`ECS/OpenStack/Console`) and has a [`Level`]; a host may sit under several
//! nodes and carries free-form labels (`{"role": "web"}`). Jobs can then be aimed at a
//! *target* (nodes, labels, hosts, exclusions) instead of a host list, and their queue
//! priority follows the level they were aimed at.
//!
//! # Layout
//! - this file: the vocabulary: [`Level`], node paths, labels, [`Placement`], [`Actor`].
//! - [`tree`]: nodes and placements in SQLite: create, show, rename or move, delete, attach
//!   and detach hosts, set labels; every change goes through [`audit`] in the same
//!   transaction.
//! - [`target`]: the `target` of a job: parsing, resolution to hosts, the level and the
//!   queue priority it gives.
//! - [`import`]: the whole inventory as one document: export, and an idempotent import
//!   with a dry run.
//! - [`audit`]: the log of every change to the tree (who, when, before, after).
//! - [`tasks`]: standing tasks attached to nodes and hosts, and a host's effective set.
//! - [`schedule`]: the scheduler that turns due `schedule` tasks into jobs, and their
//!   history.
//! - [`api`]: the REST routes (`/v1/nodes`, `/v1/targets/resolve`, `/v1/fleet…`, and
//!   `PUT`/`PATCH /v1/hosts/{id}`).
//!
//! # Storage
//! Tables `fleet_nodes` (id, parent, path, level), `fleet_placements` (host, node),
//! `fleet_labels` (host, key, value) and `fleet_audit`, created by the store's migrations.
//! A node keeps its integer id through renames and moves, so what attaches to nodes later
//! (standing tasks) references `fleet_nodes(id)`, and what attaches to hosts references the
//! host id. The inventory may name hosts whose agent never registered; registration (the
//! `hosts` table) never touches these tables, so it can never erase a placement.

pub mod api;
pub mod audit;
pub mod import;
pub mod schedule;
pub mod target;
pub mod tasks;
pub mod tree;

use crate::error::ApiError;
use polaris_ops_wire::codes::Code;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Where a node sits in the product tree, or (for jobs) what a target was aimed at.
/// Broadest first: a root is a product, and every child is strictly below its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// A product sold outside, or an internal platform: the roots of the tree.
    Product,
    /// A service, run by one team.
    Service,
    /// A component of a service (Console, DB, Server, …).
    Component,
    /// A single host; not a node level, only the level of work aimed at hosts by name.
    Host,
}

impl Level {
    /// The levels a node may have.
    pub const NODE_LEVELS: [Level; 3] = [Level::Product, Level::Service, Level::Component];

    /// The name used in requests, replies and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Product => "product",
            Level::Service => "service",
            Level::Component => "component",
            Level::Host => "host",
        }
    }

    /// Parses any level name, `host` included.
    pub fn parse(name: &str) -> Option<Level> {
        match name {
            "product" => Some(Level::Product),
            "service" => Some(Level::Service),
            "component" => Some(Level::Component),
            "host" => Some(Level::Host),
            _ => None,
        }
    }

    /// Parses the level of a node (`product`, `service` or `component`).
    pub fn parse_node_level(name: &str) -> Option<Level> {
        Level::parse(name).filter(|l| *l != Level::Host)
    }

    /// How broad the level is: 0 for a host, 3 for a product.
    pub fn breadth(self) -> u32 {
        match self {
            Level::Host => 0,
            Level::Component => 1,
            Level::Service => 2,
            Level::Product => 3,
        }
    }
}

impl Serialize for Level {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Whether a node of level `child` may sit under a node of level `parent` (`None`: at the
/// root). Roots are products; a child is strictly below its parent, so a component may sit
/// directly under a product that has no separate services, and the tree is at most three
/// deep.
pub fn level_fits(child: Level, parent: Option<Level>) -> bool {
    match parent {
        None => child == Level::Product,
        Some(parent) => child != Level::Host && child > parent,
    }
}

/// Why `child` cannot sit under `parent`, for error messages.
pub fn level_misfit(path: &str, child: Level, parent: Option<(&str, Level)>) -> String {
    match parent {
        None => format!("{path} is at the root, where only products sit; it cannot be a {}", child.as_str()),
        Some((parent_path, parent_level)) => format!(
            "{path} cannot be a {} under {parent_path}, a {}: each node must be below its parent \
             (product, then service, then component)",
            child.as_str(),
            parent_level.as_str()
        ),
    }
}

/// Longest segment of a node path, in bytes.
pub const MAX_SEGMENT_LEN: usize = 64;
/// Most segments in a node path (product/service/component).
pub const MAX_DEPTH: usize = 3;

/// What a node path is, for error messages.
pub fn path_rule() -> String {
    format!(
        "1 to {MAX_DEPTH} names separated by /, each 1 to {MAX_SEGMENT_LEN} bytes of A-Z a-z 0-9 . _ -, \
         not starting with - or ."
    )
}

/// Checks a node path such as `ECS/OpenStack/Console`; `Err` says what is wrong.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > MAX_DEPTH {
        return Err(format!("{path:?} has {} levels; the tree has at most {MAX_DEPTH}", segments.len()));
    }
    for segment in segments {
        if segment.is_empty() {
            return Err(format!("{path:?} has an empty name (a leading, trailing or doubled /)"));
        }
        let valid = segment.len() <= MAX_SEGMENT_LEN
            && !segment.starts_with(['-', '.'])
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(format!("{segment:?} in {path:?} is not a valid node name"));
        }
    }
    Ok(())
}

/// A checked path, or an `invalid_path` error about `field`.
pub fn valid_path(path: &str, field: &str) -> Result<(), ApiError> {
    check_path(path)
        .map_err(|why| ApiError::field(Code::InvalidPath, field, format!("{why}: a path is {}", path_rule())))
}

/// The parent of `path` (`None` at the root).
pub fn parent_of(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

/// The last name of `path`.
pub fn name_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// Whether `path` is `ancestor` or below it.
pub fn is_at_or_below(path: &str, ancestor: &str) -> bool {
    path == ancestor || (path.starts_with(ancestor) && path.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 255;
/// Most labels one host may carry.
pub const MAX_LABELS: usize = 64;

/// Checks a label key: 1 to 63 bytes of `A-Z a-z 0-9 . _ - /`, starting with a letter or digit.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= MAX_LABEL_KEY_LEN
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label key {key:?} must be 1 to {MAX_LABEL_KEY_LEN} bytes of A-Z a-z 0-9 . _ - /, starting with a letter or digit"
        ))
    }
}

/// Checks a label value: 1 to 255 bytes, no control characters.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
        Err(format!("label value {value:?} must be 1 to {MAX_LABEL_VALUE_LEN} bytes without control characters"))
    } else {
        Ok(())
    }
}

/// Where a host sits in the tree and its labels: what `PUT /v1/hosts/{id}` sets and the
/// inventory document lists. A host with neither is not in the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Paths of the nodes the host is attached to.
    pub nodes: BTreeSet<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl Placement {
    /// Whether the host is in the inventory at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.labels.is_empty()
    }

    /// As JSON, for replies and the audit log.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "nodes": self.nodes, "labels": self.labels })
    }
}

/// Who makes a change, as the audit log records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// The name of the caller's token (`None` when tokens are off).
    pub token: Option<String>,
    /// The caller's address.
    pub client: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_segment_by_segment() {
        for good in ["ECS", "ECS/OpenStack", "ECS/OpenStack/Console", "rds.v2/my_sql/db-1"] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
        for bad in ["", "/ECS", "ECS/", "ECS//Console", "a/b/c/d", "ECS/Open Stack", "ECS/-x", ".x", "ECS/Ü"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&"x".repeat(MAX_SEGMENT_LEN)).is_ok());
        assert!(check_path(&"x".repeat(MAX_SEGMENT_LEN + 1)).is_err());
        assert_eq!(parent_of("ECS/OpenStack/Console"), Some("ECS/OpenStack"));
        assert_eq!(parent_of("ECS"), None);
        assert_eq!(name_of("ECS/OpenStack"), "OpenStack");
        assert!(is_at_or_below("ECS/OpenStack", "ECS"));
        assert!(is_at_or_below("ECS", "ECS"));
        assert!(!is_at_or_below("ECS2/OpenStack", "ECS"));
    }

    #[test]
    fn levels_go_down_the_tree() {
        assert!(level_fits(Level::Product, None));
        assert!(!level_fits(Level::Service, None));
        assert!(level_fits(Level::Service, Some(Level::Product)));
        assert!(level_fits(Level::Component, Some(Level::Service)));
        assert!(level_fits(Level::Component, Some(Level::Product)));
        assert!(!level_fits(Level::Service, Some(Level::Service)));
        assert!(!level_fits(Level::Product, Some(Level::Component)));
        assert!(!level_fits(Level::Host, Some(Level::Component)));
        assert_eq!(Level::parse_node_level("host"), None);
        for level in Level::NODE_LEVELS {
            assert_eq!(Level::parse_node_level(level.as_str()), Some(level));
        }
    }

    #[test]
    fn labels_are_checked() {
        assert!(check_label_key("role").is_ok());
        assert!(check_label_key("example.com/tier").is_ok());
        for bad in ["", "-x", "a b", &"k".repeat(MAX_LABEL_KEY_LEN + 1)] {
            assert!(check_label_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_label_value("web").is_ok());
        assert!(check_label_value("").is_err());
        assert!(check_label_value("a\nb").is_err());
    }
}
