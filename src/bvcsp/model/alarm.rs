//! Alarms: labels, the identity that tells one occurrence from another (live frames and
//! records read back alike), and the alarm payload.

use super::*;

/// The contract's `{label}` for an alarm type (shared/spec/bvcsp.md §7.2).
pub fn alarm_label(alarm_type: i64) -> Cow<'static, str> {
    let known = match alarm_type {
        1 => "disk_error",
        2 => "disk_full",
        3 => "face",
        4 => "fall",
        5 => "sos",
        4096 => "video_lost",
        4097 => "motion",
        4098 => "video_occlusion",
        4099 => "alarm_input",
        4100 => "periodic",
        4101 => "device_online",
        4102 => "device_offline",
        4103 => "temperature_low",
        4104 => "temperature_high",
        4105 => "underspeed",
        4106 => "overspeed",
        4107 => "geofence_enter",
        4108 => "geofence_exit",
        4109 => "voltage_low",
        4110 => "voltage_high",
        4111 => "stationary",
        4112 => "inverted",
        4113 => "battery_removed",
        4114 => "tamper",
        4115 => "battery_low",
        4116 => "route_enter",
        4117 => "route_exit",
        4118 => "helmet_off",
        4119 => "helmet_impact",
        4120 => "electric_proximity",
        4121 => "working_at_height",
        20480 => "user_login",
        20481 => "user_logout",
        n => return Cow::Owned(format!("type_{n}")),
    };
    Cow::Borrowed(known)
}

/// Every `{label}` of the alarm-type table (shared/spec/bvcsp.md §7.2), in table order:
/// the `event_type` an alarm can carry besides [`OTHER_EVENT_TYPE`].
pub const ALARM_LABELS: &[&str] = &[
    "disk_error",
    "disk_full",
    "face",
    "fall",
    "sos",
    "video_lost",
    "motion",
    "video_occlusion",
    "alarm_input",
    "periodic",
    "device_online",
    "device_offline",
    "temperature_low",
    "temperature_high",
    "underspeed",
    "overspeed",
    "geofence_enter",
    "geofence_exit",
    "voltage_low",
    "voltage_high",
    "stationary",
    "inverted",
    "battery_removed",
    "tamper",
    "battery_low",
    "route_enter",
    "route_exit",
    "helmet_off",
    "helmet_impact",
    "electric_proximity",
    "working_at_height",
    "user_login",
    "user_logout",
];

/// The `event_type` of an alarm whose type is not in the table (or has no type).
pub const OTHER_EVENT_TYPE: &str = "other";

/// An alarm's `event_type` (contract §3.5): its label when the table knows it, else `other`.
pub fn alarm_event_type(label: &str) -> &'static str {
    ALARM_LABELS
        .iter()
        .find(|l| **l == label)
        .copied()
        .unwrap_or(OTHER_EVENT_TYPE)
}

/// The upstream spellings of each alarm field: frames say `devID`/`time`/`desc`, alarm
/// records `device_id`/`timestamp`/`desc` or `description`.
pub(super) const ALARM_DEVICE: &[&str] = &["devID", "device_id", "deviceId", "puid"];
pub(super) const ALARM_DEVICE_NAME: &[&str] = &["devName", "device_name", "deviceName"];
pub(super) const ALARM_TIME: &[&str] = &["time", "timestamp"];
pub(super) const ALARM_DESC: &[&str] = &["desc", "description"];

/// What tells one alarm occurrence from another: the upstream `key` and its state
/// (the start and the end of one alarm share a key). The key is shared, not copied,
/// between the ledger's map, its eviction order and its saves (up to 10 000 of each).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlarmIdentity {
    pub key: std::sync::Arc<str>,
    pub state: &'static str,
}

/// The state of an alarm frame or record (`status` 0 = start/active, 1 = end).
pub fn alarm_state(frame: &Value) -> &'static str {
    match field(frame, "status").and_then(as_i64) {
        Some(0) => "start",
        Some(1) => "end",
        _ => "unknown",
    }
}

/// Keys longer than this are kept as their SHA-256, so a hostile key cannot bloat the
/// ledger on disk or every event id computation.
pub(super) const MAX_KEY_BYTES: usize = 128;

