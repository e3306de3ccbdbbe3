//! The `engine` target: the input is a program of operations over a few
//! connections and tubes (commands, the clock, ticks, commits, restarts), run
//! against the engine as the server would run it, with the engine's invariants
//! checked after every step.

use crate::input::Input;
use polaris_engine::{Config, ConnId, Engine, JobId, JobRecord, Nanos, Outcome, ReplySink, SECOND};
use polaris_proto::{reply, Command, Counted, Decoded, PutOptions, TubeName};

const TUBES: [&str; 4] = ["default", "a", "b", "c"];
const MAX_CONNS: usize = 4;
/// Programs longer than this are cut: long ones find nothing short ones do not.
const MAX_STEPS: usize = 3000;
/// The clock stops here (146 years): the server's clock counts from its start.
const MAX_NOW: Nanos = 1 << 62;

/// Replies in the order the engine sent them.
#[derive(Default)]
struct Sink(Vec<(ConnId, Vec<u8>)>);

impl ReplySink for Sink {
    fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        match self.0.last_mut() {
            Some((last, out)) if *last == conn => out.extend_from_slice(bytes),
            _ => self.0.push((conn, bytes.to_vec())),
        }
    }
}

/// A client as the server sees it: blocked in `reserve` until the engine answers it.
struct Client {
    id: ConnId,
    blocked: bool,
}

struct Run {
    engine: Engine,
    clients: Vec<Client>,
    now: Nanos,
    sink: Sink,
}

/// Layout: one byte of configuration, then operations of a byte each followed by
/// their arguments. See the module documentation.
///
/// Checks after every step: [`Engine::check_invariants`]; replies go only to the
/// client that sent the command or to blocked clients, a blocked client gets
/// exactly one reply (`RESERVED`, `TIMED_OUT` or `DEADLINE_SOON`) and is then no
/// longer waiting; the engine's waiting connections are exactly the blocked
/// clients; every command is answered with whole lines; after a tick nothing is due.
pub fn engine(data: &[u8]) {
    let mut input = Input::new(data);
    let conf = input.byte();
    let cfg = Config {
        max_job_bytes: if conf & 1 == 1 { 16 } else { u64::MAX },
        retention: [3600 * SECOND, 5 * SECOND, 0][usize::from(conf >> 1 & 3) % 3],
        max_tombstones: [100_000, 3, 0][usize::from(conf >> 3 & 3) % 3],
        tube_ttls: if conf & 0x20 != 0 { vec![(tube(2), 2)] } else { Vec::new() },
        ..Config::default()
    };
    let mut run = Run { engine: Engine::new(cfg.clone(), 0, true), clients: Vec::new(), now: 0, sink: Sink::default() };
    run.check();
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        steps += 1;
        match input.byte() {
            0..=9 => run.connect(),
            10..=15 => {
                let i = input.byte();
                let hang_up = input.byte() & 1 == 1;
                run.disconnect(i, hang_up);
            }
            16..=27 => {
                let by = input.pick(&[1, SECOND - 1, SECOND, 2 * SECOND, 5 * SECOND, 61 * SECOND, 1 << 60]);
                run.advance(run.now.saturating_add(by));
            }
            28..=35 => {
                // To the next deadline, or just before it.
                let early = u64::from(input.byte() & 1);
                if let Some(at) = run.engine.next_deadline() {
                    run.advance(at.saturating_sub(early).max(run.now));
                }
            }
            36..=39 => {
                let _ = run.engine.take_changes();
            }
            40..=41 => {
                // A failed commit: the jobs created since the last one vanish.
                let changes = run.engine.take_changes();
                let inserted: Vec<JobId> = changes.inserted.iter().copied().collect();
                run.engine.discard_jobs(&inserted);
                run.settle(None);
                run.check();
            }
            42 => run.restart(&cfg),
            43 => run.engine.set_draining(),
            _ => {
                let i = input.byte();
                let event = command(&mut input, run.engine.last_id());
                run.feed(i, event);
            }
        }
    }
}

fn tube(i: usize) -> TubeName {
    TubeName::parse(TUBES[i % TUBES.len()].as_bytes()).expect("valid tube name")
}

/// What a client's decoder could hand the engine: one event, or a put (its header
/// and then its body, or a malformed body).
enum Event {
    One(Decoded),
    Put(Command),
    PutWithBadBody,
}

