//! The bridge API (contract §3.6): retained `{base}/bridge/devices`, and requests on
//! `{base}/bridge/request/{name}` answered on `{base}/bridge/response/{name}` with the
//! request's `transaction` echoed. Unknown names and bad payloads get `status: error`;
//! nothing a client sends can stop the loop.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bvcsp::Stream;
use crate::bvcsp::devices::Kind;
use crate::config::PlayboxConfig;
use crate::health::Probe;
use crate::link_status::LinkState;
use crate::mqtt::publisher::Incoming;
use crate::mqtt::{Message, Outbox, Topics};
use crate::timestamp::rfc3339_millis;

/// The largest request payload read; a larger one is answered with an error.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// `bridge/devices` is published at most this often (it lists every device).
pub const DEVICES_EVERY: Duration = Duration::from_secs(5);

/// Changes the log filter of the running process (`log_level` requests).
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL: OnceLock<LogLevelSetter> = OnceLock::new();

/// Install what `log_level` requests use (the binary does, once logging is set up).
/// Only the first call counts.
pub fn install_log_level_setter(setter: LogLevelSetter) {
    let _ = LOG_LEVEL.set(setter);
}

pub struct Inputs {
    pub topics: Topics,
    pub outbox: Arc<Outbox>,
    pub bvcsp: Option<Arc<crate::bvcsp::BvcspLink>>,
    pub playboxes: Vec<PlayboxConfig>,
    pub probe: Probe,
    pub requests: mpsc::Receiver<Incoming>,
}

/// Run until `cancel`.
pub async fn run(mut inputs: Inputs, cancel: CancellationToken) {
    let prefix = format!("{}/bridge/request/", inputs.topics.base());
    let mut changes = inputs.bvcsp.as_ref().map(|c| c.registry.watch_catalogue());
    let mut play_links: Vec<_> = inputs.probe.playbox_links.clone();
    play_links.sort_by(|a, b| a.0.cmp(&b.0));
    let mut last_devices: Option<Value> = None;
    let mut due: Option<Instant> = Some(Instant::now());
    let mut last_sent = Instant::now() - DEVICES_EVERY;
    let mut tick = tokio::time::interval(DEVICES_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            m = inputs.requests.recv() => {
                let Some(m) = m else { cancel.cancelled().await; return };
                let Some(name) = m.topic.strip_prefix(&prefix) else { continue };
                if m.retain {
                    // A retained request would be answered again at every subscribe.
                    debug!("ignoring a retained request on {}", m.topic);
                    continue;
                }
                debug!(request = crate::mqtt::topics::level(name).as_ref(), "bridge API request");
                let answer = answer(&inputs, name, &m.payload);
                let topic = format!(
                    "{}/bridge/response/{}",
                    inputs.topics.base(),
                    crate::mqtt::topics::level(name)
                );
                inputs.outbox.push_or_stop(Message::event(topic, answer), &cancel).await;
            }
            r = async { changes.as_mut().expect("guarded").changed().await }, if changes.is_some() => {
                if r.is_err() {
                    changes = None;
                } else {
                    due.get_or_insert(Instant::now().max(last_sent + DEVICES_EVERY));
                }
            }
            // Play-box links change without telling: look now and then.
            _ = tick.tick() => { due.get_or_insert(Instant::now().max(last_sent + DEVICES_EVERY)); }
            _ = async { sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                due = None;
                let list = devices(&inputs, &play_links);
                if last_devices.as_ref() != Some(&list) {
                    inputs.outbox.push_now(Message::state_json(
                        format!("{}/bridge/devices", inputs.topics.base()),
                        &list,
                    ));
                    last_sent = Instant::now();
                    last_devices = Some(list);
                }
            }
        }
    }
}

