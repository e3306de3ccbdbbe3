//! TLS material (feature `tls`): PEM loading with errors that name the file, and the
//! client side of a TLS connection to the queue ([`TlsClientConfig`], used by
//! [`crate::client::Client::connect_tls`]). polarisd builds its server configuration from the
//! same loaders, so a file that one accepts the other accepts too.
//!
//! rustls with the `ring` provider; the provider is passed explicitly to every builder, so
//! nothing depends on a process-wide default.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;

/// A TLS file or setting that cannot be used; the message names the file and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(pub String);

fn setup_error(message: impl Into<String>) -> TlsSetupError {
    TlsSetupError(message.into())
}

/// The crypto provider every configuration of the project uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|e| setup_error(format!("{what} {}: {e}", path.display())))
}

/// Every certificate in the PEM file at `path` (`what` names the flag in errors); at least one.
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    certs_from_pem(&read_file(path, what)?, &format!("{what} {}", path.display()))
}

/// The private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
pub fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    key_from_pem(&read_file(path, what)?, &format!("{what} {}", path.display()))
}

/// A root store of every certificate in the PEM file at `path` (a CA bundle).
pub fn load_roots(path: &Path, what: &str) -> Result<RootCertStore, TlsSetupError> {
    roots_from_pem(&read_file(path, what)?, &format!("{what} {}", path.display()))
}

fn certs_from_pem(pem: &[u8], source: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_error(format!("{source}: not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(setup_error(format!("{source}: no certificate (expected a PEM \"CERTIFICATE\" block)")));
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8], source: &str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            setup_error(format!("{source}: no private key (expected a PEM \"PRIVATE KEY\" block)"))
        }
        e => setup_error(format!("{source}: not a PEM private key file ({e})")),
    })
}

fn roots_from_pem(pem: &[u8], source: &str) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, source)? {
        roots.add(cert).map_err(|e| setup_error(format!("{source}: unusable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// The host part of a `host:port` address (`[::1]:11300` gives `::1`), the name a client
/// checks the server's certificate against unless told otherwise.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// The TLS flags of a program that connects to the queue (`--queue-ca`, `--queue-cert`,
/// `--queue-key`, `--queue-server-name` of the dispatcher and the agent), as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClientFiles {
    /// `--queue-ca`: the CA bundle the queue's certificate must chain to.
    pub ca: PathBuf,
    /// `--queue-cert`: the client's certificate chain, for a queue that requires one.
    pub cert: Option<PathBuf>,
    /// `--queue-key`: the key of `cert`.
    pub key: Option<PathBuf>,
    /// `--queue-server-name`: the name the queue's certificate must carry; `None` takes the
    /// host part of the queue address.
    pub server_name: Option<String>,
}

impl TlsClientFiles {
    /// Reads the files (every error names the flag and the file) for a queue at `addr`.
    pub fn load(&self, addr: &str) -> Result<TlsClientConfig, TlsSetupError> {
        let roots = load_roots(&self.ca, "--queue-ca")?;
        let client = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((load_certs(cert, "--queue-cert")?, load_key(key, "--queue-key")?)),
            (None, None) => None,
            _ => return Err(setup_error("--queue-cert and --queue-key go together")),
        };
        let name = self.server_name.as_deref().unwrap_or_else(|| host_of(addr));
        TlsClientConfig::build(roots, client, name).map_err(|e| match &self.cert {
            Some(cert) if e.0.starts_with("client certificate") => setup_error(format!(
                "--queue-key {} does not fit --queue-cert {}: {e}",
                self.key.as_deref().unwrap_or(Path::new("")).display(),
                cert.display()
            )),
            _ => e,
        })
    }
}

/// How a client connects to the queue over TLS: the CA(s) the server's certificate must
/// chain to, the name it must carry (a DNS name or an IP address), and optionally the
/// client's own certificate for a server that asks for one (`polarisd --tls-client-ca`).
#[derive(Clone)]
pub struct TlsClientConfig {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClientConfig")
            .field("server_name", &self.server_name)
            .field("client_cert", &self.config.client_auth_cert_resolver.has_certs())
            .finish()
    }
}

impl TlsClientConfig {
    /// From PEM files: `ca` (a bundle of one or more CA certificates) and optionally the
    /// client's certificate chain and private key. `server_name` is a DNS name or an IP
    /// address; [`host_of`] gives the usual one for an address.
    pub fn from_files(
        ca: &Path,
        client_cert: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> Result<TlsClientConfig, TlsSetupError> {
        let roots = load_roots(ca, "CA file")?;
        let client = match client_cert {
            Some((cert, key)) => Some((load_certs(cert, "client certificate")?, load_key(key, "client key")?)),
            None => None,
        };
        Self::build(roots, client, server_name)
    }

    /// As [`TlsClientConfig::from_files`], from PEM text in memory.
    pub fn from_pem(
        ca: &[u8],
        client_cert: Option<(&[u8], &[u8])>,
        server_name: &str,
    ) -> Result<TlsClientConfig, TlsSetupError> {
        let roots = roots_from_pem(ca, "CA")?;
        let client = match client_cert {
            Some((cert, key)) => Some((certs_from_pem(cert, "client certificate")?, key_from_pem(key, "client key")?)),
            None => None,
        };
        Self::build(roots, client, server_name)
    }

    fn build(
        roots: RootCertStore,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        server_name: &str,
    ) -> Result<TlsClientConfig, TlsSetupError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| setup_error(format!("server name {server_name:?} is neither a DNS name nor an IP address")))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_error(format!("TLS versions: {e}")))?
            .with_root_certificates(roots);
        let config = match client {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| setup_error(format!("client certificate and key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClientConfig { config: Arc::new(config), server_name })
    }

    /// The name the server's certificate must carry.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// A new client-side TLS session for one connection, for a caller that drives its own
    /// socket (e.g. `rustls::StreamOwned::new(session, socket)`).
    pub fn session(&self) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(self.config.clone(), self.server_name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_takes_the_host_part() {
        assert_eq!(host_of("127.0.0.1:11300"), "127.0.0.1");
        assert_eq!(host_of("queue.example:11300"), "queue.example");
        assert_eq!(host_of("[::1]:11300"), "::1");
        assert_eq!(host_of("queue.example"), "queue.example");
    }

    #[test]
    fn bad_pem_is_refused_with_the_source_named() {
        let err = TlsClientConfig::from_pem(b"not pem", None, "localhost").unwrap_err();
        assert!(err.0.contains("CA") && err.0.contains("no certificate"), "{err}");
        let err = TlsClientConfig::from_files(Path::new("/nonexistent/ca.pem"), None, "localhost").unwrap_err();
        assert!(err.0.contains("/nonexistent/ca.pem"), "{err}");
    }
}
