//! Every message passes through the outbox: it is written to disk before it may be sent,
//! taken out for sending in order, and removed only when the broker has acknowledged
//! it. If the broker session is lost, what was sent but not acknowledged is sent again,
//! in the same order, with the same payload (and so the same `event_id`); after a crash
//! or `kill -9`, everything still on disk is sent again at the next start.
//!
//! State (retained) messages coalesce: a newer message for a topic replaces an older one
//! that has not been sent yet. Events never coalesce and are never dropped: when the
//! outbox holds `storage.max_bytes`, `push` waits, which stops reading upstream until
//! the broker drains it (and `full()` says so).
//!
//! The store is SQLite in WAL mode with `synchronous = NORMAL`: a committed write is in
//! the kernel's page cache before the message may be sent, so it survives a crash or
//! `kill -9` of the process. A power cut (or a kernel crash) can lose what was committed
//! since the last checkpoint, about a second's worth, and never corrupts the store.
//! Writes go through one writer thread that commits whatever has queued up in one
//! transaction (group commit), so many producers cost one commit. Checkpoints (the only
//! fsyncs) run on a thread of their own, so a commit never waits behind one. Rows of
//! acknowledged messages are deleted lazily, with the next commit or within
//! `DELETE_DELAY`: a crash in between sends those few again (at-least-once allows it).
//!
//! Memory is bounded however long the broker is away: at most `RESIDENT_MAX` messages
//! are held in memory; later ones live on disk only and are read back in order, in
//! batches, as the broker takes the earlier ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
// std's clock, not tokio's: the outbox's timers (batching, write-error retries, log rate
// limits) run on its own OS threads, where tokio's paused test clock does not apply.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Message;
use super::dead_letters::{self, DeadRow, LastDeadLetter};

/// Default bound on what the outbox holds, in bytes of topic and payload.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// How far writes may run ahead of the disk before producers wait.
const MAX_UNCOMMITTED: u64 = 4096;
/// Per-entry overhead counted against the bound (ids, indexes, bookkeeping).
const ENTRY_OVERHEAD: u64 = 64;
/// Messages held in memory at most (in flight and next to send); the rest wait on disk.
const RESIDENT_MAX: usize = 1024;
/// Rows read back from disk at a time; a read is asked for when this many fit.
const REFILL_BATCH: usize = 512;
/// Deletes of acknowledged rows wait at most this long for a commit to ride along with.
const DELETE_DELAY: Duration = Duration::from_millis(200);
/// ...or until this many have gathered.
const DELETE_BATCH: usize = 4096;
/// An open batch holds back at most this many rows; beyond that the writer takes them.
const BATCH_MAX: usize = 32;
/// The log is checkpointed and started over once it has grown by about this much.
const WAL_RESET_BYTES: u64 = 4 << 20;
/// A log at least this long after a checkpoint is truncated (started over).
const WAL_TRUNCATE_BYTES: u64 = 1 << 20;
/// SQLite's page size (the default), the least a commit adds to the log.
const PAGE: u64 = 4096;
/// How often the WAL is checkpointed (copied into the database and synced) while writing.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How soon a commit the disk refused is tried again.
const RETRY_WRITE: Duration = Duration::from_millis(500);
/// While the disk refuses writes, it is logged again at most this often.
const TROUBLE_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("storage.dir {dir}: {message}")]
    Open { dir: String, message: String },
}

#[derive(Debug)]
struct Entry {
    msg: Message,
    queued_at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// Unacknowledged messages by id (id order is arrival order).
    entries: BTreeMap<u64, Entry>,
    /// Ids below this have been handed to the publisher.
    cursor: u64,
    /// Ids below this are on disk (all of them, without a store).
    durable: u64,
    /// Bytes of every unacknowledged message, in memory or on disk only.
    bytes: u64,
    /// Messages from this id on live on disk only (`entries` holds those below it).
    spill_from: Option<u64>,
    /// How many messages live on disk only.
    spilled: usize,
    /// Disk-only messages superseded (coalesced) before they were read back.
    spilled_gone: HashSet<u64>,
    /// The writer has been asked to read the next batch back from disk.
    refill_asked: bool,
    /// Retained topic -> newest entry (id, cost) for it, for coalescing.
    newest_state: HashMap<String, (u64, u64)>,
    /// Retained topic -> number of unacknowledged entries.
    state_unacked: HashMap<String, usize>,
    /// Retained topic -> last payload the broker acknowledged, to restore a broker that
    /// lost its retained messages along with our session.
    retained_acked: HashMap<String, Bytes>,
    /// Topic and payload bytes held in `retained_acked`.
    retained_acked_bytes: usize,
    /// Retained topics not remembered because `retained_acked` was at its bound.
    retained_not_kept: u64,
    acked: u64,
    replayed: u64,
    replayed_at_start: u64,
    coalesced: u64,
    full_since: Option<Instant>,
    /// The disk refuses writes (full, a size limit, an I/O error) since then, and why.
    write_error: Option<(Instant, String)>,
    /// Messages moved to the dead-letter table since start, and the newest.
    dead_letters: u64,
    last_dead: Option<LastDeadLetter>,
    /// Dead letters are logged one by one at most once a minute; the rest are summed up.
    dead_logged_at: Option<Instant>,
    dead_unlogged: u64,
}

/// Counters for health reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub depth: usize,
    pub unsent: usize,
    pub bytes: u64,
    pub oldest_age_ms: u64,
    pub acked: u64,
    /// Messages sent again after a lost broker session.
    pub replayed: u64,
    /// Messages found on disk at start (from a previous run).
    pub replayed_at_start: u64,
    pub coalesced: u64,
    pub full: bool,
    /// Why the disk refuses writes, while it does (reading upstream is paused).
    pub write_error: Option<String>,
    pub write_error_for_s: u64,
    /// Events wait (the outbox is full, or the disk refuses writes): reading upstream is
    /// paused.
    pub paused: bool,
    /// Messages the broker cannot take, moved to the dead-letter table since start.
    pub dead_letters: u64,
    /// Rows in the dead-letter table (bounded, see `dead_letters::MAX_ROWS`).
    pub dead_letters_kept: u64,
    pub last_dead_letter: Option<LastDeadLetter>,
}

impl OutboxStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "depth": self.depth, "unsent": self.unsent, "bytes": self.bytes,
            "oldest_age_ms": self.oldest_age_ms, "acked": self.acked, "replayed": self.replayed,
            "replayed_at_start": self.replayed_at_start, "coalesced": self.coalesced, "full": self.full,
            "write_error": self.write_error, "write_error_for_s": self.write_error_for_s,
            "paused": self.paused, "dead_letters": self.dead_letters,
            "dead_letters_kept": self.dead_letters_kept,
            "last_dead_letter": self.last_dead_letter.as_ref().map(LastDeadLetter::to_json),
        })
    }
}

/// A row to write.
struct Insert {
    id: u64,
    topic: String,
    payload: Bytes,
    retain: bool,
    queued_at_ms: i64,
}

