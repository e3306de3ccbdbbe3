//! What the dispatcher and the agents say to each other through the queue: job envelopes
//! (dispatcher → `host.<id>` tube) and host results (agent → reply tube), both signed.
//!
//! A signed message is `polaris-v1 <hex HMAC-SHA256 of PAYLOAD>\n<PAYLOAD>` where PAYLOAD is
//! the JSON text. The MAC covers the exact payload bytes, so a message is verified before
//! it is parsed and nobody who can only reach the queue can forge a job or a result.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The first word of every signed message; a new format gets a new word.
pub const SIGNED_MAGIC: &str = "polaris-v1";

/// The tube agents put results on unless the dispatcher names another.
pub const DEFAULT_REPLY_TUBE: &str = "polaris.results";

/// Shortest secret accepted, in bytes: shorter ones are guessable.
pub const MIN_SECRET_LEN: usize = 16;

/// The env variable holding the shared secret when no secret file is given.
pub const SECRET_ENV: &str = "POLARIS_SECRET";

/// The tube an agent for `host_id` watches.
pub fn host_tube(host_id: &str) -> String {
    format!("host.{host_id}")
}

/// The tube of signed [`ControlMessage`]s for `host_id`'s agent, which it watches on a
/// connection of its own, so it hears a cancel while it runs a command.
pub fn control_tube(host_id: &str) -> String {
    format!("control.{host_id}")
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The shared secret keying the HMAC. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Read {
        /// The file named by `--secret-file`.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Neither a secret file nor the env variable was given.
    #[error("no shared secret: pass --secret-file FILE or set {SECRET_ENV}")]
    Missing,
    /// The secret is too short.
    #[error("the shared secret must be at least {MIN_SECRET_LEN} bytes, got {0}")]
    TooShort(usize),
}

impl Secret {
    /// Wraps raw secret bytes, refusing secrets shorter than [`MIN_SECRET_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Secret, SecretError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(Secret(bytes))
    }

    /// Loads the secret from `file` if given (trailing newlines trimmed, so `echo x > f`
    /// works), else from the `POLARIS_SECRET` env variable.
    pub fn load(file: Option<&Path>) -> Result<Secret, SecretError> {
        let mut bytes = match file {
            Some(path) => {
                std::fs::read(path).map_err(|source| SecretError::Read { path: path.display().to_string(), source })?
            }
            None => std::env::var_os(SECRET_ENV).map(|v| v.into_encoded_bytes()).ok_or(SecretError::Missing)?,
        };
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        Secret::new(bytes)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

/// Why a signed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The message does not start with the expected header line.
    #[error("not a signed polaris message")]
    NotSigned,
    /// The MAC does not match the payload.
    #[error("signature does not match")]
    BadSignature,
}

/// Signs `payload`, returning the message to put on the queue.
pub fn sign(secret: &Secret, payload: &[u8]) -> Vec<u8> {
    let mut mac = secret.mac();
    mac.update(payload);
    let tag = hex::encode(mac.finalize().into_bytes());
    let mut out = Vec::with_capacity(SIGNED_MAGIC.len() + 66 + payload.len());
    out.extend_from_slice(SIGNED_MAGIC.as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Splits a signed message into its payload without checking the MAC: only for reporting
/// about messages that failed [`open`], never for acting on them.
pub fn unverified_payload(message: &[u8]) -> Option<&[u8]> {
    let newline = message.iter().position(|&b| b == b'\n')?;
    message.get(newline + 1..)
}

/// The hex signature in a signed message's header, without checking it: a message on the
/// queue whose signature equals the one of an envelope we put is that envelope.
pub fn signature_of(message: &[u8]) -> Option<&str> {
    let newline = message.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&message[..newline]).ok()?;
    header.strip_prefix(SIGNED_MAGIC)?.strip_prefix(' ')
}

/// Verifies a signed message (constant-time MAC comparison) and returns its payload.
pub fn open<'a>(secret: &Secret, message: &'a [u8]) -> Result<&'a [u8], OpenError> {
    let newline = message.iter().position(|&b| b == b'\n').ok_or(OpenError::NotSigned)?;
    let header = std::str::from_utf8(&message[..newline]).map_err(|_| OpenError::NotSigned)?;
    let tag_hex =
        header.strip_prefix(SIGNED_MAGIC).and_then(|rest| rest.strip_prefix(' ')).ok_or(OpenError::NotSigned)?;
    // Only the lowercase hex that `sign` writes: `hex::decode` also takes uppercase,
    // which would let a changed message (same tag, other case) open.
    if tag_hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(OpenError::BadSignature);
    }
    let tag = hex::decode(tag_hex).map_err(|_| OpenError::BadSignature)?;
    let payload = &message[newline + 1..];
    let mut mac = secret.mac();
    mac.update(payload);
    mac.verify_slice(&tag).map_err(|_| OpenError::BadSignature)?;
    Ok(payload)
}

