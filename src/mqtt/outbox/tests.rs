//! The outbox end to end: in memory, and on disk through the writer thread.

use std::collections::HashSet;
use std::time::Duration;

use super::index::ENTRY_OVERHEAD;
use super::live_lane::LIVE_MAX;
use super::*;

fn ev(t: &str, p: &str) -> Message {
    Message {
        topic: t.into(),
        payload: Bytes::copy_from_slice(p.as_bytes()),
        retain: false,
    }
}
fn st(t: &str, p: &str) -> Message {
    Message {
        retain: true,
        ..ev(t, p)
    }
}
fn mem() -> Outbox {
    Outbox::memory(1 << 20)
}

#[test]
fn order_ack_and_rewind() {
    let o = mem();
    o.push_now(ev("a", "1"));
    o.push_now(ev("a", "2"));
    o.push_now(ev("b", "3"));
    let (i1, m1) = o.take_next().unwrap();
    let (i2, _) = o.take_next().unwrap();
    assert_eq!(m1.payload, "1");
    o.ack(i1);
    o.rewind();
    // 2 was sent but not acknowledged: it comes again, before 3.
    let (j, m) = o.take_next().unwrap();
    assert_eq!((j, &m.payload[..]), (i2, &b"2"[..]));
    assert_eq!(o.take_next().unwrap().1.payload, "3");
    assert!(o.take_next().is_none());
    assert_eq!(o.stats().replayed, 1);
}

#[test]
fn unsent_state_coalesces_but_events_do_not() {
    let o = mem();
    o.push_now(st("s", "old"));
    o.push_now(ev("e", "1"));
    o.push_now(st("s", "new"));
    o.push_now(ev("e", "2"));
    let got: Vec<_> = std::iter::from_fn(|| o.take_next())
        .map(|(_, m)| m.payload)
        .collect();
    assert_eq!(got, vec!["1", "new", "2"]);
    assert_eq!(o.stats().coalesced, 1);
}

#[test]
fn sent_state_is_not_replaced_but_followed() {
    let o = mem();
    o.push_now(st("s", "v1"));
    let (id, _) = o.take_next().unwrap();
    o.push_now(st("s", "v2"));
    assert_eq!(o.take_next().unwrap().1.payload, "v2");
    o.ack(id);
    assert_eq!(o.depth(), 1);
}

#[test]
fn rewind_restores_acknowledged_retained_state() {
    let o = mem();
    o.push_now(st("s", "v1"));
    o.push_now(st("t", "x"));
    let (a, _) = o.take_next().unwrap();
    let (b, _) = o.take_next().unwrap();
    o.ack(a);
    o.ack(b);
    o.push_now(st("t", "y"));
    o.rewind();
    let got: Vec<_> = std::iter::from_fn(|| o.take_next())
        .map(|(_, m)| (m.topic, m.payload))
        .collect();
    // t has a newer unacknowledged value, so only s is restored.
    assert_eq!(
        got,
        vec![
            ("t".into(), Bytes::from("y")),
            ("s".into(), Bytes::from("v1"))
        ]
    );
}

#[tokio::test]
async fn full_outbox_makes_events_wait_not_state() {
    let per = ENTRY_OVERHEAD + 2;
    let o = Arc::new(Outbox::memory(2 * per));
    o.push(ev("e", "1")).await;
    o.push(ev("e", "2")).await;
    o.push(st("s", "x")).await; // state never waits
    let mut full = o.full();
    let o2 = o.clone();
    let waiter = tokio::spawn(async move { o2.push(ev("e", "3")).await });
    full.wait_for(|f| *f).await.unwrap();
    assert!(!waiter.is_finished());
    assert!(o.stats().full);
    let (id, _) = o.take_next().unwrap();
    o.ack(id);
    let (id, _) = o.take_next().unwrap();
    o.ack(id);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(!o.stats().full);
    assert_eq!(o.depth(), 2);
}

#[tokio::test]
async fn survives_a_restart_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.push(ev("a", "1")).await;
        o.push(ev("a", "2")).await;
        o.push(st("s", "old")).await;
        o.push(st("s", "new")).await;
        o.committed().await;
        let (id, _) = o.take_next().unwrap();
        o.ack(id); // "1" acknowledged
        let _ = o.take_next(); // "2" sent, not acknowledged
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| o.take_next())
        .map(|(_, m)| m.payload)
        .collect();
    assert_eq!(got, vec!["2", "new"]);
    assert_eq!(o.stats().replayed_at_start, 2);
    // New ids continue after the old ones: order is kept across runs.
    o.push(ev("a", "3")).await;
    o.committed().await;
    assert_eq!(o.take_next().unwrap().1.payload, "3");
    o.close();
}

