//! What the bridge reads from a box: the candidate paths of each value, what a reply
//! must hold to count, and the contract's `state` payload built from a reading.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::commands::CommandKind;
use crate::json::{as_f64, field};
use crate::timestamp::rfc3339_millis;

/// Candidate paths, in try order (shared/spec/playbox.md §8).
pub const BRIGHTNESS_PATHS: &[&str] = &[
    "/terminal/core/v1/screen/brightness",
    "/terminal/core/v1/brightness",
];
pub const SCREEN_PATHS: &[&str] = &[
    "/terminal/core/v1/screen/power",
    "/terminal/core/v1/screen/status",
    "/terminal/core/v1/screen/power-state",
];
pub const VOLUME_PATHS: &[&str] = &[
    "/terminal/core/v1/device/volume",
    "/terminal/core/v1/volume",
];
pub const INFO_PATHS: &[&str] = &["/terminal/core/v1/version", "/terminal/core/v2/device/info"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Function {
    Brightness,
    Screen,
    Volume,
    Info,
}

impl Function {
    pub(super) fn name(self) -> &'static str {
        match self {
            Function::Brightness => "brightness",
            Function::Screen => "screen",
            Function::Volume => "volume",
            Function::Info => "info",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn defaults(self) -> &'static [&'static str] {
        match self {
            Function::Brightness => BRIGHTNESS_PATHS,
            Function::Screen => SCREEN_PATHS,
            Function::Volume => VOLUME_PATHS,
            Function::Info => INFO_PATHS,
        }
    }

    /// The reply really is this function's when it has this field.
    pub(super) fn expected(self, data: &Value) -> bool {
        match self {
            Function::Brightness | Function::Volume => {
                field(data, "ratio").and_then(as_f64).is_some()
            }
            Function::Screen => field(data, "state").is_some_and(Value::is_string),
            Function::Info => data.is_object(),
        }
    }
}

pub(super) fn function_of(kind: CommandKind) -> Function {
    match kind {
        CommandKind::Brightness => Function::Brightness,
        CommandKind::Screen => Function::Screen,
        CommandKind::Volume => Function::Volume,
    }
}

/// What the box shows, as the contract's `state` payload has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Reading {
    pub(super) brightness: Option<f64>,
    pub(super) screen: Option<String>,
    pub(super) volume: Option<f64>,
}

/// The `state` payload (contract §3.4) for `reading`, with the device info when known.
pub(super) fn state_payload(reading: &Reading, info: Option<&Value>) -> Value {
    let screen = match reading
        .screen
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("OPEN") => "on",
        Some("CLOSE") => "off",
        _ => "unknown",
    };
    let mut p = json!({
        "brightness": reading.brightness,
        "screen": screen,
        "volume": reading.volume,
        "updated_at": rfc3339_millis(SystemTime::now()),
    });
    if let Some(raw) = &reading.screen
        && screen == "unknown"
    {
        p["screen_raw"] = json!(raw);
    }
    if let Some(Value::Object(described)) = info.map(described) {
        for (k, v) in described {
            p[k] = v;
        }
    }
    p
}

/// What a box says of itself (its info reply), under the `state` payload's key names:
/// `sn`, `product_name`, `alias_name`, `firmware`, `model`, `mac`, as far as known.
pub fn described(info: &Value) -> Value {
    let mut p = json!({});
    if info.is_object() {
        for (out, keys) in [
            ("sn", &["sn"][..]),
            ("product_name", &["productName"][..]),
            ("alias_name", &["aliasName"][..]),
            ("firmware", &["mainVersion", "main"][..]),
            ("model", &["model"][..]),
            ("mac", &["mac"][..]),
        ] {
            if let Some(v) = keys
                .iter()
                .find_map(|k| field(info, k))
                .filter(|v| !v.is_null())
            {
                p[out] = v.clone();
            }
        }
    }
    p
}
