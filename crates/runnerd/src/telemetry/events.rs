//! Typed telemetry events, as vector's `internal_events`: one struct per
//! occurrence the runner counts, whose `emit` moves its series and, when the
//! occurrence has one, writes its log line. Series names and labels are the
//! README's list; log messages and field names are what operators query in
//! CloudWatch Logs Insights. Occurrences logged elsewhere (leadership,
//! launches, self-update, setup checks) log where they happen; their series
//! move here ([`LeadershipChanged`], and [`RunnerSampled`] for states read
//! once per metrics interval).

use std::time::Duration;

use runner_core::error::chain;
use runner_core::model::Phase;
use runner_core::outbox::{Round, Snapshot};
use runner_core::reconcile::ReconcileError;
use runner_core::traits::{ComputeError, StoreError};

use super::metrics::{Call, Metrics, Operation, Outcome, PhaseLabel, StateLabel, gauge_value};

/// A reconcile ended, inside its `reconcile` span (which carries `env.id`):
/// `runner_reconciles_total{outcome}` (`ok` or the error's metric label) and
/// `runner_reconcile_duration_seconds`; a failure is logged as `"reconcile
/// failed"` with `error` (the whole chain) and `retryable`.
#[derive(Debug)]
pub struct ReconcileFinished<'a> {
    /// How long it took.
    pub took: Duration,
    /// Why it failed; `None`: it succeeded.
    pub error: Option<&'a ReconcileError>,
}

impl ReconcileFinished<'_> {
    /// Logs a failure, counts and times.
    pub fn emit(self, metrics: &Metrics) {
        let outcome = match self.error {
            None => "ok",
            Some(err) => {
                tracing::warn!(error = %chain(err), retryable = err.is_retryable(), "reconcile failed");
                err.metric_label()
            }
        };
        metrics.reconciles.get_or_create(&Outcome { outcome }).inc();
        metrics.reconcile_seconds.observe(self.took.as_secs_f64());
    }
}

/// The work queue's depth changed: `runner_queue_waiting` and
/// `runner_queue_running`.
#[derive(Debug, Clone, Copy)]
pub struct QueueDepth {
    /// Environments waiting for a worker.
    pub waiting: usize,
    /// Environments being reconciled.
    pub running: usize,
}

impl QueueDepth {
    /// Sets the gauges.
    pub fn emit(self, metrics: &Metrics) {
        metrics.queue_waiting.set(gauge_value(self.waiting));
        metrics.queue_running.set(gauge_value(self.running));
    }
}

/// A compute call returned: `runner_compute_calls_total{operation,outcome}`
/// and `runner_compute_call_duration_seconds{operation}`. An `Unavailable`
/// error that EC2 throttled (`RequestLimitExceeded`, `Throttling...`) is
/// `throttled`, and counted in `runner_aws_throttled_total{operation}` too.
/// Not logged here: the caller logs a failure with what it was doing.
#[derive(Debug)]
pub struct ComputeCallFinished<'a> {
    /// The `Compute` method (`launch`, `observe`, ...).
    pub operation: &'static str,
    /// Why it failed; `None`: it succeeded.
    pub error: Option<&'a ComputeError>,
    /// How long it took.
    pub took: Duration,
}

impl ComputeCallFinished<'_> {
    /// Counts and times.
    pub fn emit(self, metrics: &Metrics) {
        let outcome = match self.error {
            None => "ok",
            Some(ComputeError::NoCapacity { .. }) => "no_capacity",
            Some(ComputeError::Rejected(_)) => "rejected",
            Some(err @ ComputeError::Unavailable(_)) if throttled(err) => "throttled",
            Some(ComputeError::Unavailable(_)) => "unavailable",
            Some(ComputeError::Fenced) => "fenced",
        };
        let operation = self.operation;
        metrics
            .compute_calls
            .get_or_create(&Call { operation, outcome })
            .inc();
        if outcome == "throttled" {
            metrics
                .aws_throttled
                .get_or_create(&Operation { operation })
                .inc();
        }
        metrics
            .compute_seconds
            .get_or_create(&Operation { operation })
            .observe(self.took.as_secs_f64());
    }
}

