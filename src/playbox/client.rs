//! HTTPS to one play box: one kept-alive connection, its own TLS trust, the
//! `{code, message, data}` envelope, and the two login forms.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{PlayboxConfig, Secret};
use crate::json::{as_i64, field};
use crate::recovery::{Classify, HttpFailure, Recovery, WaitReason};

pub const DOCUMENTED_LOGIN: &str = "/terminal/core/v1/user/login";
pub const FALLBACK_LOGIN: &str = "/terminal/core/v1/login";

/// The largest reply body read from a box: 1 MiB. Real replies are a few hundred
/// bytes; a bigger body (announced or streamed) fails that request, and so its poll or
/// command, without being read further, and its connection is dropped.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BoxError {
    #[error("unreachable: {0}")]
    Unreachable(#[source] HttpFailure),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reply body larger than {limit} bytes; not read")]
    TooLarge { limit: usize },
    #[error("reply is not JSON")]
    NotJson,
    #[error("box replied code {code} ({message})")]
    Code { code: i64, message: String },
    #[error("credentials are fine but another client holds the box's session")]
    SessionHeld,
    #[error("reply lacks `{0}`")]
    Missing(&'static str),
    /// Trust on first use could not be established or its pin file is unusable.
    #[error("TLS: {0}")]
    Tls(#[source] crate::tls::TlsError),
    /// Nothing was sent: logins are held back after a refusal or a lockout.
    #[error("no login attempted: {0}")]
    Held(LoginsHeld),
}

/// Why no login is tried now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginsHeld {
    #[error("the password was refused {times} times; no login until it changes")]
    UntilPasswordChanges { times: u32 },
    #[error("the password was refused; no login for another {left_s}s")]
    Refused { left_s: u64 },
    #[error("the box is locking logins; no login for another {left_s}s")]
    LockedOut { left_s: u64 },
    #[error("the box refused the last login; no login for another {left_s}s")]
    Backoff { left_s: u64 },
}

/// What a non-zero `code` calls for, after shared/spec/playbox.md §2 (the ViplexCore
/// SDK's global error enum). Only 11, 18 and 39 mean "log in again": re-login on any
/// other code is what turns one bad endpoint into a login loop. Wrong username or
/// password, or no such account (24, 33): wait long (and stop after two, see the
/// poller); locking logins (17, 67): no login for at least 60 s; too frequent (22): no
/// sooner than the poll interval; no such path here (1, 3, 12, 36): try the next
/// candidate path; anything else fails that request, retried at the next poll.
pub fn code_recovery(code: i64) -> Recovery {
    match code {
        11 | 18 | 39 => Recovery::Relogin,
        17 | 67 => Recovery::WaitLong(WaitReason::LockedOut),
        24 | 33 => Recovery::WaitLong(WaitReason::CredentialsRefused),
        22 => Recovery::WaitLong(WaitReason::TooFrequent),
        1 | 3 | 12 | 36 => Recovery::GiveUp,
        _ => Recovery::Retry,
    }
}

/// Codes the spec's table names; any other is logged the first time a box sends it.
const KNOWN_CODES: &[i64] = &[1, 3, 11, 12, 17, 18, 19, 22, 24, 33, 36, 38, 39, 67];
/// A box's `message` is kept to this many bytes (it ends up in logs and on MQTT).
const MAX_MESSAGE_BYTES: usize = 128;

impl Classify for BoxError {
    fn recovery(&self) -> Recovery {
        match self {
            // Down, rebooting, hung; or no trust established yet.
            BoxError::Unreachable(_) | BoxError::Tls(_) => Recovery::Retry,
            BoxError::Status(401 | 403) => Recovery::Relogin,
            // Not this path (404/405, not JSON, a reply without the field).
            BoxError::Status(404 | 405) | BoxError::NotJson | BoxError::Missing(_) => {
                Recovery::GiveUp
            }
            BoxError::Status(_) | BoxError::TooLarge { .. } | BoxError::SessionHeld => {
                Recovery::Retry
            }
            BoxError::Code { code, .. } => code_recovery(*code),
            BoxError::Held(_) => Recovery::WaitLong(WaitReason::LoginsHeld),
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Which login form a box accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginForm {
    Documented,
    Fallback,
}

impl LoginForm {
    pub fn name(self) -> &'static str {
        match self {
            LoginForm::Documented => "documented",
            LoginForm::Fallback => "fallback",
        }
    }
}

pub struct BoxClient {
    http: reqwest::Client,
    base: reqwest::Url,
    sn: String,
    username: String,
    password: Secret,
    /// Our own stable client id, never ViPlex Express's, so logging in kicks nobody out.
    client_id: u32,
    name: String,
    /// With trust on first use: the pin, made at the first completed handshake.
    tofu: Option<std::sync::Arc<crate::tls::TofuPin>>,
    request_timeout: Duration,
    /// Unknown codes already logged for this box.
    codes_seen: std::sync::Mutex<std::collections::HashSet<i64>>,
}

/// A stable, unusual integer client id derived from the box name.
pub fn client_id_for(name: &str) -> u32 {
    let d = Sha256::digest(format!("bvcsp2mqtt:{name}").as_bytes());
    // High bit set: far from the small ids other clients use (the doc example is 1).
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) | 0x4000_0000
}

fn unreachable(e: reqwest::Error) -> BoxError {
    BoxError::Unreachable(HttpFailure(e))
}

/// The body of `resp`, or [`BoxError::TooLarge`] as soon as it is known to exceed `cap`.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, BoxError> {
    let too_large = BoxError::TooLarge { limit: cap };
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(cap).unwrap_or(u64::MAX))
    {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl BoxClient {
    pub fn new(
        cfg: &PlayboxConfig,
        tls: rustls::ClientConfig,
        tofu: Option<std::sync::Arc<crate::tls::TofuPin>>,
    ) -> Result<BoxClient, reqwest::Error> {
        crate::tls::install_process_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("bvcsp2mqtt/", env!("CARGO_PKG_VERSION")))
            .http1_only()
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(5)))
            .timeout(cfg.request_timeout)
            .tls_backend_preconfigured(tls)
            .build()?;
        Ok(BoxClient {
            http,
            base: cfg.url.url().clone(),
            sn: cfg.sn.clone(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            client_id: client_id_for(&cfg.name),
            name: cfg.name.clone(),
            tofu,
            request_timeout: cfg.request_timeout,
            codes_seen: Default::default(),
        })
    }

    /// A new password (the password file changed).
    pub fn set_password(&mut self, password: Secret) {
        self.password = password;
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        token: Option<&Secret>,
    ) -> Result<Value, BoxError> {
        self.first_contact().await?;
        let req = match token {
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(t.expose()).map_err(|_| BoxError::Missing("token"))?;
                v.set_sensitive(true);
                req.header(AUTHORIZATION, v)
            }
            None => req,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = read_capped(resp, MAX_REPLY_BYTES).await?;
        let reply = parse_envelope(status.as_u16(), &bytes);
        if let Err(BoxError::Code { code, message }) = &reply
            && !KNOWN_CODES.contains(code)
        {
            let mut seen = self.codes_seen.lock().unwrap_or_else(|p| p.into_inner());
            // Logged once per code, for a bounded number of codes.
            if seen.len() < 64 && seen.insert(*code) {
                tracing::warn!(
                    "playbox {}: the box replied code {code} ({message:?}), which the spec \
                     does not name; treated as a failure of that request (logged once per code)",
                    self.name
                );
            }
        }
        reply
    }

    /// With trust on first use and no pin yet, pin the box's certificate after a
    /// completed handshake, before anything (a password above all) is sent.
    async fn first_contact(&self) -> Result<(), BoxError> {
        let Some(pin) = &self.tofu else {
            return Ok(());
        };
        if self.base.scheme() != "https" {
            return Ok(());
        }
        let host = self.base.host_str().unwrap_or_default();
        let port = self.base.port_or_known_default().unwrap_or(443);
        pin.first_contact(host, port, self.request_timeout)
            .await
            .map_err(BoxError::Tls)
    }

    pub async fn get(&self, path: &str, token: &Secret) -> Result<Value, BoxError> {
        self.send(self.http.get(self.url(path)), Some(token)).await
    }

    pub async fn post(&self, path: &str, token: &Secret, body: &Value) -> Result<Value, BoxError> {
        self.send(self.http.post(self.url(path)).json(body), Some(token))
            .await
    }

    /// Log in with `form`. The box counts failures towards its lockout, so callers never
    /// retry a refused password.
    pub async fn login(&self, form: LoginForm) -> Result<Secret, BoxError> {
        let mut body = match form {
            LoginForm::Documented => json!({
                "username": self.username, "password": self.password.expose(),
                "loginType": 2, "clientId": self.client_id, "clientName": "bvcsp2mqtt",
            }),
            LoginForm::Fallback => json!({
                "username": self.username, "password": self.password.expose(),
                "loginType": 9, "clientId": format!("bvcsp2mqtt-{:08x}", self.client_id), "clientName": "bvcsp2mqtt",
                "source": {"type": 0, "platform": 2, "platformVersion": env!("CARGO_PKG_VERSION")},
            }),
        };
        // An empty sn is refused where a missing one is accepted.
        if !self.sn.is_empty() {
            body["sn"] = Value::String(self.sn.clone());
        }
        let path = match form {
            LoginForm::Documented => DOCUMENTED_LOGIN,
            LoginForm::Fallback => FALLBACK_LOGIN,
        };
        let data = self
            .send(self.http.post(self.url(path)).json(&body), None)
            .await?;
        login_token(&data)
    }
}

