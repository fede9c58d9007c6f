//! Is the bridge healthy? Liveness heartbeats for the systemd watchdog, the retained
//! `{base}/bridge/health` report, and the optional HTTP listener with Prometheus
//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bvcsp::{self, Stream};
pub use crate::heartbeat::{BeatGuard, Heartbeats};
use crate::link_status::{LinkState, LinkStatus};
use crate::mqtt::{Message, MqttStatus, Outbox, Topics};

/// Everything health reports read.
#[derive(Clone)]
pub struct Probe {
    pub started: SystemTime,
    pub outbox: Arc<Outbox>,
    pub bvcsp_stats: Arc<bvcsp::Stats>,
    pub mqtt: watch::Receiver<MqttStatus>,
    pub bvcsp_link: Option<Arc<LinkStatus>>,
    pub playbox_links: Vec<(String, Arc<LinkStatus>)>,
    pub heartbeats: Arc<Heartbeats>,
    pub publish_latency: Histogram,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

/// Buckets for the time from reading an event to the broker's acknowledgement.
pub fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
    ])
}

impl Probe {
    /// Broker connected and, when BVCSP is configured, logged in.
    pub fn ready(&self) -> bool {
        self.mqtt.borrow().connected
            && self
                .bvcsp_link
                .as_ref()
                .is_none_or(|l| l.state() == LinkState::Up)
    }

    pub fn report(&self) -> serde_json::Value {
        let o = self.outbox.stats();
        let m = self.mqtt.borrow().clone();
        let link_json = |l: &LinkStatus| {
            let s = l.snapshot();
            serde_json::json!({
                "state": s.state.name(),
                "streams": s.streams.iter().map(|(k, up)| (k.clone(), serde_json::json!(if *up { "up" } else { "down" }))).collect::<serde_json::Map<_, _>>(),
                "last_error": s.last_error,
            })
        };
        let mut outbox = o.to_json();
        if let Some(aside) = self.outbox.set_aside() {
            outbox["corrupt_file_kept_as"] = serde_json::json!(aside.display().to_string());
        }
        serde_json::json!({
            "uptime_s": self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            "memory_rss_bytes": rss_bytes(),
            "outbox": outbox,
            "mqtt": {"connected": m.connected, "connects": m.connects, "last_error": m.last_error,
                "incoming_dropped": m.incoming_dropped},
            "bvcsp": self.bvcsp_link.as_ref().map(|l| {
                let mut v = link_json(l);
                v["counters"] = self.bvcsp_stats.to_json();
                v
            }),
            "playbox": self.playbox_links.iter().map(|(n, l)| (n.clone(), link_json(l))).collect::<serde_json::Map<_, _>>(),
            "last_event_at": self.bvcsp_stats.last_event_at(),
        })
    }
}

/// Resident memory, from /proc (Linux); null elsewhere.
fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Retained `{base}/bridge/health` every `interval` and whenever reading upstream pauses
/// or resumes, and `outbox_full` on the BVCSP link as soon as the outbox fills or drains.
/// While the outbox cannot write, the report goes out through `direct` (it could not
/// leave the outbox), so the reason is visible where users look.
pub async fn report_loop(
    probe: Probe,
    topics: Topics,
    interval: Duration,
    direct: Option<crate::mqtt::publisher::Direct>,
    cancel: CancellationToken,
) {
    let mut full = probe.outbox.full();
    let mut paused = probe.outbox.paused();
    let mut tick = tokio::time::interval(interval);
    let publish = |probe: &Probe| {
        let msg = Message::state_json(topics.bridge_health(), &probe.report());
        match &direct {
            Some(direct) if probe.outbox.write_error().is_some() => direct.publish(msg),
            _ => {
                probe.outbox.push_now(msg);
            }
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = full.changed() => {
                if r.is_err() {
                    return;
                }
                let is_full = *full.borrow_and_update();
                if let Some(link) = &probe.bvcsp_link {
                    link.set_detail("outbox_full", serde_json::json!(is_full));
                }
            }
            r = paused.changed() => {
                if r.is_err() {
                    return;
                }
                paused.borrow_and_update();
                publish(&probe);
            }
            _ = tick.tick() => {
                publish(&probe);
                let o = probe.outbox.stats();
                if o.depth > 0 && o.oldest_age_ms > 60_000 {
                    info!(
                        "outbox: {} waiting, oldest {} s, {} replayed",
                        o.depth,
                        o.oldest_age_ms / 1000,
                        o.replayed + o.replayed_at_start
                    );
                }
            }
        }
    }
}

/// Pet the systemd watchdog at half its period, only while every loop is alive.
pub async fn watchdog_loop(heartbeats: Arc<Heartbeats>, cancel: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        // No watchdog asked for; a critical task still lives until stopped.
        cancel.cancelled().await;
        return;
    };
    let mut tick = tokio::time::interval(period / 2);
    let mut complained = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                let stale = heartbeats.stale();
                if stale.is_empty() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    complained = false;
                } else if !complained {
                    warn!("not petting the watchdog: no sign of life from {}", stale.join(", "));
                    complained = true;
                }
            }
        }
    }
}

