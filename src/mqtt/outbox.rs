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
//! The store is SQLite in WAL mode with `synchronous = NORMAL`: a committed write
//! survives a crash of the process; a power cut can lose the last moments of writes.
//! Writes go through one writer thread that commits whatever has queued up in one
//! transaction (group commit), so many producers cost one commit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use super::Message;

/// Default bound on what the outbox holds, in bytes of topic and payload.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// How far writes may run ahead of the disk before producers wait.
const MAX_UNCOMMITTED: u64 = 4096;
/// Per-entry overhead counted against the bound (ids, indexes, bookkeeping).
const ENTRY_OVERHEAD: u64 = 64;

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

impl Entry {
    fn cost(&self) -> u64 {
        (self.msg.topic.len() + self.msg.payload.len()) as u64 + ENTRY_OVERHEAD
    }
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
    bytes: u64,
    /// Retained topic -> newest entry id for it, for coalescing.
    newest_state: HashMap<String, u64>,
    /// Retained topic -> number of unacknowledged entries.
    state_unacked: HashMap<String, usize>,
    /// Retained topic -> last payload the broker acknowledged, to restore a broker that
    /// lost its retained messages along with our session.
    retained_acked: HashMap<String, Bytes>,
    acked: u64,
    replayed: u64,
    replayed_at_start: u64,
    coalesced: u64,
    full_since: Option<Instant>,
}

/// Counters for health reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

impl OutboxStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "depth": self.depth, "unsent": self.unsent, "bytes": self.bytes,
            "oldest_age_ms": self.oldest_age_ms, "acked": self.acked, "replayed": self.replayed,
            "replayed_at_start": self.replayed_at_start, "coalesced": self.coalesced, "full": self.full,
        })
    }
}

enum Op {
    Insert {
        id: u64,
        topic: String,
        payload: Bytes,
        retain: bool,
        queued_at_ms: i64,
    },
    Delete(u64),
}

/// The writer thread's queue.
struct Store {
    queue: Mutex<(Vec<Op>, bool)>,
    wake: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
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
        }
    }

    /// Open (or create) the outbox under `dir`, loading what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Outbox>, OutboxError> {
        let err = |message: String| OutboxError::Open {
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create it: {e}")))?;
        let path = dir.join("outbox.sqlite3");
        let conn =
            open_db(&path).map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let mut outbox = Outbox::memory(max_bytes);
        {
            let inner = outbox.inner.get_mut().unwrap_or_else(|p| p.into_inner());
            let mut stmt = conn
                .prepare("SELECT id, topic, payload, retain FROM outbox ORDER BY id")
                .map_err(|e| err(e.to_string()))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })
                .map_err(|e| err(e.to_string()))?;
            for row in rows {
                let (id, topic, payload, retain) = row.map_err(|e| err(e.to_string()))?;
                let id = id as u64;
                let msg = Message {
                    topic,
                    payload: Bytes::from(payload),
                    retain,
                };
                inner.insert(id, msg, Instant::now());
                inner.next_id = id + 1;
            }
            inner.durable = inner.next_id;
            inner.replayed_at_start = inner.entries.len() as u64;
            if !inner.entries.is_empty() {
                info!(
                    "outbox: {} unacknowledged messages from the last run ({} bytes); sending them first",
                    inner.entries.len(),
                    inner.bytes
                );
            }
        }
        outbox.durable.send_replace(outbox.lock().next_id);
        let store = Arc::new(Store {
            queue: Mutex::new((Vec::new(), false)),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        });
        outbox.store = Some(store.clone());
        let store = store.clone();
        let outbox = Arc::new(outbox);
        let weak = Arc::downgrade(&outbox);
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(conn, store, weak))
            .map_err(|e| err(format!("cannot start the writer thread: {e}")))?;
        *outbox
            .store
            .as_ref()
            .expect("just set")
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(outbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation completes before anything that could panic, so a poisoned
        // lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, op: Op) {
        if let Some(store) = &self.store {
            let mut q = store.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.0.push(op);
            store.wake.notify_one();
        }
    }

    /// Queue a message. Events wait while the outbox is full, and until they are on disk;
    /// state never waits for space.
    pub async fn push(&self, msg: Message) {
        if !msg.retain {
            loop {
                let drained = self.drained.notified();
                {
                    let mut g = self.lock();
                    if g.bytes < self.max_bytes {
                        if g.full_since.take().is_some() {
                            self.full.send_replace(false);
                        }
                        break;
                    }
                    if g.full_since.is_none() {
                        g.full_since = Some(Instant::now());
                        warn!(
                            "outbox full ({} bytes, storage.max_bytes {}): reading upstream paused until the broker takes more",
                            g.bytes, self.max_bytes
                        );
                        self.full.send_replace(true);
                    }
                }
                drained.await;
            }
        }
        let id = self.push_now(msg);
        // Nothing is sent before it is on disk (take_next sees to that); here the disk
        // only pushes back when it falls behind, so one producer gets group commits too.
        if self.store.is_some() && id >= MAX_UNCOMMITTED {
            let mut durable = self.durable.subscribe();
            let _ = durable.wait_for(|d| *d > id - MAX_UNCOMMITTED).await;
        }
    }

    /// Wait until everything queued so far is on disk.
    pub async fn committed(&self) {
        let upto = self.lock().next_id;
        let mut durable = self.durable.subscribe();
        let _ = durable.wait_for(|d| *d >= upto).await;
    }

    /// Queue a message without waiting (state, and the bridge's own status messages).
    /// Returns its id.
    pub fn push_now(&self, msg: Message) -> u64 {
        let (id, removed) = {
            let mut g = self.lock();
            let id = g.next_id;
            g.next_id += 1;
            let removed = g.insert(id, msg.clone(), Instant::now());
            if self.store.is_none() {
                g.durable = g.next_id;
            }
            (id, removed)
        };
        if let Some(old) = removed {
            self.enqueue(Op::Delete(old));
        }
        if self.store.is_some() {
            self.enqueue(Op::Insert {
                id,
                topic: msg.topic,
                payload: msg.payload,
                retain: msg.retain,
                queued_at_ms: now_ms(),
            });
        } else {
            self.durable.send_replace(id + 1);
            self.sendable.notify_one();
        }
        id
    }

    /// The next message to hand to the broker, in arrival order (only once it is on disk).
    pub fn take_next(&self) -> Option<(u64, Message)> {
        let mut g = self.lock();
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
        let removed = {
            let mut g = self.lock();
            let inner = &mut *g;
            match inner.entries.remove(&id) {
                Some(e) => {
                    if let Some(h) = self
                        .latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                    {
                        h.observe(e.queued_at.elapsed().as_secs_f64());
                    }
                    inner.acked += 1;
                    inner.bytes -= e.cost();
                    if e.msg.retain {
                        dec(&mut inner.state_unacked, &e.msg.topic);
                        if inner.newest_state.get(&e.msg.topic) == Some(&id) {
                            inner.newest_state.remove(&e.msg.topic);
                        }
                        inner.retained_acked.insert(e.msg.topic, e.msg.payload);
                    }
                    true
                }
                None => false,
            }
        };
        if removed {
            self.enqueue(Op::Delete(id));
        }
        self.drained.notify_waiters();
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

    pub fn depth(&self) -> usize {
        self.lock().entries.len()
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
            {
                let mut q = store.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.1 = true;
                store.wake.notify_one();
            }
            if let Some(handle) = store
                .thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                let _ = handle.join();
            }
        }
    }

    pub fn stats(&self) -> OutboxStats {
        let g = self.lock();
        OutboxStats {
            depth: g.entries.len(),
            unsent: g.entries.range(g.cursor..).count(),
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
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The writer commits what is queued and ends.
        if let Some(store) = &self.store {
            let mut q = store.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.1 = true;
            store.wake.notify_one();
        }
    }
}

