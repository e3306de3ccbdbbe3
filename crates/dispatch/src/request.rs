//! Validation of REST request bodies. Bodies are parsed as `serde_json::Value` first and
//! checked field by field, so every error can name the field at fault (serde's derive
//! would stop at the first error with a message meant for programmers).

use crate::error::ApiError;
use crate::fleet::target::{self, Target};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::Method;
use serde_json::{Map, Value};

/// Largest `cmd` accepted, in bytes. It keeps the signed envelope well under beanstalkd's
/// default max job size (65535) even when JSON escaping doubles it.
pub const MAX_CMD_BYTES: usize = 16 * 1024;
/// Most hosts one job may name.
pub const MAX_HOSTS: usize = 10_000;
use polaris_ops_wire::host_id::{is_valid_host_id, MAX_HOST_ID_LEN};
/// What a host id is, for error messages.
fn host_id_rule() -> String {
    format!("1 to {MAX_HOST_ID_LEN} bytes of A-Z a-z 0-9 . _ -, not starting with - or .")
}
/// Longest hostname accepted at registration, in bytes.
pub const MAX_HOSTNAME_LEN: usize = 255;
/// `timeout` when the request gives none, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u32 = 30;
/// Largest `timeout`, in seconds (one day).
pub const MAX_TIMEOUT_SECS: u32 = 86_400;
/// Largest `facts` object an agent may register with, in bytes of JSON.
pub const MAX_FACTS_BYTES: usize = 64 * 1024;
/// Longest `args.path` of a `log.*` job, in bytes (Linux's PATH_MAX).
pub const MAX_LOG_PATH_BYTES: usize = 4096;
/// Most `args.lines` of a `log.tail` job (the agent holds it to its own cap too).
pub const MAX_TAIL_LINES: u64 = 100_000;
/// Most `args.bytes` of a `log.tail` job.
pub const MAX_TAIL_BYTES: u64 = 1 << 20;
/// Longest `args.pattern` of a `log.grep` job, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most context lines (`args.context`, `before`, `after`) of a `log.grep` job.
pub const MAX_CONTEXT_LINES: u64 = 100;
/// Most `args.max_matches` of a `log.grep` job.
pub const MAX_GREP_MATCHES: u64 = 100_000;

/// A validated `POST /v1/jobs` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The client's job id, if it chose one (a UUID, lowercase hyphenated).
    pub id: Option<String>,
    /// Host ids in request order, without duplicates; empty when `target` is given.
    pub hosts: Vec<String>,
    /// The fleet target, when the request gave one instead of `hosts`.
    pub target: Option<Target>,
    /// What to do.
    pub method: Method,
    /// The command (empty for `sync.query`).
    pub cmd: String,
    /// Seconds each host may run the command.
    pub timeout_secs: u32,
    /// The queue priority the request asked for (lower runs first); `None` lets the level
    /// the job was targeted at decide.
    pub priority: Option<u32>,
    /// How it runs: start time, TTL, retries, batches, limits.
    pub policy: crate::policy::Policy,
    /// The method's arguments (`log.tail`, `log.grep`), validated; `None` for the others.
    pub args: Option<Value>,
}

/// A validated `POST /v1/hosts` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistration {
    /// The host id.
    pub id: String,
    /// The host's name, for people.
    pub hostname: String,
    /// The facts its agent reported (a JSON object, as text), if it sent any.
    pub facts: Option<String>,
    /// The digest of the effective task set the agent applied, if it has one.
    pub tasks_digest: Option<String>,
}

/// The body as a JSON object (`malformed_json` or `wrong_type` otherwise).
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::general(Code::MalformedJson, format!("body is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => {
            Err(ApiError::general(Code::WrongType, format!("body must be a JSON object, got {}", type_name(&other))))
        }
    }
}

/// How an error message names the JSON type of `value`.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses (`unknown_field`) a field not in `known`.
pub(crate) fn reject_unknown_fields(map: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(ApiError::field(
            Code::UnknownField,
            key.clone(),
            format!("unknown field {key:?}; known fields are {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// `map[field]` as a string, `None` when absent or null.
pub(crate) fn optional_string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            Err(ApiError::field(Code::WrongType, field, format!("{field} must be a string, got {}", type_name(other))))
        }
    }
}

/// `map[field]` as a string, `missing_field` when absent.
pub(crate) fn required_string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    optional_string(map, field)?
        .ok_or_else(|| ApiError::field(Code::MissingField, field, format!("{field} is required")))
}

