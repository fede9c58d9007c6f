//! The alarm ledger: which alarms are published, and the watermark that backfill reads
//! the alarm records back to (contract §4, spec §10.1).
//!
//! An alarm is one `(key, state)`. Live frames and backfilled records both `claim` it
//! before it goes to the outbox and `confirm` it after, so one alarm is published once
//! however it arrives. The watermark is a second, `floor`: every alarm at or before it is
//! published (or was older than the first start); alarms after it are told apart by key.
//! While a gap is open (the alarm stream down, the bridge not running, the outbox full)
//! the floor stands still, so a crash before the backfill finishes loses nothing: the
//! next start reads back from the same floor, and the keys published meanwhile keep
//! those alarms from being published twice.
//!
//! The ledger is saved to `storage.dir` at most every `SAVE_DELAY`, and only once the
//! outbox has synced to the disk every message it speaks of (a checkpoint covers them):
//! it never claims an alarm is published that a crash, or a power cut, could still lose.
//! The last save at a stop waits only for the outbox's commit (the outbox syncs
//! everything as it closes, just after). A crash may lose the last save; the next start
//! then publishes those few alarms once more, with the same `event_id`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::model::AlarmIdentity;
use crate::mqtt::Outbox;

pub const FILE_NAME: &str = "alarm-ledger.json";
/// Saves are at most this frequent: a save rewrites and syncs the whole file (up to
/// `KNOWN_MAX` keys, ~200 KB), and what a crash can cost is a second's alarms published
/// once more, with the same `event_id`s (the outbox's own data is synced as often).
const SAVE_DELAY: Duration = Duration::from_secs(1);
/// At a stop, how long the last save waits for the outbox to commit what it records.
const STOP_SAVE_WAIT: Duration = Duration::from_secs(3);
/// Keys remembered after the floor at most; the oldest are forgotten first (a forgotten
/// key can only cause a duplicate, never a loss).
const KNOWN_MAX: usize = 10_000;
/// Upstream times further ahead of the local clock than this do not move the floor:
/// one alarm stamped years ahead must not hide every alarm until then.
const CLOCK_AHEAD: i64 = 300;
/// How far behind the newest alarm published the floor stays, in seconds. Devices'
/// clocks differ and the server may deliver one device's alarm after another's newer
/// one; an alarm up to this much older than the newest seen, missed in a gap, is still
/// read back (and the ledger's keys keep the re-read ones from arriving twice).
const FLOOR_MARGIN: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counters for `bridge/health`.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub backfilled: AtomicU64,
    pub backfill_runs: AtomicU64,
    pub gaps: AtomicU64,
    pub longest_gap_s: AtomicU64,
    /// Backfills that stopped at `backfill_max_pages` before reaching the watermark.
    pub gaps_too_large: AtomicU64,
    pub duplicates: AtomicU64,
}

impl LedgerStats {
    pub fn to_json(&self) -> serde_json::Value {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "backfilled": r(&self.backfilled),
            "runs": r(&self.backfill_runs),
            "gaps": r(&self.gaps),
            "longest_gap_s": r(&self.longest_gap_s),
            "gaps_too_large": r(&self.gaps_too_large),
            "duplicates_dropped": r(&self.duplicates),
        })
    }
}

/// The ledger file, as read back.
#[derive(Debug, Deserialize)]
struct Saved {
    version: u32,
    floor: i64,
    known: Vec<(String, String, i64)>,
    saved_at: i64,
    /// When the gap still open at the save began.
    gap_since: Option<i64>,
}

/// The ledger file, as written: the same fields, the keys shared with the ledger's map
/// rather than copied (a full ledger is 10 000 of them, every second under load).
#[derive(Debug, Serialize)]
struct Snapshot {
    version: u32,
    floor: i64,
    known: Vec<(SharedKey, &'static str, i64)>,
    saved_at: i64,
    gap_since: Option<i64>,
}

#[derive(Debug)]
struct SharedKey(Arc<str>);

impl Serialize for SharedKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(Debug)]
struct Gap {
    since: i64,
    generation: u64,
}

