//! Dead letters: messages the broker cannot take (larger than `mqtt.max_packet_size`, or
//! refused: the broker closes the connection every time it is sent). They leave the
//! outbox only into the `dead_letters` table of the same database, in the same
//! transaction that deletes their outbox row, so nothing leaves the outbox without the
//! broker's acknowledgement or a dead-letter row, and they never block the messages
//! behind them.
//!
//! The table is bounded: the newest [`MAX_ROWS`] rows and at most [`MAX_BYTES`] of topic
//! and payload are kept (the newest row always, however large); older ones are deleted
//! when a new one comes, and counted. Read them with the `sqlite3` tool once the bridge
//! has stopped (the file is the bridge's alone while it runs):
//! `SELECT datetime(failed_at / 1000, 'unixepoch'), topic, reason FROM dead_letters`.

use bytes::Bytes;

/// Dead letters kept at most (the newest).
pub const MAX_ROWS: u64 = 1000;
/// Bytes of topic and payload kept at most (the newest row is kept whatever its size).
pub const MAX_BYTES: u64 = 64 << 20;

/// A message on its way into the table.
#[derive(Debug, Clone)]
pub(super) struct DeadRow {
    pub outbox_id: u64,
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub failed_at_ms: i64,
    pub reason: String,
}

/// The newest dead letter, for health reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDeadLetter {
    pub topic: String,
    pub bytes: usize,
    pub reason: String,
    /// Unix time in milliseconds.
    pub at_ms: i64,
}

impl LastDeadLetter {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "topic": self.topic, "bytes": self.bytes, "reason": self.reason,
            "at": crate::timestamp::rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms.max(0) as u64)
            ),
        })
    }
}

pub(super) fn create_table(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS dead_letters (
            id INTEGER PRIMARY KEY,
            outbox_id INTEGER NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL,
            failed_at INTEGER NOT NULL,
            reason TEXT NOT NULL
        )",
    )
}

/// Rows in the table.
pub(super) fn count(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM dead_letters", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n.max(0) as u64)
}

/// Add `rows` and trim the table to its bound; returns how many old rows were deleted.
/// Runs inside the caller's transaction.
pub(super) fn insert(conn: &rusqlite::Connection, rows: &[DeadRow]) -> rusqlite::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut stmt = conn.prepare_cached(
        "INSERT INTO dead_letters (outbox_id, topic, payload, retain, failed_at, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for r in rows {
        stmt.execute(rusqlite::params![
            r.outbox_id as i64,
            r.topic,
            r.payload.as_ref(),
            r.retain,
            r.failed_at_ms,
            r.reason
        ])?;
    }
    trim(conn, MAX_ROWS, MAX_BYTES)
}

/// Keep the newest `max_rows` rows and at most `max_bytes` (the newest row always).
pub(super) fn trim(
    conn: &rusqlite::Connection,
    max_rows: u64,
    max_bytes: u64,
) -> rusqlite::Result<u64> {
    // Newest first: the first row that would go over either bound, and all older, go.
    let mut stmt = conn.prepare_cached(
        "SELECT id, length(CAST(topic AS BLOB)) + length(payload) FROM dead_letters ORDER BY id DESC",
    )?;
    let mut rows = stmt.query([])?;
    let (mut kept, mut bytes) = (0u64, 0u64);
    let mut cut = None;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let size = row.get::<_, i64>(1)?.max(0) as u64;
        if kept > 0 && (kept >= max_rows || bytes + size > max_bytes) {
            cut = Some(id);
            break;
        }
        kept += 1;
        bytes += size;
    }
    drop(rows);
    match cut {
        Some(id) => {
            let gone = conn.execute("DELETE FROM dead_letters WHERE id <= ?1", [id])?;
            Ok(gone as u64)
        }
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u64, size: usize) -> DeadRow {
        DeadRow {
            outbox_id: i,
            topic: format!("t/{i}"),
            payload: Bytes::from(vec![b'x'; size]),
            retain: false,
            failed_at_ms: 0,
            reason: "too large".into(),
        }
    }

    fn ids(conn: &rusqlite::Connection) -> Vec<u64> {
        let mut stmt = conn
            .prepare("SELECT outbox_id FROM dead_letters ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|r| r.unwrap() as u64)
            .collect()
    }

    #[test]
    fn the_table_keeps_the_newest_rows_within_both_bounds() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        create_table(&conn).unwrap();
        let rows: Vec<DeadRow> = (0..MAX_ROWS + 5).map(|i| row(i, 10)).collect();
        assert_eq!(insert(&conn, &rows).unwrap(), 5);
        assert_eq!(count(&conn).unwrap(), MAX_ROWS);
        assert_eq!(ids(&conn).first(), Some(&5), "the oldest went");

        // By bytes: 3 rows of ~100 bytes fit in 350, a fourth pushes the oldest out.
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        create_table(&conn).unwrap();
        for i in 0..3 {
            insert(&conn, &[row(i, 100)]).unwrap();
        }
        assert_eq!(trim(&conn, 1000, 350).unwrap(), 0);
        insert(&conn, &[row(3, 100)]).unwrap();
        assert_eq!(trim(&conn, 1000, 350).unwrap(), 1);
        assert_eq!(ids(&conn), vec![1, 2, 3]);

        // The newest is kept however large.
        insert(&conn, &[row(4, 1000)]).unwrap();
        assert_eq!(trim(&conn, 1000, 350).unwrap(), 3);
        assert_eq!(ids(&conn), vec![4]);
    }
}
