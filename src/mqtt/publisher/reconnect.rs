//! After a failed connection: how long until the next attempt, by what the failure calls
//! for ([`crate::recovery`]), and what the log says about it. A network failure backs off
//! by [`Policy::mqtt_reconnect`]; refused credentials wait by [`Policy::mqtt_refused`]
//! (minutes: trying again soon cannot help) and say so once, as an error.

use std::time::Duration;

use rumqttc::ConnectionError;
use tracing::{debug, error, info, warn};

use crate::config::MqttConfig;
use crate::recovery::{Classify, Recovery};
use crate::retry::{Backoff, MQTT_PORT_PROBE, MQTT_PROBE_CONNECT, Policy};

pub(super) struct Reconnect {
    /// Unreachable, timed out, dropped: anything that may fix itself soon.
    network: Backoff,
    /// The broker refused the credentials.
    refused: Backoff,
    /// The last failure logged, so a repeat of it is not logged again (only every power
    /// of two attempts).
    last_error: Option<String>,
    /// Failed attempts since the last connection.
    repeats: u64,
}

impl Reconnect {
    pub(super) fn new(cfg: &MqttConfig) -> Reconnect {
        Reconnect {
            network: Backoff::new(Policy::mqtt_reconnect(cfg)),
            refused: Backoff::new(Policy::mqtt_refused(cfg)),
            last_error: None,
            repeats: 0,
        }
    }

    /// The broker accepted the connection: every policy starts over.
    pub(super) fn connected(&mut self, session_present: bool) {
        self.network.succeeded();
        self.refused.succeeded();
        if self.repeats > 1 {
            info!(
                "mqtt connected (session present: {session_present}) after {} failed attempts",
                self.repeats
            );
        } else {
            info!("mqtt connected (session present: {session_present})");
        }
        self.last_error = None;
        self.repeats = 0;
    }

    /// The connection failed with `e` (shown as `text`): the wait before the next attempt.
    /// When the broker's port was not accepting connections, the caller may cut the
    /// wait short as soon as it is ([`port_was_closed`]).
    pub(super) fn failed(&mut self, e: &ConnectionError, text: &str) -> Duration {
        self.repeats += 1;
        let repeats = self.repeats;
        // The broker is never given up on (the outbox waits for it): whatever is not a
        // refusal is retried by the network policy.
        let (refused, delay) = match e.recovery() {
            Recovery::WaitLong(_) => (true, self.refused.next_delay()),
            Recovery::Retry | Recovery::Relogin | Recovery::GiveUp => {
                (false, self.network.next_delay())
            }
        };
        if self.last_error.as_deref() != Some(text) {
            if refused {
                error!(
                    "mqtt: {text}: check mqtt.username and mqtt.password (or password_file) \
                     and the broker's access rules; next attempt in {}s",
                    delay.as_secs()
                );
            } else {
                warn!("mqtt connection failed: {text}; retrying with backoff");
            }
            self.last_error = Some(text.to_string());
        } else if repeats.is_power_of_two() {
            if refused {
                warn!("mqtt still refused after {repeats} attempts: {text}");
            } else {
                warn!("mqtt still unreachable after {repeats} attempts: {text}");
            }
        }
        delay
    }
}

/// The attempt failed before any MQTT was spoken because nothing accepted the TCP
/// connection (the broker is stopped, restarting, or its host is down): the one failure
/// a bare TCP connect can tell has ended. Anything later (TLS, a refused CONNECT, a drop
/// after accepting) is left to the backoff, or a broker that accepts and then fails
/// would be hammered.
pub(super) fn port_was_closed(e: &ConnectionError) -> bool {
    use std::io::ErrorKind;
    match e {
        ConnectionError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable
        ),
        _ => false,
    }
}

/// Returns once a TCP connection to `host:port` is accepted (and closes it at once),
/// trying every [`MQTT_PORT_PROBE`]. The name is resolved once per call (the caller
/// calls once per backoff wait, as often as it resolved before), so a long outage costs
/// no DNS traffic per probe; if it cannot be resolved, this never returns and the
/// backoff decides. One connect is pending at a time, for at most [`MQTT_PROBE_CONNECT`].
pub(super) async fn port_opens(host: &str, port: u16) {
    // `[::1]` in a URL is `::1` to a resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(MQTT_PROBE_CONNECT, tokio::net::lookup_host((host, port))).await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            _ => Vec::new(),
        };
    if addrs.is_empty() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(MQTT_PORT_PROBE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let attempt = tokio::net::TcpStream::connect(&addrs[..]);
        if let Ok(Ok(_stream)) = tokio::time::timeout(MQTT_PROBE_CONNECT, attempt).await {
            debug!("mqtt broker {host}:{port} accepts connections again: reconnecting now");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::ConnectReturnCode;

    const REFUSED: &str = "broker refused the connection: BadUserNamePassword";

    fn refused() -> ConnectionError {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
    }

    /// Attempts made in `span` when every one fails with `e`.
    async fn attempts_in(r: &mut Reconnect, e: &ConnectionError, span: Duration) -> usize {
        let end = tokio::time::Instant::now() + span;
        let mut attempts = 0;
        while tokio::time::Instant::now() < end {
            attempts += 1;
            tokio::time::sleep(r.failed(e, &e.to_string())).await;
        }
        attempts
    }

    #[tokio::test(start_paused = true)]
    async fn refused_credentials_wait_minutes_a_network_failure_does_not() {
        let cfg = MqttConfig::default();
        let mut r = Reconnect::new(&cfg);
        // Refused: a minute before the next attempt, then longer; not the network
        // policy's half a second.
        let first = r.failed(&refused(), REFUSED);
        assert_eq!(first, Duration::from_secs(60));
        tokio::time::advance(first).await;
        assert_eq!(r.failed(&refused(), REFUSED), Duration::from_secs(120));
        // Ten minutes of refusals are a handful of attempts, not dozens.
        let mut r = Reconnect::new(&cfg);
        let n = attempts_in(&mut r, &refused(), Duration::from_secs(600)).await;
        assert!(n <= 5, "{n} attempts in 10 minutes of refused credentials");
        // A network failure in between backs off by the network policy, from its start.
        let d = r.failed(&ConnectionError::NetworkTimeout, "timeout");
        assert!(d < Duration::from_secs(1), "{d:?}");
        let mut r = Reconnect::new(&cfg);
        let n = attempts_in(
            &mut r,
            &ConnectionError::NetworkTimeout,
            Duration::from_secs(600),
        )
        .await;
        assert!(n >= 12, "{n} attempts in 10 minutes of network failures");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_resets_the_refused_wait() {
        let mut r = Reconnect::new(&MqttConfig::default());
        for _ in 0..4 {
            r.failed(&refused(), REFUSED);
        }
        assert_eq!(r.failed(&refused(), REFUSED), Duration::from_secs(300));
        r.connected(true);
        assert_eq!(r.failed(&refused(), REFUSED), Duration::from_secs(60));
    }
}
