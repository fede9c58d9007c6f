//! Play boxes end to end: the play-box simulator over HTTPS, an embedded broker, the
//! bridge in-process, and the `discover` command as a child process.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt::config::{self, Config};
use bvcsp2mqtt_testkit::playbox::{PlayboxOptions, PlayboxSim};
use common::*;

const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "SN2008@+";

fn box_entry(name: &str, sim: &PlayboxSim, password: &str, extra: &str) -> String {
    format!(
        "[[playbox]]\nname = \"{name}\"\nurl = \"{url}\"\nsn = \"2ZTA00000X0A00000000\"\npassword = \"{password}\"\n\
         poll_interval = \"1s\"\nrequest_timeout = \"2s\"\ncommands = true\n{extra}\n",
        url = sim.url()
    )
}

fn config(broker: SocketAddr, storage: &std::path::Path, boxes: &str) -> Config {
    config::from_toml(&format!(
        "[mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"pb-{id}\"\nkeepalive = \"5s\"\n\
         [storage]\ndir = \"{dir}\"\n{boxes}",
        id = rand_suffix(),
        dir = storage.display()
    ))
    .expect("valid config")
}

async fn sim() -> PlayboxSim {
    PlayboxSim::start(PlayboxOptions::default())
        .await
        .expect("play-box simulator")
}

/// A bridge with one box, its broker, an observer and its storage directory.
struct BoxRig {
    broker: SocketAddr,
    obs: Observer,
    dir: tempfile::TempDir,
    bridge: Bridge,
}

async fn one_box(name: &str, sim: &PlayboxSim, password: &str) -> BoxRig {
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(config(
        broker,
        dir.path(),
        &box_entry(name, sim, password, ""),
    ))
    .await
    .unwrap();
    BoxRig {
        broker,
        obs,
        dir,
        bridge,
    }
}

