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
/// `shutdown`.
pub async fn watch_leadership(
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = leadership.watch();
    let mut leading = changes.borrow_and_update().is_some();
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
