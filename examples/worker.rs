//! A worker daemon: reserves jobs from a tube, handles each, and deletes it when done.
//!
//! ```sh
//! cargo run --example worker -- 127.0.0.1:11300 words
//! ```
//!
//! The handler here upper-cases the body and prints it. What matters is the protocol
//! around it, which is how every beanstalk worker is written:
//! - `watch` the tube and `ignore` `default`, so only this tube's jobs arrive;
//! - `reserve-with-timeout`, so the loop wakes up regularly instead of blocking forever
//!   (a real daemon checks for shutdown there);
//! - `delete` after success: a job that is not deleted within its TTR goes back to the
//!   queue and another worker gets it (at-least-once delivery);
//! - `bury` a job that can never succeed, so it stays visible (`peek-buried`, `kick`)
//!   instead of failing forever;
//! - `release` with a delay for a failure that may pass (a dependency being down).
//!
//! With `--drain` the worker exits once the tube stays empty for a second, which is handy
//! in scripts and tests.

use polaris_proto::client::{Client, Job};
use std::time::Duration;

/// What handling one job came to.
enum Handled {
    Done,
    /// Never going to work: keep it for a person to look at.
    Poison(String),
    /// May work later: try again after this many seconds.
    Retry(u32),
}

fn handle(job: &Job) -> Handled {
    match std::str::from_utf8(&job.body) {
        Ok(text) if text.trim().is_empty() => Handled::Retry(5),
        Ok(text) => {
            println!("{} {}", job.id, text.to_uppercase());
            Handled::Done
        }
        Err(e) => Handled::Poison(format!("body is not UTF-8: {e}")),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let drain = args.iter().any(|a| a == "--drain");
    let mut positional = args.iter().filter(|a| !a.starts_with("--"));
    let addr = positional.next().map_or("127.0.0.1:11300", String::as_str);
    let tube = positional.next().map_or("default", String::as_str);

    let mut queue = Client::connect(addr, Duration::from_secs(5))?;
    queue.watch(tube)?;
    if tube != "default" {
        queue.ignore("default")?;
    }
    loop {
        let Some(job) = queue.reserve_with_timeout(1)? else {
            if drain {
                return Ok(());
            }
            continue;
        };
        match handle(&job) {
            Handled::Done => queue.delete(job.id)?,
            Handled::Poison(why) => {
                eprintln!("burying job {}: {why}", job.id);
                queue.bury(job.id, 0)?;
            }
            Handled::Retry(delay) => queue.release(job.id, 1024, delay)?,
        }
    }
}
