//! Every message passes through the outbox: it is taken out for sending in order and
//! leaves only when the broker has acknowledged it. If the broker session is lost, what
//! was sent but not acknowledged is sent again, in the same order, with the same payload
//! (and so the same `event_id`).
//!
//! State (retained) messages coalesce: a newer message for a topic replaces an older one
//! that has not been sent yet. Events never coalesce and are never dropped: when the
//! outbox is full, `push` waits, which stops reading upstream until the broker drains it.
//!
//! This store is in memory; it keeps events across broker outages but not across a crash
//! of the bridge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use super::Message;

/// Default capacity in messages.
pub const DEFAULT_CAPACITY: usize = 100_000;

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
    /// Retained topic -> newest entry id for it, for coalescing.
    newest_state: HashMap<String, u64>,
    /// Retained topic -> number of unacknowledged entries.
    state_unacked: HashMap<String, usize>,
    /// Retained topic -> last payload the broker acknowledged, to restore a broker that
    /// lost its retained messages along with our session.
    retained_acked: HashMap<String, Bytes>,
    acked: u64,
    replayed: u64,
    coalesced: u64,
}

/// Counters for health reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub depth: usize,
    pub unsent: usize,
    pub oldest_age_ms: u64,
    pub acked: u64,
    pub replayed: u64,
    pub coalesced: u64,
}

#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Signalled when something becomes sendable.
    sendable: Notify,
    /// Signalled when entries leave (space, or empty for a flush).
    drained: Notify,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(DEFAULT_CAPACITY)
    }
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            sendable: Notify::new(),
            drained: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every mutation is
        // complete before any call that could panic), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a message. Events wait while the outbox is full; state never waits.
    pub async fn push(&self, msg: Message) {
        loop {
            let drained = self.drained.notified();
            if msg.retain || self.lock().entries.len() < self.capacity {
                break;
            }
            drained.await;
        }
        self.push_now(msg);
    }

    /// Queue a message without waiting (state, and the bridge's own status messages).
    pub fn push_now(&self, msg: Message) {
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let id = inner.next_id;
            inner.next_id += 1;
            if msg.retain {
                if let Some(old) = inner.newest_state.get(&msg.topic).copied()
                    && old >= inner.cursor
                    && inner.entries.remove(&old).is_some()
                {
                    inner.coalesced += 1;
                    dec(&mut inner.state_unacked, &msg.topic);
                }
                inner.newest_state.insert(msg.topic.clone(), id);
                *inner.state_unacked.entry(msg.topic.clone()).or_default() += 1;
            }
            inner.entries.insert(
                id,
                Entry {
                    msg,
                    queued_at: Instant::now(),
                },
            );
        }
        self.sendable.notify_one();
    }

    /// The next message to hand to the broker, in arrival order.
    pub fn take_next(&self) -> Option<(u64, Message)> {
        let mut g = self.lock();
        let (id, entry) = g.entries.range(g.cursor..).next()?;
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
                inner.acked += 1;
                if e.msg.retain {
                    dec(&mut inner.state_unacked, &e.msg.topic);
                    if inner.newest_state.get(&e.msg.topic) == Some(&id) {
                        inner.newest_state.remove(&e.msg.topic);
                    }
                    inner.retained_acked.insert(e.msg.topic, e.msg.payload);
                }
            }
        }
        self.drained.notify_waiters();
    }

    /// The broker session is gone: everything unacknowledged is sent again, in order, and
    /// retained state the broker may have lost with it is restored.
    pub fn rewind(&self) {
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let resent = inner.entries.range(..inner.cursor).count() as u64;
            inner.replayed += resent;
            inner.cursor = 0;
            let restore: Vec<(String, Bytes)> = inner
                .retained_acked
                .iter()
                .filter(|(t, _)| !inner.state_unacked.contains_key(*t))
                .map(|(t, p)| (t.clone(), p.clone()))
                .collect();
            for (topic, payload) in restore {
                let id = inner.next_id;
                inner.next_id += 1;
                inner.newest_state.insert(topic.clone(), id);
                *inner.state_unacked.entry(topic.clone()).or_default() += 1;
                inner.entries.insert(
                    id,
                    Entry {
                        msg: Message {
                            topic,
                            payload,
                            retain: true,
                        },
                        queued_at: Instant::now(),
                    },
                );
            }
        }
        self.sendable.notify_one();
    }

    pub fn has_unsent(&self) -> bool {
        let g = self.lock();
        g.entries.range(g.cursor..).next().is_some()
    }

    pub fn depth(&self) -> usize {
        self.lock().entries.len()
    }

    /// Resolves when there may be something to send.
    pub async fn sendable(&self) {
        self.sendable.notified().await;
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

    pub fn stats(&self) -> OutboxStats {
        let g = self.lock();
        OutboxStats {
            depth: g.entries.len(),
            unsent: g.entries.range(g.cursor..).count(),
            oldest_age_ms: g
                .entries
                .values()
                .next()
                .map(|e| e.queued_at.elapsed().as_millis() as u64)
                .unwrap_or(0),
            acked: g.acked,
            replayed: g.replayed,
            coalesced: g.coalesced,
        }
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

    #[test]
    fn order_ack_and_rewind() {
        let o = Outbox::new(10);
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
        let o = Outbox::new(10);
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
        let o = Outbox::new(10);
        o.push_now(st("s", "v1"));
        let (id, _) = o.take_next().unwrap();
        o.push_now(st("s", "v2"));
        assert_eq!(o.take_next().unwrap().1.payload, "v2");
        o.ack(id);
        assert_eq!(o.depth(), 1);
    }

    #[test]
    fn rewind_restores_acknowledged_retained_state() {
        let o = Outbox::new(10);
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
        let o = std::sync::Arc::new(Outbox::new(2));
        o.push(ev("e", "1")).await;
        o.push(ev("e", "2")).await;
        o.push(st("s", "x")).await; // state never waits
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(ev("e", "3")).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let (id, _) = o.take_next().unwrap();
        o.ack(id);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "2 of 2 still queued");
        let (id, _) = o.take_next().unwrap();
        o.ack(id);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.depth(), 2);
    }
}