#[derive(Debug)]
struct State {
    floor: i64,
    known: HashMap<AlarmIdentity, i64>,
    order: VecDeque<AlarmIdentity>,
    pending: HashSet<AlarmIdentity>,
    newest: i64,
    gap: Option<Gap>,
    generation: u64,
    /// Bumped by every loss of the alarm stream (and every gap opened), so a backfill that
    /// ran across one does not close the gap it did not see the end of.
    interruptions: u64,
    /// The alarm stream is open now.
    live: bool,
    /// Reading upstream is paused (the outbox is full or cannot write): the server may
    /// drop alarms meanwhile, however open the stream.
    paused: bool,
    dirty: bool,
}

pub struct AlarmLedger {
    state: Mutex<State>,
    file: Option<PathBuf>,
    changed: Notify,
    pub stats: Arc<LedgerStats>,
}

impl std::fmt::Debug for AlarmLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmLedger")
            .field("file", &self.file)
            .finish()
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn state_name(s: &str) -> &'static str {
    match s {
        "start" => "start",
        "end" => "end",
        _ => "unknown",
    }
}

impl AlarmLedger {
    /// The ledger of `dir` (`None`: in memory only). Without a saved ledger this is the
    /// first start: nothing from before `now`'s second is backfilled. A ledger that cannot be
    /// parsed is moved aside and the floor put `max_age` back (duplicates, not losses).
    pub fn open(
        dir: Option<&Path>,
        now: i64,
        max_age: Duration,
        stats: Arc<LedgerStats>,
    ) -> Result<AlarmLedger, LedgerError> {
        let file = dir.map(|d| d.join(FILE_NAME));
        // First start: records carry whole seconds, and those of the start's own second
        // may be from after it, so that second is read back too (a duplicate at worst).
        let mut state = State {
            floor: now - 1,
            known: HashMap::new(),
            order: VecDeque::new(),
            pending: HashSet::new(),
            newest: now,
            gap: None,
            generation: 0,
            interruptions: 0,
            live: false,
            paused: false,
            dirty: true,
        };
        let mut gap_since = now;
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                    Ok(saved) if saved.version == 1 => {
                        state.floor = saved.floor.min(now);
                        state.newest = saved.floor;
                        for (key, st, t) in saved.known {
                            let id = AlarmIdentity {
                                key: key.into(),
                                state: state_name(&st),
                            };
                            state.newest = state.newest.max(t.min(now + CLOCK_AHEAD));
                            state.order.push_back(id.clone());
                            state.known.insert(id, t);
                        }
                        gap_since = saved.gap_since.unwrap_or(saved.saved_at).min(now);
                        state.dirty = false;
                    }
                    _ => {
                        let aside = path.with_extension(format!("corrupt-{now}"));
                        let _ = std::fs::rename(path, &aside);
                        let back = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
                        state.floor = now.saturating_sub(back);
                        warn!(
                            "alarm ledger {} is unreadable; kept as {}; backfilling the last {max_age:?} (some alarms may arrive twice)",
                            path.display(),
                            aside.display()
                        );
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    info!("first start: alarms raised before now are not backfilled");
                }
                Err(source) => {
                    return Err(LedgerError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        // The bridge was not running: that is a gap, from the last save to now.
        state.generation = 1;
        state.gap = Some(Gap {
            since: gap_since,
            generation: 1,
        });
        let ledger = AlarmLedger {
            state: Mutex::new(state),
            file,
            changed: Notify::new(),
            stats,
        };
        // The first save need not wait for the first alarm.
        ledger.changed.notify_one();
        Ok(ledger)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records at or before this second need not be read back.
    pub fn floor(&self) -> i64 {
        self.lock().floor
    }

    /// Take `id` for publishing; false if it is published or being published already.
    pub fn claim(&self, id: &AlarmIdentity) -> bool {
        let mut g = self.lock();
        if g.known.contains_key(id) || g.pending.contains(id) {
            drop(g);
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        g.pending.insert(id.clone());
        true
    }

    /// A claim that was not published after all (the bridge is stopping).
    pub fn release(&self, id: &AlarmIdentity) {
        self.lock().pending.remove(id);
    }

    /// `id` is in the outbox; `time` is its upstream time in Unix seconds, if it has one.
    pub fn confirm(&self, id: AlarmIdentity, time: Option<i64>) {
        let now = unix_now();
        let mut g = self.lock();
        g.pending.remove(&id);
        let t = time.unwrap_or(now);
        if t <= now + CLOCK_AHEAD {
            g.newest = g.newest.max(t);
        }
        if t > g.floor && g.known.insert(id.clone(), t).is_none() {
            g.order.push_back(id);
            while g.order.len() > KNOWN_MAX {
                if let Some(old) = g.order.pop_front() {
                    g.known.remove(&old);
                }
            }
        }
        if g.gap.is_none() {
            advance(&mut g);
        }
        g.dirty = true;
        drop(g);
        self.changed.notify_one();
    }

    /// The alarm stream stopped delivering (or could not be read): the floor stands
    /// still until a backfill closes the gap. Returns the gap's generation.
    pub fn open_gap(&self) -> u64 {
        let mut g = self.lock();
        g.interruptions += 1;
        if let Some(gap) = &g.gap {
            return gap.generation;
        }
        g.generation += 1;
        let generation = g.generation;
        g.gap = Some(Gap {
            since: unix_now(),
            generation,
        });
        g.dirty = true;
        drop(g);
        self.changed.notify_one();
        generation
    }

    /// What the ledger says was published may not have reached the broker (the outbox
    /// that held it was found corrupt and set aside): read back `max_age` and forget the
    /// keys, so those alarms come again (duplicates, never losses).
    pub fn forget_published(&self, max_age: Duration) {
        let back = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        let mut g = self.lock();
        g.floor = g.floor.min(unix_now().saturating_sub(back));
        g.known.clear();
        g.order.clear();
        g.dirty = true;
        drop(g);
        warn!("the outbox was set aside: alarms of the last {max_age:?} are read back again");
        self.changed.notify_one();
    }

    /// The alarm stream is open: what it delivers from now on needs no read-back.
    pub fn stream_up(&self) {
        self.lock().live = true;
    }

    /// The alarm stream was lost: a gap from now.
    pub fn stream_down(&self) -> u64 {
        self.lock().live = false;
        self.open_gap()
    }

    /// Reading is paused (true: a gap from now, closed by no read until it ends) or
    /// resumes.
    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        if paused {
            self.open_gap();
        }
    }

    /// The stream is open and read: a read-back now can close a gap.
    pub fn is_live(&self) -> bool {
        let g = self.lock();
        g.live && !g.paused
    }

    /// How many times the stream was interrupted so far; a backfill notes it before it
    /// reads and hands it to [`close_gap`](Self::close_gap).
    pub fn interruptions(&self) -> u64 {
        self.lock().interruptions
    }

    /// The generation of the gap open now, if any.
    pub fn open_gap_generation(&self) -> Option<u64> {
        self.lock().gap.as_ref().map(|g| g.generation)
    }

    /// The gap `generation` was read back by a read that began after `interruptions`
    /// interruptions: the floor moves on. Refused (false) when the stream was interrupted
    /// again since, or is not open now: then what followed the read is still unseen.
    pub fn close_gap(&self, generation: u64, interruptions: u64) -> bool {
        let g = self.lock();
        if g.interruptions != interruptions || !g.live || g.paused {
            return false;
        }
        drop(g);
        self.end_gap(generation);
        true
    }

    /// The gap `generation` cannot be read back (no records endpoint): the floor moves on
    /// with the live alarms.
    pub fn abandon_gap(&self, generation: u64) {
        self.end_gap(generation);
    }

    fn end_gap(&self, generation: u64) {
        let mut g = self.lock();
        if g.gap
            .as_ref()
            .is_none_or(|gap| gap.generation != generation)
        {
            return;
        }
        let since = g.gap.take().map_or(0, |gap| gap.since);
        let length = u64::try_from(unix_now().saturating_sub(since)).unwrap_or(0);
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .longest_gap_s
            .fetch_max(length, Ordering::Relaxed);
        advance(&mut g);
        g.dirty = true;
        drop(g);
        self.changed.notify_one();
    }

    /// What to save, if anything changed since the last save. Serialised by the caller
    /// off the runtime's thread (and outside the lock every alarm takes).
    fn snapshot(&self) -> Option<Snapshot> {
        let mut g = self.lock();
        if !g.dirty {
            return None;
        }
        g.dirty = false;
        let known = g
            .order
            .iter()
            .filter_map(|id| {
                g.known
                    .get(id)
                    .map(|t| (SharedKey(id.key.clone()), id.state, *t))
            })
            .collect();
        let saved = Snapshot {
            version: 1,
            floor: g.floor,
            known,
            saved_at: unix_now(),
            gap_since: g.gap.as_ref().map(|gap| gap.since),
        };
        Some(saved)
    }

    /// Save the ledger whenever it changed, once the outbox has committed what it speaks
    /// of; a last save when `cancel` fires.
    pub async fn run_saver(self: Arc<Self>, outbox: Arc<Outbox>, cancel: CancellationToken) {
        let Some(path) = self.file.clone() else {
            // In memory only: nothing to save, but a critical task lives until stopped.
            cancel.cancelled().await;
            return;
        };
        // A save has failed since the last one that worked (logged once).
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = self.changed.notified() => false,
            };
            if !stopping {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(SAVE_DELAY) => {}
                }
            }
            if let Some(saved) = self.snapshot() {
                // The disk may be refusing writes: a stop does not wait for it for ever.
                // Unsaved, the ledger is older than what was published: at worst some
                // alarms are backfilled twice, none is skipped.
                if stopping {
                    if tokio::time::timeout(STOP_SAVE_WAIT, outbox.committed())
                        .await
                        .is_err()
                    {
                        warn!(
                            "alarm ledger not saved at stop: the outbox could not write within {STOP_SAVE_WAIT:?}"
                        );
                        return;
                    }
                } else {
                    // Synced, not only committed: a ledger on disk that is ahead of the
                    // outbox would, after a power cut, keep the backfill from reading
                    // back the alarms the outbox lost.
                    tokio::select! {
                        _ = outbox.synced() => {}
                        _ = cancel.cancelled() => {
                            self.lock().dirty = true;
                            continue;
                        }
                    }
                }
                let p = path.clone();
                let save = move || {
                    let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
                    write_atomic(&p, &bytes)
                };
                let failed = match tokio::task::spawn_blocking(save).await {
                    Ok(Ok(())) => {
                        if std::mem::take(&mut failing) {
                            info!("the alarm ledger is saved again");
                        }
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    // The last save is always reported: it will not be tried again.
                    if !std::mem::replace(&mut failing, true) || stopping {
                        warn!(
                            "cannot save the alarm ledger {}: {e} (trying again every {SAVE_DELAY:?}; logged again once it works)",
                            path.display()
                        );
                    }
                    // Tried again after the save delay, not only at the next alarm.
                    self.lock().dirty = true;
                    self.changed.notify_one();
                }
            }
            // A stop that came during this save is the next turn's: it saves once more
            // whatever changed meanwhile (the alarms read while the streams were stopping).
            if stopping {
                return;
            }
        }
    }
}

/// Move the floor up to just before the newest alarm published, and forget the keys it
/// passes: alarms of the newest second itself are still told apart by key.
fn advance(g: &mut State) {
    // A device clock running fast must not take the margin away.
    let floor = g.newest.min(unix_now()).saturating_sub(FLOOR_MARGIN);
    if floor > g.floor {
        g.floor = floor;
        let State { known, order, .. } = g;
        known.retain(|_, t| *t > floor);
        order.retain(|id| known.contains_key(id));
    }
}

pub use crate::storage::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(k: &str, s: &'static str) -> AlarmIdentity {
        AlarmIdentity {
            key: k.into(),
            state: s,
        }
    }

