//! NovaStar Taurus LED play boxes: one independent poll loop per box, commands from
//! MQTT, and UDP discovery.

pub mod avon;
pub mod client;
pub mod commands;
pub mod discovery;
pub mod poller;
mod values;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::PlayboxConfig;
use crate::mqtt::publisher::incoming::Incoming;
use crate::mqtt::{Outbox, Topics};
use crate::tls::{self, TofuPin, Trust};

pub use commands::{Command, CommandKind, Pending};

#[derive(Debug, thiserror::Error)]
pub enum PlayboxSetupError {
    #[error("playbox `{name}`: {source}")]
    Tls {
        name: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("playbox `{name}`: {source}")]
    Http {
        name: String,
        #[source]
        source: reqwest::Error,
    },
}

/// The trust policy for one box: the configured one, or trust on first use with the
/// pin stored under the storage directory.
pub fn trust_for(cfg: &PlayboxConfig, storage: &Path) -> Trust {
    let t = &cfg.tls;
    if t.insecure {
        warn!(
            "playbox {}: tls.insecure = true: the box's certificate is NOT verified",
            cfg.name
        );
        return Trust::Insecure;
    }
    if let Some(pin) = &t.fingerprint_sha256 {
        return Trust::Fingerprint(pin.sha256());
    }
    if let Some(ca_file) = &t.ca_file {
        return Trust::CaFile(ca_file.clone());
    }
    Trust::Tofu(TofuPin::load(
        storage.join(format!("playbox-{}.pin", cfg.name)),
    ))
}

/// The command topics to subscribe to: `{base}/playbox/{name}/+/set` for boxes that take commands.
pub fn command_filters(boxes: &[PlayboxConfig], topics: &Topics) -> Vec<String> {
    boxes
        .iter()
        .filter(|b| b.commands)
        .map(|b| {
            format!(
                "{}/playbox/{}/+/set",
                topics.base(),
                crate::mqtt::topics::level(&b.name)
            )
        })
        .collect()
}

/// Every box, ready to run: what can fail (trust files, TLS, clients) is done.
pub struct Prepared {
    runners: Vec<(String, poller::BoxRunner)>,
    routes: HashMap<String, Arc<Pending>>,
    outbox: Arc<Outbox>,
    topics: Topics,
}

/// Set up every box without starting anything: a failure leaves nothing running.
pub fn prepare(
    boxes: &[PlayboxConfig],
    storage: &Path,
    outbox: Arc<Outbox>,
    topics: Topics,
    heartbeats: Arc<crate::heartbeat::Heartbeats>,
) -> Result<Prepared, PlayboxSetupError> {
    let mut routes = HashMap::new();
    let mut runners = Vec::new();
    for cfg in boxes {
        let name = || cfg.name.clone();
        let trust = trust_for(cfg, storage);
        let tls = tls::client_config(&trust, None).map_err(|source| PlayboxSetupError::Tls {
            name: name(),
            source,
        })?;
        let tofu = match &trust {
            Trust::Tofu(pin) => Some(pin.clone()),
            _ => None,
        };
        let client =
            client::BoxClient::new(cfg, tls, tofu).map_err(|source| PlayboxSetupError::Http {
                name: name(),
                source,
            })?;
        let pending = Arc::new(Pending::default());
        if cfg.commands {
            routes.insert(cfg.name.clone(), pending.clone());
        }
        let runner = poller::BoxRunner::new(
            cfg.clone(),
            client,
            outbox.clone(),
            topics.clone(),
            heartbeats.clone(),
            pending,
        );
        runners.push((cfg.name.clone(), runner));
    }
    Ok(Prepared {
        runners,
        routes,
        outbox,
        topics,
    })
}

impl Prepared {
    /// Each box's link, for health reports.
    pub fn links(&self) -> Vec<(String, Arc<crate::link_status::LinkStatus>)> {
        self.runners
            .iter()
            .map(|(name, r)| (name.clone(), r.link()))
            .collect()
    }

    /// What each box has said of itself (see `BoxRunner::watch_described`).
    pub fn described(
        &self,
    ) -> Vec<(
        String,
        tokio::sync::watch::Receiver<Option<serde_json::Value>>,
    )> {
        self.runners
            .iter()
            .map(|(name, r)| (name.clone(), r.watch_described()))
            .collect()
    }

    /// Start every box's loop and the command router, each a critical task.
    pub fn spawn(
        self,
        incoming: mpsc::Receiver<Incoming>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        critical: &crate::critical::Critical,
    ) {
        for (name, runner) in self.runners {
            let what = format!("the play box {name} loop");
            critical.spawn(tracker, &what, &cancel, runner.run(cancel.clone()));
        }
        critical.spawn(
            tracker,
            "the play-box command router",
            &cancel,
            route_commands(
                incoming,
                self.routes,
                self.outbox,
                self.topics,
                cancel.clone(),
            ),
        );
    }
}

/// The box name and command level of a `{prefix}{name}/{kind}/set` topic; `None` for
/// any other topic. `prefix` is `{base}/playbox/`.
pub fn command_topic<'a>(topic: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(prefix)?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(kind), Some("set"), None) => Some((name, kind)),
        _ => None,
    }
}

/// Check each command message and hand it to its box. A bad or oversized one is refused
/// on the box's `…/error` topic here and never reaches the box.
async fn route_commands(
    mut incoming: mpsc::Receiver<Incoming>,
    routes: HashMap<String, Arc<Pending>>,
    outbox: Arc<Outbox>,
    topics: Topics,
    cancel: CancellationToken,
) {
    let prefix = format!("{}/playbox/", topics.base());
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = incoming.recv() => match m { Some(m) => m, None => return },
        };
        let Some((name, kind)) = command_topic(&msg.topic, &prefix) else {
            continue;
        };
        let Some(pending) = routes.get(name) else {
            continue;
        };
        if msg.retain {
            // A retained command would be replayed at every subscribe: act on live ones only.
            pending.ignore(name, &msg.topic, "a retained command");
            continue;
        }
        let Some(kind) = CommandKind::from_topic(kind) else {
            pending.ignore(name, &msg.topic, "an unknown command");
            continue;
        };
        match Command::parse(kind, &msg.payload) {
            Ok(cmd) => pending.put(cmd),
            Err(e) => pending.refuse(&outbox, &topics, name, kind.name(), &msg.payload, &e),
        }
    }
}
