//! The driver: polls rumqttc's event loop (connect → run → back off, the wait chosen by
//! `reconnect.rs`), maps and settles packet ids (`correlation.rs`), passes commands on
//! (`incoming.rs`), and after a loss puts rumqttc's pending list back in order.
//!
//! Only the feeder hands requests over, only while connected, and under the same lock
//! the driver takes when the connection fails; after a failure the driver calls
//! `EventLoop::clean` again under that lock so that a request handed over in the instant
//! between rumqttc's own clean-up and ours also lands in rumqttc's pending list, in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::correlation::{self, Correlation, InFlight};
use super::incoming::{self, RateLimited};
use super::reconnect::{Reconnect, port_opens, port_was_closed};
use super::{PublisherState, offline_msg, online_msg};

/// A message is refused by the broker when the connection is lost this many times in a
/// row, each within `STRIKE_WINDOW` of connecting, with it the oldest message in flight.
const STRIKES: u32 = 3;
const STRIKE_WINDOW: Duration = Duration::from_secs(10);
/// Only a message at least this large can be struck: no broker limit is smaller, and an
/// alarm or a state update (well under it) is never taken for the cause of a broker
/// that merely flaps, or of another client taking over our client id.
const STRIKE_MIN_BYTES: usize = 4096;

pub(super) async fn drive(
    state: Arc<PublisherState>,
    mut eventloop: EventLoop,
    mut reconnect: Reconnect,
    broker: (String, u16),
    stop: CancellationToken,
    heartbeats: Arc<crate::heartbeat::Heartbeats>,
    alive: Duration,
) {
    // poll() yields at least once per keepalive (the ping) while connected, and within
    // the connect timeout while not.
    let _alive = crate::heartbeat::BeatGuard::new(&heartbeats, "mqtt", alive);
    // When the current connection was made (None while not connected).
    let mut connected_at: Option<tokio::time::Instant> = None;
    let mut dropped_log = RateLimited::default();
    let mut beat = crate::heartbeat::PacedBeat::new("mqtt");
    loop {
        beat.beat(&heartbeats, alive);
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected_at = Some(tokio::time::Instant::now());
                {
                    let mut corr = state.corr();
                    corr.connected = true;
                    if !ack.session_present {
                        // rumqttc dropped everything it held: start over from the outbox.
                        // Events it buffered from the dead connection (a publish whose
                        // write failed) describe packets that no longer exist.
                        eventloop.state.events.clear();
                        eventloop.state.collision = None;
                        corr.fifo.clear();
                        corr.inflight.clear();
                        state.outbox.rewind();
                    }
                    // Once stopping, a reconnect must not undo the `offline` we said.
                    if corr.closing {
                        state.hand_over(&mut corr, InFlight::Offline, offline_msg(&state.topics));
                    } else {
                        state.hand_over(&mut corr, InFlight::Online, online_msg(&state.topics));
                    }
                }
                if !state.subscriptions.is_empty() {
                    let filters = state
                        .subscriptions
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = state.client.try_subscribe_many(filters) {
                        warn!("cannot subscribe to the command topics: {e}");
                    }
                }
                state.status.send_modify(|s| {
                    s.connected = true;
                    s.connects += 1;
                });
                reconnect.connected(ack.session_present);
                state.progress.notify_one();
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => correlation::sent(&state, pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) if state.qos == QoS::AtLeastOnce => {
                correlation::acknowledge(&state, ack.pkid);
            }
            Ok(Event::Incoming(Packet::PubComp(ack))) if state.qos == QoS::ExactlyOnce => {
                correlation::acknowledge(&state, ack.pkid);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                incoming::deliver(&state, &p, &mut dropped_log);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!("mqtt disconnect sent");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                {
                    let mut corr = state.corr();
                    corr.connected = false;
                    eventloop.clean();
                    requeue_in_order(&mut eventloop);
                    if let Some(at) = connected_at.take() {
                        strike(&state, &mut corr, &mut eventloop, at.elapsed());
                    }
                }
                let text = describe(&e);
                state.status.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(text.clone());
                });
                let delay = reconnect.failed(&e, &text);
                beat.beat_now(&heartbeats, delay + alive);
                let probe = port_was_closed(&e);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                    // A long outage must not cost a long backoff after the broker is back.
                    _ = port_opens(&broker.0, broker.1), if probe => {}
                }
            }
        }
    }
    state.status.send_modify(|s| s.connected = false);
    state.driver_done.notify_one();
}

