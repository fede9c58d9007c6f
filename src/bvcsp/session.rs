//! The BVCSP session: log in (or build an AppId token), take the device snapshot,
//! refresh at half the token's life, log in again on code 9 or a refused upgrade.
//! Refused credentials back off for minutes and show as `auth_failed`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::rest::{Grant, RestError};
use super::{BvcspLink, Stream, Token, auth};
use crate::config::Secret;
use crate::link_status::LinkState;
use crate::recovery::{Classify, Recovery, WaitReason};
use crate::retry::{Backoff, Policy, refresh_due};

/// The session's heartbeat name.
const SESSION: &str = "bvcsp-session";

/// After a failed refresh: when to try again, or `None` when the token would expire
/// first (then the session logs in again instead).
fn refresh_retry_at(expires: Instant, retry_in: Duration) -> Option<Instant> {
    let at = Instant::now() + retry_in;
    (at < expires).then_some(at)
}

enum Outcome {
    Cancelled,
    Relogin(String),
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn obtain(ctx: &BvcspLink) -> Result<Grant, RestError> {
    let cfg = &ctx.cfg;
    if cfg.uses_app_token() {
        let rand_num = rand::random::<u32>() % 900_000 + 100_000;
        let token = auth::app_token(
            &cfg.app_id,
            cfg.app_key.expose(),
            &cfg.app_from,
            now_unix(),
            rand_num,
        );
        return Ok(Grant {
            token: Secret::new(token),
            lifetime: None,
        });
    }
    ctx.rest
        .login(&cfg.username, &cfg.password, now_unix())
        .await
}

/// Sleep, or return false when cancelled.
async fn pause(ctx: &BvcspLink, cancel: &CancellationToken, d: Duration) -> bool {
    ctx.heartbeats.beat(SESSION, d + crate::heartbeat::SLACK);
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Runs until cancelled; returns the last token, for the logout.
pub async fn run_session(
    ctx: &Arc<BvcspLink>,
    mut relogin_rx: mpsc::Receiver<u64>,
    cancel: &CancellationToken,
) -> Option<Arc<Token>> {
    let mut net_backoff = Backoff::new(Policy::relogin(&ctx.cfg));
    let mut auth_backoff = Backoff::new(Policy::auth_rejected(&ctx.cfg));
    let mut generation = 0u64;
    let mut last: Option<Arc<Token>> = None;
    let mut relogin_reason: Option<String> = None;
    let _alive =
        crate::heartbeat::BeatGuard::new(&ctx.heartbeats, SESSION, crate::heartbeat::SLACK * 2);
    loop {
        if let Some(reason) = relogin_reason.take() {
            let d = net_backoff.next_delay();
            info!("logging in again ({reason}) in {d:.1?}");
            ctx.status.set(LinkState::Connecting, Some(reason), None);
            if !pause(ctx, cancel, d).await {
                return last;
            }
        } else {
            ctx.status.set(LinkState::Connecting, None, None);
        }
        ctx.heartbeats.beat(
            SESSION,
            ctx.cfg.request_timeout * 2 + crate::heartbeat::SLACK,
        );
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return last,
            r = obtain(ctx) => r,
        };
        let grant = match attempt {
            Ok(g) => g,
            Err(e) => {
                ctx.stats.login_failures.fetch_add(1, Ordering::Relaxed);
                let d = match e.recovery() {
                    Recovery::WaitLong(WaitReason::CredentialsRefused) => {
                        let d = auth_backoff.next_delay();
                        let local = crate::timestamp::rfc3339_millis(SystemTime::now());
                        error!(
                            "BVCSP refused the credentials for user `{}`: {e}. Next attempt in {d:?}. \
                             (SHA256_T also fails when the clocks disagree: local UTC time is {local})",
                            ctx.cfg.username
                        );
                        ctx.status
                            .set(LinkState::AuthFailed, Some(e.to_string()), Some(d));
                        d
                    }
                    _ => {
                        let d = net_backoff.next_delay();
                        ctx.status
                            .set(LinkState::Down, Some(format!("login: {e}")), Some(d));
                        d
                    }
                };
                if !pause(ctx, cancel, d).await {
                    return last;
                }
                continue;
            }
        };
        auth_backoff.reset();
        net_backoff.succeeded();
        ctx.stats.logins.fetch_add(1, Ordering::Relaxed);
        generation += 1;
        let token = Arc::new(Token {
            value: grant.token,
            generation,
            issued: Instant::now(),
            lifetime: grant.lifetime.unwrap_or(ctx.cfg.default_token_lifetime),
        });
        info!(
            generation,
            "logged in to BVCSP (token valid {:?})", token.lifetime
        );
        ctx.to_streams.token.send_replace(Some(token.clone()));
        // The server answers: streams still backing off try again now.
        ctx.to_streams.reachable.send_modify(|n| *n += 1);
        last = Some(token.clone());
        // Stale requests (about older tokens) are dropped.
        while relogin_rx.try_recv().is_ok() {}

        // Online status first, then the snapshot, so no change falls between the two.
        if ctx.cfg.streams.contains(&Stream::OnlineStatus) {
            let mut ready = ctx.to_session.online_ready.subscribe();
            let wait = ready.wait_for(|g| *g >= generation);
            tokio::select! {
                _ = cancel.cancelled() => return last,
                _ = tokio::time::timeout(ctx.cfg.request_timeout, wait) => {}
            }
        }
        match snapshot(ctx, &token, cancel).await {
            Ok(()) => {}
            Err(e) if e.recovery() == Recovery::Relogin => {
                relogin_reason = Some(format!("device list: {e}"));
                continue;
            }
            Err(e) => {
                warn!("device snapshot failed: {e}; will retry");
                ctx.to_session.snapshot.notify_one();
            }
        }
        ctx.status.set(LinkState::Up, None, None);
        match maintain(
            ctx,
            token,
            &mut relogin_rx,
            cancel,
            &mut generation,
            &mut last,
        )
        .await
        {
            Outcome::Cancelled => return last,
            Outcome::Relogin(reason) => relogin_reason = Some(reason),
        }
        // Only a session that held for a while resets the backoff (see Policy::relogin).
        net_backoff.lost();
    }
}

async fn maintain(
    ctx: &Arc<BvcspLink>,
    token: Arc<Token>,
    relogin_rx: &mut mpsc::Receiver<u64>,
    cancel: &CancellationToken,
    generation: &mut u64,
    last: &mut Option<Arc<Token>>,
) -> Outcome {
    let mut current = token;
    let mut refresh_at = refresh_due(current.issued, current.lifetime);
    let mut refresh_backoff = Backoff::new(Policy::refresh(&ctx.cfg));
    let mut snapshot_retry: Option<Instant> = None;
    loop {
        // Asleep until the refresh (or a request), by design; plus time for the calls.
        let wake = refresh_at.saturating_duration_since(Instant::now());
        ctx.heartbeats.beat(
            SESSION,
            wake + ctx.cfg.request_timeout * 4 + crate::heartbeat::SLACK * 2,
        );
        tokio::select! {
            _ = cancel.cancelled() => return Outcome::Cancelled,
            _ = sleep_until(refresh_at) => {
                let expires = current.issued + current.lifetime;
                let result = if ctx.cfg.uses_app_token() {
                    obtain(ctx).await
                } else {
                    tokio::select! {
                        _ = cancel.cancelled() => return Outcome::Cancelled,
                        r = ctx.rest.refresh(&current.value) => r,
                    }
                };
                match result {
                    Ok(grant) => {
                        *generation += 1;
                        let lifetime = grant.lifetime.unwrap_or(current.lifetime);
                        current = Arc::new(Token { value: grant.token, generation: *generation, issued: Instant::now(), lifetime });
                        refresh_at = refresh_due(current.issued, lifetime);
                        refresh_backoff.reset();
                        ctx.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                        info!(generation = *generation, "token refreshed (valid {lifetime:?}); reopening streams");
                        ctx.to_streams.token.send_replace(Some(current.clone()));
                        *last = Some(current.clone());
                    }
                    Err(e) if e.recovery() == Recovery::Relogin => return Outcome::Relogin(format!("refresh: {e}")),
                    Err(e) => {
                        let d = refresh_backoff.next_delay();
                        let Some(at) = refresh_retry_at(expires, d) else {
                            return Outcome::Relogin(format!("refresh failing ({e}) and the token is expiring"));
                        };
                        warn!("token refresh failed: {e}; retrying in {d:.1?}");
                        refresh_at = at;
                    }
                }
            }
            Some(refused) = relogin_rx.recv() => {
                if refused >= current.generation {
                    return Outcome::Relogin("a stream's upgrade was refused".into());
                }
                debug!(refused, current = current.generation, "ignoring a stale re-login request");
            }
            _ = ctx.to_session.snapshot.notified() => {
                snapshot_retry = None;
                if let Some(o) = run_snapshot(ctx, &current, cancel, &mut snapshot_retry).await {
                    return o;
                }
            }
            _ = async { sleep_until(snapshot_retry.expect("guarded")).await }, if snapshot_retry.is_some() => {
                snapshot_retry = None;
                if let Some(o) = run_snapshot(ctx, &current, cancel, &mut snapshot_retry).await {
                    return o;
                }
            }
        }
    }
}

async fn run_snapshot(
    ctx: &Arc<BvcspLink>,
    token: &Token,
    cancel: &CancellationToken,
    retry: &mut Option<Instant>,
) -> Option<Outcome> {
    match snapshot(ctx, token, cancel).await {
        Ok(()) => None,
        Err(e) if e.recovery() == Recovery::Relogin => {
            Some(Outcome::Relogin(format!("device list: {e}")))
        }
        Err(e) => {
            let d = crate::retry::snapshot_retry(&ctx.cfg);
            warn!("device snapshot failed: {e}; retrying in {d:?}");
            *retry = Some(Instant::now() + d);
            None
        }
    }
}

/// Page through the device list and publish retained availability and location.
async fn snapshot(
    ctx: &Arc<BvcspLink>,
    token: &Token,
    cancel: &CancellationToken,
) -> Result<(), RestError> {
    let begin = ctx.registry.snapshot_begin();
    let size = ctx.cfg.page_size;
    let mut page = 0u32;
    let mut paging = Paging::new(size as usize);
    let mut devices = 0usize;
    let ended = loop {
        ctx.heartbeats.beat(
            SESSION,
            ctx.cfg.request_timeout * 2 + crate::heartbeat::SLACK,
        );
        let reply = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = ctx.rest.device_page(&token.value, page, size) => r?,
        };
        let (records, count, total) = reply;
        let now = SystemTime::now();
        let next = paging.page(records.iter().map(|r| r.id.as_str()), count, total);
        for record in records {
            devices += 1;
            ctx.registry
                .listed(&record.id, record.online, record.facts());
            if !ctx
                .registry
                .snapshot_update(&record.id, record.online, begin)
            {
                continue;
            }
            for m in record.messages(now, &ctx.topics) {
                let live = m.topic.ends_with("/location")
                    && ctx
                        .located
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&m.topic);
                if !live {
                    ctx.outbox.push(m).await;
                }
            }
        }
        page += 1;
        match next {
            Next::More => {}
            ended => break ended,
        }
    };
    match ended {
        Next::Partial(why) => {
            // Availability is published all the same; only who is gone is not decided.
            warn!("device snapshot: {devices} devices, but the list is not complete ({why})");
        }
        _ => {
            // Counted first: whoever hears of the complete list sees the count.
            ctx.stats.snapshots.fetch_add(1, Ordering::Relaxed);
            ctx.registry.listing_complete();
            info!("device snapshot: {devices} devices");
        }
    }
    Ok(())
}

