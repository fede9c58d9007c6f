//! Every reconnect and retry policy of the bridge, by name, with its reset rule: the
//! BVCSP link (streams, logins, refresh, backfill), the MQTT connection (network,
//! refused credentials) and the play boxes (network, refused passwords, lockouts), and
//! the fixed waits that stand in for a policy where a failure does not fix itself
//! quickly.
//!
//! One shape serves them all: exponential growth from `min`, doubled per failure, with
//! jitter ([`Jitter`]), under a cap. The cap is short while an outage is young (`early_max` for
//! `early_for`), so a server that comes back after a restart or a short cut is found
//! within seconds, and grows to `max` for outages that last: retries never hammer and the
//! bridge is never blind for long. Time is `tokio::time`, so every rule here is tested
//! under a paused clock.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::config::{BvcspConfig, MqttConfig, PlayboxConfig};

/// Below-jitter spreads each delay over `[d × (1 − JITTER), d]`, so a cap is a true cap.
const JITTER: f64 = 0.25;

/// How a delay is spread so that many clients do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the delay.
    None,
    /// Over `[d × (1 − JITTER), d]`: never past the cap (the BVCSP link).
    Below,
    /// Over `[d, 2d)`: never sooner than the delay (the MQTT connection and the play
    /// boxes, as they always were; the bound is twice the cap).
    Above,
}

/// Bounds of one policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The first delay.
    pub min: Duration,
    /// The cap while the outage is younger than `early_for`.
    pub early_max: Duration,
    pub early_for: Duration,
    /// The cap after that.
    pub max: Duration,
    /// A connection that lived this long resets the backoff (`None`: every success does).
    pub stable_after: Option<Duration>,
    pub jitter: Jitter,
}

impl Policy {
    /// A stream's WebSocket (re)connects, and the session's logins while the server is
    /// unreachable. A socket that opens resets it, so the next outage starts at `min`
    /// again; one that dies within `stable_after` does not, so a server that accepts and
    /// drops at once is retried at the capped rate, not hammered.
    pub fn stream_reconnect(cfg: &BvcspConfig) -> Policy {
        Policy {
            min: cfg.reconnect_min,
            early_max: early_max(cfg),
            early_for: cfg.reconnect_early_for,
            max: cfg.reconnect_max,
            stable_after: Some(STABLE_SOCKET),
            jitter: Jitter::Below,
        }
    }

    /// Logging in again after a refused token or upgrade. A session that held for
    /// `HEALTHY_SESSION` resets it; a token refused right after every login (a stream the
    /// account may not open) backs off instead of turning into a login storm.
    pub fn relogin(cfg: &BvcspConfig) -> Policy {
        Policy {
            min: cfg.reconnect_min,
            early_max: early_max(cfg),
            early_for: cfg.reconnect_early_for,
            max: cfg.reconnect_max,
            stable_after: Some(HEALTHY_SESSION),
            jitter: Jitter::None,
        }
    }

    /// Refused credentials (code 14): minutes, never hammering the account.
    pub fn auth_rejected(cfg: &BvcspConfig) -> Policy {
        Policy {
            min: cfg.auth_retry_min,
            early_max: cfg.auth_retry_max,
            early_for: Duration::ZERO,
            max: cfg.auth_retry_max,
            stable_after: None,
            jitter: Jitter::None,
        }
    }

    /// A failed token refresh, retried while the token still lives.
    pub fn refresh(cfg: &BvcspConfig) -> Policy {
        Policy {
            stable_after: None,
            ..Policy::stream_reconnect(cfg)
        }
    }

    /// Alarm backfill after a transient failure (5xx, timeout, busy codes).
    pub fn backfill(cfg: &BvcspConfig) -> Policy {
        Policy {
            min: cfg.reconnect_min.max(Duration::from_secs(1)),
            early_max: Duration::from_secs(10).min(cfg.reconnect_max.max(cfg.reconnect_min)),
            early_for: Duration::from_secs(120),
            max: cfg.reconnect_max.max(Duration::from_secs(30)),
            stable_after: None,
            jitter: Jitter::Below,
        }
    }
}

