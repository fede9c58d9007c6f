//! (e) Recovery after a long broker outage. Mosquitto runs with persistence on, so that
//! the counting subscriber's session (clean session off) survives the broker's restart:
//! whatever the bridge publishes before the subscriber is back is queued for it, and a
//! race between the two reconnections cannot show up as loss. The bridge serves
//! `/metrics`, which says how deep its outbox is and whether it is connected.
//!
//! The broker stops (SIGTERM, so it saves its sessions), the simulator floods `backlog`
//! alarms from one device, and the scenario waits until the bridge's outbox holds them
//! all. Then the broker starts again and the scenario measures the time to the bridge's
//! reconnection and to the first message, the replay rate, and — from the first replayed
//! message until the last — one SOS every 100 ms from another device (a topic with no
//! backlog), whose latency is taken from the simulator's send time. Every message is
//! accounted: loss, duplicates and per-topic order.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::rig::{BridgeExtra, LIVE_PREFIX, Seen, Subscriber};
use super::{BenchConfig, BenchError, Figures, alarm_from, ceiling, figures, percentile, setup};
use crate::bvcsp::SimDevice;
use crate::mosquitto::Mosquitto;
use crate::protocol::Stream;

/// The device whose alarms make up the backlog, and the one raising live SOS alarms.
const BACKLOG_DEVICE: &str = "PU_1";
const LIVE_DEVICE: &str = "PU_SOS";
/// How often a live alarm is raised during the replay.
const LIVE_EVERY: Duration = Duration::from_millis(100);
/// The ceiling is a rate: this many messages measure it well enough.
const CEILING_MAX: u64 = 200_000;

/// Scenario (e)'s own figures; its row in the table carries the rest (the replay rate
/// as events/s, its ratio to the ceiling, and the live alarms' latencies).
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Messages in the outbox when the broker came back.
    pub backlog: u64,
    /// How fast the outbox took the backlog while the broker was away (messages/s).
    pub fill_rate: f64,
    /// From the broker's start: the subscriber back, the bridge's `online`, the first
    /// message received (the last two are seen by the subscriber, so neither can be
    /// earlier than the first).
    pub subscriber_ms: f64,
    pub connect_ms: f64,
    pub first_ms: f64,
    /// The backlog over the time from the broker's start to its last message (the
    /// table's events/s is over the time from its first message to its last).
    pub replay_rate_from_start: f64,
    /// Live alarms raised during the replay.
    pub live: u64,
    /// First deliveries that came after a later message on the same topic.
    pub out_of_order: u64,
}

impl Recovery {
    /// Medians over runs; counts of live alarms and of reordering are summed.
    pub fn combine(runs: &[&Recovery]) -> Option<Recovery> {
        let first = runs.first()?;
        let m = |f: fn(&Recovery) -> f64| super::median(runs.iter().map(|r| f(r)).collect());
        Some(Recovery {
            backlog: first.backlog,
            fill_rate: m(|r| r.fill_rate),
            subscriber_ms: m(|r| r.subscriber_ms),
            connect_ms: m(|r| r.connect_ms),
            first_ms: m(|r| r.first_ms),
            replay_rate_from_start: m(|r| r.replay_rate_from_start),
            live: runs.iter().map(|r| r.live).sum(),
            out_of_order: runs.iter().map(|r| r.out_of_order).sum(),
        })
    }

    /// The scenario's details, one line under the table.
    pub fn render(&self, f: &Figures) -> String {
        format!(
            "{}: {} messages waited in the outbox (it took them at {:.0} msg/s with the broker away). \
             From the broker's start: subscriber back {:.0} ms, bridge connected {:.0} ms, first message {:.0} ms; \
             replay {:.0} msg/s from the first message ({:.2}× the ceiling), {:.0} msg/s from the broker's start. \
             {} live SOS alarms (one per 100 ms during the replay, from a device with no backlog): \
             p50 {:.1} ms, max {:.1} ms. Out of order: {}.\n",
            f.scenario,
            self.backlog,
            self.fill_rate,
            self.subscriber_ms,
            self.connect_ms,
            self.first_ms,
            f.throughput,
            f.ratio,
            self.replay_rate_from_start,
            self.live,
            f.p50_ms,
            f.max_ms,
            self.out_of_order,
        )
    }
}