/// The most pages of one device list read (each must bring a device not seen before).
const MAX_PAGES: u32 = 100_000;

/// After a page of the device list: read on, or stop with the whole list or part of it.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    More,
    Complete,
    /// Stopped without the whole list: it must not decide who is gone.
    Partial(&'static str),
}

/// When to stop paging through the device list, and whether what was read is all of it.
/// A server may cap `pageSize` (a short page is then no end when `totalCount` says there
/// is more), or repeat a page, or give a wrong total: the distinct ids are counted, and a
/// page that brings nothing new ends the list.
struct Paging {
    size: usize,
    seen: std::collections::HashSet<String>,
    pages: u32,
}

impl Paging {
    fn new(size: usize) -> Paging {
        Paging {
            size,
            seen: Default::default(),
            pages: 0,
        }
    }

    /// `count` records came (`ids` of those that parsed), with `total` if the reply said.
    fn page<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a str>,
        count: usize,
        total: Option<u64>,
    ) -> Next {
        self.pages += 1;
        let before = self.seen.len();
        for id in ids {
            if self.seen.len() <= super::devices::MAX_DEVICES && !self.seen.contains(id) {
                self.seen.insert(id.to_owned());
            }
        }
        let new = self.seen.len() - before;
        let reached = total.map(|t| self.seen.len() as u64 >= t);
        if count == 0 || new == 0 {
            return match reached {
                Some(true) => Next::Complete,
                Some(false) => Next::Partial("it ended before its totalCount"),
                None if count == 0 => Next::Complete,
                None => Next::Partial("a page repeated devices already listed"),
            };
        }
        if count < self.size && reached != Some(false) {
            return Next::Complete;
        }
        if self.seen.len() > super::devices::MAX_DEVICES {
            return Next::Partial("more devices than the bridge tracks");
        }
        if self.pages >= MAX_PAGES {
            return Next::Partial("too many pages");
        }
        Next::More
    }
}

