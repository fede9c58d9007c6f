//! Drives rumqttc: connect → run → back off, feeding it from the outbox and settling
//! outbox entries only on the broker's acknowledgement.
//!
//! - this file: the [`Publisher`] (build, spawn, flush, shut down), the
//!   [`PublisherState`] its tasks share, [`Direct`] publishes and the `bridge/info`
//!   payload;
//! - `options.rs`: rumqttc's options from `[mqtt]` (TLS, last will, limits);
//! - `driver.rs`: the task that polls rumqttc's event loop (connect, back off, requeue
//!   after a loss, strike a message the broker keeps refusing);
//! - `reconnect.rs`: how long the driver waits after a failed connection, by what the
//!   failure calls for (refused credentials wait minutes);
//! - `feeder.rs`: the task that hands durable messages to rumqttc, within the window;
//! - `correlation.rs`: packet id ↔ outbox id, settled on the broker's acknowledgement;
//! - `incoming.rs`: messages on the subscribed command topics, size-capped.

mod correlation;
mod driver;
mod feeder;
pub mod incoming;
mod options;
mod reconnect;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{Message, Outbox, Topics};
use crate::config::MqttConfig;
use crate::tls;
use correlation::{Correlation, InFlight};
use incoming::Incoming;

/// Requests handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 256;
/// The largest packet MQTT can carry (a 4-byte remaining length, plus the fixed header).
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("mqtt.tls: {0}")]
    Tls(#[from] tls::TlsError),
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

/// What the publisher's handle, its driver and its feeder share.
struct PublisherState {
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

impl PublisherState {
    fn direct(&self) -> std::sync::MutexGuard<'_, Option<Message>> {
        self.direct.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn corr(&self) -> std::sync::MutexGuard<'_, Correlation> {
        self.corr.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publishes that bypass the outbox, for what must get out while the outbox cannot write
/// (the bridge's own health report): in memory only, newest wins, sent when connected,
/// never retried after a lost session. Not for anything read from upstream.
#[derive(Clone)]
pub struct Direct(Arc<PublisherState>);

impl Direct {
    pub fn publish(&self, msg: Message) {
        *self.0.direct() = Some(msg);
        self.0.progress.notify_one();
    }
}

/// The running publisher.
pub struct Publisher {
    state: Arc<PublisherState>,
    stop: CancellationToken,
    /// Cancelled when a shutdown begins: the tasks may end from then on.
    ending: CancellationToken,
    tasks: TaskTracker,
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
        let opts = options::options(cfg, &topics)?;
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW + 4);
        // Small publishes must not wait for Nagle: latency matters more than packets.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (status, _) = watch::channel(MqttStatus::default());
        let state = Arc::new(PublisherState {
            outbox,
            topics,
            qos: options::qos_of(cfg.qos),
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
        let alive = cfg.keepalive * 3 + Duration::from_secs(15);
        let ending = CancellationToken::new();
        critical.spawn(
            &tasks,
            "the MQTT link",
            &ending,
            driver::drive(
                state.clone(),
                eventloop,
                reconnect::Reconnect::new(cfg),
                (cfg.url.host().to_string(), cfg.url.port()),
                stop.clone(),
                heartbeats,
                alive,
            ),
        );
        critical.spawn(
            &tasks,
            "the MQTT feeder",
            &ending,
            feeder::feed(state.clone(), stop.clone()),
        );
        tasks.close();
        Ok(Publisher {
            state,
            stop,
            ending,
            tasks,
        })
    }

    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.state.status.subscribe()
    }

    /// A handle for publishes that bypass the outbox (see [`Direct`]).
    pub fn direct(&self) -> Direct {
        Direct(self.state.clone())
    }

    /// Wait until every queued message is acknowledged, up to `grace`. True if drained.
    pub async fn flush(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.state.outbox.wait_empty())
            .await
            .is_ok()
    }

    /// Publish retained `offline`, disconnect cleanly (so the will does not fire), stop.
    pub async fn shutdown(self, grace: Duration) {
        self.ending.cancel();
        let state = &self.state;
        let sent = {
            let mut corr = state.corr();
            corr.closing = true;
            let connected = corr.connected;
            connected && state.hand_over(&mut corr, InFlight::Offline, offline_msg(&state.topics))
        };
        if sent {
            if tokio::time::timeout(grace, state.offline_acked.notified())
                .await
                .is_err()
            {
                warn!("broker did not acknowledge `offline` within {grace:?}");
            }
            let _ = state.client.try_disconnect();
            // The driver ends when the disconnect has gone out.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), state.driver_done.notified()).await;
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