/// What a job asks a host to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// Run `cmd` with `bash -c`; the REST call waits for the results.
    #[serde(rename = "sync.bash")]
    SyncBash,
    /// Run `cmd` with `bash -c`; the REST call answers at once with the job id.
    #[serde(rename = "async.bash")]
    AsyncBash,
    /// Report host facts from `/proc`; the REST call waits for the results.
    #[serde(rename = "sync.query")]
    SyncQuery,
    /// Build the file-integrity baseline from the agent's own rules (aide.conf syntax).
    #[serde(rename = "integrity.init")]
    IntegrityInit,
    /// Compare the files with the baseline and report what was added, removed, changed.
    #[serde(rename = "integrity.check")]
    IntegrityCheck,
    /// Check, then accept what is found as the new baseline.
    #[serde(rename = "integrity.update")]
    IntegrityUpdate,
    /// The last lines (or bytes) of a file under the agent's log roots; needs `args`.
    #[serde(rename = "log.tail")]
    LogTail,
    /// The lines of a file under the agent's log roots matching a regex; needs `args`.
    #[serde(rename = "log.grep")]
    LogGrep,
}

impl Method {
    /// The wire name (`sync.bash`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::SyncBash => "sync.bash",
            Method::AsyncBash => "async.bash",
            Method::SyncQuery => "sync.query",
            Method::IntegrityInit => "integrity.init",
            Method::IntegrityCheck => "integrity.check",
            Method::IntegrityUpdate => "integrity.update",
            Method::LogTail => "log.tail",
            Method::LogGrep => "log.grep",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Method> {
        match name {
            "sync.bash" => Some(Method::SyncBash),
            "async.bash" => Some(Method::AsyncBash),
            "sync.query" => Some(Method::SyncQuery),
            "integrity.init" => Some(Method::IntegrityInit),
            "integrity.check" => Some(Method::IntegrityCheck),
            "integrity.update" => Some(Method::IntegrityUpdate),
            "log.tail" => Some(Method::LogTail),
            "log.grep" => Some(Method::LogGrep),
            _ => None,
        }
    }

    /// Whether the REST call waits for the hosts' results.
    pub fn is_sync(self) -> bool {
        !matches!(self, Method::AsyncBash)
    }

    /// Every method, in the order the docs list them.
    pub const ALL: &'static [Method] = &[
        Method::SyncBash,
        Method::AsyncBash,
        Method::SyncQuery,
        Method::IntegrityInit,
        Method::IntegrityCheck,
        Method::IntegrityUpdate,
        Method::LogTail,
        Method::LogGrep,
    ];

    /// Whether the method runs `cmd` (as opposed to answering from the agent's own code).
    pub fn runs_command(self) -> bool {
        matches!(self, Method::SyncBash | Method::AsyncBash)
    }

    /// Whether the method needs an `args` object (and only these may carry one).
    pub fn takes_args(self) -> bool {
        matches!(self, Method::LogTail | Method::LogGrep)
    }
}

/// The job for one host, as put on `host.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnvelope {
    /// Format version (1).
    pub v: u32,
    /// The dispatch job id (a UUID), shared by all hosts of one REST call.
    pub job_id: String,
    /// The host this envelope is for; an agent refuses envelopes for other hosts.
    pub host: String,
    /// What to do.
    pub method: Method,
    /// The command for `bash -c` (empty for `sync.query`).
    pub cmd: String,
    /// Seconds the command may run before its process group is killed.
    pub timeout: u32,
    /// The tube to put the [`HostResult`] on.
    pub reply_tube: String,
    /// Unix seconds when the dispatcher issued the envelope.
    pub issued_at: u64,
    /// Unix seconds after which an agent must not start the job.
    pub expires_at: u64,
    /// Milliseconds from SIGTERM to SIGKILL for a command past `timeout`, as the
    /// dispatcher sized its waits for it: the agent uses the smaller of this and its own
    /// `--kill-grace-ms`, so its kill path always reports before a sync call gives up.
    /// Absent (an older dispatcher): the agent's own setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace_ms: Option<u64>,
    /// Which attempt this is, from 1, when the job retries failed hosts; absent means 1.
    /// A retry is a new envelope with the next attempt: the agent's ledger keys runs by
    /// job, host and attempt, so a retry runs and a copy of one attempt never does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Most memory the command and everything it starts may use, in bytes (a cgroup's
    /// memory limit); the agent refuses a limit above its own ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// Most CPU time the command may use, in thousandths of a CPU (500: half a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_milli: Option<u32>,
    /// The method's arguments (`log.tail`, `log.grep`), as validated by the dispatcher;
    /// the agent checks them again against its own limits. Absent for other methods, so
    /// their envelopes are as they always were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
}

