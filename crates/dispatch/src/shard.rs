//! Queue shards: several polarisd servers, each host's tubes on one of them.
//!
//! A host's shard is chosen by rendezvous (highest random weight) hashing of the host id
//! over the shards that are up: every (shard, host) pair gets a pseudo-random score and the
//! host goes to the shard that scores highest. Adding a shard therefore moves only the
//! hosts for which the new shard scores highest (about 1/(n+1) of them), and a shard that
//! stays unreachable past the grace period gives each of its hosts to the shard that host
//! ranks next, while every other host stays where it is. No table says where a host is: any
//! dispatcher computes the same answer from the `--queue` list and what it can reach.
//!
//! A shard is named by its address as written in `--queue`; the name is what host-job rows
//! record (`queue_shard`), so keep the spelling when restarting. Rows recorded before
//! shards existed (no name) belong to the first shard listed.

use crate::QueuePool;
use polaris_proto::client::{self, Client, Endpoint};
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shards of one dispatcher, in `--queue` order.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Shard>,
    /// How long a shard may be unreachable before its hosts move to the others.
    grace: Duration,
}

/// One queue server.
#[derive(Debug)]
pub struct Shard {
    /// The address as written in `--queue`: the name rows record.
    pub name: String,
    /// Connections for puts, deletes and lookups.
    pub pool: QueuePool,
    /// When it stopped answering, if it did.
    down_since: Mutex<Option<Instant>>,
}

/// Why a `--queue` list is refused.
#[derive(Debug, thiserror::Error)]
pub enum ShardListError {
    /// No address at all.
    #[error("--queue names no queue server")]
    Empty,
    /// One address twice: its hosts would hash to two names for one server.
    #[error("--queue names {0} twice")]
    Duplicate(String),
}

impl Shards {
    /// The shards at `endpoints`, in order; `grace` is how long one may stay unreachable
    /// before its hosts go elsewhere.
    pub fn new(endpoints: Vec<Endpoint>, grace: Duration) -> Result<Shards, ShardListError> {
        if endpoints.is_empty() {
            return Err(ShardListError::Empty);
        }
        let mut shards: Vec<Shard> = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let name = endpoint.addr().to_string();
            if shards.iter().any(|s| s.name == name) {
                return Err(ShardListError::Duplicate(name));
            }
            shards.push(Shard { name, pool: QueuePool::new(endpoint), down_since: Mutex::new(None) });
        }
        Ok(Shards { shards, grace })
    }

    /// Every shard, in `--queue` order.
    pub fn all(&self) -> &[Shard] {
        &self.shards
    }

    /// Whether there is more than one (agents are then told which one is theirs).
    pub fn is_sharded(&self) -> bool {
        self.shards.len() > 1
    }

    /// The shard a row names; `None` (rows from before shards) is the first one. A name
    /// no longer in `--queue` is `None`: its work is moved like a dead shard's.
    pub fn named(&self, name: Option<&str>) -> Option<&Shard> {
        match name {
            None => self.shards.first(),
            Some(name) => self.shards.iter().find(|s| s.name == name),
        }
    }

    /// The first shard: the whole queue when there is one.
    pub fn first(&self) -> &Shard {
        // `new` refuses an empty list.
        &self.shards[0]
    }

    /// Whether `shard` has been unreachable for longer than the grace period.
    pub fn is_dead(&self, shard: &Shard) -> bool {
        shard.down_for().is_some_and(|down| down > self.grace)
    }

    /// The shard host `host` belongs to now: the highest-scoring one that is not dead, or,
    /// when every shard is, the highest-scoring of all (its work waits there).
    pub fn for_host(&self, host: &str) -> &Shard {
        let best = |live_only: bool| {
            self.shards
                .iter()
                .filter(|s| !live_only || !self.is_dead(s))
                .max_by_key(|s| (score(&s.name, host), std::cmp::Reverse(s.name.as_str())))
        };
        best(true).or_else(|| best(false)).unwrap_or_else(|| self.first())
    }
}

impl Shard {
    /// Runs `f` on one of its pooled connections (see [`QueuePool::with_conn`]) and notes
    /// whether the server answered.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Client, &crate::QueueInfo) -> client::Result<T>,
    ) -> client::Result<T> {
        let result = self.pool.with_conn(f);
        match &result {
            Err(e) if is_unreachable(e) => self.unreachable(),
            _ => self.reachable(),
        }
        result
    }

    /// Notes that the server answered.
    pub fn reachable(&self) {
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = down.take() {
            log::info!("queue shard {} answers again (after {:.1}s)", self.name, since.elapsed().as_secs_f64());
        }
    }

    /// Notes that the server did not answer (kept from the first failure on).
    pub fn unreachable(&self) {
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none() {
            *down = Some(Instant::now());
        }
    }

    /// How long it has been unreachable, if it is.
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since.lock().unwrap_or_else(|p| p.into_inner()).map(|since| since.elapsed())
    }
}

