//! TLS for polarisd's listeners (`--tls-cert`, `--tls-key`, `--tls-client-ca`): the rustls
//! server configuration, built once at start from the PEM files, and [`TlsStream`], one
//! connection's TLS session over its non-blocking socket.
//!
//! `TlsStream` is driven by the event loop exactly like a plain socket, through `read` and
//! `write` that return `WouldBlock` when the socket has nothing more to give or take; the
//! differences the loop must respect are documented on each method. The plain-socket path
//! does not go through this module at all.

use anyhow::Context as _;
use mio::net::TcpStream;
use polaris_proto::tls::{load_certs, load_key, load_roots, provider};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// The TLS flags, as given.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// `--tls-cert`: the server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// `--tls-key`: its private key (PEM).
    pub key: PathBuf,
    /// `--tls-client-ca`: clients must present a certificate signed by a CA in this bundle.
    pub client_ca: Option<PathBuf>,
}

/// Reads and checks the files named by `settings`; every error names the flag and the file.
pub fn server_config(settings: &TlsSettings) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(&settings.cert, "--tls-cert")?;
    let key = load_key(&settings.key, "--tls-key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &settings.client_ca {
        Some(path) => {
            let roots = load_roots(path, "--tls-client-ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("--tls-client-ca {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "--tls-key {} does not fit --tls-cert {} (the key must be the certificate's, and of a kind rustls \
             supports: RSA, ECDSA P-256/P-384 or Ed25519)",
            settings.key.display(),
            settings.cert.display()
        )
    })?;
    Ok(Arc::new(config))
}

/// One TLS connection: the rustls session and its socket.
pub struct TlsStream {
    session: ServerConnection,
    socket: TcpStream,
}

impl TlsStream {
    /// Starts the server side of a handshake on an accepted socket.
    pub fn new(config: &Arc<rustls::ServerConfig>, socket: TcpStream) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream { session: ServerConnection::new(config.clone())?, socket })
    }

    /// The socket, for registering with the poll and for peeking at a hang-up.
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// The socket, mutably.
    pub fn socket_mut(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    /// Whether encrypted bytes (handshake messages, records of earlier writes, an alert)
    /// wait to be written: the loop flushes such a connection even when its reply buffer is
    /// empty.
    pub fn wants_write(&self) -> bool {
        self.session.wants_write()
    }

    /// Writes what rustls has encrypted until it is all out (`Ok`) or the socket is full
    /// (`WouldBlock`: the socket's writable edge comes later).
    pub fn write_pending(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues a `close_notify` alert and tries once to write everything pending.
    pub fn close(&mut self) {
        self.session.send_close_notify();
        let _ = self.write_pending();
    }
}

impl Read for TlsStream {
    /// Decrypted bytes into `buf`. `Ok(0)` is the end of the stream (`close_notify`, or the
    /// peer's TCP end without one); `WouldBlock` comes only when rustls holds no decrypted
    /// bytes *and* the socket is drained, so the loop must read until `WouldBlock` (a short
    /// read proves nothing here: rustls may still hold plaintext, and the socket's edge is
    /// spent). Handshake replies are written as the handshake goes; a handshake that fails
    /// is an `InvalidData` error (after one try to send the alert).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Nothing decrypted is waiting: take more records from the socket (`Ok(0)`, the
            // end of file, is recorded by rustls and reported by the reader above).
            self.session.read_tls(&mut self.socket)?;
            if let Err(e) = self.session.process_new_packets() {
                let _ = self.write_pending();
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            // The handshake's next flight (or a key update). A full socket is not this
            // read's business: its writable edge brings the loop back to write the rest.
            match self.write_pending() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsStream {
    /// Takes up to rustls's buffer limit (64 KiB of unsent records) of `buf` and writes what
    /// it can. `WouldBlock` when the socket is full with earlier records: nothing is taken,
    /// so reply bytes wait in the connection's own output buffer, where
    /// `--max-output-buffer` counts them.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_pending()?;
        let n = self.session.writer().write(buf)?;
        match self.write_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The bytes are taken; the error shows again at the next write.
            Err(_) if n > 0 => {}
            Err(e) => return Err(e),
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
