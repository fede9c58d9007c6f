//! Home Assistant discovery end to end: the BVCSP and play-box simulators, an embedded
//! broker, the bridge in-process. The discovery messages are checked field by field
//! against what Home Assistant's MQTT integration accepts (the schemas of
//! homeassistant/components/mqtt/: schemas.py, discovery.py, config.py, and the
//! binary_sensor, sensor, switch, number, event and device_tracker platforms); see
//! `ha` below for each rule and where it comes from.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt::config::Config;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
use bvcsp2mqtt_testkit::playbox::{PlayboxOptions, PlayboxSim};
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const PREFIX: &str = "homeassistant";

/// What Home Assistant's MQTT integration accepts, as read from its sources.
mod ha {
    use serde_json::{Map, Value};

    /// const.py `SUPPORTED_COMPONENTS` (the platforms this bridge uses are among them).
    pub const PLATFORMS: &[&str] = &[
        "binary_sensor",
        "device_tracker",
        "event",
        "number",
        "sensor",
        "switch",
    ];

    /// Keys every entity platform takes: schemas.py `MQTT_ENTITY_COMMON_SCHEMA` (with
    /// `_MQTT_AVAILABILITY_SCHEMA`) and config.py `MQTT_BASE_SCHEMA` (`qos`, `encoding`,
    /// `group`). `object_id` is gone from current Home Assistant (its replacement is
    /// `default_entity_id`); a key outside these lists is dropped silently
    /// (`extra=REMOVE_EXTRA` in every `DISCOVERY_SCHEMA`), which would be our bug.
    const COMMON: &[&str] = &[
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "payload_available",
        "payload_not_available",
        "device",
        "origin",
        "entity_picture",
        "enabled_by_default",
        "entity_category",
        "icon",
        "json_attributes_topic",
        "json_attributes_template",
        "default_entity_id",
        "unique_id",
        "qos",
        "encoding",
        "group",
        "name",
    ];