impl JobEnvelope {
    /// The attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt.unwrap_or(1)
    }
}

/// What a [`ControlMessage`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlKind {
    /// Stop the job's command if it runs (its whole containment unit is killed and the
    /// result says `cancelled` with the output so far), and never start it if it has not.
    Cancel,
}

/// A signed order to an agent about a job, put on [`control_tube`] by the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    /// Format version (1).
    pub v: u32,
    /// What to do.
    pub kind: ControlKind,
    /// The dispatch job id.
    pub job_id: String,
    /// The host it is for; an agent ignores messages for other hosts.
    pub host: String,
    /// The attempt it is about; absent means every attempt of the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Unix seconds when the dispatcher issued it.
    pub issued_at: u64,
}

/// `success` or `failed`, as in the REST reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resp {
    /// The command ran (whatever its exit status) or the query was answered.
    Success,
    /// The job did not run to an answer; `retcode` is a [`crate::codes::Code`].
    Failed,
}

impl Resp {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Resp::Success => "success",
            Resp::Failed => "failed",
        }
    }
}

/// One host's answer, as put on the reply tube by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResult {
    /// Format version (1).
    pub v: u32,
    /// The dispatch job id from the envelope.
    pub job_id: String,
    /// The answering host.
    pub host: String,
    /// Whether the job ran to an answer.
    pub resp: Resp,
    /// Exit status (or 128 + signal) on success; a 16-bit code on failure.
    pub retcode: u32,
    /// `Normal termination`, the signal that ended the command, or what went wrong.
    pub message: String,
    /// The command's combined stdout and stderr (possibly truncated), or the query facts:
    /// the text itself, or its bytes in base64 when `encoding` says so.
    pub data: String,
    /// How `data` holds the output: absent for UTF-8 text (the usual case, so such results
    /// look as they always did), [`Encoding::Base64`] for output that is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Whether `data` holds less than the command printed.
    pub truncated: bool,
    /// How many bytes the command printed in all.
    pub output_bytes: u64,
    /// The envelope's attempt, echoed (absent for attempt 1 and from older agents), so a
    /// late answer to an attempt that was retried is not taken for the retry's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// A piece of a running command's output, put on the reply tube by its agent as the
/// command prints it, so people can watch a rollout as it happens. Chunks are bounded in
/// size and rate by the agent, and in all to the result's cap; the result still carries
/// the whole (capped) output, so a lost chunk loses nothing but liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Format version (1).
    pub v: u32,
    /// Always `output`: what tells a chunk from a [`HostResult`] on the reply tube.
    pub kind: String,
    /// The dispatch job id from the envelope.
    pub job_id: String,
    /// The host running it.
    pub host: String,
    /// The envelope's attempt, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Where in the output this chunk starts, in bytes.
    pub offset: u64,
    /// The bytes: text, or base64 when `encoding` says so.
    pub data: String,
    /// As in [`HostResult::encoding`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// The `kind` of an [`OutputChunk`].
pub const OUTPUT_CHUNK_KIND: &str = "output";

/// What changed under a continuous-integrity standing task since the agent's last report
/// for it, put on the reply tube by the agent's runner of that task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrityReport {
    /// Format version (1).
    pub v: u32,
    /// Always `integrity`.
    pub kind: String,
    /// The reporting host.
    pub host: String,
    /// The standing task's name.
    pub task: String,
    /// The agent's number of this report for the task, from 1 (kept in its state dir).
    pub seq: u64,
    /// Unix milliseconds of the scan.
    pub at_ms: u64,
    /// AIDE's bits for the changes reported (1 added, 2 removed, 4 changed).
    pub retcode: u32,
    /// One line for people.
    pub message: String,
    /// The integrity report JSON (as `integrity.check` renders it, capped) of the changes.
    pub report: serde_json::Value,
}

/// The `kind` of an [`IntegrityReport`].
pub const INTEGRITY_REPORT_KIND: &str = "integrity";

