//! The five BVCSP WebSocket event streams and their default paths.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    OnlineStatus,
    Alarm,
    Location,
    Im,
    Conference,
}

impl Stream {
    /// In the order the connect sequence opens them (online status first).
    pub const ALL: [Stream; 5] = [
        Stream::OnlineStatus,
        Stream::Alarm,
        Stream::Location,
        Stream::Im,
        Stream::Conference,
    ];

    /// The name used in configuration, topics and payloads.
    pub fn name(self) -> &'static str {
        match self {
            Stream::OnlineStatus => "online_status",
            Stream::Alarm => "alarm",
            Stream::Location => "location",
            Stream::Im => "im",
            Stream::Conference => "conference",
        }
    }

    pub fn default_path(self) -> &'static str {
        match self {
            Stream::OnlineStatus => "/bvcsp/v1/ws/event/onlinestatus",
            Stream::Alarm => "/bvcsp/v1/ws/event/alarm",
            Stream::Location => "/bvcsp/v1/ws/gpsdata",
            Stream::Im => "/bvcsp/v1/ws/event/im",
            Stream::Conference => "/bvcsp/v1/ws/event/conference",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stream name that is none of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stream `{0}`, expected one of online_status, alarm, location, im, conference")]
pub struct UnknownStream(pub String);

impl FromStr for Stream {
    type Err = UnknownStream;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stream::ALL
            .into_iter()
            .find(|st| st.name() == s.trim())
            .ok_or_else(|| UnknownStream(s.to_string()))
    }
}
