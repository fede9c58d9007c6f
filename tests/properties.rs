//! Property tests of the pure parsers: random inputs from a fixed seed (so a failure is
//! reproducible), each through the invariants in `tests/invariants/mod.rs`, which the
//! fuzz targets under `fuzz/` check too. Kept small enough to run in a few seconds in a
//! debug build; the fuzz targets are the long-running version.

mod invariants;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use bvcsp2mqtt::bvcsp::model::{self, MAX_EVENTS_PER_FRAME};
use bvcsp2mqtt::playbox::avon;

fn rng(test: u64) -> StdRng {
    StdRng::seed_from_u64(0x5eed_0000 + test)
}

/// Characters that matter to the code under test: separators, wildcards, controls (C0,
/// DEL and C1), quotes and escapes, multi-byte characters, digits and letters.
const PALETTE: &[char] = &[
    'a', 'Z', '0', '9', '_', '-', '.', ' ', '/', '+', '#', '\0', '\n', '\r', '\t', '\u{7f}',
    '\u{85}', '"', '\'', '\\', '=', '[', ']', '{', '}', ',', ':', 'é', 'ß', '中', '😀', '\u{200b}',
    '\u{feff}', 'e', 'E', '1',
];

fn string(r: &mut StdRng) -> String {
    let len = match r.gen_range(0..10) {
        0 => 0,
        1..=5 => r.gen_range(1..12),
        6 | 7 => r.gen_range(60..70),
        8 => r.gen_range(100..300),
        _ => r.gen_range(1000..3000),
    };
    let mut s = String::new();
    while s.len() < len {
        s.push(PALETTE[r.gen_range(0..PALETTE.len())]);
    }
    s
}

