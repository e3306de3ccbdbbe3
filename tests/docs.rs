//! Every command the docs print, run as printed.
//!
//! The runner reads `README.md`, `docs/DISPATCH.md` and `protocol.md`, and runs every `sh`,
//! `console` and `python` block in a real shell, in order, the way a reader pastes them: one
//! shell per session, so variables and background processes carry from one block to the
//! next. A block's output is compared with the `text` or `json` block that follows it when
//! that one is marked `<!-- doctest: output -->` (`…` matches anything). A `console` block
//! is a beanstalk transcript: its `$` line is started, the lines the client types are sent
//! and the server's lines are read back and compared.
//!
//! The docs use the real addresses (127.0.0.1:11300, 127.0.0.1:8080) and paths (`/tmp/...`),
//! so the whole run happens in private namespaces (`unshare`: its own network with only
//! loopback, its own `/tmp`, its own process tree that dies with it): nothing on the machine
//! is touched, whatever listens there. `cargo` is a stand-in that maps `cargo build` and
//! `cargo run` onto the binaries this test run already built.
//!
//! Annotations, in an HTML comment on the line before a block:
//! - `session=NAME`: this block starts a new shell (the previous session's processes are
//!   killed first, as a reader would stop them with Ctrl-C);
//! - `background`: run the block in the background; `wait=ADDR` then waits for ADDR to
//!   accept connections; `lines=N` runs only its first N lines;
//! - `output`: compare this block with the output of the block before;
//! - `copy-of=FILE`: this block must be byte-identical to a block of FILE;
//! - `skip`: not run (the comment says why).

use anyhow::{anyhow, bail, ensure, Context, Result};
use polaris_testkit::{binary, example, skip_unless_ci};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The documents whose blocks are run, in this order.
const DOCS: &[&str] = &["README.md", "protocol.md", "docs/DISPATCH.md"];
/// Set in the inner run (inside the namespaces).
const INNER_ENV: &str = "POLARIS_DOCTEST_INNER";
/// Longest a block may run.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a transcript waits for one line of the server's.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Addresses the docs' servers use; a new session starts once none accepts any more.
const DOC_ADDRS: &[&str] = &["127.0.0.1:11300", "127.0.0.1:8080"];
/// The line that marks the end of a block's run in the session shell.
const END_MARK: &str = "__DOCTEST_END__";

#[test]
fn docs_run_as_printed() -> Result<()> {
    if std::env::var_os(INNER_ENV).is_some() {
        return Ok(());
    }
    let probe = Command::new("unshare")
        .args(["--net", "--pid", "--mount", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip_unless_ci("the docs test needs `unshare` with namespaces (run as root)");
        return Ok(());
    }
    for (tool, package) in
        [("nc", "netcat-openbsd"), ("curl", "curl"), ("jq", "jq"), ("ip", "iproute2"), ("openssl", "openssl")]
    {
        if !Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status()?.success() {
            skip_unless_ci(&format!("the docs test needs `{tool}` (Debian package {package})"));
            return Ok(());
        }
    }
    if !Command::new("python3").args(["-c", "import greenstalk"]).status()?.success() {
        skip_unless_ci("the docs test needs the PyPI package greenstalk");
        return Ok(());
    }
    let out = Command::new("unshare")
        .args(["--net", "--pid", "--mount", "--fork", "--mount-proc"])
        .arg(std::env::current_exe()?)
        .args(["--exact", "docs_inner", "--nocapture", "--test-threads", "1"])
        .env(INNER_ENV, "1")
        .output()
        .context("running the docs test in its namespaces")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success() && text.contains("1 passed"), "the docs' blocks failed:\n{text}");
    let summary = text.lines().find(|l| l.starts_with("docs: ")).unwrap_or("docs: no summary");
    eprintln!("{summary}");
    Ok(())
}

