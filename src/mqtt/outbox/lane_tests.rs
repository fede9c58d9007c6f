//! The live lane: what is queued behind a backlog on a topic with nothing unsent goes
//! ahead of it, and per-topic order holds across both lanes, rewinds, restarts,
//! coalescing and dead letters.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::live_lane::{LIVE_MAX, topic_key};
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

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// `n` events on topics `a/0` .. `a/{topics - 1}` in turn, payloads `a{i}`, committed:
/// all but the first `RESIDENT_MAX` wait on disk only.
async fn backlog(o: &Outbox, n: usize, topics: usize) {
    {
        let _batch = o.batch();
        for i in 0..n {
            o.push_now(ev(&format!("a/{}", i % topics), &format!("a{i}")));
        }
    }
    o.committed().await;
    assert!(o.lock().spill_from.is_some(), "the backlog waits on disk");
}

/// The next message, waiting (with a deadline) for the disk.
async fn take(o: &Outbox) -> (u64, Message) {
    loop {
        let wake = o.sendable();
        if let Some(next) = o.take_next() {
            return next;
        }
        tokio::time::timeout(Duration::from_secs(5), wake)
            .await
            .expect("something to take");
    }
}

/// Take and acknowledge everything left, in the order handed out.
async fn drain(o: &Outbox) -> Vec<(u64, Message)> {
    let mut got = Vec::new();
    while o.depth() > 0 {
        let (id, m) = take(o).await;
        let g = o.lock();
        assert!(g.entries.len() <= RESIDENT_MAX && g.live.len() <= LIVE_MAX);
        drop(g);
        o.ack(id);
        got.push((id, m));
    }
    got
}

/// Every topic's messages were handed out in id order.
fn assert_per_topic_order(got: &[(u64, Message)]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (id, m) in got {
        if let Some(before) = last.insert(&m.topic, *id) {
            assert!(before < *id, "{} out of order: {before} then {id}", m.topic);
        }
    }
}

#[tokio::test]
async fn a_live_alarm_goes_ahead_of_a_backlog_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    backlog(&o, 100_000, 100).await;
    // The broker is back and takes the first of them; then an SOS is raised.
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(take(&o).await);
    }
    o.push(ev("b/sos", "live")).await;
    o.committed().await;
    let (sos, m) = take(&o).await;
    assert_eq!(
        (m.topic.as_str(), text(&m).as_str()),
        ("b/sos", "live"),
        "the next one handed out"
    );
    // The backlog goes on (its rows read back past the SOS's) while the SOS is in
    // flight: it is not handed out again.
    for (id, _) in &first {
        o.ack(*id);
    }
    let mut got = first;
    while o.depth() > 1 {
        let (id, m) = take(&o).await;
        assert_ne!(id, sos);
        o.ack(id);
        got.push((id, m));
    }
    o.ack(sos);
    assert_eq!(
        (got.len(), o.depth()),
        (100_000, 0),
        "nothing lost, nothing twice"
    );
    assert_per_topic_order(&got);
    o.close();
}

#[tokio::test]
async fn the_backlog_keeps_a_share_while_live_messages_keep_coming() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    backlog(&o, 3000, 10).await;
    for i in 0..200 {
        o.push(ev(&format!("live/{i}"), "x")).await;
    }
    o.committed().await;
    let mut live = 0;
    for _ in 0..180 {
        let (id, m) = take(&o).await;
        live += usize::from(m.topic.starts_with("live/"));
        o.ack(id);
    }
    assert_eq!(live, 160, "eight live messages to one of the backlog");
    o.close();
}

#[tokio::test]
async fn a_live_message_on_a_topic_with_backlog_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    backlog(&o, 5000, 10).await;
    o.push(ev("a/3", "late")).await;
    o.push(ev("b/sos", "live")).await;
    o.committed().await;
    assert_eq!(o.lock().live.len(), 1, "only b/sos is in the lane");
    let got = drain(&o).await;
    assert_eq!(
        got[0].1.topic, "b/sos",
        "a topic with no backlog goes first"
    );
    let a3: Vec<String> = got
        .iter()
        .filter(|(_, m)| m.topic == "a/3")
        .map(|(_, m)| text(m))
        .collect();
    assert_eq!(a3.len(), 501);
    assert_eq!(
        a3.last().map(String::as_str),
        Some("late"),
        "behind its topic"
    );
    assert_per_topic_order(&got);
    o.close();
}