/// What the scenario reads from the bridge's `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    depth: u64,
    alarms_queued: u64,
    connected: bool,
}

/// One sample of a Prometheus text exposition: `name` (or `name_total`) whose labels
/// contain `label`.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').unwrap_or((series, ""));
        let matches = n.strip_suffix("_total").unwrap_or(n) == name && labels.contains(label);
        matches.then(|| value.trim().parse().ok()).flatten()
    })
}

fn parse_metrics(text: &str) -> Option<Metrics> {
    Some(Metrics {
        depth: sample(text, "bvcsp2mqtt_outbox_depth", "")? as u64,
        alarms_queued: sample(text, "bvcsp2mqtt_events_out", "stream=\"alarm\"")? as u64,
        connected: sample(text, "bvcsp2mqtt_mqtt_connected", "")? > 0.0,
    })
}

/// `GET /metrics`; `None` while the bridge does not answer.
async fn scrape(addr: SocketAddr) -> Option<Metrics> {
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        tcp.read_to_end(&mut body).await.ok()?;
        parse_metrics(&String::from_utf8_lossy(&body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// Poll `/metrics` every 100 ms until `ready`, for at most `deadline`.
async fn until(
    addr: SocketAddr,
    what: &str,
    deadline: Duration,
    ready: impl Fn(&Metrics) -> bool,
) -> Result<(), BenchError> {
    let end = Instant::now() + deadline;
    loop {
        if scrape(addr).await.is_some_and(|m| ready(&m)) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(BenchError::Timeout(what.into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bulk_received(s: &Seen) -> u64 {
    s.received - s.live_ns.len() as u64
}

fn ms_since(t0: Instant, t: Option<Instant>) -> f64 {
    t.map_or(f64::NAN, |t| {
        t.saturating_duration_since(t0).as_secs_f64() * 1e3
    })
}

/// Run scenario (e) with `backlog` messages; `None` without Mosquitto (the embedded
/// broker cannot be stopped).
pub(super) async fn recovery(
    cfg: &BenchConfig,
    backlog: u64,
) -> Result<Option<Figures>, BenchError> {
    if !Mosquitto::installed() {
        eprintln!(
            "scenario e (recovery) needs Mosquitto, which can be stopped and restarted: skipped"
        );
        return Ok(None);
    }
    let n = backlog.max(1);
    // Long enough for a slow, shared machine: a minute plus 2 000 messages a second.
    let deadline = Duration::from_secs(60 + n / 2_000);
    let store = tempfile::tempdir().map_err(setup("broker store"))?;
    // Mosquitto started as root drops to its own user, which must be able to write here.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o777))
            .map_err(setup("broker store"))?;
    }
    let mut broker = Mosquitto::start(&format!(
        "set_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 0\n\
         persistence true\npersistence_location {}/\nautosave_interval 0",
        store.path().display()
    ))
    .map_err(setup("mosquitto"))?;
    let ceil = ceiling(broker.addr, n.min(CEILING_MAX)).await?;

    let http: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(setup("health port"))?;
    let devices = [BACKLOG_DEVICE, LIVE_DEVICE]
        .map(|d| SimDevice::new(d, "Helmet", true))
        .to_vec();
    let sub = Subscriber::start_persistent(broker.addr).await?;
    let extra = BridgeExtra {
        // Room for the whole backlog: the outbox must not pause reading upstream.
        max_bytes: Some((n * 4096).max(256 << 20)),
        http: Some(http),
    };
    let rig = super::rig_of(cfg, broker.addr, devices, "\"alarm\"", sub, &extra).await?;
    until(http, "the outbox empty before the outage", deadline, |m| {
        m.connected && m.depth == 0
    })
    .await?;

    broker.stop();
    until(http, "the bridge seeing the broker gone", deadline, |m| {
        !m.connected
    })
    .await?;
    let fill_started = Instant::now();
    for i in 0..n {
        rig.sim
            .inject(Stream::Alarm, alarm_from(BACKLOG_DEVICE, &format!("r{i}")));
    }
    until(http, "the outbox holding the backlog", deadline, |m| {
        m.alarms_queued >= n && m.depth >= n
    })
    .await?;
    let fill_s = fill_started.elapsed().as_secs_f64();

    rig.sub.reset();
    let cpu0 = rig.bridge.cpu_ns();
    let t0 = Instant::now();
    broker.up().map_err(setup("mosquitto restart"))?;
    rig.sub
        .wait("the first message after the outage", deadline, |s| {
            s.first_bulk_at.is_some()
        })
        .await?;
    let mut tick = tokio::time::interval(LIVE_EVERY);
    let end = Instant::now() + deadline;
    let mut live = 0u64;
    loop {
        tick.tick().await;
        rig.sim.inject(
            Stream::Alarm,
            alarm_from(LIVE_DEVICE, &format!("{LIVE_PREFIX}{live}")),
        );
        live += 1;
        if bulk_received(&rig.sub.seen()) >= n || Instant::now() > end {
            break;
        }
    }
    // A timeout here shows as loss in the figures.
    let _ = rig
        .sub
        .wait(
            "the backlog and the live alarms",
            Duration::from_secs(60),
            |s| s.received >= n + live,
        )
        .await;

    let mut f = figures("e: recovery", n + live, &rig, t0, cpu0, ceil);
    let g = rig.sub.seen();
    let mut lat = g.live_ns.clone();
    lat.sort_unstable();
    f.p50_ms = percentile(&lat, 0.50);
    f.p95_ms = percentile(&lat, 0.95);
    f.p99_ms = percentile(&lat, 0.99);
    f.max_ms = percentile(&lat, 1.0);
    let rate = |from: Option<Instant>| match (from, g.last_bulk_at) {
        (Some(a), Some(b)) if b > a => bulk_received(&g) as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    };
    f.throughput = rate(g.first_bulk_at);
    f.ratio = f.throughput / ceil.max(1e-9);
    f.recovery = Some(Recovery {
        backlog: n,
        fill_rate: n as f64 / fill_s.max(1e-9),
        subscriber_ms: ms_since(t0, g.connack_at),
        connect_ms: ms_since(t0, g.online_at),
        first_ms: ms_since(t0, g.first_bulk_at),
        replay_rate_from_start: rate(Some(t0)),
        live,
        out_of_order: g.out_of_order,
    });
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_the_scenario_waits_on_are_read_from_the_exposition() {
        let text = "HTTP/1.1 200 OK\r\ncontent-length: 999\r\n\r\n\
            # HELP bvcsp2mqtt_events_out Messages queued\n# TYPE bvcsp2mqtt_events_out counter\n\
            bvcsp2mqtt_events_out_total{stream=\"location\"} 7\n\
            bvcsp2mqtt_events_out_total{stream=\"alarm\"} 1000000\n\
            bvcsp2mqtt_outbox_depth 1000003\n\
            bvcsp2mqtt_outbox_depth_other 5\n\
            bvcsp2mqtt_mqtt_connected 0\n# EOF\n";
        let m = parse_metrics(text).expect("all three present");
        assert_eq!(
            (m.depth, m.alarms_queued, m.connected),
            (1_000_003, 1_000_000, false)
        );
        assert!(parse_metrics("bvcsp2mqtt_outbox_depth 1\n").is_none());
    }
}
