//! Drives rumqttc: connect → run → back off, feeding it from the outbox and settling
//! outbox entries only on the broker's acknowledgement.
//!
//! rumqttc has no per-publish completion, so acknowledgements are correlated here
//! (shared/notes/rust.md §4): requests leave rumqttc in FIFO order, so every request we
//! hand over is appended to `fifo`; `Outgoing::Publish(pkid)` with an unmapped pkid pops
//! the front and maps the pkid to it (a mapped pkid is a retransmission); `PubAck` (or
//! `PubComp` at QoS 2) settles the pkid. On a new broker session rumqttc silently drops
//! everything it held, so the correlation is cleared and the outbox rewound.
//!
//! Only the feeder hands requests over, only while connected, and under the same lock
//! the driver takes when the connection fails; after a failure the driver calls
//! `EventLoop::clean` again under that lock so that a request handed over in the instant
//! between rumqttc's own clean-up and ours also lands in rumqttc's pending list, in order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{Message, Outbox, Topics};
use crate::config::MqttConfig;
use crate::retry::{Backoff, Policy};
use crate::tls::{self, ClientAuth, Trust};

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

/// Requests handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 256;
/// A message is refused by the broker when the connection is lost this many times in a
/// row, each within `STRIKE_WINDOW` of connecting, with it the oldest message in flight.
const STRIKES: u32 = 3;
const STRIKE_WINDOW: Duration = Duration::from_secs(10);
/// Only a message at least this large can be struck: no broker limit is smaller, and an
/// alarm or a state update (well under it) is never taken for the cause of a broker
/// that merely flaps, or of another client taking over our client id.
const STRIKE_MIN_BYTES: usize = 4096;
/// The largest packet MQTT can carry (a 4-byte remaining length, plus the fixed header).
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;
/// Commands (on the subscribed `…/set` topics) larger than this are dropped unread. A
/// larger packet is still read off the connection (refusing it would mean disconnecting,
/// and the broker would send it again at once, in a loop).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("mqtt.tls: {0}")]
    Tls(#[from] tls::TlsError),
}

/// What the bridge's own status publishes are, for correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Outbox(u64),
    Online,
    Offline,
    /// A publish that bypassed the outbox (see [`Direct`]).
    Direct,
}

#[derive(Debug, Default)]
struct Correlation {
    connected: bool,
    /// Shutting down: the bridge's state is `offline` from now on.
    closing: bool,
    /// Handed over, packet id not yet known.
    fifo: VecDeque<Slot>,
    /// Packet id -> what it carries, until acknowledged.
    inflight: HashMap<u16, Slot>,
    /// The message suspected of making the broker close the connection, and how often
    /// it has (see `STRIKES`).
    suspect: Option<(u64, u32)>,
}

impl Correlation {
    fn in_hand(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }
}

/// Broker connection state, for health and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    pub connects: u64,
    pub last_error: Option<String>,
    /// Messages on the command topics that were dropped (too large, or too many waiting).
    pub incoming_dropped: u64,
}

struct Shared {
    outbox: Arc<Outbox>,
    topics: Topics,
    qos: QoS,
    max_packet: usize,
    client: AsyncClient,
    corr: Mutex<Correlation>,
    /// Signalled when the feeder may make progress (connected, or window space).
    progress: Notify,
    offline_acked: Notify,
    driver_done: Notify,
    /// Command topics to subscribe to after every connect, and where their messages go.
    subscriptions: Vec<String>,
    incoming: Option<tokio::sync::mpsc::Sender<Incoming>>,
    status: watch::Sender<MqttStatus>,
    /// The newest publish that bypasses the outbox, until it is handed over.
    direct: Mutex<Option<Message>>,
}

impl Shared {
    fn direct(&self) -> std::sync::MutexGuard<'_, Option<Message>> {
        self.direct.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn corr(&self) -> std::sync::MutexGuard<'_, Correlation> {
        self.corr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand one request to rumqttc; the caller holds the correlation lock. The message is
    /// moved, not copied: rumqttc takes the topic as a `String` of its own.
    fn hand_over(&self, corr: &mut Correlation, slot: Slot, msg: Message) -> bool {
        corr.fifo.push_back(slot);
        match self
            .client
            .try_publish(msg.topic, self.qos, msg.retain, msg.payload)
        {
            Ok(()) => true,
            Err(e) => {
                corr.fifo.pop_back();
                debug!("mqtt request channel refused a publish: {e}");
                false
            }
        }
    }
}

