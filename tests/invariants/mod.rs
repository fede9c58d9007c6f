//! Invariants of the pure parsers, shared by the property tests (`tests/properties.rs`)
//! and the fuzz targets (`fuzz/fuzz_targets/*.rs`, which include this file by path).
//! Each `check_*` takes any input, must not panic on its own account, and asserts what
//! the code promises about its output.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bvcsp2mqtt::bvcsp::Stream;
use bvcsp2mqtt::bvcsp::model::{self, MAX_EVENTS_PER_FRAME};
use bvcsp2mqtt::mqtt::Message;
use bvcsp2mqtt::mqtt::topics::{MAX_LEVEL_BYTES, Topics, level};
use serde_json::Value;

/// The base topic used by the checks.
pub const BASE: &str = "b";
/// MQTT's limit on a whole topic.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// A fixed "received" time: 2024-06-03T07:35:23Z.
pub fn received() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_717_400_123)
}

/// `level` output never contains `/`, `+`, `#` or a control character, is never empty,
/// never longer than 65 bytes, is the same for the same id, and leaves short clean ids
/// as they are.
pub fn check_level(id: &str) {
    let l = level(id);
    assert!(!l.is_empty(), "empty level for {id:?}");
    assert!(l.len() <= MAX_LEVEL_BYTES, "level of {} bytes", l.len());
    assert!(
        !l.contains(['/', '+', '#']) && !l.chars().any(char::is_control),
        "unsafe level {l:?} for {id:?}"
    );
    assert_eq!(l, level(id), "level not stable for {id:?}");
    let clean = !id.contains(['/', '+', '#']) && !id.chars().any(char::is_control);
    if !id.is_empty() && id.len() <= 64 && clean {
        assert_eq!(l, id, "a short clean id changed");
    }
    if id.len() > 64 {
        assert_eq!(
            l.len(),
            MAX_LEVEL_BYTES,
            "a long id's level is always 65 bytes"
        );
    }
}

/// A published topic: under the base, at most 65 535 bytes, every level after the base
/// non-empty, at most 65 bytes and free of wildcards and control characters.
pub fn check_topic(topic: &str) {
    assert!(
        topic.len() <= MAX_TOPIC_BYTES,
        "topic of {} bytes",
        topic.len()
    );
    let rest = topic
        .strip_prefix(BASE)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or_else(|| panic!("topic {topic:?} not under the base"));
    for l in rest.split('/') {
        assert!(!l.is_empty(), "empty level in {topic:?}");
        assert!(
            l.len() <= MAX_LEVEL_BYTES,
            "level of {} bytes in {topic:?}",
            l.len()
        );
        assert!(
            !l.contains(['+', '#']) && !l.chars().any(char::is_control),
            "unsafe level {l:?}"
        );
    }
}

/// An RFC 3339 UTC time with a year in 1970..=2200.
pub fn check_time(s: &str) {
    assert!(humantime::parse_rfc3339(s).is_ok(), "not RFC 3339: {s:?}");
    let year: u32 = s
        .get(..4)
        .and_then(|y| y.parse().ok())
        .unwrap_or_else(|| panic!("no year in {s:?}"));
    assert!((1970..=2200).contains(&year), "year {year} in {s:?}");
    assert!(s.ends_with('Z'), "not UTC: {s:?}");
}

/// `upstream_time` of anything is `None` or a sane RFC 3339 time, agreeing with
/// `upstream_millis`.
pub fn check_upstream_time(v: &Value) {
    let t = model::upstream_time(v);
    let ms = model::upstream_millis(v);
    assert_eq!(t.is_some(), ms.is_some(), "time and millis disagree on {v}");
    if let Some(t) = t {
        check_time(&t);
    }
}

fn check_messages(messages: &[Message]) {
    for m in messages {
        check_topic(&m.topic);
        if m.payload[..] == *b"online" || m.payload[..] == *b"offline" {
            continue;
        }
        let p: Value = serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("payload on {} is not JSON: {e}", m.topic));
        assert!(p.is_object(), "payload on {} is not an object", m.topic);
        for k in ["time", "received_at", "updated_at"] {
            if let Some(t) = p.get(k) {
                check_time(t.as_str().unwrap_or_else(|| panic!("{k} is not a string")));
            }
        }
    }
}

/// Every value in `v`, `v` included (depth-first, bounded to keep the checks fast).
fn for_each_value(v: &Value, budget: &mut usize, f: &mut impl FnMut(&Value)) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    f(v);
    match v {
        Value::Array(a) => a.iter().for_each(|x| for_each_value(x, budget, f)),
        Value::Object(m) => m.values().for_each(|x| for_each_value(x, budget, f)),
        _ => {}
    }
}

