//! The AVON UDP discovery wire format of NovaStar Taurus play boxes (spec `playbox.md` §9).
//!
//! Every packet starts with a 24-byte little-endian header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"AVON"` |
//! | 4 | 4 | sequence (−1 for a search) |
//! | 8 | 2 | packet type (0x8855 = discovery) |
//! | 10 | 2 | `what` (0x0081 = search, 1 = search reply) |
//! | 12 | 4 | argument |
//! | 16 | 4 | body length |
//! | 20 | 2 | body checksum / `encodeType` (0 here) |
//! | 22 | 2 | header checksum: the sum of bytes 0–21 as signed int8, truncated to 16 bits |
//!
//! A reply carries UTF-8 JSON after the header. Real boxes sometimes send bytes after the
//! JSON, so [`parse_reply`] reads the first JSON value and ignores the rest.

use serde_json::Value;

/// The UDP port of the terminal listener that answers searches.
pub const DISCOVERY_PORT: u16 = 16601;
/// Size of the AVON header.
pub const HEADER_LEN: usize = 24;
/// The HTTPS port a box uses when its reply does not name one.
pub const DEFAULT_HTTPS_PORT: u16 = 16674;

const MAGIC: &[u8; 4] = b"AVON";
const TYPE_DISCOVERY: u16 = 0x8855;
const WHAT_SEARCH: u16 = 0x0081;
const WHAT_REPLY: u16 = 0x0001;
const CHECKSUM_OFFSET: usize = 22;

/// The decoded fields of an AVON header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seq: i32,
    pub packet_type: u16,
    pub what: u16,
    pub arg: u32,
    pub body_len: u32,
}

/// What a discovery reply says about a box.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub sn: String,
    pub product_name: String,
    pub alias_name: String,
    /// `terminalEntrancePortHttps`, [`DEFAULT_HTTPS_PORT`] when absent or out of range.
    pub https_port: u16,
    /// The whole JSON body, for fields not lifted out above.
    pub raw: Value,
}

/// The sum of bytes 0..22 (or fewer, if `bytes` is shorter), each taken as a signed
/// int8, truncated to 16 bits.
pub fn header_checksum(bytes: &[u8]) -> u16 {
    let sum: i32 = bytes
        .iter()
        .take(CHECKSUM_OFFSET)
        .map(|&b| i32::from(b as i8))
        .sum();
    sum as u16
}

fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(MAGIC);
    out[4..8].copy_from_slice(&h.seq.to_le_bytes());
    out[8..10].copy_from_slice(&h.packet_type.to_le_bytes());
    out[10..12].copy_from_slice(&h.what.to_le_bytes());
    out[12..16].copy_from_slice(&h.arg.to_le_bytes());
    out[16..20].copy_from_slice(&h.body_len.to_le_bytes());
    // Bytes 20..22 (body checksum / encodeType) stay 0.
    let sum = header_checksum(&out);
    out[CHECKSUM_OFFSET..].copy_from_slice(&sum.to_le_bytes());
    out
}

/// The 24-byte search datagram of spec §9 (header checksum 0x008F).
pub fn search_request() -> [u8; HEADER_LEN] {
    encode_header(&Header {
        seq: -1,
        packet_type: TYPE_DISCOVERY,
        what: WHAT_SEARCH,
        arg: 1,
        body_len: 0,
    })
}

/// Decode the header at the start of `buf`; `None` when it is short, the magic is not
/// `"AVON"`, or the header checksum does not match.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let h = buf.get(..HEADER_LEN)?;
    if &h[0..4] != MAGIC {
        return None;
    }
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if u16_at(CHECKSUM_OFFSET) != header_checksum(h) {
        return None;
    }
    Some(Header {
        seq: u32_at(4) as i32,
        packet_type: u16_at(8),
        what: u16_at(10),
        arg: u32_at(12),
        body_len: u32_at(16),
    })
}

/// Whether `buf` is a valid discovery search (type 0x8855, `what` 0x0081).
pub fn is_search(buf: &[u8]) -> bool {
    parse_header(buf).is_some_and(|h| h.packet_type == TYPE_DISCOVERY && h.what == WHAT_SEARCH)
}

/// A search reply: the header (type 0x8855, `what` 1, sequence −1, argument 0) followed
/// by `body` as compact JSON.
pub fn build_reply(body: &Value) -> Vec<u8> {
    let json = body.to_string().into_bytes();
    let header = encode_header(&Header {
        seq: -1,
        packet_type: TYPE_DISCOVERY,
        what: WHAT_REPLY,
        arg: 0,
        body_len: u32::try_from(json.len()).unwrap_or(u32::MAX),
    });
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&json);
    out
}

