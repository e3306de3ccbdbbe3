//! The fleet's REST routes: `/v1/nodes`, `/v1/targets/resolve`, `/v1/fleet`,
//! `/v1/fleet/import`, `/v1/fleet/audit`, and `PUT`/`PATCH /v1/hosts/{id}` (registered with
//! the other `/v1/hosts/{id}` methods in [`crate::api::router`]).
//!
//! Reading needs any valid token; changing the tree, a host's placement or labels, and
//! applying an import need one with `manage_fleet` (a dry-run import only reads). Every
//! change is recorded in the audit log with the token's name and the client's address.

use super::import::{self, ImportOptions};
use super::target;
use super::tasks;
use super::tree::{self, HostChange, NodeUpdate};
use super::{valid_path, Actor, Level};
use crate::api::{authenticate, blocking, next_offset, page, page_limit, page_param, AppState, IdParam};
use crate::error::ApiError;
use crate::request::{parse_object, reject_unknown_fields, required_string, type_name};
use crate::Dispatcher;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::host_id::is_valid_host_id;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// Largest inventory document `POST /v1/fleet/import` takes, in bytes (other endpoints
/// take [`crate::api::MAX_BODY_BYTES`]).
pub const MAX_IMPORT_BYTES: usize = 32 * 1024 * 1024;
/// Most hosts one `PATCH /v1/nodes/{path}` may attach or detach.
pub const MAX_ATTACH: usize = 10_000;

/// The fleet's routes (see the module's documentation).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/nodes", post(create_node).get(list_nodes))
        .route("/v1/nodes/*path", get(show_node).patch(update_node).delete(delete_node))
        .route("/v1/targets/resolve", post(resolve_target))
        .route("/v1/fleet", get(export_fleet))
        .route("/v1/fleet/import", post(import_fleet).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)))
        .route("/v1/fleet/audit", get(list_audit))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/:name", get(show_task).put(put_task).delete(delete_task))
        .route("/v1/tasks/:name/runs", get(task_runs))
}

/// The query parameters the fleet's endpoints take (see [`crate::api::QUERY_PARAMETERS`]).
pub const QUERY_PARAMETERS: &[(&str, &str, &[&str])] = &[
    ("DELETE", "/v1/nodes/*path", &["cascade"]),
    ("POST", "/v1/fleet/import", &["dry_run", "prune"]),
    ("GET", "/v1/fleet/audit", &["limit", "offset", "subject"]),
    ("DELETE", "/v1/tasks/:name", &["node", "host"]),
    ("GET", "/v1/tasks/:name/runs", &["limit", "offset"]),
    ("GET", "/v1/hosts/:id/integrity", &["task", "limit", "offset"]),
    ("GET", "/v1/hosts/:id/logs", &["path", "after", "limit"]),
];

/// The node path of a `/v1/nodes/{path}` URL, checked.
struct NodePath(String);

#[axum::async_trait]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for NodePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(path) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::field(Code::InvalidPath, "path", format!("cannot read the path in the URL: {e}")))?;
        valid_path(&path, "path")?;
        Ok(NodePath(path))
    }
}

/// Who is asking to change the fleet: the token (which must have `manage_fleet`) and the
/// client's address.
fn fleet_writer(d: &Dispatcher, headers: &HeaderMap, peer: SocketAddr) -> Result<Actor, ApiError> {
    let policy = authenticate(d, headers)?;
    if let Some(policy) = policy {
        policy.check_manage_fleet()?;
    }
    Ok(Actor { token: policy.map(|p| p.name.clone()), client: Some(peer.ip().to_string()) })
}

fn body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::general(Code::BodyTooLarge, format!("request body exceeds {limit} bytes"))
        } else {
            ApiError::general(Code::MalformedJson, format!("cannot read request body: {e}"))
        }
    })
}

/// A boolean query parameter: `true`/`1`/empty or `false`/`0`; `false` when absent.
fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => {
            Err(ApiError::field(Code::InvalidValue, name, format!("{name} must be true or false, got {other:?}")))
        }
    }
}

fn node_level(map: &Map<String, Value>, field: &str) -> Result<Option<Level>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => Level::parse_node_level(name).map(Some).ok_or_else(|| {
            ApiError::field(
                Code::InvalidValue,
                field,
                format!("unknown level {name:?}; a node is a product, service or component"),
            )
        }),
        Some(other) => {
            Err(ApiError::field(Code::WrongType, field, format!("{field} must be a string, got {}", type_name(other))))
        }
    }
}

