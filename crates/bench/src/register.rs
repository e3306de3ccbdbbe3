//! Registering the simulated hosts with the dispatchers, as polaris-agent's heartbeat
//! thread does (`POST /v1/hosts` `{"id", "hostname", "facts": {}}`), several at a time.
//! Host `n` registers with dispatcher `n mod D`. The answer may name the queue shard the
//! host belongs to (`"queue": "HOST:PORT"`); without it the host uses `--queue`.

use crate::sim::SimHost;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// Attempts per host while the dispatcher is unreachable or answers 5xx/429.
const ATTEMPTS: u32 = 5;

/// The id of simulated host number `n` (from 1): `sim-00001`.
pub(crate) fn host_id(n: usize) -> String {
    format!("sim-{n:05}")
}

/// The shard a registration answer names, or `fallback`.
pub(crate) fn queue_of(answer: &Value, fallback: &str) -> Result<String> {
    match answer.get("queue") {
        None | Some(Value::Null) => Ok(fallback.to_string()),
        Some(Value::String(addr)) if !addr.is_empty() => Ok(addr.clone()),
        Some(other) => bail!("the registration answer's \"queue\" is not an address: {other}"),
    }
}

/// Registers hosts `first..first+count` (numbers from 1), `threads` at a time; answers
/// them with their queues, in number order.
pub(crate) fn register_all(
    dispatchers: &[String],
    first: usize,
    count: usize,
    fallback_queue: &str,
    threads: usize,
) -> Result<Vec<SimHost>> {
    if dispatchers.is_empty() {
        bail!("no dispatcher to register with (--dispatch URL)");
    }
    let threads = threads.clamp(1, count.max(1));
    let numbers: Vec<usize> = (first..first + count).collect();
    let results: Vec<Result<Vec<(usize, SimHost)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<usize> = numbers.iter().copied().skip(t).step_by(threads).collect();
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                    mine.into_iter()
                        .map(|n| {
                            let url = &dispatchers[n % dispatchers.len()];
                            register_one(&agent, url, n, fallback_queue).map(|host| (n, host))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a registration thread panicked"))))
            .collect()
    });
    let mut hosts = Vec::with_capacity(count);
    for result in results {
        hosts.extend(result?);
    }
    hosts.sort_by_key(|(n, _)| *n);
    Ok(hosts.into_iter().map(|(_, host)| host).collect())
}

fn register_one(agent: &ureq::Agent, url: &str, n: usize, fallback_queue: &str) -> Result<SimHost> {
    let id = host_id(n);
    let endpoint = format!("{}/v1/hosts", url.trim_end_matches('/'));
    let body = json!({"id": id, "hostname": format!("{id}.sim.invalid"), "facts": {}});
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let transient = match agent.post(&endpoint).send_json(&body) {
            Ok(response) => {
                let answer: Value =
                    response.into_json().with_context(|| format!("registering {id} at {url}: the answer"))?;
                return Ok(SimHost { queue: queue_of(&answer, fallback_queue)?, id });
            }
            Err(ureq::Error::Status(status, response)) if status < 500 && status != 429 => {
                bail!("{url} refused host {id} ({status}): {}", response.into_string().unwrap_or_default())
            }
            Err(e) => e,
        };
        if attempt == ATTEMPTS {
            return Err(anyhow!("registering {id} at {url}: {transient}"));
        }
        attempt += 1;
        std::thread::sleep(backoff);
        backoff *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_queues() {
        assert_eq!(host_id(1), "sim-00001");
        assert_eq!(host_id(20_000), "sim-20000");
        assert_eq!(host_id(123_456), "sim-123456");
        let fallback = "127.0.0.1:11300";
        assert_eq!(queue_of(&json!({"id": "sim-00001"}), fallback).ok().as_deref(), Some(fallback));
        assert_eq!(queue_of(&json!({"queue": null}), fallback).ok().as_deref(), Some(fallback));
        assert_eq!(
            queue_of(&json!({"id": "x", "queue": "127.0.0.1:11301"}), fallback).ok().as_deref(),
            Some("127.0.0.1:11301")
        );
        assert!(queue_of(&json!({"queue": 11301}), fallback).is_err());
    }
}
