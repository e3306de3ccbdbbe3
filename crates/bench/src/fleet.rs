//! `fleet`: registers this process's simulated hosts ([`crate::register`]), connects their
//! agents ([`crate::sim`]), then — unless `--serve-only` — measures: an idle window, the
//! latency rounds (one fan-out at a time) and the throughput phase (several in flight)
//! through [`crate::drive`], each process's CPU over the window and its peak RSS, and
//! emits one [`FleetRecord`]. Any refused envelope, unexpected queue reply, lost
//! connection or host that does not end `success` fails the run.

use crate::drive::{DriveConfig, Driver, Phase};
use crate::percentile::{percentile, sorted_f64};
use crate::procfs::{machine_busy_secs, proc_cpu_secs, proc_peak_rss_kb, proc_threads, proc_tree};
use crate::record::{emit, FleetRecord, ProcUse, ThreadUse};
use crate::register::{host_id, register_all};
use crate::sim::{Behaviour, Fleet};
use crate::{sys, FleetArgs};
use anyhow::{bail, Context, Result};
use polaris_ops_wire::wire::Secret;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Descriptors this process needs besides its agents' connections (HTTP, poll, stdio).
const SPARE_FILES: u64 = 64;
/// How often a `--serve-only` process looks at its loops.
const SERVE_CHECK: Duration = Duration::from_millis(500);

