//! Play boxes against hostile or unlucky input (issue 11): commands while logins are held
//! back, command floods and oversized commands, the box's error codes, oversized reply
//! bodies and broken certificate pins. The play-box simulator over HTTPS, an embedded
//! broker, the bridge in-process.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt::config::{self, Config};
use bvcsp2mqtt::sim::playbox::{PlayboxOptions, PlayboxSim};
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

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
    #[allow(dead_code)]
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