/// New complete lines of a watched log file, put on the reply tube by the agent's runner
/// of a `log` standing task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// Format version (1).
    pub v: u32,
    /// Always `log`.
    pub kind: String,
    /// The reporting host.
    pub host: String,
    /// The standing task's name.
    pub task: String,
    /// The path as the task names it.
    pub path: String,
    /// Which incarnation of the file: `dev:inode:generation` (the generation grows when
    /// the file is truncated), so a line is named by (file, offset) exactly once.
    pub file: String,
    /// Byte offset in that file of the first line.
    pub offset: u64,
    /// The lines, without their newline (bytes that are not UTF-8 replaced).
    pub lines: Vec<String>,
    /// How many bytes of the file each line takes, its newline included (so the next
    /// line's offset is known even where replacement changed a line's length).
    pub lengths: Vec<u64>,
    /// Set (with no lines) when the agent will not read the path: outside its log roots,
    /// or a symlink leading out of them. Sent once per agent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// Why an agent will not follow a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The code's label, e.g. `path_not_allowed`.
    pub code: String,
    /// What it said.
    pub message: String,
}

/// The `kind` of a [`LogBatch`].
pub const LOG_BATCH_KIND: &str = "log";

/// What an agent puts on the reply tube.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A host's final answer.
    Result(HostResult),
    /// A piece of a running command's output.
    Output(OutputChunk),
    /// Changes found by a continuous-integrity standing task.
    Integrity(IntegrityReport),
    /// Lines of a watched log file.
    Log(LogBatch),
}

impl Reply {
    /// Parses a verified payload by its `kind` (`output`, `integrity`, `log`); without
    /// one it is a result.
    pub fn parse(payload: &[u8]) -> Result<Reply, serde_json::Error> {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(default)]
            kind: Option<String>,
        }
        let kind: Kind = serde_json::from_slice(payload)?;
        match kind.kind.as_deref() {
            Some(OUTPUT_CHUNK_KIND) => serde_json::from_slice(payload).map(Reply::Output),
            Some(INTEGRITY_REPORT_KIND) => serde_json::from_slice(payload).map(Reply::Integrity),
            Some(LOG_BATCH_KIND) => serde_json::from_slice(payload).map(Reply::Log),
            _ => serde_json::from_slice(payload).map(Reply::Result),
        }
    }
}

/// How a result's `data` holds output that is not UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Standard base64 (RFC 4648, with padding) of the exact bytes.
    Base64,
}

impl Encoding {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Base64 => "base64",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Encoding> {
        match name {
            "base64" => Some(Encoding::Base64),
            _ => None,
        }
    }
}

/// Output bytes as a result's `data`, without losing any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputData {
    /// The text, or the base64 of the bytes.
    pub data: String,
    /// `None` for text, else how `data` is encoded.
    pub encoding: Option<Encoding>,
    /// How many of the output bytes `data` holds.
    pub kept: usize,
}

