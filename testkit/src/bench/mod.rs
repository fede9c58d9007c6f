//! `bvcsp2mqtt bench`: the bridge end to end under load. The BVCSP simulator floods,
//! a real broker carries the messages (Mosquitto with `set_tcp_nodelay true` when
//! installed, else the embedded one), the bridge runs as its own process with its
//! durable outbox (so its CPU and memory are its own), and a subscriber counts every
//! message, de-duplicates it and measures latency from the time the simulator sent the
//! frame. A direct publisher to the same broker gives the rig's own ceiling, measured in
//! the same run, because only ratios taken side by side mean anything on a shared machine.
//! Scenario (e), recovery after a long broker outage, lives in `recovery`; the subscriber
//! and the bridge process in `rig`.

mod recovery;
mod rig;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};

use crate::broker::EmbeddedBroker;
use crate::bvcsp::{BvcspSim, SimDevice, SimOptions};
use crate::mosquitto::Mosquitto;
use crate::protocol::Stream;
pub use recovery::Recovery;
use rig::{BridgeExtra, BridgeProc, Subscriber, now_ns};

const BASE: &str = "bench";

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}: timed out")]
    Timeout(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// A small run (for CI): correctness only, timings not meaningful.
    pub quick: bool,
    pub repeat: usize,
    /// The bvcsp2mqtt binary to run as the bridge.
    pub bridge_exe: PathBuf,
    /// Which scenarios to run (`a`–`e`); empty means all. `c` and `d` share one fleet.
    pub scenarios: Vec<char>,
    /// Messages waiting in the outbox when the broker returns, in scenario (e)
    /// (default 1 000 000, or 2 000 with `quick`).
    pub backlog: Option<u64>,
}

impl BenchConfig {
    fn wants(&self, scenario: char) -> bool {
        self.scenarios.is_empty() || self.scenarios.contains(&scenario)
    }
}

/// One scenario's figures (one run).
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub scenario: String,
    pub events: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_s_per_1000: f64,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    pub ceiling: f64,
    /// Throughput over the ceiling of the same run (for several runs: the median ratio).
    pub ratio: f64,
    /// Scenario (e)'s own figures.
    pub recovery: Option<Recovery>,
}

/// The broker for the run: Mosquitto when installed, else the embedded one.
struct Broker {
    addr: SocketAddr,
    kind: &'static str,
    _mosquitto: Option<Mosquitto>,
}

