//! `restart`: spawn a server, time until it answers `stats`, check how many jobs it holds.

use crate::blocking::ping;
use crate::procfs::{proc_cpu_secs, proc_rss_kb};
use crate::record::{emit, Record};
use crate::{sys, RestartArgs};
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `restart`: spawns the server, times it until it answers, checks its job count.
pub(crate) fn run_restart(args: RestartArgs) -> Result<()> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).stdin(Stdio::null()).stdout(Stdio::null());
    sys::die_with_parent(&mut cmd);
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {:?}", args.command))?;
    let pid = child.id();
    let answered = ping(&args.addr, timeout);
    let restart_s = t0.elapsed().as_secs_f64();
    let stop = |child: &mut std::process::Child| {
        // A child already reaped (by the `try_wait` below) has given its pid back: signal
        // only one that is still ours.
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sys::terminate(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let stats = match answered {
        Ok(stats) => stats,
        Err(e) => {
            let status = child.try_wait().ok().flatten();
            stop(&mut child);
            return Err(e.context(format!("server exit status: {status:?}")));
        }
    };
    let cpu = proc_cpu_secs(pid);
    let rss = proc_rss_kb(pid);
    stop(&mut child);
    let jobs: u64 = ["current-jobs-ready", "current-jobs-delayed", "current-jobs-buried", "current-jobs-reserved"]
        .iter()
        .filter_map(|k| stats.get_u64(k))
        .sum();
    let rec = Record {
        scenario: args.scenario.clone(),
        config: args.config.clone(),
        server: args.server.clone(),
        mode: "restart".into(),
        jobs,
        secs: restart_s,
        restart_s: Some(restart_s),
        server_cpu_s: cpu,
        rss_kb: rss,
        ..Record::default()
    };
    emit(&rec, args.out.as_ref())?;
    if let Some(want) = args.expect_jobs {
        if jobs != want {
            bail!("restarted server holds {jobs} jobs, expected {want}");
        }
    }
    Ok(())
}