/// `map[field]` as a list of node paths, each with the field it came from.
fn path_list(map: &Map<String, Value>, field: &str) -> Result<Option<Vec<(String, String)>>, ApiError> {
    if matches!(map.get(field), None | Some(Value::Null)) {
        return Ok(None);
    }
    let paths = target::string_list(map.get(field), field, target::MAX_TARGET_NODES)?;
    let mut out = Vec::with_capacity(paths.len());
    for (index, path) in paths.into_iter().enumerate() {
        let at = format!("{field}[{index}]");
        valid_path(&path, &at)?;
        out.push((path, at));
    }
    Ok(Some(out))
}

/// `map[field]` as a list of host ids.
fn host_list(map: &Map<String, Value>, field: &str) -> Result<Vec<String>, ApiError> {
    let hosts = target::string_list(map.get(field), field, MAX_ATTACH)?;
    for (index, host) in hosts.iter().enumerate() {
        if !is_valid_host_id(host) {
            return Err(ApiError::field(
                Code::InvalidValue,
                format!("{field}[{index}]"),
                format!("{host:?} is not a valid host id"),
            ));
        }
    }
    Ok(hosts)
}

fn host_id(id: &str) -> Result<(), ApiError> {
    if is_valid_host_id(id) {
        Ok(())
    } else {
        Err(ApiError::field(Code::InvalidValue, "id", format!("{id:?} is not a valid host id")))
    }
}

/// `POST /v1/nodes` `{"path": "ECS/OpenStack", "level": "service"}`.
async fn create_node(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    reject_unknown_fields(&map, &["path", "level"])?;
    let path = required_string(&map, "path")?.to_string();
    valid_path(&path, "path")?;
    let level =
        node_level(&map, "level")?.ok_or_else(|| ApiError::field(Code::MissingField, "level", "level is required"))?;
    let d = dispatcher.clone();
    let node = blocking(move || tree::create_node(&d.store, &path, level, &actor)).await?;
    log::info!("fleet: node {} ({}) created", node.path, node.level.as_str());
    Ok((StatusCode::CREATED, Json(node)).into_response())
}

/// `GET /v1/nodes`: the whole tree with host counts.
async fn list_nodes(State(dispatcher): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let nodes = blocking(move || tree::tree(&d.store)).await?;
    Ok(Json(TreeReply { nodes }).into_response())
}

/// Replies are structs rather than `json!` so their fields keep a readable order.
#[derive(Serialize)]
struct TreeReply {
    nodes: Vec<tree::TreeNode>,
}

#[derive(Serialize)]
struct ResolveReply {
    hosts: Vec<String>,
    level: Level,
    unregistered: Vec<String>,
}

#[derive(Serialize)]
struct AuditPage {
    changes: Vec<super::audit::Entry>,
    total: u64,
    limit: u32,
    offset: u64,
    next_offset: Option<u64>,
}

/// `GET /v1/nodes/{path}`.
async fn show_node(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    NodePath(path): NodePath,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let node = blocking(move || tree::show_node(&d.store, &path)).await?;
    Ok(Json(node).into_response())
}

/// `PATCH /v1/nodes/{path}` `{"path": "…", "level": "…", "attach": [hosts], "detach": [hosts]}`.
async fn update_node(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    NodePath(path): NodePath,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    reject_unknown_fields(&map, &["path", "level", "attach", "detach"])?;
    let new_path = match map.get("path") {
        None | Some(Value::Null) => None,
        Some(_) => {
            let p = required_string(&map, "path")?.to_string();
            valid_path(&p, "path")?;
            Some(p)
        }
    };
    let update = NodeUpdate {
        path: new_path,
        level: node_level(&map, "level")?,
        attach: host_list(&map, "attach")?,
        detach: host_list(&map, "detach")?,
    };
    let d = dispatcher.clone();
    let node = blocking(move || tree::update_node(&d.store, &path, &update, &actor)).await?;
    Ok(Json(node).into_response())
}

/// `DELETE /v1/nodes/{path}[?cascade=true]`.
async fn delete_node(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    NodePath(path): NodePath,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    let cascade = flag(&params, "cascade")?;
    let d = dispatcher.clone();
    let deleted = blocking(move || tree::delete_node(&d.store, &path, cascade, &actor)).await?;
    log::info!("fleet: deleted {:?}, detached {} host(s)", deleted.deleted, deleted.detached.len());
    Ok(Json(deleted).into_response())
}