#[tokio::test]
async fn after_a_rewind_a_live_message_waits_for_its_topic_resent() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    {
        let _batch = o.batch();
        for i in 0..5000 {
            let topic = if i == 10 { "b/sos" } else { "a/0" };
            o.push_now(ev(topic, &format!("m{i}")));
        }
    }
    o.committed().await;
    for _ in 0..20 {
        take(&o).await; // "m10" on b/sos among them, in flight
    }
    o.push(ev("b/sos", "live")).await;
    o.committed().await;
    assert_eq!(text(&take(&o).await.1), "live", "b/sos had nothing unsent");
    // The session is lost before anything is acknowledged: "m10" is unsent again.
    o.rewind();
    let got: Vec<String> = drain(&o).await.iter().map(|(_, m)| text(m)).collect();
    let at = |p: &str| got.iter().position(|g| g == p).unwrap();
    assert_eq!(at("m10"), 10, "the backlog is resent in arrival order");
    assert_eq!(
        at("live"),
        11,
        "right behind its topic's older message, not before"
    );
    assert_eq!(got.len(), 5001);
    o.close();
}

#[tokio::test]
async fn an_untaken_message_goes_before_anything_newer_on_its_topic() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    o.push(ev("x", "first")).await;
    backlog(&o, 3000, 10).await;
    let (id, m) = take(&o).await;
    assert_eq!(text(&m), "first");
    // It could not be handed over: x has something unsent again, so "late" joins the
    // backlog behind it instead of the live lane.
    o.untake(id);
    o.push(ev("x", "late")).await;
    o.committed().await;
    assert_eq!(o.lock().live.len(), 0);
    assert_eq!(take(&o).await.0, id, "sent again first");
    o.rewind();
    let got = drain(&o).await;
    let x: Vec<String> = got
        .iter()
        .filter(|(_, m)| m.topic == "x")
        .map(|(_, m)| text(m))
        .collect();
    assert_eq!(x, vec!["first", "late"]);
    assert_eq!(got.len(), 3002);
    o.close();
}

#[tokio::test]
async fn a_restart_keeps_every_message_and_the_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        backlog(&o, 5000, 10).await;
        o.push(ev("b/sos", "live1")).await;
        o.push(ev("b/sos", "live2")).await;
        o.push(ev("a/1", "late")).await;
        o.committed().await;
        let (id, m) = take(&o).await;
        assert_eq!(text(&m), "live1");
        o.ack(id);
        assert_eq!(text(&take(&o).await.1), "live2"); // in flight, never acknowledged
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(o.depth(), 5002);
    assert!(o.lock().live.len() == 0, "everything on disk is backlog");
    // The backlog's topics, counted on disk, hold back new messages on them.
    assert_eq!(o.lock().backlog_unsent.get(topic_key(b"a/1")), 501);
    o.push(ev("a/1", "after")).await;
    o.push(ev("c/sos", "new")).await;
    o.committed().await;
    let got = drain(&o).await;
    assert_eq!(
        text(&got[0].1),
        "new",
        "the live lane works after a restart"
    );
    let texts: Vec<String> = got.iter().map(|(_, m)| text(m)).collect();
    let at = |p: &str| texts.iter().position(|g| g == p).unwrap();
    assert_eq!(at("live2"), 5001, "from the last run: in arrival order");
    assert!(at("late") < at("after") && !texts.contains(&"live1".to_string()));
    assert_eq!(got.len(), 5004);
    assert_per_topic_order(&got);
    o.close();
}

#[tokio::test]
async fn state_behind_a_backlog_coalesces_into_the_live_lane() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    o.push(st("s/1", "v0")).await;
    backlog(&o, 3000, 10).await;
    // v0 waits unsent at the front; v1 supersedes it and, with nothing left unsent on
    // s/1, goes ahead of the backlog; v2 supersedes v1 in the lane.
    o.push(st("s/1", "v1")).await;
    o.push(st("s/1", "v2")).await;
    o.committed().await;
    assert_eq!(o.stats().coalesced, 2);
    let got = drain(&o).await;
    assert_eq!(text(&got[0].1), "v2");
    let states: Vec<String> = got
        .iter()
        .filter(|(_, m)| m.retain)
        .map(|(_, m)| text(m))
        .collect();
    assert_eq!(states, vec!["v2"], "superseded rows are never read back");
    assert_eq!(got.len(), 3001);
    o.close();
}

