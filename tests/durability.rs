//! The delivery promise (contract §4) under real failures: a Mosquitto killed and
//! restarted mid-stream, the daemon killed with SIGKILL while the broker is down,
//! coalesced state, and a full outbox. Every test counts: sent, received, lost,
//! duplicated.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::BvcspSim;
use bvcsp2mqtt_testkit::eventually;
use common::*;
use serde_json::json;

// Generous: these tests move thousands of alarms through real brokers on a shared
// 2-core machine; a deadline is a bound on failure, never a measured time.
const T: Duration = Duration::from_secs(60);

fn alarm(key: &str) -> serde_json::Value {
    // Raised now, as on a real server: an alarm the server dropped while the bridge was
    // not reading is then within reach of the backfill (`backfill_max_age`).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"key": key, "type": 5, "time": now, "devID": "PU_1", "devName": "Helmet",
        "status": 0, "desc": "SOS", "lat": 31.8, "lng": 117.2, "payload": ""})
}

fn sos_topic() -> String {
    format!("{BASE}/device/PU_1/alarm/sos")
}

/// Wait until every key has arrived; returns (distinct, duplicates). With `ordered`,
/// first arrivals must keep the order they were sent in (not so when some come by
/// backfill, which may deliver them after newer live ones).
async fn wait_all_keys(obs: &Observer, keys: &[String], ordered: bool) -> (usize, usize) {
    wait_all_keys_or_tell(obs, keys, ordered, String::new).await
}

