//! The 16-bit result and error codes shared by the dispatcher, the agent and the REST API.
//!
//! A code is `(type << 8) | code`: the high byte says which part of the system failed, the
//! low byte what went wrong. The table is documented in `docs/DISPATCH.md`; a unit test
//! checks that every code here appears there.

use serde::Serialize;

/// The high byte of a [`Code`]: which part of the system the code comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeType {
    /// 0x01: the command ran (or tried to) and this is how it ended.
    Execution,
    /// 0x02: the dispatcher could not deliver the job or collect its answer.
    Dispatch,
    /// 0x03: the agent refused or could not handle the job.
    Host,
    /// 0x04: authentication or authorisation failed (tokens, envelope signatures).
    Auth,
    /// 0x05: the request was invalid.
    Validation,
}

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $ty:ident, $label:literal, $http:literal; )*) => {
        /// A 16-bit result or error code. `resp: "failed"` results carry one as `retcode`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Code {
            $( $(#[$doc])* $name = $value, )*
        }

        impl Code {
            /// Every code, in table order.
            pub const ALL: &'static [Code] = &[$(Code::$name),*];

            /// The part of the system the code comes from (its high byte).
            pub fn code_type(self) -> CodeType {
                match self { $(Code::$name => CodeType::$ty,)* }
            }

            /// A stable snake_case name, used in API error bodies.
            pub fn label(self) -> &'static str {
                match self { $(Code::$name => $label,)* }
            }

            /// The HTTP status the REST API answers with when this code is a request error.
            pub fn http_status(self) -> u16 {
                match self { $(Code::$name => $http,)* }
            }
        }
    };
}

