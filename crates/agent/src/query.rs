//! `sync.query`: host facts read from `/proc` (and utmp for logged-in users).
//!
//! The parsers take file contents, not paths, so they are tested on fixed text.

use serde::Serialize;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The facts a `sync.query` answers with (as JSON text in the result's `data`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostFacts {
    /// The kernel's hostname.
    pub hostname: String,
    /// Local IPv4 and IPv6 addresses, loopback included.
    pub addresses: Vec<String>,
    /// Online CPUs.
    pub cpu_count: usize,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    /// Memory in KiB.
    pub memory: Memory,
    /// Seconds since boot.
    pub uptime_secs: f64,
    /// Names of logged-in users (one entry per session).
    pub users: Vec<String>,
}

/// Memory figures from `/proc/meminfo`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Memory {
    /// MemTotal.
    pub total_kib: u64,
    /// MemAvailable.
    pub available_kib: u64,
    /// MemFree.
    pub free_kib: u64,
}

/// Why facts could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct QueryError {
    /// The file.
    pub path: &'static str,
    /// The I/O error.
    pub source: std::io::Error,
}

fn read(path: &'static str) -> Result<String, QueryError> {
    std::fs::read_to_string(path).map_err(|source| QueryError { path, source })
}

/// Reads the facts of this host.
pub fn collect() -> Result<HostFacts, QueryError> {
    let mut addresses = parse_fib_trie_local_ipv4(&read("/proc/net/fib_trie").unwrap_or_default());
    // No IPv6 on this host is not an error.
    addresses.extend(parse_if_inet6(&std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default()));
    Ok(HostFacts {
        hostname: read("/proc/sys/kernel/hostname")?.trim().to_string(),
        addresses,
        cpu_count: parse_cpu_count(&read("/proc/stat")?),
        load: parse_loadavg(&read("/proc/loadavg")?),
        memory: parse_meminfo(&read("/proc/meminfo")?),
        uptime_secs: read("/proc/uptime")?.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0),
        users: crate::sys::logged_in_users(),
    })
}

/// Counts `cpuN` lines of `/proc/stat` (online CPUs).
pub fn parse_cpu_count(stat: &str) -> usize {
    stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count()
}

/// The three load averages of `/proc/loadavg`.
pub fn parse_loadavg(loadavg: &str) -> [f64; 3] {
    let mut load = [0.0; 3];
    for (slot, value) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = value.parse().unwrap_or(0.0);
    }
    load
}

/// MemTotal, MemAvailable and MemFree of `/proc/meminfo`.
pub fn parse_meminfo(meminfo: &str) -> Memory {
    let mut memory = Memory::default();
    for line in meminfo.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else { continue };
        let Ok(value) = value.parse() else { continue };
        match key {
            "MemTotal:" => memory.total_kib = value,
            "MemAvailable:" => memory.available_kib = value,
            "MemFree:" => memory.free_kib = value,
            _ => {}
        }
    }
    memory
}

/// Local IPv4 addresses: in `/proc/net/fib_trie` each `|-- ADDR` leaf followed by a
/// `/32 host LOCAL` line is an address of this host.
pub fn parse_fib_trie_local_ipv4(fib_trie: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut last_leaf: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let trimmed = line.trim();
        if let Some(addr) = trimmed.strip_prefix("|-- ") {
            last_leaf = addr.trim().parse().ok();
        } else if trimmed.starts_with("/32 host LOCAL") {
            if let Some(addr) = last_leaf {
                let addr = addr.to_string();
                if !found.contains(&addr) {
                    found.push(addr);
                }
            }
        }
    }
    found
}

/// IPv6 addresses of `/proc/net/if_inet6` (32 hex digits per line).
pub fn parse_if_inet6(if_inet6: &str) -> Vec<String> {
    if_inet6
        .lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            let value = u128::from_str_radix(hex, 16).ok()?;
            (hex.len() == 32).then(|| Ipv6Addr::from(value).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        assert_eq!(parse_cpu_count("cpu  1 2 3\ncpu0 1 2\ncpu1 3 4\nintr 5\n"), 2);
        assert_eq!(parse_loadavg("0.52 0.58 0.59 2/311 12345\n"), [0.52, 0.58, 0.59]);
        let mem = parse_meminfo("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable: 2000 kB\n");
        assert_eq!(mem, Memory { total_kib: 24_000_000, available_kib: 2000, free_kib: 100 });
        assert_eq!(parse_if_inet6("00000000000000000000000000000001 01 80 10 80       lo\n"), vec!["::1".to_string()]);
    }

    #[test]
    fn fib_trie_local_addresses_are_found() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                   Local:\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\n\
                        |-- 127.255.255.255\n        /32 link BROADCAST\n     |-- 10.1.2.3\n        /32 host LOCAL\n\
                        |-- 127.0.0.1\n        /32 host LOCAL\n";
        assert_eq!(parse_fib_trie_local_ipv4(fib), vec!["127.0.0.1", "10.1.2.3"]);
    }

    #[test]
    fn facts_of_this_machine_are_plausible() {
        let facts = collect().expect("/proc readable");
        assert!(!facts.hostname.is_empty());
        assert!(facts.cpu_count >= 1);
        assert!(facts.memory.total_kib > 0);
        assert!(facts.uptime_secs > 0.0);
    }
}
