//! `bvcsp2mqtt demo`: the whole bridge on one machine with nothing installed. A BVCSP
//! simulator with a small fleet generating traffic on every stream, an embedded MQTT
//! broker, the bridge itself, and a live view of what arrives on MQTT.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use rand::Rng;
use rand::seq::SliceRandom;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use bvcsp2mqtt::config;
use bvcsp2mqtt::supervisor::{Bridge, DEFAULT_GRACE};
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::broker::EmbeddedBroker;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
use bvcsp2mqtt_testkit::playbox::{PlayboxOptions, PlayboxSim};

const BASE: &str = "bvcsp2mqtt";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the embedded broker: {0}")]
    Broker(std::io::Error),
    #[error("cannot start the BVCSP simulator: {0}")]
    Simulator(std::io::Error),
    #[error("cannot start a play-box simulator: {0}")]
    Playbox(std::io::Error),
    #[error("demo configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Start(#[from] bvcsp2mqtt::supervisor::StartError),
}

fn fleet() -> Vec<SimDevice> {
    let mut devices = vec![
        SimDevice::new("PU_55AA0000", "Helmet 07", true),
        SimDevice::new("PU_264F708E", "Truck 7", true),
        SimDevice::new("PU_1A2B3C4D", "Body cam 12", true),
        SimDevice::new("PU_00C0FFEE", "Drone 2", false),
        SimDevice::new("PU_7E57CA5E", "Helmet 03", true),
    ];
    for (i, d) in devices.iter_mut().enumerate() {
        d.lat = 31.849722 + i as f64 * 0.002;
        d.lng = 117.207138 - i as f64 * 0.003;
    }
    devices
}

