//! The online-status, location and conference payloads.

use super::*;

pub(super) fn online_status(
    out: &mut Normalised,
    frame: Value,
    received_at: &str,
    topics: &Topics,
) {
    let kind = str_field(&frame, &["type"])
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    let online = field(&frame, "status").and_then(as_i64).map(|s| s == 1);
    let device = field(&frame, "device").filter(|d| d.is_object());
    let user = field(&frame, "user").filter(|u| u.is_object());
    let device_id = device
        .and_then(|d| str_field(d, &["id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    let user_id = user
        .and_then(|u| str_field(u, &["id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    let time = field(&frame, "time")
        .and_then(upstream_time)
        .unwrap_or_else(|| received_at.to_string());
    let word = |on: bool| if on { "online" } else { "offline" };

    let mut ev = base_payload(&out.event_id, Stream::OnlineStatus, received_at);
    ev.insert("type".into(), Value::String(kind.clone()));
    ev.insert(
        "status".into(),
        online.map_or(Value::Null, |o| Value::String(word(o).into())),
    );
    ev.insert("online".into(), online.map_or(Value::Null, Value::Bool));
    ev.insert(
        "device_id".into(),
        device_id.clone().map_or(Value::Null, Value::String),
    );
    ev.insert(
        "user_id".into(),
        user_id.clone().map_or(Value::Null, Value::String),
    );
    ev.insert("time".into(), Value::String(time.clone()));

    match online {
        None => out.malformed = Some("online-status frame without a 0/1 status"),
        Some(_) if device_id.is_none() && user_id.is_none() => {
            out.malformed = Some("online-status frame without device.id or user.id")
        }
        Some(on) => {
            if let Some(id) = &device_id {
                out.messages.push(Message::state_text(
                    topics.device_availability(id),
                    word(on),
                ));
                let d = device.expect("device_id implies device");
                let mut st = Map::new();
                st.insert("device_id".into(), Value::String(id.clone()));
                st.insert("online".into(), Value::Bool(on));
                st.insert("status".into(), Value::String(word(on).into()));
                st.insert("type".into(), Value::String(kind.clone()));
                st.insert(
                    "name".into(),
                    str_field(d, &["name"]).map_or(Value::Null, |s| Value::String(s.into_owned())),
                );
                for (out_key, keys) in [
                    ("group_id", &["gid"][..]),
                    ("manufacturer", &["manufacturer"][..]),
                    ("product", &["product"][..]),
                    ("software_version", &["softwareVersion"][..]),
                    ("hardware_version", &["hardwareVersion"][..]),
                ] {
                    copy_str(&mut st, d, out_key, keys);
                }
                if let Some(net) = field(&frame, "network").filter(|n| n.is_object()) {
                    st.insert("network".into(), net.clone());
                }
                st.insert("time".into(), Value::String(time.clone()));
                st.insert("updated_at".into(), Value::String(received_at.to_string()));
                st.insert("event_id".into(), Value::String(out.event_id.clone()));
                st.insert("raw".into(), frame.clone());
                out.messages
                    .push(Message::state(topics.device_status(id), st));
                out.device = Some((id.clone(), on));
            }
            if let Some(id) = &user_id {
                out.messages
                    .push(Message::state_text(topics.user_availability(id), word(on)));
                out.user = Some((id.clone(), on));
            }
        }
    }
    ev.insert("raw".into(), frame);
    // The event goes last so a consumer reacting to it finds the state already updated.
    out.messages
        .push(Message::event(topics.online_status_event(), ev));
}

pub(super) fn location(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics) {
    let Some(id) = str_field(&frame, &["devId", "puid", "deviceId", "id"])
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty())
    else {
        out.malformed = Some("GPS frame without devId");
        return;
    };
    let (Some(lat), Some(lng)) = (
        field_any(&frame, &["lat", "latitude"]).and_then(as_f64),
        field_any(&frame, &["lng", "lon", "longitude"]).and_then(as_f64),
    ) else {
        out.malformed = Some("GPS frame without numeric lat/lng");
        return;
    };
    let time = field_any(&frame, &["time", "timestamp"])
        .and_then(upstream_time)
        .unwrap_or_else(|| received_at.to_string());
    let mut p = base_payload(&out.event_id, Stream::Location, received_at);
    p.insert("device_id".into(), Value::String(id.clone()));
    p.insert("lat".into(), json!(lat));
    p.insert("lng".into(), json!(lng));
    if let Some(h) = field(&frame, "height").and_then(as_f64) {
        p.insert("height".into(), json!(h));
    }
    p.insert("time".into(), Value::String(time));
    p.insert("raw".into(), frame);
    out.messages
        .push(Message::state(topics.device_location(&id), p));
}

pub(super) fn conference(out: &mut Normalised, frame: Value, received_at: &str, topics: &Topics) {
    let event = str_field(&frame, &["type", "event", "eventType"]).map(Cow::into_owned);
    let id = field_any(&frame, &["confInfo", "conference", "group"])
        .and_then(|c| str_field(c, &["id", "groupId", "confId"]))
        .or_else(|| str_field(&frame, &["confId", "conferenceId", "groupId", "id"]))
        .map(Cow::into_owned)
        .filter(|s| !s.is_empty());
    if event.is_none() {
        out.malformed = Some("conference frame without an event type");
    }
    let mut p = base_payload(&out.event_id, Stream::Conference, received_at);
    p.insert(
        "event".into(),
        event.clone().map_or(Value::Null, Value::String),
    );
    p.insert("id".into(), id.clone().map_or(Value::Null, Value::String));
    copy_str(
        &mut p,
        &frame,
        "operation",
        &["operate", "op", "action", "operation"],
    );
    p.insert("raw".into(), frame);
    let topic = topics.conference(
        id.as_deref().unwrap_or("_"),
        event.as_deref().unwrap_or("_"),
    );
    out.messages.push(Message::event(topic, p));
}
