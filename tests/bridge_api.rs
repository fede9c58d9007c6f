//! The bridge API (contract §3.6) end to end: `bridge/devices`, and requests on
//! `bridge/request/{name}` answered on `bridge/response/{name}`, against a real broker
//! and the simulators, with the bridge in-process (and as its own process for
//! `log_level`, which needs the binary's logging).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
use bvcsp2mqtt_testkit::playbox::{PlayboxOptions, PlayboxSim};
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

async fn fleet_sim() -> BvcspSim {
    BvcspSim::start(SimOptions {
        devices: vec![
            SimDevice::new("PU_55AA0000", "Helmet 07", true),
            SimDevice::new("PU_264F708E", "Truck 7", false),
        ],
        ..Default::default()
    })
    .await
    .expect("simulator")
}

fn response(obs: &Observer, name: &str) -> String {
    let _ = obs;
    format!("{BASE}/bridge/response/{name}")
}

/// Send a request, wait for the answer carrying `tx` as its transaction. Sent again
/// each second until answered: a request sent before the bridge has subscribed is lost
/// (requests are not retained, on purpose).
async fn ask(
    broker: std::net::SocketAddr,
    obs: &Observer,
    name: &str,
    payload: &str,
    tx: &Value,
) -> Value {
    let topic = response(obs, name);
    let end = std::time::Instant::now() + T;
    loop {
        publish(
            broker,
            &format!("{BASE}/bridge/request/{name}"),
            payload,
            false,
        )
        .await;
        let answered = obs.wait_for("an answer", T, |log| {
            log.iter()
                .rev()
                .find(|r| r.topic == topic && r.json()["transaction"] == *tx)
                .map(|r| r.json())
        });
        if let Ok(v) = tokio::time::timeout(Duration::from_secs(1), answered).await {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "no answer on {topic} with transaction {tx}"
        );
    }
}

