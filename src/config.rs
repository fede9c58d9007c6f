//! Configuration: a TOML file, then `BVCSP2MQTT__SECTION__KEY` environment overrides,
//! then `*_file` secrets, then validation. Every error names the key by its dotted path.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bvcsp::Stream;

pub const DEFAULT_PATH: &str = "/etc/bvcsp2mqtt/config.toml";
pub const ENV_PREFIX: &str = "BVCSP2MQTT";

/// A configuration problem, with the dotted key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A secret value: never printed, never serialised in clear.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Absent when only play boxes are bridged.
    #[serde(default)]
    pub bvcsp: Option<BvcspConfig>,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub service: ServiceConfig,
    #[serde(default)]
    pub homeassistant: crate::homeassistant::HomeAssistantConfig,
    #[serde(default)]
    pub playbox: Vec<PlayboxConfig>,
}

/// Running as a service: stopping, health reports, the HTTP health listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// A graceful stop flushes queued messages to the broker for at most this long.
    #[serde(default = "d_10s", with = "humantime_serde")]
    pub grace_period: Duration,
    /// Retained `{base}/bridge/health` is published this often.
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` over HTTP.
    #[serde(default)]
    pub http: bool,
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        toml::from_str("").expect("all service keys have defaults")
    }
}

fn default_http_listen() -> String {
    "127.0.0.1:9782".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenTransport {
    #[default]
    Subprotocol,
    Query,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BvcspConfig {
    pub url: String,
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
    #[serde(default = "d_20s", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A socket with no Pong for this long is dead and is reopened.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Timeout of one REST call and of one WebSocket handshake.
    #[serde(default = "d_10s", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Network reconnect backoff: jittered exponential between these bounds.
    #[serde(default = "d_500ms", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// While an outage is younger than `reconnect_early_for`, reconnect gaps stay under
    /// this, so every stream is back within seconds of the server.
    #[serde(default = "d_2s", with = "humantime_serde")]
    pub reconnect_early_max: Duration,
    #[serde(default = "d_2m", with = "humantime_serde")]
    pub reconnect_early_for: Duration,
    /// After every gap in the alarm stream, read the alarm records back to the newest
    /// alarm already published (contract §4).
    #[serde(default = "yes")]
    pub backfill: bool,
    /// Never backfill an alarm older than this.
    #[serde(default = "d_24h", with = "humantime_serde")]
    pub backfill_max_age: Duration,
    /// Alarm-record pages read per backfill at most (a larger gap is logged).
    #[serde(default = "default_backfill_max_pages")]
    pub backfill_max_pages: u32,
    /// Alarm records asked for per page.
    #[serde(default = "default_backfill_page_size")]
    pub backfill_page_size: u32,
    /// Backoff after refused credentials (code 14): slow, so the server is never hammered.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub auth_retry_min: Duration,
    #[serde(default = "d_15m", with = "humantime_serde")]
    pub auth_retry_max: Duration,
    /// Gap between reopening streams after a token change.
    #[serde(default = "d_1500ms", with = "humantime_serde")]
    pub reopen_stagger: Duration,
    /// New devices are collected this long before one GPS subscribe frame is sent.
    #[serde(default = "d_1s", with = "humantime_serde")]
    pub gps_batch_window: Duration,
    /// Token lifetime assumed when a reply carries none.
    #[serde(default = "d_1h", with = "humantime_serde")]
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
    pub fingerprint_sha256: String,
    #[serde(default)]
    pub ca_file: String,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mqtt_url")]
    pub url: String,
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
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub keepalive: Duration,
    #[serde(default)]
    pub tls: MqttTlsConfig,
    #[serde(default = "d_500ms", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "d_30s", with = "humantime_serde")]
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

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    #[serde(default)]
    pub ca_file: String,
    #[serde(default)]
    pub client_cert: String,
    #[serde(default)]
    pub client_key: String,
    #[serde(default)]
    pub insecure: bool,
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

fn default_max_bytes() -> u64 {
    crate::mqtt::outbox::DEFAULT_MAX_BYTES
}

/// A byte count: an integer, or a string with a unit (B, KB, MB, GB, KiB, MiB, GiB).
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    let text = match Size::deserialize(d)? {
        Size::Int(n) => return Ok(n),
        Size::Text(t) => t,
    };
    parse_size(&text).map_err(serde::de::Error::custom)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a size: `{text}` (e.g. 268435456 or \"256MiB\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        u => return Err(format!("unknown size unit `{u}` in `{text}`")),
    };
    Ok((n * mult as f64) as u64)
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayboxConfig {
    pub name: String,
    pub url: String,
    pub sn: String,
    #[serde(default = "default_playbox_user")]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "d_15s", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default)]
    pub commands: bool,
    #[serde(default)]
    pub tls: PlayboxTls,
    #[serde(default)]
    pub paths: PlayboxPaths,
    /// Timeout of one request; a hung box fails its poll after this long.
    #[serde(default = "d_10s", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Backoff after the box refused the password (code 24): long, so the bridge can
    /// never lock the box (and its operator) out.
    #[serde(default = "d_5m", with = "humantime_serde")]
    pub auth_retry_min: Duration,
    #[serde(default = "d_60m", with = "humantime_serde")]
    pub auth_retry_max: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlayboxTls {
    /// "tofu" (default) pins the certificate seen at first contact.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub fingerprint_sha256: String,
    #[serde(default)]
    pub ca_file: String,
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

fn default_app_from() -> String {
    "bvcsp2mqtt".into()
}
fn default_streams() -> Vec<Stream> {
    Stream::ALL.to_vec()
}
fn default_backfill_max_pages() -> u32 {
    200
}
fn default_backfill_page_size() -> u32 {
    100
}
fn default_page_size() -> u32 {
    1000
}
fn default_mqtt_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_base_topic() -> String {
    "bvcsp2mqtt".into()
}
fn default_client_id() -> String {
    "bvcsp2mqtt".into()
}
fn default_qos() -> u8 {
    1
}
fn default_max_packet() -> usize {
    1 << 20
}
fn default_storage_dir() -> PathBuf {
    PathBuf::from("/var/lib/bvcsp2mqtt")
}
fn default_log_level() -> String {
    "info".into()
}
fn default_playbox_user() -> String {
    "admin".into()
}
fn d_500ms() -> Duration {
    Duration::from_millis(500)
}
fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_1500ms() -> Duration {
    Duration::from_millis(1500)
}
fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_15s() -> Duration {
    Duration::from_secs(15)
}
fn d_20s() -> Duration {
    Duration::from_secs(20)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_5m() -> Duration {
    Duration::from_secs(5 * 60)
}
fn d_60m() -> Duration {
    Duration::from_secs(60 * 60)
}
fn d_15m() -> Duration {
    Duration::from_secs(15 * 60)
}
fn d_1h() -> Duration {
    Duration::from_secs(3600)
}
fn d_2s() -> Duration {
    Duration::from_secs(2)
}
fn d_2m() -> Duration {
    Duration::from_secs(120)
}
fn d_24h() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn yes() -> bool {
    true
}

/// A list given either as a TOML array or, from the environment, comma-separated.
fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv<T> {
        List(Vec<T>),
        Csv(String),
    }
    match ListOrCsv::<T>::deserialize(d)? {
        ListOrCsv::List(v) => Ok(v),
        ListOrCsv::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<T>().map_err(serde::de::Error::custom))
            .collect(),
    }
}

impl std::str::FromStr for TokenTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "subprotocol" => Ok(TokenTransport::Subprotocol),
            "query" => Ok(TokenTransport::Query),
            _ => Err(format!("expected `subprotocol` or `query`, got `{s}`")),
        }
    }
}

/// The environment variables that belong to us.
pub fn env_overrides() -> HashMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect()
}

/// Load from a file (if given) and an explicit map of environment overrides, then
/// resolve `*_file` secrets and validate.
pub fn load(path: Option<&Path>, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        check_toml(&text)?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    if let Some(k) = env
        .keys()
        .find(|k| k.to_ascii_uppercase().starts_with("BVCSP2MQTT__PLAYBOX"))
    {
        return Err(ConfigError::new(
            "playbox",
            format!(
                "play-box entries cannot be set from the environment ({k}); \
                 put them in the file and give secrets with password_file"
            ),
        ));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(env.into_iter().collect())),
    );
    let raw = builder.build().map_err(map_config_error)?;
    let mut cfg: Config = raw.try_deserialize().map_err(map_config_error)?;
    cfg.resolve_secrets()?;
    cfg.validate()?;
    Ok(cfg)
}

/// A TOML syntax error, by line and column and without the offending text: the
/// TOML crate's own message quotes the source line, which may hold a password.
fn check_toml(text: &str) -> Result<(), ConfigError> {
    let Err(e) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    Err(ConfigError::new(
        "config",
        format!(
            "not valid TOML: {}{}",
            at.unwrap_or_default(),
            e.message().trim_end()
        ),
    ))
}

/// Parse a TOML string with no environment (tests, the demo).
pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
    check_toml(text)?;
    let raw = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map_err(map_config_error)?;
    let mut cfg: Config = raw.try_deserialize().map_err(map_config_error)?;
    cfg.resolve_secrets()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Keys whose values never appear in an error message.
fn is_secret_key(key: &str) -> bool {
    let leaf = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["password", "secret", "token", "app_key", "key"]
        .iter()
        .any(|s| leaf == *s || leaf.ends_with(&format!("_{s}")))
}

/// config's messages end with "for key `a.b`"; turn that into our "a.b: message" form.
/// A message about a secret key is replaced: serde's "invalid type" quotes the value.
fn map_config_error(e: config::ConfigError) -> ConfigError {
    let mapped = map_config_message(e);
    if is_secret_key(&mapped.key) && mapped.message != "required key is missing" {
        return ConfigError::new(
            mapped.key,
            "has a value of the wrong type or form (not shown: it is a secret)",
        );
    }
    mapped
}

fn map_config_message(e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    if let Some(idx) = text.rfind(" for key `") {
        let key = text[idx + 10..].trim_end_matches('`').to_string();
        let msg = text[..idx].to_string();
        // "unknown field `x`" is reported against the enclosing table: name the field itself.
        if let Some(field) = unknown_field(&msg) {
            let full = if key.is_empty() {
                field
            } else {
                format!("{key}.{field}")
            };
            return ConfigError::new(full, msg);
        }
        if let Some(field) = missing_field(&msg) {
            let full = if key.is_empty() {
                field
            } else {
                format!("{key}.{field}")
            };
            return ConfigError::new(full, "required key is missing");
        }
        return ConfigError::new(key, msg);
    }
    if let Some(field) = unknown_field(&text) {
        return ConfigError::new(field, text);
    }
    if let Some(field) = missing_field(&text) {
        return ConfigError::new(field, "required key is missing");
    }
    if let Some(rest) = text.strip_prefix("missing configuration field \"")
        && let Some(key) = rest.strip_suffix('"')
    {
        return ConfigError::new(key, "required key is missing");
    }
    ConfigError::new("config", text)
}

