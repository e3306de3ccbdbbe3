//! What a simulated agent does with one envelope, as `polaris-agent` would: verify its
//! signature, its host and its expiry, and answer with a signed [`HostResult`] on its reply
//! tube, put with the agent's priority and TTR. Pure functions of the envelope's bytes, so
//! the event loop of [`crate::sim`] only moves bytes.
//!
//! The simulator runs no command: a "command" takes `--command-ms` and exits 0, or 1 for
//! the `--failure-rate` share of runs, which polaris-agent reports as `success` with that
//! exit status (`Normal termination`), with `--output-bytes` of output.

use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, HostResult, JobEnvelope, Resp, Secret};

/// polaris-agent's priority of results.
const RESULT_PRIORITY: u32 = 100;
/// polaris-agent's TTR of results.
const RESULT_TTR: u32 = 60;

/// What to do with a reserved envelope.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Run it: answer after the command time.
    Run(Box<JobEnvelope>),
    /// Bury it, never run, and report why on the reply tube when the envelope can be
    /// trusted to name one (`None`: it cannot).
    Refuse {
        /// The refusal to put, with the tube to put it on.
        report: Option<(String, HostResult)>,
        /// Why, for the simulator's error count.
        why: String,
    },
}

/// Checks an envelope as polaris-agent does before it runs anything.
pub(crate) fn decide(secret: &Secret, host: &str, body: &[u8], now_unix: u64) -> Decision {
    let payload = match wire::open(secret, body) {
        Ok(payload) => payload,
        Err(e) => return Decision::Refuse { report: None, why: format!("envelope signature: {e}") },
    };
    let envelope: JobEnvelope = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(e) => return Decision::Refuse { report: None, why: format!("malformed envelope: {e}") },
    };
    let (code, why) = if envelope.host != host {
        (Code::WrongHost, format!("Refused: envelope is for host {:?}, delivered to {host:?}", envelope.host))
    } else if now_unix > envelope.expires_at {
        let late = now_unix - envelope.expires_at;
        (
            Code::EnvelopeExpired,
            format!("Refused: envelope expired {late}s before the agent took it; job buried, not run"),
        )
    } else {
        return Decision::Run(Box::new(envelope));
    };
    let result = HostResult {
        resp: Resp::Failed,
        retcode: u32::from(code.value()),
        message: why.clone(),
        ..result_base(&envelope, host)
    };
    Decision::Refuse { report: Some((envelope.reply_tube.clone(), result)), why }
}

fn result_base(envelope: &JobEnvelope, host: &str) -> HostResult {
    HostResult {
        v: 1,
        job_id: envelope.job_id.clone(),
        host: host.to_string(),
        resp: Resp::Success,
        retcode: 0,
        message: String::new(),
        data: String::new(),
        encoding: None,
        truncated: false,
        output_bytes: 0,
        attempt: envelope.attempt,
    }
}

/// The result of a simulated command that exited with `exit_code` after printing
/// `output_bytes` bytes (`x`s and a newline).
pub(crate) fn command_result(envelope: &JobEnvelope, exit_code: u32, output_bytes: usize) -> HostResult {
    let mut data = "x".repeat(output_bytes.saturating_sub(1));
    if output_bytes > 0 {
        data.push('\n');
    }
    HostResult {
        retcode: exit_code,
        message: "Normal termination".into(),
        output_bytes: data.len() as u64,
        data,
        ..result_base(envelope, &envelope.host)
    }
}

/// The commands that put `result`, signed, on `tube` (`use`, then `put`), as polaris-agent
/// sends them; two replies follow (`USING`, `INSERTED`).
pub(crate) fn put_commands(secret: &Secret, tube: &str, result: &HostResult) -> anyhow::Result<Vec<u8>> {
    let body = wire::sign(secret, &serde_json::to_vec(result)?);
    let mut out = Vec::with_capacity(body.len() + tube.len() + 48);
    out.extend_from_slice(format!("use {tube}\r\nput {RESULT_PRIORITY} 0 {RESULT_TTR} {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// The commands that bury queue job `id` as polaris-agent does a refused envelope.
pub(crate) fn bury_command(id: u64) -> Vec<u8> {
    format!("bury {id} {RESULT_PRIORITY}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use polaris_ops_wire::wire::Method;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef0123".to_vec()).expect("a long enough secret")
    }

    fn envelope(host: &str, expires_at: u64) -> JobEnvelope {
        JobEnvelope {
            v: 1,
            job_id: "job-1".into(),
            host: host.into(),
            method: Method::AsyncBash,
            cmd: "true".into(),
            timeout: 30,
            reply_tube: "polaris.results".into(),
            issued_at: 100,
            expires_at,
            kill_grace_ms: Some(5000),
            attempt: Some(2),
            memory_max: None,
            cpu_max_milli: None,
            args: None,
        }
    }

    fn signed(envelope: &JobEnvelope) -> Vec<u8> {
        wire::sign(&secret(), &serde_json::to_vec(envelope).expect("json"))
    }

    #[test]
    fn a_good_envelope_runs_and_its_result_opens_with_the_secret() {
        let Decision::Run(env) = decide(&secret(), "sim-00001", &signed(&envelope("sim-00001", 200)), 150) else {
            panic!("refused a good envelope");
        };
        let result = command_result(&env, 1, 4);
        assert_eq!((result.resp, result.retcode, result.data.as_str()), (Resp::Success, 1, "xxx\n"));
        assert_eq!((result.attempt, result.output_bytes), (Some(2), 4));
        let commands = put_commands(&secret(), &env.reply_tube, &result).expect("commands");
        let text = String::from_utf8(commands).expect("utf-8");
        let (use_line, rest) = text.split_once("\r\n").expect("use line");
        assert_eq!(use_line, "use polaris.results");
        let (put_line, body) = rest.split_once("\r\n").expect("put line");
        let body = body.strip_suffix("\r\n").expect("body ends with CRLF");
        assert_eq!(put_line, format!("put 100 0 60 {}", body.len()));
        let payload = wire::open(&secret(), body.as_bytes()).expect("signed with the secret");
        assert!(matches!(wire::Reply::parse(payload), Ok(wire::Reply::Result(r)) if r == result));
        assert_eq!(command_result(&env, 0, 0).data, "");
    }

    #[test]
    fn bad_envelopes_are_refused() {
        let other = Secret::new(b"another secret of 16+".to_vec()).expect("secret");
        let forged = wire::sign(&other, &serde_json::to_vec(&envelope("sim-00001", 200)).expect("json"));
        assert!(matches!(decide(&secret(), "sim-00001", &forged, 150), Decision::Refuse { report: None, .. }));
        let garbage = wire::sign(&secret(), b"{\"v\":1}");
        assert!(matches!(decide(&secret(), "sim-00001", &garbage, 150), Decision::Refuse { report: None, .. }));
        let Decision::Refuse { report: Some((tube, result)), .. } =
            decide(&secret(), "sim-00002", &signed(&envelope("sim-00001", 200)), 150)
        else {
            panic!("ran an envelope for another host");
        };
        assert_eq!((tube.as_str(), result.retcode), ("polaris.results", u32::from(Code::WrongHost.value())));
        let Decision::Refuse { report: Some((_, result)), .. } =
            decide(&secret(), "sim-00001", &signed(&envelope("sim-00001", 200)), 201)
        else {
            panic!("ran an expired envelope");
        };
        assert_eq!((result.resp, result.retcode), (Resp::Failed, u32::from(Code::EnvelopeExpired.value())));
        assert_eq!(bury_command(7), b"bury 7 100\r\n");
    }
}
