#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

use libfuzzer_sys::fuzz_target;

// A command: the topic and the payload, split at the first NUL byte.
fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (topic, payload) = text
        .split_once(char::from(0))
        .unwrap_or(("b/playbox/x/brightness/set", &text));
    invariants::check_command(topic, payload);
});
