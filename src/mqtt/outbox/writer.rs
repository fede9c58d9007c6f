//! Group commit: producers queue rows (and acknowledged ids, and dead letters) under a
//! lock; one writer thread commits whatever has queued up in one transaction, reads
//! spilled rows back when asked, and tells waiters what is on disk. Producers, which may
//! be async tasks on the runtime's thread, never touch the disk. Rows of acknowledged
//! messages are deleted lazily, with the next commit or within `DELETE_DELAY`: a crash in
//! between sends those few again (at-least-once allows it).

#[cfg(test)]
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
// std's clock, not tokio's: the writer's timers (batching, write-error retries, log rate
// limits) run on its own OS thread, where tokio's paused test clock does not apply.
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::super::dead_letters::{self, DeadRow};
use super::Outbox;
use super::checkpoint::CheckpointSchedule;
use super::index::{Entry, REFILL_BATCH};
use super::storage::{self, NewRow};

/// Deletes of acknowledged rows wait at most this long for a commit to ride along with.
const DELETE_DELAY: Duration = Duration::from_millis(200);
/// ...or until this many have gathered.
pub(super) const DELETE_BATCH: usize = 4096;
/// An open batch holds back at most this many rows; beyond that the writer takes them.
const BATCH_MAX: usize = 32;
/// How soon a commit the disk refused is tried again.
const RETRY_WRITE: Duration = Duration::from_millis(500);
/// While the disk refuses writes, it is logged again at most this often.
const TROUBLE_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the writer thread has to do, filled in by producers.
#[derive(Default)]
pub(super) struct PendingWrites {
    pub(super) inserts: Vec<NewRow>,
    pub(super) deletes: Vec<u64>,
    /// Messages moving to the dead-letter table (their ids are in `deletes` too).
    pub(super) dead: Vec<DeadRow>,
    pub(super) refill: bool,
    pub(super) closing: bool,
    /// The writer is waiting: only then is a wake-up (a syscall) worth its cost.
    pub(super) idle: bool,
    /// ...and without a deadline, so a first delete must wake it to start the clock.
    pub(super) untimed: bool,
    /// Open `CommitBatch`es: their rows are committed when the last one ends.
    pub(super) deferring: usize,
    /// A producer is about to wait: commit now, open batches or not.
    pub(super) forced: bool,
    /// When the oldest delete not yet committed was queued.
    pub(super) deletes_since: Option<Instant>,
    /// Rows were written, so acknowledgements (and their deletes) are due.
    pub(super) expect_deletes: bool,
}

/// The writer side of the store: one connection, used only by the writer thread (commits
/// and reads back; never a producer, which may be an async task on the runtime's thread),
/// and what is to be written.
pub(super) struct DiskWriter {
    /// The database file, for messages.
    path: std::path::PathBuf,
    conn: Mutex<rusqlite::Connection>,
    /// Threads that committed (tests check it is only ever the writer).
    #[cfg(test)]
    commit_threads: Mutex<HashSet<String>>,
    pending: Mutex<PendingWrites>,
    wake: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Becomes true when a thread of the writer ends: on close, or by a panic (which
    /// must stop the bridge, not leave it running with nothing committed).
    ended: tokio::sync::watch::Sender<bool>,
    /// Told of every commit; the checkpoint thread waits on it.
    checkpoints: Arc<CheckpointSchedule>,
}

/// The lock on [`PendingWrites`], and a wake-up of the writer sent after it is released
/// (fields drop in order: the lock first).
pub(super) struct PendingGuard<'a> {
    guard: std::sync::MutexGuard<'a, PendingWrites>,
    waker: Waker<'a>,
}

struct Waker<'a> {
    wake: &'a Condvar,
    wanted: bool,
}

impl Drop for Waker<'_> {
    fn drop(&mut self) {
        if self.wanted {
            self.wake.notify_one();
        }
    }
}

impl PendingGuard<'_> {
    /// Wake the writer once the lock is released, if it is waiting: only then is a
    /// wake-up (a syscall) worth its cost.
    pub(super) fn wake_if_idle(&mut self) {
        self.waker.wanted |= self.guard.idle;
    }
}

impl std::ops::Deref for PendingGuard<'_> {
    type Target = PendingWrites;
    fn deref(&self) -> &PendingWrites {
        &self.guard
    }
}

