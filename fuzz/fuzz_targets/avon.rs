#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

use libfuzzer_sys::fuzz_target;

// An AVON datagram as received, and the same bytes as the body of a valid reply header
// (random bytes almost never carry a right checksum).
fuzz_target!(|data: &[u8]| {
    invariants::check_avon(data);
    invariants::check_avon(&invariants::avon_reply_with_body(data));
});
