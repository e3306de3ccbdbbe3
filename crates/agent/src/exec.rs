//! Runs a command with `bash -c` in its own process group — and in its own cgroup when
//! the agent has one for it ([`crate::contain`]) — with a timeout, bounded output capture,
//! and no child left behind.
//!
//! - The command is the leader of a new process group (`process_group(0)`), so one
//!   `kill(-pgid, sig)` reaches everything it started that stayed in the group.
//! - With a cgroup unit, the command is in the unit before it runs anything: `bash` starts
//!   as a gate that waits for one byte on its stdin, the agent moves it into the unit
//!   (`cgroup.procs`) and then writes the byte, and the gate `exec`s `bash -c cmd` (same
//!   pid). A child that calls `setsid` or double-forks leaves the process group but never
//!   the cgroup, so every kill below reaches it. (Why not `pre_exec`: `spawn` waits for
//!   the child to exec, so a child blocked in `pre_exec` on the parent would deadlock it;
//!   the gate needs neither `unsafe` nor `clone3`.)
//! - On timeout (and on agent shutdown past the drain timeout) the group and every
//!   process of the unit get SIGTERM, then SIGKILL (`cgroup.kill`) after a grace period, so
//!   scripts that trap or ignore SIGTERM still end.
//! - On cancel ([`Tick::Cancel`]) the whole unit gets SIGKILL at once, no grace: an
//!   operator asked for it to stop, and the dispatcher waits for the answer.
//! - When the leader exits (by itself or killed), whatever it left running in its group and
//!   unit is killed with SIGKILL *before* the leader is reaped: while the leader is an
//!   unreaped zombie its pid, which is the group id, cannot be reused, so the kill cannot
//!   hit an unrelated process.
//! - stdout and stderr share one pipe (ordered like a terminal shows them), drained by a
//!   thread that keeps reading, and discarding, past the capture limit, so the child never
//!   blocks on a full pipe. If reading fails, the command is killed with SIGKILL and the
//!   result says so ([`Termination::OutputFailed`]).

use crate::contain::Unit;
use crate::sys::{self, Signal};
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The caller cancelled it ([`Tick::Cancel`]): all `killed` processes of its unit (or
    /// process group) got SIGKILL at once.
    Cancelled {
        /// How many processes it had when it was killed.
        killed: usize,
    },
    /// Its output could not be read (the error); it was killed with SIGKILL, since it
    /// would block on a pipe nobody reads.
    OutputFailed(String),
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
    /// How many times the kernel killed a process of its unit for the unit's memory limit.
    pub oom_kills: u64,
}

/// What the caller's tick wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Keep running.
    Continue,
    /// Stop the command now (SIGTERM, then SIGKILL after the grace period).
    Abort,
    /// Kill the command now, its whole unit with SIGKILL, without grace (a cancel).
    Cancel,
}

#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: u64,
    /// Why reading the output failed, if it did.
    error: Option<String>,
}

/// Runs `bash -c cmd` under `limits`, calling `on_tick` about every 20 ms while it runs
/// (to touch the queue job and to check for shutdown).
pub fn run_bash(cmd: &str, limits: &ExecLimits, on_tick: impl FnMut() -> Tick) -> io::Result<ExecOutcome> {
    run_bash_with(cmd, limits, &[], None, |_| {}, on_tick)
}

/// The shell that starts a command inside its cgroup: it waits for one byte on stdin —
/// written by the agent once it has moved this process into the unit — then becomes
/// `bash -c "$1"` (same pid, so the process group and `$$` are the command's). Until the
/// byte comes it runs nothing, so nothing can fork outside the unit. EOF instead of the
/// byte (the agent could not place it) ends it without running the command.
const GATE_SCRIPT: &str = r#"read -r -N 1 _ || exit 125; exec bash -c "$1" </dev/null"#;

/// `$0` of the gate shell, as `ps` shows it for the moment it waits.
const GATE_NAME: &str = "polaris-gate";

/// Sends `signal` to everything the command started: its process group, and with a
/// cgroup unit every process in it (SIGKILL through `cgroup.kill`).
fn signal_all(child: &Child, unit: Option<&Unit>, signal: Signal) {
    sys::kill_group(child, signal);
    if let Some(unit) = unit {
        if signal == Signal::KILL {
            unit.kill();
        } else {
            unit.signal_all(signal);
        }
    }
}

/// How many processes the command has now: the unit's, else its process group's.
fn process_count(child: &Child, unit: Option<&Unit>) -> usize {
    match unit {
        Some(unit) => unit.pids().len(),
        None => {
            let Ok(pgid) = i32::try_from(child.id()) else { return 0 };
            let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
                .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
                .filter_map(|stat| crate::orphans::parse_stat(&stat))
                .filter(|stat| stat.pgrp == pgid && stat.state != 'Z')
                .count()
        }
    }
}

