//! Turning upstream frames into contract payloads. Frames are parsed into
//! `serde_json::Value` and read through tolerant views: keys are matched without regard
//! to case, numbers may arrive as strings, unknown fields are kept in `raw`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::Stream;
use crate::json::{as_f64, as_i64, as_string, field, field_any};
use crate::mqtt::Message;
use crate::mqtt::topics::Topics;
use crate::timestamp::rfc3339_millis;

fn str_field<'a>(v: &'a Value, keys: &[&str]) -> Option<Cow<'a, str>> {
    field_any(v, keys).and_then(as_string)
}

/// The latest upstream time taken as sane (2200-01-01): later is a unit mix-up or junk.
const MAX_SANE_MILLIS: i64 = 7_258_118_400_000;

/// An upstream time as Unix milliseconds. Servers send seconds; milliseconds,
/// microseconds and nanoseconds are told apart by magnitude. Anything not positive or
/// past 2200 is no time at all.
pub fn upstream_millis(v: &Value) -> Option<i64> {
    let n = as_i64(v)?;
    if n <= 0 {
        return None;
    }
    let ms = if n < 100_000_000_000 {
        n.checked_mul(1000)?
    } else if n < 100_000_000_000_000 {
        n
    } else if n < 100_000_000_000_000_000 {
        n / 1000
    } else {
        n / 1_000_000
    };
    (ms <= MAX_SANE_MILLIS).then_some(ms)
}

/// An upstream time (see [`upstream_millis`]) in RFC 3339.
pub fn upstream_time(v: &Value) -> Option<String> {
    let ms = upstream_millis(v)?;
    let t = UNIX_EPOCH.checked_add(std::time::Duration::from_millis(u64::try_from(ms).ok()?))?;
    Some(rfc3339_millis(t))
}

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

/// The most events one frame may carry; the rest are counted and skipped unparsed, so a
/// frame of millions of elements neither becomes millions of rows nor millions of values.
pub const MAX_EVENTS_PER_FRAME: usize = 10_000;

/// One WebSocket text, split into events.
#[derive(Debug, Default, PartialEq)]
pub struct Frame {
    pub events: Vec<Value>,
    /// Elements past [`MAX_EVENTS_PER_FRAME`], skipped.
    pub skipped: usize,
}

/// Splits one WebSocket text into events: empty frames carry none, an array carries one
/// per element (at most [`MAX_EVENTS_PER_FRAME`]), anything else that is JSON carries
/// itself.
pub fn split_frame(text: &str) -> Result<Frame, serde_json::Error> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed == "\"\"" {
        return Ok(Frame::default());
    }
    let mut de = serde_json::Deserializer::from_str(trimmed);
    let frame = serde::Deserializer::deserialize_any(&mut de, FrameVisitor)?;
    de.end()?;
    Ok(frame)
}

struct FrameVisitor;

macro_rules! frame_of_scalar {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E: serde::de::Error>(self, v: $ty) -> Result<Frame, E> {
            Ok(Frame { events: vec![Value::from(v)], skipped: 0 })
        }
    )*};
}