/// Whether `err` says the service throttled the call (its error code in
/// the chain, as the README's Logs Insights query looks for it: EC2's
/// `RequestLimitExceeded`, DynamoDB's `ThrottlingException` and
/// `ProvisionedThroughputExceededException`, ...).
fn throttled(err: &dyn std::error::Error) -> bool {
    let text = chain(err);
    [
        "RequestLimitExceeded",
        "Throttl",
        "ProvisionedThroughputExceeded",
        "TooManyRequests",
        "SlowDown",
    ]
    .iter()
    .any(|code| text.contains(code))
}

/// A state store call returned: `runner_store_calls_total{operation,outcome}`
/// (`ok`, `conflict`, `fenced`, `throttled`, `unavailable`); a throttled
/// one is counted in `runner_aws_throttled_total{operation}` too. Not
/// logged here: the caller logs a failure with what it was doing.
#[derive(Debug)]
pub struct StoreCallFinished<'a> {
    /// The `StateStore` method, as `store_put`.
    pub operation: &'static str,
    /// Why it failed; `None`: it succeeded.
    pub error: Option<&'a StoreError>,
}

impl StoreCallFinished<'_> {
    /// Counts.
    pub fn emit(self, metrics: &Metrics) {
        let outcome = match self.error {
            None => "ok",
            Some(StoreError::Conflict(_)) => "conflict",
            Some(StoreError::Fenced) => "fenced",
            Some(err @ StoreError::Unavailable(_)) if throttled(err) => "throttled",
            Some(StoreError::Unavailable(_)) => "unavailable",
        };
        let operation = self.operation;
        metrics
            .store_calls
            .get_or_create(&Call { operation, outcome })
            .inc();
        if outcome == "throttled" {
            metrics
                .aws_throttled
                .get_or_create(&Operation { operation })
                .inc();
        }
    }
}

/// A status delivery round ended: `runner_status_updates_total{outcome}`
/// (`delivered`, `retrying`, `rejected`) and `runner_status_updates_pending`.
/// Each rejected or failed status is logged by the outbox, with its
/// environment.
#[derive(Debug, Clone, Copy)]
pub struct StatusRoundEnded {
    /// What the round did.
    pub round: Round,
    /// Statuses still to deliver.
    pub pending: usize,
}

impl StatusRoundEnded {
    /// Counts and sets the gauge.
    pub fn emit(self, metrics: &Metrics) {
        for (outcome, count) in [
            ("delivered", self.round.delivered),
            ("retrying", self.round.retrying),
            ("rejected", self.round.rejected),
        ] {
            metrics
                .status_sent
                .get_or_create(&Outcome { outcome })
                .inc_by(count as u64);
        }
        metrics.status_pending.set(gauge_value(self.pending));
    }
}

/// The watch stream was opened again, after a failure or its maximum age:
/// `runner_control_plane_reconnects_total`. The session logs `"watch stream
/// open"` itself.
#[derive(Debug, Clone, Copy)]
pub struct WatchStreamReopened;

impl WatchStreamReopened {
    /// Counts.
    pub fn emit(self, metrics: &Metrics) {
        metrics.reconnects.inc();
    }
}

/// A request arrived on the watch stream:
/// `runner_control_plane_requests_total{operation}`, by kind (`unknown` for
/// one without a kind).
#[derive(Debug, Clone, Copy)]
pub struct WatchRequestReceived {
    /// The request's kind.
    pub kind: &'static str,
}

impl WatchRequestReceived {
    /// Counts.
    pub fn emit(self, metrics: &Metrics) {
        metrics
            .requests
            .get_or_create(&Operation {
                operation: self.kind,
            })
            .inc();
    }
}

/// `/readyz` answered: `runner_ready` (1 when ready). Not logged: the
/// reasons are in the answer, and probes come every few seconds.
#[derive(Debug, Clone, Copy)]
pub struct ReadinessProbed {
    /// Whether it answered ready.
    pub ready: bool,
}

impl ReadinessProbed {
    /// Sets the gauge.
    pub fn emit(self, metrics: &Metrics) {
        metrics.ready.set(i64::from(self.ready));
    }
}