#[tokio::test]
async fn a_live_dead_letter_is_not_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    backlog(&o, 3000, 10).await;
    o.push(ev("b/big", "huge")).await;
    o.push(ev("b/big", "next")).await;
    o.committed().await;
    let (id, m) = take(&o).await;
    assert_eq!(text(&m), "huge");
    o.dead_letter(id, "too large");
    assert_eq!(text(&take(&o).await.1), "next", "the one behind it goes on");
    o.rewind();
    let got: Vec<String> = drain(&o).await.iter().map(|(_, m)| text(m)).collect();
    assert_eq!(got.len(), 3001);
    assert!(!got.contains(&"huge".to_string()));
    o.close();
}

#[tokio::test]
async fn a_full_lane_sends_the_rest_through_the_backlog_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    backlog(&o, 3000, 10).await;
    {
        let _batch = o.batch();
        for i in 0..LIVE_MAX + 50 {
            o.push_now(ev(&format!("live/{}", i % 100), &format!("l{i}")));
        }
    }
    o.committed().await;
    let spilled = o.lock().spilled;
    assert_eq!(
        (o.lock().live.len(), spilled),
        (LIVE_MAX, 3000 - RESIDENT_MAX + 50)
    );
    let got = drain(&o).await;
    assert_eq!(got.len(), 3000 + LIVE_MAX + 50);
    assert_per_topic_order(&got);
    o.close();
}

/// What the model knows of one topic's messages, by their sequence numbers on it.
#[derive(Default)]
struct Topic {
    /// Pushed, not handed out in this session, not acknowledged.
    unsent: BTreeSet<usize>,
    /// Acknowledged, dead letters, or (state) superseded by a newer value.
    done: HashSet<usize>,
    pushed: usize,
    /// The newest value acknowledged (state), which a rewind may restore.
    acked_state: Option<usize>,
}

/// A message in flight: its id, topic and sequence number (`None`: a restored value).
type Flying = (u64, String, Option<usize>);

#[derive(Default)]
struct Model {
    topics: BTreeMap<String, Topic>,
    in_flight: Vec<Flying>,
    /// Handed out ahead of an older unsent message (of another topic).
    overtook: usize,
    highest_taken: Option<u64>,
}

impl Model {
    fn push(&mut self, topic: &str) -> usize {
        let t = self.topics.entry(topic.to_string()).or_default();
        t.unsent.insert(t.pushed);
        t.pushed += 1;
        t.pushed - 1
    }

    /// `(id, msg)` was handed out: nothing older on its topic may be unsent (older unsent
    /// state is superseded: never handed out again), and it must not be in flight.
    fn took(&mut self, id: u64, msg: &Message) {
        let text = text(msg);
        let (_, seq) = text.split_once('#').unwrap();
        let seq: usize = seq.parse().unwrap();
        let t = self.topics.get_mut(&msg.topic).unwrap();
        if msg.retain && t.done.contains(&seq) {
            assert_eq!(t.acked_state, Some(seq), "superseded {text} handed out");
            self.in_flight.push((id, msg.topic.clone(), None));
            return;
        }
        assert!(t.unsent.remove(&seq), "{text} handed out twice");
        while let Some(&older) = t.unsent.first().filter(|older| **older < seq) {
            assert!(msg.retain, "{text} ahead of #{older} on its topic");
            t.unsent.remove(&older);
            t.done.insert(older);
        }
        self.in_flight.push((id, msg.topic.clone(), Some(seq)));
        if self.highest_taken.is_some_and(|h| h > id) {
            self.overtook += 1;
        }
        self.highest_taken = self.highest_taken.max(Some(id));
    }

    /// In-flight message `at` was given back.
    fn untook(&mut self, at: usize) {
        let (_, topic, seq) = self.in_flight.remove(at);
        if let Some(seq) = seq {
            self.topics.get_mut(&topic).unwrap().unsent.insert(seq);
        }
    }

