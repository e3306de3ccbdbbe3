//! The REST API (axum): `/v1/jobs` and `/v1/hosts`, and `/metrics`; the fleet's routes
//! come from [`crate::fleet::api`].

use crate::auth::TokenPolicy;
use crate::error::ApiError;
use crate::fleet::{self, Level};
use crate::request::{parse_host_registration, parse_job_request};
use crate::store::{HostJobRecord, HostState, NewJob, Outcome, QueueRef, QueuedChange};
use crate::worker::{self, TakeBack};
use crate::Dispatcher;
use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{unix_now_ms, Encoding, Resp};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// The state every handler gets.
pub(crate) type AppState = Arc<Dispatcher>;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How often a sync call looks at its job again when nothing woke it.
const SYNC_LOOK_AGAIN: Duration = Duration::from_secs(2);

/// `GET /v1/jobs` page size when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest `limit` for `GET /v1/jobs`.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Most `stats-job` lookups one `GET /v1/jobs/{id}` makes to tell `reserved` from `ready`.
pub const MAX_LIVE_LOOKUPS: usize = 200;

/// The API's routes. Whatever no route answers gets the documented error shape too: an
/// unknown path `0x050B`, a known path with another method `0x050C` (with `Allow`), and
/// a query parameter the endpoint does not take `0x0508` (see [`QUERY_PARAMETERS`]; a
/// route without an entry there takes none, so a new route cannot forget to refuse them).
pub fn router(dispatcher: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", post(post_job).get(list_jobs))
        .route("/v1/jobs/:id", get(get_job).delete(revoke_job))
        .route("/v1/jobs/:id/hosts/:host", axum::routing::delete(cancel_host))
        .route("/v1/jobs/:id/events", get(crate::events::job_events))
        .route("/v1/hosts", post(register_host).get(list_hosts))
        .route(
            "/v1/hosts/:id",
            get(get_host).delete(delete_host).put(fleet::api::put_host).patch(fleet::api::patch_host),
        )
        .route("/v1/hosts/:id/tasks", get(fleet::api::host_tasks))
        .route("/v1/hosts/:id/tasks/signed", get(fleet::api::signed_host_tasks))
        .route("/v1/hosts/:id/integrity", get(fleet::api::host_integrity))
        .route("/v1/hosts/:id/logs", get(fleet::api::host_logs))
        .route("/metrics", get(metrics))
        .merge(fleet::api::routes())
        // The web console at `/` (see docs/CONSOLE.md); nothing under `/v1`.
        .merge(crate::console::routes())
        // Applies to the routes above (so it must stay below them).
        .route_layer(axum::middleware::from_fn(refuse_unknown_query_parameters))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_such_endpoint)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(dispatcher.clone(), allow_client))
        // Outermost, so that refusals of every kind are counted too.
        .layer(axum::middleware::from_fn_with_state(dispatcher.clone(), count_request))
        .with_state(dispatcher)
}

/// Counts every request by method, matched route template (not the raw path: the
/// series stay bounded) and status, and times it.
async fn count_request(
    State(dispatcher): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_string());
    let response = next.run(request).await;
    dispatcher.metrics.http_request(method.as_str(), route.as_deref(), response.status().as_u16(), started.elapsed());
    response
}

/// `GET /metrics`: the Prometheus text format. `--allow-client` applies; with tokens on,
/// any valid token may scrape unless `--metrics-without-token` (see [`crate::metrics`]).
async fn metrics(State(dispatcher): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !dispatcher.metrics_without_token {
        authenticate(&dispatcher, &headers)?;
    }
    let d = dispatcher.clone();
    let text = blocking(move || Ok(d.metrics.render(&d.store, &d.queues)?)).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, polaris_metrics::CONTENT_TYPE)], text).into_response())
}

/// The query parameters each endpoint takes, by method and route. Every other parameter
/// is refused with `0x0508`, as unknown body fields are. The fleet's endpoints declare
/// theirs in [`fleet::api::QUERY_PARAMETERS`].
pub const QUERY_PARAMETERS: &[(&str, &str, &[&str])] = &[("GET", "/v1/jobs", &["limit", "offset"])];