/// A reply's status and body: the `data` of the `{code, message, data}` envelope when the
/// status is 2xx and `code == 0`. The pure part of every request, apart from the I/O.
pub fn parse_envelope(status: u16, bytes: &[u8]) -> Result<Value, BoxError> {
    if !(200..300).contains(&status) {
        return Err(BoxError::Status(status));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|_| BoxError::NotJson)?;
    match field(&v, "code").and_then(as_i64) {
        Some(0) => Ok(field(&v, "data").cloned().unwrap_or(Value::Null)),
        Some(code) => {
            let message = field(&v, "message")
                .or_else(|| field(&v, "msg"))
                .and_then(Value::as_str)
                .unwrap_or("");
            Err(BoxError::Code {
                code,
                message: clip(message, MAX_MESSAGE_BYTES).to_owned(),
            })
        }
        None => Err(BoxError::NotJson),
    }
}

/// The token in a login reply's `data`, or why there is none.
pub fn login_token(data: &Value) -> Result<Secret, BoxError> {
    let logined = field(data, "logined").and_then(Value::as_bool);
    let validation = field(data, "validation").and_then(Value::as_bool);
    match (logined, validation) {
        (Some(false), Some(false)) => {
            return Err(BoxError::Code {
                code: 24,
                message: "wrong username or password".into(),
            });
        }
        (Some(false), _) => return Err(BoxError::SessionHeld),
        _ => {}
    }
    field(data, "token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(Secret::new)
        .ok_or(BoxError::Missing("token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_stable_unusual_and_distinct() {
        assert_eq!(client_id_for("lobby"), client_id_for("lobby"));
        assert_ne!(client_id_for("lobby"), client_id_for("hall"));
        assert!(client_id_for("lobby") >= 0x4000_0000);
    }

    #[test]
    fn errors_mean_what_the_spec_says() {
        let code = |c| BoxError::Code {
            code: c,
            message: String::new(),
        };
        // shared/spec/playbox.md §2, row by row.
        let wait = Recovery::WaitLong;
        for (c, m) in [
            (1, Recovery::GiveUp),
            (3, Recovery::GiveUp),
            (11, Recovery::Relogin),
            (12, Recovery::GiveUp),
            (17, wait(WaitReason::LockedOut)),
            (18, Recovery::Relogin),
            (19, Recovery::Retry),
            (22, wait(WaitReason::TooFrequent)),
            (24, wait(WaitReason::CredentialsRefused)),
            (33, wait(WaitReason::CredentialsRefused)),
            (36, Recovery::GiveUp),
            (38, Recovery::Retry),
            (39, Recovery::Relogin),
            (67, wait(WaitReason::LockedOut)),
        ] {
            assert_eq!(code(c).recovery(), m, "code {c}");
        }
        // Nothing outside 11, 18, 39 and 401/403 means "log in again".
        for c in (-5..200).chain([i64::MIN, i64::MAX]) {
            if code(c).recovery() == Recovery::Relogin {
                assert!([11, 18, 39].contains(&c), "code {c} would log in again");
            }
        }
        assert_eq!(BoxError::Status(403).recovery(), Recovery::Relogin);
        assert_eq!(BoxError::Status(500).recovery(), Recovery::Retry);
        assert_eq!(BoxError::Status(404).recovery(), Recovery::GiveUp);
        assert_eq!(BoxError::Status(401).recovery(), Recovery::Relogin);
        assert_eq!(BoxError::NotJson.recovery(), Recovery::GiveUp);
        assert_eq!(
            BoxError::Held(LoginsHeld::LockedOut { left_s: 3 }).recovery(),
            wait(WaitReason::LoginsHeld)
        );
    }

    #[test]
    fn clip_keeps_whole_characters() {
        assert_eq!(clip("abc", 64), "abc");
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("", 0), "");
    }
}