/// The run inside the namespaces; does nothing when started by the test harness directly.
#[test]
fn docs_inner() -> Result<()> {
    if std::env::var_os(INNER_ENV).is_none() {
        return Ok(());
    }
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    private_tmp(&[root, &profile_dir()?])?;
    let scratch = tempfile::tempdir()?;
    let shim = write_cargo_shim(scratch.path())?;
    let mut ran = 0;
    let mut per_doc = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).with_context(|| format!("reading {doc}"))?;
        let blocks = parse_blocks(&text);
        ensure!(!blocks.is_empty(), "{doc}: no blocks found");
        let n = run_doc(root, doc, &blocks, scratch.path(), &shim).with_context(|| format!("in {doc}"))?;
        per_doc.push((doc, n));
        ran += n;
    }
    let per_doc: Vec<String> = per_doc.iter().map(|(doc, n)| format!("{doc} {n}")).collect();
    eprintln!("docs: {ran} blocks run ({})", per_doc.join(", "));
    Ok(())
}

/// Mounts an empty tmpfs on `/tmp` (the docs write `/tmp/web-01` and the like), keeping
/// `keep` — the checkout and the built binaries — where they are if they live under `/tmp`:
/// each is opened before the mount and bound back onto its own path after it.
fn private_tmp(keep: &[&Path]) -> Result<()> {
    let mut hidden: Vec<&Path> = keep.iter().copied().filter(|p| p.starts_with("/tmp")).collect();
    hidden.sort();
    hidden.dedup_by(|inner, outer| inner.starts_with(&**outer));
    let mut script = String::from("set -e\n");
    for (n, path) in hidden.iter().enumerate() {
        script += &format!("exec {}<'{}'\n", n + 3, path.display());
    }
    script += "mount -t tmpfs tmpfs /tmp\n";
    for (n, path) in hidden.iter().enumerate() {
        // --no-canonicalize: the /proc/self/fd link would otherwise resolve to the new, empty path.
        script += &format!(
            "mkdir -p '{p}'\nmount --no-canonicalize --bind /proc/self/fd/{fd} '{p}'\n",
            p = path.display(),
            fd = n + 3
        );
    }
    run(Command::new("sh").arg("-c").arg(script))
}

/// `target/<profile>`, where this test binary and the workspace's binaries are.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().and_then(Path::parent).context("test binaries live in target/<profile>/deps")?.to_path_buf())
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// A fenced block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The word after the fence (`sh`, `console`, `json`, …).
    lang: String,
    /// The block's lines, unindented.
    text: String,
    /// The `<!-- doctest: … -->` words of the line before, if any.
    note: BTreeMap<String, String>,
}

impl Block {
    fn has(&self, word: &str) -> bool {
        self.note.contains_key(word)
    }
}

fn parse_blocks(markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let indent = lines[i].len() - trimmed.len();
            let note = i.checked_sub(1).map_or_else(BTreeMap::new, |prev| parse_note(lines[prev]));
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim_start() != "```" {
                body.push(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
                i += 1;
            }
            blocks.push(Block { line: start + 1, lang: lang.trim().to_string(), text: body.join("\n") + "\n", note });
        }
        i += 1;
    }
    blocks
}

/// `<!-- doctest: session=ops background wait=ADDR (why) -->` → its `key[=value]` words;
/// a parenthesised remark is prose.
fn parse_note(line: &str) -> BTreeMap<String, String> {
    let Some(inner) = line.trim().strip_prefix("<!-- doctest:").and_then(|l| l.strip_suffix("-->")) else {
        return BTreeMap::new();
    };
    let words = inner.split('(').next().unwrap_or("");
    words
        .split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (w.to_string(), String::new()),
        })
        .collect()
}

