//! What the outbox reports for health: depth, age, counters, and why it pauses.

use super::super::dead_letters::LastDeadLetter;
use super::Outbox;

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

impl Outbox {
    /// The outbox's figures now.
    pub fn stats(&self) -> OutboxStats {
        let g = self.lock();
        OutboxStats {
            depth: g.depth(),
            unsent: g.unsent(),
            bytes: g.bytes,
            oldest_age_ms: g
                .entries
                .values()
                .next()
                .map(|e| e.queued_at)
                .into_iter()
                .chain(g.live.oldest_queued_at())
                .min()
                .map(|t| t.elapsed().as_millis() as u64)
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
