//! Typed values the configuration is made of: URLs checked once as they are read (never
//! parsed again later), listen addresses, sizes, lists given either as arrays or
//! comma-separated, and the defaults.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, Stream};

/// Why a URL in the configuration is refused. The value itself is never echoed: a URL
/// may carry a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid URL: {0}")]
    Invalid(#[source] url::ParseError),
    #[error(
        "must not carry a user or password (`user:pass@`): use the username and password \
         keys (or password_file), which are kept out of logs"
    )]
    UserInfo,
    #[error("scheme must be one of {allowed}, got `{got}`")]
    Scheme { allowed: &'static str, got: String },
    #[error("has no host")]
    NoHost,
    #[error("must not have a path")]
    HasPath,
}

/// The checks every configured URL passes: parses, no `user:pass@`, a host.
fn parse_url(text: &str) -> Result<Url, UrlError> {
    let url = Url::parse(text).map_err(UrlError::Invalid)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::UserInfo);
    }
    Ok(url)
}

fn has_host(url: &Url) -> Result<(), UrlError> {
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    Ok(())
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpScheme {
    Http,
    Https,
}

/// An `http://` or `https://` URL of an upstream (the BVCSP server, a play box).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    url: Url,
    scheme: HttpScheme,
    /// As written: shown back (bridge info, the printed configuration) unchanged.
    given: String,
}

impl HttpUrl {
    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn scheme(&self) -> HttpScheme {
        self.scheme
    }

    /// As the configuration wrote it.
    pub fn as_str(&self) -> &str {
        &self.given
    }
}

impl FromStr for HttpUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let url = parse_url(text)?;
        let scheme = match url.scheme() {
            "http" => HttpScheme::Http,
            "https" => HttpScheme::Https,
            other => {
                return Err(UrlError::Scheme {
                    allowed: "http, https",
                    got: other.to_string(),
                });
            }
        };
        has_host(&url)?;
        Ok(HttpUrl {
            url,
            scheme,
            given: text.to_string(),
        })
    }
}

/// `mqtt://` or `tcp://` (plain), `mqtts://` or `ssl://` (TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttScheme {
    Mqtt,
    Tcp,
    Mqtts,
    Ssl,
}

impl MqttScheme {
    pub fn is_tls(self) -> bool {
        matches!(self, MqttScheme::Mqtts | MqttScheme::Ssl)
    }

    pub fn name(self) -> &'static str {
        match self {
            MqttScheme::Mqtt => "mqtt",
            MqttScheme::Tcp => "tcp",
            MqttScheme::Mqtts => "mqtts",
            MqttScheme::Ssl => "ssl",
        }
    }
}

/// The broker's URL: scheme, host and port, no path.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttUrl {
    scheme: MqttScheme,
    host: String,
    port: u16,
    given: String,
}

impl MqttUrl {
    pub fn scheme(&self) -> MqttScheme {
        self.scheme
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port given, or the scheme's default (1883 plain, 8883 TLS).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn as_str(&self) -> &str {
        &self.given
    }
}

impl FromStr for MqttUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let url = parse_url(text)?;
        let scheme = match url.scheme() {
            "mqtt" => MqttScheme::Mqtt,
            "tcp" => MqttScheme::Tcp,
            "mqtts" => MqttScheme::Mqtts,
            "ssl" => MqttScheme::Ssl,
            other => {
                return Err(UrlError::Scheme {
                    allowed: "mqtt, mqtts, tcp, ssl",
                    got: other.to_string(),
                });
            }
        };
        has_host(&url)?;
        if !url.path().is_empty() && url.path() != "/" {
            return Err(UrlError::HasPath);
        }
        let default_port = if scheme.is_tls() { 8883 } else { 1883 };
        Ok(MqttUrl {
            scheme,
            host: url.host_str().unwrap_or_default().to_string(),
            port: url.port().unwrap_or(default_port),
            given: text.to_string(),
        })
    }
}

/// Serde for the URL types: a string, shown back as written.
macro_rules! text_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.given)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.given, f)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.given)
            }
        }
    };
}

text_serde!(HttpUrl);
text_serde!(MqttUrl);
text_serde!(CertFingerprint);

/// A pinned server certificate: the SHA-256 of its DER, as hex (colons and spaces
/// allowed), checked once as it is read.
#[derive(Clone, PartialEq, Eq)]
pub struct CertFingerprint {
    sha256: [u8; 32],
    given: String,
}

