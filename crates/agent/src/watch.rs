//! The runners of agent-side standing tasks: continuous integrity (`kind: "integrity"`,
//! spec `{"every": SECONDS}`) and log watch (`kind: "log"`, spec `{"paths": [...],
//! "every": SECONDS}`).
//!
//! A supervisor thread reads the held task set ([`crate::standing::Standing`]) every
//! second and keeps one thread per such task: a task added starts one, a task removed stops
//! its own, and a changed spec is handed to the running thread (a new interval applies
//! from the next wait, without a restart). Each runner has its own queue connection, so
//! nothing here ever blocks the serve loop, and puts signed messages on the reply tube.
//!
//! **Continuous integrity** runs `integrity.check` (the rules only from the agent's own
//! `--config`; one scan at a time across all tasks) and reports only what changed since
//! its last report: the differences from the baseline that are new or different, and
//! those gone since ("resolved"). What was last reported is kept per task beside the state
//! file, signed with the shared secret like the baseline; nothing changed, nothing is sent.
//!
//! **Log watch** follows each path (only under `[log] roots`, resolved as `log.tail`
//! resolves; a path refused is reported once and skipped) by (dev, inode, offset): a
//! rename is noticed as a new inode at the path, and the old file is read to its end by its
//! open descriptor (or found again by inode in its directory, after an agent restart) before
//! the new one is read from 0; a truncation (size below the offset, or the bytes before the
//! offset no longer what they were) starts again at 0. Complete lines go out in bounded
//! batches at every look. The offsets are kept beside the state file after every batch the
//! queue took; each line is named by its file incarnation and offset, and the dispatcher
//! stores a name once, so a batch sent again after a crash (sent, offset not yet kept)
//! adds nothing: at-least-once from the agent, exactly-once in the dispatcher.

use crate::config::{self, LogSettings};
use crate::integrity;
use crate::logs;
use crate::shard::QueueAddress;
use crate::standing::Standing;
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, IntegrityReport, LogBatch, Secret};
use polaris_proto::client::Client;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most lines in one log batch.
pub const MAX_BATCH_LINES: usize = 500;
/// Most bytes (of JSON-escaped lines) in one log batch.
pub const MAX_BATCH_BYTES: usize = 32 * 1024;
/// Longest line shipped; a longer one is cut into pieces of this size.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// A log task's `every` when its spec does not say.
pub const DEFAULT_LOG_EVERY: u64 = 2;
/// Bytes before the offset remembered to notice a truncate-and-refill.
const CHECK_BYTES: u64 = 32;
/// Priority of standing-task messages: behind results and live output.
const WATCH_PRIORITY: u32 = 300;
const WATCH_TTR: u32 = 60;
const DEFAULT_MAX_JOB_SIZE: usize = 65_535;

/// What the runners need.
#[derive(Clone)]
pub struct Watch {
    /// This host.
    pub host_id: String,
    /// The queue (it moves with the host's shard).
    pub queue: Arc<QueueAddress>,
    /// The tube the dispatcher reads.
    pub reply_tube: String,
    /// The shared secret messages are signed with.
    pub secret: Secret,
    /// The agent's `--state-file`: the runners' files sit beside it.
    pub state_file: PathBuf,
    /// The `--config` settings in force (replaced on SIGHUP).
    pub settings: Arc<Mutex<config::Settings>>,
    /// Set on SIGTERM.
    pub shutdown: Arc<AtomicBool>,
}

