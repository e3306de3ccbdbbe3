//! Containment: each command runs in a cgroup of its own when the agent can make one, so
//! that everything it starts — even a child that calls `setsid` or double-forks out of
//! the process group — is killed at timeout, cancel or agent shutdown, and the memory and
//! CPU limits of its envelope are enforced by the kernel.
//!
//! - **Where.** The cgroup v2 hierarchy is found in `/proc/self/mountinfo` (`cgroup2`; at
//!   `/sys/fs/cgroup` on a pure v2 system, at `/sys/fs/cgroup/unified` on a hybrid one),
//!   and the agent's own cgroup in `/proc/self/cgroup` (`0::/path`). Each run gets
//!   `<own cgroup>/polaris-agent/<run id>`. cgroup v1 controllers (`memory`, `cpu`) are
//!   found the same way (`cgroup` mounts, their controllers in the super options) and used
//!   for limits the v2 hierarchy cannot enforce (a hybrid host, whose v2 hierarchy has no
//!   controllers): `<own v1 cgroup>/polaris-agent/<run id>` in each.
//! - **The unit.** The first directory of a [`Unit`] holds every process of the command
//!   (the v2 cgroup, or on a v1-only host the v1 one); the others only carry limits. A
//!   process cannot leave a cgroup it does not own, so `setsid` does not help it escape.
//! - **Killing.** `cgroup.kill` (Linux ≥ 5.14) kills every process of the unit at once;
//!   without it the unit is frozen (`cgroup.freeze`, v2) and each pid in `cgroup.procs`
//!   gets SIGKILL, round after round until the unit is empty, so a process that forks
//!   meanwhile is caught in the next round.
//! - **Limits.** `memory_max` becomes v2 `memory.max` (with `memory.swap.max` 0 and
//!   `memory.oom.group` 1 when present) or v1 `memory.limit_in_bytes` (and
//!   `memory.memsw.limit_in_bytes`); `cpu_max_milli` becomes v2 `cpu.max` or v1
//!   `cpu.cfs_quota_us` over a 100 ms `cpu.cfs_period_us`. A kill by the memory limit is
//!   read back from v2 `memory.events` (`oom_kill`) or v1 `memory.oom_control`
//!   (`oom_kill`, else `memory.failcnt`).
//! - **Controllers on pure v2.** A non-root cgroup may hand controllers to its children
//!   only while it holds no process itself, so an agent that is alone in its cgroup (a
//!   systemd service with `Delegate=yes`) moves itself into `<own>/polaris-agent-self`
//!   first; it never moves other processes.
//! - **None.** Not root, no cgroupfs, or a hierarchy the agent cannot write: the agent
//!   says so once at start and runs commands in process groups only (a `setsid` child can
//!   then escape), and refuses envelopes that ask for limits.
//!
//! cgroupfs is plain file I/O, so this module needs no `unsafe`; signals go through `sys`.

use crate::sys::{self, Signal};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory, under the agent's own cgroup, that holds one cgroup per run.
pub const BASE_NAME: &str = "polaris-agent";

/// The CFS period used for `cpu_max_milli`, in microseconds (100 ms, the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest CFS quota the kernel takes, in microseconds.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// How old an empty run cgroup must be before a starting agent removes it as stale.
const STALE_UNIT_AGE: Duration = Duration::from_secs(60);

/// How many rounds of "SIGKILL every pid" a unit without `cgroup.kill` gets.
const KILL_ROUNDS: usize = 200;

