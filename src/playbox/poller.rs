//! One play box: log in once and reuse the token, poll brightness, screen and volume,
//! publish retained state and availability, apply commands, and never lock the box out.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::client::{BoxClient, BoxError, LoginForm, LoginsHeld};
use super::commands::{Coalescer, Command, Pending};
pub use super::values::{BRIGHTNESS_PATHS, INFO_PATHS, SCREEN_PATHS, VOLUME_PATHS};
use super::values::{Function, Reading, function_of, state_payload};
use crate::config::{PlayboxConfig, Secret};
use crate::json::{as_f64, as_string, field};
use crate::link_status::{LinkState, LinkStatus};
use crate::mqtt::{Message, Outbox, Topics};
use crate::recovery::{Classify, Recovery, WaitReason};
use crate::retry::{Backoff, PLAYBOX_LOCKOUT, PLAYBOX_PASSWORD_RECHECK, Policy};

/// State is published on change, and at least this often anyway.
const STATE_REFRESH: Duration = Duration::from_secs(300);
/// Refused passwords in a row after which the bridge stops trying on its own: the box
/// locks logins after three, and the bridge must never be the one that causes it.
const MAX_REFUSED: u32 = 2;

pub struct BoxRunner {
    cfg: PlayboxConfig,
    client: BoxClient,
    outbox: Arc<Outbox>,
    topics: Topics,
    link: Arc<LinkStatus>,
    token: Option<Secret>,
    form: Option<LoginForm>,
    paths: [Option<String>; 4],
    probed: [bool; 4],
    info: Option<Value>,
    /// What the box said of itself, for Home Assistant's device entry.
    described: tokio::sync::watch::Sender<Option<Value>>,
    online: Option<bool>,
    last: Option<(Reading, Instant)>,
    refused: u32,
    password_seen: Secret,
    heartbeats: Arc<crate::heartbeat::Heartbeats>,
    /// Commands from MQTT not sent yet.
    commands: Arc<Pending>,
    /// No login before this instant, and why: every login (a poll's, a command's, a
    /// read-back's) goes through [`BoxRunner::login`], which honours it.
    hold: Option<(Instant, Hold)>,
    auth_backoff: Backoff,
    lockout_backoff: Backoff,
}

/// Why logins are held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The password was refused (code 24 or 33).
    Refused,
    /// The box is locking logins (code 17 or 67).
    LockedOut,
    /// Some other refusal of the login itself.
    Backoff,
}

