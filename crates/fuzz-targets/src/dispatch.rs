//! The `dispatch_request` target: the dispatcher's validation of REST bodies.

use polaris_dispatch::request::{
    parse_host_registration, parse_job_request, MAX_CMD_BYTES, MAX_HOSTNAME_LEN, MAX_HOSTS, MAX_TIMEOUT_SECS,
};
use polaris_ops_wire::host_id::is_valid_host_id;
use polaris_ops_wire::wire::host_tube;
use polaris_proto::is_valid_tube_name;
use std::collections::HashSet;

/// Layout: the whole input is a request body, given to both parsers.
///
/// Checks: no panic; an accepted job request is within the bounds `docs/DISPATCH.md`
/// documents (1 to 10000 distinct hosts of 1 to 255 bytes, a canonical UUID if any,
/// a non-blank `cmd` of at most 16384 bytes for the bash methods, a timeout of 1 to
/// 86400 s) and reads back the same once written as JSON; an accepted registration
/// has a valid host id (so `host.<id>` is a valid tube name) and a hostname of at
/// most 255 bytes; a refusal carries a message.
pub fn dispatch_request(data: &[u8]) {
    match parse_job_request(data) {
        Ok(req) => {
            assert!((1..=MAX_HOSTS).contains(&req.hosts.len()), "{} hosts accepted", req.hosts.len());
            let distinct: HashSet<&String> = req.hosts.iter().collect();
            assert_eq!(distinct.len(), req.hosts.len(), "duplicate hosts accepted");
            for host in &req.hosts {
                assert!((1..=MAX_HOSTNAME_LEN).contains(&host.len()), "host of {} bytes accepted", host.len());
            }
            if let Some(id) = &req.id {
                let uuid = uuid::Uuid::parse_str(id).expect("an accepted id is a UUID");
                assert_eq!(&uuid.hyphenated().to_string(), id, "the id is not in canonical form");
            }
            if req.method.runs_command() {
                assert!(!req.cmd.trim().is_empty(), "a blank command was accepted");
            }
            assert!(req.cmd.len() <= MAX_CMD_BYTES, "a command of {} bytes was accepted", req.cmd.len());
            assert!((1..=MAX_TIMEOUT_SECS).contains(&req.timeout_secs), "timeout {} accepted", req.timeout_secs);
            let again = serde_json::json!({
                "id": req.id,
                "hosts": req.hosts,
                "method": req.method.as_str(),
                "cmd": req.cmd,
                "timeout": req.timeout_secs,
            });
            let reparsed = parse_job_request(again.to_string().as_bytes()).expect("an accepted request, rewritten");
            assert_eq!(reparsed, req, "the request reads back differently");
        }
        Err(e) => assert!(!e.message.is_empty(), "a refusal without a message"),
    }
    match parse_host_registration(data) {
        Ok(reg) => {
            assert!(is_valid_host_id(&reg.id), "invalid host id {:?} accepted", reg.id);
            assert!(is_valid_tube_name(host_tube(&reg.id).as_bytes()), "host.{} is not a tube name", reg.id);
            assert!(reg.hostname.len() <= MAX_HOSTNAME_LEN, "hostname of {} bytes accepted", reg.hostname.len());
        }
        Err(e) => assert!(!e.message.is_empty(), "a refusal without a message"),
    }
}