/// Run until `stop` resolves.
pub async fn run(mqtt_port: Option<u16>, stop: impl Future<Output = ()>) -> Result<(), DemoError> {
    let broker = match mqtt_port {
        Some(p) => EmbeddedBroker::start(p),
        None => EmbeddedBroker::start(1883).or_else(|_| EmbeddedBroker::start(0)),
    }
    .map_err(DemoError::Broker)?;
    let devices = fleet();
    let sim = BvcspSim::start(SimOptions {
        devices: devices.clone(),
        // Short enough that a refresh (and the staggered reopen of every stream) shows up.
        token_lifetime: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(DemoError::Simulator)?;
    let lobby = PlayboxSim::start(PlayboxOptions {
        alias_name: "T2-4G_Lobby".into(),
        ..Default::default()
    })
    .await
    .map_err(DemoError::Playbox)?;
    let hall = PlayboxSim::start(PlayboxOptions {
        sn: "2ZTA00000X0A00000001".into(),
        product_name: "T10 Plus".into(),
        alias_name: "T10Plus_Hall".into(),
        brightness: 80.0,
        // An older firmware: the other candidate paths, integer brightness only.
        brightness_path: 1,
        screen_path: 1,
        integer_only_brightness: true,
        ..Default::default()
    })
    .await
    .map_err(DemoError::Playbox)?;
    let storage = std::env::temp_dir().join(format!("bvcsp2mqtt-demo-{}", std::process::id()));
    let cfg = config::from_toml(&format!(
        r#"
[bvcsp]
url = "{url}"
username = "admin"
password = "123456"
reopen_stagger = "300ms"
[mqtt]
url = "mqtt://{mqtt}"
base_topic = "{BASE}"
client_id = "bvcsp2mqtt-demo"
[storage]
dir = "{storage}"
[homeassistant]
enabled = true
[[playbox]]
name = "lobby"
url = "{lobby}"
sn = "2ZTA00000X0A00000000"
password = "SN2008@+"
poll_interval = "5s"
commands = true
[[playbox]]
name = "hall"
url = "{hall}"
sn = "2ZTA00000X0A00000001"
password = "SN2008@+"
poll_interval = "5s"
commands = true
"#,
        lobby = lobby.url(),
        hall = hall.url(),
        url = sim.url(),
        mqtt = broker.addr,
        storage = storage.display(),
    ))?;

    let port = broker.addr.port();
    println!();
    println!("  bvcsp2mqtt demo");
    println!("  ───────────────");
    println!(
        "  BVCSP simulator   {}  (admin / 123456, {} devices)",
        sim.url(),
        devices.len()
    );
    println!(
        "  Play boxes        lobby {}, hall {}  (NovaStar simulators)",
        lobby.url(),
        hall.url()
    );
    println!("  MQTT broker       {}  (embedded)", broker.addr);
    println!("  Bridge            publishing under {BASE}/");
    println!();
    println!("  Watch it yourself:  mosquitto_sub -h 127.0.0.1 -p {port} -t '{BASE}/#' -v");
    println!(
        "  Dim the lobby screen: mosquitto_pub -h 127.0.0.1 -p {port} -t '{BASE}/playbox/lobby/brightness/set' -m 40"
    );
    println!(
        "  Home Assistant discovery (point HA's MQTT integration at this broker):\n    mosquitto_sub -h 127.0.0.1 -p {port} -t 'homeassistant/#' -v"
    );
    println!(
        "  Ask the bridge:    mosquitto_pub -h 127.0.0.1 -p {port} -t '{BASE}/bridge/request/health_check' -m '{{\"transaction\": 1}}'"
    );
    println!("  Stop with Ctrl-C.");
    println!();

    let cancel = CancellationToken::new();
    let view = tokio::spawn(live_view(broker.addr.port(), cancel.clone()));
    let bridge = Bridge::start(cfg).await?;
    let traffic = tokio::spawn(traffic(sim.clone(), devices, cancel.clone()));
    let operator = tokio::spawn(operator(lobby.clone(), hall.clone(), cancel.clone()));
    stop.await;
    cancel.cancel();
    let _ = traffic.await;
    let _ = operator.await;
    bridge.stop(DEFAULT_GRACE).await;
    let _ = view.await;
    let c = sim.counters();
    println!();
    println!(
        "  simulator: {} logins, {} refreshes, {} logouts, {} frames delivered",
        c.logins_ok,
        c.refreshes,
        c.logouts,
        c.delivered.values().sum::<u64>()
    );
    println!(
        "  play boxes: lobby at {}% brightness, screen {}; hall at {}%",
        lobby.brightness(),
        lobby.screen(),
        hall.brightness()
    );
    sim.shutdown();
    lobby.shutdown();
    hall.shutdown();
    let _ = std::fs::remove_dir_all(&storage);
    Ok(())
}

/// Subscribe to everything under the base topic and print one line per message.
async fn live_view(port: u16, cancel: CancellationToken) {
    let mut opts = MqttOptions::new(
        format!("bvcsp2mqtt-demo-view-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 10);
    let mut out = std::io::stdout();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe(format!("{BASE}/#"), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now =
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                let clock = now.get(11..19).unwrap_or("");
                let topic = p
                    .topic
                    .strip_prefix(&format!("{BASE}/"))
                    .unwrap_or(&p.topic);
                let mark = if p.retain { "R" } else { " " };
                let _ = writeln!(
                    out,
                    "  {clock} {mark} {topic:<44} {}",
                    summarise(&p.payload)
                );
            }
            Ok(_) => {}
            Err(_) => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        }
    }
}

/// A one-line view of a payload: JSON without the bulky fields, cut to fit.
fn summarise(payload: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(mut m)) => {
            for k in [
                "raw",
                "event_id",
                "received_at",
                "stream",
                "since",
                "updated_at",
            ] {
                m.remove(k);
            }
            // Shown first: the line is cut at 100 characters.
            let mark = if m.remove("backfilled") == Some(Value::Bool(true)) {
                "[backfilled: true] "
            } else {
                ""
            };
            format!("{mark}{}", Value::Object(m))
        }
        _ => String::from_utf8_lossy(payload).into_owned(),
    };
    if text.chars().count() > 100 {
        format!("{}…", text.chars().take(99).collect::<String>())
    } else {
        text
    }
}

