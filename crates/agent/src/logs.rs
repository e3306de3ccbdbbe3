//! `log.tail` and `log.grep`: read a file under the agent's configured log roots.
//!
//! The path a job names is canonicalised (every `..` and symlink resolved) and must then
//! lie under one of the roots, which are canonical too; the file is opened without
//! following a last-component symlink and must be a regular file. The job's counts are
//! held to the agent's own caps. Files are read in chunks: `tail` from the end backwards,
//! `grep` line by line, so neither holds a big file in memory.

use crate::config::{LogSettings, DEFAULT_TAIL_LINES};
use polaris_ops_wire::codes::Code;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// Longest line kept by `log.grep`; the rest of a longer line is skipped.
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Bytes read at a time from the end by `log.tail`.
const TAIL_CHUNK: u64 = 64 * 1024;
/// Largest compiled regex accepted (bytes of the regex engine's program).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What a log method produced: the bytes to return, whether they were cut, and a message.
#[derive(Debug)]
pub struct LogOutput {
    /// The text (lines of the file, or grep's `N:line` output).
    pub output: Vec<u8>,
    /// Whether a cap cut it.
    pub truncated: bool,
    /// One line for people.
    pub message: String,
    /// 0; for `grep`, 1 when nothing matched (as grep).
    pub retcode: u32,
}

/// Why a log method refused or failed: the code and a message.
pub type LogError = (Code, String);

fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// `requested` resolved, if it is a file under one of `roots`.
pub fn resolve(requested: &str, roots: &[PathBuf]) -> Result<PathBuf, LogError> {
    let path = Path::new(requested);
    if !path.is_absolute() {
        return Err((Code::PathNotAllowed, format!("{requested:?} is not an absolute path")));
    }
    let under_a_root = |p: &Path| roots.iter().any(|root| p.starts_with(root));
    match std::fs::canonicalize(path) {
        Ok(canonical) if under_a_root(&canonical) => Ok(canonical),
        // Where it leads is not said: that would tell the caller about files it may not read.
        Ok(_) => Err((
            Code::PathNotAllowed,
            format!("{requested:?} leads outside the agent's log roots (after resolving .. and symlinks)"),
        )),
        // Say "missing" only where the agent may look, so probing outside learns nothing.
        Err(e) if under_a_root(&lexically_normal(path)) => Err((Code::LogReadFailed, format!("{requested:?}: {e}"))),
        Err(_) => Err((Code::PathNotAllowed, format!("{requested:?} is outside the agent's log roots"))),
    }
}

fn open(path: &Path, requested: &str) -> Result<std::fs::File, LogError> {
    let file =
        crate::sys::open_read_nofollow(path).map_err(|e| (Code::LogReadFailed, format!("{requested:?}: {e}")))?;
    let meta = file.metadata().map_err(|e| (Code::LogReadFailed, format!("{requested:?}: {e}")))?;
    if !meta.is_file() {
        return Err((Code::PathNotAllowed, format!("{requested:?} is not a regular file")));
    }
    Ok(file)
}

fn string_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, LogError> {
    args.get(name).and_then(Value::as_str).ok_or_else(|| (Code::InvalidArgs, format!("args.{name} must be a string")))
}

fn count_arg(args: &Value, name: &str) -> Result<Option<u64>, LogError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| (Code::InvalidArgs, format!("args.{name} must be a whole number, got {v}"))),
    }
}

