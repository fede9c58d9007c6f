#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

use libfuzzer_sys::fuzz_target;

use serde_json::Value;

// upstream_time of any i64, f64 or string, and of any JSON text.
fuzz_target!(|data: &[u8]| {
    if let Some(&b) = data.first_chunk::<8>() {
        invariants::check_upstream_time(&Value::from(i64::from_le_bytes(b)));
        invariants::check_upstream_time(&Value::from(u64::from_le_bytes(b)));
        invariants::check_upstream_time(&Value::from(f64::from_le_bytes(b)));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        invariants::check_upstream_time(&Value::from(text));
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            invariants::check_upstream_time(&v);
        }
    }
});
