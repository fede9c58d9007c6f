//! The BVCSP upstream: login and token lifecycle, the device snapshot, the five
//! WebSocket event streams.

pub mod auth;
pub mod backfill;
pub mod devices;
mod ingest;
pub mod ledger;
mod liveness;
pub mod model;
pub mod rest;
pub mod session;
mod socket;
pub mod ws;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::Stream;

use crate::config::{BvcspConfig, HttpScheme, Secret};
use crate::link_status::LinkStatus;
use crate::mqtt::{Outbox, Topics};
use crate::tls::{self, Trust};

/// A token in use, with the generation that tells tokens apart even when the server
/// hands back the same string.
#[derive(Debug)]
pub struct Token {
    pub value: Secret,
    pub generation: u64,
    pub issued: Instant,
    pub lifetime: Duration,
}

/// Counters of one stream.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub events_in: AtomicU64,
    pub published: AtomicU64,
    pub malformed: AtomicU64,
    pub duplicates: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub reopens: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Stats {
    streams: [StreamStats; 5],
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub refreshes: AtomicU64,
    pub snapshots: AtomicU64,
    /// Unix milliseconds of the last event read (0: none yet).
    pub last_event_ms: AtomicU64,
    pub backfill: Arc<ledger::LedgerStats>,
    /// Updates of devices past `devices::MAX_DEVICES`, published but not tracked.
    pub devices_over_cap: Arc<AtomicU64>,
}

impl Stats {
    pub fn of(&self, s: Stream) -> &StreamStats {
        &self.streams[Stream::ALL.iter().position(|x| *x == s).unwrap_or(0)]
    }

    pub fn event_seen(&self) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_event_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the last event was read, RFC 3339.
    pub fn last_event_at(&self) -> Option<String> {
        let ms = self
            .last_event_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (ms > 0).then(|| {
            crate::timestamp::rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        })
    }

