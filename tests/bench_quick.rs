//! The benchmark's small run as a regression check: every scenario delivers every
//! message exactly once. No timing is asserted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_bench_loses_and_duplicates_nothing() {
    let cfg = bvcsp2mqtt_testkit::bench::BenchConfig {
        quick: true,
        repeat: 1,
        bridge_exe: env!("CARGO_BIN_EXE_bvcsp2mqtt").into(),
        scenarios: Vec::new(),
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
    assert_eq!(figures.len(), 4, "every scenario reported");
    assert!(figures[0].events > 0 && figures[2].events > 0);
}
