//! TLS on polarisd's listeners (`--tls-cert`, `--tls-key`, `--tls-client-ca`,
//! `--tls-listen`): `openssl s_client` and the project's client speak beanstalk over it, a
//! plain client or one without an accepted certificate is refused without disturbing the
//! others, and big, pipelined and backpressured traffic comes through whole.
//!
//! Certificates are made at test time ([`TestPki`]). The `openssl` tests print SKIP without
//! the `openssl` tool, except under CI, where `.ci/run` installs it.

use anyhow::{bail, Context, Result};
use polaris_proto::client::{Client, TlsClientConfig};
use polaris_testkit::tls::{have_openssl, TestPki};
use polaris_testkit::{binary, parse_reply, skip_unless_ci, spawn_polarisd, wait_until, ServerProcess};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

fn pki() -> Result<(tempfile::TempDir, TestPki)> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path());
    Ok((dir, pki))
}

/// polarisd with a TLS main listener (and `extra` flags).
fn tls_server(pki: &TestPki, client_certs: bool, extra: &[&str]) -> Result<ServerProcess> {
    let mut args = pki.server_args(client_certs);
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_polarisd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn client_config(pki: &TestPki, cert: Option<(&std::path::Path, &std::path::Path)>) -> Result<TlsClientConfig> {
    Ok(TlsClientConfig::from_files(&pki.ca, cert, "127.0.0.1")?)
}

fn connect_tls(addr: SocketAddr, config: &TlsClientConfig) -> polaris_proto::client::Result<Client> {
    Client::connect_tls(&addr.to_string(), config, TIMEOUT)
}

fn require_openssl() -> bool {
    if have_openssl() {
        return true;
    }
    skip_unless_ci("the `openssl` command-line tool is not installed (Debian package openssl)");
    false
}

/// What `openssl s_client` printed on stdout after sending `input` (which should end with
/// `quit`, so the server closes and s_client exits), and whether it exited with 0.
fn s_client(addr: SocketAddr, pki: &TestPki, extra: &[&str], input: &[u8]) -> Result<(String, bool, String)> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-quiet", "-verify_return_error"])
        .arg("-CAfile")
        .arg(&pki.ca)
        .args(["-verify_ip", "127.0.0.1"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting openssl s_client")?;
    // -quiet implies -ign_eof: closing stdin does not end the session, the server's close does.
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input)?;
    drop(stdin);
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let err_reader = thread::spawn(move || {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err);
        err
    });
    let out = match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("openssl s_client did not finish within {TIMEOUT:?}");
        }
    };
    let status = child.wait()?;
    let err = err_reader.join().unwrap_or_default();
    Ok((String::from_utf8_lossy(&out).into_owned(), status.success(), String::from_utf8_lossy(&err).into_owned()))
}

/// Sends `bytes` on a plain TCP connection and returns what came back before the server
/// closed it; fails if the server keeps it open.
fn plain_exchange(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(bytes)?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => bail!("the server kept a plain connection on its TLS listener open: {e} (got {got:?})"),
        }
    }
}

#[test]
fn openssl_s_client_speaks_beanstalk_over_tls() -> Result<()> {
    if !require_openssl() {
        return Ok(());
    }
    let (_dir, pki) = pki()?;
    let server = tls_server(&pki, false, &[])?;
    let (out, ok, err) = s_client(
        server.addr(),
        &pki,
        &[],
        b"use tls\r\nput 0 0 60 5\r\nhello\r\nwatch tls\r\nreserve\r\nstats\r\ndelete 1\r\nquit\r\n",
    )?;
    assert!(ok, "s_client failed: {err}\nstdout: {out}");
    assert!(
        out.starts_with("USING tls\r\nINSERTED 1\r\nWATCHING 2\r\nRESERVED 1 5\r\nhello\r\nOK "),
        "stdout: {out:?}\nstderr: {err}"
    );
    assert!(out.contains("\r\n---\ncurrent-jobs-urgent: 0\n"), "stats over TLS: {out:?}");
    assert!(out.ends_with("\r\nDELETED\r\n"), "stdout: {out:?}");
    Ok(())
}

#[test]
fn a_plain_client_on_a_tls_listener_is_closed_and_others_go_on() -> Result<()> {
    let (_dir, pki) = pki()?;
    let server = tls_server(&pki, false, &[])?;
    let config = client_config(&pki, None)?;
    let mut tls = connect_tls(server.addr(), &config)?;
    assert!(tls.is_tls());
    let id = tls.put(0, 0, 60, b"before")?;

    // Plain beanstalk on the TLS port: no beanstalk reply, and the connection is closed.
    let got = plain_exchange(server.addr(), b"stats\r\n")?;
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("OK") && !text.contains("UNKNOWN_COMMAND"), "plain client got {got:?}");
    // A TLS client that stops in the middle of its handshake only loses its own connection.
    let mut half = TcpStream::connect(server.addr())?;
    half.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01])?;

    // The TLS connection made before is untouched, and new ones work.
    assert_eq!(tls.peek(id)?.body, b"before");
    let mut other = connect_tls(server.addr(), &config)?;
    assert_eq!(other.reserve_with_timeout(0)?.map(|j| j.id), Some(id));
    assert_eq!(
        tls.stats()?.get_u64("current-connections"),
        Some(3),
        "the half-open handshake counts, the closed one not"
    );
    drop(half);
    // The plain client of the shim cannot speak TLS either: its connect fails at once.
    assert!(Client::connect(&server.addr().to_string(), TIMEOUT).and_then(|mut c| c.stats()).is_err());
    Ok(())
}