impl<'de> serde::de::Visitor<'de> for FrameVisitor {
    type Value = Frame;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    frame_of_scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Frame, E> {
        Ok(Frame {
            events: vec![Value::String(v)],
            skipped: 0,
        })
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Frame, E> {
        Ok(Frame {
            events: vec![Value::Null],
            skipped: 0,
        })
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Frame, A::Error> {
        use serde::Deserialize;
        let v = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Frame {
            events: vec![v],
            skipped: 0,
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Frame, A::Error> {
        let mut frame = Frame::default();
        while frame.events.len() < MAX_EVENTS_PER_FRAME {
            match seq.next_element::<Value>()? {
                Some(v) => frame.events.push(v),
                None => return Ok(frame),
            }
        }
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            frame.skipped += 1;
        }
        Ok(frame)
    }
}

/// Sorted top-level field names: the "shape" logged once per new kind of frame.
pub fn shape(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
            keys.sort_unstable();
            keys.join(",")
        }
        Value::Array(_) => "<array>".into(),
        Value::String(_) => "<string>".into(),
        Value::Number(_) => "<number>".into(),
        Value::Bool(_) => "<bool>".into(),
        Value::Null => "<null>".into(),
    }
}

/// A fingerprint of `shape(v)` computed without building the string: checked on every
/// frame, while the string is only needed for the log line of a new shape.
pub fn shape_key(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match v {
        Value::Object(m) => {
            // serde_json's map is ordered by key, so the order is already canonical.
            for k in m.keys() {
                k.hash(&mut h);
            }
        }
        other => shape(other).hash(&mut h),
    }
    h.finish()
}

static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh id for an event that does not identify itself: unique across restarts.
fn unique_id(stream: Stream, received: SystemTime) -> String {
    let nonce = NONCE.get_or_init(|| format!("{:06x}", rand::random::<u32>() & 0xff_ffff));
    let ms = received
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{}-{ms:x}-{nonce}-{seq:x}", stream.name())
}

/// An id derived from the frame itself, for frames that identify an occurrence (they carry
/// a time or a key). The same frame read twice (say, on the old and the new socket while
/// a stream is reopened) gets the same id, so it is recognised as a duplicate.
fn content_id(stream: Stream, frame: &Value) -> String {
    let mut h = Sha256::new();
    h.update(stream.name().as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(frame).unwrap_or_default());
    let d = h.finalize();
    format!("{}-{}", stream.name(), hex::encode(&d[..12]))
}

/// Whether the frame names its own occurrence, so a content id is safe.
fn self_identifying(stream: Stream, frame: &Value) -> bool {
    match stream {
        Stream::Alarm => field_any(frame, &["key", "time"]).is_some(),
        Stream::OnlineStatus => field(frame, "time").is_some(),
        Stream::Im => {
            field_any(frame, &["iMsgID", "msgId", "messageId", "msgID", "time"]).is_some()
        }
        Stream::Conference | Stream::Location => false,
    }
}

/// What one upstream event becomes.
#[derive(Debug, Default)]
pub struct Normalised {
    pub event_id: String,
    pub messages: Vec<Message>,
    /// A device seen on the online-status stream, with its availability.
    pub device: Option<(String, bool)>,
    /// The frame lacked what its stream needs (it may still have been published raw).
    pub malformed: Option<&'static str>,
}

/// Normalise one event from `stream`. `received` is when the bridge read it.
pub fn normalise(
    stream: Stream,
    frame: Value,
    received: SystemTime,
    topics: &Topics,
) -> Normalised {
    let event_id = if stream == Stream::Alarm {
        alarm_event_id(&frame)
    } else if self_identifying(stream, &frame) {
        content_id(stream, &frame)
    } else {
        unique_id(stream, received)
    };
    let received_at = rfc3339_millis(received);
    let mut out = Normalised {
        event_id,
        ..Default::default()
    };
    match stream {
        Stream::Alarm => alarm(&mut out, frame, &received_at, topics, false),
        Stream::OnlineStatus => online_status(&mut out, frame, &received_at, topics),
        Stream::Location => location(&mut out, frame, &received_at, topics),
        Stream::Im => {
            let mut p = base_payload(&out.event_id, stream, &received_at);
            copy_str(&mut p, &frame, "type", &["type", "msgType"]);
            copy_str(
                &mut p,
                &frame,
                "from",
                &["from", "srcId", "sourceId", "sender", "fromId"],
            );
            copy_str(
                &mut p,
                &frame,
                "to",
                &["to", "dstId", "targetId", "target", "toId"],
            );
            copy_str(&mut p, &frame, "text", &["text", "content", "msg", "body"]);
            if !frame.is_object() {
                out.malformed = Some("not a JSON object");
            }
            p.insert("raw".into(), frame);
            out.messages.push(Message::event(topics.im_message(), p));
        }
        Stream::Conference => conference(&mut out, frame, &received_at, topics),
    }
    out
}

fn base_payload(event_id: &str, stream: Stream, received_at: &str) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("event_id".into(), Value::String(event_id.to_string()));
    p.insert("stream".into(), Value::String(stream.name().into()));
    p.insert("received_at".into(), Value::String(received_at.to_string()));
    p
}

