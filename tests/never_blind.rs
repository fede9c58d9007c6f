//! The promise, as a user would call it: about a minute of alarms at 20 a second through
//! two stream cuts, a 5 s server outage, a `kill -9` of the bridge, a broker restart and
//! a graceful restart of the bridge. Every alarm the server raised after the first
//! connect arrives at least once. The bridge runs as its own process, the broker is a
//! real Mosquitto.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::BvcspSim;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sos_topic() -> String {
    format!("{BASE}/device/PU_1/alarm/sos")
}

async fn alarm_socket_open(sim: &BvcspSim) {
    sim.wait_until("the alarm socket open", T, |s| {
        s.counters().open_sockets["alarm"] >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alarm_arrives_through_cuts_outages_crashes_and_restarts() {
    let Some(mut mq) = mosquitto() else {
        return;
    };
    let sim = one_device_sim().await;
    let proxy = Proxy::start(mq.addr).await;
    let obs = Observer::start(mq.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[bvcsp]\nurl = \"{}\"\nusername = \"admin\"\npassword = \"123456\"\n\
             streams = [\"alarm\", \"online_status\"]\nkeepalive_interval = \"1s\"\npong_timeout = \"3s\"\n\
             [mqtt]\nurl = \"mqtt://{}\"\nclient_id = \"promise-{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\
             [storage]\ndir = \"{}\"\n",
            sim.url(),
            proxy.addr,
            rand_suffix(),
            storage.display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&config);
    alarm_socket_open(&sim).await;

    // 20 alarms a second for a minute, whoever is listening.
    let raising = Arc::new(AtomicBool::new(true));
    let raiser = {
        let (sim, raising) = (sim.clone(), raising.clone());
        tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while raising.load(Ordering::Relaxed) {
                tick.tick().await;
                let key = format!("p-{}", keys.len());
                sim.inject(
                    Stream::Alarm,
                    json!({"key": key, "type": 5, "time": unix_now(), "devID": "PU_1",
                        "status": 0, "desc": "SOS"}),
                );
                keys.push(key);
            }
            keys
        })
    };
    let phase = |what: &str, at: Instant| eprintln!("{:>5.1?} {what}", at.elapsed());
    let t0 = Instant::now();
    let pause = |s: u64| tokio::time::sleep(Duration::from_secs(s));

    pause(5).await;
    phase("stream cut (TCP dropped)", t0);
    sim.kick_sockets(Some(Stream::Alarm), None);
    alarm_socket_open(&sim).await;

    pause(5).await;
    phase("stream cut (close 1011)", t0);
    sim.kick_sockets(Some(Stream::Alarm), Some(1011));
    alarm_socket_open(&sim).await;

    pause(5).await;
    phase("server outage 5 s", t0);
    sim.restart(Duration::from_secs(5)).await;
    let outage_end = Instant::now() + Duration::from_secs(5);
    pause(5).await;
    alarm_socket_open(&sim).await;
    let server_recovery = Instant::now().saturating_duration_since(outage_end);

    pause(5).await;
    phase("kill -9 of the bridge, 3 s down", t0);
    daemon.signal("-KILL");
    daemon.wait_exit(Duration::from_secs(5)).await;
    pause(3).await;
    let mut daemon = Daemon::spawn(&config);
    alarm_socket_open(&sim).await;

    pause(5).await;
    phase("broker restart (SIGKILL, 2 s down)", t0);
    let subscribed = obs.subacks.load(Ordering::SeqCst);
    proxy.cut();
    mq.down();
    pause(2).await;
    mq.up().unwrap();
    obs.wait_subscribed(subscribed + 1, T).await;
    proxy.restore();

    pause(5).await;
    phase("graceful restart of the bridge", t0);
    daemon.signal("-TERM");
    let status = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}: {}", daemon.log());
    let daemon = Daemon::spawn(&config);
    alarm_socket_open(&sim).await;

    pause(10).await;
    raising.store(false, Ordering::Relaxed);
    let keys = raiser.await.unwrap();
    phase(
        &format!("{} alarms raised; waiting for every one", keys.len()),
        t0,
    );

    let started = Instant::now();
    let end = started + Duration::from_secs(60);
    let (counts, backfilled) = loop {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut backfilled = BTreeSet::new();
        for r in obs.on(&sos_topic()) {
            let j = r.json();
            if let Some(k) = j["raw"]["key"].as_str() {
                *counts.entry(k.to_string()).or_default() += 1;
                if j["backfilled"] == true {
                    backfilled.insert(k.to_string());
                }
            }
        }
        if keys.iter().all(|k| counts.contains_key(k)) {
            break (counts, backfilled);
        }
        if Instant::now() > end {
            let missing: Vec<&String> = keys.iter().filter(|k| !counts.contains_key(*k)).collect();
            panic!(
                "{} of {} alarms never arrived: {:?}\n{}",
                missing.len(),
                keys.len(),
                &missing[..missing.len().min(40)],
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let arrivals: usize = counts.values().sum();
    eprintln!(
        "promise: raised {}, arrived {} distinct ({} via backfill), {} duplicate deliveries, \
         server outage recovered {server_recovery:.2?} after the server's return",
        keys.len(),
        counts.len(),
        backfilled.len(),
        arrivals - counts.len()
    );
    assert_eq!(counts.len(), keys.len());
    assert!(!backfilled.is_empty(), "the gaps were filled by backfill");
    assert!(
        server_recovery < Duration::from_secs(5),
        "{server_recovery:?}"
    );
}
