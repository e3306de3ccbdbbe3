//! What an operator scrapes: the queue's gauges and counters as plain data
//! ([`MetricsSnapshot`]), taken on request. The server renders them (polarisd's
//! `--metrics`); the engine only counts, as it does for `stats`.

use crate::state::Engine;
use crate::stats::Op;
use crate::tube::TubeKey;

/// The `cmd-*` names of `stats`, without the prefix, in [`Op`] order.
const COMMAND_NAMES: [&str; Op::Count as usize] = [
    "put",
    "peek",
    "peek-ready",
    "peek-delayed",
    "peek-buried",
    "reserve",
    "reserve-with-timeout",
    "delete",
    "release",
    "use",
    "watch",
    "ignore",
    "bury",
    "kick",
    "touch",
    "stats",
    "stats-job",
    "stats-tube",
    "list-tubes",
    "list-tube-used",
    "list-tubes-watched",
    "pause-tube",
];

/// Jobs by state in one tube, or in all the tubes folded together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TubeJobs {
    /// The tube's name (empty for the folded rest).
    pub name: String,
    /// Ready jobs (urgent ones included).
    pub ready: u64,
    /// Ready jobs with priority below 1024 (`current-jobs-urgent`).
    pub urgent: u64,
    /// Reserved jobs.
    pub reserved: u64,
    /// Delayed jobs.
    pub delayed: u64,
    /// Buried jobs.
    pub buried: u64,
}

impl TubeJobs {
    /// All its jobs, whatever their state.
    pub fn total(&self) -> u64 {
        self.ready + self.reserved + self.delayed + self.buried
    }

    fn add(&mut self, other: &TubeJobs) {
        self.ready += other.ready;
        self.urgent += other.urgent;
        self.reserved += other.reserved;
        self.delayed += other.delayed;
        self.buried += other.buried;
    }
}

/// The queue's state for a scrape.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// The tubes holding the most jobs, most first (ties by name), at most the number asked for.
    pub top_tubes: Vec<TubeJobs>,
    /// Every other tube's jobs, added up.
    pub other_tubes: TubeJobs,
    /// How many tubes were added up into `other_tubes`.
    pub other_tube_count: u64,
    /// Tubes that exist.
    pub tubes: u64,
    /// Each beanstalk command's count since start (`stats`' `cmd-*`), by name (`put`,
    /// `reserve-with-timeout`, …).
    pub commands: Vec<(&'static str, u64)>,
    /// Open connections.
    pub connections: u64,
    /// Connections that have put a job.
    pub producers: u64,
    /// Connections that have reserved a job.
    pub workers: u64,
    /// Connections waiting in a reserve.
    pub waiting: u64,
    /// Connections accepted since start.
    pub total_connections: u64,
    /// Jobs created since start.
    pub total_jobs: u64,
    /// Reservations that ran out of TTR.
    pub job_timeouts: u64,
    /// Jobs that ran out of TTL (extension).
    pub jobs_expired: u64,
    /// Jobs revoked (extension).
    pub jobs_revoked: u64,
    /// Bytes of job bodies held.
    pub job_bytes: u64,
    /// The `--max-job-bytes` bound.
    pub max_job_bytes: u64,
    /// Final job states kept.
    pub tombstones: u64,
    /// In drain mode.
    pub draining: bool,
}

