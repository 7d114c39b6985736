//! Every series the runner exports, registered once under the `runner`
//! prefix; the events of [`super::events`] are what move them. The
//! CloudWatch records of [`super::emf`] are read from the same exposition.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runner_core::controller::ReconcileObserver;
use runner_core::model::Timings;
use runner_core::outbox::Round;
use runner_core::reconcile::{ReconcileError, StartObserver};
use runner_core::scheduler::QueueObserver;

use super::events::{
    QueueDepth, ReconcileFinished, StatusRoundEnded, WatchRequestReceived, WatchStreamReopened,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Outcome {
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Call {
    pub(super) operation: &'static str,
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Operation {
    pub(super) operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PhaseLabel {
    pub(super) phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StateLabel {
    pub(super) state: String,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Every series the runner exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(super) reconciles: Family<Outcome, Counter>,
    pub(super) reconcile_seconds: Histogram,
    pub(super) queue_waiting: Gauge,
    pub(super) queue_running: Gauge,
    pub(super) reconnects: Counter,
    pub(super) status_pending: Gauge,
    pub(super) status_sent: Family<Outcome, Counter>,
    pub(super) compute_calls: Family<Call, Counter>,
    pub(super) compute_seconds: Family<Operation, Histogram>,
    pub(super) requests: Family<Operation, Counter>,
    pub(super) ready: Gauge,
    pub(super) leader: Gauge,
    pub(super) leadership_changes: Family<Outcome, Counter>,
    pub(super) connected: Gauge,
    pub(super) degraded: Gauge,
    pub(super) setup_checks_failing: Gauge,
    pub(super) environments: Family<PhaseLabel, Gauge>,
    pub(super) oldest_starting: Gauge,
    pub(super) status_lag: Gauge,
    pub(super) update_state: Family<StateLabel, Gauge>,
    pub(super) update_failing: Gauge,
    pub(super) store_calls: Family<Call, Counter>,
    pub(super) aws_throttled: Family<Operation, Counter>,
    pub(super) start_seconds: Family<Span, Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Span {
    pub(super) span: &'static str,
}

/// Environment starts take seconds to many minutes: 1 s to about 1 h.
fn start_seconds() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("runner");
        let reconciles = Family::<Outcome, Counter>::default();
        registry.register("reconciles", "Reconciles by outcome", reconciles.clone());
        let reconcile_seconds = seconds();
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_seconds.clone(),
        );
        let queue_waiting = Gauge::default();
        registry.register(
            "queue_waiting",
            "Environments waiting in the work queue",
            queue_waiting.clone(),
        );
        let queue_running = Gauge::default();
        registry.register(
            "queue_running",
            "Environments being reconciled",
            queue_running.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "control_plane_reconnects",
            "Watch stream reconnects",
            reconnects.clone(),
        );
        let status_pending = Gauge::default();
        registry.register(
            "status_updates_pending",
            "Statuses not yet delivered",
            status_pending.clone(),
        );
        let status_sent = Family::<Outcome, Counter>::default();
        registry.register(
            "status_updates",
            "Status deliveries by outcome",
            status_sent.clone(),
        );
        let compute_calls = Family::<Call, Counter>::default();
        registry.register(
            "compute_calls",
            "Compute calls by operation and outcome",
            compute_calls.clone(),
        );
        let compute_seconds =
            Family::<Operation, Histogram>::new_with_constructor(seconds as fn() -> Histogram);
        registry.register(
            "compute_call_duration_seconds",
            "Duration of compute calls",
            compute_seconds.clone(),
        );
        let requests = Family::<Operation, Counter>::default();
        registry.register(
            "control_plane_requests",
            "Requests received on the watch stream by kind",
            requests.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when /readyz answers ready", ready.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let leadership_changes = Family::<Outcome, Counter>::default();
        registry.register(
            "leadership_changes",
            "Leadership gained (acquired) or lost (lost) by this replica",
            leadership_changes.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the control-plane session works",
            connected.clone(),
        );
        let degraded = Gauge::default();
        registry.register(
            "degraded",
            "1 while the runner reports itself DEGRADED",
            degraded.clone(),
        );
        let setup_checks_failing = Gauge::default();
        registry.register(
            "setup_checks_failing",
            "Setup checks failing at the last run",
            setup_checks_failing.clone(),
        );
        let environments = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "environments",
            "Environments by the phase last reported (by the leader)",
            environments.clone(),
        );
        let oldest_starting = Gauge::default();
        registry.register(
            "environment_oldest_starting_seconds",
            "How long the environment longest in creating or starting has been there",
            oldest_starting.clone(),
        );
        let status_lag = Gauge::default();
        registry.register(
            "status_delivery_lag_seconds",
            "How long the oldest undelivered status has waited",
            status_lag.clone(),
        );
        let update_state = Family::<StateLabel, Gauge>::default();
        registry.register(
            "self_update_state",
            "1 for the current self-update state",
            update_state.clone(),
        );
        let update_failing = Gauge::default();
        registry.register(
            "self_update_failing",
            "1 while self-update is held back, refused, failed or in error",
            update_failing.clone(),
        );
        let store_calls = Family::<Call, Counter>::default();
        registry.register(
            "store_calls",
            "State store calls by operation and outcome",
            store_calls.clone(),
        );
        let aws_throttled = Family::<Operation, Counter>::default();
        registry.register(
            "aws_throttled",
            "AWS calls still throttled after the retries, by operation",
            aws_throttled.clone(),
        );
        let start_seconds =
            Family::<Span, Histogram>::new_with_constructor(start_seconds as fn() -> Histogram);
        registry.register(
            "environment_start_seconds",
            "Environment starts that ended ready, by span: launch_to_running, running_to_ready, launch_to_ready",
            start_seconds.clone(),
        );
        Self {
            start_seconds,
            registry,
            reconciles,
            reconcile_seconds,
            queue_waiting,
            queue_running,
            reconnects,
            status_pending,
            status_sent,
            compute_calls,
            compute_seconds,
            requests,
            ready,
            leader,
            leadership_changes,
            connected,
            degraded,
            setup_checks_failing,
            environments,
            oldest_starting,
            status_lag,
            update_state,
            update_failing,
            store_calls,
            aws_throttled,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Emits [`WatchStreamReopened`] (the session's call).
    pub fn reconnected(&self) {
        WatchStreamReopened.emit(self);
    }

    /// Emits [`WatchRequestReceived`] (the session's call).
    pub fn request(&self, kind: &'static str) {
        WatchRequestReceived { kind }.emit(self);
    }

    /// Emits [`StatusRoundEnded`] (the status outbox's callback).
    pub fn status_round(&self, round: Round, pending: usize) {
        StatusRoundEnded { round, pending }.emit(self);
    }
}

/// A count as a gauge's value.
pub(super) fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl ReconcileObserver for Metrics {
    fn reconciled(&self, took: Duration, error: Option<&ReconcileError>) {
        ReconcileFinished { took, error }.emit(self);
    }
}

impl StartObserver for Metrics {
    fn content_ready(&self, timings: &Timings) {
        for (span, took) in [
            ("launch_to_running", timings.launch_to_running),
            ("running_to_ready", timings.running_to_ready),
            ("launch_to_ready", timings.launch_to_ready),
        ] {
            if let Some(took) = took {
                self.start_seconds
                    .get_or_create(&Span { span })
                    .observe(took.as_secs_f64());
            }
        }
    }
}

impl QueueObserver for Metrics {
    fn depth(&self, waiting: usize, running: usize) {
        QueueDepth { waiting, running }.emit(self);
    }
}
