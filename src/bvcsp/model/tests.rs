//! Normalisation of every stream, ids, alarm identity, frames.

use super::*;

fn topics() -> Topics {
    Topics::new("b")
}

fn payload(m: &Message) -> Value {
    serde_json::from_slice(&m.payload).unwrap()
}

#[test]
fn alarm_labels_follow_the_table() {
    assert_eq!(alarm_label(5), "sos");
    assert_eq!(alarm_label(4106), "overspeed");
    assert_eq!(alarm_label(0x1019), "working_at_height");
    assert_eq!(alarm_label(20481), "user_logout");
    assert_eq!(alarm_label(8192), "type_8192");
    assert_eq!(alarm_label(-1), "type_-1");
}

#[test]
fn every_table_label_is_an_event_type_and_the_rest_are_other() {
    let known = [
        1, 2, 3, 4, 5, 4096, 4097, 4098, 4099, 4100, 4101, 4102, 4103, 4104, 4105, 4106, 4107,
        4108, 4109, 4110, 4111, 4112, 4113, 4114, 4115, 4116, 4117, 4118, 4119, 4120, 4121, 20480,
        20481,
    ];
    assert_eq!(known.len(), ALARM_LABELS.len());
    for t in known {
        let label = alarm_label(t);
        assert_eq!(alarm_event_type(&label), label, "type {t}");
    }
    assert_eq!(alarm_event_type("type_8192"), "other");
    assert_eq!(alarm_event_type("unknown"), "other");
    let sos = normalise(
        Stream::Alarm,
        json!({"type": 5, "devID": "PU_1"}),
        UNIX_EPOCH,
        &topics(),
    );
    assert_eq!(payload(&sos.messages[0])["event_type"], "sos");
    let odd = normalise(
        Stream::Alarm,
        json!({"type": 9999, "devID": "PU_1"}),
        UNIX_EPOCH,
        &topics(),
    );
    assert_eq!(payload(&odd.messages[0])["event_type"], "other");
    assert_eq!(payload(&odd.messages[0])["label"], "type_9999");
}

#[test]
fn keys_are_case_insensitive_and_numbers_may_be_strings() {
    let v = json!({"DevId": "PU_1", "LAT": "31.5", "lng": 117});
    assert_eq!(field(&v, "devId").and_then(as_string).unwrap(), "PU_1");
    assert_eq!(field(&v, "lat").and_then(as_f64), Some(31.5));
    assert_eq!(field(&v, "lng").and_then(as_f64), Some(117.0));
}

#[test]
fn upstream_times_in_seconds_or_millis() {
    assert_eq!(
        upstream_time(&json!(1_717_400_123)).unwrap(),
        "2024-06-03T07:35:23.000Z"
    );
    assert_eq!(
        upstream_time(&json!(1_717_400_123_456_i64)).unwrap(),
        "2024-06-03T07:35:23.456Z"
    );
    assert_eq!(
        upstream_time(&json!("1717400123")).unwrap(),
        "2024-06-03T07:35:23.000Z"
    );
    assert!(upstream_time(&json!(0)).is_none());
}

#[test]
fn upstream_times_of_any_size_are_sane_or_none() {
    let want = "2024-07-18T03:20:00.000Z";
    for v in [
        json!(1_721_272_800_i64),
        json!(1_721_272_800_000_i64),
        json!(1_721_272_800_000_000_i64),
        json!(1_721_272_800_000_000_000_i64),
        json!("1721272800000000"),
        json!(1_721_272_800.0),
    ] {
        assert_eq!(upstream_time(&v).as_deref(), Some(want), "{v}");
    }
    for v in [
        json!(99_999_999_999_999_999_i64),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(-5),
        json!(1e300),
        json!(-1e300),
        json!("soon"),
        json!(""),
        json!(null),
        json!([1]),
        json!({"t": 1}),
    ] {
        assert!(upstream_time(&v).is_none(), "{v}");
    }
}

#[test]
fn keyless_and_huge_keyed_alarms_have_a_bounded_shared_identity() {
    let frame = json!({"type": 5, "time": 1717400123, "devID": "PU_1", "status": 0});
    let record = json!({"type": 5, "timestamp": 1717400123, "device_id": "PU_1", "status": 0});
    let a = alarm_identity(&frame).unwrap();
    assert_eq!(Some(&a), alarm_identity(&record).as_ref());
    assert!(a.key.starts_with("nokey:"), "{a:?}");
    let later = json!({"type": 5, "time": 1717400124, "devID": "PU_1", "status": 0});
    assert_ne!(Some(a), alarm_identity(&later));
    assert!(alarm_identity(&json!({"type": 5, "devID": "PU_1"})).is_none());
    let huge = json!({"key": "k".repeat(100_000), "status": 1});
    let h = alarm_identity(&huge).unwrap();
    assert!(h.key.len() < 80 && h.key.starts_with("sha256:"), "{h:?}");
    assert_eq!(h.state, "end");
}