/// One upstream event through every stream's normaliser and the alarm-record path.
pub fn check_event(ev: &Value) {
    let topics = Topics::new(BASE);
    let mut budget = 256;
    for_each_value(ev, &mut budget, &mut check_upstream_time);
    if let Some(id) = model::alarm_identity(ev) {
        assert!(
            id.key.len() <= 128
                || (id.key.starts_with("sha256:") && id.key.len() == 71)
                || id.key.starts_with("nokey:"),
            "unbounded alarm key of {} bytes",
            id.key.len()
        );
        assert!(["start", "end", "unknown"].contains(&id.state));
        assert_eq!(
            Some(&id),
            model::alarm_identity(ev).as_ref(),
            "identity not stable"
        );
    }
    assert_eq!(
        model::alarm_event_id(ev),
        model::alarm_event_id(ev),
        "alarm event id not stable"
    );
    for stream in Stream::ALL {
        let n = model::normalise(stream, ev.clone(), received(), &topics);
        assert!(!n.event_id.is_empty());
        check_messages(&n.messages);
        if let Some((id, _)) = &n.device {
            check_topic(&topics.device_availability(id));
        }
    }
    let n = model::normalise_alarm_record(ev.clone(), received(), &topics);
    assert_eq!(n.messages.len(), 1, "an alarm record is one message");
    check_messages(&n.messages);
    if let Some(r) = model::DeviceRecord::from_value(ev.clone()) {
        check_messages(&r.messages(received(), &topics));
    }
}

/// One WebSocket text: split into at most `MAX_EVENTS_PER_FRAME` events, each of
/// which normalises without a panic into sane topics and payloads.
pub fn check_frame(text: &str) {
    let Ok(frame) = model::split_frame(text) else {
        return;
    };
    assert!(frame.events.len() <= MAX_EVENTS_PER_FRAME);
    if frame.skipped > 0 {
        assert_eq!(frame.events.len(), MAX_EVENTS_PER_FRAME);
    }
    // A frame of thousands of events is the same work many times over: a few suffice.
    for ev in frame.events.iter().take(8) {
        check_event(ev);
    }
}

/// A BVCSP REST reply (status and body) through the pure reply parsers.
pub fn check_rest_reply(status: u16, body: &[u8]) {
    use bvcsp2mqtt::bvcsp::rest;
    match rest::parse_reply(status, body) {
        Ok(v) => {
            assert!((200..300).contains(&status));
            if let Some(items) = rest::list_items(&v) {
                for item in items.iter().take(8) {
                    if let Some(r) = model::DeviceRecord::from_value(item.clone()) {
                        assert!(!r.id.is_empty());
                        check_messages(&r.messages(received(), &Topics::new(BASE)));
                    }
                }
            }
            let _ = rest::total_count(&v);
            if let Some(g) = rest::grant_from(&v) {
                assert!(!g.token.is_empty());
                assert!(g.lifetime.is_none_or(|d| d.as_secs() > 0));
            }
        }
        Err(rest::RestError::Status(s)) => assert_eq!(s, status),
        Err(rest::RestError::Code { code, .. }) => assert_ne!(code, 0),
        Err(e) => assert!((200..300).contains(&status), "{e} on status {status}"),
    }
}

/// A play box reply (status and body) through the envelope and login parsers.
pub fn check_playbox_reply(status: u16, body: &[u8]) {
    use bvcsp2mqtt::playbox::client::{self, BoxError};
    match client::parse_envelope(status, body) {
        Ok(data) => {
            assert!((200..300).contains(&status));
            match client::login_token(&data) {
                Ok(t) => assert!(!t.is_empty()),
                Err(BoxError::Code { code, .. }) => assert_eq!(code, 24),
                Err(BoxError::SessionHeld | BoxError::Missing(_)) => {}
                Err(e) => panic!("unexpected login error {e}"),
            }
        }
        Err(BoxError::Status(s)) => assert!(s == status && !(200..300).contains(&s)),
        Err(BoxError::Code { code, .. }) => assert_ne!(code, 0),
        Err(e) => {
            let _ = bvcsp2mqtt::recovery::Classify::recovery(&e);
        }
    }
}

