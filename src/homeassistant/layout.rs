//! Where discovery messages go and what they look like on the wire, in either
//! `discovery` mode, and what removes them.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::entities::{Thing, origin};
use crate::config::DiscoveryMode;
use crate::mqtt::Message;

/// The components a BVCSP device and a user always have (their ids and platforms), so
/// a topic left by an earlier run can be told apart from the current layout.
pub const DEVICE_COMPONENTS: &[(&str, &str)] = &[
    ("connectivity", "binary_sensor"),
    ("position", "device_tracker"),
    ("alarm", "event"),
];
pub const USER_COMPONENTS: &[(&str, &str)] = &[("connectivity", "binary_sensor")];

#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub mode: DiscoveryMode,
}

fn retained(topic: String, payload: Bytes) -> Message {
    Message {
        topic,
        payload,
        retain: true,
    }
}

impl Layout {
    fn device_topic(&self, node: &str) -> String {
        format!("{}/device/{node}/config", self.prefix)
    }

    fn component_topic(&self, platform: &str, node: &str, id: &str) -> String {
        format!("{}/{platform}/{node}/{id}/config", self.prefix)
    }

    /// The config topics of a thing with these components, in this layout.
    pub fn topics_of(&self, node: &str, components: &[(&str, &str)]) -> Vec<String> {
        match self.mode {
            DiscoveryMode::Device => vec![self.device_topic(node)],
            DiscoveryMode::Component => components
                .iter()
                .map(|(id, platform)| self.component_topic(platform, node, id))
                .collect(),
        }
    }

    /// The config topics this thing is announced on.
    pub fn topics(&self, thing: &Thing) -> Vec<String> {
        let ids: Vec<(&str, &str)> = thing
            .components
            .iter()
            .map(|c| (c.id, c.platform))
            .collect();
        self.topics_of(&thing.node, &ids)
    }

    /// The retained messages that announce `thing`.
    pub fn announce(&self, thing: &Thing) -> Vec<Message> {
        match self.mode {
            DiscoveryMode::Device => {
                let mut components = Map::new();
                for c in &thing.components {
                    let mut options = Map::new();
                    options.insert("platform".into(), json!(c.platform));
                    options.extend(c.options.clone());
                    components.insert(c.id.into(), Value::Object(options));
                }
                for (id, platform) in &thing.retired {
                    // A component with only its platform is removed (Home Assistant's
                    // device discovery), so a changed configuration leaves nothing stale.
                    components.insert((*id).into(), json!({"platform": platform}));
                }
                let payload = json!({
                    "device": thing.device,
                    "origin": origin(),
                    "components": components,
                });
                vec![Message::state_json(
                    self.device_topic(&thing.node),
                    &payload,
                )]
            }
            DiscoveryMode::Component => {
                let mut out: Vec<Message> = thing
                    .components
                    .iter()
                    .map(|c| {
                        let mut options = c.options.clone();
                        options.insert("device".into(), thing.device.clone());
                        options.insert("origin".into(), origin());
                        Message::state_json(
                            self.component_topic(c.platform, &thing.node, c.id),
                            &Value::Object(options),
                        )
                    })
                    .collect();
                for (id, platform) in &thing.retired {
                    out.push(removal(self.component_topic(platform, &thing.node, id)));
                }
                out
            }
        }
    }
}

/// An empty retained message: Home Assistant removes what was announced there.
pub fn removal(topic: String) -> Message {
    retained(topic, Bytes::new())
}