/// Publishes that bypass the outbox, for what must get out while the outbox cannot write
/// (the bridge's own health report): in memory only, newest wins, sent when connected,
/// never retried after a lost session. Not for anything read from upstream.
#[derive(Clone)]
pub struct Direct(Arc<Shared>);

impl Direct {
    pub fn publish(&self, msg: Message) {
        *self.0.direct() = Some(msg);
        self.0.progress.notify_one();
    }
}

/// The running publisher.
pub struct Publisher {
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Cancelled when a shutdown begins: the tasks may end from then on.
    ending: CancellationToken,
    tasks: TaskTracker,
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, MqttSetupError> {
    let (use_tls, host, port) = cfg.endpoint();
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_keep_alive(cfg.keepalive)
        .set_clean_session(false)
        // Incoming: anything MQTT can carry, so no message on a subscribed topic can cut
        // the link (rumqttc disconnects on a larger one); oversized commands are dropped
        // after reading. Outgoing: the configured limit (larger ones are dead letters).
        .set_max_packet_size(MQTT_MAX_PACKET, cfg.max_packet_size)
        .set_inflight(u16::try_from(WINDOW * 2).unwrap_or(u16::MAX))
        .set_request_channel_capacity(WINDOW + 4)
        .set_last_will(LastWill::new(
            topics.bridge_state(),
            "offline",
            qos_of(cfg.qos),
            true,
        ));
    if !cfg.username.is_empty() {
        o.set_credentials(cfg.username.clone(), cfg.password.expose().to_string());
    }
    if use_tls {
        let t = &cfg.tls;
        let trust = Trust::from_options(t.insecure, None, &t.ca_file);
        if t.insecure {
            warn!("mqtt.tls.insecure = true: the broker's certificate is NOT verified");
        }
        let auth = (!t.client_cert.is_empty()).then(|| ClientAuth {
            cert_file: &t.client_cert,
            key_file: &t.client_key,
        });
        let tls_cfg = tls::client_config(&trust, auth)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_cfg),
        )));
    }
    Ok(o)
}

impl Publisher {
    /// Start the publisher. It runs until `shutdown` (or until `stop` is cancelled).
    pub fn start(
        cfg: &MqttConfig,
        outbox: Arc<Outbox>,
        topics: Topics,
        subscriptions: Vec<String>,
        incoming: Option<tokio::sync::mpsc::Sender<Incoming>>,
        heartbeats: Arc<crate::heartbeat::Heartbeats>,
        critical: &crate::critical::Critical,
    ) -> Result<Publisher, MqttSetupError> {
        let opts = options(cfg, &topics)?;
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW + 4);
        // Small publishes must not wait for Nagle: latency matters more than packets.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (status, _) = watch::channel(MqttStatus::default());
        let shared = Arc::new(Shared {
            outbox,
            topics,
            qos: qos_of(cfg.qos),
            max_packet: cfg.max_packet_size,
            client,
            corr: Mutex::new(Correlation::default()),
            progress: Notify::new(),
            offline_acked: Notify::new(),
            driver_done: Notify::new(),
            subscriptions,
            incoming,
            status,
            direct: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let backoff = Backoff::new(Policy::mqtt_reconnect(cfg));
        let alive = cfg.keepalive * 3 + Duration::from_secs(15);
        let ending = CancellationToken::new();
        critical.spawn(
            &tasks,
            "the MQTT link",
            &ending,
            drive(
                shared.clone(),
                eventloop,
                backoff,
                stop.clone(),
                heartbeats,
                alive,
            ),
        );
        critical.spawn(
            &tasks,
            "the MQTT feeder",
            &ending,
            feed(shared.clone(), stop.clone()),
        );
        tasks.close();
        Ok(Publisher {
            shared,
            stop,
            ending,
            tasks,
        })
    }

    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.shared.status.subscribe()
    }