impl std::ops::DerefMut for PendingGuard<'_> {
    fn deref_mut(&mut self) -> &mut PendingWrites {
        &mut self.guard
    }
}

/// Reports its thread's end when dropped: on return and while unwinding from a panic.
struct EndGuard(tokio::sync::watch::Sender<bool>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl DiskWriter {
    /// What is to be written, for a producer: a wake-up asked for with
    /// [`PendingGuard::wake_if_idle`] is sent once the lock is released, so the writer
    /// never wakes only to block on it (three futex calls an event, measured).
    pub(super) fn pending(&self) -> PendingGuard<'_> {
        PendingGuard {
            guard: self.lock_pending(),
            waker: Waker {
                wake: &self.wake,
                wanted: false,
            },
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, PendingWrites> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn close(&self) {
        self.lock_pending().closing = true;
        self.wake.notify_one();
        // Told here too, not only by the writer on its way out: a writer that panicked
        // never gets there, and the stop would wait on the checkpoint thread for ever.
        // (The writer's own last step is a TRUNCATE checkpoint either way.)
        self.checkpoints.close();
    }

    /// A writer for `conn` (on the database at `path`), its threads not yet started.
    pub(super) fn new(path: std::path::PathBuf, conn: rusqlite::Connection) -> DiskWriter {
        DiskWriter {
            path,
            conn: Mutex::new(conn),
            #[cfg(test)]
            commit_threads: Mutex::default(),
            pending: Mutex::new(PendingWrites::default()),
            wake: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            ended: tokio::sync::watch::Sender::new(false),
            checkpoints: Arc::default(),
        }
    }

    /// Start the writer thread (for `outbox`) and the checkpoint thread (on
    /// `checkpointer`, a connection of its own).
    pub(super) fn start(
        self: &Arc<Self>,
        outbox: std::sync::Weak<Outbox>,
        checkpointer: rusqlite::Connection,
    ) -> std::io::Result<()> {
        let disk = self.clone();
        let ended = EndGuard(self.ended.clone());
        let writer = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || {
                let _ended = ended;
                run_writer(disk, outbox)
            })?;
        let schedule = self.checkpoints.clone();
        let ended = EndGuard(self.ended.clone());
        let checkpoint = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || {
                let _ended = ended;
                schedule.run(checkpointer)
            })?;
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = vec![writer, checkpoint];
        Ok(())
    }

    /// Messages below `below` were found on disk at start: committed, but perhaps not
    /// synced (after a crash, some only in the log). A first checkpoint syncs them, so
    /// that `synced` covers them without waiting for a new message.
    pub(super) fn left_by_last_run(&self, below: u64) {
        if below > 0 {
            self.checkpoints.committed(0, Some(below));
        }
    }

    /// Below which id messages are synced to the disk itself.
    pub(super) fn synced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.checkpoints.synced.subscribe()
    }

    /// Returns once a writer thread has ended (closed, or panicked).
    pub(super) async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Commit what is queued, stop the threads and wait for them.
    pub(super) fn stop(&self) {
        self.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in threads {
            let _ = handle.join();
        }
    }

    /// Threads that have committed so far.
    #[cfg(test)]
    pub(super) fn commit_threads(&self) -> HashSet<String> {
        self.commit_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the writer thread tells the outbox.
impl Outbox {
    /// Everything below `upto` is on disk: it may be sent, and its pushers go on.
    pub(super) fn mark_durable(&self, upto: u64) {
        {
            let mut g = self.lock();
            g.durable = g.durable.max(upto);
        }
        self.durable.send_if_modified(|d| {
            let new = (*d).max(upto);
            std::mem::replace(d, new) != new
        });
        self.sendable.notify_one();
    }

    /// Bring the next batch of disk-only messages back into memory (on the writer thread,
    /// whose connection has committed every row it reads).
    /// Returns false if the read failed (the writer asks again after a pause).
    pub(super) fn refill(&self, conn: &rusqlite::Connection) -> bool {
        let Some(from) = self.lock().spill_from else {
            self.lock().refill_asked = false;
            return true;
        };
        let rows = match storage::read_rows(conn, from, REFILL_BATCH) {
            // Their topics hashed before the lock is taken.
            Ok(rows) => rows
                .into_iter()
                .map(|(id, msg, queued_at)| (id, Entry::new(msg, queued_at)))
                .collect(),
            Err(e) => {
                error!("outbox: cannot read queued messages back from disk: {e}; retrying");
                return false;
            }
        };
        self.lock().refilled(from, rows);
        self.sendable.notify_one();
        true
    }

    /// The writer could not commit: events wait from now on (nothing is lost: what is
    /// queued stays queued, and nothing unwritten is sent).
    pub(super) fn write_failed(&self, e: &str) {
        {
            let mut g = self.lock();
            match &mut g.write_error {
                Some((_, why)) => {
                    if why != e {
                        *why = e.to_string();
                    }
                }
                None => g.write_error = Some((Instant::now(), e.to_string())),
            }
        }
        self.paused
            .send_if_modified(|p| !std::mem::replace(p, true));
    }

    /// Commits work again: waiting events go on. Returns how long writes were refused.
    pub(super) fn write_recovered(&self) -> Option<Duration> {
        let (since, still_full) = {
            let mut g = self.lock();
            let (since, _) = g.write_error.take()?;
            (since, g.full_since.is_some())
        };
        if !still_full {
            self.paused.send_replace(false);
        }
        self.drained.notify_waiters();
        Some(since.elapsed())
    }
}

/// Take every queued row and commit it, holding the connection (so rows are committed
/// in id order whoever commits); on failure they go back to the front of the queue.
fn commit_pending(
    disk: &DiskWriter,
    conn: &rusqlite::Connection,
    outbox: Option<&Outbox>,
) -> rusqlite::Result<()> {
    let (inserts, mut deletes, dead) = {
        let mut q = disk.pending();
        (
            std::mem::take(&mut q.inserts),
            std::mem::take(&mut q.deletes),
            std::mem::take(&mut q.dead),
        )
    };
    if inserts.is_empty() && deletes.is_empty() && dead.is_empty() {
        return Ok(());
    }
    #[cfg(test)]
    disk.commit_threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(std::thread::current().name().unwrap_or("?").to_string());
    let trimmed = match storage::write(conn, &inserts, &mut deletes, &dead) {
        Ok(trimmed) => trimmed,
        Err(e) => {
            let mut q = disk.pending();
            let newer = std::mem::replace(&mut q.inserts, inserts);
            q.inserts.extend(newer);
            q.deletes.extend(deletes);
            let newer = std::mem::replace(&mut q.dead, dead);
            q.dead.extend(newer);
            return Err(e);
        }
    };
    if !dead.is_empty()
        && let Some(outbox) = outbox
    {
        if trimmed > 0 {
            warn!(
                "outbox: {trimmed} old dead letters deleted to keep the table within {} rows / {} MiB",
                dead_letters::MAX_ROWS,
                dead_letters::MAX_BYTES >> 20
            );
        }
        if let Ok(n) = dead_letters::count(conn) {
            outbox
                .dead_kept
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let upto = inserts.last().map(|i| i.id + 1);
    if let Some(outbox) = outbox {
        // A superseded disk-only row whose delete is committed is never read back.
        let mut g = outbox.lock();
        if !g.spilled_gone.is_empty() {
            for id in &deletes {
                g.spilled_gone.remove(id);
            }
        }
    }
    {
        let mut q = disk.pending();
        q.deletes_since = None;
        q.expect_deletes |= upto.is_some();
        q.forced = false;
    }
    if let (Some(outbox), Some(upto)) = (outbox, upto) {
        outbox.mark_durable(upto);
    }
    disk.checkpoints.committed(
        inserts
            .iter()
            .map(|i| (i.topic.len() + i.payload.len()) as u64)
            .sum(),
        upto,
    );
    Ok(())
}

/// Commit what producers queued, in one transaction per round; read rows back when
/// asked; tell waiters what is on disk.
fn run_writer(disk: Arc<DiskWriter>, outbox: std::sync::Weak<Outbox>) {
    let mut trouble: Option<WriteTrouble> = None;
    loop {
        let (closing, refill) = {
            let mut q = disk.lock_pending();
            loop {
                if q.deletes_since.is_none() && !q.deletes.is_empty() {
                    q.deletes_since = Some(Instant::now());
                }
                let deletes_due = q.deletes_since.is_some_and(|t| {
                    t.elapsed() >= DELETE_DELAY || q.deletes.len() >= DELETE_BATCH
                });
                // Rows of an open batch wait for it, unless they pile up.
                let inserts_due = !q.inserts.is_empty()
                    && (q.deferring == 0 || q.inserts.len() > BATCH_MAX || q.forced);
                if inserts_due || q.refill || q.closing || deletes_due || !q.dead.is_empty() {
                    break;
                }
                // After writing rows, acknowledgements are due: wait with a deadline so
                // their deletes need no wake-up of their own.
                let deadline = match q.deletes_since {
                    Some(t) => Some(DELETE_DELAY.saturating_sub(t.elapsed())),
                    None => q.expect_deletes.then_some(DELETE_DELAY),
                };
                q.idle = true;
                q.untimed = deadline.is_none();
                q = match deadline {
                    Some(left) => {
                        let (mut q, timeout) = disk
                            .wake
                            .wait_timeout(q, left)
                            .unwrap_or_else(|p| p.into_inner());
                        if timeout.timed_out() && q.deletes_since.is_none() && q.deletes.is_empty()
                        {
                            q.expect_deletes = false;
                        }
                        q
                    }
                    None => disk.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
                };
                q.idle = false;
                q.untimed = false;
            }
            (q.closing, std::mem::take(&mut q.refill))
        };
        let outbox = outbox.upgrade();
        let conn = disk.conn();
        let done = match commit_pending(&disk, &conn, outbox.as_deref()) {
            Ok(()) => {
                if let Some(t) = trouble.take() {
                    let took = outbox.as_ref().and_then(|o| o.write_recovered());
                    info!(
                        "outbox: writes work again after {} s ({} failed attempts); reading upstream resumes",
                        took.unwrap_or_else(|| t.since.elapsed()).as_secs(),
                        t.attempts
                    );
                }
                // Reading back is pointless once stopping.
                closing || !refill || outbox.as_ref().is_none_or(|o| o.refill(&conn))
            }
            Err(e) if closing => {
                error!("outbox: cannot write the last changes to disk while stopping: {e}");
                true
            }
            Err(e) => {
                // The disk is full or failing: keep everything, say so (rate-limited),
                // pause the producers, try again. Nothing is published unwritten.
                let text = e.to_string();
                if let Some(o) = &outbox {
                    o.write_failed(&text);
                }
                let waiting = disk.pending().inserts.len();
                match &mut trouble {
                    None => {
                        error!(
                            "outbox: cannot write to {}: {text}; reading upstream is paused until writes work again (nothing read is lost; retrying)",
                            disk.path.display()
                        );
                        trouble = Some(WriteTrouble {
                            since: Instant::now(),
                            logged: Instant::now(),
                            attempts: 1,
                        });
                    }
                    Some(t) => {
                        t.attempts += 1;
                        if t.logged.elapsed() >= TROUBLE_LOG_EVERY {
                            t.logged = Instant::now();
                            warn!(
                                "outbox: still cannot write to disk after {} s: {text}; {waiting} messages wait in memory, reading upstream stays paused",
                                t.since.elapsed().as_secs()
                            );
                        }
                    }
                }
                false
            }
        };
        if !done {
            drop(conn);
            std::thread::sleep(RETRY_WRITE);
            if refill {
                disk.pending().refill = true;
            }
            continue;
        }
        if closing {
            disk.checkpoints.close();
            let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
            return;
        }
    }
}

/// A disk refusing writes, as the writer sees it (for rate-limited logging).
struct WriteTrouble {
    since: Instant,
    logged: Instant,
    attempts: u64,
}

#[cfg(test)]
mod end_tests {
    use super::EndGuard;

    #[test]
    fn a_thread_that_panics_still_reports_its_end() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            let _ended = EndGuard(tx);
            panic!("a bug in the writer");
        });
        assert!(thread.join().is_err());
        assert!(
            *rx.borrow(),
            "the supervisor is told, so the bridge stops (exit 70)"
        );
    }

    #[tokio::test]
    async fn an_open_outbox_reports_no_end_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = super::Outbox::open(dir.path(), 1 << 20).unwrap();
        let ended = outbox.writer_ended();
        tokio::pin!(ended);
        assert!(futures_util::poll!(&mut ended).is_pending());
        outbox.close();
        tokio::time::timeout(std::time::Duration::from_secs(10), ended)
            .await
            .expect("closing ends the threads");
    }
}
