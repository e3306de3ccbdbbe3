//! Commands: [`Engine::feed`] takes what the decoder produced, [`Engine::apply`]
//! runs one command and writes its reply, with a handler per command that
//! needs more than a few lines.

use crate::conn::ConnId;
use crate::job::{Job, JobId, JobKey, JobState};
use crate::sink::{Outcome, ReplySink};
use crate::state::Engine;
use crate::stats::Op;
use crate::tombstone::FinalState;
use crate::{Nanos, SECOND};
use polaris_proto::{reply, Command, Counted, Decoded, PutOptions, ReplyLine};

impl Engine {
    /// Runs one event that [`polaris_proto::Decoder`] produced from `conn`'s input:
    /// a command, a `put` header (which counts the put and assigns its id), or a
    /// malformed line (answered with its error reply, and counted in `stats` when
    /// beanstalkd counts it). Replies go into `out`.
    ///
    /// This is the one place decoded input meets the engine; the server, the tests
    /// and the benchmarks all come through here. The caller keeps the decoder and
    /// the read loop, and decodes the next event only while the connection may go
    /// on: not after [`Outcome::Blocked`] (until the engine has sent it a reply) or
    /// [`Outcome::Close`].
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use polaris_engine::{Config, ConnId, Engine, Outcome, ReplySink};
    /// use polaris_proto::{Decoder, Limits};
    ///
    /// struct Replies(Vec<u8>);
    /// impl ReplySink for Replies {
    ///     fn send(&mut self, _conn: ConnId, bytes: &[u8]) {
    ///         self.0.extend_from_slice(bytes);
    ///     }
    /// }
    ///
    /// let mut engine = Engine::new(Config::default(), 0, false);
    /// let conn = engine.connect();
    /// let mut decoder = Decoder::new(Limits::default());
    /// let mut input = BytesMut::from(&b"put 0 0 60 2\r\nhi\r\nreserve\r\nbogus\r\n"[..]);
    /// let mut out = Replies(Vec::new());
    /// while let Some(decoded) = decoder.decode(&mut input) {
    ///     if engine.feed(conn, decoded, 0, &mut out) != Outcome::Done {
    ///         break;
    ///     }
    /// }
    /// assert_eq!(out.0, b"INSERTED 1\r\nRESERVED 1 2\r\nhi\r\nUNKNOWN_COMMAND\r\n");
    /// ```
    #[inline] // into the server's read loop, which then calls `apply` as directly as before
    pub fn feed(&mut self, conn: ConnId, decoded: Decoded, now: Nanos, out: &mut dyn ReplySink) -> Outcome {
        match decoded {
            Decoded::Command(cmd) => self.apply(conn, cmd, now, out),
            Decoded::PutHeader => {
                self.begin_put(conn);
                Outcome::Done
            }
            Decoded::CountedError(what, reply) => {
                self.count_refused(what);
                out.send(conn, reply);
                Outcome::Done
            }
            Decoded::Error(reply) => {
                out.send(conn, reply);
                Outcome::Done
            }
        }
    }

    /// A valid `put` header arrived: as beanstalkd does at this point, count
    /// the put, mark the connection a producer and assign the job's id (which
    /// is used up even if the body then turns out malformed).
    pub fn begin_put(&mut self, conn: ConnId) {
        self.count(Op::Put);
        self.set_producer(conn);
        self.conns[conn.0].pending_put = Some(self.allocate_id());
    }

    /// A refused command that beanstalkd counts all the same.
    pub fn count_refused(&mut self, what: Counted) {
        self.count(match what {
            Counted::Put => Op::Put,
            Counted::PauseTube => Op::PauseTube,
        });
    }