/// `log.tail`: `{"path": P, "lines": N}` or `{"path": P, "bytes": N}`.
pub fn tail(args: &Value, settings: &LogSettings) -> Result<LogOutput, LogError> {
    let requested = string_arg(args, "path")?;
    let lines = count_arg(args, "lines")?;
    let bytes = count_arg(args, "bytes")?;
    if lines.is_some() && bytes.is_some() {
        return Err((Code::InvalidArgs, "give args.lines or args.bytes, not both".into()));
    }
    let path = resolve(requested, &settings.roots)?;
    let mut file = open(&path, requested)?;
    let len = file.metadata().map_err(|e| (Code::LogReadFailed, e.to_string()))?.len();
    let io = |e: std::io::Error| (Code::LogReadFailed, format!("{requested:?}: {e}"));
    let cap = settings.max_output_bytes;
    if let Some(wanted) = bytes {
        let n = wanted.min(cap).min(len);
        file.seek(SeekFrom::Start(len - n)).map_err(io)?;
        let mut output = Vec::with_capacity(n as usize);
        file.take(n).read_to_end(&mut output).map_err(io)?;
        let truncated = wanted > cap && len > cap;
        let mut message = format!("Last {} bytes of {}", output.len(), path.display());
        if truncated {
            message.push_str(&format!("; capped at the agent's {cap} bytes"));
        }
        return Ok(LogOutput { output, truncated, message, retcode: 0 });
    }
    let wanted = lines.unwrap_or(DEFAULT_TAIL_LINES);
    let n_lines = wanted.min(settings.max_lines);
    // Read backwards until n_lines line ends are seen before the last line, or the cap.
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    let mut start = None;
    let mut newlines = 0u64;
    while pos > 0 && start.is_none() && (tail.len() as u64) < cap {
        let step = TAIL_CHUNK.min(pos);
        pos -= step;
        file.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut chunk = vec![0u8; step as usize];
        file.read_exact(&mut chunk).map_err(io)?;
        for i in (0..chunk.len()).rev() {
            let absolute = pos + i as u64;
            // The file's final newline ends the last line; it does not start one.
            if chunk[i] == b'\n' && absolute + 1 != len {
                newlines += 1;
                if newlines == n_lines {
                    start = Some(tail.len() + chunk.len() - i - 1);
                    break;
                }
            }
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
    }
    let from = match start {
        Some(after_end) => tail.len() - after_end,
        None => 0,
    };
    let mut output = tail.split_off(from);
    let mut byte_capped = false;
    if output.len() as u64 > cap {
        // Keep the end, from a line start.
        let cut = output.len() - cap as usize;
        let line_start = output[cut..].iter().position(|&b| b == b'\n').map_or(cut, |p| cut + p + 1);
        output.drain(..line_start);
        byte_capped = true;
    }
    let shown =
        output.iter().filter(|&&b| b == b'\n').count() + usize::from(output.last().is_some_and(|&b| b != b'\n'));
    let mut message = format!("Last {shown} lines of {}", path.display());
    let line_capped = wanted > settings.max_lines;
    if line_capped {
        message.push_str(&format!("; capped at the agent's {} lines", settings.max_lines));
    }
    if byte_capped {
        message.push_str(&format!("; output capped at {cap} bytes"));
    }
    let truncated = line_capped || byte_capped;
    Ok(LogOutput { output, truncated, message, retcode: 0 })
}

/// `log.grep`: `{"path": P, "pattern": R, "context": C, "before": B, "after": A,
/// "max_matches": M, "ignore_case": bool}`.
pub fn grep(args: &Value, settings: &LogSettings) -> Result<LogOutput, LogError> {
    let requested = string_arg(args, "path")?;
    let pattern = string_arg(args, "pattern")?;
    let context = count_arg(args, "context")?.unwrap_or(0);
    let before = count_arg(args, "before")?.unwrap_or(context);
    let after = count_arg(args, "after")?.unwrap_or(context);
    if before > settings.max_context || after > settings.max_context {
        return Err((Code::InvalidArgs, format!("context is limited to {} lines on this agent", settings.max_context)));
    }
    let wanted_matches = count_arg(args, "max_matches")?.unwrap_or(settings.max_matches);
    let max_matches = wanted_matches.min(settings.max_matches);
    let ignore_case = args.get("ignore_case").and_then(Value::as_bool).unwrap_or(false);
    let regex = regex::bytes::RegexBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| (Code::InvalidArgs, format!("args.pattern: {e}")))?;
    let path = resolve(requested, &settings.roots)?;
    let file = open(&path, requested)?;
    let io = |e: std::io::Error| (Code::LogReadFailed, format!("{requested:?}: {e}"));
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file.take(settings.max_scan_bytes));
    let cap = settings.max_output_bytes as usize;
    let mut output: Vec<u8> = Vec::new();
    let mut recent: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut after_left = 0u64;
    let mut last_printed: Option<u64> = None;
    let mut matches = 0u64;
    let mut number = 0u64;
    let mut scanned = 0u64;
    let mut line = Vec::new();
    let mut stopped_at_cap = false;
    let mut output_full = false;
    loop {
        line.clear();
        let n = read_line(&mut reader, &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        scanned += n as u64;
        number += 1;
        if matches >= max_matches && after_left == 0 {
            stopped_at_cap = true;
            break;
        }
        let is_match = matches < max_matches && regex.is_match(&line);
        if is_match || after_left > 0 {
            if is_match {
                if let Some(last) = last_printed {
                    let first = recent.front().map_or(number, |(n, _)| *n);
                    if first > last + 1 {
                        output.extend_from_slice(b"--\n");
                    }
                }
                for (n, text) in recent.drain(..) {
                    push_line(&mut output, n, b'-', &text);
                }
                push_line(&mut output, number, b':', &line);
                matches += 1;
                after_left = after;
            } else {
                push_line(&mut output, number, b'-', &line);
                after_left -= 1;
            }
            last_printed = Some(number);
            if output.len() > cap {
                output_full = true;
                break;
            }
        } else if before > 0 {
            recent.push_back((number, line.clone()));
            if recent.len() as u64 > before {
                recent.pop_front();
            }
        }
    }
    let mut truncated = false;
    if output_full {
        let keep = output[..cap].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        output.truncate(keep);
        truncated = true;
    }
    let mut message = format!("{matches} matching lines in {number} lines of {}", path.display());
    if stopped_at_cap || (matches == max_matches && wanted_matches > max_matches) {
        message.push_str(&format!("; stopped at {max_matches} matches"));
        truncated = true;
    }
    if output_full {
        message.push_str(&format!("; output capped at {cap} bytes"));
    }
    if scanned >= settings.max_scan_bytes {
        message.push_str(&format!("; read only the first {} bytes", settings.max_scan_bytes));
        truncated = true;
    }
    Ok(LogOutput { output, truncated, message, retcode: u32::from(matches == 0) })
}

