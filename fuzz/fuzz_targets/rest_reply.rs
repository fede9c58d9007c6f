#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

use libfuzzer_sys::fuzz_target;

// A BVCSP REST reply: two bytes of status (folded onto 100..=599), then the body.
fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = 100 + u16::from_le_bytes([data[0], data[1]]) % 500;
    // Bias towards success, where most of the parsing is.
    let status = if data[0] & 1 == 0 { 200 } else { status };
    invariants::check_rest_reply(status, &data[2..]);
});