/// `PUT /v1/hosts/{id}` `{"nodes": [paths], "labels": {…}}`: sets where the host sits and
/// its labels. A field left out keeps its value; at least one is needed.
pub(crate) async fn put_host(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    IdParam(id): IdParam,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    host_id(&id)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    reject_unknown_fields(&map, &["nodes", "labels"])?;
    let nodes = path_list(&map, "nodes")?;
    let labels = match map.get("labels") {
        None | Some(Value::Null) => None,
        value => Some(target::parse_labels(value, "labels")?),
    };
    if nodes.is_none() && labels.is_none() {
        return Err(ApiError::field(Code::MissingField, "nodes", "give nodes, labels or both"));
    }
    let change = HostChange { nodes, labels, ..HostChange::default() };
    let d = dispatcher.clone();
    let placed = blocking(move || tree::change_host(&d.store, &id, &change, &actor)).await?;
    Ok(Json(placed).into_response())
}

/// `PATCH /v1/hosts/{id}` `{"attach": [paths], "detach": [paths], "labels": {"k": "v", "gone": null}}`.
pub(crate) async fn patch_host(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    IdParam(id): IdParam,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    host_id(&id)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    reject_unknown_fields(&map, &["attach", "detach", "labels"])?;
    let attach = path_list(&map, "attach")?.unwrap_or_default();
    let detach = path_list(&map, "detach")?.unwrap_or_default();
    if let Some((path, field)) = detach.iter().find(|(p, _)| attach.iter().any(|(a, _)| a == p)) {
        return Err(ApiError::field(Code::InvalidValue, field.clone(), format!("{path} is also in attach")));
    }
    let mut label_changes = BTreeMap::new();
    match map.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            // null removes a label; strings are checked as labels are.
            let (set, removed): (Map<String, Value>, Map<String, Value>) =
                labels.clone().into_iter().partition(|(_, v)| !v.is_null());
            for (key, value) in target::parse_labels(Some(&Value::Object(set)), "labels")? {
                label_changes.insert(key, Some(value));
            }
            for key in removed.keys() {
                super::check_label_key(key)
                    .map_err(|why| ApiError::field(Code::InvalidValue, format!("labels.{key}"), why))?;
                label_changes.insert(key.clone(), None);
            }
        }
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "labels",
                format!("labels must be an object of strings and nulls, got {}", type_name(other)),
            ));
        }
    }
    let change = HostChange { attach, detach, label_changes, ..HostChange::default() };
    let d = dispatcher.clone();
    let placed = blocking(move || tree::change_host(&d.store, &id, &change, &actor)).await?;
    Ok(Json(placed).into_response())
}

/// `POST /v1/targets/resolve` `{"target": {…}}` → `{"hosts": […], "level": "…", "unregistered": […]}`:
/// what `POST /v1/jobs` with this target would run on, or the error it would get.
async fn resolve_target(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    reject_unknown_fields(&map, &["target"])?;
    let value = map
        .get("target")
        .filter(|v| !v.is_null())
        .ok_or_else(|| ApiError::field(Code::MissingField, "target", "target is required"))?;
    let target = target::parse(value, "target")?;
    let d = dispatcher.clone();
    let resolution = blocking(move || target::resolve(&d.store.conn(), &target, "target")).await?;
    let reply =
        ResolveReply { hosts: resolution.hosts, level: resolution.level, unregistered: resolution.unregistered };
    Ok(Json(reply).into_response())
}

/// `GET /v1/fleet`: the whole inventory, as `POST /v1/fleet/import` takes it.
async fn export_fleet(State(dispatcher): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    Ok(Json(blocking(move || Ok(import::export(&d.store)?)).await?).into_response())
}

/// `POST /v1/fleet/import[?dry_run=true][&prune=true]` with an inventory document.
async fn import_fleet(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let options = ImportOptions { dry_run: flag(&params, "dry_run")?, prune: flag(&params, "prune")? };
    let actor = if options.dry_run {
        // A dry run only reads: any valid token may ask what an import would change.
        let policy = authenticate(&dispatcher, &headers)?;
        Actor { token: policy.map(|p| p.name.clone()), client: Some(peer.ip().to_string()) }
    } else {
        fleet_writer(&dispatcher, &headers, peer)?
    };
    let inventory = import::parse_inventory(&body(raw, MAX_IMPORT_BYTES)?)?;
    let d = dispatcher.clone();
    let report = blocking(move || import::import(&d.store, &inventory, options, &actor)).await?;
    if !options.dry_run && !report.changes.is_empty() {
        log::info!("fleet: import applied {} change(s)", report.changes.len());
    }
    Ok(Json(report).into_response())
}

