//! Differential test: every scenario in `tests/scenarios/*.scn` runs against a
//! fresh real beanstalkd 1.12 (the reference) and a fresh candidate server, and
//! the two full transcripts must match byte for byte, after normalising only
//! the fields that cannot match (identity values in `stats`, and time fields
//! within ±1 s).
//!
//! # Running
//! - `cargo test --test differential`: candidate is polarisd.
//! - `POLARIS_DIFF_TARGET=/usr/bin/beanstalkd cargo test --test differential`:
//!   self-check, the candidate is a second beanstalkd; this must pass 100% and
//!   proves the scenarios are deterministic and the normalisation is right.
//! - `POLARIS_DIFF_ONLY=word`: run only scenarios whose name contains `word`.
//! - `POLARIS_DIFF_JOBS=n`: scenarios run in parallel (default 12).
//! - `POLARIS_DIFF_MAX_FAILURES=n`: stop starting scenarios after n failures
//!   (default 25; 0 means never stop).
//! - `POLARIS_DIFF_DUMP=1`: print every scenario's reference transcript (handy
//!   when writing scenarios; add `-- --nocapture`), and do not fold equal
//!   lines in mismatch reports.
//! - `POLARIS_DIFF_KNOWN=1`: also run the known differences (expected to fail).
//!
//! # Scenario language
//! A file holds many scenarios. `# ...` lines and blank lines are ignored.
//! ```text
//! === put-then-reserve           start of a scenario (unique name)
//! server -z 10                   extra server options, given to both servers
//! c1 > put 0 0 10 5              send the text plus CRLF, in one write
//! c1 >> hello\r\n                send the text exactly, in one write
//! c1 split 3 stats\r\n           send it in 3-byte writes, 20 ms apart
//! c1 < 2                         read 2 replies (wait up to 3 s)
//! c1 < 1 within 5                read 1 reply, waiting up to 5 s
//! c1 <                           read whatever comes until 250 ms of quiet
//! c2 close                       close the connection
//! c2 shutdown                    half-close it (the server sees end of input)
//! sleep 1.5                      pause the script
//! signal USR1                    send a signal to the server process
//! ```
//! Connections (`c1`, `c2`, ...) are opened on first use. Texts take escapes:
//! `\r \n \t \0 \\ \s` (space; trailing blanks are refused as invisible),
//! `\xNN`, and `\{N*unit}` for N copies of `unit` (e.g. `\{65535*x}`).
//! After the last step every open connection is drained until quiet, so every
//! byte the server sent is in the transcript. A reply that arrives later than
//! in the reference shows up under a later read, so timing matters too.
//!
//! Scenarios in `known-differences.scn` document places where polarisd
//! deliberately differs from beanstalkd; they are parsed but not compared.

use anyhow::{anyhow, bail, Context, Result};
use polaris_testkit::{escape_bytes, RawConn, ReadOutcome, Reply, ServerProcess};
use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How long a connection must stay silent for "read until quiet" to stop.
const QUIET: Duration = Duration::from_millis(250);
/// Default wait for a counted read (`c1 < 2`).
const DEFAULT_WITHIN: Duration = Duration::from_secs(3);
/// Pause between the pieces of a `split` send.
const SPLIT_PAUSE: Duration = Duration::from_millis(20);
/// Default number of scenarios run at once. Scenarios mostly sleep or wait
/// for replies, so this can exceed the core count.
const DEFAULT_JOBS: usize = 12;
/// After this many failing scenarios no new ones start, so a badly broken
/// candidate fails in seconds rather than minutes.
const DEFAULT_MAX_FAILURES: usize = 25;
/// The file whose scenarios are documented differences, never compared.
const KNOWN_DIFFERENCES_FILE: &str = "known-differences.scn";

// ---------------------------------------------------------------------------
// Scenario model and parser
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Scenario {
    name: String,
    /// "file.scn:line" of the `===` line, for messages.
    origin: String,
    server_args: Vec<String>,
    steps: Vec<Step>,
    /// True for scenarios from the known-differences file.
    known_difference: bool,
}

impl Scenario {
    /// A rough lower bound of the run time (sleeps and quiet reads), used to
    /// start the slow scenarios first so they do not trail at the end.
    fn estimated_duration(&self) -> Duration {
        self.steps
            .iter()
            .map(|step| match step.action {
                Action::Sleep(d) => d,
                Action::Recv { count: None, within, .. } => within,
                _ => Duration::ZERO,
            })
            .sum()
    }
}

#[derive(Debug)]
struct Step {
    /// The source line, shown in transcripts.
    source: String,
    action: Action,
}