fn command(input: &mut Input, last_id: u64) -> Event {
    let mut id = || match input.byte() {
        255 => u64::MAX,
        254 => 0,
        b => last_id.saturating_sub(u64::from(b % 16)),
    };
    let id = id();
    let pri = input.pick(&[0, 1, 1023, 1024, 5, u32::MAX]);
    let delay = input.pick(&[0, 0, 0, 1, 2, 5, u32::MAX]);
    let t = tube(usize::from(input.byte()));
    use Command as C;
    let cmd = match input.byte() % 36 {
        0..=5 => {
            let ttr = input.pick(&[0, 1, 2, 3, 10, u32::MAX]);
            let ttl = input.pick(&[None, None, None, Some(0), Some(1), Some(3)]);
            let body = input.bytes(8).into();
            return Event::Put(C::Put { pri, delay, ttr, body, opts: PutOptions { ttl } });
        }
        6 => return Event::PutWithBadBody,
        7..=9 => C::Reserve,
        10..=11 => C::ReserveWithTimeout(input.pick(&[None, Some(0), Some(1), Some(2), Some(5)])),
        12 => C::ReserveJob(id),
        13..=14 => C::Delete(id),
        15..=16 => C::Release { id, pri, delay },
        17 => C::Bury { id, pri },
        18 => C::Touch(id),
        19 => C::Watch(t),
        20 => C::Ignore(t),
        21 => C::Use(t),
        22 => C::Kick(input.pick(&[0, 1, 2, u32::MAX])),
        23 => C::KickJob(id),
        24 => C::PauseTube { name: t, delay: input.pick(&[0, 1, 3, u32::MAX]) },
        25 => C::Revoke(id),
        26 => C::JobState(id),
        27 => C::StatsJob(id),
        28 => C::StatsTube(t),
        29 => input.pick(&[C::Stats, C::ListTubes, C::ListTubeUsed, C::ListTubesWatched, C::PolarisStats]),
        30 => C::Peek(id),
        31 => input.pick(&[C::PeekReady, C::PeekDelayed, C::PeekBuried]),
        32 => C::TubeTtl { name: t, ttl: input.pick(&[0, 1, 4]) },
        33 => C::Quit,
        34 => {
            return Event::One(Decoded::CountedError(
                input.pick(&[Counted::Put, Counted::PauseTube]),
                reply::BAD_FORMAT,
            ))
        }
        _ => return Event::One(Decoded::Error(reply::UNKNOWN_COMMAND)),
    };
    Event::One(Decoded::Command(cmd))
}

impl Run {
    fn check(&self) {
        if let Err(e) = self.engine.check_invariants() {
            panic!("engine invariant broken at {}ns: {e}", self.now);
        }
        for c in &self.clients {
            assert_eq!(self.engine.is_waiting(c.id), c.blocked, "conn {} blocked: {}", c.id.0, c.blocked);
        }
    }

    fn client(&mut self, i: u8) -> usize {
        if self.clients.is_empty() {
            self.connect();
        }
        usize::from(i) % self.clients.len()
    }

    fn connect(&mut self) {
        if self.clients.len() < MAX_CONNS {
            let id = self.engine.connect();
            self.clients.push(Client { id, blocked: false });
            self.check();
        }
    }

    fn disconnect(&mut self, i: u8, hang_up: bool) {
        if self.clients.is_empty() {
            return;
        }
        let client = self.clients.remove(usize::from(i) % self.clients.len());
        if hang_up {
            // The peer closed while waiting: the server ends the wait, then the connection.
            self.engine.abort_wait(client.id, &mut self.sink);
            let out = std::mem::take(&mut self.sink.0);
            let expected = if client.blocked { vec![(client.id, reply::TIMED_OUT.to_vec())] } else { Vec::new() };
            assert_eq!(out, expected, "abort_wait answers a waiting conn TIMED_OUT, others nothing");
        }
        self.engine.disconnect(client.id, self.now, &mut self.sink);
        self.settle(None);
        self.check();
    }

    fn advance(&mut self, to: Nanos) {
        self.now = to.min(MAX_NOW).max(self.now);
        self.engine.tick(self.now, &mut self.sink);
        self.settle(None);
        self.check();
        if let Some(at) = self.engine.next_deadline() {
            assert!(at > self.now, "a timer due at {at} is left after a tick at {}", self.now);
        }
    }

