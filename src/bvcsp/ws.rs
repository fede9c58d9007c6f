//! One WebSocket event stream: connect → run → back off, forever.
//!
//! While running, one task `select!`s over cancellation, the keepalive tick (an empty
//! text frame and a Ping every `keepalive_interval`; no Pong for `pong_timeout` means the
//! link is dead), the next frame, token changes and, on the location stream, new devices
//! to subscribe. A new token reopens the stream make-before-break: the new socket is
//! opened first and the old one is still read for a moment after the swap, so nothing
//! is lost in between; a frame read on both gets the same `event_id` and is dropped once.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::sleep_until;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::{self, Normalised};
use super::{Ctx, Stream, Token};
use crate::config::TokenTransport;
use crate::recovery::{Classify, Recovery};
use crate::retry::{Backoff, Policy};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = (Arc<Token>, Result<Ws, ConnectError>)> + Send>>;

/// Largest message accepted from upstream.
const MAX_MESSAGE: usize = 8 << 20;
/// After a make-before-break swap, the old socket is still read this long.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// GPS subscribe frames carry at most this many ids.
const SUBSCRIBE_CHUNK: usize = 200;
/// Ids remembered per socket while a reopen overlaps two sockets.
const OVERLAP_IDS: usize = 4096;
/// Frames already buffered that are taken in one go (and committed together).
const BATCH_FRAMES: usize = 256;
/// Distinct frame shapes logged per stream before going quiet.
const MAX_SHAPES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("server did not echo Sec-WebSocket-Protocol")]
    NoSubprotocol,
    #[error("server echoed a different subprotocol (length {0})")]
    WrongSubprotocol(usize),
    #[error("upgrade refused with HTTP {0}")]
    Rejected(u16),
    #[error("no such stream path (HTTP 404)")]
    NotFound,
    #[error("handshake timed out")]
    Timeout,
    #[error("upgrade refused with HTTP {0}")]
    Status(u16),
    #[error("invalid stream URL")]
    Url(#[source] tokio_tungstenite::tungstenite::error::UrlError),
    #[error("invalid stream URL for path {path}")]
    Request {
        path: String,
        #[source]
        source: WsError,
    },
    #[error("token is not a valid header value")]
    TokenHeader(#[source] tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue),
    /// Anything else the WebSocket layer reports (I/O, TLS, protocol), as it tells it.
    #[error(transparent)]
    Transport(WsError),
}

impl Classify for ConnectError {
    fn recovery(&self) -> Recovery {
        match self {
            ConnectError::Rejected(_) => Recovery::Relogin,
            ConnectError::NotFound => Recovery::GiveUp,
            // Invalid requests fail the same way every time; only a new token (for a
            // bad header) or a fixed configuration helps.
            ConnectError::Url(_) | ConnectError::Request { .. } => Recovery::GiveUp,
            ConnectError::NoSubprotocol
            | ConnectError::WrongSubprotocol(_)
            | ConnectError::Timeout
            | ConnectError::Status(_)
            | ConnectError::TokenHeader(_)
            | ConnectError::Transport(_) => Recovery::Retry,
        }
    }
}

fn classify(e: WsError) -> ConnectError {
    match e {
        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::NoSubProtocol,
        )) => ConnectError::NoSubprotocol,
        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::InvalidSubProtocol,
        )) => ConnectError::WrongSubprotocol(0),
        WsError::Http(resp) => match resp.status().as_u16() {
            401 | 403 => ConnectError::Rejected(resp.status().as_u16()),
            404 => ConnectError::NotFound,
            s => ConnectError::Status(s),
        },
        WsError::Url(e) => ConnectError::Url(e),
        other => ConnectError::Transport(other),
    }
}

/// Open `stream` with `token`, by the token transport currently in force for the server.
pub async fn connect(ctx: &Ctx, stream: Stream, token: &Token) -> Result<Ws, ConnectError> {
    let query =
        ctx.cfg.token_transport == TokenTransport::Query || ctx.query_mode.load(Ordering::Relaxed);
    let mut url = ctx.ws_base.clone();
    url.set_path(ctx.cfg.paths.stream(stream));
    if query {
        url.query_pairs_mut()
            .append_pair("token", token.value.expose());
    }
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|source| ConnectError::Request {
            path: ctx.cfg.paths.stream(stream).to_string(),
            source,
        })?;
    if !query {
        let mut v =
            HeaderValue::from_str(token.value.expose()).map_err(ConnectError::TokenHeader)?;
        v.set_sensitive(true);
        req.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, v);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let connector = ctx.ws_tls.clone().map(Connector::Rustls);
    let attempt =
        tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector);
    match tokio::time::timeout(ctx.cfg.request_timeout, attempt).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(classify(e)),
    }
}