fn state_topic(name: &str) -> String {
    format!("{BASE}/playbox/{name}/state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_availability_are_published_and_follow_the_box() {
    let sim = sim().await;
    let viplex = sim.viplex_login().await;
    let BoxRig {
        broker,
        obs,
        dir,
        bridge,
    } = one_box("lobby", &sim, PASSWORD).await;

    let state = obs
        .wait_topic(&state_topic("lobby"), T, |_| true)
        .await
        .json();
    assert_eq!(state["brightness"], 50.0);
    assert_eq!(state["screen"], "on");
    assert_eq!(state["volume"], 30.0);
    assert_eq!(state["sn"], "2ZTA00000X0A00000000");
    assert!(state["updated_at"].is_string());
    let late = Observer::start(broker).await;
    assert_eq!(
        late.wait_topic(&format!("{BASE}/playbox/lobby/availability"), T, |r| r
            .retain)
            .await
            .text(),
        "online"
    );
    assert!(
        late.wait_topic(&state_topic("lobby"), T, |r| r.retain)
            .await
            .retain
    );
    let link = obs
        .wait_topic(&format!("{BASE}/bridge/link/playbox/lobby"), T, |r| {
            r.json()["state"] == "up"
        })
        .await
        .json();
    assert_eq!(
        link["brightness_path"],
        "/terminal/core/v1/screen/brightness"
    );

    // An operator changes the brightness with ViPlex: seen within two poll intervals.
    let changed = Instant::now();
    sim.set_brightness(77.0);
    obs.wait_topic(&state_topic("lobby"), T, |r| r.json()["brightness"] == 77.0)
        .await;
    assert!(
        changed.elapsed() < Duration::from_millis(2 * 1000 + 500),
        "{:?}",
        changed.elapsed()
    );

    // Our own client id: ViPlex Express's session survives our logins.
    assert!(
        sim.token_valid(&viplex),
        "the bridge logged the operator out"
    );
    // One kept-alive connection, a User-Agent, nothing but reads.
    sim.wait_until("a few polls", T, |s| {
        s.requests("/terminal/core/v1/screen/brightness") >= 4
    })
    .await;
    assert!(
        sim.tls_handshakes() <= 2,
        "connections are reused: {} handshakes",
        sim.tls_handshakes()
    );
    assert!(
        sim.user_agents()
            .iter()
            .all(|ua| ua.starts_with("bvcsp2mqtt/")),
        "{:?}",
        sim.user_agents()
    );
    assert!(
        sim.sets().is_empty(),
        "polling never writes: {:?}",
        sim.sets()
    );
    // Trust on first use: the certificate is pinned under storage.dir.
    let pin = std::fs::read_to_string(dir.path().join("playbox-lobby.pin")).unwrap();
    assert_eq!(pin.trim(), sim.cert_fingerprint_sha256());
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_never_locks_the_box_out() {
    let sim = sim().await;
    let BoxRig {
        broker: _broker,
        obs,
        dir: _dir,
        bridge,
    } = one_box("lobby", &sim, "wrong-one").await;
    let link = obs
        .wait_topic(&format!("{BASE}/bridge/link/playbox/lobby"), T, |r| {
            r.json()["state"] == "auth_failed"
        })
        .await
        .json();
    assert!(
        link["retry_in_s"].as_f64().unwrap() >= 300.0,
        "minutes, not seconds: {link}"
    );
    assert_eq!(
        obs.wait_topic(&format!("{BASE}/playbox/lobby/availability"), T, |_| true)
            .await
            .text(),
        "offline"
    );
    assert_eq!(
        sim.login_failures(),
        1,
        "one refused attempt, no fallback form after code 24"
    );
    assert_eq!(sim.login_attempts(), 1);
    assert_eq!(sim.lockouts(), 0);
    assert!(!sim.locked());
    for r in obs.all() {
        assert!(
            !r.text().contains("wrong-one"),
            "password leaked on {}",
            r.topic
        );
    }
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooting_box_goes_offline_and_comes_back() {
    let sim = sim().await;
    let BoxRig {
        broker: _broker,
        obs,
        dir: _dir,
        bridge,
    } = one_box("lobby", &sim, PASSWORD).await;
    let avail = format!("{BASE}/playbox/lobby/availability");
    obs.wait_topic(&avail, T, |r| r.text() == "online").await;
    sim.reboot(Duration::from_secs(3)).await;
    obs.wait_topic(&avail, T, |r| r.text() == "offline").await;
    let offline_at = Instant::now();
    sim.set_brightness(33.0);
    obs.wait_for("online again", T, |log| {
        log.iter()
            .rev()
            .find(|r| r.topic == avail)
            .filter(|r| r.text() == "online" && r.at > offline_at)
            .map(|_| ())
    })
    .await;
    obs.wait_topic(&state_topic("lobby"), T, |r| r.json()["brightness"] == 33.0)
        .await;
    assert!(
        sim.login_attempts() >= 2,
        "logged in again after the reboot"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_applied_and_bad_ones_rejected() {
    let sim = sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let set = |what: &str| format!("{BASE}/playbox/lobby/{what}/set");
    // Left retained by someone: replayed when the bridge subscribes, and not acted on.
    publish(broker, &set("brightness"), "5", true).await;
    let bridge = Bridge::start(config(
        broker,
        dir.path(),
        &box_entry("lobby", &sim, PASSWORD, ""),
    ))
    .await
    .unwrap();
    obs.wait_topic(&state_topic("lobby"), T, |_| true).await;

    publish(broker, &set("brightness"), "40", false).await;
    sim.wait_until("brightness 40", T, |s| s.brightness() == 40.0)
        .await;
    obs.wait_topic(&state_topic("lobby"), T, |r| r.json()["brightness"] == 40.0)
        .await;
    let (path, body) = sim.sets().last().cloned().unwrap();
    assert_eq!(path, "/terminal/core/v1/screen/brightness");
    assert!(
        body.get("solidity").is_none_or(|s| s == false),
        "no flash writes by default: {body}"
    );

    publish(broker, &set("screen"), "off", false).await;
    sim.wait_until("screen off", T, |s| s.screen() == "CLOSE")
        .await;
    obs.wait_topic(&state_topic("lobby"), T, |r| r.json()["screen"] == "off")
        .await;

    publish(broker, &set("volume"), "12", false).await;
    sim.wait_until("volume 12", T, |s| s.volume() == Some(12.0))
        .await;

    let sets_before = sim.sets().len();
    let error_topic = format!("{BASE}/playbox/lobby/error");
    for (what, bad) in [
        ("brightness", "abc"),
        ("brightness", "101"),
        ("screen", "dim"),
        ("volume", "-3"),
    ] {
        publish(broker, &set(what), bad, false).await;
        let e = obs
            .wait_topic(&error_topic, T, |r| r.json()["payload"] == bad)
            .await;
        assert!(!e.retain);
        let e = e.json();
        assert_eq!(e["command"], what);
        assert!(e["error"].as_str().is_some_and(|s| !s.is_empty()));
    }
    publish(broker, &set("brightness"), "41", false).await;
    sim.wait_until("brightness 41", T, |s| s.brightness() == 41.0)
        .await;
    assert_eq!(
        sim.sets().len(),
        sets_before + 1,
        "only the valid live command reached the box: {:?}",
        sim.sets()
    );
    assert!(
        sim.sets().iter().all(|(_, b)| b["ratio"] != 5.0),
        "the retained command was ignored"
    );
    assert_eq!(sim.brightness(), 41.0);
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_box_does_not_delay_another() {
    let hung = sim().await;
    let healthy = sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let boxes = format!(
        "{}{}",
        box_entry("hung", &hung, PASSWORD, ""),
        box_entry("healthy", &healthy, PASSWORD, "")
    );
    let bridge = Bridge::start(config(broker, dir.path(), &boxes))
        .await
        .unwrap();
    obs.wait_topic(&state_topic("hung"), T, |_| true).await;
    obs.wait_topic(&state_topic("healthy"), T, |_| true).await;
    hung.set_hang(true);
    // While one box swallows every request, the other is polled on schedule.
    let path = "/terminal/core/v1/screen/brightness";
    let start = healthy.requests(path);
    let t0 = Instant::now();
    healthy
        .wait_until(
            "three more polls of the healthy box",
            Duration::from_millis(3 * 1000 + 1500),
            move |s| s.requests(path) >= start + 3,
        )
        .await;
    assert!(t0.elapsed() < Duration::from_millis(4500));
    obs.wait_topic(&format!("{BASE}/playbox/hung/availability"), T, |r| {
        r.text() == "offline"
    })
    .await;
    hung.set_hang(false);
    obs.wait_for("the hung box back", T, |log| {
        log.iter()
            .rev()
            .find(|r| r.topic == format!("{BASE}/playbox/hung/availability"))
            .filter(|r| r.text() == "online")
            .map(|_| ())
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_is_refused_loudly() {
    let sim = sim().await;
    let BoxRig {
        broker,
        obs,
        dir,
        bridge,
    } = one_box("lobby", &sim, PASSWORD).await;
    obs.wait_topic(&state_topic("lobby"), T, |_| true).await;
    bridge.stop(Duration::from_secs(5)).await;

    // Same box, new certificate (or a different machine at that address): refused.
    sim.regenerate_certificate();
    let logins = sim.login_attempts();
    let bridge = Bridge::start(config(
        broker,
        dir.path(),
        &box_entry("lobby", &sim, PASSWORD, ""),
    ))
    .await
    .unwrap();
    let link = obs
        .wait_topic(&format!("{BASE}/bridge/link/playbox/lobby"), T, |r| {
            r.json()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate changed"))
        })
        .await
        .json();
    assert_eq!(link["state"], "down");
    assert_eq!(
        sim.login_attempts(),
        logins,
        "no password sent to an unknown certificate"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_finds_the_box_and_prints_valid_toml() {
    let sim = sim().await;
    let udp = sim.udp_addr().expect("discovery responder");
    let port = udp.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_bvcsp2mqtt"))
            .args([
                "discover",
                "--no-broadcast",
                "--target",
                "127.0.0.1",
                "--port",
                &port,
                "--wait",
                "1s",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("2ZTA00000X0A00000000") && text.contains("T2-4G"),
        "{text}"
    );
    let toml_part = &text[text.find("[[playbox]]").expect("TOML printed")..];
    let entry = format!(
        "{}\npassword = \"x\"\n",
        toml_part.replace("password_file", "# password_file")
    );
    let cfg = config::from_toml(&entry).expect("the printed TOML is a valid [[playbox]] entry");
    assert_eq!(cfg.playbox.len(), 1);
    assert_eq!(cfg.playbox[0].url.as_str(), sim.url());
    assert_eq!(cfg.playbox[0].sn, "2ZTA00000X0A00000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_firmware_fallback_login_other_paths_and_no_volume() {
    let sim = PlayboxSim::start(PlayboxOptions {
        documented_login: false,
        brightness_path: 1,
        screen_path: 2,
        volume: None,
        integer_only_brightness: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let BoxRig {
        broker,
        obs,
        dir: _dir,
        bridge,
    } = one_box("old", &sim, PASSWORD).await;
    let state = obs
        .wait_topic(&state_topic("old"), T, |_| true)
        .await
        .json();
    assert_eq!(state["brightness"], 50.0);
    assert_eq!(state["screen"], "on");
    assert!(
        state["volume"].is_null(),
        "no volume endpoint: null, as the contract allows"
    );
    let link = obs
        .wait_topic(&format!("{BASE}/bridge/link/playbox/old"), T, |r| {
            r.json()["volume_path"].is_null() && r.json()["state"] == "up"
        })
        .await
        .json();
    assert_eq!(link["login_form"], "fallback");
    assert_eq!(link["brightness_path"], "/terminal/core/v1/brightness");
    assert_eq!(link["screen_path"], "/terminal/core/v1/screen/power-state");
    // A fractional brightness is refused by this firmware, then sent rounded.
    publish(
        broker,
        &format!("{BASE}/playbox/old/brightness/set"),
        "33.4",
        false,
    )
    .await;
    sim.wait_until("brightness 33", T, |s| s.brightness() == 33.0)
        .await;
    // Probing only ever reads.
    assert!(
        sim.sets()
            .iter()
            .all(|(p, _)| p == "/terminal/core/v1/brightness"),
        "{:?}",
        sim.sets()
    );
    bridge.stop(Duration::from_secs(5)).await;
}
