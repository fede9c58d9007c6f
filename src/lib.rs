//! bvcsp2mqtt: BVCSP event streams and NovaStar play boxes to MQTT.

pub mod bvcsp;
pub mod config;
pub mod critical;
pub mod health;
pub mod heartbeat;
pub mod homeassistant;
pub mod json;
pub mod link_status;
pub mod mqtt;
pub mod playbox;
pub mod recovery;
pub mod retry;
pub mod storage;
pub mod supervisor;
pub mod timestamp;
pub mod tls;

pub use supervisor::{Bridge, run};
