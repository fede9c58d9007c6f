//! The project's own stand-ins for the things it talks to: a BVCSP server and an MQTT
//! broker. The tests and the demo use them over real sockets.

pub mod broker;
pub mod bvcsp;
pub mod cert;
pub mod playbox;
