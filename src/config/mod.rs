//! Configuration: a TOML file, then `BVCSP2MQTT__SECTION__KEY` environment overrides,
//! then `*_file` secrets, then validation. Every error names the key by its dotted path.
//! Values are typed as they are read (URLs, addresses, schemes, sizes): nothing is parsed
//! again later.

mod bvcsp;
mod homeassistant;
mod mqtt;
mod playbox;
mod secret;
mod service;
mod stream;
mod values;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use bvcsp::{BvcspConfig, BvcspPaths, TlsConfig, TokenTransport, UnknownTokenTransport};
pub use homeassistant::{DiscoveryMode, HomeAssistantConfig};
pub use mqtt::{MqttConfig, MqttTlsConfig, Qos};
pub use playbox::{PlayboxConfig, PlayboxPaths, PlayboxTls, PlayboxTlsMode};
pub use secret::Secret;
pub use service::{DEFAULT_OUTBOX_MAX_BYTES, LogConfig, LogFormat, ServiceConfig, StorageConfig};
pub use stream::{Stream, UnknownStream};
pub use values::{
    HttpScheme, HttpUrl, ListenAddrError, MqttScheme, MqttUrl, SizeError, UrlError, parse_size,
};

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
    pub homeassistant: HomeAssistantConfig,
    #[serde(default)]
    pub playbox: Vec<PlayboxConfig>,
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
        // The config crate writes an array element's field as `list[0]field`.
        let key = text[idx + 10..]
            .trim_end_matches('`')
            .replace("]", "].")
            .replace("]..", "].");
        let key = key.trim_end_matches('.').to_string();
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
    Ok(Secret::new(text.trim_end_matches(['\r', '\n']).to_string()))
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
            p.validate(i, &mut names)?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
