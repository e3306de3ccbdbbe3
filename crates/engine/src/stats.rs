//! Statistics: the counters behind `stats` ([`Op`] for the `cmd-*` lines,
//! [`Counters`] for the rest) and the YAML bodies of `stats`, `stats-tube`,
//! `stats-job` and the tube lists, in beanstalkd 1.12's field order and shape.

use crate::job::{JobKey, JobState};
use crate::state::Engine;
use crate::tube::TubeKey;
use crate::{Nanos, SECOND};
use std::io::Write;

/// Commands counted in `stats` as `cmd-*`.
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub(crate) enum Op {
    Put,
    Peek,
    PeekReady,
    PeekDelayed,
    PeekBuried,
    Reserve,
    ReserveWithTimeout,
    Delete,
    Release,
    Use,
    Watch,
    Ignore,
    Bury,
    Kick,
    Touch,
    Stats,
    StatsJob,
    StatsTube,
    ListTubes,
    ListTubeUsed,
    ListTubesWatched,
    PauseTube,
    Count,
}

/// The server-wide counters `stats` and `polaris-stats` print.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) ops: [u64; Op::Count as usize],
    pub(crate) job_timeouts: u64,
    pub(crate) total_jobs: u64,
    pub(crate) total_connections: u64,
    pub(crate) producers: u32,
    pub(crate) workers: u32,
    pub(crate) waiting: u32,
    pub(crate) urgent: u32,
    pub(crate) ready: u32,
    pub(crate) reserved: u32,
    pub(crate) delayed: u32,
    pub(crate) buried: u32,
    pub(crate) expired: u64,
    pub(crate) revoked: u64,
}

impl Engine {
    /// Counts one `cmd-*`.
    pub(crate) fn count(&mut self, op: Op) {
        self.counters.ops[op as usize] += 1;
    }

    pub(crate) fn stats_yaml(&self, now: Nanos) -> Vec<u8> {
        let c = &self.counters;
        let op = |o: Op| c.ops[o as usize];
        let ((user_s, user_us), (sys_s, sys_us)) = (self.cfg.rusage)();
        let inst = &self.cfg.instance;
        let mut y = Vec::with_capacity(1024);
        // Writing into a Vec cannot fail.
        let _ = write!(
            y,
            "---\n\
             current-jobs-urgent: {}\n\
             current-jobs-ready: {}\n\
             current-jobs-reserved: {}\n\
             current-jobs-delayed: {}\n\
             current-jobs-buried: {}\n\
             cmd-put: {}\n\
             cmd-peek: {}\n\
             cmd-peek-ready: {}\n\
             cmd-peek-delayed: {}\n\
             cmd-peek-buried: {}\n\
             cmd-reserve: {}\n\
             cmd-reserve-with-timeout: {}\n\
             cmd-delete: {}\n\
             cmd-release: {}\n\
             cmd-use: {}\n\
             cmd-watch: {}\n\
             cmd-ignore: {}\n\
             cmd-bury: {}\n\
             cmd-kick: {}\n\
             cmd-touch: {}\n\
             cmd-stats: {}\n\
             cmd-stats-job: {}\n\
             cmd-stats-tube: {}\n\
             cmd-list-tubes: {}\n\
             cmd-list-tube-used: {}\n\
             cmd-list-tubes-watched: {}\n\
             cmd-pause-tube: {}\n\
             job-timeouts: {}\n\
             total-jobs: {}\n\
             max-job-size: {}\n\
             current-tubes: {}\n\
             current-connections: {}\n\
             current-producers: {}\n\
             current-workers: {}\n\
             current-waiting: {}\n\
             total-connections: {}\n\
             pid: {}\n\
             version: \"{}\"\n\
             rusage-utime: {}.{:06}\n\
             rusage-stime: {}.{:06}\n\
             uptime: {}\n\
             binlog-oldest-index: 0\n\
             binlog-current-index: 0\n\
             binlog-records-migrated: {}\n\
             binlog-records-written: {}\n\
             binlog-max-size: {}\n\
             draining: {}\n\
             id: {}\n\
             hostname: {}\n\
             os: {}\n\
             platform: {}\n",
            c.urgent,
            c.ready,
            c.reserved,
            c.delayed,
            c.buried,
            op(Op::Put),
            op(Op::Peek),
            op(Op::PeekReady),
            op(Op::PeekDelayed),
            op(Op::PeekBuried),
            op(Op::Reserve),
            op(Op::ReserveWithTimeout),
            op(Op::Delete),
            op(Op::Release),
            op(Op::Use),
            op(Op::Watch),
            op(Op::Ignore),
            op(Op::Bury),
            op(Op::Kick),
            op(Op::Touch),
            op(Op::Stats),
            op(Op::StatsJob),
            op(Op::StatsTube),
            op(Op::ListTubes),
            op(Op::ListTubeUsed),
            op(Op::ListTubesWatched),
            op(Op::PauseTube),
            c.job_timeouts,
            c.total_jobs,
            self.cfg.max_job_size,
            self.tube_order.len(),
            self.conns.len(),
            c.producers,
            c.workers,
            c.waiting,
            c.total_connections,
            inst.pid,
            inst.version,
            user_s,
            user_us,
            sys_s,
            sys_us,
            now.saturating_sub(self.started_at) / SECOND,
            self.binlog.records_migrated,
            self.binlog.records_written,
            self.cfg.binlog_max_size,
            self.draining,
            inst.id,
            inst.hostname,
            inst.os,
            inst.platform,
        );
        y
    }