/// Runs `fleet`.
pub(crate) fn run_fleet(args: &FleetArgs) -> Result<()> {
    if args.hosts == 0 || args.first == 0 || args.first > args.hosts {
        bail!("--hosts must be at least 1 and --first within 1..={}", args.hosts);
    }
    if !(0.0..=1.0).contains(&args.failure_rate) {
        bail!("--failure-rate must be between 0 and 1");
    }
    let count = args.count.unwrap_or(args.hosts - args.first + 1);
    if args.first + count - 1 > args.hosts {
        bail!("--first {} --count {count} goes past --hosts {}", args.first, args.hosts);
    }
    let nofile = sys::raise_nofile();
    if count as u64 + SPARE_FILES > nofile {
        bail!(
            "{count} agent connections need more open files than this process may have ({nofile}, the hard \
             RLIMIT_NOFILE); simulate fewer hosts here (--count) and the rest in `fleet --serve-only` processes"
        );
    }
    let secret = Secret::load(args.secret_file.as_deref()).context("loading the shared secret")?;
    let behaviour = Behaviour {
        command: Duration::from_millis(args.command_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        failure_rate: args.failure_rate,
        output_bytes: args.output_bytes,
        reserve_timeout: args.reserve_timeout,
    };

    let started = Instant::now();
    let hosts = register_all(&args.dispatchers, args.first, count, &args.queue, args.register_threads)?;
    let register_s = started.elapsed().as_secs_f64();
    let queues: BTreeSet<&str> = hosts.iter().map(|h| h.queue.as_str()).collect();
    eprintln!(
        "fleet: registered hosts {}..{} in {register_s:.1}s ({:.0}/s) on {} queue(s): {}",
        host_id(args.first),
        host_id(args.first + count - 1),
        count as f64 / register_s.max(1e-9),
        queues.len(),
        queues.iter().copied().collect::<Vec<_>>().join(", ")
    );
    let started = Instant::now();
    let mut fleet = Fleet::start(&hosts, &secret, &behaviour, args.threads)?;
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("fleet: {count} agents connected in {connect_s:.1}s");
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{count}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.serve_only {
        loop {
            std::thread::sleep(SERVE_CHECK);
            healthy(&mut fleet)?;
        }
    }

    let mut procs: Vec<(String, u32)> = vec![("sim".to_string(), std::process::id())];
    procs.extend(args.procs.iter().cloned());
    let idle_s = args.idle_secs.max(0.0);
    let idle_before = cpu_of_all(&procs);
    std::thread::sleep(Duration::from_secs_f64(idle_s));
    let idle_cpu = cpu_delta(&idle_before, &cpu_of_all(&procs));
    healthy(&mut fleet)?;

    let all_hosts: Vec<String> = (1..=args.hosts).map(host_id).collect();
    let mut driver = Driver::new(DriveConfig {
        dispatchers: args.dispatchers.clone(),
        hosts: all_hosts,
        max_hosts_per_job: args.max_hosts_per_job,
        cmd: args.cmd.clone(),
        job_timeout: args.job_timeout,
        poll: Duration::from_millis(args.poll_ms.max(1)),
        deadline: Duration::from_secs(u64::from(args.job_timeout)),
    })?;
    let mut health = || healthy(&mut fleet);
    if args.warmup_rounds > 0 {
        driver.run(args.warmup_rounds, 1, false, &mut health).context("the warm-up rounds")?;
    }
    let cpu_before = cpu_of_all(&procs);
    let mut busy_before = machine_busy_secs();
    let latency = driver.run(args.rounds, 1, true, &mut health).context("the latency rounds")?;
    let mut cpu_after = cpu_of_all(&procs);
    let mut busy_after = machine_busy_secs();
    let mut window = ("latency", latency.elapsed, latency.jobs);
    let throughput = if args.throughput_fanouts > 0 {
        let before = cpu_of_all(&procs);
        busy_before = machine_busy_secs();
        let phase =
            driver.run(args.throughput_fanouts, args.in_flight, false, &mut health).context("the throughput phase")?;
        cpu_after = cpu_of_all(&procs);
        busy_after = machine_busy_secs();
        window = ("throughput", phase.elapsed, phase.jobs);
        Some((phase, before))
    } else {
        None
    };
    let cpu_start = throughput.as_ref().map_or(&cpu_before, |(_, before)| before);
    let window_cpu = cpu_delta(cpu_start, &cpu_after);
    let window_threads: Vec<Vec<ThreadUse>> =
        cpu_start.iter().zip(&cpu_after).map(|(b, a)| busiest_threads(b, a, window.1.as_secs_f64())).collect();
    let counters = fleet.counters.clone();
    fleet.stop()?;

    let window_s = window.1.as_secs_f64().max(1e-9);
    let host_results = (window.2 as f64 / driver.jobs_per_fanout() as f64) * args.hosts as f64;
    let procs = procs
        .iter()
        .zip(window_cpu.iter().zip(&idle_cpu).zip(window_threads))
        .map(|((name, pid), ((cpu, idle), threads))| {
            let tree = proc_tree(*pid);
            ProcUse {
                name: name.clone(),
                pid: *pid,
                processes: tree.len(),
                cpu_s: *cpu,
                cores: cpu.map(|c| c / window_s),
                us_per_host: cpu.filter(|_| host_results > 0.0).map(|c| c * 1e6 / host_results),
                idle_cores: idle.map(|c| c / idle_s.max(1e-9)),
                peak_rss_kb: proc_peak_rss_kb(*pid).map(|_| tree.iter().filter_map(|&p| proc_peak_rss_kb(p)).sum()),
                threads,
            }
        })
        .collect();
    let (p50, p99, max) = exact_percentiles(&latency);
    let observed = sorted_f64(latency.finished.iter().map(|f| f.observed.as_secs_f64()).collect());
    let record = FleetRecord {
        config: args.config.clone(),
        hosts: args.hosts,
        simulated_here: count,
        shards: args.shards.unwrap_or(queues.len()),
        queues_seen: queues.len(),
        dispatchers: args.dispatchers.len(),
        db: args.db.clone(),
        command_ms: args.command_ms,
        jitter_ms: args.jitter_ms,
        failure_rate: args.failure_rate,
        output_bytes: args.output_bytes,
        reserve_timeout: args.reserve_timeout,
        register_s,
        connect_s,
        jobs_per_fanout: driver.jobs_per_fanout(),
        rounds: latency.finished.len(),
        p50_s: p50,
        p99_s: p99,
        max_s: max,
        observed_p50_s: percentile(&observed, 0.50),
        observed_p99_s: percentile(&observed, 0.99),
        in_flight: args.in_flight,
        throughput_fanouts: args.throughput_fanouts,
        throughput_s: throughput.as_ref().map(|(p, _)| p.elapsed.as_secs_f64()),
        jobs_per_s: throughput.as_ref().map(|(p, _)| p.jobs as f64 / p.elapsed.as_secs_f64().max(1e-9)),
        host_results_per_s: throughput
            .as_ref()
            .map(|(p, _)| p.finished.len() as f64 * args.hosts as f64 / p.elapsed.as_secs_f64().max(1e-9)),
        cpu_window: window.0.to_string(),
        window_s,
        idle_s,
        procs,
        machine_busy_cores: busy_before.zip(busy_after).map(|(b, a)| (a - b).max(0.0) / window_s),
        answered: counters.answered.load(Ordering::Relaxed),
        nonzero: counters.nonzero.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    emit(&record, args.out.as_ref())
}

/// Fails if a loop ended or the agents saw anything unexpected.
fn healthy(fleet: &mut Fleet) -> Result<()> {
    fleet.check()?;
    let errors = fleet.counters.errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!(
            "the simulated agents saw {errors} error(s), the first: {}",
            fleet.counters.first_error().unwrap_or_default()
        );
    }
    Ok(())
}

/// p50, p99 and max of the exact round times, seconds.
fn exact_percentiles(phase: &Phase) -> (Option<f64>, Option<f64>, Option<f64>) {
    let exact = sorted_f64(phase.finished.iter().filter_map(|f| f.exact).map(|d| d.as_secs_f64()).collect());
    (percentile(&exact, 0.50), percentile(&exact, 0.99), exact.last().copied())
}

/// Threads listed per process in the result.
const THREADS_LISTED: usize = 3;

/// The CPU of one measured process's tree at one moment.
struct Snapshot {
    /// CPU seconds of the tree (`None`: the process is gone).
    total: Option<f64>,
    /// CPU seconds by (process, thread), with the thread's name.
    threads: HashMap<(u32, u32), (String, f64)>,
}

/// Each process's [`Snapshot`], now. A child that ends between two snapshots takes its
/// CPU time with it.
fn cpu_of_all(procs: &[(String, u32)]) -> Vec<Snapshot> {
    procs
        .iter()
        .map(|(_, pid)| {
            let mut threads = HashMap::new();
            if proc_cpu_secs(*pid).is_none() {
                return Snapshot { total: None, threads };
            }
            let tree = proc_tree(*pid);
            for &p in &tree {
                threads.extend(proc_threads(p).into_iter().map(|(tid, name, secs)| ((p, tid), (name, secs))));
            }
            Snapshot { total: Some(tree.iter().filter_map(|&p| proc_cpu_secs(p)).sum()), threads }
        })
        .collect()
}

/// CPU seconds of each process between two snapshots.
fn cpu_delta(before: &[Snapshot], after: &[Snapshot]) -> Vec<Option<f64>> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| match (b.total, a.total) {
            (Some(b), Some(a)) => Some((a - b).max(0.0)),
            _ => None,
        })
        .collect()
}

