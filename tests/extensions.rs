//! The protocol extensions over TCP: TTL, revoke, final states, counters.

use anyhow::Result;
use polaris_testkit::spawn_polarisd;
use std::thread;
use std::time::Duration;

#[test]
fn revoke_and_job_state_over_tcp() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let mut producer = server.connect()?;
    let mut worker = server.connect()?;
    assert_eq!(producer.line("put 0 0 60 1\r\na\r\n")?, "INSERTED 1");
    assert_eq!(producer.line("put 0 30 60 1\r\nb\r\n")?, "INSERTED 2");
    assert_eq!(producer.line("put 0 0 60 1\r\nc\r\n")?, "INSERTED 3");
    assert_eq!(worker.line("reserve\r\n")?, "RESERVED 1 1");
    assert_eq!(producer.line("job-state 1\r\n")?, "STATE reserved");
    assert_eq!(producer.line("job-state 2\r\n")?, "STATE delayed");
    assert_eq!(producer.line("revoke 1\r\n")?, "NOT_REVOKED");
    assert_eq!(producer.line("revoke 2\r\n")?, "REVOKED");
    assert_eq!(producer.line("revoke 2\r\n")?, "NOT_FOUND");
    assert_eq!(worker.line("delete 1\r\n")?, "DELETED");
    assert_eq!(producer.line("job-state 1\r\n")?, "STATE success");
    assert_eq!(producer.line("job-state 2\r\n")?, "STATE revoked");
    assert_eq!(producer.line("job-state 3\r\n")?, "STATE ready");
    assert_eq!(producer.line("job-state 99\r\n")?, "NOT_FOUND");
    let stats = producer.roundtrip(b"polaris-stats\r\n")?;
    let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
    assert!(text.contains("jobs-revoked: 1\n") && text.contains("tombstones: 2\n"), "{text}");
    // The plain beanstalk view of the same server is unchanged: no new fields.
    let stats = producer.roundtrip(b"stats\r\n")?;
    let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
    assert!(text.contains("\nplatform: ") && !text.contains("revoked") && !text.contains("expired"), "{text}");
    Ok(())
}

#[test]
fn ttl_per_job_and_per_tube_flag() -> Result<()> {
    let server = spawn_polarisd(&["--tube-ttl", "metrics=1"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 60 1 ttl=1\r\na\r\n")?, "INSERTED 1");
    // A malformed extension is a malformed put: BAD_FORMAT, and (as in beanstalk)
    // the body that follows is read as a command.
    assert_eq!(c.line("put 0 0 60 1 ttl=bogus\r\na\r\n")?, "BAD_FORMAT");
    assert_eq!(c.read_reply()?.line_str(), "UNKNOWN_COMMAND");
    assert_eq!(c.line("use metrics\r\n")?, "USING metrics");
    // An unmodified client's put gets the tube default.
    assert_eq!(c.line("put 0 0 60 1\r\nb\r\n")?, "INSERTED 2");
    assert_eq!(c.line("put 0 0 60 1 ttl=0\r\nc\r\n")?, "INSERTED 3");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.line("job-state 1\r\n")?, "STATE expired");
    assert_eq!(c.line("job-state 2\r\n")?, "STATE expired");
    assert_eq!(c.line("job-state 3\r\n")?, "STATE ready");
    assert_eq!(c.line("tube-ttl metrics 0\r\n")?, "TTL_SET");
    assert_eq!(c.line("put 0 0 60 1\r\nd\r\n")?, "INSERTED 4");
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(c.line("job-state 4\r\n")?, "STATE ready");
    Ok(())
}

#[test]
fn a_reserve_beats_the_ttl() -> Result<()> {
    let server = spawn_polarisd(&[])?;
    let mut c = server.connect()?;
    let mut w = server.connect()?;
    assert_eq!(c.line("put 0 0 60 1 ttl=1\r\na\r\n")?, "INSERTED 1");
    assert_eq!(w.line("reserve\r\n")?, "RESERVED 1 1");
    assert_eq!(w.line("release 1 0 0\r\n")?, "RELEASED");
    thread::sleep(Duration::from_millis(1300));
    assert_eq!(c.line("job-state 1\r\n")?, "STATE ready");
    Ok(())
}
