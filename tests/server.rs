//! The server process: signals, listening on Unix sockets and inherited
//! sockets, limits, and robustness against hostile input.

use anyhow::{bail, Context, Result};
use polaris_testkit::{spawn_polarisd, RawConn};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn wait_exit(server: &mut polaris_testkit::ServerProcess) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.try_exit_status() {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("server did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sigint_exit_cleanly() -> Result<()> {
    for sig in ["TERM", "INT"] {
        let mut server = spawn_polarisd(&[])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "INSERTED 1");
        server.signal(sig)?;
        let status = wait_exit(&mut server)?;
        assert!(status.success(), "SIG{sig}: {status}");
    }
    Ok(())
}

#[test]
fn sigusr1_enters_drain_mode() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "INSERTED 1");
    server.signal("USR1")?;
    thread::sleep(Duration::from_millis(200));
    assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "DRAINING");
    let stats = c.roundtrip(b"stats\r\n")?;
    assert!(String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).contains("draining: true\n"));
    // Work already queued can still be done.
    assert_eq!(c.line("reserve\r\n")?, "RESERVED 1 1");
    Ok(())
}

#[test]
fn listens_on_a_unix_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("polaris.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_polarisd"))
        .arg("-l")
        .arg(format!("unix:{}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut first)?;
    assert_eq!(first.trim_end(), format!("listening on unix:{}", path.display()));
    let mut s = UnixStream::connect(&path)?;
    s.write_all(b"put 0 0 10 2\r\nhi\r\nreserve\r\n")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"hi\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, b"INSERTED 1\r\nRESERVED 1 2\r\nhi\r\n");
    Ok(())
}

#[test]
fn systemd_socket_activation() -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let fd = listener.as_raw_fd();
    // LISTEN_PID must be the server's own pid: exec through sh so `$$` is it.
    let program = env!("CARGO_BIN_EXE_polarisd");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" -p 1")
        .arg(program)
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // The one unsafe block of the tests: socket activation hands the server its socket as
    // fd 3, which only a dup2 between fork and exec can arrange. It stays libc: rustix's
    // dup2 needs an `OwnedFd` for fd 3, which the child does not have, and forging one
    // would take a second unsafe call.
    // SAFETY: pre_exec is unsafe because the closure runs in the forked child; it makes
    // one async-signal-safe system call (dup2, or fcntl) on `fd`, which the child inherited
    // open.
    unsafe {
        sh.pre_exec(move || {
            // dup2 of a descriptor onto itself does nothing, and would leave the listener's
            // close-on-exec flag set: when it already is fd 3, clear the flag instead.
            let status = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if status < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = sh.spawn()?;
    drop(listener);
    let mut first = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut first)?;
    let result = (|| -> Result<()> {
        assert_eq!(first.trim_end(), format!("listening on {addr}"));
        let mut c = RawConn::connect(addr)?;
        assert_eq!(c.line("list-tube-used\r\n")?, "USING default");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn connection_limit_closes_extra_connections() -> Result<()> {
    let server = spawn_polarisd(&["--max-connections", "2"])?;
    let mut a = server.connect()?;
    let mut b = server.connect()?;
    assert_eq!(a.line("list-tube-used\r\n")?, "USING default");
    assert_eq!(b.line("list-tube-used\r\n")?, "USING default");
    let mut c = server.connect()?;
    let _ = c.send(b"list-tube-used\r\n");
    let got = c.read_until_quiet(Duration::from_millis(300))?;
    assert!(got.is_empty() && c.is_closed(), "third connection must be closed");
    drop(a);
    thread::sleep(Duration::from_millis(100));
    let mut d = server.connect()?;
    assert_eq!(d.line("list-tube-used\r\n")?, "USING default");
    Ok(())
}

#[test]
fn line_and_job_limits_are_configurable() -> Result<()> {
    let server = spawn_polarisd(&["-z", "10", "--max-line", "32"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 1 11\r\n01234567890\r\n")?, "JOB_TOO_BIG");
    assert_eq!(c.line("put 0 0 1 10\r\n0123456789\r\n")?, "INSERTED 1");
    assert_eq!(c.line(&format!("use {}\r\n", "a".repeat(40)))?, "BAD_FORMAT");
    assert_eq!(c.line("use short\r\n")?, "USING short");
    Ok(())
}

#[test]
fn job_memory_limit_answers_out_of_memory() -> Result<()> {
    let server = spawn_polarisd(&["--max-job-bytes", "10"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 1 8\r\n01234567\r\n")?, "INSERTED 1");
    assert_eq!(c.line("put 0 0 1 8\r\n01234567\r\n")?, "OUT_OF_MEMORY");
    Ok(())
}

/// A client that sends a flood of commands and never reads its replies must not
/// make the server buffer without bound or stop serving others.
#[test]
fn a_client_that_never_reads_does_not_stall_others() -> Result<()> {
    let server = spawn_polarisd(&["--max-output-buffer", "65536"])?;
    let mut hog = std::net::TcpStream::connect(server.addr())?;
    hog.set_write_timeout(Some(Duration::from_secs(2)))?;
    let flood = b"stats\r\n".repeat(10_000);
    // The write may block once both socket buffers fill: that is the point.
    let _ = hog.write_all(&flood);
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "INSERTED 1");
    let stats = c.roundtrip(b"stats\r\n")?;
    assert!(stats.body.is_some());
    Ok(())
}

/// Random and adversarial bytes from many connections: the server never dies
/// and keeps answering a well-behaved client.
#[test]
fn hostile_input_never_crashes_the_server() -> Result<()> {
    let mut server = spawn_polarisd(&["-z", "1000"])?;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let words: &[&[u8]] = &[
        b"put ",
        b"reserve",
        b"delete ",
        b"release ",
        b"bury ",
        b"kick ",
        b"peek ",
        b"stats-job ",
        b"use ",
        b"watch ",
        b"ignore ",
        b"pause-tube ",
        b"reserve-with-timeout ",
        b"touch ",
        b"kick-job ",
        b"revoke ",
        b"job-state ",
        b"tube-ttl ",
        b"\r\n",
        b"\r",
        b"\n",
        b"\0",
        b" ",
        b"18446744073709551616",
        b"4294967295",
        b"-1",
        b"0",
        b"1",
        b"default",
        b"9999999999",
        b"stats",
        b"list-tubes",
        b"ttl=",
        b"quit",
    ];
    for _ in 0..200 {
        let mut conn = server.connect()?;
        let mut input = Vec::new();
        for _ in 0..(next() % 40) {
            if next() % 4 == 0 {
                let n = (next() % 300) as usize;
                input.extend((0..n).map(|_| next() as u8));
            } else {
                input.extend_from_slice(words[(next() % words.len() as u64) as usize]);
            }
        }
        let _ = conn.send(&input);
        let _ = conn.read_until_quiet(Duration::from_millis(2));
        drop(conn);
    }
    assert!(server.try_exit_status().is_none(), "server died: {}", server.output());
    let mut c = server.connect()?;
    let reply = c.roundtrip(b"stats\r\n")?;
    assert!(reply.line_str().starts_with("OK "), "{}", reply.line_str());
    Ok(())
}

/// Out of file descriptors, connections wait in the listen queue; once some close, the
/// waiting ones are accepted and served without any new connection having to arrive.
#[test]
fn waiting_connections_are_accepted_once_descriptors_free_up() -> Result<()> {
    let (server, addr) = polaris_testkit::process::spawn_polarisd_with_nofile(40, &[])?;
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    while waiting.len() < 10 && served.len() + waiting.len() < 100 {
        let mut c = RawConn::connect(addr)?;
        c.send(b"list-tube-used\r\n")?;
        match c.read_reply_within(Duration::from_millis(300))? {
            Some(reply) => {
                assert_eq!(reply.line_str(), "USING default");
                served.push(c);
            }
            None => waiting.push(c),
        }
    }
    assert!(!waiting.is_empty(), "40 descriptors never ran out ({} served); {}", served.len(), server.output());
    served.truncate(served.len().saturating_sub(20));
    for (n, c) in waiting.iter_mut().enumerate() {
        let reply = c.read_reply().with_context(|| format!("waiting connection {n} was never served"))?;
        assert_eq!(reply.line_str(), "USING default");
    }
    Ok(())
}

/// A burst of connections is accepted a share at a time (so that one turn never spends
/// itself on accepting), and every one of them is served, the last ones included: no new
/// readiness event comes for connections left in the listen queue, so the loop must go
/// back for them by itself.
#[test]
fn a_burst_of_connections_is_accepted_in_shares_and_every_one_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = spawn_polarisd(&["-b", dir.path().to_str().context("utf-8")?])?;
    let mut conns = Vec::new();
    for _ in 0..600 {
        conns.push(RawConn::connect(server.addr())?);
    }
    for (n, c) in conns.iter_mut().enumerate() {
        let reply = c.roundtrip(b"use burst\r\n").with_context(|| format!("connection {n} of 600 was not served"))?;
        assert_eq!(reply.line_str(), "USING burst");
    }
    let stats = conns[0].roundtrip(b"stats\r\n")?;
    let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
    assert!(text.contains("current-connections: 600\n"), "{text}");
    Ok(())
}

/// The descriptor table is grown for `--max-connections` at start, before the store's
/// threads run: growing it later, in a process with several threads, waits for an RCU
/// grace period inside `accept` (8–20 ms each time, the event loop with it).
#[test]
fn the_descriptor_table_is_grown_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = spawn_polarisd(&["-b", dir.path().to_str().context("utf-8")?, "--max-connections", "500"])?;
    let field = |path: &str, name: &str| -> Result<String> {
        let text = std::fs::read_to_string(path)?;
        text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).context(name.to_string())
    };
    let soft: usize = field("/proc/self/limits", "Max open files")?
        .split_whitespace()
        .next()
        .context("soft limit")?
        .parse()
        .unwrap_or(usize::MAX);
    let size: usize = field(&format!("/proc/{}/status", server.pid()), "FDSize:")?.parse()?;
    assert!(size >= 564.min(soft), "the descriptor table holds {size} entries (soft limit {soft})");
    Ok(())
}

#[test]
fn the_listen_queue_is_beanstalkds_1024() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let port = server.addr().port();
    // /proc/net/tcp does not show the backlog; ss does, as Send-Q of a listening socket.
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output();
    let Ok(out) = out else {
        polaris_testkit::skip_unless_ci("`ss` (iproute2) is not installed");
        return Ok(());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(send_q.get(2).copied(), Some("1024"), "ss says: {text}");
    Ok(())
}

/// `-u USER` drops to the user's own ids and groups, root's supplementary groups included,
/// as beanstalkd does (initgroups, setgid, setuid).
#[test]
fn dropping_privileges_takes_the_users_groups() -> Result<()> {
    let status = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/status"));
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    if field(&status("self")?, "Uid:").as_deref() != Some("0 0 0 0") {
        polaris_testkit::skip_unless_ci("dropping privileges needs root");
        return Ok(());
    }
    let groups = Command::new("id").args(["-G", "nobody"]).output()?;
    let mut want: Vec<String> = String::from_utf8_lossy(&groups.stdout).split_whitespace().map(String::from).collect();
    want.sort();
    let server = spawn_polarisd(&["-u", "nobody"])?;
    let text = status(&server.pid().to_string())?;
    assert_eq!(field(&text, "Uid:").as_deref(), Some("65534 65534 65534 65534"), "{text}");
    let mut got: Vec<String> =
        field(&text, "Groups:").unwrap_or_default().split_whitespace().map(String::from).collect();
    got.sort();
    assert_eq!(got, want, "supplementary groups after -u nobody");
    Ok(())
}
