//! The feeder: hands durable messages (and the newest [`super::Direct`] publish) to
//! rumqttc while connected, at most `WINDOW` unacknowledged; a message that can never
//! be published becomes a dead letter instead.
//!
//! Only the feeder hands requests over, only while connected, and under the same lock
//! the driver takes when the connection fails (see `driver.rs`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{InFlight, MQTT_MAX_PACKET, PublisherState, WINDOW};
use crate::mqtt::Message;

pub(super) async fn feed(state: Arc<PublisherState>, stop: CancellationToken) {
    loop {
        // Register interest before checking, so no wake-up is lost in between.
        let progress = state.progress.notified();
        let sendable = state.outbox.sendable();
        let mut handed = false;
        {
            let mut corr = state.corr();
            while corr.connected && corr.in_hand() < WINDOW {
                let direct = state.direct().take();
                if let Some(msg) = direct {
                    if !state.hand_over(&mut corr, InFlight::Direct, msg.clone()) {
                        state.direct().get_or_insert(msg);
                        break;
                    }
                    handed = true;
                    continue;
                }
                let Some((id, msg)) = state.outbox.take_next() else {
                    break;
                };
                if let Some(reason) = unpublishable(&msg, state.max_packet) {
                    state.outbox.dead_letter(id, &reason);
                    continue;
                }
                if !state.hand_over(&mut corr, InFlight::Outbox(id), msg) {
                    state.outbox.untake(id);
                    break;
                }
                handed = true;
            }
        }
        if handed {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = progress => {}
            _ = sendable => {}
        }
    }
}

/// The size of the PUBLISH packet carrying `msg` (with a packet id), as rumqttc checks it.
fn packet_size(msg: &Message) -> usize {
    let len = 2 + msg.topic.len() + 2 + msg.payload.len();
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

/// Why `msg` can never be published (so it goes to the dead letters), if it cannot.
fn unpublishable(msg: &Message, max_packet: usize) -> Option<String> {
    let size = packet_size(msg);
    if msg.topic.contains(['+', '#']) {
        // The broker would close the connection over it (MQTT 3.1.1 §4.7.1).
        Some("its topic contains an MQTT wildcard (+ or #)".to_string())
    } else if msg.topic.len() > usize::from(u16::MAX) {
        Some(format!(
            "its topic is {} bytes long, more than MQTT allows (65535)",
            msg.topic.len()
        ))
    } else if size > max_packet.min(MQTT_MAX_PACKET) {
        Some(format!(
            "the packet would be {size} bytes, larger than mqtt.max_packet_size ({max_packet})"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: usize) -> Message {
        Message {
            topic: topic.into(),
            payload: vec![b'x'; payload].into(),
            retain: false,
        }
    }

    #[test]
    fn what_the_broker_would_refuse_is_told_before_it_is_sent() {
        assert_eq!(
            unpublishable(&msg("base/device/PU_1/alarm/sos", 100), 1 << 20),
            None
        );
        for bad in ["base/device/+/alarm", "base/#", "base/a+b"] {
            let why = unpublishable(&msg(bad, 10), 1 << 20).expect(bad);
            assert!(why.contains("wildcard"), "{why}");
        }
        let long = "t".repeat(70_000);
        assert!(
            unpublishable(&msg(&long, 1), 1 << 20)
                .unwrap()
                .contains("65535")
        );
        let why = unpublishable(&msg("base/x", 2000), 1000).unwrap();
        assert!(why.contains("max_packet_size (1000)"), "{why}");
    }
}
