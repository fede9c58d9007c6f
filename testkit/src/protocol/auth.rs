//! Credentials as a BVCSP server checks them (spec §3.1 and the AppId/AppKey FAQ), so the
//! simulator verifies the bridge's hash with an implementation of its own.

use std::fmt::Write as _;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

fn sha256_hex(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// What the server stores for a user: `hex(sha256(username "_" password))`.
pub fn stored_digest(username: &str, password: &str) -> String {
    sha256_hex(&[username, "_", password].concat())
}

/// The `password_encrypted` the server expects for `timestamp`, from the stored digest.
pub fn expected_login_hash(stored: &str, timestamp: i64) -> String {
    format!("SHA256_T:{}", sha256_hex(&format!("{stored}_{timestamp}")))
}

/// A client's login hash (for the simulator's own tests, which log in without the bridge).
pub fn login_hash(username: &str, password: &str, timestamp: i64) -> String {
    expected_login_hash(&stored_digest(username, password), timestamp)
}

/// The HMAC of an AppId/AppKey token: `hex(hmac_sha256(AppKey, AppId "+" ts "+" rand))`.
pub fn app_signature(app_id: &str, app_key: &str, timestamp: i64, rand_num: u32) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(app_key.as_bytes()) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(format!("{app_id}+{timestamp}+{rand_num}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A self-built token: `base64("sv+" sign "+" AppId "+0+" rand "+" ts "+" from)`.
pub fn app_token(app_id: &str, app_key: &str, from: &str, timestamp: i64, rand_num: u32) -> String {
    let sign = app_signature(app_id, app_key, timestamp, rand_num);
    base64::engine::general_purpose::STANDARD.encode(format!(
        "sv+{sign}+{app_id}+0+{rand_num}+{timestamp}+{from}"
    ))
}

/// The fields of a presented AppId/AppKey token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppToken {
    pub sign: String,
    pub app_id: String,
    pub rand_num: u32,
    pub timestamp: i64,
    pub from: String,
}

/// Decode a presented token; `None` unless it has the documented seven `+` fields.
pub fn decode_app_token(token: &str) -> Option<AppToken> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let fields: Vec<&str> = text.splitn(7, '+').collect();
    let [sv, sign, app_id, zero, rand_num, timestamp, from] = fields[..] else {
        return None;
    };
    if sv != "sv" || zero != "0" {
        return None;
    }
    Some(AppToken {
        sign: sign.to_owned(),
        app_id: app_id.to_owned(),
        rand_num: rand_num.parse().ok()?,
        timestamp: timestamp.parse().ok()?,
        from: from.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of spec §3.1.
    #[test]
    fn login_hash_matches_the_spec_example() {
        assert_eq!(
            stored_digest("admin", "123456"),
            "6848d6405bf34bf9b2d82ed8822c756807632d3eaefedec90ac33cb32ac83671"
        );
        assert_eq!(
            login_hash("admin", "123456", 1_721_272_800),
            "SHA256_T:ebc145ec6decbc3e7842f1fbc2bd6d0cf65e76f1dc3b7e21ebfd01a5c5a8c65a"
        );
    }

    /// The vendor FAQ's AppId/AppKey example.
    #[test]
    fn app_token_matches_the_faq_example() {
        let (id, key, from) = (
            "31yOb7ulVXoBLYcRbmFesMu8",
            "dpFhBlov5zOLBqYJXimg6udabM9g30FDJNgt2g",
            "zax-A37658F19E24",
        );
        assert_eq!(
            app_signature(id, key, 1_686_023_607, 156_542),
            "6a85345348c66c64c1f69765bb5f9de4305f4d12f4fc5a9c2550e25750d810e2"
        );
        let token = app_token(id, key, from, 1_686_023_607, 156_542);
        let parts = decode_app_token(&token).expect("decodes");
        assert_eq!((parts.app_id.as_str(), parts.rand_num), (id, 156_542));
        assert_eq!(
            (parts.timestamp, parts.from.as_str()),
            (1_686_023_607, from)
        );
        assert!(decode_app_token("Y3UrQ1VfYWRtaW4r").is_none());
    }
}
