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

use super::device_list;
use crate::bvcsp::Stream;
use crate::config::PlayboxConfig;
use crate::health::Probe;
use crate::mqtt::publisher::incoming::Incoming;
use crate::mqtt::{Message, Outbox, Topics};

/// The largest request payload read; a larger one is answered with an error.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// `bridge/devices` is published at most this often (it lists every device).
pub const DEVICES_EVERY: Duration = Duration::from_secs(5);
/// Requests answered, on average, at most this many a second...
pub const REQUESTS_PER_SECOND: u32 = 10;
/// ...and at most this many at once. Each answer is a durable message in the outbox that
/// alarms go through: a client looping requests must not be able to queue alarms behind
/// its answers. Requests over the limit are dropped unanswered (and counted).
pub const REQUEST_BURST: u32 = 10;
/// The level names `log_level` accepts, alone or after `target=`.
const LEVEL_NAMES: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Changes the log filter of the running process (`log_level` requests).
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), LogFilterError> + Send + Sync>;

/// Why a `log_level` filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("`{directive}` names no level (one of {levels}, alone or as `target=level`)")]
    NoLevel { directive: String, levels: String },
    #[error("{0}")]
    Invalid(#[source] tracing_subscriber::filter::ParseError),
    #[error("cannot change the log level: {0}")]
    Reload(#[source] tracing_subscriber::reload::Error),
}

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
    /// `mqtt.max_packet_size`: `bridge/devices` is cut to fit it (see [`device_list`]).
    pub max_packet: usize,
}

/// A token bucket over requests (see [`REQUEST_BURST`]), in nanoseconds of credit.
#[derive(Debug)]
struct RateLimit {
    credit: u64,
    last: Instant,
    /// Requests refused so far (reported by `health_check`).
    dropped: u64,
    /// A burst is being refused (and was logged); over once the bucket has filled again.
    refusing: bool,
}

impl RateLimit {
    const COST: u64 = 1_000_000_000 / REQUESTS_PER_SECOND as u64;
    const FULL: u64 = Self::COST * REQUEST_BURST as u64;

    fn new(now: Instant) -> RateLimit {
        RateLimit {
            credit: Self::FULL,
            last: now,
            dropped: 0,
            refusing: false,
        }
    }

    /// May a request received at `now` be answered?
    fn allow(&mut self, now: Instant) -> bool {
        let earned =
            u64::try_from(now.saturating_duration_since(self.last).as_nanos()).unwrap_or(u64::MAX);
        self.credit = self.credit.saturating_add(earned).min(Self::FULL);
        self.last = now;
        if self.credit >= Self::COST {
            if self.refusing && self.credit == Self::FULL {
                self.refusing = false;
            }
            self.credit -= Self::COST;
            return true;
        }
        self.dropped += 1;
        if !self.refusing {
            self.refusing = true;
            warn!(
                "bridge API: more than {REQUESTS_PER_SECOND} requests a second; the excess is \
                 dropped unanswered ({} so far)",
                self.dropped
            );
        }
        false
    }
}

/// Run until `cancel`.
pub async fn run(mut inputs: Inputs, cancel: CancellationToken) {
    let prefix = format!("{}/bridge/request/", inputs.topics.base());
    let mut changes = inputs.bvcsp.as_ref().map(|c| c.registry.watch_catalogue());
    let mut play_links: Vec<_> = inputs.probe.playbox_links.clone();
    play_links.sort_by(|a, b| a.0.cmp(&b.0));
    // The last list sent, by its digest.
    let mut last_devices: Option<u64> = None;
    let mut due: Option<Instant> = Some(Instant::now());
    let mut last_sent = Instant::now() - DEVICES_EVERY;
    let mut tick = tokio::time::interval(DEVICES_EVERY);
    let mut cut_warned = false;
    let mut limit = RateLimit::new(Instant::now());
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
                if !limit.allow(Instant::now()) {
                    continue;
                }
                debug!(request = crate::mqtt::topics::level(name).as_ref(), "bridge API request");
                let answer = answer(&inputs, name, &m.payload, m.size, limit.dropped);
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
                let topic = format!("{}/bridge/devices", inputs.topics.base());
                let payload = device_list::payload(
                    inputs.bvcsp.as_deref(),
                    &inputs.playboxes,
                    &play_links,
                    inputs.max_packet.saturating_sub(topic.len() + 16),
                    &mut cut_warned,
                );
                let digest = device_list::digest(&payload);
                if last_devices != Some(digest) {
                    inputs.outbox.push_now(Message {
                        topic,
                        payload: payload.into(),
                        retain: true,
                    });
                    last_sent = Instant::now();
                    last_devices = Some(digest);
                }
            }
        }
    }
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

