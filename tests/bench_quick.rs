//! The benchmark's small run as a regression check: every scenario delivers every
//! message exactly once (and, after a broker outage, in order per topic). No timing is
//! asserted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_bench_loses_and_duplicates_nothing() {
    let cfg = bvcsp2mqtt_testkit::bench::BenchConfig {
        quick: true,
        repeat: 1,
        bridge_exe: env!("CARGO_BIN_EXE_bvcsp2mqtt").into(),
        scenarios: Vec::new(),
        backlog: None,
    };
    let (broker, figures) = bvcsp2mqtt_testkit::bench::run(&cfg)
        .await
        .expect("bench runs");
    eprintln!(
        "{}",
        bvcsp2mqtt_testkit::bench::render(&broker, 1, &figures)
    );
    for f in &figures {
        assert_eq!(f.lost, 0, "{}: lost messages", f.scenario);
        assert_eq!(f.duplicates, 0, "{}: duplicates", f.scenario);
        assert_eq!(f.received, f.events, "{}", f.scenario);
    }
    assert!(figures[0].events > 0 && figures[2].events > 0);
    // Scenario e needs a broker that can be stopped and started again.
    if !bvcsp2mqtt_testkit::mosquitto::Mosquitto::installed() {
        eprintln!("mosquitto is not installed: scenario e (recovery) not run");
        assert_eq!(figures.len(), 4, "every scenario reported");
        return;
    }
    assert_eq!(figures.len(), 5, "every scenario reported");
    let e = &figures[4];
    let r = e
        .recovery
        .as_ref()
        .expect("scenario e reports its recovery");
    assert_eq!(r.backlog, 2_000);
    assert!(r.live >= 1, "at least one live alarm during the replay");
    // The backlog and every live alarm, each exactly once, each topic in order.
    assert_eq!(e.events, r.backlog + r.live);
    assert_eq!(r.out_of_order, 0, "messages delivered out of order");
}
