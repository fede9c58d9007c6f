//! Device-list records, for the snapshot.

use super::*;

/// One record of `pu/list`, as far as the snapshot needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    pub online: bool,
    pub gps: Option<(f64, f64, Option<i64>)>,
    pub raw: Value,
}

impl DeviceRecord {
    pub fn from_value(v: Value) -> Option<DeviceRecord> {
        let id = str_field(&v, &["id", "puid"])?.into_owned();
        if id.is_empty() {
            return None;
        }
        let online =
            field_any(&v, &["status", "online", "onlineStatus"]).and_then(as_i64) == Some(1);
        let gps = field(&v, "gps").and_then(|g| {
            let lat = field(g, "lat").and_then(as_f64)?;
            let lng = field_any(g, &["lng", "lon"]).and_then(as_f64)?;
            // 0/0 means "no fix" in device lists.
            (lat != 0.0 || lng != 0.0).then(|| (lat, lng, field(g, "time").and_then(as_i64)))
        });
        Some(DeviceRecord {
            id,
            online,
            gps,
            raw: v,
        })
    }

    /// Name, maker and versions, as far as the record tells them.
    pub fn facts(&self) -> crate::bvcsp::devices::DeviceFacts {
        let text = |keys: &[&str]| {
            str_field(&self.raw, keys)
                .map(Cow::into_owned)
                .filter(|s| !s.trim().is_empty())
        };
        crate::bvcsp::devices::DeviceFacts {
            name: text(&["name"]),
            manufacturer: text(&["manufacturer"]),
            model: text(&["product", "model"]),
            sw_version: text(&["softwareVersion", "software_version"]),
            hw_version: text(&["hardwareVersion", "hardware_version"]),
        }
    }

    /// Retained messages for this record: availability, and the location when known.
    pub fn messages(&self, received: SystemTime, topics: &Topics) -> Vec<Message> {
        let word = if self.online { "online" } else { "offline" };
        let mut msgs = vec![Message::state_text(
            topics.device_availability(&self.id),
            word,
        )];
        if let Some((lat, lng, time)) = self.gps {
            let received_at = rfc3339_millis(received);
            let mut p = base_payload(
                &unique_id(Stream::Location, received),
                Stream::Location,
                &received_at,
            );
            p.insert("device_id".into(), Value::String(self.id.clone()));
            p.insert("lat".into(), json!(lat));
            p.insert("lng".into(), json!(lng));
            let time = time
                .and_then(|t| upstream_time(&Value::from(t)))
                .unwrap_or(received_at);
            p.insert("time".into(), Value::String(time));
            p.insert("source".into(), Value::String("snapshot".into()));
            p.insert(
                "raw".into(),
                field(&self.raw, "gps").cloned().unwrap_or(Value::Null),
            );
            msgs.push(Message::state(topics.device_location(&self.id), p));
        }
        msgs
    }
}
