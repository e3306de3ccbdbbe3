//! The commit pipeline: the store's writer thread, so that the event loop goes on reading,
//! parsing and applying commands while earlier turns are committed (and, with `-f 0`,
//! fsynced).
//!
//! The loop ends each turn by handing the turn's changes, as an owned [`Batch`] numbered
//! in turn order, to [`CommitPipeline::submit`]. The writer takes every batch that is
//! waiting when it is free and commits them together in one transaction, in order (group
//! commit across turns: while one commit runs, the next one gathers), then reports the
//! last batch that is durable through a channel and wakes the loop's poll with a
//! `mio::Waker`. The loop releases each turn's replies only when that turn's batch is
//! durable, so what a client reads is never ahead of the disk; how it does that is in
//! `server.rs`.
//!
//! A failure is not retried here: the writer reports it, then refuses every batch still
//! queued behind it (each is reported failed, none is written), because a later batch
//! may only be written after the earlier ones. The loop waits until every batch in flight
//! is accounted for and handles the failure synchronously, with [`CommitPipeline::retry`],
//! as it handles a failed commit when no pipeline is in use (ARCHITECTURE.md).

use crate::store::{Batch, Store, StoreError};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// What the loop asks of the writer.
enum Request {
    /// Commit this batch after the ones before it; refused (reported failed) while an
    /// earlier failure has not been retried.
    Commit(u64, Batch),
    /// Commit this batch now, whatever failed before (the loop waits for the answer).
    Retry(u64, Batch),
}

/// What the writer reports: every batch numbered up to `through` (and after the previous
/// report) is durable, or none of them was written.
#[derive(Debug)]
pub struct Completion {
    /// The last batch this report covers.
    pub through: u64,
    /// Rows written, or why nothing was.
    pub result: Result<u64, StoreError>,
}

/// The writer thread and the loop's end of its two channels.
pub struct CommitPipeline {
    /// Shared with the writer, which holds it while it commits; the loop takes it (without
    /// waiting) only to commit a small batch itself when nothing is in flight.
    store: Arc<Mutex<Store>>,
    requests: Option<mpsc::Sender<Request>>,
    completions: mpsc::Receiver<Completion>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
    /// The number of the last batch submitted.
    submitted: u64,
}

/// The writer failed to report (it panicked): nothing more can be committed.
#[derive(Debug, thiserror::Error)]
#[error("the store's writer thread stopped unexpectedly")]
pub struct WriterGone;

impl CommitPipeline {
    /// Moves `store` into a new writer thread; `wake` is called after every report.
    pub fn start(store: Store, wake: Arc<mio::Waker>) -> std::io::Result<CommitPipeline> {
        let store = Arc::new(Mutex::new(store));
        let shared = Arc::clone(&store);
        let (requests, inbox) = mpsc::channel::<Request>();
        let (outbox, completions) = mpsc::channel();
        let thread = std::thread::Builder::new().name("polaris-writer".into()).spawn(move || {
            let mut failed = false;
            let mut next = None;
            loop {
                let request = match next.take() {
                    Some(r) => r,
                    None => match inbox.recv() {
                        Ok(r) => r,
                        // The loop is done: last fsync, stop the maintenance thread.
                        Err(_) => return lock(&shared).sync(),
                    },
                };
                let mut store = lock(&shared);
                let reports = match request {
                    Request::Retry(seq, batch) => {
                        let result = store.commit_all(&[&batch]);
                        failed = result.is_err();
                        vec![Completion { through: seq, result }]
                    }
                    Request::Commit(seq, batch) => {
                        // Everything queued behind it goes into the same transaction.
                        let mut batches = vec![(seq, batch)];
                        while let Ok(queued) = inbox.try_recv() {
                            match queued {
                                Request::Commit(seq, batch) => batches.push((seq, batch)),
                                retry @ Request::Retry(..) => {
                                    next = Some(retry);
                                    break;
                                }
                            }
                        }
                        let reports = if failed {
                            vec![Completion { through: last_seq(&batches), result: Err(StoreError::Refused) }]
                        } else {
                            commit_in_order(&mut store, &batches)
                        };
                        failed = reports.last().is_some_and(|r| r.result.is_err());
                        // Freed here, on the writer, not on the loop.
                        drop(batches);
                        reports
                    }
                };
                drop(store);
                for report in reports {
                    if outbox.send(report).is_err() {
                        return lock(&shared).sync();
                    }
                }
                if let Err(e) = wake.wake() {
                    log::error!("waking the event loop failed: {e}");
                }
                // After the reports, so replies do not wait for it.
                let mut store = lock(&shared);
                if store.wal_needs_checkpoint() {
                    store.finish_checkpoint();
                }
                drop(store);
            }
        })?;
        Ok(CommitPipeline { store, requests: Some(requests), completions, thread: Some(thread), submitted: 0 })
    }

