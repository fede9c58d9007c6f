//! Starts and stops the whole bridge: the outbox, the MQTT publisher and the upstream
//! links, with a graceful stop that flushes before saying goodbye.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::mqtt::publisher::{MqttSetupError, bridge_info};
use crate::mqtt::{MqttStatus, Outbox, Publisher, Topics};
use crate::{bvcsp, playbox};

/// How long a graceful stop may spend flushing queued messages to the broker.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Mqtt(#[from] MqttSetupError),
    #[error(transparent)]
    Bvcsp(#[from] bvcsp::BvcspSetupError),
    #[error(transparent)]
    Playbox(#[from] playbox::PlayboxSetupError),
    #[error(transparent)]
    Outbox(#[from] crate::mqtt::outbox::OutboxError),
}

/// A running bridge.
pub struct Bridge {
    pub outbox: Arc<Outbox>,
    pub bvcsp_stats: Arc<bvcsp::Stats>,
    pub bvcsp: Option<Arc<bvcsp::Ctx>>,
    publisher: Publisher,
    upstream: CancellationToken,
    tasks: TaskTracker,
    health: CancellationToken,
}

impl Bridge {
    /// Validate-free start: `cfg` must already be validated (see `config::load`).
    pub async fn start(cfg: Config) -> Result<Bridge, StartError> {
        let started = SystemTime::now();
        let topics = Topics::new(&cfg.mqtt.base_topic);
        let outbox = Outbox::open(&cfg.storage.dir, cfg.storage.max_bytes)?;
        let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(64);
        let filters = playbox::command_filters(&cfg.playbox, &topics);
        let publisher = Publisher::start(
            &cfg.mqtt,
            outbox.clone(),
            topics.clone(),
            filters,
            Some(incoming_tx),
        )?;
        outbox.push_now(bridge_info(&topics, started, sources(&cfg)));

        let upstream = CancellationToken::new();
        let tasks = TaskTracker::new();
        let stats = Arc::new(bvcsp::Stats::default());
        let mut bvcsp_ctx = None;
        if let Some(b) = &cfg.bvcsp {
            let (ctx, relogin_rx) = bvcsp::Ctx::new(
                Arc::new(b.clone()),
                outbox.clone(),
                topics.clone(),
                stats.clone(),
            )?;
            tasks.spawn(bvcsp::run(ctx.clone(), relogin_rx, upstream.clone()));
            bvcsp_ctx = Some(ctx);
        }
        if !cfg.playbox.is_empty() {
            playbox::start(
                &cfg.playbox,
                &cfg.storage.dir,
                outbox.clone(),
                topics.clone(),
                incoming_rx,
                &tasks,
                upstream.clone(),
            )?;
        }
        tasks.close();
        let health = CancellationToken::new();
        tokio::spawn(report_health(
            outbox.clone(),
            stats.clone(),
            publisher.status(),
            bvcsp_ctx.as_ref().map(|c| c.link.clone()),
            topics.clone(),
            started,
            health.clone(),
        ));
        info!("bvcsp2mqtt {} started", env!("CARGO_PKG_VERSION"));
        Ok(Bridge {
            outbox,
            bvcsp_stats: stats,
            bvcsp: bvcsp_ctx,
            publisher,
            upstream,
            tasks,
            health,
        })
    }

    pub fn mqtt_status(&self) -> tokio::sync::watch::Receiver<MqttStatus> {
        self.publisher.status()
    }

    /// Graceful stop: stop reading upstream and log out, flush within `grace`, publish
    /// `offline`, disconnect. What could not be flushed is reported.
    pub async fn stop(self, grace: Duration) {
        info!("stopping: closing upstream links");
        self.upstream.cancel();
        self.tasks.wait().await;
        if !self.publisher.flush(grace).await {
            warn!(
                "{} messages could not be delivered within the {grace:?} grace period",
                self.outbox.depth()
            );
        }
        self.publisher.shutdown(Duration::from_secs(3)).await;
        self.health.cancel();
        let outbox = self.outbox.clone();
        let _ = tokio::task::spawn_blocking(move || outbox.close()).await;
        info!("stopped");
    }

    /// Stop as a crash would: no logout, no `offline`; the broker publishes the will.
    pub async fn kill(self) {
        if let Some(ctx) = &self.bvcsp {
            ctx.skip_logout
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.publisher.abort().await;
        self.upstream.cancel();
        self.tasks.wait().await;
    }
}

/// How often `{base}/bridge/health` is published.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// Retained `{base}/bridge/health` every interval, and `outbox_full` on the BVCSP link
/// topic as soon as the outbox fills or drains.
async fn report_health(
    outbox: Arc<Outbox>,
    stats: Arc<bvcsp::Stats>,
    mqtt: tokio::sync::watch::Receiver<MqttStatus>,
    link: Option<Arc<crate::link::Link>>,
    topics: Topics,
    started: SystemTime,
    cancel: CancellationToken,
) {
    let mut full = outbox.full();
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = full.changed() => {
                if r.is_err() {
                    return;
                }
                let is_full = *full.borrow_and_update();
                if let Some(link) = &link {
                    link.set_detail("outbox_full", serde_json::json!(is_full));
                }
            }
            _ = tick.tick() => {
                let o = outbox.stats();
                let m = mqtt.borrow().clone();
                let body = serde_json::json!({
                    "uptime_s": started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                    "outbox": o.to_json(),
                    "mqtt": {"connected": m.connected, "connects": m.connects, "last_error": m.last_error},
                    "bvcsp": stats.to_json(),
                });
                outbox.push_now(crate::mqtt::Message::state_json(topics.bridge_health(), &body));
                if o.depth > 0 && o.oldest_age_ms > 60_000 {
                    info!("outbox: {} waiting, oldest {} s, {} replayed", o.depth, o.oldest_age_ms / 1000, o.replayed + o.replayed_at_start);
                }
            }
        }
    }
}

/// The configured sources for `bridge/info`, without secrets.
fn sources(cfg: &Config) -> serde_json::Value {
    let bvcsp = cfg.bvcsp.as_ref().map(|b| {
        serde_json::json!({
            "url": b.url,
            "auth": if b.uses_app_token() { "app_id" } else { "login" },
            "streams": b.streams.iter().map(|s| s.name()).collect::<Vec<_>>(),
        })
    });
    let playboxes: Vec<_> = cfg
        .playbox
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "url": p.url}))
        .collect();
    serde_json::json!({"bvcsp": bvcsp, "playbox": playboxes})
}

/// Run until `shutdown` resolves, then stop gracefully.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let bridge = Bridge::start(cfg).await?;
    shutdown.await;
    bridge.stop(DEFAULT_GRACE).await;
    Ok(())
}