/// A play-box command: topic routing and strict payload validation.
pub fn check_command(topic: &str, payload: &str) {
    use bvcsp2mqtt::playbox::{CommandKind, command_topic};
    let prefix = format!("{BASE}/playbox/");
    if let Some((name, kind)) = command_topic(topic, &prefix) {
        assert!(!name.contains('/') && !kind.contains('/'));
        assert_eq!(topic, format!("{prefix}{name}/{kind}/set"));
    }
    for kind in [
        CommandKind::Brightness,
        CommandKind::Screen,
        CommandKind::Volume,
    ] {
        assert_eq!(CommandKind::from_topic(kind.name()), Some(kind));
        match kind.body(payload) {
            Ok(body) => match kind {
                CommandKind::Screen => {
                    let s = body["state"].as_str().expect("a state");
                    assert!(s == "OPEN" || s == "CLOSE");
                }
                _ => {
                    let r = body["ratio"].as_f64().expect("a ratio");
                    assert!(r.is_finite() && (0.0..=100.0).contains(&r), "ratio {r}");
                }
            },
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

/// An AVON datagram: the header and reply parsers, and the config rendered from a
/// reply, which must be valid TOML that reads back the box's serial number.
pub fn check_avon(buf: &[u8]) {
    use bvcsp2mqtt::playbox::avon;
    use bvcsp2mqtt::playbox::discovery::{Discovered, render_toml, suggested_name};
    let header = avon::parse_header(buf);
    if header.is_some() {
        assert!(buf.len() >= avon::HEADER_LEN);
    }
    let _ = avon::is_search(buf);
    let Some(found) = avon::parse_reply(buf) else {
        return;
    };
    assert!(header.is_some());
    assert!(found.raw.is_object());
    assert_ne!(found.https_port, 0);
    let d = Discovered {
        ip: std::net::Ipv4Addr::LOCALHOST.into(),
        found,
    };
    let name = suggested_name(&d);
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'),
        "suggested name {name:?}"
    );
    let text = render_toml(std::slice::from_ref(&d));
    let table: toml::Table = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("render_toml gave invalid TOML: {e}\n{text}"));
    let boxes = table["playbox"].as_array().expect("[[playbox]]");
    assert_eq!(boxes.len(), 1);
    assert_eq!(boxes[0]["name"].as_str(), Some(name.as_str()));
    assert_eq!(
        boxes[0]["sn"].as_str(),
        Some(d.found.sn.as_str()),
        "sn changed"
    );
}

/// An AVON datagram with its header made valid (magic, type, `what` = reply and
/// checksum), so the body reaches the JSON parser.
pub fn avon_reply_with_body(body: &[u8]) -> Vec<u8> {
    use bvcsp2mqtt::playbox::avon;
    let mut out = vec![0u8; avon::HEADER_LEN];
    out[0..4].copy_from_slice(b"AVON");
    out[4..8].copy_from_slice(&(-1i32).to_le_bytes());
    out[8..10].copy_from_slice(&0x8855u16.to_le_bytes());
    out[10..12].copy_from_slice(&1u16.to_le_bytes());
    out[16..20].copy_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    let sum = avon::header_checksum(&out);
    out[22..24].copy_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Whether `key` names a secret, as the configuration treats it.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "app_key", "key"]
        .iter()
        .any(|s| k == *s || k.ends_with(&format!("_{s}")))
}

/// The quoted values of secret keys written as `key = "value"` (or with `'`), as they
/// stand in the text.
pub fn secret_values(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices('=') {
        let before = text[..i].trim_end();
        let start = before
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .map_or(0, |(p, c)| p + c.len_utf8());
        if !secret_key(&before[start..]) {
            continue;
        }
        let after = text[i + 1..].trim_start_matches([' ', '\t']);
        let Some(q) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            continue;
        };
        let value = &after[1..];
        if let Some(end) = value.find(q) {
            out.push(&value[..end]);
        }
    }
    out
}

/// `config::from_toml` never panics, and its error never shows the value of a secret
/// key. Inputs naming a `*_file` are not loaded: they would read files.
pub fn check_config(text: &str) {
    if text.contains("_file") {
        return;
    }
    let Err(e) = bvcsp2mqtt::config::from_toml(text) else {
        return;
    };
    let shown = format!("{e} {e:?}");
    for s in secret_values(text) {
        // Short values, and values that also stand elsewhere in the input (as a key
        // name, say), may appear in a message by coincidence.
        if s.len() < 8 || text.matches(s).count() > 1 {
            continue;
        }
        assert!(
            !shown.contains(s),
            "the error shows the secret {s:?}: {shown}"
        );
    }
}
