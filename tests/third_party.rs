//! A third-party client library drives polarisd: the Python package
//! `greenstalk` (PyPI) runs `tests/clients/greenstalk_client.py`, which
//! exercises put, reserve, delete, release, bury, kick, peek, stats, use,
//! watch, ignore and touch, and exits non-zero on any failure.
//!
//! Needs `python3` with greenstalk (`pip install greenstalk`); without them
//! the test prints SKIP, except under CI (`CI` set), where it fails.
//! `POLARIS_CLIENT_TARGET=beanstalkd` runs the same script against the real
//! beanstalkd instead, to check the script itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The script normally takes about 5 s; past this it is considered hung.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// True if `python3` runs and can import greenstalk; otherwise reports SKIP
/// (or panics under CI).
fn greenstalk_available() -> bool {
    let probe =
        Command::new("python3").args(["-c", "import greenstalk"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    match probe {
        Ok(status) if status.success() => true,
        Ok(_) => {
            polaris_testkit::skip_unless_ci(
                "python3 cannot import greenstalk; install it with `pip install greenstalk`",
            );
            false
        }
        Err(e) => {
            polaris_testkit::skip_unless_ci(&format!(
                "python3 not runnable ({e}); install python3 and `pip install greenstalk`"
            ));
            false
        }
    }
}

#[test]
fn greenstalk_client_drives_the_server() {
    if !greenstalk_available() {
        return;
    }
    let server = match std::env::var("POLARIS_CLIENT_TARGET").as_deref() {
        Ok("beanstalkd") => {
            let Some(beanstalkd) = polaris_testkit::require_beanstalkd() else {
                return;
            };
            polaris_testkit::spawn_beanstalkd(&beanstalkd, &[])
        }
        Ok("polarisd") | Err(_) => polaris_testkit::spawn_polarisd(&[]),
        Ok(other) => {
            panic!("POLARIS_CLIENT_TARGET must be `polarisd` or `beanstalkd`, not {other:?}")
        }
    }
    .unwrap_or_else(|e| panic!("cannot start the server under test: {e:#}"));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/greenstalk_client.py");
    let addr = server.addr();
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning python3");

    // Wait with a deadline: a server that stops answering must fail the test,
    // not hang it (the script also sets socket timeouts).
    let started = Instant::now();
    while child.try_wait().expect("waiting for python3").is_none() {
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("collecting the script's output");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "greenstalk client script failed against {} ({}; ran {:.1} s):\n{report}\nserver output:\n{}",
        server.label(),
        output.status,
        started.elapsed().as_secs_f64(),
        server.output()
    );
}