/// Refuses query parameters the matched endpoint does not take, and parameters given twice.
async fn refuse_unknown_query_parameters(
    matched: axum::extract::MatchedPath,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = QUERY_PARAMETERS
        .iter()
        .chain(fleet::api::QUERY_PARAMETERS)
        .find(|(method, path, _)| *method == request.method().as_str() && *path == matched.as_str())
        .map_or(&[][..], |(_, _, names)| *names);
    if let Err(e) = check_query(request.uri(), allowed) {
        return e.into_response();
    }
    next.run(request).await
}

fn check_query(uri: &axum::http::Uri, allowed: &[&str]) -> Result<(), ApiError> {
    if uri.query().is_none() {
        return Ok(());
    }
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::general(Code::InvalidValue, format!("cannot read the query string: {e}")))?;
    let mut seen: Vec<&str> = Vec::new();
    for (name, _) in &pairs {
        if !allowed.contains(&name.as_str()) {
            let known = if allowed.is_empty() {
                "this endpoint takes no query parameters".to_string()
            } else {
                format!("known parameters are {}", allowed.join(", "))
            };
            return Err(ApiError::field(
                Code::UnknownField,
                name.clone(),
                format!("unknown query parameter {name:?}; {known}"),
            ));
        }
        if seen.contains(&name.as_str()) {
            return Err(ApiError::field(
                Code::InvalidValue,
                name.clone(),
                format!("query parameter {name:?} is given twice"),
            ));
        }
        seen.push(name);
    }
    Ok(())
}

async fn no_such_endpoint(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::general(Code::NoSuchEndpoint, format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::general(Code::MethodNotAllowed, format!("{} does not take {method} (see the Allow header)", uri.path()))
}

/// The `{id}` of a route, refused in the documented shape when it cannot be read (e.g.
/// percent-encoded bytes that are not UTF-8).
pub(crate) struct IdParam(pub(crate) String);

#[axum::async_trait]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdParam(id))
            .map_err(|e| ApiError::field(Code::InvalidValue, "id", format!("cannot read the id in the path: {e}")))
    }
}

/// Refuses clients outside `--allow-client` before anything else looks at the
/// request (an empty list allows everyone).
async fn allow_client(
    State(dispatcher): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let allowed = &dispatcher.allowed_clients;
    if allowed.is_empty() || allowed.iter().any(|net| net.contains(&peer.ip())) {
        return next.run(request).await;
    }
    log::warn!("refused a request from {peer}: not in --allow-client");
    axum::response::IntoResponse::into_response(ApiError::general(
        Code::ClientNotAllowed,
        format!("client {} is not allowed", peer.ip()),
    ))
}

/// Binds `listen`, prints `listening on ADDR`, and serves until SIGTERM or SIGINT.
pub async fn serve(dispatcher: AppState, listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // The first stdout line tells scripts and tests where we are (port 0 picks one).
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {addr}").and_then(|()| stdout.flush()).context("writing to stdout")?;
    log::info!("polaris-dispatch listening on http://{addr}");
    axum::serve(listener, router(dispatcher).into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            log::error!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the dispatcher");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    log::info!("shutting down: finishing open requests");
}

/// Runs blocking work (SQLite, the beanstalk client) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::general(Code::StorageError, format!("worker task failed: {e}")))?
}

/// The caller's token policy; `Ok(None)` when authentication is off.
pub(crate) fn authenticate<'a>(
    dispatcher: &'a Dispatcher,
    headers: &HeaderMap,
) -> Result<Option<&'a TokenPolicy>, ApiError> {
    match &dispatcher.tokens {
        None => Ok(None),
        Some(tokens) => tokens.authenticate(headers).map(Some),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::general(Code::BodyTooLarge, format!("request body exceeds {MAX_BODY_BYTES} bytes"))
        } else {
            ApiError::general(Code::MalformedJson, format!("cannot read request body: {e}"))
        }
    })
}