codes! {
    /// The command outlived its timeout; its process group was killed.
    ExecTimeout = 0x0100, Execution, "exec_timeout", 200;
    /// The command could not be started or its output could not be read.
    ExecError = 0x0101, Execution, "exec_error", 200;
    /// The agent stopped or died while the command ran; its process group was killed (at
    /// once, or by the next agent to start) and the job is not run again.
    AgentRestarted = 0x0103, Execution, "agent_restarted", 200;
    /// The job was cancelled (`DELETE /v1/jobs/{id}`) while the command ran: everything it
    /// started was killed; `data` holds its output so far.
    Cancelled = 0x0104, Execution, "cancelled", 200;
    /// The command went past its `memory_max` and was killed by the kernel.
    MemoryLimit = 0x0105, Execution, "memory_limit", 200;

    /// The host is not registered with the dispatcher.
    NoSuchHost = 0x0201, Dispatch, "no_such_host", 404;
    /// The host did not answer in time (agent down, queue backlog, no result).
    HostNoAnswer = 0x0202, Dispatch, "host_no_answer", 200;
    /// The job could not be put on the queue before its deadline.
    QueueUnavailable = 0x0203, Dispatch, "queue_unavailable", 503;
    /// The job was revoked before the agent took it.
    Revoked = 0x0204, Dispatch, "revoked", 200;
    /// No job with this id.
    NoSuchJob = 0x0205, Dispatch, "no_such_job", 404;
    /// The dispatcher's database failed.
    StorageError = 0x0206, Dispatch, "storage_error", 500;
    /// The signed job envelope is larger than the queue's max job size.
    EnvelopeTooBig = 0x0207, Dispatch, "envelope_too_big", 200;
    /// No node of the fleet tree has this path.
    NoSuchNode = 0x0208, Dispatch, "no_such_node", 404;
    /// No standing task has this name (at this attach point).
    NoSuchTask = 0x0209, Dispatch, "no_such_task", 404;
    /// Never started: an earlier batch crossed the job's failure threshold, or the job
    /// was cancelled before its turn came.
    Skipped = 0x020A, Dispatch, "skipped", 200;

    /// The agent could not parse the job envelope.
    MalformedEnvelope = 0x0301, Host, "malformed_envelope", 200;
    /// The envelope names another host than the agent that reserved it.
    WrongHost = 0x0302, Host, "wrong_host", 200;
    /// The agent does not support the envelope's method.
    UnsupportedMethod = 0x0303, Host, "unsupported_method", 200;
    /// `sync.query` could not read the host facts.
    QueryFailed = 0x0304, Host, "query_failed", 200;
    /// The envelope's `memory_max` or `cpu_max_milli` is above the agent's ceiling
    /// (`--max-memory`, `--max-cpu-milli`); the job was buried, never run.
    LimitAboveCeiling = 0x0305, Host, "limit_above_ceiling", 200;
    /// The envelope asks for a limit the host has no cgroup controller to enforce; the job
    /// was buried, never run (a limit is never silently left unenforced).
    LimitUnavailable = 0x0306, Host, "limit_unavailable", 200;
    /// An `integrity.*` job reached an agent with no `[integrity] rules` in its config.
    IntegrityNotConfigured = 0x0310, Host, "integrity_not_configured", 200;
    /// `integrity.check` or `integrity.update` found no baseline: run `integrity.init`.
    BaselineMissing = 0x0311, Host, "baseline_missing", 200;
    /// A `log.*` job named a path outside the agent's log roots (after resolving `..`
    /// and symlinks), or a file that is not a regular file.
    PathNotAllowed = 0x0312, Host, "path_not_allowed", 200;
    /// The agent's integrity rules file (aide.conf syntax) does not parse; the message
    /// names the line.
    RulesInvalid = 0x0313, Host, "rules_invalid", 200;
    /// The integrity scan or the baseline write failed (I/O error on the state dir).
    IntegrityFailed = 0x0314, Host, "integrity_failed", 200;
    /// A `log.*` job reached an agent with no `[log] roots` in its config.
    LogsNotConfigured = 0x0315, Host, "logs_not_configured", 200;
    /// A `log.*` file could not be read (missing, unreadable, I/O error).
    LogReadFailed = 0x0316, Host, "log_read_failed", 200;
    /// The agent refused the job's `args` (bad pattern, over its own caps).
    InvalidArgs = 0x0317, Host, "invalid_args", 200;

    /// The request carries no bearer token but the dispatcher requires one.
    MissingToken = 0x0401, Auth, "missing_token", 401;
    /// The bearer token is not known.
    InvalidToken = 0x0402, Auth, "invalid_token", 401;
    /// The token's allow-list does not permit this command.
    CommandNotAllowed = 0x0403, Auth, "command_not_allowed", 403;
    /// The token may not use this endpoint or method.
    OperationNotAllowed = 0x0404, Auth, "operation_not_allowed", 403;
    /// The agent found the envelope's signature invalid; the job was buried, never run.
    BadSignature = 0x0405, Auth, "bad_signature", 200;
    /// The agent found the envelope expired; the job was buried, never run.
    EnvelopeExpired = 0x0406, Auth, "envelope_expired", 200;
    /// The client's address is not in the dispatcher's `--allow-client` list.
    ClientNotAllowed = 0x0407, Auth, "client_not_allowed", 403;
    /// The agent had already run this envelope; the copy was buried, never run.
    EnvelopeReplayed = 0x0408, Auth, "envelope_replayed", 200;
    /// The integrity baseline on the host fails its HMAC (or is another host's): it was
    /// edited, so nothing it says is trusted and no comparison is reported.
    BaselineTampered = 0x0409, Auth, "baseline_tampered", 200;

    /// The body is not well-formed JSON.
    MalformedJson = 0x0501, Validation, "malformed_json", 400;
    /// A required field is missing.
    MissingField = 0x0502, Validation, "missing_field", 400;
    /// A field has the wrong JSON type.
    WrongType = 0x0503, Validation, "wrong_type", 400;
    /// `hosts` is empty.
    EmptyHosts = 0x0504, Validation, "empty_hosts", 400;
    /// `method` is not one the dispatcher knows (`sync.bash`, `async.bash`, `sync.query`,
    /// `integrity.*`, `log.*`).
    UnknownMethod = 0x0505, Validation, "unknown_method", 400;
    /// `cmd` is longer than the dispatcher accepts.
    CmdTooLarge = 0x0506, Validation, "cmd_too_large", 400;
    /// A field has a value out of its range or format (bad UUID, timeout, host id, ...).
    InvalidValue = 0x0507, Validation, "invalid_value", 400;
    /// The body has a field, or the URL a query parameter, the API does not know.
    UnknownField = 0x0508, Validation, "unknown_field", 400;
    /// The job id was used before.
    DuplicateJobId = 0x0509, Validation, "duplicate_job_id", 409;
    /// The request body is larger than the dispatcher accepts.
    BodyTooLarge = 0x050A, Validation, "body_too_large", 413;
    /// No endpoint has this path.
    NoSuchEndpoint = 0x050B, Validation, "no_such_endpoint", 404;
    /// The endpoint exists but does not take this HTTP method.
    MethodNotAllowed = 0x050C, Validation, "method_not_allowed", 405;
    /// A node path is malformed (empty segment, bad character, too deep).
    InvalidPath = 0x050D, Validation, "invalid_path", 400;
    /// A node's level does not fit where it sits in the tree (a root that is not a
    /// product, a child not below its parent).
    LevelOutOfOrder = 0x050E, Validation, "level_out_of_order", 400;
    /// The request names a node (a parent, a host's node, a target's node) that does not exist.
    UnknownNode = 0x050F, Validation, "unknown_node", 400;
    /// The target names nothing, or selects no host.
    EmptyTarget = 0x0510, Validation, "empty_target", 400;
    /// A node already has this path.
    NodeExists = 0x0511, Validation, "node_exists", 409;
    /// The node still has children or hosts, and the delete did not ask to cascade.
    NodeNotEmpty = 0x0512, Validation, "node_not_empty", 409;
    /// A standing task is invalid: its name, kind, attach point, schedule (`every`, `cron`,
    /// both or neither) or command.
    InvalidTask = 0x0513, Validation, "invalid_task", 400;
}

impl Code {
    /// The numeric code, `(type << 8) | code`.
    pub fn value(self) -> u16 {
        self as u16
    }

    /// The code as `0x0100`-style hex, as written in the docs.
    pub fn hex(self) -> String {
        format!("0x{:04X}", self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_byte_matches_the_type() {
        for code in Code::ALL {
            let expected = match code.code_type() {
                CodeType::Execution => 0x01,
                CodeType::Dispatch => 0x02,
                CodeType::Host => 0x03,
                CodeType::Auth => 0x04,
                CodeType::Validation => 0x05,
            };
            assert_eq!(code.value() >> 8, expected, "{code:?}");
        }
    }

    #[test]
    fn codes_and_labels_are_unique() {
        let mut values: Vec<u16> = Code::ALL.iter().map(|c| c.value()).collect();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), Code::ALL.len());
        let mut labels: Vec<&str> = Code::ALL.iter().map(|c| c.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Code::ALL.len());
    }

    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../../../docs/DISPATCH.md");
        for code in Code::ALL {
            assert!(doc.contains(&code.hex()), "{} ({}) missing from docs/DISPATCH.md", code.hex(), code.label());
            assert!(doc.contains(code.label()), "{} missing from docs/DISPATCH.md", code.label());
        }
    }
}
