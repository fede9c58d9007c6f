//! Topic names of the public contract (§3). IDs from upstream become one topic level.

use std::borrow::Cow;

/// The longest topic level an upstream id becomes, in bytes. MQTT caps a whole topic at
/// 65 535 bytes; without a cap a hostile id would corrupt the stream to the broker.
pub const MAX_LEVEL_BYTES: usize = 65;
/// Ids up to this length stay as they are (after escaping).
const KEEP_BYTES: usize = 64;
/// Hex digits of the SHA-256 kept in a shortened level: 128 bits, so two ids sharing
/// one would take some 2^64 hostile ids to find.
const DIGEST_HEX: usize = 32;

/// Make an upstream id safe as one topic level: `/`, `+`, `#` and control characters
/// become `_`; an empty id becomes `_`. An id longer than 64 bytes becomes its first 32
/// bytes (escaped, padded with `_`), `~`, and 128 bits of the SHA-256 of the full id in
/// hex: stable, readable, apart from any other id, always `MAX_LEVEL_BYTES` bytes.
pub fn level(id: &str) -> Cow<'_, str> {
    if id.is_empty() {
        return Cow::Borrowed("_");
    }
    if id.len() > KEEP_BYTES {
        return Cow::Owned(shortened(id));
    }
    if id.chars().any(needs_escape) {
        Cow::Owned(escape(id))
    } else {
        Cow::Borrowed(id)
    }
}

fn escape(id: &str) -> String {
    id.chars()
        .map(|c| if needs_escape(c) { '_' } else { c })
        .collect()
}

fn shortened(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = hex::encode(Sha256::digest(id.as_bytes()));
    digest.truncate(DIGEST_HEX);
    let room = MAX_LEVEL_BYTES - 1 - digest.len();
    let mut out = String::with_capacity(MAX_LEVEL_BYTES);
    for c in id.chars().map(|c| if needs_escape(c) { '_' } else { c }) {
        if out.len() + c.len_utf8() > room {
            break;
        }
        out.push(c);
    }
    // Pad so the level is exactly MAX_LEVEL_BYTES whatever the prefix's characters are.
    while out.len() < room {
        out.push('_');
    }
    out.push('~');
    out.push_str(&digest);
    out
}

fn needs_escape(c: char) -> bool {
    matches!(c, '/' | '+' | '#') || c.is_control()
}

/// Builds topics under `mqtt.base_topic`.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(base: &str) -> Self {
        Topics {
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn bridge_state(&self) -> String {
        format!("{}/bridge/state", self.base)
    }
    pub fn bridge_info(&self) -> String {
        format!("{}/bridge/info", self.base)
    }
    pub fn bridge_health(&self) -> String {
        format!("{}/bridge/health", self.base)
    }
    pub fn link_bvcsp(&self) -> String {
        format!("{}/bridge/link/bvcsp", self.base)
    }
    pub fn link_playbox(&self, name: &str) -> String {
        format!("{}/bridge/link/playbox/{}", self.base, level(name))
    }
    pub fn playbox_availability(&self, name: &str) -> String {
        format!("{}/playbox/{}/availability", self.base, level(name))
    }
    pub fn playbox_state(&self, name: &str) -> String {
        format!("{}/playbox/{}/state", self.base, level(name))
    }
    pub fn playbox_error(&self, name: &str) -> String {
        format!("{}/playbox/{}/error", self.base, level(name))
    }
    pub fn device_availability(&self, puid: &str) -> String {
        format!("{}/device/{}/availability", self.base, level(puid))
    }
    pub fn device_status(&self, puid: &str) -> String {
        format!("{}/device/{}/status", self.base, level(puid))
    }
    pub fn device_location(&self, puid: &str) -> String {
        format!("{}/device/{}/location", self.base, level(puid))
    }
    pub fn user_availability(&self, id: &str) -> String {
        format!("{}/user/{}/availability", self.base, level(id))
    }
    /// `{base}/device/{puid}/alarm/{label}`, or `{base}/alarm/{label}` without a device.
    pub fn alarm(&self, puid: Option<&str>, label: &str) -> String {
        match puid.filter(|p| !p.is_empty()) {
            Some(p) => format!("{}/device/{}/alarm/{}", self.base, level(p), level(label)),
            None => format!("{}/alarm/{}", self.base, level(label)),
        }
    }
    pub fn im_message(&self) -> String {
        format!("{}/im/message", self.base)
    }
    pub fn conference(&self, id: &str, event: &str) -> String {
        format!("{}/conference/{}/{}", self.base, level(id), level(event))
    }
    pub fn online_status_event(&self) -> String {
        format!("{}/event/online_status", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_escape_wildcards_separators_and_controls() {
        assert_eq!(level("PU_55AA0000"), "PU_55AA0000");
        assert_eq!(level("a/b+c#d"), "a_b_c_d");
        assert_eq!(level("x\ny\u{0}z\u{7f}"), "x_y_z_");
        assert_eq!(level(""), "_");
        assert_eq!(level("Grüße"), "Grüße");
    }

    #[test]
    fn long_ids_are_shortened_stably_and_apart() {
        let long = "D".repeat(70_000);
        let a = level(&long).into_owned();
        assert_eq!(a.len(), MAX_LEVEL_BYTES);
        assert_eq!(a, level(&long), "the same id gives the same level");
        assert!(a.starts_with("DD"), "{a}");
        let mut other = long.clone();
        other.push('E');
        assert_ne!(level(&other), a, "ids that share a prefix stay apart");
        let exactly = "x".repeat(KEEP_BYTES);
        assert_eq!(level(&exactly), exactly.as_str());
        let wild = format!("{}#/+", "é".repeat(40));
        let w = level(&wild);
        assert_eq!(w.len(), MAX_LEVEL_BYTES);
        assert!(!w.contains(['#', '/', '+']), "{w}");
    }

    #[test]
    fn contract_topics() {
        let t = Topics::new("bvcsp2mqtt");
        assert_eq!(t.bridge_state(), "bvcsp2mqtt/bridge/state");
        assert_eq!(t.link_bvcsp(), "bvcsp2mqtt/bridge/link/bvcsp");
        assert_eq!(
            t.device_availability("PU/1"),
            "bvcsp2mqtt/device/PU_1/availability"
        );
        assert_eq!(
            t.alarm(Some("PU_1"), "sos"),
            "bvcsp2mqtt/device/PU_1/alarm/sos"
        );
        assert_eq!(t.alarm(Some(""), "sos"), "bvcsp2mqtt/alarm/sos");
        assert_eq!(t.alarm(None, "type_8192"), "bvcsp2mqtt/alarm/type_8192");
        assert_eq!(t.conference("", "member"), "bvcsp2mqtt/conference/_/member");
        assert_eq!(
            t.user_availability("CU_a#"),
            "bvcsp2mqtt/user/CU_a_/availability"
        );
        assert_eq!(t.online_status_event(), "bvcsp2mqtt/event/online_status");
        assert_eq!(t.im_message(), "bvcsp2mqtt/im/message");
    }
}
