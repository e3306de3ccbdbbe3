//! Where a followed job's state comes from. [`ProgressSource`] is the one seam:
//! [`Streaming`] follows the job's event stream (`GET /v1/jobs/{id}/events`), reading the
//! job again whenever a host changes and handing on running commands' output as it is
//! printed; [`Polling`] asks `GET /v1/jobs/{id}` every [`POLL_INTERVAL`], for dispatchers
//! without the stream (and when the stream breaks).

use crate::api::{segment, ApiError, Client};
use serde_json::Value;
use std::time::Duration;

/// How often [`Polling`] asks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Polls in a row that may fail to reach the dispatcher (a restart, a network blip)
/// before following gives up: 30 s at [`POLL_INTERVAL`].
pub const UNREACHABLE_POLLS: u32 = 60;

/// One host's part of a job, as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    /// The host id.
    pub host: String,
    /// `pending`, `ready`, `reserved`, `success`, `failed`, `revoked`, `expired`.
    pub state: String,
    /// The command's exit status (or the result code), once final.
    pub retcode: Option<u64>,
    /// The dispatcher's message, once final.
    pub message: Option<String>,
    /// Output as text, once final.
    pub data: Option<String>,
    /// Output as base64, when it is not UTF-8.
    pub data_base64: Option<String>,
    /// Whether the output was cut.
    pub truncated: bool,
}

impl HostView {
    /// Whether the host has its final answer.
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "success" | "failed" | "revoked" | "expired" | "skipped" | "cancelled")
    }

    /// Whether it succeeded: final `success` with exit status 0.
    pub fn succeeded(&self) -> bool {
        self.state == "success" && self.retcode == Some(0)
    }

    /// Its output bytes (decoded from base64 when the output was not UTF-8).
    pub fn output(&self) -> Vec<u8> {
        use base64::Engine as _;
        match &self.data_base64 {
            Some(b64) => {
                base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_else(|_| b64.as_bytes().to_vec())
            }
            None => self.data.clone().unwrap_or_default().into_bytes(),
        }
    }
}

/// One look at a job.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The document as the dispatcher sent it (what `--json` prints).
    pub document: Value,
    /// Every host, in request order.
    pub hosts: Vec<HostView>,
    /// Every host is final.
    pub done: bool,
    /// Output printed by running commands since the previous look: `(host, text)`, in the
    /// order it was printed (only from [`Streaming`]).
    pub live: Vec<(String, String)>,
}

