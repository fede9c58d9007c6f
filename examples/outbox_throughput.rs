//! Outbox throughput on this machine: `cargo run --release --example outbox_throughput`.
//! Five producers (one per BVCSP stream) push 100 000 alarm-sized events through the
//! durable outbox (rows committed in groups by the writer thread), then a consumer
//! takes and acknowledges them all, as the publisher would (all but the first 1 024 are
//! read back from disk on the way).
//!
//! `... --example outbox_throughput -- paced [N]` instead pushes N (default 5 000) events
//! one at a time on a one-thread runtime, as the daemon does at 1 000 alarms/s: each is
//! pushed, waited for until it may be sent (committed), taken and acknowledged before the
//! next, with a 1 ms pause in between. That is the per-event cost of the outbox alone,
//! for `strace -c -f` (syscalls per event) and `valgrind --tool=callgrind` (instructions
//! per event), which are stable on a busy machine where timings are not.
//!
//! `... -- recovery [N]` fills the outbox with N (default 1 000 000) events as a long
//! broker outage would, stops, opens it again (the time until the first message may be
//! sent), queues one live alarm behind the backlog, and drains everything as a publisher
//! would (the replay rate, and how long the live alarm waited).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bvcsp2mqtt::mqtt::{Message, Outbox};

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("paced") => {
            let n = args.next().and_then(|a| a.parse().ok()).unwrap_or(5000);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(paced(n));
        }
        Some("recovery") => {
            let n = args
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or(1_000_000);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(recovery(n));
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(burst()),
    }
}

async fn paced(n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = Outbox::open(dir.path(), 1 << 30).expect("open outbox");
    let payload = bytes::Bytes::from(vec![b'x'; 600]);
    let start = Instant::now();
    for i in 0..n {
        {
            // As the socket reader does: the frames read together are one batch.
            let _batch = outbox.batch();
            outbox
                .push(Message {
                    topic: format!("bvcsp2mqtt/device/PU_{}/alarm/sos", i % 50),
                    payload: payload.clone(),
                    retain: false,
                })
                .await;
        }
        let id = loop {
            let more = outbox.sendable();
            if let Some((id, _)) = outbox.take_next() {
                break id;
            }
            more.await;
        };
        outbox.ack(id);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    let outbox_ = Arc::clone(&outbox);
    tokio::task::spawn_blocking(move || outbox_.close())
        .await
        .expect("close");
    println!(
        "outbox paced: {n} events one at a time in {:.2} s ({:.0} µs each, including the 1 ms pause)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64
    );
}

async fn recovery(n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = bytes::Bytes::from(vec![b'x'; 600]);
    let start = Instant::now();
    {
        let outbox = Outbox::open(dir.path(), 4 << 30).expect("open outbox");
        for i in 0..n {
            outbox
                .push(Message {
                    topic: format!("bvcsp2mqtt/device/PU_{}/alarm/sos", i % 1000),
                    payload: payload.clone(),
                    retain: false,
                })
                .await;
        }
        outbox.committed().await;
        let o = Arc::clone(&outbox);
        tokio::task::spawn_blocking(move || o.close())
            .await
            .expect("close");
    }
    let filled = start.elapsed();
    let start = Instant::now();
    let outbox = Outbox::open(dir.path(), 4 << 30).expect("open outbox");
    let first = loop {
        let more = outbox.sendable();
        if let Some(first) = outbox.take_next() {
            break first;
        }
        more.await;
    };
    let to_first = start.elapsed();
    let live_at = Instant::now();
    outbox
        .push(Message {
            topic: "bvcsp2mqtt/device/LIVE/alarm/sos".into(),
            payload: payload.clone(),
            retain: false,
        })
        .await;
    outbox.ack(first.0);
    let start = Instant::now();
    let mut live_waited = None;
    let mut drained = 1;
    while outbox.depth() > 0 {
        let more = outbox.sendable();
        let mut took = false;
        while let Some((id, m)) = outbox.take_next() {
            if m.topic.contains("LIVE") {
                live_waited = Some(live_at.elapsed());
            }
            outbox.ack(id);
            drained += 1;
            took = true;
        }
        if !took && outbox.depth() > 0 {
            more.await;
        }
    }
    let replay = start.elapsed();
    let o = Arc::clone(&outbox);
    tokio::task::spawn_blocking(move || o.close())
        .await
        .expect("close");
    println!(
        "outbox recovery: {n} events filled in {:.1} s; reopened, first sendable after {:.3} s; \
         {drained} replayed (take+ack) in {:.1} s = {:.0}/s; a live alarm queued behind them waited {:.1} s",
        filled.as_secs_f64(),
        to_first.as_secs_f64(),
        replay.as_secs_f64(),
        drained as f64 / replay.as_secs_f64(),
        live_waited.unwrap_or_default().as_secs_f64()
    );
}

async fn burst() {
    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = Outbox::open(dir.path(), 1 << 30).expect("open outbox");
    let payload = bytes::Bytes::from(vec![b'x'; 600]);
    let total = 100_000usize;
    let producers = 5;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (outbox, payload) = (Arc::clone(&outbox), payload.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / producers {
                let topic = format!("bvcsp2mqtt/device/PU_{p}/alarm/sos");
                outbox
                    .push(Message {
                        topic,
                        payload: payload.clone(),
                        retain: false,
                    })
                    .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    outbox.committed().await;
    let pushed = start.elapsed();
    let start = Instant::now();
    let mut n = 0;
    while outbox.depth() > 0 {
        let more = outbox.sendable();
        while let Some((id, _)) = outbox.take_next() {
            outbox.ack(id);
            n += 1;
        }
        if outbox.depth() > 0 {
            // The writer is reading the next batch back from disk.
            more.await;
        }
    }
    outbox.close();
    let drained = start.elapsed();
    println!(
        "outbox: {total} pushes committed ({producers} producers) in {:.2} s = {:.0}/s; {n} take+ack in {:.2} s = {:.0}/s",
        pushed.as_secs_f64(),
        total as f64 / pushed.as_secs_f64(),
        drained.as_secs_f64(),
        n as f64 / drained.as_secs_f64()
    );
}