fn push_line(output: &mut Vec<u8>, number: u64, separator: u8, text: &[u8]) {
    output.extend_from_slice(number.to_string().as_bytes());
    output.push(separator);
    output.extend_from_slice(text);
    output.push(b'\n');
}

/// One line without its newline, at most [`MAX_LINE_BYTES`] of it kept; returns the bytes
/// consumed (0 at the end).
fn read_line(reader: &mut impl std::io::BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match memchr_newline(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let content = if done { &buf[..take - 1] } else { &buf[..take] };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&content[..content.len().min(room)]);
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

fn memchr_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(root: &Path) -> LogSettings {
        LogSettings {
            roots: vec![std::fs::canonicalize(root).expect("root")],
            max_lines: 1000,
            max_output_bytes: 4096,
            max_matches: 50,
            max_context: 5,
            max_scan_bytes: 1 << 20,
        }
    }

    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("log");
        std::fs::create_dir(&logs).expect("mkdir");
        let text: String =
            (1..=300).map(|i| format!("line {i}{}\n", if i % 50 == 0 { " ERROR" } else { "" })).collect();
        std::fs::write(logs.join("app.log"), text).expect("write");
        std::fs::write(dir.path().join("secret"), "top secret\n").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), logs.join("escape")).expect("symlink");
        std::os::unix::fs::symlink("app.log", logs.join("current")).expect("symlink");
        (dir, logs)
    }

    #[test]
    fn tail_gives_the_last_lines_or_bytes() {
        let (_dir, logs) = fixture();
        let s = settings(&logs);
        let path = logs.join("app.log").display().to_string();
        let out = tail(&json!({"path": path, "lines": 3}), &s).expect("tail");
        assert_eq!(String::from_utf8_lossy(&out.output), "line 298\nline 299\nline 300 ERROR\n");
        let out = tail(&json!({"path": path, "bytes": 6}), &s).expect("tail");
        assert_eq!(out.output, b"ERROR\n");
        // More than the file has: all of it, within the byte cap.
        let out = tail(&json!({"path": path, "lines": 5000}), &s).expect("tail");
        assert!(out.truncated && out.output.len() <= 4096 && out.output.ends_with(b"line 300 ERROR\n"));
        assert!(out.output.starts_with(b"line "), "cut at a line start");
        // A symlink inside the roots to a file inside them is fine.
        let current = logs.join("current").display().to_string();
        assert_eq!(tail(&json!({"path": current, "lines": 1}), &s).expect("tail").output, b"line 300 ERROR\n");
    }

    #[test]
    fn paths_outside_the_roots_are_refused() {
        let (dir, logs) = fixture();
        let s = settings(&logs);
        let dotdot = format!("{}/../secret", logs.display());
        let escape = logs.join("escape").display().to_string();
        let outside = dir.path().join("secret").display().to_string();
        for path in [dotdot, escape, outside, "/etc/passwd".into(), "relative.log".into()] {
            let e = tail(&json!({"path": path, "lines": 1}), &s).expect_err("refused");
            assert_eq!(e.0, Code::PathNotAllowed, "{path}: {}", e.1);
        }
        let e = tail(&json!({"path": logs.display().to_string(), "lines": 1}), &s).expect_err("a directory");
        assert_eq!(e.0, Code::PathNotAllowed);
        let e = tail(&json!({"path": logs.join("nope.log").display().to_string()}), &s).expect_err("missing");
        assert_eq!(e.0, Code::LogReadFailed);
    }

    #[test]
    fn grep_shows_matches_with_context_and_stops_at_the_cap() {
        let (_dir, logs) = fixture();
        let s = settings(&logs);
        let path = logs.join("app.log").display().to_string();
        let out = grep(&json!({"path": path, "pattern": "ERROR", "context": 1, "max_matches": 2}), &s).expect("grep");
        assert_eq!(
            String::from_utf8_lossy(&out.output),
            "49-line 49\n50:line 50 ERROR\n51-line 51\n--\n99-line 99\n100:line 100 ERROR\n101-line 101\n"
        );
        assert!(out.truncated && out.message.contains("stopped at 2 matches"), "{}", out.message);
        let out = grep(&json!({"path": path, "pattern": "^line 7$"}), &s).expect("grep");
        assert_eq!(out.output, b"7:line 7\n");
        assert_eq!(out.retcode, 0);
        let out = grep(&json!({"path": path, "pattern": "nothing here"}), &s).expect("grep");
        assert_eq!((out.retcode, out.output.len()), (1, 0));
        let e = grep(&json!({"path": path, "pattern": "("}), &s).expect_err("bad regex");
        assert_eq!(e.0, Code::InvalidArgs);
        let e = grep(&json!({"path": path, "pattern": "x", "context": 6}), &s).expect_err("over the cap");
        assert_eq!(e.0, Code::InvalidArgs);
    }
}
