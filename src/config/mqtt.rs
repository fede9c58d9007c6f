//! `[mqtt]`: the broker, the session, TLS and reconnect bounds.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::*;
use super::{ConfigError, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mqtt_url")]
    pub url: MqttUrl,
    #[serde(default = "default_base_topic")]
    pub base_topic: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub qos: Qos,
    #[serde(default = "d_30s", with = "duration")]
    pub keepalive: Duration,
    #[serde(default)]
    pub tls: MqttTlsConfig,
    #[serde(default = "d_500ms", with = "duration")]
    pub reconnect_min: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub reconnect_max: Duration,
    /// Largest packet the bridge publishes (set it to the broker's limit); a larger
    /// message becomes a dead letter. Incoming packets may be as large as MQTT allows.
    #[serde(default = "default_max_packet")]
    pub max_packet_size: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").expect("all mqtt keys have defaults")
    }
}

/// `mqtt.qos`: the MQTT quality of service of every publish, written 0, 1 or 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Qos {
    AtMostOnce,
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

impl TryFrom<u8> for Qos {
    type Error = String;

    fn try_from(n: u8) -> Result<Qos, String> {
        match n {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            2 => Ok(Qos::ExactlyOnce),
            _ => Err(format!("must be 0, 1 or 2, not {n}")),
        }
    }
}

impl From<Qos> for u8 {
    fn from(q: Qos) -> u8 {
        match q {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    #[serde(default, with = "optional_path")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, with = "optional_path")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, with = "optional_path")]
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
}

impl MqttConfig {
    /// (tls, host, port) from `mqtt.url`.
    pub fn endpoint(&self) -> (bool, String, u16) {
        let url = &self.url;
        (url.scheme().is_tls(), url.host().to_string(), url.port())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let base = &self.base_topic;
        if base.is_empty()
            || base.contains(['+', '#'])
            || base.starts_with('/')
            || base.ends_with('/')
        {
            return Err(ConfigError::new(
                "mqtt.base_topic",
                "must be non-empty, without + or #, and not start or end with /",
            ));
        }
        if self.client_id.is_empty() {
            return Err(ConfigError::new(
                "mqtt.client_id",
                "must not be empty (it names the persistent session)",
            ));
        }
        if self.keepalive < Duration::from_secs(1) {
            return Err(ConfigError::new("mqtt.keepalive", "must be at least 1s"));
        }
        // CONNECT carries it in 16 bits: more would reach the broker wrapped around.
        if self.keepalive > Duration::from_secs(u16::MAX as u64) {
            return Err(ConfigError::new(
                "mqtt.keepalive",
                "must be at most 65535s (18h12m15s), the most MQTT can carry",
            ));
        }
        nonzero("mqtt.reconnect_min", self.reconnect_min)?;
        if self.reconnect_max < self.reconnect_min {
            return Err(ConfigError::new(
                "mqtt.reconnect_max",
                "must be >= mqtt.reconnect_min",
            ));
        }
        if self.max_packet_size < 1024 {
            return Err(ConfigError::new(
                "mqtt.max_packet_size",
                "must be at least 1024",
            ));
        }
        let t = &self.tls;
        let tls_set =
            t.ca_file.is_some() || t.client_cert.is_some() || t.client_key.is_some() || t.insecure;
        if tls_set && !self.url.scheme().is_tls() {
            return Err(ConfigError::new(
                "mqtt.tls",
                format!(
                    "is set but mqtt.url's scheme `{}` is plain text: use mqtts:// or ssl://",
                    self.url.scheme().name()
                ),
            ));
        }
        if t.client_cert.is_some() != t.client_key.is_some() {
            return Err(ConfigError::new(
                "mqtt.tls",
                "client_cert and client_key go together",
            ));
        }
        for (k, v) in [
            ("ca_file", &t.ca_file),
            ("client_cert", &t.client_cert),
            ("client_key", &t.client_key),
        ] {
            if let Some(v) = v
                && !v.is_file()
            {
                return Err(ConfigError::new(
                    format!("mqtt.tls.{k}"),
                    format!("no such file `{}`", v.display()),
                ));
            }
        }
        Ok(())
    }
}
