//! Messages from the broker on the subscribed command topics, passed on to whoever
//! handles them (the play boxes, Home Assistant, the bridge API), size-capped.

use std::time::Duration;

use tracing::warn;

use super::PublisherState;

/// Commands (on the subscribed `…/set` topics) larger than this are dropped unread. A
/// larger packet is still read off the connection (refusing it would mean disconnecting,
/// and the broker would send it again at once, in a loop).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

/// A message from the broker on one of the subscribed command topics.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub retain: bool,
    /// The payload's size as sent: more than `payload` holds when it was too large to
    /// keep (then `payload` is empty), so a bridge request can still be answered.
    pub size: usize,
}

/// Pass a publish from the broker on, or count it as dropped (too large, or too many
/// waiting).
pub(super) fn deliver(state: &PublisherState, p: &rumqttc::Publish, dropped_log: &mut RateLimited) {
    if let Some(tx) = &state.incoming {
        let dropped = if p.payload.len() > MAX_COMMAND_BYTES {
            let _ = tx.try_send(Incoming {
                topic: p.topic.clone(),
                payload: bytes::Bytes::new(),
                retain: p.retain,
                size: p.payload.len(),
            });
            Some(format!(
                "{} bytes, more than a command may be ({MAX_COMMAND_BYTES})",
                p.payload.len()
            ))
        } else {
            let msg = Incoming {
                topic: p.topic.clone(),
                payload: p.payload.clone(),
                retain: p.retain,
                size: p.payload.len(),
            };
            tx.try_send(msg)
                .err()
                .map(|_| "too many commands waiting".to_string())
        };
        if let Some(why) = dropped {
            state.status.send_modify(|s| s.incoming_dropped += 1);
            dropped_log.note(&p.topic, &why);
        }
    }
}

/// A warning logged at most once a minute, with how many were left out in between.
#[derive(Default)]
pub(super) struct RateLimited {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn note(&mut self, topic: &str, why: &str) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            self.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut self.suppressed);
        let more = if more > 0 {
            format!(" ({more} more dropped since the last report)")
        } else {
            String::new()
        };
        warn!("dropping a message on {topic}: {why}{more}");
        self.last = Some(tokio::time::Instant::now());
    }
}