    fn platform_keys(platform: &str) -> &'static [&'static str] {
        match platform {
            // binary_sensor.py PLATFORM_SCHEMA_MODERN (MQTT_RO_SCHEMA + its own keys).
            "binary_sensor" => &[
                "state_topic",
                "value_template",
                "device_class",
                "expire_after",
                "force_update",
                "off_delay",
                "payload_off",
                "payload_on",
            ],
            // sensor.py _PLATFORM_SCHEMA_BASE.
            "sensor" => &[
                "state_topic",
                "value_template",
                "device_class",
                "expire_after",
                "force_update",
                "last_reset_value_template",
                "options",
                "suggested_display_precision",
                "state_class",
                "unit_of_measurement",
            ],
            // switch.py (MQTT_RW_SCHEMA + its own keys).
            "switch" => &[
                "command_topic",
                "optimistic",
                "retain",
                "state_topic",
                "command_template",
                "payload_off",
                "payload_on",
                "state_off",
                "state_on",
                "value_template",
                "device_class",
            ],
            // number.py _PLATFORM_SCHEMA_BASE.
            "number" => &[
                "command_topic",
                "optimistic",
                "retain",
                "state_topic",
                "command_template",
                "device_class",
                "max",
                "min",
                "mode",
                "payload_reset",
                "step",
                "unit_of_measurement",
                "value_template",
            ],
            // event.py _PLATFORM_SCHEMA_BASE (MQTT_RO_SCHEMA + event_types).
            "event" => &[
                "state_topic",
                "value_template",
                "device_class",
                "event_types",
            ],
            // device_tracker.py PLATFORM_SCHEMA_MODERN_BASE.
            "device_tracker" => &[
                "state_topic",
                "value_template",
                "payload_home",
                "payload_not_home",
                "payload_reset",
                "source_type",
            ],
            _ => &[],
        }
    }

    fn string(v: &Value, what: &str) -> String {
        v.as_str()
            .unwrap_or_else(|| panic!("{what} must be a string, got {v}"))
            .to_string()
    }

    /// util.py `valid_subscribe_topic`: non-empty, wildcards only as whole levels.
    pub fn subscribe_topic(t: &str, what: &str) {
        assert!(!t.is_empty() && t.len() <= 65535, "{what}: {t:?}");
        for (i, level) in t.split('/').enumerate() {
            if level.contains('+') {
                assert_eq!(level, "+", "{what}: `+` must be a whole level in {t:?}");
            }
            if level.contains('#') {
                assert_eq!(level, "#", "{what}: `#` must be a whole level in {t:?}");
                assert_eq!(i, t.split('/').count() - 1, "{what}: `#` must be last");
            }
        }
        assert!(!t.contains('\0'), "{what}");
    }

    /// util.py `valid_publish_topic`: no wildcards at all.
    fn publish_topic(t: &str, what: &str) {
        subscribe_topic(t, what);
        assert!(!t.contains(['+', '#']), "{what}: no wildcards in {t:?}");
    }

    /// schemas.py `MQTT_ENTITY_DEVICE_INFO_SCHEMA`: strings, `connections` pairs, at
    /// least one of `identifiers`/`connections`; entity.py logs when `name` is missing.
    pub fn device(d: &Value) {
        let d = d.as_object().expect("device is a mapping");
        let allowed = [
            "identifiers",
            "connections",
            "manufacturer",
            "model",
            "model_id",
            "name",
            "hw_version",
            "serial_number",
            "sw_version",
            "via_device",
            "suggested_area",
            "configuration_url",
        ];
        for k in d.keys() {
            assert!(allowed.contains(&k.as_str()), "unknown device key {k}");
        }
        let ids = d["identifiers"].as_array().expect("identifiers is a list");
        assert!(!ids.is_empty());
        for id in ids {
            string(id, "identifiers[]");
        }
        if let Some(c) = d.get("connections") {
            for pair in c.as_array().expect("connections is a list") {
                let pair = pair.as_array().expect("a connection is a pair");
                assert_eq!(pair.len(), 2);
                string(&pair[0], "connection type");
                string(&pair[1], "connection value");
            }
        }
        for k in [
            "name",
            "manufacturer",
            "model",
            "sw_version",
            "hw_version",
            "serial_number",
            "via_device",
        ] {
            if let Some(v) = d.get(k) {
                string(v, k);
            }
        }
        assert!(d.contains_key("name"), "a device must have a name");
    }

    /// schemas.py `MQTT_ORIGIN_INFO_SCHEMA`: `name` required; `sw_version`, `support_url`.
    pub fn origin(o: &Value) {
        let o = o.as_object().expect("origin is a mapping");
        string(&o["name"], "origin.name");
        for k in o.keys() {
            assert!(
                ["name", "sw_version", "support_url"].contains(&k.as_str()),
                "unknown origin key {k}"
            );
        }
    }

    fn availability(c: &Map<String, Value>, what: &str) {
        assert!(
            !(c.contains_key("availability") && c.contains_key("availability_topic")),
            "{what}: availability and availability_topic are exclusive"
        );
        if let Some(mode) = c.get("availability_mode") {
            assert!(
                ["all", "any", "latest"].contains(&mode.as_str().unwrap()),
                "{what}"
            );
        }
        if let Some(list) = c.get("availability") {
            for a in list.as_array().expect("availability is a list") {
                let a = a.as_object().unwrap();
                subscribe_topic(&string(&a["topic"], "availability.topic"), what);
                for k in a.keys() {
                    assert!(
                        [
                            "topic",
                            "payload_available",
                            "payload_not_available",
                            "value_template"
                        ]
                        .contains(&k.as_str()),
                        "{what}: unknown availability key {k}"
                    );
                }
                assert_eq!(a["payload_available"], "online");
                assert_eq!(a["payload_not_available"], "offline");
            }
        }
    }

    /// One component: its platform's `DISCOVERY_SCHEMA` and the device-based extras
    /// (schemas.py `_COMPONENT_CONFIG_SCHEMA`: `platform` in SUPPORTED_COMPONENTS and,
    /// for an entity platform, `unique_id` required).
    pub fn component(platform: &str, c: &Map<String, Value>, what: &str) {
        assert!(PLATFORMS.contains(&platform), "{what}: platform {platform}");
        for k in c.keys() {
            assert!(
                k == "platform"
                    || COMMON.contains(&k.as_str())
                    || platform_keys(platform).contains(&k.as_str()),
                "{what}: `{k}` is not a key Home Assistant's {platform} takes"
            );
        }
        string(&c["unique_id"], "unique_id");
        assert!(
            !c.contains_key("object_id"),
            "{what}: object_id is deprecated"
        );
        if let Some(n) = c.get("name") {
            assert!(n.is_string() || n.is_null(), "{what}: name");
        }
        if let Some(q) = c.get("qos") {
            assert!([0, 1, 2].contains(&q.as_i64().unwrap()), "{what}: qos");
        }
        if let Some(cat) = c.get("entity_category") {
            // helpers/entity.py ENTITY_CATEGORIES_SCHEMA.
            assert!(
                ["config", "diagnostic"].contains(&cat.as_str().unwrap()),
                "{what}"
            );
        }
        if let Some(icon) = c.get("icon") {
            // cv.icon: "prefix:name".
            assert!(icon.as_str().unwrap().contains(':'), "{what}: icon");
        }
        availability(c, what);
        if let Some(t) = c.get("json_attributes_topic") {
            subscribe_topic(&string(t, "json_attributes_topic"), what);
        }
        let state_topic = || {
            let t = string(
                c.get("state_topic")
                    .unwrap_or_else(|| panic!("{what}: state_topic is required")),
                "state_topic",
            );
            subscribe_topic(&t, what);
        };
        match platform {
            "binary_sensor" => {
                state_topic();
                if let Some(dc) = c.get("device_class") {
                    // homeassistant/components/binary_sensor BinarySensorDeviceClass.
                    assert!(
                        ["connectivity", "power", "problem", "running"]
                            .contains(&dc.as_str().unwrap())
                    );
                }
                string(&c["payload_on"], "payload_on");
                string(&c["payload_off"], "payload_off");
            }
            "sensor" => {
                state_topic();
                // sensor.py validate_sensor_state_and_device_class_config.
                if let Some(options) = c.get("options") {
                    assert!(
                        !options.as_array().unwrap().is_empty(),
                        "{what}: empty options"
                    );
                    assert_eq!(c["device_class"], "enum", "{what}: options need enum");
                    assert!(
                        !c.contains_key("state_class") && !c.contains_key("unit_of_measurement")
                    );
                }
                if let Some(sc) = c.get("state_class") {
                    assert!(
                        [
                            "measurement",
                            "total",
                            "total_increasing",
                            "measurement_angle"
                        ]
                        .contains(&sc.as_str().unwrap())
                    );
                }
                if let Some(dc) = c.get("device_class") {
                    assert!(
                        ["enum", "duration"].contains(&dc.as_str().unwrap()),
                        "{what}"
                    );
                }
            }
            "switch" => {
                publish_topic(&string(&c["command_topic"], "command_topic"), what);
                state_topic();
                string(&c["payload_on"], "payload_on");
                string(&c["payload_off"], "payload_off");
                assert_eq!(c["retain"], false, "{what}: commands must not be retained");
            }
            "number" => {
                publish_topic(&string(&c["command_topic"], "command_topic"), what);
                state_topic();
                // number.py validate_config and the step range.
                let (min, max) = (c["min"].as_f64().unwrap(), c["max"].as_f64().unwrap());
                assert!(min < max, "{what}: max must be > min");
                assert!(c["step"].as_f64().unwrap() >= 1e-3);
                assert!(["auto", "box", "slider"].contains(&c["mode"].as_str().unwrap()));
                assert_eq!(c["retain"], false, "{what}: commands must not be retained");
            }
            "event" => {
                state_topic();
                let types = c["event_types"].as_array().expect("event_types is a list");
                assert!(!types.is_empty());
                for t in types {
                    string(t, "event_types[]");
                }
            }
            "device_tracker" => {
                // device_tracker.py valid_config: state_topic or json_attributes_topic.
                assert!(c.contains_key("state_topic") || c.contains_key("json_attributes_topic"));
                // SourceType.
                assert!(
                    ["gps", "router", "bluetooth", "bluetooth_le"]
                        .contains(&c["source_type"].as_str().unwrap())
                );
            }
            _ => unreachable!(),
        }
    }

    /// A device-based discovery message: schemas.py `DEVICE_DISCOVERY_SCHEMA` (`device`,
    /// `components` and `origin` required) and discovery.py's topic matcher
    /// (`[a-zA-Z0-9_-]` node ids).
    pub fn device_message(
        topic: &str,
        payload: &Value,
    ) -> Vec<(String, String, Map<String, Value>)> {
        let node = topic
            .strip_prefix("homeassistant/device/")
            .and_then(|r| r.strip_suffix("/config"))
            .expect("device discovery topic");
        assert!(
            node.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "node id {node}"
        );
        let p = payload.as_object().expect("a JSON object");
        for k in p.keys() {
            assert!(
                [
                    "device",
                    "origin",
                    "components",
                    "availability",
                    "availability_mode",
                    "availability_topic",
                    "state_topic",
                    "command_topic",
                    "qos",
                    "encoding"
                ]
                .contains(&k.as_str()),
                "unknown or abbreviated top-level key {k}"
            );
        }
        device(&p["device"]);
        origin(&p["origin"]);
        let mut out = Vec::new();
        for (id, c) in p["components"]
            .as_object()
            .expect("components is a mapping")
        {
            let c = c.as_object().unwrap();
            let platform = string(&c["platform"], "platform");
            if c.len() == 1 {
                // Only `platform`: the removal of a component (discovery.py).
                continue;
            }
            component(&platform, c, &format!("{node}/{id}"));
            out.push((id.clone(), platform, c.clone()));
        }
        out
    }
}

