//! Play boxes against hostile or unlucky input (issue 11): commands while logins are held
//! back, command floods and oversized commands, the box's error codes, oversized reply
//! bodies and broken certificate pins. The play-box simulator over HTTPS, an embedded
//! broker, the bridge in-process.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt::config::{self, Config};
use bvcsp2mqtt_testkit::playbox::{BRIGHTNESS_PATHS, PlayboxOptions, PlayboxSim, SCREEN_PATHS};
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "SN2008@+";

fn box_entry(name: &str, sim: &PlayboxSim, password: &str) -> String {
    format!(
        "[[playbox]]\nname = \"{name}\"\nurl = \"{url}\"\nsn = \"2ZTA00000X0A00000000\"\n\
         password = \"{password}\"\npoll_interval = \"1s\"\nrequest_timeout = \"2s\"\n\
         commands = true\n",
        url = sim.url()
    )
}

fn config(broker: SocketAddr, storage: &std::path::Path, boxes: &str) -> Config {
    config::from_toml(&format!(
        "[mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"pbh-{id}\"\nkeepalive = \"5s\"\n\
         [storage]\ndir = \"{dir}\"\n{boxes}",
        id = rand_suffix(),
        dir = storage.display()
    ))
    .expect("valid config")
}

async fn sim(opts: PlayboxOptions) -> PlayboxSim {
    PlayboxSim::start(opts).await.expect("play-box simulator")
}

/// A bridge with some boxes, its broker, an observer and its storage directory.
struct Rig {
    broker: SocketAddr,
    obs: Observer,
    dir: tempfile::TempDir,
    bridge: Bridge,
}

impl Rig {
    /// `boxes`: (name, simulator, password).
    async fn start(boxes: &[(&str, &PlayboxSim, &str)]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        Rig::start_in(dir, boxes).await
    }

    async fn start_in(dir: tempfile::TempDir, boxes: &[(&str, &PlayboxSim, &str)]) -> Rig {
        let broker = broker();
        let obs = Observer::start(broker).await;
        let entries: String = boxes
            .iter()
            .map(|(name, sim, password)| box_entry(name, sim, password))
            .collect();
        let bridge = Bridge::start(config(broker, dir.path(), &entries))
            .await
            .unwrap();
        Rig {
            broker,
            obs,
            dir,
            bridge,
        }
    }

    async fn link(&self, name: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.obs
            .wait_topic(&format!("{BASE}/bridge/link/playbox/{name}"), T, |r| {
                f(&r.json())
            })
            .await
            .json()
    }

    async fn set(&self, name: &str, what: &str, payload: &str) {
        publish(self.broker, &set_topic(name, what), payload, false).await;
    }

    /// The error reported for a command whose (quoted) payload is `payload`.
    async fn error_for(&self, name: &str, payload: &str) -> Value {
        self.obs
            .wait_topic(&format!("{BASE}/playbox/{name}/error"), T, |r| {
                r.json()["payload"] == payload
            })
            .await
            .json()
    }

    async fn stop(self) {
        self.bridge.stop(Duration::from_secs(5)).await;
    }
}

fn set_topic(name: &str, what: &str) -> String {
    format!("{BASE}/playbox/{name}/{what}/set")
}

fn avail_topic(name: &str) -> String {
    format!("{BASE}/playbox/{name}/availability")
}

