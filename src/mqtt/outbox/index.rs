//! The in-memory index of the outbox: unacknowledged messages in arrival order, the send
//! cursor and the durable watermark, the spill to disk (at most [`RESIDENT_MAX`] messages
//! in memory), the live lane beside a backlog (`live_lane`), what is handed out next,
//! coalescing of unsent retained state, and the acknowledged retained state kept to
//! restore a broker that lost it. No I/O here: the writer thread and the async front both
//! work on it under the outbox's lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, warn};

use super::super::Message;
use super::super::dead_letters::LastDeadLetter;
use super::live_lane::{BacklogCounts, LIVE_RUN, LiveLane, TopicKey, topic_key};

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
    /// Its topic, for the per-topic counts.
    pub(super) key: TopicKey,
}

impl Entry {
    pub(super) fn new(msg: Message, queued_at: Instant) -> Entry {
        let key = topic_key(msg.topic.as_bytes());
        Entry {
            msg,
            queued_at,
            key,
        }
    }
}

/// The in-memory index of unacknowledged messages: what is held, what is sent, what is
/// on disk, what waits on disk only, the newest unsent state per retained topic (for
/// coalescing), and the counters health reports show. Guarded by the outbox's one lock.
#[derive(Debug, Default)]
pub(super) struct MessageIndex {
    pub(super) next_id: u64,
    /// Unacknowledged messages held in memory by id (id order is arrival order), but for
    /// those in the live lane.
    pub(super) entries: BTreeMap<u64, Entry>,
    /// Those of `entries` below this have been handed to the publisher.
    pub(super) cursor: u64,
    /// Messages queued behind a backlog that may go ahead of it.
    pub(super) live: LiveLane,
    /// Per topic, unsent messages outside the live lane (in `entries` or disk-only).
    pub(super) backlog_unsent: BacklogCounts,
    /// Ids below this are on disk (all of them, without a store).
    pub(super) durable: u64,
    /// Bytes of every unacknowledged message, in memory or on disk only.
    pub(super) bytes: u64,
    /// Messages from this id on live on disk only, but for those in the live lane
    /// (`entries` holds those below it).
    pub(super) spill_from: Option<u64>,
    /// How many messages live on disk only.
    pub(super) spilled: usize,
    /// Ids from `spill_from` on whose rows, if read back, are not to join `entries`:
    /// disk-only messages superseded (coalesced), and live messages gone.
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
        let e = self.remove_held(id)?;
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
        let e = self.remove_held(id)?;
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

    /// Message `id` leaves the index, wherever it is held in memory.
    fn remove_held(&mut self, id: u64) -> Option<Entry> {
        if let Some(e) = self.entries.remove(&id) {
            if id >= self.cursor {
                self.backlog_unsent.dec(e.key);
            }
            return Some(e);
        }
        let e = self.live.remove(id)?;
        self.live_gone(id);
        Some(e)
    }

    /// Live message `id` left: its row, if still to be read back, is skipped.
    fn live_gone(&mut self, id: u64) {
        if self.spill_from.is_some_and(|from| id >= from) {
            self.spilled_gone.insert(id);
        }
    }

    /// Unsent message `id` (on topic `key`) leaves, superseded; false if it was sent.
    fn remove_unsent(&mut self, id: u64, key: TopicKey) -> bool {
        if self.live.remove_unsent(id).is_some() {
            self.live_gone(id);
            return true;
        }
        if id < self.cursor || self.live.contains(id) {
            return false;
        }
        if self.entries.remove(&id).is_some() {
            self.backlog_unsent.dec(key);
            return true;
        }
        if self.spill_from.is_some_and(|from| id >= from) && self.spilled_gone.insert(id) {
            self.spilled -= 1;
            self.backlog_unsent.dec(key);
            return true;
        }
        false
    }

    /// The next message to hand out, if one is on disk: a live one whose topic has
    /// nothing older unsent, else the oldest unsent one (see `live_lane` for the rules).
    pub(super) fn take(&mut self) -> Option<(u64, Message)> {
        if self.live.unsent_len() == 0 {
            // The backlog in arrival order (all of a replay without live messages).
            self.live.run = 0;
            let (&id, e) = self.entries.range(self.cursor..self.durable).next()?;
            let msg = e.msg.clone();
            self.backlog_unsent.dec(e.key);
            self.cursor = id + 1;
            return Some((id, msg));
        }
        let backlog = self.backlog_next();
        let live = self.live.ready(self.durable, &self.backlog_unsent);
        let id = match (live, backlog) {
            (Some(l), Some(b)) if l != b && self.live.run >= LIVE_RUN => {
                self.live.run = 0;
                b
            }
            (Some(l), b) => {
                // Counted only while the backlog has another one ready.
                self.live.run = match b {
                    Some(b) if b != l => self.live.run + 1,
                    _ => 0,
                };
                l
            }
            (None, Some(b)) => {
                self.live.run = 0;
                b
            }
            (None, None) => return None,
        };
        if let Some(msg) = self.live.take(id) {
            return Some((id, msg));
        }
        let e = self.entries.get(&id)?;
        self.backlog_unsent.dec(e.key);
        self.cursor = id + 1;
        Some((id, e.msg.clone()))
    }