/// Validates a `POST /v1/jobs` body.
pub fn parse_job_request(body: &[u8]) -> Result<JobRequest, ApiError> {
    let map = parse_object(body)?;
    let known: Vec<&str> = ["id", "hosts", "target", "method", "cmd", "timeout", "priority", "args"]
        .into_iter()
        .chain(crate::policy::FIELDS.iter().copied())
        .collect();
    reject_unknown_fields(&map, &known)?;

    let id = match optional_string(&map, "id")? {
        None => None,
        Some(raw) => {
            let uuid = uuid::Uuid::parse_str(raw)
                .map_err(|e| ApiError::field(Code::InvalidValue, "id", format!("id must be a UUID: {e}")))?;
            Some(uuid.hyphenated().to_string())
        }
    };

    static NO_HOSTS: Vec<Value> = Vec::new();
    let target = match map.get("target") {
        None | Some(Value::Null) => None,
        Some(value) => {
            if !matches!(map.get("hosts"), None | Some(Value::Null)) {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "target",
                    "give hosts or target, not both (a target may list hosts itself)",
                ));
            }
            Some(target::parse(value, "target")?)
        }
    };
    let hosts = match map.get("hosts") {
        None | Some(Value::Null) if target.is_some() => &NO_HOSTS,
        None | Some(Value::Null) => {
            return Err(ApiError::field(Code::MissingField, "hosts", "hosts (or a target) is required"));
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "hosts",
                format!("hosts must be an array of host ids, got {}", type_name(other)),
            ));
        }
    };
    if hosts.is_empty() && target.is_none() {
        return Err(ApiError::field(Code::EmptyHosts, "hosts", "hosts must name at least one host"));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(ApiError::field(
            Code::InvalidValue,
            "hosts",
            format!("hosts names {} hosts; at most {MAX_HOSTS} are allowed", hosts.len()),
        ));
    }
    let mut host_ids: Vec<String> = Vec::with_capacity(hosts.len());
    for (index, item) in hosts.iter().enumerate() {
        let field = format!("hosts[{index}]");
        let Value::String(host) = item else {
            return Err(ApiError::field(
                Code::WrongType,
                field.clone(),
                format!("{field} must be a string, got {}", type_name(item)),
            ));
        };
        // A host id that could never be registered is a mistake in the request, not an
        // unknown host to report per host.
        if !is_valid_host_id(host) {
            return Err(ApiError::field(
                Code::InvalidValue,
                field.clone(),
                format!("{field} {host:?} is not a valid host id: {}", host_id_rule()),
            ));
        }
        // One reply entry per host: a duplicate would make "one entry per requested host"
        // ambiguous, so it is refused rather than silently merged.
        if host_ids.contains(host) {
            return Err(ApiError::field(Code::InvalidValue, field, format!("host {host:?} is listed twice")));
        }
        host_ids.push(host.clone());
    }

    let method_name = required_string(&map, "method")?;
    let method = Method::parse(method_name).ok_or_else(|| {
        ApiError::field(
            Code::UnknownMethod,
            "method",
            format!(
                "unknown method {method_name:?}; use one of {}",
                Method::ALL.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
    })?;

    let cmd = if method.runs_command() {
        let cmd = required_string(&map, "cmd")?;
        if cmd.trim().is_empty() {
            return Err(ApiError::field(Code::InvalidValue, "cmd", "cmd must not be empty"));
        }
        cmd
    } else if method == Method::SyncQuery {
        optional_string(&map, "cmd")?.unwrap_or("")
    } else {
        // What these do is the agent's own code on the agent's own configuration: a
        // command here would be ignored, so it is refused rather than silently dropped.
        if !matches!(map.get("cmd"), None | Some(Value::Null)) {
            return Err(ApiError::field(
                Code::InvalidValue,
                "cmd",
                format!("{} takes no cmd: it runs the agent's own code on the agent's configuration", method.as_str()),
            ));
        }
        ""
    };
    if cmd.len() > MAX_CMD_BYTES {
        return Err(ApiError::field(
            Code::CmdTooLarge,
            "cmd",
            format!("cmd is {} bytes; at most {MAX_CMD_BYTES} are allowed", cmd.len()),
        ));
    }

    let timeout_secs = match map.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) if (1..=u64::from(MAX_TIMEOUT_SECS)).contains(&t) => t as u32,
            _ => {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "timeout",
                    format!("timeout must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECS}, got {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "timeout",
                format!("timeout must be a number of seconds, got {}", type_name(other)),
            ));
        }
    };

    let priority = match map.get("priority") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64().and_then(|p| u32::try_from(p).ok()) {
            Some(p) => Some(p),
            None => {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "priority",
                    format!("priority must be a whole number from 0 (most urgent) to {}, got {n}", u32::MAX),
                ));
            }
        },
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "priority",
                format!("priority must be a number, got {}", type_name(other)),
            ));
        }
    };

    let args = parse_args(method, map.get("args"))?;
    let policy = crate::policy::parse(&map, polaris_ops_wire::wire::unix_now_ms(), method.is_sync())?;

    Ok(JobRequest { id, hosts: host_ids, target, method, cmd: cmd.to_string(), timeout_secs, priority, args, policy })
}

