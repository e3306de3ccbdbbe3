//! The agent's configuration file (`--config FILE`, TOML): what the integrity and log
//! methods may do on this host. Nothing in a job can widen it. Unknown keys are errors
//! naming them; the file is read again on SIGHUP, and a bad new one leaves the old
//! configuration in force.

use crate::integrity::{IntegritySettings, BASELINE_FILE, DEFAULT_REPORT_MAX_ENTRIES};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Most hashing threads `[integrity] hash_threads` may ask for.
pub const MAX_HASH_THREADS: usize = 256;
/// `log.tail` lines when the job asks for none.
pub const DEFAULT_TAIL_LINES: u64 = 100;
/// Most lines `log.tail` returns when the config does not say.
pub const DEFAULT_MAX_LINES: u64 = 10_000;
/// Most bytes `log.tail` and `log.grep` return when the config does not say.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 60 * 1024;
/// Most matches `log.grep` returns when the config does not say.
pub const DEFAULT_MAX_MATCHES: u64 = 1000;
/// Most context lines around a match.
pub const DEFAULT_MAX_CONTEXT: u64 = 10;
/// Most bytes `log.grep` reads of a file when the config does not say (1 GiB).
pub const DEFAULT_MAX_SCAN_BYTES: u64 = 1 << 30;

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    integrity: Option<IntegritySection>,
    #[serde(default)]
    log: Option<LogSection>,
    #[serde(default)]
    limits: Limits,
}

/// `[limits]`: the largest resource limits a job may ask for (`memory_max` in bytes,
/// `cpu_max_milli` in thousandths of a CPU); `--max-memory` and `--max-cpu-milli` win over
/// them, and without either the host's memory and CPUs are the ceilings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest `memory_max`, in bytes.
    pub max_memory: Option<u64>,
    /// The largest `cpu_max_milli`.
    pub max_cpu_milli: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IntegritySection {
    rules: PathBuf,
    report_max_entries: Option<usize>,
    hash_threads: Option<usize>,
    pseudo_filesystems: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    roots: Vec<PathBuf>,
    max_lines: Option<u64>,
    max_output_bytes: Option<u64>,
    max_matches: Option<u64>,
    max_context: Option<u64>,
    max_scan_bytes: Option<u64>,
}

/// What the log methods may read, and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Directories (canonical) whose files may be read.
    pub roots: Vec<PathBuf>,
    /// Most lines `log.tail` returns.
    pub max_lines: u64,
    /// Most bytes returned.
    pub max_output_bytes: u64,
    /// Most matches `log.grep` returns.
    pub max_matches: u64,
    /// Most context lines before or after a match.
    pub max_context: u64,
    /// Most bytes `log.grep` reads of one file.
    pub max_scan_bytes: u64,
}

/// The configuration in force.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The integrity methods' settings; `None` when the file has no `[integrity]`.
    pub integrity: Option<IntegritySettings>,
    /// The log methods' settings; `None` when the file has no `[log]`.
    pub log: Option<LogSettings>,
    /// The resource-limit ceilings of `[limits]`.
    pub limits: Limits,
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// It is not valid TOML, has an unknown key, or a bad value.
    #[error("config file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with where (the TOML parser's message names the key and line).
        reason: String,
    },
}

/// Loads `path`. `state_file` is the agent's `--state-file`: the state directory defaults
/// to its directory.
pub fn load(path: &Path, state_file: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, path, state_file)
}