/// Switch this server to `?token=` for the rest of the process, warning once.
fn fall_back_to_query(ctx: &Ctx) {
    ctx.query_mode.store(true, Ordering::Relaxed);
    if !ctx.query_warned.swap(true, Ordering::Relaxed) {
        warn!(
            "BVCSP server does not echo Sec-WebSocket-Protocol; using ?token= instead \
             (set bvcsp.token_transport = \"query\" to skip the attempt)"
        );
        ctx.link
            .set_detail("token_transport", serde_json::json!("query"));
    }
}

/// Frames seen on both sockets while a reopen overlaps them: the same frame read on the
/// old and the new socket is one event. Only across the two sockets: a frame repeated on
/// one socket (online → offline → online within a second) is a real change, never dropped.
#[derive(Default)]
struct ReopenOverlap {
    /// Ids read on the live and on the draining socket, not yet matched on the other.
    live: std::collections::HashMap<String, u32>,
    draining: std::collections::HashMap<String, u32>,
}

impl ReopenOverlap {
    /// True if `id`, read on the live (`from_live`) or the draining socket, was already
    /// read on the other one.
    fn duplicate(&mut self, id: &str, from_live: bool) -> bool {
        let (mine, other) = if from_live {
            (&mut self.live, &mut self.draining)
        } else {
            (&mut self.draining, &mut self.live)
        };
        if let Some(n) = other.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                other.remove(id);
            }
            return true;
        }
        if mine.len() < OVERLAP_IDS {
            *mine.entry(id.to_string()).or_default() += 1;
        }
        false
    }

    fn clear(&mut self) {
        self.live.clear();
        self.draining.clear();
    }
}

/// Per-stream memory: the reopen overlap, shapes seen, malformed-frame log limit.
struct StreamMemory {
    overlap: ReopenOverlap,
    /// A make-before-break reopen is in progress: two sockets deliver.
    overlapping: bool,
    shapes: HashSet<u64>,
    last_malformed_log: Option<Instant>,
    suppressed: u64,
}

impl StreamMemory {
    fn new() -> Self {
        StreamMemory {
            overlap: ReopenOverlap::default(),
            overlapping: false,
            shapes: HashSet::new(),
            last_malformed_log: None,
            suppressed: 0,
        }
    }
}

/// Which socket a frame came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Socket {
    Live,
    Draining,
}