    /// Plain numbers, for health reports.
    pub fn to_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let streams: BTreeMap<&str, serde_json::Value> = Stream::ALL
            .iter()
            .map(|s| {
                let st = self.of(*s);
                (
                    s.name(),
                    serde_json::json!({
                        "events_in": st.events_in.load(Relaxed),
                        "published": st.published.load(Relaxed),
                        "malformed": st.malformed.load(Relaxed),
                        "duplicates": st.duplicates.load(Relaxed),
                        "connects": st.connects.load(Relaxed),
                        "reconnects": st.reconnects.load(Relaxed),
                        "reopens": st.reopens.load(Relaxed),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "logins": self.logins.load(Relaxed),
            "login_failures": self.login_failures.load(Relaxed),
            "refreshes": self.refreshes.load(Relaxed),
            "snapshots": self.snapshots.load(Relaxed),
            "devices_over_cap": self.devices_over_cap.load(Relaxed),
            "streams": streams,
            "backfill": self.backfill.to_json(),
        })
    }
}

/// One BVCSP server: what the session, the streams and the backfill share. They signal
/// each other only through [`ToSession`], [`ToStreams`] and `to_backfill`.
pub struct BvcspLink {
    pub cfg: Arc<BvcspConfig>,
    pub rest: rest::RestClient,
    pub ws: WsEndpoint,
    /// How tokens are passed on upgrades, once the server has shown what it accepts.
    pub token_transport: TokenTransportState,
    pub outbox: Arc<Outbox>,
    pub topics: Topics,
    /// The retained `bridge/link/bvcsp` status.
    pub status: Arc<LinkStatus>,
    pub registry: devices::Registry,
    /// Location topics already fed by the live stream (a snapshot must not go back in time).
    pub located: Mutex<HashSet<String>>,
    pub to_session: ToSession,
    pub to_streams: ToStreams,
    /// The alarm stream (re)connected, or the outbox has room again: read back the gap.
    pub to_backfill: Notify,
    /// Set when the bridge is killed rather than stopped: no goodbye to the server.
    pub skip_logout: AtomicBool,
    pub stats: Arc<Stats>,
    pub heartbeats: Arc<crate::heartbeat::Heartbeats>,
    /// Which alarms are published, and how far back a backfill must read.
    pub ledger: Arc<ledger::AlarmLedger>,
}

/// Where the WebSocket streams are: the REST base with ws:// or wss://, and for wss://
/// the very same TLS policy as REST.
pub struct WsEndpoint {
    pub base: reqwest::Url,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What the streams and the backfill ask of the session.
pub struct ToSession {
    /// The generation of a token that was refused: log in again.
    relogin: mpsc::Sender<u64>,
    /// The online-status stream came back: take the device snapshot again.
    pub snapshot: Notify,
    /// The generation of the token the online-status socket is open with.
    pub online_ready: watch::Sender<u64>,
}

impl ToSession {
    /// Ask for a new login because the token of `generation` was refused. Requests
    /// beyond the queue are dropped: one login answers them all.
    pub fn ask_relogin(&self, generation: u64) {
        let _ = self.relogin.try_send(generation);
    }
}

/// What the session (and any stream that gets through) tells the streams.
pub struct ToStreams {
    /// The token in use: each new one reopens every stream.
    pub token: watch::Sender<Option<Arc<Token>>>,
    /// Bumped whenever a login or a stream gets through: the server is reachable, so
    /// streams still backing off try again at once.
    pub reachable: watch::Sender<u64>,
}

/// Whether tokens go in `?token=` because the server withholds the subprotocol echo.
#[derive(Debug, Default)]
pub struct TokenTransportState {
    query: AtomicBool,
    warned: AtomicBool,
}

impl TokenTransportState {
    pub fn in_query(&self) -> bool {
        self.query.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Use `?token=` from now on; true the first time (to warn once).
    pub fn switch_to_query(&self) -> bool {
        self.query.store(true, std::sync::atomic::Ordering::Relaxed);
        !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BvcspSetupError {
    #[error("bvcsp.tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("storage.dir: {0}")]
    Ledger(#[from] ledger::LedgerError),
}

impl BvcspLink {
    pub fn new(
        cfg: Arc<BvcspConfig>,
        storage_dir: &std::path::Path,
        outbox: Arc<Outbox>,
        topics: Topics,
        stats: Arc<Stats>,
        heartbeats: Arc<crate::heartbeat::Heartbeats>,
    ) -> Result<(Arc<BvcspLink>, mpsc::Receiver<u64>), BvcspSetupError> {
        let https = cfg.url.scheme() == HttpScheme::Https;
        let tls_cfg = if https {
            let t = &cfg.tls;
            let pin = t.fingerprint_sha256.as_ref().map(|f| f.sha256());
            let trust = Trust::from_options(t.insecure, pin, t.ca_file.as_deref());
            if matches!(trust, Trust::Insecure) {
                tracing::warn!(
                    "bvcsp.tls.insecure = true: the BVCSP server's certificate is NOT verified"
                );
            }
            Some(tls::client_config(&trust, None)?)
        } else {
            None
        };
        let mut ws_base = cfg.base_url().clone();
        let scheme = if https { "wss" } else { "ws" };
        ws_base
            .set_scheme(scheme)
            .expect("ws and wss are valid schemes");
        let rest = rest::RestClient::new(&cfg, tls_cfg.clone())?;
        let streams: Vec<&str> = cfg.streams.iter().map(|s| s.name()).collect();
        let status = LinkStatus::new("bvcsp", topics.link_bvcsp(), outbox.clone(), &streams);
        if cfg.token_transport == crate::config::TokenTransport::Query {
            status.set_detail("token_transport", serde_json::json!("query"));
        }
        let (relogin, relogin_rx) = mpsc::channel(16);
        let ledger = ledger::AlarmLedger::open(
            cfg.backfill.then_some(storage_dir),
            ledger::unix_now(),
            cfg.backfill_max_age,
            stats.backfill.clone(),
        )?;
        let link = BvcspLink {
            ledger: Arc::new(ledger),
            to_backfill: Notify::new(),
            ws: WsEndpoint {
                base: ws_base,
                tls: tls_cfg.map(Arc::new),
            },
            token_transport: TokenTransportState::default(),
            rest,
            outbox,
            topics,
            status,
            registry: devices::Registry::counting(stats.devices_over_cap.clone()),
            located: Mutex::new(HashSet::new()),
            to_session: ToSession {
                relogin,
                snapshot: Notify::new(),
                online_ready: watch::channel(0).0,
            },
            to_streams: ToStreams {
                token: watch::channel(None).0,
                reachable: watch::channel(0).0,
            },
            skip_logout: AtomicBool::new(false),
            stats,
            heartbeats,
            cfg,
        };
        Ok((Arc::new(link), relogin_rx))
    }
}

/// Run the BVCSP link until `cancel`: then close the streams, log out, return. Every
/// loop under it is critical: one that ends on its own is reported to `critical`.
pub async fn run(
    ctx: Arc<BvcspLink>,
    relogin_rx: mpsc::Receiver<u64>,
    cancel: CancellationToken,
    critical: crate::critical::Critical,
) {
    let streams_cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (index, stream) in ctx.cfg.streams.iter().copied().enumerate() {
        critical.spawn(
            &tracker,
            &format!("the {} stream", stream.name()),
            &streams_cancel,
            ws::run_stream(ctx.clone(), stream, index, streams_cancel.clone()),
        );
    }
    if !ctx.cfg.backfill {
        ctx.status.set_detail("backfill", serde_json::json!("off"));
    } else if ctx.cfg.streams.contains(&Stream::Alarm) {
        critical.spawn(
            &tracker,
            "the alarm backfill",
            &streams_cancel,
            backfill::run(ctx.clone(), streams_cancel.clone()),
        );
        critical.spawn(
            &tracker,
            "the outbox-full gap watch",
            &streams_cancel,
            gap_while_full(ctx.clone(), streams_cancel.clone()),
        );
    }
    tracker.close();
    let saver_cancel = CancellationToken::new();
    let saver = TaskTracker::new();
    critical.spawn(
        &saver,
        "the alarm ledger saver",
        &saver_cancel,
        ctx.ledger
            .clone()
            .run_saver(ctx.outbox.clone(), saver_cancel.clone()),
    );
    saver.close();
    let last = session::run_session(&ctx, relogin_rx, &cancel).await;
    streams_cancel.cancel();
    tracker.wait().await;
    // Every alarm read is in the outbox now: the ledger's last save says so.
    saver_cancel.cancel();
    saver.wait().await;
    if let Some(token) = last
        && !ctx.skip_logout.load(std::sync::atomic::Ordering::Relaxed)
    {
        session::logout(&ctx, &token).await;
    }
    ctx.status.stopped();
}

/// While the outbox is full or cannot write, reading pauses and the server may drop what
/// it cannot send: that is a gap in the alarm stream like any other, read back once
/// reading resumes.
async fn gap_while_full(ctx: Arc<BvcspLink>, cancel: CancellationToken) {
    if !ctx.cfg.backfill {
        return;
    }
    let mut full = ctx.outbox.paused();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = full.wait_for(|f| *f) => if r.is_err() { return },
        }
        ctx.ledger.set_paused(true);
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = full.wait_for(|f| !*f) => if r.is_err() { return },
        }
        ctx.ledger.set_paused(false);
        ctx.to_backfill.notify_one();
    }
}
