//! The benchmark's instruments: the counting subscriber and the bridge as its own process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use super::{BASE, BenchError, setup};
use crate::bvcsp::BvcspSim;

/// Keys of live alarms start with this: their latencies are kept apart from the rest.
pub(super) const LIVE_PREFIX: &str = "sos";

/// What the subscriber saw.
#[derive(Default)]
pub(super) struct Seen {
    pub counts: HashMap<String, u32>,
    /// Latencies of first deliveries, live alarms aside.
    pub latencies_ns: Vec<u64>,
    /// Latencies of first deliveries of live alarms (keys starting with [`LIVE_PREFIX`]).
    pub live_ns: Vec<u64>,
    pub last_at: Option<Instant>,
    /// The first and the last message with a key that is not a live alarm.
    pub first_bulk_at: Option<Instant>,
    pub last_bulk_at: Option<Instant>,
    /// Distinct keys received.
    pub received: u64,
    pub link_up: bool,
    /// When the subscriber's connection was last acknowledged.
    pub connack_at: Option<Instant>,
    /// When the bridge last said `online` on `{base}/bridge/state`.
    pub online_at: Option<Instant>,
    /// Per topic, the highest sequence number (a key's trailing digits) delivered so far;
    /// `None` when order is not checked.
    pub order: Option<HashMap<String, u64>>,
    /// First deliveries whose sequence number is below one already seen on that topic.
    pub out_of_order: u64,
}

pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Subscribes to everything under the bench base topic and counts.
pub(super) struct Subscriber {
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// A clean session, order not checked.
    pub async fn start(broker: SocketAddr) -> Result<Subscriber, BenchError> {
        Self::connect(broker, false).await
    }

    /// A persistent session (the broker queues for it while it reconnects, so a
    /// broker that keeps sessions across a restart loses nothing published before the
    /// subscriber is back), and per-topic order checked.
    pub async fn start_persistent(broker: SocketAddr) -> Result<Subscriber, BenchError> {
        Self::connect(broker, true).await
    }

