//! Standing tasks: the host's effective task set, fetched from the dispatcher, verified,
//! kept, and followed.
//!
//! A thread of its own fetches `GET /v1/hosts/{id}/tasks/signed` at start and then every
//! `--tasks-poll` seconds with `If-None-Match`, so an unchanged set costs a 304. What it
//! receives is a signed message like every envelope; it is used only if the signature is
//! the shared secret's, it names this host, it was issued within [`MAX_CLOCK_SKEW`] of the
//! agent's clock, and it is not older than the set held (so a replayed old answer cannot
//! roll the tasks back). The last verified message is kept beside the state file, so an
//! agent that starts while the dispatcher is down runs the tasks it had.
//!
//! The heartbeat reports the digest of the set held (`tasks_digest`), at once when it
//! changes, so `GET /v1/hosts/{id}` shows whether the agent runs what the tree says.
//! `schedule` tasks are fired by the dispatcher and arrive as ordinary jobs; the agent-side
//! kinds (`integrity`, `log`) are read from here by what runs them.

use polaris_ops_wire::wire::{self, Secret};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Furthest a signed set's `issued_at` may be from the agent's clock, either way.
pub const MAX_CLOCK_SKEW: u64 = 300;

/// A verified task set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskSet {
    /// Format version.
    pub v: u32,
    /// The host it is for.
    pub host: String,
    /// Unix seconds when the dispatcher issued it.
    pub issued_at: u64,
    /// Its digest, as the dispatcher computed it.
    pub digest: String,
    /// The tasks, each with `name`, `from`, `overrides`, `kind` and the kind's fields.
    pub tasks: Vec<Value>,
    /// Names not run until a conflict in the tree is settled.
    #[serde(default)]
    pub conflicts: Vec<Value>,
}

impl TaskSet {
    /// The tasks of `kind`.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.tasks.iter().filter(move |t| t.get("kind").and_then(Value::as_str) == Some(kind))
    }
}

/// Why a fetched set was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The signature is not the shared secret's.
    #[error("signature: {0}")]
    Signature(#[from] wire::OpenError),
    /// The payload is not a task set.
    #[error("not a task set: {0}")]
    Malformed(String),
    /// It is another host's.
    #[error("it is for host {0:?}")]
    WrongHost(String),
    /// Its clock is too far from ours.
    #[error("issued at {issued_at}, {skew}s from this host's clock (at most {MAX_CLOCK_SKEW}s)")]
    Skewed {
        /// Its `issued_at`.
        issued_at: u64,
        /// How far that is from now.
        skew: u64,
    },
    /// Older than the set held: a replay.
    #[error("issued at {issued_at}, before the set held ({held})")]
    Older {
        /// Its `issued_at`.
        issued_at: u64,
        /// The held set's.
        held: u64,
    },
}

/// Verifies a signed set for `host`; `now` and `held` (the `issued_at` of the set held)
/// bound its age. `now = None` skips the clock check (a set read back from our own cache).
pub fn verify(
    secret: &Secret,
    message: &[u8],
    host: &str,
    now: Option<u64>,
    held: Option<u64>,
) -> Result<TaskSet, Refused> {
    let payload = wire::open(secret, message)?;
    let set: TaskSet = serde_json::from_slice(payload).map_err(|e| Refused::Malformed(e.to_string()))?;
    if set.host != host {
        return Err(Refused::WrongHost(set.host));
    }
    if let Some(now) = now {
        let skew = now.abs_diff(set.issued_at);
        if skew > MAX_CLOCK_SKEW {
            return Err(Refused::Skewed { issued_at: set.issued_at, skew });
        }
    }
    if let Some(held) = held {
        if set.issued_at < held {
            return Err(Refused::Older { issued_at: set.issued_at, held });
        }
    }
    Ok(set)
}

/// The set this agent holds, shared by the follower, the heartbeat and the runners of
/// agent-side tasks.
#[derive(Debug, Default)]
pub struct Standing {
    held: Mutex<Option<TaskSet>>,
    /// Set when the held set changes; the heartbeat clears it when it reports.
    changed: AtomicBool,
}

