//! The one supervisor of the daemon's long-lived tasks: a task that ends
//! before shutdown, by returning or panicking, is fatal. Readiness goes red
//! at once, and the daemon stops with an error naming the task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::health::Health;

/// A critical task that ended before shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    /// The task's name.
    pub task: &'static str,
    /// `returned`, `panicked`, or why it was cancelled.
    pub reason: String,
}

/// Spawns and watches the critical tasks.
#[derive(Debug, Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    health: Arc<Health>,
    fatal: mpsc::UnboundedSender<Fatal>,
}

impl Supervisor {
    /// A supervisor whose tasks may end once `shutdown` is cancelled; the
    /// receiver hears of every task that ends before.
    pub fn new(
        shutdown: CancellationToken,
        health: Arc<Health>,
    ) -> (Self, mpsc::UnboundedReceiver<Fatal>) {
        let (fatal, failures) = mpsc::unbounded_channel();
        (
            Self {
                tracker: TaskTracker::new(),
                shutdown,
                health,
                fatal,
            },
            failures,
        )
    }

    /// Runs `task` as critical, named `name` in logs and in the failure.
    pub fn spawn_critical(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        #[cfg(debug_assertions)]
        let task = injected_death(name, task);
        let handle = tokio::spawn(task.instrument(tracing::info_span!("task", name)));
        let (shutdown, health, fatal) = (
            self.shutdown.clone(),
            self.health.clone(),
            self.fatal.clone(),
        );
        self.tracker.spawn(async move {
            let reason = match handle.await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => "returned".to_owned(),
                Err(err) if err.is_panic() => "panicked".to_owned(),
                Err(err) => err.to_string(),
            };
            health.set_stopping();
            let _ = fatal.send(Fatal { task: name, reason });
        });
    }

    /// [`Supervisor::spawn_critical`], and a token cancelled once the task
    /// has ended (returned, panicked or aborted), for an ordered shutdown.
    pub fn spawn_critical_done(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> CancellationToken {
        let done = CancellationToken::new();
        let guard = done.clone().drop_guard();
        self.spawn_critical(name, async move {
            let _done = guard;
            task.await;
        });
        done
    }

    /// Runs `task`, tracked but not critical: it may end when its work is
    /// done (the setup checks, once they pass).
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker
            .spawn(task.instrument(tracing::info_span!("task", name)));
    }

    /// Waits at most `within` for every task to end (after shutdown).
    pub async fn wait(&self, within: Duration) {
        self.tracker.close();
        let _ = tokio::time::timeout(within, self.tracker.wait()).await;
    }
}

/// Test builds only: `RUNNERD_TEST_TASK_DEATH=<task>:<panic|return>:<file>`
/// makes that critical task panic or return once `<file>` exists, so the
/// tests can watch the daemon stop. Release builds have no such hook.
#[cfg(debug_assertions)]
fn injected_death(
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    let spec = std::env::var("RUNNERD_TEST_TASK_DEATH").unwrap_or_default();
    let mut parts = spec.splitn(3, ':');
    let (Some(task_name), Some(how), Some(trigger)) = (parts.next(), parts.next(), parts.next())
    else {
        return Box::pin(task);
    };
    if task_name != name {
        return Box::pin(task);
    }
    let panics = how == "panic";
    let trigger = std::path::PathBuf::from(trigger);
    Box::pin(async move {
        tokio::select! {
            () = task => {}
            () = async {
                while !trigger.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => {
                assert!(!panics, "task death injected by a test");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_before_shutdown_is_fatal_and_unready() {
        for (name, dies) in [("panics", true), ("returns", false)] {
            let shutdown = CancellationToken::new();
            let leadership = Arc::new(runner_core::leader::Leadership::always());
            let health = Arc::new(Health::default().with_leadership(leadership));
            health.set_session(true);
            assert!(health.not_ready().is_empty());
            let (supervisor, mut failures) = Supervisor::new(shutdown.clone(), health.clone());
            supervisor.spawn_critical("steady", std::future::pending());
            supervisor.spawn_critical(name, async move {
                tokio::task::yield_now().await;
                assert!(!dies, "this task dies");
            });
            let fatal = tokio::time::timeout(Duration::from_secs(1), failures.recv())
                .await
                .expect("reported within a second")
                .expect("a failure");
            assert_eq!(fatal.task, name);
            assert_eq!(fatal.reason, if dies { "panicked" } else { "returned" });
            assert_eq!(health.not_ready(), ["stopping"], "never ready again");
            shutdown.cancel();
        }
    }

    #[tokio::test]
    async fn tasks_that_end_after_shutdown_are_not_failures() {
        let shutdown = CancellationToken::new();
        let health = Arc::new(Health::default());
        let (supervisor, mut failures) = Supervisor::new(shutdown.clone(), health.clone());
        let stop = shutdown.clone();
        supervisor.spawn_critical("worker", async move { stop.cancelled().await });
        shutdown.cancel();
        supervisor.wait(Duration::from_secs(1)).await;
        drop(supervisor);
        assert_eq!(failures.recv().await, None, "nothing reported");
        assert!(!health.not_ready().contains(&"stopping"));
    }
}