enum End {
    Cancelled,
    Lost(String),
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The stream's connect → run → back off loop.
pub async fn run_stream(ctx: Arc<Ctx>, stream: Stream, index: usize, cancel: CancellationToken) {
    let name = stream.name();
    let mut token_rx = ctx.token.subscribe();
    let mut reachable = ctx.reachable.subscribe();
    let mut backoff = Backoff::new(Policy::stream_reconnect(&ctx.cfg));
    let mut memory = StreamMemory::new();
    let mut first_connect = true;
    let _alive =
        crate::heartbeat::BeatGuard::new(&ctx.heartbeats, name, Duration::from_secs(24 * 3600));
    let mut last_failure: Option<String> = None;
    let mut failures = 0u64;
    // Streams after the first open one after another, not all at once.
    if index > 0 {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wait_for_token(&mut token_rx) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ctx.cfg.reopen_stagger.mul_f64(index as f64)) => {}
        }
    }
    loop {
        // Waiting for a token is waiting by design (the session may be backing off).
        ctx.heartbeats.beat(name, Duration::from_secs(24 * 3600));
        let token = tokio::select! {
            _ = cancel.cancelled() => return,
            t = wait_for_token(&mut token_rx) => match t { Some(t) => t, None => return },
        };
        ctx.heartbeats
            .beat(name, ctx.cfg.request_timeout + Duration::from_secs(30));
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect(&ctx, stream, &token) => r,
        };
        let mut wait_for_new_token = false;
        match attempt {
            Ok(ws) => {
                if failures > 0 {
                    info!(stream = name, "connected after {failures} failed attempts");
                }
                failures = 0;
                last_failure = None;
                backoff.succeeded();
                // The server is back: streams still backing off try again now.
                ctx.reachable.send_modify(|n| *n += 1);
                reachable.borrow_and_update();
                ctx.link.set_stream(name, true);
                ctx.stats
                    .of(stream)
                    .connects
                    .fetch_add(1, Ordering::Relaxed);
                if stream == Stream::OnlineStatus {
                    ctx.online_ready.send_replace(token.generation);
                    // Reconcile what was missed while the stream was down.
                    if !first_connect {
                        ctx.snapshot_request.notify_one();
                    }
                }
                if stream == Stream::Alarm {
                    // What was raised while the stream was closed is read back.
                    ctx.ledger.stream_up();
                    ctx.backfill_request.notify_one();
                }
                first_connect = false;
                let end = run_socket(
                    &ctx,
                    stream,
                    index,
                    ws,
                    token,
                    &mut token_rx,
                    &mut memory,
                    &cancel,
                )
                .await;
                ctx.link.set_stream(name, false);
                backoff.lost();
                if stream == Stream::Alarm {
                    ctx.ledger.stream_down();
                }
                match end {
                    End::Cancelled => return,
                    End::Lost(reason) => {
                        warn!(stream = name, "stream lost: {reason}; reconnecting")
                    }
                }
            }
            Err(ConnectError::NoSubprotocol) if !ctx.query_mode.load(Ordering::Relaxed) => {
                fall_back_to_query(&ctx);
                continue;
            }
            Err(e) => {
                ctx.link.set_stream(name, false);
                failures += 1;
                let text = e.to_string();
                if last_failure.as_deref() != Some(&text) {
                    warn!(
                        stream = name,
                        path = ctx.cfg.paths.stream(stream),
                        "cannot open stream: {text}"
                    );
                    last_failure = Some(text);
                } else {
                    debug!(
                        stream = name,
                        "cannot open stream: {text} (attempt {failures})"
                    );
                }
                match e.recovery() {
                    Recovery::Relogin => {
                        let _ = ctx.relogin.try_send(token.generation);
                        wait_for_new_token = true;
                    }
                    // No such stream path: it does not fix itself quickly.
                    Recovery::GiveUp => {
                        let d = crate::retry::not_found_retry(&ctx.cfg);
                        ctx.heartbeats.beat(name, d + Duration::from_secs(30));
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(d) => {}
                        }
                        continue;
                    }
                    _ => {}
                }
            }
        }
        let delay = backoff.next_delay();
        ctx.stats
            .of(stream)
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
        ctx.heartbeats.beat(name, delay + Duration::from_secs(30));
        reachable.borrow_and_update();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            // Another stream got through, or a new login: the server is back, go now.
            _ = reachable.changed() => {}
            // A refused token is replaced by a re-login; go as soon as it arrives.
            _ = token_rx.changed(), if wait_for_new_token => {}
        }
    }
}

pub(super) async fn wait_for_token(
    rx: &mut watch::Receiver<Option<Arc<Token>>>,
) -> Option<Arc<Token>> {
    loop {
        if let Some(t) = rx.borrow_and_update().clone() {
            return Some(t);
        }
        rx.changed().await.ok()?;
    }
}

struct Live {
    ws: Ws,
    token: Arc<Token>,
    subscribed: HashSet<String>,
    last_pong: Instant,
}