impl Standing {
    /// A copy of the set held, if any.
    pub fn current(&self) -> Option<TaskSet> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The digest of the set held.
    pub fn digest(&self) -> Option<String> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.digest.clone())
    }

    /// Whether the set changed since the last call (the heartbeat reports at once).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    fn issued_at(&self) -> Option<u64> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.issued_at)
    }

    /// Holds `set`; true when its digest differs from the one held before.
    fn hold(&self, set: TaskSet) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let changed = held.as_ref().map(|h| &h.digest) != Some(&set.digest);
        if changed {
            log_change(held.as_ref(), &set);
            self.changed.store(true, Ordering::SeqCst);
        }
        *held = Some(set);
        changed
    }
}

fn names(set: Option<&TaskSet>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = set
        .map(|s| {
            s.tasks
                .iter()
                .map(|t| {
                    let field = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                    (field("name"), field("kind"))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn task_named<'a>(set: Option<&'a TaskSet>, name: &str) -> Option<&'a Value> {
    set?.tasks.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name))
}

fn log_change(before: Option<&TaskSet>, after: &TaskSet) {
    let (old, new) = (names(before), names(Some(after)));
    let list = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    let added: Vec<String> = new.iter().filter(|n| !old.contains(n)).map(|(n, k)| format!("{n} ({k})")).collect();
    let removed: Vec<String> = old.iter().filter(|n| !new.contains(n)).map(|(n, k)| format!("{n} ({k})")).collect();
    let changed: Vec<String> = new
        .iter()
        .filter(|(n, _)| {
            let was = task_named(before, n);
            was.is_some() && was != task_named(Some(after), n)
        })
        .map(|(n, k)| format!("{n} ({k})"))
        .collect();
    log::info!(
        "standing tasks now {} (digest {}): added {}, changed {}, removed {}, {} conflict(s)",
        new.len(),
        &after.digest[..after.digest.len().min(12)],
        list(added),
        list(changed),
        list(removed),
        after.conflicts.len()
    );
}

/// Where and how to follow the task set.
#[derive(Debug, Clone)]
pub struct Follow {
    /// The dispatchers (the one in use answers).
    pub dispatchers: Arc<crate::heartbeat::DispatchUrls>,
    /// The host id.
    pub host_id: String,
    /// Bearer token, when the dispatcher has `--tokens`.
    pub token: Option<String>,
    /// The shared secret the set is signed with.
    pub secret: Secret,
    /// Time between fetches.
    pub every: Duration,
    /// Where the last verified set is kept.
    pub cache: PathBuf,
}

/// The cache file of a state file: `<state>.tasks`.
pub fn cache_path(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tasks");
    state_file.with_file_name(name)
}

/// Loads the cached set, if there is a valid one for `host`.
pub fn load_cache(follow: &Follow, standing: &Standing) {
    let Ok(message) = std::fs::read(&follow.cache) else { return };
    match verify(&follow.secret, &message, &follow.host_id, None, None) {
        Ok(set) => {
            log::info!("standing tasks from {} (issued at {})", follow.cache.display(), set.issued_at);
            standing.hold(set);
        }
        Err(e) => log::warn!("ignoring cached task set {}: {e}", follow.cache.display()),
    }
}

fn save_cache(path: &Path, message: &[u8]) -> std::io::Result<()> {
    // Written aside and renamed, so a crash never leaves half a set.
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, message)?;
    std::fs::rename(&tmp, path)
}

/// What one fetch did.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// A verified set, held now; true if it changed.
    Held(bool),
    /// 304: the set held is current.
    Unchanged,
}

