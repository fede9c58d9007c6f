//! The discovery payloads (contract §3.5): one [`Thing`] per camera, user, play box and
//! the bridge itself, each a Home Assistant device with its components. Checked against
//! Home Assistant's MQTT schemas (see README, "Home Assistant"): full key names, a
//! `platform` and a `unique_id` on every component, `device` with `identifiers`,
//! `origin` with `name`, no deprecated `object_id`.

use serde_json::{Map, Value, json};

use crate::bvcsp::devices::Known;
use crate::bvcsp::model::{ALARM_LABELS, OTHER_EVENT_TYPE};
use crate::config::PlayboxConfig;
use crate::mqtt::Topics;

/// The name the bridge gives itself in `origin` and as the bridge device's maker.
pub const ORIGIN_NAME: &str = "bvcsp2mqtt";

/// One entity of a thing: its id within the thing, its platform, its options (without
/// `platform`, `device` or `origin`).
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub id: &'static str,
    pub platform: &'static str,
    pub options: Map<String, Value>,
}

/// One Home Assistant device and its entities.
#[derive(Debug, Clone, PartialEq)]
pub struct Thing {
    /// The discovery node id (`{base}_{id}`, safe as a topic level).
    pub node: String,
    pub device: Value,
    pub components: Vec<Component>,
    /// Components this thing may have had under another configuration (say, a play box
    /// whose `commands` changed): announced as removed, so no stale entity is left.
    pub retired: Vec<(&'static str, &'static str)>,
}

/// Builds things for one bridge: its base topic, QoS and node ids.
#[derive(Debug, Clone)]
pub struct Builder {
    pub topics: Topics,
    pub qos: u8,
    base_node: String,
}

/// `[a-zA-Z0-9_-]` only (Home Assistant's discovery topic matcher), at most `max` bytes;
/// anything changed or cut gets 64 bits of the SHA-256 of the original, so two ids never
/// share a node.
fn node_part(raw: &str, max: usize, reserved: &[&str]) -> String {
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let reserved = reserved
        .iter()
        .any(|r| clean == *r || clean.starts_with(&format!("{r}_")));
    if clean == raw && !clean.is_empty() && clean.len() <= max && !reserved {
        return clean;
    }
    use sha2::{Digest, Sha256};
    let digest = hex::encode(&Sha256::digest(raw.as_bytes())[..8]);
    let keep: String = clean.chars().take(max.saturating_sub(17)).collect();
    format!("{keep}_{digest}")
}

