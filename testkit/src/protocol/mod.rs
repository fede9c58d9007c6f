//! The simulators' own reading of the upstream protocols (shared/spec/bvcsp.md and
//! playbox.md), written apart from the bridge's so that a misreading in the bridge is
//! not repeated here and passed by both sides.

pub mod auth;
pub mod avon;
pub mod stream;
pub use stream::Stream;