/// What the writer thread has to do, filled in by producers.
#[derive(Default)]
struct Queue {
    inserts: Vec<Insert>,
    deletes: Vec<u64>,
    /// Messages moving to the dead-letter table (their ids are in `deletes` too).
    dead: Vec<DeadRow>,
    refill: bool,
    closing: bool,
    /// The writer is waiting: only then is a wake-up (a syscall) worth its cost.
    idle: bool,
    /// ...and without a deadline, so a first delete must wake it to start the clock.
    untimed: bool,
    /// Open `CommitBatch`es: their rows are committed when the last one ends.
    deferring: usize,
    /// A producer is about to wait: commit now, open batches or not.
    forced: bool,
    /// When the oldest delete not yet committed was queued.
    deletes_since: Option<Instant>,
    /// Rows were written, so acknowledgements (and their deletes) are due.
    expect_deletes: bool,
}

/// What the checkpoint thread waits on.
#[derive(Default)]
struct Dirty {
    /// Roughly how many bytes the log has grown by since the last checkpoint (at least a
    /// page a commit, so nonzero means something was committed).
    log_bytes: u64,
    closing: bool,
}

/// The store: one connection, used only by the writer thread (commits and reads back;
/// never a producer, which may be an async task on the runtime's thread), and the queue
/// of what is to be written.
struct Store {
    /// The database file, for messages.
    path: std::path::PathBuf,
    conn: Mutex<rusqlite::Connection>,
    /// Threads that committed (tests check it is only ever the writer).
    #[cfg(test)]
    commit_threads: Mutex<HashSet<String>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set by the writer after a commit; the checkpointer waits for it.
    dirty: Mutex<Dirty>,
    dirty_wake: Condvar,
}

impl Store {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_if_idle(&self, q: &Queue) {
        if q.idle {
            self.wake.notify_one();
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        let mut q = self.queue();
        q.closing = true;
        self.wake.notify_one();
    }
}

pub struct Outbox {
    /// Time from queueing to the broker's acknowledgement.
    latency: Mutex<Option<prometheus_client::metrics::histogram::Histogram>>,
    inner: Mutex<Inner>,
    max_bytes: u64,
    store: Option<Arc<Store>>,
    /// Signalled when something becomes sendable.
    sendable: Notify,
    /// Signalled when entries leave (space, or empty for a flush).
    drained: Notify,
    durable: watch::Sender<u64>,
    full: watch::Sender<bool>,
    /// True while events wait, for space or for the disk.
    paused: watch::Sender<bool>,
    /// Where a corrupt outbox file found at start was moved.
    set_aside: Option<std::path::PathBuf>,
    /// Rows in the dead-letter table, as last counted by the writer.
    dead_kept: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("stats", &self.stats())
            .finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Outbox {
    /// An outbox in memory only: it survives broker outages, not a crash.
    pub fn memory(max_bytes: u64) -> Outbox {
        Outbox {
            latency: Mutex::new(None),
            inner: Mutex::new(Inner::default()),
            max_bytes: max_bytes.max(1),
            store: None,
            sendable: Notify::new(),
            drained: Notify::new(),
            durable: watch::channel(0).0,
            full: watch::channel(false).0,
            paused: watch::channel(false).0,
            set_aside: None,
            dead_kept: Default::default(),
        }
    }

    /// Where a corrupt outbox file found at start was kept, if there was one.
    pub fn set_aside(&self) -> Option<&Path> {
        self.set_aside.as_deref()
    }

    /// Open (or create) the outbox under `dir`, loading what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Outbox>, OutboxError> {
        let err = |message: String| OutboxError::Open {
            dir: dir.display().to_string(),
            message,
        };
        crate::storage::create_private_dir(dir)
            .map_err(|e| err(format!("cannot create it: {e}")))?;
        let path = dir.join("outbox.sqlite3");
        // Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        // database file's mode.
        crate::storage::ensure_private_file(&path)
            .map_err(|e| err(format!("cannot create {}: {e}", path.display())))?;
        let cannot_open = |e: rusqlite::Error| err(format!("cannot open {}: {e}", path.display()));
        let mut set_aside = None;
        let (conn, checkpointer, inner) = match open_store(&path) {
            Ok(opened) => opened,
            Err(e) if is_corrupt(&e) => {
                // Kept for a post-mortem (it may hold unsent messages), never deleted.
                let aside = crate::storage::set_aside(&path)
                    .map_err(|e| err(format!("cannot move {} aside: {e}", path.display())))?;
                error!(
                    "outbox {} is corrupt ({e}); kept as {} and starting a fresh outbox: what it held is not sent",
                    path.display(),
                    aside.display()
                );
                crate::storage::ensure_private_file(&path)
                    .map_err(|e| err(format!("cannot create {}: {e}", path.display())))?;
                set_aside = Some(aside);
                open_store(&path).map_err(cannot_open)?
            }
            Err(e) => return Err(cannot_open(e)),
        };
        let mut outbox = Outbox::memory(max_bytes);
        outbox.set_aside = set_aside;
        let kept = dead_letters::count(&conn).map_err(cannot_open)?;
        *outbox.dead_kept.get_mut() = kept;
        {
            let slot = outbox.inner.get_mut().unwrap_or_else(|p| p.into_inner());
            *slot = inner;
            let inner = slot;
            if inner.depth() > 0 {
                info!(
                    "outbox: {} unacknowledged messages from the last run ({} bytes); sending them first",
                    inner.depth(),
                    inner.bytes
                );
            }
        }
        outbox.durable.send_replace(outbox.lock().next_id);
        let store = Arc::new(Store {
            path: path.clone(),
            conn: Mutex::new(conn),
            #[cfg(test)]
            commit_threads: Mutex::default(),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            dirty: Mutex::new(Dirty::default()),
            dirty_wake: Condvar::new(),
        });
        outbox.store = Some(store.clone());
        let outbox = Arc::new(outbox);
        let weak = Arc::downgrade(&outbox);
        let writer_store = store.clone();
        let writer_thread = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(writer_store, weak))
            .map_err(|e| err(format!("cannot start the writer thread: {e}")))?;
        let checkpoint_store = store.clone();
        let checkpoint_thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || checkpoints(checkpointer, checkpoint_store))
            .map_err(|e| err(format!("cannot start the checkpoint thread: {e}")))?;
        *store.threads.lock().unwrap_or_else(|p| p.into_inner()) =
            vec![writer_thread, checkpoint_thread];
        Ok(outbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation completes before anything that could panic, so a poisoned
        // lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a message. Events wait while the outbox is full, and until they are on disk;
    /// state never waits for space.
    pub async fn push(&self, msg: Message) {
        self.push_until(msg, None).await
    }

    /// [`push`](Self::push), but when `stop` fires the message goes in at once, over the
    /// bound: a stop never loses what was already read upstream.
    pub async fn push_or_stop(&self, msg: Message, stop: &CancellationToken) {
        self.push_until(msg, Some(stop)).await
    }

    async fn push_until(&self, msg: Message, stop: Option<&CancellationToken>) {
        let stopped = || stop.is_some_and(CancellationToken::is_cancelled);
        if !msg.retain {
            loop {
                let drained = self.drained.notified();
                {
                    let mut g = self.lock();
                    let room = g.bytes < self.max_bytes;
                    if room && g.full_since.take().is_some() {
                        self.full.send_replace(false);
                    }
                    if room && g.write_error.is_none() {
                        self.paused
                            .send_if_modified(|p| std::mem::replace(p, false));
                        break;
                    }
                    // Rows an open batch holds back must not wait behind this push.
                    self.kick();
                    self.paused
                        .send_if_modified(|p| !std::mem::replace(p, true));
                    if !room && g.full_since.is_none() {
                        g.full_since = Some(Instant::now());
                        warn!(
                            "outbox full ({} bytes, storage.max_bytes {}): reading upstream paused until the broker takes more",
                            g.bytes, self.max_bytes
                        );
                        self.full.send_replace(true);
                    }
                }
                if stopped() {
                    break;
                }
                match stop {
                    Some(stop) => tokio::select! {
                        _ = drained => {}
                        _ = stop.cancelled() => break,
                    },
                    None => drained.await,
                }
            }
        }
        let id = self.push_now(msg);
        // Nothing is sent before it is on disk (take_next sees to that); here the disk
        // only pushes back when it falls behind, so one producer gets group commits too.
        if self.store.is_some() && id >= MAX_UNCOMMITTED {
            let mut durable = self.durable.subscribe();
            if *durable.borrow() <= id - MAX_UNCOMMITTED {
                self.kick();
            }
            let caught_up = durable.wait_for(|d| *d > id - MAX_UNCOMMITTED);
            match stop {
                Some(stop) => tokio::select! {
                    _ = caught_up => {}
                    _ = stop.cancelled() => {}
                },
                None => {
                    let _ = caught_up.await;
                }
            }
        }
    }

    /// Wait until everything queued so far is on disk.
    pub async fn committed(&self) {
        let upto = self.lock().next_id;
        self.kick();
        let mut durable = self.durable.subscribe();
        let _ = durable.wait_for(|d| *d >= upto).await;
    }

    /// Queue a message without waiting (state, and the bridge's own status messages).
    /// Returns its id.
    pub fn push_now(&self, msg: Message) -> u64 {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        let Some(store) = &self.store else {
            g.insert(id, msg, Instant::now(), false);
            g.durable = g.next_id;
            drop(g);
            // Concurrent pushers may get here out of order: the watermark only rises.
            self.durable.send_if_modified(|d| {
                let new = (*d).max(id + 1);
                std::mem::replace(d, new) != new
            });
            self.sendable.notify_one();
            return id;
        };
        let disk_only = g.spill_from.is_some() || g.entries.len() >= RESIDENT_MAX;
        let row = Insert {
            id,
            topic: msg.topic.clone(),
            payload: msg.payload.clone(),
            retain: msg.retain,
            queued_at_ms: now_ms(),
        };
        let removed = g.insert(id, msg, Instant::now(), disk_only);
        // Queued while the lock is held, so rows reach the writer in id order: the
        // writer's "everything below N is on disk" depends on it.
        let mut q = store.queue();
        if let Some(old) = removed {
            // Superseded before it was written (say, while the disk refuses writes): it
            // is never written at all, so the queue stays as small as the live state.
            match q.inserts.binary_search_by_key(&old, |i| i.id) {
                Ok(at) => {
                    q.inserts.remove(at);
                    g.spilled_gone.remove(&old);
                }
                Err(_) => q.deletes.push(old),
            }
        }
        q.inserts.push(row);
        if q.deferring == 0 {
            store.wake_if_idle(&q);
        }
        id
    }

    /// Hold back commits while a batch of messages is queued (say, every frame already
    /// read off a socket): when the last batch ends, the writer thread commits them in one
    /// transaction (and takes them earlier if more than `BATCH_MAX` pile up).
    pub fn batch(&self) -> CommitBatch<'_> {
        if let Some(store) = &self.store {
            store.queue().deferring += 1;
        }
        CommitBatch { outbox: self }
    }