/// The availability entry for a topic publishing `online` / `offline`.
fn avail(topic: String) -> Value {
    json!({"topic": topic, "payload_available": "online", "payload_not_available": "offline"})
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A brightness or volume reading from the play box's state JSON, or `None` (unknown).
fn percent_template(key: &str) -> String {
    format!("{{{{ value_json.{key} if value_json.{key} is number else 'None' }}}}")
}

const SCREEN_TEMPLATE: &str =
    "{{ value_json.screen if value_json.screen in ['on', 'off'] else 'None' }}";

/// What an alarm event carries into Home Assistant: its `event_type` and a few useful
/// fields; `raw` and the rest stay out of the recorder.
const ALARM_TEMPLATE: &str = "{{ {'event_type': value_json.event_type | default('other'), \
'label': value_json.label, 'alarm_state': value_json.state, 'alarm_type': value_json.type, \
'description': value_json.description, 'time': value_json.time, \
'event_id': value_json.event_id, 'backfilled': value_json.backfilled | default(false)} | to_json }}";

/// Home Assistant reads a tracker's position from the attributes `latitude` and
/// `longitude` only; the location payload's `raw` is left out.
const LOCATION_TEMPLATE: &str = "{{ {'latitude': value_json.lat, 'longitude': value_json.lng, \
'time': value_json.time} | to_json }}";

impl Builder {
    pub fn new(topics: Topics, qos: u8) -> Builder {
        let base_node = node_part(topics.base(), 64, &[]);
        Builder {
            topics,
            qos,
            base_node,
        }
    }

    /// The node id of a BVCSP device (contract: `{base}_{id}`).
    pub fn device_node(&self, id: &str) -> String {
        format!(
            "{}_{}",
            self.base_node,
            node_part(id, 64, &["bridge", "user", "playbox"])
        )
    }

    pub fn user_node(&self, id: &str) -> String {
        format!("{}_user_{}", self.base_node, node_part(id, 64, &[]))
    }

    pub fn playbox_node(&self, name: &str) -> String {
        format!("{}_playbox_{}", self.base_node, node_part(name, 64, &[]))
    }

    pub fn bridge_node(&self) -> String {
        format!("{}_bridge", self.base_node)
    }

    fn bridge_state(&self) -> Value {
        avail(self.topics.bridge_state())
    }

    /// Options every component shares: its unique id, the name, QoS, availability.
    fn common(&self, node: &str, id: &str, name: &str, availability: Vec<Value>) -> Value {
        let mut v = json!({
            "unique_id": format!("{node}_{id}"),
            "name": name,
            "qos": self.qos,
        });
        if availability.len() > 1 {
            v["availability_mode"] = json!("all");
        }
        if !availability.is_empty() {
            v["availability"] = Value::Array(availability);
        }
        v
    }

    fn component(
        &self,
        node: &str,
        id: &'static str,
        platform: &'static str,
        name: &str,
        availability: Vec<Value>,
        extra: Value,
    ) -> Component {
        let mut options = obj(self.common(node, id, name, availability));
        options.extend(obj(extra));
        Component {
            id,
            platform,
            options,
        }
    }

    fn connectivity(&self, node: &str, state_topic: String, availability: Vec<Value>) -> Component {
        self.component(
            node,
            "connectivity",
            "binary_sensor",
            "Connectivity",
            availability,
            json!({
                "state_topic": state_topic,
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "payload_on": "online",
                "payload_off": "offline",
            }),
        )
    }

    /// A camera, helmet or vehicle unit: connectivity, position, alarms.
    pub fn device(&self, known: &Known) -> Thing {
        let node = self.device_node(&known.id);
        let t = &self.topics;
        let f = &known.facts;
        let mut device = json!({
            "identifiers": [node],
            "name": f.name.clone().unwrap_or_else(|| known.id.clone()),
            "manufacturer": f.manufacturer.clone().unwrap_or_else(|| "BVCSP".into()),
            "model": f.model.clone().unwrap_or_else(|| "BVCSP device".into()),
            "via_device": self.bridge_node(),
        });
        if let Some(v) = &f.sw_version {
            device["sw_version"] = json!(v);
        }
        if let Some(v) = &f.hw_version {
            device["hw_version"] = json!(v);
        }
        let own = || vec![self.bridge_state(), avail(t.device_availability(&known.id))];
        let mut event_types: Vec<&str> = ALARM_LABELS.to_vec();
        event_types.push(OTHER_EVENT_TYPE);
        Thing {
            components: vec![
                // Only the bridge: an offline camera shows "off", not "unavailable".
                self.connectivity(
                    &node,
                    t.device_availability(&known.id),
                    vec![self.bridge_state()],
                ),
                self.component(
                    &node,
                    "position",
                    "device_tracker",
                    "Position",
                    own(),
                    json!({
                        "source_type": "gps",
                        "json_attributes_topic": t.device_location(&known.id),
                        "json_attributes_template": LOCATION_TEMPLATE,
                    }),
                ),
                // Only the bridge too: an alarm from a camera that has just gone offline
                // (device_offline, an SOS as the battery dies) must still fire.
                self.component(
                    &node,
                    "alarm",
                    "event",
                    "Alarm",
                    vec![self.bridge_state()],
                    json!({
                        "state_topic": format!("{}/device/{}/alarm/+", t.base(), crate::mqtt::topics::level(&known.id)),
                        "event_types": event_types,
                        "value_template": ALARM_TEMPLATE,
                        "icon": "mdi:alarm-light",
                    }),
                ),
            ],
            node,
            device,
            retired: Vec::new(),
        }
    }

    /// A CU terminal (a user without a device): connectivity only.
    pub fn user(&self, known: &Known) -> Thing {
        let node = self.user_node(&known.id);
        Thing {
            components: vec![self.connectivity(
                &node,
                self.topics.user_availability(&known.id),
                vec![self.bridge_state()],
            )],
            device: json!({
                "identifiers": [node],
                "name": format!("User {}", known.id),
                "manufacturer": "BVCSP",
                "model": "CU terminal",
                "via_device": self.bridge_node(),
            }),
            node,
            retired: Vec::new(),
        }
    }

    /// A play box: connectivity; a screen switch and brightness and volume sliders with
    /// `commands = true`, read-only sensors otherwise. `info` is what the box said of
    /// itself (`state` payload keys `model`, `firmware`, `mac`, ...), when known.
    pub fn playbox(&self, cfg: &PlayboxConfig, info: Option<&Value>) -> Thing {
        let node = self.playbox_node(&cfg.name);
        let t = &self.topics;
        let text = |k: &str| {
            info.and_then(|i| i.get(k)).and_then(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        let mut device = json!({
            "identifiers": [node],
            "name": cfg.name,
            "manufacturer": "NovaStar",
            "model": text("model").or_else(|| text("product_name")).unwrap_or_else(|| "Taurus play box".into()),
            "serial_number": cfg.sn,
            "via_device": self.bridge_node(),
        });
        if let Some(v) = text("firmware") {
            device["sw_version"] = json!(v);
        }
        if let Some(mac) = text("mac") {
            device["connections"] = json!([["mac", mac.to_ascii_lowercase()]]);
        }
        let own = || {
            vec![
                self.bridge_state(),
                avail(t.playbox_availability(&cfg.name)),
            ]
        };
        let state = t.playbox_state(&cfg.name);
        let set = |what: &str| {
            format!(
                "{}/playbox/{}/{what}/set",
                t.base(),
                crate::mqtt::topics::level(&cfg.name)
            )
        };
        let mut components = vec![self.connectivity(
            &node,
            t.playbox_availability(&cfg.name),
            vec![self.bridge_state()],
        )];
        let slider = |id: &'static str, name: &str, key: &str, icon: &str| {
            self.component(
                &node,
                id,
                "number",
                name,
                own(),
                json!({
                    "command_topic": set(key),
                    "state_topic": state,
                    "value_template": percent_template(key),
                    "min": 0,
                    "max": 100,
                    "step": 1,
                    "mode": "slider",
                    "unit_of_measurement": "%",
                    "retain": false,
                    "icon": icon,
                }),
            )
        };
        let gauge = |id: &'static str, name: &str, key: &str, icon: &str| {
            self.component(
                &node,
                id,
                "sensor",
                name,
                own(),
                json!({
                    "state_topic": state,
                    "value_template": percent_template(key),
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    "icon": icon,
                }),
            )
        };
        let retired = if cfg.commands {
            components.push(self.component(
                &node,
                "screen",
                "switch",
                "Screen",
                own(),
                json!({
                    "command_topic": set("screen"),
                    "state_topic": state,
                    "value_template": SCREEN_TEMPLATE,
                    "payload_on": "on",
                    "payload_off": "off",
                    "retain": false,
                    "icon": "mdi:television",
                }),
            ));
            components.push(slider(
                "brightness",
                "Brightness",
                "brightness",
                "mdi:brightness-6",
            ));
            components.push(slider("volume", "Volume", "volume", "mdi:volume-high"));
            vec![
                ("screen_state", "binary_sensor"),
                ("brightness_level", "sensor"),
                ("volume_level", "sensor"),
            ]
        } else {
            components.push(self.component(
                &node,
                "screen_state",
                "binary_sensor",
                "Screen",
                own(),
                json!({
                    "state_topic": state,
                    "value_template": SCREEN_TEMPLATE,
                    "payload_on": "on",
                    "payload_off": "off",
                    "device_class": "power",
                }),
            ));
            components.push(gauge(
                "brightness_level",
                "Brightness",
                "brightness",
                "mdi:brightness-6",
            ));
            components.push(gauge("volume_level", "Volume", "volume", "mdi:volume-high"));
            vec![
                ("screen", "switch"),
                ("brightness", "number"),
                ("volume", "number"),
            ]
        };
        Thing {
            node,
            device,
            components,
            retired,
        }
    }

    /// The bridge itself: connectivity from `bridge/state`, diagnostic sensors.
    pub fn bridge(&self, with_bvcsp: bool) -> Thing {
        let node = self.bridge_node();
        let t = &self.topics;
        let name = if t.base() == "bvcsp2mqtt" {
            "bvcsp2mqtt bridge".to_string()
        } else {
            format!("bvcsp2mqtt bridge ({})", t.base())
        };
        let up = || vec![self.bridge_state()];
        let diagnostic = |id: &'static str, name: &str, topic: String, extra: Value| {
            let mut c = self.component(&node, id, "sensor", name, up(), extra);
            c.options.insert("state_topic".into(), json!(topic));
            c.options
                .insert("entity_category".into(), json!("diagnostic"));
            c
        };
        // No availability: when the bridge is gone this shows "off", not "unavailable".
        let mut components = vec![self.connectivity(&node, t.bridge_state(), Vec::new())];
        if with_bvcsp {
            components.push(diagnostic(
                "bvcsp_link",
                "BVCSP link",
                t.link_bvcsp(),
                json!({
                    "value_template": "{{ value_json.state }}",
                    "device_class": "enum",
                    "options": ["up", "connecting", "down", "auth_failed"],
                    "icon": "mdi:lan-connect",
                }),
            ));
            components.push(diagnostic(
                "backfill",
                "Alarm backfill",
                t.link_bvcsp(),
                json!({
                    // `unavailable` would read as Home Assistant's own unavailable state.
                    "value_template": "{% set b = value_json.backfill | default('off') %}{{ 'not_available' if b == 'unavailable' else b }}",
                    "device_class": "enum",
                    "options": ["ok", "not_available", "off"],
                    "icon": "mdi:history",
                }),
            ));
        }
        components.push(diagnostic(
            "outbox_depth",
            "Outbox depth",
            t.bridge_health(),
            json!({
                "value_template": "{{ value_json.outbox.depth }}",
                "unit_of_measurement": "messages",
                "state_class": "measurement",
                "icon": "mdi:tray-full",
            }),
        ));
        components.push(diagnostic(
            "outbox_oldest_age",
            "Outbox oldest age",
            t.bridge_health(),
            json!({
                "value_template": "{{ (value_json.outbox.oldest_age_ms / 1000) | round(1) }}",
                "device_class": "duration",
                "unit_of_measurement": "s",
                "state_class": "measurement",
            }),
        ));
        components.push(diagnostic(
            "version",
            "Version",
            t.bridge_info(),
            json!({
                "value_template": "{{ value_json.version }}",
                "icon": "mdi:information-outline",
            }),
        ));
        Thing {
            device: json!({
                "identifiers": [node],
                "name": name,
                "manufacturer": ORIGIN_NAME,
                "model": "BVCSP and play-box bridge",
                "sw_version": env!("CARGO_PKG_VERSION"),
            }),
            node,
            components,
            retired: Vec::new(),
        }
    }
}

