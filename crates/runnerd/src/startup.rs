//! The daemon's first steps: the health port, opened before anything else
//! so that ECS sees the process alive while it starts, and the start steps
//! repeated until they succeed (the placement check, loading the records),
//! each failure logged and shown as the degraded problem `setup`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runner_core::retry::{Policy, retry};
use tokio_util::sync::CancellationToken;

use crate::health::{self, Health, chain};
use crate::telemetry::Metrics;

/// Where the health port listens, once bound (for tests that bind port 0).
pub type BoundAddr = tokio::sync::oneshot::Sender<SocketAddr>;

/// Binds the health port on `addr` (telling `bound` where) and returns the
/// task that serves it until `shutdown`.
pub async fn health_port(
    addr: SocketAddr,
    bound: Option<BoundAddr>,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let listener = health::bind(addr).await?;
    if let Some(bound) = bound {
        let _ = bound.send(listener.local_addr()?);
    }
    let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
    Ok(async move {
        if let Err(err) = health::serve(listener, health, metrics, shutdown).await {
            tracing::error!(error = %err, "health port failed");
        }
    })
}

/// From 0.5 s, doubling, up to 30 s, full jitter.
const RETRY: Policy =
    Policy::new(Duration::from_millis(500), Duration::from_secs(30)).full_jitter();

/// Runs the start step `what` until it succeeds; `None` when shutdown came
/// first.
pub async fn until_done<T, E, Fut>(
    what: &str,
    health: &Health,
    shutdown: &CancellationToken,
    attempt: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::error::Error,
    Fut: Future<Output = Result<T, E>>,
{
    let failed = |err: &E, _| {
        let problem = chain(err);
        tracing::warn!(error = %problem, "{what} failed; retrying");
        health.set_problem("setup", Some(format!("{what}: {problem}")));
    };
    let value = retry(RETRY, shutdown, |_| true, failed, attempt)
        .await
        .ok()?;
    health.set_problem("setup", None);
    Some(value)
}

/// Runs `task` on a thread with a runtime of its own (the leader lease), so
/// that no burst of other work on the main runtime delays it. Returns when
/// the task does; a task that cannot start, or panics, returns at once,
/// which the supervisor treats as any critical task ending.
pub async fn on_own_thread<F>(name: &str, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(task),
                Err(err) => tracing::error!(error = %err, "cannot start a runtime"),
            }
            let _ = done.send(());
        });
    if let Err(err) = thread {
        tracing::error!(error = %err, thread = name, "cannot start a thread");
        return;
    }
    // A panic on the thread drops `done`: this returns as well.
    let _ = finished.await;
}
