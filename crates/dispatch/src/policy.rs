//! Execution policies of a job: when it may start, how long a host may wait to start,
//! retries, rolling batches or a concurrency cap with a failure threshold, and resource
//! limits for the command. Parsed from `POST /v1/jobs` field by field (each error names
//! its field), stored with the job as JSON, and applied by [`crate::rollout`].

use crate::error::ApiError;
use crate::request::type_name;
use polaris_ops_wire::codes::Code;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest `delay`, and furthest `start_at` in the future, in seconds (30 days).
pub const MAX_DELAY_SECS: u64 = 30 * 24 * 3600;
/// Longest `ttl`, in seconds (7 days).
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Most retries of one host.
pub const MAX_RETRIES: u64 = 10;
/// Longest `retry.delay` and `batch.interval`, in seconds.
pub const MAX_WAIT_SECS: u64 = 24 * 3600;
/// Smallest `memory_max`, in bytes: less cannot start bash.
pub const MIN_MEMORY_MAX: u64 = 4 * 1024 * 1024;
/// Largest `cpu_max`, in CPUs.
pub const MAX_CPUS: f64 = 1024.0;

/// Which failures of an attempt are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The command ran and exited with a status other than 0.
    Nonzero,
    /// The command was killed at its timeout (`0x0100`).
    Timeout,
    /// No answer: the agent did not take the job in time, or took it and sent nothing.
    NoAnswer,
}

impl RetryOn {
    fn parse(name: &str) -> Option<RetryOn> {
        match name {
            "nonzero" => Some(RetryOn::Nonzero),
            "timeout" => Some(RetryOn::Timeout),
            "no_answer" => Some(RetryOn::NoAnswer),
            _ => None,
        }
    }
}

/// `retry`: up to `max` more attempts, `delay_secs` after a failure of a kind in `on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Attempts after the first.
    pub max: u32,
    /// Seconds between a failed attempt and the next.
    pub delay_secs: u32,
    /// The failures that are retried.
    pub on: Vec<RetryOn>,
}

/// `batch`: hosts in target order, `size` at a time (or `percent` of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Hosts per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Per cent of the hosts per batch (rounded up, at least one host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Seconds between one batch ending and the next starting.
    pub interval_secs: u32,
}

impl Batch {
    /// Hosts per batch for a job of `hosts` hosts.
    pub fn size_for(&self, hosts: usize) -> usize {
        match (self.size, self.percent) {
            (Some(size), _) => size as usize,
            (None, Some(percent)) => (hosts * percent as usize).div_ceil(100).max(1),
            (None, None) => hosts.max(1),
        }
    }
}

/// The failure threshold of a batched or concurrency-capped job: once more hosts than it
/// allows have failed, no further host starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// More than this many failed hosts.
    MaxFailures(u32),
    /// More than this per cent of the job's hosts failed.
    MaxFailurePercent(u32),
}

impl Threshold {
    /// Whether `failed` of `hosts` crosses it.
    pub fn crossed(self, failed: usize, hosts: usize) -> bool {
        match self {
            Threshold::MaxFailures(n) => failed > n as usize,
            Threshold::MaxFailurePercent(p) => failed * 100 > p as usize * hosts,
        }
    }
}

/// Everything a job may say about how it runs, beyond what and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// No host starts before this (Unix milliseconds): `start_at`, or now plus `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<i64>,
    /// Seconds a released host may wait for its agent to start it (default: `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
    /// Retries of failed hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Rolling batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// At most this many hosts running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// When to stop starting hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Threshold>,
    /// Memory limit of each host's command, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// CPU limit of each host's command, in thousandths of a CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_milli: Option<u32>,
}

impl Policy {
    /// Whether hosts wait to be released (a start time, batches or a concurrency cap)
    /// rather than being queued at once.
    pub fn gates_start(&self) -> bool {
        self.start_at_ms.is_some() || self.batch.is_some() || self.concurrency.is_some()
    }

    /// Whether nothing was asked beyond the defaults.
    pub fn is_default(&self) -> bool {
        *self == Policy::default()
    }
}

/// The request fields this module reads.
pub const FIELDS: &[&str] = &[
    "start_at",
    "delay",
    "ttl",
    "retry",
    "batch",
    "concurrency",
    "max_failures",
    "max_failure_percent",
    "memory_max",
    "cpu_max",
];

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(Code::InvalidValue, field, message)
}