#[tokio::test]
async fn nothing_is_handed_out_before_it_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    o.push(ev("a", "1")).await;
    o.committed().await;
    // Committed: a second connection sees the row.
    assert_eq!(rows_on_disk(dir.path()), 1);
    assert!(o.take_next().is_some());
    o.close();
}

#[tokio::test]
async fn commits_run_on_the_writer_thread_never_on_the_producers() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    // Small batches, the case that used to be committed inline by the producer.
    for i in 0..50 {
        let batch = o.batch();
        o.push(ev("e", &i.to_string())).await;
        o.push(ev("f", &i.to_string())).await;
        drop(batch);
        o.committed().await;
    }
    assert_eq!(drain(&o).await.len(), 100);
    bvcsp2mqtt_testkit::eventually("deletes committed", Duration::from_secs(5), || {
        rows_on_disk(dir.path()) == 0
    })
    .await;
    let disk = o.disk.clone().unwrap();
    let threads = disk.commit_threads();
    assert_eq!(
        threads,
        HashSet::from(["outbox-writer".to_string()]),
        "only the writer thread commits"
    );
    o.close();
}

/// Let the database grow no further than it is (`full`), like a full disk, or freely
/// again; set on the writer's connection, the one that must feel it.
fn limit_growth(o: &Outbox, full: bool) {
    let disk = o.disk.clone().unwrap();
    let conn = disk.conn();
    let limit: i64 = if full {
        conn.query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    } else {
        1 << 30
    };
    conn.pragma_update(None, "max_page_count", limit).unwrap();
}

#[tokio::test]
async fn a_disk_refusing_writes_pauses_events_and_they_resume_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    o.push(ev("e", "0")).await;
    o.committed().await;
    limit_growth(&o, true);
    let mut paused = o.paused();
    let big = "x".repeat(64 << 10);
    o.push(ev("e", &big)).await;
    tokio::time::timeout(Duration::from_secs(5), paused.wait_for(|p| *p))
        .await
        .expect("paused once a commit fails")
        .unwrap();
    let stats = o.stats();
    assert!(stats.paused && !stats.full, "{stats:?}");
    assert!(
        stats.write_error.as_deref().unwrap_or("").contains("full"),
        "{stats:?}"
    );
    let waiter = {
        let o = o.clone();
        tokio::spawn(async move { o.push(ev("e", "after")).await })
    };
    // The committed message may go; the unwritten one may not.
    assert_eq!(o.take_next().unwrap().1.payload, "0");
    assert!(o.take_next().is_none(), "nothing unwritten is handed out");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), paused.changed())
            .await
            .is_err()
            && !waiter.is_finished(),
        "events wait while the disk refuses writes"
    );
    o.untake(0);
    limit_growth(&o, false);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("resumes by itself")
        .unwrap();
    o.committed().await;
    assert!(!*o.paused().borrow());
    assert!(o.stats().write_error.is_none());
    let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
    assert_eq!(
        got,
        vec![Bytes::from("0"), Bytes::from(big), Bytes::from("after")]
    );
    o.close();
}

#[tokio::test]
async fn a_dead_letter_leaves_the_outbox_only_into_the_table_and_stays_gone() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.push(ev("a", "1")).await;
        o.push(ev("a", "huge")).await;
        o.push(ev("a", "3")).await;
        o.committed().await;
        let (first, _) = o.take_next().unwrap();
        let (dead, m) = o.take_next().unwrap();
        assert_eq!(m.payload, "huge");
        o.dead_letter(dead, "too large");
        // The one behind it is not held up.
        assert_eq!(o.take_next().unwrap().1.payload, "3");
        o.ack(first);
        let stats = o.stats();
        assert_eq!((stats.dead_letters, stats.depth), (1, 1));
        assert_eq!(stats.last_dead_letter.unwrap().reason, "too large");
        bvcsp2mqtt_testkit::eventually(
            "the dead letter is committed",
            Duration::from_secs(5),
            || o.stats().dead_letters_kept == 1,
        )
        .await;
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    let got: Vec<Bytes> = std::iter::from_fn(|| o.take_next())
        .map(|(_, m)| m.payload)
        .collect();
    assert_eq!(
        got,
        vec![Bytes::from("3")],
        "not sent again after a restart"
    );
    assert_eq!(o.stats().dead_letters_kept, 1);
    let conn = rusqlite::Connection::open(dir.path().join("outbox.sqlite3")).unwrap();
    let (topic, payload, reason): (String, Vec<u8>, String) = conn
        .query_row("SELECT topic, payload, reason FROM dead_letters", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(
        (topic.as_str(), &payload[..], reason.as_str()),
        ("a", &b"huge"[..], "too large")
    );
    o.close();
}