/// Someone on site now and then changes the boxes with ViPlex Express: the bridge sees
/// it at the next poll.
async fn operator(lobby: PlayboxSim, hall: PlayboxSim, cancel: CancellationToken) {
    let mut tick = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(9)) => {}
        }
        tick += 1;
        let mut rng = rand::thread_rng();
        match tick % 3 {
            0 => hall.set_brightness(rng.gen_range(20..=100) as f64),
            1 => lobby.set_brightness(rng.gen_range(10..=90) as f64),
            _ => lobby.set_screen(if lobby.screen() == "OPEN" {
                "CLOSE"
            } else {
                "OPEN"
            }),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Realistic traffic: GPS every few seconds per online device, now and then an alarm
/// (start, then end), a device going on- or offline, an IM, a conference event.
async fn traffic(sim: BvcspSim, mut devices: Vec<SimDevice>, cancel: CancellationToken) {
    let alarm_types = [5_i64, 4106, 4118, 4119, 4115, 4107, 4, 8192];
    let mut tick = 0u64;
    let mut open_alarm: Option<Value> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
        tick += 1;
        // Once: the alarm stream is refused for a few seconds while an SOS is raised; it
        // arrives afterwards from the server's alarm records, marked backfilled.
        match tick {
            4 => {
                eprintln!("demo: the server refuses the alarm stream for 4 s (HTTP 503) ...");
                sim.refuse_upgrades(Stream::Alarm, Some(503));
                sim.kick_sockets(Some(Stream::Alarm), None);
            }
            5 => {
                let d = &devices[0];
                sim.inject(
                    Stream::Alarm,
                    json!({"key": "demo-missed-sos", "type": 5, "time": unix_now(), "devID": d.id,
                        "devName": d.name, "status": 0, "desc": "SOS raised while the alarm stream was down"}),
                );
                eprintln!(
                    "demo: ... an SOS is raised meanwhile; watch it arrive with backfilled: true"
                );
            }
            8 => sim.refuse_upgrades(Stream::Alarm, None),
            _ => {}
        }
        let mut rng = rand::thread_rng();
        for d in devices.iter_mut().filter(|d| d.online) {
            if tick.is_multiple_of(3) {
                d.lat += rng.gen_range(-0.0004..0.0004);
                d.lng += rng.gen_range(-0.0004..0.0004);
                sim.inject(
                    Stream::Location,
                    json!({"devId": d.id, "lat": (d.lat * 1e6).round() / 1e6, "lng": (d.lng * 1e6).round() / 1e6, "height": rng.gen_range(20.0..60.0_f64).round()}),
                );
            }
        }
        if tick.is_multiple_of(7) {
            if let Some(mut a) = open_alarm.take() {
                a["status"] = json!(1);
                a["time"] = json!(unix_now());
                sim.inject(Stream::Alarm, a);
            } else if let Some(d) = devices
                .iter()
                .filter(|d| d.online)
                .collect::<Vec<_>>()
                .choose(&mut rng)
            {
                let t = *alarm_types.choose(&mut rng).unwrap_or(&5);
                let a = json!({"key": format!("{:08x}", rng.r#gen::<u32>()), "type": t, "time": unix_now(),
                    "userID": "", "userName": "", "devID": d.id, "devName": d.name, "subDevIdx": 65536,
                    "status": 0, "desc": bvcsp2mqtt::bvcsp::model::alarm_label(t), "lat": d.lat, "lng": d.lng, "payload": ""});
                sim.inject(Stream::Alarm, a.clone());
                open_alarm = Some(a);
            }
        }
        if tick.is_multiple_of(19) {
            let i = rng.gen_range(0..devices.len());
            let d = &mut devices[i];
            d.online = !d.online;
            sim.inject(
                Stream::OnlineStatus,
                json!({"type": "PU", "time": unix_now(), "status": i32::from(d.online),
                    "network": {"deviceAddr": "10.0.0.23:40312", "serverAddr": "10.0.0.5:9701", "TCP1OrUDP2": 1, "protocol": "bvcsp"},
                    "device": {"id": d.id, "gid": d.gid, "name": d.name, "classID": 0, "manufacturer": "BesoVideo"}}),
            );
        }
        if tick.is_multiple_of(11) {
            sim.inject(
                Stream::Im,
                json!({"iMsgID": tick, "type": 1, "from": "CU_dispatch", "to": devices[0].id,
                    "text": "Report your position", "time": unix_now()}),
            );
        }
        if tick.is_multiple_of(13) {
            let op = ["start-speak", "end-speak", "add"][(tick / 13 % 3) as usize];
            sim.inject(
                Stream::Conference,
                json!({"type": "member", "operate": op,
                    "member": {"id": 3, "memberID": devices[1].id, "memberType": "PU", "status": 3},
                    "confInfo": {"id": "CONF_0001", "name": "Team A"}}),
            );
        }
    }
}
