//! One open WebSocket of a stream, until it is lost or cancelled: keepalive and
//! dead-link detection, frames in, make-before-break reopens on a new token (the old
//! socket is still read for [`crate::retry::DRAIN_GRACE`] after the swap), and on the location stream
//! GPS subscriptions for new devices.
//!
//! [`run_socket`] is one `select!` over the events below; each arm is one method of
//! [`SocketRun`], which holds what the events change.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ingest::{FromSocket, StreamMemory, ingest_message};
use super::liveness::{Liveness, keepalive_ticks};
use super::ws::{ConnectError, Ws, connect, fall_back_to_query};
use super::{BvcspLink, Stream, Token};
use crate::recovery::{Classify, Recovery};

/// GPS subscribe frames carry at most this many ids.
const SUBSCRIBE_CHUNK: usize = 200;
/// Frames already buffered that are taken in one go (and committed together).
const BATCH_FRAMES: usize = 256;

type Reopening = Pin<Box<dyn Future<Output = (Arc<Token>, Result<Ws, ConnectError>)> + Send>>;

/// How a socket's run ended.
pub(super) enum SocketEnd {
    Cancelled,
    /// Lost, and why (for the log): the stream reconnects.
    Lost(SocketLost),
}

/// Why a stream's socket was lost.
#[derive(Debug, thiserror::Error)]
pub(super) enum SocketLost {
    #[error("no Pong for {0:?}: link is dead")]
    NoPong(Duration),
    #[error("keepalive failed: {0}")]
    Keepalive(#[source] WsError),
    #[error("ping failed: {0}")]
    Ping(#[source] WsError),
    #[error("closed by server (code {code}, {reason:?})")]
    ClosedWith { code: u16, reason: String },
    #[error("closed by server")]
    Closed,
    #[error("{0}")]
    Read(#[source] WsError),
    #[error("connection closed")]
    Eof,
    #[error("cannot send GPS subscription: {0}")]
    Subscribe(#[source] WsError),
}

/// The socket frames are read from and sent on, with the token it was opened with.
struct OpenSocket {
    ws: Ws,
    token: Arc<Token>,
    /// Devices this (location) socket is subscribed to.
    subscribed: HashSet<String>,
    liveness: Liveness,
}

/// The socket replaced by a reopen, still read until `until`.
struct DrainingSocket {
    ws: Ws,
    until: Instant,
}

/// Everything one socket's events change.
struct SocketRun<'a> {
    ctx: &'a Arc<BvcspLink>,
    stream: Stream,
    /// The stream's place in the connect order: reopens are staggered by it.
    index: usize,
    token_rx: &'a mut watch::Receiver<Option<Arc<Token>>>,
    memory: &'a mut StreamMemory,
    cancel: &'a CancellationToken,
    live: OpenSocket,
    draining: Option<DrainingSocket>,
    /// When to open a socket with the newest token.
    reopen_at: Option<Instant>,
    reopening: Option<Reopening>,
    /// When to send the GPS subscription for the devices added meanwhile.
    subscribe_at: Option<Instant>,
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn reopen_done(reopening: &mut Option<Reopening>) -> (Arc<Token>, Result<Ws, ConnectError>) {
    match reopening {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

async fn draining_frame(
    draining: &mut Option<DrainingSocket>,
) -> Option<Result<WsMessage, WsError>> {
    match draining {
        Some(d) => d.ws.next().await,
        None => std::future::pending().await,
    }
}

/// Run `ws` until it is lost or `cancel`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_socket(
    ctx: &Arc<BvcspLink>,
    stream: Stream,
    index: usize,
    ws: Ws,
    token: Arc<Token>,
    token_rx: &mut watch::Receiver<Option<Arc<Token>>>,
    memory: &mut StreamMemory,
    cancel: &CancellationToken,
) -> SocketEnd {
    let cfg = &ctx.cfg;
    let mut run = SocketRun {
        ctx,
        stream,
        index,
        token_rx,
        memory,
        cancel,
        live: OpenSocket::new(ws, token, &ctx.cfg),
        draining: None,
        reopen_at: None,
        reopening: None,
        subscribe_at: None,
    };
    let mut added = ctx.registry.watch_added();
    let mut tick = keepalive_ticks(cfg.keepalive_interval);
    // The token may have changed while this socket was being opened.
    if run.newer_token_than(run.live.token.generation) {
        run.reopen_at = Some(Instant::now());
    }
    if stream == Stream::Location
        && let Err(end) = run.subscribe_new().await
    {
        return end;
    }
    loop {
        let step = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(run.close().await),
            _ = tick.tick() => run.keepalive().await,
            changed = run.token_rx.changed() => run.token_changed(changed.is_ok()),
            _ = sleep_opt(run.reopen_at) => {
                run.start_reopen();
                Ok(())
            }
            (token, result) = reopen_done(&mut run.reopening), if run.reopening.is_some() => {
                run.reopened(token, result).await
            }
            _ = sleep_opt(run.draining.as_ref().map(|d| d.until)) => {
                run.end_drain().await;
                Ok(())
            }
            frame = draining_frame(&mut run.draining), if run.draining.is_some() => {
                run.draining_frame(frame).await;
                Ok(())
            }
            frame = run.live.ws.next() => run.live_frames(frame).await,
            r = added.changed(), if stream == Stream::Location => {
                if r.is_ok() && run.subscribe_at.is_none() {
                    run.subscribe_at = Some(Instant::now() + cfg.gps_batch_window);
                }
                Ok(())
            }
            _ = sleep_opt(run.subscribe_at) => {
                run.subscribe_at = None;
                run.subscribe_new().await
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

impl OpenSocket {
    fn new(ws: Ws, token: Arc<Token>, cfg: &crate::config::BvcspConfig) -> OpenSocket {
        OpenSocket {
            ws,
            token,
            subscribed: HashSet::new(),
            liveness: Liveness::new(cfg.keepalive_interval, cfg.pong_timeout),
        }
    }
}

impl SocketRun<'_> {
    /// Marks the token seen, so `token_changed` does not stagger a reopen already due.
    fn newer_token_than(&mut self, generation: u64) -> bool {
        self.token_rx
            .borrow_and_update()
            .as_ref()
            .is_some_and(|t| t.generation != generation)
    }

    /// Cancelled: close both sockets.
    async fn close(&mut self) -> SocketEnd {
        let _ = self.live.ws.close(None).await;
        if let Some(mut old) = self.draining.take() {
            let _ = old.ws.close(None).await;
        }
        SocketEnd::Cancelled
    }

    /// The keepalive tick: is the link dead? If not, an empty text frame and a Ping.
    async fn keepalive(&mut self) -> Result<(), SocketEnd> {
        let cfg = &self.ctx.cfg;
        self.ctx.heartbeats.beat(
            self.stream.name(),
            cfg.keepalive_interval * 3 + cfg.request_timeout,
        );
        if self.live.liveness.is_dead() {
            // Pongs may be sitting unread behind frames that waited for a full outbox:
            // read what is already buffered before calling the link dead.
            while let Some(Some(Ok(msg))) = self.live.ws.next().now_or_never() {
                match msg {
                    WsMessage::Pong(_) => self.live.liveness.pong(),
                    other => {
                        self.live.liveness.traffic();
                        self.ingest(FromSocket::Live, other).await;
                    }
                }
            }
            if self.live.liveness.is_dead() {
                return Err(SocketEnd::Lost(SocketLost::NoPong(cfg.pong_timeout)));
            }
        }
        if let Err(e) = self.live.ws.feed(WsMessage::text("")).await {
            return Err(SocketEnd::Lost(SocketLost::Keepalive(e)));
        }
        let ping = WsMessage::Ping(Bytes::from_static(b"bvcsp2mqtt"));
        if let Err(e) = self.live.ws.send(ping).await {
            return Err(SocketEnd::Lost(SocketLost::Ping(e)));
        }
        Ok(())
    }

    /// A new token: reopen with it, after this stream's stagger.
    fn token_changed(&mut self, open: bool) -> Result<(), SocketEnd> {
        if !open {
            return Err(SocketEnd::Cancelled);
        }
        let newer = self
            .token_rx
            .borrow_and_update()
            .as_ref()
            .is_some_and(|t| t.generation != self.live.token.generation);
        if newer && self.reopening.is_none() {
            let stagger = self.ctx.cfg.reopen_stagger.mul_f64(self.index as f64);
            self.reopen_at = Some(Instant::now() + stagger);
        }
        Ok(())
    }

    /// Open a second socket with the newest token; the current one keeps delivering.
    fn start_reopen(&mut self) {
        self.reopen_at = None;
        if let Some(token) = self.token_rx.borrow().clone() {
            let ctx = Arc::clone(self.ctx);
            let stream = self.stream;
            self.reopening = Some(Box::pin(async move {
                let r = connect(&ctx, stream, &token).await;
                (token, r)
            }));
        }
    }

    /// The reopen finished: swap sockets (the old one drains), or keep the current one.
    async fn reopened(
        &mut self,
        token: Arc<Token>,
        result: Result<Ws, ConnectError>,
    ) -> Result<(), SocketEnd> {
        self.reopening = None;
        let ctx = self.ctx;
        let stream = self.stream;
        match result {
            Ok(ws) => {
                debug!(
                    stream = stream.name(),
                    generation = token.generation,
                    "reopened with the new token"
                );
                let fresh = OpenSocket::new(ws, token, &ctx.cfg);
                let old = std::mem::replace(&mut self.live, fresh);
                let drain = DrainingSocket {
                    ws: old.ws,
                    until: Instant::now() + crate::retry::DRAIN_GRACE,
                };
                if let Some(mut older) = self.draining.replace(drain) {
                    let _ = older.ws.close(None).await;
                }
                self.memory.overlap.clear();
                self.memory.overlapping = true;
                ctx.stats.of(stream).reopens.fetch_add(1, Ordering::Relaxed);
                if stream == Stream::OnlineStatus {
                    ctx.to_session
                        .online_ready
                        .send_replace(self.live.token.generation);
                }
                if stream == Stream::Location {
                    self.subscribe_new().await?;
                }
                // A token newer still may have come meanwhile.
                if self.newer_token_than(self.live.token.generation) {
                    self.reopen_at = Some(Instant::now());
                }
            }
            Err(ConnectError::NoSubprotocol) if !ctx.token_transport.in_query() => {
                fall_back_to_query(ctx);
                self.reopen_at = Some(Instant::now());
            }
            Err(e) => match e.recovery() {
                Recovery::Relogin => {
                    // Refused because a newer token already replaced this one: use that.
                    if self.newer_token_than(token.generation) {
                        self.reopen_at = Some(Instant::now());
                    } else {
                        ctx.to_session.ask_relogin(token.generation);
                    }
                }
                recovery => {
                    warn!(
                        stream = stream.name(),
                        "reopening with the new token failed: {e}; keeping the current socket"
                    );
                    // A path that is not there (or a request that cannot be made) fails
                    // the same way every time: ask again only at the slowest rate.
                    let wait = match recovery {
                        Recovery::GiveUp | Recovery::WaitLong(_) => {
                            crate::retry::not_found_retry(&ctx.cfg)
                        }
                        Recovery::Retry | Recovery::Relogin => crate::retry::reopen_retry(&ctx.cfg),
                    };
                    self.reopen_at = Some(Instant::now() + wait);
                }
            },
        }
        Ok(())
    }

    /// The grace after a swap is over: close the old socket.
    async fn end_drain(&mut self) {
        if let Some(mut old) = self.draining.take() {
            let _ = old.ws.close(None).await;
        }
        self.memory.overlapping = false;
        self.memory.overlap.clear();
    }

    async fn draining_frame(&mut self, frame: Option<Result<WsMessage, WsError>>) {
        match frame {
            Some(Ok(msg)) => self.ingest(FromSocket::Draining, msg).await,
            _ => {
                self.draining = None;
                self.memory.overlapping = false;
                self.memory.overlap.clear();
            }
        }
    }

    /// A frame on the live socket, and the ones already read behind it: taken together,
    /// so their rows are committed together.
    async fn live_frames(
        &mut self,
        first: Option<Result<WsMessage, WsError>>,
    ) -> Result<(), SocketEnd> {
        let _batch = self.ctx.outbox.batch();
        let mut frame = Some(first);
        let mut taken = 0;
        while let Some(next) = frame {
            match next {
                Some(Ok(WsMessage::Pong(_))) => self.live.liveness.pong(),
                Some(Ok(WsMessage::Close(close))) => {
                    return Err(SocketEnd::Lost(match close {
                        Some(c) => SocketLost::ClosedWith {
                            code: u16::from(c.code),
                            reason: c.reason.as_str().to_string(),
                        },
                        None => SocketLost::Closed,
                    }));
                }
                Some(Ok(msg)) => {
                    self.live.liveness.traffic();
                    self.ingest(FromSocket::Live, msg).await;
                }
                Some(Err(e)) => return Err(SocketEnd::Lost(SocketLost::Read(e))),
                None => return Err(SocketEnd::Lost(SocketLost::Eof)),
            }
            taken += 1;
            frame = if taken < BATCH_FRAMES && !self.cancel.is_cancelled() {
                self.live.ws.next().now_or_never()
            } else {
                None
            };
        }
        Ok(())
    }

    async fn ingest(&mut self, from: FromSocket, msg: WsMessage) {
        ingest_message(self.ctx, self.stream, self.memory, from, msg, self.cancel).await;
    }

    /// Subscribe the location socket to every known device it is not yet subscribed to.
    async fn subscribe_new(&mut self) -> Result<(), SocketEnd> {
        let live = &mut self.live;
        let new: Vec<String> = self
            .ctx
            .registry
            .ids()
            .into_iter()
            .filter(|id| !live.subscribed.contains(id))
            .collect();
        for chunk in new.chunks(SUBSCRIBE_CHUNK) {
            let frame = serde_json::json!({"badd": true, "puid": chunk});
            if let Err(e) = live.ws.send(WsMessage::text(frame.to_string())).await {
                return Err(SocketEnd::Lost(SocketLost::Subscribe(e)));
            }
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
}
