//! polaris-agent's command line: `-V`/`--version`, and a `-h` that says what the program is,
//! the environment it reads and the signals it handles; a bad `--metrics` address stops the
//! start. (An integration test of this crate also makes `cargo test` build the binary, which
//! other crates' tests start.)

use std::path::Path;

#[test]
fn version_and_help() {
    polaris_testkit::process::assert_version_and_help(
        Path::new(env!("CARGO_BIN_EXE_polaris-agent")),
        "polaris-agent",
        &["POLARIS_TOKEN", "RUST_LOG", "SIGTERM"],
    );
}

#[test]
fn a_bad_metrics_address_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polaris-agent"))
        .args(["--queue", "127.0.0.1:1", "--host-id", "h", "--metrics", "no-port-here", "--state-file"])
        .arg(dir.path().join("h.json"))
        .env("POLARIS_SECRET", polaris_testkit::cluster::TEST_SECRET)
        .output()
        .expect("run polaris-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics \"no-port-here\" is not a usable address"), "{stderr}");
}