/// Validates `args` for `method`: required (an object) for the `log.*` methods, refused
/// for the others.
pub fn parse_args(method: Method, args: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let args = match args {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(map),
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "args",
                format!("args must be an object, got {}", type_name(other)),
            ))
        }
    };
    if !method.takes_args() {
        return match args {
            None => Ok(None),
            Some(_) => Err(ApiError::field(
                Code::InvalidValue,
                "args",
                format!("{} takes no args; only log.tail and log.grep do", method.as_str()),
            )),
        };
    }
    let Some(args) = args else {
        return Err(ApiError::field(
            Code::MissingField,
            "args",
            format!("{} needs args, e.g. {}", method.as_str(), args_example(method)),
        ));
    };
    let known: &[&str] = match method {
        Method::LogTail => &["path", "lines", "bytes"],
        _ => &["path", "pattern", "context", "before", "after", "max_matches", "ignore_case"],
    };
    if let Some(key) = args.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::field(
            Code::UnknownField,
            format!("args.{key}"),
            format!("unknown field args.{key}; {} takes {}", method.as_str(), known.join(", ")),
        ));
    }
    let path = required_string(args, "path").map_err(|e| prefix_field(e, "args."))?;
    if !path.starts_with('/') || path.len() > MAX_LOG_PATH_BYTES || path.contains('\0') {
        return Err(ApiError::field(
            Code::InvalidValue,
            "args.path",
            format!("args.path must be an absolute path of at most {MAX_LOG_PATH_BYTES} bytes"),
        ));
    }
    let count = |name: &str, min: u64, max: u64| -> Result<Option<u64>, ApiError> {
        let field = format!("args.{name}");
        match args.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(ApiError::field(
                    Code::InvalidValue,
                    field.clone(),
                    format!("{field} must be a whole number from {min} to {max}, got {n}"),
                )),
            },
            Some(other) => Err(ApiError::field(
                Code::WrongType,
                field.clone(),
                format!("{field} must be a number, got {}", type_name(other)),
            )),
        }
    };
    match method {
        Method::LogTail => {
            let lines = count("lines", 1, MAX_TAIL_LINES)?;
            let bytes = count("bytes", 1, MAX_TAIL_BYTES)?;
            if lines.is_some() && bytes.is_some() {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "args.bytes",
                    "give args.lines or args.bytes, not both",
                ));
            }
        }
        _ => {
            let pattern = required_string(args, "pattern").map_err(|e| prefix_field(e, "args."))?;
            if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "args.pattern",
                    format!("args.pattern must be 1 to {MAX_PATTERN_BYTES} bytes"),
                ));
            }
            // The agents use the same regex engine, so what passes here compiles there.
            if let Err(e) = regex::bytes::RegexBuilder::new(pattern).size_limit(1 << 20).build() {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "args.pattern",
                    format!("args.pattern is not a valid regex: {e}"),
                ));
            }
            for name in ["context", "before", "after"] {
                count(name, 0, MAX_CONTEXT_LINES)?;
            }
            count("max_matches", 1, MAX_GREP_MATCHES)?;
            match args.get("ignore_case") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                Some(other) => {
                    return Err(ApiError::field(
                        Code::WrongType,
                        "args.ignore_case",
                        format!("args.ignore_case must be a boolean, got {}", type_name(other)),
                    ))
                }
            }
        }
    }
    Ok(Some(Value::Object(args.clone())))
}

