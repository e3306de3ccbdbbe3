//! Test support for every integration test of the workspace: one place that starts
//! processes, picks ports and speaks raw protocol bytes.
//!
//! # Layout
//! - [`process`]: child processes (the workspace's binaries and the reference beanstalkd),
//!   killed when dropped; free ports; banner reading; waiting helpers.
//! - [`raw`]: a raw beanstalk connection and the reply-frame parser the differential test
//!   compares byte for byte.
//! - [`cluster`]: a queue, a dispatcher and agents on loopback, and HTTP/JSON calls to them.
//! - [`postgres`]: the PostgreSQL server the dispatcher tests may run on, and a throwaway one.
//! - [`scrape`]: `/metrics` scraped and read with a real Prometheus parser (Python's
//!   `prometheus_client`).
//! - [`tls`]: certificates made at test time (a CA, server and client certificates).

#![deny(unsafe_code)]

pub mod cluster;
pub mod postgres;
pub mod process;
pub mod raw;
pub mod scrape;
pub mod tls;

pub use process::{
    binary, example, free_port, pid_gone, spawn_announcing, spawn_announcing_with_env, spawn_beanstalkd,
    spawn_polarisd, wait_accepting, wait_until, Proc, ServerProcess,
};
pub use raw::{escape_bytes, parse_reply, RawConn, ReadOutcome, Reply};

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Debian installs the reference server.
pub const BEANSTALKD_PATH: &str = "/usr/bin/beanstalkd";

/// How long a helper waits for a server to start or for an expected reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reports a missing test prerequisite: a visible `SKIP:` line on a developer machine, but a
/// panic under CI (`CI` set), where every test must really run.
pub fn skip_unless_ci(missing: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, so this test may not be skipped: {missing}");
    }
    // Written straight to stderr, not with eprintln!, so that the test harness's output
    // capture does not hide it when the test "passes".
    let _ = writeln!(std::io::stderr(), "SKIP: {missing}");
}

/// Returns the reference beanstalkd binary, or `None` (after printing a visible SKIP line)
/// when it is not installed. Under CI a missing binary is a failure.
pub fn require_beanstalkd() -> Option<PathBuf> {
    let path = Path::new(BEANSTALKD_PATH);
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    skip_unless_ci(&format!("{BEANSTALKD_PATH} not found; install it with `apt-get install beanstalkd`"));
    None
}
