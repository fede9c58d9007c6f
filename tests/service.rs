//! Running as a service: health over MQTT and HTTP, readiness, the systemd protocol
//! (READY, STOPPING, WATCHDOG) spoken to a test socket, and signals.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::BvcspSim;
use bvcsp2mqtt_testkit::eventually;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path)
}

/// Check the exposition format line by line; returns (name{labels}, value) samples.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let kind = rest.split_whitespace().next().unwrap_or("");
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        assert!(
            name.starts_with("bvcsp2mqtt_"),
            "names are bvcsp2mqtt_*: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.push((series.to_string(), v));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {series}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_the_bridge() {
    let sim = one_device_sim().await;
    let broker = broker();
    let proxy = Proxy::start(broker).await;
    let obs = Observer::start(broker).await;
    let mut cfg = bridge_config(&sim, proxy.addr, "streams = [\"alarm\"]");
    cfg.service.http = true;
    cfg.service.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.service.health_interval = Duration::from_secs(1);
    let bridge = Bridge::start(cfg).await.unwrap();
    let http = bridge.http_addr.expect("listener on");
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;

    assert_eq!(get(http, "/healthz").0, 200);
    assert_eq!(get(http, "/readyz").0, 200);
    assert_eq!(get(http, "/nope").0, 404);
    let (status, before) = get(http, "/metrics");
    assert_eq!(status, 200);
    let before = parse_metrics(&before);
    let in_before = sample(&before, "bvcsp2mqtt_events_in_total{stream=\"alarm\"}");

    for i in 0..5 {
        sim.inject(Stream::Alarm, json!({"key": format!("m{i}"), "type": 5, "devID": "PU_1", "status": 0, "time": 1717400000}));
    }
    obs.wait_for("five alarms", T, |log| {
        (log.iter()
            .filter(|r| r.topic == format!("{BASE}/device/PU_1/alarm/sos"))
            .count()
            >= 5)
            .then_some(())
    })
    .await;
    let after = loop {
        let m = parse_metrics(&get(http, "/metrics").1);
        if sample(&m, "bvcsp2mqtt_publish_latency_seconds_count") >= 5.0 {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&after, "bvcsp2mqtt_events_in_total{stream=\"alarm\"}"),
        in_before + 5.0
    );
    assert!(sample(&after, "bvcsp2mqtt_events_out_total{stream=\"alarm\"}") >= 5.0);
    assert!(sample(&after, "bvcsp2mqtt_messages_acked_total") >= 5.0);
    assert_eq!(sample(&after, "bvcsp2mqtt_mqtt_connected"), 1.0);
    assert_eq!(
        sample(
            &after,
            "bvcsp2mqtt_auth_refreshes_total{link=\"bvcsp\",kind=\"login\"}"
        ),
        1.0
    );

    // The retained health report.
    let health = obs
        .wait_topic(&format!("{BASE}/bridge/health"), T, |r| {
            r.json()["bvcsp"]["counters"]["streams"]["alarm"]["events_in"].as_u64() >= Some(5)
        })
        .await
        .json();
    assert_eq!(health["mqtt"]["connected"], true);
    assert_eq!(health["bvcsp"]["state"], "up");
    assert_eq!(health["bvcsp"]["streams"]["alarm"], "up");
    assert!(health["outbox"]["depth"].is_u64() && health["outbox"]["oldest_age_ms"].is_u64());
    assert!(health["memory_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(health["last_event_at"].is_string());
    assert!(health["uptime_s"].is_u64());

    // The broker goes away: not ready; back: ready.
    proxy.cut();
    eventually("readyz to flip to 503", T, || get(http, "/readyz").0 == 503).await;
    assert_eq!(get(http, "/healthz").0, 200, "alive, just not ready");
    assert_eq!(
        sample(&parse_metrics(&get(http, "/metrics").1), "bvcsp2mqtt_ready"),
        0.0
    );
    proxy.restore();
    eventually("readyz back to 200", T, || get(http, "/readyz").0 == 200).await;
    bridge.stop(Duration::from_secs(5)).await;
}

fn daemon_config(
    dir: &std::path::Path,
    sim: &BvcspSim,
    mqtt: SocketAddr,
    grace: &str,
) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[bvcsp]\nurl = \"{}\"\nusername = \"admin\"\npassword = \"123456\"\nstreams = [\"alarm\"]\n\
             keepalive_interval = \"300ms\"\npong_timeout = \"2s\"\n\
             [mqtt]\nurl = \"mqtt://{mqtt}\"\nclient_id = \"svc-{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n\
             [storage]\ndir = \"{}\"\n[service]\ngrace_period = \"{grace}\"\n",
            sim.url(),
            rand_suffix(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_systemd_notify_protocol() {
    let sim = one_device_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = daemon_config(dir.path(), &sim, broker, "5s");
    let mut d = Daemon::spawn_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let read_until = |want: &str, seen: &mut Vec<String>| {
        let end = std::time::Instant::now() + T;
        let mut buf = [0u8; 512];
        while !seen.iter().any(|m| m.contains(want)) {
            assert!(
                std::time::Instant::now() < end,
                "no {want} from the daemon; got {seen:?}"
            );
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until("READY=1", &mut seen);
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    // Petted at half the period while every loop is alive: several within a few seconds.
    let pets_before = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    for _ in 0..3 {
        let count = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        let end = std::time::Instant::now() + T;
        let mut buf = [0u8; 512];
        while seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() == count {
            assert!(std::time::Instant::now() < end, "watchdog not petted");
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
    assert!(seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= pets_before + 3);
    d.signal("-TERM");
    read_until("STOPPING=1", &mut seen);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
    let ready_at = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    let stopping_at = seen.iter().position(|m| m.contains("STOPPING=1")).unwrap();
    assert!(ready_at < stopping_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let sim = one_device_sim().await;
    // A broker that is not there: the graceful stop would wait out its grace period.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = daemon_config(dir.path(), &sim, nowhere, "60s");
    let mut d = Daemon::spawn(&config);
    sim.wait_until("the daemon logged in", T, |s| s.counters().logins_ok >= 1)
        .await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    sim.inject(
        Stream::Alarm,
        json!({"key": "stuck", "type": 5, "devID": "PU_1", "status": 0, "time": 1717400000}),
    );
    d.signal("-TERM");
    eventually("the daemon to log the signal", T, || {
        d.log().contains("signal received")
    })
    .await;
    let second = std::time::Instant::now();
    d.signal("-TERM");
    let status = d.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "{}", d.log());
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "at once, not after the 60 s grace"
    );
}