impl Inner {
    /// Add an entry; for state, drop an unsent older one for the same topic (returned).
    fn insert(&mut self, id: u64, msg: Message, queued_at: Instant) -> Option<u64> {
        let mut removed = None;
        if msg.retain {
            if let Some(old) = self.newest_state.get(&msg.topic).copied()
                && old >= self.cursor
                && let Some(e) = self.entries.remove(&old)
            {
                self.coalesced += 1;
                self.bytes -= e.cost();
                dec(&mut self.state_unacked, &msg.topic);
                removed = Some(old);
            }
            self.newest_state.insert(msg.topic.clone(), id);
            *self.state_unacked.entry(msg.topic.clone()).or_default() += 1;
        }
        let entry = Entry { msg, queued_at };
        self.bytes += entry.cost();
        self.entries.insert(id, entry);
        removed
    }
}

fn dec(map: &mut HashMap<String, usize>, topic: &str) {
    if let Some(n) = map.get_mut(topic) {
        *n -= 1;
        if *n == 0 {
            map.remove(topic);
        }
    }
}

fn open_db(path: &PathBuf) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    // WAL + NORMAL: a commit is a write to the log, durable against a process crash
    // without an fsync per commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL,
            queued_at INTEGER NOT NULL
        )",
    )?;
    Ok(conn)
}

/// Commit everything queued in one transaction; tell waiters what is on disk.
fn writer(mut conn: rusqlite::Connection, store: Arc<Store>, outbox: std::sync::Weak<Outbox>) {
    let mut pending: Vec<Op> = Vec::new();
    loop {
        let closing = {
            let mut q = store.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.0.is_empty() && !q.1 && pending.is_empty() {
                q = store.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            pending.append(&mut q.0);
            q.1
        };
        if !pending.is_empty() {
            match commit(&mut conn, &pending) {
                Ok(max_insert) => {
                    pending.clear();
                    if let (Some(outbox), Some(max)) = (outbox.upgrade(), max_insert) {
                        outbox.mark_durable(max + 1);
                    }
                }
                Err(e) if !closing => {
                    // The disk is full or failing: keep everything, say so, try again.
                    // Producers wait meanwhile, so nothing is published unwritten.
                    error!("outbox: cannot write to disk: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) => {
                    error!("outbox: cannot write the last changes to disk while stopping: {e}")
                }
            }
        }
        if closing {
            let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
            return;
        }
    }
}

fn commit(conn: &mut rusqlite::Connection, ops: &[Op]) -> rusqlite::Result<Option<u64>> {
    let tx = conn.transaction()?;
    let mut max_insert = None;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO outbox (id, topic, payload, retain, queued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        for op in ops {
            match op {
                Op::Insert {
                    id,
                    topic,
                    payload,
                    retain,
                    queued_at_ms,
                } => {
                    insert.execute(rusqlite::params![
                        *id as i64,
                        topic,
                        payload.as_ref(),
                        retain,
                        queued_at_ms
                    ])?;
                    max_insert = Some(max_insert.map_or(*id, |m: u64| m.max(*id)));
                }
                Op::Delete(id) => {
                    delete.execute([*id as i64])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(max_insert)
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
        let conn = rusqlite::Connection::open(dir.path().join("outbox.sqlite3")).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert!(o.take_next().is_some());
        o.close();
    }
}