#[derive(Debug)]
enum Action {
    Send { conn: String, bytes: Vec<u8> },
    SendSplit { conn: String, bytes: Vec<u8>, piece: usize },
    Recv { conn: String, count: Option<usize>, within: Duration },
    Close { conn: String },
    ShutdownWrite { conn: String },
    Sleep(Duration),
    Signal(String),
}

/// Parses scenario text (`file` is only used in messages).
fn parse_scenarios(file: &str, text: &str) -> Result<Vec<Scenario>> {
    let known_difference = file == KNOWN_DIFFERENCES_FILE;
    let mut scenarios: Vec<Scenario> = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line_no = index + 1;
        let at = || format!("{file}:{line_no}");
        let line = raw_line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.ends_with([' ', '\t']) {
            bail!("{}: trailing whitespace is invisible; write it as \\s", at());
        }
        if let Some(name) = line.strip_prefix("=== ") {
            scenarios.push(Scenario {
                name: name.trim().to_string(),
                origin: at(),
                server_args: Vec::new(),
                steps: Vec::new(),
                known_difference,
            });
            continue;
        }
        let Some(scenario) = scenarios.last_mut() else {
            bail!("{}: step before the first `=== name` line", at());
        };
        if let Some(args) = line.strip_prefix("server ") {
            if !scenario.steps.is_empty() {
                bail!("{}: `server` must come before the first step", at());
            }
            scenario.server_args.extend(args.split_whitespace().map(String::from));
            continue;
        }
        let action = parse_action(line).with_context(at)?;
        scenario.steps.push(Step { source: line.to_string(), action });
    }
    for scenario in &scenarios {
        if scenario.steps.is_empty() {
            bail!("{}: scenario {} has no steps", scenario.origin, scenario.name);
        }
    }
    Ok(scenarios)
}

fn parse_action(line: &str) -> Result<Action> {
    let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
    match head {
        "sleep" => Ok(Action::Sleep(parse_seconds(rest)?)),
        "signal" => Ok(Action::Signal(rest.trim().to_string())),
        conn if is_conn_name(conn) => parse_conn_action(conn.to_string(), rest),
        _ => bail!("unknown step {line:?}"),
    }
}

fn is_conn_name(word: &str) -> bool {
    word.len() > 1 && word.starts_with('c') && word[1..].bytes().all(|b| b.is_ascii_digit())
}

fn parse_conn_action(conn: String, rest: &str) -> Result<Action> {
    let (op, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    match op {
        ">" => {
            let mut bytes = parse_text(arg)?;
            bytes.extend_from_slice(b"\r\n");
            Ok(Action::Send { conn, bytes })
        }
        ">>" => Ok(Action::Send { conn, bytes: parse_text(arg)? }),
        "split" => {
            let (piece, text) = arg.split_once(' ').ok_or_else(|| anyhow!("split needs a size and a text"))?;
            let piece: usize = piece.parse().context("split size")?;
            if piece == 0 {
                bail!("split size must be positive");
            }
            Ok(Action::SendSplit { conn, bytes: parse_text(text)?, piece })
        }
        "<" => {
            let words: Vec<&str> = arg.split_whitespace().collect();
            let (count, within) = match words.as_slice() {
                [] => (None, QUIET),
                [n] => (Some(n.parse().context("reply count")?), DEFAULT_WITHIN),
                [n, "within", secs] => (Some(n.parse().context("reply count")?), parse_seconds(secs)?),
                _ => bail!("expected `< [N [within SECONDS]]`"),
            };
            Ok(Action::Recv { conn, count, within })
        }
        "close" if arg.is_empty() => Ok(Action::Close { conn }),
        "shutdown" if arg.is_empty() => Ok(Action::ShutdownWrite { conn }),
        _ => bail!("unknown connection step {op:?}"),
    }
}

fn parse_seconds(text: &str) -> Result<Duration> {
    let secs: f64 = text.trim().parse().with_context(|| format!("bad seconds {text:?}"))?;
    if !(0.0..=30.0).contains(&secs) {
        bail!("seconds out of range: {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Decodes a scenario text with its escapes (see the module docs).
fn parse_text(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let (&e, tail) = rest.split_first().ok_or_else(|| anyhow!("dangling backslash in {text:?}"))?;
        rest = tail;
        match e {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b's' => out.push(b' '),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = rest.get(..2).ok_or_else(|| anyhow!("short \\x escape in {text:?}"))?;
                let hex = std::str::from_utf8(hex)?;
                out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad \\x{hex}"))?);
                rest = &rest[2..];
            }
            b'{' => {
                let close = rest.iter().position(|&c| c == b'}').ok_or_else(|| anyhow!("unclosed \\{{ in {text:?}"))?;
                let inner = std::str::from_utf8(&rest[..close])?;
                rest = &rest[close + 1..];
                let (count, unit) = inner.split_once('*').ok_or_else(|| anyhow!("expected \\{{N*unit}}"))?;
                let count: usize = count.parse().context("repeat count")?;
                out.extend(parse_text(unit)?.repeat(count));
            }
            other => bail!("unknown escape \\{} in {text:?}", other as char),
        }
    }
    Ok(out)
}

/// Directory holding the scenario files.
fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("scenarios")
}

/// Loads every `*.scn` file, in file-name order, and checks names are unique.
fn load_scenarios() -> Result<Vec<Scenario>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(scenario_dir())?.map(|entry| entry.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "scn"));
    files.sort();
    let mut all = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path)?;
        all.extend(parse_scenarios(&file, &text)?);
    }
    let mut seen = HashSet::new();
    for scenario in &all {
        if !seen.insert(scenario.name.as_str()) {
            bail!("{}: duplicate scenario name {}", scenario.origin, scenario.name);
        }
    }
    Ok(all)
}