    /// The oldest message in flight on the topic of in-flight message `at` was
    /// acknowledged (the broker acknowledges in order), or is a dead letter: its id.
    fn settle(&mut self, at: usize, acked: bool) -> u64 {
        let topic = &self.in_flight[at].1;
        let at = self.in_flight.iter().position(|f| f.1 == *topic).unwrap();
        let (id, topic, seq) = self.in_flight.remove(at);
        let t = self.topics.get_mut(&topic).unwrap();
        if let Some(seq) = seq {
            t.done.insert(seq);
        }
        if acked && topic.starts_with("s/") {
            t.acked_state = seq.or(t.acked_state);
        }
        id
    }

    /// The session is lost (or the process restarted): everything in flight is unsent.
    fn lost(&mut self) {
        for (_, topic, seq) in self.in_flight.drain(..) {
            if let Some(seq) = seq {
                self.topics.get_mut(&topic).unwrap().unsent.insert(seq);
            }
        }
        self.highest_taken = None;
    }
}

/// Random pushes (bursts that build a backlog on disk, events and state on a few topics),
/// takes, acknowledgements, dead letters, untakes, rewinds and restarts, from fixed seeds:
/// every topic's messages are handed out in order, none is lost (state: its newest value
/// arrives), none is handed out twice in one session.
#[tokio::test]
async fn random_interleavings_keep_per_topic_order_and_lose_nothing() {
    for seed in 0..4u64 {
        let mut r = StdRng::seed_from_u64(0x1a4e_0000 + seed);
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 30).unwrap();
        let mut model = Model::default();
        for _ in 0..1500 {
            match r.gen_range(0..100) {
                0..=2 => {
                    // A burst behind which a backlog builds up.
                    let _batch = o.batch();
                    for _ in 0..r.gen_range(100..1200) {
                        let topic = format!("a/{}", r.gen_range(0..8));
                        let seq = model.push(&topic);
                        o.push_now(ev(&topic, &format!("{topic}#{seq}")));
                    }
                }
                3..=29 => {
                    let (topic, retain) = match r.gen_range(0..10) {
                        0..=2 => (format!("a/{}", r.gen_range(0..8)), false),
                        3..=7 => (format!("live/{}", r.gen_range(0..30)), false),
                        _ => (format!("s/{}", r.gen_range(0..4)), true),
                    };
                    let seq = model.push(&topic);
                    let m = Message {
                        retain,
                        ..ev(&topic, &format!("{topic}#{seq}"))
                    };
                    o.push_now(m);
                }
                30..=69 => {
                    // Up to a publisher's window in flight.
                    for _ in 0..r.gen_range(1..80) {
                        if model.in_flight.len() >= 256 {
                            break;
                        }
                        let Some((id, m)) = o.take_next() else { break };
                        model.took(id, &m);
                    }
                }
                70..=89 => {
                    for _ in 0..r.gen_range(1..200) {
                        if model.in_flight.is_empty() {
                            break;
                        }
                        let dead = r.gen_range(0..50) == 0;
                        let id = model.settle(r.gen_range(0..model.in_flight.len()), !dead);
                        if dead {
                            o.dead_letter(id, "refused");
                        } else {
                            o.ack(id);
                        }
                    }
                }
                90..=92 => {
                    if let Some((id, m)) = o.take_next() {
                        // Handed out and given straight back, as the publisher does.
                        model.took(id, &m);
                        o.untake(id);
                        model.untook(model.in_flight.len() - 1);
                    }
                }
                93..=96 => {
                    o.rewind();
                    model.lost();
                }
                97 => {
                    o.committed().await;
                }
                98 => {
                    o.committed().await;
                    let closing = o.clone();
                    tokio::task::spawn_blocking(move || closing.close())
                        .await
                        .unwrap();
                    drop(o);
                    o = Outbox::open(dir.path(), 1 << 30).unwrap();
                    model.lost();
                }
                _ => {
                    o.committed().await;
                    tokio::task::yield_now().await;
                }
            }
            let g = o.lock();
            assert!(g.entries.len() <= RESIDENT_MAX && g.live.len() <= LIVE_MAX);
        }
        o.rewind();
        model.lost();
        while o.depth() > 0 {
            let (id, m) = take(&o).await;
            model.took(id, &m);
            o.ack(id);
        }
        for (topic, t) in &model.topics {
            assert!(
                t.unsent.is_empty(),
                "seed {seed}: {topic} lost {:?}",
                t.unsent
            );
        }

        assert!(
            model.overtook > 10,
            "seed {seed}: the live lane was exercised ({} overtakes)",
            model.overtook
        );
        o.close();
    }
}
