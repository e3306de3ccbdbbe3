//! The command-line flags with which the dispatcher and the agent reach the queue, defined
//! once so both programs spell and check them alike.

use polaris_proto::client::TlsClientFiles;
use std::path::PathBuf;

/// `--queue` and its TLS flags; `#[command(flatten)]` them into a program's arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueFlags {
    /// Queue (polarisd or beanstalkd) address. The dispatcher takes several, comma-separated:
    /// queue shards, each host on one (its agent is told which).
    #[arg(long, default_value = "127.0.0.1:11300")]
    pub queue: String,
    /// Connect to the queue over TLS, verifying its certificate with this CA bundle (PEM).
    #[arg(long, value_name = "FILE")]
    pub queue_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a queue that requires one (polarisd --tls-client-ca).
    #[arg(long, value_name = "FILE", requires_all = ["queue_ca", "queue_key"])]
    pub queue_cert: Option<PathBuf>,
    /// The private key of --queue-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "queue_cert")]
    pub queue_key: Option<PathBuf>,
    /// The name the queue's certificate must carry (default: the host part of --queue).
    #[arg(long, value_name = "NAME", requires = "queue_ca")]
    pub queue_server_name: Option<String>,
}

impl QueueFlags {
    /// The queue address, and its TLS files when `--queue-ca` is given.
    pub fn into_parts(self) -> (String, Option<TlsClientFiles>) {
        let tls = self.queue_ca.map(|ca| TlsClientFiles {
            ca,
            cert: self.queue_cert,
            key: self.queue_key,
            server_name: self.queue_server_name,
        });
        (self.queue, tls)
    }
}
