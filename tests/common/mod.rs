//! Shared test rig: an embedded broker, an MQTT observer, bridge configurations.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bvcsp2mqtt::config::{self, Config};
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::broker::EmbeddedBroker;
use bvcsp2mqtt_testkit::bvcsp::BvcspSim;
pub use bvcsp2mqtt_testkit::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::Notify;

pub const BASE: &str = "bvcsp2mqtt";

pub fn broker() -> SocketAddr {
    EmbeddedBroker::start(0).expect("embedded broker").addr
}

#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// An MQTT client subscribed to everything, recording what arrives.
pub struct Observer {
    pub log: Arc<Mutex<Vec<Received>>>,
    /// Subscriptions acknowledged so far (one per (re)connect).
    pub subacks: Arc<std::sync::atomic::AtomicUsize>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub async fn start(broker: SocketAddr) -> Observer {
        let id = format!("observer-{}", rand_suffix());
        let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut events) = AsyncClient::new(opts, 10);
        let log = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let subscribed = Arc::new(Notify::new());
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (l, c, s, n) = (
            log.clone(),
            changed.clone(),
            subscribed.clone(),
            subacks.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .try_subscribe("#", QoS::AtLeastOnce)
                            .expect("subscribe");
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        s.notify_one();
                        c.notify_waiters();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        l.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            at: Instant::now(),
                        });
                        c.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .expect("observer subscribed");
        Observer {
            log,
            subacks,
            changed,
            task,
        }
    }

    /// Wait until the observer has subscribed `n` times in all (after a broker restart).
    pub async fn wait_subscribed(&self, n: usize, deadline: Duration) {
        self.wait_for("the observer to subscribe again", deadline, |_| {
            (self.subacks.load(std::sync::atomic::Ordering::SeqCst) >= n).then_some(())
        })
        .await
    }

    pub fn all(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.topic == topic)
            .collect()
    }

    /// Wait until `f` finds something in the log; panic with `what` after `deadline`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        deadline: Duration,
        f: impl Fn(&[Received]) -> Option<T>,
    ) -> T {
        let end = Instant::now() + deadline;
        loop {
            let changed = self.changed.notified();
            if let Some(v) = f(&self.log.lock().unwrap()) {
                return v;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let seen: Vec<String> = self
                    .all()
                    .iter()
                    .rev()
                    .take(30)
                    .map(|r| format!("{} {}", r.topic, r.text()))
                    .collect();
                panic!(
                    "timed out waiting for {what}; last messages:\n{}",
                    seen.join("\n")
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), changed).await;
        }
    }

    /// Wait for a message on `topic` satisfying `pred`.
    pub async fn wait_topic(
        &self,
        topic: &str,
        deadline: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Received {
        self.wait_for(&format!("a message on {topic}"), deadline, |log| {
            log.iter()
                .rev()
                .find(|r| r.topic == topic && pred(r))
                .cloned()
        })
        .await
    }

    /// Wait until an alarm with each of `keys` (its `raw.key`) has arrived on `topic`;
    /// returns the keys in arrival order, redeliveries included.
    pub async fn wait_keys(&self, topic: &str, keys: &[String], deadline: Duration) -> Vec<String> {
        self.wait_for(&format!("every key on {topic}"), deadline, |log| {
            let got: Vec<String> = log
                .iter()
                .filter(|r| r.topic == topic)
                .filter_map(|r| r.json()["raw"]["key"].as_str().map(String::from))
                .collect();
            keys.iter().all(|k| got.contains(k)).then_some(got)
        })
        .await
    }

    /// The latest bridge/link/bvcsp payload with state `state`.
    pub async fn wait_link(&self, state: &str, deadline: Duration) -> Value {
        let topic = format!("{BASE}/bridge/link/bvcsp");
        self.wait_topic(&topic, deadline, |r| r.json()["state"] == state)
            .await
            .json()
    }

    /// Wait until the link is up and every configured stream is up.
    pub async fn wait_all_up(&self, streams: &[Stream], deadline: Duration) -> Value {
        let topic = format!("{BASE}/bridge/link/bvcsp");
        self.wait_topic(&topic, deadline, |r| {
            let j = r.json();
            j["state"] == "up" && streams.iter().all(|s| j["streams"][s.name()] == "up")
        })
        .await
        .json()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Fast timings so tests see keepalives, reopens and backoff within seconds.
pub fn bridge_config(sim: &BvcspSim, broker: SocketAddr, extra_bvcsp: &str) -> Config {
    bridge_config_with(&sim.url(), "admin", "123456", broker, extra_bvcsp)
}

pub fn bridge_config_with(
    url: &str,
    user: &str,
    password: &str,
    broker: SocketAddr,
    extra_bvcsp: &str,
) -> Config {
    let dir = std::env::temp_dir().join(format!("bvcsp2mqtt-test-{}", rand_suffix()));
    config::from_toml(&format!(
        r#"
[bvcsp]
url = "{url}"
username = "{user}"
password = "{password}"
keepalive_interval = "200ms"
pong_timeout = "1s"
request_timeout = "2s"
reconnect_min = "100ms"
reconnect_max = "800ms"
reopen_stagger = "50ms"
gps_batch_window = "100ms"
{extra_bvcsp}

[mqtt]
url = "mqtt://{broker}"
client_id = "bridge-{id}"
keepalive = "5s"
reconnect_min = "100ms"
reconnect_max = "1s"

[storage]
dir = "{dir}"
"#,
        id = rand_suffix(),
        dir = dir.display(),
    ))
    .expect("test config is valid")
}

/// Wait until the simulator has `n` open sockets on each of `streams`.
pub async fn wait_sockets(sim: &BvcspSim, streams: &[Stream], deadline: Duration) {
    let streams = streams.to_vec();
    sim.wait_until("sockets open", deadline, move |s| {
        let c = s.counters();
        streams
            .iter()
            .all(|st| c.open_sockets.get(st.name()).copied().unwrap_or(0) >= 1)
    })
    .await;
}

/// A TCP proxy that can be cut (every connection dropped, new ones refused) and restored:
/// a broker outage without a broker that can be restarted.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (u, c) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            up,
            conns,
            accept,
        }
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Publish one message as a separate client would (a user's `mosquitto_pub`).
pub async fn publish(broker: SocketAddr, topic: &str, payload: &str, retain: bool) {
    let mut opts = MqttOptions::new(
        format!("pub-{}", rand_suffix()),
        broker.ip().to_string(),
        broker.port(),
    );
    opts.set_clean_session(true);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
        .await
        .unwrap();
    let acked = async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = events.poll().await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), acked)
        .await
        .expect("publish acknowledged");
    let _ = client.disconnect().await;
}