    const AGE: Duration = Duration::from_secs(86_400);

    #[test]
    fn first_start_floor_is_now_and_claims_are_exclusive() {
        let l = AlarmLedger::open(None, 1_000, AGE, Default::default()).unwrap();
        assert_eq!(l.floor(), 999);
        assert!(l.claim(&id("a", "start")));
        assert!(!l.claim(&id("a", "start")), "pending claims exclude");
        assert!(l.claim(&id("a", "end")), "start and end are two alarms");
        l.release(&id("a", "end"));
        assert!(l.claim(&id("a", "end")));
    }

    /// What a backfill does once it read everything: the stream is open, no interruption.
    fn read_back(l: &AlarmLedger, generation: u64) {
        l.stream_up();
        assert!(l.close_gap(generation, l.interruptions()));
    }

    #[test]
    fn the_floor_stands_still_during_a_gap_and_trails_the_newest_by_a_margin() {
        let now = unix_now();
        let l = AlarmLedger::open(None, now - 1000, AGE, Default::default()).unwrap();
        read_back(&l, l.open_gap_generation().unwrap());
        l.confirm(id("a", "start"), Some(now - 500));
        assert_eq!(l.floor(), now - 500 - FLOOR_MARGIN);
        let g = l.stream_down();
        l.claim(&id("b", "start"));
        l.confirm(id("b", "start"), Some(now - 10));
        assert_eq!(l.floor(), now - 560, "frozen while the gap is open");
        assert!(!l.claim(&id("b", "start")), "still known");
        read_back(&l, g);
        assert_eq!(l.floor(), now - 10 - FLOOR_MARGIN);
        // An older alarm does not take the floor back.
        l.confirm(id("d", "start"), Some(now - 300));
        assert_eq!(l.floor(), now - 70);
        // A far-future time does not move the floor.
        l.confirm(id("c", "start"), Some(now + 10 * 365 * 86_400));
        assert!(l.floor() <= now);
    }