/// A number as upstream sends times and ids: seconds to nanoseconds, extremes, floats.
fn number(r: &mut StdRng) -> Value {
    match r.gen_range(0..10) {
        0 => json!(r.gen_range(1_600_000_000_i64..1_800_000_000)),
        1 => json!(r.gen_range(1_600_000_000_000_i64..1_800_000_000_000)),
        2 => json!(r.gen_range(1_600_000_000_000_000_i64..1_800_000_000_000_000)),
        3 => json!(r.gen_range(1_600_000_000_000_000_000_i64..1_800_000_000_000_000_000)),
        4 => json!([i64::MIN, i64::MAX, -1, 0, 1, 99_999_999_999][r.gen_range(0..6)]),
        5 => json!(r.r#gen::<u64>()),
        6 => json!(r.r#gen::<i64>()),
        7 => json!(f64::from_bits(r.r#gen::<u64>())),
        8 => json!(r.gen_range(-1e20..1e20)),
        _ => json!(r.gen_range(0..6000)),
    }
}

/// Field names the normalisers and reply parsers look for, in several spellings.
const KEYS: &[&str] = &[
    "type",
    "time",
    "timestamp",
    "key",
    "status",
    "devID",
    "DEVID",
    "device_id",
    "devName",
    "device",
    "user",
    "id",
    "puid",
    "name",
    "lat",
    "lng",
    "latitude",
    "lon",
    "height",
    "desc",
    "description",
    "confInfo",
    "conference",
    "event",
    "operate",
    "iMsgID",
    "from",
    "to",
    "text",
    "gps",
    "online",
    "subDevIdx",
    "userID",
    "network",
    "code",
    "msg",
    "message",
    "data",
    "list",
    "items",
    "records",
    "pageInfo",
    "totalCount",
    "token",
    "timeout",
    "logined",
    "validation",
    "sn",
    "productName",
    "aliasName",
    "terminalEntrancePortHttps",
    "ratio",
    "state",
];

fn value(r: &mut StdRng, depth: u32) -> Value {
    let pick = if depth >= 4 {
        r.gen_range(0..5)
    } else {
        r.gen_range(0..8)
    };
    match pick {
        0 => Value::Null,
        1 => Value::Bool(r.r#gen()),
        2 | 3 => number(r),
        4 => {
            // Numbers as strings, as upstream sometimes sends them.
            if r.gen_bool(0.5) {
                Value::String(number(r).to_string())
            } else {
                Value::String(string(r))
            }
        }
        5 => Value::Array(
            (0..r.gen_range(0..4))
                .map(|_| value(r, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..r.gen_range(0..10) {
                let k = if r.gen_bool(0.85) {
                    KEYS[r.gen_range(0..KEYS.len())].to_string()
                } else {
                    string(r)
                };
                m.insert(k, value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// The text with a few random edits: truncation, an inserted character, a dropped one.
fn mangle(r: &mut StdRng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..r.gen_range(1..4) {
        let at = r.gen_range(0..=chars.len());
        match r.gen_range(0..3) {
            0 => chars.truncate(at),
            1 => chars.insert(at, PALETTE[r.gen_range(0..PALETTE.len())]),
            _ if at < chars.len() => {
                chars.remove(at);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

#[test]
fn levels_are_safe_bounded_and_stable() {
    let mut r = rng(1);
    for id in [
        "",
        "_",
        "PU_1",
        "a/b",
        "+",
        "#",
        "\u{85}",
        &"x".repeat(64),
        &"x".repeat(65),
    ] {
        invariants::check_level(id);
    }
    // Around the 64-byte boundary with multi-byte characters on it.
    for n in 0..70 {
        invariants::check_level(&format!("{}é", "x".repeat(n)));
        invariants::check_level(&format!("{}😀/", "y".repeat(n)));
    }
    for _ in 0..3000 {
        invariants::check_level(&string(&mut r));
    }
    // Ids sharing a long prefix stay apart.
    let long = "D".repeat(200);
    assert_ne!(
        bvcsp2mqtt::mqtt::topics::level(&long),
        bvcsp2mqtt::mqtt::topics::level(&format!("{long}E"))
    );
}

#[test]
fn upstream_times_are_none_or_sane() {
    let mut r = rng(2);
    for _ in 0..5000 {
        let bits = r.r#gen::<u64>();
        invariants::check_upstream_time(&json!(bits as i64));
        invariants::check_upstream_time(&json!(bits));
        invariants::check_upstream_time(&json!(f64::from_bits(bits)));
        invariants::check_upstream_time(&number(&mut r));
        invariants::check_upstream_time(&Value::String(number(&mut r).to_string()));
        invariants::check_upstream_time(&Value::String(string(&mut r)));
    }
    for s in [
        "1e300",
        "-0",
        "NaN",
        "inf",
        " 1717400123 ",
        "7258118400",
        "7258118401",
    ] {
        invariants::check_upstream_time(&json!(s));
    }
    // The last sane instant, in every unit, and one past it.
    assert!(model::upstream_time(&json!(7_258_118_400_i64)).is_some());
    assert!(model::upstream_time(&json!(7_258_118_400_001_i64)).is_none());
}

#[test]
fn frames_split_into_at_most_the_cap() {
    let mut r = rng(3);
    for _ in 0..400 {
        let v = value(&mut r, 0);
        let text = v.to_string();
        invariants::check_frame(&text);
        invariants::check_frame(&mangle(&mut r, &text));
        invariants::check_frame(&format!("[{text},{text}]"));
    }
    for n in [
        MAX_EVENTS_PER_FRAME - 1,
        MAX_EVENTS_PER_FRAME,
        MAX_EVENTS_PER_FRAME + 7,
    ] {
        let text = format!("[{}]", vec!["{\"type\":5}"; n].join(","));
        let f = model::split_frame(&text).unwrap();
        assert_eq!(f.events.len(), n.min(MAX_EVENTS_PER_FRAME));
        assert_eq!(f.skipped, n.saturating_sub(MAX_EVENTS_PER_FRAME));
        invariants::check_frame(&text);
    }
    // Deep nesting is an error (serde_json's recursion limit), never a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(model::split_frame(&deep).is_err());
}

#[test]
fn any_event_normalises_into_sane_topics_and_payloads() {
    let mut r = rng(4);
    for _ in 0..1500 {
        invariants::check_event(&value(&mut r, 0));
    }
    // Hostile ids in each id position.
    for _ in 0..300 {
        let id = string(&mut r);
        for ev in [
            json!({"devID": id, "type": 4106, "key": id, "time": 1717400123}),
            json!({"type": "pu", "status": 1, "device": {"id": id}, "user": {"id": id}}),
            json!({"devId": id, "lat": 1.5, "lng": 2.5}),
            json!({"type": id, "confInfo": {"id": id}}),
            json!({"id": id, "status": 1, "gps": {"lat": 1, "lng": 2, "time": id}}),
        ] {
            invariants::check_event(&ev);
        }
    }
}

#[test]
fn rest_and_playbox_replies_parse_without_panics() {
    let mut r = rng(5);
    for _ in 0..1500 {
        let status = [200, 200, 204, 401, 403, 404, 500, 302][r.gen_range(0..8)];
        let body = match r.gen_range(0..4) {
            0 => json!({"code": number(&mut r), "msg": value(&mut r, 2), "data": value(&mut r, 1)}),
            1 => json!({"code": 0, "data": {"list": [value(&mut r, 2), value(&mut r, 2)],
                "token": value(&mut r, 3), "timeout": number(&mut r)},
                "pageInfo": {"totalCount": number(&mut r)}}),
            2 => json!({"code": 0, "data": {"token": string(&mut r), "logined": value(&mut r, 4),
                "validation": value(&mut r, 4)}}),
            _ => value(&mut r, 0),
        };
        let text = body.to_string();
        let mangled = mangle(&mut r, &text);
        for t in [&text, &mangled] {
            invariants::check_rest_reply(status, t.as_bytes());
            invariants::check_playbox_reply(status, t.as_bytes());
        }
    }
}

#[test]
fn commands_are_validated_strictly() {
    let mut r = rng(6);
    for p in [
        "0", "100", "100.0", "1e2", "-0", "+5", "1e-400", "0x10", "on", " OFF\n", "Оn",
    ] {
        invariants::check_command("b/playbox/x/brightness/set", p);
    }
    for _ in 0..3000 {
        let payload = if r.gen_bool(0.5) {
            number(&mut r).to_string()
        } else {
            string(&mut r)
        };
        let topic = format!("b/playbox/{}/{}/set", string(&mut r), string(&mut r));
        invariants::check_command(&topic, &payload);
        invariants::check_command(&mangle(&mut r, &topic), &payload);
    }
}

#[test]
fn avon_replies_parse_and_render_valid_config() {
    let mut r = rng(7);
    for _ in 0..1500 {
        let mut body = value(&mut r, 1);
        if let Value::Object(m) = &mut body {
            m.insert("sn".into(), Value::String(string(&mut r)));
            if r.gen_bool(0.5) {
                m.insert("aliasName".into(), Value::String(string(&mut r)));
            }
        }
        let mut bytes = avon::build_reply(&body);
        invariants::check_avon(&bytes);
        bytes.extend_from_slice(string(&mut r).as_bytes());
        invariants::check_avon(&bytes);
        let mut flipped = bytes.clone();
        let at = r.gen_range(0..flipped.len());
        flipped[at] ^= 1 << r.gen_range(0..8);
        invariants::check_avon(&flipped);
        invariants::check_avon(&invariants::avon_reply_with_body(
            mangle(&mut r, &body.to_string()).as_bytes(),
        ));
    }
    // The characters TOML must escape, in a serial number.
    for sn in [
        "a\"b", "a\\b", "a\nb", "a\u{0}b", "a\u{7f}b", "'''", "\\u0041",
    ] {
        invariants::check_avon(&avon::build_reply(&json!({"sn": sn})));
    }
}

const TEMPLATES: &[&str] = &[
    // Invalid TOML around the secret.
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"{S}\\q\"\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"{S}\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = {S}\n",
    "[bvcsp]\npassword = \"{S}\"\npassword = \"{S}x\"\n",
    "[mqtt]\npassword = '{S}' x\n",
    // Valid TOML, a secret of the wrong type or form.
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = [\"{S}\"]\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = {{ v = \"{S}\" }}\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"x\"\napp_key = [\"{S}\"]\n",
    "[mqtt]\npassword = {{ \"{S}\" = 1 }}\n",
    "[[playbox]]\nname = \"p\"\nurl = \"https://h\"\npassword = [[\"{S}\"]]\n",
    // A good secret beside some other mistake.
    "[bvcsp]\nurl = \"ftp://h\"\nusername = \"a\"\npassword = \"{S}\"\n",
    "[bvcsp]\nurl = \"https://h:9781\"\npassword = \"{S}\"\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"{S}\"\nbogus = 1\n",
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = 5\npassword = \"{S}\"\n",
    "[mqtt]\nurl = \"mqtt://h\"\npassword = \"{S}\"\nusername = []\n",
    "[[playbox]]\nname = \"Bad Name\"\nurl = \"https://h\"\npassword = \"{S}\"\n",
    "[[playbox]]\nname = \"p\"\nurl = \"https://h\"\npassword = \"{S}\"\npoll_interval = \"soon\"\n",
    // A secret under a key the configuration does not know.
    "[bvcsp]\nurl = \"https://h:9781\"\nusername = \"a\"\npassword = \"x\"\nsecret_token = \"{S}\"\n",
    "[log]\npassword = \"{S}\"\n",
    "password = \"{S}\"\n",
    // The secret in a URL.
    "[bvcsp]\nurl = \"https://u:{S}@h:9781\"\nusername = \"a\"\npassword = \"x\"\n",
    "[mqtt]\nurl = \"mqtt://u:{S}@h\"\n",
];

#[test]
fn config_errors_never_show_a_secret() {
    let mut r = rng(8);
    for round in 0..6 {
        for t in TEMPLATES {
            let marker = format!("S3cr3t{:08x}", r.r#gen::<u32>());
            let text = t.replace("{S}", &marker);
            let text = if round == 0 {
                text
            } else {
                mangle(&mut r, &text)
            };
            if let Err(e) = bvcsp2mqtt::config::from_toml(&text) {
                let shown = format!("{e} {e:?}");
                // A mangle may have cut the marker; what is left of it must not show.
                if text.contains(&marker) {
                    assert!(!shown.contains(&marker), "{text}\n-> {shown}");
                }
            }
            invariants::check_config(&text);
        }
    }
    let found = invariants::secret_values("a = 1\npassword = \"abc\"\nx_token='t'\nkey=\"k\"");
    assert_eq!(found, ["abc", "t", "k"]);
}