#[test]
fn client_certificates_are_required_with_tls_client_ca() -> Result<()> {
    let (_dir, pki) = pki()?;
    let server = tls_server(&pki, true, &[])?;
    let addr = server.addr();

    // The project's client: with the CA's client certificate it works ...
    let good = client_config(&pki, Some((&pki.client_cert, &pki.client_key)))?;
    let mut c = connect_tls(addr, &good)?;
    assert_eq!(c.put(0, 0, 60, b"x")?, 1);
    // ... without one, or with one from another CA, it is refused (TLS 1.3 reports it at the
    // first reply at the latest).
    for (label, config) in [
        ("no certificate", client_config(&pki, None)?),
        ("a stranger's certificate", client_config(&pki, Some((&pki.stranger_cert, &pki.stranger_key)))?),
    ] {
        let result = connect_tls(addr, &config).and_then(|mut c| c.stats());
        assert!(result.is_err(), "{label}: {result:?}");
    }
    // The refusals cost the good connection nothing.
    assert_eq!(c.stats()?.get_u64("current-connections"), Some(1));

    if !require_openssl() {
        return Ok(());
    }
    let (out, ok, err) = s_client(addr, &pki, &[], b"stats\r\nquit\r\n")?;
    assert!(!ok && !out.contains("OK"), "s_client without a certificate: ok {ok}, stdout {out:?}, stderr {err}");
    let cert = pki.client_cert.display().to_string();
    let key = pki.client_key.display().to_string();
    let (out, ok, err) = s_client(addr, &pki, &["-cert", &cert, "-key", &key], b"peek 1\r\nquit\r\n")?;
    assert!(ok, "s_client with a certificate failed: {err}");
    assert_eq!(out, "FOUND 1 1\r\nx\r\n");
    Ok(())
}