    fn allocate_id(&mut self) -> JobId {
        let id = JobId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Executes `cmd` for `conn` at time `now`, writing replies into `out`.
    pub fn apply(&mut self, conn: ConnId, cmd: Command, now: Nanos, out: &mut dyn ReplySink) -> Outcome {
        use Command as C;
        let line: ReplyLine;
        let msg: &[u8] = match cmd {
            C::Put { pri, delay, ttr, body, opts } => {
                self.put(conn, pri, delay, ttr, body, opts, now, out);
                return Outcome::Done;
            }
            C::Reserve => return self.reserve(conn, None, Op::Reserve, now, out),
            C::ReserveWithTimeout(secs) => {
                let deadline = secs.map(|s| now.saturating_add(u64::from(s) * SECOND));
                return self.reserve(conn, deadline, Op::ReserveWithTimeout, now, out);
            }
            C::ReserveJob(id) => {
                self.reserve_job_by_id(conn, JobId(id), now, out);
                return Outcome::Done;
            }
            C::Delete(id) => {
                self.count(Op::Delete);
                self.delete(conn, JobId(id), now)
            }
            C::Release { id, pri, delay } => {
                self.count(Op::Release);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.remove_reserved(conn, key);
                        let job = &mut self.jobs[key.idx()];
                        job.pri = pri;
                        job.delay_secs = delay;
                        job.counters.releases += 1;
                        let (delay, id) = (job.delay(), job.id);
                        self.mark_dirty(id);
                        self.enqueue(key, delay, now, out);
                        reply::RELEASED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Bury { id, pri } => {
                self.count(Op::Bury);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.remove_reserved(conn, key);
                        self.jobs[key.idx()].pri = pri;
                        self.bury(key);
                        reply::BURIED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Touch(id) => {
                self.count(Op::Touch);
                match self.reserved_by(conn, JobId(id)) {
                    Some(key) => {
                        self.ttr_heap.remove(&mut self.jobs, key);
                        let job = &mut self.jobs[key.idx()];
                        job.deadline = now + job.ttr();
                        self.ttr_heap.push(&mut self.jobs, key);
                        reply::TOUCHED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Use(name) => {
                self.count(Op::Use);
                // Make (or find) the new tube before freeing the old one, as
                // beanstalkd does: the order of `list-tubes` depends on it.
                let new = self.tube_ref(&name);
                let old = self.conns[conn.0].use_tube;
                self.tubes[old.idx()].using -= 1;
                self.conns[conn.0].use_tube = new;
                self.incref(new);
                self.decref(old);
                self.tubes[new.idx()].using += 1;
                self.decref(new);
                line = ReplyLine::text(reply::USING_PREFIX, name.as_str());
                line.as_bytes()
            }
            C::Watch(name) => {
                self.count(Op::Watch);
                let watching = &self.conns[conn.0].watch;
                let known = self.tube_index.get(&name).is_some_and(|&t| watching.contains(t));
                if !known && watching.len() >= self.cfg.max_watched_tubes {
                    // beanstalkd has no such bound; it fails here only when malloc does, with
                    // this same reply.
                    reply::OUT_OF_MEMORY
                } else {
                    let t = self.tube_ref(&name);
                    if !known {
                        self.conns[conn.0].watch.push(t);
                        self.tubes[t.idx()].watching += 1;
                        self.incref(t);
                    }
                    self.decref(t);
                    line = ReplyLine::number(reply::WATCHING_PREFIX, self.conns[conn.0].watch.len() as u64);
                    line.as_bytes()
                }
            }
            C::Ignore(name) => {
                self.count(Op::Ignore);
                let found = self.tube_index.get(&name).copied().filter(|&t| self.conns[conn.0].watch.contains(t));
                match found {
                    Some(_) if self.conns[conn.0].watch.len() < 2 => reply::NOT_IGNORED,
                    found => {
                        if let Some(t) = found {
                            self.conns[conn.0].watch.remove(t);
                            self.tubes[t.idx()].watching -= 1;
                            self.decref(t);
                        }
                        line = ReplyLine::number(reply::WATCHING_PREFIX, self.conns[conn.0].watch.len() as u64);
                        line.as_bytes()
                    }
                }
            }
            C::Peek(id) => {
                self.count(Op::Peek);
                let key = self.ids.get(JobId(id), &self.jobs);
                return self.reply_found(conn, key, out);
            }
            C::PeekReady => {
                self.count(Op::PeekReady);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].ready.peek();
                return self.reply_found(conn, key, out);
            }
            C::PeekDelayed => {
                self.count(Op::PeekDelayed);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].delayed.peek();
                return self.reply_found(conn, key, out);
            }
            C::PeekBuried => {
                self.count(Op::PeekBuried);
                let key = self.tubes[self.conns[conn.0].use_tube.idx()].buried.first();
                return self.reply_found(conn, key, out);
            }
            C::Kick(bound) => {
                self.count(Op::Kick);
                let tube = self.conns[conn.0].use_tube;
                let kicked = self.kick(tube, bound, now, out);
                line = ReplyLine::number(reply::KICKED_PREFIX, u64::from(kicked));
                line.as_bytes()
            }
            C::KickJob(id) => match self.ids.get(JobId(id), &self.jobs) {
                Some(key) if matches!(self.jobs[key.idx()].state, JobState::Buried | JobState::Delayed) => {
                    self.kick_one(key, now, out);
                    reply::KICKED
                }
                _ => reply::NOT_FOUND,
            },
            C::StatsJob(id) => {
                self.count(Op::StatsJob);
                match self.ids.get(JobId(id), &self.jobs) {
                    Some(key) => {
                        let yaml = self.stats_job_yaml(key, now);
                        return self.reply_yaml(conn, &yaml, out);
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::StatsTube(name) => {
                self.count(Op::StatsTube);
                match self.tube_index.get(&name).copied() {
                    Some(t) => {
                        let yaml = self.stats_tube_yaml(t, now);
                        return self.reply_yaml(conn, &yaml, out);
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Stats => {
                self.count(Op::Stats);
                let yaml = self.stats_yaml(now);
                return self.reply_yaml(conn, &yaml, out);
            }
            C::ListTubes => {
                self.count(Op::ListTubes);
                let yaml = self.tube_list_yaml(self.tube_order.iter());
                return self.reply_yaml(conn, &yaml, out);
            }
            C::ListTubeUsed => {
                self.count(Op::ListTubeUsed);
                line =
                    ReplyLine::text(reply::USING_PREFIX, self.tubes[self.conns[conn.0].use_tube.idx()].name.as_str());
                line.as_bytes()
            }
            C::ListTubesWatched => {
                self.count(Op::ListTubesWatched);
                let yaml = self.tube_list_yaml(self.conns[conn.0].watch.iter());
                return self.reply_yaml(conn, &yaml, out);
            }
            C::PauseTube { name, delay } => {
                self.count(Op::PauseTube);
                match self.tube_index.get(&name).copied() {
                    Some(t) => {
                        self.pause_tube(t, u64::from(delay) * SECOND, now, out);
                        reply::PAUSED
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::Quit => return Outcome::Close,
            C::PolarisStats => {
                let yaml = self.stats_ext_yaml();
                return self.reply_yaml(conn, &yaml, out);
            }
            C::Revoke(id) => match self.ids.get(JobId(id), &self.jobs) {
                Some(key) if self.jobs[key.idx()].state == JobState::Reserved => reply::NOT_REVOKED,
                Some(key) => {
                    self.unlink_unreserved(key);
                    let tube = self.jobs[key.idx()].tube;
                    self.tubes[tube.idx()].counters.revoked += 1;
                    self.counters.revoked += 1;
                    self.finish(key, FinalState::Revoked, now);
                    reply::REVOKED
                }
                None => reply::NOT_FOUND,
            },
            C::JobState(id) => {
                let name = match self.ids.get(JobId(id), &self.jobs) {
                    Some(key) => Some(self.jobs[key.idx()].state.name()),
                    None => self.tombstones.get(JobId(id)).map(|t| t.state.name()),
                };
                match name {
                    Some(name) => {
                        line = ReplyLine::text(reply::STATE_PREFIX, name);
                        line.as_bytes()
                    }
                    None => reply::NOT_FOUND,
                }
            }
            C::TubeTtl { name, ttl } => {
                if ttl > 0 && !self.tube_ttls.contains_key(&name) && self.tube_ttls.len() >= self.cfg.max_tube_ttls {
                    // Defaults outlive their tubes, so without a bound any client could grow
                    // memory and the database one name at a time.
                    reply::OUT_OF_MEMORY
                } else {
                    if ttl == 0 {
                        self.tube_ttls.remove(&name);
                    } else {
                        self.tube_ttls.insert(name.clone(), u64::from(ttl) * SECOND);
                    }
                    if let Some(changes) = self.recording() {
                        changes.tube_ttls.push((name, ttl));
                    }
                    reply::TTL_SET
                }
            }
        };
        out.send(conn, msg);
        Outcome::Done
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        conn: ConnId,
        pri: u32,
        delay: u32,
        ttr: u32,
        body: Box<[u8]>,
        opts: PutOptions,
        now: Nanos,
        out: &mut dyn ReplySink,
    ) {
        // Normally the header already assigned the id (see `begin_put`).
        if self.conns[conn.0].pending_put.is_none() {
            self.begin_put(conn);
        }
        let Some(id) = self.conns[conn.0].pending_put.take() else { return };
        if self.draining {
            return out.send(conn, reply::DRAINING);
        }
        if self.job_bytes.saturating_add(body.len() as u64) > self.cfg.max_job_bytes {
            log::warn!("job memory limit of {} bytes reached; refusing a put", self.cfg.max_job_bytes);
            return out.send(conn, reply::OUT_OF_MEMORY);
        }
        let tube = self.conns[conn.0].use_tube;
        let ttl = match opts.ttl {
            Some(0) => None,
            Some(secs) => Some(u64::from(secs) * SECOND),
            None => self.tube_ttls.get(&self.tubes[tube.idx()].name).copied(),
        };
        if let Some(ttl) = ttl {
            self.ttls.insert(id, ttl);
        }
        // beanstalkd raises a TTR below one second to one second.
        let key = self.insert_job(Job::new(id, tube, pri, delay, ttr.max(1), body, now));
        let delay = u64::from(delay) * SECOND;
        self.counters.total_jobs += 1;
        self.tubes[tube.idx()].counters.total_jobs += 1;
        self.enqueue(key, delay, now, out);
        out.send(conn, ReplyLine::number(reply::INSERTED_PREFIX, id.0).as_bytes());
    }

    fn reserve(
        &mut self,
        conn: ConnId,
        timeout_at: Option<Nanos>,
        op: Op,
        now: Nanos,
        out: &mut dyn ReplySink,
    ) -> Outcome {
        self.count(op);
        self.set_worker(conn);
        if self.deadline_soon(conn, now) && !self.conn_has_ready(conn) {
            out.send(conn, reply::DEADLINE_SOON);
            return Outcome::Done;
        }
        self.wait_for_job(conn, timeout_at);
        self.process_queue(now, out);
        if self.conns[conn.0].wait.is_some() {
            Outcome::Blocked
        } else {
            Outcome::Done
        }
    }

    /// `reserve-job`: takes a ready, delayed or buried job from any tube.
    fn reserve_job_by_id(&mut self, conn: ConnId, id: JobId, now: Nanos, out: &mut dyn ReplySink) {
        match self.ids.get(id, &self.jobs) {
            Some(key) if self.jobs[key.idx()].state != JobState::Reserved => {
                self.unlink_unreserved(key);
                self.set_worker(conn);
                self.reserve_to(conn, key, now, out);
            }
            _ => out.send(conn, reply::NOT_FOUND),
        }
    }

    fn delete(&mut self, conn: ConnId, id: JobId, now: Nanos) -> &'static [u8] {
        let Some(key) = self.ids.get(id, &self.jobs) else { return reply::NOT_FOUND };
        let final_state = match self.jobs[key.idx()].state {
            JobState::Reserved if self.jobs[key.idx()].reserver() == Some(conn) => {
                self.remove_reserved(conn, key);
                FinalState::Success
            }
            JobState::Reserved => return reply::NOT_FOUND,
            JobState::Buried => {
                self.unlink_unreserved(key);
                FinalState::Failed
            }
            JobState::Ready | JobState::Delayed => {
                self.unlink_unreserved(key);
                FinalState::Revoked
            }
        };
        let tube = self.jobs[key.idx()].tube;
        self.tubes[tube.idx()].counters.deletes += 1;
        self.finish(key, final_state, now);
        reply::DELETED
    }

    fn reply_found(&mut self, conn: ConnId, key: Option<JobKey>, out: &mut dyn ReplySink) -> Outcome {
        match key {
            Some(key) => self.send_job(conn, reply::FOUND_PREFIX, key, out),
            None => out.send(conn, reply::NOT_FOUND),
        }
        Outcome::Done
    }

    pub(crate) fn send_job(&self, conn: ConnId, prefix: &[u8], key: JobKey, out: &mut dyn ReplySink) {
        let job = &self.jobs[key.idx()];
        out.send_parts(
            conn,
            &[ReplyLine::job_header(prefix, job.id.0, job.body.len()).as_bytes(), &job.body, reply::CRLF],
        );
    }

    fn reply_yaml(&self, conn: ConnId, yaml: &[u8], out: &mut dyn ReplySink) -> Outcome {
        out.send_parts(conn, &[ReplyLine::number(reply::OK_PREFIX, yaml.len() as u64).as_bytes(), yaml, reply::CRLF]);
        Outcome::Done
    }
}