    /// A handle for publishes that bypass the outbox (see [`Direct`]).
    pub fn direct(&self) -> Direct {
        Direct(self.shared.clone())
    }

    /// Wait until every queued message is acknowledged, up to `grace`. True if drained.
    pub async fn flush(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.shared.outbox.wait_empty())
            .await
            .is_ok()
    }

    /// Publish retained `offline`, disconnect cleanly (so the will does not fire), stop.
    pub async fn shutdown(self, grace: Duration) {
        self.ending.cancel();
        let shared = &self.shared;
        let sent = {
            let mut corr = shared.corr();
            corr.closing = true;
            let connected = corr.connected;
            connected && shared.hand_over(&mut corr, Slot::Offline, offline_msg(&shared.topics))
        };
        if sent {
            if tokio::time::timeout(grace, shared.offline_acked.notified())
                .await
                .is_err()
            {
                warn!("broker did not acknowledge `offline` within {grace:?}");
            }
            let _ = shared.client.try_disconnect();
            // The driver ends when the disconnect has gone out.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), shared.driver_done.notified()).await;
        }
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Stop without any goodbye, as a crash would (the broker fires the will).
    pub async fn abort(self) {
        self.ending.cancel();
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

fn online_msg(topics: &Topics) -> Message {
    Message::state_text(topics.bridge_state(), "online")
}

fn offline_msg(topics: &Topics) -> Message {
    Message::state_text(topics.bridge_state(), "offline")
}

async fn drive(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    stop: CancellationToken,
    heartbeats: Arc<crate::heartbeat::Heartbeats>,
    alive: Duration,
) {
    // poll() yields at least once per keepalive (the ping) while connected, and within
    // the connect timeout while not.
    let _alive = crate::heartbeat::BeatGuard::new(&heartbeats, "mqtt", alive);
    let mut last_error: Option<String> = None;
    let mut repeats = 0u64;
    // When the current connection was made (None while not connected).
    let mut connected_at: Option<tokio::time::Instant> = None;
    let mut dropped_log = RateLimited::default();
    loop {
        heartbeats.beat("mqtt", alive);
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.succeeded();
                connected_at = Some(tokio::time::Instant::now());
                {
                    let mut corr = shared.corr();
                    corr.connected = true;
                    if !ack.session_present {
                        // rumqttc dropped everything it held: start over from the outbox.
                        // Events it buffered from the dead connection (a publish whose
                        // write failed) describe packets that no longer exist.
                        eventloop.state.events.clear();
                        eventloop.state.collision = None;
                        corr.fifo.clear();
                        corr.inflight.clear();
                        shared.outbox.rewind();
                    }
                    // Once stopping, a reconnect must not undo the `offline` we said.
                    if corr.closing {
                        shared.hand_over(&mut corr, Slot::Offline, offline_msg(&shared.topics));
                    } else {
                        shared.hand_over(&mut corr, Slot::Online, online_msg(&shared.topics));
                    }
                }
                if !shared.subscriptions.is_empty() {
                    let filters = shared
                        .subscriptions
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = shared.client.try_subscribe_many(filters) {
                        warn!("cannot subscribe to the command topics: {e}");
                    }
                }
                shared.status.send_modify(|s| {
                    s.connected = true;
                    s.connects += 1;
                });
                if repeats > 1 {
                    info!(
                        "mqtt connected (session present: {}) after {repeats} failed attempts",
                        ack.session_present
                    );
                } else {
                    info!("mqtt connected (session present: {})", ack.session_present);
                }
                last_error = None;
                repeats = 0;
                shared.progress.notify_one();
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut corr = shared.corr();
                if pkid == 0 {
                    // QoS 0: done once written.
                    if let Some(slot) = corr.fifo.pop_front() {
                        settle(&shared, slot);
                    }
                } else if !corr.inflight.contains_key(&pkid) {
                    match corr.fifo.pop_front() {
                        Some(slot) => {
                            corr.inflight.insert(pkid, slot);
                        }
                        None => error!(
                            "mqtt publish {pkid} went out with nothing queued: correlation lost"
                        ),
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) if shared.qos == QoS::AtLeastOnce => {
                acknowledge(&shared, ack.pkid);
            }
            Ok(Event::Incoming(Packet::PubComp(ack))) if shared.qos == QoS::ExactlyOnce => {
                acknowledge(&shared, ack.pkid);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(tx) = &shared.incoming {
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
                        shared.status.send_modify(|s| s.incoming_dropped += 1);
                        dropped_log.note(&p.topic, &why);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!("mqtt disconnect sent");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                {
                    let mut corr = shared.corr();
                    corr.connected = false;
                    eventloop.clean();
                    requeue_in_order(&mut eventloop);
                    if let Some(at) = connected_at.take() {
                        strike(&shared, &mut corr, &mut eventloop, at.elapsed());
                    }
                }
                let text = describe(&e);
                shared.status.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(text.clone());
                });
                repeats += 1;
                if last_error.as_deref() != Some(text.as_str()) {
                    warn!("mqtt connection failed: {text}; retrying with backoff");
                    last_error = Some(text);
                } else if repeats.is_power_of_two() {
                    warn!("mqtt still unreachable after {repeats} attempts: {text}");
                }
                let delay = backoff.next_delay();
                heartbeats.beat("mqtt", delay + alive);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    shared.status.send_modify(|s| s.connected = false);
    shared.driver_done.notify_one();
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

fn acknowledge(shared: &Shared, pkid: u16) {
    let slot = {
        let mut corr = shared.corr();
        let slot = corr.inflight.remove(&pkid);
        if let (Some(Slot::Outbox(id)), Some((suspect, _))) = (slot, corr.suspect)
            && id == suspect
        {
            corr.suspect = None;
        }
        slot
    };
    match slot {
        Some(slot) => settle(shared, slot),
        None => debug!("acknowledgement for unknown packet id {pkid}"),
    }
}

fn settle(shared: &Shared, slot: Slot) {
    match slot {
        Slot::Outbox(id) => shared.outbox.ack(id),
        Slot::Online | Slot::Direct => {}
        Slot::Offline => shared.offline_acked.notify_one(),
    }
    shared.progress.notify_one();
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

async fn feed(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        // Register interest before checking, so no wake-up is lost in between.
        let progress = shared.progress.notified();
        let sendable = shared.outbox.sendable();
        let mut handed = false;
        {
            let mut corr = shared.corr();
            while corr.connected && corr.in_hand() < WINDOW {
                let direct = shared.direct().take();
                if let Some(msg) = direct {
                    if !shared.hand_over(&mut corr, Slot::Direct, msg.clone()) {
                        shared.direct().get_or_insert(msg);
                        break;
                    }
                    handed = true;
                    continue;
                }
                let Some((id, msg)) = shared.outbox.take_next() else {
                    break;
                };
                if let Some(reason) = unpublishable(&msg, shared.max_packet) {
                    shared.outbox.dead_letter(id, &reason);
                    continue;
                }
                if !shared.hand_over(&mut corr, Slot::Outbox(id), msg) {
                    shared.outbox.untake(id);
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

/// A warning logged at most once a minute, with how many were left out in between.
#[derive(Default)]
struct RateLimited {
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
    if msg.topic.len() > usize::from(u16::MAX) {
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

/// The connection was lost: if it had only just been made and the same message has been
/// the oldest in flight every time, the broker is refusing it (say, larger than its own
/// limit). Then it becomes a dead letter and leaves rumqttc's queue, so the messages
/// behind it go on. Runs with rumqttc's pending requests collected (after `clean`).
fn strike(shared: &Shared, corr: &mut Correlation, eventloop: &mut EventLoop, up_for: Duration) {
    let oldest = corr
        .inflight
        .iter()
        .filter_map(|(pkid, slot)| match slot {
            Slot::Outbox(id) => Some((*id, *pkid)),
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
    shared.outbox.dead_letter(
        id,
        &format!(
            "the broker closed the connection {STRIKES} times in a row right after it was sent (larger than the broker accepts, or refused)"
        ),
    );
}

/// The retained `{base}/bridge/info` payload.
pub fn bridge_info(topics: &Topics, started: SystemTime, sources: serde_json::Value) -> Message {
    Message::state_json(
        topics.bridge_info(),
        &serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": crate::timestamp::rfc3339_millis(started),
            "sources": sources,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Publish, Request};

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
