#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

use libfuzzer_sys::fuzz_target;

use bvcsp2mqtt::mqtt::topics::Topics;

// Any id as a topic level, alone and inside every contract topic.
fuzz_target!(|data: &[u8]| {
    let Ok(id) = std::str::from_utf8(data) else {
        return;
    };
    invariants::check_level(id);
    let t = Topics::new(invariants::BASE);
    for topic in [
        t.device_availability(id),
        t.device_status(id),
        t.device_location(id),
        t.user_availability(id),
        t.playbox_state(id),
        t.playbox_availability(id),
        t.playbox_error(id),
        t.link_playbox(id),
        t.alarm(Some(id), id),
        t.alarm(None, id),
        t.conference(id, id),
    ] {
        invariants::check_topic(&topic);
    }
});
