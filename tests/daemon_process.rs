//! The real binary as a child process: command line, exit codes, signals, secrets in logs.

mod common;

use std::process::Command;
use std::time::Duration;

use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_bvcsp2mqtt");
const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "S3cret-Pa55+/=";

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn daemon_config(sim: &BvcspSim, broker: std::net::SocketAddr, dir: &std::path::Path) -> String {
    format!(
        r#"
[bvcsp]
url = "{url}"
username = "admin"
password_file = "{pwfile}"
keepalive_interval = "200ms"
pong_timeout = "1s"
reconnect_min = "100ms"
reconnect_max = "800ms"
reopen_stagger = "50ms"

[mqtt]
url = "mqtt://{broker}"
client_id = "daemon-{id}"
keepalive = "2s"

[storage]
dir = "{dir}"
"#,
        url = sim.url(),
        pwfile = dir.join("bvcsp.pw").display(),
        id = rand_suffix(),
        dir = dir.join("state").display(),
    )
}

fn assert_no_secrets(log: &str, sim: &BvcspSim) {
    assert!(!log.contains(PASSWORD), "the password is in the log");
    let digest = bvcsp2mqtt::bvcsp::auth::password_digest("admin", PASSWORD);
    assert!(
        !log.contains(&digest),
        "sha256(user_password) is in the log"
    );
    let tokens: Vec<String> = sim
        .upgrades()
        .into_iter()
        .filter_map(|u| u.subprotocol.or(u.query_token))
        .collect();
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(!log.contains(&t), "a token is in the log");
    }
}

async fn start_pair() -> (BvcspSim, std::net::SocketAddr, Observer, tempfile::TempDir) {
    let sim = BvcspSim::start(SimOptions {
        password: PASSWORD.into(),
        devices: vec![SimDevice::new("PU_1", "Helmet", true)],
        ..Default::default()
    })
    .await
    .unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bvcsp.pw"), format!("{PASSWORD}\n")).unwrap();
    (sim, broker, obs, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_kill_9_fires_the_will() {
    let (sim, broker, obs, dir) = start_pair().await;
    let config = write_config(dir.path(), &daemon_config(&sim, broker, dir.path()));

    // SIGTERM: offline published, logged out, exit 0. At trace level, where the
    // WebSocket and HTTP crates would log the handshake's headers (the token).
    let mut d = Daemon::spawn_with_env(
        &config,
        &[(
            "RUST_LOG",
            "trace,tungstenite::handshake=trace,reqwest::connect=trace",
        )],
    );
    obs.wait_all_up(&Stream::ALL, T).await;
    sim.inject(
        Stream::Alarm,
        json!({"key": "p1", "type": 5, "devID": "PU_1", "status": 0, "time": 1717400000}),
    );
    obs.wait_topic(&format!("{BASE}/device/PU_1/alarm/sos"), T, |_| true)
        .await;
    d.signal("-TERM");
    let status = d.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| {
        r.text() == "offline"
    })
    .await;
    assert_eq!(sim.logouts(), 1);
    assert_no_secrets(&d.log(), &sim);
    assert!(
        !d.log().contains("unexpectedly") && !d.log().contains("panicked"),
        "a graceful stop is no failure: {}",
        d.log()
    );
    assert!(
        d.log().contains("logged in to BVCSP"),
        "the log says what happened"
    );

    // kill -9: no goodbye at all; the broker publishes the will.
    let mut d = Daemon::spawn(&config);
    let online_count = obs
        .on(&format!("{BASE}/bridge/state"))
        .iter()
        .filter(|r| r.text() == "online")
        .count();
    obs.wait_for("online again", T, |log| {
        (log.iter()
            .filter(|r| r.topic == format!("{BASE}/bridge/state") && r.text() == "online")
            .count()
            > online_count)
            .then_some(())
    })
    .await;
    let offline_count = obs
        .on(&format!("{BASE}/bridge/state"))
        .iter()
        .filter(|r| r.text() == "offline")
        .count();
    d.signal("-KILL");
    d.wait_exit(Duration::from_secs(5)).await;
    obs.wait_for("the will", T, |log| {
        (log.iter()
            .filter(|r| r.topic == format!("{BASE}/bridge/state") && r.text() == "offline")
            .count()
            > offline_count)
            .then_some(())
    })
    .await;
    assert_eq!(sim.logouts(), 1, "kill -9 does not log out");
    assert_no_secrets(&d.log(), &sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_keeps_the_daemon_up_and_the_secret_out_of_logs() {
    let (sim, broker, obs, dir) = start_pair().await;
    sim.set_devices(vec![]);
    let body = daemon_config(&sim, broker, dir.path());
    std::fs::write(dir.path().join("bvcsp.pw"), "not-the-password").unwrap();
    let config = write_config(dir.path(), &body);
    let mut d = Daemon::spawn(&config);
    obs.wait_link("auth_failed", T).await;
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon stays up");
    assert!(!d.log().contains("not-the-password"));
    d.signal("-TERM");
    assert_eq!(d.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
}

fn check_config(body: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), body);
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_redacted_config_or_names_the_bad_key() {
    let good = "[bvcsp]\nurl = \"https://10.0.0.5:9781\"\nusername = \"admin\"\npassword = \"hunter2hunter2\"\n";
    let (code, out, _) = check_config(good, &[("BVCSP2MQTT__MQTT__PASSWORD", "brokersecret")]);
    assert_eq!(code, 0);
    assert!(out.contains("url = \"https://10.0.0.5:9781\""), "{out}");
    assert!(
        !out.contains("hunter2hunter2") && !out.contains("brokersecret"),
        "{out}"
    );
    assert!(out.contains("<redacted>"));

    let (code, _, err) = check_config(&format!("{good}colour = \"blue\"\n"), &[]);
    assert_eq!(code, 64);
    assert!(err.contains("bvcsp.colour"), "{err}");

    let (code, _, err) = check_config(good, &[("BVCSP2MQTT__MQTT__URL", "http://broker")]);
    assert_eq!(code, 64);
    assert!(err.contains("mqtt.url"), "{err}");

    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/c.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).args(["--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).args(["--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo"));
}

/// A run whose config cannot be used exits 64 and names the problem, and nothing it
/// prints holds the secret that was on the broken line or in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_exit_64_without_the_secret() {
    async fn run(body: &str) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), body);
        let mut d = Daemon::spawn(&path);
        let status = d.wait_exit(Duration::from_secs(20)).await;
        (status.code().unwrap_or(-1), d.log())
    }
    let head = "[bvcsp]\nurl = \"https://10.0.0.5:9781\"\nusername = \"admin\"\n";
    // `\q` is not a TOML escape: the whole line is the error's context.
    let (code, out) = run(&format!("{head}password = \"s3cr3t-\\q-pw\"\n")).await;
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("line 4"), "{out}");
    assert!(!out.contains("s3cr3t"), "{out}");
    // userinfo in a URL is refused and not echoed.
    let (code, out) = run(&format!(
        "{head}password = \"x\"\n[mqtt]\nurl = \"mqtt://bob:brokerpw77@10.0.0.6:1883\"\n"
    ))
    .await;
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("mqtt.url"), "{out}");
    assert!(!out.contains("brokerpw77"), "{out}");
}
