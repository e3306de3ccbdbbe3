//! Registration with the dispatcher, then heartbeats.
//!
//! A thread of its own (it never blocks the serve loop) registers the host
//! (`POST /v1/hosts`), retrying with backoff while the dispatcher is unreachable, and then
//! registers again every `--heartbeat` seconds, which moves the host's `last_seen_ms`. A
//! `201` to a heartbeat means the dispatcher had forgotten the host (deleted, or a new
//! database): it is registered again. With `--heartbeat 0` it registers once, as before
//! heartbeats existed. A refusal (4xx other than 429) ends registration without heartbeats;
//! with them it is retried at the next beat, so a fixed token file takes effect.
//!
//! Each beat also says which standing task set the agent holds (`tasks_digest`, see
//! [`crate::standing`]), and a change of that set brings the next beat forward. A
//! dispatcher with queue shards answers with the host's shard (`"queue"`), which the
//! agent's queue connections then follow ([`crate::shard`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest wait between registration attempts while the dispatcher is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a waiting heartbeat thread checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// The dispatchers an agent talks to (`--dispatch`, comma-separated): one at a time, the
/// next one when it stops answering. They share one database, so any of them will do, and
/// an agent whose dispatcher died still learns where its queue shard went.
#[derive(Debug)]
pub struct DispatchUrls {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl DispatchUrls {
    /// The URLs of a comma-separated `--dispatch` list (blanks dropped); `None` if it has none.
    pub fn parse(list: &str) -> Option<DispatchUrls> {
        let urls: Vec<String> =
            list.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        (!urls.is_empty()).then(|| DispatchUrls { urls, current: AtomicUsize::new(0) })
    }

    /// The dispatcher in use.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::SeqCst) % self.urls.len()]
    }

    /// `url` did not answer: the next one is used from now on (unless another thread
    /// moved on already).
    pub fn failed(&self, url: &str) {
        let at = self.current.load(Ordering::SeqCst);
        if self.urls[at % self.urls.len()] == url && self.urls.len() > 1 {
            let next = (at + 1) % self.urls.len();
            if self.current.compare_exchange(at, next, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                log::warn!("dispatcher {url} does not answer; using {} now", self.urls[next]);
            }
        }
    }
}

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The dispatchers, e.g. `http://127.0.0.1:8080`.
    pub dispatchers: Arc<DispatchUrls>,
    /// The host id.
    pub host_id: String,
    /// Bearer token, when the dispatcher has `--tokens`.
    pub token: Option<String>,
    /// Time between heartbeats; zero registers once.
    pub every: Duration,
    /// The standing tasks held, whose digest each beat reports.
    pub standing: Option<Arc<crate::standing::Standing>>,
    /// The queue address the agent's connections use: moved to the shard an answer names.
    pub queue: Arc<crate::shard::QueueAddress>,
}

enum Outcome {
    /// 200 (known host refreshed) or 201 (registered anew), and the queue shard the answer
    /// names, if it names one.
    Accepted(u16, Option<String>),
    /// The dispatcher said no; retrying the same request will not help.
    Refused(u16, String),
    /// No answer, 5xx or 429.
    Unreachable(String),
}

/// Starts the registration and heartbeat thread.
pub fn spawn(registration: Registration, shutdown: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("heartbeat".into()).spawn(move || run(&registration, &shutdown))
}

fn send(registration: &Registration, body: &serde_json::Value) -> Outcome {
    let url = registration.dispatchers.current();
    let endpoint = format!("{url}/v1/hosts");
    let mut request = ureq::post(&endpoint).timeout(Duration::from_secs(10));
    if let Some(token) = &registration.token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.send_json(body) {
        Ok(response) => {
            let status = response.status();
            // An answer without a readable body still registered the host.
            let shard = response
                .into_json::<serde_json::Value>()
                .ok()
                .and_then(|body| body.get("queue").and_then(|q| q.as_str()).map(str::to_string));
            Outcome::Accepted(status, shard)
        }
        Err(ureq::Error::Status(status, response)) if (400..500).contains(&status) && status != 429 => {
            Outcome::Refused(status, response.into_string().unwrap_or_default())
        }
        Err(e) => {
            registration.dispatchers.failed(url);
            Outcome::Unreachable(e.to_string())
        }
    }
}

/// Sleeps `duration`, waking early on shutdown, and when `standing` changed; false if
/// shutting down.
pub(crate) fn pause(duration: Duration, shutdown: &AtomicBool, standing: Option<&crate::standing::Standing>) -> bool {
    let end = Instant::now() + duration;
    while !shutdown.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || standing.is_some_and(|s| s.take_changed()) {
            return true;
        }
        std::thread::sleep(left.min(SHUTDOWN_POLL));
    }
    false
}

fn run(registration: &Registration, shutdown: &AtomicBool) {
    let Registration { host_id, every, .. } = registration;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut registered = false;
    // Logged once per kind of trouble, not at every beat.
    let mut trouble = false;
    let mut backoff = Duration::from_millis(200);
    while !shutdown.load(Ordering::SeqCst) {
        // Facts are read afresh at every beat: addresses and memory change.
        let mut body = serde_json::json!({
            "id": host_id,
            "hostname": hostname.trim(),
            "facts": crate::facts::registration_facts(),
        });
        if let Some(digest) = registration.standing.as_ref().and_then(|s| s.digest()) {
            body["tasks_digest"] = serde_json::json!(digest);
        }
        let url = registration.dispatchers.current().to_string();
        let wait = match send(registration, &body) {
            Outcome::Accepted(status, shard) => {
                if let Some(shard) = shard {
                    registration.queue.follow(&shard);
                }
                if !registered {
                    log::info!("registered host {host_id} with {url}");
                } else if status == 201 {
                    log::warn!("the dispatcher at {url} did not know host {host_id} any more; registered it again");
                } else if trouble {
                    log::info!("heartbeats of host {host_id} reach {url} again");
                }
                registered = true;
                trouble = false;
                backoff = Duration::from_millis(200);
                if every.is_zero() {
                    return;
                }
                *every
            }
            Outcome::Refused(status, detail) => {
                if !trouble {
                    log::error!("dispatcher refused registration of {host_id} ({status}): {detail}");
                }
                trouble = true;
                if every.is_zero() {
                    return;
                }
                *every
            }
            Outcome::Unreachable(e) => {
                if !registered {
                    log::warn!("cannot register with {url} yet ({e}); retrying in {backoff:?}");
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                } else {
                    if !trouble {
                        log::warn!("heartbeat of host {host_id} to {url} failed ({e}); retrying every {every:?}");
                    }
                    trouble = true;
                    *every
                }
            }
        };
        if !pause(wait, shutdown, registration.standing.as_deref()) {
            return;
        }
    }
}
