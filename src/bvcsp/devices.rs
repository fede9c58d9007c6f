//! What the bridge knows of devices: their availability and where it came from, so that
//! a snapshot never overwrites a newer change seen on the online-status stream, and the
//! set of ids the GPS stream must subscribe to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Number of distinct devices known; changes whenever a new one appears.
    added: watch::Sender<usize>,
    /// Updates of devices past [`MAX_DEVICES`], not remembered.
    over_cap: Arc<AtomicU64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            table: Mutex::default(),
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
    }

    /// Mark the start of a snapshot; pass the result to `snapshot_update`.
    pub fn snapshot_begin(&self) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
