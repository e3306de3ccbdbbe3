//! PostgreSQL for the dispatcher's tests.
//!
//! - env `POLARIS_TEST_DATABASE=postgres://USER@HOST:PORT` runs every dispatcher the tests
//!   start ([`crate::cluster::start_dispatcher`]) on that server, each data directory in a
//!   database of its own (so a restarted dispatcher finds its data again, and tests stay
//!   independent);
//! - [`TestPostgres::start`] starts a throwaway server (initdb into a temporary directory,
//!   loopback and a Unix socket there, killed by its pid when dropped) for the tests that
//!   need PostgreSQL whatever the env says (several dispatchers on one database).

use crate::process::{free_port, wait_until, Proc};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The env var naming the PostgreSQL server the dispatcher tests run on.
pub const TEST_DATABASE_ENV: &str = "POLARIS_TEST_DATABASE";

/// The server env [`TEST_DATABASE_ENV`] names, if it names one.
pub fn test_server_url() -> Option<String> {
    std::env::var(TEST_DATABASE_ENV).ok().filter(|s| !s.is_empty())
}

/// `server_url` (a server, with or without a database path) naming database `name`.
pub fn database_url(server_url: &str, name: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server_url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Creates database `name` on `server_url` unless it exists; answers its URL.
pub fn create_database(server_url: &str, name: &str) -> anyhow::Result<String> {
    let mut client = postgres::Client::connect(&database_url(server_url, "postgres"), postgres::NoTls)?;
    if client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])?.is_none() {
        // Names are made here of [a-z0-9_] only; quoted all the same.
        client.batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")))?;
    }
    Ok(database_url(server_url, name))
}

/// The database of the dispatcher whose data directory is `data_dir`, on `server_url`
/// (created on first use): the same directory always gets the same database.
pub fn database_for(server_url: &str, data_dir: &Path) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    let name = format!("polaris_test_{:016x}", hasher.finish());
    create_database(server_url, &name).unwrap_or_else(|e| panic!("creating database {name} on {server_url}: {e}"))
}

/// Where the PostgreSQL server binaries are: env `POLARIS_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package) with `initdb` and `postgres`.
pub fn server_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("POLARIS_PG_BIN").map(PathBuf::from) {
        return has_both(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// The uid and gid PostgreSQL runs as when the tests run as root (which it refuses).
const UNPRIVILEGED: u32 = 65534;

/// A throwaway PostgreSQL server on loopback, stopped (by its pid) when dropped.
pub struct TestPostgres {
    /// `postgres://polaris@127.0.0.1:PORT`: a server URL, for [`create_database`].
    pub url: String,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl TestPostgres {
    /// Starts one, or answers `None` when no server binaries are installed. Panics when
    /// they are but the server does not start.
    pub fn start() -> Option<TestPostgres> {
        use std::os::unix::fs::MetadataExt as _;
        use std::os::unix::process::CommandExt as _;
        let bin = server_bin_dir()?;
        let dir = tempfile::tempdir().expect("tempdir for PostgreSQL");
        let as_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let command = |program: &str| {
            let mut command = Command::new(bin.join(program));
            if as_root {
                command.uid(UNPRIVILEGED).gid(UNPRIVILEGED);
            }
            command.stdin(Stdio::null());
            command
        };
        if as_root {
            std::os::unix::fs::chown(dir.path(), Some(UNPRIVILEGED), Some(UNPRIVILEGED))
                .expect("give the PostgreSQL directory to nobody");
        }
        let data = dir.path().join("data");
        let initdb = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "polaris", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        let port = free_port().expect("free port");
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            // Throwaway data: nothing needs to reach the disk.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let proc = Proc::new("postgres", child);
        let url = format!("postgres://polaris@127.0.0.1:{port}");
        let probe = database_url(&url, "postgres");
        wait_until(Duration::from_secs(30), "PostgreSQL accepting connections", || {
            postgres::Client::connect(&probe, postgres::NoTls).is_ok()
        });
        Some(TestPostgres { url, proc, _dir: dir })
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT) ends the server's own children too; SIGKILL after that.
        if self.proc.signal("INT").is_ok() && self.proc.wait_exit(Duration::from_secs(10)).is_some() {
            return;
        }
        self.proc.kill();
    }
}

/// The PostgreSQL server a test needing one runs on: the one env [`TEST_DATABASE_ENV`]
/// names, else a throwaway one (returned with it, stopped when dropped). Without either it
/// answers `None` after [`crate::skip_unless_ci`] (which fails under CI); `what` names the
/// test in that message.
pub fn test_server(what: &str) -> Option<(Option<TestPostgres>, String)> {
    if let Some(url) = test_server_url() {
        return Some((None, url));
    }
    match TestPostgres::start() {
        Some(pg) => {
            let url = pg.url.clone();
            Some((Some(pg), url))
        }
        None => {
            crate::skip_unless_ci(&format!("PostgreSQL server binaries (Debian's postgresql package) for {what}"));
            None
        }
    }
}
