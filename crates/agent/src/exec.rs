//! Runs a command with `bash -c` in its own process group, with a timeout, bounded output
//! capture, and no child left behind.
//!
//! - The command is the leader of a new process group (`process_group(0)`), so one
//!   `kill(-pgid, sig)` reaches everything it started (unless a process deliberately moves
//!   to another session with `setsid`; only a cgroup could hold those).
//! - On timeout the group gets SIGTERM, then SIGKILL after a grace period, so scripts that
//!   trap or ignore SIGTERM still end.
//! - When the leader exits (by itself or killed), whatever it left running in its group is
//!   killed with SIGKILL *before* the leader is reaped: while the leader is an unreaped
//!   zombie its pid, which is the group id, cannot be reused, so the kill cannot hit an
//!   unrelated process.
//! - stdout and stderr share one pipe (ordered like a terminal shows them), drained by a
//!   thread that keeps reading, and discarding, past the capture limit, so the child never
//!   blocks on a full pipe.

use crate::sys::{self, Signal};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Most output bytes kept from one command.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// How often the runner checks the child, its deadline and the caller's tick.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long to wait for the output pipe to close once the process group is gone. Only a
/// process that escaped the group (setsid) can hold it open longer.
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Limits for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    /// How long the command may run before its process group gets SIGTERM.
    pub timeout: Duration,
    /// How long after SIGTERM the group gets SIGKILL.
    pub kill_grace: Duration,
    /// Most output bytes kept.
    pub max_output: usize,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited with this status.
    Exited(i32),
    /// A signal it did not expect ended it (not one we sent).
    Signaled(i32),
    /// It outlived its timeout; its group was killed. `killed_by` is the signal that ended
    /// the leader: SIGTERM, or SIGKILL when it survived the grace period.
    TimedOut {
        /// SIGTERM or SIGKILL.
        killed_by: i32,
    },
    /// The caller asked to stop it (agent shutdown); its group was killed.
    Aborted,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended.
    pub termination: Termination,
    /// The first [`ExecLimits::max_output`] bytes of combined stdout and stderr.
    pub output: Vec<u8>,
    /// How many bytes it printed in all.
    pub output_bytes: u64,
    /// Whether `output` holds less than it printed.
    pub truncated: bool,
}

/// What the caller's tick wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Keep running.
    Continue,
    /// Stop the command now (SIGTERM, then SIGKILL after the grace period).
    Abort,
}

#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: u64,
}

/// Runs `bash -c cmd` under `limits`, calling `on_tick` about every 20 ms while it runs
/// (to touch the queue job and to check for shutdown).
pub fn run_bash(cmd: &str, limits: &ExecLimits, on_tick: impl FnMut() -> Tick) -> io::Result<ExecOutcome> {
    run_bash_with(cmd, limits, &[], |_| {}, on_tick)
}