    /// Commits `batch` on the caller's thread if the writer is idle (its lock is free),
    /// numbered like a submitted batch; `None` if the writer is busy. The caller makes sure
    /// nothing is in flight, so the order of commits is kept.
    pub fn commit_here(&mut self, batch: &Batch) -> Option<(u64, Result<u64, StoreError>)> {
        let mut store = match self.store.try_lock() {
            Ok(store) => store,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            Err(std::sync::TryLockError::Poisoned(_)) => return None,
        };
        if store.wal_needs_checkpoint() {
            // The writer commits it and then checkpoints, off the loop.
            return None;
        }
        let result = store.commit_all(&[batch]);
        drop(store);
        self.submitted += 1;
        Some((self.submitted, result))
    }

    /// Queues `batch` behind the ones before it and returns its number.
    pub fn submit(&mut self, batch: Batch) -> Result<u64, WriterGone> {
        self.submitted += 1;
        let requests = self.requests.as_ref().ok_or(WriterGone)?;
        requests.send(Request::Commit(self.submitted, batch)).map_err(|_| WriterGone)?;
        Ok(self.submitted)
    }

    /// Commits `batch` now, after every batch in flight was reported, and waits for it.
    pub fn retry(&mut self, batch: Batch) -> Result<Result<u64, StoreError>, WriterGone> {
        self.submitted += 1;
        let requests = self.requests.as_ref().ok_or(WriterGone)?;
        requests.send(Request::Retry(self.submitted, batch)).map_err(|_| WriterGone)?;
        let done = self.wait()?;
        debug_assert_eq!(done.through, self.submitted, "a retry is only sent with nothing in flight");
        Ok(done.result)
    }

    /// Numbers a turn that hands over no batch (it changed nothing), so that the turns
    /// after it are told apart from it; it is durable once the batches before it are.
    pub fn number_without_batch(&mut self) -> u64 {
        self.submitted += 1;
        self.submitted
    }

    /// The number of the last batch submitted (0 before the first).
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// A report, if one is waiting.
    pub fn try_completion(&self) -> Result<Option<Completion>, WriterGone> {
        match self.completions.try_recv() {
            Ok(c) => Ok(Some(c)),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(WriterGone),
        }
    }

    /// Waits for the next report.
    pub fn wait(&self) -> Result<Completion, WriterGone> {
        self.completions.recv().map_err(|_| WriterGone)
    }

    /// Ends the writer after what was submitted, with a last fsync (shutdown).
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.requests = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

/// The store, even if a thread panicked while holding it: a commit either finished or
/// rolled back, so the connection is consistent.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The number of the last of `batches`.
fn last_seq(batches: &[(u64, Batch)]) -> u64 {
    batches.last().map_or(0, |(seq, _)| *seq)
}

/// Commits `batches` in one transaction. If that fails and there were several, they are
/// committed one by one, in order, up to the one that fails: a full disk then refuses the
/// turns that do not fit, not every turn that happened to wait behind the same commit.
fn commit_in_order(store: &mut Store, batches: &[(u64, Batch)]) -> Vec<Completion> {
    let through = last_seq(batches);
    let all: Vec<&Batch> = batches.iter().map(|(_, b)| b).collect();
    let error = match store.commit_all(&all) {
        Ok(written) => return vec![Completion { through, result: Ok(written) }],
        Err(e) => e,
    };
    if batches.len() == 1 {
        return vec![Completion { through, result: Err(error) }];
    }
    let mut written = 0;
    for (i, (_, batch)) in batches.iter().enumerate() {
        match store.commit_all(&[batch]) {
            Ok(n) => written += n,
            Err(e) => {
                let mut reports = Vec::with_capacity(2);
                if i > 0 {
                    reports.push(Completion { through: batches[i - 1].0, result: Ok(written) });
                }
                reports.push(Completion { through, result: Err(e) });
                return reports;
            }
        }
    }
    // Each went through on its own (the failure was transient).
    vec![Completion { through, result: Ok(written) }]
}

impl Drop for CommitPipeline {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
