//! `{base}/bridge/devices` (contract §3.6): every known device, user and play box in one
//! retained JSON list, written straight into its payload.
//!
//! With 10 000 devices the list is over a megabyte and, while GPS fixes move
//! `last_seen`, it changes every time it may be sent. Built as `serde_json::Value`s,
//! compared with the last one kept whole and cloned again to be cut to the packet size,
//! it took the bridge's peak RSS in that scenario from 26 to 48 MB; written entry by
//! entry from the registry (under its lock, nothing copied) and remembered by a digest,
//! it costs one payload.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;
use tracing::warn;

use crate::bvcsp::BvcspLink;
use crate::bvcsp::devices::Kind;
use crate::config::PlayboxConfig;
use crate::link_status::{LinkState, LinkStatus};
use crate::mqtt::topics::level;
use crate::timestamp::rfc3339_millis;

/// One entry of the list.
#[derive(Debug, Serialize)]
pub(super) struct Entry<'a> {
    pub id: &'a str,
    pub topic_id: Cow<'a, str>,
    pub name: Option<&'a str>,
    pub kind: &'static str,
    pub online: bool,
    pub last_seen: Option<String>,
}

/// The list's payload, at most `limit` bytes: play boxes first, then every device and
/// user in id order. A list too large for one MQTT packet would be a dead letter every
/// time it changes, so the last entries are left out, with a warning (once: `warned`).
pub(super) fn payload(
    bvcsp: Option<&BvcspLink>,
    playboxes: &[PlayboxConfig],
    play_links: &[(String, Arc<LinkStatus>)],
    limit: usize,
    warned: &mut bool,
) -> Vec<u8> {
    let mut list = ListWriter::new(limit);
    for cfg in playboxes {
        let link = play_links
            .iter()
            .find(|(n, _)| *n == cfg.name)
            .map(|(_, l)| l.snapshot());
        let up = link.filter(|s| s.state == LinkState::Up);
        list.push(&Entry {
            id: &cfg.name,
            topic_id: level(&cfg.name),
            name: Some(&cfg.name),
            kind: "playbox",
            online: up.is_some(),
            // Up since then: the box has been answering ever since.
            last_seen: up.map(|s| rfc3339_millis(s.since)),
        });
    }
    if let Some(ctx) = bvcsp {
        ctx.registry.with_catalogue(|known| {
            for k in known {
                list.push(&Entry {
                    id: &k.id,
                    topic_id: level(&k.id),
                    name: k.facts.name.as_deref(),
                    kind: match k.kind {
                        Kind::Device => "device",
                        Kind::User => "user",
                    },
                    online: k.online,
                    last_seen: k.last_seen.map(rfc3339_millis),
                });
            }
        });
    }
    list.finish(warned)
}

/// What tells one payload from the next (kept instead of the payload itself).
pub(super) fn digest(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// A JSON array written one entry at a time, up to a size.
struct ListWriter {
    out: Vec<u8>,
    one: Vec<u8>,
    limit: usize,
    kept: usize,
    entries: usize,
    /// An entry did not fit: it and every one after it are left out (cut, not thinned).
    cut: bool,
    /// The size of the whole list, had nothing been left out.
    whole: usize,
}

impl ListWriter {
    fn new(limit: usize) -> ListWriter {
        ListWriter {
            out: vec![b'['],
            one: Vec::with_capacity(256),
            limit,
            kept: 0,
            entries: 0,
            cut: false,
            whole: 2,
        }
    }

    fn push(&mut self, entry: &Entry) {
        self.one.clear();
        // Serialising into memory cannot fail.
        let _ = serde_json::to_writer(&mut self.one, entry);
        self.whole += self.one.len() + usize::from(self.entries > 0);
        self.entries += 1;
        // The comma and the closing bracket must fit too.
        self.cut |= self.out.len() + self.one.len() + 2 > self.limit;
        if !self.cut {
            if self.kept > 0 {
                self.out.push(b',');
            }
            self.out.extend_from_slice(&self.one);
            self.kept += 1;
        }
    }

    fn finish(mut self, warned: &mut bool) -> Vec<u8> {
        self.out.push(b']');
        if self.cut && !*warned {
            warn!(
                "bridge/devices lists {} of {} entries: the whole list ({} bytes) is larger \
                 than mqtt.max_packet_size allows; raise it (and the broker's limit) to see all",
                self.kept, self.entries, self.whole
            );
            *warned = true;
        }
        self.out.shrink_to_fit();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn entries(n: usize) -> Vec<(String, Option<String>)> {
        (0..n)
            .map(|i| {
                (
                    format!("PU_{i:08}"),
                    (i % 2 == 0).then(|| format!("Unit {i}")),
                )
            })
            .collect()
    }

    fn write(list: &[(String, Option<String>)], limit: usize, warned: &mut bool) -> Vec<u8> {
        let mut w = ListWriter::new(limit);
        for (id, name) in list {
            w.push(&Entry {
                id,
                topic_id: level(id),
                name: name.as_deref(),
                kind: "device",
                online: true,
                last_seen: None,
            });
        }
        w.finish(warned)
    }

    #[test]
    fn a_list_too_large_for_a_packet_is_cut_to_fit_and_stays_json() {
        let list = entries(1000);
        let mut warned = false;
        let whole: Value = serde_json::from_slice(&write(&list, 1 << 20, &mut warned)).unwrap();
        assert!(!warned);
        let whole = whole.as_array().unwrap();
        assert_eq!(whole.len(), 1000);
        assert_eq!(whole[0]["id"], "PU_00000000");
        assert_eq!(whole[0]["name"], "Unit 0");
        assert_eq!(whole[1]["name"], Value::Null);
        assert_eq!(whole[0]["topic_id"], "PU_00000000");
        assert_eq!(whole[0]["kind"], "device");
        assert_eq!(whole[0]["online"], true);
        assert_eq!(whole[0]["last_seen"], Value::Null);
        let cut = write(&list, 4096, &mut warned);
        assert!(cut.len() <= 4096, "{}", cut.len());
        let cut: Value = serde_json::from_slice(&cut).unwrap();
        let cut = cut.as_array().unwrap();
        assert!(cut.len() > 20 && cut.len() < 1000, "{}", cut.len());
        assert_eq!(
            cut[..],
            whole[..cut.len()],
            "the first entries are kept, in order"
        );
        assert!(warned);
    }

    #[test]
    fn an_empty_list_and_a_list_with_no_room_are_still_json() {
        let mut warned = false;
        assert_eq!(write(&[], 2, &mut warned), b"[]");
        assert_eq!(write(&entries(3), 2, &mut warned), b"[]");
        assert!(warned);
    }

    #[test]
    fn the_digest_tells_payloads_apart() {
        let mut warned = false;
        let a = write(&entries(3), 1 << 20, &mut warned);
        let b = write(&entries(4), 1 << 20, &mut warned);
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&b));
    }
}
