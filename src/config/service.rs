//! `[service]`, `[storage]` and `[log]`: how the bridge runs, where it keeps its
//! outbox, what it logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::*;

/// Running as a service: stopping, health reports, the HTTP health listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// A graceful stop flushes queued messages to the broker for at most this long.
    #[serde(default = "d_10s", with = "duration")]
    pub grace_period: Duration,
    /// Retained `{base}/bridge/health` is published this often.
    #[serde(default = "d_30s", with = "duration")]
    pub health_interval: Duration,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` over HTTP.
    #[serde(default)]
    pub http: bool,
    #[serde(default = "default_http_listen", with = "listen_addr")]
    pub http_listen: SocketAddr,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        toml::from_str("").expect("all service keys have defaults")
    }
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9782))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_storage_dir")]
    pub dir: PathBuf,
    /// Bound on the outbox: bytes, or a size like "256MiB". When it is reached, events
    /// are never dropped: reading upstream pauses until the broker takes more.
    #[serde(default = "default_max_bytes", deserialize_with = "size")]
    pub max_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: default_storage_dir(),
            max_bytes: default_max_bytes(),
        }
    }
}

/// The outbox bound when `storage.max_bytes` is absent.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 256 << 20;

fn default_max_bytes() -> u64 {
    DEFAULT_OUTBOX_MAX_BYTES
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}