/// This replica gained or lost leadership: `runner_leader` and
/// `runner_leadership_changes_total{outcome}` (`acquired`, `lost`). The
/// lease logs the change itself.
#[derive(Debug, Clone, Copy)]
pub struct LeadershipChanged {
    /// Whether it leads now.
    pub leading: bool,
}

impl LeadershipChanged {
    /// Counts and sets the gauge.
    pub fn emit(self, metrics: &Metrics) {
        let outcome = if self.leading { "acquired" } else { "lost" };
        metrics
            .leadership_changes
            .get_or_create(&Outcome { outcome })
            .inc();
        metrics.leader.set(i64::from(self.leading));
    }
}

/// The states the runner holds, read once per metrics interval: connection,
/// degradation, setup checks, leadership, environments by phase, how long
/// the oldest status and the oldest start have waited, self-update. Sets
/// gauges only; each change is logged where it happens.
#[derive(Debug, Clone)]
pub struct RunnerSampled {
    /// The control-plane session works.
    pub connected: bool,
    /// The runner reports itself DEGRADED.
    pub degraded: bool,
    /// Setup checks fail.
    pub setup_checks_failing: bool,
    /// This replica leads.
    pub leading: bool,
    /// What the status outbox holds (empty on a standby).
    pub outbox: Snapshot,
    /// The self-update state, when self-update reported one.
    pub update_state: Option<String>,
}

/// Every phase, by its name in metrics.
pub const PHASES: [(Phase, &str); 7] = [
    (Phase::Creating, "creating"),
    (Phase::Starting, "starting"),
    (Phase::Running, "running"),
    (Phase::Stopping, "stopping"),
    (Phase::Stopped, "stopped"),
    (Phase::Deleting, "deleting"),
    (Phase::Deleted, "deleted"),
];

/// Self-update states that need an operator.
const UPDATE_FAILING: [&str; 4] = ["held_back", "refused", "failed", "error"];

