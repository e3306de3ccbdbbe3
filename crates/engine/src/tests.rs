//! Engine tests driven by a fake clock, without sockets.

use super::*;
use bytes::BytesMut;
use polaris_proto::{Decoder, Limits};
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Default)]
struct Capture {
    out: HashMap<ConnId, Vec<u8>>,
}

impl ReplySink for Capture {
    fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        self.out.entry(conn).or_default().extend_from_slice(bytes);
    }
}

/// An engine, a fake clock and captured replies.
struct Harness {
    engine: Engine,
    cap: Capture,
    now: Nanos,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(Config::default())
    }

    fn with(cfg: Config) -> Harness {
        Harness { engine: Engine::new(cfg, 0, true), cap: Capture::default(), now: 0 }
    }

    fn conn(&mut self) -> ConnId {
        self.engine.connect()
    }

    /// Sends raw protocol bytes as `conn` and returns the outcome of the last command.
    /// The engine's invariants are checked after every decoded event.
    fn send(&mut self, conn: ConnId, input: &str) -> Outcome {
        let mut dec = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(input.as_bytes());
        let mut outcome = Outcome::Done;
        while let Some(d) = dec.decode(&mut buf) {
            outcome = self.engine.feed(conn, d, self.now, &mut self.cap);
            self.check();
        }
        outcome
    }

    /// Panics with the broken rule if the engine is inconsistent.
    fn check(&self) {
        if let Err(e) = self.engine.check_invariants() {
            panic!("engine invariant broken at {}ns: {e}", self.now);
        }
    }

    /// Sends one command and returns everything `conn` was sent since the last call.
    fn cmd(&mut self, conn: ConnId, input: &str) -> String {
        self.send(conn, input);
        self.take(conn)
    }

    fn take(&mut self, conn: ConnId) -> String {
        String::from_utf8_lossy(&self.cap.out.remove(&conn).unwrap_or_default()).into_owned()
    }

    /// Moves the clock to `secs` (plus `nanos`) and fires timers.
    fn at(&mut self, secs: u64, nanos: u64) {
        self.now = secs * SECOND + nanos;
        self.engine.tick(self.now, &mut self.cap);
        self.check();
        // A tick leaves nothing due.
        assert!(self.engine.next_deadline().is_none_or(|d| d > self.now), "a timer is still due after a tick");
    }

    fn put(&mut self, conn: ConnId, pri: u32, delay: u32, ttr: u32, body: &str) -> String {
        self.cmd(conn, &format!("put {pri} {delay} {ttr} {}\r\n{body}\r\n", body.len()))
    }
}

#[test]
fn ready_order_is_priority_then_id() {
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 5, 0, 10, "a");
    h.put(c, 1, 0, 10, "b");
    h.put(c, 5, 0, 10, "c");
    h.put(c, 1, 0, 10, "d");
    let order: Vec<String> = (0..4).map(|_| h.cmd(c, "reserve\r\n")).collect();
    assert_eq!(
        order,
        ["RESERVED 2 1\r\nb\r\n", "RESERVED 4 1\r\nd\r\n", "RESERVED 1 1\r\na\r\n", "RESERVED 3 1\r\nc\r\n"]
    );
}

#[test]
fn delayed_job_becomes_ready_exactly_at_its_deadline() {
    let mut h = Harness::new();
    let c = h.conn();
    assert_eq!(h.put(c, 0, 2, 10, "x"), "INSERTED 1\r\n");
    assert_eq!(h.cmd(c, "peek-ready\r\n"), "NOT_FOUND\r\n");
    assert_eq!(h.engine.next_deadline(), Some(2 * SECOND));
    h.at(1, 999_999_999);
    assert_eq!(h.cmd(c, "peek-ready\r\n"), "NOT_FOUND\r\n");
    h.at(2, 0);
    assert_eq!(h.cmd(c, "peek-ready\r\n"), "FOUND 1 1\r\nx\r\n");
}

#[test]
fn blocked_reserve_is_served_by_a_later_put() {
    let mut h = Harness::new();
    let worker = h.conn();
    let producer = h.conn();
    assert_eq!(h.send(worker, "reserve\r\n"), Outcome::Blocked);
    assert_eq!(h.take(worker), "");
    assert_eq!(h.put(producer, 0, 0, 10, "job"), "INSERTED 1\r\n");
    assert_eq!(h.take(worker), "RESERVED 1 3\r\njob\r\n");
}

