//! The live lane: while a backlog waits (more than `RESIDENT_MAX` messages queued, most of
//! them on disk only, say after a long broker outage), a message queued on a topic with
//! nothing unsent in the backlog is also held here, in memory, so that an alarm raised
//! after the broker came back does not wait for the whole backlog to go first.
//!
//! The rules, which keep per-topic order across both lanes, a rewind and a restart:
//!
//! - A message joins the lane only if its topic has no unsent message outside the lane
//!   (none in memory, none on disk only: [`BacklogCounts`]) and the lane has room
//!   ([`LIVE_MAX`]); otherwise it joins the backlog, and so do the later messages on its
//!   topic until the backlog has sent them all.
//! - It is still written to disk like any other, and is handed out only once it is there.
//! - A live message is handed out ahead of the backlog only if its topic has no unsent
//!   message outside the lane (and is the oldest unsent of its topic in the lane, which
//!   the lane's id order sees to). Otherwise (after a rewind or an `untake` made older
//!   ones unsent again) it waits for its turn in arrival order: the backlog hands out the
//!   oldest unsent message held in memory, of either lane. No message on disk only is
//!   ever older than a live one on the same topic (it would have kept that one out of
//!   the lane), so this never puts a live message ahead of one still on disk.
//! - Live messages go first, but at most [`LIVE_RUN`] in a row while the backlog has one
//!   ready: the backlog keeps at least a ninth of the link however busy the live side is.
//! - A live message stays here until acknowledged; a rewind makes it unsent again.
//! - After a restart everything on disk is backlog (the lane starts empty).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use super::super::Message;
use super::index::Entry;

/// Live messages held at most (unsent and in flight); more join the backlog.
pub(super) const LIVE_MAX: usize = 1024;
/// Live messages handed out in a row at most while the backlog has one ready.
pub(super) const LIVE_RUN: u32 = 8;
/// Unsent live messages looked at, at most, for one that may go first.
const LIVE_SCAN: usize = 64;

/// A topic, by a 64-bit hash: two topics sharing one can only make a live message wait
/// for its turn in arrival order, never put one ahead of an older message on its topic.
pub(super) type TopicKey = u64;

/// A cheap hash of a topic (computed once a message, and again when read back from
/// disk): 8 bytes at a time, then MurmurHash3's finaliser to mix every bit in.
pub(super) fn topic_key(topic: &[u8]) -> TopicKey {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let (words, rest) = topic.as_chunks::<8>();
    let mut h = words
        .iter()
        .fold(topic.len() as u64, |h, w| step(h, u64::from_le_bytes(*w)));
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(last));
    }
    h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The keys are hashes already: the map uses them as they are.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Per topic, how many unsent messages wait outside the live lane: in memory (not yet
/// handed out) or on disk only.
#[derive(Debug, Default)]
pub(super) struct BacklogCounts(HashMap<TopicKey, u64, BuildHasherDefault<AsIs>>);

impl BacklogCounts {
    pub(super) fn add(&mut self, key: TopicKey, n: u64) {
        *self.0.entry(key).or_default() += n;
    }

    pub(super) fn inc(&mut self, key: TopicKey) {
        self.add(key, 1);
    }

    pub(super) fn dec(&mut self, key: TopicKey) {
        if let Some(n) = self.0.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&key);
            }
        }
    }

    pub(super) fn has(&self, key: TopicKey) -> bool {
        self.0.contains_key(&key)
    }

    #[cfg(test)]
    pub(super) fn get(&self, key: TopicKey) -> u64 {
        self.0.get(&key).copied().unwrap_or(0)
    }
}

/// Live messages not yet acknowledged, and which of them are unsent.
#[derive(Debug, Default)]
pub(super) struct LiveLane {
    entries: BTreeMap<u64, Entry>,
    unsent: BTreeSet<u64>,
    /// Live messages handed out in a row while the backlog had one ready.
    pub(super) run: u32,
}

impl LiveLane {
    pub(super) fn has_room(&self) -> bool {
        self.entries.len() < LIVE_MAX
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn unsent_len(&self) -> usize {
        self.unsent.len()
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub(super) fn insert(&mut self, id: u64, entry: Entry) {
        self.entries.insert(id, entry);
        self.unsent.insert(id);
    }

    /// Message `id` leaves (acknowledged, or a dead letter).
    pub(super) fn remove(&mut self, id: u64) -> Option<Entry> {
        self.unsent.remove(&id);
        self.entries.remove(&id)
    }

    /// Message `id` leaves if it is unsent (superseded by newer state).
    pub(super) fn remove_unsent(&mut self, id: u64) -> Option<Entry> {
        if self.unsent.remove(&id) {
            self.entries.remove(&id)
        } else {
            None
        }
    }

    pub(super) fn first_unsent(&self) -> Option<u64> {
        self.unsent.first().copied()
    }

    /// The oldest live message that may go ahead of the backlog: on disk (below
    /// `durable`), its topic with nothing unsent outside the lane (`backlog`). An older
    /// unsent one on its topic would have the same topic and come first.
    pub(super) fn ready(&self, durable: u64, backlog: &BacklogCounts) -> Option<u64> {
        for &id in self.unsent.iter().take(LIVE_SCAN) {
            if id >= durable {
                // Rows reach the disk in id order: the later ones are not there either.
                return None;
            }
            if self.entries.get(&id).is_some_and(|e| !backlog.has(e.key)) {
                return Some(id);
            }
        }
        None
    }

    /// Hand out live message `id`, if it is one.
    pub(super) fn take(&mut self, id: u64) -> Option<Message> {
        let e = self.entries.get(&id)?;
        self.unsent.remove(&id);
        Some(e.msg.clone())
    }

    /// Give live message `id` back (unsent again), if it is one.
    pub(super) fn untake(&mut self, id: u64) -> bool {
        if !self.entries.contains_key(&id) {
            return false;
        }
        self.unsent.insert(id);
        true
    }

    /// Everything in the lane is unsent again; returns how many had been handed out.
    pub(super) fn rewind(&mut self) -> u64 {
        let resent = (self.entries.len() - self.unsent.len()) as u64;
        self.unsent = self.entries.keys().copied().collect();
        self.run = 0;
        resent
    }

    /// When the oldest live message was queued.
    pub(super) fn oldest_queued_at(&self) -> Option<Instant> {
        self.entries.values().next().map(|e| e.queued_at)
    }
}
