//! Home Assistant MQTT discovery (contract §3.5) and the bridge API (§3.6).
//!
//! - [`entities`]: what each camera, user, play box and the bridge become in Home
//!   Assistant; [`layout`]: the discovery topics and payloads of either `discovery` mode.
//! - [`announcer`]: the life cycle (announce, re-announce on Home Assistant's `online`,
//!   new devices, removals), fed into the outbox behind alarms.
//! - [`api`]: `bridge/devices` (written by `device_list`) and `bridge/request/...` →
//!   `bridge/response/...`.
//! - [`route_incoming`]: splits what the broker delivers between the play-box command
//!   router, the announcer (status topic) and the API (requests).

pub mod announcer;
pub mod api;
mod device_list;
pub mod entities;
pub mod layout;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use crate::config::{DiscoveryMode, HomeAssistantConfig};

use crate::mqtt::Topics;
use crate::mqtt::publisher::incoming::Incoming;

/// Requests and status messages waiting, per consumer; more are dropped (and logged):
/// the publisher never waits for a consumer.
pub const INCOMING_QUEUE: usize = 64;

/// The topics to subscribe to besides the play-box commands: the bridge API's requests,
/// and Home Assistant's status topic when discovery is on.
pub fn subscriptions(cfg: &HomeAssistantConfig, topics: &Topics) -> Vec<String> {
    let mut v = vec![format!("{}/bridge/request/#", topics.base())];
    if cfg.enabled {
        v.push(cfg.status_topic.clone());
    }
    v
}

/// Where one incoming message goes.
pub struct Routes {
    pub playbox: Option<mpsc::Sender<Incoming>>,
    pub status: Option<mpsc::Sender<Incoming>>,
    pub requests: Option<mpsc::Sender<Incoming>>,
}

/// Hand each message from the broker to its consumer, until `cancel`.
pub async fn route_incoming(
    mut incoming: mpsc::Receiver<Incoming>,
    routes: Routes,
    status_topic: String,
    topics: Topics,
    cancel: CancellationToken,
) {
    let playbox_prefix = format!("{}/playbox/", topics.base());
    let request_prefix = format!("{}/bridge/request/", topics.base());
    loop {
        let m = tokio::select! {
            _ = cancel.cancelled() => return,
            m = incoming.recv() => match m {
                Some(m) => m,
                None => { cancel.cancelled().await; return; }
            },
        };
        let to = if m.topic.starts_with(&request_prefix) {
            routes.requests.as_ref()
        } else if m.size > m.payload.len() {
            // Too large to keep (the publisher dropped it, and counted it): only a
            // request is told so.
            None
        } else if m.topic == status_topic {
            routes.status.as_ref()
        } else if m.topic.starts_with(&playbox_prefix) {
            routes.playbox.as_ref()
        } else {
            None
        };
        if let Some(tx) = to
            && tx.try_send(m).is_err()
        {
            debug!("an incoming message was dropped: its consumer is busy");
        }
    }
}

/// What [`spawn`] needs from the bridge being started.
pub struct Wiring<'a> {
    pub cfg: &'a crate::config::Config,
    pub topics: &'a Topics,
    pub outbox: &'a std::sync::Arc<crate::mqtt::Outbox>,
    pub bvcsp: Option<&'a std::sync::Arc<crate::bvcsp::BvcspLink>>,
    /// Each play box's self-description, by name.
    pub described: Vec<(
        String,
        tokio::sync::watch::Receiver<Option<serde_json::Value>>,
    )>,
    pub probe: &'a crate::health::Probe,
    /// Everything the broker delivers on the subscribed topics.
    pub incoming: mpsc::Receiver<Incoming>,
    /// The play-box command router's input, when there are play boxes.
    pub playbox: Option<mpsc::Sender<Incoming>>,
}

/// Start the incoming-message router, the bridge API and the announcer, each a critical
/// task under `tasks`, stopped by `cancel`.
pub fn spawn(
    w: Wiring<'_>,
    tasks: &tokio_util::task::TaskTracker,
    cancel: &CancellationToken,
    critical: &crate::critical::Critical,
) {
    let ha = &w.cfg.homeassistant;
    let (requests_tx, requests_rx) = mpsc::channel(INCOMING_QUEUE);
    let (status_tx, status_rx) = mpsc::channel(INCOMING_QUEUE);
    critical.spawn(
        tasks,
        "the incoming-message router",
        cancel,
        route_incoming(
            w.incoming,
            Routes {
                playbox: w.playbox,
                status: ha.enabled.then_some(status_tx),
                requests: Some(requests_tx),
            },
            ha.status_topic.clone(),
            w.topics.clone(),
            cancel.clone(),
        ),
    );
    critical.spawn(
        tasks,
        "the bridge API",
        cancel,
        api::run(
            api::Inputs {
                topics: w.topics.clone(),
                outbox: w.outbox.clone(),
                bvcsp: w.bvcsp.cloned(),
                playboxes: w.cfg.playbox.clone(),
                probe: w.probe.clone(),
                requests: requests_rx,
                max_packet: w.cfg.mqtt.max_packet_size,
            },
            cancel.clone(),
        ),
    );
    let playboxes = w
        .cfg
        .playbox
        .iter()
        .filter_map(|p| {
            w.described
                .iter()
                .find(|(n, _)| *n == p.name)
                .map(|(_, rx)| (p.clone(), rx.clone()))
        })
        .collect();
    critical.spawn(
        tasks,
        "the Home Assistant announcer",
        cancel,
        announcer::run(
            announcer::Inputs {
                cfg: ha.clone(),
                builder: entities::Builder::new(w.topics.clone(), w.cfg.mqtt.qos.into()),
                outbox: w.outbox.clone(),
                bvcsp: w.bvcsp.cloned(),
                playboxes,
                storage_dir: w.cfg.storage.dir.clone(),
                status: status_rx,
            },
            cancel.clone(),
        ),
    );
}
