//! `fleet-report`: `fleet` result lines ([`FleetRecord`]s) in, a Markdown table out: per
//! run the fan-out times, throughput, and each kind of process's CPU (cores kept busy)
//! and peak RSS, processes of one kind (`polarisd-1`, `polarisd-2`) summed, busiest first.

use crate::record::{FleetRecord, ProcUse};
use crate::FleetReportArgs;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// What one kind of process used: instances, cores, CPU µs per host result, idle cores,
/// peak RSS KiB.
#[derive(Default, Debug, Clone, PartialEq)]
struct Kind {
    instances: usize,
    cores: f64,
    us_per_host: f64,
    idle_cores: f64,
    peak_rss_kb: u64,
}

/// The kind of a process label: `polarisd-2` → `polarisd`, `sim` → `sim`.
fn kind_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((kind, n)) if !kind.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => name,
    }
}

/// Processes summed by kind, busiest kind first.
fn by_kind(procs: &[ProcUse]) -> Vec<(String, Kind)> {
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    for p in procs {
        let k = kinds.entry(kind_of(&p.name).to_string()).or_default();
        k.instances += 1;
        k.cores += p.cores.unwrap_or(0.0);
        k.us_per_host += p.us_per_host.unwrap_or(0.0);
        k.idle_cores += p.idle_cores.unwrap_or(0.0);
        k.peak_rss_kb += p.peak_rss_kb.unwrap_or(0);
    }
    let mut kinds: Vec<(String, Kind)> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cores.partial_cmp(&a.1.cores).unwrap_or(std::cmp::Ordering::Equal));
    kinds
}

fn label(name: &str, k: &Kind) -> String {
    if k.instances > 1 {
        format!("{name}×{}", k.instances)
    } else {
        name.to_string()
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("–".into(), |s| format!("{s:.2}"))
}

fn whole(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.0}"))
}

/// Threads listed in the busiest-threads column.
const THREADS_SHOWN: usize = 4;

/// The busiest threads of the run, `process/thread cores`, busiest first.
fn busiest_threads(procs: &[ProcUse]) -> String {
    let mut threads: Vec<(f64, String)> = procs
        .iter()
        .flat_map(|p| p.threads.iter().map(move |t| (t.cores, format!("{}/{} {:.2}", p.name, t.name, t.cores))))
        .collect();
    threads.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    threads.into_iter().take(THREADS_SHOWN).map(|(_, t)| t).collect::<Vec<_>>().join(", ")
}

/// One table row.
fn row(r: &FleetRecord) -> String {
    let kinds = by_kind(&r.procs);
    let join = |f: &dyn Fn(&str, &Kind) -> String| kinds.iter().map(|(n, k)| f(n, k)).collect::<Vec<_>>().join(", ");
    let cpu = join(&|n, k| format!("{} {:.2} ({:.0} µs)", label(n, k), k.cores, k.us_per_host));
    let idle = join(&|n, k| format!("{} {:.2}", label(n, k), k.idle_cores));
    let rss = join(&|n, k| format!("{} {:.0}", label(n, k), k.peak_rss_kb as f64 / 1024.0));
    let total: f64 = kinds.iter().map(|(_, k)| k.cores).sum();
    let other = r.machine_busy_cores.map_or(String::new(), |busy| format!(" (+{:.2} other)", (busy - total).max(0.0)));
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} of {}{} | {} | {} | {} | {:.0}/s |",
        r.hosts,
        r.shards,
        r.dispatchers,
        if r.db.is_empty() { "?" } else { &r.db },
        r.rounds,
        secs(r.p50_s),
        secs(r.p99_s),
        r.jobs_per_s.map_or("–".into(), |j| format!("{j:.2}")),
        whole(r.host_results_per_s),
        if r.throughput_fanouts > 0 { format!("{}/{}", r.throughput_fanouts, r.in_flight) } else { "–".into() },
        cpu,
        total,
        r.cores,
        other,
        busiest_threads(&r.procs),
        idle,
        rss,
        r.simulated_here as f64 / r.register_s.max(1e-9),
    )
}

