//! HTTPS to one play box: one kept-alive connection, its own TLS trust, the
//! `{code, message, data}` envelope, and the two login forms.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::bvcsp::model::{as_i64, field};
use crate::config::{PlayboxConfig, Secret};

pub const DOCUMENTED_LOGIN: &str = "/terminal/core/v1/user/login";
pub const FALLBACK_LOGIN: &str = "/terminal/core/v1/login";

#[derive(Debug, thiserror::Error)]
pub enum BoxError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reply is not JSON")]
    NotJson,
    #[error("box replied code {code} ({message})")]
    Code { code: i64, message: String },
    #[error("credentials are fine but another client holds the box's session")]
    SessionHeld,
    #[error("reply lacks `{0}`")]
    Missing(&'static str),
}

/// What a failed request means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The box cannot be reached (down, rebooting, hung).
    Unreachable,
    /// Wrong username or password (code 24): stop, report, retry only after a long wait.
    WrongPassword,
    /// Too many login failures (code 17): no login for at least 60 s.
    LockedOut,
    /// This path does not exist here (404/405, not JSON, code 1 or 3).
    NoSuchPath,
    /// Looks like an expired or refused token: log in again once.
    AuthExpired,
    /// Anything else: retry at the next poll.
    Other,
}

impl BoxError {
    pub fn meaning(&self) -> Meaning {
        match self {
            BoxError::Unreachable(_) => Meaning::Unreachable,
            BoxError::Status(401 | 403) => Meaning::AuthExpired,
            BoxError::Status(404 | 405) | BoxError::NotJson => Meaning::NoSuchPath,
            BoxError::Status(_) => Meaning::Other,
            BoxError::Code { code: 24, .. } => Meaning::WrongPassword,
            BoxError::Code { code: 17, .. } => Meaning::LockedOut,
            BoxError::Code { code: 1 | 3, .. } => Meaning::NoSuchPath,
            BoxError::Code { code: 19, .. } => Meaning::Other,
            BoxError::Code { .. } => Meaning::AuthExpired,
            BoxError::SessionHeld => Meaning::Other,
            BoxError::Missing(_) => Meaning::NoSuchPath,
        }
    }
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
}

/// A stable, unusual integer client id derived from the box name.
pub fn client_id_for(name: &str) -> u32 {
    let d = Sha256::digest(format!("bvcsp2mqtt:{name}").as_bytes());
    // High bit set: far from the small ids other clients use (the doc example is 1).
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) | 0x4000_0000
}

fn unreachable(e: reqwest::Error) -> BoxError {
    BoxError::Unreachable(crate::bvcsp::rest::describe_http_error(&e))
}

impl BoxClient {
    pub fn new(
        cfg: &PlayboxConfig,
        tls: rustls::ClientConfig,
    ) -> Result<BoxClient, reqwest::Error> {
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
            base: reqwest::Url::parse(&cfg.url).expect("validated"),
            sn: cfg.sn.clone(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            client_id: client_id_for(&cfg.name),
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
        let bytes = resp.bytes().await.map_err(unreachable)?;
        parse_envelope(status.as_u16(), &bytes)
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
        Some(code) => Err(BoxError::Code {
            code,
            message: field(&v, "message")
                .or_else(|| field(&v, "msg"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        }),
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
        assert_eq!(code(24).meaning(), Meaning::WrongPassword);
        assert_eq!(code(17).meaning(), Meaning::LockedOut);
        assert_eq!(code(39).meaning(), Meaning::AuthExpired);
        assert_eq!(code(3).meaning(), Meaning::NoSuchPath);
        assert_eq!(code(19).meaning(), Meaning::Other);
        assert_eq!(BoxError::Status(404).meaning(), Meaning::NoSuchPath);
        assert_eq!(BoxError::Status(401).meaning(), Meaning::AuthExpired);
        assert_eq!(BoxError::NotJson.meaning(), Meaning::NoSuchPath);
    }
}