impl CertFingerprint {
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
}

impl FromStr for CertFingerprint {
    type Err = crate::tls::FingerprintError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(CertFingerprint {
            sha256: crate::tls::parse_fingerprint(text)?,
            given: text.to_string(),
        })
    }
}

/// The longest duration any key takes: 366 days. Longer values are refused as they are
/// read, so no timer or deadline computed from one can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Serde for every configured duration: humantime text (`15s`, `5m`), at most
/// [`MAX_DURATION`].
pub(super) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let value: Duration = humantime_serde::deserialize(d)?;
        if value > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "must be at most {} (366 days)",
                humantime::format_duration(MAX_DURATION)
            )));
        }
        Ok(value)
    }
}

/// Serde for an optional file's path, written as a string: `""` (the default written
/// out, as in the example configuration) is no file.
pub(super) mod optional_path {
    use super::*;

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.collect_str(&p.display()),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let text = String::deserialize(d)?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }
}

/// An address to listen on, `address:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected address:port, e.g. 127.0.0.1:9782, got `{0}`")]
pub struct ListenAddrError(pub String);

pub(super) mod listen_addr {
    use super::*;

    pub fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(ListenAddrError(text)))
    }
}

/// A byte count: an integer, or a string with a unit (B, KB, MB, GB, KiB, MiB, GiB).
pub(super) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

/// A size that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("not a size: `{0}` (e.g. 268435456 or \"256MiB\")")]
    NotASize(String),
    #[error("unknown size unit `{unit}` in `{text}`")]
    UnknownUnit { unit: String, text: String },
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        u => {
            return Err(SizeError::UnknownUnit {
                unit: u.to_string(),
                text: text.to_string(),
            });
        }
    };
    Ok((n * mult as f64) as u64)
}

/// A list given either as a TOML array or, from the environment, comma-separated.
pub(super) fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
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

pub(super) fn check_path(key: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::new(
            key,
            format!("must start with `/`, got `{value}`"),
        ));
    }
    Ok(())
}

pub(super) fn nonzero(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

pub(super) fn default_app_from() -> String {
    "bvcsp2mqtt".into()
}
pub(super) fn default_streams() -> Vec<Stream> {
    Stream::ALL.to_vec()
}
pub(super) fn default_backfill_max_pages() -> u32 {
    200
}
pub(super) fn default_backfill_page_size() -> u32 {
    100
}
pub(super) fn default_page_size() -> u32 {
    1000
}
pub(super) fn default_mqtt_url() -> MqttUrl {
    "mqtt://127.0.0.1:1883"
        .parse()
        .expect("a valid constant URL")
}
pub(super) fn default_base_topic() -> String {
    "bvcsp2mqtt".into()
}
pub(super) fn default_client_id() -> String {
    "bvcsp2mqtt".into()
}
pub(super) fn default_max_packet() -> usize {
    1 << 20
}
pub(super) fn default_storage_dir() -> PathBuf {
    PathBuf::from("/var/lib/bvcsp2mqtt")
}
pub(super) fn default_log_level() -> String {
    "info".into()
}
pub(super) fn default_playbox_user() -> String {
    "admin".into()
}
pub(super) fn d_500ms() -> Duration {
    Duration::from_millis(500)
}
pub(super) fn d_1s() -> Duration {
    Duration::from_secs(1)
}
pub(super) fn d_1500ms() -> Duration {
    Duration::from_millis(1500)
}
pub(super) fn d_10s() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn d_15s() -> Duration {
    Duration::from_secs(15)
}
pub(super) fn d_20s() -> Duration {
    Duration::from_secs(20)
}
pub(super) fn d_30s() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn d_60s() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn d_5m() -> Duration {
    Duration::from_secs(5 * 60)
}
pub(super) fn d_60m() -> Duration {
    Duration::from_secs(60 * 60)
}
pub(super) fn d_15m() -> Duration {
    Duration::from_secs(15 * 60)
}
pub(super) fn d_1h() -> Duration {
    Duration::from_secs(3600)
}
pub(super) fn d_2s() -> Duration {
    Duration::from_secs(2)
}
pub(super) fn d_2m() -> Duration {
    Duration::from_secs(120)
}
pub(super) fn d_24h() -> Duration {
    Duration::from_secs(24 * 3600)
}
pub(super) fn yes() -> bool {
    true
}