/// The identity of an alarm frame or record: its upstream `key` and state; for an alarm
/// without a key, its device, type, time (to the millisecond) and state — the same for
/// the live frame and the record of one alarm, though two keyless alarms of one device
/// and type in the same millisecond become one.
pub fn alarm_identity(frame: &Value) -> Option<AlarmIdentity> {
    let state = alarm_state(frame);
    let key = str_field(frame, &["key"]).filter(|k| !k.is_empty());
    let key = match key {
        Some(k) if k.len() <= MAX_KEY_BYTES => std::sync::Arc::from(k.as_ref()),
        Some(k) => format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes()))).into(),
        None => {
            let device = str_field(frame, ALARM_DEVICE).unwrap_or_default();
            let kind = field(frame, "type").and_then(as_i64)?;
            let at = alarm_millis(frame)?;
            let mut h = Sha256::new();
            h.update(device.as_bytes());
            h.update([0]);
            h.update(kind.to_be_bytes());
            h.update(at.to_be_bytes());
            format!("nokey:{}", hex::encode(&h.finalize()[..16])).into()
        }
    };
    Some(AlarmIdentity { key, state })
}

/// Upstream time of an alarm frame or record, Unix milliseconds.
pub fn alarm_millis(frame: &Value) -> Option<i64> {
    field_any(frame, ALARM_TIME).and_then(upstream_millis)
}

/// An alarm's `event_id`: from its key and state when it has a key, so the live frame
/// and the alarm record of one alarm (whose field names differ) get the same id; from
/// its content otherwise.
pub fn alarm_event_id(frame: &Value) -> String {
    match alarm_identity(frame) {
        Some(id) => {
            let mut h = Sha256::new();
            h.update(b"alarm\0");
            h.update(id.key.as_bytes());
            h.update([0]);
            h.update(id.state.as_bytes());
            let d = h.finalize();
            format!("alarm-{}", hex::encode(&d[..12]))
        }
        None => content_id(Stream::Alarm, frame),
    }
}

/// Normalise an alarm record read back from the server after a gap: the payload of the
/// live frame it stands for, with `backfilled: true`.
pub fn normalise_alarm_record(record: Value, received: SystemTime, topics: &Topics) -> Normalised {
    let mut out = Normalised {
        event_id: alarm_event_id(&record),
        ..Default::default()
    };
    alarm(&mut out, record, &rfc3339_millis(received), topics, true);
    out
}

pub(super) fn alarm(
    out: &mut Normalised,
    frame: Value,
    received_at: &str,
    topics: &Topics,
    backfilled: bool,
) {
    let alarm_type = field(&frame, "type").and_then(as_i64);
    let label: Cow<'_, str> = match alarm_type {
        Some(t) => alarm_label(t),
        None => {
            out.malformed = Some("alarm without a numeric type");
            Cow::Borrowed("unknown")
        }
    };
    let device_id = str_field(&frame, ALARM_DEVICE)
        .map(Cow::into_owned)
        .unwrap_or_default();
    let state = alarm_state(&frame);
    let mut p = base_payload(&out.event_id, Stream::Alarm, received_at);
    p.insert("type".into(), alarm_type.map_or(Value::Null, Value::from));
    p.insert("label".into(), Value::String(label.to_string()));
    p.insert(
        "event_type".into(),
        Value::String(alarm_event_type(&label).into()),
    );
    p.insert("state".into(), Value::String(state.into()));
    p.insert("device_id".into(), Value::String(device_id.clone()));
    p.insert(
        "device_name".into(),
        Value::String(
            str_field(&frame, ALARM_DEVICE_NAME)
                .map(Cow::into_owned)
                .unwrap_or_default(),
        ),
    );
    p.insert(
        "description".into(),
        Value::String(
            str_field(&frame, ALARM_DESC)
                .map(Cow::into_owned)
                .unwrap_or_default(),
        ),
    );
    let time = field_any(&frame, ALARM_TIME)
        .and_then(upstream_time)
        .unwrap_or_else(|| received_at.to_string());
    p.insert("time".into(), Value::String(time));
    copy_str(&mut p, &frame, "key", &["key"]);
    copy_str(&mut p, &frame, "user_id", &["userID", "user_id"]);
    copy_str(&mut p, &frame, "user_name", &["userName", "user_name"]);
    if let Some(idx) = field_any(&frame, &["subDevIdx", "sub_dev_idx"]).and_then(as_i64) {
        p.insert("sub_dev_idx".into(), idx.into());
    }
    let lat = field(&frame, "lat").and_then(as_f64).unwrap_or(0.0);
    let lng = field(&frame, "lng").and_then(as_f64).unwrap_or(0.0);
    if (lat != 0.0 || lng != 0.0) && lat.is_finite() && lng.is_finite() {
        p.insert("lat".into(), json!(lat));
        p.insert("lng".into(), json!(lng));
    }
    if backfilled {
        p.insert("backfilled".into(), Value::Bool(true));
    }
    p.insert("raw".into(), frame);
    let topic = topics.alarm(Some(device_id.as_str()), &label);
    out.messages.push(Message::event(topic, p));
}