/// As [`wait_all_keys`]; on an order failure, `context` adds what the caller knows (the
/// daemon's log, say) to where the first arrivals diverged.
async fn wait_all_keys_or_tell(
    obs: &Observer,
    keys: &[String],
    ordered: bool,
    context: impl Fn() -> String,
) -> (usize, usize) {
    let topic = sos_topic();
    let got = obs.wait_keys(&topic, keys, T).await;
    let distinct: BTreeSet<&String> = got.iter().collect();
    // Nothing arrives that was not sent, and event ids are stable across redeliveries.
    assert!(distinct.iter().all(|k| keys.contains(k)));
    let ids: BTreeSet<String> = obs
        .on(&topic)
        .iter()
        .map(|r| format!("{}={}", r.json()["raw"]["key"], r.json()["event_id"]))
        .collect();
    assert_eq!(
        ids.len(),
        distinct.len(),
        "one event_id per alarm, however often it was delivered"
    );
    // First arrivals keep the order upstream sent them in (the contract's per-topic order).
    let mut first = Vec::new();
    let mut seen = BTreeSet::new();
    for k in &got {
        if seen.insert(k) {
            first.push(k);
        }
    }
    let sent: Vec<&String> = keys.iter().filter(|k| seen.contains(k)).collect();
    if ordered && first != sent {
        let at = first
            .iter()
            .zip(&sent)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let around = |v: &[&String]| -> Vec<String> {
            v[at.saturating_sub(3)..(at + 4).min(v.len())]
                .iter()
                .map(|k| k.to_string())
                .collect()
        };
        // Where the first misplaced key's arrivals sit among all arrivals (duplicates too).
        let positions: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, k)| *k == sent[at])
            .map(|(i, _)| i)
            .collect();
        panic!(
            "first arrivals out of order at {at} of {}: arrived {:?}, sent {:?}; {} arrivals in all, {} at {positions:?}\n{}",
            sent.len(),
            around(&first),
            around(&sent),
            got.len(),
            sent[at],
            context()
        );
    }
    (distinct.len(), got.len() - distinct.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_killed_and_restarted_mid_stream_loses_nothing() {
    let Some(mut mq) = mosquitto() else {
        return;
    };
    let sim = one_device_sim().await;
    let proxy = Proxy::start(mq.addr).await;
    let obs = Observer::start(mq.addr).await;
    let bridge = Bridge::start(bridge_config(&sim, proxy.addr, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;

    let keys: Vec<String> = (0..300).map(|i| format!("mq-{i}")).collect();
    let injector = {
        let (sim, keys) = (sim.clone(), keys.clone());
        tokio::spawn(async move {
            for k in keys {
                assert_eq!(sim.inject(Stream::Alarm, alarm(&k)), 1);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let delivered =
        |n: u64| move |s: &BvcspSim| s.counters().delivered.get("alarm").copied().unwrap_or(0) >= n;
    sim.wait_until("100 alarms", T, delivered(100)).await;
    // The broker dies (SIGKILL, no persistence: every session and retained message gone).
    // The bridge is held off by the proxy until the observer has subscribed again, so
    // every message the bridge then sends has a subscriber to count it.
    proxy.cut();
    mq.down();
    sim.wait_until("80 more alarms during the outage", T, delivered(180))
        .await;
    mq.up().unwrap();
    obs.wait_subscribed(2, T).await;
    proxy.restore();
    injector.await.unwrap();
    let (distinct, duplicates) = wait_all_keys(&obs, &keys, true).await;
    eprintln!(
        "mosquitto restart: sent {}, received {distinct}, lost 0, duplicates {duplicates}",
        keys.len()
    );
    assert_eq!(distinct, keys.len());
    let stats = bridge.outbox.stats();
    assert!(stats.replayed > 0 || duplicates == 0, "{stats:?}");
    bridge.stop(Duration::from_secs(5)).await;
}

fn count_alarm_rows(storage: &std::path::Path) -> i64 {
    // The daemon keeps the file locked while it runs (SQLite's unix-excl): read, without
    // locks, what its checkpoints have copied into the database file (within a second).
    let uri = format!(
        "file:{}?immutable=1",
        storage.join("outbox.sqlite3").display()
    );
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
    let Ok(conn) = rusqlite::Connection::open_with_flags(&uri, flags) else {
        return 0;
    };
    conn.query_row(
        "SELECT count(*) FROM outbox WHERE topic LIKE '%/alarm/%'",
        [],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_broker_is_down_loses_nothing() {
    let Some(mut mq) = mosquitto() else {
        return;
    };
    let sim = one_device_sim().await;
    let obs = Observer::start(mq.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[bvcsp]\nurl = \"{}\"\nusername = \"admin\"\npassword = \"123456\"\nstreams = [\"alarm\"]\n\
             reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             [mqtt]\nurl = \"mqtt://{}\"\nclient_id = \"kill9-{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             [storage]\ndir = \"{}\"\n",
            sim.url(),
            mq.addr,
            rand_suffix(),
            storage.display()
        ),
    )
    .unwrap();
    let mut first = Daemon::spawn(&config);
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;

    mq.down();
    // More than the outbox holds in memory: most of these wait on disk only, and after
    // the restart most are read back from disk in batches.
    let keys: Vec<String> = (0..2500).map(|i| format!("k9-{i}")).collect();
    for k in &keys {
        assert_eq!(sim.inject(Stream::Alarm, alarm(k)), 1);
    }
    // Read and on disk: the daemon has them, and only the disk does.
    let end = std::time::Instant::now() + T;
    while count_alarm_rows(&storage) < keys.len() as i64 {
        assert!(
            std::time::Instant::now() < end,
            "the daemon did not store the alarms: {}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("-KILL");
    first.wait_exit(Duration::from_secs(5)).await;

    mq.up().unwrap();
    obs.wait_subscribed(2, T).await;
    let daemon = Daemon::spawn(&config);
    let (distinct, duplicates) = wait_all_keys_or_tell(&obs, &keys, true, || {
        format!(
            "the killed daemon: {}\nthe restarted daemon: {}",
            first.log(),
            daemon.log()
        )
    })
    .await;
    eprintln!(
        "kill -9: sent {}, received {distinct}, lost 0, duplicates {duplicates}",
        keys.len()
    );
    assert_eq!(distinct, keys.len());
    assert!(
        daemon
            .log()
            .contains("unacknowledged messages from the last run"),
        "{}",
        daemon.log()
    );
}

/// A bridge whose broker link can be cut, with a small outbox bound.
async fn cut_rig(sim: &BvcspSim, extra_storage: &str) -> (SocketAddr, Proxy, Observer, Bridge) {
    let broker = broker();
    let proxy = Proxy::start(broker).await;
    let obs = Observer::start(broker).await;
    let mut cfg = bridge_config(sim, proxy.addr, "streams = [\"alarm\", \"location\"]");
    if !extra_storage.is_empty() {
        cfg.storage.max_bytes = bvcsp2mqtt::config::parse_size(extra_storage).unwrap();
    }
    let bridge = Bridge::start(cfg).await.unwrap();
    obs.wait_all_up(&[Stream::Alarm, Stream::Location], T).await;
    wait_sockets(sim, &[Stream::Alarm, Stream::Location], T).await;
    sim.wait_until("GPS subscription", T, |s| s.subscribed().contains("PU_1"))
        .await;
    (broker, proxy, obs, bridge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_state_ends_with_the_newest_value() {
    let sim = one_device_sim().await;
    let (broker, proxy, obs, bridge) = cut_rig(&sim, "").await;
    proxy.cut();
    for i in 0..50 {
        sim.inject(
            Stream::Location,
            json!({"devId": "PU_1", "lat": 30.0 + f64::from(i) / 100.0, "lng": 114.0}),
        );
    }
    let b = &bridge;
    eventually("40 fixes coalesced", T, || b.outbox.stats().coalesced >= 40).await;
    proxy.restore();
    let topic = format!("{BASE}/device/PU_1/location");
    obs.wait_topic(&topic, T, |r| r.json()["lat"] == 30.49)
        .await;
    let stale: Vec<f64> = obs
        .on(&topic)
        .iter()
        .filter_map(|r| r.json()["lat"].as_f64())
        .collect();
    assert!(
        stale.len() < 50,
        "superseded fixes were not all sent: {stale:?}"
    );
    let late = Observer::start(broker).await;
    let last = late
        .wait_topic(&format!("{BASE}/device/PU_1/location"), T, |r| {
            r.retain && r.json()["lat"] == 30.49
        })
        .await;
    assert!(last.retain);
    eprintln!(
        "coalesced: 50 fixes queued during the outage, {} coalesced, newest retained",
        bridge.outbox.stats().coalesced
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_pauses_reading_and_drops_no_alarm() {
    let sim = one_device_sim().await;
    let (_broker, proxy, obs, bridge) = cut_rig(&sim, "1MiB").await;
    proxy.cut();
    let keys: Vec<String> = (0..3000)
        .map(|i| format!("full-{i}-{}", "x".repeat(300)))
        .collect();
    for k in &keys {
        assert_eq!(sim.inject(Stream::Alarm, alarm(k)), 1);
    }
    eventually("the outbox full", T, || bridge.outbox.stats().full).await;
    let at_full = bridge.outbox.stats();
    // Said on the link (delivered once the broker is back, if still full then) and in the log.
    let ctx = bridge.bvcsp.as_ref().unwrap();
    eventually("the link saying the outbox is full", T, || {
        ctx.status.snapshot().details.get("outbox_full") == Some(&json!(true))
    })
    .await;
    assert!(
        at_full.bytes <= (1 << 20) + 64 * 1024,
        "the bound holds: {at_full:?}"
    );
    assert!(
        at_full.depth < keys.len(),
        "reading paused before everything was read: {at_full:?}"
    );
    proxy.restore();
    // A paused socket may be given up on (no pong in time) and what it still held is
    // then read back from the alarm records: every alarm arrives, not all in order.
    let (distinct, duplicates) = wait_all_keys(&obs, &keys, false).await;
    eprintln!(
        "full outbox: sent {}, outbox paused at {} messages / {} bytes, received {distinct}, lost 0, duplicates {duplicates}",
        keys.len(),
        at_full.depth,
        at_full.bytes
    );
    obs.wait_topic(&format!("{BASE}/bridge/link/bvcsp"), T, |r| {
        r.json()["outbox_full"] == false
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

/// A stop while a stream waits on a full outbox: the frame it holds was read, so it is
/// kept (over the bound) and arrives after the restart; nothing read is lost. Backfill is
/// off, so nothing could bring a dropped frame back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_full_outbox_keeps_every_frame_read() {
    let sim = one_device_sim().await;
    let broker = broker();
    let proxy = Proxy::start(broker).await;
    let obs = Observer::start(broker).await;
    let mut cfg = bridge_config(&sim, proxy.addr, "streams = [\"alarm\"]\nbackfill = false");
    cfg.storage.max_bytes = bvcsp2mqtt::config::parse_size("256KiB").unwrap();
    let bridge = Bridge::start(cfg.clone()).await.unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    proxy.cut();
    let keys: Vec<String> = (0..2000)
        .map(|i| format!("stop-{i}-{}", "y".repeat(300)))
        .collect();
    for k in &keys {
        assert_eq!(sim.inject(Stream::Alarm, alarm(k)), 1);
    }
    eventually("the outbox full", T, || bridge.outbox.stats().full).await;
    let ctx = bridge.bvcsp.clone().unwrap();
    let read = || {
        ctx.stats
            .of(bvcsp2mqtt::bvcsp::Stream::Alarm)
            .events_in
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The stream now waits on the full outbox with a frame in hand.
    bridge.stop(Duration::from_millis(200)).await;
    let read_before_stop = read() as usize;
    assert!(read_before_stop > 0 && read_before_stop < keys.len());

    proxy.restore();
    let again = Bridge::start(cfg).await.unwrap();
    let want = &keys[..read_before_stop];
    let got = obs.wait_keys(&sos_topic(), want, T).await;
    let distinct: BTreeSet<&String> = got.iter().collect();
    eprintln!(
        "stop with a full outbox: read {read_before_stop}, received {} distinct of {} deliveries",
        distinct.len(),
        got.len()
    );
    again.stop(Duration::from_secs(5)).await;
}

/// A long outage grows the reconnect backoff to its cap; the broker's return must not
/// wait for it. With `reconnect_min = 60s` every backoff is at least a minute, so only
/// the bridge noticing the port open again can bring it back within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_is_back_soon_after_the_broker_whatever_its_backoff() {
    let Some(mut mq) = mosquitto() else {
        return;
    };
    mq.down();
    let sim = one_device_sim().await;
    let mut cfg = bridge_config(&sim, mq.addr, "streams = [\"alarm\"]");
    cfg.mqtt.reconnect_min = Duration::from_secs(60);
    cfg.mqtt.reconnect_max = Duration::from_secs(120);
    let bridge = Bridge::start(cfg).await.unwrap();
    let mut status = bridge.mqtt_status();
    // The first attempt was refused: the bridge is now inside a minute-long backoff.
    tokio::time::timeout(T, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the first connection attempt fails")
        .unwrap();
    mq.up().unwrap();
    let back = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(15), status.wait_for(|s| s.connected))
        .await
        .expect("connected long before the one-minute backoff ends")
        .unwrap();
    eprintln!("broker back -> bridge connected in {:?}", back.elapsed());
    // And it delivers: an alarm read now reaches a subscriber.
    let obs = Observer::start(mq.addr).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    assert_eq!(sim.inject(Stream::Alarm, alarm("after-outage")), 1);
    wait_all_keys(&obs, &["after-outage".to_string()], true).await;
    bridge.stop(Duration::from_secs(5)).await;
}
