//! `report`: result lines (JSON [`Record`]s) in, a Markdown table of medians, ratios and
//! targets out.

use crate::record::Record;
use crate::ReportArgs;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// Lower or higher is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    /// Context, not a score (e.g. how busy a process was).
    Info,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{:.0}", v)
    } else if a >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

type Metric = (&'static str, &'static str, Better, fn(&Record) -> Option<f64>);

const METRICS: &[Metric] = &[
    ("throughput", "jobs/s", Better::Higher, |r| {
        (r.mode != "restart" && r.mode != "fill" && r.jobs > 0).then_some(r.jobs_per_s)
    }),
    ("server CPU per job", "µs", Better::Lower, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            r.server_cpu_us_per_job
        }
    }),
    ("server CPU use", "cores", Better::Info, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            r.server_cpu_s.map(|c| c / r.secs)
        }
    }),
    ("load generator CPU use", "cores", Better::Info, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            Some(r.client_cpu_s / r.secs)
        }
    }),
    ("p50 put→reserve", "µs", Better::Lower, |r| r.p50_us),
    ("p99 put→reserve", "µs", Better::Lower, |r| r.p99_us),
    ("p99.9 put→reserve", "µs", Better::Lower, |r| r.p999_us),
    ("longest loop turn", "µs", Better::Info, |r| r.longest_turn_us),
    ("RSS", "MiB", Better::Lower, |r| if r.mode == "fill" { r.rss_kb.map(|k| k as f64 / 1024.0) } else { None }),
    ("fill throughput", "jobs/s", Better::Higher, |r| (r.mode == "fill").then_some(r.jobs_per_s)),
    ("restart time", "s", Better::Lower, |r| r.restart_s),
    ("RSS after restart", "MiB", Better::Lower, |r| {
        if r.mode == "restart" {
            r.rss_kb.map(|k| k as f64 / 1024.0)
        } else {
            None
        }
    }),
];

/// The targets of the issue: (scenario, config, metric, goal ratio, description).
const TARGETS: &[(&str, &str, &str, f64, &str)] = &[
    ("pipeline", "mem", "throughput", 1.5, "in-memory concurrent throughput ≥ 1.5×"),
    ("pipeline", "mem", "server CPU per job", 0.6, "server CPU time per operation ≤ 0.6× (concurrent, in memory)"),
    ("sync", "mem", "throughput", 1.5, "the same without pipelining (depth 1): in-memory concurrent throughput ≥ 1.5×"),
    (
        "sync",
        "mem",
        "server CPU per job",
        0.6,
        "the same without pipelining (depth 1): server CPU per operation ≤ 0.6×",
    ),
    ("pipeline", "durable", "throughput", 2.5, "durable, default fsync: concurrent throughput ≥ 2.5×"),
    (
        "pipeline",
        "fsync-always",
        "throughput",
        10.0,
        "durable, fsync before every ack (-f 0): concurrent throughput ≥ 10×",
    ),
    ("latency", "mem", "p99 put→reserve", 0.75, "p99 put-to-reserve latency ≤ 0.75× (in memory)"),
    (
        "sync",
        "fsync-always",
        "throughput",
        15.0,
        "unpipelined clients (depth 1), fsync before every ack (-f 0): throughput ≥ 15×",
    ),
    ("latency", "durable", "p99 put→reserve", 1.0, "durable, default fsync: p99 put-to-reserve latency ≤ 1.0×"),
    ("latency", "durable", "p99.9 put→reserve", 1.0, "durable, default fsync: p99.9 put-to-reserve latency ≤ 1.0×"),
    ("latency", "fsync-always", "p99 put→reserve", 1.0, "-f 0: p99 put-to-reserve latency ≤ 1.0×"),
    ("latency", "fsync-always", "p99.9 put→reserve", 1.0, "-f 0: p99.9 put-to-reserve latency ≤ 1.0×"),
    ("fill", "mem", "RSS", 0.8, "RSS with 1,000,000 jobs of 100 bytes ≤ 0.8× (in memory)"),
];