impl OutputData {
    /// Encodes `output`: UTF-8 text stays text; anything else becomes base64 of the exact
    /// bytes. When `cut` (the bytes are a prefix cut at a size cap), a character the cut
    /// split is dropped, so text cut in the middle of a character stays text and `kept`
    /// says how many bytes remain.
    pub fn new(output: &[u8], cut: bool) -> OutputData {
        match std::str::from_utf8(output) {
            Ok(text) => OutputData { data: text.to_string(), encoding: None, kept: output.len() },
            // An incomplete character at the very end, where the cap cut it.
            Err(e) if cut && e.error_len().is_none() => {
                let valid = &output[..e.valid_up_to()];
                let text = std::str::from_utf8(valid).unwrap_or_default();
                OutputData { data: text.to_string(), encoding: None, kept: valid.len() }
            }
            Err(_) => OutputData { data: base64_encode(output), encoding: Some(Encoding::Base64), kept: output.len() },
        }
    }
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef-test".to_vec()).expect("long enough")
    }

    #[test]
    fn signed_message_round_trips() {
        let msg = sign(&secret(), b"{\"a\":1}");
        assert!(msg.starts_with(b"polaris-v1 "));
        assert_eq!(open(&secret(), &msg), Ok(&b"{\"a\":1}"[..]));
        let tag = signature_of(&msg).expect("a signature");
        assert_eq!(tag.len(), 64);
        assert_ne!(signature_of(&sign(&secret(), b"{\"a\":2}")), Some(tag));
        assert_eq!(signature_of(b"stranger 1"), None);
    }

    #[test]
    fn tampered_or_foreign_messages_are_refused() {
        let mut msg = sign(&secret(), b"{\"cmd\":\"ls\"}");
        let last = msg.len() - 3;
        msg[last] = b'X';
        assert_eq!(open(&secret(), &msg), Err(OpenError::BadSignature));
        let other = Secret::new(b"another-secret-of-16".to_vec()).expect("long enough");
        assert_eq!(open(&other, &sign(&secret(), b"x")), Err(OpenError::BadSignature));
        assert_eq!(open(&secret(), b"{\"cmd\":\"ls\"}"), Err(OpenError::NotSigned));
        assert_eq!(open(&secret(), b"polaris-v1 zz\n{}"), Err(OpenError::BadSignature));
    }

    #[test]
    fn a_tag_in_uppercase_hex_is_refused() {
        // Found by the envelope fuzz target: the same MAC in other case opened.
        let msg = sign(&secret(), b"{}");
        let upper: Vec<u8> =
            msg.iter().map(|b| if b.is_ascii_hexdigit() { b.to_ascii_uppercase() } else { *b }).collect();
        let upper = [&msg[..SIGNED_MAGIC.len()], &upper[SIGNED_MAGIC.len()..]].concat();
        assert_ne!(upper, msg);
        assert_eq!(open(&secret(), &upper), Err(OpenError::BadSignature));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(Secret::new(b"short".to_vec()), Err(SecretError::TooShort(5))));
    }

    #[test]
    fn methods_use_their_wire_names() {
        for &m in Method::ALL {
            assert_eq!(Method::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_string(&m).ok(), Some(format!("\"{}\"", m.as_str())));
        }
        assert_eq!(Method::parse("sync.python"), None);
    }

    #[test]
    fn output_keeps_its_bytes() {
        assert_eq!(
            OutputData::new("héllo\n".as_bytes(), false),
            OutputData { data: "héllo\n".into(), encoding: None, kept: 7 }
        );
        let binary = [0xff, 0x00, b'a', 0xc3];
        let out = OutputData::new(&binary, false);
        assert_eq!((out.data.as_str(), out.encoding, out.kept), ("/wBhww==", Some(Encoding::Base64), 4));
        // A cap that split "é" keeps the text before it; without a cap it is binary.
        let cut = [b'a', b'b', 0xc3];
        assert_eq!(OutputData::new(&cut, true), OutputData { data: "ab".into(), encoding: None, kept: 2 });
        assert_eq!(OutputData::new(&cut, false).encoding, Some(Encoding::Base64));
        // Invalid bytes before the cut are binary whatever the cut.
        assert_eq!(OutputData::new(&[0xff, b'a', 0xc3], true).encoding, Some(Encoding::Base64));
    }

    #[test]
    fn standing_task_messages_parse_by_kind() {
        let log = LogBatch {
            v: 1,
            kind: LOG_BATCH_KIND.into(),
            host: "h".into(),
            task: "t".into(),
            path: "/var/log/x".into(),
            file: "1:2:0".into(),
            offset: 0,
            lines: vec!["a".into()],
            lengths: vec![2],
            refused: None,
        };
        let json = serde_json::to_vec(&log).expect("json");
        assert!(!String::from_utf8_lossy(&json).contains("refused"));
        assert_eq!(Reply::parse(&json).expect("parse"), Reply::Log(log));
        let report = IntegrityReport {
            v: 1,
            kind: INTEGRITY_REPORT_KIND.into(),
            host: "h".into(),
            task: "t".into(),
            seq: 1,
            at_ms: 5,
            retcode: 4,
            message: "m".into(),
            report: serde_json::json!({"changed": []}),
        };
        let json = serde_json::to_vec(&report).expect("json");
        assert_eq!(Reply::parse(&json).expect("parse"), Reply::Integrity(report));
    }

    #[test]
    fn text_results_keep_their_shape() {
        let result = HostResult {
            v: 1,
            job_id: "j".into(),
            host: "h".into(),
            resp: Resp::Success,
            retcode: 0,
            message: "m".into(),
            data: "d".into(),
            encoding: None,
            truncated: false,
            output_bytes: 1,
            attempt: None,
        };
        let json = serde_json::to_value(&result).expect("json");
        assert!(json.get("encoding").is_none(), "{json}");
        let old: HostResult = serde_json::from_str(
            r#"{"v":1,"job_id":"j","host":"h","resp":"success","retcode":0,"message":"m","data":"d","truncated":false,"output_bytes":1}"#,
        )
        .expect("a result without encoding");
        assert_eq!(old, result);
        let binary = HostResult { encoding: Some(Encoding::Base64), ..result };
        assert_eq!(serde_json::to_value(&binary).expect("json")["encoding"], "base64");
    }
}