#[test]
fn an_alarm_record_is_the_same_event_as_its_frame() {
    let frame = json!({"key": "k1", "type": 5, "time": 1717400123, "devID": "PU_1",
        "devName": "Helmet", "status": 0, "desc": "SOS"});
    let record = json!({"key": "k1", "type": 5, "timestamp": 1717400123, "device_id": "PU_1",
        "status": 0, "description": "SOS"});
    let live = normalise(Stream::Alarm, frame, UNIX_EPOCH, &topics());
    let back = normalise_alarm_record(record, SystemTime::now(), &topics());
    assert_eq!(live.event_id, back.event_id);
    assert_eq!(live.messages[0].topic, back.messages[0].topic);
    let (a, b) = (payload(&live.messages[0]), payload(&back.messages[0]));
    for k in [
        "type",
        "label",
        "state",
        "device_id",
        "description",
        "time",
        "key",
        "event_id",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
    assert_eq!(b["backfilled"], true);
    assert!(a.get("backfilled").is_none());
    // The end of the same alarm is another event.
    let end = json!({"key": "k1", "type": 5, "time": 1717400200, "devID": "PU_1", "status": 1});
    assert_ne!(alarm_event_id(&end), live.event_id);
    // An alarm frame repeated with other content is still the same alarm.
    let again =
        json!({"key": "k1", "type": 5, "time": 1717400123, "devID": "PU_1", "status": 0, "x": 1});
    assert_eq!(alarm_event_id(&again), live.event_id);
}

#[test]
fn frames_split_into_events() {
    assert!(split_frame("").unwrap().events.is_empty());
    assert!(split_frame("  ").unwrap().events.is_empty());
    assert_eq!(
        split_frame("[{\"a\":1},{\"a\":2}]").unwrap().events.len(),
        2
    );
    assert_eq!(
        split_frame("{\"a\":[1,{\"b\":null}]}").unwrap().events,
        vec![json!({"a": [1, {"b": null}]})]
    );
    assert_eq!(split_frame("42").unwrap().events, vec![json!(42)]);
    assert_eq!(split_frame("\"x\"").unwrap().events, vec![json!("x")]);
    assert!(split_frame("not json").is_err());
    assert!(split_frame("{\"a\":1} trailing").is_err());
    assert!(split_frame("[1,2").is_err());
    let huge = format!("[{}{{}}]", "{},".repeat(MAX_EVENTS_PER_FRAME + 499));
    let f = split_frame(&huge).unwrap();
    assert_eq!((f.events.len(), f.skipped), (MAX_EVENTS_PER_FRAME, 500));
}

#[test]
fn alarm_payload_has_contract_fields() {
    let frame = json!({"key": "a8f3c1e2", "type": 4106, "time": 1717400123, "userID": "", "userName": "",
        "devID": "PU_264F708E", "devName": "Truck 7", "subDevIdx": 65536, "status": 0,
        "desc": "overspeed", "lat": 31.849722, "lng": 117.207138, "payload": ""});
    let n = normalise(Stream::Alarm, frame.clone(), UNIX_EPOCH, &topics());
    assert_eq!(n.messages.len(), 1);
    let m = &n.messages[0];
    assert_eq!(m.topic, "b/device/PU_264F708E/alarm/overspeed");
    assert!(!m.retain);
    let p = payload(m);
    assert_eq!(p["event_id"], n.event_id.as_str());
    assert_eq!(p["stream"], "alarm");
    assert_eq!(p["received_at"], "1970-01-01T00:00:00.000Z");
    assert_eq!(p["type"], 4106);
    assert_eq!(p["label"], "overspeed");
    assert_eq!(p["state"], "start");
    assert_eq!(p["device_id"], "PU_264F708E");
    assert_eq!(p["device_name"], "Truck 7");
    assert_eq!(p["description"], "overspeed");
    assert_eq!(p["time"], "2024-06-03T07:35:23.000Z");
    assert_eq!(p["lat"], 31.849722);
    assert_eq!(p["raw"], frame);
    // The same frame read again gets the same id: a redelivery, not a new alarm.
    let again = normalise(Stream::Alarm, frame, SystemTime::now(), &topics());
    assert_eq!(again.event_id, n.event_id);
}

#[test]
fn alarm_without_device_or_type_still_published() {
    let n = normalise(
        Stream::Alarm,
        json!({"type": "5", "status": 1}),
        UNIX_EPOCH,
        &topics(),
    );
    assert_eq!(n.messages[0].topic, "b/alarm/sos");
    assert_eq!(payload(&n.messages[0])["state"], "end");
    assert!(payload(&n.messages[0]).get("lat").is_none());
    let n = normalise(
        Stream::Alarm,
        json!({"devID": "PU_1"}),
        UNIX_EPOCH,
        &topics(),
    );
    assert_eq!(n.messages[0].topic, "b/device/PU_1/alarm/unknown");
    assert!(n.malformed.is_some());
}

#[test]
fn online_status_sets_state_and_event() {
    let frame = json!({"type": "PU", "time": 1717400000, "status": 1,
        "device": {"id": "PU_55AA0000", "name": "Helmet 07"}});
    let n = normalise(Stream::OnlineStatus, frame, UNIX_EPOCH, &topics());
    let topics: Vec<_> = n
        .messages
        .iter()
        .map(|m| (m.topic.as_str(), m.retain))
        .collect();
    assert_eq!(
        topics,
        vec![
            ("b/device/PU_55AA0000/availability", true),
            ("b/device/PU_55AA0000/status", true),
            ("b/event/online_status", false)
        ]
    );
    assert_eq!(&n.messages[0].payload[..], b"online");
    assert_eq!(payload(&n.messages[1])["name"], "Helmet 07");
    assert_eq!(n.device, Some(("PU_55AA0000".into(), true)));
    let cu = json!({"type": "CU", "status": 0, "user": {"id": "CU_ops"}});
    let n = normalise(Stream::OnlineStatus, cu, UNIX_EPOCH, &Topics::new("b"));
    assert_eq!(n.messages[0].topic, "b/user/CU_ops/availability");
    assert_eq!(&n.messages[0].payload[..], b"offline");
}

#[test]
fn location_is_retained_state() {
    let frame = json!({"devId": "PU_1", "lat": 31.849722, "lng": 117.207138, "height": 35.2});
    let n = normalise(Stream::Location, frame, UNIX_EPOCH, &topics());
    let m = &n.messages[0];
    assert_eq!(m.topic, "b/device/PU_1/location");
    assert!(m.retain);
    let p = payload(m);
    assert_eq!(p["lat"], 31.849722);
    assert_eq!(p["height"], 35.2);
    assert_eq!(p["stream"], "location");
    assert_eq!(p["time"], "1970-01-01T00:00:00.000Z");
    let bad = normalise(Stream::Location, json!({"lat": 1}), UNIX_EPOCH, &topics());
    assert!(bad.messages.is_empty() && bad.malformed.is_some());
}

#[test]
fn conference_topic_from_type_and_id() {
    let frame = json!({"type": "member", "operate": "start-speak",
        "member": {"id": 3, "memberID": "PU_55AA0000"}, "confInfo": {"id": "CONF_0001"}});
    let n = normalise(Stream::Conference, frame, UNIX_EPOCH, &topics());
    assert_eq!(n.messages[0].topic, "b/conference/CONF_0001/member");
    assert_eq!(payload(&n.messages[0])["operation"], "start-speak");
    let n = normalise(Stream::Conference, json!({"x": 1}), UNIX_EPOCH, &topics());
    assert_eq!(n.messages[0].topic, "b/conference/_/_");
}

#[test]
fn shape_keys_follow_field_names_not_values() {
    let a = json!({"devId": "PU_1", "lat": 1.0});
    let b = json!({"lat": 2.0, "devId": "PU_2"});
    let c = json!({"devId": "PU_1", "lat": 1.0, "height": 3});
    assert_eq!(shape_key(&a), shape_key(&b));
    assert_ne!(shape_key(&a), shape_key(&c));
    assert_eq!(shape(&b), "devId,lat");
}

#[test]
fn unique_ids_differ() {
    let a = normalise(
        Stream::Conference,
        json!({"type": "group"}),
        UNIX_EPOCH,
        &topics(),
    );
    let b = normalise(
        Stream::Conference,
        json!({"type": "group"}),
        UNIX_EPOCH,
        &topics(),
    );
    assert_ne!(a.event_id, b.event_id);
}

#[test]
fn device_records_from_the_list() {
    let r = DeviceRecord::from_value(
        json!({"id": "PU_1", "status": 1, "gps": {"lng": 117.2, "lat": 31.8, "time": 1717399990}}),
    )
    .unwrap();
    assert!(r.online);
    let msgs = r.messages(UNIX_EPOCH, &topics());
    assert_eq!(msgs.len(), 2);
    assert_eq!(payload(&msgs[1])["time"], "2024-06-03T07:33:10.000Z");
    let r =
        DeviceRecord::from_value(json!({"id": "PU_2", "status": 0, "gps": {"lng": 0, "lat": 0}}))
            .unwrap();
    assert_eq!(r.messages(UNIX_EPOCH, &topics()).len(), 1);
    assert!(DeviceRecord::from_value(json!({"name": "x"})).is_none());
}