// ---------------------------------------------------------------------------
// Running a scenario against one server
// ---------------------------------------------------------------------------

/// Everything observed while running a scenario on one server, in step order.
type Transcript = Vec<Event>;

#[derive(Debug)]
enum Event {
    /// Bytes the script sent (identical on both sides; kept for context).
    Sent { conn: String, bytes: Vec<u8>, how: String },
    /// What a read step (or the final drain) received.
    Got { conn: String, step: String, items: Vec<Item> },
    /// A step that touches no connection's bytes (sleep, close, signal).
    Note(String),
}

#[derive(Debug)]
enum Item {
    Reply(Reply),
    /// Bytes that do not (yet) form a whole reply.
    Partial(Vec<u8>),
    /// The server closed the connection.
    Closed,
    /// A counted read ran out of time.
    Missing {
        wanted: usize,
        got: usize,
    },
    /// An I/O failure on our side (connect or send).
    Error(String),
}

/// One run of a scenario on one server.
struct Session<'a> {
    server: &'a ServerProcess,
    /// Connections in order of first use; `None` once closed by the script.
    conns: Vec<(String, Option<RawConn>)>,
    transcript: Transcript,
    /// Set after the first missing reply: later counted reads only wait
    /// QUIET, so a broken candidate fails fast instead of slowly.
    degraded: bool,
}

impl<'a> Session<'a> {
    fn run(server: &'a ServerProcess, scenario: &Scenario) -> Transcript {
        let mut session = Session { server, conns: Vec::new(), transcript: Vec::new(), degraded: false };
        for step in &scenario.steps {
            if let Err(e) = session.step(step) {
                let conn = step_conn(&step.action).unwrap_or("server").to_string();
                session.got(conn, &step.source, vec![Item::Error(format!("{e:#}"))]);
                return session.transcript;
            }
        }
        session.drain_all();
        session.transcript
    }

    fn got(&mut self, conn: String, step: &str, items: Vec<Item>) {
        self.transcript.push(Event::Got { conn, step: step.to_string(), items });
    }

