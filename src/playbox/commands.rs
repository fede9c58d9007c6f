//! Commands from MQTT (contract §3.4): strict validation, a size limit, refusals on
//! `{base}/playbox/{name}/error`, and coalescing so that a UI slider cannot hammer a box.
//!
//! The router checks a command and puts it in its box's [`Pending`]: one slot per
//! setting, so a newer value replaces an older one that was not sent yet and nothing is
//! ever queued without bound. The box's loop takes them with a [`Coalescer`]: the first
//! command opens a [`COALESCE_WINDOW`], and at its end the last value of each setting is
//! sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tracing::warn;

use super::client::clip;
use crate::mqtt::{Message, Outbox, Topics};

/// The longest command payload taken (contract §3.4); a longer one is refused.
pub const MAX_COMMAND_BYTES: usize = 256;
/// At most this much of a refused payload is quoted on `…/error` and in the log.
pub const QUOTE_BYTES: usize = 64;
/// Commands for one setting within this window of the first are one command: the last
/// value wins.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(250);
/// Refusals are logged at most once per this long per box (the first one always); each
/// is still reported on `…/error`.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Brightness,
    Screen,
    Volume,
}

impl CommandKind {
    pub fn from_topic(s: &str) -> Option<CommandKind> {
        match s {
            "brightness" => Some(CommandKind::Brightness),
            "screen" => Some(CommandKind::Screen),
            "volume" => Some(CommandKind::Volume),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Brightness => "brightness",
            CommandKind::Screen => "screen",
            CommandKind::Volume => "volume",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Strict validation of a plain-text payload into the request body.
    pub fn body(self, payload: &str) -> Result<Value, CommandError> {
        let p = payload.trim();
        let quoted = || clip(p, QUOTE_BYTES).to_owned();
        match self {
            CommandKind::Brightness | CommandKind::Volume => {
                let v: f64 = p.parse().map_err(|_| CommandError::NotANumber(quoted()))?;
                if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                    return Err(CommandError::OutOfRange(quoted()));
                }
                Ok(json!({"ratio": v}))
            }
            CommandKind::Screen => match p.to_ascii_lowercase().as_str() {
                "on" => Ok(json!({"state": "OPEN"})),
                "off" => Ok(json!({"state": "CLOSE"})),
                _ => Err(CommandError::NotOnOff(quoted())),
            },
        }
    }
}

/// Why a command from MQTT is refused (reported on the box's `…/error` topic). The
/// payload is quoted to at most [`QUOTE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("payload is {0} bytes; commands are at most {MAX_COMMAND_BYTES}")]
    TooLarge(usize),
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("expected a number 0-100, got {0:?}")]
    NotANumber(String),
    #[error("expected a number 0-100, got {0}")]
    OutOfRange(String),
    #[error("expected `on` or `off`, got {0:?}")]
    NotOnOff(String),
}

/// A checked command: its payload (trimmed, at most [`MAX_COMMAND_BYTES`]) and the
/// request body it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub kind: CommandKind,
    pub payload: String,
    pub body: Value,
}

impl Command {
    /// Check a payload as it came from MQTT; `Err` is the reason to report.
    pub fn parse(kind: CommandKind, raw: &[u8]) -> Result<Command, CommandError> {
        if raw.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::TooLarge(raw.len()));
        }
        let text = std::str::from_utf8(raw).map_err(|_| CommandError::NotUtf8)?;
        let body = kind.body(text)?;
        Ok(Command {
            kind,
            payload: text.trim().to_owned(),
            body,
        })
    }
}

/// At most [`QUOTE_BYTES`] of a payload, as text.
pub fn quote(raw: &[u8]) -> String {
    // Decode a little more than needed so a cut character shows as itself or not at all.
    let head = &raw[..raw.len().min(QUOTE_BYTES + 4)];
    clip(&String::from_utf8_lossy(head), QUOTE_BYTES).to_owned()
}

