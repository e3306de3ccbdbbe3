//! End to end, `GET /v1/jobs/{id}/events`: the Server-Sent Events stream of a job shows
//! every host's state changes, the batches, and a final `done`; it resumes after a
//! `Last-Event-ID`, and replays a job that finished long ago.

use polaris_testkit::cluster::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::Duration;

/// One SSE event.
#[derive(Debug, Clone)]
struct Sse {
    id: i64,
    event: String,
    data: Value,
}

/// Reads the stream of `url` until its `done` event.
fn read_stream(url: &str, last_event_id: Option<i64>) -> Vec<Sse> {
    let mut request = ureq::get(url).timeout(Duration::from_secs(120));
    if let Some(id) = last_event_id {
        request = request.set("Last-Event-ID", &id.to_string());
    }
    let response = request.call().expect("stream");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    let (mut id, mut event, mut data): (Option<i64>, Option<String>, Option<String>) = (None, None, None);
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.expect("line");
        if line.is_empty() {
            if let (Some(i), Some(e), Some(d)) = (id.take(), event.take(), data.take()) {
                let done = e == "done";
                events.push(Sse { id: i, event: e, data: serde_json::from_str(&d).expect("json data") });
                if done {
                    break;
                }
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v.to_string());
        }
    }
    events
}

fn states_of(events: &[Sse], host: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "host" && e.data["host"] == host)
        .map(|e| e.data["state"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_job_streams_its_changes_resumes_and_replays() {
    let cluster = Cluster::start(&["e1", "e2"]);
    let (status, reply) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["e1", "e2"], "method": "async.bash", "cmd": "echo hi from $(basename $PWD)", "batch": {"size": 1}}),
    );
    assert_eq!(status, 202, "{reply}");
    let id = reply["id"].as_str().expect("id").to_string();
    let url = cluster.url(&format!("/v1/jobs/{id}/events"));
    let events = read_stream(&url, None);

    // Ids increase; the last is `done` with the summary.
    assert!(events.windows(2).all(|w| w[0].id <= w[1].id), "{events:?}");
    let done = events.last().expect("events");
    assert_eq!(done.event, "done");
    assert_eq!(done.data["summary"], json!({"success": 2}), "{events:?}");
    for host in ["e1", "e2"] {
        let states = states_of(&events, host);
        assert_eq!(states.first().map(String::as_str), Some("waiting"), "{host}: {states:?}");
        assert_eq!(states.last().map(String::as_str), Some("success"), "{host}: {states:?}");
        assert!(states.iter().any(|s| s == "pending") && states.iter().any(|s| s == "ready"), "{host}: {states:?}");
        let last = events.iter().rev().find(|e| e.event == "host" && e.data["host"] == host).expect("final");
        assert_eq!(last.data["data"], format!("hi from {host}\n"), "{last:?}");
    }
    let batches: Vec<&Value> = events.iter().filter(|e| e.event == "batch").map(|e| &e.data["current"]).collect();
    assert_eq!(batches, [&json!(1), &json!(2)], "{events:?}");
    // e2 starts only after e1 finished: its `pending` comes after e1's `success`.
    let position = |host: &str, state: &str| {
        events.iter().position(|e| e.event == "host" && e.data["host"] == host && e.data["state"] == state)
    };
    assert!(position("e1", "success") < position("e2", "pending"), "{events:?}");

    // Resuming after the third event replays exactly what came after it.
    let resumed = read_stream(&url, Some(events[2].id));
    let expected: Vec<i64> = events[3..].iter().map(|e| e.id).collect();
    let got: Vec<i64> = resumed.iter().map(|e| e.id).collect();
    assert_eq!(got, expected);

    // A bad Last-Event-ID is refused in the documented shape; an unknown job is 404.
    let (status, reply) = request_text("GET", &url, None, None);
    assert_eq!(status, 200, "{reply}");
    let bad = ureq::get(&url).set("Last-Event-ID", "yesterday").call();
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))), "{bad:?}");
    let (status, reply) = get(&cluster.url("/v1/jobs/00000000-0000-4000-8000-000000000000/events"));
    assert_eq!(status, 404, "{reply}");
}

/// A running command's output reaches the stream as it is printed, before the host's
/// final answer.
#[test]
fn output_streams_while_the_command_runs() {
    let cluster = Cluster::start(&["o1"]);
    let (status, reply) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["o1"], "method": "async.bash", "cmd": "echo first; sleep 3; echo second"}),
    );
    assert_eq!(status, 202, "{reply}");
    let id = reply["id"].as_str().expect("id").to_string();
    let events = read_stream(&cluster.url(&format!("/v1/jobs/{id}/events")), None);
    let output: Vec<&Sse> = events.iter().filter(|e| e.event == "output").collect();
    let first = output.first().unwrap_or_else(|| panic!("no output event: {events:?}"));
    assert_eq!((first.data["offset"].as_u64(), first.data["data"].as_str()), (Some(0), Some("first\n")), "{events:?}");
    assert_eq!(first.data["host"], "o1");
    let final_at = events.iter().position(|e| e.event == "host" && e.data["state"] == "success").expect("final");
    let first_at = events.iter().position(|e| e.event == "output").expect("output");
    assert!(first_at < final_at, "{events:?}");
    // The chunks add up to a prefix of the output; the result has all of it.
    let streamed: String = output.iter().map(|e| e.data["data"].as_str().unwrap_or("")).collect();
    assert!("first\nsecond\n".starts_with(&streamed), "{streamed:?}");
    assert_eq!(events[final_at].data["data"], "first\nsecond\n");
}