#[test]
fn ttr_expiry_returns_the_job_and_counts_a_timeout() {
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 3, "x");
    assert_eq!(h.cmd(c, "reserve\r\n"), "RESERVED 1 1\r\nx\r\n");
    assert_eq!(h.engine.next_deadline(), Some(3 * SECOND));
    h.at(2, 999_999_999);
    assert!(h.cmd(c, "stats-job 1\r\n").contains("state: reserved"));
    h.at(3, 0);
    let stats = h.cmd(c, "stats-job 1\r\n");
    assert!(stats.contains("state: ready") && stats.contains("timeouts: 1"), "{stats}");
}

#[test]
fn ttr_of_one_second_still_times_out_while_the_connection_idles() {
    // beanstalkd 1.12 can leave this job reserved forever (a known bug).
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 0, "x");
    assert_eq!(h.cmd(c, "reserve\r\n"), "RESERVED 1 1\r\nx\r\n");
    h.at(1, 0);
    assert!(h.cmd(c, "stats-job 1\r\n").contains("state: ready"));
}

#[test]
fn deadline_soon_at_once_and_while_waiting() {
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 1, "x");
    h.cmd(c, "reserve\r\n");
    // TTR 1: the job is inside its safety margin at once.
    assert_eq!(h.cmd(c, "reserve\r\n"), "DEADLINE_SOON\r\n");

    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 3, "x");
    h.cmd(c, "reserve\r\n");
    assert_eq!(h.send(c, "reserve\r\n"), Outcome::Blocked);
    h.at(1, 999_999_999);
    assert_eq!(h.take(c), "");
    h.at(2, 0);
    assert_eq!(h.take(c), "DEADLINE_SOON\r\n");
}

#[test]
fn reserve_with_timeout_boundaries() {
    let mut h = Harness::new();
    let c = h.conn();
    assert_eq!(h.send(c, "reserve-with-timeout 0\r\n"), Outcome::Blocked);
    h.at(0, 0);
    assert_eq!(h.take(c), "TIMED_OUT\r\n");
    assert_eq!(h.send(c, "reserve-with-timeout 2\r\n"), Outcome::Blocked);
    h.at(1, 999_999_999);
    assert_eq!(h.take(c), "");
    h.at(2, 0);
    assert_eq!(h.take(c), "TIMED_OUT\r\n");
    h.put(c, 0, 0, 5, "y");
    assert_eq!(h.cmd(c, "reserve-with-timeout 0\r\n"), "RESERVED 1 1\r\ny\r\n");
}

#[test]
fn waiters_are_served_in_beanstalkd_order() {
    // Five waiters on one tube. beanstalkd takes them from a multiset with a
    // rotating cursor and swap-removal: the order is 1, 2, 3, 4, 5 only by luck
    // of the cursor; here it is 1, 2, 3, 5, 4.
    let mut h = Harness::new();
    let p = h.conn();
    let waiters: Vec<ConnId> = (0..5).map(|_| h.conn()).collect();
    for &w in &waiters {
        assert_eq!(h.send(w, "reserve\r\n"), Outcome::Blocked);
    }
    let mut served = Vec::new();
    for i in 0..5 {
        h.put(p, 0, 0, 10, &format!("{i}"));
        let who = waiters.iter().position(|&w| !h.cap.out.get(&w).is_none_or(Vec::is_empty)).unwrap();
        h.take(waiters[who]);
        served.push(who + 1);
    }
    // items [1,2,3,4,5], cursor 0 -> 1 ([5,2,3,4]); cursor 1 -> 2 ([5,4,3]);
    // cursor 2 -> 3 ([5,4]); cursor 3 % 2 = 1 -> 4 ([5]); then 5.
    assert_eq!(served, [1, 2, 3, 4, 5]);

    // With a waiter leaving in between, the swap shows.
    let mut h = Harness::new();
    let p = h.conn();
    let waiters: Vec<ConnId> = (0..4).map(|_| h.conn()).collect();
    for &w in &waiters {
        h.send(w, "reserve\r\n");
    }
    h.engine.disconnect(waiters[0], 0, &mut h.cap); // [4,2,3]
    h.check();
    let mut served = Vec::new();
    for i in 0..3 {
        h.put(p, 0, 0, 10, &format!("{i}"));
        let who = waiters.iter().position(|&w| !h.cap.out.get(&w).is_none_or(Vec::is_empty)).unwrap();
        h.take(waiters[who]);
        served.push(who + 1);
    }
    assert_eq!(served, [4, 2, 3]);
}

