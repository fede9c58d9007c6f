//! Topic names of the public contract (§3). IDs from upstream become one topic level.

use std::borrow::Cow;

/// Make an upstream id safe as one topic level: `/`, `+`, `#` and control characters
/// become `_`; an empty id becomes `_`.
pub fn level(id: &str) -> Cow<'_, str> {
    if id.is_empty() {
        return Cow::Borrowed("_");
    }
    if id.chars().any(needs_escape) {
        Cow::Owned(
            id.chars()
                .map(|c| if needs_escape(c) { '_' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(id)
    }
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
