//! A minimal HTTP/1.1 responder for `GET /metrics`, on one std thread.
//!
//! polarisd and the agent run no async runtime, and a scrape every few seconds needs
//! none: connections are answered one at a time, each with `Connection: close`, and a
//! client that sends nothing (or reads nothing) is dropped after [`IO_TIMEOUT`], so a
//! stuck scraper delays the next scrape at most that long and never touches the program's
//! own work. Only `GET` and `HEAD` of `/metrics` are answered with metrics; `/` says where
//! they are; anything else gets 404, 405 or 400.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long one connection may take to send its request or read the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) read; a longer one gets 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is not `HOST:PORT` or does not resolve.
    #[error("--metrics {addr:?} is not a usable address (expected HOST:PORT, e.g. 127.0.0.1:9100): {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Binding the address failed (in use, not a local address, no permission).
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        /// The resolved address.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The responder thread could not be started.
    #[error("cannot start the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// The running responder. Its thread lives as long as the process: there is nothing to
/// flush or hand over when the program exits.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
}

impl MetricsServer {
    /// The address it listens on (the real port when the port given was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Resolves `addr` (`HOST:PORT`), the first address it names.
pub fn parse_addr(addr: &str) -> Result<SocketAddr, ServeError> {
    let bad = |reason: String| ServeError::BadAddress { addr: addr.to_string(), reason };
    if !addr.contains(':') {
        return Err(bad("no port".into()));
    }
    addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?.next().ok_or_else(|| bad("it resolves to nothing".into()))
}

/// A bound metrics socket, not yet answering: bind early (before a program drops its
/// privileges, and so a bad address fails its start at once), serve once the values exist.
#[derive(Debug)]
pub struct BoundListener {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl BoundListener {
    /// The address it listens on (the real port when the port given was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers `GET /metrics` with `render()` from a thread named `metrics-http`.
    pub fn serve(self, render: impl Fn() -> String + Send + 'static) -> Result<MetricsServer, ServeError> {
        let BoundListener { listener, local_addr } = self;
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            if let Err(e) = answer(stream, &render) {
                                log::debug!("metrics connection: {e}");
                            }
                        }
                        // E.g. out of descriptors: the program's own work matters more;
                        // try again a little later.
                        Err(e) => {
                            log::warn!("metrics accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(ServeError::Thread)?;
        Ok(MetricsServer { local_addr })
    }
}

/// Binds `addr` (`HOST:PORT`). Fails naming the address when it cannot listen.
pub fn bind(addr: &str) -> Result<BoundListener, ServeError> {
    let resolved = parse_addr(addr)?;
    let listener = TcpListener::bind(resolved).map_err(|source| ServeError::Bind { addr: resolved, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: resolved, source })?;
    Ok(BoundListener { listener, local_addr })
}

/// [`bind`], then [`BoundListener::serve`].
pub fn serve(addr: &str, render: impl Fn() -> String + Send + 'static) -> Result<MetricsServer, ServeError> {
    bind(addr)?.serve(render)
}

/// What a request asked for, as far as this responder cares.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    Index { head_only: bool },
    NotFound,
    MethodNotAllowed,
    Malformed,
    TooLarge,
}

/// Reads the request head, up to the blank line.
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            // A request line without headers, cut short: answer what we have.
            return Ok(Some(head));
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

fn classify(head: Option<&[u8]>) -> Request {
    let Some(head) = head else { return Request::TooLarge };
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else { return Request::Malformed };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Request::Malformed;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Request::Metrics { head_only },
        "/" => Request::Index { head_only },
        _ => Request::NotFound,
    }
}

fn answer(mut stream: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let (status, content_type, body, head_only, extra) = match classify(head.as_deref()) {
        Request::Metrics { head_only } => ("200 OK", crate::CONTENT_TYPE, render(), head_only, ""),
        Request::Index { head_only } => {
            ("200 OK", "text/plain; charset=utf-8", "Metrics are at /metrics\n".to_string(), head_only, "")
        }
        Request::NotFound => {
            ("404 Not Found", "text/plain; charset=utf-8", "Not found; try /metrics\n".into(), false, "")
        }
        Request::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "Only GET and HEAD\n".into(),
            false,
            "Allow: GET, HEAD\r\n",
        ),
        Request::Malformed => ("400 Bad Request", "text/plain; charset=utf-8", "Bad request\n".into(), false, ""),
        Request::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "Request head too large\n".into(),
            false,
            "",
        ),
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        reply.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&reply)?;
    stream.flush()?;
    // Unread request bytes at close would make the kernel reset the connection, and the
    // client could lose the reply: say we are done, then read (a bounded amount of) what
    // is left.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = [0u8; 4096];
    let mut drained = 0;
    while drained < 16 * MAX_REQUEST_HEAD {
        match stream.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified() {
        let c = |s: &str| classify(Some(s.as_bytes()));
        assert_eq!(c("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Metrics { head_only: false });
        assert_eq!(c("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Request::Metrics { head_only: false });
        assert_eq!(c("HEAD /metrics HTTP/1.1\r\n\r\n"), Request::Metrics { head_only: true });
        assert_eq!(c("GET / HTTP/1.1\r\n\r\n"), Request::Index { head_only: false });
        assert_eq!(c("GET /other HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(c("POST /metrics HTTP/1.1\r\n\r\n"), Request::MethodNotAllowed);
        assert_eq!(c("GET /metrics\r\n\r\n"), Request::Malformed);
        assert_eq!(c("GET /metrics SPDY/3\r\n\r\n"), Request::Malformed);
        assert_eq!(c("\u{ff}\r\n\r\n"), Request::Malformed);
        assert_eq!(classify(None), Request::TooLarge);
    }

    #[test]
    fn bad_addresses_are_refused_by_name() {
        let e = parse_addr("nonsense").expect_err("no port");
        assert!(e.to_string().contains("\"nonsense\""), "{e}");
        assert!(parse_addr("127.0.0.1:99999").is_err());
        assert_eq!(parse_addr("127.0.0.1:9100").expect("ok").port(), 9100);
    }

    #[test]
    fn serves_what_render_returns() {
        let server = serve("127.0.0.1:0", || "# TYPE up gauge\nup 1\n".to_string()).expect("serve");
        let get = |request: &str| {
            let mut s = TcpStream::connect(server.local_addr()).expect("connect");
            s.write_all(request.as_bytes()).expect("write");
            let mut reply = String::new();
            s.read_to_string(&mut reply).expect("read");
            reply
        };
        let reply = get("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("Content-Type: text/plain; version=0.0.4"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n# TYPE up gauge\nup 1\n"), "{reply}");
        assert!(get("HEAD /metrics HTTP/1.1\r\n\r\n").ends_with("\r\n\r\n"));
        assert!(get("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("DELETE /metrics HTTP/1.1\r\n\r\n").contains("Allow: GET, HEAD"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST_HEAD + 10));
        assert!(get(&huge).starts_with("HTTP/1.1 431"));
    }
}