#[test]
fn closing_a_connection_releases_its_jobs_to_waiters() {
    let mut h = Harness::new();
    let a = h.conn();
    let b = h.conn();
    h.put(a, 0, 0, 10, "x");
    h.cmd(a, "reserve\r\n");
    assert_eq!(h.send(b, "reserve\r\n"), Outcome::Blocked);
    h.engine.disconnect(a, 0, &mut h.cap);
    h.check();
    assert_eq!(h.take(b), "RESERVED 1 1\r\nx\r\n");
}

#[test]
fn pause_holds_reserves_until_it_ends() {
    let mut h = Harness::new();
    let c = h.conn();
    let w = h.conn();
    h.put(c, 0, 0, 10, "x");
    assert_eq!(h.cmd(c, "pause-tube default 2\r\n"), "PAUSED\r\n");
    assert_eq!(h.send(w, "reserve\r\n"), Outcome::Blocked);
    h.at(1, 0);
    assert_eq!(h.take(w), "");
    assert!(h.cmd(c, "stats-tube default\r\n").contains("pause-time-left: 1\n"));
    h.at(2, 0);
    assert_eq!(h.take(w), "RESERVED 1 1\r\nx\r\n");
}

#[test]
fn tubes_live_while_referenced() {
    let mut h = Harness::new();
    let c = h.conn();
    h.cmd(c, "use a\r\n");
    h.cmd(c, "watch b\r\n");
    h.put(c, 0, 0, 10, "x");
    h.cmd(c, "use c\r\n");
    assert_eq!(h.cmd(c, "list-tubes\r\n"), "OK 26\r\n---\n- default\n- a\n- b\n- c\n\r\n");
    h.cmd(c, "ignore b\r\n");
    h.cmd(c, "delete 1\r\n");
    // `a` lost its last job: freed, and `c` swapped into its place.
    assert_eq!(h.cmd(c, "list-tubes\r\n"), "OK 18\r\n---\n- default\n- c\n\r\n");
    assert_eq!(h.cmd(c, "ignore default\r\n"), "NOT_IGNORED\r\n");
}

#[test]
fn kick_prefers_buried_then_delayed() {
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 10, "a");
    h.put(c, 0, 5, 10, "b");
    h.cmd(c, "reserve\r\n");
    assert_eq!(h.cmd(c, "bury 1 0\r\n"), "BURIED\r\n");
    assert_eq!(h.cmd(c, "kick 10\r\n"), "KICKED 1\r\n");
    assert_eq!(h.cmd(c, "kick 10\r\n"), "KICKED 1\r\n");
    assert_eq!(h.cmd(c, "kick 10\r\n"), "KICKED 0\r\n");
    assert!(h.cmd(c, "stats-job 2\r\n").contains("state: ready\n"));
}

#[test]
fn ttl_expires_a_ready_job_at_its_boundary() {
    let mut h = Harness::new();
    let c = h.conn();
    assert_eq!(h.cmd(c, "put 0 0 10 1 ttl=5\r\nx\r\n"), "INSERTED 1\r\n");
    h.at(4, 999_999_999);
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE ready\r\n");
    h.at(5, 0);
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE expired\r\n");
    assert_eq!(h.cmd(c, "peek 1\r\n"), "NOT_FOUND\r\n");
}

#[test]
fn ttl_counts_from_the_end_of_the_delay_and_stops_at_reserve() {
    let mut h = Harness::new();
    let c = h.conn();
    h.cmd(c, "put 0 3 10 1 ttl=2\r\nx\r\n");
    h.at(4, 999_999_999);
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE ready\r\n");
    h.cmd(c, "reserve\r\n");
    h.cmd(c, "release 1 0 0\r\n");
    h.at(100, 0);
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE ready\r\n");
}