/// The records of a results file, one JSON object a line (blank lines skipped); an error
/// names the file and line.
pub(crate) fn read_jsonl<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), n + 1))?);
    }
    Ok(records)
}

/// Prints a report, and writes it to `path` too when one is given.
pub(crate) fn emit(md: &str, path: Option<&std::path::Path>) -> Result<()> {
    print!("{md}");
    if let Some(path) = path {
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs `report`: reads result lines, prints (and writes) the Markdown tables.
pub(crate) fn report(args: &ReportArgs) -> Result<()> {
    let records: Vec<Record> = read_jsonl(&args.input)?;
    // Keep the scenario order of the file.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        let key = (r.scenario.clone(), r.config.clone());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    let (base, cand) = (&args.baseline, &args.candidate);
    let mut md = String::new();
    md.push_str(&format!(
        "| scenario | config | metric | {base} | {cand} | ratio {cand}/{base} | better |\n|---|---|---|---:|---:|---:|---|\n"
    ));
    // (scenario, config, metric) -> (base, cand, ratio)
    let mut ratios: BTreeMap<(String, String, String), (f64, f64, f64)> = BTreeMap::new();
    let mut errors = 0;
    for key in &order {
        let rs = &groups[key];
        errors += rs.iter().map(|r| r.errors).sum::<u64>();
        for &(name, unit, better, get) in METRICS {
            let of = |server: &str| median(rs.iter().filter(|r| r.server == server).filter_map(|r| get(r)).collect());
            let (b, c) = (of(base), of(cand));
            if b.is_none() && c.is_none() {
                continue;
            }
            let ratio = match (b, c) {
                (Some(b), Some(c)) if b > 0.0 && better != Better::Info => Some(c / b),
                _ => None,
            };
            if let (Some(b), Some(c), Some(r)) = (b, c, ratio) {
                ratios.insert((key.0.clone(), key.1.clone(), name.to_string()), (b, c, r));
            }
            let show = |v: Option<f64>| v.map_or("–".to_string(), fmt_num);
            md.push_str(&format!(
                "| {} | {} | {name} ({unit}) | {} | {} | {} | {} |\n",
                key.0,
                key.1,
                show(b),
                show(c),
                ratio.map_or("–".into(), |r| format!("{r:.2}×")),
                match better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                    Better::Info => "(context)",
                }
            ));
        }
    }
    md.push_str("\n| target | goal | measured | met |\n|---|---:|---:|---|\n");
    for &(scenario, config, metric, goal, desc) in TARGETS {
        let got = ratios.get(&(scenario.to_string(), config.to_string(), metric.to_string()));
        let better = METRICS.iter().find(|m| m.0 == metric).map_or(Better::Higher, |m| m.2);
        let (measured, met) = match got {
            Some(&(_, _, r)) => (format!("{r:.2}×"), if better == Better::Higher { r >= goal } else { r <= goal }),
            None => ("not measured".into(), false),
        };
        md.push_str(&format!("| {desc} | {goal}× | {measured} | {} |\n", if met { "yes" } else { "**no**" }));
    }
    let restart = records.iter().filter(|r| r.server == *cand).filter_map(|r| r.restart_s).collect::<Vec<_>>();
    match median(restart) {
        Some(s) => md.push_str(&format!(
            "| restart of {cand} with 1,000,000 jobs on disk ≤ 3 s | 3 s | {s:.2} s | {} |\n",
            if s <= 3.0 { "yes" } else { "**no**" }
        )),
        None => md.push_str(&format!(
            "| restart of {cand} with 1,000,000 jobs on disk ≤ 3 s | 3 s | not measured | **no** |\n"
        )),
    }
    if errors > 0 {
        md.push_str(&format!("\n**{errors} unexpected replies were recorded; see the raw results.**\n"));
    }
    emit(&md, args.md.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
