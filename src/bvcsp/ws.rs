//! One WebSocket event stream: connect → run → back off, forever.
//!
//! While running, one task `select!`s over cancellation, the keepalive tick (an empty
//! text frame and a Ping every `keepalive_interval`; no Pong for `pong_timeout` means the
//! link is dead), the next frame, token changes and, on the location stream, new devices
//! to subscribe. A new token reopens the stream make-before-break: the new socket is
//! opened first and the old one is still read for a moment after the swap, so nothing
//! is lost in between; a frame read on both gets the same `event_id` and is dropped once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ingest::StreamMemory;
use super::socket::{SocketEnd, run_socket};
use super::{BvcspLink, Stream, Token};
use crate::config::TokenTransport;
use crate::recovery::{Classify, Recovery};
use crate::retry::{Backoff, Policy};

pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest message accepted from upstream.
const MAX_MESSAGE: usize = 8 << 20;
/// The WebSocket read buffer (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 16 << 10;

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
pub async fn connect(ctx: &BvcspLink, stream: Stream, token: &Token) -> Result<Ws, ConnectError> {
    let query = ctx.cfg.token_transport == TokenTransport::Query || ctx.token_transport.in_query();
    let mut url = ctx.ws.base.clone();
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
    // tungstenite zero-fills its read buffer before every read: at the default 128 KiB
    // that was a third of the bridge's instructions per alarm (callgrind). Frames are a
    // few hundred bytes; a larger one is read in more, smaller reads.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let connector = ctx.ws.tls.clone().map(Connector::Rustls);
    let attempt =
        tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector);
    match tokio::time::timeout(ctx.cfg.request_timeout, attempt).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(classify(e)),
    }
}

/// Switch this server to `?token=` for the rest of the process, warning once.
pub(super) fn fall_back_to_query(ctx: &BvcspLink) {
    if ctx.token_transport.switch_to_query() {
        warn!(
            "BVCSP server does not echo Sec-WebSocket-Protocol; using ?token= instead \
             (set bvcsp.token_transport = \"query\" to skip the attempt)"
        );
        ctx.status
            .set_detail("token_transport", serde_json::json!("query"));
    }
}

/// The stream's connect → run → back off loop.
pub async fn run_stream(
    ctx: Arc<BvcspLink>,
    stream: Stream,
    index: usize,
    cancel: CancellationToken,
) {
    let name = stream.name();
    let mut token_rx = ctx.to_streams.token.subscribe();
    let mut reachable = ctx.to_streams.reachable.subscribe();
    let mut backoff = Backoff::new(Policy::stream_reconnect(&ctx.cfg));
    let mut memory = StreamMemory::new();
    let mut first_connect = true;
    let _alive = crate::heartbeat::BeatGuard::new(&ctx.heartbeats, name, crate::heartbeat::IDLE);
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
        ctx.heartbeats.beat(name, crate::heartbeat::IDLE);
        let token = tokio::select! {
            _ = cancel.cancelled() => return,
            t = wait_for_token(&mut token_rx) => match t { Some(t) => t, None => return },
        };
        ctx.heartbeats
            .beat(name, ctx.cfg.request_timeout + crate::heartbeat::SLACK);
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
                ctx.to_streams.reachable.send_modify(|n| *n += 1);
                reachable.borrow_and_update();
                ctx.status.set_stream(name, true);
                ctx.stats
                    .of(stream)
                    .connects
                    .fetch_add(1, Ordering::Relaxed);
                if stream == Stream::OnlineStatus {
                    ctx.to_session.online_ready.send_replace(token.generation);
                    // Reconcile what was missed while the stream was down.
                    if !first_connect {
                        ctx.to_session.snapshot.notify_one();
                    }
                }
                if stream == Stream::Alarm {
                    // What was raised while the stream was closed is read back.
                    ctx.ledger.stream_up();
                    ctx.to_backfill.notify_one();
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
                ctx.status.set_stream(name, false);
                backoff.lost();
                if stream == Stream::Alarm {
                    ctx.ledger.stream_down();
                }
                match end {
                    SocketEnd::Cancelled => return,
                    SocketEnd::Lost(reason) => {
                        warn!(stream = name, "stream lost: {reason}; reconnecting")
                    }
                }
            }
            Err(ConnectError::NoSubprotocol) if !ctx.token_transport.in_query() => {
                fall_back_to_query(&ctx);
                continue;
            }
            Err(e) => {
                ctx.status.set_stream(name, false);
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
                        ctx.to_session.ask_relogin(token.generation);
                        wait_for_new_token = true;
                    }
                    // No such stream path: it does not fix itself quickly.
                    Recovery::GiveUp => {
                        let d = crate::retry::not_found_retry(&ctx.cfg);
                        ctx.heartbeats.beat(name, d + crate::heartbeat::SLACK);
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
        ctx.heartbeats.beat(name, delay + crate::heartbeat::SLACK);
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