    /// The oldest unsent message held in memory, if it is on disk.
    fn backlog_next(&self) -> Option<u64> {
        let resident = self
            .entries
            .range(self.cursor..self.durable)
            .next()
            .map(|(id, _)| *id);
        let live = self.live.first_unsent().filter(|id| *id < self.durable);
        match (resident, live) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Give a taken message back: it goes again before anything newer on its topic and
    /// before the rest of its lane (from `entries`, so does every one handed out after
    /// it, as the cursor moves back).
    pub(super) fn untake(&mut self, id: u64) {
        if self.live.untake(id) || id >= self.cursor {
            return;
        }
        for e in self.entries.range(id..self.cursor).map(|(_, e)| e) {
            self.backlog_unsent.inc(e.key);
        }
        self.cursor = id;
    }

    /// The broker session is gone: everything unacknowledged is unsent again. Returns how
    /// many had been handed out.
    pub(super) fn rewind(&mut self) -> u64 {
        let mut resent = 0;
        for e in self.entries.range(..self.cursor).map(|(_, e)| e) {
            self.backlog_unsent.inc(e.key);
            resent += 1;
        }
        self.cursor = 0;
        resent + self.live.rewind()
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
    /// those superseded while they waited and those of the live lane.
    pub(super) fn refilled(&mut self, from: u64, rows: Vec<(u64, Entry)>) {
        let mut next = from;
        for (id, entry) in rows {
            next = id + 1;
            if self.spilled_gone.remove(&id) || self.live.contains(id) {
                continue;
            }
            self.spilled -= 1;
            self.entries.insert(id, entry);
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
        self.entries.len() + self.spilled + self.live.len()
    }

    /// Unsent messages, in memory or on disk.
    pub(super) fn unsent(&self) -> usize {
        self.entries.range(self.cursor..).count() + self.spilled + self.live.unsent_len()
    }

    /// Add an entry: in memory; or, behind a backlog (`RESIDENT_MAX` held or some on disk
    /// only), in the live lane if its topic has nothing unsent in the backlog, else
    /// counted as disk-only if `spill` (there is a disk). For state, drop an unsent older
    /// one for the same topic (returned, for its row to be deleted).
    pub(super) fn insert(
        &mut self,
        id: u64,
        msg: Message,
        queued_at: Instant,
        spill: bool,
    ) -> Option<u64> {
        let mut removed = None;
        let cost = cost(&msg);
        let entry = Entry::new(msg, queued_at);
        let (key, msg) = (entry.key, &entry.msg);
        if msg.retain {
            if let Some((old, old_cost)) = self.newest_state.get(&msg.topic).copied()
                && self.remove_unsent(old, key)
            {
                self.coalesced += 1;
                self.bytes -= old_cost;
                dec(&mut self.state_unacked, &msg.topic);
                removed = Some(old);
            }
            self.newest_state.insert(msg.topic.clone(), (id, cost));
            *self.state_unacked.entry(msg.topic.clone()).or_default() += 1;
        }
        self.bytes += cost;
        let behind = self.spill_from.is_some() || self.entries.len() >= RESIDENT_MAX;
        if behind && self.live.has_room() && !self.backlog_unsent.has(key) {
            self.live.insert(id, entry);
            return removed;
        }
        self.backlog_unsent.inc(key);
        if behind && spill {
            self.spill_from.get_or_insert(id);
            self.spilled += 1;
        } else {
            self.entries.insert(id, entry);
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

    fn ev(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::new(),
            retain: false,
        }
    }

    #[test]
    fn rows_of_live_messages_are_never_read_back_into_the_backlog() {
        let mut index = MessageIndex::default();
        let now = Instant::now();
        let topics = (0..RESIDENT_MAX).map(|_| "a").chain(["a", "b", "c", "a"]);
        for (id, topic) in (0u64..).zip(topics) {
            index.insert(id, ev(topic), now, true);
            index.next_id = id + 1;
        }
        let (spilled, b, c) = (
            RESIDENT_MAX as u64,
            RESIDENT_MAX as u64 + 1,
            RESIDENT_MAX as u64 + 2,
        );
        assert_eq!(
            (index.spill_from, index.spilled, index.live.len()),
            (Some(spilled), 2, 2)
        );
        index.durable = index.next_id;
        // b goes first and is acknowledged (its row's delete not yet committed); c is in
        // flight when the backlog's rows are read back.
        assert_eq!(index.take().map(|(id, _)| id), Some(b));
        assert!(index.acknowledged(b).is_some());
        assert_eq!(index.take().map(|(id, _)| id), Some(c));
        let rows = (spilled..index.next_id).zip(["a", "b", "c", "a"]);
        index.refilled(
            spilled,
            rows.map(|(id, t)| (id, Entry::new(ev(t), now))).collect(),
        );
        assert!(!index.entries.contains_key(&b) && !index.entries.contains_key(&c));
        assert!(index.entries.contains_key(&spilled) && index.entries.contains_key(&(c + 1)));
        assert_eq!(
            (index.spill_from, index.spilled, index.depth()),
            (None, 0, RESIDENT_MAX + 3)
        );
    }

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