/// Runs one document's blocks; returns how many ran.
fn run_doc(root: &Path, doc: &str, blocks: &[Block], scratch: &Path, shim: &Path) -> Result<usize> {
    let mut session: Option<Session> = None;
    let mut last_output = String::new();
    let mut ran = 0;
    for block in blocks {
        let at = format!("{doc}:{}", block.line);
        if let Some(original) = block.note.get("copy-of") {
            let other = std::fs::read_to_string(root.join(original))?;
            ensure!(
                parse_blocks(&other).iter().any(|b| b.text == block.text),
                "{at}: the block is no longer a copy of one in {original}"
            );
        }
        if block.has("output") {
            check_output(&block.lang, &block.text, &last_output).with_context(|| format!("{at}: output differs"))?;
            continue;
        }
        let runnable = matches!(block.lang.as_str(), "sh" | "bash" | "console" | "python");
        if !runnable || block.has("skip") {
            continue;
        }
        if let Some(name) = block.note.get("session") {
            if let Some(old) = session.take() {
                old.end()?;
            }
            session = Some(Session::start(name, scratch, shim)?);
        }
        let current = session.as_mut().ok_or_else(|| anyhow!("{at}: no session=NAME before the first block"))?;
        last_output = match block.lang.as_str() {
            "console" => current.transcript(&block.text).with_context(|| format!("{at}: transcript"))?,
            "python" => {
                current.shell(&format!("python3 - <<'__DOCTEST_PY__'\n{}__DOCTEST_PY__\n", block.text), false)?
            }
            _ => {
                let text = match block.note.get("lines") {
                    Some(n) => block.text.lines().take(n.parse()?).map(|l| format!("{l}\n")).collect(),
                    None => block.text.clone(),
                };
                current.shell(&text, block.has("background")).with_context(|| format!("{at}: block failed"))?
            }
        };
        if let Some(addr) = block.note.get("wait") {
            polaris_testkit::wait_accepting(addr, Duration::from_secs(30));
        }
        ran += 1;
    }
    if let Some(old) = session {
        old.end()?;
    }
    Ok(ran)
}

/// One reader's shell: a checkout-like directory with the built binaries under
/// `target/release`, a `bash` reading the blocks, and the `nc` of the current transcript.
struct Session {
    name: String,
    dir: tempfile::TempDir,
    bash: Child,
    stdin: ChildStdin,
    marks: mpsc::Receiver<String>,
    blocks_run: usize,
    transcript: Option<Transcript>,
}

impl Session {
    fn start(name: &str, scratch: &Path, shim: &Path) -> Result<Session> {
        let dir = tempfile::Builder::new().prefix(&format!("doc-{name}-")).tempdir_in(scratch)?;
        let release = dir.path().join("target/release");
        std::fs::create_dir_all(release.join("examples"))?;
        for bin in ["polarisd", "polaris-dispatch", "polaris-agent", "polaris-bench"] {
            std::os::unix::fs::symlink(binary(bin), release.join(bin))?;
        }
        for ex in ["producer", "worker"] {
            std::os::unix::fs::symlink(example(ex), release.join("examples").join(ex))?;
        }
        let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap_or_default());
        let mut bash = Command::new("bash")
            .args(["--norc", "--noprofile"])
            .current_dir(dir.path())
            .env("PATH", path)
            .env("DOCTEST_BIN", &release)
            .env_remove("POLARIS_SECRET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .context("starting bash")?;
        let stdin = bash.stdin.take().context("bash stdin")?;
        let stdout = bash.stdout.take().context("bash stdout")?;
        let marks = read_lines(stdout);
        Ok(Session { name: name.to_string(), dir, bash, stdin, marks, blocks_run: 0, transcript: None })
    }