/// A subscriber that joins now sees `topic` retained.
async fn retained_at_broker(broker: std::net::SocketAddr, topic: &str) -> Received {
    let late = Observer::start(broker).await;
    late.wait_topic(topic, T, |r| r.retain).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_devices_lists_every_device_and_play_box() {
    let sim = fleet_sim().await;
    let lobby = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let boxes = format!(
        "\n[[playbox]]\nname = \"lobby\"\nurl = \"{}\"\nsn = \"2ZTA00000X0A00000000\"\n\
         password = \"SN2008@+\"\npoll_interval = \"1s\"\n",
        lobby.url()
    );
    let bridge = Bridge::start(bridge_config(&sim, broker, &boxes))
        .await
        .unwrap();
    let topic = format!("{BASE}/bridge/devices");
    let list = obs
        .wait_topic(&topic, T, |r| {
            let v = r.json();
            let list = v.as_array().cloned().unwrap_or_default();
            list.len() == 3
                && list
                    .iter()
                    .any(|d| d["kind"] == "playbox" && d["online"] == true)
        })
        .await;
    let list = list.json();
    assert_eq!(
        retained_at_broker(broker, &topic).await.json(),
        list,
        "bridge/devices is retained"
    );
    let helmet = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "PU_55AA0000")
        .unwrap();
    assert_eq!(helmet["topic_id"], "PU_55AA0000");
    assert_eq!(helmet["name"], "Helmet 07");
    assert_eq!(helmet["kind"], "device");
    assert_eq!(helmet["online"], true);
    assert!(
        helmet["last_seen"].as_str().unwrap().ends_with('Z'),
        "{helmet}"
    );
    let truck = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "PU_264F708E")
        .unwrap();
    assert_eq!(truck["online"], false);
    assert!(truck["last_seen"].is_null());
    let pb = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "playbox")
        .unwrap();
    assert_eq!(
        (pb["id"].as_str(), pb["topic_id"].as_str()),
        (Some("lobby"), Some("lobby"))
    );
    // A device coming online on the stream shows up.
    sim.inject(
        Stream::OnlineStatus,
        json!({"type": "PU", "status": 1, "time": 1717400123,
               "device": {"id": "PU_264F708E", "name": "Truck 7"}}),
    );
    obs.wait_topic(&topic, T, |r| {
        r.json().as_array().is_some_and(|l| {
            l.iter()
                .any(|d| d["id"] == "PU_264F708E" && d["online"] == true)
        })
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_with_their_transaction_and_bad_ones_with_errors() {
    let sim = fleet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, ""))
        .await
        .unwrap();
    obs.wait_all_up(&Stream::ALL, T).await;

    let r = ask(
        broker,
        &obs,
        "health_check",
        r#"{"transaction": "t-1"}"#,
        &json!("t-1"),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["data"]["healthy"], true, "{r}");
    assert!(r["data"]["outbox"]["depth"].is_number(), "{r}");
    assert_eq!(r["data"]["bvcsp"]["state"], "up");
    assert!(r.get("error").is_none());
    // Any JSON value is echoed as it was sent.
    let tx = json!({"n": 7, "id": [1, 2]});
    let r = ask(
        broker,
        &obs,
        "health_check",
        &json!({"transaction": tx}).to_string(),
        &tx,
    )
    .await;
    assert_eq!(r["status"], "ok");

    // Backfill now: the alarm records are read again.
    let reads = || {
        sim.counters()
            .rest_calls
            .get("/bvcsp/v1/alarm")
            .copied()
            .unwrap_or(0)
    };
    sim.wait_until("the first backfill", T, |_| reads() > 0)
        .await;
    let before = reads();
    let r = ask(broker, &obs, "backfill", r#"{"transaction": 2}"#, &json!(2)).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["data"]["started"], true);
    sim.wait_until("a backfill on request", T, |_| reads() > before)
        .await;

    // Errors: an unknown name, bad JSON, not an object, a bad level, too large.
    let r = ask(
        broker,
        &obs,
        "reboot",
        r#"{"transaction": "t-3"}"#,
        &json!("t-3"),
    )
    .await;
    assert_eq!(r["status"], "error");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("unknown request `reboot`"),
        "{r}"
    );
    publish(
        broker,
        &format!("{BASE}/bridge/request/health_check"),
        "{not json",
        false,
    )
    .await;
    let r = obs
        .wait_topic(&response(&obs, "health_check"), T, |r| {
            r.json()["status"] == "error"
        })
        .await
        .json();
    assert!(r["error"].as_str().unwrap().contains("not JSON"), "{r}");
    assert!(r.get("transaction").is_none());
    publish(
        broker,
        &format!("{BASE}/bridge/request/backfill"),
        "[1, 2]",
        false,
    )
    .await;
    obs.wait_topic(&response(&obs, "backfill"), T, |r| {
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("JSON object"))
    })
    .await;
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"level": 5, "transaction": "t-4"}"#,
        &json!("t-4"),
    )
    .await;
    assert_eq!(r["status"], "error");
    assert!(r["error"].as_str().unwrap().contains("`level`"), "{r}");
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"transaction": "t-5"}"#,
        &json!("t-5"),
    )
    .await;
    assert!(
        r["error"].as_str().unwrap().contains("missing `level`"),
        "{r}"
    );
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"level": "=[[", "transaction": "t-6"}"#,
        &json!("t-6"),
    )
    .await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not a valid log filter"),
        "{r}"
    );
    let huge = json!({"transaction": "t-7", "pad": "x".repeat(10_000)}).to_string();
    publish(
        broker,
        &format!("{BASE}/bridge/request/health_check"),
        &huge,
        false,
    )
    .await;
    obs.wait_topic(&response(&obs, "health_check"), T, |r| {
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 4096"))
    })
    .await;
    // Larger than the bridge keeps at all (64 KiB): still answered, with its size.
    publish(
        broker,
        &format!("{BASE}/bridge/request/health_check"),
        &"x".repeat(100_000),
        false,
    )
    .await;
    obs.wait_topic(&response(&obs, "health_check"), T, |r| {
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("100000 bytes") && e.contains("at most 4096"))
    })
    .await;
    let odd = "a/b/ü".repeat(20);
    publish(broker, &format!("{BASE}/bridge/request/{odd}"), "", false).await;
    obs.wait_for("an answer to a strange name", T, |log| {
        log.iter()
            .find(|r| {
                r.topic
                    .starts_with(&format!("{BASE}/bridge/response/a_b_ü"))
                    && r.json()["status"] == "error"
            })
            .map(|_| ())
    })
    .await;

    // None of that hurt: the bridge still answers, and answers are events.
    let r = ask(
        broker,
        &obs,
        "health_check",
        r#"{"transaction": "t-8"}"#,
        &json!("t-8"),
    )
    .await;
    assert_eq!(r["status"], "ok");
    assert!(
        obs.all()
            .iter()
            .filter(|r| r.topic.contains("/bridge/response/"))
            .all(|r| !r.retain)
    );
    bridge.stop(Duration::from_secs(5)).await;
}

