//! Checkpoint scheduling: the WAL is copied into the database (and synced: the only
//! fsyncs the outbox makes, but for SQLite's own of a log's header when it starts over)
//! every `CHECKPOINT_EVERY` while there are writes, or sooner once it has grown by
//! `WAL_RESET_BYTES`, on a connection and a thread of their own, so a commit never waits
//! behind one for longer than its last frames take to copy.

use std::sync::{Condvar, Mutex};
// std's clock, not tokio's: this runs on its own OS thread, where tokio's paused test
// clock does not apply.
use std::time::Duration;

use tracing::warn;

/// The log is checkpointed and started over once it has grown by about this much.
const WAL_RESET_BYTES: u64 = 4 << 20;
/// A log at least this long after a checkpoint is started over.
const WAL_RESTART_BYTES: u64 = 1 << 20;
/// SQLite's page size (the default), the least a commit adds to the log.
const PAGE: u64 = 4096;
/// How often the WAL is checkpointed while writing.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How the log has grown since the last checkpoint, as the writer reports it.
#[derive(Default)]
struct WalGrowth {
    /// Roughly how many bytes the log has grown by since the last checkpoint (at least a
    /// page a commit, so nonzero means something was committed).
    log_bytes: u64,
    /// Messages below this id are committed (the writer's durable watermark).
    committed_below: u64,
    closing: bool,
}

/// What the checkpoint thread waits on: the writer's reports of commits. It tells, in
/// `synced`, below which id messages are synced to the disk itself (they survive a power
/// cut, not only a crash of the process).
pub(super) struct CheckpointSchedule {
    growth: Mutex<WalGrowth>,
    grown: Condvar,
    pub(super) synced: tokio::sync::watch::Sender<u64>,
}

impl Default for CheckpointSchedule {
    fn default() -> Self {
        CheckpointSchedule {
            growth: Mutex::default(),
            grown: Condvar::new(),
            synced: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl CheckpointSchedule {
    fn growth(&self) -> std::sync::MutexGuard<'_, WalGrowth> {
        self.growth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A commit added about `bytes` of topics and payloads to the log (and, if it wrote
    /// messages, made every one below `below` committed). Wakes the checkpoint thread
    /// only when that changes what it waits for.
    pub(super) fn committed(&self, bytes: u64, below: Option<u64>) {
        let grown = bytes.max(PAGE);
        let mut growth = self.growth();
        if let Some(below) = below {
            growth.committed_below = growth.committed_below.max(below);
        }
        let was_full = growth.log_bytes >= WAL_RESET_BYTES;
        let was_clean = growth.log_bytes == 0;
        growth.log_bytes += grown;
        if was_clean || was_full != (growth.log_bytes >= WAL_RESET_BYTES) {
            self.grown.notify_one();
        }
    }

    /// The writer is stopping (and truncates the log itself): the thread ends.
    pub(super) fn close(&self) {
        self.growth().closing = true;
        self.grown.notify_one();
    }

    /// The checkpoint thread, on a connection of its own, until [`close`](Self::close).
    pub(super) fn run(&self, conn: rusqlite::Connection) {
        // A failing checkpoint is logged once, not every second (the writer says more).
        let mut failing = false;
        let mut report = |r: rusqlite::Result<()>| match r {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                warn!("outbox: checkpoint failed: {e} (retrying; logged again once it has worked)");
            }
            Err(_) => {}
        };
        loop {
            let committed_below = {
                let mut growth = self.growth();
                while growth.log_bytes == 0 && !growth.closing {
                    growth = self.grown.wait(growth).unwrap_or_else(|p| p.into_inner());
                }
                // Let a second's writes gather (or the stop come) before checkpointing.
                let (mut growth, _) = self
                    .grown
                    .wait_timeout_while(growth, CHECKPOINT_EVERY, |g| {
                        !g.closing && g.log_bytes < WAL_RESET_BYTES
                    })
                    .unwrap_or_else(|p| p.into_inner());
                if growth.closing {
                    return;
                }
                growth.log_bytes = 0;
                growth.committed_below
            };
            // PASSIVE never blocks the writer, but with writes going on it rarely reaches
            // the end of the log, and only a checkpoint that does lets the log start over.
            // So once the log has grown, a RESTART checkpoint finishes the job: it holds
            // commits back for the moment it takes to copy the last few frames and sync,
            // and the next commit writes the log from its start again. Not TRUNCATE: its
            // ftruncate of a few MB held commits back for another 2 ms (strace), and
            // rewriting a log in place costs less than growing a new one.
            // `journal_size_limit` (`storage.rs`) trims a log a burst made large.
            // (busy, frames in the log, frames copied); busy = 1 (another checkpoint held
            // the lock: the writer's last one, at a stop) means nothing was done.
            let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)? == 0, r.get::<_, i64>(1)?));
            let done = match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], row) {
                Ok((true, frames)) if frames.max(0) as u64 * PAGE >= WAL_RESTART_BYTES => conn
                    .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    .map(|()| true),
                Ok((ran, _)) => Ok(ran),
                Err(e) => Err(e),
            };
            // A checkpoint with frames to copy syncs the log first (every frame written
            // before it began), and one with none had them synced by an earlier one: the
            // commits made before it began are on the disk itself now.
            if let Ok(true) = done {
                self.synced.send_if_modified(|s| {
                    let new = (*s).max(committed_below);
                    std::mem::replace(s, new) != new
                });
            }
            report(done.map(|_| ()));
        }
    }
}