/// `bridge/devices`: every known device, user and play box.
fn devices(inputs: &Inputs, play_links: &[(String, Arc<crate::link_status::LinkStatus>)]) -> Value {
    let mut list = Vec::new();
    if let Some(ctx) = &inputs.bvcsp {
        for k in ctx.registry.catalogue() {
            let (kind, topic_id) = match k.kind {
                Kind::Device => ("device", crate::mqtt::topics::level(&k.id).into_owned()),
                Kind::User => ("user", crate::mqtt::topics::level(&k.id).into_owned()),
            };
            list.push(json!({
                "id": k.id,
                "topic_id": topic_id,
                "name": k.facts.name,
                "kind": kind,
                "online": k.online,
                "last_seen": k.last_seen.map(rfc3339_millis),
            }));
        }
    }
    for cfg in &inputs.playboxes {
        let link = play_links
            .iter()
            .find(|(n, _)| *n == cfg.name)
            .map(|(_, l)| l.snapshot());
        let online = link.as_ref().is_some_and(|s| s.state == LinkState::Up);
        list.push(json!({
            "id": cfg.name,
            "topic_id": crate::mqtt::topics::level(&cfg.name),
            "name": cfg.name,
            "kind": "playbox",
            "online": online,
            // Up since then: the box has been answering ever since.
            "last_seen": link.filter(|s| s.state == LinkState::Up).map(|s| rfc3339_millis(s.since)),
        }));
    }
    Value::Array(list)
}

fn reply(
    status: &str,
    data: Option<Value>,
    error: Option<String>,
    tx: Option<Value>,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("status".into(), json!(status));
    m.insert("data".into(), data.unwrap_or_else(|| json!({})));
    if let Some(e) = error {
        m.insert("error".into(), json!(e));
    }
    if let Some(t) = tx {
        m.insert("transaction".into(), t);
    }
    m
}

/// The answer to one request.
fn answer(inputs: &Inputs, name: &str, payload: &[u8]) -> Map<String, Value> {
    let fail = |e: String, tx: Option<Value>| reply("error", None, Some(e), tx);
    if payload.len() > MAX_REQUEST_BYTES {
        return fail(
            format!(
                "the payload is {} bytes; requests are at most {MAX_REQUEST_BYTES}",
                payload.len()
            ),
            None,
        );
    }
    let body: Map<String, Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return fail("the payload must be a JSON object (or empty)".into(), None),
            Err(e) => return fail(format!("the payload is not JSON: {e}"), None),
        }
    };
    let tx = body.get("transaction").cloned();
    match name {
        "health_check" => {
            let probe = &inputs.probe;
            let healthy = probe.ready()
                && probe.heartbeats.stale().is_empty()
                && probe.outbox.write_error().is_none();
            let mut data = Map::new();
            data.insert("healthy".into(), json!(healthy));
            if let Value::Object(report) = probe.report() {
                data.extend(report);
            }
            reply("ok", Some(Value::Object(data)), None, tx)
        }
        "backfill" => {
            let Some(ctx) = &inputs.bvcsp else {
                return fail("no [bvcsp] is configured".into(), tx);
            };
            if !ctx.cfg.backfill {
                return fail("bvcsp.backfill is off".into(), tx);
            }
            if !ctx.cfg.streams.contains(&Stream::Alarm) {
                return fail("the alarm stream is not among bvcsp.streams".into(), tx);
            }
            info!("backfill requested over MQTT");
            // A gap from now: the backfill reads the records back to the newest alarm
            // already published (what it already published is dropped as a duplicate).
            ctx.ledger.open_gap();
            ctx.to_backfill.notify_one();
            reply("ok", Some(json!({"started": true})), None, tx)
        }
        "log_level" => {
            let level = match body.get("level") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
                Some(_) => {
                    return fail(
                        "`level` must be a non-empty string, e.g. \"debug\"".into(),
                        tx,
                    );
                }
                None => return fail("missing `level`, e.g. {\"level\": \"debug\"}".into(), tx),
            };
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                return fail(
                    format!("`{}` is not a valid log filter: {e}", clip(&level)),
                    tx,
                );
            }
            let Some(set) = LOG_LEVEL.get() else {
                return fail("the log level cannot be changed in this process".into(), tx);
            };
            match set(&level) {
                Ok(()) => {
                    warn!("log level set to `{level}` over MQTT (until the next restart)");
                    reply("ok", Some(json!({"level": level})), None, tx)
                }
                Err(e) => fail(e, tx),
            }
        }
        other => fail(
            format!(
                "unknown request `{}`; known: health_check, backfill, log_level",
                clip(other)
            ),
            tx,
        ),
    }
}

/// At most 64 bytes of something a client sent, for an error message.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
