//! What the bridge knows of devices: their availability and where it came from, so that
//! a snapshot never overwrites a newer change seen on the online-status stream, and the
//! set of ids the GPS stream must subscribe to.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::warn;

/// The most devices the bridge keeps track of. Beyond it, events of new devices still
/// flow, but the bridge does not remember them (no GPS subscription, no snapshot
/// ordering): a server inventing ids cannot grow memory without bound.
pub const MAX_DEVICES: usize = 100_000;

/// What is known of each device, and the order of the stream's updates.
#[derive(Debug, Default)]
struct DeviceTable {
    /// id -> (online, sequence number of the last stream update)
    devices: HashMap<String, (bool, u64)>,
    seq: u64,
}

#[derive(Debug)]
pub struct Registry {
    table: Mutex<DeviceTable>,
    /// What is known of each device and user, for Home Assistant and `bridge/devices`.
    catalogue: Mutex<Catalogue>,
    /// Bumped whenever the catalogue changes (online, last seen, membership, facts).
    catalogue_changed: watch::Sender<u64>,
    /// Bumped only when a device or user appears or goes, or its facts change.
    members_changed: watch::Sender<u64>,
    /// Number of distinct devices known; changes whenever a new one appears.
    added: watch::Sender<usize>,
    /// Updates of devices past [`MAX_DEVICES`], not remembered.
    over_cap: Arc<AtomicU64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            table: Mutex::default(),
            catalogue: Mutex::default(),
            catalogue_changed: watch::channel(0).0,
            members_changed: watch::channel(0).0,
            added: watch::channel(0).0,
            over_cap: Arc::default(),
        }
    }
}

impl Registry {
    /// A registry that counts updates past the cap into `over_cap` (the health report's).
    pub fn counting(over_cap: Arc<AtomicU64>) -> Registry {
        Registry {
            over_cap,
            ..Registry::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an update of a device that is not kept; logs the first and every 10 000th.
    fn refused(&self) {
        let n = self.over_cap.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(10_000) {
            warn!(
                "more than {MAX_DEVICES} devices: updates of new ones are published but not \
                 tracked ({} so far)",
                n + 1
            );
        }
    }

    /// Updates of devices past the cap so far.
    pub fn over_cap(&self) -> u64 {
        self.over_cap.load(Ordering::Relaxed)
    }

    /// A frame on the online-status stream: always authoritative.
    pub fn stream_update(&self, id: &str, online: bool) {
        let count = {
            let mut g = self.lock();
            g.seq += 1;
            let seq = g.seq;
            if let Some(entry) = g.devices.get_mut(id) {
                *entry = (online, seq);
                None
            } else if g.devices.len() >= MAX_DEVICES {
                drop(g);
                self.refused();
                None
            } else {
                g.devices.insert(id.to_string(), (online, seq));
                Some(g.devices.len())
            }
        };
        if let Some(n) = count {
            self.added.send_replace(n);
        }
        self.catalogue_update(|c| c.heard(id, online, Kind::Device));
    }

    /// A user (CU terminal) on the online-status stream.
    pub fn user_update(&self, id: &str, online: bool) {
        self.catalogue_update(|c| c.heard(id, online, Kind::User));
    }

    /// One record of the device list being read (see [`Registry::listing_complete`]).
    pub fn listed(&self, id: &str, online: bool, facts: DeviceFacts) {
        self.catalogue_update(|c| c.listed(id, online, facts));
    }

    /// The device list was read to its end: a device missing from it twice in a row (and
    /// not heard of on the stream meanwhile) is forgotten.
    pub fn listing_complete(&self) {
        self.catalogue_update(Catalogue::complete);
    }

    /// Every known device and user, sorted by id.
    pub fn catalogue(&self) -> Vec<Known> {
        self.with_catalogue(|known| known.iter().map(|&k| k.clone()).collect())
    }

    /// `f` over every known device and user, in id order, under the catalogue's lock:
    /// nothing is copied (the list may be 10 000 long and is read every few seconds).
    pub fn with_catalogue<R>(&self, f: impl FnOnce(&[&Known]) -> R) -> R {
        let c = self.catalogue.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<&Known> = c.known.values().collect();
        v.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        f(&v)
    }

    /// Changes whenever the catalogue does.
    pub fn watch_catalogue(&self) -> watch::Receiver<u64> {
        self.catalogue_changed.subscribe()
    }

    /// Changes only when a device or user appears or goes, or what is known of it (its
    /// name, maker, versions) changes: not on every online/offline.
    pub fn watch_members(&self) -> watch::Receiver<u64> {
        self.members_changed.subscribe()
    }

    fn catalogue_update(&self, f: impl FnOnce(&mut Catalogue) -> Change) {
        let change = f(&mut self.catalogue.lock().unwrap_or_else(|p| p.into_inner()));
        if change != Change::None {
            self.catalogue_changed.send_modify(|n| *n += 1);
        }
        if change == Change::Members {
            self.members_changed.send_modify(|n| *n += 1);
        }
    }

    /// Mark the start of a snapshot; pass the result to `snapshot_update`.
    pub fn snapshot_begin(&self) -> u64 {
        {
            let mut c = self.catalogue.lock().unwrap_or_else(|p| p.into_inner());
            c.listing.clear();
            c.listing_cut = false;
        }
        self.lock().seq
    }

    /// A record from a snapshot begun at `begin`. False when the stream has said something
    /// newer about this device, in which case the record must not be published.
    pub fn snapshot_update(&self, id: &str, online: bool, begin: u64) -> bool {
        let (apply, count) = {
            let mut g = self.lock();
            let full = g.devices.len() >= MAX_DEVICES;
            match g.devices.get_mut(id) {
                Some((_, seq)) if *seq > begin => (false, None),
                Some(entry) => {
                    entry.0 = online;
                    (true, None)
                }
                None if full => (true, Some(None)),
                None => {
                    g.devices.insert(id.to_string(), (online, 0));
                    (true, Some(Some(g.devices.len())))
                }
            }
        };
        let count = match count {
            Some(None) => {
                self.refused();
                None
            }
            other => other.flatten(),
        };
        if let Some(n) = count {
            self.added.send_replace(n);
        }
        apply
    }

    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().devices.keys().cloned().collect();
        v.sort_unstable();
        v
    }

    /// Changes whenever a device not seen before appears.
    pub fn watch_added(&self) -> watch::Receiver<usize> {
        self.added.subscribe()
    }
}

/// What the device list says of a device, beyond its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub name: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub sw_version: Option<String>,
    pub hw_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device (PU): a camera, helmet, vehicle unit.
    Device,
    /// A user (CU terminal), known from the online-status stream only.
    User,
}

