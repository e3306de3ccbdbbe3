//! Certificates for TLS tests, made at test time (rcgen): a CA, a server certificate for
//! `localhost` and `127.0.0.1` signed by it, a client certificate signed by it, and a client
//! certificate signed by another CA (which a server requiring client certificates must refuse).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// PEM files written into one directory.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate (`ca.pem`): clients verify the server with it, and the server
    /// verifies client certificates with it (`--tls-client-ca`).
    pub ca: PathBuf,
    /// The server's certificate (`server.pem`, for `localhost` and `127.0.0.1`).
    pub server_cert: PathBuf,
    /// Its key (`server.key`).
    pub server_key: PathBuf,
    /// A client certificate signed by the CA (`client.pem`).
    pub client_cert: PathBuf,
    /// Its key (`client.key`).
    pub client_key: PathBuf,
    /// A client certificate signed by another CA (`stranger.pem`).
    pub stranger_cert: PathBuf,
    /// Its key (`stranger.key`).
    pub stranger_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, Issuer::new(params, key))
}

fn leaf(names: &[&str], usage: ExtendedKeyUsagePurpose, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Generates everything into `dir` (which must exist).
    pub fn generate(dir: &Path) -> TestPki {
        let (ca_cert, issuer) = ca("polaris test CA");
        let (_, stranger_issuer) = ca("another CA");
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            stranger_cert: dir.join("stranger.pem"),
            stranger_key: dir.join("stranger.key"),
        };
        let write = |path: &Path, text: &str| std::fs::write(path, text).expect("writing a test certificate");
        write(&pki.ca, &ca_cert.pem());
        let (cert, key) = leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, &issuer);
        write(&pki.server_cert, &cert);
        write(&pki.server_key, &key);
        let (cert, key) = leaf(&["agent.test"], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        write(&pki.client_cert, &cert);
        write(&pki.client_key, &key);
        let (cert, key) = leaf(&["stranger.test"], ExtendedKeyUsagePurpose::ClientAuth, &stranger_issuer);
        write(&pki.stranger_cert, &cert);
        write(&pki.stranger_key, &key);
        pki
    }

    /// polarisd's flags for a TLS main listener with these certificates (`--tls-cert`,
    /// `--tls-key`, and `--tls-client-ca` when `client_certs`).
    pub fn server_args(&self, client_certs: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            self.server_cert.display().to_string(),
            "--tls-key".to_string(),
            self.server_key.display().to_string(),
        ];
        if client_certs {
            args.extend(["--tls-client-ca".to_string(), self.ca.display().to_string()]);
        }
        args
    }

    /// The dispatcher's and the agent's flags for a queue with these certificates
    /// (`--queue-ca`, and `--queue-cert`/`--queue-key` when `client_cert`).
    pub fn queue_client_args(&self, client_cert: bool) -> Vec<String> {
        let mut args = vec!["--queue-ca".to_string(), self.ca.display().to_string()];
        if client_cert {
            args.extend([
                "--queue-cert".to_string(),
                self.client_cert.display().to_string(),
                "--queue-key".to_string(),
                self.client_key.display().to_string(),
            ]);
        }
        args
    }
}

/// Whether the `openssl` command-line tool is installed.
pub fn have_openssl() -> bool {
    std::process::Command::new("openssl")
        .arg("version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
