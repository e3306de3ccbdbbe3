//! The client's TLS (feature `tls`): `Client::connect_tls` and `Endpoint` against a small
//! rustls server in a thread of this test, with certificates made at test time. What the
//! client must refuse (an unknown CA, the wrong name, a plain server) fails at connect.

use polaris_proto::client::{Client, Endpoint, Error, TlsClientConfig, TlsClientFiles};
use polaris_proto::tls::{load_certs, load_key, load_roots, provider};
use polaris_testkit::tls::TestPki;
use rustls::server::WebPkiClientVerifier;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

fn server_config(pki: &TestPki, client_certs: bool) -> Arc<rustls::ServerConfig> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().unwrap();
    let builder = if client_certs {
        let roots = load_roots(&pki.ca, "CA").unwrap();
        builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(load_certs(&pki.server_cert, "cert").unwrap(), load_key(&pki.server_key, "key").unwrap())
        .unwrap();
    Arc::new(config)
}

/// A one-connection-at-a-time beanstalk stand-in over TLS: answers `put` with
/// `INSERTED 7` and `stats` with a tiny document. Returns its address.
fn tls_server(config: Arc<rustls::ServerConfig>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for socket in listener.incoming() {
            let Ok(socket) = socket else { continue };
            let config = config.clone();
            thread::spawn(move || {
                let session = rustls::ServerConnection::new(config).unwrap();
                let mut stream = BufReader::new(rustls::StreamOwned::new(session, socket));
                let mut line = String::new();
                while stream.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let reply: Vec<u8> = if line.starts_with("put ") {
                        let len: usize = line.trim_end().rsplit(' ').next().unwrap().parse().unwrap();
                        let mut body = vec![0u8; len + 2];
                        stream.read_exact(&mut body).unwrap();
                        b"INSERTED 7\r\n".to_vec()
                    } else if line == "stats\r\n" {
                        let doc = "---\nversion: \"1.12\"\ncurrent-jobs-ready: 1\n";
                        format!("OK {}\r\n{doc}\r\n", doc.len()).into_bytes()
                    } else {
                        b"UNKNOWN_COMMAND\r\n".to_vec()
                    };
                    if stream.get_mut().write_all(&reply).and_then(|()| stream.get_mut().flush()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// A plain-TCP beanstalk stand-in that answers anything with `UNKNOWN_COMMAND`.
fn plain_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for socket in listener.incoming() {
            let Ok(mut socket) = socket else { continue };
            let mut buf = [0u8; 4096];
            if socket.read(&mut buf).is_ok_and(|n| n > 0) {
                let _ = socket.write_all(b"UNKNOWN_COMMAND\r\n");
            }
        }
    });
    addr
}

fn new_pki() -> (tempfile::TempDir, TestPki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    (dir, pki)
}

#[test]
fn connect_tls_verifies_the_server_and_speaks_the_protocol() {
    let (_dir, pki) = new_pki();
    let addr = tls_server(server_config(&pki, false));
    for name in ["127.0.0.1", "localhost"] {
        let config = TlsClientConfig::from_files(&pki.ca, None, name).unwrap();
        assert_eq!(config.server_name(), name);
        let mut client = Client::connect_tls(&addr, &config, TIMEOUT).unwrap();
        assert!(client.is_tls());
        assert_eq!(client.put(0, 0, 60, b"hello").unwrap(), 7);
        assert_eq!(client.stats().unwrap().get("version"), Some("1.12"));
    }
    // From the flags, the server name defaults to the host part of the address.
    let files = TlsClientFiles { ca: pki.ca.clone(), ..Default::default() };
    let endpoint = Endpoint::from_flags(&addr, Some(&files)).unwrap();
    assert!(endpoint.is_tls());
    assert_eq!(endpoint.to_string(), format!("{addr} (TLS)"));
    assert_eq!(endpoint.connect(TIMEOUT).unwrap().stats().unwrap().get_u64("current-jobs-ready"), Some(1));
    assert!(!Endpoint::from_flags(&addr, None).unwrap().is_tls());
}

#[test]
fn connect_tls_refuses_an_unknown_ca_the_wrong_name_and_a_plain_server() {
    let (_dir, pki) = new_pki();
    let addr = tls_server(server_config(&pki, false));
    // Every generated PKI has its own CA: the other one did not sign this server's certificate.
    let (_other_dir, other) = new_pki();
    let wrong_ca = TlsClientConfig::from_files(&other.ca, None, "127.0.0.1").unwrap();
    let err = Client::connect_tls(&addr, &wrong_ca, TIMEOUT).unwrap_err();
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    let wrong_name = TlsClientConfig::from_files(&pki.ca, None, "queue.example").unwrap();
    assert!(Client::connect_tls(&addr, &wrong_name, TIMEOUT).is_err());
    let files = TlsClientFiles { ca: pki.ca.clone(), server_name: Some("queue.example".into()), ..Default::default() };
    assert!(Endpoint::from_flags(&addr, Some(&files)).unwrap().connect(TIMEOUT).is_err());

    let plain = plain_server();
    let config = TlsClientConfig::from_files(&pki.ca, None, "127.0.0.1").unwrap();
    let started = std::time::Instant::now();
    assert!(Client::connect_tls(&plain, &config, TIMEOUT).is_err());
    assert!(started.elapsed() < TIMEOUT, "a plain server is found out at once");
}

#[test]
fn client_certificates_are_presented_when_configured() {
    let (_dir, pki) = new_pki();
    let addr = tls_server(server_config(&pki, true));
    let with_cert =
        TlsClientConfig::from_files(&pki.ca, Some((&pki.client_cert, &pki.client_key)), "127.0.0.1").unwrap();
    assert_eq!(Client::connect_tls(&addr, &with_cert, TIMEOUT).unwrap().put(0, 0, 1, b"x").unwrap(), 7);
    let files = TlsClientFiles {
        ca: pki.ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        server_name: None,
    };
    assert_eq!(
        Endpoint::from_flags(&addr, Some(&files)).unwrap().connect(TIMEOUT).unwrap().put(0, 0, 1, b"x").unwrap(),
        7
    );
    // Without one the server refuses: at the handshake or (TLS 1.3) at the first reply.
    let without = TlsClientConfig::from_files(&pki.ca, None, "127.0.0.1").unwrap();
    let result = Client::connect_tls(&addr, &without, TIMEOUT).and_then(|mut c| c.put(0, 0, 1, b"x"));
    assert!(matches!(result, Err(Error::Io(_) | Error::Closed)), "{result:?}");
}

#[test]
fn bad_files_are_refused_naming_the_flag_and_the_file() {
    let (dir, pki) = new_pki();
    let missing = dir.path().join("nope.pem");
    let err = Endpoint::from_flags("127.0.0.1:1", Some(&TlsClientFiles { ca: missing.clone(), ..Default::default() }))
        .unwrap_err();
    assert!(err.to_string().contains("--queue-ca") && err.to_string().contains("nope.pem"), "{err}");
    // A key that is not the certificate's.
    let files = TlsClientFiles {
        ca: pki.ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.stranger_key.clone()),
        server_name: None,
    };
    let err = Endpoint::from_flags("127.0.0.1:1", Some(&files)).unwrap_err();
    assert!(err.to_string().contains("does not fit") && err.to_string().contains("stranger.key"), "{err}");
    let files = TlsClientFiles { ca: pki.server_key.clone(), ..Default::default() };
    let err = Endpoint::from_flags("127.0.0.1:1", Some(&files)).unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
    // An unconnectable socket stays an I/O error, not a TLS one.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let config = TlsClientConfig::from_files(&pki.ca, None, "127.0.0.1").unwrap();
    assert!(matches!(Client::connect_tls(&closed, &config, TIMEOUT), Err(Error::Io(_))));
}
