//! The play box's side of AVON UDP discovery (spec playbox.md §9): recognise a search,
//! build the reply. A 24-byte little-endian header: magic, sequence, type 0x8855, `what`
//! (0x0081 search, 1 reply), argument, body length, 2 zero bytes, and a checksum that is
//! the sum of bytes 0–21 taken as signed int8, truncated to 16 bits.

use serde_json::Value;

const HEADER: usize = 24;

fn checksum(header: &[u8]) -> u16 {
    header[..22]
        .iter()
        .fold(0i32, |sum, &b| sum + i32::from(b as i8)) as u16
}

fn header(seq: i32, what: u16, arg: u32, body_len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(b"AVON");
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..10].copy_from_slice(&0x8855u16.to_le_bytes());
    h[10..12].copy_from_slice(&what.to_le_bytes());
    h[12..16].copy_from_slice(&arg.to_le_bytes());
    h[16..20].copy_from_slice(&body_len.to_le_bytes());
    let sum = checksum(&h);
    h[22..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The search datagram a client sends (what the simulator's own tests send).
pub fn search_request() -> [u8; HEADER] {
    header(-1, 0x0081, 1, 0)
}

/// Whether `buf` starts with a valid AVON discovery search header.
pub fn is_search(buf: &[u8]) -> bool {
    buf.len() >= HEADER
        && &buf[..4] == b"AVON"
        && buf[8..12] == [0x55, 0x88, 0x81, 0x00]
        && u16::from_le_bytes([buf[22], buf[23]]) == checksum(buf)
}

/// A search reply: the header (`what` 1, sequence −1) and `body` as compact JSON.
pub fn build_reply(body: &Value) -> Vec<u8> {
    let json = body.to_string().into_bytes();
    let mut out = header(-1, 1, 0, u32::try_from(json.len()).unwrap_or(u32::MAX)).to_vec();
    out.extend_from_slice(&json);
    out
}

/// The JSON body of a reply whose header is valid (for the simulator's own tests).
pub fn reply_body(buf: &[u8]) -> Option<Value> {
    let ok = buf.len() >= HEADER
        && &buf[..4] == b"AVON"
        && buf[8..12] == [0x55, 0x88, 0x01, 0x00]
        && u16::from_le_bytes([buf[22], buf[23]]) == checksum(buf);
    ok.then(|| serde_json::from_slice(&buf[HEADER..]).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_matches_the_spec_bytes() {
        let spec: [u8; 24] = [
            0x41, 0x56, 0x4f, 0x4e, 0xff, 0xff, 0xff, 0xff, 0x55, 0x88, 0x81, 0x00, 0x01, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8f, 0x00,
        ];
        assert_eq!(search_request(), spec);
        assert!(is_search(&spec));
        let mut bad = spec;
        bad[22] ^= 1;
        assert!(!is_search(&bad));
        let reply = build_reply(&serde_json::json!({"sn": "X"}));
        assert_eq!(reply_body(&reply).expect("body")["sn"], "X");
        assert!(!is_search(&reply));
    }
}