/// After a connection loss, make rumqttc's pending list match our FIFO: packets that
/// already have an id (retransmissions, which we have mapped) go first, then the ones
/// without, in the order they were handed over. A publish held back by a packet-id
/// collision is not in pending at all (rumqttc keeps it aside and never sent it): it
/// belongs, without its id, before everything handed over after it.
fn requeue_in_order(eventloop: &mut EventLoop) {
    use rumqttc::Request;
    let has_id = |r: &Request| match r {
        Request::Publish(p) => p.pkid != 0,
        Request::PubRel(_) => true,
        _ => false,
    };
    let mut pending: Vec<Request> = eventloop.pending.drain(..).collect();
    // Stable: relative order within each group is kept.
    pending.sort_by_key(|r| !has_id(r));
    let mut pending: VecDeque<Request> = pending.into();
    if let Some(mut held) = eventloop.state.collision.take() {
        held.pkid = 0;
        let at = pending
            .iter()
            .position(|r| !has_id(r))
            .unwrap_or(pending.len());
        pending.insert(at, Request::Publish(held));
    }
    eventloop.pending = pending;
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

/// The connection was lost: if it had only just been made and the same message has been
/// the oldest in flight every time, the broker is refusing it (say, larger than its own
/// limit). Then it becomes a dead letter and leaves rumqttc's queue, so the messages
/// behind it go on. Runs with rumqttc's pending requests collected (after `clean`).
fn strike(
    state: &PublisherState,
    corr: &mut Correlation,
    eventloop: &mut EventLoop,
    up_for: Duration,
) {
    let oldest = corr
        .inflight
        .iter()
        .filter_map(|(pkid, what)| match what {
            InFlight::Outbox(id) => Some((*id, *pkid)),
            _ => None,
        })
        .min();
    let Some((id, pkid)) = oldest else {
        corr.suspect = None;
        return;
    };
    let size = eventloop.pending.iter().find_map(|r| match r {
        rumqttc::Request::Publish(p) if p.pkid == pkid => Some(p.topic.len() + p.payload.len()),
        _ => None,
    });
    if up_for > STRIKE_WINDOW || size.is_none_or(|n| n < STRIKE_MIN_BYTES) {
        corr.suspect = None;
        return;
    }
    let strikes = match corr.suspect {
        Some((suspect, n)) if suspect == id => n + 1,
        _ => 1,
    };
    if strikes < STRIKES {
        corr.suspect = Some((id, strikes));
        return;
    }
    corr.suspect = None;
    corr.inflight.remove(&pkid);
    eventloop
        .pending
        .retain(|r| !matches!(r, rumqttc::Request::Publish(p) if p.pkid == pkid));
    state.outbox.dead_letter(
        id,
        &format!(
            "the broker closed the connection {STRIKES} times in a row right after it was sent (larger than the broker accepts, or refused)"
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, MqttOptions, Publish, Request};

    fn publish(topic: &str, pkid: u16) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, "x");
        p.pkid = pkid;
        p
    }

    #[test]
    fn requeue_matches_the_order_requests_were_handed_over() {
        let (_client, mut el) = AsyncClient::new(MqttOptions::new("t", "localhost", 1883), 10);
        // After a second loss mid-replay: an unsent remainder, then this session's
        // in-flight packets (with ids), then what was still in the channel.
        el.pending = VecDeque::from([
            Request::Publish(publish("c", 0)),
            Request::Publish(publish("a", 3)),
            Request::Publish(publish("b", 4)),
            Request::Publish(publish("d", 0)),
        ]);
        el.state.collision = Some(publish("held", 5));
        requeue_in_order(&mut el);
        let order: Vec<(String, u16)> = el
            .pending
            .iter()
            .map(|r| match r {
                Request::Publish(p) => (p.topic.clone(), p.pkid),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("a".into(), 3),
                ("b".into(), 4),
                ("held".into(), 0),
                ("c".into(), 0),
                ("d".into(), 0)
            ]
        );
        assert!(el.state.collision.is_none());
    }
}