/// Removes a job's notifier when its sync handler ends, however it ends (a client that
/// hangs up drops the handler's future).
struct WaiterGuard<'a> {
    dispatcher: &'a Dispatcher,
    job_id: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.dispatcher.waiters.unregister(self.job_id);
    }
}

async fn post_job(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let policy = authenticate(&dispatcher, &headers)?;
    let request = parse_job_request(&body_bytes(body)?)?;
    if let Some(policy) = policy {
        policy.check_job(request.method, &request.cmd)?;
    }
    let job_id = request.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string());
    let method = request.method;
    let timeout = Duration::from_secs(u64::from(request.timeout_secs));
    // A host list is host-level work; a target's level is settled when it is resolved.
    let new_job = NewJob {
        id: job_id.clone(),
        method,
        cmd: request.cmd,
        timeout_secs: request.timeout_secs,
        hosts: request.hosts,
        token_name: policy.map(|p| p.name.clone()),
        target: None,
        level: Level::Host.as_str().to_string(),
        priority: request.priority.unwrap_or_else(|| fleet::target::queue_priority(Level::Host, method.is_sync())),
        task: None,
        policy: request.policy,
        args: request.args.as_ref().map(Value::to_string),
    };
    // Register interest before the job exists so that no wake-up can be missed.
    let notify = dispatcher.waiters.register(&job_id);
    let _guard = WaiterGuard { dispatcher: &dispatcher, job_id: &job_id };
    // How long a host may wait to start: `ttl`, or the timeout; counted from the start time.
    let window_secs = new_job.policy.ttl_secs.unwrap_or(new_job.timeout_secs);
    let retry = new_job.policy.retry.clone();
    let start_by_ms =
        new_job.policy.start_at_ms.unwrap_or_else(unix_now_ms).saturating_add(i64::from(window_secs) * 1000);
    let created = {
        let dispatcher = dispatcher.clone();
        let (target, priority, id) = (request.target, request.priority, job_id.clone());
        blocking(move || match target {
            None => Ok(dispatcher.store.create_job(&new_job, start_by_ms)?),
            Some(target) => {
                let (created, resolution) =
                    fleet::target::create_job(&dispatcher.store, new_job, &target, priority, start_by_ms)?;
                if created {
                    log::info!(
                        "job {id}: target {} resolved to {} host(s), {} level",
                        target.to_json(),
                        resolution.hosts.len(),
                        resolution.level.as_str()
                    );
                }
                Ok(created)
            }
        })
        .await?
    };
    if !created {
        return Err(ApiError::field(Code::DuplicateJobId, "id", format!("job id {job_id} was used before")));
    }
    dispatcher.wake_enqueuer();
    {
        // A job none of whose hosts can be reached (unknown hosts) is complete at once.
        let (d, id) = (dispatcher.clone(), job_id.clone());
        blocking(move || Ok(d.metrics.host_job_final(&d.store, &id)?)).await?;
    }
    log::info!("job {job_id}: {} stored", method.as_str());
    if !method.is_sync() {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "id": job_id }))).into_response());
    }

    // The agent may take the kill grace past the timeout to kill a command that ignores
    // SIGTERM; its result then still needs a moment to arrive (the sync grace). Each retry
    // adds its delay, its start window and the same again.
    let one_attempt = timeout + dispatcher.kill_grace + dispatcher.sync_grace;
    let retries = retry.as_ref().map_or(Duration::ZERO, |r| {
        let each = Duration::from_secs(u64::from(r.delay_secs) + u64::from(window_secs)) + one_attempt;
        each * r.max
    });
    let deadline = tokio::time::Instant::now() + one_attempt + retries;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        // Enabled before checking, so a result recorded between the check and the await
        // still wakes us.
        notified.as_mut().enable();
        let done = {
            let dispatcher = dispatcher.clone();
            let id = job_id.clone();
            blocking(move || Ok(dispatcher.store.job_is_final(&id)?)).await?
        };
        if done {
            break;
        }
        // Woken by a result this dispatcher recorded, or (PostgreSQL) one another
        // dispatcher recorded and announced; looked at again now and then all the same,
        // should an announcement be lost.
        let look_again = std::cmp::min(deadline, tokio::time::Instant::now() + SYNC_LOOK_AGAIN);
        if tokio::time::timeout_at(look_again, notified).await.is_err() && look_again >= deadline {
            break;
        }
    }

    let (job, hosts) = {
        let dispatcher = dispatcher.clone();
        let id = job_id.clone();
        blocking(move || Ok(dispatcher.store.job(&id)?)).await?
    }
    .ok_or_else(|| ApiError::general(Code::StorageError, format!("job {job_id} vanished from the database")))?;
    let response = hosts
        .into_iter()
        .map(|h| {
            let outcome = h.outcome.unwrap_or_else(|| {
                Outcome::failed(
                    Code::HostNoAnswer,
                    format!("No answer within {}s (state: {})", job.timeout_secs, h.state.as_str()),
                )
            });
            let (data, encoding, data_base64) = split_data(outcome.data, outcome.encoding);
            SyncHostReply {
                host: h.host,
                resp: outcome.resp,
                retcode: outcome.retcode,
                message: outcome.message,
                data,
                encoding,
                data_base64,
            }
        })
        .collect();
    Ok(Json(SyncReply { id: job_id.clone(), response }).into_response())
}