fn fetch_once(follow: &Follow, standing: &Standing) -> Result<Fetched, String> {
    let base = follow.dispatchers.current();
    let url = format!("{base}/v1/hosts/{}/tasks/signed", follow.host_id);
    let mut request = ureq::get(&url).timeout(Duration::from_secs(10));
    if let Some(token) = &follow.token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    if let Some(digest) = standing.digest() {
        request = request.set("If-None-Match", &format!("\"{digest}\""));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            return Err(format!("{status}: {}", response.into_string().unwrap_or_default()));
        }
        Err(e) => {
            follow.dispatchers.failed(base);
            return Err(e.to_string());
        }
    };
    if response.status() == 304 {
        return Ok(Fetched::Unchanged);
    }
    let mut message = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut message).map_err(|e| e.to_string())?;
    let set = verify(&follow.secret, &message, &follow.host_id, Some(wire::unix_now()), standing.issued_at())
        .map_err(|e| format!("refused the task set: {e}"))?;
    if let Err(e) = save_cache(&follow.cache, &message) {
        log::warn!("cannot keep the task set in {}: {e}", follow.cache.display());
    }
    Ok(Fetched::Held(standing.hold(set)))
}

/// Starts the follower thread (see the module's documentation).
pub fn spawn(
    follow: Follow,
    standing: Arc<Standing>,
    shutdown: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("tasks".into()).spawn(move || {
        let mut trouble: Option<String> = None;
        while !shutdown.load(Ordering::SeqCst) {
            match fetch_once(&follow, &standing) {
                Ok(_) => {
                    if trouble.take().is_some() {
                        log::info!("task set fetched from {} again", follow.dispatchers.current());
                    }
                }
                Err(e) => {
                    // Logged when the kind of trouble changes, not at every poll.
                    if trouble.as_deref() != Some(e.as_str()) {
                        log::warn!("cannot fetch the task set from {}: {e}", follow.dispatchers.current());
                        trouble = Some(e);
                    }
                }
            }
            if !crate::heartbeat::pause(follow.every, &shutdown, None) {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef0123".to_vec()).expect("secret")
    }

    fn message(host: &str, issued_at: u64, digest: &str) -> Vec<u8> {
        let payload = serde_json::json!({
            "v": 1, "host": host, "issued_at": issued_at, "digest": digest,
            "tasks": [{"name": "etc", "from": "host", "overrides": [], "kind": "integrity", "spec": {}}],
            "conflicts": [],
        });
        wire::sign(&secret(), payload.to_string().as_bytes())
    }

    #[test]
    fn only_a_fresh_set_signed_for_this_host_is_used() {
        let now = 1_000_000;
        let set = verify(&secret(), &message("h1", now, "d1"), "h1", Some(now), None).expect("valid");
        assert_eq!(set.of_kind("integrity").count(), 1);
        assert_eq!(set.of_kind("log").count(), 0);
        assert_eq!(
            verify(&secret(), &message("h2", now, "d1"), "h1", Some(now), None),
            Err(Refused::WrongHost("h2".into()))
        );
        assert!(matches!(
            verify(&secret(), &message("h1", now - 301, "d1"), "h1", Some(now), None),
            Err(Refused::Skewed { skew: 301, .. })
        ));
        assert!(matches!(
            verify(&secret(), &message("h1", now - 5, "d1"), "h1", Some(now), Some(now)),
            Err(Refused::Older { .. })
        ));
        let other = Secret::new(b"another secret of 20b".to_vec()).expect("secret");
        let forged = wire::sign(&other, b"{}");
        assert!(matches!(verify(&secret(), &forged, "h1", Some(now), None), Err(Refused::Signature(_))));
    }

    #[test]
    fn holding_a_new_digest_is_a_change_and_the_same_one_is_not() {
        let standing = Standing::default();
        let set = verify(&secret(), &message("h1", 10, "d1"), "h1", None, None).expect("valid");
        assert!(standing.hold(set.clone()));
        assert!(standing.take_changed());
        assert!(!standing.hold(set));
        assert!(!standing.take_changed());
        assert_eq!(standing.digest().as_deref(), Some("d1"));
    }

    #[test]
    fn the_cache_sits_beside_the_state_file() {
        assert_eq!(
            cache_path(Path::new("/var/lib/polaris/agent.json")),
            Path::new("/var/lib/polaris/agent.json.tasks")
        );
    }
}
