//! Starts and stops the whole bridge: the outbox, the MQTT publisher and the upstream
//! links, with a graceful stop that flushes before saying goodbye.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::health::{Heartbeats, Probe};
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
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("service.http_listen {0}: {1}")]
    Http(std::net::SocketAddr, #[source] std::io::Error),
    #[error("{0}: exiting so the service manager restarts the bridge")]
    Failed(#[source] crate::critical::TaskFailure),
}

impl StartError {
    /// Another bridge holds `storage.dir` (the binary exits with 73 for this).
    pub fn is_storage_locked(&self) -> bool {
        matches!(
            self,
            StartError::Storage(crate::storage::StorageError::Locked { .. })
        )
    }
}

/// A running bridge.
pub struct Bridge {
    pub outbox: Arc<Outbox>,
    pub bvcsp_stats: Arc<bvcsp::Stats>,
    pub bvcsp: Option<Arc<bvcsp::BvcspLink>>,
    publisher: Publisher,
    upstream: CancellationToken,
    tasks: TaskTracker,
    health: CancellationToken,
    failures: Option<crate::critical::Failures>,
    critical: crate::critical::Critical,
    pub probe: Probe,
    /// Where the HTTP health listener is (when `service.http` is on).
    pub http_addr: Option<std::net::SocketAddr>,
    pub grace: Duration,
    /// One bridge per `storage.dir`: held for as long as the bridge lives.
    _lock: crate::storage::StorageLock,
}

impl Bridge {
    /// Validate-free start: `cfg` must already be validated (see `config::load`).
    /// Two phases: everything that can fail (the outbox and its lock, the alarm ledger,
    /// TLS material, the HTTP port, the MQTT options) is done first; only then does any
    /// task start, so a failed start leaves nothing running.
    pub async fn start(cfg: Config) -> Result<Bridge, StartError> {
        let started = SystemTime::now();
        // Before anything else: a second bridge on this directory must not touch it.
        let lock = crate::storage::lock(&cfg.storage.dir)?;
        let topics = Topics::new(&cfg.mqtt.base_topic);
        // Opening reads (and may clean up) what the last run left: not on the runtime.
        let outbox = {
            let (dir, max) = (cfg.storage.dir.clone(), cfg.storage.max_bytes);
            match tokio::task::spawn_blocking(move || Outbox::open(&dir, max)).await {
                Ok(opened) => opened?,
                Err(e) => {
                    return Err(crate::mqtt::outbox::OutboxError::Task {
                        dir: cfg.storage.dir.display().to_string(),
                        source: e,
                    }
                    .into());
                }
            }
        };
        let latency = crate::health::latency_histogram();
        outbox.observe_latency(latency.clone());
        let heartbeats = Arc::new(Heartbeats::default());
        let stats = Arc::new(bvcsp::Stats::default());
        let bvcsp = match &cfg.bvcsp {
            Some(b) => Some(bvcsp::BvcspLink::new(
                Arc::new(b.clone()),
                &cfg.storage.dir,
                outbox.clone(),
                topics.clone(),
                stats.clone(),
                heartbeats.clone(),
            )?),
            None => None,
        };
        if let (Some((ctx, _)), Some(_)) = (&bvcsp, outbox.set_aside()) {
            ctx.ledger.forget_published(ctx.cfg.backfill_max_age);
        }
        let playboxes = playbox::prepare(
            &cfg.playbox,
            &cfg.storage.dir,
            outbox.clone(),
            topics.clone(),
            heartbeats.clone(),
        )?;
        let listener = match cfg.service.http {
            true => {
                let addr = cfg.service.http_listen;
                Some(
                    crate::health::bind_http(addr)
                        .await
                        .map_err(|e| StartError::Http(addr, e))?,
                )
            }
            false => None,
        };
        let http_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let (critical, failures) = crate::critical::channel();
        // The last fallible step; it starts the MQTT tasks only once it cannot fail.
        let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(64);
        let mut filters = playbox::command_filters(&cfg.playbox, &topics);
        filters.extend(crate::homeassistant::subscriptions(
            &cfg.homeassistant,
            &topics,
        ));
        let publisher = Publisher::start(
            &cfg.mqtt,
            outbox.clone(),
            topics.clone(),
            filters,
            Some(incoming_tx),
            heartbeats.clone(),
            &critical,
        )?;

        // Phase two: nothing below can fail.
        outbox.push_now(bridge_info(&topics, started, sources(&cfg)));
        let upstream = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut bvcsp_ctx = None;
        if let Some((ctx, relogin_rx)) = bvcsp {
            critical.spawn(
                &tasks,
                "the BVCSP link",
                &upstream,
                bvcsp::run(ctx.clone(), relogin_rx, upstream.clone(), critical.clone()),
            );
            bvcsp_ctx = Some(ctx);
        }
        let playbox_links = playboxes.links();
        let described = playboxes.described();
        let (playbox_tx, playbox_rx) = tokio::sync::mpsc::channel(64);
        if !cfg.playbox.is_empty() {
            playboxes.spawn(playbox_rx, &tasks, upstream.clone(), &critical);
        }
        let probe = Probe {
            started,
            outbox: outbox.clone(),
            bvcsp_stats: stats.clone(),
            mqtt: publisher.status(),
            bvcsp_link: bvcsp_ctx.as_ref().map(|c| c.status.clone()),
            playbox_links,
            heartbeats: heartbeats.clone(),
            publish_latency: latency,
        };
        crate::homeassistant::spawn(
            crate::homeassistant::Wiring {
                cfg: &cfg,
                topics: &topics,
                outbox: &outbox,
                bvcsp: bvcsp_ctx.as_ref(),
                described,
                probe: &probe,
                incoming: incoming_rx,
                playbox: (!cfg.playbox.is_empty()).then_some(playbox_tx),
            },
            &tasks,
            &upstream,
            &critical,
        );
        tasks.close();
        let health = CancellationToken::new();
        let health_tasks = TaskTracker::new();
        critical.spawn(
            &health_tasks,
            "the health report",
            &health,
            crate::health::report_loop(
                probe.clone(),
                topics.clone(),
                cfg.service.health_interval,
                Some(publisher.direct()),
                health.clone(),
            ),
        );
        critical.spawn(&health_tasks, "the outbox writer", &health, {
            let (outbox, health) = (outbox.clone(), health.clone());
            async move {
                tokio::select! {
                    _ = health.cancelled() => {}
                    _ = outbox.writer_ended() => {}
                }
            }
        });
        critical.spawn(
            &health_tasks,
            "the watchdog",
            &health,
            crate::health::watchdog_loop(heartbeats, health.clone()),
        );
        if let Some(listener) = listener {
            critical.spawn(
                &health_tasks,
                "the health listener",
                &health,
                crate::health::serve_http(listener, probe.clone(), health.clone()),
            );
        }
        health_tasks.close();
        info!("bvcsp2mqtt {} started", env!("CARGO_PKG_VERSION"));
        Ok(Bridge {
            outbox,
            bvcsp_stats: stats,
            bvcsp: bvcsp_ctx,
            publisher,
            upstream,
            tasks,
            health,
            failures: Some(failures),
            critical,
            probe,
            http_addr,
            grace: cfg.service.grace_period,
            _lock: lock,
        })
    }

    /// Where this bridge's critical tasks report (tests use it to inject a failure).
    pub fn critical(&self) -> &crate::critical::Critical {
        &self.critical
    }

    /// Resolves when a critical task ended on its own or panicked, with why.
    pub async fn failed(&mut self) -> crate::critical::TaskFailure {
        // Borrowed, not taken: a `select!` drops the losing branch's future, and the
        // receiver must survive that (receiving is cancel-safe).
        match &mut self.failures {
            Some(f) => f.next().await,
            None => std::future::pending().await,
        }
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
        self.health.cancel();
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

/// Run until `shutdown` resolves, then stop gracefully. Tells systemd (when it started
/// us) READY=1 once the broker is connected, and STOPPING=1 when stopping.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    serve(Bridge::start(cfg).await?, shutdown).await
}

/// Run a started bridge until `shutdown` resolves or a critical task fails, then stop it
/// gracefully; a failure is returned (the daemon exits 70 on it).
pub async fn serve(
    mut bridge: Bridge,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let mut mqtt = bridge.mqtt_status();
    tokio::pin!(shutdown);
    let failure = tokio::select! {
        _ = &mut shutdown => None,
        why = bridge.failed() => Some(why),
        // The watch guard must not live across an await: it blocks the publisher.
        connected = async { mqtt.wait_for(|s| s.connected).await.is_ok() } => {
            if connected {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                info!("ready: connected to the broker");
            }
            tokio::select! {
                _ = &mut shutdown => None,
                why = bridge.failed() => Some(why),
            }
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let grace = bridge.grace;
    bridge.stop(grace).await;
    match failure {
        Some(why) => Err(StartError::Failed(why)),
        None => Ok(()),
    }
}
