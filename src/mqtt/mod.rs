//! The MQTT side: topics, the outbox every message passes through, and the publisher
//! that drives rumqttc and settles outbox entries on the broker's acknowledgement.

pub mod dead_letters;
pub mod outbox;
pub mod publisher;
pub mod topics;

use bytes::Bytes;
use serde_json::{Map, Value};

pub use outbox::Outbox;
pub use publisher::{MqttStatus, Publisher};
pub use topics::Topics;

/// One message to publish. Retained messages are state: a newer one for the same topic
/// supersedes an older one that has not been sent yet. Others are events: never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Message {
    pub fn event(topic: String, payload: Map<String, Value>) -> Message {
        Message {
            topic,
            payload: to_bytes(payload),
            retain: false,
        }
    }
    pub fn state(topic: String, payload: Map<String, Value>) -> Message {
        Message {
            topic,
            payload: to_bytes(payload),
            retain: true,
        }
    }
    pub fn state_text(topic: String, text: &str) -> Message {
        Message {
            topic,
            payload: Bytes::copy_from_slice(text.as_bytes()),
            retain: true,
        }
    }
    pub fn state_json(topic: String, payload: &Value) -> Message {
        Message {
            topic,
            payload: Bytes::from(serde_json::to_vec(payload).unwrap_or_default()),
            retain: true,
        }
    }
}

/// The payload's JSON in an allocation of its exact size: it may wait in memory (the
/// outbox's queue, its resident messages, rumqttc's in-flight window) by the thousand,
/// and `to_vec`'s doubling left a third of each unused (measured with massif in a burst).
/// The text is written into a reused buffer first, so a payload costs one allocation.
fn to_bytes(payload: Map<String, Value>) -> Bytes {
    /// A buffer grown past this by an odd huge payload is not kept.
    const KEEP_MAX: usize = 64 << 10;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        // Serialising a Map of Values into memory cannot fail.
        let out = match serde_json::to_writer(&mut *buf, &Value::Object(payload)) {
            Ok(()) => Bytes::copy_from_slice(buf),
            Err(_) => Bytes::new(),
        };
        if buf.capacity() > KEEP_MAX {
            *buf = Vec::with_capacity(1024);
        }
        out
    })
}