/// The commands of one box not sent yet (one per setting), and its refusal log limit.
#[derive(Debug, Default)]
pub struct Pending {
    slots: Mutex<[Option<Command>; 3]>,
    notify: Notify,
    /// Commands replaced by a newer one for the same setting before they were sent.
    coalesced: AtomicU64,
    log: Mutex<LogLimit>,
}

#[derive(Debug, Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl Pending {
    fn slots(&self) -> MutexGuard<'_, [Option<Command>; 3]> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `cmd`, replacing a command for the same setting that was not sent yet.
    pub fn put(&self, cmd: Command) {
        let i = cmd.kind.index();
        if self.slots()[i].replace(cmd).is_some() {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<Command> {
        self.slots().iter_mut().filter_map(Option::take).collect()
    }

    fn is_empty(&self) -> bool {
        self.slots().iter().all(Option::is_none)
    }

    /// Commands that never reached the box because a newer value came first.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// A message that is no command at all (unknown setting, retained): logged,
    /// rate-limited, and dropped.
    pub fn ignore(&self, name: &str, topic: &str, why: &str) {
        if let Some(extra) = self.may_log() {
            warn!(
                "playbox {name}: ignoring {why} on {}{extra}",
                clip(topic, 200)
            );
        }
    }

    /// `Some(note)` when a refusal may be logged now; the note counts the ones not logged.
    fn may_log(&self) -> Option<String> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if log.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            log.suppressed += 1;
            return None;
        }
        let note = match log.suppressed {
            0 => String::new(),
            n => format!(" ({n} more refused or ignored since the last report)"),
        };
        log.last = Some(now);
        log.suppressed = 0;
        Some(note)
    }

    /// Report a refused command on `…/error` (always) and in the log (rate-limited).
    /// Quotes at most [`QUOTE_BYTES`] of the payload in both.
    pub fn refuse(
        &self,
        outbox: &Outbox,
        topics: &Topics,
        name: &str,
        command: &str,
        raw: &[u8],
        error: &dyn std::fmt::Display,
    ) {
        let quoted = quote(raw);
        if let Some(extra) = self.may_log() {
            warn!("playbox {name}: {command} command {quoted:?} refused: {error}{extra}");
        }
        let body = json!({"command": command, "payload": quoted, "error": error.to_string()});
        outbox.push_now(Message {
            topic: topics.playbox_error(name),
            payload: body.to_string().into(),
            retain: false,
        });
    }
}

/// Takes a box's pending commands in batches, one window at a time.
#[derive(Debug)]
pub struct Coalescer {
    pending: std::sync::Arc<Pending>,
    flush_at: Option<Instant>,
}

impl Coalescer {
    pub fn new(pending: std::sync::Arc<Pending>) -> Coalescer {
        Coalescer {
            pending,
            flush_at: None,
        }
    }