/// The sync reply; structs rather than `json!` so fields keep the documented order.
#[derive(Serialize)]
struct SyncReply {
    id: String,
    response: Vec<SyncHostReply>,
}

#[derive(Serialize)]
struct SyncHostReply {
    host: String,
    resp: Resp,
    retcode: u32,
    message: String,
    data: String,
    /// Only for output that is not UTF-8: `base64`, and the exact bytes in `data_base64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// Stored data as the API shows it: text in `data`; bytes that are not UTF-8 in
/// `data_base64` with `encoding`, and `data` empty, so no client mistakes base64 (or
/// mangled bytes) for the output text.
fn split_data<T: Default>(data: T, encoding: Option<Encoding>) -> (T, Option<&'static str>, Option<T>) {
    match encoding {
        None => (data, None, None),
        Some(encoding) => (T::default(), Some(encoding.as_str()), Some(data)),
    }
}

/// One host in `GET /v1/jobs/{id}`.
#[derive(Serialize)]
struct HostStatus<'a> {
    host: &'a str,
    state: &'static str,
    resp: Option<Resp>,
    retcode: Option<u32>,
    message: Option<&'a str>,
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<&'a str>,
    truncated: Option<bool>,
    updated_at_ms: i64,
    /// The attempt it is at, from 1.
    attempt: u32,
    /// Whether it was tried more than once.
    retried: bool,
    /// Its batch, from 1, in a batched job.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<u32>,
    /// Every finished attempt, in a job that retries (the last is its result).
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<&'a [crate::store::Attempt]>,
}

/// Which batch of a batched job runs.
#[derive(Serialize)]
struct BatchStatus {
    /// The batch running, from 1 (0 before the first starts).
    current: u32,
    /// How many batches there are.
    count: u32,
    /// Hosts per batch.
    size: u32,
}

#[derive(Serialize)]
struct JobStatus<'a> {
    id: &'a str,
    method: &'static str,
    cmd: &'a str,
    timeout: u32,
    created_at_ms: i64,
    cancelled_at_ms: Option<i64>,
    /// The level it was targeted at (`host` for a host list).
    level: &'a str,
    /// The queue priority its envelopes were put with.
    priority: u32,
    /// The target it was given, when it was given one rather than `hosts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Value>,
    /// The standing task it was fired for, when the scheduler made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a crate::store::TaskOrigin>,
    /// `scheduled` (before its start time), `running`, `done` or `cancelled`.
    state: &'static str,
    /// How it runs, when the request asked for more than the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a crate::policy::Policy>,
    /// Hosts by state.
    summary: std::collections::BTreeMap<&'static str, u64>,
    /// The batch running, in a batched job.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<BatchStatus>,
    /// Why no further host starts, once its failure threshold was crossed.
    #[serde(skip_serializing_if = "Option::is_none")]
    halted: Option<&'a str>,
    /// The method's arguments (`log.*` jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<Value>,
    done: bool,
    hosts: Vec<HostStatus<'a>>,
}

