//! What the bridge knows of devices: their availability and where it came from, so that
//! a snapshot never overwrites a newer change seen on the online-status stream, and the
//! set of ids the GPS stream must subscribe to.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Debug, Default)]
struct Inner {
    /// id -> (online, sequence number of the last stream update)
    devices: HashMap<String, (bool, u64)>,
    seq: u64,
}

#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Number of distinct devices known; changes whenever a new one appears.
    added: watch::Sender<usize>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Mutex::default(),
            added: watch::channel(0).0,
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frame on the online-status stream: always authoritative.
    pub fn stream_update(&self, id: &str, online: bool) {
        let count = {
            let mut g = self.lock();
            g.seq += 1;
            let seq = g.seq;
            g.devices
                .insert(id.to_string(), (online, seq))
                .is_none()
                .then_some(g.devices.len())
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
            match g.devices.get_mut(id) {
                Some((_, seq)) if *seq > begin => (false, None),
                Some(entry) => {
                    entry.0 = online;
                    (true, None)
                }
                None => {
                    g.devices.insert(id.to_string(), (online, 0));
                    (true, Some(g.devices.len()))
                }
            }
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
}