#[test]
fn tube_ttl_default_applies_to_plain_puts() {
    let mut h = Harness::new();
    let c = h.conn();
    assert_eq!(h.cmd(c, "tube-ttl default 1\r\n"), "TTL_SET\r\n");
    h.put(c, 0, 0, 10, "x");
    h.at(1, 0);
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE expired\r\n");
    assert!(h.cmd(c, "polaris-stats\r\n").contains("jobs-expired: 1\n"));
}

#[test]
fn revoke_in_every_state() {
    let mut h = Harness::new();
    let c = h.conn();
    let other = h.conn();
    h.put(c, 0, 0, 10, "ready");
    h.put(c, 0, 9, 10, "delayed");
    h.put(c, 0, 0, 10, "to-bury");
    h.put(c, 0, 0, 10, "reserved");
    assert_eq!(h.cmd(c, "reserve-job 3\r\n"), "RESERVED 3 7\r\nto-bury\r\n");
    h.cmd(c, "bury 3 0\r\n");
    h.cmd(c, "reserve-job 4\r\n");
    for id in 1..=3 {
        assert_eq!(h.cmd(other, &format!("revoke {id}\r\n")), "REVOKED\r\n");
        assert_eq!(h.cmd(other, &format!("job-state {id}\r\n")), "STATE revoked\r\n");
    }
    assert_eq!(h.cmd(other, "revoke 4\r\n"), "NOT_REVOKED\r\n");
    assert_eq!(h.cmd(other, "revoke 99\r\n"), "NOT_FOUND\r\n");
    assert_eq!(h.cmd(c, "delete 4\r\n"), "DELETED\r\n");
    assert_eq!(h.cmd(c, "job-state 4\r\n"), "STATE success\r\n");
    assert!(h.cmd(c, "stats\r\n").contains("current-jobs-ready: 0\n"));
}

#[test]
fn final_states_of_delete() {
    let mut h = Harness::new();
    let c = h.conn();
    h.put(c, 0, 0, 10, "a");
    h.put(c, 0, 0, 10, "b");
    h.cmd(c, "reserve\r\n");
    h.cmd(c, "bury 1 0\r\n");
    h.cmd(c, "delete 1\r\n");
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "STATE failed\r\n");
    h.cmd(c, "delete 2\r\n");
    assert_eq!(h.cmd(c, "job-state 2\r\n"), "STATE revoked\r\n");
}

#[test]
fn tombstones_leave_after_retention() {
    let mut h = Harness::with(Config { retention: 10 * SECOND, max_tombstones: 2, ..Config::default() });
    let c = h.conn();
    for _ in 0..3 {
        h.put(c, 0, 0, 10, "x");
    }
    h.cmd(c, "delete 1\r\n");
    h.at(1, 0);
    h.cmd(c, "delete 2\r\n");
    h.cmd(c, "delete 3\r\n");
    assert_eq!(h.cmd(c, "job-state 1\r\n"), "NOT_FOUND\r\n", "count bound");
    assert_eq!(h.engine.next_deadline(), Some(11 * SECOND));
    h.at(11, 0);
    assert_eq!(h.cmd(c, "job-state 2\r\n"), "NOT_FOUND\r\n", "time bound");
    let changes = h.engine.take_changes();
    assert!(changes.forgotten.contains(&JobId(1)) && changes.forgotten.contains(&JobId(2)));
}

#[test]
fn drain_mode_refuses_puts() {
    let mut h = Harness::new();
    let c = h.conn();
    h.engine.set_draining();
    assert_eq!(h.put(c, 0, 0, 10, "x"), "DRAINING\r\n");
    assert!(h.cmd(c, "stats\r\n").contains("draining: true\n"));
}

#[test]
fn memory_limit_answers_out_of_memory() {
    let mut h = Harness::with(Config { max_job_bytes: 5, ..Config::default() });
    let c = h.conn();
    assert_eq!(h.put(c, 0, 0, 10, "abc"), "INSERTED 1\r\n");
    assert_eq!(h.put(c, 0, 0, 10, "abc"), "OUT_OF_MEMORY\r\n");
    h.cmd(c, "delete 1\r\n");
    // The refused put used up id 2, as every put whose header was read does.
    assert_eq!(h.put(c, 0, 0, 10, "abc"), "INSERTED 3\r\n");
}