fn config_topic(node: &str) -> String {
    format!("{PREFIX}/device/{node}/config")
}

fn box_entry(name: &str, sim: &PlayboxSim, commands: bool) -> String {
    format!(
        "[[playbox]]\nname = \"{name}\"\nurl = \"{url}\"\nsn = \"2ZTA00000X0A00000000\"\n\
         password = \"SN2008@+\"\npoll_interval = \"1s\"\nrequest_timeout = \"2s\"\n\
         commands = {commands}\n",
        url = sim.url()
    )
}

fn ha_config(sim: &BvcspSim, broker: std::net::SocketAddr, extra: &str) -> Config {
    bridge_config(
        sim,
        broker,
        &format!("\n[homeassistant]\nenabled = true\n{extra}"),
    )
}

async fn helmet_sim() -> BvcspSim {
    let mut helmet = SimDevice::new("PU_55AA0000", "Helmet 07", true);
    helmet.lat = 31.849722;
    helmet.lng = 117.207138;
    BvcspSim::start(SimOptions {
        devices: vec![helmet, SimDevice::new("PU_264F708E", "Truck 7", false)],
        ..Default::default()
    })
    .await
    .expect("simulator")
}

/// The newest retained-looking config on `topic` that satisfies `pred`.
async fn config_on(obs: &Observer, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
    obs.wait_topic(topic, T, |r| !r.payload.is_empty() && pred(&r.json()))
        .await
        .json()
}