/// The busiest threads between two snapshots of one process, over `secs` seconds.
fn busiest_threads(before: &Snapshot, after: &Snapshot, secs: f64) -> Vec<ThreadUse> {
    let mut threads: Vec<ThreadUse> = after
        .threads
        .iter()
        .map(|(key, (name, now))| {
            let then = before.threads.get(key).map_or(0.0, |(_, then)| *then);
            ThreadUse { name: name.clone(), cores: (now - then).max(0.0) / secs.max(1e-9) }
        })
        .collect();
    threads.sort_by(|a, b| b.cores.partial_cmp(&a.cores).unwrap_or(std::cmp::Ordering::Equal));
    threads.truncate(THREADS_LISTED);
    threads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_threads_of_a_window() {
        let named = |entries: &[((u32, u32), &str, f64)]| Snapshot {
            total: Some(entries.iter().map(|e| e.2).sum()),
            threads: entries.iter().map(|&(key, name, secs)| (key, (name.to_string(), secs))).collect(),
        };
        let before = named(&[((1, 1), "main", 1.0), ((1, 2), "results", 2.0), ((1, 3), "enqueuer", 0.5)]);
        let after = named(&[
            ((1, 1), "main", 1.1),
            ((1, 2), "results", 3.5),
            ((1, 3), "enqueuer", 0.5),
            ((1, 4), "new", 0.3),
            ((2, 1), "child", 0.2),
        ]);
        let busiest = busiest_threads(&before, &after, 2.0);
        let names: Vec<&str> = busiest.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["results", "new", "child"]);
        assert!((busiest[0].cores - 0.75).abs() < 1e-9);
        let delta = cpu_delta(&[before], &[after]);
        assert!(delta[0].is_some_and(|d| (d - 2.1).abs() < 1e-9));
        let gone = Snapshot { total: None, threads: HashMap::new() };
        assert_eq!(cpu_delta(&[gone], &[named(&[])]), vec![None]);
    }
}