/// `origin` (Home Assistant requires its `name`).
pub fn origin() -> Value {
    json!({"name": ORIGIN_NAME, "sw_version": env!("CARGO_PKG_VERSION")})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bvcsp::devices::{DeviceFacts, Kind};

    fn known(id: &str) -> Known {
        Known {
            id: id.into(),
            kind: Kind::Device,
            facts: DeviceFacts::default(),
            online: true,
            last_seen: None,
        }
    }

    #[test]
    fn nodes_are_safe_topic_levels_and_never_shared() {
        let b = Builder::new(Topics::new("bvcsp2mqtt"), 1);
        assert_eq!(b.device_node("PU_55AA0000"), "bvcsp2mqtt_PU_55AA0000");
        let odd = b.device_node("PU/1 #+é");
        assert!(
            odd.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{odd}"
        );
        assert_ne!(odd, b.device_node("PU_1 __é"));
        assert_ne!(b.device_node("bridge"), b.bridge_node());
        assert_ne!(b.device_node("user_x"), b.user_node("x"));
        let long = b.device_node(&"x".repeat(10_000));
        assert!(long.len() < 150, "{}", long.len());
        let other = Builder::new(Topics::new("site/b"), 1);
        assert_eq!(
            other.bridge_node(),
            format!("{}_bridge", node_part("site/b", 64, &[]))
        );
        assert_ne!(other.device_node("PU_1"), b.device_node("PU_1"));
    }

    #[test]
    fn every_component_has_a_prefixed_unique_id_and_no_object_id() {
        let b = Builder::new(Topics::new("bvcsp2mqtt"), 1);
        let things = [
            b.device(&known("PU_1")),
            b.bridge(true),
            b.user(&known("CU_1")),
        ];
        for thing in things {
            for c in &thing.components {
                let uid = c.options["unique_id"].as_str().unwrap();
                assert!(uid.starts_with("bvcsp2mqtt_"), "{uid}");
                assert!(!c.options.contains_key("object_id"));
                assert!(!c.options.contains_key("platform"));
            }
        }
    }
}