impl Policy {
    /// The broker connection. A CONNACK resets it at once: the outbox waits for the
    /// broker, so a broker that is back is used at once.
    pub fn mqtt_reconnect(cfg: &MqttConfig) -> Policy {
        Policy {
            min: cfg.reconnect_min,
            early_max: cfg.reconnect_max,
            early_for: Duration::ZERO,
            max: cfg.reconnect_max,
            stable_after: None,
            jitter: Jitter::Above,
        }
    }

    /// The broker refused the bridge's credentials (CONNACK "bad user name or password"
    /// or "not authorized"): trying again at the reconnect rate cannot help and fills the
    /// broker's log, so no sooner than [`MQTT_REFUSED_MIN`] (or `mqtt.reconnect_max`, if
    /// longer), doubling up to [`MQTT_REFUSED_MAX`]. A CONNACK resets it.
    pub fn mqtt_refused(cfg: &MqttConfig) -> Policy {
        let min = MQTT_REFUSED_MIN.max(cfg.reconnect_max);
        let max = MQTT_REFUSED_MAX.max(min);
        Policy {
            min,
            early_max: max,
            early_for: Duration::ZERO,
            max,
            stable_after: None,
            jitter: Jitter::None,
        }
    }

    /// A play box that cannot be reached (down, rebooting, hung): from a second up to
    /// the poll interval, at least 30 s. A successful poll resets it.
    pub fn playbox_network(cfg: &PlayboxConfig) -> Policy {
        let max = cfg.poll_interval.max(Duration::from_secs(30));
        Policy {
            min: Duration::from_secs(1),
            early_max: max,
            early_for: Duration::ZERO,
            max,
            stable_after: None,
            jitter: Jitter::Above,
        }
    }

    /// A play box refused the password (code 24, 33) or the login itself: minutes,
    /// doubling, so the bridge can never be the one that locks the box. Reset by a
    /// login that goes through, or a new password in the password file.
    pub fn playbox_auth(cfg: &PlayboxConfig) -> Policy {
        Policy {
            min: cfg.auth_retry_min,
            early_max: cfg.auth_retry_max,
            early_for: Duration::ZERO,
            max: cfg.auth_retry_max,
            stable_after: None,
            jitter: Jitter::None,
        }
    }

    /// A play box is locking logins (code 17, 67): never sooner than
    /// [`PLAYBOX_LOCKOUT`], doubling up to the auth cap. Reset by a login that goes
    /// through.
    pub fn playbox_lockout(cfg: &PlayboxConfig) -> Policy {
        let max = cfg.auth_retry_max.max(PLAYBOX_LOCKOUT);
        Policy {
            min: PLAYBOX_LOCKOUT,
            early_max: max,
            early_for: Duration::ZERO,
            max,
            stable_after: None,
            jitter: Jitter::None,
        }
    }
}