/// The Prometheus view of the probe, read at every scrape.
#[derive(Debug)]
struct Collector(Probe);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let p = &self.0;
        type Pick = fn(&bvcsp::StreamStats) -> u64;
        let per_stream: [(&str, &str, Pick); 3] = [
            ("bvcsp2mqtt_events_in", "Events read from upstream", |s| {
                s.events_in.load(Relaxed)
            }),
            (
                "bvcsp2mqtt_events_out",
                "Messages queued for MQTT from upstream events",
                |s| s.published.load(Relaxed),
            ),
            (
                "bvcsp2mqtt_events_failed",
                "Upstream frames that could not be parsed",
                |s| s.malformed.load(Relaxed),
            ),
        ];
        for (name, help, pick) in per_stream {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for s in Stream::ALL {
                let c = ConstCounter::new(pick(p.bvcsp_stats.of(s)));
                c.encode(family.encode_family(&[("stream", s.name())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "bvcsp2mqtt_reconnects",
                "Reconnections per link",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let bvcsp_reconnects: u64 = Stream::ALL
                .iter()
                .map(|s| p.bvcsp_stats.of(*s).reconnects.load(Relaxed))
                .sum();
            ConstCounter::new(bvcsp_reconnects)
                .encode(family.encode_family(&[("link", "bvcsp")])?)?;
            let mqtt = p.mqtt.borrow().connects.saturating_sub(1);
            ConstCounter::new(mqtt).encode(family.encode_family(&[("link", "mqtt")])?)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "bvcsp2mqtt_auth_refreshes",
                "Token refreshes and logins per link",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let s = &p.bvcsp_stats;
            ConstCounter::new(s.refreshes.load(Relaxed))
                .encode(family.encode_family(&[("link", "bvcsp"), ("kind", "refresh")])?)?;
            ConstCounter::new(s.logins.load(Relaxed))
                .encode(family.encode_family(&[("link", "bvcsp"), ("kind", "login")])?)?;
        }
        let o = p.outbox.stats();
        gauge(
            &mut encoder,
            "bvcsp2mqtt_outbox_depth",
            "Messages not yet acknowledged by the broker",
            o.depth as i64,
        )?;
        gauge(
            &mut encoder,
            "bvcsp2mqtt_outbox_bytes",
            "Bytes held by the outbox",
            o.bytes as i64,
        )?;
        gauge(
            &mut encoder,
            "bvcsp2mqtt_outbox_oldest_age_milliseconds",
            "Age of the oldest unacknowledged message",
            o.oldest_age_ms as i64,
        )?;
        counter(
            &mut encoder,
            "bvcsp2mqtt_messages_acked",
            "Messages acknowledged by the broker",
            o.acked,
        )?;
        counter(
            &mut encoder,
            "bvcsp2mqtt_dead_letters",
            "Messages the broker cannot take, moved to the dead-letter table",
            o.dead_letters,
        )?;
        gauge(
            &mut encoder,
            "bvcsp2mqtt_dead_letters_kept",
            "Rows in the dead-letter table (bounded)",
            o.dead_letters_kept as i64,
        )?;
        counter(
            &mut encoder,
            "bvcsp2mqtt_messages_replayed",
            "Messages sent again after a lost broker session or a restart",
            o.replayed + o.replayed_at_start,
        )?;
        gauge(
            &mut encoder,
            "bvcsp2mqtt_mqtt_connected",
            "1 while connected to the broker",
            i64::from(p.mqtt.borrow().connected),
        )?;
        gauge(
            &mut encoder,
            "bvcsp2mqtt_ready",
            "1 while ready (broker connected, BVCSP logged in)",
            i64::from(p.ready()),
        )?;
        Ok(())
    }
}

/// Bind the health listener (before anything starts: a taken port fails the start).
pub async fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `cancel`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    probe: Probe,
    cancel: CancellationToken,
) {
    let bound = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let mut registry = Registry::default();
    registry.register(
        "bvcsp2mqtt_publish_latency_seconds",
        "Time from reading an event to the broker's acknowledgement",
        probe.publish_latency.clone(),
    );
    registry.register_collector(Box::new(Collector(probe.clone())));
    let registry = Arc::new(registry);
    info!("health listener on http://{bound} (/metrics, /healthz, /readyz)");
    {
        loop {
            let (tcp, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("health listener: {e}");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(crate::retry::ACCEPT_RETRY) => {}
                        }
                        continue;
                    }
                },
            };
            let (probe, registry) = (probe.clone(), registry.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let (probe, registry) = (probe.clone(), registry.clone());
                        async move { Ok::<_, std::convert::Infallible>(route(&req, &probe, &registry)) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    }
}

fn route(
    req: &Request<hyper::body::Incoming>,
    probe: &Probe,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode metrics\n".into(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if probe.ready() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn health_is_published_at_once_then_every_interval() {
        let outbox = Arc::new(Outbox::memory(64 << 20));
        let topics = Topics::new("t");
        let probe = Probe {
            started: SystemTime::now(),
            outbox: outbox.clone(),
            bvcsp_stats: Default::default(),
            mqtt: watch::channel(MqttStatus::default()).1,
            bvcsp_link: None,
            playbox_links: Vec::new(),
            heartbeats: Default::default(),
            publish_latency: latency_histogram(),
        };
        let cancel = CancellationToken::new();
        let interval = Duration::from_secs(30);
        let task = tokio::spawn(report_loop(
            probe,
            topics.clone(),
            interval,
            None,
            cancel.clone(),
        ));
        let start = Instant::now();
        let step = Duration::from_millis(500);
        let mut seen = Vec::new();
        while start.elapsed() < Duration::from_secs(100) {
            tokio::time::sleep(step).await;
            while let Some((id, msg)) = outbox.take_next() {
                if msg.topic == topics.bridge_health() {
                    seen.push(start.elapsed());
                }
                outbox.ack(id);
            }
        }
        cancel.cancel();
        task.await.unwrap();
        let want: Vec<Duration> = (0..4).map(|k| interval * k + step).collect();
        assert_eq!(seen, want, "published when looked at next after each tick");
    }
}
