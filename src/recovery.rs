//! One classification of upstream failures: what to do about one. Every upstream error
//! type (BVCSP REST, the WebSocket upgrade, a play box, the MQTT connection) says which
//! [`Recovery`] it calls for; the loops decide how long each wait is, by the named
//! policies of [`crate::retry`].

/// What a failed request calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Transient (unreachable, timed out, a 5xx, a busy server): back off by the link's
    /// policy and try again.
    Retry,
    /// The token or session is no longer accepted: log in again, once. Nothing else is a
    /// reason to log in again (that is how one bad endpoint becomes a login loop).
    Relogin,
    /// Trying again soon cannot help, waiting can: no new attempt for a long while.
    WaitLong(WaitReason),
    /// No retry of this request helps: the path does not exist here. The caller tries
    /// another path, or asks again only at its slowest rate.
    GiveUp,
}

/// Why a [`Recovery::WaitLong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// The credentials were refused: the auth backoff (minutes), shown as `auth_failed`.
    CredentialsRefused,
    /// The upstream is locking logins after failures: no login for the lockout.
    LockedOut,
    /// The upstream asks for fewer requests: no sooner than the normal interval.
    TooFrequent,
    /// Nothing was sent: logins are held back after a refusal or a lockout.
    LoginsHeld,
    /// The server keeps no alarm records the bridge may read: backfill asks again
    /// only rarely.
    NoAlarmRecords,
}

/// An upstream error that knows what it calls for.
pub trait Classify: std::error::Error {
    fn recovery(&self) -> Recovery;
}

/// A failed HTTP exchange (reqwest), shown in a line: what kind, then the chain of
/// causes. reqwest's own message names the URL; the causes say more and never carry a
/// header (so never a token).
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct HttpFailure(#[source] pub reqwest::Error);

fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "transport error".to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

/// The broker's connection: never given up on (the outbox waits for it), but refused
/// credentials and a refused client id are told apart from a network failure.
impl Classify for rumqttc::ConnectionError {
    fn recovery(&self) -> Recovery {
        use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
        match self {
            E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => {
                Recovery::WaitLong(WaitReason::CredentialsRefused)
            }
            _ => Recovery::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_refusals_are_told_from_network_failures() {
        use rumqttc::{ConnectReturnCode, ConnectionError};
        assert_eq!(
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized).recovery(),
            Recovery::WaitLong(WaitReason::CredentialsRefused)
        );
        assert_eq!(ConnectionError::NetworkTimeout.recovery(), Recovery::Retry);
    }
}
