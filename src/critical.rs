//! Long-lived tasks that must not end on their own. Each runs until its stop token
//! fires; if one returns before that, or panics, the bridge is told why (and the
//! daemon exits 70 so the service manager restarts it: the outbox makes that safe).

use std::future::Future;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How much of a panic's message is reported.
const MAX_REASON: usize = 300;

/// How a critical task failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskFailure {
    #[error("{task} ended unexpectedly")]
    Ended { task: String },
    /// With at most [`MAX_REASON`] bytes of the panic's message.
    #[error("{task} panicked: {message}")]
    Panicked { task: String, message: String },
}

/// Hands out critical tasks; the receiving end is [`Failures`].
#[derive(Clone, Debug)]
pub struct Critical {
    // Unbounded, but every task sends at most once.
    tx: mpsc::UnboundedSender<TaskFailure>,
}

/// Why critical tasks failed, in the order they did.
#[derive(Debug)]
pub struct Failures {
    rx: mpsc::UnboundedReceiver<TaskFailure>,
}

impl Failures {
    /// The first failure (pending for as long as none happens).
    pub async fn next(&mut self) -> TaskFailure {
        match self.rx.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

pub fn channel() -> (Critical, Failures) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Critical { tx }, Failures { rx })
}

impl Critical {
    /// Run `task` on `tracker`; it is expected to return only once `stop` fired.
    pub fn spawn<F>(&self, tracker: &TaskTracker, name: &str, stop: &CancellationToken, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let inner = tokio::spawn(task);
        let (name, stop, tx) = (name.to_string(), stop.clone(), self.tx.clone());
        tracker.spawn(async move {
            let why = match inner.await {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => TaskFailure::Ended { task: name },
                Err(e) if e.is_panic() => TaskFailure::Panicked {
                    task: name,
                    message: panic_text(e.into_panic()),
                },
                Err(_) => return,
            };
            tracing::error!("{why}");
            let _ = tx.send(why);
        });
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    let mut end = text.len().min(MAX_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_or_panics_is_reported_and_a_stopped_one_is_not() {
        let (critical, mut failures) = channel();
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        critical.spawn(&tracker, "early", &stop, async {});
        assert_eq!(
            failures.next().await.to_string(),
            "early ended unexpectedly"
        );
        critical.spawn(&tracker, "boom", &stop, async {
            panic!("{}", "x".repeat(1000));
        });
        let why = failures.next().await.to_string();
        assert!(why.starts_with("boom panicked: xxx"), "{why}");
        assert!(why.len() < MAX_REASON + 40);
        let s = stop.clone();
        critical.spawn(
            &tracker,
            "polite",
            &stop,
            async move { s.cancelled().await },
        );
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(
            failures.rx.try_recv().is_err(),
            "a stopped task is no failure"
        );
    }
}
