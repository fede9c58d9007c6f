//! Alarm backfill (spec §10.1): after every gap in the alarm stream, and at start, read
//! the alarm records back to the ledger's floor and publish each alarm not yet
//! published, in time order, as the live frame would have been, with `backfilled: true`.
//!
//! The live stream is open before a backfill starts, so what the records miss (alarms
//! raised while the pages are read) arrives live; the ledger makes the overlap one event.
//! A server without the records endpoint makes backfill `unavailable` on the link topic,
//! logged once and asked again rarely; the live streams are never affected.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ledger::unix_now;
use super::model::{self, AlarmIdentity};
use super::rest::RestError;
use super::{BvcspLink, Token};
use crate::recovery::{Classify, Recovery, WaitReason};
use crate::retry::{BACKFILL_UNAVAILABLE_RETRY, Backoff, Policy};

const HEARTBEAT: &str = "bvcsp-backfill";

/// What a failed backfill means.
#[derive(Debug, thiserror::Error)]
enum BackfillError {
    /// The token was refused: log in again, then retry.
    #[error("token refused: {0}")]
    Relogin(#[source] RestError),
    /// Transient: back off and retry.
    #[error("{0}")]
    Retry(#[source] RestError),
    /// The server cannot give alarm records: give up for a while.
    #[error("{0}")]
    Unavailable(#[source] Unavailable),
}

/// Why the server cannot give alarm records (shown as `backfill_reason`).
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("no alarm records at {path} (HTTP 404)")]
    NotFound { path: String },
    #[error("the account may not read alarm records at {path} (HTTP 403)")]
    Forbidden { path: String },
    #[error("alarm records at {path}: HTTP {status}")]
    Status { path: String, status: u16 },
    #[error("alarm records at {path}: {source}")]
    Refused {
        path: String,
        #[source]
        source: RestError,
    },
}

/// Backfill's reading of a failure, in the one classification: a refused token is a
/// re-login, a transient failure a retry, a server without alarm records a long wait.
impl Classify for BackfillError {
    fn recovery(&self) -> Recovery {
        match self {
            BackfillError::Relogin(_) => Recovery::Relogin,
            BackfillError::Retry(_) => Recovery::Retry,
            BackfillError::Unavailable(_) => Recovery::WaitLong(WaitReason::NoAlarmRecords),
        }
    }
}

fn classify(e: RestError, path: &str) -> BackfillError {
    match &e {
        RestError::Status(404) => {
            BackfillError::Unavailable(Unavailable::NotFound { path: path.into() })
        }
        RestError::Status(401) | RestError::Code { code: 9, .. } => BackfillError::Relogin(e),
        // The account may not read the records: a new token would not change that, and
        // a re-login per attempt would churn every stream's token.
        RestError::Status(403) => {
            BackfillError::Unavailable(Unavailable::Forbidden { path: path.into() })
        }
        RestError::Status(s) if *s >= 500 || *s == 429 || *s == 408 => BackfillError::Retry(e),
        RestError::Status(s) => BackfillError::Unavailable(Unavailable::Status {
            path: path.into(),
            status: *s,
        }),
        // The transient codes of spec §2: general failure, timeout, busy, server, database.
        RestError::Code {
            code: 1 | 6 | 7 | 10 | 11 | 15,
            ..
        } => BackfillError::Retry(e),
        RestError::Code { .. }
        | RestError::NotJson(_)
        | RestError::NoList
        | RestError::TooLarge { .. } => BackfillError::Unavailable(Unavailable::Refused {
            path: path.into(),
            source: e,
        }),
        RestError::Transport(_) | RestError::NoToken => BackfillError::Retry(e),
    }
}

/// One record worth publishing.
struct Candidate {
    time_ms: i64,
    identity: Option<AlarmIdentity>,
    record: Value,
}

/// What one read of the records found.
struct Found {
    candidates: Vec<Candidate>,
    pages: u32,
    /// Stopped at `backfill_max_pages` before reaching the floor, or held the most
    /// candidates one read keeps.
    too_large: bool,
    /// The most candidates one read keeps: `backfill_max_pages × backfill_page_size`,
    /// whatever a server puts in a page.
    limit: usize,
    untimed: u64,
}

/// Run backfills when asked (`BvcspLink::backfill_request`) until `cancel`.
pub async fn run(ctx: Arc<BvcspLink>, cancel: CancellationToken) {
    if !ctx.cfg.backfill {
        ctx.status.set_detail("backfill", json!("off"));
        return;
    }
    ctx.status.set_detail("backfill", json!("ok"));
    let _alive =
        crate::heartbeat::BeatGuard::new(&ctx.heartbeats, HEARTBEAT, crate::heartbeat::IDLE);
    let mut token_rx = ctx.to_streams.token.subscribe();
    let mut backoff = Backoff::new(Policy::backfill(&ctx.cfg));
    let mut unavailable_until: Option<Instant> = None;
    loop {
        ctx.heartbeats.beat(HEARTBEAT, crate::heartbeat::IDLE);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ctx.to_backfill.notified() => {}
        }
        let mut relogins = 0u32;
        while let Some(generation) = ctx.ledger.open_gap_generation() {
            if unavailable_until.is_some_and(|t| Instant::now() < t) {
                // Nothing can be read back: the floor moves on with the live alarms.
                ctx.ledger.abandon_gap(generation);
                break;
            }
            if !ctx.ledger.is_live() {
                // A read now could not close the gap: the stream's next open asks again.
                break;
            }
            let interruptions = ctx.ledger.interruptions();
            let token = tokio::select! {
                _ = cancel.cancelled() => return,
                t = super::ws::wait_for_token(&mut token_rx) => match t { Some(t) => t, None => return },
            };
            ctx.heartbeats.beat(
                HEARTBEAT,
                ctx.cfg.request_timeout * (ctx.cfg.backfill_max_pages + 2)
                    + crate::heartbeat::SLACK * 2,
            );
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = backfill_once(&ctx, &token, generation, interruptions, &cancel) => r,
            };
            let delay = match result {
                Ok(false) => {
                    // The stream dropped during the read: what followed is read again
                    // once it is open.
                    debug!("alarm backfill: the alarm stream was interrupted during the read");
                    continue;
                }
                Ok(true) => {
                    backoff.reset();
                    if unavailable_until.take().is_some() {
                        info!("alarm backfill available again");
                    }
                    ctx.status.set_detail("backfill", json!("ok"));
                    ctx.status.set_detail("backfill_reason", Value::Null);
                    break;
                }
                Err(BackfillError::Unavailable(reason)) => {
                    if unavailable_until.is_none() {
                        warn!(
                            "alarm backfill unavailable: {reason}; alarms raised while the alarm \
                             stream is down cannot be recovered (asked again in {:?})",
                            BACKFILL_UNAVAILABLE_RETRY
                        );
                    } else {
                        debug!("alarm backfill still unavailable: {reason}");
                    }
                    // The reason first: each detail is published as it is set.
                    ctx.status
                        .set_detail("backfill_reason", json!(reason.to_string()));
                    ctx.status.set_detail("backfill", json!("unavailable"));
                    unavailable_until = Some(Instant::now() + BACKFILL_UNAVAILABLE_RETRY);
                    ctx.ledger.abandon_gap(generation);
                    break;
                }
                Err(BackfillError::Relogin(e)) if relogins > 0 => {
                    // A fresh token was refused too: the records, not the token, are the
                    // problem, and more logins would only churn every stream's token.
                    warn!(
                        "alarm backfill unavailable: {e} even with a new token (asked again in {:?})",
                        BACKFILL_UNAVAILABLE_RETRY
                    );
                    ctx.status
                        .set_detail("backfill_reason", json!(format!("{e} after a re-login")));
                    ctx.status.set_detail("backfill", json!("unavailable"));
                    unavailable_until = Some(Instant::now() + BACKFILL_UNAVAILABLE_RETRY);
                    ctx.ledger.abandon_gap(generation);
                    break;
                }
                Err(BackfillError::Relogin(e)) => {
                    relogins += 1;
                    debug!("alarm backfill: {e}; waiting for a new token");
                    ctx.to_session.ask_relogin(token.generation);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = token_rx.changed() => {}
                        _ = tokio::time::sleep(crate::retry::backfill_token_wait(&ctx.cfg)) => {}
                    }
                    continue;
                }
                Err(BackfillError::Retry(e)) => {
                    let d = backoff.next_delay();
                    warn!("alarm backfill failed: {e}; retrying in {d:.1?}");
                    d
                }
            };
            ctx.heartbeats
                .beat(HEARTBEAT, delay + crate::heartbeat::SLACK * 2);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Read the records back to the floor and publish what is new, then close the gap
/// unless the stream was interrupted since `interruptions` (false: read again).
async fn backfill_once(
    ctx: &Arc<BvcspLink>,
    token: &Token,
    generation: u64,
    interruptions: u64,
    cancel: &CancellationToken,
) -> Result<bool, BackfillError> {
    let max_age = i64::try_from(ctx.cfg.backfill_max_age.as_secs()).unwrap_or(i64::MAX);
    let lower_s = ctx.ledger.floor().max(unix_now().saturating_sub(max_age));
    let lower_ms = lower_s.saturating_mul(1000);
    let started = Instant::now();
    let found = read_back(ctx, token, lower_ms).await?;
    let stats = &ctx.ledger.stats;
    stats.backfill_runs.fetch_add(1, Ordering::Relaxed);
    if found.too_large {
        stats.gaps_too_large.fetch_add(1, Ordering::Relaxed);
        warn!(
            "alarm backfill stopped after {} pages (bvcsp.backfill_max_pages) before reaching the \
             last alarm published: older alarms of this gap are not recovered",
            found.pages
        );
    }
    if found.untimed > 0 {
        warn!(
            "alarm backfill: {} records without a usable time were skipped",
            found.untimed
        );
    }
    let mut candidates = found.candidates;
    // In time order; the start of an alarm before its end; stable otherwise.
    candidates.sort_by(|a, b| {
        let rank = |c: &Candidate| {
            c.identity
                .as_ref()
                .map_or(1, |i| u8::from(i.state != "start"))
        };
        (a.time_ms, rank(a)).cmp(&(b.time_ms, rank(b)))
    });
    let mut published = 0u64;
    for c in candidates {
        if let Some(id) = &c.identity
            && !ctx.ledger.claim(id)
        {
            continue;
        }
        let n = model::normalise_alarm_record(c.record, SystemTime::now(), &ctx.topics);
        for m in n.messages {
            tokio::select! {
                _ = cancel.cancelled() => {
                    if let Some(id) = &c.identity {
                        ctx.ledger.release(id);
                    }
                    return Ok(false);
                }
                _ = ctx.outbox.push(m) => {}
            }
        }
        if let Some(id) = c.identity {
            ctx.ledger.confirm(id, Some(c.time_ms.div_euclid(1000)));
        }
        published += 1;
        stats.backfilled.fetch_add(1, Ordering::Relaxed);
    }
    let closed = ctx.ledger.close_gap(generation, interruptions);
    if published > 0 || found.pages > 1 {
        info!(
            "alarm backfill: {published} alarms recovered from {} pages in {:.1?}",
            found.pages,
            started.elapsed()
        );
    } else {
        debug!("alarm backfill: nothing missed");
    }
    Ok(closed)
}

/// Page through the records far enough to see every one after `lower_ms`. The order the
/// server lists them in is not documented: newest first is read from page 0 until a
/// page lies wholly at or before the floor; oldest first is read from the last page
/// back (when the reply says how many there are) or all the way (when it does not).
async fn read_back(ctx: &BvcspLink, token: &Token, lower_ms: i64) -> Result<Found, BackfillError> {
    let size = ctx.cfg.backfill_page_size;
    let max_pages = ctx.cfg.backfill_max_pages;
    let path = ctx.cfg.paths.alarm_history.as_str();
    let fetch = |page: u32| async move {
        ctx.rest
            .alarm_page(&token.value, page, size)
            .await
            .map_err(|e| classify(e, path))
    };
    let mut found = Found {
        candidates: Vec::new(),
        pages: 0,
        too_large: false,
        untimed: 0,
        limit: (max_pages as usize).saturating_mul(size as usize).max(1),
    };
    let (first, total) = fetch(0).await?;
    found.pages = 1;
    let first_len = first.len();
    let first_span = span(&first);
    let mut order = order_within(&first);
    let first_old = take_page(&mut found, first, lower_ms);
    let more_after = |seen: u64, len: usize| match total {
        Some(t) => seen < t && len > 0,
        None => len >= size as usize,
    };
    if !more_after(first_len as u64, first_len) {
        return Ok(found);
    }
    // Page 0 alone may not tell the order (one record a page, one second throughout):
    // then page 1 does, by comparing the two.
    let mut page_one = None;
    if order == Order::Unknown {
        let (items, _) = fetch(1).await?;
        found.pages += 1;
        order = order_between(first_span, span(&items));
        page_one = Some(items);
    }
    match order {
        Order::OldestFirst => {
            let last_page = total
                .map(|t| u32::try_from(t.saturating_sub(1) / u64::from(size)).unwrap_or(u32::MAX));
            match last_page {
                // Oldest first, count known: from the last page back.
                Some(last) => {
                    let mut page = last;
                    while page >= 1 {
                        let items = match (page, page_one.take()) {
                            (1, Some(items)) => items,
                            (_, kept) => {
                                page_one = kept;
                                if found.pages >= max_pages {
                                    found.too_large = true;
                                    break;
                                }
                                found.pages += 1;
                                fetch(page).await?.0
                            }
                        };
                        if take_page(&mut found, items, lower_ms) {
                            break;
                        }
                        page -= 1;
                    }
                }
                // Oldest first, count unknown: every page, up to the bound.
                None => {
                    read_forward(
                        &mut found, page_one, &fetch, size, max_pages, lower_ms, false,
                    )
                    .await?
                }
            }
        }
        Order::NewestFirst if first_old && page_one.is_none() => {}
        // Newest first: forward until a page is wholly old. Unknown (every record of one
        // second): forward to the end, within the bound.
        Order::NewestFirst | Order::Unknown => {
            let stop_when_old = order == Order::NewestFirst;
            read_forward(
                &mut found,
                page_one,
                &fetch,
                size,
                max_pages,
                lower_ms,
                stop_when_old,
            )
            .await?
        }
    }
    Ok(found)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    NewestFirst,
    OldestFirst,
    Unknown,
}

/// (oldest, newest) time of a page's records, if any has a time.
fn span(items: &[Value]) -> Option<(i64, i64)> {
    let mut times = items.iter().filter_map(model::alarm_millis);
    let first = times.next()?;
    Some(times.fold((first, first), |(lo, hi), t| (lo.min(t), hi.max(t))))
}

/// The listing order as one page shows it: its first record against its last.
fn order_within(items: &[Value]) -> Order {
    let times: Vec<i64> = items.iter().filter_map(model::alarm_millis).collect();
    match (times.first(), times.last()) {
        (Some(a), Some(b)) if a < b => Order::OldestFirst,
        (Some(a), Some(b)) if a > b => Order::NewestFirst,
        _ => Order::Unknown,
    }
}

/// The listing order as two consecutive pages show it.
fn order_between(page0: Option<(i64, i64)>, page1: Option<(i64, i64)>) -> Order {
    match (page0, page1) {
        (Some((lo0, hi0)), Some((lo1, hi1))) if lo1 >= hi0 && (lo1, hi1) != (lo0, hi0) => {
            Order::OldestFirst
        }
        (Some((lo0, hi0)), Some((lo1, hi1))) if hi1 <= lo0 && (lo1, hi1) != (lo0, hi0) => {
            Order::NewestFirst
        }
        _ => Order::Unknown,
    }
}

/// Pages from 1 on (page 1 may be in hand already), until one is short (the end), the
/// bound, or — with `stop_when_old` — a page wholly before the floor.
async fn read_forward<F, Fut>(
    found: &mut Found,
    mut page_one: Option<Vec<Value>>,
    fetch: &F,
    size: u32,
    max_pages: u32,
    lower_ms: i64,
    stop_when_old: bool,
) -> Result<(), BackfillError>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<Value>, Option<u64>), BackfillError>>,
{
    let mut page = 1;
    loop {
        let items = match page_one.take() {
            Some(items) => items,
            None => {
                if found.pages >= max_pages {
                    found.too_large = true;
                    return Ok(());
                }
                found.pages += 1;
                fetch(page).await?.0
            }
        };
        let len = items.len();
        let old = take_page(found, items, lower_ms);
        if len < size as usize || (stop_when_old && old) {
            return Ok(());
        }
        page += 1;
    }
}