/// A socket that stayed open this long proves the server well again.
pub const STABLE_SOCKET: Duration = Duration::from_secs(10);
/// A session that lasted this long counts as healthy.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// A server without alarm records is asked again this rarely.
pub const BACKFILL_UNAVAILABLE_RETRY: Duration = Duration::from_secs(600);
/// Never refresh a token more often than this, whatever lifetime the server announces.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// A token is refreshed at half its life (and never sooner than
/// [`MIN_REFRESH_INTERVAL`] after it was issued).
pub fn refresh_due(issued: tokio::time::Instant, lifetime: Duration) -> tokio::time::Instant {
    issued + (lifetime / 2).max(MIN_REFRESH_INTERVAL)
}
/// While the broker's port refuses connections, a bare TCP connect tries it this often
/// during the reconnect backoff, so the bridge is back within about this long of the
/// broker's return however long the outage was (a refused SYN costs the broker
/// nothing; a full MQTT attempt at this rate would fill its log).
pub const MQTT_PORT_PROBE: Duration = Duration::from_millis(250);
/// A probe's name lookup, and each of its connects, is given up after this (a broker
/// far away still answers within it; one that does not is left to the backoff).
pub const MQTT_PROBE_CONNECT: Duration = Duration::from_secs(2);
/// Logging out at shutdown is best effort: given up after this.
pub const LOGOUT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a make-before-break swap, the old socket is still read this long (frames the
/// server sent on it before it saw the new one).
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// A failed `accept` on the health listener (out of file descriptors, say) is tried
/// again after this.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long an outbox connection waits, after its `tries`-th look, before it looks again
/// for a lock another of its connections holds (the checkpointer's brief exclusive step,
/// well under a millisecond): 50 µs at a time at first, then a millisecond at a time,
/// about 5 s in all; `None` then, and the statement fails ("database is locked").
/// SQLite's own handler slept 1, 2, 5, 10 ms... in turn: a lock held for 0.3 ms cost a
/// commit 3 ms.
pub fn sqlite_lock_wait(tries: u32) -> Option<Duration> {
    const SHORT: u32 = 200;
    const LONG: u32 = 5000;
    match tries {
        t if t < SHORT => Some(Duration::from_micros(50)),
        t if t < SHORT + LONG => Some(Duration::from_millis(1)),
        _ => None,
    }
}

/// The young-outage cap, within the configured bounds.
fn early_max(cfg: &BvcspConfig) -> Duration {
    cfg.reconnect_early_max
        .clamp(cfg.reconnect_min, cfg.reconnect_max)
}

/// A stream path that answers 404 does not fix itself quickly.
pub fn not_found_retry(cfg: &BvcspConfig) -> Duration {
    cfg.reconnect_max
}

/// A failed device snapshot is taken again after this (the streams keep running).
pub fn snapshot_retry(cfg: &BvcspConfig) -> Duration {
    cfg.reconnect_max
}

/// A make-before-break reopen that failed keeps the current socket and tries again
/// after this.
pub fn reopen_retry(cfg: &BvcspConfig) -> Duration {
    cfg.reconnect_max.min(Duration::from_secs(5))
}

/// A backfill whose token was refused waits this long at most for the new one.
pub fn backfill_token_wait(cfg: &BvcspConfig) -> Duration {
    cfg.reconnect_max
}

/// After the broker refused the credentials, no new connection for at least this long.
pub const MQTT_REFUSED_MIN: Duration = Duration::from_secs(60);
/// The longest wait between connections the broker refuses: a fixed password is used
/// within minutes.
pub const MQTT_REFUSED_MAX: Duration = Duration::from_secs(300);

/// After a play box's lockout (code 17 or 67) no login for at least this long: the box
/// locks logins for 60 s.
pub const PLAYBOX_LOCKOUT: Duration = Duration::from_secs(61);
/// With logins held back for a refused password, the password file is looked at this
/// often (a new password ends the wait).
pub const PLAYBOX_PASSWORD_RECHECK: Duration = Duration::from_secs(60);

/// The state of one policy: how many failures in a row, since when.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    failures: u32,
    outage_since: Option<Instant>,
    connected_at: Option<Instant>,
}