impl Engine {
    /// The queue's gauges and counters, with jobs by tube for the `top` tubes holding the
    /// most jobs and the rest added up, so that a queue with a tube per host still gives a
    /// bounded number of series. Costs time linear in the tubes; meant for a scrape, not
    /// for every command.
    pub fn metrics_snapshot(&self, top: usize) -> MetricsSnapshot {
        // Runs on the event loop: rank by count first and copy names for the top only.
        let mut ranked: Vec<(u64, TubeKey)> = self.tube_order.iter().map(|t| (self.tube_total(t), t)).collect();
        let name = |t: TubeKey| self.tubes[t.idx()].name.as_str();
        let order = |a: &(u64, TubeKey), b: &(u64, TubeKey)| b.0.cmp(&a.0).then_with(|| name(a.1).cmp(name(b.1)));
        if ranked.len() > top && top > 0 {
            ranked.select_nth_unstable_by(top - 1, order);
        }
        let rest = if ranked.len() > top { ranked.split_off(top) } else { Vec::new() };
        ranked.sort_unstable_by(order);
        let top_tubes: Vec<TubeJobs> = ranked.iter().map(|(_, t)| self.tube_jobs(*t)).collect();
        let mut other_tubes = TubeJobs::default();
        for (_, t) in &rest {
            other_tubes.add(&self.tube_counts(*t));
        }
        let c = &self.counters;
        MetricsSnapshot {
            top_tubes,
            other_tubes,
            other_tube_count: rest.len() as u64,
            tubes: self.tube_order.len() as u64,
            commands: COMMAND_NAMES.iter().zip(c.ops.iter()).map(|(name, n)| (*name, *n)).collect(),
            connections: self.conns.len() as u64,
            producers: u64::from(c.producers),
            workers: u64::from(c.workers),
            waiting: u64::from(c.waiting),
            total_connections: c.total_connections,
            total_jobs: c.total_jobs,
            job_timeouts: c.job_timeouts,
            jobs_expired: c.expired,
            jobs_revoked: c.revoked,
            job_bytes: self.job_bytes,
            max_job_bytes: self.cfg.max_job_bytes,
            tombstones: self.tombstones.len() as u64,
            draining: self.draining,
        }
    }

    fn tube_total(&self, t: TubeKey) -> u64 {
        let tube = &self.tubes[t.idx()];
        (tube.ready.len() + tube.delayed.len() + tube.buried.len()) as u64 + u64::from(tube.counters.reserved)
    }

    fn tube_jobs(&self, t: TubeKey) -> TubeJobs {
        TubeJobs { name: self.tubes[t.idx()].name.as_str().to_string(), ..self.tube_counts(t) }
    }

    /// A tube's jobs by state, without its name.
    fn tube_counts(&self, t: TubeKey) -> TubeJobs {
        let tube = &self.tubes[t.idx()];
        TubeJobs {
            name: String::new(),
            ready: tube.ready.len() as u64,
            urgent: u64::from(tube.counters.urgent),
            reserved: u64::from(tube.counters.reserved),
            delayed: tube.delayed.len() as u64,
            buried: tube.buried.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConnId, Engine, ReplySink};
    use polaris_proto::{Decoder, Limits};

    struct Discard;
    impl ReplySink for Discard {
        fn send(&mut self, _conn: ConnId, _bytes: &[u8]) {}
    }

    fn run(engine: &mut Engine, conn: ConnId, input: &[u8]) {
        let mut decoder = Decoder::new(Limits::default());
        let mut buf = bytes::BytesMut::from(input);
        while let Some(decoded) = decoder.decode(&mut buf) {
            engine.feed(conn, decoded, 0, &mut Discard);
        }
    }

    #[test]
    fn tubes_past_the_top_are_folded_into_other() {
        let mut engine = Engine::new(Config::default(), 0, false);
        let conn = engine.connect();
        run(&mut engine, conn, b"use a\r\nput 0 0 60 1\r\nx\r\nput 0 0 60 1\r\nx\r\nput 0 0 60 1\r\nx\r\n");
        run(&mut engine, conn, b"use b\r\nput 2000 0 60 1\r\nx\r\nput 0 5 60 1\r\nx\r\n");
        run(&mut engine, conn, b"use c\r\nput 0 0 60 1\r\nx\r\n");
        let m = engine.metrics_snapshot(2);
        let names: Vec<&str> = m.top_tubes.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!((m.top_tubes[0].ready, m.top_tubes[0].urgent), (3, 3));
        assert_eq!((m.top_tubes[1].ready, m.top_tubes[1].delayed, m.top_tubes[1].urgent), (1, 1, 0));
        // `c` (one job) and `default` (none).
        assert_eq!((m.other_tube_count, m.other_tubes.total()), (2, 1));
        assert_eq!(m.tubes, 4);
        assert_eq!(m.commands.iter().find(|(n, _)| *n == "put"), Some(&("put", 6)));
        assert_eq!(m.commands.iter().find(|(n, _)| *n == "use"), Some(&("use", 3)));
        assert_eq!((m.connections, m.total_jobs, m.producers), (1, 6, 1));
        let none = engine.metrics_snapshot(0);
        assert!(none.top_tubes.is_empty());
        assert_eq!((none.other_tube_count, none.other_tubes.total()), (4, 6));
        let all = engine.metrics_snapshot(100);
        assert_eq!((all.top_tubes.len(), all.other_tube_count), (4, 0));
    }
}
