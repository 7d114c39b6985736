//! The runner's states as gauges: [`Sources`] reads them (connection,
//! degradation, setup checks, leadership, the status outbox, self-update)
//! into one [`RunnerSampled`] per metrics interval, and
//! [`watch_leadership`] counts every change of leadership as it happens.

use std::sync::Arc;

use runner_core::leader::Leadership;
use runner_core::outbox::Outbox;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::events::{LeadershipChanged, ReadinessProbed, RunnerSampled};
use crate::health::Health;

/// Where the sampled states live.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Readiness, degradation, details.
    pub health: Arc<Health>,
    /// This replica's leadership.
    pub leadership: Arc<Leadership>,
    /// Status delivery (environments by phase, what waits).
    pub outbox: Arc<Outbox>,
}

impl Sources {
    /// Reads every state once and sets its gauge.
    pub fn sample(&self, metrics: &Metrics) {
        let health = &self.health;
        ReadinessProbed {
            ready: health.not_ready().is_empty(),
        }
        .emit(metrics);
        RunnerSampled {
            connected: health.session_up(),
            degraded: !health.degraded().borrow().is_empty(),
            setup_checks_failing: health.has_problem("checks"),
            leading: self.leadership.is_leader(),
            outbox: self.outbox.snapshot(),
            update_state: health.details().borrow().get("update_state").cloned(),
        }
        .emit(metrics);
    }
}

/// Emits [`LeadershipChanged`] for every gain and loss of leadership until
/// `shutdown`; subscribed at once, so no change after this call is missed
/// (leadership already held counts as gained; changes closer together
/// than the task runs may be seen as one).
pub fn watch_leadership(
    leadership: &Leadership,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut changes = leadership.watch();
    let mut leading = changes.borrow_and_update().is_some();
    if leading {
        LeadershipChanged { leading: true }.emit(&metrics);
    }
    async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let now = changes.borrow_and_update().is_some();
            // Announced while leading: a new epoch, or validity that lapsed
            // and came back; either way leadership was lost, then gained.
            if leading {
                LeadershipChanged { leading: false }.emit(&metrics);
            }
            if now {
                LeadershipChanged { leading: true }.emit(&metrics);
            }
            leading = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    /// The exposition's line for `series`, once `metrics` shows `want`.
    async fn until_shown(metrics: &Metrics, want: &str) {
        let shown = async {
            while !metrics.encode().lines().any(|l| l == want) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), shown)
            .await
            .unwrap_or_else(|_| panic!("never shown: {want}\n{}", metrics.encode()));
    }

    #[tokio::test]
    async fn every_gain_and_loss_of_leadership_is_counted() {
        let (leadership, metrics) = (
            Arc::new(Leadership::default()),
            Arc::new(Metrics::default()),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_leadership(&leadership, metrics.clone(), stop.clone()));
        let later = Instant::now() + Duration::from_secs(3600);
        leadership.set(1, later);
        until_shown(
            &metrics,
            "runner_leadership_changes_total{outcome=\"acquired\"} 1",
        )
        .await;
        until_shown(&metrics, "runner_leader 1").await;
        // A new epoch while leading: lost, then gained.
        leadership.set(2, later);
        until_shown(
            &metrics,
            "runner_leadership_changes_total{outcome=\"acquired\"} 2",
        )
        .await;
        until_shown(
            &metrics,
            "runner_leadership_changes_total{outcome=\"lost\"} 1",
        )
        .await;
        leadership.clear();
        until_shown(
            &metrics,
            "runner_leadership_changes_total{outcome=\"lost\"} 2",
        )
        .await;
        until_shown(&metrics, "runner_leader 0").await;
        stop.cancel();
        task.await.expect("the watcher ends");
    }
}