impl Backoff {
    pub fn new(policy: Policy) -> Backoff {
        Backoff {
            policy,
            failures: 0,
            outage_since: None,
            connected_at: None,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The delay before the next attempt, after a failure now.
    pub fn next_delay(&mut self) -> Duration {
        let now = Instant::now();
        let since = *self.outage_since.get_or_insert(now);
        let cap = if now.duration_since(since) < self.policy.early_for {
            self.policy.early_max
        } else {
            self.policy.max
        };
        let exp = 2f64.powi(self.failures.min(30) as i32);
        self.failures = self.failures.saturating_add(1);
        let base = self.policy.min.mul_f64(exp).min(cap);
        match self.policy.jitter {
            Jitter::None => base,
            Jitter::Below => base.mul_f64(1.0 - rand::thread_rng().gen_range(0.0..JITTER)),
            Jitter::Above => base.mul_f64(1.0 + rand::thread_rng().gen_range(0.0..1.0)),
        }
    }

    /// An attempt succeeded (a socket opened, a login went through). With no
    /// `stable_after` this resets at once; otherwise `lost` decides.
    pub fn succeeded(&mut self) {
        if self.policy.stable_after.is_none() {
            self.reset();
        } else {
            self.connected_at = Some(Instant::now());
            // The outage is over: if it starts again, it is young again.
            self.outage_since = None;
        }
    }

    /// The connection that `succeeded` has ended: it resets the backoff if it lived
    /// long enough to prove the other side well.
    pub fn lost(&mut self) {
        if let (Some(at), Some(stable)) = (self.connected_at.take(), self.policy.stable_after)
            && at.elapsed() >= stable
        {
            self.reset();
        }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
        self.outage_since = None;
        self.connected_at = None;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_looked_for_again_soon_at_first_and_given_up_after_about_five_seconds() {
        assert_eq!(sqlite_lock_wait(0), Some(Duration::from_micros(50)));
        // A 1 ms lock costs a commit little more than 1 ms.
        let first_ms: Duration = (0..20).filter_map(sqlite_lock_wait).sum();
        assert_eq!(first_ms, Duration::from_millis(1));
        let total: Duration = (0..).map_while(sqlite_lock_wait).sum();
        assert!(
            (Duration::from_secs(5)..Duration::from_secs(6)).contains(&total),
            "{total:?}"
        );
        assert_eq!(sqlite_lock_wait(u32::MAX), None);
    }

    fn policy() -> Policy {
        Policy {
            min: Duration::from_millis(500),
            early_max: Duration::from_secs(2),
            early_for: Duration::from_secs(120),
            max: Duration::from_secs(30),
            stable_after: Some(STABLE_SOCKET),
            jitter: Jitter::Below,
        }
    }

    /// Failures every `delay` for `span`: the delays seen.
    async fn run_outage(b: &mut Backoff, span: Duration) -> Vec<Duration> {
        let end = Instant::now() + span;
        let mut delays = Vec::new();
        while Instant::now() < end {
            let d = b.next_delay();
            delays.push(d);
            tokio::time::sleep(d).await;
        }
        delays
    }

    #[tokio::test(start_paused = true)]
    async fn young_outage_grows_then_holds_a_short_cap() {
        let mut b = Backoff::new(policy());
        let delays = run_outage(&mut b, Duration::from_secs(60)).await;
        // Growing gaps at first...
        assert!(delays[0] <= Duration::from_millis(500));
        assert!(delays[0] >= Duration::from_millis(375));
        assert!(delays[1] > delays[0] && delays[2] > delays[1], "{delays:?}");
        // ...then a steady cap measured in seconds.
        for d in &delays[3..] {
            assert!(*d <= Duration::from_secs(2), "{delays:?}");
            assert!(*d >= Duration::from_millis(1500), "{delays:?}");
        }
        // At most one attempt a second on average, however long it lasts.
        assert!(delays.len() <= 60, "{} attempts in 60 s", delays.len());
        assert!(delays.len() >= 25, "{} attempts in 60 s", delays.len());
    }

    #[tokio::test(start_paused = true)]
    async fn old_outage_backs_off_further() {
        let mut b = Backoff::new(policy());
        run_outage(&mut b, Duration::from_secs(121)).await;
        let later: Vec<Duration> = (0..3).map(|_| b.next_delay()).collect();
        assert!(later[2] > Duration::from_secs(20), "{later:?}");
        assert!(later.iter().all(|d| *d <= Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_connection_resets_a_flapping_one_does_not() {
        let mut b = Backoff::new(policy());
        for _ in 0..5 {
            b.next_delay();
        }
        // Accepted and dropped at once: still backing off.
        b.succeeded();
        tokio::time::advance(Duration::from_secs(1)).await;
        b.lost();
        assert!(b.next_delay() >= Duration::from_millis(1500));
        // Up for longer than `stable_after`: the next outage starts at `min`.
        b.succeeded();
        tokio::time::advance(STABLE_SOCKET).await;
        b.lost();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_makes_the_next_outage_young_again() {
        let mut b = Backoff::new(policy());
        run_outage(&mut b, Duration::from_secs(200)).await;
        assert!(b.next_delay() > Duration::from_secs(20));
        // It came back, briefly; the new outage is capped short again.
        b.succeeded();
        b.lost();
        let d = b.next_delay();
        assert!(d <= Duration::from_secs(2), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_jitter_delays_double_exactly() {
        let mut b = Backoff::new(Policy {
            jitter: Jitter::None,
            stable_after: None,
            ..policy()
        });
        let d: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, vec![500, 1000, 2000, 2000]);
        b.succeeded();
        assert_eq!(b.next_delay().as_millis(), 500);
    }

    fn playbox(text: &str) -> PlayboxConfig {
        let toml = format!(
            "[[playbox]]\nname = \"b\"\nurl = \"http://10.0.0.9\"\nsn = \"S\"\npassword = \"x\"\n{text}"
        );
        crate::config::from_toml(&toml).unwrap().playbox.remove(0)
    }

    #[tokio::test(start_paused = true)]
    async fn mqtt_reconnect_doubles_jittered_upwards_and_a_connack_resets_it() {
        let cfg = MqttConfig {
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            ..MqttConfig::default()
        };
        let mut b = Backoff::new(Policy::mqtt_reconnect(&cfg));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        // Never sooner than the doubling delay, jittered up to twice it.
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] < Duration::from_secs(1));
        assert!(delays[1] >= Duration::from_secs(1), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d < cfg.reconnect_max * 2),
            "{delays:?}"
        );
        assert!(delays[11] >= cfg.reconnect_max, "{delays:?}");
        // However long the outage, never past twice the cap (no young-outage rule here).
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(b.next_delay() < cfg.reconnect_max * 2);
        b.succeeded();
        assert!(b.next_delay() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_mqtt_credentials_wait_minutes_and_a_connack_resets_it() {
        let cfg = MqttConfig::default();
        let mut b = Backoff::new(Policy::mqtt_refused(&cfg));
        let secs: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, vec![60, 120, 240, 300, 300]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(b.next_delay(), MQTT_REFUSED_MAX);
        b.succeeded();
        assert_eq!(b.next_delay(), MQTT_REFUSED_MIN);
        // Never sooner than the network policy's own cap.
        let slow = MqttConfig {
            reconnect_max: Duration::from_secs(600),
            ..MqttConfig::default()
        };
        let mut b = Backoff::new(Policy::mqtt_refused(&slow));
        assert_eq!(b.next_delay(), Duration::from_secs(600));
        assert_eq!(b.next_delay(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn playbox_password_refusals_double_from_minutes_without_jitter() {
        let cfg = playbox("auth_retry_min = \"5m\"\nauth_retry_max = \"30m\"\n");
        let mut b = Backoff::new(Policy::playbox_auth(&cfg));
        let mins: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs() / 60).collect();
        assert_eq!(mins, vec![5, 10, 20, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn playbox_lockouts_never_wait_less_than_the_box_locks() {
        let cfg = playbox("auth_retry_min = \"61s\"\nauth_retry_max = \"61s\"\n");
        let mut b = Backoff::new(Policy::playbox_lockout(&cfg));
        for _ in 0..4 {
            assert_eq!(b.next_delay(), PLAYBOX_LOCKOUT);
        }
        let cfg = playbox("");
        let mut b = Backoff::new(Policy::playbox_lockout(&cfg));
        let d: Vec<u64> = (0..3).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, vec![61, 122, 244]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_playbox_backs_off_from_a_second_to_the_poll_interval_or_30s() {
        let cfg = playbox("poll_interval = \"2m\"\n");
        let mut b = Backoff::new(Policy::playbox_network(&cfg));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_secs(1), "{delays:?}");
        assert!(delays[0] < Duration::from_secs(2), "{delays:?}");
        let bound = Duration::from_secs(240);
        assert!(delays.iter().all(|d| *d < bound), "{delays:?}");
        assert!(delays[11] >= Duration::from_secs(120), "{delays:?}");
        let cfg = playbox("poll_interval = \"5s\"\n");
        let mut b = Backoff::new(Policy::playbox_network(&cfg));
        let last = (0..12).map(|_| b.next_delay()).last().unwrap();
        assert!(last >= Duration::from_secs(30) && last < Duration::from_secs(60));
    }
}
