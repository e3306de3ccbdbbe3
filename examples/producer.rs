//! A producer: puts one job per line of standard input on a tube.
//!
//! ```sh
//! printf 'hello\nworld\n' | cargo run --example producer -- 127.0.0.1:11300 words
//! ```
//!
//! Each line becomes one job body. Priority 1024 (beanstalkd's "normal"), no delay, and a
//! TTR of 60 s: a worker that reserves a job has a minute to delete it before the queue
//! hands it to another worker. The job id the server acknowledged is printed per line, so a
//! script can follow a job with `job-state <id>` (a polarisd extension).

use polaris_proto::client::Client;
use std::io::BufRead;
use std::time::Duration;

const PRIORITY: u32 = 1024;
const TTR_SECS: u32 = 60;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:11300".into());
    let tube = args.next().unwrap_or_else(|| "default".into());

    let mut queue = Client::connect(&addr, Duration::from_secs(5))?;
    // `use` names the tube that later puts go to; the client refuses invalid names
    // before anything reaches the wire.
    queue.use_tube(&tube)?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        // INSERTED is only sent once the job is stored (committed to SQLite with -b).
        let id = queue.put(PRIORITY, 0, TTR_SECS, line.as_bytes())?;
        println!("{id} {line}");
    }
    Ok(())
}
