//! How the daemon stops: it waits for shutdown or for a critical task's
//! death, then stops in order. After shutdown, in-flight reconciles drain
//! within the grace period, the calls in flight are answered, the status
//! outbox makes a last delivery, and the lease is released last (a status is
//! only ever sent while leading). After a death nothing drains: what was in
//! flight is safe to cut (intent before side effect), and the lease expires
//! by itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control_plane::Calls;
use crate::error::AppError;
use crate::health::Health;
use crate::supervisor::{Fatal, Supervisor};

/// What a graceful stop waits for, in order.
#[derive(Debug)]
pub struct Stages {
    /// Cancelled when the scheduler has ended.
    pub scheduler_done: CancellationToken,
    /// In-flight reconciles' grace period.
    pub grace: Duration,
    /// The calls being answered.
    pub calls: Arc<Calls>,
    /// Stops the status outbox, after its last delivery.
    pub outbox_stop: CancellationToken,
    /// Cancelled when the outbox has ended.
    pub outbox_done: CancellationToken,
    /// Releases the lease.
    pub lease_stop: CancellationToken,
}

/// Waits for `shutdown` (Ok) or a critical task's end (Err, and shutdown
/// is cancelled), then stops the `stages` in order.
pub async fn run_until_stopped(
    shutdown: &CancellationToken,
    mut failures: mpsc::UnboundedReceiver<Fatal>,
    health: &Health,
    supervisor: &Supervisor,
    stages: Stages,
) -> Result<(), AppError> {
    let result = tokio::select! {
        () = shutdown.cancelled() => {
            health.set_stopping();
            tracing::info!("shutting down: no new work, draining in-flight reconciles");
            Ok(())
        }
        Some(Fatal { task, reason }) = failures.recv() => {
            tracing::error!(task, reason = %reason, "critical task ended; stopping");
            shutdown.cancel();
            Err(AppError::TaskEnded { task, reason })
        }
    };
    let linger = if result.is_ok() {
        let within = stages.grace + Duration::from_secs(5);
        let _ = tokio::time::timeout(within, stages.scheduler_done.cancelled()).await;
        stages.calls.drain(Duration::from_secs(2)).await;
        stages.outbox_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), stages.outbox_done.cancelled()).await;
        Duration::from_secs(2)
    } else {
        Duration::from_millis(200)
    };
    stages.lease_stop.cancel();
    supervisor.wait(linger).await;
    tracing::info!("stopped");
    result
}