/// A cgroup v1 hierarchy as mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    /// The controllers it carries (`memory`, `cpu`, `cpuacct`, `name=systemd`, ...).
    pub controllers: Vec<String>,
    /// The cgroup path that is the mount's root (`/` unless a container mounted a part).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// The cgroup hierarchies mounted, as read from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup v2 mount: its root (cgroup path) and mount point.
    pub v2: Option<(String, PathBuf)>,
    /// The cgroup v1 mounts.
    pub v1: Vec<V1Mount>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value =
                (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` text for cgroup mounts. Fields: id, parent, dev, root,
/// mount point, options, optional fields..., `-`, fs type, source, super options.
pub fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = before.split(' ').collect();
        let after: Vec<&str> = after.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) = (fields.get(3), fields.get(4), after.first()) else {
            continue;
        };
        let root = unescape(root);
        let mount_point = PathBuf::from(unescape(mount_point));
        match *fstype {
            // The first one wins: a later bind mount of the same hierarchy adds nothing.
            "cgroup2" if mounts.v2.is_none() => mounts.v2 = Some((root, mount_point)),
            "cgroup" => {
                let options = after.get(2).copied().unwrap_or("");
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro" | "" | "noprefix" | "clone_children" | "xattr"))
                    .filter(|o| !o.starts_with("release_agent="))
                    .map(str::to_string)
                    .collect();
                if !mounts.v1.iter().any(|m| m.controllers == controllers) {
                    mounts.v1.push(V1Mount { controllers, root, mount_point });
                }
            }
            _ => {}
        }
    }
    mounts
}

/// A process's cgroups, as read from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroups {
    /// Its cgroup v2 path (the `0::` line).
    pub v2: Option<String>,
    /// Its cgroup v1 paths, each with the controllers of its hierarchy.
    pub v1: Vec<(Vec<String>, String)>,
}

impl ProcCgroups {
    /// Its path in the v1 hierarchy carrying `controller`.
    pub fn v1_path(&self, controller: &str) -> Option<&str> {
        self.v1.iter().find(|(c, _)| c.iter().any(|c| c == controller)).map(|(_, p)| p.as_str())
    }
}

/// Parses `/proc/<pid>/cgroup` text: `hierarchy-id:controllers:path` lines.
pub fn parse_proc_cgroup(text: &str) -> ProcCgroups {
    let mut cgroups = ProcCgroups::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && controllers.is_empty() {
            cgroups.v2 = Some(path.to_string());
        } else if !controllers.is_empty() {
            cgroups.v1.push((controllers.split(',').map(str::to_string).collect(), path.to_string()));
        }
    }
    cgroups
}

/// The directory of cgroup `path` in a hierarchy whose mount shows cgroup `root` at
/// `mount_point`; `None` when the cgroup lies outside what is mounted (a namespace's
/// `/..` paths, or a container that mounted only part of the tree).
pub fn cgroup_dir(mount_point: &Path, root: &str, path: &str) -> Option<PathBuf> {
    if path.split('/').any(|segment| segment == "..") {
        return None;
    }
    let relative = if root == "/" {
        path.trim_start_matches('/')
    } else {
        let rest = path.strip_prefix(root.trim_end_matches('/'))?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest.trim_start_matches('/')
    };
    Some(if relative.is_empty() { mount_point.to_path_buf() } else { mount_point.join(relative) })
}

/// Where the agent's per-run cgroups go, as found from its mounts and its own cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bases {
    /// `<own v2 cgroup>/polaris-agent`.
    pub v2: Option<PathBuf>,
    /// `<own v1 memory cgroup>/polaris-agent`.
    pub v1_memory: Option<PathBuf>,
    /// `<own v1 cpu cgroup>/polaris-agent`.
    pub v1_cpu: Option<PathBuf>,
}

/// The base directories for a process with cgroups `own` on a host with `mounts`.
pub fn bases(mounts: &Mounts, own: &ProcCgroups) -> Bases {
    let v2 = match (&mounts.v2, &own.v2) {
        (Some((root, mount_point)), Some(path)) => cgroup_dir(mount_point, root, path).map(|d| d.join(BASE_NAME)),
        _ => None,
    };
    let v1 = |controller: &str| {
        let mount = mounts.v1.iter().find(|m| m.controllers.iter().any(|c| c == controller))?;
        cgroup_dir(&mount.mount_point, &mount.root, own.v1_path(controller)?).map(|d| d.join(BASE_NAME))
    };
    Bases { v2, v1_memory: v1("memory"), v1_cpu: v1("cpu") }
}

/// Why a unit could not be made as asked.
#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    /// The envelope asks for a limit this host cannot enforce.
    #[error("{0}")]
    Unavailable(String),
    /// A cgroup file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ContainError + '_ {
    move |source| ContainError::Io { path: path.to_path_buf(), source }
}

/// The limits a unit enforces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitLimits {
    /// Bytes of memory (and swap) the unit may use.
    pub memory_max: Option<u64>,
    /// Thousandths of a CPU the unit may use.
    pub cpu_max_milli: Option<u32>,
}

/// What the host offers: where each run's cgroups go and which limits it can enforce.
#[derive(Debug, Clone, Default)]
pub struct Containment {
    /// `<own v2 cgroup>/polaris-agent`, created.
    v2: Option<PathBuf>,
    /// Whether the v2 base hands `memory` / `cpu` to its children.
    v2_memory: bool,
    v2_cpu: bool,
    /// `<own v1 cgroup>/polaris-agent` of the memory and cpu hierarchies, created.
    v1_memory: Option<PathBuf>,
    v1_cpu: Option<PathBuf>,
    /// Why there is no cgroup containment, or what is missing.
    notes: Vec<String>,
}

fn contains_word(path: &Path, word: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|text| text.split_whitespace().any(|w| w == word))
}

/// Creates `dir` (and its parents) unless it exists.
fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates base directory `base` unless it exists, and proves that runs' cgroups can be
/// made in it (another agent, e.g. root's, may have made it for itself).
fn make_base(base: &Path) -> io::Result<()> {
    make_dir(base)?;
    let probe = base.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&probe)?;
    fs::remove_dir(&probe)
}

impl Containment {
    /// No cgroups: process groups only, for `why`.
    pub fn none(why: impl Into<String>) -> Containment {
        Containment { notes: vec![why.into()], ..Containment::default() }
    }

    /// Finds the cgroup hierarchies, creates the agent's base cgroups in them and enables
    /// the controllers it can; what it cannot do is noted in [`Containment::describe`].
    pub fn detect() -> Containment {
        let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => text,
            Err(e) => return Containment::none(format!("cannot read /proc/self/mountinfo: {e}")),
        };
        let own = match fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => text,
            Err(e) => return Containment::none(format!("cannot read /proc/self/cgroup: {e}")),
        };
        Containment::detect_at(&bases(&parse_mountinfo(&mountinfo), &parse_proc_cgroup(&own)))
    }

    /// [`Containment::detect`] with the base directories given.
    pub fn detect_at(bases: &Bases) -> Containment {
        let mut found = Containment::default();
        match &bases.v2 {
            None => found.notes.push("no cgroup v2 hierarchy holds this process".into()),
            Some(base) => match make_base(base) {
                Err(e) => found.notes.push(format!("cannot create cgroups in {}: {e}", base.display())),
                Ok(()) => {
                    found.v2_memory = enable_v2_controller(base, "memory");
                    found.v2_cpu = enable_v2_controller(base, "cpu");
                    found.v2 = Some(base.clone());
                }
            },
        }
        let v1 = |base: &Option<PathBuf>, notes: &mut Vec<String>| {
            let base = base.as_ref()?;
            match make_base(base) {
                Ok(()) => Some(base.clone()),
                Err(e) => {
                    notes.push(format!("cannot create cgroups in {}: {e}", base.display()));
                    None
                }
            }
        };
        if !found.v2_memory {
            found.v1_memory = v1(&bases.v1_memory, &mut found.notes);
        }
        if !found.v2_cpu {
            found.v1_cpu = v1(&bases.v1_cpu, &mut found.notes);
        }
        found.sweep_stale(STALE_UNIT_AGE);
        found
    }

    /// Removes run cgroups that are empty and older than `age`: left by an agent killed
    /// after its command ended, and not restarted with the same state file (a restarted
    /// one removes its predecessor's through the ledger). A live run's cgroup holds its
    /// command within milliseconds of being made, and its agent removes it as soon as the
    /// command is over, so `age` keeps this from racing another agent on the host.
    fn sweep_stale(&self, age: Duration) {
        let mut removed = 0;
        for base in [&self.v2, &self.v1_memory, &self.v1_cpu].into_iter().flatten() {
            let Ok(entries) = fs::read_dir(base) else { continue };
            for entry in entries.flatten() {
                let dir = entry.path();
                let old = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                let empty = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty());
                let is_run =
                    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()));
                if is_run && empty && old.is_some_and(|o| o >= age) && fs::remove_dir(&dir).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            log::info!("removed {removed} empty run cgroup(s) left by agents that died");
        }
    }

    /// Whether commands run in cgroups (else in process groups only).
    pub fn uses_cgroups(&self) -> bool {
        self.v2.is_some() || self.v1_memory.is_some() || self.v1_cpu.is_some()
    }

    /// Whether `memory_max` can be enforced.
    pub fn limits_memory(&self) -> bool {
        self.v2_memory || self.v1_memory.is_some()
    }

    /// Whether `cpu_max_milli` can be enforced.
    pub fn limits_cpu(&self) -> bool {
        self.v2_cpu || self.v1_cpu.is_some()
    }

    /// What the agent uses, for its start-up log line: `cgroup v2 at …`,
    /// `cgroup v2 at … + v1 memory at …, cpu at …`, or `process groups only: <why>`.
    pub fn describe(&self) -> String {
        let mut text = match &self.v2 {
            Some(base) => {
                let mut controllers = Vec::new();
                if self.v2_memory {
                    controllers.push("memory");
                }
                if self.v2_cpu {
                    controllers.push("cpu");
                }
                let controllers =
                    if controllers.is_empty() { "no controllers".to_string() } else { controllers.join(", ") };
                format!("cgroup v2 at {} ({controllers})", base.display())
            }
            None if self.uses_cgroups() => "cgroup v1 only".to_string(),
            None => format!("process groups only: {}", self.notes.join("; ")),
        };
        let v1: Vec<String> = [("memory", &self.v1_memory), ("cpu", &self.v1_cpu)]
            .iter()
            .filter_map(|(name, dir)| dir.as_ref().map(|d| format!("{name} at {}", d.display())))
            .collect();
        if !v1.is_empty() {
            text.push_str(&format!(" + v1 {}", v1.join(", ")));
        }
        if self.uses_cgroups() {
            let mut missing = Vec::new();
            if !self.limits_memory() {
                missing.push("memory_max");
            }
            if !self.limits_cpu() {
                missing.push("cpu_max_milli");
            }
            if !missing.is_empty() {
                text.push_str(&format!("; cannot enforce {}", missing.join(", ")));
            }
        } else {
            text.push_str("; cannot enforce memory_max, cpu_max_milli");
        }
        text
    }

    /// The directories run `run_id`'s unit has or would have, to look for after a crash.
    pub fn unit_dirs(&self, run_id: &str) -> Vec<PathBuf> {
        [&self.v2, &self.v1_memory, &self.v1_cpu].into_iter().flatten().map(|base| base.join(run_id)).collect()
    }

    /// Creates run `run_id`'s unit with `limits`; `Ok(None)` when the host has no cgroups
    /// (and no limit is asked). A limit the host cannot enforce is an error, never
    /// silently dropped.
    pub fn create(&self, run_id: &str, limits: &UnitLimits) -> Result<Option<Unit>, ContainError> {
        if limits.memory_max.is_some() && !self.limits_memory() {
            return Err(ContainError::Unavailable(format!(
                "memory_max cannot be enforced on this host ({})",
                self.describe()
            )));
        }
        if limits.cpu_max_milli.is_some() && !self.limits_cpu() {
            return Err(ContainError::Unavailable(format!(
                "cpu_max_milli cannot be enforced on this host ({})",
                self.describe()
            )));
        }
        if !self.uses_cgroups() {
            return Ok(None);
        }
        let mut unit = Unit { dirs: Vec::new(), v2: self.v2.is_some(), memory: None, cgroup_kill: true };
        // The unit's first directory holds every process: the v2 cgroup when there is one.
        if let Some(base) = &self.v2 {
            let dir = base.join(run_id);
            fs::create_dir(&dir).map_err(io_error(&dir))?;
            unit.dirs.push(dir.clone());
            if let (true, Some(bytes)) = (self.v2_memory, limits.memory_max) {
                write_file(&dir.join("memory.max"), &bytes.to_string())?;
                // Swap would let it go past the limit without ever being killed by it.
                let _ = write_file(&dir.join("memory.swap.max"), "0");
                // Killed by its limit, the whole unit goes, not one process of it.
                let _ = write_file(&dir.join("memory.oom.group"), "1");
                unit.memory = Some(MemoryWatch::V2(dir.clone()));
            }
            if let (true, Some(milli)) = (self.v2_cpu, limits.cpu_max_milli) {
                write_file(&dir.join("cpu.max"), &format!("{} {CPU_PERIOD_US}", cpu_quota_us(milli)))?;
            }
        }
        let need_v1_memory = limits.memory_max.is_some() && !self.v2_memory;
        if let (Some(base), true) = (&self.v1_memory, need_v1_memory || unit.dirs.is_empty()) {
            let dir = base.join(run_id);
            fs::create_dir(&dir).map_err(io_error(&dir))?;
            unit.dirs.push(dir.clone());
            if let (true, Some(bytes)) = (need_v1_memory, limits.memory_max) {
                write_file(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                // Memory plus swap, when swap accounting is on (the file exists).
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &bytes.to_string())?;
                }
                unit.memory = Some(MemoryWatch::V1(dir.clone()));
            }
        }
        let need_v1_cpu = limits.cpu_max_milli.is_some() && !self.v2_cpu;
        if let (Some(base), true) = (&self.v1_cpu, need_v1_cpu || unit.dirs.is_empty()) {
            let dir = base.join(run_id);
            fs::create_dir(&dir).map_err(io_error(&dir))?;
            unit.dirs.push(dir.clone());
            if let (true, Some(milli)) = (need_v1_cpu, limits.cpu_max_milli) {
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &cpu_quota_us(milli).to_string())?;
            }
        }
        Ok(Some(unit))
    }
}

/// The CFS quota for `milli` thousandths of a CPU over [`CPU_PERIOD_US`].
pub fn cpu_quota_us(milli: u32) -> u64 {
    (u64::from(milli) * CPU_PERIOD_US / 1000).max(MIN_CPU_QUOTA_US)
}

/// Where the agent moves itself, beside the runs' base, when its own cgroup must hand
/// controllers down (cgroup v2 lets a non-root cgroup do so only while it holds no
/// process itself).
pub const SELF_LEAF_NAME: &str = "polaris-agent-self";

/// Makes `controller` available to the children of `base`: enabled in `base`'s
/// `cgroup.subtree_control`, after enabling it in the parent's (the agent's own cgroup)
/// if `base` lacks it. cgroup v2's "no internal processes" rule refuses that (EBUSY) while
/// the agent's own cgroup holds processes and is not the root — the usual case of a
/// systemd service. Then, if the agent is the only process there (a delegated service,
/// `Delegate=yes`), it moves itself into `<own>/polaris-agent-self` and tries again; it
/// never moves processes that are not its own. False if the controller stays unavailable.
fn enable_v2_controller(base: &Path, controller: &str) -> bool {
    let enable = format!("+{controller}");
    if !contains_word(&base.join("cgroup.controllers"), controller) {
        let Some(own) = base.parent() else { return false };
        if !contains_word(&own.join("cgroup.controllers"), controller) {
            return false;
        }
        if let Err(e) = fs::write(own.join("cgroup.subtree_control"), &enable) {
            // The root cgroup (no cgroup.events) is exempt from the rule: EBUSY is not that.
            let busy = e.raw_os_error() == Some(libc::EBUSY) && own.join("cgroup.events").exists();
            if !busy || !move_self_to_leaf(own) {
                return false;
            }
            let _ = fs::write(own.join("cgroup.subtree_control"), &enable);
        }
    }
    if !contains_word(&base.join("cgroup.controllers"), controller) {
        return false;
    }
    let _ = fs::write(base.join("cgroup.subtree_control"), &enable);
    contains_word(&base.join("cgroup.subtree_control"), controller)
}

/// Moves this process (all its threads) from cgroup `own` into `own/polaris-agent-self`,
/// if it is the only process in `own`. Whether it moved.
fn move_self_to_leaf(own: &Path) -> bool {
    let procs = fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    let pids: Vec<&str> = procs.split_whitespace().collect();
    if pids != [std::process::id().to_string().as_str()] {
        log::warn!(
            "cgroup {} holds other processes than this agent ({pids:?}); not moving them to enable controllers",
            own.display()
        );
        return false;
    }
    let leaf = own.join(SELF_LEAF_NAME);
    // "0" names the writing process; its threads move with it.
    match make_dir(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), "0")) {
        Ok(()) => {
            log::info!("moved this agent into {} so that its cgroup can hand controllers to the runs", leaf.display());
            true
        }
        Err(e) => {
            log::warn!("cannot move this agent into {}: {e}", leaf.display());
            false
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), ContainError> {
    fs::write(path, value).map_err(io_error(path))
}

/// Where a unit's memory-limit kills are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MemoryWatch {
    /// `memory.events` of this v2 cgroup.
    V2(PathBuf),
    /// `memory.oom_control` (or `memory.failcnt`) of this v1 cgroup.
    V1(PathBuf),
}

/// The cgroups of one run: every process of the command is in the first directory.
#[derive(Debug)]
pub struct Unit {
    dirs: Vec<PathBuf>,
    /// Whether the first directory is a v2 cgroup (`cgroup.kill`, `cgroup.freeze`).
    v2: bool,
    memory: Option<MemoryWatch>,
    /// Whether to try `cgroup.kill` (tests turn it off to exercise the fallback).
    cgroup_kill: bool,
}

/// The value of `key` in a `key value` per line cgroup file.
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Unit {
    /// The unit a dead predecessor recorded (the ledger's `started` entry).
    pub fn from_dirs(dirs: &[String]) -> Unit {
        let dirs: Vec<PathBuf> = dirs.iter().map(PathBuf::from).collect();
        let v2 = dirs.first().is_some_and(|d| d.join("cgroup.events").exists());
        Unit { dirs, v2, memory: None, cgroup_kill: true }
    }

    /// Its directories, the one holding the processes first.
    pub fn dirs(&self) -> Vec<String> {
        self.dirs.iter().map(|d| d.display().to_string()).collect()
    }

    /// Moves process `pid` into every cgroup of the unit.
    pub fn place(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join("cgroup.procs").display())))?;
        }
        Ok(())
    }

    /// The pids in the unit now.
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.dirs.first() else { return Vec::new() };
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether no process is left in the unit (also when it is gone).
    pub fn is_empty(&self) -> bool {
        let Some(dir) = self.dirs.first() else { return true };
        if self.v2 {
            if let Ok(events) = fs::read_to_string(dir.join("cgroup.events")) {
                return keyed_value(&events, "populated") == Some(0);
            }
        }
        self.pids().is_empty()
    }

    /// Sends `signal` to every process in the unit (SIGTERM at timeout, before the grace).
    pub fn signal_all(&self, signal: Signal) {
        for pid in self.pids() {
            sys::kill_pid(pid, signal);
        }
    }

    /// Kills every process in the unit with SIGKILL and returns how many there were.
    pub fn kill(&self) -> usize {
        let Some(dir) = self.dirs.first() else { return 0 };
        let count = self.pids().len();
        if self.v2 && self.cgroup_kill && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return count;
        }
        // No cgroup.kill (before Linux 5.14, or v1): freeze so nothing forks, then kill
        // pid by pid until the unit is empty. SIGKILL reaches frozen processes.
        let frozen = self.v2 && fs::write(dir.join("cgroup.freeze"), "1").is_ok();
        for _ in 0..KILL_ROUNDS {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                sys::kill_pid(pid, Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if frozen {
            let _ = fs::write(dir.join("cgroup.freeze"), "0");
        }
        count
    }

    /// Waits up to `bound` for the unit to be empty; whether it is.
    pub fn wait_empty(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many times the kernel killed a process of the unit for its memory limit.
    pub fn oom_kills(&self) -> u64 {
        match &self.memory {
            None => 0,
            Some(MemoryWatch::V2(dir)) => fs::read_to_string(dir.join("memory.events"))
                .ok()
                .and_then(|text| keyed_value(&text, "oom_kill"))
                .unwrap_or(0),
            Some(MemoryWatch::V1(dir)) => {
                let oom_control = fs::read_to_string(dir.join("memory.oom_control")).ok();
                match oom_control.as_deref().and_then(|text| keyed_value(text, "oom_kill")) {
                    Some(kills) => kills,
                    // Kernels before 4.13 do not count kills; hitting the limit is the sign.
                    None => fs::read_to_string(dir.join("memory.failcnt"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .map_or(0, |failed| u64::from(failed > 0)),
                }
            }
        }
    }

    /// Kills what is left, waits for the unit to empty and removes its cgroups. Every
    /// directory that is already gone counts as removed.
    pub fn remove(&self) -> io::Result<()> {
        if !self.is_empty() {
            self.kill();
        }
        self.wait_empty(Duration::from_secs(2));
        let mut first_error = None;
        for dir in self.dirs.iter().rev() {
            // An exited process leaves its cgroup a moment after it is reaped; retry briefly.
            let mut outcome = fs::remove_dir(dir);
            for _ in 0..100 {
                match &outcome {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(10));
                        outcome = fs::remove_dir(dir);
                    }
                    _ => break,
                }
            }
            match outcome {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_error.get_or_insert(io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
4:memory:/process_api/ce0d
1:cpu:/
0::/
";
    const V2_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V2_CGROUP: &str = "0::/system.slice/polaris-agent.service\n";

    #[test]
    fn hybrid_hierarchy_uses_v2_for_the_unit_and_v1_for_limits() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.v2, Some(("/".to_string(), PathBuf::from("/sys/fs/cgroup/unified"))));
        assert_eq!(mounts.v1.len(), 4);
        assert_eq!(mounts.v1[3].controllers, ["name=systemd"]);
        let own = parse_proc_cgroup(HYBRID_CGROUP);
        assert_eq!(own.v2.as_deref(), Some("/"));
        assert_eq!(own.v1_path("memory"), Some("/process_api/ce0d"));
        assert_eq!(
            bases(&mounts, &own),
            Bases {
                v2: Some("/sys/fs/cgroup/unified/polaris-agent".into()),
                v1_memory: Some("/sys/fs/cgroup/memory/process_api/ce0d/polaris-agent".into()),
                v1_cpu: Some("/sys/fs/cgroup/cpu/polaris-agent".into()),
            }
        );
    }

    #[test]
    fn pure_v2_uses_the_agents_own_cgroup() {
        let bases = bases(&parse_mountinfo(V2_MOUNTINFO), &parse_proc_cgroup(V2_CGROUP));
        assert_eq!(
            bases,
            Bases {
                v2: Some("/sys/fs/cgroup/system.slice/polaris-agent.service/polaris-agent".into()),
                v1_memory: None,
                v1_cpu: None,
            }
        );
    }

    #[test]
    fn no_cgroupfs_means_process_groups_only() {
        let mounts = parse_mountinfo("22 1 0:21 / /proc rw - proc proc rw\n");
        assert_eq!(mounts, Mounts::default());
        let bases = bases(&mounts, &parse_proc_cgroup(""));
        assert_eq!(bases, Bases::default());
        let containment = Containment::detect_at(&bases);
        assert!(!containment.uses_cgroups());
        assert!(containment.describe().starts_with("process groups only: "), "{}", containment.describe());
        let limited = UnitLimits { memory_max: Some(1 << 26), cpu_max_milli: None };
        assert!(matches!(containment.create("r", &limited), Err(ContainError::Unavailable(_))));
        assert!(matches!(containment.create("r", &UnitLimits::default()), Ok(None)));
    }

    #[test]
    fn v1_only_hosts_use_the_memory_hierarchy_for_the_unit() {
        let mounts = parse_mountinfo(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n",
        );
        assert_eq!(mounts.v2, None);
        assert_eq!(mounts.v1[0].controllers, ["cpu", "cpuacct"]);
        let own = parse_proc_cgroup("4:memory:/user.slice\n2:cpu,cpuacct:/user.slice\n");
        assert_eq!(own.v2, None);
        assert_eq!(
            bases(&mounts, &own),
            Bases {
                v2: None,
                v1_memory: Some("/sys/fs/cgroup/memory/user.slice/polaris-agent".into()),
                v1_cpu: Some("/sys/fs/cgroup/cpu,cpuacct/user.slice/polaris-agent".into()),
            }
        );
    }

    #[test]
    fn paths_outside_the_mount_are_refused_and_escapes_undone() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(cgroup_dir(mount, "/", "/a/b"), Some(PathBuf::from("/sys/fs/cgroup/a/b")));
        assert_eq!(cgroup_dir(mount, "/", "/"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup_dir(mount, "/docker/x", "/docker/x/y"), Some(PathBuf::from("/sys/fs/cgroup/y")));
        assert_eq!(cgroup_dir(mount, "/docker/x", "/docker/xy"), None);
        assert_eq!(cgroup_dir(mount, "/", "/../other"), None);
        let mounts = parse_mountinfo("41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n");
        assert_eq!(mounts.v2, Some(("/".to_string(), PathBuf::from("/mnt/cg two"))));
    }

    #[test]
    fn cpu_quota_is_thousandths_of_the_period() {
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(2000), 200_000);
        assert_eq!(cpu_quota_us(1), MIN_CPU_QUOTA_US);
        assert_eq!(keyed_value("populated 1\nfrozen 0\n", "frozen"), Some(0));
        assert_eq!(keyed_value("low 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
    }

    /// Runs a process in `unit`, kills the unit, and checks that it is gone and the unit
    /// removed.
    fn kill_unit_with_a_child(unit: &Unit) {
        let mut child = std::process::Command::new("sleep").arg("600").spawn().expect("spawn sleep");
        unit.place(child.id()).expect("place");
        assert_eq!(unit.pids(), [child.id() as i32]);
        assert_eq!(unit.kill(), 1);
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert!(unit.wait_empty(Duration::from_secs(5)));
        unit.remove().expect("remove");
        assert!(unit.dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn without_cgroup_kill_a_unit_is_frozen_and_killed_pid_by_pid() {
        let containment = Containment::detect();
        let Some(base) = containment.v2.clone().or(containment.v1_memory.clone()) else {
            polaris_testkit::skip_unless_ci(&format!("no cgroups: {}", containment.describe()));
            return;
        };
        // The v2 fallback (freeze, SIGKILL each pid) and, where there is a v1 memory
        // hierarchy, the v1-only one (SIGKILL each pid, round after round).
        let mut units = vec![(base, containment.v2.is_some())];
        if let (Some(v1), true) = (containment.v1_memory.clone(), containment.v2.is_some()) {
            units.push((v1, false));
        }
        for (base, v2) in units {
            let dir = base.join(uuid::Uuid::new_v4().simple().to_string());
            fs::create_dir(&dir).expect("mkdir");
            let unit = Unit { dirs: vec![dir], v2, memory: None, cgroup_kill: false };
            kill_unit_with_a_child(&unit);
        }
    }
}