/// Why the runner is ending the command.
enum Ending {
    TimedOut,
    Aborted,
    Cancelled { killed: usize },
    OutputFailed(String),
}

/// [`run_bash`] with extra environment variables for the command, its cgroup `unit` (see
/// [`crate::contain`]; `None` runs it in a process group only), and `on_spawn` called
/// with the leader's pid (which is also the process group id) as soon as it exists, and is
/// in the unit, before the first tick. The caller removes the unit afterwards.
pub fn run_bash_with(
    cmd: &str,
    limits: &ExecLimits,
    env: &[(&str, &str)],
    unit: Option<&Unit>,
    on_spawn: impl FnOnce(u32),
    on_tick: impl FnMut() -> Tick,
) -> io::Result<ExecOutcome> {
    run_reading(cmd, limits, env, unit, |pipe| Box::new(pipe), on_spawn, on_tick)
}

/// The reader of the output pipe (tests wrap it to make reading fail).
type OutputReader = Box<dyn Read + Send>;

/// [`run_bash_with`], reading the output through `reader` made from the pipe.
fn run_reading(
    cmd: &str,
    limits: &ExecLimits,
    env: &[(&str, &str)],
    unit: Option<&Unit>,
    reader: impl FnOnce(File) -> OutputReader,
    on_spawn: impl FnOnce(u32),
    mut on_tick: impl FnMut() -> Tick,
) -> io::Result<ExecOutcome> {
    // Both ends are close-on-exec: the child gets the write end through dup2, which
    // clears the flag on the copy.
    let (read_end, write_end) = sys::cloexec_pipe()?;
    let mut command = Command::new("bash");
    command.stdout(Stdio::from(write_end.try_clone()?)).stderr(Stdio::from(write_end)).process_group(0);
    // With a unit, the child waits at the gate (its stdin) until it is in the unit.
    let gate = match unit {
        Some(_) => {
            let (gate_read, gate_write) = sys::cloexec_pipe()?;
            command.arg("-c").arg(GATE_SCRIPT).arg(GATE_NAME).arg(cmd).stdin(Stdio::from(gate_read));
            Some(gate_write)
        }
        None => {
            command.arg("-c").arg(cmd).stdin(Stdio::null());
            None
        }
    };
    command.envs(env.iter().copied());
    let mut child = command.spawn()?;
    // The Command holds our copies of the write end; dropping it means the pipe reaches
    // EOF as soon as the last process of the group has closed it.
    drop(command);
    if let (Some(unit), Some(gate)) = (unit, gate) {
        if let Err(e) = unit.place(child.id()) {
            // It has run nothing yet; EOF at the gate (and SIGKILL) ends it.
            drop(gate);
            sys::kill_group(&child, Signal::KILL);
            let _ = child.wait();
            return Err(io::Error::new(e.kind(), format!("cannot move the command into its cgroup: {e}")));
        }
        let mut gate = File::from(gate);
        if let Err(e) = gate.write_all(b"g") {
            sys::kill_group(&child, Signal::KILL);
            let _ = child.wait();
            return Err(io::Error::new(e.kind(), format!("cannot start the command at its gate: {e}")));
        }
    }

    let capture = Arc::new(Mutex::new(Capture::default()));
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    {
        let capture = capture.clone();
        let max_output = limits.max_output;
        let mut pipe = reader(File::from(read_end));
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
                    Err(e) => {
                        // The runner kills the command: it would block on a pipe nobody reads.
                        capture.lock().unwrap_or_else(|p| p.into_inner()).error = Some(e.to_string());
                        break;
                    }
                }
            }
            let _ = drained_tx.send(());
        })?;
    }

    on_spawn(child.id());
    let started = Instant::now();
    let mut term_sent: Option<Instant> = None;
    let mut kill_sent = false;
    let mut ending: Option<Ending> = None;
    loop {
        if sys::has_exited(&child)? {
            break;
        }
        let now = Instant::now();
        match term_sent {
            None => {
                let read_error = capture.lock().unwrap_or_else(|p| p.into_inner()).error.clone();
                if let Some(error) = read_error {
                    signal_all(&child, unit, Signal::KILL);
                    ending = Some(Ending::OutputFailed(error));
                    kill_sent = true;
                    term_sent = Some(now);
                } else if now.duration_since(started) >= limits.timeout {
                    ending = Some(Ending::TimedOut);
                    signal_all(&child, unit, Signal::TERM);
                    term_sent = Some(now);
                } else {
                    match on_tick() {
                        Tick::Continue => {}
                        Tick::Abort => {
                            ending = Some(Ending::Aborted);
                            signal_all(&child, unit, Signal::TERM);
                            term_sent = Some(now);
                        }
                        Tick::Cancel => {
                            // An operator's order: no grace, the whole unit at once.
                            let killed = process_count(&child, unit);
                            signal_all(&child, unit, Signal::KILL);
                            ending = Some(Ending::Cancelled { killed });
                            kill_sent = true;
                            term_sent = Some(now);
                        }
                    }
                }
            }
            Some(sent) => {
                // Keep the queue job alive while we wait for the group to die; a cancel
                // meanwhile cuts the grace short.
                let cancel = on_tick() == Tick::Cancel;
                if !kill_sent && (cancel || now.duration_since(sent) >= limits.kill_grace) {
                    signal_all(&child, unit, Signal::KILL);
                    kill_sent = true;
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // The leader is a zombie now: nothing can take its pid as a group id, so this reaches
    // only what it left behind.
    sys::kill_group(&child, Signal::KILL);
    if let Some(unit) = unit {
        if !unit.is_empty() {
            unit.kill();
        }
    }
    let status = child.wait()?;
    if let Some(unit) = unit {
        if !unit.wait_empty(OUTPUT_DRAIN_WAIT) {
            log::warn!("cgroup {:?} still holds processes {OUTPUT_DRAIN_WAIT:?} after SIGKILL", unit.dirs());
        }
    }
    if drained_rx.recv_timeout(OUTPUT_DRAIN_WAIT).is_err() {
        log::warn!("output pipe still open {OUTPUT_DRAIN_WAIT:?} after the process group ended (a process escaped with setsid?)");
    }

    let termination = match ending {
        Some(Ending::Aborted) => Termination::Aborted,
        Some(Ending::Cancelled { killed }) => Termination::Cancelled { killed },
        Some(Ending::OutputFailed(error)) => Termination::OutputFailed(error),
        Some(Ending::TimedOut) => {
            let killed_by = status.signal().unwrap_or(if kill_sent { Signal::KILL } else { Signal::TERM }.as_raw());
            Termination::TimedOut { killed_by }
        }
        None => match status.code() {
            Some(code) => Termination::Exited(code),
            None => Termination::Signaled(status.signal().unwrap_or(0)),
        },
    };
    let c = capture.lock().unwrap_or_else(|p| p.into_inner());
    Ok(ExecOutcome {
        termination,
        output: c.kept.clone(),
        output_bytes: c.total,
        truncated: c.total > c.kept.len() as u64,
        oom_kills: unit.map_or(0, Unit::oom_kills),
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
            None,
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

    /// A fresh cgroup unit, or `None` (SKIP, or a failure under CI) where there are none.
    fn test_unit(limits: &crate::contain::UnitLimits) -> Option<Unit> {
        let containment = crate::contain::Containment::detect();
        if !containment.uses_cgroups() || (limits.memory_max.is_some() && !containment.limits_memory()) {
            polaris_testkit::skip_unless_ci(&format!("no cgroups for this test: {}", containment.describe()));
            return None;
        }
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        Some(containment.create(&run_id, limits).expect("create the unit").expect("a unit"))
    }

    fn wait_gone(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!pid_alive(pid), "process {pid} survived");
    }

    #[test]
    fn a_setsid_child_dies_with_its_cgroup_at_timeout_and_at_cancel() {
        let Some(unit) = test_unit(&Default::default()) else { return };
        let cmd = "setsid sleep 600 > /dev/null 2>&1 & echo $!; sleep 600";
        let out = run_bash_with(cmd, &limits(1000), &[], Some(&unit), |_| {}, || Tick::Continue).expect("run");
        assert!(matches!(out.termination, Termination::TimedOut { .. }), "{:?}", out.termination);
        let escaped: i32 = String::from_utf8_lossy(&out.output).trim().parse().expect("the setsid child's pid");
        wait_gone(escaped);
        assert!(unit.is_empty());
        unit.remove().expect("remove the unit");
        assert!(unit.dirs().iter().all(|d| !std::path::Path::new(d).exists()));

        let Some(unit) = test_unit(&Default::default()) else { return };
        let mut ticks = 0;
        let out = run_bash_with(
            cmd,
            &limits(60_000),
            &[],
            Some(&unit),
            |_| {},
            || {
                ticks += 1;
                if ticks > 25 {
                    Tick::Cancel
                } else {
                    Tick::Continue
                }
            },
        )
        .expect("run");
        // The setsid sleep, and the foreground one (bash execs a last simple command).
        assert_eq!(out.termination, Termination::Cancelled { killed: 2 });
        let escaped: i32 = String::from_utf8_lossy(&out.output).trim().parse().expect("the setsid child's pid");
        wait_gone(escaped);
        unit.remove().expect("remove the unit");
    }

    #[test]
    fn a_unit_that_ignores_sigterm_still_ends_at_timeout() {
        let Some(unit) = test_unit(&Default::default()) else { return };
        let cmd =
            "trap '' TERM INT; setsid bash -c 'trap \"\" TERM INT; sleep 600' > /dev/null 2>&1 & echo $!; sleep 600";
        let out = run_bash_with(cmd, &limits(500), &[], Some(&unit), |_| {}, || Tick::Continue).expect("run");
        // Ignored signals survive exec: SIGTERM did nothing, SIGKILL after the grace did.
        assert_eq!(out.termination, Termination::TimedOut { killed_by: libc::SIGKILL });
        let escaped: i32 = String::from_utf8_lossy(&out.output).trim().parse().expect("the setsid child's pid");
        wait_gone(escaped);
        unit.remove().expect("remove the unit");
    }

    #[test]
    fn the_memory_limit_kills_and_the_cpu_limit_throttles() {
        let limits64 = crate::contain::UnitLimits { memory_max: Some(64 << 20), cpu_max_milli: None };
        let Some(unit) = test_unit(&limits64) else { return };
        let cmd = "echo before; head -c 600M /dev/zero | tail > /dev/null; echo after $?";
        let out = run_bash_with(cmd, &limits(60_000), &[], Some(&unit), |_| {}, || Tick::Continue).expect("run");
        assert!(out.oom_kills > 0, "{out:?}");
        assert!(String::from_utf8_lossy(&out.output).starts_with("before\n"), "{out:?}");
        unit.remove().expect("remove the unit");
        // A CPU limit is written where the kernel enforces it, and the command runs there.
        let quarter = crate::contain::UnitLimits { memory_max: None, cpu_max_milli: Some(250) };
        let Some(unit) = test_unit(&quarter) else { return };
        let quota: Vec<String> = unit
            .dirs()
            .iter()
            .filter_map(|dir| {
                let v1 = std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us"));
                let v2 = std::fs::read_to_string(format!("{dir}/cpu.max"));
                v1.or(v2).ok().map(|text| text.split_whitespace().next().unwrap_or_default().to_string())
            })
            .collect();
        assert_eq!(quota, ["25000"], "{unit:?}");
        // A busy loop for a second is throttled by the kernel: the limit is enforced.
        let busy = "timeout 1 bash -c 'while :; do :; done'; echo ok";
        let out = run_bash_with(busy, &limits(10_000), &[], Some(&unit), |_| {}, || Tick::Continue).expect("run");
        assert_eq!(String::from_utf8_lossy(&out.output), "ok\n");
        let throttled: u64 = unit
            .dirs()
            .iter()
            .filter_map(|dir| std::fs::read_to_string(format!("{dir}/cpu.stat")).ok())
            .filter_map(|stat| stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse::<u64>().ok()))
            .sum();
        assert!(throttled > 0, "no throttling under a quarter CPU: {unit:?}");
        unit.remove().expect("remove the unit");
        // Without the limit the same command is fine.
        let Some(unit) = test_unit(&Default::default()) else { return };
        let out = run_bash_with(
            "head -c 100M /dev/zero | tail > /dev/null",
            &limits(60_000),
            &[],
            Some(&unit),
            |_| {},
            || Tick::Continue,
        )
        .expect("run");
        assert_eq!((out.termination, out.oom_kills), (Termination::Exited(0), 0));
        unit.remove().expect("remove the unit");
    }

    /// Reads the first chunk, then fails as a broken device would.
    struct FailingReader {
        pipe: File,
        reads: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.reads > 1 {
                return Err(io::Error::other("injected read failure"));
            }
            self.pipe.read(buf)
        }
    }

    #[test]
    fn a_failed_output_read_kills_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let cmd = format!("echo $$ > {}; echo first; sleep 1; echo second; exec sleep 600", pid_file.display());
        let begun = Instant::now();
        let out = run_reading(
            &cmd,
            &limits(60_000),
            &[],
            None,
            |pipe| Box::new(FailingReader { pipe, reads: 0 }),
            |_| {},
            || Tick::Continue,
        )
        .expect("run");
        assert_eq!(out.termination, Termination::OutputFailed("injected read failure".into()));
        assert!(begun.elapsed() < Duration::from_secs(30), "killed, not waited for");
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid").trim().parse().expect("pid");
        assert!(!pid_alive(pid), "process {pid} survived");
    }

    #[test]
    fn cancel_without_a_cgroup_kills_the_process_group_at_once() {
        let mut ticks = 0;
        let out = run_bash("echo started; sleep 30", &limits(60_000), || {
            ticks += 1;
            if ticks > 25 {
                Tick::Cancel
            } else {
                Tick::Continue
            }
        })
        .expect("run");
        // bash became the sleep (it execs a last simple command).
        assert_eq!(out.termination, Termination::Cancelled { killed: 1 });
        assert_eq!(String::from_utf8_lossy(&out.output), "started\n");
    }
}