fn start_broker() -> Result<Broker, BenchError> {
    if Mosquitto::installed() {
        let m = Mosquitto::start(
            "set_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 0",
        )
        .map_err(setup("mosquitto"))?;
        return Ok(Broker {
            addr: m.addr,
            kind: "mosquitto",
            _mosquitto: Some(m),
        });
    }
    let b = EmbeddedBroker::start(0).map_err(setup("embedded broker"))?;
    Ok(Broker {
        addr: b.addr,
        kind: "embedded rumqttd",
        _mosquitto: None,
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

fn alarm(key: &str) -> Value {
    alarm_from("PU_1", key)
}

/// An SOS alarm (type 5) raised by `device`, stamped with the time it is sent.
fn alarm_from(device: &str, key: &str) -> Value {
    json!({"key": key, "type": 5, "time": 1717400123, "userID": "", "userName": "", "devID": device,
        "devName": "Helmet 07", "subDevIdx": 65536, "status": 0, "desc": "SOS", "lat": 31.849722,
        "lng": 117.207138, "payload": "", "sent_ns": now_ns()})
}

/// Fields drop in order: the bridge stops first, then the subscriber, then the simulator.
struct Rig {
    bridge: BridgeProc,
    sub: Subscriber,
    sim: BvcspSim,
}

async fn rig(
    cfg: &BenchConfig,
    broker: &Broker,
    devices: usize,
    streams: &str,
) -> Result<Rig, BenchError> {
    let devices: Vec<SimDevice> = (0..devices.max(1))
        .map(|i| SimDevice::new(&format!("PU_{i}"), "Unit", true))
        .collect();
    let sub = Subscriber::start(broker.addr).await?;
    rig_of(
        cfg,
        broker.addr,
        devices,
        streams,
        sub,
        &BridgeExtra::default(),
    )
    .await
}

/// A simulator with `devices`, the bridge reading `streams` from it, `sub` watching; once
/// the bridge says its BVCSP link is up.
async fn rig_of(
    cfg: &BenchConfig,
    broker: SocketAddr,
    devices: Vec<SimDevice>,
    streams: &str,
    sub: Subscriber,
    extra: &BridgeExtra,
) -> Result<Rig, BenchError> {
    let sim = BvcspSim::start(SimOptions {
        devices,
        idle_close: None,
        ..Default::default()
    })
    .await
    .map_err(setup("simulator"))?;
    let bridge = BridgeProc::spawn(&cfg.bridge_exe, &sim, broker, streams, extra)?;
    sub.wait("bridge up", Duration::from_secs(60), |s| s.link_up)
        .await?;
    Ok(Rig { bridge, sub, sim })
}

fn figures(
    name: &str,
    events: u64,
    rig: &Rig,
    started: Instant,
    cpu0: u64,
    ceiling: f64,
) -> Figures {
    let g = rig.sub.seen();
    let mut lat = g.latencies_ns.clone();
    lat.sort_unstable();
    let duplicates: u64 = g
        .counts
        .values()
        .map(|n| u64::from(n.saturating_sub(1)))
        .sum();
    let elapsed = g
        .last_at
        .map(|t| t.duration_since(started))
        .unwrap_or_default()
        .as_secs_f64();
    let cpu_s = (rig.bridge.cpu_ns().saturating_sub(cpu0)) as f64 / 1e9;
    Figures {
        scenario: name.into(),
        events,
        received: g.received,
        lost: events.saturating_sub(g.received),
        duplicates,
        throughput: if elapsed > 0.0 {
            g.received as f64 / elapsed
        } else {
            0.0
        },
        p50_ms: percentile(&lat, 0.50),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
        cpu_s_per_1000: if g.received > 0 {
            cpu_s / (g.received as f64 / 1000.0)
        } else {
            0.0
        },
        cpu_s,
        peak_rss_mb: rig.bridge.peak_rss_mb(),
        ceiling,
        ratio: 0.0,
        recovery: None,
    }
}

/// The rig's own ceiling: a direct QoS 1 publisher of alarm-sized messages.
async fn ceiling(broker: SocketAddr, n: u64) -> Result<f64, BenchError> {
    let sub = Subscriber::start(broker).await?;
    let mut opts = MqttOptions::new(
        format!("bench-pub-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker.port(),
    );
    opts.set_max_packet_size(16 << 20, 16 << 20)
        .set_inflight(100);
    opts.set_clean_session(true);
    let (client, mut events) = AsyncClient::new(opts, 1000);
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let started = Instant::now();
    let padding = "x".repeat(420);
    for i in 0..n {
        let body = json!({"key": format!("c{i}"), "sent_ns": now_ns(), "pad": padding}).to_string();
        client
            .publish(format!("{BASE}/ceiling"), QoS::AtLeastOnce, false, body)
            .await
            .map_err(setup("direct publish"))?;
    }
    sub.wait("ceiling messages", Duration::from_secs(120), |s| {
        s.received >= n
    })
    .await?;
    let elapsed = sub.seen().last_at.map(|t| t - started).unwrap_or_default();
    driver.abort();
    Ok(n as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// (a) N alarms as fast as the simulator can send them.
async fn burst(cfg: &BenchConfig, broker: &Broker, n: u64) -> Result<Figures, BenchError> {
    let ceil = ceiling(broker.addr, n).await?;
    let rig = rig(cfg, broker, 1, "\"alarm\"").await?;
    rig.sub.reset();
    let cpu0 = rig.bridge.cpu_ns();
    let started = Instant::now();
    for i in 0..n {
        rig.sim.inject(Stream::Alarm, alarm(&format!("a{i}")));
    }
    let _ = rig
        .sub
        .wait("burst delivered", Duration::from_secs(300), |s| {
            s.received >= n
        })
        .await;
    let mut f = figures("a: burst of alarms", n, &rig, started, cpu0, ceil);
    f.ratio = f.throughput / ceil.max(1e-9);
    Ok(f)
}

/// (b) alarms at a steady rate.
async fn steady(
    cfg: &BenchConfig,
    broker: &Broker,
    per_s: u64,
    secs: u64,
) -> Result<Figures, BenchError> {
    let rig = rig(cfg, broker, 1, "\"alarm\"").await?;
    rig.sub.reset();
    let cpu0 = rig.bridge.cpu_ns();
    let started = Instant::now();
    // One tick per millisecond: a steady source, not bursts of ten.
    let per_tick = (per_s / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let total = per_s * secs;
    while sent < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            rig.sim.inject(Stream::Alarm, alarm(&format!("s{sent}")));
            sent += 1;
        }
    }
    let _ = rig
        .sub
        .wait("steady delivered", Duration::from_secs(60), |s| {
            s.received >= total
        })
        .await;
    let mut f = figures("b: steady alarms", total, &rig, started, cpu0, 0.0);
    f.throughput = f.received as f64 / secs as f64;
    Ok(f)
}

/// (c) many devices sending GPS at 1 Hz; then (d) the same fleet at rest.
async fn gps_and_idle(
    cfg: &BenchConfig,
    broker: &Broker,
    devices: usize,
    secs: u64,
    idle_secs: u64,
) -> Result<(Figures, Figures), BenchError> {
    let rig = rig(cfg, broker, devices, "\"location\", \"online_status\"").await?;
    let end = Instant::now() + Duration::from_secs(120);
    while rig.sim.subscribed().len() < devices {
        if Instant::now() > end {
            return Err(BenchError::Timeout("GPS subscription".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the snapshot's retained messages drain: they are not part of the measurement.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.sub.reset();
    let cpu0 = rig.bridge.cpu_ns();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = (devices / 10).max(1);
    let mut sent = 0u64;
    for second in 0..secs {
        for slice in 0..10usize {
            tick.tick().await;
            for d in (slice * per_tick)..((slice + 1) * per_tick).min(devices) {
                let key = format!("g{second}-{d}");
                rig.sim.inject(
                    Stream::Location,
                    json!({"devId": format!("PU_{d}"), "lat": 31.8, "lng": 117.2, "key": key, "sent_ns": now_ns()}),
                );
                sent += 1;
            }
        }
    }
    let _ = rig
        .sub
        .wait("GPS delivered", Duration::from_secs(60), |s| {
            s.received >= sent
        })
        .await;
    let mut gps = figures("c: GPS at 1 Hz", sent, &rig, started, cpu0, 0.0);
    gps.throughput = gps.received as f64 / secs as f64;

    let cpu_idle0 = rig.bridge.cpu_ns();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu = (rig.bridge.cpu_ns().saturating_sub(cpu_idle0)) as f64 / 1e9;
    let idle = Figures {
        scenario: "d: idle fleet".into(),
        cpu_s: idle_cpu,
        peak_rss_mb: rig.bridge.peak_rss_mb(),
        ..Default::default()
    };
    Ok((gps, idle))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of each figure over the repetitions; losses and duplicates are summed.
pub fn combine(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        scenario: runs.first().map(|r| r.scenario.clone()).unwrap_or_default(),
        events: runs.iter().map(|r| r.events).sum(),
        received: runs.iter().map(|r| r.received).sum(),
        lost: runs.iter().map(|r| r.lost).sum(),
        duplicates: runs.iter().map(|r| r.duplicates).sum(),
        throughput: m(|r| r.throughput),
        p50_ms: m(|r| r.p50_ms),
        p95_ms: m(|r| r.p95_ms),
        p99_ms: m(|r| r.p99_ms),
        max_ms: m(|r| r.max_ms),
        cpu_s_per_1000: m(|r| r.cpu_s_per_1000),
        cpu_s: m(|r| r.cpu_s),
        peak_rss_mb: m(|r| r.peak_rss_mb),
        ceiling: m(|r| r.ceiling),
        ratio: m(|r| r.ratio),
        recovery: Recovery::combine(
            &runs
                .iter()
                .filter_map(|r| r.recovery.as_ref())
                .collect::<Vec<_>>(),
        ),
    }
}

/// Run every scenario `repeat` times; returns the combined figures per scenario.
pub async fn run(cfg: &BenchConfig) -> Result<(String, Vec<Figures>), BenchError> {
    let broker = start_broker()?;
    let (burst_n, rate, rate_secs, fleet, gps_secs, idle_secs, backlog) = if cfg.quick {
        (2_000, 200, 2, 200, 2, 1, 2_000)
    } else {
        (100_000, 1_000, 20, 10_000, 30, 10, 1_000_000)
    };
    let backlog = cfg.backlog.unwrap_or(backlog);
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c = Vec::new();
    let mut d = Vec::new();
    let mut e = Vec::new();
    let runs = cfg.repeat.max(1);
    for i in 1..=runs {
        if cfg.wants('a') {
            eprintln!("run {i}/{runs}: burst of {burst_n} alarms");
            a.push(burst(cfg, &broker, burst_n).await?);
        }
        if cfg.wants('b') {
            eprintln!("run {i}/{runs}: {rate} alarms/s for {rate_secs} s");
            b.push(steady(cfg, &broker, rate, rate_secs).await?);
        }
        if cfg.wants('c') || cfg.wants('d') {
            eprintln!(
                "run {i}/{runs}: {fleet} devices, GPS at 1 Hz for {gps_secs} s, then idle {idle_secs} s"
            );
            let (g, idle) = gps_and_idle(cfg, &broker, fleet, gps_secs, idle_secs).await?;
            c.push(g);
            d.push(idle);
        }
        if cfg.wants('e') {
            eprintln!(
                "run {i}/{runs}: recovery, {backlog} messages waiting in the outbox while the broker is away"
            );
            e.extend(recovery::recovery(cfg, backlog).await?);
        }
    }
    let figures = [a, b, c, d, e]
        .iter()
        .zip(['a', 'b', 'c', 'd', 'e'])
        .filter(|(runs, s)| !runs.is_empty() && cfg.wants(*s))
        .map(|(runs, _)| combine(runs))
        .collect();
    Ok((broker.kind.to_string(), figures))
}

/// The results as a table.
pub fn render(broker: &str, repeat: usize, figures: &[Figures]) -> String {
    let mut out = format!(
        "bvcsp2mqtt bench — broker: {broker}; medians of {repeat} run(s); bridge = separate process, durable outbox on, QoS 1\n\n"
    );
    out.push_str(&format!(
        "{:<20} {:>8} {:>6} {:>5} {:>10} {:>9} {:>7} {:>7} {:>7} {:>8} {:>10} {:>8}\n",
        "scenario",
        "events",
        "lost",
        "dup",
        "events/s",
        "ceiling",
        "ratio",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU s/1k",
        "RSS MB"
    ));
    for f in figures {
        let ratio = if f.ratio > 0.0 {
            format!("{:.2}", f.ratio)
        } else {
            "-".into()
        };
        let ceiling = if f.ceiling > 0.0 {
            format!("{:.0}", f.ceiling)
        } else {
            "-".into()
        };
        if f.events == 0 {
            out.push_str(&format!(
                "{:<20} {:>8} {:>6} {:>5} {:>10} {:>9} {:>7} {:>7} {:>7} {:>8} {:>10} {:>8.1}   (CPU {:.3} s at rest)\n",
                f.scenario, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", f.peak_rss_mb, f.cpu_s
            ));
            continue;
        }
        out.push_str(&format!(
            "{:<20} {:>8} {:>6} {:>5} {:>10.0} {:>9} {:>7} {:>7.2} {:>7.2} {:>8.1} {:>10.4} {:>8.1}\n",
            f.scenario,
            f.events,
            f.lost,
            f.duplicates,
            f.throughput,
            ceiling,
            ratio,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.cpu_s_per_1000,
            f.peak_rss_mb
        ));
    }
    let details: Vec<String> = figures
        .iter()
        .filter_map(|f| f.recovery.as_ref().map(|r| r.render(f)))
        .collect();
    if !details.is_empty() {
        out.push_str(
            "\n(e): its own Mosquitto, persistence on, restarted; events/s is the replay rate from the \
             first message to the last, the latency columns are the live SOS alarms'.\n",
        );
        details.iter().for_each(|d| out.push_str(d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_combine_into_medians_and_sums() {
        let run = |throughput: f64, ceiling: f64, lost: u64| Figures {
            scenario: "a".into(),
            events: 10,
            lost,
            throughput,
            ceiling,
            ratio: throughput / ceiling,
            ..Default::default()
        };
        let f = combine(&[run(50.0, 100.0, 0), run(90.0, 100.0, 1), run(40.0, 50.0, 0)]);
        // The ratio is the median of each run's own ratio, not a ratio of medians.
        assert_eq!(f.ratio, 0.8);
        assert_eq!(f.throughput, 50.0);
        assert_eq!(f.lost, 1);
        assert_eq!(f.events, 30);
    }
}