/// A device or user the bridge knows of.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub id: String,
    pub kind: Kind,
    pub facts: DeviceFacts,
    pub online: bool,
    /// When the bridge last heard that it was online.
    pub last_seen: Option<SystemTime>,
}

/// What a catalogue update changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    None,
    /// Online or last seen.
    State,
    /// Who is known, or what is known of them.
    Members,
}

#[derive(Debug, Default)]
struct Catalogue {
    known: HashMap<String, Known>,
    /// Complete device lists in a row a device has been missing from.
    missed: HashMap<String, u8>,
    /// Devices in the device list being read.
    listing: HashSet<String>,
    /// The list being read went past [`MAX_DEVICES`]: it cannot tell who is gone.
    listing_cut: bool,
}

impl Catalogue {
    fn entry(&mut self, id: &str, kind: Kind) -> Option<&mut Known> {
        if !self.known.contains_key(id) {
            if self.known.len() >= MAX_DEVICES {
                return None;
            }
            self.known.insert(
                id.to_string(),
                Known {
                    id: id.to_string(),
                    kind,
                    facts: DeviceFacts::default(),
                    online: false,
                    last_seen: None,
                },
            );
        }
        self.known.get_mut(id)
    }

    fn heard(&mut self, id: &str, online: bool, kind: Kind) -> Change {
        if kind == Kind::Device {
            self.missed.remove(id);
        }
        let new = !self.known.contains_key(id);
        let Some(k) = self.entry(id, kind) else {
            return Change::None;
        };
        let state = k.online != online || online;
        k.online = online;
        if online {
            k.last_seen = Some(SystemTime::now());
        }
        match (new, state) {
            (true, _) => Change::Members,
            (false, true) => Change::State,
            (false, false) => Change::None,
        }
    }

    fn listed(&mut self, id: &str, online: bool, facts: DeviceFacts) -> Change {
        if self.listing.len() >= MAX_DEVICES {
            self.listing_cut = true;
            return Change::None;
        }
        self.listing.insert(id.to_string());
        let new = !self.known.contains_key(id);
        let Some(k) = self.entry(id, Kind::Device) else {
            return Change::None;
        };
        let members = new || k.facts != facts || k.kind != Kind::Device;
        let state = k.online != online || online;
        k.kind = Kind::Device;
        k.facts = facts;
        k.online = online;
        if online {
            k.last_seen = Some(SystemTime::now());
        }
        match (members, state) {
            (true, _) => Change::Members,
            (false, true) => Change::State,
            (false, false) => Change::None,
        }
    }

