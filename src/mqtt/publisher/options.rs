//! rumqttc's options from `[mqtt]`: the session, the last will, packet limits and TLS.

use std::sync::Arc;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use tracing::warn;

use super::{MQTT_MAX_PACKET, MqttSetupError, WINDOW};
use crate::config::{MqttConfig, Qos};
use crate::mqtt::Topics;
use crate::tls::{self, ClientAuth, Trust};

pub(super) fn qos_of(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub(super) fn options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, MqttSetupError> {
    let (use_tls, host, port) = cfg.endpoint();
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_keep_alive(cfg.keepalive)
        .set_clean_session(false)
        // Incoming: anything MQTT can carry, so no message on a subscribed topic can cut
        // the link (rumqttc disconnects on a larger one); oversized commands are dropped
        // after reading. Outgoing: the configured limit (larger ones are dead letters).
        .set_max_packet_size(MQTT_MAX_PACKET, cfg.max_packet_size)
        .set_inflight(u16::try_from(WINDOW * 2).unwrap_or(u16::MAX))
        .set_request_channel_capacity(WINDOW + 4)
        .set_last_will(LastWill::new(
            topics.bridge_state(),
            "offline",
            qos_of(cfg.qos),
            true,
        ));
    if !cfg.username.is_empty() {
        o.set_credentials(cfg.username.clone(), cfg.password.expose().to_string());
    }
    if use_tls {
        let t = &cfg.tls;
        let trust = Trust::from_options(t.insecure, None, t.ca_file.as_deref());
        if t.insecure {
            warn!("mqtt.tls.insecure = true: the broker's certificate is NOT verified");
        }
        let auth = match (&t.client_cert, &t.client_key) {
            (Some(cert_file), Some(key_file)) => Some(ClientAuth {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let tls_cfg = tls::client_config(&trust, auth)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_cfg),
        )));
    }
    Ok(o)
}
