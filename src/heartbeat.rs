//! Liveness of the long-lived loops, for the systemd watchdog. Each loop says by when it
//! will next show a sign of life; the watchdog is petted only while none is overdue.
//! Deadlines are `tokio::time` instants, so the rules run under a paused clock in tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A loop that waits by design (for a token, for a gap to read back) still beats at
/// least this often.
pub const IDLE: Duration = Duration::from_secs(24 * 3600);
/// Added to every wait a loop announces: the time it takes to come round and beat again.
pub const SLACK: Duration = Duration::from_secs(30);

/// Each long-lived loop says by when it will next show a sign of life; the watchdog is
/// petted only while none is overdue. A loop that waits on purpose (a backoff, a token
/// that is not there yet) says so with a deadline past the wait.
#[derive(Debug, Default)]
pub struct Heartbeats {
    deadlines: Mutex<HashMap<String, Instant>>,
}

impl Heartbeats {
    pub fn beat(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let mut g = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        match g.get_mut(name) {
            Some(d) => *d = deadline,
            None => {
                g.insert(name.to_string(), deadline);
            }
        }
    }

    /// The loop has ended on purpose.
    pub fn remove(&self, name: &str) {
        self.deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Loops that are overdue.
    pub fn stale(&self) -> Vec<String> {
        self.stale_at(Instant::now())
    }

    /// Loops that will be overdue at `now`.
    pub fn stale_at(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, d)| **d < now)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }
}

/// A loop that turns per message beats at most this often: a beat takes a lock and hashes
/// the loop's name, and at full speed such a loop turns several times per message.
pub const PACE: Duration = Duration::from_secs(1);

/// The beats of one loop that turns per message, [`PACE`]d: one a second at most, each
/// promising `within` (which must be longer than `PACE`; the deadline a skipped beat
/// leaves in place is then at most `PACE` short of the one it would have set).
#[derive(Debug)]
pub struct PacedBeat {
    name: &'static str,
    last: Option<Instant>,
}

impl PacedBeat {
    pub fn new(name: &'static str) -> PacedBeat {
        PacedBeat { name, last: None }
    }

    /// Beat, unless this loop beat less than [`PACE`] ago.
    pub fn beat(&mut self, heartbeats: &Heartbeats, within: Duration) {
        let now = Instant::now();
        if self.last.is_none_or(|t| now.duration_since(t) >= PACE) {
            heartbeats.beat(self.name, within);
            self.last = Some(now);
        }
    }

    /// Beat whenever it was last (before a wait of a length of its own).
    pub fn beat_now(&mut self, heartbeats: &Heartbeats, within: Duration) {
        heartbeats.beat(self.name, within);
        self.last = Some(Instant::now());
    }
}

/// Registers a loop's heartbeat for as long as it lives.
pub struct BeatGuard {
    heartbeats: Arc<Heartbeats>,
    name: String,
}

impl BeatGuard {
    pub fn new(heartbeats: &Arc<Heartbeats>, name: &str, first: Duration) -> BeatGuard {
        heartbeats.beat(name, first);
        BeatGuard {
            heartbeats: heartbeats.clone(),
            name: name.to_string(),
        }
    }
}

impl Drop for BeatGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A loop that died is no sign of life: the watchdog stops being fed.
            self.heartbeats.beat(&self.name, Duration::ZERO);
        } else {
            self.heartbeats.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_stale_and_can_be_removed() {
        let h = Heartbeats::default();
        h.beat("a", Duration::from_secs(60));
        h.beat("b", Duration::ZERO);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.stale(), vec!["b"]);
        h.beat("b", Duration::from_secs(60));
        assert!(h.stale().is_empty());
        h.beat("c", Duration::ZERO);
        h.remove("c");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(h.stale().is_empty());
        // A deadline passes on the (paused) tokio clock, not the wall clock.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(h.stale(), vec!["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_beat_moves_the_deadline_once_a_second_at_most() {
        let h = Heartbeats::default();
        let mut beat = PacedBeat::new("mqtt");
        let within = Duration::from_secs(20);
        beat.beat(&h, within);
        // Turned again and again within the second: the first deadline stands.
        tokio::time::advance(Duration::from_millis(900)).await;
        beat.beat(&h, within);
        tokio::time::advance(Duration::from_millis(19_200)).await;
        assert_eq!(h.stale(), vec!["mqtt"], "20 s after the first beat");
        // A second after the last beat that counted, it counts again.
        beat.beat(&h, within);
        assert!(h.stale().is_empty());
        // A beat of its own length counts whenever it comes.
        tokio::time::advance(Duration::from_millis(100)).await;
        beat.beat_now(&h, Duration::from_secs(100));
        tokio::time::advance(Duration::from_secs(99)).await;
        assert!(h.stale().is_empty());
    }
}
