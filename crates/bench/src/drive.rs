//! The measurement driver: fan-outs of one job to every simulated host, posted to the
//! dispatchers in turn, followed to the moment every host has answered.
//!
//! A fan-out is one `async.bash` job per `--max-hosts-per-job` hosts (the dispatcher takes
//! at most 10,000 per job), posted back to back. It is done when each of its jobs is: the
//! driver polls `GET /v1/jobs?limit=L` (each job's state counts, no host list), with `L`
//! just large enough to hold every job still out (only the driver makes jobs, and the list
//! is newest first). Each poll makes the dispatcher count the hosts of the jobs listed, so
//! polls are spaced by `--poll-ms` or a fiftieth of the oldest fan-out's age, whichever is
//! longer: a fan-out of seconds is seen done at most 2% late, and the polls of a 20,000-host
//! one do not load the dispatcher they measure. Every host must end `success` (a command
//! that exited non-zero is a `success` with its exit status); any other final state fails
//! the run.
//!
//! Two figures per fan-out: `observed`, from the first POST to the poll that saw it done
//! (so up to one poll late), and, when asked for, `exact`: from the first POST to the
//! latest `updated_at_ms` of its hosts (when the dispatcher recorded the last result),
//! read from `GET /v1/jobs/{id}` once the job is done, outside the timed path.

use anyhow::{anyhow, bail, Context, Result};
use polaris_ops_wire::wire::unix_now_ms;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The most jobs a listing may return (the API's page size limit).
const MAX_LIST: usize = 500;
/// Polls are at most this share of the oldest fan-out's age apart (or `--poll-ms`).
const POLL_SHARE: f64 = 0.02;

/// What the driver posts and where.
#[derive(Debug, Clone)]
pub(crate) struct DriveConfig {
    /// Dispatcher base URLs; jobs (and polls) go to each in turn.
    pub dispatchers: Vec<String>,
    /// Every host of the fleet: each fan-out targets them all.
    pub hosts: Vec<String>,
    /// Most hosts in one job.
    pub max_hosts_per_job: usize,
    /// The job's command (the simulator runs none).
    pub cmd: String,
    /// The job's `timeout`, seconds.
    pub job_timeout: u32,
    /// Time between polls.
    pub poll: Duration,
    /// A fan-out not done after this long fails the run.
    pub deadline: Duration,
}

/// One finished fan-out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    /// First POST to the poll that saw every job done.
    pub observed: Duration,
    /// First POST to the last result recorded (when asked for).
    pub exact: Option<Duration>,
}

/// A phase: fan-outs run with some in flight at once.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// The fan-outs, in the order they finished.
    pub finished: Vec<Finished>,
    /// First POST to the last fan-out done.
    pub elapsed: Duration,
    /// Jobs posted.
    pub jobs: usize,
}

/// A fan-out in flight.
struct Flight {
    started: Instant,
    started_ms: i64,
    /// Its jobs: place in `Driver::posted`, id, done.
    jobs: Vec<(usize, String, bool)>,
}

/// Posts fan-outs and follows them.
pub(crate) struct Driver {
    config: DriveConfig,
    http: ureq::Agent,
    /// The POST bodies of one fan-out.
    bodies: Vec<Vec<u8>>,
    /// Every job id posted, in order.
    posted: Vec<String>,
    turn: usize,
}

impl Driver {
    /// A driver for `config`.
    pub(crate) fn new(config: DriveConfig) -> Result<Driver> {
        if config.dispatchers.is_empty() || config.hosts.is_empty() || config.max_hosts_per_job == 0 {
            bail!("the driver needs a dispatcher, hosts, and --max-hosts-per-job of at least 1");
        }
        let bodies = config
            .hosts
            .chunks(config.max_hosts_per_job)
            .map(|hosts| {
                serde_json::to_vec(&json!({
                    "hosts": hosts, "method": "async.bash", "cmd": config.cmd, "timeout": config.job_timeout,
                }))
            })
            .collect::<Result<_, _>>()?;
        let http = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
        Ok(Driver { config, http, bodies, posted: Vec::new(), turn: 0 })
    }

    /// Jobs in one fan-out.
    pub(crate) fn jobs_per_fanout(&self) -> usize {
        self.bodies.len()
    }