    /// The server restarts from its store: every connection is gone and the live
    /// jobs come back (reserved ones as ready).
    fn restart(&mut self, cfg: &Config) {
        let mut engine = Engine::new(cfg.clone(), self.now, true);
        for id in 1..=self.engine.last_id() {
            if let Some(rec) = self.engine.job_record(JobId(id), self.now) {
                let rec = JobRecord {
                    id: rec.id,
                    tube: rec.tube,
                    pri: rec.pri,
                    delay_secs: rec.delay_secs,
                    ttr_secs: rec.ttr_secs,
                    ttl: rec.ttl,
                    ttl_left: rec.ttl_left,
                    state: rec.state,
                    delay_left: rec.delay_left,
                    counters: rec.counters,
                    age: rec.age,
                    body: Box::from(rec.body),
                };
                engine.restore_job(rec, self.now);
            }
        }
        engine.reserve_ids_through(self.engine.last_id());
        self.engine = engine;
        self.clients.clear();
        self.check();
    }

    fn feed(&mut self, i: u8, event: Event) {
        let i = self.client(i);
        if self.clients[i].blocked {
            // The server reads no commands from a blocked connection.
            return;
        }
        match event {
            Event::One(decoded) => self.feed_one(i, decoded, true),
            Event::Put(cmd) => {
                self.feed_one(i, Decoded::PutHeader, false);
                self.feed_one(i, Decoded::Command(cmd), true);
            }
            Event::PutWithBadBody => {
                self.feed_one(i, Decoded::PutHeader, false);
                self.feed_one(i, Decoded::Error(reply::EXPECTED_CRLF), true);
            }
        }
    }

    fn feed_one(&mut self, i: usize, decoded: Decoded, answered: bool) {
        let conn = self.clients[i].id;
        let outcome = self.engine.feed(conn, decoded, self.now, &mut self.sink);
        let mine: Vec<u8> = self.settle(Some(conn));
        match outcome {
            Outcome::Done => {
                if answered {
                    assert!(!mine.is_empty() && mine.ends_with(b"\r\n"), "unterminated reply {mine:?}");
                } else {
                    assert!(mine.is_empty(), "a put header was answered: {mine:?}");
                }
            }
            Outcome::Blocked => {
                assert!(mine.is_empty(), "a blocked reserve was answered: {mine:?}");
                self.clients[i].blocked = true;
            }
            Outcome::Close => {
                assert!(mine.is_empty(), "quit was answered: {mine:?}");
                self.clients.remove(i);
                self.engine.disconnect(conn, self.now, &mut self.sink);
                self.settle(None);
            }
        }
        self.check();
    }

    /// Hands out the replies of the last step: returns what `caller` got, checks
    /// that everyone else who got something was blocked, and unblocks them.
    fn settle(&mut self, caller: Option<ConnId>) -> Vec<u8> {
        let mut mine = Vec::new();
        for (conn, out) in std::mem::take(&mut self.sink.0) {
            if Some(conn) == caller {
                mine.extend_from_slice(&out);
                continue;
            }
            let client = self.clients.iter_mut().find(|c| c.id == conn);
            let Some(client) = client.filter(|c| c.blocked) else {
                panic!("conn {} got {out:?} without asking", conn.0);
            };
            assert!(is_wake_up(&out), "a blocked conn was woken with {:?}", String::from_utf8_lossy(&out));
            client.blocked = false;
        }
        mine
    }
}

/// One whole `RESERVED <id> <n>\r\n<body>\r\n`, `TIMED_OUT` or `DEADLINE_SOON`.
fn is_wake_up(out: &[u8]) -> bool {
    if out == reply::TIMED_OUT || out == reply::DEADLINE_SOON {
        return true;
    }
    let Some(rest) = out.strip_prefix(b"RESERVED ") else { return false };
    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return false };
    let header = String::from_utf8_lossy(&rest[..eol]);
    let mut words = header.split(' ');
    let (Some(id), Some(len), None) = (words.next(), words.next(), words.next()) else { return false };
    let (Ok(_), Ok(len)) = (id.parse::<u64>(), len.parse::<usize>()) else { return false };
    rest.len() == eol + 2 + len + 2 && rest.ends_with(b"\r\n")
}
