//! Timers: when the engine next has work ([`Engine::next_deadline`]) and what
//! happens when it is due ([`Engine::tick`]).

use crate::conn::ConnId;
use crate::sink::ReplySink;
use crate::state::Engine;
use crate::tombstone::FinalState;
use crate::Nanos;
use polaris_proto::reply;

impl Engine {
    /// When [`Engine::tick`] next has work, if ever.
    pub fn next_deadline(&self) -> Option<Nanos> {
        [
            self.delay_timers.first().map(|t| t.0),
            self.ttl_timers.first().map(|t| t.0),
            self.pause_timers.first().map(|t| t.0),
            self.ttr_heap.peek().map(|k| self.jobs[k.idx()].deadline),
            self.wait_timers.first().map(|t| t.0),
            self.tombstones.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires every timer due at `now`: delayed jobs become ready, TTLs expire
    /// jobs, pauses end, TTRs return jobs, waits answer `DEADLINE_SOON` or
    /// `TIMED_OUT`, and old tombstones are dropped.
    pub fn tick(&mut self, now: Nanos, out: &mut dyn ReplySink) {
        while let Some(&(at, id)) = self.delay_timers.first() {
            if at > now {
                break;
            }
            let key = self.ids.get(id, &self.jobs).expect("timers name live jobs");
            self.remove_delayed(key);
            self.enqueue(key, 0, now, out);
        }
        while let Some(&(at, id)) = self.ttl_timers.first() {
            if at > now {
                break;
            }
            let key = self.ids.get(id, &self.jobs).expect("timers name live jobs");
            self.remove_ready(key);
            let tube = self.jobs[key.idx()].tube;
            self.tubes[tube.idx()].counters.expired += 1;
            self.counters.expired += 1;
            self.finish(key, FinalState::Expired, now);
        }
        while let Some(&(at, t)) = self.pause_timers.first() {
            if at > now {
                break;
            }
            self.pause_timers.remove(&(at, t));
            self.tubes[t.idx()].pause = 0;
            self.process_queue(now, out);
        }
        while let Some(key) = self.ttr_heap.peek() {
            if self.jobs[key.idx()].deadline > now {
                break;
            }
            let Some(conn) = self.jobs[key.idx()].reserver() else { break };
            self.remove_reserved(conn, key);
            self.jobs[key.idx()].counters.timeouts += 1;
            self.counters.job_timeouts += 1;
            self.enqueue(key, 0, now, out);
            self.schedule_wait(conn);
        }
        while let Some(&(at, conn)) = self.wait_timers.first() {
            if at > now {
                break;
            }
            self.wait_timers.remove(&(at, conn));
            if let Some(wait) = self.conns[conn.0].wait.as_mut() {
                wait.timer = None;
            }
            self.wait_timeout(conn, now, out);
        }
        let forgotten = self.tombstones.expire(now);
        if !forgotten.is_empty() {
            if let Some(changes) = self.recording() {
                changes.forgotten.extend(forgotten);
            }
        }
    }

    fn wait_timeout(&mut self, conn: ConnId, now: Nanos, out: &mut dyn ReplySink) {
        let Some(wait) = &self.conns[conn.0].wait else { return };
        let timed_out = wait.timeout_at.is_some_and(|at| at <= now);
        if self.deadline_soon(conn, now) {
            self.remove_waiting_conn(conn);
            out.send(conn, reply::DEADLINE_SOON);
        } else if timed_out {
            self.remove_waiting_conn(conn);
            out.send(conn, reply::TIMED_OUT);
        } else {
            self.schedule_wait(conn);
        }
    }
}
