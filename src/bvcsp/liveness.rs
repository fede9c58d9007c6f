//! Is a WebSocket still alive? An empty text frame and a Ping go out every
//! `keepalive_interval`; a socket not heard from for `pong_timeout` is dead. Time is
//! `tokio::time`, so the rules are tested under a paused clock.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// When the other side was last heard from, and the rule that calls it dead.
#[derive(Debug, Clone)]
pub(super) struct Liveness {
    last_heard: Instant,
    interval: Duration,
    timeout: Duration,
}

impl Liveness {
    /// A socket just opened counts as heard from now.
    pub fn new(interval: Duration, timeout: Duration) -> Liveness {
        Liveness {
            last_heard: Instant::now(),
            interval,
            timeout,
        }
    }

    /// A Pong: the other side answered now.
    pub fn pong(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Any other inbound frame proves the link alive too, though only as recently as a
    /// keepalive interval ago: a frame may have waited in a buffer (behind a full
    /// outbox), a Pong answers the last Ping.
    pub fn traffic(&mut self) {
        if let Some(recent) = Instant::now().checked_sub(self.interval) {
            self.last_heard = self.last_heard.max(recent);
        }
    }

    /// Not heard from for longer than the timeout.
    pub fn is_dead(&self) -> bool {
        self.last_heard.elapsed() > self.timeout
    }
}

/// The keepalive ticks: the first one interval after opening, then every interval; a
/// tick missed (the task was busy) is not made up in a burst.
pub(super) fn keepalive_ticks(interval: Duration) -> Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(20);
    const TIMEOUT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn keepalive_ticks_come_every_interval_after_the_first_interval() {
        let start = Instant::now();
        let mut tick = keepalive_ticks(INTERVAL);
        let mut at = Vec::new();
        for _ in 0..3 {
            tick.tick().await;
            at.push(Instant::now() - start);
        }
        assert_eq!(at, vec![INTERVAL, INTERVAL * 2, INTERVAL * 3]);
        // A busy task misses ticks: the next comes one interval after it looks again.
        tokio::time::advance(INTERVAL * 5 / 2).await;
        tick.tick().await;
        let late = Instant::now();
        tick.tick().await;
        assert_eq!(Instant::now() - late, INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_answers_pings_stays_alive() {
        let mut live = Liveness::new(INTERVAL, TIMEOUT);
        for _ in 0..30 {
            tokio::time::advance(INTERVAL).await;
            assert!(!live.is_dead());
            live.pong();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_socket_is_dead_just_past_the_pong_timeout() {
        let live = Liveness::new(INTERVAL, TIMEOUT);
        tokio::time::advance(TIMEOUT).await;
        assert!(!live.is_dead(), "at the timeout, not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(live.is_dead());
    }

    #[tokio::test(start_paused = true)]
    async fn frames_without_pongs_keep_it_alive_only_while_they_flow() {
        let mut live = Liveness::new(INTERVAL, TIMEOUT);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(10)).await;
            live.traffic();
            assert!(!live.is_dead());
        }
        // The frames stop: dead once the timeout has passed since one interval before
        // the last frame.
        tokio::time::advance(TIMEOUT - INTERVAL).await;
        assert!(!live.is_dead());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(live.is_dead());
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_frame_does_not_move_a_recent_pong_back() {
        let mut live = Liveness::new(INTERVAL, TIMEOUT);
        tokio::time::advance(Duration::from_secs(5)).await;
        live.pong();
        live.traffic();
        tokio::time::advance(TIMEOUT).await;
        assert!(!live.is_dead(), "heard at the pong, not an interval before");
    }
}