/// `GET /v1/fleet/audit?limit=50&offset=0[&subject=…]`: the change log, newest first.
async fn list_audit(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let (limit, offset) = page(&params)?;
    let subject = params.get("subject").cloned();
    let d = dispatcher.clone();
    let (entries, total) =
        blocking(move || Ok(super::audit::list(&d.store.conn(), limit, offset, subject.as_deref())?)).await?;
    let count = entries.len() as u64;
    let next_offset = next_offset(offset, count, total);
    Ok(Json(AuditPage { changes: entries, total, limit, offset, next_offset }).into_response())
}

#[derive(Serialize)]
struct TasksReply {
    tasks: Vec<Value>,
}

#[derive(Serialize)]
struct TaskReply {
    name: String,
    attachments: Vec<Value>,
}

#[derive(Serialize)]
struct DeletedTasks {
    deleted: Vec<Value>,
}

/// The `{name}` of a `/v1/tasks/{name}` URL, checked.
struct TaskName(String);

#[axum::async_trait]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TaskName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::field(Code::InvalidTask, "name", format!("cannot read the name in the URL: {e}")))?;
        tasks::check_name(&name)?;
        Ok(TaskName(name))
    }
}

/// `GET /v1/tasks`: every task at every attach point.
async fn list_tasks(State(dispatcher): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let all = blocking(move || Ok(tasks::list(&d.store.conn())?)).await?;
    Ok(Json(TasksReply { tasks: all.iter().map(tasks::Task::to_json).collect() }).into_response())
}

/// `GET /v1/tasks/{name}`: the task at each of its attach points.
async fn show_task(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    TaskName(name): TaskName,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let n = name.clone();
    let found = blocking(move || tasks::show(&d.store, &n)).await?;
    Ok(Json(TaskReply { name, attachments: found.iter().map(tasks::Task::to_json).collect() }).into_response())
}

#[derive(Serialize)]
struct RunsPage {
    name: String,
    /// The next slot of each schedule definition of the name, by origin.
    next_due: Vec<NextDue>,
    runs: Vec<super::schedule::Run>,
    total: u64,
    limit: u32,
    offset: u64,
    next_offset: Option<u64>,
}

#[derive(Serialize)]
struct NextDue {
    from: String,
    next_due_at_ms: Option<i64>,
}

/// `GET /v1/tasks/{name}/runs`: the schedule's firings, newest first. Runs outlive the
/// task, so a deleted schedule's history stays readable; a name that never existed and
/// never ran is 404.
async fn task_runs(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    TaskName(name): TaskName,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let (limit, offset) = page(&params)?;
    let d = dispatcher.clone();
    let n = name.clone();
    let (next_due, runs, total) = blocking(move || {
        let conn = d.store.conn();
        if tasks::by_name(&conn, &n)?.is_empty() && !super::schedule::has_runs(&conn, &n)? {
            return Err(ApiError::general(Code::NoSuchTask, format!("no task {n}")));
        }
        let next_due = super::schedule::next_due(&conn, &n)?
            .into_iter()
            .map(|(from, next_due_at_ms)| NextDue { from, next_due_at_ms })
            .collect();
        let (runs, total) = super::schedule::runs(&conn, &n, limit, offset)?;
        Ok((next_due, runs, total))
    })
    .await?;
    let count = runs.len() as u64;
    let next_offset = next_offset(offset, count, total);
    Ok(Json(RunsPage { name, next_due, runs, total, limit, offset, next_offset }).into_response())
}

/// `PUT /v1/tasks/{name}` `{"attach_to": {"node": …} | {"host": …}, "kind": …, …}`:
/// creates (201) or replaces (200) the task at that attach point.
async fn put_task(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    TaskName(name): TaskName,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    let map = parse_object(&body(raw, crate::api::MAX_BODY_BYTES)?)?;
    let at = tasks::parse_attach_point(map.get("attach_to"), "attach_to")?;
    let (kind, spec) = tasks::parse_spec(&map)?;
    let d = dispatcher.clone();
    let (task, created) = blocking(move || tasks::put(&d.store, &name, &at, &kind, &spec, &actor)).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(task.to_json())).into_response())
}