#[tokio::test]
async fn a_corrupt_file_is_kept_aside_and_a_fresh_outbox_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.sqlite3");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    let aside = o.set_aside().expect("moved aside").to_path_buf();
    let name = aside.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("outbox.sqlite3.corrupt-"), "{name}");
    assert_eq!(std::fs::read(&aside).unwrap(), garbage, "kept as it was");
    o.push(ev("a", "1")).await;
    o.committed().await;
    assert_eq!(o.take_next().unwrap().1.payload, "1");
    o.close();
    assert_eq!(rows_on_disk(dir.path()), 1);
}

/// Rows in the store, as a second connection sees them.
fn rows_on_disk(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("outbox.sqlite3"))
        .unwrap()
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

/// Take and acknowledge everything, waiting (with a deadline) for reads from disk.
async fn drain(o: &Outbox) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        let wake = o.sendable();
        if let Some((id, m)) = o.take_next() {
            assert!(
                o.lock().entries.len() <= RESIDENT_MAX,
                "memory stays bounded"
            );
            o.ack(id);
            got.push(m);
            continue;
        }
        if o.depth() == 0 {
            return got;
        }
        tokio::time::timeout(Duration::from_secs(5), wake)
            .await
            .expect("the writer reads the next batch back");
    }
}

#[tokio::test]
async fn a_long_queue_waits_on_disk_and_comes_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    let n = RESIDENT_MAX * 3 + 7;
    for i in 0..n {
        o.push(ev("e", &i.to_string())).await;
    }
    o.committed().await;
    assert_eq!(o.lock().entries.len(), RESIDENT_MAX);
    assert_eq!(o.depth(), n);
    assert_eq!(o.stats().unsent, n);
    let got: Vec<String> = drain(&o)
        .await
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    assert_eq!(o.stats().bytes, 0);
    // Caught up: new messages are held in memory again.
    o.push(ev("e", "after")).await;
    assert_eq!(o.lock().entries.len(), 1);
    assert!(o.lock().spill_from.is_none());
    o.close();
}

/// A backlog of `RESIDENT_MAX` events on `e`, and the live lane full (one event on each
/// of `LIVE_MAX` topics): what comes next waits on disk only.
async fn fill_memory(o: &Outbox) {
    for i in 0..RESIDENT_MAX {
        o.push(ev("e", &i.to_string())).await;
    }
    for i in 0..LIVE_MAX {
        o.push(ev(&format!("live/{i}"), "x")).await;
    }
    assert!(!o.lock().live.has_room());
}

#[tokio::test]
async fn state_waiting_on_disk_still_coalesces() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    fill_memory(&o).await;
    o.push(st("s", "old")).await;
    o.push(ev("e", "last")).await;
    o.push(st("s", "new")).await;
    o.committed().await;
    assert_eq!(o.stats().coalesced, 1);
    assert_eq!(o.lock().spilled, 2, "both wait on disk only");
    let tail: Vec<Bytes> = drain(&o)
        .await
        .into_iter()
        .filter(|m| m.topic == "s" || m.payload == "last")
        .map(|m| m.payload)
        .collect();
    assert_eq!(tail, vec![Bytes::from("last"), Bytes::from("new")]);
    o.close();
}

#[tokio::test]
async fn a_long_queue_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let n = RESIDENT_MAX * 2 + 5;
    {
        let o = Outbox::open(dir.path(), 1 << 30).unwrap();
        for i in 0..n {
            o.push(ev("e", &i.to_string())).await;
        }
        o.push(st("s", "state")).await;
        o.committed().await;
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(o.depth(), n + 1);
    assert_eq!(o.stats().replayed_at_start, (n + 1) as u64);
    assert!(o.lock().entries.len() <= RESIDENT_MAX);
    // Retained state still waiting on disk holds back restoring an older value.
    assert!(o.lock().state_unacked.contains_key("s"));
    let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
    assert_eq!(got.len(), n + 1);
    assert_eq!(got[0], "0");
    assert_eq!(got[n - 1], Bytes::from((n - 1).to_string()));
    assert_eq!(got[n], "state");
    o.close();
}

#[tokio::test]
async fn acknowledged_rows_are_deleted_lazily_and_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    for i in 0..10 {
        o.push(ev("e", &i.to_string())).await;
    }
    o.committed().await;
    drain(&o).await;
    // Within DELETE_DELAY the deletes are committed without any further write.
    bvcsp2mqtt_testkit::eventually(
        "acknowledged rows are deleted",
        Duration::from_secs(5),
        || rows_on_disk(dir.path()) == 0,
    )
    .await;
    o.close();
}

