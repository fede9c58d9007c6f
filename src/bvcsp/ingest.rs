//! Frames into messages: one frame's text split into events, normalised, deduplicated
//! (alarms by identity, other events across the two sockets of a reopen) and pushed to
//! the outbox; malformed frames counted and logged at a bounded rate.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::{self, Normalised};
use super::{BvcspLink, Stream};

/// Ids remembered per socket while a reopen overlaps two sockets.
const OVERLAP_IDS: usize = 4096;
/// Distinct frame shapes logged per stream before going quiet.
const MAX_SHAPES: usize = 32;

/// Frames seen on both sockets while a reopen overlaps them: the same frame read on the
/// old and the new socket is one event. Only across the two sockets: a frame repeated on
/// one socket (online → offline → online within a second) is a real change, never dropped.
#[derive(Default)]
pub(super) struct ReopenOverlap {
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

    pub fn clear(&mut self) {
        self.live.clear();
        self.draining.clear();
    }
}

/// Per-stream memory: the reopen overlap, shapes seen, malformed-frame log limit.
pub(super) struct StreamMemory {
    pub overlap: ReopenOverlap,
    /// A make-before-break reopen is in progress: two sockets deliver.
    pub overlapping: bool,
    shapes: HashSet<u64>,
    last_malformed_log: Option<Instant>,
    suppressed: u64,
}

impl StreamMemory {
    pub fn new() -> Self {
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
pub(super) enum FromSocket {
    Live,
    Draining,
}

pub(super) async fn ingest_message(
    ctx: &BvcspLink,
    stream: Stream,
    memory: &mut StreamMemory,
    socket: FromSocket,
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
    ctx: &BvcspLink,
    stream: Stream,
    memory: &mut StreamMemory,
    socket: FromSocket,
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
            user,
            malformed: problem,
        } = model::normalise(stream, value, received, &ctx.topics);
        if let Some(problem) = problem {
            malformed(ctx, stream, memory, problem);
        }
        let duplicate = match &alarm {
            Some(id) => !ctx.ledger.claim(id),
            None => {
                memory.overlapping
                    && memory
                        .overlap
                        .duplicate(&event_id, socket == FromSocket::Live)
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
        if let Some((id, online)) = user {
            ctx.registry.user_update(&id, online);
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

fn malformed(ctx: &BvcspLink, stream: Stream, memory: &mut StreamMemory, problem: &str) {
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