    pub(crate) fn stats_tube_yaml(&self, t: TubeKey, now: Nanos) -> Vec<u8> {
        let tube = &self.tubes[t.idx()];
        let time_left = if tube.pause > 0 { tube.unpause_at.saturating_sub(now) / SECOND } else { 0 };
        let mut y = Vec::with_capacity(512);
        let _ = write!(
            y,
            "---\n\
             name: {}\n\
             current-jobs-urgent: {}\n\
             current-jobs-ready: {}\n\
             current-jobs-reserved: {}\n\
             current-jobs-delayed: {}\n\
             current-jobs-buried: {}\n\
             total-jobs: {}\n\
             current-using: {}\n\
             current-watching: {}\n\
             current-waiting: {}\n\
             cmd-delete: {}\n\
             cmd-pause-tube: {}\n\
             pause: {}\n\
             pause-time-left: {}\n",
            tube.name,
            tube.counters.urgent,
            tube.ready.len(),
            tube.counters.reserved,
            tube.delayed.len(),
            tube.buried.len(),
            tube.counters.total_jobs,
            tube.using,
            tube.watching,
            tube.waiting.len(),
            tube.counters.deletes,
            tube.counters.pauses,
            tube.pause / SECOND,
            time_left,
        );
        y
    }

    pub(crate) fn stats_job_yaml(&self, key: JobKey, now: Nanos) -> Vec<u8> {
        let job = &self.jobs[key.idx()];
        let time_left = match job.state {
            JobState::Reserved | JobState::Delayed => job.deadline.saturating_sub(now) / SECOND,
            _ => 0,
        };
        let mut y = Vec::with_capacity(256);
        let _ = write!(
            y,
            "---\n\
             id: {}\n\
             tube: {}\n\
             state: {}\n\
             pri: {}\n\
             age: {}\n\
             delay: {}\n\
             ttr: {}\n\
             time-left: {}\n\
             file: 0\n\
             reserves: {}\n\
             timeouts: {}\n\
             releases: {}\n\
             buries: {}\n\
             kicks: {}\n",
            job.id.0,
            self.tubes[job.tube.idx()].name,
            job.state.name(),
            job.pri,
            now.saturating_sub(job.created_at) / SECOND,
            job.delay_secs,
            job.ttr_secs,
            time_left,
            job.counters.reserves,
            job.counters.timeouts,
            job.counters.releases,
            job.counters.buries,
            job.counters.kicks,
        );
        y
    }

    /// The extension `stats-ext` body: counters beanstalkd does not have.
    pub(crate) fn stats_ext_yaml(&self) -> Vec<u8> {
        let mut y = Vec::with_capacity(256);
        let _ = write!(
            y,
            "---\n\
             polaris-version: {}\n\
             jobs-expired: {}\n\
             jobs-revoked: {}\n\
             tombstones: {}\n\
             job-bytes: {}\n\
             max-job-bytes: {}\n\
             tube-ttls: {}\n\
             max-tube-ttls: {}\n\
             longest-turn-us: {}\n\
             commits-in-flight: {}\n\
             uncommitted-bytes: {}\n\
             max-uncommitted-bytes: {}\n",
            self.cfg.instance.server_version,
            self.counters.expired,
            self.counters.revoked,
            self.tombstones.len(),
            self.job_bytes,
            self.cfg.max_job_bytes,
            self.tube_ttls.len(),
            self.cfg.max_tube_ttls,
            self.loop_stats.longest_turn_us,
            self.loop_stats.commits_in_flight,
            self.loop_stats.uncommitted_bytes,
            self.loop_stats.max_uncommitted_bytes,
        );
        for t in self.tube_order.iter() {
            let tube = &self.tubes[t.idx()];
            let ttl = self.tube_ttls.get(&tube.name).map_or(0, |n| n / SECOND);
            let _ = writeln!(
                y,
                "tube-{}: {{expired: {}, revoked: {}, default-ttl: {}}}",
                tube.name, tube.counters.expired, tube.counters.revoked, ttl
            );
        }
        y
    }

    /// `list-tubes` and `list-tubes-watched`.
    pub(crate) fn tube_list_yaml(&self, tubes: impl Iterator<Item = TubeKey>) -> Vec<u8> {
        let mut y = b"---\n".to_vec();
        for t in tubes {
            y.extend_from_slice(b"- ");
            y.extend_from_slice(self.tubes[t.idx()].name.as_str().as_bytes());
            y.push(b'\n');
        }
        y
    }
}
