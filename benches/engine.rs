//! Micro-benchmarks of the queue engine (`polaris_engine::Engine`), without
//! sockets: commands go straight to `Engine::feed` (the server's entry point,
//! minus the decoder), replies into a sink that only counts bytes. Throughput
//! is in jobs (or commands) per second.
//!
//! `persist` variants build the engine with change tracking on, as `polarisd -b`
//! does, and take the changes every 64 commands (one simulated loop turn).
//! Run: `cargo bench --bench engine` (add `-- --quick` for a fast pass).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use polaris_engine::{Config, ConnId, Engine, Outcome, ReplySink};
use polaris_proto::{Command, Decoded, PutOptions, TubeName};
use std::time::Duration;

/// Counts reply bytes, like a socket that never blocks.
#[derive(Default)]
struct Sink {
    bytes: usize,
}

impl ReplySink for Sink {
    fn send(&mut self, _conn: ConnId, bytes: &[u8]) {
        self.bytes += bytes.len();
    }
}

const BODY: &[u8] = &[b'x'; 100];

fn put() -> Command {
    Command::Put { pri: 0, delay: 0, ttr: 60, body: BODY.into(), opts: PutOptions::default() }
}

/// An engine, a clock and a sink; `turn` simulates the server's per-turn commit.
struct Bench {
    engine: Engine,
    sink: Sink,
    now: u64,
    ops: u64,
    persist: bool,
}

impl Bench {
    fn new(persist: bool) -> Bench {
        Bench { engine: Engine::new(Config::default(), 0, persist), sink: Sink::default(), now: 0, ops: 0, persist }
    }

    fn apply(&mut self, conn: ConnId, cmd: Command) -> Outcome {
        self.now += 1_000;
        let o = self.engine.feed(conn, Decoded::Command(cmd), self.now, &mut self.sink);
        self.ops += 1;
        if self.persist && self.ops.is_multiple_of(64) {
            black_box(self.engine.take_changes());
        }
        o
    }
}

fn bench_engine(c: &mut Criterion) {
    for persist in [false, true] {
        let suffix = if persist { "persist" } else { "mem" };
        let mut g = c.benchmark_group(format!("engine_{suffix}"));

        // 1,000 puts into a fresh engine.
        g.throughput(Throughput::Elements(1000));
        g.bench_function("put_1000_fresh", |b| {
            b.iter_batched(
                || {
                    let mut s = Bench::new(persist);
                    let conn = s.engine.connect();
                    (s, conn)
                },
                |(mut s, conn)| {
                    for _ in 0..1000 {
                        s.apply(conn, put());
                    }
                    s
                },
                BatchSize::SmallInput,
            )
        });

        // One job through put, reserve, delete on one connection; queue empty.
        g.throughput(Throughput::Elements(1));
        g.bench_function("put_reserve_delete", |b| {
            let mut s = Bench::new(persist);
            let conn = s.engine.connect();
            let mut id = 0u64;
            b.iter(|| {
                id += 1;
                s.apply(conn, put());
                s.apply(conn, Command::Reserve);
                s.apply(conn, Command::Delete(id));
            })
        });

        // Same, with 100,000 ready jobs ahead: the heaps are deep.
        g.bench_function("put_reserve_delete_100k_backlog", |b| {
            let mut s = Bench::new(persist);
            let conn = s.engine.connect();
            for _ in 0..100_000 {
                s.apply(conn, put());
            }
            let mut oldest = 0u64;
            b.iter(|| {
                oldest += 1;
                s.apply(conn, put());
                s.apply(conn, Command::Reserve);
                s.apply(conn, Command::Delete(oldest));
            })
        });

        // A worker blocked in reserve is woken by a producer's put.
        g.bench_function("blocked_reserve_woken_by_put", |b| {
            let mut s = Bench::new(persist);
            let producer = s.engine.connect();
            let worker = s.engine.connect();
            let mut id = 0u64;
            b.iter(|| {
                id += 1;
                assert_eq!(s.apply(worker, Command::Reserve), Outcome::Blocked);
                s.apply(producer, put());
                s.apply(worker, Command::Delete(id));
            })
        });

        // 100 workers blocked on 10 tubes; puts round-robin over the tubes.
        g.bench_function("100_waiters_10_tubes", |b| {
            let mut s = Bench::new(persist);
            let tubes: Vec<TubeName> = (0..10).map(|i| TubeName::parse(format!("t{i}").as_bytes()).unwrap()).collect();
            let producers: Vec<ConnId> = tubes
                .iter()
                .map(|t| {
                    let p = s.engine.connect();
                    s.apply(p, Command::Use(t.clone()));
                    p
                })
                .collect();
            let workers: Vec<ConnId> = (0..100)
                .map(|i| {
                    let w = s.engine.connect();
                    s.apply(w, Command::Watch(tubes[i % 10].clone()));
                    s.apply(w, Command::Ignore(TubeName::parse(b"default").unwrap()));
                    assert_eq!(s.apply(w, Command::Reserve), Outcome::Blocked);
                    w
                })
                .collect();
            // Job n goes to tube n % 10 and wakes that tube's longest waiter.
            let mut queues: Vec<std::collections::VecDeque<ConnId>> =
                (0..10).map(|t| workers.iter().copied().skip(t).step_by(10).collect()).collect();
            let mut id = 0u64;
            b.iter(|| {
                let t = (id % 10) as usize;
                id += 1;
                s.apply(producers[t], put());
                let w = queues[t].pop_front().unwrap();
                s.apply(w, Command::Delete(id));
                assert_eq!(s.apply(w, Command::Reserve), Outcome::Blocked);
                queues[t].push_back(w);
            })
        });

        // stats, which monitoring tools poll.
        g.bench_function("stats", |b| {
            let mut s = Bench::new(persist);
            let conn = s.engine.connect();
            b.iter(|| s.apply(conn, Command::Stats))
        });
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = bench_engine }
criterion_main!(benches);
