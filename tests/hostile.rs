//! Long hostile-client runs, `#[ignore]`d so the normal suite stays quick. Run them with
//!
//! ```sh
//! cargo test --profile ci --test hostile -- --ignored --nocapture --test-threads 1
//! ```
//!
//! Each prints its figures (RELIABILITY.md lists the last run's) and checks that a
//! well-behaved client is still served, promptly and correctly, while the hostile ones do
//! their worst, and that the server's memory stays bounded.

use anyhow::{ensure, Context, Result};
use polaris_testkit::{spawn_polarisd, RawConn, ServerProcess};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// The server's resident memory in KiB, from /proc.
fn rss_kib(server: &ServerProcess) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// A fresh, polite client gets its answer.
fn polite_client_is_served(server: &ServerProcess) -> Result<Duration> {
    let started = Instant::now();
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 60 2\r\nok\r\n")?.split(' ').next(), Some("INSERTED"));
    assert_eq!(c.line("list-tube-used\r\n")?, "USING default");
    Ok(started.elapsed())
}

/// Raises this test process's descriptor limit (prlimit(1) from util-linux, so no unsafe
/// code is needed here).
fn raise_own_nofile(limit: u32) -> Result<()> {
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={limit}:")])
        .status()?;
    ensure!(status.success(), "prlimit failed (run as root)");
    Ok(())
}

#[test]
#[ignore = "long: run with --ignored"]
fn fifty_megabytes_of_garbage() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let addr = server.addr();
    let per_connection = 13 << 20;
    let senders: Vec<_> = (0..4u64)
        .map(|seed| {
            thread::spawn(move || -> Result<u64> {
                let mut stream = TcpStream::connect(addr)?;
                // A cheap deterministic generator: xorshift bytes, with some CRLFs.
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
                let mut sent = 0u64;
                let mut chunk = vec![0u8; 64 * 1024];
                while sent < per_connection {
                    for b in chunk.iter_mut() {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        *b = if state.is_multiple_of(61) { b'\n' } else { state as u8 };
                    }
                    if stream.write_all(&chunk).is_err() {
                        break; // the server may close a connection it cannot parse
                    }
                    sent += chunk.len() as u64;
                }
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0;
    for s in senders {
        total += s.join().expect("sender thread")?;
    }
    let latency = polite_client_is_served(&server)?;
    eprintln!(
        "garbage: {} MB sent on 4 connections; server alive, polite client served in {latency:?}, RSS {} KiB",
        total >> 20,
        rss_kib(&server)?
    );
    Ok(())
}

#[test]
#[ignore = "long: run with --ignored"]
fn a_thousand_slowloris_connections() -> Result<()> {
    raise_own_nofile(8192)?;
    let server = spawn_polarisd(&[])?;
    let mut slow: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(server.addr())).collect::<Result<_, _>>()?;
    // Each sends a put header one byte at a time, never finishing it.
    let line = b"put 0 0 60 100000\r\n";
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for byte in 0..line.len() - 2 {
        for s in &mut slow {
            s.write_all(&line[byte..=byte])?;
        }
        worst = worst.max(polite_client_is_served(&server)?);
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "slowloris: 1000 connections dribbling for {:?}; polite client's slowest round trip {worst:?}; RSS {} KiB",
        started.elapsed(),
        rss_kib(&server)?
    );
    Ok(())
}

#[test]
#[ignore = "long: run with --ignored"]
fn ten_thousand_idle_connections() -> Result<()> {
    raise_own_nofile(15_000)?;
    let (proc, addr) = polaris_testkit::process::spawn_polarisd_with_nofile(15_000, &[])?;
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(TcpStream::connect(addr)?);
    }
    let mut c = RawConn::connect(addr)?;
    let started = Instant::now();
    let stats = c.roundtrip(b"stats\r\n")?;
    let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
    ensure!(text.contains("current-connections: 10001\n"), "not every connection was accepted:\n{text}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: ?").to_string();
    eprintln!("idle: 10000 connections held; stats answered in {:?}; {rss}", started.elapsed());
    Ok(())
}

#[test]
#[ignore = "long: run with --ignored"]
fn a_million_pipelined_commands_never_read() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let mut flood = TcpStream::connect(server.addr())?;
    flood.set_write_timeout(Some(Duration::from_secs(2)))?;
    let command = b"list-tube-used\r\n";
    let batch: Vec<u8> = command.iter().copied().cycle().take(command.len() * 10_000).collect();
    let mut sent = 0u64;
    // Until the server stops reading (its output for us is full and we never read it).
    while sent < 1_000_000 {
        match flood.write_all(&batch) {
            Ok(()) => sent += 10_000,
            Err(_) => break,
        }
    }
    let latency = polite_client_is_served(&server)?;
    let rss = rss_kib(&server)?;
    eprintln!("flood: {sent} commands written before the server pushed back; polite client served in {latency:?}; RSS {rss} KiB");
    ensure!(rss < 256 * 1024, "the server buffered the flood: RSS {rss} KiB");
    Ok(())
}
