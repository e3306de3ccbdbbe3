//! Where a followed job's state comes from. [`ProgressSource`] is the one seam: today
//! [`Polling`] asks `GET /v1/jobs/{id}` every [`POLL_INTERVAL`]; an event stream
//! (`GET /v1/jobs/{id}/events`) can replace it without touching [`crate::follow`].

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
        matches!(self.state.as_str(), "success" | "failed" | "revoked" | "expired")
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
        JobView { document, hosts, done }
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
