//! The project's own stand-ins for the things bvcsp2mqtt talks to — a BVCSP server, NovaStar
//! play boxes, an MQTT broker (embedded rumqttd, or a Mosquitto it launches) — and the
//! benchmark and test helpers built on them. The tests, the demo and the benchmark use them
//! over real sockets; the packaged daemon is built without this crate.

pub mod alarm_history;
pub mod bench;
pub mod broker;
pub mod bvcsp;
pub mod cert;
pub mod mosquitto;
pub mod playbox;
pub mod protocol;

pub use protocol::Stream;

use std::time::{Duration, Instant};

/// Poll `ready` every 10 ms until it holds; panic naming `what` after `deadline`. The
/// deadline is on the wall clock, so it also works under a paused tokio clock.
pub async fn eventually(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !ready() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