/// A job's state for people: `cancelled`, `done`, `scheduled` before its start time,
/// else `running`.
fn job_state(job: &crate::store::JobRecord, done: bool) -> &'static str {
    if job.cancelled_at_ms.is_some() {
        "cancelled"
    } else if done {
        "done"
    } else if job.not_before_ms.is_some_and(|t| t > unix_now_ms()) {
        "scheduled"
    } else {
        "running"
    }
}

fn host_status<'a>(
    h: &'a HostJobRecord,
    state: HostState,
    attempts: Option<&'a [crate::store::Attempt]>,
) -> HostStatus<'a> {
    let outcome = h.outcome.as_ref();
    let (data, encoding, data_base64) = match outcome {
        Some(o) => {
            let (data, encoding, base64) = split_data(o.data.as_str(), o.encoding);
            (Some(data), encoding, base64)
        }
        None => (None, None, None),
    };
    HostStatus {
        host: &h.host,
        state: state.as_str(),
        resp: outcome.map(|o| o.resp),
        retcode: outcome.map(|o| o.retcode),
        message: outcome.map(|o| o.message.as_str()),
        data,
        encoding,
        data_base64,
        truncated: outcome.map(|o| o.truncated),
        updated_at_ms: h.updated_at_ms,
        attempt: h.attempt,
        retried: h.attempt > 1,
        batch: h.batch.map(|b| b + 1),
        attempts,
    }
}

async fn get_job(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let found = blocking(move || {
        let Some((job, hosts)) = d.store.job(&id)? else { return Ok(None) };
        // A `ready` host may already be in an agent's hands; ask the queue so the reply
        // says `reserved` as soon as it is. Without the queue the stored state stands, and
        // so it does past the first MAX_LIVE_LOOKUPS ready hosts, to bound the work.
        let mut lookups = 0;
        let states: Vec<HostState> = hosts
            .iter()
            .map(|h| match (h.state, &h.queued) {
                (HostState::Ready, Some(queued)) if lookups < MAX_LIVE_LOOKUPS => {
                    lookups += 1;
                    // The id means our job only on the queue instance that issued it.
                    let Some(shard) = d.queues.named(queued.shard.as_deref()) else { return HostState::Ready };
                    let reserved = shard.with_conn(|c, info| {
                        if queued.instance.as_deref() != Some(info.instance.as_str()) {
                            return Ok(false);
                        }
                        Ok(c.stats_job(queued.id)?.get("state") == Some("reserved"))
                    });
                    if matches!(reserved, Ok(true)) {
                        HostState::Reserved
                    } else {
                        HostState::Ready
                    }
                }
                (state, _) => state,
            })
            .collect();
        let attempts = if job.policy.retry.is_some() { d.store.attempts_of_job(&job.id)? } else { Default::default() };
        Ok(Some((job, hosts, states, attempts)))
    })
    .await?;
    let (job, hosts, states, attempts) =
        found.ok_or_else(|| ApiError::general(Code::NoSuchJob, "no job with this id"))?;
    // A final answer of a job that retries is not the end until the rollout has decided
    // against another attempt.
    let done = hosts.iter().all(|h| h.state.is_final() && h.settled);
    let mut summary = std::collections::BTreeMap::new();
    for state in &states {
        *summary.entry(state.as_str()).or_insert(0u64) += 1;
    }
    let batch = job.policy.batch.as_ref().map(|b| {
        let size = b.size_for(hosts.len()) as u32;
        BatchStatus {
            current: job.current_batch.map_or(0, |c| c + 1),
            count: (hosts.len() as u32).div_ceil(size.max(1)),
            size,
        }
    });
    let no_attempts: &[crate::store::Attempt] = &[];
    let status = JobStatus {
        id: &job.id,
        method: job.method.as_str(),
        cmd: &job.cmd,
        timeout: job.timeout_secs,
        created_at_ms: job.created_at_ms,
        cancelled_at_ms: job.cancelled_at_ms,
        level: job.level.as_deref().unwrap_or(Level::Host.as_str()),
        priority: job.priority.unwrap_or_else(|| fleet::target::queue_priority(Level::Host, job.method.is_sync())),
        target: job.target.as_deref().and_then(|t| serde_json::from_str(t).ok()),
        task: job.task.as_ref(),
        state: job_state(&job, done),
        policy: (!job.policy.is_default()).then_some(&job.policy),
        summary,
        batch,
        halted: job.halted.as_deref(),
        done,
        hosts: hosts
            .iter()
            .zip(states)
            .map(|(h, s)| {
                let tried =
                    job.policy.retry.is_some().then(|| attempts.get(&h.host).map_or(no_attempts, Vec::as_slice));
                host_status(h, s, tried)
            })
            .collect(),
        args: job.args.as_deref().and_then(|a| serde_json::from_str(a).ok()),
    };
    Ok(Json(status).into_response())
}