impl RunnerSampled {
    /// Sets the gauges.
    pub fn emit(self, metrics: &Metrics) {
        metrics.connected.set(i64::from(self.connected));
        metrics.degraded.set(i64::from(self.degraded));
        metrics
            .setup_checks_failing
            .set(i64::from(self.setup_checks_failing));
        metrics.leader.set(i64::from(self.leading));
        for (phase, name) in PHASES {
            let count = self.outbox.phases.get(&phase).copied().unwrap_or(0);
            metrics
                .environments
                .get_or_create(&PhaseLabel { phase: name })
                .set(gauge_value(count));
        }
        let seconds = |wait: Option<Duration>| {
            i64::try_from(wait.unwrap_or_default().as_secs()).unwrap_or(i64::MAX)
        };
        metrics
            .oldest_starting
            .set(seconds(self.outbox.oldest_starting));
        metrics.status_lag.set(seconds(self.outbox.oldest_pending));
        metrics.status_pending.set(gauge_value(self.outbox.pending));
        if let Some(state) = self.update_state {
            let failing = UPDATE_FAILING.contains(&state.as_str());
            metrics.update_failing.set(i64::from(failing));
            // One series: the current state.
            metrics.update_state.clear();
            metrics
                .update_state
                .get_or_create(&StateLabel { state })
                .set(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use runner_core::traits::StoreError;

    use super::*;

    /// The exposition's lines that start with `series`, sorted (a family's
    /// label sets come in no set order).
    fn lines(metrics: &Metrics, series: &str) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(series))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    /// What `emit` logs, as the daemon's JSON lines.
    fn logged(emit: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer({
                let buffer = buffer.clone();
                move || buffer.clone()
            })
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_finished_reconcile_is_counted_by_outcome_timed_and_a_failure_logged() {
        let metrics = Metrics::default();
        let log = logged(|| {
            ReconcileFinished {
                took: Duration::from_millis(20),
                error: None,
            }
            .emit(&metrics);
        });
        assert_eq!(log, "", "a success is not logged");
        let fenced = ReconcileError::Store(StoreError::Fenced);
        let log = logged(|| {
            ReconcileFinished {
                took: Duration::from_millis(20),
                error: Some(&fenced),
            }
            .emit(&metrics);
        });
        assert_eq!(
            lines(&metrics, "runner_reconciles_total"),
            [
                "runner_reconciles_total{outcome=\"fenced\"} 1",
                "runner_reconciles_total{outcome=\"ok\"} 1",
            ]
        );
        assert!(
            lines(&metrics, "runner_reconcile_duration_seconds_count")
                .contains(&"runner_reconcile_duration_seconds_count 2".to_owned())
        );
        let line: serde_json::Value = serde_json::from_str(log.trim()).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "reconcile failed");
        assert_eq!(line["error"], "state store: this replica lost its lease");
        assert_eq!(line["retryable"], false);
    }

    #[test]
    fn the_queue_depth_sets_both_gauges() {
        let metrics = Metrics::default();
        QueueDepth {
            waiting: 7,
            running: 3,
        }
        .emit(&metrics);
        assert_eq!(
            lines(&metrics, "runner_queue_waiting "),
            ["runner_queue_waiting 7"]
        );
        assert_eq!(
            lines(&metrics, "runner_queue_running "),
            ["runner_queue_running 3"]
        );
    }

    #[test]
    fn a_compute_call_is_counted_by_operation_and_outcome_and_timed() {
        let metrics = Metrics::default();
        let capacity = ComputeError::NoCapacity {
            zone: "eu-west-1a".into(),
            message: "none left".into(),
        };
        for error in [None, Some(&capacity), Some(&ComputeError::Fenced)] {
            ComputeCallFinished {
                operation: "launch",
                error,
                took: Duration::from_millis(5),
            }
            .emit(&metrics);
        }
        assert_eq!(
            lines(&metrics, "runner_compute_calls_total"),
            [
                "runner_compute_calls_total{operation=\"launch\",outcome=\"fenced\"} 1",
                "runner_compute_calls_total{operation=\"launch\",outcome=\"no_capacity\"} 1",
                "runner_compute_calls_total{operation=\"launch\",outcome=\"ok\"} 1",
            ]
        );
        assert_eq!(
            lines(&metrics, "runner_compute_call_duration_seconds_count"),
            ["runner_compute_call_duration_seconds_count{operation=\"launch\"} 3"]
        );
    }

    #[test]
    fn a_status_round_counts_each_outcome_and_sets_what_is_pending() {
        let metrics = Metrics::default();
        StatusRoundEnded {
            round: Round {
                delivered: 4,
                retrying: 2,
                rejected: 1,
            },
            pending: 2,
        }
        .emit(&metrics);
        assert_eq!(
            lines(&metrics, "runner_status_updates_total"),
            [
                "runner_status_updates_total{outcome=\"delivered\"} 4",
                "runner_status_updates_total{outcome=\"rejected\"} 1",
                "runner_status_updates_total{outcome=\"retrying\"} 2",
            ]
        );
        assert_eq!(
            lines(&metrics, "runner_status_updates_pending "),
            ["runner_status_updates_pending 2"]
        );
    }

    #[test]
    fn the_watch_stream_counts_reconnects_and_requests_by_kind() {
        let metrics = Metrics::default();
        WatchStreamReopened.emit(&metrics);
        WatchStreamReopened.emit(&metrics);
        WatchRequestReceived {
            kind: "environment_changed",
        }
        .emit(&metrics);
        assert_eq!(
            lines(&metrics, "runner_control_plane_reconnects_total"),
            ["runner_control_plane_reconnects_total 2"]
        );
        assert_eq!(
            lines(&metrics, "runner_control_plane_requests_total"),
            ["runner_control_plane_requests_total{operation=\"environment_changed\"} 1"]
        );
    }

    #[test]
    fn a_readiness_probe_sets_the_ready_gauge() {
        let metrics = Metrics::default();
        ReadinessProbed { ready: true }.emit(&metrics);
        assert_eq!(lines(&metrics, "runner_ready "), ["runner_ready 1"]);
        ReadinessProbed { ready: false }.emit(&metrics);
        assert_eq!(lines(&metrics, "runner_ready "), ["runner_ready 0"]);
    }
}
