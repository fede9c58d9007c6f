//! BVCSP credentials: the SHA256_T login hash and self-built AppId/AppKey tokens.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// `password_encrypted` for `POST /auth/login`:
/// `"SHA256_T:" + hex(sha256(hex(sha256(user + "_" + password)) + "_" + timestamp))`.
pub fn sha256_t(username: &str, password: &str, timestamp: i64) -> String {
    let inner = password_digest(username, password);
    sha256_t_from_digest(&inner, timestamp)
}

/// `hex(sha256(user + "_" + password))`. A password equivalent: never log it.
pub fn password_digest(username: &str, password: &str) -> String {
    hex::encode(Sha256::digest(format!("{username}_{password}").as_bytes()))
}

/// The second SHA256_T step, given the stored digest (what a server keeps).
pub fn sha256_t_from_digest(digest: &str, timestamp: i64) -> String {
    let outer = hex::encode(Sha256::digest(format!("{digest}_{timestamp}").as_bytes()));
    format!("SHA256_T:{outer}")
}

/// A token built from an AppId/AppKey pair, as the vendor FAQ describes:
/// `base64("sv+" + hex(hmac_sha256(AppKey, AppId+"+"+ts+"+"+rand)) + "+" + AppId + "+0+" + rand + "+" + ts + "+" + from)`.
pub fn app_token(app_id: &str, app_key: &str, from: &str, timestamp: i64, rand_num: u32) -> String {
    let sign = app_sign(app_id, app_key, timestamp, rand_num);
    let plain = format!("sv+{sign}+{app_id}+0+{rand_num}+{timestamp}+{from}");
    base64::engine::general_purpose::STANDARD.encode(plain)
}

/// The HMAC part of an AppId/AppKey token.
pub fn app_sign(app_id: &str, app_key: &str, timestamp: i64, rand_num: u32) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(app_key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(format!("{app_id}+{timestamp}+{rand_num}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Fields of a decoded AppId/AppKey token (used by the simulator to verify one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTokenParts {
    pub sign: String,
    pub app_id: String,
    pub rand_num: u32,
    pub timestamp: i64,
    pub from: String,
}

/// Decode an AppId/AppKey token; `None` if it does not have the documented shape.
pub fn parse_app_token(token: &str) -> Option<AppTokenParts> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let mut parts = text.splitn(7, '+');
    if parts.next()? != "sv" {
        return None;
    }
    let sign = parts.next()?.to_owned();
    let app_id = parts.next()?.to_owned();
    if parts.next()? != "0" {
        return None;
    }
    let rand_num = parts.next()?.parse().ok()?;
    let timestamp = parts.next()?.parse().ok()?;
    let from = parts.next()?.to_owned();
    Some(AppTokenParts {
        sign,
        app_id,
        rand_num,
        timestamp,
        from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_t_matches_documented_vector() {
        assert_eq!(
            password_digest("admin", "123456"),
            "6848d6405bf34bf9b2d82ed8822c756807632d3eaefedec90ac33cb32ac83671"
        );
        assert_eq!(
            sha256_t("admin", "123456", 1_721_272_800),
            "SHA256_T:ebc145ec6decbc3e7842f1fbc2bd6d0cf65e76f1dc3b7e21ebfd01a5c5a8c65a"
        );
    }

    #[test]
    fn sha256_t_depends_on_timestamp() {
        assert_ne!(
            sha256_t("admin", "123456", 1),
            sha256_t("admin", "123456", 2)
        );
    }

    #[test]
    fn app_token_matches_documented_vector() {
        let (id, key, from) = (
            "31yOb7ulVXoBLYcRbmFesMu8",
            "dpFhBlov5zOLBqYJXimg6udabM9g30FDJNgt2g",
            "zax-A37658F19E24",
        );
        assert_eq!(
            app_sign(id, key, 1_686_023_607, 156_542),
            "6a85345348c66c64c1f69765bb5f9de4305f4d12f4fc5a9c2550e25750d810e2"
        );
        let token = app_token(id, key, from, 1_686_023_607, 156_542);
        assert_eq!(
            token,
            "c3YrNmE4NTM0NTM0OGM2NmM2NGMxZjY5NzY1YmI1ZjlkZTQzMDVmNGQxMmY0ZmM1YTljMjU1MGUyNTc1MGQ4MTBlMiszMXlPYjd1bFZYb0JMWWNSYm1GZXNNdTgrMCsxNTY1NDIrMTY4NjAyMzYwNyt6YXgtQTM3NjU4RjE5RTI0"
        );
        let parts = parse_app_token(&token).expect("parses");
        assert_eq!(parts.app_id, id);
        assert_eq!(parts.rand_num, 156_542);
        assert_eq!(parts.timestamp, 1_686_023_607);
        assert_eq!(parts.from, from);
    }

    #[test]
    fn parse_app_token_rejects_login_tokens() {
        assert!(parse_app_token("Y3UrQ1VfYWRtaW4r").is_none());
        assert!(parse_app_token("not base64!").is_none());
    }
}
