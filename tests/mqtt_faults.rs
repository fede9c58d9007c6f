//! The MQTT side under hostile conditions (contract §4 "Hostile input", dead letters): a
//! message the broker cannot take goes to the dead-letter table and never blocks the
//! messages behind it; a huge publish on a command topic does not disconnect the bridge.

mod common;

use std::path::Path;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt::config::Config;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::eventually;
use bvcsp2mqtt_testkit::playbox::{PlayboxOptions, PlayboxSim};
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn alarm(key: &str, desc: &str) -> serde_json::Value {
    json!({"key": key, "type": 5, "time": 1717400123, "devID": "PU_1", "devName": "Helmet",
        "status": 0, "desc": desc, "lat": 31.8, "lng": 117.2, "payload": ""})
}

fn sos_topic() -> String {
    format!("{BASE}/device/PU_1/alarm/sos")
}

fn with_http(mut cfg: Config) -> Config {
    cfg.service.http = true;
    cfg.service.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.service.health_interval = Duration::from_secs(1);
    cfg
}

/// (topic, payload, reason) of every row in the dead-letter table.
fn dead_letters(dir: &Path) -> Vec<(String, Vec<u8>, String)> {
    let conn = rusqlite::Connection::open(dir.join("outbox.sqlite3")).unwrap();
    let mut stmt = conn
        .prepare("SELECT topic, payload, reason FROM dead_letters ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn keys_on(obs: &Observer, topic: &str) -> Vec<String> {
    obs.on(topic)
        .iter()
        .filter_map(|m| m.json()["raw"]["key"].as_str().map(String::from))
        .collect()
}

/// Small alarm, one too big for the broker, two small ones: the small ones arrive, the
/// big one ends up in the dead-letter table; returns the bridge's storage directory.
async fn big_one_in_the_middle(
    obs: &Observer,
    sim: &bvcsp2mqtt_testkit::bvcsp::BvcspSim,
    big: usize,
) {
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(sim, &[Stream::Alarm], T).await;
    assert_eq!(sim.inject(Stream::Alarm, alarm("small-1", "SOS")), 1);
    assert_eq!(sim.inject(Stream::Alarm, alarm("big", &"x".repeat(big))), 1);
    assert_eq!(sim.inject(Stream::Alarm, alarm("small-2", "SOS")), 1);
    assert_eq!(sim.inject(Stream::Alarm, alarm("small-3", "SOS")), 1);
    let keys: Vec<String> = ["small-1", "small-2", "small-3"].map(String::from).to_vec();
    obs.wait_keys(&sos_topic(), &keys, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_packet_size_is_a_dead_letter_counted_and_the_rest_flows() {
    let sim = one_device_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let mut cfg = with_http(bridge_config(&sim, broker, "streams = [\"alarm\"]"));
    cfg.mqtt.max_packet_size = 4096;
    let dir = cfg.storage.dir.clone();
    let bridge = Bridge::start(cfg).await.unwrap();
    big_one_in_the_middle(&obs, &sim, 10_000).await;
    assert!(!keys_on(&obs, &sos_topic()).contains(&"big".to_string()));

    eventually("the dead letter is on disk", T, || {
        dead_letters(&dir).len() == 1
    })
    .await;
    let (topic, payload, reason) = dead_letters(&dir).remove(0);
    assert_eq!(topic, sos_topic());
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["raw"]["key"], "big", "kept whole");
    assert!(reason.contains("mqtt.max_packet_size"), "{reason}");
    eventually("nothing left behind", T, || bridge.outbox.depth() == 0).await;

    let health = obs
        .wait_topic(&format!("{BASE}/bridge/health"), T, |m| {
            m.json()["outbox"]["dead_letters"] == 1
        })
        .await
        .json();
    assert_eq!(health["outbox"]["dead_letters_kept"], 1);
    assert_eq!(health["outbox"]["last_dead_letter"]["topic"], sos_topic());
    let (status, metrics) = http_get(bridge.http_addr.unwrap(), "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == "bvcsp2mqtt_dead_letters_total 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "bvcsp2mqtt_dead_letters_kept 1")
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_is_a_dead_letter_and_does_not_block_the_rest() {
    if !Mosquitto::installed() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is required under CI"
        );
        eprintln!("skipping: mosquitto is not installed");
        return;
    }
    // Mosquitto closes the connection of a client sending a larger packet; the bridge's
    // own limit (1 MiB) lets it through, so only the broker's refusal can tell.
    let mq = Mosquitto::start("max_packet_size 8192\nmax_queued_messages 100000").unwrap();
    let sim = one_device_sim().await;
    let obs = Observer::start(mq.addr).await;
    let cfg = bridge_config(&sim, mq.addr, "streams = [\"alarm\"]");
    let dir = cfg.storage.dir.clone();
    let bridge = Bridge::start(cfg).await.unwrap();
    big_one_in_the_middle(&obs, &sim, 20_000).await;
    assert!(!keys_on(&obs, &sos_topic()).contains(&"big".to_string()));
    eventually("the dead letter is on disk", T, || {
        dead_letters(&dir).len() == 1
    })
    .await;
    let (topic, _, reason) = dead_letters(&dir).remove(0);
    assert_eq!(topic, sos_topic());
    assert!(reason.contains("closed the connection"), "{reason}");
    assert_eq!(bridge.outbox.stats().dead_letters, 1);
    eventually("nothing left behind", T, || bridge.outbox.depth() == 0).await;
    // It does not resend in a loop: once connected again, the link stays up.
    let mut status = bridge.mqtt_status();
    let connects = tokio::time::timeout(T, status.wait_for(|s| s.connected))
        .await
        .expect("connected again")
        .unwrap()
        .connects;
    assert_eq!(sim.inject(Stream::Alarm, alarm("small-4", "SOS")), 1);
    obs.wait_keys(&sos_topic(), &["small-4".to_string()], T)
        .await;
    assert_eq!(bridge.mqtt_status().borrow().connects, connects);
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mib_command_does_not_disconnect_and_the_next_command_is_applied() {
    let sim = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = bvcsp2mqtt::config::from_toml(&format!(
        "[mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"cmd-{id}\"\nkeepalive = \"5s\"\n\
         [storage]\ndir = \"{dir}\"\n\
         [[playbox]]\nname = \"lobby\"\nurl = \"{url}\"\nsn = \"2ZTA00000X0A00000000\"\n\
         password = \"SN2008@+\"\npoll_interval = \"1s\"\nrequest_timeout = \"2s\"\ncommands = true\n",
        id = rand_suffix(),
        dir = dir.path().display(),
        url = sim.url(),
    ))
    .unwrap();
    let bridge = Bridge::start(cfg).await.unwrap();
    let state = format!("{BASE}/playbox/lobby/state");
    obs.wait_topic(&state, T, |_| true).await;
    let status = bridge.mqtt_status();
    assert_eq!(status.borrow().connects, 1);
    let set = format!("{BASE}/playbox/lobby/brightness/set");

    // Larger than mqtt.max_packet_size (1 MiB): read, dropped, counted; link untouched.
    publish(broker, &set, &"9".repeat(2 << 20), false).await;
    publish(broker, &set, "40", false).await;
    sim.wait_until("brightness 40", T, |s| s.brightness() == 40.0)
        .await;
    let s = status.borrow().clone();
    assert_eq!(s.connects, 1, "no reconnect: {s:?}");
    assert!(s.connected && s.last_error.is_none(), "{s:?}");
    assert_eq!(s.incoming_dropped, 1);
    assert!(
        obs.on(&format!("{BASE}/playbox/lobby/error")).is_empty(),
        "dropped early, not echoed back"
    );
    let sets: Vec<_> = sim.sets();
    assert_eq!(
        sets.len(),
        1,
        "only the normal command reached the box: {}",
        sets.len()
    );
    bridge.stop(Duration::from_secs(5)).await;
}
