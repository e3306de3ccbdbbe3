//! Blocking helpers: the commands sent before and around a measured run (`ping`, the
//! `use`/`watch`/`stats` that set up a load connection, the idle connections), and
//! `free-port`.
//!
//! `ping` uses `polaris_proto`'s client. The connections of a load run cannot: they are
//! handed to the poll loop afterwards (the client keeps its socket, and a second
//! descriptor for writing), and each idle connection must cost exactly one descriptor.
//! They are driven with [`sync_cmd`] on a plain `TcpStream` instead.

use crate::reply::{find_crlf, parse_u64};
use anyhow::{anyhow, bail, Context, Result};
use polaris_proto::client::{self, Client, Stats};
use polaris_proto::reply::{OK_PREFIX, USING_PREFIX};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `cmd` and reads exactly one reply (a line, or `OK <n>` and its body).
pub(crate) fn sync_cmd(stream: &mut TcpStream, cmd: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(cmd)?;
    read_one_reply(stream)
}

fn read_one_reply(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_crlf(&buf) {
            if let Some(n) = buf.strip_prefix(OK_PREFIX).and_then(|r| parse_u64(&r[..end - OK_PREFIX.len()])) {
                let total = end + 2 + n as usize + 2;
                if buf.len() >= total {
                    return Ok(buf);
                }
            } else {
                return Ok(buf);
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(crate) fn connect_std(addr: &str) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects and asks for `stats` until the server answers, or `timeout` passes; returns
/// the answer. A server that is not up yet (refused, closed, silent) is asked again; one
/// that answers something else than `OK <n>` fails at once.
pub(crate) fn ping(addr: &str, timeout: Duration) -> Result<Stats> {
    let start = Instant::now();
    let left = || timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
    loop {
        let attempt = Client::connect(addr, left()).and_then(|mut c| {
            c.set_io_timeout(Some(left()))?;
            c.stats()
        });
        let not_yet = match attempt {
            Ok(stats) => return Ok(stats),
            // Not up yet (refused, reset, closed, silent): ask again. The client's I/O
            // error is unwrapped so its message is not printed twice.
            Err(client::Error::Io(e)) => anyhow::Error::new(e),
            Err(client::Error::Closed) => anyhow!("server closed the connection"),
            Err(e) => bail!("unexpected reply to stats: {e}"),
        };
        if start.elapsed() >= timeout {
            return Err(not_yet.context(format!("no answer from {addr} within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn free_port() -> Result<()> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    Ok(())
}

/// Opens `k` connections and has each answer one command, so the server has
/// certainly accepted them. Done in batches to stay within the listen backlog.
pub(crate) fn open_idle(addr: &str, k: usize) -> Result<Vec<TcpStream>> {
    let mut all = Vec::with_capacity(k);
    while all.len() < k {
        let batch = (k - all.len()).min(200);
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            let s = connect_std(addr)
                .with_context(|| format!("opening idle connection {} of {k}", all.len() + fresh.len() + 1))?;
            fresh.push(s);
        }
        for s in &mut fresh {
            s.write_all(b"list-tube-used\r\n")?;
        }
        for s in &mut fresh {
            let r = read_one_reply(s)?;
            if !r.starts_with(USING_PREFIX) {
                bail!("idle connection got {:?}", String::from_utf8_lossy(&r));
            }
        }
        all.append(&mut fresh);
    }
    Ok(all)
}