/// A whole number in `min..=max` at `field` (`None` when absent or null).
fn whole(
    map: &Map<String, Value>,
    field: &str,
    path: &str,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<Option<u64>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(invalid(path, format!("{path} must be a whole number of {unit} from {min} to {max}, got {n}"))),
        },
        Some(other) => Err(ApiError::field(
            Code::WrongType,
            path,
            format!("{path} must be a number of {unit}, got {}", type_name(other)),
        )),
    }
}

fn object<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(inner)) => Ok(Some(inner)),
        Some(other) => {
            Err(ApiError::field(Code::WrongType, field, format!("{field} must be an object, got {}", type_name(other))))
        }
    }
}

fn reject_unknown(map: &Map<String, Value>, parent: &str, known: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(ApiError::field(
            Code::UnknownField,
            format!("{parent}.{key}"),
            format!("unknown field {parent}.{key}; known fields are {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The failure threshold given as `max_failures` or `max_failure_percent` in `map`.
fn threshold(map: &Map<String, Value>, prefix: &str) -> Result<Option<Threshold>, ApiError> {
    let path = |f: &str| if prefix.is_empty() { f.to_string() } else { format!("{prefix}.{f}") };
    let count = whole(map, "max_failures", &path("max_failures"), 0, u64::from(u32::MAX), "hosts")?;
    let percent = whole(map, "max_failure_percent", &path("max_failure_percent"), 0, 100, "per cent")?;
    match (count, percent) {
        (Some(_), Some(_)) => {
            Err(invalid(&path("max_failure_percent"), "give max_failures or max_failure_percent, not both"))
        }
        (Some(n), None) => Ok(Some(Threshold::MaxFailures(n as u32))),
        (None, Some(p)) => Ok(Some(Threshold::MaxFailurePercent(p as u32))),
        (None, None) => Ok(None),
    }
}

/// Parses the policy fields of a `POST /v1/jobs` body. `now_ms` anchors `delay` and
/// bounds `start_at`; `sync` refuses what would make a sync call wait for a rollout.
pub fn parse(map: &Map<String, Value>, now_ms: i64, sync: bool) -> Result<Policy, ApiError> {
    let mut policy = Policy::default();

    let delay = whole(map, "delay", "delay", 0, MAX_DELAY_SECS, "seconds")?;
    let start_at = match map.get("start_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
                invalid("start_at", format!("start_at must be an RFC 3339 time like 2026-12-24T18:00:00Z: {e}"))
            })?;
            let at_ms = at.timestamp_millis();
            if at_ms > now_ms.saturating_add(MAX_DELAY_SECS as i64 * 1000) {
                return Err(invalid("start_at", format!("start_at is more than {MAX_DELAY_SECS} seconds ahead")));
            }
            // A time already past starts at once, as a delay of 0 would.
            Some(at_ms.max(now_ms))
        }
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "start_at",
                format!("start_at must be an RFC 3339 time as a string, got {}", type_name(other)),
            ))
        }
    };
    policy.start_at_ms = match (start_at, delay) {
        (Some(_), Some(_)) => return Err(invalid("delay", "give start_at or delay, not both")),
        (Some(at), None) => Some(at),
        (None, Some(secs)) => Some(now_ms.saturating_add(secs as i64 * 1000)),
        (None, None) => None,
    };

    policy.ttl_secs = whole(map, "ttl", "ttl", 1, MAX_TTL_SECS, "seconds")?.map(|t| t as u32);

    if let Some(retry) = object(map, "retry")? {
        reject_unknown(retry, "retry", &["max", "delay", "on"])?;
        let max = whole(retry, "max", "retry.max", 1, MAX_RETRIES, "retries")?
            .ok_or_else(|| ApiError::field(Code::MissingField, "retry.max", "retry.max is required"))?;
        let delay_secs = whole(retry, "delay", "retry.delay", 0, MAX_WAIT_SECS, "seconds")?.unwrap_or(0);
        let on = match retry.get("on") {
            None | Some(Value::Null) => vec![RetryOn::Nonzero, RetryOn::Timeout, RetryOn::NoAnswer],
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut on = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let kind = item.as_str().and_then(RetryOn::parse).ok_or_else(|| {
                        invalid(
                            &format!("retry.on[{i}]"),
                            format!("retry.on[{i}] must be \"nonzero\", \"timeout\" or \"no_answer\", got {item}"),
                        )
                    })?;
                    if !on.contains(&kind) {
                        on.push(kind);
                    }
                }
                on
            }
            Some(other) => {
                return Err(invalid(
                    "retry.on",
                    format!(
                        "retry.on must be a non-empty array of \"nonzero\", \"timeout\", \"no_answer\", got {other}"
                    ),
                ))
            }
        };
        policy.retry = Some(Retry { max: max as u32, delay_secs: delay_secs as u32, on });
    }

    let mut inner_threshold = None;
    if let Some(batch) = object(map, "batch")? {
        reject_unknown(batch, "batch", &["size", "percent", "interval", "max_failures", "max_failure_percent"])?;
        let size = whole(batch, "size", "batch.size", 1, crate::request::MAX_HOSTS as u64, "hosts")?;
        let percent = whole(batch, "percent", "batch.percent", 1, 100, "per cent")?;
        if size.is_some() == percent.is_some() {
            return Err(invalid("batch", "a batch takes exactly one of size or percent"));
        }
        let interval_secs = whole(batch, "interval", "batch.interval", 0, MAX_WAIT_SECS, "seconds")?.unwrap_or(0);
        inner_threshold = threshold(batch, "batch")?;
        policy.batch = Some(Batch {
            size: size.map(|s| s as u32),
            percent: percent.map(|p| p as u32),
            interval_secs: interval_secs as u32,
        });
    }
    policy.concurrency =
        whole(map, "concurrency", "concurrency", 1, crate::request::MAX_HOSTS as u64, "hosts")?.map(|c| c as u32);
    if policy.batch.is_some() && policy.concurrency.is_some() {
        return Err(invalid("concurrency", "give batch or concurrency, not both"));
    }
    let outer_threshold = threshold(map, "")?;
    policy.threshold = match (inner_threshold, outer_threshold) {
        (Some(_), Some(_)) => {
            return Err(invalid("max_failures", "give the failure threshold once, in batch or at the top"))
        }
        (t, None) | (None, t) => t,
    };
    if policy.threshold.is_some() && policy.batch.is_none() && policy.concurrency.is_none() {
        return Err(invalid(
            "max_failures",
            "a failure threshold needs batch or concurrency: it stops starting further hosts",
        ));
    }

    policy.memory_max = whole(map, "memory_max", "memory_max", MIN_MEMORY_MAX, u64::MAX, "bytes")?;
    policy.cpu_max_milli = match map.get("cpu_max") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(cpus) if (0.001..=MAX_CPUS).contains(&cpus) => Some((cpus * 1000.0).round() as u32),
            _ => {
                return Err(invalid(
                    "cpu_max",
                    format!("cpu_max must be a number of CPUs from 0.001 to {MAX_CPUS}, got {n}"),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "cpu_max",
                format!("cpu_max must be a number of CPUs, got {}", type_name(other)),
            ))
        }
    };

    if sync && policy.gates_start() {
        let field = if policy.batch.is_some() {
            "batch"
        } else if policy.concurrency.is_some() {
            "concurrency"
        } else if map.contains_key("delay") {
            "delay"
        } else {
            "start_at"
        };
        return Err(invalid(
            field,
            format!("{field} makes a rollout that a sync call would wait for; use async.bash and GET /v1/jobs/{{id}}"),
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_at(value: Value, sync: bool) -> Result<Policy, (Code, Option<String>)> {
        parse(value.as_object().expect("object"), 1_000_000, sync).map_err(|e| (e.code, e.field))
    }

    fn err(value: Value) -> (Code, String) {
        let (code, field) = parse_at(value, false).expect_err("refused");
        (code, field.unwrap_or_default())
    }

    #[test]
    fn every_policy_parses() {
        let policy = parse_at(
            json!({"delay": 5, "ttl": 60, "retry": {"max": 2, "delay": 1, "on": ["nonzero"]},
                   "batch": {"size": 2, "interval": 3, "max_failures": 1}, "memory_max": 67108864, "cpu_max": 0.5}),
            false,
        )
        .expect("valid");
        assert_eq!(policy.start_at_ms, Some(1_005_000));
        assert_eq!(policy.ttl_secs, Some(60));
        assert_eq!(policy.retry, Some(Retry { max: 2, delay_secs: 1, on: vec![RetryOn::Nonzero] }));
        assert_eq!(policy.batch.as_ref().map(|b| b.size_for(10)), Some(2));
        assert_eq!(policy.threshold, Some(Threshold::MaxFailures(1)));
        assert_eq!(policy.cpu_max_milli, Some(500));
        assert!(policy.gates_start());
        let at =
            parse_at(json!({"start_at": "1970-01-01T00:20:00Z", "concurrency": 3, "max_failure_percent": 10}), false)
                .expect("valid");
        assert_eq!(at.start_at_ms, Some(1_200_000));
        assert_eq!(at.threshold, Some(Threshold::MaxFailurePercent(10)));
        assert!(parse_at(json!({}), true).expect("valid").is_default());
        assert!(parse_at(json!({"retry": {"max": 1}, "ttl": 5}), true).is_ok(), "retries fit a sync call");
    }

    #[test]
    fn errors_name_their_field() {
        let cases = [
            (json!({"delay": -1}), Code::InvalidValue, "delay"),
            (json!({"delay": 1, "start_at": "1970-01-01T00:20:00Z"}), Code::InvalidValue, "delay"),
            (json!({"start_at": "tomorrow"}), Code::InvalidValue, "start_at"),
            (json!({"start_at": 5}), Code::WrongType, "start_at"),
            (json!({"ttl": 0}), Code::InvalidValue, "ttl"),
            (json!({"retry": {"delay": 1}}), Code::MissingField, "retry.max"),
            (json!({"retry": {"max": 11}}), Code::InvalidValue, "retry.max"),
            (json!({"retry": {"max": 1, "on": ["oops"]}}), Code::InvalidValue, "retry.on[0]"),
            (json!({"retry": {"max": 1, "on": []}}), Code::InvalidValue, "retry.on"),
            (json!({"retry": {"max": 1, "every": 2}}), Code::UnknownField, "retry.every"),
            (json!({"batch": {"interval": 1}}), Code::InvalidValue, "batch"),
            (json!({"batch": {"size": 1, "percent": 5}}), Code::InvalidValue, "batch"),
            (json!({"batch": {"percent": 101}}), Code::InvalidValue, "batch.percent"),
            (json!({"batch": {"size": 1}, "concurrency": 2}), Code::InvalidValue, "concurrency"),
            (json!({"batch": {"size": 1, "max_failures": 1}, "max_failures": 1}), Code::InvalidValue, "max_failures"),
            (json!({"max_failures": 1}), Code::InvalidValue, "max_failures"),
            (
                json!({"concurrency": 2, "max_failures": 1, "max_failure_percent": 5}),
                Code::InvalidValue,
                "max_failure_percent",
            ),
            (json!({"memory_max": 1024}), Code::InvalidValue, "memory_max"),
            (json!({"cpu_max": 0}), Code::InvalidValue, "cpu_max"),
            (json!({"cpu_max": "1"}), Code::WrongType, "cpu_max"),
        ];
        for (value, code, field) in cases {
            assert_eq!(err(value.clone()), (code, field.to_string()), "{value}");
        }
        assert_eq!(parse_at(json!({"batch": {"size": 1}}), true).unwrap_err().1.as_deref(), Some("batch"));
        assert_eq!(parse_at(json!({"delay": 1}), true).unwrap_err().1.as_deref(), Some("delay"));
    }

    #[test]
    fn thresholds_and_batch_sizes() {
        assert!(!Threshold::MaxFailures(1).crossed(1, 10));
        assert!(Threshold::MaxFailures(1).crossed(2, 10));
        assert!(!Threshold::MaxFailurePercent(20).crossed(2, 10));
        assert!(Threshold::MaxFailurePercent(20).crossed(3, 10));
        let percent = Batch { size: None, percent: Some(30), interval_secs: 0 };
        assert_eq!(percent.size_for(10), 3);
        assert_eq!(percent.size_for(1), 1);
        assert_eq!(percent.size_for(7), 3);
    }
}
