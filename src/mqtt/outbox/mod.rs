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
//! fsyncs) run on a thread of their own, so a commit never waits behind one.
//!
//! Memory is bounded however long the broker is away: at most `RESIDENT_MAX` messages
//! are held in memory (and `LIVE_MAX` in the live lane); later ones live on disk only and
//! are read back in order, in batches, as the broker takes the earlier ones.
//!
//! Order is kept per topic, not across topics: behind such a backlog, a message on a
//! topic with nothing unsent in it is also held in a live lane (at most `LIVE_MAX`) and
//! handed out ahead of the backlog, so that an alarm raised after the broker came back
//! waits for one in-flight window, not for the backlog (`live_lane` has the rules).
//!
//! The parts: `index` (the in-memory index: order, cursor, spill, coalescing, what goes
//! next), `live_lane` (the lane beside a backlog, per-topic counts), `storage`
//! (SQLite: schema, reads, the commit transaction), `writer` (group-commit scheduling on
//! the writer thread), `checkpoint` (WAL checkpoints on a thread of their own), `stats`
//! (health figures); this file is the front the producers and the publisher use.

mod checkpoint;
mod index;
#[cfg(test)]
mod lane_tests;
mod live_lane;
mod stats;
mod storage;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};
// std's clock, not tokio's: the index's ages and the pause bookkeeping are read by the
// writer's OS thread too, where tokio's paused test clock does not apply.
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Message;
use super::dead_letters::{self, DeadRow};
use index::{MessageIndex, REFILL_BATCH, RESIDENT_MAX};
pub use stats::OutboxStats;
use storage::NewRow;
use writer::{DELETE_BATCH, DiskWriter};

/// How far writes may run ahead of the disk before producers wait.
const MAX_UNCOMMITTED: u64 = 4096;

