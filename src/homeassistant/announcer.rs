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
use crate::mqtt::publisher::Incoming;
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
        ghosts: HashSet::new(),
        snapshots_at_start,
    };
    if !inputs.cfg.enabled {
        a.remove_everything(&cancel).await;
        cancel.cancelled().await;
        return;
    }
    // Watching before the first look: no change between the two is missed.
    let mut changes = a.bvcsp.as_ref().map(|c| c.registry.watch_catalogue());
    a.refresh_known();
    a.start().await;
    let mut catalogue_due: Option<Instant> = None;
    let mut reannounce_due: Option<Instant> = None;
    let mut next_batch = Instant::now();
    let mut info_tick = tokio::time::interval(INFO_POLL);
    let mut status_open = true;
    loop {
        let pending = !a.queue.is_empty() || !a.removals.is_empty();
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
            let device_like = matches!(r.kind, RecordKind::Device | RecordKind::User);
            if device_like && self.current_shape(&r) && self.bvcsp.is_some() {
                self.ghosts.insert(r.topic);
            } else {
                self.removals.push_back(r.topic);
            }
        }
        self.record.extend(wanted);
        self.save().await;
        self.enqueue_all(true);
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
        self.refresh_known();
        let after = self.keys();
        let mut grew = false;
        for key in &after {
            for r in self.records_of(key) {
                self.ghosts.remove(&r.topic);
                if !self.record.contains_key(&r.topic) {
                    self.record.insert(r.topic.clone(), r);
                    grew = true;
                }
            }
        }
        if grew {
            self.save().await;
        }
        let after_set: HashSet<&Key> = after.iter().collect();
        for key in &before {
            if !after_set.contains(key) {
                let node = match key {
                    Key::Device(id) => self.builder.device_node(id),
                    Key::User(id) => self.builder.user_node(id),
                    _ => continue,
                };
                let topics: Vec<String> = self
                    .record
                    .values()
                    .filter(|r| r.node == node)
                    .map(|r| r.topic.clone())
                    .collect();
                info!(
                    "{node}: gone from the device list twice in a row; removing it from Home Assistant"
                );
                self.removals.extend(topics);
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
            self.removals.extend(self.ghosts.drain());
        }
    }

    /// Feed the next batch to the outbox if it has room; false if it had none.
    async fn feed(&mut self) -> bool {
        if self.outbox.depth() >= LOW_WATER {
            return false;
        }
        let mut pushed = 0;
        let mut removed = Vec::new();
        while pushed < BATCH
            && let Some(topic) = self.removals.pop_front()
        {
            self.sent.remove(&topic);
            self.outbox.push_now(removal(topic.clone()));
            removed.push(topic);
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
                self.outbox.push_now(m);
                pushed += 1;
            }
        }
        if !removed.is_empty() {
            // The removals are queued durably; only then may the record forget them.
            self.outbox.committed().await;
            for t in removed {
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
        self.removals = self.record.keys().cloned().collect();
        while !self.removals.is_empty() {
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
