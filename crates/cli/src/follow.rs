//! Following a job to its end (`run`, `job --follow`): a live progress bar on a terminal
//! (hosts done of all, counts by state), each host's output — line by line as it is
//! printed, every line prefixed with the host's name (from the event stream; the rest
//! when the host is final), or grouped under a header per host with `--group` once it is
//! final — then a summary table; or with `--json`, only the final job document.

use crate::exit::Exit;
use crate::progress::{HostView, JobView, ProgressSource};
use crate::table::{paint, state_tone, Table, Tone};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};

/// How to show a followed job.
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowOptions {
    /// Print each host's output as one block under a header, not line by line.
    pub group: bool,
    /// Print only the final job document (JSON).
    pub json: bool,
    /// Colour the output.
    pub colour: bool,
}

/// Counts by state, as the bar's message shows them: `2 success, 1 reserved`.
pub fn state_counts(hosts: &[HostView]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in hosts {
        *counts.entry(h.state.as_str()).or_default() += 1;
    }
    counts.iter().map(|(state, n)| format!("{n} {state}")).collect::<Vec<_>>().join(", ")
}

/// The bar for a job of `hosts` hosts; made once the first look at the job tells how many.
fn progress_bar(json: bool, hosts: u64) -> ProgressBar {
    // Drawn only on a terminal (stderr), so pipes and files get the output alone.
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(hosts), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} hosts done  {msg}  ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Live output printed so far, per host: the bytes shown and a line not yet complete.
#[derive(Debug, Default)]
struct LiveLines {
    shown: usize,
    partial: String,
}

/// The complete lines of `text` for `host` (prefixed), keeping an unfinished last line
/// for later.
fn live_lines(host: &str, text: &str, state: &mut LiveLines, colour: bool) -> Vec<u8> {
    state.shown += text.len();
    state.partial.push_str(text);
    let mut out = Vec::new();
    while let Some(end) = state.partial.find('\n') {
        let line: String = state.partial.drain(..=end).collect();
        out.extend_from_slice(format!("{} | {}", paint(host, Tone::Plain, colour), line).as_bytes());
    }
    out
}

/// The text printed for one host that became final, `already` bytes of whose output were
/// shown live (line by line mode only).
pub fn host_block(host: &HostView, group: bool, colour: bool) -> Vec<u8> {
    host_block_after(host, group, colour, 0)
}

fn host_block_after(host: &HostView, group: bool, colour: bool, already: usize) -> Vec<u8> {
    let tone = if host.succeeded() { Tone::Good } else { Tone::Bad };
    let full = host.output();
    // What was shown live is a prefix of the output, unless it went past what the result
    // kept; the unfinished line shown live is printed again in full, with the rest.
    let output = if group { &full[..] } else { full.get(already..).unwrap_or_default() };
    let mut out = Vec::new();
    if group {
        let exit = host.retcode.map(|r| format!(", exit {r}")).unwrap_or_default();
        let header = format!("== {} ({}{exit}) ==", host.host, host.state);
        out.extend_from_slice(paint(&header, tone, colour).as_bytes());
        out.push(b'\n');
        out.extend_from_slice(output);
        if !output.is_empty() && !output.ends_with(b"\n") {
            out.push(b'\n');
        }
    } else {
        let prefix = paint(&host.host, tone, colour);
        let text = String::from_utf8_lossy(output);
        for line in text.lines() {
            out.extend_from_slice(format!("{prefix} | {line}\n").as_bytes());
        }
    }
    if !host.succeeded() {
        let message = host.message.as_deref().unwrap_or("no message");
        let exit = host.retcode.map(|r| format!(" {r}")).unwrap_or_default();
        let prefix = if group { String::new() } else { format!("{} ! ", paint(&host.host, tone, colour)) };
        out.extend_from_slice(format!("{prefix}{}{exit}: {message}\n", host.state).as_bytes());
    }
    if host.truncated {
        let prefix = if group { String::new() } else { format!("{} ! ", host.host) };
        out.extend_from_slice(format!("{prefix}(output truncated)\n").as_bytes());
    }
    out
}

/// The summary table of a finished job, and its last line.
pub fn summary(view: &JobView, colour: bool) -> String {
    let mut table = Table::new(&["HOST", "STATE", "EXIT", "MESSAGE"]);
    for h in &view.hosts {
        let exit = h.retcode.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        let state_shown = if h.state == "success" && !h.succeeded() { "failed" } else { h.state.as_str() };
        table.toned_row(vec![
            (h.host.clone(), Tone::Plain),
            (state_shown.to_string(), state_tone(state_shown)),
            (exit, Tone::Plain),
            (h.message.clone().unwrap_or_default(), Tone::Plain),
        ]);
    }
    let ok = view.hosts.iter().filter(|h| h.succeeded()).count();
    let failed = view.hosts.len() - ok;
    let total = format!("{} hosts: {ok} succeeded, {failed} failed", view.hosts.len());
    let tone = if failed == 0 { Tone::Good } else { Tone::Bad };
    format!("{}{}\n", table.render(colour), paint(&total, tone, colour))
}

