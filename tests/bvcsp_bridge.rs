//! The bridge end to end, in process, over real sockets: the BVCSP simulator, an
//! embedded MQTT broker, and the daemon between them.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, RefreshMode, SimDevice, SimOptions, SubprotocolMode};
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const T: Duration = Duration::from_secs(15);

fn devices() -> Vec<SimDevice> {
    let mut a = SimDevice::new("PU_55AA0000", "Helmet 07", true);
    a.lat = 31.849722;
    a.lng = 117.207138;
    vec![
        a,
        SimDevice::new("PU_264F708E", "Truck 7", false),
        SimDevice::new("PU_1A2B3C4D", "Cam 1", true),
    ]
}

async fn sim_with(opts: SimOptions) -> BvcspSim {
    BvcspSim::start(SimOptions {
        devices: devices(),
        ..opts
    })
    .await
    .expect("simulator")
}

/// The usual rig: simulator, broker, observer, and a bridge whose `streams` are all up.
struct Rig {
    sim: BvcspSim,
    obs: Observer,
    bridge: Bridge,
}

async fn rig(opts: SimOptions, streams: &[Stream]) -> Rig {
    let sim = sim_with(opts).await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let names: Vec<String> = streams
        .iter()
        .map(|s| format!("\"{}\"", s.name()))
        .collect();
    let extra = format!("streams = [{}]", names.join(", "));
    let bridge = Bridge::start(bridge_config(&sim, broker, &extra))
        .await
        .unwrap();
    obs.wait_all_up(streams, T).await;
    wait_sockets(&sim, streams, T).await;
    Rig { sim, obs, bridge }
}