/// A tiny reference model of one tube used by one connection.
#[derive(Debug, Clone)]
enum Op {
    Put(u32),
    Reserve,
    DeleteNth(usize),
    ReleaseNth(usize, u32),
    BuryNth(usize),
    Kick(u32),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..4).prop_map(Op::Put),
        Just(Op::Reserve),
        (0usize..8).prop_map(Op::DeleteNth),
        ((0usize..8), (0u32..4)).prop_map(|(n, p)| Op::ReleaseNth(n, p)),
        (0usize..8).prop_map(Op::BuryNth),
        (0u32..3).prop_map(Op::Kick),
    ]
}

proptest! {
    /// The engine agrees with a plain-vector model on what `reserve` hands out
    /// and on the final counts, for any sequence of operations.
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let mut h = Harness::new();
        let c = h.conn();
        let mut ready: Vec<(u32, u64)> = Vec::new();
        let mut reserved: Vec<(u32, u64)> = Vec::new();
        let mut buried: Vec<(u32, u64)> = Vec::new();
        let mut next = 1u64;
        for op in ops {
            match op {
                Op::Put(pri) => {
                    prop_assert_eq!(h.put(c, pri, 0, 100, "x"), format!("INSERTED {next}\r\n"));
                    ready.push((pri, next));
                    next += 1;
                }
                Op::Reserve => {
                    ready.sort();
                    if ready.is_empty() {
                        prop_assert_eq!(h.cmd(c, "reserve-with-timeout 0\r\n"), "");
                        h.at(h.now / SECOND, h.now % SECOND);
                        prop_assert_eq!(h.take(c), "TIMED_OUT\r\n");
                    } else {
                        let job = ready.remove(0);
                        prop_assert_eq!(h.cmd(c, "reserve\r\n"), format!("RESERVED {} 1\r\nx\r\n", job.1));
                        reserved.push(job);
                    }
                }
                Op::DeleteNth(n) if n < reserved.len() => {
                    let job = reserved.remove(n);
                    prop_assert_eq!(h.cmd(c, &format!("delete {}\r\n", job.1)), "DELETED\r\n");
                }
                Op::ReleaseNth(n, pri) if n < reserved.len() => {
                    let job = reserved.remove(n);
                    prop_assert_eq!(h.cmd(c, &format!("release {} {pri} 0\r\n", job.1)), "RELEASED\r\n");
                    ready.push((pri, job.1));
                }
                Op::BuryNth(n) if n < reserved.len() => {
                    let job = reserved.remove(n);
                    prop_assert_eq!(h.cmd(c, &format!("bury {} 0\r\n", job.1)), "BURIED\r\n");
                    buried.push((0, job.1));
                }
                Op::Kick(k) => {
                    let n = (k as usize).min(buried.len());
                    prop_assert_eq!(h.cmd(c, &format!("kick {k}\r\n")), format!("KICKED {n}\r\n"));
                    ready.extend(buried.drain(..n));
                }
                _ => {
                    prop_assert_eq!(h.cmd(c, &format!("delete {}\r\n", next + 100)), "NOT_FOUND\r\n");
                }
            }
        }
        let stats = h.cmd(c, "stats\r\n");
        let ready_line = format!("current-jobs-ready: {}\n", ready.len());
        let reserved_line = format!("current-jobs-reserved: {}\n", reserved.len());
        let buried_line = format!("current-jobs-buried: {}\n", buried.len());
        prop_assert!(stats.contains(&ready_line));
        prop_assert!(stats.contains(&reserved_line));
        prop_assert!(stats.contains(&buried_line));
    }
}