/// Best effort, bounded: the process is stopping.
pub async fn logout(ctx: &BvcspLink, token: &Token) {
    match tokio::time::timeout(crate::retry::LOGOUT_TIMEOUT, ctx.rest.logout(&token.value)).await {
        Ok(Ok(())) => info!("logged out of BVCSP"),
        Ok(Err(e)) => debug!("logout failed: {e}"),
        Err(_) => debug!("logout timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BvcspConfig;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_refreshed_at_half_its_life() {
        let issued = Instant::now();
        sleep_until(refresh_due(issued, Duration::from_secs(4 * 3600))).await;
        assert_eq!(issued.elapsed(), Duration::from_secs(2 * 3600));
        // However short the life the server announces, not more than once a second.
        let issued = Instant::now();
        sleep_until(refresh_due(issued, Duration::from_millis(10))).await;
        assert_eq!(issued.elapsed(), crate::retry::MIN_REFRESH_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refreshes_are_retried_until_the_token_would_expire() {
        let cfg: BvcspConfig = crate::config::from_toml(
            "[bvcsp]\nurl = \"http://h\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap()
        .bvcsp
        .unwrap();
        let lifetime = Duration::from_secs(60);
        let issued = Instant::now();
        let expires = issued + lifetime;
        sleep_until(refresh_due(issued, lifetime)).await;
        let mut backoff = Backoff::new(Policy::refresh(&cfg));
        let mut retries = 0;
        // Every refresh fails: retried by the policy while the token lives, then given up.
        while let Some(at) = refresh_retry_at(expires, backoff.next_delay()) {
            assert!(at < expires);
            sleep_until(at).await;
            retries += 1;
        }
        assert!(retries >= 10, "{retries} retries in the token's last 30 s");
        assert!(
            Instant::now() < expires,
            "a login comes before the token expires"
        );
        assert!(expires - Instant::now() <= cfg.reconnect_early_max);
    }

    fn ids(from: usize, n: usize) -> Vec<String> {
        (from..from + n).map(|i| format!("PU_{i}")).collect()
    }

    fn page(p: &mut Paging, ids: &[String], total: Option<u64>) -> Next {
        p.page(ids.iter().map(String::as_str), ids.len(), total)
    }

    #[test]
    fn a_short_page_ends_the_list_only_when_the_total_agrees() {
        // No total: a short page is the end (the spec's rule).
        let mut p = Paging::new(1000);
        assert_eq!(page(&mut p, &ids(0, 1000), None), Next::More);
        assert_eq!(page(&mut p, &ids(1000, 10), None), Next::Complete);
        // A server that caps pageSize at 100, with a total of 250: read on to it.
        let mut p = Paging::new(1000);
        assert_eq!(page(&mut p, &ids(0, 100), Some(250)), Next::More);
        assert_eq!(page(&mut p, &ids(100, 100), Some(250)), Next::More);
        assert_eq!(page(&mut p, &ids(200, 50), Some(250)), Next::Complete);
        // A total too high: the empty page ends it, as a part.
        let mut p = Paging::new(100);
        assert_eq!(page(&mut p, &ids(0, 100), Some(500)), Next::More);
        assert_eq!(page(&mut p, &ids(100, 20), Some(500)), Next::More);
        assert!(matches!(page(&mut p, &[], Some(500)), Next::Partial(_)));
        // A server that ignores `page`: the same page again ends it, as a part.
        let mut p = Paging::new(100);
        assert_eq!(page(&mut p, &ids(0, 100), Some(300)), Next::More);
        assert!(matches!(
            page(&mut p, &ids(0, 100), Some(300)),
            Next::Partial(_)
        ));
        let mut p = Paging::new(100);
        assert_eq!(page(&mut p, &ids(0, 100), None), Next::More);
        assert!(matches!(page(&mut p, &ids(0, 100), None), Next::Partial(_)));
        // A total too low, with full pages: read on until the list really ends.
        let mut p = Paging::new(100);
        assert_eq!(page(&mut p, &ids(0, 100), Some(100)), Next::More);
        assert_eq!(page(&mut p, &ids(100, 100), Some(100)), Next::More);
        assert_eq!(page(&mut p, &[], Some(100)), Next::Complete);
        // An empty fleet.
        assert_eq!(page(&mut Paging::new(100), &[], Some(0)), Next::Complete);
        assert_eq!(page(&mut Paging::new(100), &[], None), Next::Complete);
    }

    #[test]
    fn a_server_inventing_pages_is_cut_off() {
        let mut p = Paging::new(1);
        let mut n = 0;
        let end = loop {
            match page(&mut p, &ids(n, 1), Some(u64::MAX)) {
                Next::More => n += 1,
                other => break other,
            }
        };
        assert!(matches!(end, Next::Partial(_)));
        assert!(n <= super::super::devices::MAX_DEVICES + 1, "{n}");
    }
}