/// The `offset` of the page after one of `count` items from `offset`, of `total`: `None`
/// when this page was the last.
pub(crate) fn next_offset(offset: u64, count: u64, total: u64) -> Option<u64> {
    (offset + count < total).then_some(offset + count)
}

/// The `limit` (1 to [`MAX_PAGE_SIZE`], default [`DEFAULT_PAGE_SIZE`]) and `offset` of a
/// listing.
pub(crate) fn page(params: &HashMap<String, String>) -> Result<(u32, u64), ApiError> {
    Ok((page_limit(params)?, page_param(params, "offset", 0, i64::MAX as u64)?))
}

/// The `limit` of a listing: 1 to [`MAX_PAGE_SIZE`], default [`DEFAULT_PAGE_SIZE`].
pub(crate) fn page_limit(params: &HashMap<String, String>) -> Result<u32, ApiError> {
    let limit = page_param(params, "limit", u64::from(DEFAULT_PAGE_SIZE), u64::from(MAX_PAGE_SIZE))? as u32;
    if limit == 0 {
        return Err(ApiError::field(Code::InvalidValue, "limit", "limit must be at least 1"));
    }
    Ok(limit)
}

pub(crate) fn page_param(
    params: &HashMap<String, String>,
    name: &str,
    default: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(ApiError::field(Code::InvalidValue, name, format!("{name} must be a whole number up to {max}"))),
        },
    }
}

async fn list_jobs(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let (limit, offset) = page(&params)?;
    let d = dispatcher.clone();
    let (jobs, total) = blocking(move || Ok(d.store.list_jobs(limit, offset)?)).await?;
    let count = jobs.len() as u64;
    let jobs: Vec<Value> = jobs
        .into_iter()
        .map(|s| {
            let hosts: u64 = s.state_counts.iter().map(|(_, n)| n).sum();
            let open = s
                .state_counts
                .iter()
                .any(|(state, n)| *n > 0 && matches!(state.as_str(), "pending" | "ready" | "reserved" | "waiting"));
            let states: serde_json::Map<String, Value> =
                s.state_counts.into_iter().map(|(state, n)| (state, json!(n))).collect();
            let mut entry = json!({
                "id": s.job.id,
                "method": s.job.method.as_str(),
                "cmd": s.job.cmd,
                "timeout": s.job.timeout_secs,
                "created_at_ms": s.job.created_at_ms,
                "cancelled_at_ms": s.job.cancelled_at_ms,
                "hosts": hosts,
                "states": states,
                "state": job_state(&s.job, !open),
            });
            if let Some(task) = &s.job.task {
                entry["task"] = json!(task);
            }
            entry
        })
        .collect();
    let next_offset = next_offset(offset, count, total);
    Ok(Json(json!({
        "jobs": jobs,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset,
    })))
}

/// Host jobs already on the queue that one blocking task of `DELETE /v1/jobs/{id}` takes
/// back before it records them in one transaction and gives the runtime back.
pub const REVOKE_BATCH: usize = 100;