fn by_id(
    list: &[(String, String, serde_json::Map<String, Value>)],
) -> BTreeMap<String, (String, Value)> {
    list.iter()
        .map(|(id, p, c)| (id.clone(), (p.clone(), Value::Object(c.clone()))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_a_play_box_and_the_bridge_are_announced_as_home_assistant_requires() {
    let sim = helmet_sim().await;
    let lobby = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(&sim, broker, &box_entry("lobby", &lobby, true)))
        .await
        .unwrap();

    // The camera.
    let camera = config_on(&obs, &config_topic("bvcsp2mqtt_PU_55AA0000"), |v| {
        v["device"]["name"] == "Helmet 07"
    })
    .await;
    let comps = by_id(&ha::device_message(
        &config_topic("bvcsp2mqtt_PU_55AA0000"),
        &camera,
    ));
    assert_eq!(
        comps.keys().cloned().collect::<Vec<_>>(),
        vec!["alarm", "connectivity", "position"]
    );
    let dev = &camera["device"];
    assert_eq!(dev["identifiers"], json!(["bvcsp2mqtt_PU_55AA0000"]));
    assert_eq!(dev["via_device"], "bvcsp2mqtt_bridge");
    assert_eq!(camera["origin"]["name"], "bvcsp2mqtt");
    let (p, conn) = &comps["connectivity"];
    assert_eq!(p, "binary_sensor");
    assert_eq!(
        conn["state_topic"],
        "bvcsp2mqtt/device/PU_55AA0000/availability"
    );
    assert_eq!(conn["device_class"], "connectivity");
    assert_eq!(conn["entity_category"], "diagnostic");
    assert_eq!(
        (conn["payload_on"].as_str(), conn["payload_off"].as_str()),
        (Some("online"), Some("offline"))
    );
    // An offline camera shows "off", not "unavailable": only the bridge's availability.
    assert_eq!(
        conn["availability"],
        json!([{"topic": "bvcsp2mqtt/bridge/state",
        "payload_available": "online", "payload_not_available": "offline"}])
    );
    assert!(conn.get("availability_mode").is_none());
    let (p, pos) = &comps["position"];
    assert_eq!(p, "device_tracker");
    assert_eq!(pos["source_type"], "gps");
    assert_eq!(
        pos["json_attributes_topic"],
        "bvcsp2mqtt/device/PU_55AA0000/location"
    );
    let tpl = pos["json_attributes_template"].as_str().unwrap();
    assert!(
        tpl.contains("'latitude': value_json.lat") && tpl.contains("'longitude': value_json.lng"),
        "{tpl}"
    );
    assert!(!tpl.contains("raw"), "raw stays out of the recorder");
    assert_eq!(pos["availability_mode"], "all");
    let avail: Vec<&str> = pos["availability"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        avail,
        vec![
            "bvcsp2mqtt/bridge/state",
            "bvcsp2mqtt/device/PU_55AA0000/availability"
        ]
    );
    let (p, alarm) = &comps["alarm"];
    assert_eq!(p, "event");
    assert_eq!(
        alarm["state_topic"],
        "bvcsp2mqtt/device/PU_55AA0000/alarm/+"
    );
    let types: BTreeSet<&str> = alarm["event_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types.len(),
        bvcsp2mqtt::bvcsp::model::ALARM_LABELS.len() + 1
    );
    for t in [
        "sos",
        "overspeed",
        "fall",
        "working_at_height",
        "user_logout",
        "other",
    ] {
        assert!(types.contains(t), "{t}");
    }
    // The alarm payload carries what the event entity needs, within its types. (Sent
    // once the alarm socket is open: these 2024 alarms are older than anything backfill
    // would read back, so one sent to no socket would be gone.)
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    let sent = sim.inject(
        Stream::Alarm,
        json!({"key": "ha-1", "type": 5, "time": 1717400123,
        "devID": "PU_55AA0000", "devName": "Helmet 07", "status": 1, "desc": "SOS"}),
    );
    assert!(sent >= 1, "an alarm socket is open");
    sim.inject(
        Stream::Alarm,
        json!({"key": "ha-2", "type": 8192, "time": 1717400124,
        "devID": "PU_55AA0000", "status": 1}),
    );
    let sos = obs
        .wait_topic("bvcsp2mqtt/device/PU_55AA0000/alarm/sos", T, |_| true)
        .await;
    assert_eq!(sos.json()["event_type"], "sos");
    let odd = obs
        .wait_topic("bvcsp2mqtt/device/PU_55AA0000/alarm/type_8192", T, |_| true)
        .await;
    assert_eq!(odd.json()["event_type"], "other");
    assert!(types.contains(odd.json()["event_type"].as_str().unwrap()));
    let tpl = alarm["value_template"].as_str().unwrap();
    for field in [
        "value_json.event_type",
        "value_json.state",
        "value_json.label",
        "value_json.event_id",
    ] {
        assert!(tpl.contains(field), "{field} in {tpl}");
        let key = field.trim_start_matches("value_json.");
        assert!(sos.json().get(key).is_some(), "the alarm payload has {key}");
    }
    // The location payload has what the tracker's template reads.
    let loc = obs
        .wait_topic("bvcsp2mqtt/device/PU_55AA0000/location", T, |_| true)
        .await
        .json();
    assert!(loc["lat"].is_number() && loc["lng"].is_number(), "{loc}");

    // The play box, once it has described itself.
    let node = "bvcsp2mqtt_playbox_lobby";
    let pb = config_on(&obs, &config_topic(node), |v| {
        v["device"].get("sw_version").is_some()
    })
    .await;
    let comps = by_id(&ha::device_message(&config_topic(node), &pb));
    assert_eq!(
        comps.keys().cloned().collect::<Vec<_>>(),
        vec!["brightness", "connectivity", "screen", "volume"]
    );
    let dev = &pb["device"];
    assert_eq!(dev["name"], "lobby");
    assert_eq!(dev["manufacturer"], "NovaStar");
    assert_eq!(dev["serial_number"], "2ZTA00000X0A00000000");
    assert_eq!(dev["sw_version"], "V4.6.2");
    assert_eq!(dev["model"], "T2");
    assert_eq!(dev["connections"], json!([["mac", "00:11:22:33:44:55"]]));
    assert_eq!(dev["via_device"], "bvcsp2mqtt_bridge");
    // The components of the read-only layout are marked removed (only `platform`).
    for retired in ["screen_state", "brightness_level", "volume_level"] {
        assert_eq!(
            pb["components"][retired].as_object().unwrap().len(),
            1,
            "{retired}"
        );
    }
    let (p, screen) = &comps["screen"];
    assert_eq!(p, "switch");
    assert_eq!(
        screen["command_topic"],
        "bvcsp2mqtt/playbox/lobby/screen/set"
    );
    assert_eq!(screen["state_topic"], "bvcsp2mqtt/playbox/lobby/state");
    assert_eq!(
        (
            screen["payload_on"].as_str(),
            screen["payload_off"].as_str()
        ),
        (Some("on"), Some("off"))
    );
    for id in ["brightness", "volume"] {
        let (p, n) = &comps[id];
        assert_eq!(p, "number");
        assert_eq!(
            n["command_topic"],
            format!("bvcsp2mqtt/playbox/lobby/{id}/set")
        );
        assert_eq!(
            (n["min"].as_f64(), n["max"].as_f64(), n["step"].as_f64()),
            (Some(0.0), Some(100.0), Some(1.0))
        );
        assert_eq!(n["mode"], "slider");
        assert_eq!(n["unit_of_measurement"], "%");
        assert!(
            n["value_template"]
                .as_str()
                .unwrap()
                .contains(&format!("value_json.{id}"))
        );
        assert_eq!(n["availability_mode"], "all");
    }
    let state = obs
        .wait_topic("bvcsp2mqtt/playbox/lobby/state", T, |_| true)
        .await
        .json();
    assert!(
        state["brightness"].is_number() && state["volume"].is_number() && state["screen"] == "on",
        "{state}"
    );

    // The bridge.
    let node = "bvcsp2mqtt_bridge";
    let br = config_on(&obs, &config_topic(node), |_| true).await;
    let comps = by_id(&ha::device_message(&config_topic(node), &br));
    assert_eq!(
        comps.keys().cloned().collect::<Vec<_>>(),
        vec![
            "backfill",
            "bvcsp_link",
            "connectivity",
            "outbox_depth",
            "outbox_oldest_age",
            "version"
        ]
    );
    assert!(br["device"].get("via_device").is_none());
    assert_eq!(br["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
    let (_, conn) = &comps["connectivity"];
    assert_eq!(conn["state_topic"], "bvcsp2mqtt/bridge/state");
    assert!(
        conn.get("availability").is_none(),
        "an offline bridge shows off"
    );
    for id in [
        "backfill",
        "bvcsp_link",
        "outbox_depth",
        "outbox_oldest_age",
        "version",
    ] {
        assert_eq!(comps[id].1["entity_category"], "diagnostic", "{id}");
    }
    assert_eq!(
        comps["bvcsp_link"].1["state_topic"],
        "bvcsp2mqtt/bridge/link/bvcsp"
    );
    assert_eq!(
        comps["bvcsp_link"].1["options"],
        json!(["up", "connecting", "down", "auth_failed"])
    );
    let link = obs.wait_link("up", T).await;
    assert!(["up", "connecting", "down", "auth_failed"].contains(&link["state"].as_str().unwrap()));
    assert!(
        ["ok", "off"].contains(&link["backfill"].as_str().unwrap()),
        "{link}"
    );

    // unique_ids: prefixed with the base topic, never shared.
    let mut uids = BTreeSet::new();
    for m in obs
        .all()
        .iter()
        .filter(|r| r.topic.starts_with("homeassistant/device/") && !r.payload.is_empty())
    {
        for (_, _, c) in ha::device_message(&m.topic, &m.json()) {
            let uid = c["unique_id"].as_str().unwrap().to_string();
            assert!(uid.starts_with("bvcsp2mqtt_"), "{uid}");
            uids.insert((m.topic.clone(), uid));
        }
    }
    let distinct: BTreeSet<&String> = uids.iter().map(|(_, u)| u).collect();
    let per_topic: BTreeMap<&String, usize> = uids.iter().fold(BTreeMap::new(), |mut m, (t, _)| {
        *m.entry(t).or_default() += 1;
        m
    });
    assert_eq!(
        distinct.len(),
        per_topic.values().sum::<usize>(),
        "unique ids are unique"
    );
    // Every discovery message is retained: a subscriber joining now gets them all.
    let late = Observer::start(broker).await;
    for node in [
        "bvcsp2mqtt_PU_55AA0000",
        "bvcsp2mqtt_PU_264F708E",
        "bvcsp2mqtt_playbox_lobby",
        "bvcsp2mqtt_bridge",
    ] {
        late.wait_topic(&config_topic(node), T, |r| {
            r.retain && !r.payload.is_empty()
        })
        .await;
    }
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_component_layout_has_the_same_entities() {
    let sim = helmet_sim().await;
    let lobby = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(
        &sim,
        broker,
        &format!(
            "discovery = \"component\"\n{}",
            box_entry("lobby", &lobby, false)
        ),
    ))
    .await
    .unwrap();
    // Read-only play box: sensors, and the command layout's components removed.
    let topics = [
        ("binary_sensor", "bvcsp2mqtt_PU_55AA0000", "connectivity"),
        ("device_tracker", "bvcsp2mqtt_PU_55AA0000", "position"),
        ("event", "bvcsp2mqtt_PU_55AA0000", "alarm"),
        ("binary_sensor", "bvcsp2mqtt_playbox_lobby", "connectivity"),
        ("binary_sensor", "bvcsp2mqtt_playbox_lobby", "screen_state"),
        ("sensor", "bvcsp2mqtt_playbox_lobby", "brightness_level"),
        ("sensor", "bvcsp2mqtt_playbox_lobby", "volume_level"),
        ("binary_sensor", "bvcsp2mqtt_bridge", "connectivity"),
        ("sensor", "bvcsp2mqtt_bridge", "version"),
    ];
    for (platform, node, id) in topics {
        let topic = format!("{PREFIX}/{platform}/{node}/{id}/config");
        let c = config_on(&obs, &topic, |_| true).await;
        let c = c.as_object().unwrap();
        ha::device(&c["device"]);
        ha::origin(&c["origin"]);
        ha::component(platform, c, &topic);
        assert_eq!(c["unique_id"], format!("{node}_{id}"));
        assert!(!c.contains_key("platform"), "the platform is in the topic");
    }
    for (platform, id) in [
        ("switch", "screen"),
        ("number", "brightness"),
        ("number", "volume"),
    ] {
        let topic = format!("{PREFIX}/{platform}/bvcsp2mqtt_playbox_lobby/{id}/config");
        obs.wait_topic(&topic, T, |r| r.payload.is_empty()).await;
    }
    let sensor = config_on(
        &obs,
        &format!("{PREFIX}/sensor/bvcsp2mqtt_playbox_lobby/brightness_level/config"),
        |_| true,
    )
    .await;
    assert_eq!(sensor["unit_of_measurement"], "%");
    assert_eq!(sensor["state_class"], "measurement");
    assert!(
        obs.on(&config_topic("bvcsp2mqtt_PU_55AA0000")).is_empty(),
        "one layout only"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_on_the_status_topic_announces_everything_again() {
    let sim = helmet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(&sim, broker, "")).await.unwrap();
    let nodes = [
        "bvcsp2mqtt_PU_55AA0000",
        "bvcsp2mqtt_PU_264F708E",
        "bvcsp2mqtt_bridge",
    ];
    for n in nodes {
        config_on(&obs, &config_topic(n), |_| true).await;
    }
    let before: BTreeMap<&str, usize> = nodes
        .iter()
        .map(|n| (*n, obs.on(&config_topic(n)).len()))
        .collect();
    // Something else on the status topic changes nothing; `online` does.
    publish(broker, "homeassistant/status", "offline", false).await;
    publish(broker, "homeassistant/status", "online", false).await;
    obs.wait_for("every config announced again", T, |log| {
        nodes
            .iter()
            .all(|n| log.iter().filter(|r| r.topic == config_topic(n)).count() > before[n])
            .then_some(())
    })
    .await;
    // The same payloads again (Home Assistant sees no change, keeps its entities).
    for n in nodes {
        let all = obs.on(&config_topic(n));
        assert_eq!(
            all[all.len() - 1].payload,
            all[all.len() - 2].payload,
            "{n}"
        );
    }
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gone_from_two_device_lists_is_removed_and_a_new_one_announced() {
    let sim = helmet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(&sim, broker, "")).await.unwrap();
    let truck = config_topic("bvcsp2mqtt_PU_264F708E");
    config_on(&obs, &truck, |_| true).await;
    obs.wait_all_up(&Stream::ALL, T).await;
    let ctx = bridge.bvcsp.clone().unwrap();
    let lists = || {
        ctx.stats
            .snapshots
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The truck leaves the device list; a drone joins it.
    let mut helmet = SimDevice::new("PU_55AA0000", "Helmet 07", true);
    helmet.lat = 31.849722;
    helmet.lng = 117.207138;
    sim.set_devices(vec![helmet, SimDevice::new("PU_00C0FFEE", "Drone 2", true)]);
    // The device list is read again each time the online-status stream reconnects.
    let start = lists();
    sim.kick_sockets(Some(Stream::OnlineStatus), Some(1000));
    let drone = config_on(&obs, &config_topic("bvcsp2mqtt_PU_00C0FFEE"), |_| true).await;
    assert_eq!(drone["device"]["name"], "Drone 2");
    sim.wait_until("one more device list", T, |_| lists() > start)
        .await;
    assert!(
        obs.on(&truck).iter().all(|r| !r.payload.is_empty()),
        "missing from one list: kept"
    );
    sim.kick_sockets(Some(Stream::OnlineStatus), Some(1000));
    obs.wait_topic(&truck, T, |r| r.payload.is_empty()).await;
    assert!(lists() >= start + 2);
    let helmet = obs.on(&config_topic("bvcsp2mqtt_PU_55AA0000"));
    assert!(
        helmet.iter().all(|r| !r.payload.is_empty()),
        "the others stay"
    );
    // At the broker: the removal cleared the retained config, the others are there.
    let late = Observer::start(broker).await;
    late.wait_topic(&config_topic("bvcsp2mqtt_PU_00C0FFEE"), T, |r| r.retain)
        .await;
    late.wait_topic(&config_topic("bvcsp2mqtt_PU_55AA0000"), T, |r| r.retain)
        .await;
    assert!(
        late.on(&truck).is_empty(),
        "no retained config left for the truck"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_everything_announced_before_is_removed() {
    let sim = helmet_sim().await;
    let lobby = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let on = ha_config(&sim, broker, &box_entry("lobby", &lobby, true));
    let dir = on.storage.dir.clone();
    let bridge = Bridge::start(on.clone()).await.unwrap();
    let nodes = [
        "bvcsp2mqtt_PU_55AA0000",
        "bvcsp2mqtt_PU_264F708E",
        "bvcsp2mqtt_playbox_lobby",
        "bvcsp2mqtt_bridge",
    ];
    for n in nodes {
        config_on(&obs, &config_topic(n), |_| true).await;
    }
    bridge.stop(Duration::from_secs(5)).await;
    let mut off = on;
    off.homeassistant.enabled = false;
    assert_eq!(off.storage.dir, dir);
    let bridge = Bridge::start(off).await.unwrap();
    for n in nodes {
        obs.wait_topic(&config_topic(n), T, |r| r.payload.is_empty())
            .await;
    }
    // Nothing is left at the broker (the retained bridge state arrives with the rest).
    let late = Observer::start(broker).await;
    late.wait_topic("bvcsp2mqtt/bridge/state", T, |r| r.retain)
        .await;
    late.wait_topic("bvcsp2mqtt/bridge/info", T, |r| r.retain)
        .await;
    assert!(
        late.all()
            .iter()
            .all(|r| !r.topic.starts_with("homeassistant/")),
        "no discovery config retained"
    );
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_the_number_and_switch_topics_reaches_the_box() {
    let sim = helmet_sim().await;
    let lobby = PlayboxSim::start(PlayboxOptions::default()).await.unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(&sim, broker, &box_entry("lobby", &lobby, true)))
        .await
        .unwrap();
    let pb = config_on(&obs, &config_topic("bvcsp2mqtt_playbox_lobby"), |_| true).await;
    obs.wait_topic("bvcsp2mqtt/playbox/lobby/state", T, |_| true)
        .await;
    let brightness = pb["components"]["brightness"]["command_topic"]
        .as_str()
        .unwrap()
        .to_string();
    // What Home Assistant's number publishes for 40 (an integer value goes as "40").
    publish(broker, &brightness, "40", false).await;
    lobby
        .wait_until("brightness 40", T, |s| s.brightness() == 40.0)
        .await;
    let screen = pb["components"]["screen"]["command_topic"]
        .as_str()
        .unwrap()
        .to_string();
    let off = pb["components"]["screen"]["payload_off"]
        .as_str()
        .unwrap()
        .to_string();
    publish(broker, &screen, &off, false).await;
    lobby
        .wait_until("screen off", T, |s| s.screen() == "CLOSE")
        .await;
    // And the state the entities read says so.
    obs.wait_topic("bvcsp2mqtt/playbox/lobby/state", T, |r| {
        r.json()["brightness"] == 40.0 && r.json()["screen"] == "off"
    })
    .await;
    bridge.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ten_thousand_devices_an_alarm_is_not_queued_behind_discovery() {
    let fleet: Vec<SimDevice> = (0..10_000)
        .map(|i| SimDevice::new(&format!("PU_{i:08X}"), &format!("Unit {i}"), i % 3 != 0))
        .collect();
    let sim = BvcspSim::start(SimOptions {
        devices: fleet,
        ..Default::default()
    })
    .await
    .unwrap();
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(ha_config(&sim, broker, "")).await.unwrap();
    let is_device_config = |r: &Received| {
        r.topic.starts_with("homeassistant/device/bvcsp2mqtt_PU_") && !r.payload.is_empty()
    };
    let count_from =
        |log: &[Received], from: usize| log[from..].iter().filter(|r| is_device_config(r)).count();
    obs.wait_for(
        "all 10 000 devices announced",
        Duration::from_secs(120),
        |log| (count_from(log, 0) >= 10_000).then_some(()),
    )
    .await;
    // Home Assistant restarts: 10 000 announcements again, all at once as far as it asks.
    // How many messages wait in the outbox meanwhile (an alarm waits behind all of them).
    let outbox = bridge.outbox.clone();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut deepest = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                deepest = deepest.max(outbox.depth());
                tick.tick().await;
            }
            deepest
        })
    };
    let mark = obs.all().len();
    publish(broker, "homeassistant/status", "online", false).await;
    obs.wait_for("the announcements to begin again", T, |log| {
        (count_from(log, mark) >= 200).then_some(())
    })
    .await;
    let injected = Instant::now();
    assert_eq!(
        sim.inject(
            Stream::Alarm,
            json!({"key": "big-1", "type": 5, "time": 1717400123,
            "devID": "PU_00000007", "status": 1})
        ),
        1
    );
    let topic = "bvcsp2mqtt/device/PU_00000007/alarm/sos";
    let (arrived, ahead) = obs
        .wait_for("the alarm", T, |log| {
            let at = mark + log[mark..].iter().position(|r| r.topic == topic)?;
            Some((log[at].at, count_from(&log[..at], mark)))
        })
        .await;
    let latency = arrived.duration_since(injected);
    // What matters: the alarm overtook the announcement backlog (all of it would be
    // ahead if the 10 000 messages went into the outbox at once).
    assert!(
        ahead < 5_000,
        "the alarm waited behind {ahead} discovery messages"
    );
    assert!(
        latency < Duration::from_secs(1),
        "alarm latency {latency:?}"
    );
    // And the re-announcement still finishes.
    obs.wait_for(
        "all 10 000 devices announced again",
        Duration::from_secs(120),
        |log| (count_from(log, mark) >= 10_000).then_some(()),
    )
    .await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let deepest = sampler.await.unwrap();
    let bound = bvcsp2mqtt::homeassistant::announcer::LOW_WATER
        + bvcsp2mqtt::homeassistant::announcer::BATCH;
    // Besides discovery only a few state messages and the alarm are queued here.
    assert!(
        deepest <= bound + 32,
        "{deepest} messages queued at once: discovery is not fed behind alarms"
    );
    eprintln!(
        "alarm latency {latency:?}, {ahead} re-announcements had arrived before it, \
         outbox depth at most {deepest}"
    );
    bridge.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_user_stays_and_a_device_gone_meanwhile_is_removed() {
    let sim = helmet_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let cfg = ha_config(&sim, broker, "");
    let bridge = Bridge::start(cfg.clone()).await.unwrap();
    obs.wait_all_up(&Stream::ALL, T).await;
    // A CU terminal is known only from the online-status stream.
    sim.inject(
        Stream::OnlineStatus,
        json!({"type": "CU", "status": 1, "user": {"id": "CU_ops"}}),
    );
    let user = config_topic("bvcsp2mqtt_user_CU_ops");
    let truck = config_topic("bvcsp2mqtt_PU_264F708E");
    config_on(&obs, &user, |_| true).await;
    config_on(&obs, &truck, |_| true).await;
    bridge.stop(Duration::from_secs(5)).await;

    // The truck leaves while the bridge is stopped; then the fleet is steady, and the
    // user says nothing (its state does not change).
    let mut helmet = SimDevice::new("PU_55AA0000", "Helmet 07", true);
    helmet.lat = 31.849722;
    helmet.lng = 117.207138;
    sim.set_devices(vec![helmet]);
    let bridge = Bridge::start(cfg).await.unwrap();
    let ctx = bridge.bvcsp.clone().unwrap();
    let lists = || {
        ctx.stats
            .snapshots
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    sim.wait_until("the first device list", T, |_| lists() >= 1)
        .await;
    // The list is read again at every online-status reconnect.
    let end = Instant::now() + T;
    while !obs.on(&truck).iter().any(|r| r.payload.is_empty()) {
        assert!(Instant::now() < end, "the truck was never removed");
        let before = lists();
        sim.kick_sockets(Some(Stream::OnlineStatus), Some(1000));
        let more = sim.wait_until("one more device list", T, |_| lists() > before);
        let _ = tokio::time::timeout(Duration::from_secs(3), more).await;
        let removed = obs.wait_for("the truck removed", T, |log| {
            log.iter()
                .any(|r| r.topic == truck && r.payload.is_empty())
                .then_some(())
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), removed).await;
    }
    assert!(lists() >= 2, "two complete lists decided it");
    // Whatever was queued with the truck's removal is out before this answer.
    publish(
        broker,
        &format!("{BASE}/bridge/request/health_check"),
        r#"{"transaction": "barrier"}"#,
        false,
    )
    .await;
    obs.wait_topic(&format!("{BASE}/bridge/response/health_check"), T, |r| {
        r.json()["transaction"] == "barrier"
    })
    .await;
    assert!(
        obs.on(&user).iter().all(|r| !r.payload.is_empty()),
        "a user is in no device list: its absence says nothing"
    );
    bridge.stop(Duration::from_secs(5)).await;
}