/// Why the outbox could not be opened (the bridge does not start). The cause is the
/// `source`, shown after the message by `{:#}` (as `main` prints it).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("storage.dir {dir}: cannot create it")]
    CreateDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.dir {dir}: cannot create {file}")]
    CreateFile {
        dir: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.dir {dir}: cannot open {file}")]
    Database {
        dir: String,
        file: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("storage.dir {dir}: cannot move {file} aside")]
    SetAside {
        dir: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.dir {dir}: cannot start the outbox's threads")]
    Threads {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.dir {dir}: opening the outbox failed")]
    Task {
        dir: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

pub struct Outbox {
    /// Time from queueing to the broker's acknowledgement.
    latency: Mutex<Option<prometheus_client::metrics::histogram::Histogram>>,
    index: Mutex<MessageIndex>,
    max_bytes: u64,
    disk: Option<Arc<DiskWriter>>,
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
            index: Mutex::new(MessageIndex::default()),
            max_bytes: max_bytes.max(1),
            disk: None,
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
        let shown = || dir.display().to_string();
        crate::storage::create_private_dir(dir).map_err(|source| OutboxError::CreateDir {
            dir: shown(),
            source,
        })?;
        let path = dir.join("outbox.sqlite3");
        let file = || path.display().to_string();
        let cannot_create = |source| OutboxError::CreateFile {
            dir: shown(),
            file: file(),
            source,
        };
        // Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        // database file's mode.
        crate::storage::ensure_private_file(&path).map_err(cannot_create)?;
        let cannot_open = |source| OutboxError::Database {
            dir: shown(),
            file: file(),
            source,
        };
        let mut set_aside = None;
        let (conn, checkpointer, index) = match storage::open_connections(&path) {
            Ok(opened) => opened,
            Err(e) if storage::is_corrupt(&e) => {
                // Kept for a post-mortem (it may hold unsent messages), never deleted.
                let aside =
                    crate::storage::set_aside(&path).map_err(|source| OutboxError::SetAside {
                        dir: shown(),
                        file: file(),
                        source,
                    })?;
                error!(
                    "outbox {} is corrupt ({e}); kept as {} and starting a fresh outbox: what it held is not sent",
                    path.display(),
                    aside.display()
                );
                crate::storage::ensure_private_file(&path).map_err(cannot_create)?;
                set_aside = Some(aside);
                storage::open_connections(&path).map_err(cannot_open)?
            }
            Err(e) => return Err(cannot_open(e)),
        };
        let mut outbox = Outbox::memory(max_bytes);
        outbox.set_aside = set_aside;
        let kept = dead_letters::count(&conn).map_err(cannot_open)?;
        *outbox.dead_kept.get_mut() = kept;
        {
            let slot = outbox.index.get_mut().unwrap_or_else(|p| p.into_inner());
            *slot = index;
            if slot.depth() > 0 {
                info!(
                    "outbox: {} unacknowledged messages from the last run ({} bytes); sending them first",
                    slot.depth(),
                    slot.bytes
                );
            }
        }
        let next_id = outbox.lock().next_id;
        outbox.durable.send_replace(next_id);
        let disk = Arc::new(DiskWriter::new(path.clone(), conn));
        disk.left_by_last_run(next_id);
        outbox.disk = Some(disk.clone());
        let outbox = Arc::new(outbox);
        disk.start(Arc::downgrade(&outbox), checkpointer)
            .map_err(|source| OutboxError::Threads {
                dir: shown(),
                source,
            })?;
        Ok(outbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MessageIndex> {
        // Every mutation completes before anything that could panic, so a poisoned
        // lock still guards consistent data.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
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
                    self.commit_now();
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
        if self.disk.is_some() && id >= MAX_UNCOMMITTED {
            let mut durable = self.durable.subscribe();
            if *durable.borrow() <= id - MAX_UNCOMMITTED {
                self.commit_now();
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
        self.wait_until_below(self.durable.subscribe()).await;
    }

    /// Wait until everything queued so far is synced to the disk itself (a checkpoint
    /// covers it: it survives a power cut, not only a crash of the process), which takes
    /// up to about two seconds. Without a disk, once it is queued.
    pub async fn synced(&self) {
        if let Some(disk) = &self.disk {
            self.wait_until_below(disk.synced()).await;
        }
    }

    /// Wait until every message queued so far is below `watermark` (pending commits are
    /// started now, whatever batches are open).
    async fn wait_until_below(&self, mut watermark: watch::Receiver<u64>) {
        let upto = self.lock().next_id;
        self.commit_now();
        let _ = watermark.wait_for(|w| *w >= upto).await;
    }

    /// Queue a message without waiting (state, and the bridge's own status messages).
    /// Returns its id.
    pub fn push_now(&self, msg: Message) -> u64 {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        let Some(disk) = &self.disk else {
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
        let row = NewRow {
            id,
            topic: msg.topic.clone(),
            payload: msg.payload.clone(),
            retain: msg.retain,
            queued_at_ms: now_ms(),
        };
        let removed = g.insert(id, msg, Instant::now(), true);
        // Queued while the lock is held, so rows reach the writer in id order: the
        // writer's "everything below N is on disk" depends on it.
        let mut q = disk.pending();
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
            q.wake_if_idle();
        }
        // The index first, then the queue (and the writer's wake-up, if any).
        drop(g);
        id
    }

    /// Hold back commits while a batch of messages is queued (say, every frame already
    /// read off a socket): when the last batch ends, the writer thread commits them in one
    /// transaction (and takes them earlier if more than `BATCH_MAX` pile up).
    pub fn batch(&self) -> CommitBatch<'_> {
        if let Some(disk) = &self.disk {
            disk.pending().deferring += 1;
        }
        CommitBatch { outbox: self }
    }

    /// Have the writer commit what is queued now, whatever batches are open (a producer
    /// is about to wait, perhaps for those very rows to be sent).
    fn commit_now(&self) {
        if let Some(disk) = &self.disk {
            let mut q = disk.pending();
            q.forced = true;
            q.wake_if_idle();
        }
    }

    /// The next message to hand to the broker (only once it is on disk): in arrival order
    /// per topic, live messages ahead of a backlog (see the module's notes).
    pub fn take_next(&self) -> Option<(u64, Message)> {
        let mut g = self.lock();
        if g.spill_from.is_some()
            && !g.refill_asked
            && g.entries.len() + REFILL_BATCH <= RESIDENT_MAX
            && let Some(disk) = &self.disk
        {
            g.refill_asked = true;
            let mut q = disk.pending();
            q.refill = true;
            q.wake_if_idle();
        }
        g.take()
    }

    /// Give a taken message back (it could not be handed over): it is sent again before
    /// anything newer on its topic, and before the rest of its lane. No wake-up: the
    /// caller retries when the publisher makes progress.
    pub fn untake(&self, id: u64) {
        self.lock().untake(id);
    }

    /// The broker acknowledged message `id`.
    pub fn ack(&self, id: u64) {
        {
            let mut g = self.lock();
            if let Some(queued_at) = g.acknowledged(id) {
                if let Some(h) = self
                    .latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    h.observe(queued_at.elapsed().as_secs_f64());
                }
                if let Some(disk) = &self.disk {
                    let mut q = disk.pending();
                    q.deletes.push(id);
                    // Deletes ride along with the next commit; only a writer asleep without
                    // a deadline needs waking to start DELETE_DELAY's clock.
                    if (q.deletes.len() == 1 && q.untimed) || q.deletes.len() >= DELETE_BATCH {
                        q.wake_if_idle();
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
            let at_ms = now_ms();
            let Some(msg) = g.dead_lettered(id, reason, at_ms, self.disk.is_some()) else {
                return;
            };
            if let Some(disk) = &self.disk {
                let mut q = disk.pending();
                q.deletes.push(id);
                q.dead.push(DeadRow {
                    outbox_id: id,
                    topic: msg.topic,
                    payload: msg.payload,
                    retain: msg.retain,
                    failed_at_ms: at_ms,
                    reason: reason.to_string(),
                });
                q.wake_if_idle();
            }
        }
        self.drained.notify_waiters();
        self.sendable.notify_one();
    }

    /// The broker session is gone: everything unacknowledged is sent again, in order per
    /// topic, and retained state the broker may have lost with it is restored.
    pub fn rewind(&self) {
        let restore: Vec<(String, Bytes)> = {
            let mut g = self.lock();
            let index = &mut *g;
            index.replayed += index.rewind();
            index
                .retained_acked
                .iter()
                .filter(|(t, _)| !index.state_unacked.contains_key(*t))
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

    /// Returns if a thread of the disk writer ends before the outbox is closed (a panic):
    /// the supervisor stops the bridge then (exit 70) rather than run on with nothing
    /// committed. Never returns for an outbox in memory.
    pub async fn writer_ended(&self) {
        match &self.disk {
            Some(disk) => disk.ended().await,
            None => std::future::pending().await,
        }
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
        if let Some(disk) = &self.disk {
            disk.stop();
        }
    }
}

/// See [`Outbox::batch`].
pub struct CommitBatch<'a> {
    outbox: &'a Outbox,
}

impl Drop for CommitBatch<'_> {
    fn drop(&mut self) {
        let Some(disk) = &self.outbox.disk else {
            return;
        };
        let mut q = disk.pending();
        q.deferring -= 1;
        // The writer thread commits; the producer (an async task) never touches the disk.
        if q.deferring == 0 && !q.inserts.is_empty() {
            q.wake_if_idle();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The writer commits what is queued and ends.
        if let Some(disk) = &self.disk {
            disk.close();
        }
    }
}