    /// Have the writer commit what is queued now, whatever batches are open (a producer
    /// is about to wait, perhaps for those very rows to be sent).
    fn kick(&self) {
        if let Some(store) = &self.store {
            let mut q = store.queue();
            q.forced = true;
            store.wake_if_idle(&q);
        }
    }

    /// The next message to hand to the broker, in arrival order (only once it is on disk).
    pub fn take_next(&self) -> Option<(u64, Message)> {
        let mut g = self.lock();
        if g.spill_from.is_some()
            && !g.refill_asked
            && g.entries.len() + REFILL_BATCH <= RESIDENT_MAX
            && let Some(store) = &self.store
        {
            g.refill_asked = true;
            let mut q = store.queue();
            q.refill = true;
            store.wake_if_idle(&q);
        }
        let (id, entry) = g.entries.range(g.cursor..g.durable).next()?;
        let (id, msg) = (*id, entry.msg.clone());
        g.cursor = id + 1;
        Some((id, msg))
    }

    /// Give a taken message back (it could not be handed over); it is sent again first.
    /// No wake-up: the caller retries when the publisher makes progress.
    pub fn untake(&self, id: u64) {
        let mut g = self.lock();
        g.cursor = g.cursor.min(id);
    }

    /// The broker acknowledged message `id`.
    pub fn ack(&self, id: u64) {
        {
            let mut g = self.lock();
            let inner = &mut *g;
            if let Some(e) = inner.entries.remove(&id) {
                if let Some(h) = self
                    .latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    h.observe(e.queued_at.elapsed().as_secs_f64());
                }
                inner.acked += 1;
                inner.bytes -= cost(&e.msg);
                if e.msg.retain {
                    dec(&mut inner.state_unacked, &e.msg.topic);
                    if inner.newest_state.get(&e.msg.topic).map(|s| s.0) == Some(id) {
                        inner.newest_state.remove(&e.msg.topic);
                    }
                    inner.remember_retained(e.msg.topic, e.msg.payload);
                }
                if let Some(store) = &self.store {
                    let mut q = store.queue();
                    q.deletes.push(id);
                    // Deletes ride along with the next commit; only a writer asleep without
                    // a deadline needs waking to start DELETE_DELAY's clock.
                    if (q.deletes.len() == 1 && q.untimed) || q.deletes.len() >= DELETE_BATCH {
                        store.wake_if_idle(&q);
                    }
                }
            }
        }
        self.drained.notify_waiters();
    }

    /// The broker cannot take message `id` (why: `reason`): it leaves the outbox into the
    /// dead-letter table, in the transaction that deletes its row, and the messages behind
    /// it go on. Logged (one line a minute at most), counted in the stats.
    pub fn dead_letter(&self, id: u64, reason: &str) {
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let Some(e) = inner.entries.remove(&id) else {
                return;
            };
            inner.bytes -= cost(&e.msg);
            if e.msg.retain {
                dec(&mut inner.state_unacked, &e.msg.topic);
                if inner.newest_state.get(&e.msg.topic).map(|s| s.0) == Some(id) {
                    inner.newest_state.remove(&e.msg.topic);
                }
            }
            inner.dead_letters += 1;
            let at_ms = now_ms();
            let size = e.msg.topic.len() + e.msg.payload.len();
            inner.last_dead = Some(LastDeadLetter {
                topic: e.msg.topic.clone(),
                bytes: size,
                reason: reason.to_string(),
                at_ms,
            });
            let log_now = inner
                .dead_logged_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if log_now {
                let also = std::mem::take(&mut inner.dead_unlogged);
                let where_ = if self.store.is_some() {
                    "kept in the outbox database, table dead_letters"
                } else {
                    "dropped (no storage)"
                };
                error!(
                    "dead letter: a message for {} ({size} bytes) cannot be published: {reason}; {where_}{}",
                    e.msg.topic,
                    if also > 0 {
                        format!(" ({also} more since the last report)")
                    } else {
                        String::new()
                    }
                );
                inner.dead_logged_at = Some(Instant::now());
            } else {
                inner.dead_unlogged += 1;
            }
            if let Some(store) = &self.store {
                let mut q = store.queue();
                q.deletes.push(id);
                q.dead.push(DeadRow {
                    outbox_id: id,
                    topic: e.msg.topic,
                    payload: e.msg.payload,
                    retain: e.msg.retain,
                    failed_at_ms: at_ms,
                    reason: reason.to_string(),
                });
                store.wake_if_idle(&q);
            }
        }
        self.drained.notify_waiters();
        self.sendable.notify_one();
    }

    /// The broker session is gone: everything unacknowledged is sent again, in order, and
    /// retained state the broker may have lost with it is restored.
    pub fn rewind(&self) {
        let restore: Vec<(String, Bytes)> = {
            let mut g = self.lock();
            let inner = &mut *g;
            let resent = inner.entries.range(..inner.cursor).count() as u64;
            inner.replayed += resent;
            inner.cursor = 0;
            inner
                .retained_acked
                .iter()
                .filter(|(t, _)| !inner.state_unacked.contains_key(*t))
                .map(|(t, p)| (t.clone(), p.clone()))
                .collect()
        };
        for (topic, payload) in restore {
            self.push_now(Message {
                topic,
                payload,
                retain: true,
            });
        }
        self.sendable.notify_one();
    }

    /// Everything below `upto` is on disk: it may be sent, and its pushers go on.
    fn mark_durable(&self, upto: u64) {
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
    fn refill(&self, conn: &rusqlite::Connection) -> bool {
        let Some(from) = self.lock().spill_from else {
            self.lock().refill_asked = false;
            return true;
        };
        let rows = match read_rows(conn, from, REFILL_BATCH) {
            Ok(rows) => rows,
            Err(e) => {
                error!("outbox: cannot read queued messages back from disk: {e}; retrying");
                return false;
            }
        };
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let mut next = from;
            for (id, msg, queued_at) in rows {
                next = id + 1;
                if inner.spilled_gone.remove(&id) {
                    continue;
                }
                inner.spilled -= 1;
                inner.entries.insert(id, Entry { msg, queued_at });
            }
            inner.spill_from = (next < inner.next_id && inner.spilled > 0).then_some(next);
            if inner.spill_from.is_none() {
                inner.spilled_gone.clear();
            } else {
                // Rows below `next` are never read again.
                inner.spilled_gone.retain(|id| *id >= next);
            }
            inner.refill_asked = false;
        }
        self.sendable.notify_one();
        true
    }

    pub fn depth(&self) -> usize {
        self.lock().depth()
    }

    /// Resolves when there may be something to send.
    pub async fn sendable(&self) {
        self.sendable.notified().await;
    }

    /// Record the time to acknowledgement of every message in `h`.
    pub fn observe_latency(&self, h: prometheus_client::metrics::histogram::Histogram) {
        *self.latency.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Changes to `true` while events wait for space.
    pub fn full(&self) -> watch::Receiver<bool> {
        self.full.subscribe()
    }

    /// Changes to `true` while events wait, for space or because the disk refuses writes:
    /// reading upstream is paused.
    pub fn paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Why the disk refuses writes, while it does.
    pub fn write_error(&self) -> Option<String> {
        self.lock().write_error.as_ref().map(|(_, e)| e.clone())
    }

    /// The writer could not commit: events wait from now on (nothing is lost: what is
    /// queued stays queued, and nothing unwritten is sent).
    fn write_failed(&self, e: &str) {
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
    fn write_recovered(&self) -> Option<Duration> {
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

    /// Wait until nothing is left unacknowledged.
    pub async fn wait_empty(&self) {
        loop {
            let drained = self.drained.notified();
            if self.depth() == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Commit what is queued and stop the writer (a graceful stop).
    pub fn close(&self) {
        if let Some(store) = &self.store {
            store.close();
            let threads =
                std::mem::take(&mut *store.threads.lock().unwrap_or_else(|p| p.into_inner()));
            for handle in threads {
                let _ = handle.join();
            }
        }
    }

    pub fn stats(&self) -> OutboxStats {
        let g = self.lock();
        OutboxStats {
            depth: g.depth(),
            unsent: g.entries.range(g.cursor..).count() + g.spilled,
            bytes: g.bytes,
            oldest_age_ms: g
                .entries
                .values()
                .next()
                .map(|e| e.queued_at.elapsed().as_millis() as u64)
                .unwrap_or(0),
            acked: g.acked,
            replayed: g.replayed,
            replayed_at_start: g.replayed_at_start,
            coalesced: g.coalesced,
            full: g.full_since.is_some(),
            write_error: g.write_error.as_ref().map(|(_, e)| e.clone()),
            write_error_for_s: g
                .write_error
                .as_ref()
                .map(|(t, _)| t.elapsed().as_secs())
                .unwrap_or(0),
            paused: g.full_since.is_some() || g.write_error.is_some(),
            dead_letters: g.dead_letters,
            dead_letters_kept: self.dead_kept.load(std::sync::atomic::Ordering::Relaxed),
            last_dead_letter: g.last_dead.clone(),
        }
    }
}

/// See [`Outbox::batch`].
pub struct CommitBatch<'a> {
    outbox: &'a Outbox,
}

impl Drop for CommitBatch<'_> {
    fn drop(&mut self) {
        let Some(store) = &self.outbox.store else {
            return;
        };
        let mut q = store.queue();
        q.deferring -= 1;
        // The writer thread commits; the producer (an async task) never touches the disk.
        if q.deferring == 0 && !q.inserts.is_empty() {
            store.wake_if_idle(&q);
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The writer commits what is queued and ends.
        if let Some(store) = &self.store {
            store.close();
        }
    }
}

/// The most bytes of acknowledged retained state kept to restore a broker that lost it:
/// a server inventing device ids cannot grow it without bound. Topics past it are
/// published as always but not restored after a lost broker session (counted, logged).
const RETAINED_KEPT_MAX_BYTES: usize = 64 << 20;

impl Inner {
    fn remember_retained(&mut self, topic: String, payload: Bytes) {
        let size = topic.len() + payload.len();
        if let Some(old) = self.retained_acked.get_mut(&topic) {
            self.retained_acked_bytes = self.retained_acked_bytes - old.len() + payload.len();
            *old = payload;
            return;
        }
        if self.retained_acked_bytes + size > RETAINED_KEPT_MAX_BYTES {
            if self.retained_not_kept.is_multiple_of(10_000) {
                warn!(
                    "over {} MiB of retained state: topic {} is published but will not be \
                     restored if the broker loses it ({} such so far)",
                    RETAINED_KEPT_MAX_BYTES >> 20,
                    topic,
                    self.retained_not_kept + 1
                );
            }
            self.retained_not_kept += 1;
            return;
        }
        self.retained_acked_bytes += size;
        self.retained_acked.insert(topic, payload);
    }

    fn depth(&self) -> usize {
        self.entries.len() + self.spilled
    }

    /// Add an entry (in memory, or counted as disk-only); for state, drop an unsent older
    /// one for the same topic (returned, for its row to be deleted).
    fn insert(
        &mut self,
        id: u64,
        msg: Message,
        queued_at: Instant,
        disk_only: bool,
    ) -> Option<u64> {
        let mut removed = None;
        let cost = cost(&msg);
        if msg.retain {
            if let Some((old, old_cost)) = self.newest_state.get(&msg.topic).copied()
                && old >= self.cursor
            {
                let gone = if self.entries.remove(&old).is_some() {
                    true
                } else if self.spill_from.is_some_and(|from| old >= from)
                    && self.spilled_gone.insert(old)
                {
                    self.spilled -= 1;
                    true
                } else {
                    false
                };
                if gone {
                    self.coalesced += 1;
                    self.bytes -= old_cost;
                    dec(&mut self.state_unacked, &msg.topic);
                    removed = Some(old);
                }
            }
            self.newest_state.insert(msg.topic.clone(), (id, cost));
            *self.state_unacked.entry(msg.topic.clone()).or_default() += 1;
        }
        self.bytes += cost;
        if disk_only {
            self.spill_from.get_or_insert(id);
            self.spilled += 1;
        } else {
            self.entries.insert(id, Entry { msg, queued_at });
        }
        removed
    }
}

/// What a message counts against `storage.max_bytes`.
fn cost(msg: &Message) -> u64 {
    (msg.topic.len() + msg.payload.len()) as u64 + ENTRY_OVERHEAD
}

fn dec(map: &mut HashMap<String, usize>, topic: &str) {
    if let Some(n) = map.get_mut(topic) {
        *n -= 1;
        if *n == 0 {
            map.remove(topic);
        }
    }
}

fn open_db(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    // WAL + NORMAL: a commit is a write to the log, durable against a process crash
    // without an fsync per commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoints are the checkpoint thread's job, never a commit's.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The hot pages are the ends of one table: a small cache holds them.
    conn.pragma_update(None, "cache_size", -1024)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL,
            queued_at INTEGER NOT NULL
        )",
    )?;
    dead_letters::create_table(&conn)?;
    Ok(conn)
}

/// The writer's and the checkpointer's connections, and what a previous run left.
fn open_store(
    path: &Path,
) -> rusqlite::Result<(rusqlite::Connection, rusqlite::Connection, Inner)> {
    let conn = open_db(path)?;
    let checkpointer = open_db(path)?;
    let mut inner = Inner::default();
    load(&conn, &mut inner)?;
    Ok((conn, checkpointer, inner))
}

/// SQLite says the file is not (or no longer) a database.
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

type Row = (u64, Message, Instant);

/// Up to `limit` rows from id `from` on, in order, with their age carried over.
fn read_rows(conn: &rusqlite::Connection, from: u64, limit: usize) -> rusqlite::Result<Vec<Row>> {
    let now_wall = now_ms();
    let now = Instant::now();
    let mut stmt = conn.prepare_cached(
        "SELECT id, topic, payload, retain, queued_at FROM outbox WHERE id >= ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(rusqlite::params![from as i64, limit as i64], |r| {
        let queued_ms: i64 = r.get(4)?;
        let age = Duration::from_millis(now_wall.saturating_sub(queued_ms).max(0) as u64);
        Ok((
            r.get::<_, i64>(0)? as u64,
            Message {
                topic: r.get(1)?,
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                retain: r.get(3)?,
            },
            now.checked_sub(age).unwrap_or(now),
        ))
    })?;
    rows.collect()
}