#[allow(clippy::too_many_arguments)]
async fn run_socket(
    ctx: &Arc<Ctx>,
    stream: Stream,
    index: usize,
    ws: Ws,
    token: Arc<Token>,
    token_rx: &mut watch::Receiver<Option<Arc<Token>>>,
    memory: &mut StreamMemory,
    cancel: &CancellationToken,
) -> End {
    let cfg = &ctx.cfg;
    let mut live = Live {
        ws,
        token,
        subscribed: HashSet::new(),
        last_pong: Instant::now(),
    };
    let mut draining: Option<(Ws, Instant)> = None;
    let mut reopen_at: Option<Instant> = None;
    let mut reopening: Option<Connecting> = None;
    let mut added = ctx.registry.watch_added();
    let mut batch_at: Option<Instant> = None;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.keepalive_interval,
        cfg.keepalive_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The token may have changed while this socket was being opened.
    if token_rx
        .borrow_and_update()
        .as_ref()
        .is_some_and(|t| t.generation != live.token.generation)
    {
        reopen_at = Some(Instant::now());
    }

    if stream == Stream::Location
        && let Err(e) = subscribe_new(ctx, &mut live).await
    {
        return End::Lost(format!("cannot send GPS subscription: {e}"));
    }

    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let _ = live.ws.close(None).await;
                if let Some((mut old, _)) = draining.take() {
                    let _ = old.close(None).await;
                }
                return End::Cancelled;
            }
            _ = tick.tick() => {
                ctx.heartbeats.beat(stream.name(), cfg.keepalive_interval * 3 + cfg.request_timeout);
                if live.last_pong.elapsed() > cfg.pong_timeout {
                    // Pongs may be sitting unread behind frames that waited for a full
                    // outbox: read what is already buffered before calling the link dead.
                    while let Some(Some(Ok(msg))) = live.ws.next().now_or_never() {
                        match msg {
                            WsMessage::Pong(_) => live.last_pong = Instant::now(),
                            other => {
                                // Inbound traffic proves the link alive too.
                                if let Some(recent) = Instant::now().checked_sub(cfg.keepalive_interval) {
                                    live.last_pong = live.last_pong.max(recent);
                                }
                                ingest_message(ctx, stream, memory, Socket::Live, other, cancel).await
                            }
                        }
                    }
                    if live.last_pong.elapsed() > cfg.pong_timeout {
                        return End::Lost(format!("no Pong for {:?}: link is dead", cfg.pong_timeout));
                    }
                }
                if let Err(e) = live.ws.feed(WsMessage::text("")).await {
                    return End::Lost(format!("keepalive failed: {e}"));
                }
                if let Err(e) = live.ws.send(WsMessage::Ping(Bytes::from_static(b"bvcsp2mqtt"))).await {
                    return End::Lost(format!("ping failed: {e}"));
                }
            }
            changed = token_rx.changed() => {
                if changed.is_err() {
                    return End::Cancelled;
                }
                let newer = token_rx.borrow_and_update().as_ref().is_some_and(|t| t.generation != live.token.generation);
                if newer && reopening.is_none() {
                    reopen_at = Some(Instant::now() + cfg.reopen_stagger.mul_f64(index as f64));
                }
            }
            _ = sleep_opt(reopen_at) => {
                reopen_at = None;
                if let Some(token) = token_rx.borrow().clone() {
                    let ctx2 = Arc::clone(ctx);
                    reopening = Some(Box::pin(async move {
                        let r = connect(&ctx2, stream, &token).await;
                        (token, r)
                    }));
                }
            }
            (token, result) = async { reopening.as_mut().expect("guarded").await }, if reopening.is_some() => {
                reopening = None;
                match result {
                    Ok(ws) => {
                        debug!(stream = stream.name(), generation = token.generation, "reopened with the new token");
                        let old = std::mem::replace(
                            &mut live,
                            Live { ws, token, subscribed: HashSet::new(), last_pong: Instant::now() },
                        );
                        if let Some((mut older, _)) = draining.replace((old.ws, Instant::now() + DRAIN_GRACE)) {
                            let _ = older.close(None).await;
                        }
                        memory.overlap.clear();
                        memory.overlapping = true;
                        ctx.stats.of(stream).reopens.fetch_add(1, Ordering::Relaxed);
                        if stream == Stream::OnlineStatus {
                            ctx.online_ready.send_replace(live.token.generation);
                        }
                        if stream == Stream::Location
                            && let Err(e) = subscribe_new(ctx, &mut live).await
                        {
                            return End::Lost(format!("cannot send GPS subscription: {e}"));
                        }
                        // A token newer still may have come meanwhile.
                        if token_rx.borrow().as_ref().is_some_and(|t| t.generation != live.token.generation) {
                            reopen_at = Some(Instant::now());
                        }
                    }
                    Err(ConnectError::NoSubprotocol) if !ctx.query_mode.load(Ordering::Relaxed) => {
                        fall_back_to_query(ctx);
                        reopen_at = Some(Instant::now());
                    }
                    Err(ConnectError::Rejected(_)) => {
                        // Refused because a newer token already replaced this one: use that.
                        if token_rx.borrow().as_ref().is_some_and(|t| t.generation != token.generation) {
                            reopen_at = Some(Instant::now());
                        } else {
                            let _ = ctx.relogin.try_send(token.generation);
                        }
                    }
                    Err(e) => {
                        warn!(stream = stream.name(), "reopening with the new token failed: {e}; keeping the current socket");
                        reopen_at = Some(Instant::now() + crate::retry::reopen_retry(cfg));
                    }
                }
            }
            _ = sleep_opt(draining.as_ref().map(|d| d.1)) => {
                if let Some((mut old, _)) = draining.take() {
                    let _ = old.close(None).await;
                }
                memory.overlapping = false;
                memory.overlap.clear();
            }
            frame = async { draining.as_mut().expect("guarded").0.next().await }, if draining.is_some() => {
                match frame {
                    Some(Ok(msg)) => ingest_message(ctx, stream, memory, Socket::Draining, msg, cancel).await,
                    _ => {
                        draining = None;
                        memory.overlapping = false;
                        memory.overlap.clear();
                    }
                }
            }
            frame = live.ws.next() => {
                // Frames already read off the socket are taken together, so their rows
                // are committed together.
                let _batch = ctx.outbox.batch();
                let mut frame = Some(frame);
                let mut taken = 0;
                while let Some(next) = frame {
                    match next {
                        Some(Ok(WsMessage::Pong(_))) => live.last_pong = Instant::now(),
                        Some(Ok(WsMessage::Close(close))) => {
                            return End::Lost(match close {
                                Some(c) => format!("closed by server (code {}, {:?})", u16::from(c.code), c.reason.as_str()),
                                None => "closed by server".into(),
                            });
                        }
                        Some(Ok(msg)) => {
                            // Any inbound traffic also proves the link alive.
                            if let Some(recent) = Instant::now().checked_sub(cfg.keepalive_interval) {
                                live.last_pong = live.last_pong.max(recent);
                            }
                            ingest_message(ctx, stream, memory, Socket::Live, msg, cancel).await;
                        }
                        Some(Err(e)) => return End::Lost(e.to_string()),
                        None => return End::Lost("connection closed".into()),
                    }
                    taken += 1;
                    frame = if taken < BATCH_FRAMES && !cancel.is_cancelled() {
                        live.ws.next().now_or_never()
                    } else {
                        None
                    };
                }
            }
            r = added.changed(), if stream == Stream::Location => {
                if r.is_ok() && batch_at.is_none() {
                    batch_at = Some(Instant::now() + cfg.gps_batch_window);
                }
            }
            _ = sleep_opt(batch_at) => {
                batch_at = None;
                if let Err(e) = subscribe_new(ctx, &mut live).await {
                    return End::Lost(format!("cannot send GPS subscription: {e}"));
                }
            }
        }
    }
}

