//! The project's own stand-ins for the things it talks to: a BVCSP server and an MQTT
//! broker. The tests and the demo use them over real sockets.

pub mod alarm_history;
pub mod broker;
pub mod bvcsp;
pub mod cert;
pub mod mosquitto;
pub mod playbox;

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
