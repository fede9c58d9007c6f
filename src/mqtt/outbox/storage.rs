//! The outbox's SQLite store: the schema, the pragmas, what a previous run left, reading
//! spilled rows back, and the one transaction a group commit is.
//!
//! WAL mode with `synchronous = NORMAL`: a committed write is in the kernel's page cache
//! before the message may be sent, so it survives a crash or `kill -9` of the process. A
//! power cut (or a kernel crash) can lose what was committed since the last checkpoint,
//! about a second's worth, and never corrupts the store. The file is this process's alone
//! while it runs (see `open_db`); read it with the `sqlite3` tool once the bridge stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::Message;
use super::super::dead_letters::{self, DeadRow};
use super::index::{ENTRY_OVERHEAD, MessageIndex, RESIDENT_MAX};
use super::live_lane::topic_key;
use super::now_ms;

/// A row to write.
pub(super) struct NewRow {
    pub(super) id: u64,
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) retain: bool,
    pub(super) queued_at_ms: i64,
}

pub(super) fn open_db(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    // "unix-excl": the process takes the file's lock once and keeps it, and the WAL index
    // lives in this process's memory (no -shm file), so a commit makes no `fcntl` calls
    // (six a commit otherwise, measured with strace), while the writer's and the
    // checkpointer's connections still share it. Other processes cannot open the file
    // while the bridge runs ("database is locked"); only one bridge may use a storage
    // directory anyway (`storage::lock`).
    let mut conn = rusqlite::Connection::open_with_flags_and_vfs(
        path,
        rusqlite::OpenFlags::default(),
        c"unix-excl",
    )?;
    // WAL + NORMAL: a commit is a write to the log, durable against a process crash
    // without an fsync per commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoints are the checkpoint thread's job, never a commit's.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A log started over keeps its size on disk (rewritten in place); one a burst grew
    // past this is trimmed back to it by the first commit after a checkpoint.
    conn.pragma_update(None, "journal_size_limit", 8 << 20)?;
    // The hot pages are the ends of one table: a small cache holds them. 256 KiB
    // rather than 1 MiB: the burst's peak RSS 1.4 MB lower, CPU per event unchanged
    // (three interleaved runs each, 2026-12-08).
    conn.pragma_update(None, "cache_size", -256)?;
    // The writer waits for the checkpointer's brief exclusive moment (`checkpoint.rs`).
    conn.busy_handler(Some(wait_for_lock))?;
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
pub(super) fn open_connections(
    path: &Path,
) -> rusqlite::Result<(rusqlite::Connection, rusqlite::Connection, MessageIndex)> {
    let conn = open_db(path)?;
    let checkpointer = open_db(path)?;
    let mut index = MessageIndex::default();
    load(&conn, &mut index)?;
    Ok((conn, checkpointer, index))
}

/// SQLite says the file is not (or no longer) a database.
pub(super) fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// A message read back: its id, itself, and when it was queued (carried over).
pub(super) type StoredRow = (u64, Message, Instant);

/// Up to `limit` rows from id `from` on, in order, with their age carried over.
pub(super) fn read_rows(
    conn: &rusqlite::Connection,
    from: u64,
    limit: usize,
) -> rusqlite::Result<Vec<StoredRow>> {
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

/// SQLite's busy handler (`tries`: calls for this statement so far), by
/// [`crate::retry::sqlite_lock_wait`]. It runs on the writer's or the checkpointer's own
/// thread, never the runtime's.
fn wait_for_lock(tries: i32) -> bool {
    match crate::retry::sqlite_lock_wait(u32::try_from(tries).unwrap_or(0)) {
        Some(wait) => {
            std::thread::sleep(wait);
            true
        }
        None => false,
    }
}

/// What a previous run left: the first `RESIDENT_MAX` rows into memory, the rest counted
/// (and their topics, for the live lane). All of it is backlog.
pub(super) fn load(conn: &rusqlite::Connection, index: &mut MessageIndex) -> rusqlite::Result<()> {
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
        superseded.extend(index.insert(id, msg, queued_at, false));
    }
    for id in superseded {
        conn.execute("DELETE FROM outbox WHERE id = ?1", [id as i64])?;
    }
    index.next_id = max_id as u64 + 1;
    index.durable = index.next_id;
    if filled {
        let from = last + 1;
        // One pass: how much waits on disk only, on which topics (a live message must not
        // go ahead of them), and which retained state (it holds back restoring older
        // values).
        let mut stmt = conn.prepare(
            "SELECT topic, retain, length(CAST(topic AS BLOB)) + length(payload)
             FROM outbox WHERE id >= ?1",
        )?;
        let mut rows = stmt.query([from as i64])?;
        let (mut spilled, mut bytes) = (0usize, 0u64);
        while let Some(row) = rows.next()? {
            let topic = row.get_ref(0)?.as_bytes().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
            })?;
            index.backlog_unsent.inc(topic_key(topic));
            if row.get::<_, bool>(1)? {
                let topic = String::from_utf8_lossy(topic).into_owned();
                *index.state_unacked.entry(topic).or_default() += 1;
            }
            spilled += 1;
            bytes += row.get::<_, i64>(2)? as u64 + ENTRY_OVERHEAD;
        }
        if spilled > 0 {
            index.spill_from = Some(from);
            index.spilled = spilled;
            index.bytes += bytes;
        }
    }
    index.replayed_at_start = index.depth() as u64;
    Ok(())
}

/// deletes. Returns how many old dead letters were trimmed.
pub(super) fn write(
    conn: &rusqlite::Connection,
    inserts: &[NewRow],
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