/// The Markdown of `records`: a parameters line (from the first) and the table.
fn render(records: &[FleetRecord]) -> Result<String> {
    let Some(first) = records.first() else { bail!("no fleet result lines") };
    let mut md = format!(
        "Parameters: command {} ms (+ up to {} ms jitter), failure rate {}, output {} B, agents' reserve-with-timeout {} s; \
         p50/p99 over the timed rounds (one fan-out at a time; with fewer than 100 rounds p99 is the slowest); \
         jobs/s and host results/s with several fan-outs in flight (fan-outs/in flight); a fan-out is a job per \
         --max-hosts-per-job hosts (10,000); CPU in cores kept busy over the throughput window (else the rounds') \
         (and µs per host result), \"other\": the rest of the machine's busy CPU in that window \
         (load outside the run on a shared machine); machine: {} CPUs.\n\n",
        first.command_ms,
        first.jitter_ms,
        first.failure_rate,
        first.output_bytes,
        first.reserve_timeout,
        first.cores,
    );
    md.push_str(
        "| hosts | shards | dispatchers | db | rounds | all answered p50 s | p99 s | jobs/s | host results/s | fan-outs/in flight | CPU cores by process (µs/host) | total CPU | busiest threads | idle fleet cores | peak RSS MiB | registration |\n",
    );
    md.push_str("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---:|\n");
    for r in records {
        md.push_str(&row(r));
        md.push('\n');
    }
    Ok(md)
}

/// Runs `fleet-report`.
pub(crate) fn fleet_report(args: &FleetReportArgs) -> Result<()> {
    let records: Vec<FleetRecord> = crate::report::read_jsonl(&args.input)?;
    crate::report::emit(&render(&records)?, args.md.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ThreadUse;

    fn proc_use(name: &str, cores: f64, rss_kb: u64) -> ProcUse {
        ProcUse {
            name: name.into(),
            pid: 1,
            processes: 1,
            cpu_s: Some(cores),
            cores: Some(cores),
            us_per_host: Some(10.0),
            idle_cores: Some(0.01),
            peak_rss_kb: Some(rss_kb),
            threads: vec![ThreadUse { name: "main".into(), cores }],
        }
    }

    #[test]
    fn kinds_are_summed_busiest_first() {
        assert_eq!(kind_of("polarisd-2"), "polarisd");
        assert_eq!(kind_of("sim"), "sim");
        assert_eq!(kind_of("pg-x"), "pg-x");
        assert_eq!(kind_of("-3"), "-3");
        let procs =
            [proc_use("polarisd-1", 0.25, 1024), proc_use("dispatch-1", 0.9, 2048), proc_use("polarisd-2", 0.25, 1024)];
        let kinds = by_kind(&procs);
        assert_eq!(kinds[0].0, "dispatch");
        assert_eq!((kinds[1].0.as_str(), kinds[1].1.instances, kinds[1].1.peak_rss_kb), ("polarisd", 2, 2048));
        assert!((kinds[1].1.cores - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_table_row_per_record() {
        let record = FleetRecord {
            hosts: 1000,
            simulated_here: 1000,
            shards: 1,
            dispatchers: 1,
            db: "sqlite".into(),
            register_s: 2.0,
            p50_s: Some(0.5),
            p99_s: Some(0.75),
            jobs_per_s: Some(1.5),
            host_results_per_s: Some(1500.0),
            rounds: 5,
            throughput_fanouts: 6,
            in_flight: 3,
            procs: vec![proc_use("dispatch-1", 0.9, 2048), proc_use("sim", 0.1, 4096)],
            cores: 2,
            machine_busy_cores: Some(1.25),
            ..FleetRecord::default()
        };
        let md = render(&[record.clone(), record]).expect("renders");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| 1000 ")).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].contains("| sqlite | 5 | 0.50 | 0.75 | 1.50 | 1500 | 6/3 |"), "{}", rows[0]);
        assert!(rows[0].contains("dispatch 0.90 (10 µs), sim 0.10"), "{}", rows[0]);
        assert!(rows[0].contains("| 1.00 of 2 (+0.25 other) | dispatch-1/main 0.90, sim/main 0.10 |"), "{}", rows[0]);
        assert!(rows[0].contains("500/s"), "{}", rows[0]);
        assert!(render(&[]).is_err());
    }
}
