//! The facts an agent sends when it registers (`POST /v1/hosts` `"facts"`): what the host
//! is, rather than how it is doing (that is `sync.query`). Read afresh for every
//! registration, best effort: a file that cannot be read leaves its fact out or empty, it
//! never stops a registration.

use crate::query;
use serde::Serialize;
use serde_json::Value;

/// Most addresses reported (a host with many containers can have hundreds of veths).
pub const MAX_ADDRESSES: usize = 256;

/// The operating system, from `/etc/os-release`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OsRelease {
    /// `ID`, e.g. `debian`.
    pub id: String,
    /// `VERSION_ID`, e.g. `12`.
    pub version_id: String,
    /// `PRETTY_NAME`, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub name: String,
}

/// Parses `os-release` text (`KEY=value` lines, values optionally quoted).
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut os = OsRelease::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value)
            .replace("\\\"", "\"");
        match key.trim() {
            "ID" => os.id = value,
            "VERSION_ID" => os.version_id = value,
            "PRETTY_NAME" => os.name = value,
            _ => {}
        }
    }
    os
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The facts of this host: `hostname`, `addresses`, `os`, `kernel`, `arch`, `cpu_count`
/// and `memory_kib` (total).
pub fn registration_facts() -> Value {
    let mut addresses = query::parse_fib_trie_local_ipv4(&read("/proc/net/fib_trie"));
    addresses.extend(query::parse_if_inet6(&read("/proc/net/if_inet6")));
    addresses.truncate(MAX_ADDRESSES);
    let os_release = match std::fs::read_to_string("/etc/os-release") {
        Ok(text) => text,
        Err(_) => read("/usr/lib/os-release"),
    };
    serde_json::json!({
        "hostname": read("/proc/sys/kernel/hostname").trim(),
        "addresses": addresses,
        "os": parse_os_release(&os_release),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "arch": std::env::consts::ARCH,
        "cpu_count": query::parse_cpu_count(&read("/proc/stat")),
        "memory_kib": query::parse_meminfo(&read("/proc/meminfo")).total_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n# comment\n",
        );
        assert_eq!(
            os,
            OsRelease { id: "debian".into(), version_id: "12".into(), name: "Debian GNU/Linux 12 (bookworm)".into() }
        );
        assert_eq!(parse_os_release(""), OsRelease::default());
    }

    #[test]
    fn facts_of_this_machine_are_plausible() {
        let facts = registration_facts();
        assert!(facts["cpu_count"].as_u64().is_some_and(|n| n >= 1), "{facts}");
        assert!(facts["memory_kib"].as_u64().is_some_and(|n| n > 0), "{facts}");
        assert!(facts["addresses"].as_array().is_some_and(|a| a.len() <= MAX_ADDRESSES));
        assert!(serde_json::to_string(&facts).expect("json").len() < 64 * 1024);
    }
}
