//! Ending what a previous agent left running.
//!
//! An agent that dies mid-command (SIGKILL, OOM killer, crash) leaves the command's process
//! group running with nobody to enforce its timeout, and its queue job goes back to
//! `ready`. The ledger ([`crate::ledger`]) still holds that run without a `done` line. At
//! start, before taking any job, the agent:
//!
//! 1. finds the run's process groups that are still alive and provably its own:
//!    - the recorded group, if its leader is alive with the recorded start time (a pid is
//!      not reused while its process group exists, so a leader with another start time is
//!      an unrelated process) and the boot id is the same;
//!    - any group a process carrying the run's `POLARIS_RUN_ID=<run id>` environment
//!      variable is in, when that group's leader carries it too or is gone. This covers the
//!      moment between the command's start and its `started` line, and a leader that
//!      exited before its children;
//! 2. kills them with SIGKILL, and first every process in the run's cgroups (the ones its
//!    `started` line recorded, or the ones this agent would make for its run id), which
//!    holds what left the process group, then removes those cgroups;
//! 3. (in the serve loop, once the queue is reachable) puts a `failed` result with
//!    [`Code::AgentRestarted`] on the run's reply tube, deletes the queue job if it still
//!    carries that envelope, and closes the run in the ledger. The envelope stays in the
//!    ledger, so a copy that comes back later is refused as a replay, never run.
//!
//! The result goes first to the dispatcher, so if the command had already reported (the
//! agent died between putting its result and deleting the job), the real result wins.

use crate::contain::{Containment, Unit};
use crate::ledger::{Started, UnfinishedRun};
use crate::sys::{self, Signal};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{HostResult, Method};
use std::collections::BTreeSet;

/// The environment variable naming the run a command belongs to.
pub const RUN_ID_ENV: &str = "POLARIS_RUN_ID";

/// The message of a result whose command the restarted agent killed.
pub const KILLED_MESSAGE: &str = "Killed: the agent was restarted while the command ran";

/// What the previous agent left, now dealt with, waiting to be reported.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// The unfinished run.
    pub run: UnfinishedRun,
    /// The result to report for it.
    pub result: HostResult,
}

/// Fields of `/proc/<pid>/stat` the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// Start time, in clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat` text. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, pgrp field 5, starttime field 22.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This boot's id, to tell a recorded process group from one of an earlier boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The `started` record of the command whose leader is `pid`, in run `run_id`.
pub fn describe(run_id: &str, pid: u32) -> Option<Started> {
    let pgid = i32::try_from(pid).ok()?;
    let stat = read_stat(pgid)?;
    Some(Started {
        run_id: run_id.to_string(),
        pgid,
        start_ticks: stat.start_ticks,
        boot_id: boot_id(),
        cgroups: Vec::new(),
    })
}

fn marker(run_id: &str) -> Vec<u8> {
    format!("{RUN_ID_ENV}={run_id}").into_bytes()
}

/// Whether process `pid`'s initial environment holds exactly `marker` (`NAME=value`).
fn carries(pid: i32, marker: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker))
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect()
}

/// The live process groups of `run` that are provably its own.
pub fn find_groups(run: &UnfinishedRun) -> BTreeSet<i32> {
    let mut groups = BTreeSet::new();
    if let Some(started) = &run.started {
        if started.boot_id != boot_id() {
            // Rebooted since: nothing of it can be running.
            return groups;
        }
        if read_stat(started.pgid)
            .is_some_and(|leader| leader.pgrp == started.pgid && leader.start_ticks == started.start_ticks)
        {
            groups.insert(started.pgid);
        }
    }
    let marker = marker(&run.ran.run_id);
    for pid in all_pids() {
        let Some(stat) = read_stat(pid) else { continue };
        if stat.state == 'Z' || groups.contains(&stat.pgrp) || !carries(pid, &marker) {
            continue;
        }
        // The leader carries the marker too, or is gone: then the group id cannot have
        // been reused, since a member still pins it.
        if stat.pgrp == pid || read_stat(stat.pgrp).is_none() || carries(stat.pgrp, &marker) {
            groups.insert(stat.pgrp);
        }
    }
    groups
}