/// The exit code of a finished job: [`Exit::HostsFailed`] unless every host succeeded.
pub fn exit_of(view: &JobView) -> Exit {
    if view.hosts.iter().all(HostView::succeeded) {
        Exit::Ok
    } else {
        Exit::HostsFailed
    }
}

/// Follows a job from `source` to its end, showing it as `options` say.
pub fn follow(source: &mut dyn ProgressSource, options: FollowOptions) -> anyhow::Result<(JobView, Exit)> {
    let mut bar: Option<ProgressBar> = None;
    let mut shown: HashSet<String> = HashSet::new();
    let mut live: BTreeMap<String, LiveLines> = BTreeMap::new();
    let mut stdout = std::io::stdout();
    loop {
        let view = source.next()?;
        let bar = bar.get_or_insert_with(|| progress_bar(options.json, view.hosts.len() as u64));
        bar.set_length(view.hosts.len() as u64);
        bar.set_position(view.hosts.iter().filter(|h| h.is_final()).count() as u64);
        bar.set_message(state_counts(&view.hosts));
        if !options.json && !options.group {
            for (host, text) in &view.live {
                if shown.contains(host) {
                    continue;
                }
                let lines = live_lines(host, text, live.entry(host.clone()).or_default(), options.colour);
                if !lines.is_empty() {
                    bar.suspend(|| stdout.write_all(&lines).and_then(|()| stdout.flush()))?;
                }
            }
        }
        if !options.json {
            for host in view.hosts.iter().filter(|h| h.is_final()) {
                if shown.insert(host.host.clone()) {
                    // Complete lines already shown live are not shown again.
                    let already = live.get(&host.host).map_or(0, |l| l.shown - l.partial.len());
                    let block = host_block_after(host, options.group, options.colour, already);
                    bar.suspend(|| stdout.write_all(&block).and_then(|()| stdout.flush()))?;
                }
            }
        }
        if view.done {
            bar.finish_and_clear();
            if options.json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&view.document)?)?;
            } else {
                write!(stdout, "{}", summary(&view, options.colour))?;
            }
            let exit = exit_of(&view);
            return Ok((view, exit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;
    use serde_json::json;

    /// A scripted source: the job as it would be seen at each poll.
    struct Scripted(Vec<JobView>);
    impl ProgressSource for Scripted {
        fn next(&mut self) -> Result<JobView, ApiError> {
            Ok(self.0.remove(0))
        }
    }

    fn host(name: &str, state: &str, retcode: Option<u64>, data: &str) -> serde_json::Value {
        json!({"host": name, "state": state, "retcode": retcode, "message": "m", "data": data})
    }

    #[test]
    fn blocks_prefix_or_group_output() {
        let view = JobView::from_document(json!({"hosts": [host("a", "success", Some(0), "one\ntwo\n")]}));
        assert_eq!(String::from_utf8(host_block(&view.hosts[0], false, false)).expect("utf-8"), "a | one\na | two\n");
        assert_eq!(
            String::from_utf8(host_block(&view.hosts[0], true, false)).expect("utf-8"),
            "== a (success, exit 0) ==\none\ntwo\n"
        );
        let failed = JobView::from_document(json!({"hosts": [host("b", "success", Some(3), "")]}));
        assert_eq!(String::from_utf8(host_block(&failed.hosts[0], false, false)).expect("utf-8"), "b ! success 3: m\n");
    }

    #[test]
    fn following_ends_with_the_exit_of_the_hosts() {
        let polls = vec![
            JobView::from_document(
                json!({"done": false, "hosts": [host("a", "reserved", None, ""), host("b", "ready", None, "")]}),
            ),
            JobView::from_document(
                json!({"done": true, "hosts": [host("a", "success", Some(0), "x"), host("b", "failed", Some(256), "")]}),
            ),
        ];
        let (view, exit) = follow(&mut Scripted(polls), FollowOptions::default()).expect("follow");
        assert_eq!(exit, Exit::HostsFailed);
        assert!(summary(&view, false).ends_with("2 hosts: 1 succeeded, 1 failed\n"));
        assert_eq!(state_counts(&view.hosts), "1 failed, 1 success");
    }
}