/// Errors that say the server is not there (as opposed to a refusal it answered with).
pub fn is_unreachable(e: &client::Error) -> bool {
    matches!(e, client::Error::Io(_) | client::Error::Closed | client::Error::UnexpectedReply { .. })
}

/// Rendezvous score of `host` on shard `shard`: the first 8 bytes of SHA-256 over both
/// (with a separator no name contains), so every dispatcher and every version agrees.
fn score(shard: &str, host: &str) -> u64 {
    let digest =
        Sha256::new().chain_update(shard.as_bytes()).chain_update([0u8]).chain_update(host.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(names: &[&str]) -> Shards {
        Shards::new(names.iter().map(|n| Endpoint::plain(n)).collect(), Duration::from_secs(30)).expect("shards")
    }

    fn hosts() -> Vec<String> {
        (0..3000).map(|i| format!("host-{i:05}")).collect()
    }

    #[test]
    fn hosts_spread_over_shards() {
        let three = shards(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let mut counts = [0usize; 3];
        for host in hosts() {
            let shard = three.for_host(&host);
            counts[three.all().iter().position(|s| s.name == shard.name).expect("listed")] += 1;
        }
        // 1,000 each on average; a hash this skewed would be broken.
        assert!(counts.iter().all(|&n| (800..1200).contains(&n)), "{counts:?}");
    }

    #[test]
    fn adding_a_shard_moves_only_hosts_that_go_to_it() {
        let two = shards(&["127.0.0.1:1", "127.0.0.1:2"]);
        let three = shards(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let mut moved = 0;
        for host in hosts() {
            let (before, after) = (&two.for_host(&host).name, &three.for_host(&host).name);
            if before != after {
                assert_eq!(after, "127.0.0.1:3", "{host} moved between old shards");
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "about a third move, {moved} did");
    }

    #[test]
    fn a_dead_shards_hosts_go_to_the_survivors_and_nobody_else_moves() {
        let three = Shards::new(
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].iter().map(|n| Endpoint::plain(n)).collect(),
            Duration::ZERO,
        )
        .expect("shards");
        let before: Vec<String> = hosts().iter().map(|h| three.for_host(h).name.clone()).collect();
        three.all()[1].unreachable();
        std::thread::sleep(Duration::from_millis(2));
        assert!(three.is_dead(&three.all()[1]));
        for (host, was) in hosts().iter().zip(&before) {
            let now = &three.for_host(host).name;
            if was == "127.0.0.1:2" {
                assert_ne!(now, "127.0.0.1:2");
            } else {
                assert_eq!(now, was, "{host} moved although its shard is up");
            }
        }
        // Back up: everybody returns.
        three.all()[1].reachable();
        let after: Vec<String> = hosts().iter().map(|h| three.for_host(h).name.clone()).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn every_shard_dead_keeps_the_hash_order() {
        let two = Shards::new(vec![Endpoint::plain("127.0.0.1:1"), Endpoint::plain("127.0.0.1:2")], Duration::ZERO)
            .expect("shards");
        let before: Vec<String> = hosts().iter().map(|h| two.for_host(h).name.clone()).collect();
        for shard in two.all() {
            shard.unreachable();
        }
        std::thread::sleep(Duration::from_millis(2));
        let after: Vec<String> = hosts().iter().map(|h| two.for_host(h).name.clone()).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn lists_are_checked_and_rows_find_their_shard() {
        assert!(matches!(Shards::new(vec![], Duration::ZERO), Err(ShardListError::Empty)));
        let dup = Shards::new(vec![Endpoint::plain("a:1"), Endpoint::plain("a:1")], Duration::ZERO);
        assert!(matches!(dup, Err(ShardListError::Duplicate(name)) if name == "a:1"));
        let two = shards(&["a:1", "b:2"]);
        assert_eq!(two.named(None).map(|s| s.name.as_str()), Some("a:1"), "rows from before shards");
        assert_eq!(two.named(Some("b:2")).map(|s| s.name.as_str()), Some("b:2"));
        assert!(two.named(Some("c:3")).is_none());
        assert!(two.is_sharded() && !shards(&["a:1"]).is_sharded());
    }
}