    fn next_dispatcher(&mut self) -> String {
        self.turn += 1;
        self.config.dispatchers[self.turn % self.config.dispatchers.len()].trim_end_matches('/').to_string()
    }

    /// Runs `total` fan-outs, `in_flight` at a time; `exact` reads each one's exact time.
    /// `health` is asked between polls, and its error ends the phase.
    pub(crate) fn run(
        &mut self,
        total: usize,
        in_flight: usize,
        exact: bool,
        health: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Phase> {
        let in_flight = in_flight.max(1);
        let start = Instant::now();
        let mut flights: Vec<Flight> = Vec::new();
        let mut finished = Vec::with_capacity(total);
        let mut launched = 0;
        let mut jobs = 0;
        while finished.len() < total {
            while launched < total && flights.len() < in_flight {
                let flight = self.launch().with_context(|| format!("posting fan-out {}", launched + 1))?;
                jobs += flight.jobs.len();
                flights.push(flight);
                launched += 1;
            }
            let oldest = flights.iter().map(|f| f.started.elapsed()).max().unwrap_or_default();
            std::thread::sleep(poll_interval(self.config.poll, oldest));
            health()?;
            self.poll(&mut flights)?;
            let (done, open): (Vec<Flight>, Vec<Flight>) =
                flights.into_iter().partition(|f| f.jobs.iter().all(|(_, _, done)| *done));
            flights = open;
            for flight in done {
                let observed = flight.started.elapsed();
                let exact = if exact { Some(self.exact(&flight)?) } else { None };
                finished.push(Finished { observed, exact });
            }
            if let Some(late) = flights.iter().find(|f| f.started.elapsed() > self.config.deadline) {
                let ids: Vec<&str> = late.jobs.iter().filter(|j| !j.2).map(|j| j.1.as_str()).collect();
                bail!("a fan-out was not done after {:?}: jobs {ids:?} still open", self.config.deadline);
            }
        }
        Ok(Phase { finished, elapsed: start.elapsed(), jobs })
    }

    /// Posts one fan-out's jobs.
    fn launch(&mut self) -> Result<Flight> {
        let started = Instant::now();
        let started_ms = unix_now_ms();
        let mut jobs = Vec::with_capacity(self.bodies.len());
        for n in 0..self.bodies.len() {
            let url = format!("{}/v1/jobs", self.next_dispatcher());
            let answer: Value =
                match self.http.post(&url).set("Content-Type", "application/json").send_bytes(&self.bodies[n]) {
                    Ok(response) => response.into_json()?,
                    Err(ureq::Error::Status(status, response)) => {
                        bail!("{url} answered {status}: {}", response.into_string().unwrap_or_default())
                    }
                    Err(e) => return Err(anyhow!("{url}: {e}")),
                };
            let id = answer.get("id").and_then(Value::as_str).context("the job's answer has no id")?.to_string();
            jobs.push((self.posted.len(), id.clone(), false));
            self.posted.push(id);
        }
        Ok(Flight { started, started_ms, jobs })
    }

    /// Marks the jobs the listing shows done; fails on a host that ended other than
    /// `success`.
    fn poll(&mut self, flights: &mut [Flight]) -> Result<()> {
        let Some(oldest) = flights.iter().flat_map(|f| f.jobs.iter()).filter(|j| !j.2).map(|j| j.0).min() else {
            return Ok(());
        };
        // Slack of one page entry: nothing else makes jobs, so it is never needed.
        let limit = self.posted.len() - oldest + 1;
        if limit > MAX_LIST {
            bail!("{limit} jobs would have to be listed to find the oldest one in flight; fewer in flight, please");
        }
        let url = format!("{}/v1/jobs?limit={limit}", self.next_dispatcher());
        let listing: Value = get_json(&self.http, &url)?;
        let entries = listing.get("jobs").and_then(Value::as_array).context("the job listing has no \"jobs\"")?;
        for entry in entries {
            let (Some(id), Some(state)) =
                (entry.get("id").and_then(Value::as_str), entry.get("state").and_then(Value::as_str))
            else {
                continue;
            };
            if state == "running" || state == "scheduled" {
                continue;
            }
            let Some(job) = flights.iter_mut().flat_map(|f| f.jobs.iter_mut()).find(|j| !j.2 && j.1 == id) else {
                continue;
            };
            check_all_succeeded(entry).with_context(|| format!("job {id} ended {state}"))?;
            job.2 = true;
        }
        Ok(())
    }

    /// First POST to the last result recorded, from the jobs' host lists.
    fn exact(&mut self, flight: &Flight) -> Result<Duration> {
        let mut last_ms = flight.started_ms;
        for (_, id, _) in &flight.jobs {
            let url = format!("{}/v1/jobs/{id}", self.next_dispatcher());
            let job = get_json(&self.http, &url)?;
            last_ms = last_ms.max(latest_update_ms(&job).with_context(|| format!("job {id} has no host times"))?);
        }
        Ok(Duration::from_millis(u64::try_from(last_ms - flight.started_ms).unwrap_or(0)))
    }
}

/// The wait before the next poll: `least`, or [`POLL_SHARE`] of the oldest fan-out's age.
fn poll_interval(least: Duration, oldest: Duration) -> Duration {
    least.max(oldest.mul_f64(POLL_SHARE))
}

fn get_json(http: &ureq::Agent, url: &str) -> Result<Value> {
    match http.get(url).call() {
        Ok(response) => Ok(response.into_json()?),
        Err(ureq::Error::Status(status, response)) => {
            bail!("{url} answered {status}: {}", response.into_string().unwrap_or_default())
        }
        Err(e) => Err(anyhow!("{url}: {e}")),
    }
}

/// Whether a listed job's hosts all ended `success`.
fn check_all_succeeded(entry: &Value) -> Result<()> {
    let hosts = entry.get("hosts").and_then(Value::as_u64).context("no host count")?;
    let states = entry.get("states").and_then(Value::as_object).context("no state counts")?;
    let succeeded = states.get("success").and_then(Value::as_u64).unwrap_or(0);
    if succeeded != hosts || entry.get("state").and_then(Value::as_str) != Some("done") {
        bail!("{succeeded} of {hosts} hosts succeeded: {}", Value::Object(states.clone()));
    }
    Ok(())
}

/// The latest `updated_at_ms` of a job's hosts (`GET /v1/jobs/{id}`).
fn latest_update_ms(job: &Value) -> Option<i64> {
    job.get("hosts")?.as_array()?.iter().filter_map(|h| h.get("updated_at_ms")?.as_i64()).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_entries_and_host_times() {
        let good = json!({"id": "a", "hosts": 3, "states": {"success": 3}, "state": "done"});
        assert!(check_all_succeeded(&good).is_ok());
        let expired = json!({"id": "a", "hosts": 3, "states": {"success": 2, "expired": 1}, "state": "done"});
        let e = check_all_succeeded(&expired).expect_err("an expired host fails the run");
        assert!(e.to_string().contains("2 of 3"), "{e}");
        let cancelled = json!({"id": "a", "hosts": 1, "states": {"success": 1}, "state": "cancelled"});
        assert!(check_all_succeeded(&cancelled).is_err());
        let job = json!({"hosts": [{"updated_at_ms": 5}, {"updated_at_ms": 9}, {"updated_at_ms": null}]});
        assert_eq!(latest_update_ms(&job), Some(9));
        assert_eq!(latest_update_ms(&json!({"hosts": []})), None);
    }

    #[test]
    fn polls_space_out_as_a_fanout_ages() {
        let least = Duration::from_millis(50);
        assert_eq!(poll_interval(least, Duration::ZERO), least);
        assert_eq!(poll_interval(least, Duration::from_secs(1)), least);
        assert_eq!(poll_interval(least, Duration::from_secs(40)), Duration::from_millis(800));
    }

    #[test]
    fn a_fanout_is_split_at_the_job_size() {
        let config = DriveConfig {
            dispatchers: vec!["http://127.0.0.1:1/".into()],
            hosts: (1..=25).map(crate::register::host_id).collect(),
            max_hosts_per_job: 10,
            cmd: "true".into(),
            job_timeout: 60,
            poll: Duration::from_millis(50),
            deadline: Duration::from_secs(60),
        };
        let mut driver = Driver::new(config).expect("driver");
        assert_eq!(driver.jobs_per_fanout(), 3);
        let first: Value = serde_json::from_slice(&driver.bodies[0]).expect("json");
        assert_eq!(first["hosts"].as_array().map(Vec::len), Some(10));
        assert_eq!(first["method"], "async.bash");
        assert_eq!(driver.next_dispatcher(), "http://127.0.0.1:1");
    }
}
