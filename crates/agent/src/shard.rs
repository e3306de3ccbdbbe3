//! The queue this agent uses: `--queue` until the dispatcher names a shard.
//!
//! A dispatcher with several queue shards answers every registration and heartbeat with
//! the address of the host's shard (`"queue"`). The heartbeat thread hands it here; the
//! threads that hold queue connections (the serve loop, the control thread, the standing
//! task runners) see the generation change and reconnect there at their next safe point:
//! the serve loop between jobs, so a command never loses the connection its job is
//! reserved on. A result that could not be put because the old shard died is kept and put
//! on the new one (see the serve loop).
//!
//! Envelopes are signed, so a queue address from a forged answer can only keep work from
//! arriving, never make the agent run anything.

use polaris_proto::client::{Endpoint, TlsClientFiles};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// The queue address in force, and how many times it changed.
#[derive(Debug)]
pub struct QueueAddress {
    endpoint: RwLock<Endpoint>,
    generation: AtomicU64,
    /// TLS settings, loaded again for each new address (the server name is the address's).
    tls: Option<TlsClientFiles>,
}

impl QueueAddress {
    /// Starts at `endpoint` (from `--queue`).
    pub fn new(endpoint: Endpoint, tls: Option<TlsClientFiles>) -> QueueAddress {
        QueueAddress { endpoint: RwLock::new(endpoint), generation: AtomicU64::new(0), tls }
    }

    /// The endpoint in force and its generation.
    pub fn current(&self) -> (Endpoint, u64) {
        // Read the generation under the lock, so the pair is consistent.
        let endpoint = self.endpoint.read().unwrap_or_else(|p| p.into_inner());
        (endpoint.clone(), self.generation.load(Ordering::SeqCst))
    }

    /// The generation in force: a connection made at another one should be remade.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether a connection made at `generation` leads to a queue no longer in force.
    pub fn is_stale(&self, generation: u64) -> bool {
        generation != self.generation()
    }

    /// Moves to `addr` if it is not the address in force; answers whether it moved.
    pub fn follow(&self, addr: &str) -> bool {
        let mut endpoint = self.endpoint.write().unwrap_or_else(|p| p.into_inner());
        if endpoint.addr() == addr {
            return false;
        }
        let next = match Endpoint::from_flags(addr, self.tls.as_ref()) {
            Ok(next) => next,
            Err(e) => {
                log::error!("the dispatcher names queue shard {addr}, which cannot be used: {e}");
                return false;
            }
        };
        log::info!("moving to queue shard {addr} (was {})", endpoint.addr());
        *endpoint = next;
        self.generation.fetch_add(1, Ordering::SeqCst);
        true
    }
}

impl std::fmt::Display for QueueAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_changes_the_generation_only_on_a_new_address() {
        let address = QueueAddress::new(Endpoint::plain("127.0.0.1:11300"), None);
        assert_eq!(address.current().1, 0);
        assert!(!address.follow("127.0.0.1:11300"));
        assert_eq!(address.generation(), 0);
        assert!(address.follow("127.0.0.1:11301"));
        let (endpoint, generation) = address.current();
        assert_eq!((endpoint.addr(), generation), ("127.0.0.1:11301", 1));
        assert!(!address.follow("127.0.0.1:11301"));
        assert!(address.follow("127.0.0.1:11300"));
        assert_eq!(address.generation(), 2);
        assert!(address.is_stale(1) && !address.is_stale(2));
    }
}