fn alarm(key: &str, device: &str, alarm_type: i64) -> serde_json::Value {
    json!({"key": key, "type": alarm_type, "time": 1717400123, "userID": "", "userName": "",
        "devID": device, "devName": "Truck 7", "subDevIdx": 65536, "status": 0,
        "desc": "test", "lat": 31.849722, "lng": 117.207138, "payload": ""})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_reaches_its_contract_topic() {
    let sim = sim_with(SimOptions::default()).await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, ""))
        .await
        .unwrap();
    obs.wait_all_up(&Stream::ALL, T).await;
    wait_sockets(&sim, &Stream::ALL, T).await;

    // The token travelled in Sec-WebSocket-Protocol, never in the URL.
    let ups = sim.upgrades();
    assert!(ups.iter().filter(|u| u.accepted).count() >= 5);
    for u in ups.iter().filter(|u| u.accepted) {
        assert!(
            u.subprotocol.as_deref().is_some_and(|t| !t.is_empty()),
            "{u:?}"
        );
        assert!(u.query_token.is_none(), "token leaked into the URL: {u:?}");
    }

    // The snapshot published retained availability and location.
    let avail = obs
        .wait_topic(
            &format!("{BASE}/device/PU_264F708E/availability"),
            T,
            |_| true,
        )
        .await;
    assert_eq!(avail.text(), "offline");
    let loc = obs
        .wait_topic(&format!("{BASE}/device/PU_55AA0000/location"), T, |_| true)
        .await
        .json();
    assert_eq!(loc["lat"], 31.849722);
    let late = Observer::start(broker).await;
    let retained = late
        .wait_topic(&format!("{BASE}/device/PU_55AA0000/availability"), T, |r| {
            r.retain
        })
        .await;
    assert_eq!(retained.text(), "online");
    let info = late
        .wait_topic(&format!("{BASE}/bridge/info"), T, |r| r.retain)
        .await
        .json();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        late.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.retain)
            .await
            .text(),
        "online"
    );

    // The GPS subscription names every device from the snapshot.
    sim.wait_until("GPS subscription", T, |s| s.subscribed().len() == 3)
        .await;
    let expected: BTreeSet<String> = devices().into_iter().map(|d| d.id).collect();
    assert_eq!(sim.subscribed(), expected);
    assert!(
        sim.uplink(Stream::Location)
            .iter()
            .any(|f| f.contains("\"badd\":true"))
    );

    // One event of each stream.
    assert_eq!(
        sim.inject(Stream::Alarm, alarm("k1", "PU_264F708E", 4106)),
        1
    );
    assert_eq!(
        sim.inject(
            Stream::Location,
            json!({"devId": "PU_1A2B3C4D", "lat": 30.5, "lng": 114.3, "height": 12})
        ),
        1
    );
    assert_eq!(
        sim.inject(
            Stream::OnlineStatus,
            json!({"type": "PU", "time": 1717400000, "status": 1,
            "device": {"id": "PU_264F708E", "name": "Truck 7"}})
        ),
        1
    );
    assert_eq!(
        sim.inject(
            Stream::Im,
            json!({"iMsgID": 7, "type": 1, "text": "hi", "time": 1717400000})
        ),
        1
    );
    assert_eq!(
        sim.inject(
            Stream::Conference,
            json!({"type": "member", "operate": "add", "confInfo": {"id": "CONF_1"}})
        ),
        1
    );

    let a = obs
        .wait_topic(
            &format!("{BASE}/device/PU_264F708E/alarm/overspeed"),
            T,
            |_| true,
        )
        .await;
    assert!(!a.retain, "events are never retained");
    let a = a.json();
    for key in [
        "event_id",
        "stream",
        "received_at",
        "raw",
        "type",
        "label",
        "state",
        "device_id",
        "device_name",
        "description",
        "time",
        "lat",
        "lng",
    ] {
        assert!(a.get(key).is_some(), "alarm lacks {key}: {a}");
    }
    assert_eq!(a["state"], "start");
    assert_eq!(a["raw"]["key"], "k1");
    let l = obs
        .wait_topic(&format!("{BASE}/device/PU_1A2B3C4D/location"), T, |r| {
            r.json()["lat"] == 30.5
        })
        .await
        .json();
    assert_eq!(
        (
            l["lng"].as_f64(),
            l["height"].as_f64(),
            l["stream"].as_str()
        ),
        (Some(114.3), Some(12.0), Some("location"))
    );
    obs.wait_topic(&format!("{BASE}/device/PU_264F708E/availability"), T, |r| {
        r.text() == "online"
    })
    .await;
    obs.wait_topic(&format!("{BASE}/device/PU_264F708E/status"), T, |r| {
        r.json()["online"] == true
    })
    .await;
    let ev = obs
        .wait_topic(&format!("{BASE}/event/online_status"), T, |_| true)
        .await;
    assert!(!ev.retain);
    let im = obs
        .wait_topic(&format!("{BASE}/im/message"), T, |_| true)
        .await
        .json();
    assert_eq!(im["stream"], "im");
    assert_eq!(im["raw"]["text"], "hi");
    let c = obs
        .wait_topic(&format!("{BASE}/conference/CONF_1/member"), T, |_| true)
        .await
        .json();
    assert_eq!(c["stream"], "conference");

    // Keepalives: empty frames on every socket, so the 60 s idle close never hits.
    sim.wait_until("keepalive frames", T, |s| {
        Stream::ALL
            .iter()
            .all(|st| s.uplink(*st).iter().filter(|f| f.is_empty()).count() >= 2)
    })
    .await;

    bridge.stop(Duration::from_secs(5)).await;
    assert_eq!(
        obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text()
            == "offline")
            .await
            .text(),
        "offline"
    );
    sim.wait_until("logout", T, |s| s.logouts() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_stream_loses_no_events() {
    let sim = sim_with(SimOptions {
        token_lifetime: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    sim.set_refresh_mode(RefreshMode::NewToken);
    let broker = broker();
    let obs = Observer::start(broker).await;
    let cfg = bridge_config(&sim, broker, "streams = [\"alarm\", \"online_status\"]");
    let bridge = Bridge::start(cfg).await.unwrap();
    obs.wait_all_up(&[Stream::Alarm, Stream::OnlineStatus], T)
        .await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;

    // Alarms every 40 ms across several refreshes: every one must reach a live socket
    // (the bridge never sits on a silent one) and then MQTT.
    let mut keys = Vec::new();
    let mut unreached = Vec::new();
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let key = format!("exp-{i}");
        if sim.inject(Stream::Alarm, alarm(&key, "PU_264F708E", 5)) == 0 {
            unreached.push(key.clone());
        }
        keys.push(key);
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(
        sim.counters().refreshes >= 2,
        "several refreshes happened: {:?}",
        sim.counters()
    );
    assert!(
        unreached.is_empty(),
        "events offered while no valid socket was open: {unreached:?}"
    );
    let topic = format!("{BASE}/device/PU_264F708E/alarm/sos");
    obs.wait_for("every alarm", T, |log| {
        let got: BTreeSet<String> = log
            .iter()
            .filter(|r| r.topic == topic)
            .filter_map(|r| r.json()["raw"]["key"].as_str().map(String::from))
            .collect();
        keys.iter().all(|k| got.contains(k)).then_some(())
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_9_leads_to_relogin_and_streams_resume() {
    let sim = sim_with(SimOptions::default()).await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(
        &sim,
        broker,
        "streams = [\"online_status\", \"alarm\"]",
    ))
    .await
    .unwrap();
    obs.wait_all_up(&[Stream::OnlineStatus, Stream::Alarm], T)
        .await;
    assert_eq!(sim.counters().logins_ok, 1);

    // The next REST call (the snapshot after the online-status stream reconnects) gets code 9.
    sim.force_code9(1);
    sim.kick_sockets(Some(Stream::OnlineStatus), Some(1001));
    sim.wait_until("second login", T, |s| s.counters().logins_ok == 2)
        .await;
    assert!(sim.counters().rest_code9 >= 1);

    // Refresh refused with code 9: a full login again.
    sim.set_refresh_mode(RefreshMode::Code9);
    sim.set_token_lifetime(Duration::from_secs(2));
    sim.force_code9(1);
    sim.kick_sockets(Some(Stream::OnlineStatus), Some(1001));
    sim.wait_until("login with a short-lived token", T, |s| {
        s.counters().logins_ok == 3
    })
    .await;
    let refreshes = sim.counters().refreshes;
    sim.wait_until("login after refused refresh", T, |s| {
        s.counters().logins_ok >= 4
    })
    .await;
    assert!(
        sim.counters().refreshes > refreshes,
        "the refresh was tried (and refused) first"
    );
    sim.set_token_lifetime(Duration::from_secs(3600));
    sim.set_refresh_mode(RefreshMode::NewToken);

    // Whatever the token now is, alarms still flow: an alarm reaches a live socket
    // (one opened with a valid token) and then MQTT.
    sim.wait_until("a socket with a valid token", T, |s| {
        s.inject(Stream::Alarm, alarm("after", "PU_55AA0000", 5)) > 0
    })
    .await;
    obs.wait_topic(&format!("{BASE}/device/PU_55AA0000/alarm/sos"), T, |r| {
        r.json()["raw"]["key"] == "after"
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_survived() {
    let Rig { sim, obs, bridge } = rig(SimOptions::default(), &[Stream::Alarm]).await;

    let garbage = [
        WsMessage::text("this is not json"),
        WsMessage::text("{\"truncated\": "),
        WsMessage::text(""),
        WsMessage::text("42"),
        WsMessage::text("[]"),
        WsMessage::binary(vec![0xff, 0xfe, 0x00, 0x01]),
        WsMessage::text("x".repeat(1 << 20)),
        WsMessage::text("{\"devID\": \"PU_1\", \"unknown\": {\"deep\": [1,2,3]}}"),
    ];
    for g in garbage {
        assert_eq!(sim.inject_raw(Stream::Alarm, g), 1);
    }
    // JSON in a binary frame, an array of two alarms, numbers as strings.
    sim.inject_raw(
        Stream::Alarm,
        WsMessage::binary(alarm("bin", "PU_1", 5).to_string().into_bytes()),
    );
    sim.inject_raw(
        Stream::Alarm,
        WsMessage::text(json!([alarm("arr1", "PU_1", 5), alarm("arr2", "PU_1", 5)]).to_string()),
    );
    sim.inject(
        Stream::Alarm,
        json!({"key": "str", "type": "4106", "status": "1", "devID": "PU_1", "time": "1717400123"}),
    );
    sim.inject(Stream::Alarm, alarm("after", "PU_1", 5));

    let sos = format!("{BASE}/device/PU_1/alarm/sos");
    for key in ["bin", "arr1", "arr2", "after"] {
        obs.wait_topic(&sos, T, |r| r.json()["raw"]["key"] == key)
            .await;
    }
    let s = obs
        .wait_topic(&format!("{BASE}/device/PU_1/alarm/overspeed"), T, |_| true)
        .await
        .json();
    assert_eq!(
        (s["type"].as_i64(), s["state"].as_str()),
        (Some(4106), Some("end"))
    );
    // Valid JSON without the fields is still published, raw.
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/unknown"), T, |r| {
        r.json()["raw"]["unknown"]["deep"][2] == 3
    })
    .await;
    // Never a reconnect over bad frames.
    assert_eq!(sim.counters().ws_upgrades.get("alarm"), Some(&1));
    let stats = bridge.bvcsp_stats.of(bvcsp2mqtt::bvcsp::Stream::Alarm);
    assert!(stats.malformed.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_reports_auth_failed_without_hammering() {
    let sim = sim_with(SimOptions {
        password: "the-right-one".into(),
        ..Default::default()
    })
    .await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let secret = "Wr0ng-Pa55word";
    let cfg = bridge_config_with(&sim.url(), "admin", secret, broker, "");
    let bridge = Bridge::start(cfg).await.unwrap();
    let link = obs.wait_link("auth_failed", T).await;
    assert!(
        link["last_error"].as_str().unwrap().contains("14"),
        "{link}"
    );
    assert!(
        link["retry_in_s"].as_f64().unwrap() >= 60.0,
        "next attempt is minutes away: {link}"
    );
    assert_eq!(sim.login_attempts(), 1);
    // Still exactly one attempt once the bridge has had time to misbehave (it must not).
    let after = obs
        .wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    let _ = after;
    tokio::task::yield_now().await;
    assert_eq!(sim.login_attempts(), 1);
    for r in obs.all() {
        assert!(!r.text().contains(secret), "password leaked on {}", r.topic);
    }
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_survived_with_growing_bounded_backoff() {
    // One stream, so every connection attempt during the outage is that stream's.
    let Rig { sim, obs, bridge } = rig(SimOptions::default(), &[Stream::Alarm]).await;

    let down_for = Duration::from_secs(4);
    sim.restart(down_for).await;
    let restarted = std::time::Instant::now();
    sim.wait_until("re-login after the restart", T, |s| {
        s.counters().logins_ok >= 2
    })
    .await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    let back = restarted.elapsed();

    // How the gaps between attempts grow, and their cap, is timer logic: tested under
    // paused time in retry.rs (`young_outage_grows_then_holds_a_short_cap` and the rest),
    // not on a loaded machine's wall clock. Here: it kept trying, without a storm.
    let attempts = sim.down_attempts();
    assert!(attempts.len() >= 3, "it kept trying: {attempts:?}");
    assert!(
        attempts.len() <= 40,
        "no storm: {} attempts in {down_for:?}",
        attempts.len()
    );
    assert!(
        back < down_for + Duration::from_secs(4),
        "back soon after the server: {back:?}"
    );

    obs.wait_all_up(&[Stream::Alarm], T).await;
    sim.inject(Stream::Alarm, alarm("after-restart", "PU_1", 5));
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |r| {
        r.json()["raw"]["key"] == "after-restart"
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_subprotocol_falls_back_to_query_token() {
    let sim = sim_with(SimOptions::default()).await;
    sim.set_subprotocol_mode(SubprotocolMode::Withhold);
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, "streams = [\"alarm\", \"im\"]"))
        .await
        .unwrap();
    let link = obs.wait_all_up(&[Stream::Alarm, Stream::Im], T).await;
    assert_eq!(link["token_transport"], "query");
    let ups = sim.upgrades();
    let via_query: Vec<_> = ups
        .iter()
        .filter(|u| u.accepted && u.query_token.is_some())
        .collect();
    assert!(via_query.len() >= 2, "{ups:?}");
    for u in &via_query {
        let t = u.query_token.as_deref().unwrap();
        // The token has + / and =; it arrived intact, so it was percent-encoded.
        assert!(t.contains('+') && t.contains('/') && t.contains('='), "{t}");
        assert!(u.subprotocol.is_none(), "no header once in query mode");
    }
    // One header attempt in all: the fallback is per server, not per stream.
    assert_eq!(
        ups.iter().filter(|u| u.subprotocol.is_some()).count(),
        1,
        "{ups:?}"
    );
    sim.inject(Stream::Alarm, alarm("q", "PU_1", 5));
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |_| true)
        .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_socket_is_detected_and_replaced() {
    let Rig { sim, obs, bridge } = rig(SimOptions::default(), &[Stream::Alarm]).await;
    // Half-open: the server neither reads nor answers Pings. pong_timeout is 1 s.
    sim.stall_sockets(true);
    sim.wait_until("a new socket", T, |s| {
        s.counters().ws_upgrades.get("alarm").copied().unwrap_or(0) >= 2
    })
    .await;
    sim.stall_sockets(false);
    sim.inject(Stream::Alarm, alarm("fresh", "PU_1", 5));
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |r| {
        r.json()["raw"]["key"] == "fresh"
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_pinned_fingerprint() {
    let sim = sim_with(SimOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let fp = sim.cert_fingerprint_sha256().unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let extra = format!("streams = [\"alarm\"]\n[bvcsp.tls]\nfingerprint_sha256 = \"{fp}\"");
    let bridge = Bridge::start(bridge_config(&sim, broker, &extra))
        .await
        .unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    sim.inject(Stream::Alarm, alarm("tls", "PU_1", 5));
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |_| true)
        .await;
    bridge.stop(Duration::from_secs(5)).await;

    // A different pin: nothing is sent to that server, the link says why.
    let broker = common::broker();
    let obs = Observer::start(broker).await;
    let extra = format!(
        "streams = [\"alarm\"]\n[bvcsp.tls]\nfingerprint_sha256 = \"{}\"",
        "ab".repeat(32)
    );
    let before = sim.login_attempts();
    let bridge = Bridge::start(bridge_config(&sim, broker, &extra))
        .await
        .unwrap();
    let link = obs.wait_link("down", T).await;
    assert!(
        link["last_error"].as_str().unwrap().contains("fingerprint"),
        "{link}"
    );
    assert_eq!(sim.login_attempts(), before);
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_fires_when_the_bridge_dies() {
    let sim = sim_with(SimOptions::default()).await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    bridge.kill().await;
    let will = obs
        .wait_topic(&format!("{BASE}/bridge/state"), T, |r| {
            r.text() == "offline"
        })
        .await;
    assert_eq!(will.text(), "offline");
    assert_eq!(sim.logouts(), 0, "a crash does not log out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_survive_a_broker_outage() {
    let sim = sim_with(SimOptions::default()).await;
    let broker = broker();
    let proxy = Proxy::start(broker).await;
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, proxy.addr, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    let state_topic = format!("{BASE}/bridge/state");
    let onlines = || {
        obs.on(&state_topic)
            .iter()
            .filter(|r| r.text() == "online")
            .count()
    };
    let before = onlines();

    let mut keys = Vec::new();
    for i in 0..150 {
        if i == 40 {
            proxy.cut();
        }
        if i == 110 {
            proxy.restore();
        }
        let key = format!("out-{i}");
        assert_eq!(sim.inject(Stream::Alarm, alarm(&key, "PU_264F708E", 5)), 1);
        keys.push(key);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let topic = format!("{BASE}/device/PU_264F708E/alarm/sos");
    let received = obs.wait_keys(&topic, &keys, T).await;
    let unique: BTreeSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), keys.len(), "lost none");
    eprintln!(
        "broker outage: {} alarms sent, {} distinct received, {} duplicates",
        keys.len(),
        unique.len(),
        received.len() - unique.len()
    );
    // First arrivals keep upstream order.
    let mut firsts = Vec::new();
    for k in &received {
        if !firsts.contains(k) {
            firsts.push(k.clone());
        }
    }
    assert_eq!(firsts, keys, "order per topic is kept");
    // `online` is asserted again after the reconnect.
    obs.wait_for("online re-published", T, |log| {
        (log.iter()
            .filter(|r| r.topic == state_topic && r.text() == "online")
            .count()
            > before)
            .then_some(())
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_after_every_login_does_not_cause_a_login_storm() {
    let sim = sim_with(SimOptions::default()).await;
    sim.set_subprotocol_mode(SubprotocolMode::Reject403);
    let broker = broker();
    let bridge = Bridge::start(bridge_config(&sim, broker, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    let mut at = Vec::new();
    for n in 1..=4 {
        sim.wait_until("another login", T, move |s| s.counters().logins_ok >= n)
            .await;
        at.push(std::time::Instant::now());
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // reconnect_min 100 ms, doubling (jittered down by at most a quarter): at least
    // 75 + 150 + 300 ms between the first and the fourth login. Only lower bounds, which
    // load cannot break; a storm would put the four logins milliseconds apart.
    assert!(
        gaps[2] >= Duration::from_millis(300),
        "logins back off: {gaps:?}"
    );
    assert!(at[3] - at[0] >= Duration::from_millis(500), "{gaps:?}");
    bridge.stop(Duration::from_secs(5)).await;
}

/// Times in microseconds and absurd ones, on every stream and in the device snapshot:
/// each gives a sane `time` (or the receive time), and every stream keeps delivering
/// afterwards — twice, 10 s apart — with the link still up and no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsecond_and_absurd_times_break_no_stream() {
    const MICROS: i64 = 1_721_272_800_000_000;
    const WANT: &str = "2024-07-18T03:20:00.000Z";
    let mut d = SimDevice::new("PU_US", "Micro", true);
    d.lat = 30.1;
    d.lng = 114.1;
    d.time_override = Some(json!(MICROS));
    let mut junk = SimDevice::new("PU_JUNK", "Junk", true);
    junk.lat = 30.2;
    junk.lng = 114.2;
    junk.time_override = Some(json!(99_999_999_999_999_999_i64));
    let sim = BvcspSim::start(SimOptions {
        devices: vec![d, junk],
        ..Default::default()
    })
    .await
    .unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, ""))
        .await
        .unwrap();
    obs.wait_all_up(&Stream::ALL, T).await;
    wait_sockets(&sim, &Stream::ALL, T).await;
    let snap = obs
        .wait_topic(&format!("{BASE}/device/PU_US/location"), T, |_| true)
        .await
        .json();
    assert_eq!(snap["time"], WANT, "{snap}");
    let snap = obs
        .wait_topic(&format!("{BASE}/device/PU_JUNK/location"), T, |_| true)
        .await
        .json();
    assert!(
        snap["time"].as_str().is_some_and(|t| t.starts_with("20")),
        "{snap}"
    );

    let frames = |tag: &str, time: serde_json::Value| {
        vec![
            (
                Stream::Alarm,
                json!({"key": format!("a-{tag}"), "type": 5, "time": time, "devID": "PU_US",
                    "status": 0}),
            ),
            (
                Stream::Location,
                json!({"devId": "PU_US", "lat": 30.5, "lng": 114.3, "time": time, "tag": tag}),
            ),
            (
                Stream::OnlineStatus,
                json!({"type": "PU", "time": time, "status": 1, "tag": tag,
                    "device": {"id": "PU_US", "name": "Micro"}}),
            ),
            (
                Stream::Im,
                json!({"iMsgID": 7, "type": 1, "text": tag, "time": time}),
            ),
            (
                Stream::Conference,
                json!({"type": "member", "operate": "add", "time": time,
                    "confInfo": {"id": format!("C-{tag}")}}),
            ),
        ]
    };
    let arrive_all = |tag: String| {
        let obs = &obs;
        async move {
            let a = obs
                .wait_topic(&format!("{BASE}/device/PU_US/alarm/sos"), T, |r| {
                    r.json()["raw"]["key"] == format!("a-{tag}")
                })
                .await
                .json();
            obs.wait_topic(&format!("{BASE}/device/PU_US/location"), T, |r| {
                r.json()["raw"]["tag"] == tag.as_str()
            })
            .await;
            obs.wait_topic(&format!("{BASE}/event/online_status"), T, |r| {
                r.json()["raw"]["tag"] == tag.as_str()
            })
            .await;
            obs.wait_topic(&format!("{BASE}/im/message"), T, |r| {
                r.json()["raw"]["text"] == tag.as_str()
            })
            .await;
            obs.wait_topic(&format!("{BASE}/conference/C-{tag}/member"), T, |_| true)
                .await;
            a
        }
    };
    for (stream, f) in frames("us", json!(MICROS)) {
        assert_eq!(sim.inject(stream, f), 1);
    }
    let a = arrive_all("us".into()).await;
    assert_eq!(a["time"], WANT);
    for (stream, f) in frames("absurd", json!(99_999_999_999_999_999_i64)) {
        assert_eq!(sim.inject(stream, f), 1);
    }
    let a = arrive_all("absurd".into()).await;
    assert!(
        a["time"].as_str().is_some_and(|t| t.starts_with("20")),
        "{a}"
    );
    for round in ["ok1", "ok2"] {
        for (stream, f) in frames(round, json!(1_717_400_123)) {
            assert_eq!(sim.inject(stream, f), 1);
        }
        arrive_all(round.into()).await;
        if round == "ok1" {
            // Not synchronisation: the issue asks for the second round 10 s after the
            // first, so that a stream task or snapshot that died on the bad times (and
            // a link still saying `up`) would be caught by the second round.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
    let link = obs.wait_all_up(&Stream::ALL, T).await;
    assert_eq!(link["state"], "up");
    for s in Stream::ALL {
        assert_eq!(sim.counters().ws_upgrades.get(s.name()), Some(&1), "{s:?}");
    }
    bridge.stop(Duration::from_secs(5)).await;
}

/// A 70 000-byte device id would make a topic over MQTT's 65 535-byte limit: it is
/// shortened in the topic (the payload keeps it whole), and a normal alarm behind it
/// arrives within seconds without the broker link ever reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_device_id_is_shortened_and_nothing_stalls() {
    let Rig { sim, obs, bridge } = rig(SimOptions::default(), &[Stream::Alarm]).await;
    let huge = "D".repeat(70_000);
    sim.inject(Stream::Alarm, alarm("huge", &huge, 5));
    sim.inject(Stream::Alarm, alarm("normal", "PU_1", 5));
    let sent = std::time::Instant::now();
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |r| {
        r.json()["raw"]["key"] == "normal"
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    let long = obs
        .wait_for("the huge id's alarm", T, |log| {
            log.iter()
                .find(|r| r.topic.ends_with("/alarm/sos") && r.json()["raw"]["key"] == "huge")
                .cloned()
        })
        .await;
    let level = long.topic.split('/').nth(2).unwrap().to_string();
    assert_eq!(level.len(), 65, "{level}");
    assert_eq!(
        long.json()["device_id"].as_str().map(str::len),
        Some(70_000)
    );
    assert_eq!(
        bridge.probe.mqtt.borrow().connects,
        1,
        "no broker reconnect"
    );
    bridge.stop(Duration::from_secs(5)).await;
}