/// The answer to one request of `size` bytes (more than `payload` holds when it was too
/// large to keep); `dropped`: requests refused by the rate limit so far.
fn answer(
    inputs: &Inputs,
    name: &str,
    payload: &[u8],
    size: usize,
    dropped: u64,
) -> Map<String, Value> {
    let fail = |e: String, tx: Option<Value>| reply("error", None, Some(e), tx);
    let size = size.max(payload.len());
    if size > MAX_REQUEST_BYTES {
        return fail(
            format!("the payload is {size} bytes; requests are at most {MAX_REQUEST_BYTES}"),
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
            data.insert("bridge_api".into(), json!({"requests_dropped": dropped}));
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
            if let Err(e) = check_log_filter(&level) {
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
                Err(e) => fail(e.to_string(), tx),
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

/// A log filter for `log_level`: a level name, or directives that each name a level
/// (`bvcsp2mqtt=debug,warn`). tracing-subscriber reads a word without a level
/// (`verbose`) as a target with every level on, which would take the bridge's own logs
/// away; that is refused here.
pub fn check_log_filter(filter: &str) -> Result<(), LogFilterError> {
    for directive in filter.split(',') {
        let directive = directive.trim();
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVEL_NAMES
            .iter()
            .any(|n| n.eq_ignore_ascii_case(level.trim()))
        {
            return Err(LogFilterError::NoLevel {
                directive: clip(directive).to_string(),
                levels: LEVEL_NAMES.join(", "),
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(LogFilterError::Invalid)
}

/// At most 64 bytes of something a client sent, for an error message.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_filters_that_name_a_level_are_taken() {
        for ok in [
            "debug",
            "WARN",
            " info ",
            "off",
            "bvcsp2mqtt=debug,warn",
            "a::b[s]=trace",
        ] {
            assert!(check_log_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "verbose",
            "bvcsp2mqtt",
            "debug,verbose",
            "bvcsp2mqtt=loud",
            "=[[",
            "",
        ] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_answered_at_a_bounded_rate_and_the_excess_counted() {
        let start = Instant::now();
        let mut limit = RateLimit::new(start);
        let allowed = (0..50).filter(|_| limit.allow(Instant::now())).count();
        assert_eq!(allowed, REQUEST_BURST as usize, "a burst, then nothing");
        assert_eq!(limit.dropped, 50 - REQUEST_BURST as u64);
        assert!(limit.refusing);
        // A steady flood gets the rate, no more.
        let mut allowed = 0;
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(10)).await;
            allowed += usize::from(limit.allow(Instant::now()));
        }
        assert_eq!(
            allowed,
            2 * REQUESTS_PER_SECOND as usize,
            "two seconds' worth"
        );
        assert!(limit.refusing, "still one burst: no new warning");
        // Quiet for a second: the bucket is full, the burst over.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limit.allow(Instant::now()));
        assert!(!limit.refusing);
        let allowed = (0..20).filter(|_| limit.allow(Instant::now())).count();
        assert_eq!(allowed, REQUEST_BURST as usize - 1);
        assert!(start.elapsed() >= Duration::from_secs(3));
    }
}