/// Subscribe the location socket to every known device it is not yet subscribed to.
async fn subscribe_new(ctx: &Ctx, live: &mut Live) -> Result<(), WsError> {
    let new: Vec<String> = ctx
        .registry
        .ids()
        .into_iter()
        .filter(|id| !live.subscribed.contains(id))
        .collect();
    for chunk in new.chunks(SUBSCRIBE_CHUNK) {
        let frame = serde_json::json!({"badd": true, "puid": chunk});
        live.ws.send(WsMessage::text(frame.to_string())).await?;
        live.subscribed.extend(chunk.iter().cloned());
    }
    if !new.is_empty() {
        debug!(
            "GPS subscription: {} new devices, {} in all",
            new.len(),
            live.subscribed.len()
        );
    }
    Ok(())
}

async fn ingest_message(
    ctx: &Ctx,
    stream: Stream,
    memory: &mut StreamMemory,
    socket: Socket,
    msg: WsMessage,
    cancel: &CancellationToken,
) {
    let text = match msg {
        WsMessage::Text(t) => t.as_str().to_owned(),
        WsMessage::Binary(b) => match String::from_utf8(b.to_vec()) {
            Ok(s) => s,
            Err(_) => {
                malformed(
                    ctx,
                    stream,
                    memory,
                    &format!("binary frame of {} bytes is not UTF-8", b.len()),
                );
                return;
            }
        },
        _ => return,
    };
    ingest_text(ctx, stream, memory, socket, &text, cancel).await;
}