/// `DELETE /v1/jobs/{id}`: cancels the job and revokes every host job the agents have not
/// taken yet.
///
/// First one transaction marks the job cancelled and revokes all its `pending` host jobs,
/// so the enqueuer puts none of its envelopes any more and every other call sees that at
/// once. Then the envelopes already on the queue are taken back in batches of
/// [`REVOKE_BATCH`], each a blocking task that holds no lock during its queue round trips
/// and records its batch in one transaction; other requests are served in between.
async fn revoke_job(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Json<Value>, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let queued = {
        let (d, id) = (dispatcher.clone(), id.clone());
        blocking(move || {
            if !d.store.cancel_job(&id, &revoked_outcome())? {
                return Ok(None);
            }
            d.cancellations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            d.host_jobs_changed(&id);
            log::info!("job {id}: cancelled");
            Ok(Some(d.store.ready_of_job(&id)?))
        })
        .await?
        .ok_or_else(|| ApiError::general(Code::NoSuchJob, "no job with this id"))?
    };
    for batch in queued.chunks(REVOKE_BATCH) {
        let (d, id, batch) = (dispatcher.clone(), id.clone(), batch.to_vec());
        let reachable = blocking(move || revoke_queued(&d, &id, &batch)).await?;
        if !reachable {
            break; // the queue is down: the rest stay `ready` (and expire at their deadline)
        }
    }
    // Hosts an agent runs are told to stop by the enqueuer (see worker::send_cancels).
    dispatcher.wake_enqueuer();
    let d = dispatcher.clone();
    blocking(move || {
        // Host jobs a restarted queue made `pending` again meanwhile are revoked too.
        d.store.cancel_job(&id, &revoked_outcome())?;
        d.host_jobs_changed(&id);
        let (_, hosts) = d.store.job(&id)?.ok_or_else(|| ApiError::general(Code::NoSuchJob, "no job with this id"))?;
        let entries: Vec<Value> = hosts.iter().map(|h| json!({ "host": h.host, "state": h.state.as_str() })).collect();
        Ok(Json(json!({ "id": id, "hosts": entries })))
    })
    .await
}

