//! One WebSocket text into events, bounded, and the shape of a frame for the log.

use super::*;

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
