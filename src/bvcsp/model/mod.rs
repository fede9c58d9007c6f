//! Turning upstream frames into contract payloads. Frames are parsed into
//! `serde_json::Value` and read through tolerant views: keys are matched without regard
//! to case, numbers may arrive as strings, unknown fields are kept in `raw`.

mod alarm;
mod device;
mod events;
mod frame;

use alarm::alarm;
pub use alarm::{
    ALARM_LABELS, AlarmIdentity, OTHER_EVENT_TYPE, alarm_event_id, alarm_event_type,
    alarm_identity, alarm_label, alarm_millis, alarm_state, normalise_alarm_record,
};
pub use device::DeviceRecord;
use events::{conference, location, online_status};
pub use frame::{Frame, MAX_EVENTS_PER_FRAME, shape, shape_key, split_frame};

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
    /// A user (CU terminal) seen on the online-status stream, with its availability.
    pub user: Option<(String, bool)>,
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

#[cfg(test)]
mod tests;
