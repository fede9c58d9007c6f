//! The five BVCSP WebSocket event streams and the paths the spec gives them (§5).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    OnlineStatus,
    Alarm,
    Location,
    Im,
    Conference,
}

impl Stream {
    /// In the order a client opens them (online status first).
    pub const ALL: [Stream; 5] = [
        Stream::OnlineStatus,
        Stream::Alarm,
        Stream::Location,
        Stream::Im,
        Stream::Conference,
    ];

    /// The stream's name as the bridge's configuration and topics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Stream::OnlineStatus => "online_status",
            Stream::Alarm => "alarm",
            Stream::Location => "location",
            Stream::Im => "im",
            Stream::Conference => "conference",
        }
    }

    /// The server's path for the stream.
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