impl JobView {
    /// Reads a `GET /v1/jobs/{id}` document.
    pub fn from_document(document: Value) -> JobView {
        let text = |h: &Value, key: &str| h.get(key).and_then(Value::as_str).map(str::to_string);
        let hosts: Vec<HostView> = document
            .get("hosts")
            .and_then(Value::as_array)
            .map(|hosts| {
                hosts
                    .iter()
                    .map(|h| HostView {
                        host: text(h, "host").unwrap_or_default(),
                        state: text(h, "state").unwrap_or_default(),
                        retcode: h.get("retcode").and_then(Value::as_u64),
                        message: text(h, "message"),
                        data: text(h, "data"),
                        data_base64: text(h, "data_base64"),
                        truncated: h.get("truncated").and_then(Value::as_bool).unwrap_or(false),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let done =
            document.get("done").and_then(Value::as_bool).unwrap_or_else(|| hosts.iter().all(HostView::is_final));
        JobView { document, hosts, done, live: Vec::new() }
    }
}

/// Successive looks at one job, until it is done.
pub trait ProgressSource {
    /// The job's next state (blocking until there is news, or a poll is due).
    fn next(&mut self) -> Result<JobView, ApiError>;
}

/// Polls `GET /v1/jobs/{id}`.
pub struct Polling<'a> {
    client: &'a Client,
    path: String,
    interval: Duration,
    first: bool,
}

/// Whether a failed poll is worth repeating: the dispatcher could not be reached, or
/// answered 5xx (e.g. while it restarts). Refusals (4xx) are final.
fn transient(e: &ApiError) -> bool {
    match e {
        ApiError::Transport { .. } => true,
        ApiError::NotTheApi { status, .. } | ApiError::Api { status, .. } => *status >= 500,
    }
}

impl<'a> Polling<'a> {
    /// Follows job `id` on `client`'s dispatcher.
    pub fn new(client: &'a Client, id: &str) -> Polling<'a> {
        Polling { client, path: format!("/v1/jobs/{}", segment(id)), interval: POLL_INTERVAL, first: true }
    }
}

impl ProgressSource for Polling<'_> {
    fn next(&mut self) -> Result<JobView, ApiError> {
        if !std::mem::take(&mut self.first) {
            std::thread::sleep(self.interval);
        }
        let mut failures = 0;
        loop {
            match self.client.get(&self.path) {
                Ok(document) => return Ok(JobView::from_document(document)),
                Err(e) if transient(&e) && failures < UNREACHABLE_POLLS => {
                    failures += 1;
                    std::thread::sleep(self.interval);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One event of the job's stream.
#[derive(Debug, Clone, PartialEq)]
enum StreamEvent {
    /// A host changed, a batch started, …: the job is worth reading again.
    Changed,
    /// A piece of a running command's output.
    Output { host: String, text: String },
    /// The job is done.
    Done,
    /// The stream ended or failed.
    Closed,
}

/// Parses one SSE event (`event:` and `data:` lines) into what following needs.
fn parse_event(event: &str, data: &str) -> Option<StreamEvent> {
    match event {
        "output" => {
            use base64::Engine as _;
            let value: Value = serde_json::from_str(data).ok()?;
            let host = value.get("host")?.as_str()?.to_string();
            let raw = value.get("data")?.as_str()?;
            let text = match value.get("encoding").and_then(Value::as_str) {
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
                _ => raw.to_string(),
            };
            Some(StreamEvent::Output { host, text })
        }
        "done" => Some(StreamEvent::Done),
        _ => Some(StreamEvent::Changed),
    }
}

/// Follows `GET /v1/jobs/{id}/events` on a thread of its own (see the module's docs).
pub struct Streaming<'a> {
    client: &'a Client,
    path: String,
    events: std::sync::mpsc::Receiver<StreamEvent>,
    fallback: Option<Polling<'a>>,
    done: bool,
}

impl<'a> Streaming<'a> {
    /// Follows job `id`; `None` when the dispatcher has no event stream (then poll).
    pub fn new(client: &'a Client, id: &str) -> Option<Streaming<'a>> {
        let reader = client.stream(&format!("/v1/jobs/{}/events", segment(id))).ok()?;
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                use std::io::BufRead as _;
                let (mut event, mut data) = (String::new(), String::new());
                for line in std::io::BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if line.is_empty() {
                        if let Some(parsed) = parse_event(&event, &data) {
                            let done = parsed == StreamEvent::Done;
                            if tx.send(parsed).is_err() || done {
                                return;
                            }
                        }
                        event.clear();
                        data.clear();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = v.strip_prefix(' ').unwrap_or(v).to_string();
                    }
                }
                let _ = tx.send(StreamEvent::Closed);
            })
            .ok()?;
        Some(Streaming { client, path: format!("/v1/jobs/{}", segment(id)), events, fallback: None, done: false })
    }
}

impl ProgressSource for Streaming<'_> {
    fn next(&mut self) -> Result<JobView, ApiError> {
        if let Some(polling) = self.fallback.as_mut() {
            return polling.next();
        }
        let mut live = Vec::new();
        // Wait for news (at most a second, so the bar's counts stay fresh even when events
        // are few), take everything that is there, then read the job as it stands.
        if !self.done {
            if let Ok(first) = self.events.recv_timeout(Duration::from_secs(1)) {
                for event in std::iter::once(first).chain(self.events.try_iter()) {
                    match event {
                        StreamEvent::Output { host, text } => live.push((host, text)),
                        StreamEvent::Changed => {}
                        StreamEvent::Done => self.done = true,
                        StreamEvent::Closed if !self.done => {
                            // The stream broke (a dispatcher restart): go on by polling.
                            let id = self.path.trim_start_matches("/v1/jobs/").to_string();
                            self.fallback = Some(Polling::new(self.client, &id));
                        }
                        StreamEvent::Closed => {}
                    }
                }
            }
        }
        let mut view = JobView::from_document(self.client.get(&self.path)?);
        view.live = live;
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_unreachable_or_failing_dispatchers_are_asked_again() {
        let transport = ApiError::Transport { url: "u".into(), reason: "refused".into() };
        let api = |status| ApiError::Api {
            status,
            code: 0,
            hex: String::new(),
            name: String::new(),
            field: None,
            message: String::new(),
        };
        assert!(transient(&transport) && transient(&api(503)));
        assert!(!transient(&api(404)) && !transient(&api(401)));
    }

    #[test]
    fn stream_events_are_read() {
        assert_eq!(
            parse_event("output", r#"{"host":"a","data":"hi\n","offset":0}"#),
            Some(StreamEvent::Output { host: "a".into(), text: "hi\n".into() })
        );
        assert_eq!(
            parse_event("output", r#"{"host":"a","data":"/w==","encoding":"base64"}"#),
            Some(StreamEvent::Output { host: "a".into(), text: "\u{fffd}".into() })
        );
        assert_eq!(parse_event("host", r#"{"host":"a","state":"ready"}"#), Some(StreamEvent::Changed));
        assert_eq!(parse_event("done", "{}"), Some(StreamEvent::Done));
    }

    #[test]
    fn a_job_document_is_read() {
        let view = JobView::from_document(json!({"id": "j", "done": false, "hosts": [
            {"host": "a", "state": "success", "retcode": 0, "message": "Normal termination", "data": "hi\n"},
            {"host": "b", "state": "reserved", "retcode": null, "message": null, "data": null},
            {"host": "c", "state": "success", "retcode": 0, "data": "", "encoding": "base64", "data_base64": "/w=="},
        ]}));
        assert!(!view.done);
        assert!(view.hosts[0].succeeded() && view.hosts[0].is_final());
        assert!(!view.hosts[1].is_final());
        assert_eq!(view.hosts[0].output(), b"hi\n");
        assert_eq!(view.hosts[2].output(), [0xff]);
    }
}