    /// Runs `text` as the reader would by pasting it, and returns what it printed. Every
    /// command must succeed (`set -e` for the block); background processes the block
    /// starts keep writing into this block's output file.
    fn shell(&mut self, text: &str, background: bool) -> Result<String> {
        self.blocks_run += 1;
        let out = self.dir.path().join(format!(".doctest-{}.out", self.blocks_run));
        let script = if background {
            format!("{{\n{text}}} >'{}' 2>&1 </dev/null &\necho \"{END_MARK} 0\"\n", out.display())
        } else {
            format!("{{ set -e\n{text}}} >'{}' 2>&1 </dev/null\nset +e\necho \"{END_MARK} $?\"\n", out.display())
        };
        self.stdin.write_all(script.as_bytes())?;
        self.stdin.flush()?;
        let status = match self.marks.recv_timeout(BLOCK_TIMEOUT) {
            Ok(line) => line.strip_prefix(END_MARK).map(|s| s.trim().to_string()).unwrap_or(line),
            Err(mpsc::RecvTimeoutError::Timeout) => "no end within the block timeout".to_string(),
            Err(mpsc::RecvTimeoutError::Disconnected) => "the shell exited (a command failed under set -e)".into(),
        };
        let printed = std::fs::read_to_string(&out).unwrap_or_default();
        ensure!(status == "0", "status {status}; the block printed:\n{printed}");
        Ok(printed)
    }

    /// Plays a beanstalk transcript against its `$` command (or the session's open one).
    fn transcript(&mut self, text: &str) -> Result<String> {
        let mut lines = text.lines().peekable();
        if let Some(command) = lines.peek().and_then(|l| l.strip_prefix("$ ")) {
            self.transcript = Some(Transcript::start(command, self.dir.path())?);
            lines.next();
        }
        let conn = self.transcript.as_mut().ok_or_else(|| anyhow!("a transcript without `$` and none open"))?;
        let mut client_body_follows = false;
        let mut server_body_bytes: Option<usize> = None;
        for line in lines {
            if let Some(n) = server_body_bytes.take() {
                conn.expect(line)?;
                ensure!(line.len() == n, "body line {line:?} is not the {n} bytes its reply announced");
                continue;
            }
            if client_body_follows {
                client_body_follows = false;
                conn.send(line)?;
                continue;
            }
            if let Some(secs) = line.strip_prefix('(').and_then(|l| l.strip_suffix(" seconds later)")) {
                // A pause in the transcript; one more second so a deadline is surely past.
                std::thread::sleep(Duration::from_secs(secs.parse::<u64>()? + 1));
                continue;
            }
            let word = line.split(' ').next().unwrap_or("");
            if is_reply_word(word) {
                conn.expect(line)?;
                server_body_bytes = match word {
                    "RESERVED" | "FOUND" | "OK" => line.rsplit(' ').next().map(str::parse).transpose()?,
                    _ => None,
                };
            } else {
                conn.send(line)?;
                client_body_follows = word == "put";
            }
        }
        Ok(String::new())
    }

    /// Stops everything the session started (a reader's Ctrl-C), and waits until the
    /// docs' addresses are free for the next session.
    fn end(mut self) -> Result<()> {
        self.transcript = None;
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.bash.id())]).status();
        let _ = self.bash.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while DOC_ADDRS.iter().any(|a| TcpStream::connect(a).is_ok()) {
            ensure!(Instant::now() < deadline, "session {}: its servers still listen after kill", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.bash.kill();
    }
}

/// A child's output, line by line, from a thread, so the reader can wait with a timeout.
fn read_lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The words a beanstalk server's reply lines start with.
fn is_reply_word(word: &str) -> bool {
    word.len() > 1 && word.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
}