/// The cgroup directories of `run` that still exist: the ones its `started` line
/// recorded, and the ones `containment` would have made for it (the agent may have died
/// before the line was written).
fn find_cgroups(run: &UnfinishedRun, containment: &Containment) -> Vec<String> {
    let mut dirs: Vec<String> = run.started.as_ref().map(|s| s.cgroups.clone()).unwrap_or_default();
    for dir in containment.unit_dirs(&run.ran.run_id) {
        let dir = dir.display().to_string();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    // Only a run's own cgroup (`…/polaris-agent/<run id>`), whatever the ledger says.
    dirs.retain(|d| {
        let path = std::path::Path::new(d);
        let named = path.file_name().is_some_and(|n| n == run.ran.run_id.as_str());
        let under = path.parent().and_then(|p| p.file_name()).is_some_and(|n| n == crate::contain::BASE_NAME);
        named && under && !run.ran.run_id.contains(['/', '.']) && !run.ran.run_id.is_empty() && path.is_dir()
    });
    dirs
}

/// Kills what `run` left running and says what happened, as the result to report.
pub fn adopt(run: &UnfinishedRun, host_id: &str, containment: &Containment) -> Adopted {
    // Its cgroups first: they hold what left the process group (setsid, double fork).
    let mut unit_killed = 0;
    let cgroups = find_cgroups(run, containment);
    if !cgroups.is_empty() {
        let unit = Unit::from_dirs(&cgroups);
        unit_killed = unit.kill();
        if let Err(e) = unit.remove() {
            log::warn!("cannot remove the cgroups {cgroups:?} of job {}: {e}", run.ran.job_id);
        }
    }
    let groups = find_groups(run);
    let mut killed = Vec::new();
    for &pgid in &groups {
        match sys::kill_group_id(pgid, Signal::KILL) {
            Ok(()) => killed.push(pgid),
            Err(e) => log::warn!("cannot kill process group {pgid} of job {}: {e}", run.ran.job_id),
        }
    }
    let is_query = Method::parse(&run.ran.method) == Some(Method::SyncQuery);
    let message = if !killed.is_empty() || unit_killed > 0 {
        log::warn!(
            "job {} (queue job {}): the previous agent died while it ran; killed its process group {killed:?} and \
             {unit_killed} process(es) of its cgroups {cgroups:?}",
            run.ran.job_id,
            run.ran.queue_job_id
        );
        KILLED_MESSAGE.to_string()
    } else if is_query {
        "The agent was restarted while it answered the query; it is not answered again".to_string()
    } else {
        log::warn!(
            "job {} (queue job {}): the previous agent died while it ran; the command is no longer running",
            run.ran.job_id,
            run.ran.queue_job_id
        );
        "The agent was restarted while the command ran; the command was no longer running (it had ended, \
         or never started), so its exit status and output are lost"
            .to_string()
    };
    let mut result = crate::failure(&run.ran.job_id, host_id, Code::AgentRestarted, message);
    // Attempt 1 reads the same absent or present; a ledger keeps only the number.
    result.attempt = Some(run.ran.attempt).filter(|&attempt| attempt != 1);
    Adopted { run: run.clone(), result }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ran;
    use std::os::unix::process::CommandExt as _;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let text = "4242 (we)ird name) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(text), Some(ProcStat { state: 'S', pgrp: 4242, start_ticks: 987654 }));
        assert_eq!(parse_stat("12 (x) S 1"), None);
        let own = read_stat(std::process::id() as i32).expect("own stat");
        assert_ne!(own.state, 'Z');
    }

    fn unfinished(run_id: &str) -> UnfinishedRun {
        UnfinishedRun {
            ran: Ran {
                job_id: "j".into(),
                host: "h".into(),
                attempt: 1,
                method: "async.bash".into(),
                expires_at: 0,
                ran_at: 0,
                run_id: run_id.into(),
                queue_job_id: 1,
                reply_tube: "r".into(),
            },
            started: None,
        }
    }

    #[test]
    fn only_the_runs_own_group_is_found_and_killed() {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .env(RUN_ID_ENV, &run_id)
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        let mut run = unfinished(&run_id);
        // Found by its marker before any `started` line.
        assert_eq!(find_groups(&run).into_iter().collect::<Vec<_>>(), [pid]);
        // Found by the recorded group; a wrong start time or another run is not ours.
        run.started = describe(&run_id, child.id());
        assert_eq!(find_groups(&run).into_iter().collect::<Vec<_>>(), [pid]);
        let mut other = unfinished("another-run");
        other.started = run.started.clone().map(|s| Started { start_ticks: s.start_ticks + 1, ..s });
        assert!(find_groups(&other).is_empty());
        let adopted = adopt(&run, "h", &Containment::none("test"));
        assert_eq!(adopted.result.message, KILLED_MESSAGE);
        assert_eq!(adopted.result.retcode, u32::from(Code::AgentRestarted.value()));
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        // Nothing left: the run is reported as no longer running.
        assert!(find_groups(&run).is_empty());
        assert!(adopt(&run, "h", &Containment::none("test")).result.message.contains("no longer running"));
    }
}