fn copy_str(p: &mut Map<String, Value>, frame: &Value, out_key: &str, keys: &[&str]) {
    if let Some(v) = field_any(frame, keys)
        && (v.is_string() || v.is_number())
    {
        p.insert(out_key.into(), v.clone());
    }
}

/// The upstream spellings of each alarm field: frames say `devID`/`time`/`desc`, alarm
/// records `device_id`/`timestamp`/`desc` or `description`.
const ALARM_DEVICE: &[&str] = &["devID", "device_id", "deviceId", "puid"];
const ALARM_DEVICE_NAME: &[&str] = &["devName", "device_name", "deviceName"];
const ALARM_TIME: &[&str] = &["time", "timestamp"];
const ALARM_DESC: &[&str] = &["desc", "description"];

/// What tells one alarm occurrence from another: the upstream `key` and its state
/// (the start and the end of one alarm share a key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlarmIdentity {
    pub key: String,
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
const MAX_KEY_BYTES: usize = 128;

/// The identity of an alarm frame or record: its upstream `key` and state; for an alarm
/// without a key, its device, type, time (to the millisecond) and state — the same for
/// the live frame and the record of one alarm, though two keyless alarms of one device
/// and type in the same millisecond become one.
pub fn alarm_identity(frame: &Value) -> Option<AlarmIdentity> {
    let state = alarm_state(frame);
    let key = str_field(frame, &["key"]).filter(|k| !k.is_empty());
    let key = match key {
        Some(k) if k.len() <= MAX_KEY_BYTES => k.into_owned(),
        Some(k) => format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes()))),
        None => {
            let device = str_field(frame, ALARM_DEVICE).unwrap_or_default();
            let kind = field(frame, "type").and_then(as_i64)?;
            let at = alarm_millis(frame)?;
            let mut h = Sha256::new();
            h.update(device.as_bytes());
            h.update([0]);
            h.update(kind.to_be_bytes());
            h.update(at.to_be_bytes());
            format!("nokey:{}", hex::encode(&h.finalize()[..16]))
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

fn alarm(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics, backfilled: bool) {
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

fn online_status(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics) {
    let kind = str_field(&frame, &["type"])
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    let online = field(&frame, "status").and_then(as_i64).map(|s| s == 1);
    let device = field(&frame, "device").filter(|d| d.is_object());
    let user = field(&frame, "user").filter(|u| u.is_object());
    let device_id = device
        .and_then(|d| str_field(d, &["id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    let user_id = user
        .and_then(|u| str_field(u, &["id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    let time = field(&frame, "time")
        .and_then(upstream_time)
        .unwrap_or_else(|| received_at.to_string());
    let word = |on: bool| if on { "online" } else { "offline" };

    let mut ev = base_payload(&out.event_id, Stream::OnlineStatus, received_at);
    ev.insert("type".into(), Value::String(kind.clone()));
    ev.insert(
        "status".into(),
        online.map_or(Value::Null, |o| Value::String(word(o).into())),
    );
    ev.insert("online".into(), online.map_or(Value::Null, Value::Bool));
    ev.insert(
        "device_id".into(),
        device_id.clone().map_or(Value::Null, Value::String),
    );
    ev.insert(
        "user_id".into(),
        user_id.clone().map_or(Value::Null, Value::String),
    );
    ev.insert("time".into(), Value::String(time.clone()));

    match online {
        None => out.malformed = Some("online-status frame without a 0/1 status"),
        Some(_) if device_id.is_none() && user_id.is_none() => {
            out.malformed = Some("online-status frame without device.id or user.id")
        }
        Some(on) => {
            if let Some(id) = &device_id {
                out.messages.push(Message::state_text(
                    topics.device_availability(id),
                    word(on),
                ));
                let d = device.expect("device_id implies device");
                let mut st = Map::new();
                st.insert("device_id".into(), Value::String(id.clone()));
                st.insert("online".into(), Value::Bool(on));
                st.insert("status".into(), Value::String(word(on).into()));
                st.insert("type".into(), Value::String(kind.clone()));
                st.insert(
                    "name".into(),
                    str_field(d, &["name"]).map_or(Value::Null, |s| Value::String(s.into_owned())),
                );
                for (out_key, keys) in [
                    ("group_id", &["gid"][..]),
                    ("manufacturer", &["manufacturer"][..]),
                    ("product", &["product"][..]),
                    ("software_version", &["softwareVersion"][..]),
                    ("hardware_version", &["hardwareVersion"][..]),
                ] {
                    copy_str(&mut st, d, out_key, keys);
                }
                if let Some(net) = field(&frame, "network").filter(|n| n.is_object()) {
                    st.insert("network".into(), net.clone());
                }
                st.insert("time".into(), Value::String(time.clone()));
                st.insert("updated_at".into(), Value::String(received_at.to_string()));
                st.insert("event_id".into(), Value::String(out.event_id.clone()));
                st.insert("raw".into(), frame.clone());
                out.messages
                    .push(Message::state(topics.device_status(id), st));
                out.device = Some((id.clone(), on));
            }
            if let Some(id) = &user_id {
                out.messages
                    .push(Message::state_text(topics.user_availability(id), word(on)));
            }
        }
    }
    ev.insert("raw".into(), frame);
    // The event goes last so a consumer reacting to it finds the state already updated.
    out.messages
        .push(Message::event(topics.online_status_event(), ev));
}

fn location(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics) {
    let Some(id) = str_field(&frame, &["devId", "puid", "deviceId", "id"])
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty())
    else {
        out.malformed = Some("GPS frame without devId");
        return;
    };
    let (Some(lat), Some(lng)) = (
        field_any(&frame, &["lat", "latitude"]).and_then(as_f64),
        field_any(&frame, &["lng", "lon", "longitude"]).and_then(as_f64),
    ) else {
        out.malformed = Some("GPS frame without numeric lat/lng");
        return;
    };
    let time = field_any(&frame, &["time", "timestamp"])
        .and_then(upstream_time)
        .unwrap_or_else(|| received_at.to_string());
    let mut p = base_payload(&out.event_id, Stream::Location, received_at);
    p.insert("device_id".into(), Value::String(id.clone()));
    p.insert("lat".into(), json!(lat));
    p.insert("lng".into(), json!(lng));
    if let Some(h) = field(&frame, "height").and_then(as_f64) {
        p.insert("height".into(), json!(h));
    }
    p.insert("time".into(), Value::String(time));
    p.insert("raw".into(), frame);
    out.messages
        .push(Message::state(topics.device_location(&id), p));
}

fn conference(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics) {
    let event = str_field(&frame, &["type", "event", "eventType"]).map(Cow::into_owned);
    let id = field_any(&frame, &["confInfo", "conference", "group"])
        .and_then(|c| str_field(c, &["id", "groupId", "confId"]))
        .or_else(|| str_field(&frame, &["confId", "conferenceId", "groupId", "id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    if event.is_none() {
        out.malformed = Some("conference frame without an event type");
    }
    let mut p = base_payload(&out.event_id, Stream::Conference, received_at);
    p.insert(
        "event".into(),
        event.clone().map_or(Value::Null, Value::String),
    );
    p.insert("id".into(), id.clone().map_or(Value::Null, Value::String));
    copy_str(
        &mut p,
        &frame,
        "operation",
        &["operate", "op", "action", "operation"],
    );
    p.insert("raw".into(), frame);
    let topic = topics.conference(
        id.as_deref().unwrap_or("_"),
        event.as_deref().unwrap_or("_"),
    );
    out.messages.push(Message::event(topic, p));
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("b")
    }

    fn payload(m: &Message) -> Value {
        serde_json::from_slice(&m.payload).unwrap()
    }

    #[test]
    fn alarm_labels_follow_the_table() {
        assert_eq!(alarm_label(5), "sos");
        assert_eq!(alarm_label(4106), "overspeed");
        assert_eq!(alarm_label(0x1019), "working_at_height");
        assert_eq!(alarm_label(20481), "user_logout");
        assert_eq!(alarm_label(8192), "type_8192");
        assert_eq!(alarm_label(-1), "type_-1");
    }

    #[test]
    fn keys_are_case_insensitive_and_numbers_may_be_strings() {
        let v = json!({"DevId": "PU_1", "LAT": "31.5", "lng": 117});
        assert_eq!(field(&v, "devId").and_then(as_string).unwrap(), "PU_1");
        assert_eq!(field(&v, "lat").and_then(as_f64), Some(31.5));
        assert_eq!(field(&v, "lng").and_then(as_f64), Some(117.0));
    }

    #[test]
    fn upstream_times_in_seconds_or_millis() {
        assert_eq!(
            upstream_time(&json!(1_717_400_123)).unwrap(),
            "2024-06-03T07:35:23.000Z"
        );
        assert_eq!(
            upstream_time(&json!(1_717_400_123_456_i64)).unwrap(),
            "2024-06-03T07:35:23.456Z"
        );
        assert_eq!(
            upstream_time(&json!("1717400123")).unwrap(),
            "2024-06-03T07:35:23.000Z"
        );
        assert!(upstream_time(&json!(0)).is_none());
    }

    #[test]
    fn upstream_times_of_any_size_are_sane_or_none() {
        let want = "2024-07-18T03:20:00.000Z";
        for v in [
            json!(1_721_272_800_i64),
            json!(1_721_272_800_000_i64),
            json!(1_721_272_800_000_000_i64),
            json!(1_721_272_800_000_000_000_i64),
            json!("1721272800000000"),
            json!(1_721_272_800.0),
        ] {
            assert_eq!(upstream_time(&v).as_deref(), Some(want), "{v}");
        }
        for v in [
            json!(99_999_999_999_999_999_i64),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(-5),
            json!(1e300),
            json!(-1e300),
            json!("soon"),
            json!(""),
            json!(null),
            json!([1]),
            json!({"t": 1}),
        ] {
            assert!(upstream_time(&v).is_none(), "{v}");
        }
    }

    #[test]
    fn keyless_and_huge_keyed_alarms_have_a_bounded_shared_identity() {
        let frame = json!({"type": 5, "time": 1717400123, "devID": "PU_1", "status": 0});
        let record = json!({"type": 5, "timestamp": 1717400123, "device_id": "PU_1", "status": 0});
        let a = alarm_identity(&frame).unwrap();
        assert_eq!(Some(&a), alarm_identity(&record).as_ref());
        assert!(a.key.starts_with("nokey:"), "{a:?}");
        let later = json!({"type": 5, "time": 1717400124, "devID": "PU_1", "status": 0});
        assert_ne!(Some(a), alarm_identity(&later));
        assert!(alarm_identity(&json!({"type": 5, "devID": "PU_1"})).is_none());
        let huge = json!({"key": "k".repeat(100_000), "status": 1});
        let h = alarm_identity(&huge).unwrap();
        assert!(h.key.len() < 80 && h.key.starts_with("sha256:"), "{h:?}");
        assert_eq!(h.state, "end");
    }

    #[test]
    fn an_alarm_record_is_the_same_event_as_its_frame() {
        let frame = json!({"key": "k1", "type": 5, "time": 1717400123, "devID": "PU_1",
            "devName": "Helmet", "status": 0, "desc": "SOS"});
        let record = json!({"key": "k1", "type": 5, "timestamp": 1717400123, "device_id": "PU_1",
            "status": 0, "description": "SOS"});
        let live = normalise(Stream::Alarm, frame, UNIX_EPOCH, &topics());
        let back = normalise_alarm_record(record, SystemTime::now(), &topics());
        assert_eq!(live.event_id, back.event_id);
        assert_eq!(live.messages[0].topic, back.messages[0].topic);
        let (a, b) = (payload(&live.messages[0]), payload(&back.messages[0]));
        for k in [
            "type",
            "label",
            "state",
            "device_id",
            "description",
            "time",
            "key",
            "event_id",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
        assert_eq!(b["backfilled"], true);
        assert!(a.get("backfilled").is_none());
        // The end of the same alarm is another event.
        let end = json!({"key": "k1", "type": 5, "time": 1717400200, "devID": "PU_1", "status": 1});
        assert_ne!(alarm_event_id(&end), live.event_id);
        // An alarm frame repeated with other content is still the same alarm.
        let again = json!({"key": "k1", "type": 5, "time": 1717400123, "devID": "PU_1", "status": 0, "x": 1});
        assert_eq!(alarm_event_id(&again), live.event_id);
    }

    #[test]
    fn frames_split_into_events() {
        assert!(split_frame("").unwrap().events.is_empty());
        assert!(split_frame("  ").unwrap().events.is_empty());
        assert_eq!(
            split_frame("[{\"a\":1},{\"a\":2}]").unwrap().events.len(),
            2
        );
        assert_eq!(
            split_frame("{\"a\":[1,{\"b\":null}]}").unwrap().events,
            vec![json!({"a": [1, {"b": null}]})]
        );
        assert_eq!(split_frame("42").unwrap().events, vec![json!(42)]);
        assert_eq!(split_frame("\"x\"").unwrap().events, vec![json!("x")]);
        assert!(split_frame("not json").is_err());
        assert!(split_frame("{\"a\":1} trailing").is_err());
        assert!(split_frame("[1,2").is_err());
        let huge = format!("[{}{{}}]", "{},".repeat(MAX_EVENTS_PER_FRAME + 499));
        let f = split_frame(&huge).unwrap();
        assert_eq!((f.events.len(), f.skipped), (MAX_EVENTS_PER_FRAME, 500));
    }

    #[test]
    fn alarm_payload_has_contract_fields() {
        let frame = json!({"key": "a8f3c1e2", "type": 4106, "time": 1717400123, "userID": "", "userName": "",
            "devID": "PU_264F708E", "devName": "Truck 7", "subDevIdx": 65536, "status": 0,
            "desc": "overspeed", "lat": 31.849722, "lng": 117.207138, "payload": ""});
        let n = normalise(Stream::Alarm, frame.clone(), UNIX_EPOCH, &topics());
        assert_eq!(n.messages.len(), 1);
        let m = &n.messages[0];
        assert_eq!(m.topic, "b/device/PU_264F708E/alarm/overspeed");
        assert!(!m.retain);
        let p = payload(m);
        assert_eq!(p["event_id"], n.event_id.as_str());
        assert_eq!(p["stream"], "alarm");
        assert_eq!(p["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(p["type"], 4106);
        assert_eq!(p["label"], "overspeed");
        assert_eq!(p["state"], "start");
        assert_eq!(p["device_id"], "PU_264F708E");
        assert_eq!(p["device_name"], "Truck 7");
        assert_eq!(p["description"], "overspeed");
        assert_eq!(p["time"], "2024-06-03T07:35:23.000Z");
        assert_eq!(p["lat"], 31.849722);
        assert_eq!(p["raw"], frame);
        // The same frame read again gets the same id: a redelivery, not a new alarm.
        let again = normalise(Stream::Alarm, frame, SystemTime::now(), &topics());
        assert_eq!(again.event_id, n.event_id);
    }

    #[test]
    fn alarm_without_device_or_type_still_published() {
        let n = normalise(
            Stream::Alarm,
            json!({"type": "5", "status": 1}),
            UNIX_EPOCH,
            &topics(),
        );
        assert_eq!(n.messages[0].topic, "b/alarm/sos");
        assert_eq!(payload(&n.messages[0])["state"], "end");
        assert!(payload(&n.messages[0]).get("lat").is_none());
        let n = normalise(
            Stream::Alarm,
            json!({"devID": "PU_1"}),
            UNIX_EPOCH,
            &topics(),
        );
        assert_eq!(n.messages[0].topic, "b/device/PU_1/alarm/unknown");
        assert!(n.malformed.is_some());
    }

    #[test]
    fn online_status_sets_state_and_event() {
        let frame = json!({"type": "PU", "time": 1717400000, "status": 1,
            "device": {"id": "PU_55AA0000", "name": "Helmet 07"}});
        let n = normalise(Stream::OnlineStatus, frame, UNIX_EPOCH, &topics());
        let topics: Vec<_> = n
            .messages
            .iter()
            .map(|m| (m.topic.as_str(), m.retain))
            .collect();
        assert_eq!(
            topics,
            vec![
                ("b/device/PU_55AA0000/availability", true),
                ("b/device/PU_55AA0000/status", true),
                ("b/event/online_status", false)
            ]
        );
        assert_eq!(&n.messages[0].payload[..], b"online");
        assert_eq!(payload(&n.messages[1])["name"], "Helmet 07");
        assert_eq!(n.device, Some(("PU_55AA0000".into(), true)));
        let cu = json!({"type": "CU", "status": 0, "user": {"id": "CU_ops"}});
        let n = normalise(Stream::OnlineStatus, cu, UNIX_EPOCH, &Topics::new("b"));
        assert_eq!(n.messages[0].topic, "b/user/CU_ops/availability");
        assert_eq!(&n.messages[0].payload[..], b"offline");
    }

    #[test]
    fn location_is_retained_state() {
        let frame = json!({"devId": "PU_1", "lat": 31.849722, "lng": 117.207138, "height": 35.2});
        let n = normalise(Stream::Location, frame, UNIX_EPOCH, &topics());
        let m = &n.messages[0];
        assert_eq!(m.topic, "b/device/PU_1/location");
        assert!(m.retain);
        let p = payload(m);
        assert_eq!(p["lat"], 31.849722);
        assert_eq!(p["height"], 35.2);
        assert_eq!(p["stream"], "location");
        assert_eq!(p["time"], "1970-01-01T00:00:00.000Z");
        let bad = normalise(Stream::Location, json!({"lat": 1}), UNIX_EPOCH, &topics());
        assert!(bad.messages.is_empty() && bad.malformed.is_some());
    }

    #[test]
    fn conference_topic_from_type_and_id() {
        let frame = json!({"type": "member", "operate": "start-speak",
            "member": {"id": 3, "memberID": "PU_55AA0000"}, "confInfo": {"id": "CONF_0001"}});
        let n = normalise(Stream::Conference, frame, UNIX_EPOCH, &topics());
        assert_eq!(n.messages[0].topic, "b/conference/CONF_0001/member");
        assert_eq!(payload(&n.messages[0])["operation"], "start-speak");
        let n = normalise(Stream::Conference, json!({"x": 1}), UNIX_EPOCH, &topics());
        assert_eq!(n.messages[0].topic, "b/conference/_/_");
    }

    #[test]
    fn shape_keys_follow_field_names_not_values() {
        let a = json!({"devId": "PU_1", "lat": 1.0});
        let b = json!({"lat": 2.0, "devId": "PU_2"});
        let c = json!({"devId": "PU_1", "lat": 1.0, "height": 3});
        assert_eq!(shape_key(&a), shape_key(&b));
        assert_ne!(shape_key(&a), shape_key(&c));
        assert_eq!(shape(&b), "devId,lat");
    }

    #[test]
    fn unique_ids_differ() {
        let a = normalise(
            Stream::Conference,
            json!({"type": "group"}),
            UNIX_EPOCH,
            &topics(),
        );
        let b = normalise(
            Stream::Conference,
            json!({"type": "group"}),
            UNIX_EPOCH,
            &topics(),
        );
        assert_ne!(a.event_id, b.event_id);
    }

    #[test]
    fn device_records_from_the_list() {
        let r = DeviceRecord::from_value(json!({"id": "PU_1", "status": 1, "gps": {"lng": 117.2, "lat": 31.8, "time": 1717399990}})).unwrap();
        assert!(r.online);
        let msgs = r.messages(UNIX_EPOCH, &topics());
        assert_eq!(msgs.len(), 2);
        assert_eq!(payload(&msgs[1])["time"], "2024-06-03T07:33:10.000Z");
        let r = DeviceRecord::from_value(
            json!({"id": "PU_2", "status": 0, "gps": {"lng": 0, "lat": 0}}),
        )
        .unwrap();
        assert_eq!(r.messages(UNIX_EPOCH, &topics()).len(), 1);
        assert!(DeviceRecord::from_value(json!({"name": "x"})).is_none());
    }
}
