//! The examples in `examples/` run as the README shows them: the producer puts one job per
//! line, the worker handles and deletes them.

use anyhow::{ensure, Context, Result};
use polaris_testkit::{example, spawn_polarisd};
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn producer_then_worker_handles_every_line() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let addr = server.addr().to_string();

    let mut producer = Command::new(example("producer"))
        .args([&addr, "words"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the producer example")?;
    producer.stdin.take().context("producer stdin")?.write_all(b"hello\n\nworld\n")?;
    let out = producer.wait_with_output()?;
    ensure!(out.status.success(), "producer failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 hello\n2 world\n");

    let out = Command::new(example("worker")).args([&addr, "words", "--drain"]).output()?;
    ensure!(out.status.success(), "worker failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 HELLO\n2 WORLD\n");

    let mut conn = server.connect()?;
    assert_eq!(conn.line("job-state 1\r\n")?, "STATE success");
    assert_eq!(conn.line("job-state 2\r\n")?, "STATE success");
    Ok(())
}
