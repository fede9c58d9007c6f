//! The in-memory index of the outbox: unacknowledged messages in arrival order, the send
//! cursor and the durable watermark, the spill to disk (at most [`RESIDENT_MAX`] messages
//! in memory), coalescing of unsent retained state, and the acknowledged retained state
//! kept to restore a broker that lost it. No I/O here: the writer thread and the async
//! front both work on it under the outbox's lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, warn};

use super::super::Message;
use super::super::dead_letters::LastDeadLetter;

/// Per-entry overhead counted against the bound (ids, indexes, bookkeeping).
pub(super) const ENTRY_OVERHEAD: u64 = 64;
/// Messages held in memory at most (in flight and next to send); the rest wait on disk.
pub(super) const RESIDENT_MAX: usize = 1024;
/// Rows read back from disk at a time; a read is asked for when this many fit.
pub(super) const REFILL_BATCH: usize = 512;

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) msg: Message,
    pub(super) queued_at: Instant,
}

/// The in-memory index of unacknowledged messages: what is held, what is sent, what is
/// on disk, what waits on disk only, the newest unsent state per retained topic (for
/// coalescing), and the counters health reports show. Guarded by the outbox's one lock.
#[derive(Debug, Default)]
pub(super) struct MessageIndex {
    pub(super) next_id: u64,
    /// Unacknowledged messages by id (id order is arrival order).
    pub(super) entries: BTreeMap<u64, Entry>,
    /// Ids below this have been handed to the publisher.
    pub(super) cursor: u64,
    /// Ids below this are on disk (all of them, without a store).
    pub(super) durable: u64,
    /// Bytes of every unacknowledged message, in memory or on disk only.
    pub(super) bytes: u64,
    /// Messages from this id on live on disk only (`entries` holds those below it).
    pub(super) spill_from: Option<u64>,
    /// How many messages live on disk only.
    pub(super) spilled: usize,
    /// Disk-only messages superseded (coalesced) before they were read back.
    pub(super) spilled_gone: HashSet<u64>,
    /// The writer has been asked to read the next batch back from disk.
    pub(super) refill_asked: bool,
    /// Retained topic -> newest entry (id, cost) for it, for coalescing.
    pub(super) newest_state: HashMap<String, (u64, u64)>,
    /// Retained topic -> number of unacknowledged entries.
    pub(super) state_unacked: HashMap<String, usize>,
    /// Retained topic -> last payload the broker acknowledged, to restore a broker that
    /// lost its retained messages along with our session.
    pub(super) retained_acked: HashMap<String, Bytes>,
    /// Topic and payload bytes held in `retained_acked`.
    pub(super) retained_acked_bytes: usize,
    /// Retained topics not remembered because `retained_acked` was at its bound.
    pub(super) retained_not_kept: u64,
    pub(super) acked: u64,
    pub(super) replayed: u64,
    pub(super) replayed_at_start: u64,
    pub(super) coalesced: u64,
    pub(super) full_since: Option<Instant>,
    /// The disk refuses writes (full, a size limit, an I/O error) since then, and why.
    pub(super) write_error: Option<(Instant, String)>,
    /// Messages moved to the dead-letter table since start, and the newest.
    pub(super) dead_letters: u64,
    pub(super) last_dead: Option<LastDeadLetter>,
    /// Dead letters are logged one by one at most once a minute; the rest are summed up.
    pub(super) dead_logged_at: Option<Instant>,
    pub(super) dead_unlogged: u64,
}

/// The most bytes of acknowledged retained state kept to restore a broker that lost it:
/// a server inventing device ids cannot grow it without bound. Topics past it are
/// published as always but not restored after a lost broker session (counted, logged).
const RETAINED_KEPT_MAX_BYTES: usize = 64 << 20;

impl MessageIndex {
    pub(super) fn remember_retained(&mut self, topic: String, payload: Bytes) {
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

    /// Message `id` was acknowledged: it leaves the index (its retained state is
    /// remembered). Returns when it was queued, if it was held.
    pub(super) fn acknowledged(&mut self, id: u64) -> Option<Instant> {
        let e = self.entries.remove(&id)?;
        self.acked += 1;
        self.bytes -= cost(&e.msg);
        if e.msg.retain {
            self.forget_state(id, &e.msg.topic);
            self.remember_retained(e.msg.topic, e.msg.payload);
        }
        Some(e.queued_at)
    }

    /// Message `id` cannot be published (`reason`): it leaves the index, counted and
    /// logged (one line a minute at most). Returns it, if it was held.
    pub(super) fn dead_lettered(
        &mut self,
        id: u64,
        reason: &str,
        at_ms: i64,
        kept: bool,
    ) -> Option<Message> {
        let e = self.entries.remove(&id)?;
        self.bytes -= cost(&e.msg);
        if e.msg.retain {
            self.forget_state(id, &e.msg.topic);
        }
        self.dead_letters += 1;
        let size = e.msg.topic.len() + e.msg.payload.len();
        self.last_dead = Some(LastDeadLetter {
            topic: e.msg.topic.clone(),
            bytes: size,
            reason: reason.to_string(),
            at_ms,
        });
        let log_now = self
            .dead_logged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if log_now {
            let also = std::mem::take(&mut self.dead_unlogged);
            let where_ = if kept {
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
            self.dead_logged_at = Some(Instant::now());
        } else {
            self.dead_unlogged += 1;
        }
        Some(e.msg)
    }

    /// Retained entry `id` for `topic` left: one fewer unacknowledged, and no longer the
    /// newest to coalesce into.
    fn forget_state(&mut self, id: u64, topic: &str) {
        dec(&mut self.state_unacked, topic);
        if self.newest_state.get(topic).map(|s| s.0) == Some(id) {
            self.newest_state.remove(topic);
        }
    }

    /// Rows read back from disk (from id `from` on, in order) join the index, except
    /// those superseded while they waited.
    pub(super) fn refilled(&mut self, from: u64, rows: Vec<(u64, Message, Instant)>) {
        let mut next = from;
        for (id, msg, queued_at) in rows {
            next = id + 1;
            if self.spilled_gone.remove(&id) {
                continue;
            }
            self.spilled -= 1;
            self.entries.insert(id, Entry { msg, queued_at });
        }
        self.spill_from = (next < self.next_id && self.spilled > 0).then_some(next);
        if self.spill_from.is_none() {
            self.spilled_gone.clear();
        } else {
            // Rows below `next` are never read again.
            self.spilled_gone.retain(|id| *id >= next);
        }
        self.refill_asked = false;
    }

    pub(super) fn depth(&self) -> usize {
        self.entries.len() + self.spilled
    }

    /// Add an entry (in memory, or counted as disk-only); for state, drop an unsent older
    /// one for the same topic (returned, for its row to be deleted).
    pub(super) fn insert(
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
pub(super) fn cost(msg: &Message) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_retained_state_is_bounded_and_known_topics_still_update() {
        let mut index = MessageIndex::default();
        let mib = Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..80 {
            index.remember_retained(format!("t/{i}"), mib.clone());
        }
        assert!(index.retained_acked_bytes <= RETAINED_KEPT_MAX_BYTES);
        assert!(index.retained_not_kept >= 16, "{}", index.retained_not_kept);
        index.remember_retained("t/0".into(), Bytes::from_static(b"small"));
        assert_eq!(index.retained_acked["t/0"], Bytes::from_static(b"small"));
        index.remember_retained("t/new".into(), Bytes::from_static(b"fits now"));
        assert!(index.retained_acked.contains_key("t/new"));
    }
}