/// What a previous run left: the first `RESIDENT_MAX` rows into memory, the rest counted.
fn load(conn: &rusqlite::Connection, inner: &mut Inner) -> rusqlite::Result<()> {
    let max_id: Option<i64> = conn.query_row("SELECT max(id) FROM outbox", [], |r| r.get(0))?;
    let Some(max_id) = max_id else {
        return Ok(());
    };
    let rows = read_rows(conn, 0, RESIDENT_MAX)?;
    let filled = rows.len() == RESIDENT_MAX;
    let mut last = 0;
    let mut superseded = Vec::new();
    for (id, msg, queued_at) in rows {
        last = id;
        superseded.extend(inner.insert(id, msg, queued_at, false));
    }
    for id in superseded {
        conn.execute("DELETE FROM outbox WHERE id = ?1", [id as i64])?;
    }
    inner.next_id = max_id as u64 + 1;
    inner.durable = inner.next_id;
    if filled {
        let from = last + 1;
        let (spilled, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload)), 0)
             FROM outbox WHERE id >= ?1",
            [from as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if spilled == 0 {
            inner.replayed_at_start = inner.depth() as u64;
            return Ok(());
        }
        inner.spill_from = Some(from);
        inner.spilled = spilled as usize;
        inner.bytes += bytes as u64 + spilled as u64 * ENTRY_OVERHEAD;
        // Retained state waiting on disk must hold back restoring older values.
        let mut stmt = conn.prepare(
            "SELECT topic, count(*) FROM outbox WHERE id >= ?1 AND retain = 1 GROUP BY topic",
        )?;
        let topics = stmt.query_map([from as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in topics {
            let (topic, n) = row?;
            *inner.state_unacked.entry(topic).or_default() += n as usize;
        }
    }
    inner.replayed_at_start = inner.depth() as u64;
    Ok(())
}

/// Take every queued row and commit it, holding the connection (so rows are committed
/// in id order whoever commits); on failure they go back to the front of the queue.
fn commit_queued(
    store: &Store,
    conn: &rusqlite::Connection,
    outbox: Option<&Outbox>,
) -> rusqlite::Result<()> {
    let (inserts, mut deletes, dead) = {
        let mut q = store.queue();
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
    store
        .commit_threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(std::thread::current().name().unwrap_or("?").to_string());
    let trimmed = match commit(conn, &inserts, &mut deletes, &dead) {
        Ok(trimmed) => trimmed,
        Err(e) => {
            let mut q = store.queue();
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
        let mut q = store.queue();
        q.deletes_since = None;
        q.expect_deletes |= upto.is_some();
        q.forced = false;
    }
    if let (Some(outbox), Some(upto)) = (outbox, upto) {
        outbox.mark_durable(upto);
    }
    let grown: u64 = inserts
        .iter()
        .map(|i| (i.topic.len() + i.payload.len()) as u64)
        .sum::<u64>()
        .max(PAGE);
    let mut dirty = store.dirty.lock().unwrap_or_else(|p| p.into_inner());
    let was_full = dirty.log_bytes >= WAL_RESET_BYTES;
    let was_clean = dirty.log_bytes == 0;
    dirty.log_bytes += grown;
    if was_clean || was_full != (dirty.log_bytes >= WAL_RESET_BYTES) {
        store.dirty_wake.notify_one();
    }
    Ok(())
}

/// Commit what producers queued, in one transaction per round; read rows back when
/// asked; tell waiters what is on disk.
fn writer(store: Arc<Store>, outbox: std::sync::Weak<Outbox>) {
    let mut trouble: Option<Trouble> = None;
    loop {
        let (closing, refill) = {
            let mut q = store.queue();
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
                        let (mut q, timeout) = store
                            .wake
                            .wait_timeout(q, left)
                            .unwrap_or_else(|p| p.into_inner());
                        if timeout.timed_out() && q.deletes_since.is_none() && q.deletes.is_empty()
                        {
                            q.expect_deletes = false;
                        }
                        q
                    }
                    None => store.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
                };
                q.idle = false;
                q.untimed = false;
            }
            (q.closing, std::mem::take(&mut q.refill))
        };
        let outbox = outbox.upgrade();
        let conn = store.conn();
        let done = match commit_queued(&store, &conn, outbox.as_deref()) {
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
                let waiting = store.queue().inserts.len();
                match &mut trouble {
                    None => {
                        error!(
                            "outbox: cannot write to {}: {text}; reading upstream is paused until writes work again (nothing read is lost; retrying)",
                            store.path.display()
                        );
                        trouble = Some(Trouble {
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
                store.queue().refill = true;
            }
            continue;
        }
        if closing {
            {
                let mut dirty = store.dirty.lock().unwrap_or_else(|p| p.into_inner());
                dirty.closing = true;
                store.dirty_wake.notify_one();
            }
            let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
            return;
        }
    }
}

/// A disk refusing writes, as the writer sees it (for rate-limited logging).
struct Trouble {
    since: Instant,
    logged: Instant,
    attempts: u64,
}

/// Checkpoint the WAL every `CHECKPOINT_EVERY` while there are writes, or sooner once it
/// has grown by `WAL_RESET_BYTES`, on a connection of its own: the fsyncs happen here,
/// not in a commit's path.
fn checkpoints(conn: rusqlite::Connection, store: Arc<Store>) {
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
        {
            let mut dirty = store.dirty.lock().unwrap_or_else(|p| p.into_inner());
            while dirty.log_bytes == 0 && !dirty.closing {
                dirty = store
                    .dirty_wake
                    .wait(dirty)
                    .unwrap_or_else(|p| p.into_inner());
            }
            // Let a second's writes gather (or the stop come) before checkpointing.
            let (mut d, _) = store
                .dirty_wake
                .wait_timeout_while(dirty, CHECKPOINT_EVERY, |d| {
                    !d.closing && d.log_bytes < WAL_RESET_BYTES
                })
                .unwrap_or_else(|p| p.into_inner());
            if d.closing {
                return;
            }
            d.log_bytes = 0;
        }
        // PASSIVE never blocks the writer, but with writes going on it rarely reaches the
        // end of the log, and only a checkpoint that does lets the log start over. So
        // once the log has grown, a TRUNCATE checkpoint finishes the job: it holds
        // commits back for the moment it takes to copy the last few frames.
        report(
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                Ok(frames) if frames as u64 * PAGE >= WAL_TRUNCATE_BYTES => {
                    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            },
        );
    }
}

/// One transaction: new rows, dead letters (their outbox rows are among `deletes`), then
/// deletes. Returns how many old dead letters were trimmed.
fn commit(
    conn: &rusqlite::Connection,
    inserts: &[Insert],
    deletes: &mut [u64],
    dead: &[DeadRow],
) -> rusqlite::Result<u64> {
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO outbox (id, topic, payload, retain, queued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for row in inserts {
            insert.execute(rusqlite::params![
                row.id as i64,
                row.topic,
                row.payload.as_ref(),
                row.retain,
                row.queued_at_ms
            ])?;
        }
        // Acknowledgements come mostly in order: delete runs of ids, not rows one by one.
        let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")?;
        deletes.sort_unstable();
        let mut i = 0;
        while i < deletes.len() {
            let mut j = i;
            while j + 1 < deletes.len() && deletes[j + 1] <= deletes[j] + 1 {
                j += 1;
            }
            delete.execute([deletes[i] as i64, deletes[j] as i64])?;
            i = j + 1;
        }
    }
    let trimmed = dead_letters::insert(&tx, dead)?;
    tx.commit()?;
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, p: &str) -> Message {
        Message {
            topic: t.into(),
            payload: Bytes::copy_from_slice(p.as_bytes()),
            retain: false,
        }
    }
    fn st(t: &str, p: &str) -> Message {
        Message {
            retain: true,
            ..ev(t, p)
        }
    }
    fn mem() -> Outbox {
        Outbox::memory(1 << 20)
    }

    #[test]
    fn remembered_retained_state_is_bounded_and_known_topics_still_update() {
        let mut inner = Inner::default();
        let mib = Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..80 {
            inner.remember_retained(format!("t/{i}"), mib.clone());
        }
        assert!(inner.retained_acked_bytes <= RETAINED_KEPT_MAX_BYTES);
        assert!(inner.retained_not_kept >= 16, "{}", inner.retained_not_kept);
        inner.remember_retained("t/0".into(), Bytes::from_static(b"small"));
        assert_eq!(inner.retained_acked["t/0"], Bytes::from_static(b"small"));
        inner.remember_retained("t/new".into(), Bytes::from_static(b"fits now"));
        assert!(inner.retained_acked.contains_key("t/new"));
    }

    #[test]
    fn order_ack_and_rewind() {
        let o = mem();
        o.push_now(ev("a", "1"));
        o.push_now(ev("a", "2"));
        o.push_now(ev("b", "3"));
        let (i1, m1) = o.take_next().unwrap();
        let (i2, _) = o.take_next().unwrap();
        assert_eq!(m1.payload, "1");
        o.ack(i1);
        o.rewind();
        // 2 was sent but not acknowledged: it comes again, before 3.
        let (j, m) = o.take_next().unwrap();
        assert_eq!((j, &m.payload[..]), (i2, &b"2"[..]));
        assert_eq!(o.take_next().unwrap().1.payload, "3");
        assert!(o.take_next().is_none());
        assert_eq!(o.stats().replayed, 1);
    }

    #[test]
    fn unsent_state_coalesces_but_events_do_not() {
        let o = mem();
        o.push_now(st("s", "old"));
        o.push_now(ev("e", "1"));
        o.push_now(st("s", "new"));
        o.push_now(ev("e", "2"));
        let got: Vec<_> = std::iter::from_fn(|| o.take_next())
            .map(|(_, m)| m.payload)
            .collect();
        assert_eq!(got, vec!["1", "new", "2"]);
        assert_eq!(o.stats().coalesced, 1);
    }

    #[test]
    fn sent_state_is_not_replaced_but_followed() {
        let o = mem();
        o.push_now(st("s", "v1"));
        let (id, _) = o.take_next().unwrap();
        o.push_now(st("s", "v2"));
        assert_eq!(o.take_next().unwrap().1.payload, "v2");
        o.ack(id);
        assert_eq!(o.depth(), 1);
    }

    #[test]
    fn rewind_restores_acknowledged_retained_state() {
        let o = mem();
        o.push_now(st("s", "v1"));
        o.push_now(st("t", "x"));
        let (a, _) = o.take_next().unwrap();
        let (b, _) = o.take_next().unwrap();
        o.ack(a);
        o.ack(b);
        o.push_now(st("t", "y"));
        o.rewind();
        let got: Vec<_> = std::iter::from_fn(|| o.take_next())
            .map(|(_, m)| (m.topic, m.payload))
            .collect();
        // t has a newer unacknowledged value, so only s is restored.
        assert_eq!(
            got,
            vec![
                ("t".into(), Bytes::from("y")),
                ("s".into(), Bytes::from("v1"))
            ]
        );
    }

    #[tokio::test]
    async fn full_outbox_makes_events_wait_not_state() {
        let per = ENTRY_OVERHEAD + 2;
        let o = Arc::new(Outbox::memory(2 * per));
        o.push(ev("e", "1")).await;
        o.push(ev("e", "2")).await;
        o.push(st("s", "x")).await; // state never waits
        let mut full = o.full();
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(ev("e", "3")).await });
        full.wait_for(|f| *f).await.unwrap();
        assert!(!waiter.is_finished());
        assert!(o.stats().full);
        let (id, _) = o.take_next().unwrap();
        o.ack(id);
        let (id, _) = o.take_next().unwrap();
        o.ack(id);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(!o.stats().full);
        assert_eq!(o.depth(), 2);
    }

    #[tokio::test]
    async fn survives_a_restart_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = Outbox::open(dir.path(), 1 << 20).unwrap();
            o.push(ev("a", "1")).await;
            o.push(ev("a", "2")).await;
            o.push(st("s", "old")).await;
            o.push(st("s", "new")).await;
            o.committed().await;
            let (id, _) = o.take_next().unwrap();
            o.ack(id); // "1" acknowledged
            let _ = o.take_next(); // "2" sent, not acknowledged
            o.close();
        }
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| o.take_next())
            .map(|(_, m)| m.payload)
            .collect();
        assert_eq!(got, vec!["2", "new"]);
        assert_eq!(o.stats().replayed_at_start, 2);
        // New ids continue after the old ones: order is kept across runs.
        o.push(ev("a", "3")).await;
        o.committed().await;
        assert_eq!(o.take_next().unwrap().1.payload, "3");
        o.close();
    }

    #[tokio::test]
    async fn nothing_is_handed_out_before_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.push(ev("a", "1")).await;
        o.committed().await;
        // Committed: a second connection sees the row.
        assert_eq!(rows_on_disk(dir.path()), 1);
        assert!(o.take_next().is_some());
        o.close();
    }

    #[tokio::test]
    async fn commits_run_on_the_writer_thread_never_on_the_producers() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        // Small batches, the case that used to be committed inline by the producer.
        for i in 0..50 {
            let batch = o.batch();
            o.push(ev("e", &i.to_string())).await;
            o.push(ev("f", &i.to_string())).await;
            drop(batch);
            o.committed().await;
        }
        assert_eq!(drain(&o).await.len(), 100);
        bvcsp2mqtt_testkit::eventually("deletes committed", Duration::from_secs(5), || {
            rows_on_disk(dir.path()) == 0
        })
        .await;
        let store = o.store.clone().unwrap();
        let threads = store.commit_threads.lock().unwrap().clone();
        assert_eq!(
            threads,
            HashSet::from(["outbox-writer".to_string()]),
            "only the writer thread commits"
        );
        o.close();
    }

    /// Let the database grow no further than it is (`full`), like a full disk, or freely
    /// again; set on the writer's connection, the one that must feel it.
    fn limit_growth(o: &Outbox, full: bool) {
        let store = o.store.clone().unwrap();
        let conn = store.conn();
        let limit: i64 = if full {
            conn.query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap()
        } else {
            1 << 30
        };
        conn.pragma_update(None, "max_page_count", limit).unwrap();
    }

    #[tokio::test]
    async fn a_disk_refusing_writes_pauses_events_and_they_resume_by_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        o.push(ev("e", "0")).await;
        o.committed().await;
        limit_growth(&o, true);
        let mut paused = o.paused();
        let big = "x".repeat(64 << 10);
        o.push(ev("e", &big)).await;
        tokio::time::timeout(Duration::from_secs(5), paused.wait_for(|p| *p))
            .await
            .expect("paused once a commit fails")
            .unwrap();
        let stats = o.stats();
        assert!(stats.paused && !stats.full, "{stats:?}");
        assert!(
            stats.write_error.as_deref().unwrap_or("").contains("full"),
            "{stats:?}"
        );
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.push(ev("e", "after")).await })
        };
        // The committed message may go; the unwritten one may not.
        assert_eq!(o.take_next().unwrap().1.payload, "0");
        assert!(o.take_next().is_none(), "nothing unwritten is handed out");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), paused.changed())
                .await
                .is_err()
                && !waiter.is_finished(),
            "events wait while the disk refuses writes"
        );
        o.untake(0);
        limit_growth(&o, false);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("resumes by itself")
            .unwrap();
        o.committed().await;
        assert!(!*o.paused().borrow());
        assert!(o.stats().write_error.is_none());
        let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
        assert_eq!(
            got,
            vec![Bytes::from("0"), Bytes::from(big), Bytes::from("after")]
        );
        o.close();
    }

    #[tokio::test]
    async fn a_dead_letter_leaves_the_outbox_only_into_the_table_and_stays_gone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = Outbox::open(dir.path(), 1 << 20).unwrap();
            o.push(ev("a", "1")).await;
            o.push(ev("a", "huge")).await;
            o.push(ev("a", "3")).await;
            o.committed().await;
            let (first, _) = o.take_next().unwrap();
            let (dead, m) = o.take_next().unwrap();
            assert_eq!(m.payload, "huge");
            o.dead_letter(dead, "too large");
            // The one behind it is not held up.
            assert_eq!(o.take_next().unwrap().1.payload, "3");
            o.ack(first);
            let stats = o.stats();
            assert_eq!((stats.dead_letters, stats.depth), (1, 1));
            assert_eq!(stats.last_dead_letter.unwrap().reason, "too large");
            bvcsp2mqtt_testkit::eventually(
                "the dead letter is committed",
                Duration::from_secs(5),
                || o.stats().dead_letters_kept == 1,
            )
            .await;
            o.close();
        }
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        let got: Vec<Bytes> = std::iter::from_fn(|| o.take_next())
            .map(|(_, m)| m.payload)
            .collect();
        assert_eq!(
            got,
            vec![Bytes::from("3")],
            "not sent again after a restart"
        );
        assert_eq!(o.stats().dead_letters_kept, 1);
        let conn = rusqlite::Connection::open(dir.path().join("outbox.sqlite3")).unwrap();
        let (topic, payload, reason): (String, Vec<u8>, String) = conn
            .query_row("SELECT topic, payload, reason FROM dead_letters", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(
            (topic.as_str(), &payload[..], reason.as_str()),
            ("a", &b"huge"[..], "too large")
        );
        o.close();
    }

    #[tokio::test]
    async fn a_corrupt_file_is_kept_aside_and_a_fresh_outbox_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite3");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        let aside = o.set_aside().expect("moved aside").to_path_buf();
        let name = aside.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("outbox.sqlite3.corrupt-"), "{name}");
        assert_eq!(std::fs::read(&aside).unwrap(), garbage, "kept as it was");
        o.push(ev("a", "1")).await;
        o.committed().await;
        assert_eq!(o.take_next().unwrap().1.payload, "1");
        o.close();
        assert_eq!(rows_on_disk(dir.path()), 1);
    }

    /// Rows in the store, as a second connection sees them.
    fn rows_on_disk(dir: &Path) -> i64 {
        rusqlite::Connection::open(dir.join("outbox.sqlite3"))
            .unwrap()
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .unwrap()
    }

    /// Take and acknowledge everything, waiting (with a deadline) for reads from disk.
    async fn drain(o: &Outbox) -> Vec<Message> {
        let mut got = Vec::new();
        loop {
            let wake = o.sendable();
            if let Some((id, m)) = o.take_next() {
                assert!(
                    o.lock().entries.len() <= RESIDENT_MAX,
                    "memory stays bounded"
                );
                o.ack(id);
                got.push(m);
                continue;
            }
            if o.depth() == 0 {
                return got;
            }
            tokio::time::timeout(Duration::from_secs(5), wake)
                .await
                .expect("the writer reads the next batch back");
        }
    }

    #[tokio::test]
    async fn a_long_queue_waits_on_disk_and_comes_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        let n = RESIDENT_MAX * 3 + 7;
        for i in 0..n {
            o.push(ev("e", &i.to_string())).await;
        }
        o.committed().await;
        assert_eq!(o.lock().entries.len(), RESIDENT_MAX);
        assert_eq!(o.depth(), n);
        assert_eq!(o.stats().unsent, n);
        let got: Vec<String> = drain(&o)
            .await
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect();
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
        assert_eq!(o.stats().bytes, 0);
        // Caught up: new messages are held in memory again.
        o.push(ev("e", "after")).await;
        assert_eq!(o.lock().entries.len(), 1);
        assert!(o.lock().spill_from.is_none());
        o.close();
    }

    #[tokio::test]
    async fn state_waiting_on_disk_still_coalesces() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        for i in 0..RESIDENT_MAX {
            o.push(ev("e", &i.to_string())).await;
        }
        o.push(st("s", "old")).await;
        o.push(ev("e", "last")).await;
        o.push(st("s", "new")).await;
        o.committed().await;
        assert_eq!(o.stats().coalesced, 1);
        let tail: Vec<Bytes> = drain(&o)
            .await
            .into_iter()
            .skip(RESIDENT_MAX)
            .map(|m| m.payload)
            .collect();
        assert_eq!(tail, vec![Bytes::from("last"), Bytes::from("new")]);
        o.close();
    }

    #[tokio::test]
    async fn a_long_queue_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let n = RESIDENT_MAX * 2 + 5;
        {
            let o = Outbox::open(dir.path(), 1 << 30).unwrap();
            for i in 0..n {
                o.push(ev("e", &i.to_string())).await;
            }
            o.push(st("s", "state")).await;
            o.committed().await;
            o.close();
        }
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(o.depth(), n + 1);
        assert_eq!(o.stats().replayed_at_start, (n + 1) as u64);
        assert!(o.lock().entries.len() <= RESIDENT_MAX);
        // Retained state still waiting on disk holds back restoring an older value.
        assert!(o.lock().state_unacked.contains_key("s"));
        let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
        assert_eq!(got.len(), n + 1);
        assert_eq!(got[0], "0");
        assert_eq!(got[n - 1], Bytes::from((n - 1).to_string()));
        assert_eq!(got[n], "state");
        o.close();
    }

    #[tokio::test]
    async fn acknowledged_rows_are_deleted_lazily_and_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10 {
            o.push(ev("e", &i.to_string())).await;
        }
        o.committed().await;
        drain(&o).await;
        // Within DELETE_DELAY the deletes are committed without any further write.
        bvcsp2mqtt_testkit::eventually(
            "acknowledged rows are deleted",
            Duration::from_secs(5),
            || rows_on_disk(dir.path()) == 0,
        )
        .await;
        o.close();
    }

    #[tokio::test]
    async fn a_producer_waiting_inside_a_batch_gets_its_rows_committed() {
        let dir = tempfile::tempdir().unwrap();
        let per = ENTRY_OVERHEAD + 2;
        let o = Outbox::open(dir.path(), 2 * per).unwrap();
        let consumer = {
            let o = o.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 3 {
                    let wake = o.sendable();
                    if let Some((id, m)) = o.take_next() {
                        o.ack(id);
                        got.push(m.payload);
                        continue;
                    }
                    tokio::time::timeout(Duration::from_secs(5), wake)
                        .await
                        .expect("rows committed and sendable");
                }
                got
            })
        };
        {
            let _batch = o.batch();
            o.push(ev("e", "1")).await;
            o.push(ev("e", "2")).await;
            // Full: this waits for space, which needs the first two sent, so committed
            // although the batch holding them back is still open.
            tokio::time::timeout(Duration::from_secs(5), o.push(ev("e", "3")))
                .await
                .expect("no deadlock behind an open batch");
        }
        let got = consumer.await.unwrap();
        assert_eq!(got, vec!["1", "2", "3"]);
        o.close();
    }

    #[tokio::test]
    async fn superseded_disk_only_state_is_forgotten_once_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        for i in 0..RESIDENT_MAX {
            o.push(ev("e", &i.to_string())).await;
        }
        for i in 0..3000 {
            o.push(st("s", &i.to_string())).await;
        }
        o.committed().await;
        bvcsp2mqtt_testkit::eventually(
            "superseded ids are dropped",
            Duration::from_secs(5),
            || o.lock().spilled_gone.len() <= 1,
        )
        .await;
        let got = drain(&o).await;
        assert_eq!(got.len(), RESIDENT_MAX + 1);
        assert_eq!(got[RESIDENT_MAX].payload, "2999");
        o.close();
    }

    #[tokio::test]
    async fn a_restart_with_superseded_state_does_not_spill() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = Outbox::open(dir.path(), 1 << 20).unwrap();
            o.push(st("s", "old")).await;
            o.committed().await;
            let _sent = o.take_next().unwrap(); // in flight, never acknowledged
            o.push(st("s", "new")).await;
            o.committed().await;
            o.close();
        }
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert!(o.lock().spill_from.is_none());
        o.push(ev("e", "next")).await;
        assert_eq!(o.lock().entries.len(), 2, "new messages are held in memory");
        let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
        assert_eq!(got, vec![Bytes::from("new"), Bytes::from("next")]);
        o.close();
    }

    #[tokio::test]
    async fn the_log_starts_over_under_steady_writes() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        let wal = dir.path().join("outbox.sqlite3-wal");
        let payload = "x".repeat(600);
        // A steady 1 000 messages/s, each committed on its own and acknowledged: there is
        // a write in flight whenever the checkpoint runs.
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut largest = 0;
        let n = 5000u64;
        for i in 0..n {
            tick.tick().await;
            let batch = o.batch();
            o.push(ev("e", &payload)).await;
            drop(batch);
            let (id, _) = loop {
                let wake = o.sendable();
                if let Some(next) = o.take_next() {
                    break next;
                }
                tokio::time::timeout(Duration::from_secs(5), wake)
                    .await
                    .expect("committed by the writer");
            };
            o.ack(id);
            if i % 100 == 0 {
                largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            }
        }
        // Never started over, the log would hold every commit, a page or more each
        // (~20 MB here).
        assert!(
            largest < 10 << 20,
            "WAL reached {largest} bytes over {n} messages; it should start over"
        );
        o.close();
    }
}