    fn complete(&mut self) -> Change {
        let listing = std::mem::take(&mut self.listing);
        if std::mem::take(&mut self.listing_cut) {
            return Change::None;
        }
        for id in &listing {
            self.missed.remove(id);
        }
        let absent: Vec<String> = self
            .known
            .values()
            .filter(|k| k.kind == Kind::Device && !listing.contains(&k.id))
            .map(|k| k.id.clone())
            .collect();
        // A complete list is news for membership even when nobody came or went: it is
        // what tells who is gone (here, and to anyone who remembers more).
        let change = Change::Members;
        for id in absent {
            let n = self.missed.entry(id.clone()).or_default();
            *n += 1;
            if *n >= 2 {
                self.missed.remove(&id);
                self.known.remove(&id);
            }
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: &Registry) -> Vec<String> {
        r.catalogue().into_iter().map(|k| k.id).collect()
    }

    #[test]
    fn a_device_missing_from_two_complete_lists_is_forgotten() {
        let r = Registry::default();
        let mut changes = r.watch_catalogue();
        let mut members = r.watch_members();
        let facts = DeviceFacts {
            name: Some("Helmet".into()),
            ..DeviceFacts::default()
        };
        r.listed("a", true, facts.clone());
        r.listed("b", false, DeviceFacts::default());
        r.listing_complete();
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(ids(&r), vec!["a", "b"]);
        assert_eq!(r.catalogue()[0].facts, facts);
        assert!(members.has_changed().unwrap());
        members.borrow_and_update();
        r.listed("a", true, facts.clone());
        r.listing_complete();
        assert_eq!(ids(&r), vec!["a", "b"], "missing once: kept");
        assert!(members.has_changed().unwrap(), "a complete list is news");
        members.borrow_and_update();
        r.listed("a", true, facts.clone());
        assert!(
            !members.has_changed().unwrap(),
            "a known record: no member change"
        );
        changes.borrow_and_update();
        r.stream_update("a", false);
        assert!(changes.has_changed().unwrap(), "online changed");
        assert!(
            !members.has_changed().unwrap(),
            "online is no member change"
        );
        // A list that failed half-way and was begun again: only the complete one counts.
        r.snapshot_begin();
        r.listed("b", false, DeviceFacts::default());
        r.snapshot_begin();
        r.listed("a", true, facts.clone());
        r.listing_complete();
        assert_eq!(ids(&r), vec!["a"], "missing twice in a row: gone");
        assert!(changes.has_changed().unwrap());
        // Heard on the stream in between: the count starts over.
        r.listed("c", true, DeviceFacts::default());
        r.listing_complete();
        r.listing_complete();
        r.stream_update("c", true);
        r.listing_complete();
        assert!(ids(&r).contains(&"c".to_string()));
        r.listing_complete();
        assert!(!ids(&r).contains(&"c".to_string()));
        // Users come from the stream only and are never listed: never forgotten.
        r.user_update("CU_1", true);
        r.listing_complete();
        r.listing_complete();
        assert_eq!(ids(&r), vec!["CU_1"]);
        assert_eq!(r.catalogue()[0].kind, Kind::User);
    }

    #[test]
    fn snapshot_does_not_override_newer_stream_state() {
        let r = Registry::default();
        assert!(r.snapshot_update("a", true, r.snapshot_begin()));
        let begin = r.snapshot_begin();
        r.stream_update("a", false);
        assert!(!r.snapshot_update("a", true, begin), "stream news is newer");
        assert!(r.snapshot_update("b", false, begin));
        assert!(
            r.snapshot_update("a", true, r.snapshot_begin()),
            "a later snapshot applies"
        );
        assert_eq!(r.ids(), vec!["a", "b"]);
    }

    #[test]
    fn the_registry_is_bounded_and_known_devices_still_update() {
        let r = Registry::default();
        for i in 0..MAX_DEVICES {
            r.stream_update(&format!("d{i}"), true);
        }
        r.stream_update("new", true);
        assert!(
            r.snapshot_update("new2", true, r.snapshot_begin()),
            "still published"
        );
        assert_eq!(r.ids().len(), MAX_DEVICES);
        assert_eq!(r.over_cap(), 2);
        let begin = r.snapshot_begin();
        r.stream_update("d7", false);
        assert!(
            !r.snapshot_update("d7", true, begin),
            "known ones keep their order"
        );
    }
}
