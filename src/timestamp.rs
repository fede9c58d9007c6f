//! Wall-clock times as the contract writes them.

use std::time::SystemTime;

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