/// Keep the records of one page newer than `lower_ms`; true if it has a record with a
/// time and every such record is at or before it (the page lies wholly before the gap).
/// An empty or untimed page says nothing, so it is not old.
fn take_page(found: &mut Found, items: Vec<Value>, lower_ms: i64) -> bool {
    let mut all_old = true;
    let mut timed = false;
    for record in items {
        if !record.is_object() {
            found.untimed += 1;
            continue;
        }
        let Some(time_ms) = model::alarm_millis(&record) else {
            found.untimed += 1;
            continue;
        };
        timed = true;
        // Records carry whole seconds: the floor's own second is past.
        if time_ms < lower_ms + 1000 {
            continue;
        }
        all_old = false;
        if found.candidates.len() >= found.limit {
            found.too_large = true;
            continue;
        }
        found.candidates.push(Candidate {
            time_ms,
            identity: model::alarm_identity(&record),
            record,
        });
    }
    timed && all_old
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_once() {
        let p = "/bvcsp/v1/alarm";
        assert!(matches!(
            classify(RestError::Status(404), p),
            BackfillError::Unavailable(_)
        ));
        assert!(matches!(
            classify(RestError::Status(401), p),
            BackfillError::Relogin(_)
        ));
        assert!(matches!(
            classify(RestError::Status(503), p),
            BackfillError::Retry(_)
        ));
        assert!(matches!(
            classify(RestError::Status(403), p),
            BackfillError::Unavailable(_)
        ));
        assert!(matches!(
            classify(RestError::TooLarge { limit: 1 }, p),
            BackfillError::Unavailable(_)
        ));
        let code = |c| RestError::Code {
            code: c,
            msg: String::new(),
        };
        assert!(matches!(classify(code(9), p), BackfillError::Relogin(_)));
        assert!(matches!(classify(code(11), p), BackfillError::Retry(_)));
        assert!(matches!(
            classify(code(8), p),
            BackfillError::Unavailable(_)
        ));
        assert!(matches!(
            classify(code(4242), p),
            BackfillError::Unavailable(_)
        ));
        assert!(matches!(
            classify(RestError::NotJson(3), p),
            BackfillError::Unavailable(_)
        ));
        assert!(matches!(
            classify(RestError::NoList, p),
            BackfillError::Unavailable(_)
        ));
    }

    #[test]
    fn a_page_keeps_what_is_newer_than_the_floor() {
        let mut found = Found {
            candidates: Vec::new(),
            pages: 0,
            too_large: false,
            untimed: 0,
            limit: 2,
        };
        let items = vec![
            json!({"key": "a", "timestamp": 100, "status": 0}),
            json!({"key": "b", "time": 101, "status": 0}),
            json!({"key": "c", "status": 0}),
            json!("junk"),
        ];
        assert!(!take_page(&mut found, items, 100_000));
        assert_eq!(found.candidates.len(), 1);
        assert_eq!(&*found.candidates[0].identity.as_ref().unwrap().key, "b");
        assert_eq!(found.untimed, 2);
        assert!(take_page(
            &mut found,
            vec![json!({"key": "z", "timestamp": 99})],
            100_000
        ));
        assert!(
            !take_page(&mut found, vec![], 100_000),
            "an empty page says nothing"
        );
        assert!(!take_page(&mut found, vec![json!({"key": "u"})], 100_000));
        let many = (0..5)
            .map(|i| json!({"key": format!("m{i}"), "time": 200 + i}))
            .collect();
        take_page(&mut found, many, 100_000);
        assert_eq!(found.candidates.len(), 2, "bounded");
        assert!(found.too_large);
    }

    #[test]
    fn the_order_is_told_by_one_page_or_by_two() {
        let page = |ts: &[i64]| -> Vec<Value> { ts.iter().map(|t| json!({"time": t})).collect() };
        assert_eq!(order_within(&page(&[1, 2])), Order::OldestFirst);
        assert_eq!(order_within(&page(&[2, 1])), Order::NewestFirst);
        assert_eq!(order_within(&page(&[5])), Order::Unknown);
        assert_eq!(order_within(&page(&[5, 5])), Order::Unknown);
        let (a, b) = (span(&page(&[5])), span(&page(&[9])));
        assert_eq!(order_between(a, b), Order::OldestFirst);
        assert_eq!(order_between(b, a), Order::NewestFirst);
        assert_eq!(order_between(a, a), Order::Unknown);
        assert_eq!(order_between(a, None), Order::Unknown);
    }
}