    /// The named connection, opened on first use. Fails if the script closed it.
    fn conn(&mut self, name: &str) -> Result<&mut RawConn> {
        let index = match self.conns.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                let conn = self.server.connect()?;
                self.conns.push((name.to_string(), Some(conn)));
                self.conns.len() - 1
            }
        };
        self.conns[index].1.as_mut().ok_or_else(|| anyhow!("{name} was closed by the script"))
    }

    fn step(&mut self, step: &Step) -> Result<()> {
        match &step.action {
            Action::Send { conn, bytes } => {
                let result = self.conn(conn)?.send(bytes);
                self.transcript.push(Event::Sent { conn: conn.clone(), bytes: bytes.clone(), how: String::new() });
                if let Err(e) = result {
                    self.got(conn.clone(), &step.source, vec![Item::Error(format!("{e:#}"))]);
                }
            }
            Action::SendSplit { conn, bytes, piece } => {
                let mut failure = None;
                for (i, chunk) in bytes.chunks(*piece).enumerate() {
                    if i > 0 {
                        thread::sleep(SPLIT_PAUSE);
                    }
                    if let Err(e) = self.conn(conn)?.send(chunk) {
                        failure = Some(e);
                        break;
                    }
                }
                let how = format!("in {piece}-byte pieces");
                self.transcript.push(Event::Sent { conn: conn.clone(), bytes: bytes.clone(), how });
                if let Some(e) = failure {
                    self.got(conn.clone(), &step.source, vec![Item::Error(format!("{e:#}"))]);
                }
            }
            Action::Recv { conn, count, within } => {
                let within = if self.degraded { QUIET.min(*within) } else { *within };
                let items = read_items(self.conn(conn)?, *count, within)?;
                if items.iter().any(|i| matches!(i, Item::Missing { .. })) {
                    self.degraded = true;
                }
                self.got(conn.clone(), &step.source, items);
            }
            Action::Close { conn } => {
                let index = match self.conns.iter().position(|(n, _)| n == conn) {
                    Some(i) => i,
                    None => {
                        self.conn(conn)?;
                        self.conns.len() - 1
                    }
                };
                if let Some(c) = self.conns[index].1.take() {
                    c.close();
                }
                self.transcript.push(Event::Note(step.source.clone()));
            }
            Action::ShutdownWrite { conn } => {
                self.conn(conn)?.shutdown_write()?;
                self.transcript.push(Event::Note(step.source.clone()));
            }
            Action::Sleep(duration) => {
                thread::sleep(*duration);
                self.transcript.push(Event::Note(step.source.clone()));
            }
            Action::Signal(name) => {
                self.server.signal(name)?;
                self.transcript.push(Event::Note(step.source.clone()));
            }
        }
        Ok(())
    }

    /// Reads what is left on every open connection, so the transcript holds
    /// every byte the server sent. One QUIET wait covers all connections;
    /// after it, each is read until it has been silent for a short moment.
    fn drain_all(&mut self) {
        const AFTER_QUIET: Duration = Duration::from_millis(30);
        if self.conns.iter().any(|(_, conn)| conn.is_some()) {
            thread::sleep(QUIET);
        }
        let mut drained = Vec::new();
        for (name, conn) in &mut self.conns {
            if let Some(conn) = conn.as_mut().filter(|c| !c.is_closed() || !c.buffered().is_empty()) {
                let items = read_items(conn, None, AFTER_QUIET).unwrap_or_else(|e| vec![Item::Error(format!("{e:#}"))]);
                if !items.is_empty() {
                    drained.push((name.clone(), items));
                }
            }
        }
        for (name, items) in drained {
            self.got(name, "(end of scenario)", items);
        }
    }
}

fn step_conn(action: &Action) -> Option<&str> {
    match action {
        Action::Send { conn, .. }
        | Action::SendSplit { conn, .. }
        | Action::Recv { conn, .. }
        | Action::Close { conn }
        | Action::ShutdownWrite { conn } => Some(conn),
        Action::Sleep(_) | Action::Signal(_) => None,
    }
}

