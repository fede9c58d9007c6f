//! `[bvcsp]`: the BVCSP server, its credentials, streams, paths, TLS and timings.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::*;
use super::{ConfigError, Secret, Stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenTransport {
    #[default]
    Subprotocol,
    Query,
}

/// A `token_transport` that is neither of the two.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected `subprotocol` or `query`, got `{0}`")]
pub struct UnknownTokenTransport(pub String);

impl std::str::FromStr for TokenTransport {
    type Err = UnknownTokenTransport;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "subprotocol" => Ok(TokenTransport::Subprotocol),
            "query" => Ok(TokenTransport::Query),
            _ => Err(UnknownTokenTransport(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BvcspConfig {
    pub url: HttpUrl,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub app_id: String,
    #[serde(default)]
    pub app_key: Secret,
    #[serde(default)]
    pub app_key_file: Option<PathBuf>,
    /// The `From` field of self-built AppId tokens.
    #[serde(default = "default_app_from")]
    pub app_from: String,
    #[serde(default)]
    pub token_transport: TokenTransport,
    #[serde(default = "default_streams", deserialize_with = "list_or_csv")]
    pub streams: Vec<Stream>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub paths: BvcspPaths,
    /// Empty text frame and WebSocket Ping on every socket at this interval.
    #[serde(default = "d_20s", with = "duration")]
    pub keepalive_interval: Duration,
    /// A socket with no Pong for this long is dead and is reopened.
    #[serde(default = "d_60s", with = "duration")]
    pub pong_timeout: Duration,
    /// Timeout of one REST call and of one WebSocket handshake.
    #[serde(default = "d_10s", with = "duration")]
    pub request_timeout: Duration,
    /// Network reconnect backoff: jittered exponential between these bounds.
    #[serde(default = "d_500ms", with = "duration")]
    pub reconnect_min: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub reconnect_max: Duration,
    /// While an outage is younger than `reconnect_early_for`, reconnect gaps stay under
    /// this, so every stream is back within seconds of the server.
    #[serde(default = "d_2s", with = "duration")]
    pub reconnect_early_max: Duration,
    #[serde(default = "d_2m", with = "duration")]
    pub reconnect_early_for: Duration,
    /// After every gap in the alarm stream, read the alarm records back to the newest
    /// alarm already published (contract §4).
    #[serde(default = "yes")]
    pub backfill: bool,
    /// Never backfill an alarm older than this.
    #[serde(default = "d_24h", with = "duration")]
    pub backfill_max_age: Duration,
    /// Alarm-record pages read per backfill at most (a larger gap is logged).
    #[serde(default = "default_backfill_max_pages")]
    pub backfill_max_pages: u32,
    /// Alarm records asked for per page.
    #[serde(default = "default_backfill_page_size")]
    pub backfill_page_size: u32,
    /// Backoff after refused credentials (code 14): slow, so the server is never hammered.
    #[serde(default = "d_60s", with = "duration")]
    pub auth_retry_min: Duration,
    #[serde(default = "d_15m", with = "duration")]
    pub auth_retry_max: Duration,
    /// Gap between reopening streams after a token change.
    #[serde(default = "d_1500ms", with = "duration")]
    pub reopen_stagger: Duration,
    /// New devices are collected this long before one GPS subscribe frame is sent.
    #[serde(default = "d_1s", with = "duration")]
    pub gps_batch_window: Duration,
    /// Token lifetime assumed when a reply carries none.
    #[serde(default = "d_1h", with = "duration")]
    pub default_token_lifetime: Duration,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub fingerprint_sha256: Option<CertFingerprint>,
    #[serde(default, with = "optional_path")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BvcspPaths {
    pub online_status: String,
    pub alarm: String,
    pub location: String,
    pub im: String,
    pub conference: String,
    pub login: String,
    pub refresh: String,
    pub logout: String,
    pub device_list: String,
    /// REST: the alarm records read by backfill.
    pub alarm_history: String,
}

impl Default for BvcspPaths {
    fn default() -> Self {
        BvcspPaths {
            online_status: Stream::OnlineStatus.default_path().into(),
            alarm: Stream::Alarm.default_path().into(),
            location: Stream::Location.default_path().into(),
            im: Stream::Im.default_path().into(),
            conference: Stream::Conference.default_path().into(),
            login: "/bvcsp/v1/auth/login".into(),
            refresh: "/bvcsp/v1/auth/refresh".into(),
            logout: "/bvcsp/v1/auth/logout".into(),
            device_list: "/bvcsp/v1/pu/list".into(),
            alarm_history: "/bvcsp/v1/alarm".into(),
        }
    }
}

impl BvcspPaths {
    pub fn stream(&self, s: Stream) -> &str {
        match s {
            Stream::OnlineStatus => &self.online_status,
            Stream::Alarm => &self.alarm,
            Stream::Location => &self.location,
            Stream::Im => &self.im,
            Stream::Conference => &self.conference,
        }
    }
}

impl BvcspConfig {
    /// The server's REST base; the WebSocket base is derived from it.
    pub fn base_url(&self) -> &reqwest::Url {
        self.url.url()
    }

    pub fn uses_app_token(&self) -> bool {
        !self.app_id.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.uses_app_token() {
            if self.app_key.is_empty() {
                return Err(ConfigError::new(
                    "bvcsp.app_key",
                    "required with bvcsp.app_id",
                ));
            }
        } else {
            if self.username.is_empty() {
                return Err(ConfigError::new(
                    "bvcsp.username",
                    "required key is missing",
                ));
            }
            if self.password.is_empty() {
                return Err(ConfigError::new(
                    "bvcsp.password",
                    "required key is missing (or give bvcsp.password_file)",
                ));
            }
        }
        if self.streams.is_empty() {
            return Err(ConfigError::new(
                "bvcsp.streams",
                "must name at least one stream",
            ));
        }
        let p = &self.paths;
        for (k, v) in [
            ("online_status", &p.online_status),
            ("alarm", &p.alarm),
            ("location", &p.location),
            ("im", &p.im),
            ("conference", &p.conference),
            ("login", &p.login),
            ("refresh", &p.refresh),
            ("logout", &p.logout),
            ("device_list", &p.device_list),
            ("alarm_history", &p.alarm_history),
        ] {
            check_path(&format!("bvcsp.paths.{k}"), v)?;
        }
        let t = &self.tls;
        let modes = [
            t.insecure,
            t.fingerprint_sha256.is_some(),
            t.ca_file.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            return Err(ConfigError::new(
                "bvcsp.tls",
                "choose one of insecure, fingerprint_sha256 and ca_file",
            ));
        }
        if let Some(f) = &t.ca_file
            && !f.is_file()
        {
            return Err(ConfigError::new(
                "bvcsp.tls.ca_file",
                format!("no such file `{}`", f.display()),
            ));
        }
        nonzero("bvcsp.keepalive_interval", self.keepalive_interval)?;
        nonzero("bvcsp.request_timeout", self.request_timeout)?;
        nonzero("bvcsp.reconnect_min", self.reconnect_min)?;
        nonzero("bvcsp.auth_retry_min", self.auth_retry_min)?;
        if self.pong_timeout <= self.keepalive_interval {
            return Err(ConfigError::new(
                "bvcsp.pong_timeout",
                "must be longer than bvcsp.keepalive_interval",
            ));
        }
        if self.reconnect_max < self.reconnect_min {
            return Err(ConfigError::new(
                "bvcsp.reconnect_max",
                "must be >= bvcsp.reconnect_min",
            ));
        }
        if self.auth_retry_max < self.auth_retry_min {
            return Err(ConfigError::new(
                "bvcsp.auth_retry_max",
                "must be >= bvcsp.auth_retry_min",
            ));
        }
        if self.page_size == 0 {
            return Err(ConfigError::new("bvcsp.page_size", "must be at least 1"));
        }
        nonzero("bvcsp.reconnect_early_max", self.reconnect_early_max)?;
        nonzero("bvcsp.backfill_max_age", self.backfill_max_age)?;
        if !(1..=1_000_000).contains(&self.backfill_max_pages) {
            return Err(ConfigError::new(
                "bvcsp.backfill_max_pages",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=10_000).contains(&self.backfill_page_size) {
            return Err(ConfigError::new(
                "bvcsp.backfill_page_size",
                "must be between 1 and 10000",
            ));
        }
        Ok(())
    }
}