/// A transcript's client process (`nc -C …`): lines in, the server's lines out.
struct Transcript {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Transcript {
    fn start(command: &str, dir: &Path) -> Result<Transcript> {
        let mut child = Command::new("bash")
            .args(["-c", command])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines = read_lines(stdout);
        Ok(Transcript { child, stdin, lines })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        let got = self.lines.recv_timeout(LINE_TIMEOUT).map_err(|_| anyhow!("no reply; expected {want:?}"))?;
        ensure!(got.trim_end_matches('\r') == want, "expected {want:?}, the server said {got:?}");
        Ok(())
    }
}

impl Drop for Transcript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compares a block's output with an `output` block: `text` line by line, `json` as data
/// (from the last JSON document the block printed, after any log lines); `…` matches
/// anything.
fn check_output(lang: &str, want: &str, got: &str) -> Result<()> {
    match lang {
        "json" => {
            let want: Value = serde_json::from_str(want).context("the doc's JSON")?;
            let got = last_json(got).ok_or_else(|| anyhow!("no JSON in the output:\n{got}"))?;
            ensure!(json_matches(&want, &got), "expected {want}\n     got {got}");
        }
        "text" => {
            let got_lines: Vec<&str> = got.lines().map(|l| l.trim_end_matches('\r')).collect();
            let want_lines: Vec<&str> = want.lines().collect();
            ensure!(
                got_lines.len() == want_lines.len()
                    && want_lines.iter().zip(&got_lines).all(|(w, g)| glob_matches(w, g)),
                "expected:\n{want}got:\n{got}"
            );
        }
        other => bail!("an output block must be text or json, not {other:?}"),
    }
    Ok(())
}

/// The last JSON object in `text` that starts at the beginning of a line.
fn last_json(text: &str) -> Option<Value> {
    let starts: Vec<usize> =
        text.match_indices('{').map(|(i, _)| i).filter(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n').collect();
    starts.iter().rev().find_map(|&i| serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>().next()?.ok())
}

fn json_matches(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::String(w), _) if w == "…" => true,
        (Value::String(w), Value::String(g)) => glob_matches(w, g),
        (Value::Array(w), Value::Array(g)) => w.len() == g.len() && w.iter().zip(g).all(|(w, g)| json_matches(w, g)),
        (Value::Object(w), Value::Object(g)) => {
            w.len() == g.len() && w.iter().all(|(k, w)| g.get(k).is_some_and(|g| json_matches(w, g)))
        }
        _ => want == got,
    }
}

/// Whether `text` matches `pattern`, where `…` stands for any run of characters.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Writes the `cargo` stand-in: `cargo build …` has nothing to do (this test run built
/// everything), `cargo run [--release] [--example X] [-- ARGS]` runs the built binary.
fn write_cargo_shim(scratch: &Path) -> Result<PathBuf> {
    let dir = scratch.join("shim");
    std::fs::create_dir_all(&dir)?;
    let script = r#"#!/bin/bash
# Stand-in for cargo in the docs test: the binaries are already built.
case "$1" in
build) exit 0 ;;
run)
    shift
    example=
    while [[ $# -gt 0 && $1 != -- ]]; do
        [[ $1 == --example ]] && { example=$2; shift; }
        shift
    done
    [[ $1 == -- ]] && shift
    if [[ -n $example ]]; then exec "$DOCTEST_BIN/examples/$example" "$@"; fi
    exec "$DOCTEST_BIN/polarisd" "$@" ;;
*) echo "docs test: cargo $* is not available here" >&2; exit 1 ;;
esac
"#;
    let path = dir.join("cargo");
    std::fs::write(&path, script)?;
    run(Command::new("chmod").arg("755").arg(&path))?;
    Ok(dir)
}

#[test]
fn glob_and_json_matching() {
    assert!(glob_matches("OK …", "OK 940"));
    assert!(!glob_matches("OK …", "NOT_FOUND"));
    assert!(glob_matches("a…c…e", "abcde"));
    assert!(!glob_matches("a…c", "abd"));
    assert!(glob_matches("exact", "exact"));
    assert!(!glob_matches("exact", "exactly"));
    let want: Value = serde_json::json!({"id": "…", "n": [1, "x…"]});
    assert!(json_matches(&want, &serde_json::json!({"id": 7, "n": [1, "xyz"]})));
    assert!(!json_matches(&want, &serde_json::json!({"id": 7, "n": [2, "xyz"]})));
    assert!(!json_matches(&want, &serde_json::json!({"id": 7, "n": [1, "xyz"], "more": 1})));
    assert_eq!(last_json("log line\n{\"a\":1}\nlog\n{\"b\":2}\n"), Some(serde_json::json!({"b": 2})));
}