/// `DELETE /v1/jobs/{id}/hosts/{host}`: cancels one host of a job: revoked if it has not
/// started (and never retried), taken back off the queue if its envelope waits there, and
/// its agent told to stop if it runs the command.
async fn cancel_host(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    Path((id, host)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let (d, job_id, h) = (dispatcher.clone(), id.clone(), host.clone());
    let queued = blocking(move || {
        if d.store.job(&job_id)?.is_none() {
            return Err(ApiError::general(Code::NoSuchJob, "no job with this id"));
        }
        match d.store.cancel_host(&job_id, &h, &revoked_outcome())? {
            None => Err(ApiError::field(Code::NoSuchHost, "host", format!("job {job_id} has no host {h}"))),
            Some(HostState::Ready) => {
                Ok(d.store.ready_of_job(&job_id)?.into_iter().filter(|(host, _)| *host == h).collect::<Vec<_>>())
            }
            Some(_) => Ok(Vec::new()),
        }
    })
    .await?;
    if !queued.is_empty() {
        let (d, job_id) = (dispatcher.clone(), id.clone());
        blocking(move || revoke_queued(&d, &job_id, &queued)).await?;
    }
    dispatcher.wake_enqueuer();
    dispatcher.host_jobs_changed(&id);
    let d = dispatcher.clone();
    blocking(move || {
        let (_, hosts) = d.store.job(&id)?.ok_or_else(|| ApiError::general(Code::NoSuchJob, "no job with this id"))?;
        let state = hosts.iter().find(|h| h.host == host).map_or("unknown", |h| h.state.as_str());
        Ok(Json(json!({ "id": id, "host": host, "state": state })))
    })
    .await
}

fn revoked_outcome() -> Outcome {
    Outcome::failed(Code::Revoked, "Revoked before the agent took it")
}

/// Takes a batch of a cancelled job's `ready` host jobs back off the queue and records the
/// outcome in one transaction. Returns false if the queue could not be reached.
fn revoke_queued(d: &Dispatcher, job_id: &str, batch: &[(String, QueueRef)]) -> Result<bool, ApiError> {
    let revoked = revoked_outcome();
    let mut changes = Vec::with_capacity(batch.len());
    let mut reachable = true;
    for (host, queued) in batch {
        let change = match worker::delete_if_ours(d, queued, job_id, host) {
            Ok(TakeBack::Deleted { .. }) => QueuedChange::Finish(HostState::Revoked, revoked.clone()),
            Ok(TakeBack::Lost) => {
                log::warn!("job {job_id} host {host}: queue job {} was lost when the queue restarted", queued.id);
                QueuedChange::Finish(HostState::Revoked, revoked.clone())
            }
            Ok(TakeBack::ExpiredInQueue) => QueuedChange::Finish(
                HostState::Expired,
                Outcome::failed(
                    Code::HostNoAnswer,
                    "The host's agent did not take the job before it expired in the queue",
                ),
            ),
            Ok(TakeBack::Taken) => QueuedChange::Reserve,
            Err(e) => {
                log::warn!("revoke job {job_id} host {host}: queue unavailable: {e}");
                reachable = false;
                break;
            }
        };
        changes.push((host.clone(), queued.id, change));
    }
    d.store.apply_queued_batch(job_id, &changes)?;
    d.host_jobs_changed(job_id);
    Ok(reachable)
}

async fn register_host(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(policy) = authenticate(&dispatcher, &headers)? {
        policy.check_manage_hosts()?;
    }
    let registration = parse_host_registration(&body_bytes(body)?)?;
    let d = dispatcher.clone();
    let (host, created) = blocking(move || {
        let registered =
            d.store.upsert_host_with_facts(&registration.id, &registration.hostname, registration.facts.as_deref())?;
        if let Some(digest) = &registration.tasks_digest {
            d.store.record_tasks_digest(&registration.id, digest)?;
        }
        Ok(registered)
    })
    .await?;
    if created {
        log::info!("host {} registered ({})", host.id, host.hostname);
    }
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let mut body = json!(host);
    with_shard(&dispatcher, &host.id, &mut body);
    Ok((status, Json(body)).into_response())
}

async fn list_hosts(State(dispatcher): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    let hosts = blocking(move || Ok(fleet::tree::registered_hosts(&d.store)?)).await?;
    Ok(Json(json!({ "hosts": hosts })))
}

async fn get_host(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Json<Value>, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let d = dispatcher.clone();
    blocking(move || {
        let Some(mut host) = fleet::tree::registered_host(&d.store, &id)? else { return Ok(None) };
        // Whether the agent runs the task set the tree gives it now.
        if let Some(applied) = host.tasks_applied.as_mut() {
            let current = fleet::tasks::digest(&fleet::tasks::effective(&d.store, &id)?);
            applied.current = Some(applied.digest == current);
        }
        Ok(Some(host))
    })
    .await?
    .map(|h| {
        let mut body = json!(h);
        with_shard(&dispatcher, &h.id, &mut body);
        Json(body)
    })
    .ok_or_else(|| ApiError::general(Code::NoSuchHost, "No such host"))
}

/// With several queue shards, adds to host `id`'s JSON the shard it belongs to now
/// (`"queue"`): the address its agent moves to when it registers or beats.
fn with_shard(dispatcher: &Dispatcher, id: &str, host: &mut Value) {
    if dispatcher.queues.is_sharded() {
        host["queue"] = json!(dispatcher.queues.for_host(id).name);
    }
}

async fn delete_host(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<StatusCode, ApiError> {
    if let Some(policy) = authenticate(&dispatcher, &headers)? {
        policy.check_manage_hosts()?;
    }
    let d = dispatcher.clone();
    if blocking(move || Ok(d.store.delete_host(&id)?)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::general(Code::NoSuchHost, "No such host"))
    }
}