/// Turn one frame's text into published messages.
async fn ingest_text(
    ctx: &Ctx,
    stream: Stream,
    memory: &mut StreamMemory,
    socket: Socket,
    text: &str,
    cancel: &CancellationToken,
) {
    let received = SystemTime::now();
    let values = match model::split_frame(text) {
        Ok(frame) => {
            if frame.skipped > 0 {
                malformed(
                    ctx,
                    stream,
                    memory,
                    &format!(
                        "a frame of {} events: the {} past {} are skipped",
                        frame.events.len() + frame.skipped,
                        frame.skipped,
                        model::MAX_EVENTS_PER_FRAME
                    ),
                );
            }
            frame.events
        }
        Err(e) => {
            malformed(
                ctx,
                stream,
                memory,
                &format!("frame of {} bytes is not JSON ({e})", text.len()),
            );
            return;
        }
    };
    let stats = ctx.stats.of(stream);
    ctx.stats.event_seen();
    for value in values {
        stats.events_in.fetch_add(1, Ordering::Relaxed);
        log_shape(stream, memory, &value);
        // An alarm is one (key, state), however often and however it arrives.
        let alarm = (stream == Stream::Alarm)
            .then(|| model::alarm_identity(&value))
            .flatten();
        let alarm_secs = alarm
            .as_ref()
            .and_then(|_| model::alarm_millis(&value))
            .map(|ms| ms.div_euclid(1000));
        let Normalised {
            event_id,
            messages,
            device,
            malformed: problem,
        } = model::normalise(stream, value, received, &ctx.topics);
        if let Some(problem) = problem {
            malformed(ctx, stream, memory, problem);
        }
        let duplicate = match &alarm {
            Some(id) => !ctx.ledger.claim(id),
            None => {
                memory.overlapping && memory.overlap.duplicate(&event_id, socket == Socket::Live)
            }
        };
        if duplicate {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            debug!(stream = stream.name(), event_id, "duplicate frame dropped");
            continue;
        }
        if let Some((id, online)) = device {
            ctx.registry.stream_update(&id, online);
        }
        if stream == Stream::Location
            && let Some(m) = messages.first()
        {
            let mut located = ctx.located.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded like the device registry; past it the snapshot may re-publish a
            // position older than a live one (retained state, not an event).
            if !located.contains(&m.topic) && located.len() < super::devices::MAX_DEVICES {
                located.insert(m.topic.clone());
            }
        }
        for m in messages {
            // A full outbox makes this wait; a stop must not wait behind it, nor lose
            // what was read: on a stop the rest of the frame goes in over the bound.
            ctx.outbox.push_or_stop(m, cancel).await;
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(id) = alarm {
            ctx.ledger.confirm(id, alarm_secs);
        }
    }
}

fn log_shape(stream: Stream, memory: &mut StreamMemory, value: &serde_json::Value) {
    if memory.shapes.len() >= MAX_SHAPES {
        return;
    }
    if memory.shapes.insert(model::shape_key(value)) {
        let shape = model::shape(value);
        let what = if memory.shapes.len() == 1 {
            "first frame"
        } else {
            "new frame shape"
        };
        info!(
            stream = stream.name(),
            "{what} on stream {}: fields [{shape}]",
            stream.name()
        );
    }
}

fn malformed(ctx: &Ctx, stream: Stream, memory: &mut StreamMemory, problem: &str) {
    ctx.stats
        .of(stream)
        .malformed
        .fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    if memory
        .last_malformed_log
        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
    {
        let extra = if memory.suppressed > 0 {
            format!(" ({} more since the last report)", memory.suppressed)
        } else {
            String::new()
        };
        warn!(stream = stream.name(), "malformed frame: {problem}{extra}");
        memory.last_malformed_log = Some(now);
        memory.suppressed = 0;
    } else {
        memory.suppressed += 1;
    }
}