    /// The next batch: at most one command per setting, the last that arrived before
    /// the window that the first one opened ended. Cancel-safe: dropped mid-window, the
    /// next call finishes the same window.
    pub async fn next_batch(&mut self) -> Vec<Command> {
        loop {
            if let Some(at) = self.flush_at {
                sleep_until(at).await;
                self.flush_at = None;
                let batch = self.pending.take();
                if !batch.is_empty() {
                    return batch;
                }
            }
            if self.pending.is_empty() {
                // A put between the check and here leaves a permit: no lost wake-up.
                self.pending.notify.notified().await;
            }
            if !self.pending.is_empty() {
                self.flush_at = Some(Instant::now() + COALESCE_WINDOW);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cmd(kind: CommandKind, p: &str) -> Command {
        Command::parse(kind, p.as_bytes()).unwrap()
    }

    #[test]
    fn commands_are_validated_strictly() {
        assert_eq!(
            CommandKind::Brightness.body("40").unwrap(),
            json!({"ratio": 40.0})
        );
        assert_eq!(
            CommandKind::Brightness.body(" 12.5\n").unwrap(),
            json!({"ratio": 12.5})
        );
        for bad in ["abc", "-1", "100.5", "NaN", "inf", "", "40%"] {
            assert!(CommandKind::Brightness.body(bad).is_err(), "{bad}");
        }
        assert_eq!(
            CommandKind::Screen.body("ON").unwrap(),
            json!({"state": "OPEN"})
        );
        assert_eq!(
            CommandKind::Screen.body("off").unwrap(),
            json!({"state": "CLOSE"})
        );
        assert!(CommandKind::Screen.body("1").is_err());
        assert!(CommandKind::Volume.body("101").is_err());
        assert_eq!(CommandKind::from_topic("volume"), Some(CommandKind::Volume));
        assert_eq!(CommandKind::from_topic("reboot"), None);
    }

    #[test]
    fn long_and_binary_payloads_are_refused_and_quoted_short() {
        let long = format!("55{}", " ".repeat(MAX_COMMAND_BYTES));
        let e = Command::parse(CommandKind::Brightness, long.as_bytes()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("258 bytes") && e.contains("256"), "{e}");
        let at_limit = format!("55{}", " ".repeat(MAX_COMMAND_BYTES - 2));
        assert_eq!(
            cmd(CommandKind::Brightness, &at_limit).body,
            json!({"ratio": 55.0})
        );
        assert!(Command::parse(CommandKind::Screen, b"o\xffn").is_err());
        let junk = "x".repeat(200);
        let e = CommandKind::Brightness.body(&junk).unwrap_err().to_string();
        assert!(e.len() < QUOTE_BYTES + 40, "{e}");
        assert_eq!(quote(long.as_bytes()).len(), QUOTE_BYTES);
        assert_eq!(quote(b"40"), "40");
        let wide = "é".repeat(100);
        let q = quote(wide.as_bytes());
        assert!(q.len() <= QUOTE_BYTES && q.chars().all(|c| c == 'é'), "{q}");
        assert!(quote(&[0xff; 300]).len() <= QUOTE_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_value_in_a_window_wins() {
        let pending = Arc::new(Pending::default());
        let mut c = Coalescer::new(pending.clone());
        let t0 = Instant::now();
        for v in 1..=50 {
            pending.put(cmd(CommandKind::Brightness, &v.to_string()));
        }
        pending.put(cmd(CommandKind::Screen, "off"));
        let late = {
            let pending = pending.clone();
            tokio::spawn(async move {
                tokio::time::sleep(COALESCE_WINDOW / 2).await;
                pending.put(cmd(CommandKind::Brightness, "77"));
            })
        };
        let batch = c.next_batch().await;
        assert_eq!(Instant::now() - t0, COALESCE_WINDOW);
        assert_eq!(
            batch,
            vec![
                cmd(CommandKind::Brightness, "77"),
                cmd(CommandKind::Screen, "off")
            ]
        );
        assert_eq!(pending.coalesced(), 50);
        late.await.unwrap();

        // A command after the window opens the next one.
        let t1 = Instant::now();
        let next = {
            let pending = pending.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                pending.put(cmd(CommandKind::Volume, "12"));
            })
        };
        let batch = c.next_batch().await;
        assert_eq!(
            Instant::now() - t1,
            Duration::from_secs(3) + COALESCE_WINDOW
        );
        assert_eq!(batch, vec![cmd(CommandKind::Volume, "12")]);
        next.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_survives_a_cancelled_wait() {
        let pending = Arc::new(Pending::default());
        let mut c = Coalescer::new(pending.clone());
        let t0 = Instant::now();
        pending.put(cmd(CommandKind::Brightness, "10"));
        // Another branch of the loop's select wins half-way through the window.
        let cut = tokio::time::timeout(COALESCE_WINDOW / 2, c.next_batch()).await;
        assert!(cut.is_err());
        pending.put(cmd(CommandKind::Brightness, "20"));
        let batch = c.next_batch().await;
        assert_eq!(Instant::now() - t0, COALESCE_WINDOW, "the same window");
        assert_eq!(batch, vec![cmd(CommandKind::Brightness, "20")]);
    }
}
