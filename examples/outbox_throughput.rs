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
//! `... -- recovery [N]` fills the outbox with N (default 1 000 000) events on 1 000
//! topics as a long broker outage would, stops, opens it again (the time until the first
//! message may be sent), and drains everything as a publisher would (the replay rate).
//! Meanwhile live alarms are queued: one on a topic of the backlog (it must wait for that
//! topic's backlog), and one on a new topic at the start and after every 100 000 taken
//! (how long each waited until it was handed out).

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
    let live = |topic: String| Message {
        topic,
        payload: payload.clone(),
        retain: false,
    };
    // Live alarms on new topics, by topic: when they were queued, how long they waited.
    let mut queued: Vec<(String, Instant)> = Vec::new();
    let mut waits: Vec<Duration> = Vec::new();
    let behind = "bvcsp2mqtt/device/PU_7/alarm/sos".to_string();
    let mut behind_at = None;
    let mut behind_topic_seen = 0;
    queued.push(("bvcsp2mqtt/device/LIVE_0/alarm/sos".into(), Instant::now()));
    outbox.push(live(queued[0].0.clone())).await;
    let behind_id = outbox.push_now(live(behind.clone()));
    outbox.ack(first.0);
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let mut drained = 1;
    while outbox.depth() > 0 {
        let more = outbox.sendable();
        let mut took = false;
        while let Some((id, m)) = outbox.take_next() {
            if let Some(at) = queued.iter().position(|(t, _)| *t == m.topic) {
                waits.push(queued.swap_remove(at).1.elapsed());
            } else if m.topic == behind {
                behind_topic_seen += 1;
                if id == behind_id {
                    behind_at = Some((drained, behind_topic_seen));
                }
            }
            outbox.ack(id);
            drained += 1;
            took = true;
            if drained % 100_000 == 0 {
                break;
            }
        }
        if drained % 100_000 == 0 && drained < n {
            let topic = format!("bvcsp2mqtt/device/LIVE_{drained}/alarm/sos");
            queued.push((topic.clone(), Instant::now()));
            outbox.push(live(topic)).await;
        } else if !took && outbox.depth() > 0 {
            more.await;
        }
    }
    let replay = start.elapsed();
    let cpu = cpu_seconds() - cpu_start;
    let o = Arc::clone(&outbox);
    tokio::task::spawn_blocking(move || o.close())
        .await
        .expect("close");
    let first_wait = waits.first().copied().unwrap_or_default();
    waits.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (behind_pos, behind_rank) = behind_at.unwrap_or_default();
    println!(
        "outbox recovery: {n} events filled in {:.1} s; reopened, first sendable after {:.3} s; \
         {drained} replayed (take+ack) in {:.1} s = {:.0}/s ({:.2} µs CPU each); {} live alarms on new topics waited \
         {:.1} ms at most (median {:.1} ms, the first {:.1} ms); one on a topic of the backlog \
         went out {behind_rank}th on its topic, {behind_pos}th of all",
        filled.as_secs_f64(),
        to_first.as_secs_f64(),
        replay.as_secs_f64(),
        drained as f64 / replay.as_secs_f64(),
        cpu * 1e6 / drained as f64,
        waits.len(),
        waits.last().copied().map(ms).unwrap_or_default(),
        waits
            .get(waits.len() / 2)
            .copied()
            .map(ms)
            .unwrap_or_default(),
        ms(first_wait),
    );
}

/// CPU time of this process so far (all threads, user and system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, fields 14 and 15 of the line (11 and 12 after the name).
    // In clock ticks: USER_HZ, 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
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