/// Decode a search reply. `None` unless the header is valid, says discovery/`what` 1,
/// and the body starts with a JSON object carrying a string `sn`. Bytes after the first
/// JSON value are ignored, whether they lie inside the stated body length or beyond it.
pub fn parse_reply(buf: &[u8]) -> Option<Found> {
    let h = parse_header(buf)?;
    if h.packet_type != TYPE_DISCOVERY || h.what != WHAT_REPLY {
        return None;
    }
    let body = &buf[HEADER_LEN..];
    let raw: Value = serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next()?
        .ok()?;
    if !raw.is_object() {
        return None;
    }
    let sn = raw.get("sn")?.as_str()?.to_owned();
    let text = |key: &str| {
        raw.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let https_port = raw
        .get("terminalEntrancePortHttps")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .unwrap_or(DEFAULT_HTTPS_PORT);
    Some(Found {
        sn,
        product_name: text("productName"),
        alias_name: text("aliasName"),
        https_port,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPEC_REQUEST: [u8; 24] = [
        0x41, 0x56, 0x4f, 0x4e, 0xff, 0xff, 0xff, 0xff, 0x55, 0x88, 0x81, 0x00, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8f, 0x00,
    ];

    fn sample() -> Value {
        json!({
            "aliasName": "T2-4G_00000000", "encodeType": 0, "ftpPort": 16602, "height": 256,
            "key": "novaStar", "logined": false, "loginedUsernames": [""], "modelId": 38411,
            "platform": "rk312x", "privacy": true, "productName": "T2-4G", "rotation": 0,
            "sn": "2ZTA00000X0A00000000", "syssetFtpPort": 16604, "syssetTcpPort": 16607,
            "tcpPort": 16606, "terminalEntrancePortHttps": 16674,
            "terminalEntrancePortWebSocket": 16675, "width": 192
        })
    }

    #[test]
    fn request_matches_the_spec_bytes() {
        assert_eq!(search_request(), SPEC_REQUEST);
        assert_eq!(header_checksum(&SPEC_REQUEST), 0x008F);
        assert!(is_search(&SPEC_REQUEST));
        assert_eq!(
            parse_header(&SPEC_REQUEST),
            Some(Header {
                seq: -1,
                packet_type: 0x8855,
                what: 0x0081,
                arg: 1,
                body_len: 0,
            })
        );
        assert!(parse_reply(&SPEC_REQUEST).is_none());
    }

    #[test]
    fn checksum_treats_bytes_as_signed_and_wraps() {
        assert_eq!(header_checksum(&[0xff; 22]), (-22i32) as u16);
        assert_eq!(header_checksum(&[0x7f; 30]), 22 * 0x7f);
        // Only bytes 0..22 count: the checksum field itself is outside.
        let mut req = SPEC_REQUEST;
        req[22] = 0;
        req[23] = 0x55;
        assert_eq!(header_checksum(&req), 0x008F);
    }

    #[test]
    fn reply_round_trip() {
        let bytes = build_reply(&sample());
        let h = parse_header(&bytes).expect("header");
        assert_eq!(h.packet_type, 0x8855);
        assert_eq!(h.what, 1);
        assert_eq!(h.body_len as usize, bytes.len() - HEADER_LEN);
        assert!(!is_search(&bytes));
        let found = parse_reply(&bytes).expect("reply");
        assert_eq!(found.sn, "2ZTA00000X0A00000000");
        assert_eq!(found.product_name, "T2-4G");
        assert_eq!(found.alias_name, "T2-4G_00000000");
        assert_eq!(found.https_port, 16674);
        assert_eq!(found.raw, sample());
    }

    #[test]
    fn https_port_defaults() {
        let found = parse_reply(&build_reply(&json!({"sn": "X"}))).expect("reply");
        assert_eq!(found.https_port, DEFAULT_HTTPS_PORT);
        assert_eq!(found.product_name, "");
        let found = parse_reply(&build_reply(
            &json!({"sn": "X", "terminalEntrancePortHttps": 443}),
        ))
        .expect("reply");
        assert_eq!(found.https_port, 443);
        let found = parse_reply(&build_reply(
            &json!({"sn": "X", "terminalEntrancePortHttps": 70000}),
        ))
        .expect("reply");
        assert_eq!(found.https_port, DEFAULT_HTTPS_PORT);
    }

    #[test]
    fn trailing_garbage_is_tolerated() {
        let mut bytes = build_reply(&sample());
        bytes.extend_from_slice(b"\0\0\xff garbage {");
        assert_eq!(
            parse_reply(&bytes).expect("reply").sn,
            "2ZTA00000X0A00000000"
        );

        // Garbage counted inside the stated body length, too.
        let body = format!("{}\0\0junk", json!({"sn": "S1"}));
        let mut bytes = encode_header(&Header {
            seq: -1,
            packet_type: 0x8855,
            what: 1,
            arg: 0,
            body_len: body.len() as u32,
        })
        .to_vec();
        bytes.extend_from_slice(body.as_bytes());
        assert_eq!(parse_reply(&bytes).expect("reply").sn, "S1");
    }

    #[test]
    fn bad_packets_are_rejected() {
        let good = build_reply(&sample());

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(parse_header(&bad_magic).is_none());
        assert!(parse_reply(&bad_magic).is_none());

        let mut bad_sum = good.clone();
        bad_sum[22] ^= 1;
        assert!(parse_header(&bad_sum).is_none());
        assert!(parse_reply(&bad_sum).is_none());

        let mut bad_search = SPEC_REQUEST;
        bad_search[23] = 1;
        assert!(!is_search(&bad_search));

        assert!(parse_header(&good[..HEADER_LEN - 1]).is_none());
        assert!(!is_search(&[]));

        // Valid header but not a reply, or no usable body.
        let not_json = [
            &encode_header(&Header {
                seq: -1,
                packet_type: 0x8855,
                what: 1,
                arg: 0,
                body_len: 3,
            })[..],
            b"abc",
        ]
        .concat();
        assert!(parse_reply(&not_json).is_none());
        assert!(parse_reply(&build_reply(&json!({"productName": "no sn"}))).is_none());
        assert!(parse_reply(&build_reply(&json!([1, 2]))).is_none());
        let mut other_type = build_reply(&sample());
        other_type[8] = 0x51;
        other_type[9] = 0x52;
        let sum = header_checksum(&other_type);
        other_type[22..24].copy_from_slice(&sum.to_le_bytes());
        assert!(parse_header(&other_type).is_some());
        assert!(parse_reply(&other_type).is_none());
    }
}
