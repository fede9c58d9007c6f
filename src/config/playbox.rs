//! `[[playbox]]`: NovaStar LED play boxes, each with its own TLS trust.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::*;
use super::{ConfigError, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayboxConfig {
    pub name: String,
    pub url: HttpUrl,
    pub sn: String,
    #[serde(default = "default_playbox_user")]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "d_15s", with = "duration")]
    pub poll_interval: Duration,
    #[serde(default)]
    pub commands: bool,
    #[serde(default)]
    pub tls: PlayboxTls,
    #[serde(default)]
    pub paths: PlayboxPaths,
    /// Timeout of one request; a hung box fails its poll after this long.
    #[serde(default = "d_10s", with = "duration")]
    pub request_timeout: Duration,
    /// Backoff after the box refused the password (code 24): long, so the bridge can
    /// never lock the box (and its operator) out.
    #[serde(default = "d_5m", with = "duration")]
    pub auth_retry_min: Duration,
    #[serde(default = "d_60m", with = "duration")]
    pub auth_retry_max: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlayboxTls {
    /// "tofu" (the default) pins the certificate seen at first contact.
    #[serde(default)]
    pub mode: Option<PlayboxTlsMode>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub fingerprint_sha256: Option<CertFingerprint>,
    #[serde(default, with = "optional_path")]
    pub ca_file: Option<PathBuf>,
}

/// `tls.mode`: the one trust mode named by a word (the others are keys of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlayboxTlsMode {
    /// Trust on first use: the certificate seen at first contact is pinned.
    Tofu,
}

impl<'de> Deserialize<'de> for PlayboxTlsMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "tofu" => Ok(PlayboxTlsMode::Tofu),
            other => Err(serde::de::Error::custom(format!(
                "unknown mode `{other}`, expected `tofu`"
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlayboxPaths {
    #[serde(default)]
    pub brightness: Option<String>,
    #[serde(default)]
    pub screen: Option<String>,
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub info: Option<String>,
}

impl PlayboxConfig {
    /// The checks of entry `i` (`playbox[i].…`); `names` are the names seen so far.
    pub(super) fn validate(
        &self,
        i: usize,
        names: &mut std::collections::HashSet<String>,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("playbox[{i}].{k}");
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(ConfigError::new(key("name"), "must match [a-z0-9_-]+"));
        }
        // It is a topic level and part of a file name: kept short enough to be both.
        if self.name.len() > 64 {
            return Err(ConfigError::new(
                key("name"),
                "must be at most 64 characters",
            ));
        }
        if !names.insert(self.name.clone()) {
            return Err(ConfigError::new(
                key("name"),
                format!("duplicate name `{}`", self.name),
            ));
        }
        if self.sn.trim().is_empty() {
            return Err(ConfigError::new(
                key("sn"),
                "required (the box's serial number)",
            ));
        }
        if self.poll_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                key("poll_interval"),
                "must be at least 1s",
            ));
        }
        let t = &self.tls;
        let chosen = [
            t.mode.is_some(),
            t.insecure,
            t.fingerprint_sha256.is_some(),
            t.ca_file.is_some(),
        ];
        if chosen.iter().filter(|c| **c).count() > 1 {
            return Err(ConfigError::new(
                key("tls"),
                "choose one of mode = \"tofu\", insecure, fingerprint_sha256 and ca_file",
            ));
        }
        if let Some(f) = &t.ca_file
            && !f.is_file()
        {
            return Err(ConfigError::new(
                key("tls.ca_file"),
                format!("no such file `{}`", f.display()),
            ));
        }
        if self.password.is_empty() {
            return Err(ConfigError::new(
                key("password"),
                "required (or give password_file)",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::new(
                key("request_timeout"),
                "must be greater than 0",
            ));
        }
        if self.auth_retry_min < Duration::from_secs(61) {
            return Err(ConfigError::new(
                key("auth_retry_min"),
                "must be over 60s: the box locks logins for 60s after 3 failures",
            ));
        }
        if self.auth_retry_max < self.auth_retry_min {
            return Err(ConfigError::new(
                key("auth_retry_max"),
                "must be >= auth_retry_min",
            ));
        }
        for (k, v) in [
            ("brightness", &self.paths.brightness),
            ("screen", &self.paths.screen),
            ("volume", &self.paths.volume),
            ("info", &self.paths.info),
        ] {
            if let Some(v) = v {
                check_path(&key(&format!("paths.{k}")), v)?;
            }
        }
        Ok(())
    }
}
