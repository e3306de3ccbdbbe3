//! polaris-bench's command line. (An integration test of this crate also makes `cargo test`
//! build the binary, which the docs test links into its checkout.)

use std::process::Command;

#[test]
fn help_lists_the_modes_and_free_port_prints_a_port() {
    let help = Command::new(env!("CARGO_BIN_EXE_polaris-bench")).arg("--help").output().expect("run polaris-bench");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for mode in ["put", "drain", "pipeline", "latency", "fill", "restart", "report"] {
        assert!(help.contains(mode), "--help does not list {mode}:\n{help}");
    }
    let port = Command::new(env!("CARGO_BIN_EXE_polaris-bench")).arg("free-port").output().expect("free-port");
    assert!(port.status.success());
    let port: u16 = String::from_utf8_lossy(&port.stdout).trim().parse().expect("a port number");
    assert!(port > 0);
}
