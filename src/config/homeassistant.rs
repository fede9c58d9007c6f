//! The `[homeassistant]` section (contract §3.5).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// How the discovery messages are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryMode {
    /// One message per thing at `{prefix}/device/{node}/config` (Home Assistant 2024.11+).
    #[default]
    Device,
    /// One message per entity at `{prefix}/{platform}/{node}/{component}/config`, for
    /// consumers that read only per-component discovery (older openHAB bindings).
    Component,
}

impl std::str::FromStr for DiscoveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device" => Ok(DiscoveryMode::Device),
            "component" => Ok(DiscoveryMode::Component),
            _ => Err(format!("expected `device` or `component`, got `{s}`")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Announce every device, play box and the bridge itself (off by default).
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_prefix")]
    pub discovery_prefix: String,
    /// Home Assistant's birth topic: `online` there makes the bridge announce again.
    #[serde(default = "default_status_topic")]
    pub status_topic: String,
    #[serde(default)]
    pub discovery: DiscoveryMode,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            enabled: false,
            discovery_prefix: default_prefix(),
            status_topic: default_status_topic(),
            discovery: DiscoveryMode::Device,
        }
    }
}

fn default_prefix() -> String {
    "homeassistant".into()
}

fn default_status_topic() -> String {
    "homeassistant/status".into()
}

/// A topic the bridge publishes to or subscribes to: not empty, no wildcards, no NUL,
/// no empty level at either end.
fn check_topic(key: &str, topic: &str) -> Result<(), ConfigError> {
    if topic.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(ConfigError::new(
            key,
            format!("must not contain `+`, `#` or NUL, got `{topic}`"),
        ));
    }
    if topic.starts_with('/') || topic.ends_with('/') {
        return Err(ConfigError::new(
            key,
            format!("must not start or end with `/`, got `{topic}`"),
        ));
    }
    if topic.len() > 1024 {
        return Err(ConfigError::new(key, "must be at most 1024 bytes"));
    }
    Ok(())
}

impl HomeAssistantConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_topic("homeassistant.discovery_prefix", &self.discovery_prefix)?;
        check_topic("homeassistant.status_topic", &self.status_topic)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: HomeAssistantConfig = toml::from_str("").unwrap();
        assert_eq!(c, HomeAssistantConfig::default());
        assert!(!c.enabled);
        assert_eq!(c.discovery_prefix, "homeassistant");
        assert_eq!(c.status_topic, "homeassistant/status");
        assert_eq!(c.discovery, DiscoveryMode::Device);
        c.validate().unwrap();
        let c: HomeAssistantConfig = toml::from_str("discovery = \"component\"").unwrap();
        assert_eq!(c.discovery, DiscoveryMode::Component);
        assert!(toml::from_str::<HomeAssistantConfig>("discovery = \"both\"").is_err());
        assert!(toml::from_str::<HomeAssistantConfig>("enable = true").is_err());
        for bad in ["", "ha/#", "a/+/b", "/ha", "ha/"] {
            let c = HomeAssistantConfig {
                discovery_prefix: bad.into(),
                ..HomeAssistantConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "homeassistant.discovery_prefix", "{bad}");
        }
        let c = HomeAssistantConfig {
            status_topic: "ha/#".into(),
            ..HomeAssistantConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "homeassistant.status_topic");
    }
}