    #[test]
    fn an_interruption_during_a_backfill_keeps_the_gap_open() {
        let l = AlarmLedger::open(None, 1_000, AGE, Default::default()).unwrap();
        let g = l.open_gap_generation().unwrap();
        assert!(
            !l.close_gap(g, l.interruptions()),
            "the stream is not open yet: what follows the read is unseen"
        );
        l.stream_up();
        let before = l.interruptions();
        // The stream drops and comes back while the read is under way.
        assert_eq!(l.stream_down(), g, "the same gap goes on");
        l.stream_up();
        assert!(!l.close_gap(g, before));
        assert_eq!(l.open_gap_generation(), Some(g));
        assert!(l.close_gap(g, l.interruptions()));
        assert_eq!(l.open_gap_generation(), None);
    }

    #[test]
    fn a_lost_outbox_takes_the_floor_back_and_forgets_the_keys() {
        let now = unix_now();
        let l = AlarmLedger::open(None, now - 100, AGE, Default::default()).unwrap();
        read_back(&l, l.open_gap_generation().unwrap());
        l.confirm(id("a", "start"), Some(now - 10));
        l.forget_published(Duration::from_secs(3600));
        assert_eq!(l.floor(), now - 3600);
        assert!(l.claim(&id("a", "start")), "published once more");
    }

