//! `GET /v1/jobs/{id}/events`: a job as a Server-Sent Events stream.
//!
//! Every event is a row of `job_events`, written by triggers in the transaction of the
//! change itself (see the store's migration 10), so the stream misses nothing and can be
//! replayed: each event's SSE `id` is its row's sequence number, and a client that
//! reconnects with `Last-Event-ID` (browsers' `EventSource` does it by itself) gets what
//! came after. A job that finished long ago replays its whole history. Once the job is
//! done and every event is sent, a last `done` event (carrying the job's summary) ends the
//! stream.
//!
//! The stream reads the database every [`POLL_INTERVAL`]: a few streams per job cost a
//! query each per interval, and an event reaches them within it.

use crate::api::{authenticate, blocking, AppState, IdParam};
use crate::error::ApiError;
use crate::store::JobEvent;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use polaris_ops_wire::codes::Code;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

/// How often a stream looks for new events.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Most events read per look.
pub const EVENTS_PER_READ: u32 = 500;

/// The SSE event of a stored event: `event: <kind>`, `id: <seq>`, `data: <body>` with
/// `at_ms` added.
fn to_sse(event: &JobEvent) -> Event {
    let mut body: Value = serde_json::from_str(&event.body).unwrap_or_else(|_| json!({}));
    if let Value::Object(map) = &mut body {
        map.insert("at_ms".into(), json!(event.at_ms));
        // SQLite's json_object keeps NULL columns as nulls; drop them to keep events small.
        map.retain(|_, v| !v.is_null());
    }
    Event::default().id(event.seq.to_string()).event(&event.kind).data(body.to_string())
}

/// Where a stream stands between two reads.
struct Cursor {
    dispatcher: AppState,
    job_id: String,
    after: i64,
    pending: std::collections::VecDeque<Event>,
    finished: bool,
}

/// The next event of the stream, waiting for one if needed; `None` ends it.
async fn next_event(mut cursor: Cursor) -> Option<(Result<Event, Infallible>, Cursor)> {
    loop {
        if let Some(event) = cursor.pending.pop_front() {
            return Some((Ok(event), cursor));
        }
        if cursor.finished {
            return None;
        }
        let (d, id, after) = (cursor.dispatcher.clone(), cursor.job_id.clone(), cursor.after);
        // Whether the job was done is read before its events, so a `done` is never sent
        // ahead of the last change.
        let read = blocking(move || {
            let done = d.store.job_is_final(&id)?;
            let events = d.store.events_after(&id, after, EVENTS_PER_READ)?;
            let summary = if done && (events.len() as u32) < EVENTS_PER_READ { Some(summary(&d, &id)?) } else { None };
            Ok((events, summary))
        })
        .await;
        let (events, summary) = match read {
            Ok(read) => read,
            Err(e) => {
                // The client sees the failure and reconnects with its Last-Event-ID.
                log::warn!("event stream of job {}: {}", cursor.job_id, e.message);
                return None;
            }
        };
        if let Some(last) = events.last() {
            cursor.after = last.seq;
        }
        cursor.pending.extend(events.iter().map(to_sse));
        if let Some(summary) = summary {
            cursor
                .pending
                .push_back(Event::default().id(cursor.after.to_string()).event("done").data(summary.to_string()));
            cursor.finished = true;
        }
        if cursor.pending.is_empty() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// What the `done` event says: the job's hosts by state.
fn summary(d: &crate::Dispatcher, id: &str) -> Result<Value, ApiError> {
    let (job, hosts) = d.store.job(id)?.ok_or_else(|| ApiError::general(Code::NoSuchJob, "no job with this id"))?;
    let mut by_state = serde_json::Map::new();
    for h in &hosts {
        let n = by_state.get(h.state.as_str()).and_then(Value::as_u64).unwrap_or(0);
        by_state.insert(h.state.as_str().to_string(), json!(n + 1));
    }
    Ok(json!({ "id": job.id, "cancelled": job.cancelled_at_ms.is_some(), "hosts": hosts.len(), "summary": by_state }))
}

/// `GET /v1/jobs/{id}/events` (see the module's documentation).
pub(crate) async fn job_events(
    State(dispatcher): State<AppState>,
    headers: HeaderMap,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    authenticate(&dispatcher, &headers)?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => {
            value.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::field(Code::InvalidValue, "Last-Event-ID", "Last-Event-ID must be an event id of this stream")
            })?
        }
    };
    let (d, job_id) = (dispatcher.clone(), id.clone());
    if blocking(move || Ok(d.store.job(&job_id)?.is_none())).await? {
        return Err(ApiError::general(Code::NoSuchJob, "no job with this id"));
    }
    let cursor = Cursor { dispatcher, job_id: id, after, pending: Default::default(), finished: false };
    let stream = futures_util::stream::unfold(cursor, next_event);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