fn args_example(method: Method) -> &'static str {
    match method {
        Method::LogTail => r#"{"path": "/var/log/syslog", "lines": 100}"#,
        _ => r#"{"path": "/var/log/syslog", "pattern": "error", "context": 2, "max_matches": 100}"#,
    }
}

/// `e` with its field named inside `prefix` (`path` becomes `args.path`).
fn prefix_field(mut e: ApiError, prefix: &str) -> ApiError {
    if let Some(field) = e.field.take() {
        e.message = format!("{prefix}{}", e.message);
        e.field = Some(format!("{prefix}{field}"));
    }
    e
}

/// Validates a `POST /v1/hosts` body: `{"id": "...", "hostname": "..."?, "facts": {...}?}`.
pub fn parse_host_registration(body: &[u8]) -> Result<HostRegistration, ApiError> {
    let map = parse_object(body)?;
    reject_unknown_fields(&map, &["id", "hostname", "facts", "tasks_digest"])?;
    let id = required_string(&map, "id")?;
    if !is_valid_host_id(id) {
        return Err(ApiError::field(Code::InvalidValue, "id", format!("host id must be {}", host_id_rule())));
    }
    let hostname = optional_string(&map, "hostname")?.unwrap_or("");
    if hostname.len() > MAX_HOSTNAME_LEN {
        return Err(ApiError::field(
            Code::InvalidValue,
            "hostname",
            format!("hostname must be at most {MAX_HOSTNAME_LEN} bytes"),
        ));
    }
    // The agent decides what its facts are; the dispatcher keeps them as given.
    let facts = match map.get("facts") {
        None | Some(Value::Null) => None,
        Some(value @ Value::Object(_)) => {
            let text = value.to_string();
            if text.len() > MAX_FACTS_BYTES {
                return Err(ApiError::field(
                    Code::InvalidValue,
                    "facts",
                    format!("facts are {} bytes of JSON; at most {MAX_FACTS_BYTES} are kept", text.len()),
                ));
            }
            Some(text)
        }
        Some(other) => {
            return Err(ApiError::field(
                Code::WrongType,
                "facts",
                format!("facts must be an object, got {}", type_name(other)),
            ));
        }
    };
    let tasks_digest = optional_string(&map, "tasks_digest")?;
    if let Some(digest) = tasks_digest {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ApiError::field(
                Code::InvalidValue,
                "tasks_digest",
                "tasks_digest must be 64 lowercase hex digits (a SHA-256)",
            ));
        }
    }
    Ok(HostRegistration {
        id: id.to_string(),
        hostname: hostname.to_string(),
        facts,
        tasks_digest: tasks_digest.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse_job_request(body.as_bytes()).expect_err("should be refused")
    }

    #[test]
    fn the_documented_shape_is_accepted() {
        let req = parse_job_request(
            br#"{"id": "0A1B2C3D-0000-4000-8000-000000000001", "hosts": ["a", "b"], "method": "sync.bash", "cmd": "ls", "timeout": 30}"#,
        )
        .expect("valid");
        assert_eq!(req.id.as_deref(), Some("0a1b2c3d-0000-4000-8000-000000000001"));
        assert_eq!(req.hosts, ["a", "b"]);
        assert_eq!(req.method, Method::SyncBash);
        assert_eq!(req.timeout_secs, 30);
        let query = parse_job_request(br#"{"hosts": ["a"], "method": "sync.query"}"#).expect("valid");
        assert_eq!(query.cmd, "");
        assert_eq!(query.timeout_secs, DEFAULT_TIMEOUT_SECS);
    }

    #[test]
    fn each_error_names_its_field_and_code() {
        let cases: &[(&str, Code, Option<&str>)] = &[
            ("{", Code::MalformedJson, None),
            ("[1]", Code::WrongType, None),
            (r#"{"hosts": "a", "method": "sync.bash", "cmd": "ls"}"#, Code::WrongType, Some("hosts")),
            (r#"{"hosts": [], "method": "sync.bash", "cmd": "ls"}"#, Code::EmptyHosts, Some("hosts")),
            (r#"{"hosts": ["a", 3], "method": "sync.bash", "cmd": "ls"}"#, Code::WrongType, Some("hosts[1]")),
            (r#"{"hosts": ["a", "a"], "method": "sync.bash", "cmd": "ls"}"#, Code::InvalidValue, Some("hosts[1]")),
            (r#"{"method": "sync.bash", "cmd": "ls"}"#, Code::MissingField, Some("hosts")),
            (r#"{"hosts": ["a"], "method": "sync.perl", "cmd": "ls"}"#, Code::UnknownMethod, Some("method")),
            (r#"{"hosts": ["a"], "method": 7, "cmd": "ls"}"#, Code::WrongType, Some("method")),
            (r#"{"hosts": ["a"], "method": "sync.bash"}"#, Code::MissingField, Some("cmd")),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "timeout": "30"}"#,
                Code::WrongType,
                Some("timeout"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "timeout": 0}"#,
                Code::InvalidValue,
                Some("timeout"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "timeout": 1.5}"#,
                Code::InvalidValue,
                Some("timeout"),
            ),
            (r#"{"id": "nope", "hosts": ["a"], "method": "sync.bash", "cmd": "ls"}"#, Code::InvalidValue, Some("id")),
            (
                r#"{"hosts": ["a"], "target": {"hosts": ["b"]}, "method": "sync.bash", "cmd": "ls"}"#,
                Code::InvalidValue,
                Some("target"),
            ),
            (r#"{"target": {}, "method": "sync.bash", "cmd": "ls"}"#, Code::EmptyTarget, Some("target")),
            (
                r#"{"target": {"nodes": ["/x"]}, "method": "sync.bash", "cmd": "ls"}"#,
                Code::InvalidPath,
                Some("target.nodes[0]"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "priority": -1}"#,
                Code::InvalidValue,
                Some("priority"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "priority": 4294967296}"#,
                Code::InvalidValue,
                Some("priority"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "priority": "1"}"#,
                Code::WrongType,
                Some("priority"),
            ),
            (
                r#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls", "timout": 3}"#,
                Code::UnknownField,
                Some("timout"),
            ),
        ];
        for (body, code, field) in cases {
            let e = err(body);
            assert_eq!((e.code, e.field.as_deref()), (*code, *field), "{body}: {}", e.message);
        }
        let big = format!(r#"{{"hosts": ["a"], "method": "sync.bash", "cmd": "{}"}}"#, "x".repeat(MAX_CMD_BYTES + 1));
        let e = err(&big);
        assert_eq!((e.code, e.field.as_deref()), (Code::CmdTooLarge, Some("cmd")));
    }

    #[test]
    fn integrity_methods_take_no_cmd_and_log_methods_need_args() {
        for method in ["integrity.init", "integrity.check", "integrity.update"] {
            let req =
                parse_job_request(format!(r#"{{"hosts": ["a"], "method": "{method}"}}"#).as_bytes()).expect("valid");
            assert!(req.method.is_sync() && req.cmd.is_empty() && req.args.is_none());
            let e = err(&format!(r#"{{"hosts": ["a"], "method": "{method}", "cmd": "rm -rf /"}}"#));
            assert_eq!((e.code, e.field.as_deref()), (Code::InvalidValue, Some("cmd")), "{}", e.message);
            let e = err(&format!(r#"{{"hosts": ["a"], "method": "{method}", "args": {{"path": "/"}}}}"#));
            assert_eq!((e.code, e.field.as_deref()), (Code::InvalidValue, Some("args")), "{}", e.message);
        }
        let tail = parse_job_request(
            br#"{"hosts": ["a"], "method": "log.tail", "args": {"path": "/var/log/syslog", "lines": 100}}"#,
        )
        .expect("valid");
        assert_eq!(tail.args, Some(serde_json::json!({"path": "/var/log/syslog", "lines": 100})));
        parse_job_request(br#"{"hosts": ["a"], "method": "log.tail", "args": {"path": "/var/log/x", "bytes": 4096}}"#)
            .expect("valid");
        parse_job_request(
            br#"{"hosts": ["a"], "method": "log.grep", "args": {"path": "/var/log/x", "pattern": "err(or)?", "context": 2, "max_matches": 100}}"#,
        )
        .expect("valid");
        let cases: &[(&str, Code, &str)] = &[
            (r#""method": "log.tail""#, Code::MissingField, "args"),
            (r#""method": "log.tail", "args": []"#, Code::WrongType, "args"),
            (r#""method": "log.tail", "args": {"lines": 3}"#, Code::MissingField, "args.path"),
            (r#""method": "log.tail", "args": {"path": "var/log/x"}"#, Code::InvalidValue, "args.path"),
            (r#""method": "log.tail", "args": {"path": "/x", "lines": 0}"#, Code::InvalidValue, "args.lines"),
            (r#""method": "log.tail", "args": {"path": "/x", "lines": "3"}"#, Code::WrongType, "args.lines"),
            (
                r#""method": "log.tail", "args": {"path": "/x", "lines": 1, "bytes": 1}"#,
                Code::InvalidValue,
                "args.bytes",
            ),
            (r#""method": "log.tail", "args": {"path": "/x", "pattern": "a"}"#, Code::UnknownField, "args.pattern"),
            (r#""method": "log.tail", "cmd": "ls", "args": {"path": "/x"}"#, Code::InvalidValue, "cmd"),
            (r#""method": "log.grep", "args": {"path": "/x"}"#, Code::MissingField, "args.pattern"),
            (r#""method": "log.grep", "args": {"path": "/x", "pattern": "("}"#, Code::InvalidValue, "args.pattern"),
            (
                r#""method": "log.grep", "args": {"path": "/x", "pattern": "a", "context": 101}"#,
                Code::InvalidValue,
                "args.context",
            ),
            (
                r#""method": "log.grep", "args": {"path": "/x", "pattern": "a", "max_matches": 0}"#,
                Code::InvalidValue,
                "args.max_matches",
            ),
            (
                r#""method": "log.grep", "args": {"path": "/x", "pattern": "a", "ignore_case": 1}"#,
                Code::WrongType,
                "args.ignore_case",
            ),
            (r#""method": "sync.bash", "cmd": "ls", "args": {"path": "/x"}"#, Code::InvalidValue, "args"),
        ];
        for (fields, code, field) in cases {
            let e = err(&format!(r#"{{"hosts": ["a"], {fields}}}"#));
            assert_eq!((e.code, e.field.as_deref()), (*code, Some(*field)), "{fields}: {}", e.message);
        }
    }

    #[test]
    fn invalid_host_ids_in_a_job_are_refused_by_position() {
        for bad in ["web 01", "-web", ".web", "a/b", "a\r\nput"] {
            let body = serde_json::json!({"hosts": ["ok", bad], "method": "sync.bash", "cmd": "ls"}).to_string();
            let e = err(&body);
            assert_eq!((e.code, e.field.as_deref()), (Code::InvalidValue, Some("hosts[1]")), "{bad:?}: {}", e.message);
        }
        let long = "h".repeat(MAX_HOST_ID_LEN + 1);
        let e = err(&serde_json::json!({"hosts": [long], "method": "sync.bash", "cmd": "ls"}).to_string());
        assert_eq!((e.code, e.field.as_deref()), (Code::InvalidValue, Some("hosts[0]")));
    }

    #[test]
    fn targets_and_priorities_are_accepted() {
        let req = parse_job_request(
            br#"{"target": {"nodes": ["ECS/OpenStack"], "labels": {"role": "web"}}, "method": "async.bash", "cmd": "ls", "priority": 7}"#,
        )
        .expect("valid");
        assert!(req.hosts.is_empty());
        assert_eq!(req.target.expect("target").include.nodes, ["ECS/OpenStack"]);
        assert_eq!(req.priority, Some(7));
        let seed = parse_job_request(br#"{"hosts": ["a"], "method": "sync.bash", "cmd": "ls"}"#).expect("valid");
        assert_eq!((seed.target, seed.priority), (None, None));
    }

    #[test]
    fn registrations_carry_facts_objects() {
        let reg = parse_host_registration(br#"{"id": "a", "facts": {"cpu_count": 2}}"#).expect("valid");
        assert_eq!(reg.facts.as_deref(), Some(r#"{"cpu_count":2}"#));
        let e = parse_host_registration(br#"{"id": "a", "facts": [1]}"#).expect_err("not an object");
        assert_eq!((e.code, e.field.as_deref()), (Code::WrongType, Some("facts")));
        assert_eq!(parse_host_registration(br#"{"id": "a"}"#).expect("valid").facts, None);
    }

    #[test]
    fn invalid_host_id_in_a_registration_names_the_field() {
        let e = parse_host_registration(br#"{"id": "a b"}"#).expect_err("invalid");
        assert_eq!(e.field.as_deref(), Some("id"));
    }
}
