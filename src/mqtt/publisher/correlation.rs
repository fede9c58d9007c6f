//! Which outbox entry each packet id carries, so an entry is settled on the broker's
//! acknowledgement and not before.
//!
//! rumqttc has no per-publish completion, so acknowledgements are correlated here
//! (shared/notes/rust.md §4): requests leave rumqttc in FIFO order, so every request we
//! hand over is appended to `fifo`; `Outgoing::Publish(pkid)` with an unmapped pkid pops
//! the front and maps the pkid to it (a mapped pkid is a retransmission); `PubAck` (or
//! `PubComp` at QoS 2) settles the pkid. On a new broker session rumqttc silently drops
//! everything it held, so the correlation is cleared and the outbox rewound (`driver.rs`).

use std::collections::{HashMap, VecDeque};

use tracing::{debug, error};

use super::PublisherState;
use crate::mqtt::Message;

/// A publish handed to rumqttc and not yet settled: what it carries, so that settling
/// it does the right thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InFlight {
    /// The outbox entry with this id.
    Outbox(u64),
    /// The bridge's own retained `online`.
    Online,
    /// The bridge's own retained `offline`.
    Offline,
    /// A publish that bypassed the outbox (see [`super::Direct`]).
    Direct,
}

#[derive(Debug, Default)]
pub(super) struct Correlation {
    pub(super) connected: bool,
    /// Shutting down: the bridge's state is `offline` from now on.
    pub(super) closing: bool,
    /// Handed over, packet id not yet known.
    pub(super) fifo: VecDeque<InFlight>,
    /// Packet id -> what it carries, until acknowledged.
    pub(super) inflight: HashMap<u16, InFlight>,
    /// The message suspected of making the broker close the connection, and how often
    /// it has (see `driver::STRIKES`).
    pub(super) suspect: Option<(u64, u32)>,
}

impl Correlation {
    pub(super) fn in_hand(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }
}

impl PublisherState {
    /// Hand one request to rumqttc; the caller holds the correlation lock. The message is
    /// moved, not copied: rumqttc takes the topic as a `String` of its own, and the
    /// payload as the outbox's `Bytes` (`try_publish` would copy it into a `Vec`, once a
    /// message: 1.2 MB for a `bridge/devices` of 10 000). The request channel has room
    /// for the whole window and the few other requests (online/offline, subscribe,
    /// disconnect), so the send completes at once. Were it full, the pending send would
    /// be withdrawn when dropped here, but on a runtime with other threads rumqttc might
    /// take it first, and a publish sent but counted as refused would shift every packet
    /// id after it: that is a broken invariant, logged as an error. (Topics with
    /// wildcards, which `try_publish` would refuse, are dead letters: `feeder.rs`.)
    pub(super) fn hand_over(&self, corr: &mut Correlation, what: InFlight, msg: Message) -> bool {
        use futures_util::FutureExt;
        corr.fifo.push_back(what);
        let sent = self
            .client
            .publish_bytes(msg.topic, self.qos, msg.retain, msg.payload)
            .now_or_never();
        match sent {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                corr.fifo.pop_back();
                debug!("mqtt request channel refused a publish: {e}");
                false
            }
            None => {
                if cfg!(debug_assertions) {
                    panic!("the mqtt request channel is full");
                }
                corr.fifo.pop_back();
                error!("mqtt request channel is full: acknowledgements may be mismatched");
                false
            }
        }
    }
}

/// rumqttc wrote a publish with packet id `pkid` (0 at QoS 0).
pub(super) fn sent(state: &PublisherState, pkid: u16) {
    let mut corr = state.corr();
    if pkid == 0 {
        // QoS 0: done once written.
        if let Some(what) = corr.fifo.pop_front() {
            settle(state, what);
        }
    } else if !corr.inflight.contains_key(&pkid) {
        match corr.fifo.pop_front() {
            Some(what) => {
                corr.inflight.insert(pkid, what);
            }
            None => error!("mqtt publish {pkid} went out with nothing queued: correlation lost"),
        }
    }
}

/// The broker acknowledged packet id `pkid`.
pub(super) fn acknowledge(state: &PublisherState, pkid: u16) {
    let what = {
        let mut corr = state.corr();
        let what = corr.inflight.remove(&pkid);
        if let (Some(InFlight::Outbox(id)), Some((suspect, _))) = (what, corr.suspect)
            && id == suspect
        {
            corr.suspect = None;
        }
        what
    };
    match what {
        Some(what) => settle(state, what),
        None => debug!("acknowledgement for unknown packet id {pkid}"),
    }
}

fn settle(state: &PublisherState, what: InFlight) {
    match what {
        InFlight::Outbox(id) => state.outbox.ack(id),
        InFlight::Online | InFlight::Direct => {}
        InFlight::Offline => state.offline_acked.notify_one(),
    }
    state.progress.notify_one();
}