/// Reads replies: `count` of them within `within`, or (count `None`) all that
/// arrive until the connection has been quiet for `within`.
fn read_items(conn: &mut RawConn, count: Option<usize>, within: Duration) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    let deadline = Instant::now() + within;
    let mut replies = 0;
    loop {
        while count != Some(replies) {
            let Some(reply) = conn.take_reply() else {
                break;
            };
            items.push(Item::Reply(reply));
            replies += 1;
        }
        if count == Some(replies) {
            return Ok(items);
        }
        let wait = match count {
            Some(_) => deadline.saturating_duration_since(Instant::now()),
            None => within,
        };
        let outcome = if wait.is_zero() { ReadOutcome::Quiet } else { conn.read_some(wait)? };
        match outcome {
            ReadOutcome::Data => continue,
            ReadOutcome::Quiet | ReadOutcome::Closed => {
                let closed = matches!(outcome, ReadOutcome::Closed);
                let leftover = conn.take_buffered();
                if !leftover.is_empty() {
                    items.push(Item::Partial(leftover));
                }
                if closed {
                    items.push(Item::Closed);
                }
                if let Some(wanted) = count {
                    items.push(Item::Missing { wanted, got: replies });
                }
                return Ok(items);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Normalising and rendering transcripts
// ---------------------------------------------------------------------------

/// `stats` fields whose values identify the process or the build, so they
/// never match between two servers. `binlog-*` fields are matched by prefix.
/// (`version` is compared: polarisd answers beanstalkd's "1.12", as clients expect.)
const IDENTITY_FIELDS: &[&str] = &[
    "pid",
    "rusage-utime",
    "rusage-stime",
    "id",
    "hostname",
    "os",
    "platform",
    // Seconds since the process started: it depends on when the harness
    // spawned each server (seconds apart on a loaded machine), not on behaviour.
    "uptime",
];

/// Fields counting whole seconds: the two servers measure them at slightly
/// different instants, so values within ±1 are considered equal.
const TIME_FIELDS: &[&str] = &["age", "time-left", "pause-time-left"];

/// A transcript prepared for comparison: display lines, except YAML bodies,
/// which stay structured until time fields have been aligned.
enum Shown {
    Line(String),
    Yaml { prefix: String, lines: Vec<Vec<u8>>, trailer: Vec<u8> },
}

/// Splits a YAML body into lines, each keeping its `\n`.
fn yaml_lines(body: &[u8]) -> Vec<Vec<u8>> {
    body.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Splits `key: value\n` into its key and value.
fn yaml_field(line: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
    text.split_once(": ")
}

/// Replaces identity values in a server `stats` body with `*`. Job and tube
/// stats are left alone (their `id` is a job id, which must match).
fn normalise_yaml(lines: &mut [Vec<u8>]) {
    if !lines.iter().any(|l| l.starts_with(b"pid: ")) {
        return;
    }
    for line in lines {
        let Some((key, _)) = yaml_field(line) else {
            continue;
        };
        if IDENTITY_FIELDS.contains(&key) || key.starts_with("binlog-") {
            *line = format!("{key}: *\n").into_bytes();
        }
    }
}

fn time_field(line: &[u8]) -> Option<(&str, i64)> {
    let (key, value) = yaml_field(line)?;
    TIME_FIELDS.contains(&key).then_some(())?;
    Some((key, value.parse().ok()?))
}

/// Where a candidate time field is within ±1 of the reference one on the
/// same line, copies the reference value so the two compare equal.
fn align_time_fields(reference: &[Vec<u8>], candidate: &mut [Vec<u8>]) {
    for (r, c) in reference.iter().zip(candidate.iter_mut()) {
        if let (Some((rk, rv)), Some((ck, cv))) = (time_field(r), time_field(c)) {
            if rk == ck && (rv - cv).abs() <= 1 {
                *c = r.clone();
            }
        }
    }
}

/// Turns a transcript into comparison form.
fn shown(transcript: &Transcript) -> Vec<Shown> {
    let mut out = Vec::new();
    for event in transcript {
        match event {
            Event::Sent { conn, bytes, how } => {
                let how = if how.is_empty() { String::new() } else { format!("  ({how})") };
                out.push(Shown::Line(format!("{conn} >> {}{how}", escape_bytes(bytes))));
            }
            Event::Note(text) => out.push(Shown::Line(format!("   ({text})"))),
            Event::Got { conn, step, items } => {
                out.push(Shown::Line(format!("-- {step}")));
                for item in items {
                    shown_item(conn, item, &mut out);
                }
            }
        }
    }
    out
}

fn shown_item(conn: &str, item: &Item, out: &mut Vec<Shown>) {
    let line = |text: String| Shown::Line(format!("{conn} << {text}"));
    match item {
        Item::Reply(reply) => match &reply.body {
            None => out.push(line(escape_bytes(&reply.raw))),
            Some(body) if reply.line.starts_with(b"OK ") => {
                let mut lines = yaml_lines(body);
                normalise_yaml(&mut lines);
                let trailer = reply.body_trailer().unwrap_or_default().to_vec();
                out.push(Shown::Yaml { prefix: format!("{conn} << "), lines, trailer });
            }
            Some(body) => {
                out.push(line(format!("{}\\r\\n", escape_bytes(&reply.line))));
                let trailer = reply.body_trailer().unwrap_or_default();
                out.push(line(format!("  {}{}", escape_bytes(body), escape_bytes(trailer))));
            }
        },
        Item::Partial(bytes) => out.push(line(format!("(incomplete reply) {}", escape_bytes(bytes)))),
        Item::Closed => out.push(line("(connection closed by server)".into())),
        Item::Missing { wanted, got } => out.push(line(format!("(timed out: {got} of {wanted} replies)"))),
        Item::Error(message) => out.push(Shown::Line(format!("{conn} !! {message}"))),
    }
}

/// Aligns time fields of the k-th YAML body of each side, then renders both
/// to plain lines. An `OK <n>` line announces the length of the normalised
/// body, so the two transcripts can be compared whole.
fn render_pair(reference: Vec<Shown>, mut candidate: Vec<Shown>) -> (Vec<String>, Vec<String>) {
    let reference_bodies = reference.iter().filter_map(|s| match s {
        Shown::Yaml { lines, .. } => Some(lines),
        Shown::Line(_) => None,
    });
    let candidate_bodies = candidate.iter_mut().filter_map(|s| match s {
        Shown::Yaml { lines, .. } => Some(lines),
        Shown::Line(_) => None,
    });
    for (r, c) in reference_bodies.zip(candidate_bodies) {
        align_time_fields(r, c);
    }
    (render(&reference), render(&candidate))
}

fn render(shown: &[Shown]) -> Vec<String> {
    let mut out = Vec::new();
    for s in shown {
        match s {
            Shown::Line(text) => out.push(text.clone()),
            Shown::Yaml { prefix, lines, trailer } => {
                let len: usize = lines.iter().map(Vec::len).sum();
                out.push(format!("{prefix}OK {len}\\r\\n"));
                out.extend(lines.iter().map(|l| format!("{prefix}  {}", escape_bytes(l))));
                out.push(format!("{prefix}  {}", escape_bytes(trailer)));
            }
        }
    }
    out
}

/// A numeric environment variable, if set and valid.
fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// True when POLARIS_DIFF_DUMP asks for full transcripts.
fn dump_requested() -> bool {
    std::env::var_os("POLARIS_DIFF_DUMP").is_some()
}

/// Lays out two line lists side by side, matching equal lines (longest common
/// subsequence) and marking differing rows with `!`, `<` or `>`.
fn side_by_side(left: &[String], right: &[String]) -> String {
    const WIDTH: usize = 62;
    let (n, m) = (left.len(), right.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if left[i] == right[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    // Rows of (left, right); a hunk of unequal lines is paired up positionally.
    let mut rows: Vec<(Option<&str>, Option<&str>)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    let (mut only_left, mut only_right): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    fn flush<'s>(rows: &mut Vec<(Option<&'s str>, Option<&'s str>)>, l: &mut Vec<&'s str>, r: &mut Vec<&'s str>) {
        for k in 0..l.len().max(r.len()) {
            rows.push((l.get(k).copied(), r.get(k).copied()));
        }
        l.clear();
        r.clear();
    }
    while i < n || j < m {
        if i < n && j < m && left[i] == right[j] {
            flush(&mut rows, &mut only_left, &mut only_right);
            rows.push((Some(&left[i]), Some(&right[j])));
            i += 1;
            j += 1;
        } else if j == m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            only_left.push(&left[i]);
            i += 1;
        } else {
            only_right.push(&right[j]);
            j += 1;
        }
    }
    flush(&mut rows, &mut only_left, &mut only_right);

    let clip = |s: &str| -> String {
        if s.chars().count() <= WIDTH {
            s.to_string()
        } else {
            s.chars().take(WIDTH - 1).chain(['…']).collect()
        }
    };
    let marks: Vec<char> = rows
        .iter()
        .map(|row| match row {
            (Some(a), Some(b)) if a == b => ' ',
            (Some(_), Some(_)) => '!',
            (Some(_), None) => '<',
            _ => '>',
        })
        .collect();
    // Show differing rows with `context` equal rows around them and fold the
    // rest, unless POLARIS_DIFF_DUMP asks for everything.
    let context = if dump_requested() { usize::MAX } else { 4 };
    let near_difference = |i: usize| {
        let window = i.saturating_sub(context)..i.saturating_add(context).saturating_add(1).min(marks.len());
        marks[window].iter().any(|&m| m != ' ')
    };
    let mut out = format!("  {:<WIDTH$} | {}\n", "REFERENCE (beanstalkd)", "CANDIDATE");
    let mut folded = 0;
    for (i, (l, r)) in rows.iter().enumerate() {
        if !near_difference(i) {
            folded += 1;
            continue;
        }
        if folded > 0 {
            out.push_str(&format!("  ({folded} equal lines)\n"));
            folded = 0;
        }
        out.push_str(&format!("{} {:<WIDTH$} | {}\n", marks[i], clip(l.unwrap_or("")), clip(r.unwrap_or(""))));
    }
    if folded > 0 {
        out.push_str(&format!("  ({folded} equal lines)\n"));
    }
    if let Some(i) = marks.iter().position(|&m| m != ' ') {
        out.push_str(&format!(
            "first difference in full:\n  reference: {}\n  candidate: {}\n",
            rows[i].0.unwrap_or("(nothing)"),
            rows[i].1.unwrap_or("(nothing)")
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// Comparing servers
// ---------------------------------------------------------------------------

/// The server under test.
enum Candidate {
    Polarisd,
    /// A beanstalkd-compatible binary started like beanstalkd (self-check mode).
    Beanstalkd(PathBuf),
}

impl Candidate {
    fn from_env() -> Candidate {
        match std::env::var_os("POLARIS_DIFF_TARGET") {
            Some(path) if !path.is_empty() => Candidate::Beanstalkd(PathBuf::from(path)),
            _ => Candidate::Polarisd,
        }
    }

    fn describe(&self) -> String {
        match self {
            Candidate::Polarisd => "polarisd".into(),
            Candidate::Beanstalkd(path) => format!("{} (self-check)", path.display()),
        }
    }

    fn spawn(&self, args: &[&str]) -> Result<ServerProcess> {
        match self {
            Candidate::Polarisd => polaris_testkit::spawn_polarisd(args),
            Candidate::Beanstalkd(path) => polaris_testkit::spawn_beanstalkd(path, args),
        }
    }
}

/// Runs one scenario on fresh servers. `Ok(None)` if the transcripts match,
/// `Ok(Some(report))` if they differ, `Err` if the scenario could not run.
fn run_scenario(reference: &Path, candidate: &Candidate, scenario: &Scenario) -> Result<Option<String>> {
    let args: Vec<&str> = scenario.server_args.iter().map(String::as_str).collect();
    let reference_server =
        polaris_testkit::spawn_beanstalkd(reference, &args).context("starting the reference beanstalkd")?;
    let mut candidate_server = candidate.spawn(&args).with_context(|| format!("starting {}", candidate.describe()))?;
    let (reference_log, candidate_log) = thread::scope(|s| {
        let reference_run = s.spawn(|| Session::run(&reference_server, scenario));
        let candidate_log = Session::run(&candidate_server, scenario);
        (reference_run.join().expect("reference session panicked"), candidate_log)
    });
    let (reference_lines, candidate_lines) = render_pair(shown(&reference_log), shown(&candidate_log));
    let header = format!("=== scenario {} ({})", scenario.name, scenario.origin);
    if dump_requested() {
        eprintln!("{header}: reference transcript\n{}\n", reference_lines.join("\n"));
    }

    let reference_trouble = reference_log.iter().any(|e| {
        matches!(e, Event::Got { items, .. }
            if items.iter().any(|i| matches!(i, Item::Missing { .. } | Item::Error(_) | Item::Partial(_))))
    });
    if reference_trouble {
        bail!(
            "scenario problem: the reference beanstalkd itself missed a reply or failed; \
             fix the scenario's read counts. Reference transcript:\n{}",
            reference_lines.join("\n")
        );
    }
    if reference_lines == candidate_lines {
        return Ok(None);
    }
    let mut report = format!(
        "{header} differs (unfolded: POLARIS_DIFF_ONLY={} POLARIS_DIFF_DUMP=1)\n{}",
        scenario.name,
        side_by_side(&reference_lines, &candidate_lines)
    );
    let output_tail = candidate_server.output_tail(2000);
    match candidate_server.try_exit_status() {
        Some(status) => {
            report += &format!("the candidate exited during the scenario ({status}); output:\n{output_tail}\n")
        }
        None if !output_tail.is_empty() => report += &format!("the candidate's output (its end):\n{output_tail}\n"),
        None => {}
    }
    Ok(Some(report))
}

#[test]
fn scenarios_match_beanstalkd() {
    let Some(reference) = polaris_testkit::require_beanstalkd() else {
        return;
    };
    let candidate = Candidate::from_env();
    let scenarios = load_scenarios().expect("loading tests/scenarios");
    let only = std::env::var("POLARIS_DIFF_ONLY").ok();
    let known: Vec<&Scenario> = scenarios.iter().filter(|s| s.known_difference).collect();
    let known_names: Vec<&str> = known.iter().map(|s| s.name.as_str()).collect();
    let _ = writeln!(std::io::stderr(), "known differences, not compared: {}", known_names.join(", "));
    let mut selected: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| !s.known_difference || std::env::var_os("POLARIS_DIFF_KNOWN").is_some())
        .filter(|s| only.as_deref().is_none_or(|word| s.name.contains(word)))
        .collect();
    selected.sort_by_key(|s| std::cmp::Reverse(s.estimated_duration()));
    assert!(!selected.is_empty(), "no scenario matches POLARIS_DIFF_ONLY={only:?}");

    // Fail once, clearly, if the candidate cannot even start.
    if let Err(e) = candidate.spawn(&[]) {
        panic!("cannot start the candidate {}: {e:#}", candidate.describe());
    }

    let jobs = env_number("POLARIS_DIFF_JOBS").unwrap_or(DEFAULT_JOBS).max(1);
    let max_failures = match env_number("POLARIS_DIFF_MAX_FAILURES").unwrap_or(DEFAULT_MAX_FAILURES) {
        0 => usize::MAX,
        n => n,
    };
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let ran = AtomicUsize::new(0);
    let failures: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if failures.lock().unwrap().len() >= max_failures {
                    break;
                }
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(scenario) = selected.get(index) else {
                    break;
                };
                ran.fetch_add(1, Ordering::SeqCst);
                let failure = match run_scenario(&reference, &candidate, scenario) {
                    Ok(None) => continue,
                    Ok(Some(report)) => report,
                    Err(e) => format!("=== scenario {} ({}) could not run: {e:#}\n", scenario.name, scenario.origin),
                };
                failures.lock().unwrap().push((index, failure));
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    for (_, report) in &failures {
        eprintln!("{report}");
    }
    // Straight to stderr (not eprintln!) so the summary shows even when the
    // harness captures the output of a passing test.
    let ran = ran.into_inner();
    let not_run = if ran < selected.len() {
        format!(
            "; {} not run after {max_failures} failures (POLARIS_DIFF_MAX_FAILURES=0 runs all)",
            selected.len() - ran
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        std::io::stderr(),
        "differential vs {}: {} passed, {} failed{not_run}; {} known differences not compared; {:.1} s",
        candidate.describe(),
        ran - failures.len(),
        failures.len(),
        known.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|(i, _)| selected[*i].name.as_str()).collect();
        panic!(
            "{} of {ran} scenarios run differ from beanstalkd 1.12 (candidate: {}): {}",
            failures.len(),
            candidate.describe(),
            names.join(", ")
        );
    }
}

#[test]
fn scenario_files_are_well_formed() {
    let scenarios = load_scenarios().expect("loading tests/scenarios");
    let compared = scenarios.iter().filter(|s| !s.known_difference).count();
    assert!(compared >= 170, "only {compared} compared scenarios; the suite promises at least 170");
    assert!(
        scenarios.iter().any(|s| s.known_difference),
        "{KNOWN_DIFFERENCES_FILE} should document the deliberate differences"
    );
}

#[test]
fn text_escapes_decode() {
    assert_eq!(parse_text(r"put 0\s\r\n").unwrap(), b"put 0 \r\n");
    assert_eq!(parse_text(r"\0\x00\xff\\\t").unwrap(), b"\0\0\xff\\\t");
    assert_eq!(parse_text(r"a\{3*xy}b").unwrap(), b"axyxyxyb");
    assert_eq!(parse_text(r"\{2*\r\n}").unwrap(), b"\r\n\r\n");
    assert!(parse_text(r"bad\q").is_err());
    assert!(parse_text(r"\{3*x").is_err());
}

#[test]
fn reply_frames_parse() {
    let (reply, used) = polaris_testkit::parse_reply(b"RESERVED 7 3\r\na\r\n\r\nNEXT").unwrap();
    assert_eq!((reply.line_str().as_str(), reply.body.as_deref(), used), ("RESERVED 7 3", Some(&b"a\r\n"[..]), 19));
    let (reply, _) = polaris_testkit::parse_reply(b"OK 4\r\n---\n\r\n").unwrap();
    assert_eq!(reply.body.as_deref(), Some(&b"---\n"[..]));
    let (reply, used) = polaris_testkit::parse_reply(b"INSERTED 1\r\nX").unwrap();
    assert_eq!((reply.body, used), (None, 12));
    assert!(polaris_testkit::parse_reply(b"FOUND 1 5\r\nabc").is_none(), "body not complete yet");
    assert!(polaris_testkit::parse_reply(b"USING default\n").is_none(), "a bare LF ends no reply");
}

#[test]
fn normalisation_hides_identity_and_one_second_drift() {
    let body = |pid: &str, age: &str, jobs: &str| {
        format!("---\ncurrent-jobs-ready: {jobs}\npid: {pid}\nuptime: {pid}\nage: {age}\nbinlog-max-size: 10\nid: abc{pid}\n")
    };
    let yaml = |text: String| {
        let mut lines = yaml_lines(text.as_bytes());
        normalise_yaml(&mut lines);
        vec![Shown::Yaml { prefix: "c1 << ".into(), lines, trailer: b"\r\n".to_vec() }]
    };
    let (a, b) = render_pair(yaml(body("1", "9", "0")), yaml(body("22", "10", "0")));
    assert_eq!(a, b, "pid, id, uptime, binlog and a 1 s age drift must not matter");
    let (a, b) = render_pair(yaml(body("1", "9", "0")), yaml(body("1", "11", "0")));
    assert_ne!(a, b, "a 2 s drift must show");
    let (a, b) = render_pair(yaml(body("1", "9", "0")), yaml(body("1", "9", "1")));
    assert_ne!(a, b, "counters must be compared");
    // A job's `id` is not an identity field.
    let job = |id: &str| yaml(format!("---\nid: {id}\nstate: ready\nage: 0\n"));
    let (a, b) = render_pair(job("1"), job("2"));
    assert_ne!(a, b);
}