/// `DELETE /v1/tasks/{name}[?node=PATH|host=ID]`: at one attach point, or at all of them.
async fn delete_task(
    State(dispatcher): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    TaskName(name): TaskName,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let actor = fleet_writer(&dispatcher, &headers, peer)?;
    let at = match (params.get("node"), params.get("host")) {
        (None, None) => None,
        (Some(path), None) => {
            valid_path(path, "node")?;
            Some(tasks::AttachPoint::Node(path.clone()))
        }
        (None, Some(id)) => {
            host_id(id).map_err(|e| ApiError { field: Some("host".into()), ..e })?;
            Some(tasks::AttachPoint::Host(id.clone()))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::field(Code::InvalidValue, "host", "give node or host, not both"));
        }
    };
    let d = dispatcher.clone();
    let deleted = blocking(move || tasks::delete(&d.store, &name, at.as_ref(), &actor)).await?;
    Ok(Json(DeletedTasks { deleted: deleted.iter().map(tasks::Task::to_json).collect() }).into_response())
}

/// `GET /v1/hosts/{id}/tasks`: the host's effective tasks and its conflicts.
pub(crate) async fn host_tasks(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    host_id(&id)?;
    let d = dispatcher.clone();
    let effective = blocking(move || Ok(tasks::effective(&d.store, &id)?)).await?;
    Ok(Json(effective).into_response())
}

/// `GET /v1/hosts/{id}/integrity?task=NAME&limit=&offset=`: the host's continuous-integrity
/// reports (of one task, when named), newest first.
pub(crate) async fn host_integrity(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    host_id(&id)?;
    let (limit, offset) = page(&params)?;
    let task = params.get("task").cloned();
    if let Some(name) = &task {
        tasks::check_name(name).map_err(|mut e| {
            e.field = Some("task".into());
            e
        })?;
    }
    let d = dispatcher.clone();
    let host = id.clone();
    let t = task.clone();
    let (reports, total) = blocking(move || Ok(d.store.integrity_reports(&host, t.as_deref(), limit, offset)?)).await?;
    let count = reports.len() as u64;
    let next_offset = next_offset(offset, count, total);
    Ok(Json(serde_json::json!({
        "host": id,
        "task": task,
        "reports": reports,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset,
    }))
    .into_response())
}

/// `GET /v1/hosts/{id}/logs?path=P&after=SEQ&limit=N`: lines of the host's watched file
/// `P` after line `SEQ` (0: from the oldest kept), oldest first, and the `after` to ask
/// with next (the same when there is nothing new); `refused` says why the agent does not
/// follow the path, when it does not.
pub(crate) async fn host_logs(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    host_id(&id)?;
    let Some(path) = params.get("path").cloned() else {
        return Err(ApiError::field(Code::MissingField, "path", "path (the watched file) is required"));
    };
    let limit = page_limit(&params)?;
    let after = page_param(&params, "after", 0, i64::MAX as u64)? as i64;
    let d = dispatcher.clone();
    let (lines, refused) =
        blocking(move || Ok((d.store.log_lines(&id, &path, after, limit)?, d.store.log_refusal(&id, &path)?))).await?;
    let next_after = lines.last().map_or(after, |l| l.seq);
    let mut body = serde_json::json!({"lines": lines, "next_after": next_after});
    if let Some((code, message, at_ms)) = refused {
        body["refused"] = serde_json::json!({"code": code, "message": message, "at_ms": at_ms});
    }
    Ok(Json(body).into_response())
}

/// `GET /v1/hosts/{id}/tasks/signed`: the host's effective tasks as its agent fetches
/// them: a signed message (`polaris-v1 <mac>\n<payload>`, as envelopes are) whose payload
/// names the host, the time it was issued and its digest, with the digest as `ETag`. An
/// `If-None-Match` with the current digest answers 304 and no body, so agents can poll
/// every few seconds for almost nothing.
pub(crate) async fn signed_host_tasks(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    host_id(&id)?;
    let d = dispatcher.clone();
    let host = id.clone();
    let effective = blocking(move || Ok(tasks::effective(&d.store, &host)?)).await?;
    let digest = tasks::digest(&effective);
    let etag = format!("\"{digest}\"");
    let unchanged = headers
        .get(axum::http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, [(axum::http::header::ETAG, etag)]).into_response());
    }
    let set = tasks::SignedSet {
        v: 1,
        host: &id,
        issued_at: polaris_ops_wire::wire::unix_now(),
        digest: &digest,
        effective: &effective,
    };
    let payload = serde_json::to_vec(&set)
        .map_err(|e| ApiError::general(Code::StorageError, format!("cannot encode the task set: {e}")))?;
    let body = polaris_ops_wire::wire::sign(&dispatcher.secret, &payload);
    Ok((
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()), (axum::http::header::ETAG, etag)],
        body,
    )
        .into_response())
}