#[test]
fn tls_listen_adds_a_tls_listener_and_the_plain_one_stays_plain() -> Result<()> {
    let (_dir, pki) = pki()?;
    let mut args = pki.server_args(false);
    args.extend(["--tls-listen".into(), "127.0.0.1:0".into()]);
    let server = spawn_polarisd(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    wait_until(TIMEOUT, "the TLS listener's banner", || server.output().contains("listening for TLS on "));
    let output = server.output();
    let tls_addr: SocketAddr =
        output.lines().find_map(|l| l.strip_prefix("listening for TLS on ")).context("banner")?.trim().parse()?;
    assert_ne!(tls_addr, server.addr());

    // Plain clients on -l/-p, as beanstalkd clients expect.
    let mut plain = server.connect()?;
    assert_eq!(plain.line("put 0 0 60 5\r\nplain\r\n")?, "INSERTED 1");
    // TLS clients on --tls-listen, on the same queue.
    let config = client_config(&pki, None)?;
    let mut tls = connect_tls(tls_addr, &config)?;
    assert_eq!(tls.reserve_with_timeout(0)?.map(|j| j.body), Some(b"plain".to_vec()));
    tls.put(0, 0, 60, b"secret")?;
    assert_eq!(plain.line("peek 2\r\n")?, "FOUND 2 6");
    // Neither listener speaks the other's language.
    assert!(connect_tls(server.addr(), &config).is_err(), "TLS on the plain listener");
    assert!(!String::from_utf8_lossy(&plain_exchange(tls_addr, b"stats\r\n")?).contains("OK"));
    assert_eq!(plain.line("stats-job 2\r\n")?.split(' ').next(), Some("OK"));

    if require_openssl() {
        let (out, ok, err) = s_client(tls_addr, &pki, &[], b"peek 2\r\nquit\r\n")?;
        assert!(ok, "{err}");
        assert_eq!(out, "FOUND 2 6\r\nsecret\r\n");
    }
    Ok(())
}

/// One TLS connection driven by the test (no `Client`), to pipeline freely.
fn raw_tls(
    addr: SocketAddr,
    config: &TlsClientConfig,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let socket = TcpStream::connect(addr)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.set_write_timeout(Some(TIMEOUT))?;
    Ok(rustls::StreamOwned::new(config.session()?, socket))
}

/// Reads `count` reply frames.
fn read_replies(stream: &mut impl Read, count: usize) -> Result<Vec<polaris_testkit::Reply>> {
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while replies.len() < count {
        while let Some((reply, used)) = parse_reply(&buf) {
            buf.drain(..used);
            replies.push(reply);
        }
        if replies.len() >= count {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {} of {count} replies", replies.len());
        }
        let n = stream.read(&mut chunk).with_context(|| format!("after {} of {count} replies", replies.len()))?;
        if n == 0 {
            bail!("closed after {} of {count} replies", replies.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(replies)
}

#[test]
fn big_pipelined_and_backpressured_traffic_comes_through_tls_whole() -> Result<()> {
    let (_dir, pki) = pki()?;
    let server = tls_server(&pki, false, &["-z", "2000000", "--max-output-buffer", "8192"])?;
    let config = client_config(&pki, None)?;

    // A job much larger than a TLS record, both ways.
    let big: Vec<u8> = (0..1_500_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut c = connect_tls(server.addr(), &config)?;
    let id = c.put(0, 0, 60, &big)?;
    assert_eq!(c.peek(id)?.body, big);

    // Pipelined: many commands in one write, spread over many records, mixed with replies
    // far larger than --max-output-buffer, so the connection stalls and resumes again and
    // again while its input is still in the socket or in the TLS session.
    let body: Vec<u8> = (0..30_000u32).map(|i| b'0' + (i % 10) as u8).collect();
    let mut s = raw_tls(server.addr(), &config)?;
    let mut first = format!("put 0 0 60 {}\r\n", body.len()).into_bytes();
    first.extend_from_slice(&body);
    first.extend_from_slice(b"\r\n");
    s.write_all(&first)?;
    let put_id = match read_replies(&mut s, 1)?.remove(0).line_str().strip_prefix("INSERTED ") {
        Some(id) => id.parse::<u64>()?,
        None => bail!("put refused"),
    };
    let rounds = 300;
    let mut pipeline = Vec::new();
    for _ in 0..rounds {
        pipeline.extend_from_slice(format!("peek {put_id}\r\nput 0 0 60 1000\r\n").as_bytes());
        pipeline.extend_from_slice(&body[..1000]);
        pipeline.extend_from_slice(b"\r\n");
    }
    s.write_all(&pipeline)?;
    s.flush()?;
    let replies = read_replies(&mut s, 2 * rounds)?;
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair[0].line_str(), format!("FOUND {put_id} {}", body.len()), "round {i}");
        assert!(pair[0].body.as_deref() == Some(&body[..]), "round {i}: body differs");
        assert!(pair[1].line_str().starts_with("INSERTED "), "round {i}: {}", pair[1].line_str());
    }
    // Whoever else is connected was served all along.
    assert_eq!(c.stats()?.get_u64("current-jobs-ready"), Some(2 + rounds as u64));
    Ok(())
}

#[test]
fn bad_tls_flags_and_files_fail_the_start_with_the_file_named() -> Result<()> {
    let (dir, pki) = pki()?;
    let run = |args: &[&str]| -> Result<(bool, String)> {
        let out = Command::new(binary("polarisd"))
            .args(["-l", "127.0.0.1", "-p", "0"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let cert = pki.server_cert.display().to_string();
    let key = pki.server_key.display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n")?;
    let not_pem = not_pem.display().to_string();
    let other_key = pki.client_key.display().to_string();

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--tls-cert", &missing, "--tls-key", &key], vec!["--tls-cert", &missing]),
        (vec!["--tls-cert", &cert, "--tls-key", &missing], vec!["--tls-key", &missing]),
        (vec!["--tls-cert", &not_pem, "--tls-key", &key], vec!["--tls-cert", &not_pem, "no certificate"]),
        (vec!["--tls-cert", &cert, "--tls-key", &not_pem], vec!["--tls-key", &not_pem, "no private key"]),
        (vec!["--tls-cert", &cert, "--tls-key", &other_key], vec!["does not fit", &other_key]),
        (vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &not_pem], vec!["--tls-client-ca", &not_pem]),
        (vec!["--tls-cert", &cert], vec!["--tls-key"]),
        (vec!["--tls-key", &key], vec!["--tls-cert"]),
        (vec!["--tls-listen", "127.0.0.1:0"], vec!["--tls-cert"]),
        (vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-listen", "nowhere"], vec!["HOST:PORT"]),
    ];
    for (args, wanted) in cases {
        let (ok, stderr) = run(&args)?;
        assert!(!ok, "{args:?} started");
        for w in wanted {
            assert!(stderr.contains(w), "{args:?}: stderr {stderr:?} does not name {w:?}");
        }
    }
    let sock = dir.path().join("q.sock").display().to_string();
    let out = Command::new(binary("polarisd"))
        .args(["-l", &format!("unix:{sock}"), "--tls-cert", &cert, "--tls-key", &key])
        .stdin(Stdio::null())
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-listen"), "{out:?}");
    Ok(())
}