/// Parses config `text` (read from `path`, which relative paths in it are resolved
/// against).
pub fn parse(text: &str, path: &Path, state_file: &Path) -> Result<Settings, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { path: path.display().to_string(), reason };
    let file: FileConfig = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| if p.is_relative() { base.join(p) } else { p.to_path_buf() };
    let state_dir = match &file.state_dir {
        Some(dir) => resolve(dir),
        None => state_file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(),
    };
    let integrity = match file.integrity {
        None => None,
        Some(section) => {
            if section.hash_threads.is_some_and(|n| n > MAX_HASH_THREADS) {
                return Err(invalid(format!("[integrity] hash_threads is at most {MAX_HASH_THREADS}")));
            }
            let rules = resolve(&section.rules);
            // Parsed now so a broken rules file is reported at start (or on SIGHUP); it is
            // read again for each job, so edits need no reload.
            crate::integrity::rules::load(&rules).map_err(|e| invalid(format!("[integrity] rules: {e}")))?;
            Some(IntegritySettings {
                rules,
                baseline: state_dir.join(BASELINE_FILE),
                report_max_entries: section.report_max_entries.unwrap_or(DEFAULT_REPORT_MAX_ENTRIES),
                hash_threads: section.hash_threads.unwrap_or(0),
                pseudo_filesystems: section.pseudo_filesystems.unwrap_or(false),
            })
        }
    };
    let log = match file.log {
        None => None,
        Some(section) => {
            if section.roots.is_empty() {
                return Err(invalid("[log] roots is empty: name the directories log.* may read".into()));
            }
            let mut roots = Vec::new();
            for root in &section.roots {
                if root.is_relative() {
                    return Err(invalid(format!("[log] roots: {} is not an absolute path", root.display())));
                }
                // Canonical, so a root that is itself a symlink compares right.
                let canonical = std::fs::canonicalize(root)
                    .map_err(|e| invalid(format!("[log] roots: {}: {e}", root.display())))?;
                roots.push(canonical);
            }
            Some(LogSettings {
                roots,
                max_lines: section.max_lines.unwrap_or(DEFAULT_MAX_LINES),
                max_output_bytes: section.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
                max_matches: section.max_matches.unwrap_or(DEFAULT_MAX_MATCHES),
                max_context: section.max_context.unwrap_or(DEFAULT_MAX_CONTEXT),
                max_scan_bytes: section.max_scan_bytes.unwrap_or(DEFAULT_MAX_SCAN_BYTES),
            })
        }
    };
    Ok(Settings { integrity, log, limits: file.limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("aide.conf"), "/etc p+sha256\n").expect("rules");
        let config = dir.path().join("agent.toml");
        let text = format!(
            "state_dir = \"{0}/state\"\n[integrity]\nrules = \"aide.conf\"\nreport_max_entries = 50\nhash_threads = 2\n\
             [log]\nroots = [\"{0}\"]\nmax_matches = 10\n",
            dir.path().display()
        );
        let settings = parse(&text, &config, Path::new("/x/agent.json")).expect("valid");
        let integrity = settings.integrity.expect("integrity");
        assert_eq!(integrity.rules, dir.path().join("aide.conf"));
        assert_eq!(integrity.baseline, dir.path().join("state").join(BASELINE_FILE));
        assert_eq!((integrity.report_max_entries, integrity.hash_threads), (50, 2));
        assert_eq!(settings.log.expect("log").max_matches, 10);
        let limited = parse("[limits]\nmax_memory = 1073741824\nmax_cpu_milli = 1500\n", &config, Path::new("a.json"))
            .expect("valid");
        assert_eq!(limited.limits, Limits { max_memory: Some(1 << 30), max_cpu_milli: Some(1500) });
        let e = parse("[limits]\nmax_swap = 1\n", &config, Path::new("a.json")).expect_err("unknown key");
        assert!(e.to_string().contains("max_swap"), "{e}");

        let e = parse("[integrity]\nrules = \"aide.conf\"\nreport_max = 3\n", &config, Path::new("a.json"))
            .expect_err("unknown key");
        assert!(e.to_string().contains("report_max"), "{e}");
        let e = parse("colour = 1\n", &config, Path::new("a.json")).expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
        // The default state dir is the state file's.
        let s =
            parse("[integrity]\nrules = \"aide.conf\"\n", &config, Path::new("/var/lib/pa/agent.json")).expect("valid");
        assert_eq!(s.integrity.expect("integrity").baseline, Path::new("/var/lib/pa").join(BASELINE_FILE));
        // A rules file that does not parse is refused with its line.
        std::fs::write(dir.path().join("bad.conf"), "/etc p\n/usr nope\n").expect("rules");
        let e = parse("[integrity]\nrules = \"bad.conf\"\n", &config, Path::new("a.json")).expect_err("bad rules");
        assert!(e.to_string().contains("bad.conf:2"), "{e}");
    }
}