/// [`run_bash`] with extra environment variables for the command, and `on_spawn` called
/// with the leader's pid (which is also the process group id) as soon as it exists, before
/// the first tick.
pub fn run_bash_with(
    cmd: &str,
    limits: &ExecLimits,
    env: &[(&str, &str)],
    on_spawn: impl FnOnce(u32),
    mut on_tick: impl FnMut() -> Tick,
) -> io::Result<ExecOutcome> {
    // Both ends are close-on-exec: the child gets the write end through dup2, which
    // clears the flag on the copy.
    let (read_end, write_end) = sys::cloexec_pipe()?;
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end.try_clone()?))
        .stderr(Stdio::from(write_end))
        .process_group(0);
    command.envs(env.iter().copied());
    let mut child = command.spawn()?;
    // The Command holds our copies of the write end; dropping it means the pipe reaches
    // EOF as soon as the last process of the group has closed it.
    drop(command);

    let capture = Arc::new(Mutex::new(Capture::default()));
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    {
        let capture = capture.clone();
        let max_output = limits.max_output;
        let mut pipe = File::from(read_end);
        std::thread::Builder::new().name("output".into()).spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
                        let room = max_output.saturating_sub(c.kept.len());
                        let keep = room.min(n);
                        c.kept.extend_from_slice(&buf[..keep]);
                        c.total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = drained_tx.send(());
        })?;
    }

    on_spawn(child.id());
    let started = Instant::now();
    let mut term_sent: Option<Instant> = None;
    let mut kill_sent = false;
    let mut timed_out = false;
    let mut aborted = false;
    loop {
        if sys::has_exited(&child)? {
            break;
        }
        let now = Instant::now();
        match term_sent {
            None => {
                if now.duration_since(started) >= limits.timeout {
                    timed_out = true;
                    sys::kill_group(&child, Signal::TERM);
                    term_sent = Some(now);
                } else if on_tick() == Tick::Abort {
                    aborted = true;
                    sys::kill_group(&child, Signal::TERM);
                    term_sent = Some(now);
                }
            }
            Some(sent) => {
                if !kill_sent && now.duration_since(sent) >= limits.kill_grace {
                    sys::kill_group(&child, Signal::KILL);
                    kill_sent = true;
                }
                // Keep the queue job alive while we wait for the group to die.
                let _ = on_tick();
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // The leader is a zombie now: nothing can take its pid as a group id, so this reaches
    // only what it left behind.
    sys::kill_group(&child, Signal::KILL);
    let status = child.wait()?;
    if drained_rx.recv_timeout(OUTPUT_DRAIN_WAIT).is_err() {
        log::warn!("output pipe still open {OUTPUT_DRAIN_WAIT:?} after the process group ended (a process escaped with setsid?)");
    }

    let termination = if aborted {
        Termination::Aborted
    } else if timed_out {
        let killed_by = status.signal().unwrap_or(if kill_sent { Signal::KILL } else { Signal::TERM }.as_raw());
        Termination::TimedOut { killed_by }
    } else if let Some(code) = status.code() {
        Termination::Exited(code)
    } else {
        Termination::Signaled(status.signal().unwrap_or(0))
    };
    let c = capture.lock().unwrap_or_else(|p| p.into_inner());
    Ok(ExecOutcome {
        termination,
        output: c.kept.clone(),
        output_bytes: c.total,
        truncated: c.total > c.kept.len() as u64,
    })
}

/// The conventional name of `signal`, e.g. `SIGKILL`.
pub fn signal_name(signal: i32) -> String {
    match sys::signal_name(signal) {
        Some(name) => name.to_string(),
        None => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(timeout_ms: u64) -> ExecLimits {
        ExecLimits {
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(300),
            max_output: MAX_OUTPUT_BYTES,
        }
    }

    fn pid_alive(pid: i32) -> bool {
        // A zombie still has a /proc entry; count it as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
            Err(_) => false,
        }
    }

    #[test]
    fn exit_status_and_both_streams_are_captured() {
        let out = run_bash("echo out; echo err >&2; exit 3", &limits(5000), || Tick::Continue).expect("run");
        assert_eq!(out.termination, Termination::Exited(3));
        assert_eq!(String::from_utf8_lossy(&out.output), "out\nerr\n");
        assert!(!out.truncated);
    }

    #[test]
    fn output_past_the_limit_is_counted_but_not_kept() {
        let out = run_bash("head -c 200000 /dev/zero | tr '\\0' x", &limits(10_000), || Tick::Continue).expect("run");
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(out.output.len(), MAX_OUTPUT_BYTES);
        assert_eq!(out.output_bytes, 200_000);
        assert!(out.truncated);
    }

    #[test]
    fn timeout_kills_a_group_that_ignores_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let cmd =
            format!("trap '' TERM; sleep 300 & echo $! > {p}; echo $$ >> {p}; echo started; wait", p = pids.display());
        let begun = Instant::now();
        let out = run_bash(&cmd, &limits(500), || Tick::Continue).expect("run");
        assert_eq!(out.termination, Termination::TimedOut { killed_by: libc::SIGKILL });
        assert!(begun.elapsed() < Duration::from_secs(5));
        assert_eq!(String::from_utf8_lossy(&out.output), "started\n");
        let pids = std::fs::read_to_string(&pids).expect("pids written");
        for pid in pids.lines() {
            let pid: i32 = pid.trim().parse().expect("pid");
            assert!(!pid_alive(pid), "process {pid} survived");
        }
    }

    #[test]
    fn background_children_do_not_outlive_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let cmd = format!("sleep 300 > /dev/null 2>&1 & echo $! > {}", pid_file.display());
        let out = run_bash(&cmd, &limits(5000), || Tick::Continue).expect("run");
        assert_eq!(out.termination, Termination::Exited(0));
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid").trim().parse().expect("pid");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pid_alive(pid), "background sleep {pid} survived");
    }

    #[test]
    fn extra_environment_and_the_spawn_hook() {
        let mut leader = None;
        let out = run_bash_with(
            "echo $POLARIS_TEST_VAR $$",
            &limits(5000),
            &[("POLARIS_TEST_VAR", "marked")],
            |pid| leader = Some(pid),
            || Tick::Continue,
        )
        .expect("run");
        assert_eq!(String::from_utf8_lossy(&out.output), format!("marked {}\n", leader.expect("hook called")));
    }

    #[test]
    fn abort_stops_the_command() {
        let mut ticks = 0;
        let out = run_bash("sleep 30", &limits(60_000), || {
            ticks += 1;
            if ticks > 5 {
                Tick::Abort
            } else {
                Tick::Continue
            }
        })
        .expect("run");
        assert_eq!(out.termination, Termination::Aborted);
    }
}