static LEVELS: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_the_filter_until_the_next_restart() {
    // In this process the test is the binary: it installs what main installs.
    bvcsp2mqtt::homeassistant::api::install_log_level_setter(Box::new(|level: &str| {
        LEVELS.lock().unwrap().push(level.to_string());
        Ok(())
    }));
    let sim = fleet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, ""))
        .await
        .unwrap();
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"level": "debug", "transaction": 1}"#,
        &json!(1),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["data"]["level"], "debug");
    assert_eq!(LEVELS.lock().unwrap().as_slice(), ["debug"]);
    // A word with no level would turn every level on for it and silence the bridge.
    for (i, bad) in ["verbose", "bvcsp2mqtt", "warn,verbose"].iter().enumerate() {
        let r = ask(
            broker,
            &obs,
            "log_level",
            &json!({"level": bad, "transaction": i + 10}).to_string(),
            &json!(i + 10),
        )
        .await;
        assert_eq!(r["status"], "error", "{bad}: {r}");
        assert!(
            r["error"].as_str().unwrap().contains("names no level"),
            "{r}"
        );
    }
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"level": "bvcsp2mqtt=debug,warn", "transaction": 2}"#,
        &json!(2),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        LEVELS.lock().unwrap().as_slice(),
        ["debug", "bvcsp2mqtt=debug,warn"]
    );
    bridge.stop(Duration::from_secs(5)).await;
}

/// Publish every payload on `topic` at once, and wait until the broker has them all.
async fn publish_burst(broker: std::net::SocketAddr, topic: &str, payloads: &[String]) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let opts = MqttOptions::new(
        format!("burst-{}", rand_suffix()),
        broker.ip().to_string(),
        broker.port(),
    );
    let (client, mut events) = AsyncClient::new(opts, payloads.len() + 10);
    for p in payloads {
        client
            .publish(topic, QoS::AtLeastOnce, false, p.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let acked = async {
        let mut n = 0;
        while n < payloads.len() {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = events.poll().await {
                n += 1;
            }
        }
    };
    tokio::time::timeout(T, acked)
        .await
        .expect("burst acknowledged");
    let _ = client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_looping_requests_gets_a_bounded_rate_of_answers() {
    let sim = fleet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, ""))
        .await
        .unwrap();
    ask(
        broker,
        &obs,
        "health_check",
        r#"{"transaction": "w"}"#,
        &json!("w"),
    )
    .await;
    let burst: Vec<String> = (0..60)
        .map(|i| json!({"transaction": i}).to_string())
        .collect();
    let started = std::time::Instant::now();
    publish_burst(
        broker,
        &format!("{BASE}/bridge/request/health_check"),
        &burst,
    )
    .await;
    // Asked again until answered: the answers come from the same queue, after the burst's.
    let r = ask(
        broker,
        &obs,
        "health_check",
        r#"{"transaction": "a"}"#,
        &json!("a"),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let answered = obs
        .on(&response(&obs, "health_check"))
        .iter()
        .filter(|m| m.json()["transaction"].is_u64())
        .count();
    let bound = 10.0 + 10.0 * elapsed + 1.0;
    assert!(
        (answered as f64) <= bound && answered >= 5,
        "{answered} of 60 answered in {elapsed:.1} s"
    );
    assert!(
        r["data"]["bridge_api"]["requests_dropped"].as_u64() > Some(0),
        "{r}"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_logs_at_the_level_asked_for() {
    let sim = fleet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[bvcsp]\nurl = \"{}\"\nusername = \"admin\"\npassword = \"123456\"\n\
             [mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"api-{}\"\n\
             [storage]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n",
            sim.url(),
            rand_suffix(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bvcsp2mqtt"));
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG");
    // RUST_LOG would win over the file: the helper sets it unless it is set already.
    cmd.env("RUST_LOG", "warn");
    let mut daemon = Daemon::spawn_command(cmd);
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    assert!(!daemon.log().contains("DEBUG"), "warn only at first");
    let r = ask(
        broker,
        &obs,
        "log_level",
        r#"{"level": "debug", "transaction": "d"}"#,
        &json!("d"),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    // The next request is logged at debug now.
    ask(
        broker,
        &obs,
        "health_check",
        r#"{"transaction": "h"}"#,
        &json!("h"),
    )
    .await;
    let end = std::time::Instant::now() + T;
    while !daemon.log().contains("DEBUG") {
        assert!(
            std::time::Instant::now() < end,
            "no debug line after log_level debug:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(T).await.success());
}
