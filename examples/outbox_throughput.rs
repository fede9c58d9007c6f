//! Outbox throughput on this machine: `cargo run --release --example outbox_throughput`.
//! Five producers (one per BVCSP stream) push 100 000 alarm-sized events through the
//! durable outbox (rows committed in groups by the writer thread), then a consumer
//! takes and acknowledges them all, as the publisher would (all but the first 1 024 are
//! read back from disk on the way).

use std::sync::Arc;
use std::time::Instant;

use bvcsp2mqtt::mqtt::{Message, Outbox};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
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
            for i in 0..total / producers {
                let topic = format!("bvcsp2mqtt/device/PU_{p}/alarm/sos");
                let _ = i;
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
