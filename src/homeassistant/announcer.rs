//! The discovery life cycle: announce everything at start and again when Home Assistant
//! says `online` on its status topic, announce new devices as they appear, remove a
//! device gone from two complete device lists, and remove everything once disabled.
//!
//! Discovery goes through the outbox like every message (nothing is published before it
//! is on disk), but behind alarms: the outbox sends in arrival order, so announcements
//! are fed into it a small batch at a time, only while it holds fewer than `LOW_WATER`
//! messages, and at most `MAX_RATE` a second. An alarm therefore never waits behind more
//! than `LOW_WATER + BATCH` discovery messages, however large the fleet.
//!
//! What may be retained at the broker is recorded under `storage.dir`
//! (`homeassistant-discovery.json`) before it is sent, so a later run can remove what it
//! no longer announces: everything when `enabled` is switched off, a play box taken out
//! of the configuration, the other layout when `discovery` changes.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::entities::{Builder, Thing};
use super::layout::{DEVICE_COMPONENTS, Layout, USER_COMPONENTS, removal};
use crate::bvcsp::devices::{Kind, Known};
use crate::config::HomeAssistantConfig;
use crate::config::PlayboxConfig;
use crate::mqtt::publisher::incoming::Incoming;
use crate::mqtt::{Message, Outbox};