fn quoted_after(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

fn unknown_field(msg: &str) -> Option<String> {
    quoted_after(msg, "unknown field `")
}

fn missing_field(msg: &str) -> Option<String> {
    quoted_after(msg, "missing field `")
}

fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
}

fn resolve_secret(
    key: &str,
    value: &mut Secret,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    if let Some(path) = file {
        if !value.is_empty() {
            return Err(ConfigError::new(
                key,
                format!("give either {key} or {key}_file, not both"),
            ));
        }
        *value = read_secret_file(&format!("{key}_file"), path)?;
    }
    Ok(())
}

impl Config {
    fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        if let Some(b) = &mut self.bvcsp {
            resolve_secret("bvcsp.password", &mut b.password, &b.password_file)?;
            resolve_secret("bvcsp.app_key", &mut b.app_key, &b.app_key_file)?;
        }
        resolve_secret(
            "mqtt.password",
            &mut self.mqtt.password,
            &self.mqtt.password_file,
        )?;
        for (i, p) in self.playbox.iter_mut().enumerate() {
            resolve_secret(
                &format!("playbox[{i}].password"),
                &mut p.password,
                &p.password_file,
            )?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.bvcsp {
            Some(b) => b.validate()?,
            None if self.playbox.is_empty() => {
                return Err(ConfigError::new(
                    "bvcsp.url",
                    "required: configure [bvcsp] (or at least one [[playbox]])",
                ));
            }
            None => {}
        }
        self.mqtt.validate()?;
        self.homeassistant.validate()?;
        if self
            .service
            .http_listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(ConfigError::new(
                "service.http_listen",
                format!(
                    "expected address:port, e.g. 127.0.0.1:9782, got `{}`",
                    self.service.http_listen
                ),
            ));
        }
        if self.service.health_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "service.health_interval",
                "must be at least 1s",
            ));
        }
        if self.storage.max_bytes < 1 << 20 {
            return Err(ConfigError::new(
                "storage.max_bytes",
                "must be at least 1MiB",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::new("log.level", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", format!("not a valid filter: {e}")))?;
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.playbox.iter().enumerate() {
            let key = |k: &str| format!("playbox[{i}].{k}");
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return Err(ConfigError::new(key("name"), "must match [a-z0-9_-]+"));
            }
            // It is a topic level and part of a file name: kept short enough to be both.
            if p.name.len() > 64 {
                return Err(ConfigError::new(
                    key("name"),
                    "must be at most 64 characters",
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate name `{}`", p.name),
                ));
            }
            check_url(&key("url"), &p.url, &["http", "https"])?;
            if p.sn.trim().is_empty() {
                return Err(ConfigError::new(
                    key("sn"),
                    "required (the box's serial number)",
                ));
            }
            if p.poll_interval < Duration::from_secs(1) {
                return Err(ConfigError::new(
                    key("poll_interval"),
                    "must be at least 1s",
                ));
            }
            if let Some(m) = &p.tls.mode
                && m != "tofu"
            {
                return Err(ConfigError::new(
                    key("tls.mode"),
                    format!("unknown mode `{m}`, expected `tofu`"),
                ));
            }
            if !p.tls.fingerprint_sha256.is_empty() {
                crate::tls::parse_fingerprint(&p.tls.fingerprint_sha256)
                    .map_err(|e| ConfigError::new(key("tls.fingerprint_sha256"), e))?;
            }
            let t = &p.tls;
            let chosen = [
                t.mode.is_some(),
                t.insecure,
                !t.fingerprint_sha256.is_empty(),
                !t.ca_file.is_empty(),
            ];
            if chosen.iter().filter(|c| **c).count() > 1 {
                return Err(ConfigError::new(
                    key("tls"),
                    "choose one of mode = \"tofu\", insecure, fingerprint_sha256 and ca_file",
                ));
            }
            if p.password.is_empty() {
                return Err(ConfigError::new(
                    key("password"),
                    "required (or give password_file)",
                ));
            }
            if p.request_timeout.is_zero() {
                return Err(ConfigError::new(
                    key("request_timeout"),
                    "must be greater than 0",
                ));
            }
            if p.auth_retry_min < Duration::from_secs(61) {
                return Err(ConfigError::new(
                    key("auth_retry_min"),
                    "must be over 60s: the box locks logins for 60s after 3 failures",
                ));
            }
            if p.auth_retry_max < p.auth_retry_min {
                return Err(ConfigError::new(
                    key("auth_retry_max"),
                    "must be >= auth_retry_min",
                ));
            }
            for (k, v) in [
                ("brightness", &p.paths.brightness),
                ("screen", &p.paths.screen),
                ("volume", &p.paths.volume),
                ("info", &p.paths.info),
            ] {
                if let Some(v) = v {
                    check_path(&key(&format!("paths.{k}")), v)?;
                }
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn check_url(key: &str, value: &str, schemes: &[&str]) -> Result<reqwest::Url, ConfigError> {
    // The value is not echoed: a URL may carry a password.
    let url = reqwest::Url::parse(value)
        .map_err(|e| ConfigError::new(key, format!("not a valid URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "must not carry a user or password (`user:pass@`): use the username and password \
             keys (or password_file), which are kept out of logs",
        ));
    }
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError::new(
            key,
            format!(
                "scheme must be one of {}, got `{}`",
                schemes.join(", "),
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, "has no host"));
    }
    Ok(url)
}

fn check_path(key: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::new(
            key,
            format!("must start with `/`, got `{value}`"),
        ));
    }
    Ok(())
}

impl BvcspConfig {
    pub fn base_url(&self) -> reqwest::Url {
        reqwest::Url::parse(&self.url).expect("validated")
    }

    pub fn uses_app_token(&self) -> bool {
        !self.app_id.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("bvcsp.url", &self.url, &["http", "https"])?;
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
            !t.fingerprint_sha256.is_empty(),
            !t.ca_file.is_empty(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            return Err(ConfigError::new(
                "bvcsp.tls",
                "choose one of insecure, fingerprint_sha256 and ca_file",
            ));
        }
        if !t.fingerprint_sha256.is_empty() {
            crate::tls::parse_fingerprint(&t.fingerprint_sha256)
                .map_err(|e| ConfigError::new("bvcsp.tls.fingerprint_sha256", e))?;
        }
        if !t.ca_file.is_empty() && !Path::new(&t.ca_file).is_file() {
            return Err(ConfigError::new(
                "bvcsp.tls.ca_file",
                format!("no such file `{}`", t.ca_file),
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
        if self.backfill_max_pages == 0 {
            return Err(ConfigError::new(
                "bvcsp.backfill_max_pages",
                "must be at least 1",
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

fn nonzero(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

impl MqttConfig {
    /// (tls, host, port) from `mqtt.url`.
    pub fn endpoint(&self) -> (bool, String, u16) {
        let url = reqwest::Url::parse(&self.url).expect("validated");
        let tls = matches!(url.scheme(), "mqtts" | "ssl");
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        (tls, url.host_str().unwrap_or_default().to_string(), port)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = check_url("mqtt.url", &self.url, &["mqtt", "mqtts", "tcp", "ssl"])?;
        if !url.path().is_empty() && url.path() != "/" {
            return Err(ConfigError::new("mqtt.url", "must not have a path"));
        }
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
        if self.qos > 2 {
            return Err(ConfigError::new("mqtt.qos", "must be 0, 1 or 2"));
        }
        if self.keepalive < Duration::from_secs(1) {
            return Err(ConfigError::new("mqtt.keepalive", "must be at least 1s"));
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
        let tls_set = !t.ca_file.is_empty()
            || !t.client_cert.is_empty()
            || !t.client_key.is_empty()
            || t.insecure;
        if tls_set && !self.endpoint().0 {
            return Err(ConfigError::new(
                "mqtt.tls",
                format!(
                    "is set but mqtt.url's scheme `{}` is plain text: use mqtts:// or ssl://",
                    url.scheme()
                ),
            ));
        }
        if t.client_cert.is_empty() != t.client_key.is_empty() {
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
            if !v.is_empty() && !Path::new(v).is_file() {
                return Err(ConfigError::new(
                    format!("mqtt.tls.{k}"),
                    format!("no such file `{v}`"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[bvcsp]
url = "https://192.168.88.11:9781"
username = "admin"
password = "123456"
"#;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn playbox_names_are_at_most_64_characters() {
        let text = |n: usize| {
            format!(
                "[[playbox]]\nname = \"{}\"\nurl = \"https://10.0.0.9:16674\"\nsn = \"S\"\n\
                 username = \"admin\"\npassword = \"x\"\n",
                "n".repeat(n)
            )
        };
        assert!(from_toml(&text(64)).is_ok());
        assert_eq!(from_toml(&text(65)).unwrap_err().key, "playbox[0].name");
    }

    #[test]
    fn ssl_is_tls_and_tls_settings_need_a_tls_scheme() {
        let cfg = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__URL", "ssl://broker")]).unwrap();
        assert_eq!(cfg.mqtt.endpoint(), (true, "broker".into(), 8883));
        let text =
            format!("{MINIMAL}[mqtt]\nurl = \"mqtt://broker\"\n[mqtt.tls]\ninsecure = true\n");
        let e = load_str(&text, &[]).unwrap_err();
        assert_eq!(e.key, "mqtt.tls", "{e}");
        let text =
            format!("{MINIMAL}[mqtt]\nurl = \"ssl://broker:8884\"\n[mqtt.tls]\ninsecure = true\n");
        let cfg = load_str(&text, &[]).unwrap();
        assert_eq!(cfg.mqtt.endpoint(), (true, "broker".into(), 8884));
    }

    #[test]
    fn urls_with_userinfo_are_refused_without_being_echoed() {
        for url in ["mqtt://u:pw-77@broker", "mqtt://u@broker"] {
            let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__URL", url)]).unwrap_err();
            assert_eq!(e.key, "mqtt.url");
            assert!(!e.to_string().contains("pw-77"), "{e}");
        }
        let e = load_str(
            MINIMAL,
            &[("BVCSP2MQTT__BVCSP__URL", "https://a:pw-88@h:9781")],
        )
        .unwrap_err();
        assert!(!e.to_string().contains("pw-88"), "{e}");
    }

    #[test]
    fn toml_errors_name_the_line_but_not_its_text() {
        let text =
            "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"top-\\q-secret\"\n";
        let e = from_toml(text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("line 4"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    fn load_str(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        load(Some(&path), env(pairs))
    }

    #[test]
    fn minimal_file_gets_contract_defaults() {
        let cfg = load_str(MINIMAL, &[]).unwrap();
        let b = cfg.bvcsp.as_ref().unwrap();
        assert_eq!(b.streams, Stream::ALL.to_vec());
        assert_eq!(b.token_transport, TokenTransport::Subprotocol);
        assert_eq!(b.paths.location, "/bvcsp/v1/ws/gpsdata");
        assert_eq!(cfg.mqtt.url, "mqtt://127.0.0.1:1883");
        assert_eq!(cfg.mqtt.base_topic, "bvcsp2mqtt");
        assert_eq!(cfg.mqtt.client_id, "bvcsp2mqtt");
        assert_eq!(cfg.mqtt.qos, 1);
        assert_eq!(cfg.mqtt.keepalive, Duration::from_secs(30));
        assert_eq!(cfg.storage.dir, PathBuf::from("/var/lib/bvcsp2mqtt"));
        assert_eq!(b.keepalive_interval, Duration::from_secs(20));
        assert_eq!(b.pong_timeout, Duration::from_secs(60));
    }

    #[test]
    fn environment_overrides_file_and_splits_lists() {
        let cfg = load_str(
            MINIMAL,
            &[
                ("BVCSP2MQTT__MQTT__URL", "mqtts://broker:8883"),
                ("BVCSP2MQTT__BVCSP__STREAMS", "alarm, location"),
                ("BVCSP2MQTT__BVCSP__TOKEN_TRANSPORT", "query"),
                ("BVCSP2MQTT__MQTT__CLIENT_ID", "007"),
                ("BVCSP2MQTT__MQTT__QOS", "0"),
                ("BVCSP2MQTT__BVCSP__KEEPALIVE_INTERVAL", "5s"),
                ("BVCSP2MQTT__BVCSP__PONG_TIMEOUT", "15s"),
            ],
        )
        .unwrap();
        let b = cfg.bvcsp.as_ref().unwrap();
        assert_eq!(cfg.mqtt.endpoint(), (true, "broker".into(), 8883));
        assert_eq!(b.streams, vec![Stream::Alarm, Stream::Location]);
        assert_eq!(b.token_transport, TokenTransport::Query);
        assert_eq!(cfg.mqtt.client_id, "007", "no numeric coercion of strings");
        assert_eq!(cfg.mqtt.qos, 0);
        assert_eq!(b.keepalive_interval, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load_str(&format!("{MINIMAL}bogus = 1\n"), &[]).unwrap_err();
        assert_eq!(e.key, "bvcsp.bogus", "{e}");
        let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__BOGUS", "1")]).unwrap_err();
        assert_eq!(e.key, "mqtt.bogus", "{e}");
        let e = load_str(&format!("{MINIMAL}[nonsense]\nx = 1\n"), &[]).unwrap_err();
        assert_eq!(e.key, "nonsense", "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load_str(
            &MINIMAL.replace("https://192.168.88.11:9781", "ftp://x"),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "bvcsp.url");
        let e = load_str(MINIMAL, &[("BVCSP2MQTT__BVCSP__STREAMS", "alarm,gps")]).unwrap_err();
        assert_eq!(e.key, "bvcsp.streams", "{e}");
        assert!(e.message.contains("gps"), "{e}");
        let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__KEEPALIVE", "soon")]).unwrap_err();
        assert_eq!(e.key, "mqtt.keepalive", "{e}");
        let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__QOS", "3")]).unwrap_err();
        assert_eq!(e.key, "mqtt.qos");
        let e = load_str(
            MINIMAL,
            &[("BVCSP2MQTT__BVCSP__TLS__FINGERPRINT_SHA256", "abc")],
        )
        .unwrap_err();
        assert_eq!(e.key, "bvcsp.tls.fingerprint_sha256");
        let e = load_str("[bvcsp]\nusername = \"a\"\npassword = \"b\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "bvcsp.url", "{e}");
        let e = load_str("[bvcsp]\nurl = \"http://h\"\nusername = \"a\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "bvcsp.password", "{e}");
        let e = load_str("", &[]).unwrap_err();
        assert_eq!(e.key, "bvcsp.url", "{e}");
    }

    #[test]
    fn playbox_from_environment_is_a_clear_error() {
        let e = load_str(MINIMAL, &[("BVCSP2MQTT__PLAYBOX__0__PASSWORD", "x")]).unwrap_err();
        assert_eq!(e.key, "playbox");
        assert!(e.message.contains("password_file"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cr3t-pass\n").unwrap();
        let text = format!(
            "[bvcsp]\nurl = \"http://h:9780\"\nusername = \"admin\"\npassword_file = \"{}\"\n[mqtt]\npassword = \"brokerpw\"\n",
            pw.display()
        );
        let cfg = load_str(&text, &[]).unwrap();
        assert_eq!(cfg.bvcsp.as_ref().unwrap().password.expose(), "s3cr3t-pass");
        let shown = cfg.redacted_toml();
        assert!(!shown.contains("s3cr3t-pass"), "{shown}");
        assert!(!shown.contains("brokerpw"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{cfg:?}").contains("s3cr3t-pass"));
        let both = text.replace("[mqtt]", "[mqtt]\npassword_file = \"/nonexistent\"");
        let e = load_str(&both, &[]).unwrap_err();
        assert_eq!(e.key, "mqtt.password");
    }

    #[test]
    fn playbox_entries_are_validated() {
        let text = format!(
            "{MINIMAL}[[playbox]]\nname = \"Lobby\"\nurl = \"https://10.0.0.1:16674\"\nsn = \"X\"\npassword = \"p\"\n"
        );
        let e = load_str(&text, &[]).unwrap_err();
        assert_eq!(e.key, "playbox[0].name");
        let ok = text.replace("Lobby", "lobby");
        let cfg = load_str(&ok, &[]).unwrap();
        assert_eq!(cfg.playbox[0].poll_interval, Duration::from_secs(15));
        let inline = ok.replace(
            "password = \"p\"",
            "password = \"p\"\ntls = { mode = \"tofu\" }",
        );
        assert!(load_str(&inline, &[]).is_ok());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "x\n").unwrap();
        let text = include_str!("../config/bvcsp2mqtt.example.toml")
            .replace("/etc/bvcsp2mqtt/bvcsp.password", &pw.display().to_string());
        let cfg = load_str(&text, &[]).unwrap();
        assert_eq!(cfg.bvcsp.unwrap().password.expose(), "x");
    }

    #[test]
    fn app_token_config_needs_no_password() {
        let text = "[bvcsp]\nurl = \"http://h\"\napp_id = \"id\"\napp_key = \"k\"\n";
        let cfg = load_str(text, &[]).unwrap();
        assert!(cfg.bvcsp.unwrap().uses_app_token());
        let e = load_str("[bvcsp]\nurl = \"http://h\"\napp_id = \"id\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "bvcsp.app_key");
    }
}