#[test]
fn the_invariant_checker_catches_corruption() {
    // A small queue with a job in every state and a waiter.
    let setup = || {
        let mut h = Harness::new();
        let c = h.conn();
        let w = h.conn();
        h.cmd(c, "watch other\r\n");
        for (pri, delay) in [(1, 0), (2, 0), (3, 0), (4, 5)] {
            h.put(c, pri, delay, 10, "x");
        }
        h.cmd(c, "reserve-job 1\r\n");
        h.cmd(c, "reserve-job 2\r\n");
        h.cmd(c, "bury 2 0\r\n");
        h.cmd(w, "use other\r\n");
        h.cmd(w, "watch other\r\n");
        h.cmd(w, "ignore default\r\n");
        assert_eq!(h.send(w, "reserve\r\n"), Outcome::Blocked);
        h.check();
        h
    };
    let broken = |corrupt: &dyn Fn(&mut Engine), expect: &str| {
        let mut h = setup();
        corrupt(&mut h.engine);
        let err = h.engine.check_invariants().expect_err("corruption goes unnoticed");
        assert!(err.contains(expect), "{expect:?} not in {err:?}");
    };
    broken(&|e| e.counters.ready += 1, "ready counter");
    broken(&|e| e.counters.urgent -= 1, "urgent counter");
    broken(&|e| e.tubes[e.default_tube.idx()].counters.reserved += 1, "reserved counter");
    broken(&|e| e.tubes[e.default_tube.idx()].refs += 1, "refs");
    broken(&|e| e.counters.waiting = 0, "waiting counter");
    broken(
        &|e| {
            let k = e.tubes[e.default_tube.idx()].ready.peek().unwrap();
            e.jobs[k.idx()].heap_pos = 7;
        },
        "heap_pos",
    );
    broken(
        &|e| {
            let k = e.tubes[e.default_tube.idx()].ready.peek().unwrap();
            e.jobs[k.idx()].state = JobState::Buried;
        },
        "found in Ready",
    );
    broken(
        &|e| {
            let k = e.tubes[e.default_tube.idx()].ready.peek().unwrap();
            e.tubes[e.default_tube.idx()].ready.remove(&mut e.jobs, k);
        },
        "in no queue",
    );
    broken(&|e| e.delay_timers.clear(), "delay timers");
    broken(&|e| e.tubes_with_waiters.clear(), "tubes_with_waiters");
    broken(
        &|e| {
            let t = e.tubes.iter().find(|(_, t)| t.name.as_str() == "other").map(|(i, _)| i).unwrap();
            e.tubes[t].waiting = tube::Multiset::default();
        },
        "waiters",
    );
    broken(&|e| e.job_bytes += 1, "job_bytes");
}

#[test]
fn watching_is_bounded_per_connection_and_closing_frees_every_tube() {
    let mut h = Harness::with(Config { max_watched_tubes: 100, ..Config::default() });
    let c = h.conn();
    for i in 1..100 {
        assert_eq!(h.cmd(c, &format!("watch t{i}\r\n")), format!("WATCHING {}\r\n", i + 1));
    }
    // Watching a tube it already watches changes nothing and is always allowed.
    assert_eq!(h.cmd(c, "watch t5\r\n"), "WATCHING 100\r\n");
    assert_eq!(h.cmd(c, "watch one-too-many\r\n"), "OUT_OF_MEMORY\r\n");
    assert!(!h.cmd(c, "list-tubes\r\n").contains("one-too-many"), "a refused watch made no tube");
    assert_eq!(h.cmd(c, "ignore t1\r\n"), "WATCHING 99\r\n");
    assert_eq!(h.cmd(c, "watch one-more\r\n"), "WATCHING 100\r\n");
    let other = h.conn();
    h.engine.disconnect(c, h.now, &mut h.cap);
    assert_eq!(h.cmd(other, "list-tubes\r\n"), "OK 14\r\n---\n- default\n\r\n");
}

#[test]
fn tube_ttl_defaults_are_bounded_and_counted() {
    let mut h = Harness::with(Config { max_tube_ttls: 3, ..Config::default() });
    let c = h.conn();
    for name in ["a", "b", "c"] {
        assert_eq!(h.cmd(c, &format!("tube-ttl {name} 60\r\n")), "TTL_SET\r\n");
    }
    assert_eq!(h.cmd(c, "tube-ttl d 60\r\n"), "OUT_OF_MEMORY\r\n");
    // Changing or removing a known default is always allowed.
    assert_eq!(h.cmd(c, "tube-ttl a 30\r\n"), "TTL_SET\r\n");
    assert_eq!(h.cmd(c, "tube-ttl b 0\r\n"), "TTL_SET\r\n");
    assert!(h.cmd(c, "polaris-stats\r\n").contains("tube-ttls: 2\nmax-tube-ttls: 3\n"));
    assert_eq!(h.cmd(c, "tube-ttl d 60\r\n"), "TTL_SET\r\n");
}
