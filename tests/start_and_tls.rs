//! Start and the MQTT transport: `ssl://` means TLS (a plain broker never sees a
//! CONNECT), and a start that fails leaves nothing running.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bvcsp2mqtt::Bridge;
use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
use bvcsp2mqtt_testkit::eventually;
use common::*;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(20);

async fn sim() -> BvcspSim {
    BvcspSim::start(SimOptions {
        devices: vec![SimDevice::new("PU_1", "Helmet", true)],
        ..Default::default()
    })
    .await
    .unwrap()
}

/// TLS in front of the embedded broker, with a fresh self-signed certificate.
async fn tls_front(broker: std::net::SocketAddr) -> (std::net::SocketAddr, String) {
    let cert = bvcsp2mqtt_testkit::cert::self_signed("localhost", false).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = cert.acceptor.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(broker).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (addr, cert.pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_scheme_is_tls_and_never_plain_text() {
    let sim = sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let (tls_addr, pem) = tls_front(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();

    // Against a TLS broker: it works.
    let mut cfg = bridge_config(&sim, broker, "streams = [\"alarm\"]");
    cfg.mqtt.url = format!("ssl://localhost:{}", tls_addr.port())
        .parse()
        .unwrap();
    cfg.mqtt.tls.ca_file = Some(ca.clone());
    let bridge = Bridge::start(cfg.clone()).await.unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    bridge.stop(Duration::from_secs(5)).await;

    // Against a plain listener: the first bytes are a TLS ClientHello, never a CONNECT
    // (which would carry the password in clear).
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    let first_bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
    let seen = first_bytes.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut tcp, _)) = plain.accept().await {
            let mut b = [0u8; 1];
            if tcp.read_exact(&mut b).await.is_ok() {
                seen.lock().unwrap().push(b[0]);
            }
        }
    });
    cfg.mqtt.url = format!("ssl://localhost:{plain_port}").parse().unwrap();
    cfg.mqtt.username = "bob".into();
    let bridge = Bridge::start(cfg).await.unwrap();
    eventually("a connection attempt", T, || {
        !first_bytes.lock().unwrap().is_empty()
    })
    .await;
    let bytes = first_bytes.lock().unwrap().clone();
    assert!(bytes.iter().all(|b| *b == 0x16), "not TLS: {bytes:?}");
    assert!(!bridge.mqtt_status().borrow().connected);
    bridge.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_running() {
    let sim = sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = bridge_config(&sim, broker, "");
    cfg.service.http = true;
    cfg.service.http_listen = taken.local_addr().unwrap();
    let Err(e) = Bridge::start(cfg.clone()).await else {
        panic!("the start should fail: the HTTP port is taken");
    };
    assert!(e.to_string().contains("http_listen"), "{e}");

    // A play box whose TLS file does not exist: the same.
    cfg.service.http = false;
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), "not a certificate").unwrap();
    let boxes = bvcsp2mqtt::config::from_toml(&format!(
        "[mqtt]\nurl = \"mqtt://{broker}\"\n[[playbox]]\nname = \"hall\"\n\
         url = \"https://127.0.0.1:1\"\nsn = \"SN1\"\nusername = \"admin\"\npassword = \"x\"\n\
         tls = {{ ca_file = \"{}\" }}\n",
        garbage.path().display()
    ))
    .unwrap();
    cfg.playbox = boxes.playbox;
    let Err(e) = Bridge::start(cfg).await else {
        panic!("the start should fail: the play box's CA file is junk");
    };
    assert!(e.to_string().contains("hall"), "{e}");

    // A bridge that leaked from a failed start would log in like a live one: once the
    // live one is up, only its own login is on record.
    assert_eq!(sim.login_attempts(), 0, "a failed start logged in");
    let live = Bridge::start(bridge_config(&sim, broker, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    wait_sockets(&sim, &[Stream::Alarm], T).await;
    assert_eq!(sim.login_attempts(), 1, "only the live bridge logged in");
    assert_eq!(
        sim.counters().ws_upgrades.values().sum::<u64>(),
        1,
        "only the live bridge opened a stream"
    );
    live.stop(Duration::from_secs(5)).await;
}

/// A critical task that ends on its own after the broker connected (the usual moment)
/// stops the bridge with a failure: the daemon exits 70 on it and systemd restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_task_ending_after_connect_fails_the_bridge() {
    let sim = sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let bridge = Bridge::start(bridge_config(&sim, broker, "streams = [\"alarm\"]"))
        .await
        .unwrap();
    obs.wait_all_up(&[Stream::Alarm], T).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let fail = tokio::sync::Notify::new();
    let fail = Arc::new(fail);
    let f = fail.clone();
    bridge.critical().spawn(
        &tokio_util::task::TaskTracker::new(),
        "a test loop",
        &stop,
        async move { f.notified().await },
    );
    let served = tokio::spawn(bvcsp2mqtt::supervisor::serve(
        bridge,
        std::future::pending(),
    ));
    // Only once `serve` is past its first wait (the broker is connected) does it fail.
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| r.text() == "online")
        .await;
    tokio::task::yield_now().await;
    fail.notify_one();
    let r = tokio::time::timeout(T, served)
        .await
        .expect("the failure ends the bridge")
        .unwrap();
    let e = r.expect_err("a failure, not a clean stop");
    assert!(
        e.to_string().contains("a test loop ended unexpectedly"),
        "{e}"
    );
    obs.wait_topic(&format!("{BASE}/bridge/state"), T, |r| {
        r.text() == "offline"
    })
    .await;
}