struct Runner {
    kind: String,
    spec: Arc<Mutex<Value>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the supervisor thread.
pub fn spawn(watch: Watch, standing: Arc<Standing>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("watch".into()).spawn(move || supervise(&watch, &standing))
}

fn supervise(watch: &Watch, standing: &Standing) {
    let scan_lock = Arc::new(Mutex::new(()));
    let mut runners: HashMap<String, Runner> = HashMap::new();
    while !watch.shutdown.load(Ordering::SeqCst) {
        let wanted: BTreeMap<String, (String, Value)> = standing
            .current()
            .map(|set| {
                set.tasks
                    .iter()
                    .filter_map(|t| {
                        let kind = t.get("kind")?.as_str()?;
                        if kind != "integrity" && kind != "log" {
                            return None;
                        }
                        let name = t.get("name")?.as_str()?.to_string();
                        let spec = t.get("spec").cloned().unwrap_or(Value::Object(Map::new()));
                        Some((name, (kind.to_string(), spec)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        runners.retain(|name, runner| {
            let keep = wanted.get(name).is_some_and(|(kind, _)| *kind == runner.kind) && !runner.thread.is_finished();
            if !keep {
                log::info!("standing task {name} ({}): stopping its runner", runner.kind);
                runner.stop.store(true, Ordering::SeqCst);
            }
            keep
        });
        for (name, (kind, spec)) in wanted {
            if let Some(runner) = runners.get(&name) {
                let mut held = runner.spec.lock().unwrap_or_else(|p| p.into_inner());
                if *held != spec {
                    log::info!("standing task {name} ({kind}): spec now {spec}");
                    *held = spec;
                }
                continue;
            }
            let shared = Arc::new(Mutex::new(spec));
            let stop = Arc::new(AtomicBool::new(false));
            let (w, s, st, n, lock) = (watch.clone(), shared.clone(), stop.clone(), name.clone(), scan_lock.clone());
            let integrity = kind == "integrity";
            let started = std::thread::Builder::new().name(format!("task-{kind}")).spawn(move || {
                if integrity {
                    run_integrity(&w, &n, &s, &st, &lock);
                } else {
                    run_log(&w, &n, &s, &st);
                }
            });
            match started {
                Ok(thread) => {
                    log::info!("standing task {name} ({kind}): runner started");
                    runners.insert(name, Runner { kind, spec: shared, stop, thread });
                }
                Err(e) => log::error!("standing task {name}: cannot start its runner: {e}"),
            }
        }
        pause(Duration::from_secs(1), &[&watch.shutdown]);
    }
    for (_, runner) in runners {
        runner.stop.store(true, Ordering::SeqCst);
        let _ = runner.thread.join();
    }
}

/// Sleeps up to `duration`, in short steps; false if a flag was set.
fn pause(duration: Duration, flags: &[&AtomicBool]) -> bool {
    let end = Instant::now() + duration;
    loop {
        if flags.iter().any(|f| f.load(Ordering::SeqCst)) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

fn every_of(spec: &Mutex<Value>, default: u64) -> Duration {
    let secs = spec.lock().unwrap_or_else(|p| p.into_inner()).get("every").and_then(Value::as_u64).unwrap_or(default);
    Duration::from_secs(secs.max(1))
}

/// Waits until `every` (read again at every step, so a change applies at once) has passed
/// since `since`; false when stopped.
fn wait_interval(spec: &Mutex<Value>, default: u64, since: Instant, flags: &[&AtomicBool]) -> bool {
    loop {
        if flags.iter().any(|f| f.load(Ordering::SeqCst)) {
            return false;
        }
        if since.elapsed() >= every_of(spec, default) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A queue connection using the reply tube, made when first needed and dropped on error.
struct Sender<'a> {
    watch: &'a Watch,
    /// A connection, its max job size and the queue generation it was made at.
    conn: Option<(Client, usize, u64)>,
}

impl<'a> Sender<'a> {
    fn new(watch: &'a Watch) -> Self {
        Sender { watch, conn: None }
    }

    fn max_job_size(&mut self) -> usize {
        self.connected().map_or(DEFAULT_MAX_JOB_SIZE, |(_, max, _)| *max)
    }

    fn connected(&mut self) -> Option<&mut (Client, usize, u64)> {
        if self.conn.as_ref().is_some_and(|(_, _, generation)| self.watch.queue.is_stale(*generation)) {
            // The host moved to another shard: report there.
            self.conn = None;
        }
        if self.conn.is_none() {
            let (endpoint, generation) = self.watch.queue.current();
            let made = endpoint.connect(Duration::from_secs(2)).and_then(|mut c| {
                c.use_tube(&self.watch.reply_tube)?;
                let max = c
                    .stats()?
                    .get_u64("max-job-size")
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(DEFAULT_MAX_JOB_SIZE);
                Ok((c, max, generation))
            });
            match made {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    log::warn!("standing tasks: cannot reach the queue at {}: {e}", self.watch.queue);
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Signs and puts `payload`; false if it could not be put.
    fn put(&mut self, payload: &impl serde::Serialize) -> bool {
        let Ok(json) = serde_json::to_vec(payload) else { return false };
        let body = wire::sign(&self.watch.secret, &json);
        let Some((conn, _, _)) = self.connected() else { return false };
        match conn.put(WATCH_PRIORITY, 0, WATCH_TTR, &body) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("standing tasks: cannot put a message on {}: {e}", self.watch.reply_tube);
                self.conn = None;
                false
            }
        }
    }
}

fn beside_state(state_file: &Path, suffix: &str) -> PathBuf {
    let mut name = state_file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    state_file.with_file_name(name)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------- continuous integrity

/// What a continuous-integrity task last reported, kept signed beside the state file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reported {
    /// The host it is for.
    pub host: String,
    /// The task.
    pub task: String,
    /// The number of the last report.
    pub seq: u64,
    /// Each difference reported and still standing: `"added\tPATH"` (or `removed`,
    /// `changed`, `failed`) → its entry.
    pub entries: BTreeMap<String, Value>,
}

/// The file of task `task`'s last report.
pub fn reported_path(state_file: &Path, task: &str) -> PathBuf {
    beside_state(state_file, &format!(".integrity-watch.{task}"))
}

/// Reads what `task` last reported; a missing, forged or foreign file is nothing reported.
pub fn load_reported(path: &Path, secret: &Secret, host: &str, task: &str) -> Reported {
    let fresh = Reported { host: host.into(), task: task.into(), ..Reported::default() };
    let Ok(message) = std::fs::read(path) else { return fresh };
    match wire::open(secret, &message).ok().and_then(|p| serde_json::from_slice::<Reported>(p).ok()) {
        Some(r) if r.host == host && r.task == task => r,
        _ => {
            log::error!("integrity task {task}: {} is not signed for this host; starting afresh", path.display());
            fresh
        }
    }
}

fn save_reported(path: &Path, secret: &Secret, reported: &Reported) -> std::io::Result<()> {
    let json = serde_json::to_vec(reported).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_atomically(path, &wire::sign(secret, &json))
}

/// The differences an `integrity.check` outcome stands for, keyed as in [`Reported`].
pub fn standing_differences(outcome: &integrity::Outcome) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    match outcome.status {
        Err(code) => {
            out.insert(format!("failed\t{}", code.label()), json!({"code": code.label(), "message": outcome.message}));
        }
        Ok(_) => {
            let report: Value = serde_json::from_str(&outcome.data).unwrap_or(Value::Null);
            for list in ["added", "removed", "changed"] {
                for entry in report.get(list).and_then(Value::as_array).into_iter().flatten() {
                    if let Some(path) = entry.get("path").and_then(Value::as_str) {
                        out.insert(format!("{list}\t{path}"), entry.clone());
                    }
                }
            }
        }
    }
    out
}

/// What is new or different in `now` since `before`, and what of `before` is gone: the
/// report JSON and its AIDE bits, or `None` when nothing changed.
pub fn changes_since(
    before: &BTreeMap<String, Value>,
    now: &BTreeMap<String, Value>,
    summary: &Value,
    max_entries: usize,
) -> Option<(Value, u32)> {
    let mut lists: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, entry) in now {
        if before.get(key) != Some(entry) {
            let (list, _) = key.split_once('\t').unwrap_or((key.as_str(), ""));
            let list = match list {
                "added" => "added",
                "removed" => "removed",
                "changed" => "changed",
                _ => "failed",
            };
            *counts.entry(list).or_default() += 1;
            let shown = lists.entry(list).or_default();
            if shown.len() < max_entries {
                shown.push(entry.clone());
            }
        }
    }
    for (key, entry) in before {
        if !now.contains_key(key) {
            let (was, _) = key.split_once('\t').unwrap_or((key.as_str(), ""));
            *counts.entry("resolved").or_default() += 1;
            let shown = lists.entry("resolved").or_default();
            if shown.len() < max_entries {
                let mut e = entry.clone();
                e["was"] = json!(was);
                shown.push(e);
            }
        }
    }
    if counts.is_empty() {
        return None;
    }
    let count = |l: &str| counts.get(l).copied().unwrap_or(0);
    let bits =
        u32::from(count("added") > 0) | u32::from(count("removed") > 0) << 1 | u32::from(count("changed") > 0) << 2;
    let mut report = json!({
        "method": "integrity.watch",
        "since_last_report": {
            "added": count("added"), "removed": count("removed"), "changed": count("changed"),
            "resolved": count("resolved"), "failed": count("failed"),
        },
        "summary": summary,
    });
    for list in ["added", "removed", "changed", "resolved", "failed"] {
        report[list] = Value::Array(lists.remove(list).unwrap_or_default());
    }
    let omitted: usize = ["added", "removed", "changed", "resolved", "failed"]
        .iter()
        .map(|l| count(l) - report[*l].as_array().map_or(0, Vec::len))
        .sum();
    if omitted > 0 {
        report["omitted"] = json!({"more": format!("{omitted} more entries not listed")});
    }
    Some((report, bits))
}

fn run_integrity(watch: &Watch, name: &str, spec: &Mutex<Value>, stop: &AtomicBool, scan_lock: &Mutex<()>) {
    let path = reported_path(&watch.state_file, name);
    let mut reported = load_reported(&path, &watch.secret, &watch.host_id, name);
    let mut sender = Sender::new(watch);
    let mut last_scan: Option<Instant> = None;
    let flags = [stop, &*watch.shutdown];
    loop {
        if let Some(since) = last_scan {
            if !wait_interval(spec, 300, since, &flags) {
                return;
            }
        }
        last_scan = Some(Instant::now());
        let settings = watch.settings.lock().unwrap_or_else(|p| p.into_inner()).integrity.clone();
        let max_bytes = sender.max_job_size().saturating_sub(4096).max(1024);
        let outcome = match &settings {
            None => integrity::Outcome {
                status: Err(Code::IntegrityNotConfigured),
                message: "Not configured: the agent's --config has no [integrity] section".into(),
                data: String::new(),
            },
            Some(settings) => {
                // One scan at a time, whatever the number of tasks.
                let _one = scan_lock.lock().unwrap_or_else(|p| p.into_inner());
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                integrity::run(integrity::Operation::Check, settings, &watch.secret, &watch.host_id, max_bytes)
            }
        };
        let now = standing_differences(&outcome);
        let summary: Value = serde_json::from_str::<Value>(&outcome.data)
            .ok()
            .and_then(|r| r.get("summary").cloned())
            .unwrap_or(Value::Null);
        let max_entries = settings.as_ref().map_or(integrity::DEFAULT_REPORT_MAX_ENTRIES, |s| s.report_max_entries);
        let Some((mut report, retcode)) = changes_since(&reported.entries, &now, &summary, max_entries) else {
            continue;
        };
        // Within the queue's limit: the lists go before the summary does.
        if serde_json::to_string(&report).map_or(0, |s| s.len()) > max_bytes {
            for list in ["added", "removed", "changed", "resolved", "failed"] {
                report[list] = json!([]);
            }
            report["omitted"] = json!({"more": "entries not listed: the report is larger than the queue takes"});
        }
        let seq = reported.seq + 1;
        let message = format!("{}: {}", name, outcome.message);
        let at_ms = u64::try_from(wire::unix_now_ms()).unwrap_or(0);
        let msg = IntegrityReport {
            v: 1,
            kind: wire::INTEGRITY_REPORT_KIND.into(),
            host: watch.host_id.clone(),
            task: name.into(),
            seq,
            at_ms,
            retcode,
            message,
            report,
        };
        if !sender.put(&msg) {
            // Not reported: the next scan reports these changes (and any since).
            continue;
        }
        log::info!("integrity task {name}: report {seq} sent: {}", outcome.message);
        reported.seq = seq;
        reported.entries = now;
        if let Err(e) = save_reported(&path, &watch.secret, &reported) {
            log::warn!("integrity task {name}: cannot keep what was reported in {}: {e}", path.display());
        }
    }
}

// ---------------------------------------------------------------- log watch

/// Where one watched path was read up to, as kept beside the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The file's device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Grows at every switch of file (rename, truncation), so (dev, ino, generation)
    /// names one incarnation even when an inode number is used again.
    pub generation: u64,
    /// Bytes read and shipped, up to the end of the last complete line.
    pub offset: u64,
    /// Hex of the bytes just before `offset`, to notice a truncate-and-refill.
    #[serde(default)]
    pub check: String,
}

impl Position {
    fn file_id(&self) -> String {
        format!("{}:{}:{}", self.dev, self.ino, self.generation)
    }
}

/// The offsets file: `"TASK\tPATH"` → position.
pub fn positions_path(state_file: &Path) -> PathBuf {
    beside_state(state_file, ".log-watch")
}

static POSITIONS_LOCK: Mutex<()> = Mutex::new(());

fn load_positions(path: &Path) -> BTreeMap<String, Position> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Keeps `task`'s positions (the file is shared by every log task, so it is read, merged
/// and written under a lock).
fn save_positions(path: &Path, task: &str, positions: &BTreeMap<String, Position>) -> std::io::Result<()> {
    let _held = POSITIONS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut all = load_positions(path);
    let prefix = format!("{task}\t");
    all.retain(|k, _| !k.starts_with(&prefix));
    all.extend(positions.iter().map(|(p, pos)| (format!("{task}\t{p}"), pos.clone())));
    let json = serde_json::to_vec(&all).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_atomically(path, &json)
}

/// One path being followed.
struct Tracked {
    pos: Position,
    /// The file read, by its descriptor (it stays readable after a rename).
    file: Option<std::fs::File>,
}

/// What one look at a file found: complete lines from `offset`, with their lengths.
struct Piece {
    lines: Vec<String>,
    lengths: Vec<u64>,
    /// Offset after the last line.
    end: u64,
}

/// Reads complete lines of `file` from `offset`, at most one batch's worth. `to_eof`: the
/// file will not grow (rotated away), so a last line without newline counts too.
fn read_lines(file: &std::fs::File, offset: u64, to_eof: bool) -> std::io::Result<Piece> {
    let mut piece = Piece { lines: Vec::new(), lengths: Vec::new(), end: offset };
    let mut bytes = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let mut at = offset;
    loop {
        let n = file.read_at(&mut buf, at)?;
        let eof = n == 0;
        carry.extend_from_slice(&buf[..n]);
        at += n as u64;
        let mut start = 0;
        loop {
            let rest = &carry[start..];
            let (line, length) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) if i <= MAX_LINE_BYTES => (&rest[..i], i + 1),
                _ if rest.len() >= MAX_LINE_BYTES => (&rest[..MAX_LINE_BYTES], MAX_LINE_BYTES),
                _ if eof && to_eof && !rest.is_empty() => (rest, rest.len()),
                _ => break,
            };
            let text = String::from_utf8_lossy(line).into_owned();
            let escaped = serde_json::to_string(&text).map_or(text.len(), |s| s.len()) + 8;
            if !piece.lines.is_empty() && (piece.lines.len() >= MAX_BATCH_LINES || bytes + escaped > MAX_BATCH_BYTES) {
                return Ok(piece);
            }
            bytes += escaped;
            piece.lines.push(text);
            piece.lengths.push(length as u64);
            piece.end += length as u64;
            start += length;
        }
        carry.drain(..start);
        if eof {
            return Ok(piece);
        }
    }
}

fn check_bytes(file: &std::fs::File, offset: u64) -> String {
    let from = offset.saturating_sub(CHECK_BYTES);
    let mut buf = vec![0u8; (offset - from) as usize];
    match file.read_exact_at(&mut buf, from) {
        Ok(()) => hex::encode(buf),
        Err(_) => String::new(),
    }
}

/// Ships `file`'s lines from `tracked.pos.offset` (to its end when `to_eof`) in batches,
/// keeping the position after each batch the queue took; false if a put failed.
#[allow(clippy::too_many_arguments)]
fn ship(
    sender: &mut Sender<'_>,
    watch: &Watch,
    task: &str,
    path: &str,
    pos: &mut Position,
    file: &std::fs::File,
    to_eof: bool,
    keep: &mut dyn FnMut(&Position),
) -> bool {
    loop {
        let piece = match read_lines(file, pos.offset, to_eof) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("log task {task}: reading {path}: {e}");
                return true;
            }
        };
        if piece.lines.is_empty() {
            return true;
        }
        let batch = LogBatch {
            v: 1,
            kind: wire::LOG_BATCH_KIND.into(),
            host: watch.host_id.clone(),
            task: task.into(),
            path: path.into(),
            file: pos.file_id(),
            offset: pos.offset,
            lines: piece.lines,
            lengths: piece.lengths,
            refused: None,
        };
        if !sender.put(&batch) {
            return false;
        }
        pos.offset = piece.end;
        pos.check = check_bytes(file, pos.offset);
        keep(pos);
    }
}

/// Finds the file with `dev` and `ino` in `dir` (where a rename took it), if it is there.
fn find_by_inode(dir: &Path, dev: u64, ino: u64) -> Option<std::fs::File> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_file() && meta.dev() == dev && meta.ino() == ino {
            let file = crate::sys::open_read_nofollow(&entry.path()).ok()?;
            let same = file.metadata().ok().is_some_and(|m| m.dev() == dev && m.ino() == ino);
            return same.then_some(file);
        }
    }
    None
}

/// A refusal of a path: a batch with no lines, the code and the reason.
fn refusal(watch: &Watch, task: &str, path: &str, code: Code, message: &str) -> LogBatch {
    LogBatch {
        v: 1,
        kind: wire::LOG_BATCH_KIND.into(),
        host: watch.host_id.clone(),
        task: task.into(),
        path: path.into(),
        file: String::new(),
        offset: 0,
        lines: Vec::new(),
        lengths: Vec::new(),
        refused: Some(wire::Refusal { code: code.label().to_string(), message: message.to_string() }),
    }
}

/// One look at `path`: follows a rename or truncation, ships what is new.
#[allow(clippy::too_many_arguments)]
fn look(
    sender: &mut Sender<'_>,
    watch: &Watch,
    task: &str,
    path: &str,
    tracked: &mut Tracked,
    roots: &LogSettings,
    refused: &mut HashSet<String>,
    keep: &mut dyn FnMut(&Position),
) {
    let canonical = match logs::resolve(path, &roots.roots) {
        Ok(c) => {
            refused.remove(path);
            c
        }
        Err((Code::PathNotAllowed, message)) => {
            // Never opened, never read; said once.
            tracked.file = None;
            if refused.insert(path.to_string()) {
                log::warn!("log task {task}: {message}");
                sender.put(&refusal(watch, task, path, Code::PathNotAllowed, &message));
            }
            return;
        }
        Err((_, _missing)) => {
            // Between a rename and the new file: finish the old one.
            if let Some(old) = tracked.file.take() {
                if !ship(sender, watch, task, path, &mut tracked.pos, &old, false, keep) {
                    tracked.file = Some(old);
                    return;
                }
                tracked.file = Some(old);
            }
            return;
        }
    };
    let file = match crate::sys::open_read_nofollow(&canonical) {
        Ok(f) => f,
        Err(e) => {
            log::debug!("log task {task}: {path}: {e}");
            return;
        }
    };
    let Ok(meta) = file.metadata() else { return };
    if !meta.is_file() {
        if refused.insert(path.to_string()) {
            let message = format!("{path:?} is not a regular file");
            sender.put(&refusal(watch, task, path, Code::PathNotAllowed, &message));
        }
        return;
    }
    let (dev, ino) = (meta.dev(), meta.ino());
    if tracked.pos.dev != dev || tracked.pos.ino != ino {
        if tracked.pos.dev != 0 || tracked.pos.ino != 0 {
            // Renamed away (or replaced): read the old file to its end first, by the
            // descriptor held, or found again by inode beside the path after a restart.
            let old = tracked
                .file
                .take()
                .or_else(|| canonical.parent().and_then(|d| find_by_inode(d, tracked.pos.dev, tracked.pos.ino)));
            if let Some(old) = old {
                if !ship(sender, watch, task, path, &mut tracked.pos, &old, true, keep) {
                    tracked.file = Some(old);
                    return;
                }
            }
            log::info!("log task {task}: {path} was rotated; following the new file");
            tracked.pos =
                Position { dev, ino, generation: tracked.pos.generation + 1, offset: 0, check: String::new() };
        } else {
            tracked.pos = Position { dev, ino, generation: 0, offset: 0, check: String::new() };
        }
        keep(&tracked.pos);
    } else if meta.size() < tracked.pos.offset
        || (tracked.pos.offset > 0
            && !tracked.pos.check.is_empty()
            && check_bytes(&file, tracked.pos.offset) != tracked.pos.check)
    {
        log::info!("log task {task}: {path} was truncated; reading it from the start");
        tracked.pos.generation += 1;
        tracked.pos.offset = 0;
        tracked.pos.check = String::new();
        keep(&tracked.pos);
    }
    ship(sender, watch, task, path, &mut tracked.pos, &file, false, keep);
    tracked.file = Some(file);
}

fn spec_paths(spec: &Mutex<Value>) -> Vec<String> {
    spec.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get("paths")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn run_log(watch: &Watch, name: &str, spec: &Mutex<Value>, stop: &AtomicBool) {
    let file = positions_path(&watch.state_file);
    let prefix = format!("{name}\t");
    let mut kept: BTreeMap<String, Position> = load_positions(&file)
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_string(), v)))
        .collect();
    let mut tracked: BTreeMap<String, Tracked> = BTreeMap::new();
    let mut refused: HashSet<String> = HashSet::new();
    let mut sender = Sender::new(watch);
    let flags = [stop, &*watch.shutdown];
    loop {
        let started = Instant::now();
        let paths = spec_paths(spec);
        tracked.retain(|p, _| paths.contains(p));
        kept.retain(|p, _| paths.contains(p));
        refused.retain(|p| paths.contains(p));
        let settings = watch.settings.lock().unwrap_or_else(|p| p.into_inner()).log.clone();
        match settings {
            None => {
                for path in &paths {
                    if refused.insert(path.clone()) {
                        let message = "Not configured: the agent's --config has no [log] section";
                        sender.put(&refusal(watch, name, path, Code::LogsNotConfigured, message));
                    }
                }
            }
            Some(settings) => {
                for path in &paths {
                    let t = tracked
                        .entry(path.clone())
                        .or_insert_with(|| Tracked { pos: kept.get(path).cloned().unwrap_or_default(), file: None });
                    let mut keep = |pos: &Position| {
                        kept.insert(path.clone(), pos.clone());
                        if let Err(e) = save_positions(&file, name, &kept) {
                            log::warn!("log task {name}: cannot keep offsets in {}: {e}", file.display());
                        }
                    };
                    look(&mut sender, watch, name, path, t, &settings, &mut refused, &mut keep);
                }
            }
        }
        if !wait_interval(spec, DEFAULT_LOG_EVERY, started, &flags) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diffs(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn only_changes_since_the_last_report_are_reported() {
        let a = json!({"path": "/t/a", "type": "f"});
        let c = json!({"path": "/t/c", "attributes": {"sha256": {"old": "x", "new": "y"}}});
        let before = diffs(&[("added\t/t/a", a.clone())]);
        assert_eq!(changes_since(&before, &before, &Value::Null, 10), None);
        let now = diffs(&[("added\t/t/a", a.clone()), ("changed\t/t/c", c.clone())]);
        let (report, bits) = changes_since(&before, &now, &Value::Null, 10).expect("a change");
        assert_eq!(bits, 4);
        assert_eq!(report["changed"], json!([c]));
        assert_eq!(report["added"], json!([]));
        let (report, bits) = changes_since(&now, &diffs(&[("changed\t/t/c", c)]), &Value::Null, 10).expect("gone");
        assert_eq!(bits, 0);
        assert_eq!(report["resolved"][0]["path"], "/t/a");
        assert_eq!(report["resolved"][0]["was"], "added");
    }

    #[test]
    fn what_was_reported_is_kept_signed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = Secret::new(b"unit-test-secret-0123456".to_vec()).expect("secret");
        let path = reported_path(&dir.path().join("agent.json"), "etc");
        let r = Reported { host: "h".into(), task: "etc".into(), seq: 3, entries: diffs(&[("added\t/x", json!(1))]) };
        save_reported(&path, &secret, &r).expect("save");
        assert_eq!(load_reported(&path, &secret, "h", "etc"), r);
        assert_eq!(load_reported(&path, &secret, "h2", "etc").seq, 0);
        let mut text = std::fs::read(&path).expect("read");
        let last = text.len() - 2;
        text[last] ^= 1;
        std::fs::write(&path, text).expect("edit");
        assert_eq!(load_reported(&path, &secret, "h", "etc").seq, 0);
    }

    #[test]
    fn lines_are_read_whole_and_in_bounded_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, "one\ntwo\nthr").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let piece = read_lines(&file, 0, false).expect("read");
        assert_eq!(piece.lines, ["one", "two"]);
        assert_eq!(piece.lengths, [4, 4]);
        assert_eq!(piece.end, 8);
        assert_eq!(read_lines(&file, 8, false).expect("read").lines, Vec::<String>::new());
        assert_eq!(read_lines(&file, 8, true).expect("read").lines, ["thr"]);
        let many: String = (0..1200).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &many).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let first = read_lines(&file, 0, false).expect("read");
        assert_eq!(first.lines.len(), MAX_BATCH_LINES);
        let second = read_lines(&file, first.end, false).expect("read");
        assert_eq!(second.lines[0], format!("line {MAX_BATCH_LINES}"));
        let long = "x".repeat(MAX_LINE_BYTES * 2 + 10) + "\n";
        std::fs::write(&path, &long).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let piece = read_lines(&file, 0, false).expect("read");
        assert_eq!(piece.lengths, [MAX_LINE_BYTES as u64, MAX_LINE_BYTES as u64, 11]);
    }
}