    async fn connect(broker: SocketAddr, persistent: bool) -> Result<Subscriber, BenchError> {
        let mut opts = MqttOptions::new(
            format!("bench-sub-{}", rand::random::<u32>()),
            "127.0.0.1",
            broker.port(),
        );
        opts.set_max_packet_size(16 << 20, 16 << 20)
            .set_inflight(1000)
            .set_clean_session(!persistent);
        let (client, mut events) = AsyncClient::new(opts, 100);
        let seen = Arc::new(Mutex::new(Seen {
            order: persistent.then(HashMap::new),
            ..Default::default()
        }));
        let (s, c) = (seen.clone(), client.clone());
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        s.lock().unwrap_or_else(|p| p.into_inner()).connack_at =
                            Some(Instant::now());
                        let _ = c.try_subscribe(format!("{BASE}/#"), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => record(&s, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .map_err(|_| BenchError::Timeout("subscriber".into()))?
            .map_err(setup("subscriber"))?;
        Ok(Subscriber { seen, task })
    }

    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reset(&self) {
        let mut g = self.seen();
        let (link_up, ordered) = (g.link_up, g.order.is_some());
        *g = Seen {
            link_up,
            order: ordered.then(HashMap::new),
            ..Default::default()
        };
    }

    pub async fn wait(
        &self,
        what: &str,
        deadline: Duration,
        f: impl Fn(&Seen) -> bool,
    ) -> Result<(), BenchError> {
        let end = Instant::now() + deadline;
        loop {
            if f(&self.seen()) {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(BenchError::Timeout(what.into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The two fields the subscriber needs, found by a scan instead of a JSON parse: the
/// subscriber shares the machine with what it measures, and the bridge's payloads are
/// larger than the ceiling's, so parsing them would tax the bridge's run more. Both the
/// bridge's payload (top level and `raw`) and the direct publisher's carry `"key":"…"`
/// and `"sent_ns":N` with the same values.
pub(super) fn probe(payload: &[u8]) -> Option<(&str, u64)> {
    fn after<'a>(hay: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
        hay.windows(needle.len())
            .position(|w| w == needle)
            .map(|i| &hay[i + needle.len()..])
    }
    let rest = after(payload, b"\"key\":\"")?;
    let key = std::str::from_utf8(&rest[..rest.iter().position(|b| *b == b'"')?]).ok()?;
    let rest = after(payload, b"\"sent_ns\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let sent = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((key, sent))
}

/// A key's sequence number: its trailing digits (`r41` → 41).
pub(super) fn sequence(key: &str) -> Option<u64> {
    let digits = key.bytes().rev().take_while(u8::is_ascii_digit).count();
    key[key.len() - digits..].parse().ok()
}

fn record(seen: &Mutex<Seen>, topic: &str, payload: &[u8]) {
    let now = now_ns();
    if topic.ends_with("/bridge/link/bvcsp") {
        let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        seen.lock().unwrap_or_else(|p| p.into_inner()).link_up = v["state"] == "up";
        return;
    }
    if topic.ends_with("/bridge/state") {
        if payload == b"online" {
            seen.lock().unwrap_or_else(|p| p.into_inner()).online_at = Some(Instant::now());
        }
        return;
    }
    let Some((key, sent)) = probe(payload) else {
        return;
    };
    let at = Instant::now();
    let mut g = seen.lock().unwrap_or_else(|p| p.into_inner());
    let n = g.counts.entry(key.to_owned()).or_default();
    *n += 1;
    let first = *n == 1;
    let live = key.starts_with(LIVE_PREFIX);
    if first {
        g.received += 1;
        let latency = now.saturating_sub(sent);
        if live {
            g.live_ns.push(latency);
        } else {
            g.latencies_ns.push(latency);
        }
        if let (Some(order), Some(seq)) = (g.order.as_mut(), sequence(key)) {
            let behind = match order.get_mut(topic) {
                Some(last) if seq < *last => true,
                Some(last) => {
                    *last = seq;
                    false
                }
                None => {
                    order.insert(topic.to_owned(), seq);
                    false
                }
            };
            g.out_of_order += u64::from(behind);
        }
    }
    if !live {
        g.first_bulk_at.get_or_insert(at);
        g.last_bulk_at = Some(at);
    }
    g.last_at = Some(at);
}

/// What a scenario adds to the bridge's configuration.
#[derive(Debug, Default)]
pub(super) struct BridgeExtra {
    /// `storage.max_bytes` (default: the bridge's own).
    pub max_bytes: Option<u64>,
    /// Serve `/metrics` here.
    pub http: Option<SocketAddr>,
}

/// The bridge as its own process, measured through /proc.
pub(super) struct BridgeProc {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for BridgeProc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BridgeProc {
    pub fn spawn(
        exe: &Path,
        sim: &BvcspSim,
        broker: SocketAddr,
        streams: &str,
        extra: &BridgeExtra,
    ) -> Result<BridgeProc, BenchError> {
        let dir = tempfile::tempdir().map_err(setup("temp dir"))?;
        let config = dir.path().join("config.toml");
        let max_bytes = extra
            .max_bytes
            .map(|b| format!("max_bytes = {b}\n"))
            .unwrap_or_default();
        let service = extra
            .http
            .map(|a| format!("[service]\nhttp = true\nhttp_listen = \"{a}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "[bvcsp]\nurl = \"{}\"\nusername = \"admin\"\npassword = \"123456\"\nstreams = [{streams}]\n\
                 reopen_stagger = \"100ms\"\ngps_batch_window = \"200ms\"\n\
                 [mqtt]\nurl = \"mqtt://{broker}\"\nbase_topic = \"{BASE}\"\nclient_id = \"bench-bridge-{}\"\n\
                 [storage]\ndir = \"{}\"\n{max_bytes}[log]\nlevel = \"warn\"\n{service}",
                sim.url(),
                rand::random::<u32>(),
                dir.path().join("state").display()
            ),
        )
        .map_err(setup("bridge config"))?;
        let child = std::process::Command::new(exe)
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(setup("bridge process"))?;
        Ok(BridgeProc { child, _dir: dir })
    }

    /// CPU time of all the bridge's threads, from /proc/PID/task/*/schedstat (ns).
    pub fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    /// Peak resident memory (VmHWM), MB.
    pub fn peak_rss_mb(&self) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_finds_key_and_send_time_in_both_shapes() {
        let bridge = br#"{"event_id":"alarm-1","key":"a7","raw":{"key":"a7","sent_ns":123,"type":5},"type":5}"#;
        assert_eq!(probe(bridge), Some(("a7", 123)));
        let direct = br#"{"key":"c9","pad":"xx","sent_ns":4567}"#;
        assert_eq!(probe(direct), Some(("c9", 4567)));
        assert_eq!(probe(br#"{"state":"up"}"#), None);
    }

    fn msg(key: &str) -> Vec<u8> {
        format!(r#"{{"key":"{key}","sent_ns":1}}"#).into_bytes()
    }

    #[test]
    fn order_is_checked_per_topic_on_first_deliveries_only() {
        let seen = Mutex::new(Seen {
            order: Some(HashMap::new()),
            ..Default::default()
        });
        for (topic, key) in [
            ("t/a", "r1"),
            ("t/b", "sos0"),
            ("t/a", "r2"),
            ("t/a", "r1"), // a duplicate: counted as one, not as reordering
            ("t/b", "sos1"),
            ("t/a", "r3"),
            ("t/b", "sos3"),
            ("t/b", "sos2"), // behind sos3 on its topic
        ] {
            record(&seen, topic, &msg(key));
        }
        let g = seen.lock().unwrap();
        assert_eq!((g.received, g.out_of_order), (7, 1));
        assert_eq!((g.live_ns.len(), g.latencies_ns.len()), (4, 3));
        assert_eq!(g.counts["r1"], 2);
        assert!(g.first_bulk_at.is_some() && g.last_bulk_at >= g.first_bulk_at);
    }

    #[test]
    fn a_key_s_sequence_is_its_trailing_digits() {
        assert_eq!(sequence("r41"), Some(41));
        assert_eq!(sequence("sos0"), Some(0));
        assert_eq!(sequence("g3-17"), Some(17));
        assert_eq!(sequence("none"), None);
    }
}
