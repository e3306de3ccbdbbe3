//! What `/proc` says about a process (`--pid`, the fleet's `--proc`): its CPU time, its
//! RSS and peak RSS, and the processes it started (a PostgreSQL server's backends).

use crate::sys;

/// CPU seconds the process has used: the sum of its threads' run time from
/// `schedstat` (nanoseconds), or utime+stime from `stat` (clock ticks).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut total: u64 = 0;
        let mut any = false;
        for entry in dir.flatten() {
            let path = entry.path().join("schedstat");
            if let Some(ns) =
                std::fs::read_to_string(path).ok().and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
        if any && total > 0 {
            return Some(total as f64 / 1e9);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat)?;
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = sys::clock_ticks_per_second().max(1) as f64;
    Some((utime + stime) as f64 / hz)
}

/// Each thread of the process: its id, its name (`comm`) and the CPU seconds it has run
/// (`schedstat`).
pub fn proc_threads(pid: u32) -> Vec<(u32, String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|entry| {
            let tid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let ns: u64 = std::fs::read_to_string(entry.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?.trim_end().to_string();
            Some((tid, name, ns as f64 / 1e9))
        })
        .collect()
}

/// CPU seconds the whole machine has been busy (every CPU's user, nice, system, irq,
/// softirq and steal time in `/proc/stat`), so far.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = busy_ticks(stat.lines().next()?)?;
    Some(ticks as f64 / sys::clock_ticks_per_second().max(1) as f64)
}

/// The busy ticks of `/proc/stat`'s `cpu` line: all but idle and iowait (guest time is
/// already in user time).
fn busy_ticks(cpu_line: &str) -> Option<u64> {
    let mut fields = cpu_line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let n: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = n[..] else { return None };
    Some(user + nice + system + irq + softirq + steal)
}

/// The fields of a `/proc/PID/stat` line after the command name (which may hold spaces
/// and parentheses, so it is skipped up to its last `)`): the state first.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

/// A `kB` figure from `/proc/PID/status` (`VmRSS`, `VmHWM`, ...).
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kb(&status, key)
}

fn status_field_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The process's resident set size in KiB (`VmRSS`).
pub fn proc_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS")
}

/// The process's peak resident set size in KiB (`VmHWM`).
pub fn proc_peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM")
}

/// `pid` and every live process below it (children, their children, ...), from the
/// parent ids in `/proc/*/stat`.
pub fn proc_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // Field 4 (ppid) is fields[1].
            if let Some(ppid) = stat_fields(&stat).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((child, ppid));
            }
        }
    }
    descendants(pid, &parents)
}

/// `root` and everything below it in the `(child, parent)` pairs.
fn descendants(root: u32, parents: &[(u32, u32)]) -> Vec<u32> {
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(parents.iter().filter(|&&(child, p)| p == parent && child != root).map(|&(child, _)| child));
        next += 1;
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_tree() {
        let status = "Name:\tpostgres\nVmHWMx:\t1 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_field_kb(status, "VmHWM"), Some(204_800));
        assert_eq!(status_field_kb(status, "VmRSS"), Some(102_400));
        assert_eq!(status_field_kb(status, "VmSwap"), None);
        assert_eq!(stat_fields("12 (a b) c) S 1 12").map(|f| f[1].to_string()), Some("1".into()));
        let parents = [(2, 1), (3, 2), (4, 9), (5, 3), (1, 0)];
        assert_eq!(descendants(1, &parents), vec![1, 2, 3, 5]);
        assert_eq!(descendants(4, &parents), vec![4]);
        assert_eq!(busy_ticks("cpu  10 1 5 100 7 2 3 4 9 0"), Some(25));
        assert_eq!(busy_ticks("cpu0 10 1 5 100 7 2 3 4"), None);
        assert_eq!(busy_ticks("cpu  10 1"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(proc_cpu_secs(me).is_some());
        assert!(proc_peak_rss_kb(me).unwrap_or(0) >= proc_rss_kb(me).unwrap_or(0).min(1));
        assert_eq!(proc_tree(me).first(), Some(&me));
        assert!(proc_threads(me).iter().any(|(tid, _, _)| *tid == me));
        assert!(machine_busy_secs().is_some());
    }
}
