//! Loading and validating the configuration: keys, defaults, overrides, messages.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

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
    let text = format!("{MINIMAL}[mqtt]\nurl = \"mqtt://broker\"\n[mqtt.tls]\ninsecure = true\n");
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
    assert_eq!(cfg.mqtt.url.as_str(), "mqtt://127.0.0.1:1883");
    assert_eq!(cfg.mqtt.base_topic, "bvcsp2mqtt");
    assert_eq!(cfg.mqtt.client_id, "bvcsp2mqtt");
    assert_eq!(cfg.mqtt.qos, Qos::AtLeastOnce);
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
    assert_eq!(cfg.mqtt.qos, Qos::AtMostOnce);
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
    assert!(e.message.contains("0, 1 or 2"), "{e}");
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
    let cfg = load_str(&inline, &[]).unwrap();
    assert_eq!(cfg.playbox[0].tls.mode, Some(super::PlayboxTlsMode::Tofu));
}

#[test]
fn playbox_trust_is_typed_as_it_is_read() {
    let entry = |tls: &str| {
        format!(
            "{MINIMAL}[[playbox]]\nname = \"lobby\"\nurl = \"https://10.0.0.1:16674\"\nsn = \"X\"\npassword = \"p\"\ntls = {{ {tls} }}\n"
        )
    };
    let e = load_str(&entry("mode = \"pinned\""), &[]).unwrap_err();
    assert_eq!(e.key, "playbox[0].tls.mode", "{e}");
    assert!(e.message.contains("tofu"), "{e}");
    let e = load_str(&entry("fingerprint_sha256 = \"abc\""), &[]).unwrap_err();
    assert_eq!(e.key, "playbox[0].tls.fingerprint_sha256", "{e}");
    let hex = "ab".repeat(32);
    let cfg = load_str(&entry(&format!("fingerprint_sha256 = \"{hex}\"")), &[]).unwrap();
    let pin = cfg.playbox[0].tls.fingerprint_sha256.as_ref().unwrap();
    assert_eq!(pin.sha256(), [0xab; 32]);
    let e = load_str(
        &entry(&format!("mode = \"tofu\", fingerprint_sha256 = \"{hex}\"")),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.key, "playbox[0].tls", "{e}");
    // Refused at start (exit 64), not later when the first poll builds its client.
    let e = load_str(&entry("ca_file = \"/nonexistent/ca.pem\""), &[]).unwrap_err();
    assert_eq!(e.key, "playbox[0].tls.ca_file", "{e}");
    // "" (as the example configuration writes it) is no file; a file is its path.
    let cfg = load_str(&entry("ca_file = \"\""), &[]).unwrap();
    assert_eq!(cfg.playbox[0].tls.ca_file, None);
    let ca = tempfile::NamedTempFile::new().unwrap();
    let cfg = load_str(
        &entry(&format!("ca_file = \"{}\"", ca.path().display())),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.playbox[0].tls.ca_file.as_deref(), Some(ca.path()));
}

#[test]
fn shipped_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "x\n").unwrap();
    let text = include_str!("../../config/bvcsp2mqtt.example.toml")
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

#[test]
fn typed_values_keep_the_contract_messages() {
    let msg = |pairs: &[(&str, &str)]| load_str(MINIMAL, pairs).unwrap_err().to_string();
    assert_eq!(
        msg(&[("BVCSP2MQTT__BVCSP__URL", "ftp://x")]),
        "bvcsp.url: scheme must be one of http, https, got `ftp`"
    );
    assert_eq!(
        msg(&[("BVCSP2MQTT__BVCSP__URL", "nonsense")]),
        "bvcsp.url: not a valid URL: relative URL without a base"
    );
    assert_eq!(
        msg(&[("BVCSP2MQTT__MQTT__URL", "mqtt://broker/x")]),
        "mqtt.url: must not have a path"
    );
    assert_eq!(
        msg(&[("BVCSP2MQTT__MQTT__URL", "http://broker")]),
        "mqtt.url: scheme must be one of mqtt, mqtts, tcp, ssl, got `http`"
    );
    assert_eq!(
        msg(&[("BVCSP2MQTT__SERVICE__HTTP_LISTEN", "localhost")]),
        "service.http_listen: expected address:port, e.g. 127.0.0.1:9782, got `localhost`"
    );
    assert_eq!(
        msg(&[("BVCSP2MQTT__STORAGE__MAX_BYTES", "12 parsecs")]),
        "storage.max_bytes: unknown size unit `parsecs` in `12 parsecs`"
    );
    // Shown back as written, not normalised.
    let cfg = load_str(MINIMAL, &[]).unwrap();
    assert_eq!(
        cfg.bvcsp.as_ref().unwrap().url.as_str(),
        "https://192.168.88.11:9781"
    );
    assert!(
        cfg.redacted_toml()
            .contains("url = \"https://192.168.88.11:9781\"")
    );
    assert_eq!(cfg.service.http_listen, "127.0.0.1:9782".parse().unwrap());
}

#[test]
fn absurd_durations_and_counts_are_refused_as_they_are_read() {
    // Deadlines are `now + value`: a value near u64::MAX seconds would overflow a timer.
    let e = load_str(
        MINIMAL,
        &[("BVCSP2MQTT__BVCSP__KEEPALIVE_INTERVAL", "500000000years")],
    )
    .unwrap_err();
    assert_eq!(e.key, "bvcsp.keepalive_interval", "{e}");
    assert!(e.message.contains("at most"), "{e}");
    let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__KEEPALIVE", "367days")]).unwrap_err();
    assert_eq!(e.key, "mqtt.keepalive", "{e}");
    assert!(load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__KEEPALIVE", "1h")]).is_ok());
    let e = load_str(MINIMAL, &[("BVCSP2MQTT__MQTT__KEEPALIVE", "1day")]).unwrap_err();
    assert_eq!(e.key, "mqtt.keepalive", "{e}");
    assert!(e.message.contains("65535"), "{e}");
    let e = load_str(
        MINIMAL,
        &[("BVCSP2MQTT__BVCSP__BACKFILL_MAX_PAGES", "4294967295")],
    )
    .unwrap_err();
    assert_eq!(e.key, "bvcsp.backfill_max_pages", "{e}");
}