/// Publish `payloads` to `topic` back to back from one client (a UI slider), and wait
/// until the broker has acknowledged every one.
async fn publish_burst(broker: SocketAddr, topic: &str, payloads: &[String]) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let opts = MqttOptions::new(
        format!("slider-{}", rand_suffix()),
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
    let want = payloads.len();
    let acked = async {
        let mut n = 0;
        while n < want {
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

/// Wait for `n` more polls of a healthy box: a clock that says "some seconds passed"
/// without sleeping.
async fn polls_of(clock: &PlayboxSim, n: u64) {
    let path = BRIGHTNESS_PATHS[0];
    let start = clock.requests(path);
    clock
        .wait_until("more polls of the other box", T, move |s| {
            s.requests(path) >= start + n
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_to_an_auth_failed_box_are_refused_without_a_login() {
    let sim = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("lobby", &sim, "wrong-one")]).await;
    rig.link("lobby", |l| l["state"] == "auth_failed").await;
    assert_eq!(sim.login_attempts(), 1);

    // Six commands within a minute, each answered before the next is sent.
    let mut errors = Vec::new();
    for i in 0..6 {
        let payload = format!("{}", 40 + i);
        rig.set("lobby", "brightness", &payload).await;
        errors.push(rig.error_for("lobby", &payload).await);
    }
    assert!(
        sim.login_attempts() <= 2,
        "every command logged in again: {} logins",
        sim.login_attempts()
    );
    for e in errors {
        assert_eq!(e["command"], "brightness");
        assert!(
            e["error"].as_str().is_some_and(|s| s.contains("no login")),
            "{e}"
        );
    }
    assert_eq!(sim.lockouts(), 0, "the bridge locked the box out");
    assert!(sim.sets().is_empty(), "{:?}", sim.sets());
    let link = rig.link("lobby", |_| true).await;
    assert_eq!(link["state"], "auth_failed", "{link}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_answering_67_is_locked_out_and_left_alone() {
    let locked = sim(PlayboxOptions {
        lockout_code: 67,
        ..PlayboxOptions::default()
    })
    .await;
    locked.lock_out(Duration::from_secs(600));
    let clock = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("locked", &locked, PASSWORD), ("clock", &clock, PASSWORD)]).await;
    let link = rig.link("locked", |l| l["locked_out"] == true).await;
    assert_eq!(link["state"], "down", "{link}");
    assert!(
        link["retry_in_s"].as_f64().is_some_and(|s| s >= 60.0),
        "{link}"
    );
    assert!(
        link["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("67")),
        "{link}"
    );
    for payload in ["10", "20", "30"] {
        rig.set("locked", "brightness", payload).await;
        rig.error_for("locked", payload).await;
    }
    polls_of(&clock, 3).await;
    assert_eq!(
        locked.login_attempts(),
        1,
        "logged in again during the lockout"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_code_is_no_reason_to_log_in_again() {
    let sim = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("lobby", &sim, PASSWORD)]).await;
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "online")
        .await;
    let logins = sim.login_attempts();
    // "Screen not connected" on every read: a failed poll, the token is still good.
    sim.set_value_code(Some(38));
    polls_of(&sim, 3).await;
    assert_eq!(sim.login_attempts(), logins, "code 38 made it log in again");
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "offline")
        .await;
    let offline = rig.obs.on(&avail_topic("lobby")).len();
    sim.set_value_code(None);
    rig.obs
        .wait_for("online again", T, |log| {
            log.iter()
                .filter(|r| r.topic == avail_topic("lobby"))
                .skip(offline)
                .find(|r| r.text() == "online")
                .map(|_| ())
        })
        .await;
    assert_eq!(sim.login_attempts(), logins);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_12_and_36_on_a_probe_mean_try_the_next_path() {
    let opts = |code| PlayboxOptions {
        brightness_path: 1,
        screen_path: 2,
        missing_path_code: Some(code),
        ..PlayboxOptions::default()
    };
    let twelve = sim(opts(12)).await;
    let thirty_six = sim(opts(36)).await;
    let rig = Rig::start(&[("a", &twelve, PASSWORD), ("b", &thirty_six, PASSWORD)]).await;
    for (name, sim) in [("a", &twelve), ("b", &thirty_six)] {
        let link = rig
            .link(name, |l| l["state"] == "up" && !l["screen_path"].is_null())
            .await;
        assert_eq!(link["brightness_path"], BRIGHTNESS_PATHS[1], "{link}");
        assert_eq!(link["screen_path"], SCREEN_PATHS[2], "{link}");
        assert_eq!(sim.login_attempts(), 1, "{name}: probing logged in again");
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_command_is_refused_and_the_next_one_applied() {
    let sim = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("lobby", &sim, PASSWORD)]).await;
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "online")
        .await;
    // 300 bytes that would be a valid `55` once trimmed.
    let long = format!("55{}", " ".repeat(298));
    rig.set("lobby", "brightness", &long).await;
    let e = rig.error_for("lobby", &long[..64]).await;
    assert_eq!(e["command"], "brightness");
    let error = e["error"].as_str().unwrap_or_default();
    assert!(error.contains("300 bytes") && error.contains("256"), "{e}");
    rig.set("lobby", "brightness", "40").await;
    sim.wait_until("brightness 40", T, |s| s.brightness() == 40.0)
        .await;
    assert!(
        sim.sets().iter().all(|(_, b)| b["ratio"] != 55.0),
        "the oversized command reached the box: {:?}",
        sim.sets()
    );
    for r in rig.obs.on(&format!("{BASE}/playbox/lobby/error")) {
        assert!(r.json()["payload"].as_str().is_some_and(|p| p.len() <= 64));
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_commands_is_coalesced_and_the_last_value_wins() {
    let sim = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("lobby", &sim, PASSWORD)]).await;
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "online")
        .await;
    let requests = |s: &PlayboxSim| -> u64 {
        [BRIGHTNESS_PATHS[0], SCREEN_PATHS[0]]
            .iter()
            .map(|p| s.requests(p))
            .sum()
    };
    let before = requests(&sim);
    let burst: Vec<String> = (1..=60).map(|v| v.to_string()).collect();
    publish_burst(rig.broker, &set_topic("lobby", "brightness"), &burst).await;
    sim.wait_until("brightness 60", T, |s| s.brightness() == 60.0)
        .await;
    rig.obs
        .wait_topic(&format!("{BASE}/playbox/lobby/state"), T, |r| {
            r.json()["brightness"] == 60.0
        })
        .await;
    let sets = sim.sets();
    assert!(
        (1..=4).contains(&sets.len()),
        "60 commands made {} sets: {sets:?}",
        sets.len()
    );
    assert_eq!(
        sets.last().map(|(_, b)| b["ratio"].clone()),
        Some(60.0.into())
    );
    // Each set is one POST and one read-back; a few polls may fall in between.
    let used = requests(&sim) - before;
    assert!(used <= 20, "{used} requests for one slider move");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_body_fails_that_poll_only() {
    let sim = sim(PlayboxOptions::default()).await;
    let rig = Rig::start(&[("lobby", &sim, PASSWORD)]).await;
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "online")
        .await;
    // A valid reply of 8 MiB, streamed without a length.
    sim.set_huge_replies(Some(8 << 20));
    let link = rig
        .link("lobby", |l| {
            l["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("larger than 1048576"))
        })
        .await;
    assert_eq!(link["state"], "down", "{link}");
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "offline")
        .await;
    let offline = rig.obs.on(&avail_topic("lobby")).len();
    sim.set_huge_replies(None);
    rig.obs
        .wait_for("online again", T, |log| {
            log.iter()
                .filter(|r| r.topic == avail_topic("lobby"))
                .skip(offline)
                .find(|r| r.text() == "online")
                .map(|_| ())
        })
        .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_pin_file_fails_closed() {
    type Prepare = fn(&std::path::Path);
    let cases: [(&str, Prepare); 3] = [
        ("a directory", |p| std::fs::create_dir(p).unwrap()),
        ("not a fingerprint", |p| {
            std::fs::write(p, "hello\n").unwrap()
        }),
        ("not UTF-8", |p| {
            std::fs::write(p, [0xff, 0xfe, 0x00]).unwrap()
        }),
    ];
    for (what, prepare) in cases {
        let boxed = sim(PlayboxOptions::default()).await;
        let clock = sim(PlayboxOptions::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("playbox-lobby.pin");
        prepare(&pin);
        let before = std::fs::read(&pin).ok();
        let rig = Rig::start_in(
            dir,
            &[("lobby", &boxed, PASSWORD), ("clock", &clock, PASSWORD)],
        )
        .await;
        let link = rig
            .link("lobby", |l| {
                l["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("pin file") && e.contains("refusing"))
            })
            .await;
        assert_eq!(link["state"], "down", "{what}: {link}");
        polls_of(&clock, 3).await;
        assert_eq!(
            boxed.tls_handshakes() + boxed.tls_failures(),
            0,
            "{what}: connected despite the pin file"
        );
        assert_eq!(boxed.login_attempts(), 0, "{what}");
        assert_eq!(
            std::fs::read(&pin).ok(),
            before,
            "{what}: the pin file was touched"
        );
        assert_eq!(pin.is_dir(), what == "a directory");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_pins_nothing() {
    let sim = sim(PlayboxOptions::default()).await;
    // Someone in the middle with the box's certificate but not its key.
    sim.set_impostor(true);
    let rig = Rig::start(&[("lobby", &sim, PASSWORD)]).await;
    let pin = rig.dir.path().join("playbox-lobby.pin");
    sim.wait_until("two refused handshakes", T, |s| s.tls_failures() >= 2)
        .await;
    assert!(
        !pin.exists(),
        "pinned a certificate whose key the peer does not hold"
    );
    assert_eq!(sim.login_attempts(), 0, "a password went to the impostor");
    let link = rig
        .link("lobby", |l| {
            l["last_error"].is_string() && l["state"] == "down"
        })
        .await;
    assert_eq!(link["state"], "down", "{link}");

    // The real box: pinned once the handshake completed, then used.
    sim.set_impostor(false);
    rig.obs
        .wait_topic(&avail_topic("lobby"), T, |r| r.text() == "online")
        .await;
    let stored = std::fs::read_to_string(&pin).unwrap();
    assert_eq!(stored.trim(), sim.cert_fingerprint_sha256());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let strays: Vec<_> = std::fs::read_dir(rig.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pin-"))
        .collect();
    assert!(strays.is_empty(), "temporary files left: {strays:?}");
    rig.stop().await;
}
