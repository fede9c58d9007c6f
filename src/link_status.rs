//! Upstream link status, published retained on `{base}/bridge/link/...` whenever it
//! changes, and logged once per change rather than once per retry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::mqtt::{Message, Outbox};
use crate::timestamp::rfc3339_millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Up,
    Down,
    AuthFailed,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::AuthFailed => "auth_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LinkSnapshot {
    pub state: LinkState,
    pub since: SystemTime,
    pub last_error: Option<String>,
    pub streams: BTreeMap<String, bool>,
    pub retry_in: Option<Duration>,
    /// Free-form facts worth showing (e.g. the token transport in use).
    pub details: BTreeMap<String, Value>,
}

pub struct LinkStatus {
    name: String,
    topic: String,
    outbox: Arc<Outbox>,
    current: Mutex<LinkSnapshot>,
}

impl LinkStatus {
    pub fn new(
        name: &str,
        topic: String,
        outbox: Arc<Outbox>,
        streams: &[&str],
    ) -> Arc<LinkStatus> {
        let link = Arc::new(LinkStatus {
            name: name.to_string(),
            topic,
            outbox,
            current: Mutex::new(LinkSnapshot {
                state: LinkState::Connecting,
                since: SystemTime::now(),
                last_error: None,
                streams: streams.iter().map(|s| (s.to_string(), false)).collect(),
                retry_in: None,
                details: BTreeMap::new(),
            }),
        });
        link.publish(&link.lock());
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkSnapshot> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        self.lock().clone()
    }

    pub fn state(&self) -> LinkState {
        self.lock().state
    }

    /// Change the link state. Logs and publishes only on an actual change.
    pub fn set(&self, state: LinkState, error: Option<String>, retry_in: Option<Duration>) {
        let mut g = self.lock();
        let changed = g.state != state
            || (error.is_some() && g.last_error != error)
            || g.retry_in != retry_in;
        if !changed {
            return;
        }
        if g.state != state {
            g.since = SystemTime::now();
            match (&error, state) {
                (Some(e), LinkState::Down | LinkState::AuthFailed) => {
                    warn!(link = %self.name, "link {} -> {}: {e}", g.state.name(), state.name())
                }
                _ => info!(link = %self.name, "link {} -> {}", g.state.name(), state.name()),
            }
            g.state = state;
        }
        if error.is_some() {
            g.last_error = error;
        }
        g.retry_in = retry_in;
        self.publish(&g);
    }

    /// The bridge is stopping: the link is down on purpose, which is no warning.
    pub fn stopped(&self) {
        let mut g = self.lock();
        info!(link = %self.name, "link {} -> down (bridge stopping)", g.state.name());
        g.state = LinkState::Down;
        g.since = SystemTime::now();
        g.last_error = Some("bridge stopped".into());
        g.retry_in = None;
        self.publish(&g);
    }

    pub fn set_stream(&self, stream: &str, up: bool) {
        let mut g = self.lock();
        if g.streams.get(stream) == Some(&up) {
            return;
        }
        info!(link = %self.name, "stream {stream} {}", if up { "up" } else { "down" });
        g.streams.insert(stream.to_string(), up);
        self.publish(&g);
    }

    /// Show `key: value` on the link topic; `null` removes it.
    pub fn set_detail(&self, key: &str, value: Value) {
        let mut g = self.lock();
        if value.is_null() {
            if g.details.remove(key).is_none() {
                return;
            }
        } else if g.details.get(key) == Some(&value) {
            return;
        } else {
            g.details.insert(key.to_string(), value);
        }
        self.publish(&g);
    }

    fn publish(&self, s: &LinkSnapshot) {
        let mut p = json!({
            "state": s.state.name(),
            "since": rfc3339_millis(s.since),
            "last_error": s.last_error,
        });
        if !s.streams.is_empty() {
            p["streams"] = s
                .streams
                .iter()
                .map(|(k, up)| {
                    (
                        k.clone(),
                        Value::String(if *up { "up" } else { "down" }.into()),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if let Some(r) = s.retry_in {
            p["retry_in_s"] = json!(r.as_secs_f64().round());
        }
        for (k, v) in &s.details {
            p[k] = v.clone();
        }
        self.outbox
            .push_now(Message::state_json(self.topic.clone(), &p));
    }
}