impl BoxRunner {
    pub fn new(
        cfg: PlayboxConfig,
        client: BoxClient,
        outbox: Arc<Outbox>,
        topics: Topics,
        heartbeats: Arc<crate::heartbeat::Heartbeats>,
        commands: Arc<Pending>,
    ) -> BoxRunner {
        let link = LinkStatus::new(
            &format!("playbox/{}", cfg.name),
            topics.link_playbox(&cfg.name),
            outbox.clone(),
            &[],
        );
        let password_seen = cfg.password.clone();
        let auth_backoff = Backoff::new(Policy::playbox_auth(&cfg));
        let lockout_backoff = Backoff::new(Policy::playbox_lockout(&cfg));
        BoxRunner {
            cfg,
            client,
            outbox,
            topics,
            link,
            token: None,
            form: None,
            paths: Default::default(),
            probed: [false; 4],
            info: None,
            described: tokio::sync::watch::channel(None).0,
            online: None,
            last: None,
            refused: 0,
            password_seen,
            heartbeats,
            commands,
            hold: None,
            auth_backoff,
            lockout_backoff,
        }
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn link(&self) -> Arc<LinkStatus> {
        self.link.clone()
    }

    /// Changes when the box has described itself (model, firmware, MAC...).
    pub fn watch_described(&self) -> tokio::sync::watch::Receiver<Option<Value>> {
        self.described.subscribe()
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let beat_name = format!("playbox/{}", self.cfg.name);
        let heartbeats = self.heartbeats.clone();
        let _alive = crate::heartbeat::BeatGuard::new(
            &heartbeats,
            &beat_name,
            self.cfg.request_timeout * 10,
        );
        let mut net_backoff = Backoff::new(Policy::playbox_network(&self.cfg));
        let mut next_poll = Instant::now();
        let mut commands = Coalescer::new(self.commands.clone());
        loop {
            // A poll is a handful of requests, each bounded by request_timeout.
            let wait = next_poll.saturating_duration_since(Instant::now());
            heartbeats.beat(
                &beat_name,
                wait + self.cfg.request_timeout * 10 + Duration::from_secs(30),
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep_until(next_poll) => {
                    let result = tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = self.poll() => r,
                    };
                    next_poll = match result {
                        Ok(()) => {
                            net_backoff.reset();
                            // Cleared before "up": no message says up and locked out.
                            self.link.set_detail("locked_out", Value::Null);
                            self.link.set(LinkState::Up, None, None);
                            Instant::now() + self.cfg.poll_interval
                        }
                        Err(e) => Instant::now() + self.failed(&e, &mut net_backoff),
                    };
                }
                batch = commands.next_batch() => {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.apply(batch) => {}
                    }
                }
            }
        }
        self.link.stopped();
    }

    /// How long logins are still held back, if they are.
    fn held_for(&self) -> Option<Duration> {
        let (until, _) = self.hold?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// React to a failed poll; returns how long to wait before the next one. Logins are
    /// held back by [`BoxRunner::login`] itself; this only schedules polls and reports.
    fn failed(&mut self, e: &BoxError, net: &mut Backoff) -> Duration {
        self.set_online(false);
        let held = self.held_for();
        match e.recovery() {
            // Nothing was sent: the state shown (auth_failed, locked out) stays.
            Recovery::WaitLong(WaitReason::LoginsHeld) => held.unwrap_or(PLAYBOX_PASSWORD_RECHECK),
            Recovery::WaitLong(WaitReason::CredentialsRefused) => {
                let next = if self.refused >= MAX_REFUSED {
                    error!(
                        "playbox {}: password refused {} times; not trying again until it changes \
                         (the box locks logins after 3 failures)",
                        self.name(),
                        self.refused
                    );
                    None
                } else {
                    error!(
                        "playbox {}: password refused; next attempt in {:?}",
                        self.name(),
                        held.unwrap_or_default()
                    );
                    held
                };
                self.link
                    .set(LinkState::AuthFailed, Some(e.to_string()), next);
                held.unwrap_or(PLAYBOX_PASSWORD_RECHECK)
            }
            Recovery::WaitLong(WaitReason::LockedOut) => {
                let d = held.unwrap_or(PLAYBOX_LOCKOUT).max(PLAYBOX_LOCKOUT);
                warn!(
                    "playbox {}: the box is locking logins ({e}); no login for {d:?}",
                    self.name()
                );
                // Down first: each change is published as made, and no message may say
                // "locked out" while the state still reads "connecting".
                self.link.set(LinkState::Down, Some(e.to_string()), Some(d));
                self.link.set_detail("locked_out", json!(true));
                d
            }
            Recovery::WaitLong(WaitReason::TooFrequent) => {
                let d = net
                    .next_delay()
                    .max(self.cfg.poll_interval)
                    .max(held.unwrap_or_default());
                self.link.set(LinkState::Down, Some(e.to_string()), Some(d));
                d
            }
            _ => {
                let d = net.next_delay().max(held.unwrap_or_default());
                self.link.set(LinkState::Down, Some(e.to_string()), Some(d));
                d
            }
        }
    }

    /// Why no login may be tried now, if one may not.
    fn login_held(&mut self) -> Option<LoginsHeld> {
        if self.refused >= MAX_REFUSED && !self.password_changed() {
            return Some(LoginsHeld::UntilPasswordChanges {
                times: self.refused,
            });
        }
        let left_s = self.held_for()?.as_secs();
        Some(match self.hold.map(|(_, h)| h) {
            Some(Hold::Refused) => LoginsHeld::Refused { left_s },
            Some(Hold::LockedOut) => LoginsHeld::LockedOut { left_s },
            _ => LoginsHeld::Backoff { left_s },
        })
    }

    /// Hold logins back after a refused login, as long as its reply says to.
    fn hold_logins(&mut self, e: &BoxError) {
        let (hold, d) = match e.recovery() {
            Recovery::WaitLong(WaitReason::CredentialsRefused) => {
                self.refused += 1;
                let d = self.auth_backoff.next_delay();
                (Hold::Refused, d)
            }
            Recovery::WaitLong(WaitReason::LockedOut) => {
                let d = self.lockout_backoff.next_delay();
                (Hold::LockedOut, d.max(PLAYBOX_LOCKOUT))
            }
            Recovery::WaitLong(WaitReason::TooFrequent) => (Hold::Backoff, self.cfg.poll_interval),
            // Any other refusal of a login by the box itself: never a faster retry than
            // the auth backoff (shared/spec/playbox.md §2, "other").
            _ if matches!(e, BoxError::Code { .. } | BoxError::SessionHeld) => {
                let d = self.auth_backoff.next_delay();
                (Hold::Backoff, d)
            }
            // Network trouble: nothing was refused, the poll backoff paces it.
            _ => return,
        };
        self.hold = Some((Instant::now() + d, hold));
    }

    /// After refusals, retry only when the password file says something new.
    fn password_changed(&mut self) -> bool {
        let Some(path) = &self.cfg.password_file else {
            return false;
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let new = Secret::new(text.trim_end_matches(['\r', '\n']));
                if new != self.password_seen {
                    info!(
                        "playbox {}: password file changed; trying again",
                        self.cfg.name
                    );
                    self.password_seen = new.clone();
                    self.cfg.password = new;
                    self.client.set_password(self.cfg.password.clone());
                    self.refused = 0;
                    // A wait for a refused password ends with a new one; a lockout does not.
                    if matches!(self.hold, Some((_, Hold::Refused))) {
                        self.hold = None;
                        self.auth_backoff.reset();
                    }
                    true
                } else {
                    false
                }
            }
            Err(_) => false,
        }
    }

    fn set_online(&mut self, online: bool) {
        if self.online != Some(online) {
            self.online = Some(online);
            let word = if online { "online" } else { "offline" };
            self.outbox.push_now(Message::state_text(
                self.topics.playbox_availability(&self.cfg.name),
                word,
            ));
        }
    }

    /// The only place a login is sent. While logins are held back (a refused password,
    /// a lockout) it fails at once with [`BoxError::Held`] and sends nothing.
    async fn login(&mut self) -> Result<(), BoxError> {
        if let Some(why) = self.login_held() {
            return Err(BoxError::Held(why));
        }
        self.link.set(LinkState::Connecting, None, None);
        let forms = match self.form {
            Some(f) => vec![f],
            None => vec![LoginForm::Documented, LoginForm::Fallback],
        };
        let mut last = None;
        for form in forms {
            match self.client.login(form).await {
                Ok(token) => {
                    if self.form != Some(form) {
                        info!(
                            "playbox {}: logged in ({} login form)",
                            self.cfg.name,
                            form.name()
                        );
                        self.link.set_detail("login_form", json!(form.name()));
                    }
                    self.form = Some(form);
                    self.token = Some(token);
                    self.refused = 0;
                    self.hold = None;
                    self.auth_backoff.reset();
                    self.lockout_backoff.reset();
                    // A new session: the paths may have changed (a reboot, an upgrade).
                    self.probed = [false; 4];
                    self.info = None;
                    return Ok(());
                }
                // The fallback form is for a box that does not know the first one, never
                // a second try at a refused password.
                Err(e) if form == LoginForm::Documented && e.recovery() == Recovery::GiveUp => {
                    last = Some(e)
                }
                Err(e) => {
                    self.token = None;
                    self.hold_logins(&e);
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or(BoxError::Missing("login")))
    }

    /// GET with the session token; an auth-looking error logs in again, once.
    async fn get(&mut self, path: &str) -> Result<Value, BoxError> {
        if self.token.is_none() {
            self.login().await?;
        }
        let token = self.token.clone().ok_or(BoxError::Missing("token"))?;
        match self.client.get(path, &token).await {
            Err(e) if e.recovery() == Recovery::Relogin => {
                self.token = None;
                self.login().await?;
                let token = self.token.clone().ok_or(BoxError::Missing("token"))?;
                self.client.get(path, &token).await
            }
            r => r,
        }
    }

    async fn post(&mut self, path: &str, body: &Value) -> Result<Value, BoxError> {
        if self.token.is_none() {
            self.login().await?;
        }
        let token = self.token.clone().ok_or(BoxError::Missing("token"))?;
        match self.client.post(path, &token, body).await {
            Err(e) if e.recovery() == Recovery::Relogin => {
                self.token = None;
                self.login().await?;
                let token = self.token.clone().ok_or(BoxError::Missing("token"))?;
                self.client.post(path, &token, body).await
            }
            r => r,
        }
    }

    fn candidates(&self, f: Function) -> Vec<String> {
        let configured = match f {
            Function::Brightness => &self.cfg.paths.brightness,
            Function::Screen => &self.cfg.paths.screen,
            Function::Volume => &self.cfg.paths.volume,
            Function::Info => &self.cfg.paths.info,
        };
        match configured {
            Some(p) => vec![p.clone()],
            None => f.defaults().iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Read one function, finding its path first if needed. `Ok(None)`: the box has no
    /// working path for it.
    async fn read(&mut self, f: Function) -> Result<Option<Value>, BoxError> {
        let i = f.index();
        if let Some(path) = self.paths[i].clone() {
            match self.get(&path).await {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.recovery() == Recovery::GiveUp => {
                    warn!(
                        "playbox {}: {} path {path} stopped working ({e}); looking again",
                        self.cfg.name,
                        f.name()
                    );
                    self.paths[i] = None;
                    self.probed[i] = false;
                }
                Err(e) => return Err(e),
            }
        }
        if self.probed[i] {
            return Ok(None);
        }
        for path in self.candidates(f) {
            match self.get(&path).await {
                Ok(v) if f.expected(&v) => {
                    info!("playbox {}: {} at {path}", self.cfg.name, f.name());
                    self.link
                        .set_detail(&format!("{}_path", f.name()), json!(path));
                    self.paths[i] = Some(path);
                    self.probed[i] = true;
                    return Ok(Some(v));
                }
                Ok(_) => continue,
                Err(e) if e.recovery() == Recovery::GiveUp => continue,
                Err(e) => return Err(e),
            }
        }
        self.probed[i] = true;
        warn!(
            "playbox {}: no working path for {}; publishing it as null",
            self.cfg.name,
            f.name()
        );
        self.link
            .set_detail(&format!("{}_path", f.name()), Value::Null);
        Ok(None)
    }

    async fn poll(&mut self) -> Result<(), BoxError> {
        let mut reading = Reading::default();
        for f in [Function::Brightness, Function::Screen, Function::Volume] {
            let Some(data) = self.read(f).await? else {
                continue;
            };
            match f {
                Function::Brightness => reading.brightness = field(&data, "ratio").and_then(as_f64),
                Function::Volume => reading.volume = field(&data, "ratio").and_then(as_f64),
                Function::Screen => {
                    reading.screen = field(&data, "state")
                        .and_then(as_string)
                        .map(|s| s.into_owned());
                }
                Function::Info => {}
            }
        }
        if self.info.is_none() {
            self.info = Some(self.read(Function::Info).await?.unwrap_or(Value::Null));
            let described = self.info.as_ref().map(super::values::described);
            self.described.send_if_modified(|d| {
                let changed = *d != described;
                *d = described;
                changed
            });
        }
        self.set_online(true);
        self.publish_state(reading, false);
        Ok(())
    }

    fn publish_state(&mut self, reading: Reading, force: bool) {
        let due = match &self.last {
            Some((prev, at)) => *prev != reading || at.elapsed() >= STATE_REFRESH,
            None => true,
        };
        if !(due || force) {
            return;
        }
        let p = state_payload(&reading, self.info.as_ref());
        self.outbox.push_now(Message::state_json(
            self.topics.playbox_state(&self.cfg.name),
            &p,
        ));
        self.last = Some((reading, Instant::now()));
    }

    fn report_error(&self, cmd: &Command, error: &str) {
        self.commands.refuse(
            &self.outbox,
            &self.topics,
            &self.cfg.name,
            cmd.kind.name(),
            cmd.payload.as_bytes(),
            &error,
        );
    }

    /// Apply a batch of commands (at most one per setting), then read the box back once
    /// and publish what it now shows.
    async fn apply(&mut self, batch: Vec<Command>) {
        let mut applied = false;
        for cmd in &batch {
            applied |= self.apply_one(cmd).await;
        }
        if !applied {
            return;
        }
        if let Err(e) = self.poll().await {
            warn!(
                "playbox {}: read-back after a set failed: {e}",
                self.cfg.name
            );
        }
        // Publish even when unchanged: the reply to a command.
        if let Some((reading, _)) = self.last.clone() {
            self.publish_state(reading, true);
        }
    }

    /// Send one command; `true` when the box took it. Refusals go to `…/error`.
    async fn apply_one(&mut self, cmd: &Command) -> bool {
        let f = function_of(cmd.kind);
        let path = match self.read(f).await {
            Ok(Some(_)) => match self.paths[f.index()].clone() {
                Some(p) => p,
                None => {
                    self.report_error(cmd, "no path known for it");
                    return false;
                }
            },
            Ok(None) => {
                self.report_error(cmd, &format!("the box has no working {} path", f.name()));
                return false;
            }
            Err(e) => {
                self.report_error(cmd, &format!("not sent: {e}"));
                return false;
            }
        };
        let mut result = self.post(&path, &cmd.body).await;
        // Older firmware takes whole numbers only.
        if let (Err(BoxError::Code { code: 3, .. }), Some(v)) =
            (&result, cmd.body.get("ratio").and_then(Value::as_f64))
            && v.fract() != 0.0
        {
            result = self.post(&path, &json!({"ratio": v.round()})).await;
        }
        match result {
            Ok(_) => {
                info!(
                    "playbox {}: {} set to {}",
                    self.cfg.name,
                    cmd.kind.name(),
                    cmd.payload
                );
                true
            }
            Err(e) => {
                self.report_error(cmd, &e.to_string());
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(extra: &str) -> BoxRunner {
        let text = format!(
            "[[playbox]]\nname = \"b\"\nurl = \"https://127.0.0.1:9\"\nsn = \"S\"\n\
             password = \"x\"\n{extra}"
        );
        let cfg = crate::config::from_toml(&text).unwrap().playbox.remove(0);
        let tls = crate::tls::client_config(&crate::tls::Trust::Insecure, None).unwrap();
        let client = BoxClient::new(&cfg, tls, None).unwrap();
        let outbox = Arc::new(Outbox::memory(1 << 20));
        BoxRunner::new(
            cfg,
            client,
            outbox,
            Topics::new("t"),
            Default::default(),
            Default::default(),
        )
    }

    fn code(code: i64) -> BoxError {
        BoxError::Code {
            code,
            message: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_box_is_polled_again_by_the_network_backoff() {
        let mut r = runner("poll_interval = \"15s\"\n");
        let mut net = Backoff::new(Policy::playbox_network(&r.cfg));
        let delays: Vec<Duration> = (0..8)
            .map(|_| r.failed(&BoxError::Status(500), &mut net))
            .collect();
        assert!(delays[0] >= Duration::from_secs(1), "{delays:?}");
        assert!(delays[0] < Duration::from_secs(2), "{delays:?}");
        assert!(delays[3] > delays[0], "{delays:?}");
        let bound = Duration::from_secs(60);
        assert!(delays.iter().all(|d| *d < bound), "{delays:?}");
        assert_eq!(r.link.state(), LinkState::Down);
        // A poll that went through: the next failure starts from a second again.
        net.reset();
        assert!(r.failed(&BoxError::Status(500), &mut net) < Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_box_asking_for_fewer_requests_waits_at_least_the_poll_interval() {
        let mut r = runner("poll_interval = \"15s\"\n");
        let mut net = Backoff::new(Policy::playbox_network(&r.cfg));
        r.hold_logins(&code(22));
        assert_eq!(r.held_for(), Some(Duration::from_secs(15)));
        assert!(r.failed(&code(22), &mut net) >= Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_holds_logins_for_61_s_on_the_tokio_clock() {
        let mut r = runner("");
        let mut net = Backoff::new(Policy::playbox_network(&r.cfg));
        r.hold_logins(&code(17));
        assert_eq!(r.held_for(), Some(PLAYBOX_LOCKOUT));
        assert_eq!(r.failed(&code(17), &mut net), PLAYBOX_LOCKOUT);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(r.login_held(), Some(LoginsHeld::LockedOut { left_s: 31 }));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(r.login_held(), None, "the lockout is over");
        // A second lockout in a row waits longer.
        r.hold_logins(&code(67));
        assert_eq!(r.held_for(), Some(PLAYBOX_LOCKOUT * 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_password_waits_minutes_and_stops_after_two() {
        let mut r = runner("auth_retry_min = \"5m\"\nauth_retry_max = \"60m\"\n");
        let mut net = Backoff::new(Policy::playbox_network(&r.cfg));
        r.hold_logins(&code(24));
        assert_eq!(r.held_for(), Some(Duration::from_secs(300)));
        assert_eq!(r.failed(&code(24), &mut net), Duration::from_secs(300));
        assert_eq!(r.link.state(), LinkState::AuthFailed);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(r.login_held(), None);
        r.hold_logins(&code(33));
        assert_eq!(r.held_for(), Some(Duration::from_secs(600)));
        // Two refusals: no login at all until the password changes, however long.
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        assert_eq!(
            r.login_held(),
            Some(LoginsHeld::UntilPasswordChanges { times: 2 })
        );
    }
}