/// A real Mosquitto, or `None` when it is not installed and this is not CI (under
/// CI=true a missing broker is a failure, not a skip).
pub fn mosquitto() -> Option<Mosquitto> {
    if !Mosquitto::installed() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is required under CI (apt-get install mosquitto)"
        );
        eprintln!("skipping: mosquitto is not installed");
        return None;
    }
    Some(Mosquitto::start("max_queued_messages 100000").expect("start mosquitto"))
}

/// A child process with its stderr collected.
pub struct Daemon {
    pub child: std::process::Child,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn spawn(config: &std::path::Path) -> Daemon {
        Daemon::spawn_with_env(config, &[])
    }

    pub fn spawn_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bvcsp2mqtt"));
        cmd.args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied());
        Daemon::spawn_command(cmd)
    }

    /// Run `cmd` (the daemon, perhaps behind a wrapper such as `sh -c` or `prlimit`).
    pub fn spawn_command(mut cmd: std::process::Command) -> Daemon {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "debug");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the daemon");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        use std::io::Read;
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon { child, stderr }
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let end = std::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < end,
                "daemon did not exit within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A BVCSP simulator with one online device, `PU_1`.
pub async fn one_device_sim() -> BvcspSim {
    BvcspSim::start(bvcsp2mqtt_testkit::bvcsp::SimOptions {
        devices: vec![bvcsp2mqtt_testkit::bvcsp::SimDevice::new(
            "PU_1", "Helmet", true,
        )],
        ..Default::default()
    })
    .await
    .expect("simulator")
}

/// A plain HTTP/1.1 GET against the health listener; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the health listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