    #[test]
    fn no_read_closes_a_gap_while_reading_is_paused() {
        let l = AlarmLedger::open(None, 1_000, AGE, Default::default()).unwrap();
        read_back(&l, l.open_gap_generation().unwrap());
        l.set_paused(true);
        let g = l.open_gap_generation().expect("a pause is a gap");
        let during = l.interruptions();
        assert!(!l.is_live());
        assert!(
            !l.close_gap(g, during),
            "the server may still be dropping alarms"
        );
        l.set_paused(false);
        assert!(l.is_live());
        assert!(l.close_gap(g, l.interruptions()));
    }

    #[test]
    fn a_stale_gap_generation_does_not_close_a_newer_gap() {
        let l = AlarmLedger::open(None, 1_000, AGE, Default::default()).unwrap();
        let g1 = l.open_gap_generation().unwrap();
        read_back(&l, g1);
        let g2 = l.stream_down();
        l.stream_up();
        assert!(l.close_gap(g1, l.interruptions()), "a no-op, not a failure");
        assert_eq!(l.open_gap_generation(), Some(g2));
        l.abandon_gap(g2);
        assert_eq!(l.open_gap_generation(), None);
    }

    /// Polls `done` on the (paused) tokio clock until it holds; panics after `within`.
    async fn until(what: &str, within: Duration, done: impl Fn() -> bool) {
        let end = tokio::time::Instant::now() + within;
        while !done() {
            assert!(tokio::time::Instant::now() < end, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_save_is_tried_again_without_waiting_for_another_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::memory(1 << 20));
        let now = unix_now();
        let l = Arc::new(
            AlarmLedger::open(Some(dir.path()), now - 100, AGE, Default::default()).unwrap(),
        );
        // The file's place is taken by a directory: the rename onto it fails.
        let file = dir.path().join(FILE_NAME);
        std::fs::create_dir(&file).unwrap();
        std::fs::write(file.join("x"), b"").unwrap();
        let cancel = CancellationToken::new();
        let saver = tokio::spawn(l.clone().run_saver(outbox, cancel.clone()));
        l.confirm(id("a", "start"), Some(now - 5));
        let tmp = file.with_extension("tmp");
        until("a first save was tried", Duration::from_secs(30), || {
            tmp.exists()
        })
        .await;
        std::fs::remove_dir_all(&file).unwrap();
        // No alarm since: the saver tries again by itself.
        until(
            "the ledger saved after all",
            Duration::from_secs(30),
            || file.is_file(),
        )
        .await;
        let again = AlarmLedger::open(Some(dir.path()), now, AGE, Default::default()).unwrap();
        assert!(!again.claim(&id("a", "start")));
        cancel.cancel();
        saver.await.unwrap();
    }

    #[tokio::test]
    async fn saved_and_read_back_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        let now = unix_now();
        let l = Arc::new(
            AlarmLedger::open(Some(dir.path()), now - 100, AGE, Default::default()).unwrap(),
        );
        read_back(&l, l.open_gap_generation().unwrap());
        l.confirm(id("a", "start"), Some(now - 20));
        l.stream_down();
        l.confirm(id("b", "start"), Some(now - 5));
        let cancel = CancellationToken::new();
        let saver = tokio::spawn(l.clone().run_saver(outbox.clone(), cancel.clone()));
        cancel.cancel();
        saver.await.unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        }
        let again = AlarmLedger::open(Some(dir.path()), now, AGE, Default::default()).unwrap();
        assert_eq!(again.floor(), now - 20 - FLOOR_MARGIN);
        assert!(!again.claim(&id("a", "start")));
        assert!(!again.claim(&id("b", "start")));
        assert!(again.claim(&id("c", "start")));
    }

    #[test]
    fn a_corrupt_ledger_is_kept_aside_and_the_floor_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"\x00garbage{").unwrap();
        let l = AlarmLedger::open(
            Some(dir.path()),
            100_000,
            Duration::from_secs(3600),
            Default::default(),
        )
        .unwrap();
        assert_eq!(l.floor(), 100_000 - 3600);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.contains("corrupt")), "{names:?}");
    }
}