#[tokio::test]
async fn a_producer_waiting_inside_a_batch_gets_its_rows_committed() {
    let dir = tempfile::tempdir().unwrap();
    let per = ENTRY_OVERHEAD + 2;
    let o = Outbox::open(dir.path(), 2 * per).unwrap();
    let consumer = {
        let o = o.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 3 {
                let wake = o.sendable();
                if let Some((id, m)) = o.take_next() {
                    o.ack(id);
                    got.push(m.payload);
                    continue;
                }
                tokio::time::timeout(Duration::from_secs(5), wake)
                    .await
                    .expect("rows committed and sendable");
            }
            got
        })
    };
    {
        let _batch = o.batch();
        o.push(ev("e", "1")).await;
        o.push(ev("e", "2")).await;
        // Full: this waits for space, which needs the first two sent, so committed
        // although the batch holding them back is still open.
        tokio::time::timeout(Duration::from_secs(5), o.push(ev("e", "3")))
            .await
            .expect("no deadlock behind an open batch");
    }
    let got = consumer.await.unwrap();
    assert_eq!(got, vec!["1", "2", "3"]);
    o.close();
}

#[tokio::test]
async fn superseded_disk_only_state_is_forgotten_once_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    fill_memory(&o).await;
    for i in 0..3000 {
        o.push(st("s", &i.to_string())).await;
    }
    o.committed().await;
    bvcsp2mqtt_testkit::eventually("superseded ids are dropped", Duration::from_secs(5), || {
        o.lock().spilled_gone.len() <= 1
    })
    .await;
    let got = drain(&o).await;
    assert_eq!(got.len(), RESIDENT_MAX + LIVE_MAX + 1);
    assert_eq!(got.last().unwrap().payload, "2999");
    o.close();
}

#[tokio::test]
async fn a_restart_with_superseded_state_does_not_spill() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.push(st("s", "old")).await;
        o.committed().await;
        let _sent = o.take_next().unwrap(); // in flight, never acknowledged
        o.push(st("s", "new")).await;
        o.committed().await;
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    assert!(o.lock().spill_from.is_none());
    o.push(ev("e", "next")).await;
    assert_eq!(o.lock().entries.len(), 2, "new messages are held in memory");
    let got: Vec<Bytes> = drain(&o).await.into_iter().map(|m| m.payload).collect();
    assert_eq!(got, vec![Bytes::from("new"), Bytes::from("next")]);
    o.close();
}

#[tokio::test]
async fn the_log_starts_over_under_steady_writes() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 30).unwrap();
    let wal = dir.path().join("outbox.sqlite3-wal");
    let payload = "x".repeat(600);
    // A steady 1 000 messages/s, each committed on its own and acknowledged: there is
    // a write in flight whenever the checkpoint runs.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut largest = 0;
    let n = 5000u64;
    for i in 0..n {
        tick.tick().await;
        let batch = o.batch();
        o.push(ev("e", &payload)).await;
        drop(batch);
        let (id, _) = loop {
            let wake = o.sendable();
            if let Some(next) = o.take_next() {
                break next;
            }
            tokio::time::timeout(Duration::from_secs(5), wake)
                .await
                .expect("committed by the writer");
        };
        o.ack(id);
        if i % 100 == 0 {
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
    }
    // Never started over, the log would hold every commit, a page or more each
    // (~20 MB here).
    assert!(
        largest < 10 << 20,
        "WAL reached {largest} bytes over {n} messages; it should start over"
    );
    o.close();
}

#[test]
fn an_outbox_that_cannot_be_opened_says_why_with_its_cause_kept() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let blocked = dir.path().join("state");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let Err(e) = Outbox::open(&blocked.join("outbox"), 1 << 20) else {
        panic!("opened under a file");
    };
    assert!(matches!(e, OutboxError::CreateDir { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot create it"), "{e}");
    let cause = std::error::Error::source(&e).expect("the io error is kept as the source");
    assert!(cause.downcast_ref::<std::io::Error>().is_some());
}

#[tokio::test]
async fn synced_means_in_the_database_file_itself() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    o.push(ev("e", "one")).await;
    o.push(ev("e", "two")).await;
    // A bound on failure: the checkpoint thread runs about a second after a commit.
    tokio::time::timeout(Duration::from_secs(30), o.synced())
        .await
        .expect("synced after a checkpoint");
    // What a power cut leaves: the database file alone, without the log.
    let copy = tempfile::tempdir().unwrap();
    let file = "outbox.sqlite3";
    std::fs::copy(dir.path().join(file), copy.path().join(file)).unwrap();
    assert_eq!(rows_on_disk(copy.path()), 2);
    o.close();
}

#[tokio::test]
async fn what_the_last_run_left_is_synced_without_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = Outbox::open(dir.path(), 1 << 20).unwrap();
        o.push(ev("e", "left")).await;
        o.committed().await;
        o.close();
    }
    let o = Outbox::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(o.depth(), 1);
    // Nothing new is pushed: a first checkpoint covers the rows found at start.
    tokio::time::timeout(Duration::from_secs(30), o.synced())
        .await
        .expect("synced without a new commit");
    o.close();
}