/// Discovery messages are fed to the outbox only while it holds fewer than this many.
pub const LOW_WATER: usize = 64;
/// Discovery messages fed at a time.
pub const BATCH: usize = 32;
/// At most this many discovery messages a second (10 000 devices: about 5 s).
pub const MAX_RATE: u32 = 2_000;
/// Home Assistant said `online`: announce after this pause, so it has subscribed.
pub const REANNOUNCE_DELAY: Duration = Duration::from_millis(1_000);
/// Catalogue changes closer together than this are handled together.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// While the outbox is over `LOW_WATER`, how often to look again.
const BACKLOG_POLL: Duration = Duration::from_millis(10);
/// How often the play boxes' self-descriptions are looked at for changes.
const INFO_POLL: Duration = Duration::from_secs(2);
const RECORD_FILE: &str = "homeassistant-discovery.json";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Bridge,
    Playbox(usize),
    Device(String),
    User(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordKind {
    Bridge,
    Playbox,
    Device,
    User,
}

/// One config topic that may hold a retained announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    topic: String,
    node: String,
    kind: RecordKind,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordFile {
    entries: Vec<Record>,
}

/// What the announcer works from.
pub struct Inputs {
    pub cfg: HomeAssistantConfig,
    pub builder: Builder,
    pub outbox: Arc<Outbox>,
    pub bvcsp: Option<Arc<crate::bvcsp::BvcspLink>>,
    pub playboxes: Vec<(PlayboxConfig, watch::Receiver<Option<Value>>)>,
    pub storage_dir: PathBuf,
    /// Messages on `status_topic`.
    pub status: mpsc::Receiver<Incoming>,
}

struct Announcer {
    layout: Layout,
    builder: Builder,
    outbox: Arc<Outbox>,
    bvcsp: Option<Arc<crate::bvcsp::BvcspLink>>,
    boxes: Vec<(PlayboxConfig, watch::Receiver<Option<Value>>)>,
    infos: Vec<Option<Value>>,
    path: PathBuf,
    known: HashMap<String, Known>,
    /// Topics that may hold an announcement at the broker (what the record file says).
    record: HashMap<String, Record>,
    /// The hash of what was last queued on each topic in this run.
    sent: HashMap<String, u64>,
    queue: VecDeque<Key>,
    /// Queued keys, and whether each must go out even if unchanged.
    queued: HashMap<Key, bool>,
    removals: VecDeque<String>,
    /// The topics in `removals` still to be removed: a topic announced again meanwhile
    /// is taken out of here, and skipped when its turn comes.
    removing: HashSet<String>,
    /// Removed topics the record file still lists.
    forget: HashSet<String>,
    /// Device topics an earlier run left, kept until two device lists have been read.
    ghosts: HashSet<String>,
    snapshots_at_start: u64,
}

fn hash_of(m: &Message) -> u64 {
    let mut h = DefaultHasher::new();
    m.payload.hash(&mut h);
    h.finish()
}

/// Run until `cancel`. With `enabled = false` this removes what an earlier run
/// announced, then waits.
pub async fn run(mut inputs: Inputs, cancel: CancellationToken) {
    let path = inputs.storage_dir.join(RECORD_FILE);
    let record = load_record(&path).await;
    let layout = Layout {
        prefix: inputs.cfg.discovery_prefix.clone(),
        mode: inputs.cfg.discovery,
    };
    let infos = inputs
        .playboxes
        .iter_mut()
        .map(|(_, rx)| rx.borrow_and_update().clone())
        .collect();
    let snapshots_at_start = inputs.bvcsp.as_ref().map_or(0, |c| {
        c.stats.snapshots.load(std::sync::atomic::Ordering::Relaxed)
    });
    let mut a = Announcer {
        layout,
        builder: inputs.builder,
        outbox: inputs.outbox,
        bvcsp: inputs.bvcsp,
        boxes: inputs.playboxes,
        infos,
        path,
        known: HashMap::new(),
        record,
        sent: HashMap::new(),
        queue: VecDeque::new(),
        queued: HashMap::new(),
        removals: VecDeque::new(),
        removing: HashSet::new(),
        forget: HashSet::new(),
        ghosts: HashSet::new(),
        snapshots_at_start,
    };
    if !inputs.cfg.enabled {
        a.remove_everything(&cancel).await;
        cancel.cancelled().await;
        return;
    }
    // Watching before the first look: no change between the two is missed.
    let mut changes = a.bvcsp.as_ref().map(|c| c.registry.watch_members());
    a.refresh_known();
    a.start().await;
    let mut catalogue_due: Option<Instant> = None;
    let mut reannounce_due: Option<Instant> = None;
    let mut next_batch = Instant::now();
    let mut info_tick = tokio::time::interval(INFO_POLL);
    let mut status_open = true;
    loop {
        let pending = !a.queue.is_empty() || !a.removing.is_empty();
        tokio::select! {
            _ = cancel.cancelled() => return,
            m = inputs.status.recv(), if status_open => match m {
                Some(m) if m.payload.trim_ascii() == b"online" => {
                    debug!("Home Assistant is online: announcing again in {REANNOUNCE_DELAY:?}");
                    reannounce_due.get_or_insert(Instant::now() + REANNOUNCE_DELAY);
                }
                Some(_) => {}
                None => status_open = false,
            },
            _ = async { sleep_until(reannounce_due.expect("guarded")).await }, if reannounce_due.is_some() => {
                reannounce_due = None;
                info!("Home Assistant restarted: announcing every device again");
                a.enqueue_all(true);
            }
            r = async { changes.as_mut().expect("guarded").changed().await }, if changes.is_some() => {
                if r.is_err() {
                    changes = None;
                } else {
                    catalogue_due.get_or_insert(Instant::now() + DEBOUNCE);
                }
            }
            _ = async { sleep_until(catalogue_due.expect("guarded")).await }, if catalogue_due.is_some() => {
                catalogue_due = None;
                a.catalogue_changed().await;
            }
            _ = info_tick.tick() => a.infos_changed(),
            _ = sleep_until(next_batch), if pending => {
                next_batch = match a.feed().await {
                    true => Instant::now() + Duration::from_secs(BATCH as u64) / MAX_RATE,
                    false => Instant::now() + BACKLOG_POLL,
                };
            }
        }
    }
}

impl Announcer {
    fn refresh_known(&mut self) {
        if let Some(ctx) = &self.bvcsp {
            self.known = ctx
                .registry
                .catalogue()
                .into_iter()
                .map(|k| (k.id.clone(), k))
                .collect();
        }
    }

    fn keys(&self) -> Vec<Key> {
        let mut keys = vec![Key::Bridge];
        keys.extend((0..self.boxes.len()).map(Key::Playbox));
        let mut ids: Vec<&Known> = self.known.values().collect();
        ids.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        keys.extend(ids.into_iter().map(|k| match k.kind {
            Kind::Device => Key::Device(k.id.clone()),
            Kind::User => Key::User(k.id.clone()),
        }));
        keys
    }

    fn thing(&self, key: &Key) -> Option<Thing> {
        match key {
            Key::Bridge => Some(self.builder.bridge(self.bvcsp.is_some())),
            Key::Playbox(i) => {
                let (cfg, _) = self.boxes.get(*i)?;
                Some(self.builder.playbox(cfg, self.infos[*i].as_ref()))
            }
            Key::Device(id) => self.known.get(id).map(|k| self.builder.device(k)),
            Key::User(id) => self.known.get(id).map(|k| self.builder.user(k)),
        }
    }

    fn records_of(&self, key: &Key) -> Vec<Record> {
        let Some(thing) = self.thing(key) else {
            return Vec::new();
        };
        let kind = match key {
            Key::Bridge => RecordKind::Bridge,
            Key::Playbox(_) => RecordKind::Playbox,
            Key::Device(_) => RecordKind::Device,
            Key::User(_) => RecordKind::User,
        };
        let mut topics = self.layout.topics(&thing);
        // A play box's retired components have topics of their own in component mode.
        if let Key::Playbox(_) = key {
            let retired: Vec<(&str, &str)> = thing.retired.to_vec();
            topics.extend(self.layout.topics_of(&thing.node, &retired));
            topics.dedup();
        }
        topics
            .into_iter()
            .map(|topic| Record {
                topic,
                node: thing.node.clone(),
                kind,
            })
            .collect()
    }

    /// Is `r` (left by an earlier run) laid out as this run would lay it out?
    fn current_shape(&self, r: &Record) -> bool {
        let components = match r.kind {
            RecordKind::Device => DEVICE_COMPONENTS,
            RecordKind::User => USER_COMPONENTS,
            _ => return false,
        };
        self.layout
            .topics_of(&r.node, components)
            .contains(&r.topic)
    }

    /// The first announcement: stale topics of an earlier run go (or wait, for devices
    /// not yet listed), everything current is recorded and announced.
    async fn start(&mut self) {
        let wanted: HashMap<String, Record> = self
            .keys()
            .iter()
            .flat_map(|k| self.records_of(k))
            .map(|r| (r.topic.clone(), r))
            .collect();
        let earlier: Vec<Record> = self.record.values().cloned().collect();
        for r in earlier {
            if wanted.contains_key(&r.topic) {
                continue;
            }
            let current = self.bvcsp.is_some() && self.current_shape(&r);
            match r.kind {
                RecordKind::Device if current => {
                    self.ghosts.insert(r.topic);
                }
                // Users are in no device list (only the online-status stream tells of
                // them, and only when their state changes): their absence says nothing,
                // so they stay until discovery is switched off or its layout changes.
                RecordKind::User if current => {}
                _ => self.remove(r.topic),
            }
        }
        self.record.extend(wanted);
        self.save().await;
        self.enqueue_all(true);
    }

    /// Queue the removal of `topic` (once, however often asked).
    fn remove(&mut self, topic: String) {
        if self.removing.insert(topic.clone()) {
            self.removals.push_back(topic);
        }
    }

    /// `topic` is wanted again: a removal still pending is dropped, and one already
    /// queued in the outbox (its announcement follows it there) must not make the record
    /// forget the topic.
    fn keep(&mut self, topic: &str) {
        self.removing.remove(topic);
        self.forget.remove(topic);
    }

    fn enqueue(&mut self, key: Key, force: bool) {
        match self.queued.get_mut(&key) {
            Some(f) => *f |= force,
            None => {
                self.queued.insert(key.clone(), force);
                self.queue.push_back(key);
            }
        }
    }

    fn enqueue_all(&mut self, force: bool) {
        for key in self.keys() {
            self.enqueue(key, force);
        }
    }

    fn infos_changed(&mut self) {
        for i in 0..self.boxes.len() {
            let rx = &mut self.boxes[i].1;
            if rx.has_changed().unwrap_or(false) {
                self.infos[i] = rx.borrow_and_update().clone();
                self.enqueue(Key::Playbox(i), false);
            }
        }
    }

    /// Devices came, changed or went: announce the new and changed ones (once they are
    /// recorded), remove the gone ones.
    async fn catalogue_changed(&mut self) {
        let before: HashSet<Key> = self.keys().into_iter().collect();
        let old = std::mem::take(&mut self.known);
        self.refresh_known();
        // Only what is new or described differently needs building (10 000 devices).
        let after: Vec<Key> = self
            .keys()
            .into_iter()
            .filter(|key| match key {
                Key::Device(id) | Key::User(id) => match (old.get(id), self.known.get(id)) {
                    (Some(o), Some(n)) => o.kind != n.kind || o.facts != n.facts,
                    _ => true,
                },
                _ => false,
            })
            .collect();
        let mut grew = false;
        for key in &after {
            for r in self.records_of(key) {
                self.ghosts.remove(&r.topic);
                self.keep(&r.topic);
                if !self.record.contains_key(&r.topic) {
                    self.record.insert(r.topic.clone(), r);
                    grew = true;
                }
            }
        }
        if grew {
            self.save().await;
        }
        let now: HashSet<Key> = self.keys().into_iter().collect();
        let gone: Vec<String> = before
            .iter()
            .filter(|key| !now.contains(key))
            .filter_map(|key| match key {
                Key::Device(id) => Some(self.builder.device_node(id)),
                Key::User(id) => Some(self.builder.user_node(id)),
                _ => None,
            })
            .collect();
        if !gone.is_empty() {
            // One pass over the record for all of them (a mass removal of 10 000).
            let mut by_node: HashMap<&str, Vec<String>> = HashMap::new();
            for r in self.record.values() {
                by_node.entry(&r.node).or_default().push(r.topic.clone());
            }
            let mut topics = Vec::new();
            for node in &gone {
                info!(
                    "{node}: gone from the device list twice in a row; removing it from Home Assistant"
                );
                topics.extend(by_node.remove(node.as_str()).unwrap_or_default());
            }
            for t in topics {
                self.remove(t);
            }
        }
        for key in after {
            self.enqueue(key, false);
        }
        let snapshots = self.bvcsp.as_ref().map_or(0, |c| {
            c.stats.snapshots.load(std::sync::atomic::Ordering::Relaxed)
        });
        if snapshots >= self.snapshots_at_start + 2 && !self.ghosts.is_empty() {
            info!(
                "{} devices announced by an earlier run are in no device list: removing them",
                self.ghosts.len()
            );
            for t in std::mem::take(&mut self.ghosts) {
                self.remove(t);
            }
        }
    }

    /// Feed the next batch to the outbox if it has room; false if it had none.
    async fn feed(&mut self) -> bool {
        if self.outbox.depth() >= LOW_WATER {
            return false;
        }
        let mut pushed = 0;
        while pushed < BATCH
            && let Some(topic) = self.removals.pop_front()
        {
            if !self.removing.remove(&topic) {
                continue; // wanted again meanwhile
            }
            self.sent.remove(&topic);
            self.outbox.push_now(removal(topic.clone()));
            self.forget.insert(topic);
            pushed += 1;
        }
        while pushed < BATCH
            && let Some(key) = self.queue.pop_front()
        {
            let force = self.queued.remove(&key).unwrap_or(false);
            let Some(thing) = self.thing(&key) else {
                continue;
            };
            for m in self.layout.announce(&thing) {
                if !self.record.contains_key(&m.topic) && !m.payload.is_empty() {
                    // Not recorded yet (it appeared after the last save): next round.
                    warn!("discovery topic {} not recorded; skipped", m.topic);
                    continue;
                }
                let h = hash_of(&m);
                if !force && self.sent.get(&m.topic) == Some(&h) {
                    continue;
                }
                self.sent.insert(m.topic.clone(), h);
                if !m.payload.is_empty() {
                    self.keep(&m.topic);
                }
                self.outbox.push_now(m);
                pushed += 1;
            }
        }
        // Rewriting the record for every batch of a mass removal would rewrite a file
        // of every device hundreds of times: once the removals are done, or every 1 000.
        if !self.forget.is_empty() && (self.removing.is_empty() || self.forget.len() >= 1_000) {
            // The removals are queued durably; only then may the record forget them.
            self.outbox.committed().await;
            for t in std::mem::take(&mut self.forget) {
                self.record.remove(&t);
            }
            self.save().await;
        }
        true
    }

    /// `enabled = false`: remove everything an earlier run announced.
    async fn remove_everything(&mut self, cancel: &CancellationToken) {
        if self.record.is_empty() {
            return;
        }
        info!(
            "homeassistant.enabled = false: removing {} discovery topics announced earlier",
            self.record.len()
        );
        let topics: Vec<String> = self.record.keys().cloned().collect();
        for t in topics {
            self.remove(t);
        }
        while !self.removing.is_empty() {
            if !self.feed().await {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(BACKLOG_POLL) => {}
                }
            }
        }
    }

    async fn save(&self) {
        let entries: Vec<Record> = {
            let mut v: Vec<Record> = self.record.values().cloned().collect();
            v.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
            v
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            if entries.is_empty() {
                return match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let bytes = serde_json::to_vec(&RecordFile { entries }).unwrap_or_default();
            crate::storage::write_atomic(&path, &bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(
                "cannot record the Home Assistant discovery topics in {}: {e}; \
                 a later run may not remove them",
                self.path.display()
            ),
            Err(e) => warn!("recording the discovery topics failed: {e}"),
        }
    }
}

async fn load_record(path: &std::path::Path) -> HashMap<String, Record> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&p)).await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Ok(Err(e)) => {
            warn!("cannot read {}: {e}", path.display());
            return HashMap::new();
        }
        Err(_) => return HashMap::new(),
    };
    match serde_json::from_slice::<RecordFile>(&bytes) {
        Ok(f) => f
            .entries
            .into_iter()
            .map(|r| (r.topic.clone(), r))
            .collect(),
        Err(e) => {
            warn!(
                "{} is not readable ({e}); starting a new one",
                path.display()
            );
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::homeassistant::entities::Builder;
    use crate::mqtt::Topics;

    fn boxes(n: usize) -> Vec<(PlayboxConfig, watch::Receiver<Option<Value>>)> {
        let mut toml = String::new();
        for i in 0..n {
            toml.push_str(&format!(
                "[[playbox]]\nname = \"box{i}\"\nurl = \"https://10.0.0.{}:16674\"\nsn = \"SN{i}\"\npassword = \"p\"\n",
                i % 250 + 1
            ));
        }
        if n == 0 {
            return Vec::new();
        }
        let cfg = crate::config::from_toml(&toml).expect("valid");
        cfg.playbox
            .into_iter()
            .map(|p| (p, watch::channel(None).1))
            .collect()
    }

    fn announcer(n: usize, dir: &std::path::Path, mode: super::super::DiscoveryMode) -> Announcer {
        let boxes = boxes(n);
        Announcer {
            layout: Layout {
                prefix: "homeassistant".into(),
                mode,
            },
            builder: Builder::new(Topics::new("bvcsp2mqtt"), 1),
            outbox: Arc::new(Outbox::memory(1 << 30)),
            bvcsp: None,
            infos: vec![None; boxes.len()],
            boxes,
            path: dir.join(RECORD_FILE),
            known: HashMap::new(),
            record: HashMap::new(),
            sent: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashMap::new(),
            removals: VecDeque::new(),
            removing: HashSet::new(),
            forget: HashSet::new(),
            ghosts: HashSet::new(),
            snapshots_at_start: 0,
        }
    }

    /// An announcer over a BVCSP context whose registry the test feeds by hand.
    fn with_bvcsp(dir: &std::path::Path) -> (Announcer, Arc<crate::bvcsp::BvcspLink>) {
        let cfg = crate::config::from_toml(
            "[bvcsp]\nurl = \"http://127.0.0.1:9\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .expect("valid");
        let mut a = announcer(0, dir, super::super::DiscoveryMode::Device);
        let (ctx, _relogin) = crate::bvcsp::BvcspLink::new(
            Arc::new(cfg.bvcsp.expect("bvcsp")),
            dir,
            a.outbox.clone(),
            Topics::new("bvcsp2mqtt"),
            Arc::default(),
            Arc::default(),
        )
        .expect("context");
        a.bvcsp = Some(ctx.clone());
        (a, ctx)
    }

    /// One complete device list, as the session reads it.
    fn device_list(ctx: &crate::bvcsp::BvcspLink, ids: &[&str]) {
        ctx.registry.snapshot_begin();
        for id in ids {
            ctx.registry.listed(id, true, Default::default());
        }
        ctx.stats
            .snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.registry.listing_complete();
    }

    /// Feed until nothing is pending; everything the broker got, acknowledged.
    async fn settle(a: &mut Announcer) -> Vec<Message> {
        let mut out = Vec::new();
        while !a.queue.is_empty() || !a.removing.is_empty() {
            a.feed().await;
            out.extend(drain(&a.outbox));
        }
        out
    }

    fn emptied(msgs: &[Message], node: &str) -> bool {
        msgs.iter().any(|m| {
            m.topic == format!("homeassistant/device/{node}/config") && m.payload.is_empty()
        })
    }

    #[tokio::test]
    async fn after_a_restart_users_are_kept_and_gone_devices_removed_by_a_steady_fleet() {
        let dir = tempfile::tempdir().unwrap();
        // The first run: two devices and a user.
        let (mut first, ctx) = with_bvcsp(dir.path());
        first.start().await;
        device_list(&ctx, &["PU_1", "PU_2"]);
        ctx.registry.user_update("CU_ops", true);
        first.catalogue_changed().await;
        let msgs = settle(&mut first).await;
        for node in [
            "bvcsp2mqtt_PU_1",
            "bvcsp2mqtt_PU_2",
            "bvcsp2mqtt_user_CU_ops",
        ] {
            let topic = format!("homeassistant/device/{node}/config");
            assert!(
                msgs.iter()
                    .any(|m| m.topic == topic && !m.payload.is_empty()),
                "{node}"
            );
        }
        // The next run: PU_2 has gone meanwhile, the user says nothing (its state has not
        // changed), and the fleet is steady: the same list twice.
        let (mut next, ctx) = with_bvcsp(dir.path());
        next.record = load_record(&next.path).await;
        next.start().await;
        settle(&mut next).await;
        let mut msgs = Vec::new();
        for _ in 0..2 {
            device_list(&ctx, &["PU_1"]);
            next.catalogue_changed().await;
            msgs.extend(settle(&mut next).await);
        }
        assert!(
            emptied(&msgs, "bvcsp2mqtt_PU_2"),
            "gone from two lists: removed"
        );
        assert!(
            !emptied(&msgs, "bvcsp2mqtt_user_CU_ops"),
            "a user is in no list: kept"
        );
        assert!(!emptied(&msgs, "bvcsp2mqtt_PU_1"));
        let left = load_record(&next.path).await;
        assert!(left.contains_key("homeassistant/device/bvcsp2mqtt_user_CU_ops/config"));
        assert!(!left.contains_key("homeassistant/device/bvcsp2mqtt_PU_2/config"));
        // Switched off, the user goes too.
        let mut off = announcer(0, dir.path(), super::super::DiscoveryMode::Device);
        off.record = load_record(&off.path).await;
        off.remove_everything(&CancellationToken::new()).await;
        assert!(emptied(&drain(&off.outbox), "bvcsp2mqtt_user_CU_ops"));
    }

    #[tokio::test]
    async fn a_device_dropped_and_heard_again_before_the_feed_stays_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, ctx) = with_bvcsp(dir.path());
        a.start().await;
        device_list(&ctx, &["PU_1", "PU_2"]);
        a.catalogue_changed().await;
        settle(&mut a).await;
        let topic = "homeassistant/device/bvcsp2mqtt_PU_2/config";
        // Gone from two lists, then heard on the stream, all before the next feed.
        device_list(&ctx, &["PU_1"]);
        device_list(&ctx, &["PU_1"]);
        a.catalogue_changed().await;
        assert!(a.removing.contains(topic));
        ctx.registry.stream_update("PU_2", true);
        a.catalogue_changed().await;
        let msgs = settle(&mut a).await;
        assert!(
            !msgs
                .iter()
                .any(|m| m.topic == topic && m.payload.is_empty()),
            "the pending removal was dropped (the broker still has the config)"
        );
        assert!(a.record.contains_key(topic), "and recorded");
        assert!(load_record(&a.path).await.contains_key(topic));
        // A removal already in the outbox, then the device back before the record is
        // rewritten: the announcement follows the removal, and the record keeps it.
        device_list(&ctx, &["PU_1"]);
        device_list(&ctx, &["PU_1"]);
        a.catalogue_changed().await;
        // More removals than one batch: the record is rewritten only once they are done.
        for i in 0..BATCH + 8 {
            a.remove(format!("homeassistant/device/bvcsp2mqtt_old_{i}/config"));
        }
        a.feed().await;
        assert!(a.forget.contains(topic), "its removal is in the outbox");
        ctx.registry.stream_update("PU_2", true);
        a.catalogue_changed().await;
        let msgs = settle(&mut a).await;
        assert!(
            msgs.iter()
                .rev()
                .find(|m| m.topic == topic)
                .is_some_and(|m| !m.payload.is_empty())
        );
        assert!(load_record(&a.path).await.contains_key(topic));
    }

    #[tokio::test]
    async fn a_mass_removal_removes_every_gone_device_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, ctx) = with_bvcsp(dir.path());
        a.start().await;
        let ids: Vec<String> = (0..3_000).map(|i| format!("PU_{i:05}")).collect();
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        device_list(&ctx, &all);
        ctx.registry.user_update("CU_ops", true);
        a.catalogue_changed().await;
        settle(&mut a).await;
        device_list(&ctx, &all[..1]);
        device_list(&ctx, &all[..1]);
        a.catalogue_changed().await;
        // (One pass over the record for all of them: see catalogue_changed.)
        assert_eq!(a.removing.len(), 2_999);
        let msgs = settle(&mut a).await;
        assert_eq!(msgs.iter().filter(|m| m.payload.is_empty()).count(), 2_999);
        let left = load_record(&a.path).await;
        let mut nodes: Vec<&str> = left.values().map(|r| r.node.as_str()).collect();
        nodes.sort_unstable();
        assert_eq!(
            nodes,
            [
                "bvcsp2mqtt_PU_00000",
                "bvcsp2mqtt_bridge",
                "bvcsp2mqtt_user_CU_ops"
            ]
        );
    }

    /// Take and acknowledge everything queued, as a broker would.
    fn drain(outbox: &Outbox) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some((id, m)) = outbox.take_next() {
            outbox.ack(id);
            out.push(m);
        }
        out
    }

    #[tokio::test]
    async fn announcements_are_fed_only_while_the_outbox_is_nearly_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = announcer(300, dir.path(), super::super::DiscoveryMode::Device);
        a.start().await;
        let mut sent = 0;
        let mut refusals = 0;
        while !a.queue.is_empty() {
            if a.feed().await {
                assert!(a.outbox.depth() < LOW_WATER + BATCH, "{}", a.outbox.depth());
            } else {
                refusals += 1;
                sent += drain(&a.outbox).len();
            }
        }
        sent += drain(&a.outbox).len();
        assert_eq!(sent, 301, "every box and the bridge, once");
        assert!(
            refusals >= 300 / (LOW_WATER + BATCH),
            "it waited for the outbox"
        );
        // An alarm queued now has at most LOW_WATER + BATCH announcements before it.
    }

    #[tokio::test]
    async fn what_an_earlier_run_announced_and_is_no_longer_wanted_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = [
            (
                "homeassistant/device/bvcsp2mqtt_playbox_gone/config",
                "bvcsp2mqtt_playbox_gone",
                RecordKind::Playbox,
            ),
            (
                "homeassistant/binary_sensor/bvcsp2mqtt_box0/connectivity/config",
                "bvcsp2mqtt_box0",
                RecordKind::Playbox,
            ),
            (
                "homeassistant/device/bvcsp2mqtt_PU_1/config",
                "bvcsp2mqtt_PU_1",
                RecordKind::Device,
            ),
        ];
        let file = RecordFile {
            entries: stale
                .iter()
                .map(|(t, n, k)| Record {
                    topic: t.to_string(),
                    node: n.to_string(),
                    kind: *k,
                })
                .collect(),
        };
        std::fs::write(
            dir.path().join(RECORD_FILE),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let mut a = announcer(1, dir.path(), super::super::DiscoveryMode::Device);
        a.record = load_record(&a.path).await;
        a.start().await;
        while a.feed().await && (!a.queue.is_empty() || !a.removals.is_empty()) {}
        let msgs = drain(&a.outbox);
        for (t, _, _) in stale {
            assert!(
                msgs.iter()
                    .any(|m| m.topic == t && m.payload.is_empty() && m.retain),
                "{t}"
            );
        }
        assert!(msgs.iter().any(|m| m.topic
            == "homeassistant/device/bvcsp2mqtt_playbox_box0/config"
            && !m.payload.is_empty()));
        let left = load_record(&a.path).await;
        let mut topics: Vec<&String> = left.keys().collect();
        topics.sort();
        assert_eq!(
            topics,
            [
                "homeassistant/device/bvcsp2mqtt_bridge/config",
                "homeassistant/device/bvcsp2mqtt_playbox_box0/config"
            ]
        );
        // Switched off: everything goes, and the record with it.
        let mut off = announcer(1, dir.path(), super::super::DiscoveryMode::Device);
        off.record = load_record(&off.path).await;
        off.remove_everything(&CancellationToken::new()).await;
        let msgs = drain(&off.outbox);
        assert_eq!(msgs.len(), 2);
        assert!(msgs.iter().all(|m| m.payload.is_empty() && m.retain));
        assert!(!off.path.exists());
    }

    #[tokio::test(start_paused = true)]
    async fn online_on_the_status_topic_announces_again_after_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::memory(1 << 30));
        let (tx, status) = mpsc::channel(4);
        let inputs = Inputs {
            cfg: HomeAssistantConfig {
                enabled: true,
                ..HomeAssistantConfig::default()
            },
            builder: Builder::new(Topics::new("bvcsp2mqtt"), 1),
            outbox: outbox.clone(),
            bvcsp: None,
            playboxes: boxes(3),
            storage_dir: dir.path().to_path_buf(),
            status,
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(inputs, cancel.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            drain(&outbox).len(),
            4,
            "the bridge and three boxes at start"
        );
        let incoming = |payload: &'static str| Incoming {
            topic: "homeassistant/status".into(),
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            retain: false,
            size: payload.len(),
        };
        tx.send(incoming("offline")).await.unwrap();
        tx.send(incoming(" online\n")).await.unwrap();
        tokio::time::sleep(REANNOUNCE_DELAY - Duration::from_millis(100)).await;
        assert!(drain(&outbox).is_empty(), "not before the pause");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = drain(&outbox);
        assert_eq!(again.len(), 4, "everything again, unchanged or not");
        // Two `online`s close together are one announcement.
        tx.send(incoming("online")).await.unwrap();
        tx.send(incoming("online")).await.unwrap();
        tokio::time::sleep(REANNOUNCE_DELAY * 2).await;
        assert_eq!(drain(&outbox).len(), 4);
        cancel.cancel();
        task.await.unwrap();
    }
}
