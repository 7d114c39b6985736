//! Logs and metrics. Logs are `tracing` events (JSON for CloudWatch); metrics
//! are Prometheus series with low-cardinality labels. Notable occurrences are
//! typed: one method per occurrence writes its log line and bumps its series
//! together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runner_core::controller::ReconcileObserver;
use runner_core::model::{EnvironmentId, Instance, Subnet};
use runner_core::outbox::Round;
use runner_core::scheduler::QueueObserver;
use runner_core::traits::{Compute, ComputeError, LaunchRequest};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: JSON or text on standard output.
pub fn init_logs(format: LogFormat, filter: &str) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    operation: &'static str,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Every series the runner exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Outcome, Counter>,
    reconcile_seconds: Histogram,
    queue_waiting: Gauge,
    queue_running: Gauge,
    reconnects: Counter,
    status_pending: Gauge,
    status_sent: Family<Outcome, Counter>,
    compute_calls: Family<Call, Counter>,
    compute_seconds: Family<Operation, Histogram>,
    requests: Family<Operation, Counter>,
    ready: Gauge,
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
        Self {
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

    /// The watch stream was reopened after a failure or its maximum age.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// A request arrived on the watch stream.
    pub fn request(&self, kind: &'static str) {
        self.requests
            .get_or_create(&Operation { operation: kind })
            .inc();
    }

    /// A status delivery round ended.
    pub fn status_round(&self, round: Round, pending: usize) {
        self.status_sent
            .get_or_create(&Outcome {
                outcome: "delivered",
            })
            .inc_by(round.delivered as u64);
        self.status_sent
            .get_or_create(&Outcome {
                outcome: "retrying",
            })
            .inc_by(round.retrying as u64);
        self.status_sent
            .get_or_create(&Outcome {
                outcome: "rejected",
            })
            .inc_by(round.rejected as u64);
        self.status_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Readiness changed.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    fn compute_call(&self, operation: &'static str, outcome: &'static str, took: Duration) {
        self.compute_calls
            .get_or_create(&Call { operation, outcome })
            .inc();
        self.compute_seconds
            .get_or_create(&Operation { operation })
            .observe(took.as_secs_f64());
    }
}

impl ReconcileObserver for Metrics {
    fn reconciled(&self, outcome: &'static str, took: Duration) {
        self.reconciles.get_or_create(&Outcome { outcome }).inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }
}

impl QueueObserver for Metrics {
    fn depth(&self, waiting: usize, running: usize) {
        self.queue_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.queue_running
            .set(i64::try_from(running).unwrap_or(i64::MAX));
    }
}

/// A `Compute` that counts and times every call.
pub struct InstrumentedCompute {
    inner: Arc<dyn Compute>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for InstrumentedCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedCompute")
            .finish_non_exhaustive()
    }
}

impl InstrumentedCompute {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Compute>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

fn outcome<T>(result: &Result<T, ComputeError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(ComputeError::NoCapacity { .. }) => "no_capacity",
        Err(ComputeError::Rejected(_)) => "rejected",
        Err(ComputeError::Unavailable(_)) => "unavailable",
        Err(ComputeError::Fenced) => "fenced",
    }
}

impl InstrumentedCompute {
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, ComputeError>>,
    ) -> Result<T, ComputeError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .compute_call(operation, outcome(&result), started.elapsed());
        result
    }
}

#[async_trait]
impl Compute for InstrumentedCompute {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, ComputeError> {
        self.timed("launch", self.inner.launch(request)).await
    }

    async fn find_launch(
        &self,
        environment: EnvironmentId,
        attempt: u32,
    ) -> Result<Option<Instance>, ComputeError> {
        self.timed("find_launch", self.inner.find_launch(environment, attempt))
            .await
    }

    async fn observe(&self) -> Result<Vec<Instance>, ComputeError> {
        self.timed("observe", self.inner.observe()).await
    }

    async fn observe_ids(&self, instance_ids: &[String]) -> Result<Vec<Instance>, ComputeError> {
        self.timed("observe_ids", self.inner.observe_ids(instance_ids))
            .await
    }

    async fn start(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.timed("start", self.inner.start(instance_id)).await
    }

    async fn stop(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.timed("stop", self.inner.stop(instance_id)).await
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.timed("terminate", self.inner.terminate(instance_id))
            .await
    }

    async fn quarantine(
        &self,
        instance_id: &str,
        at: std::time::SystemTime,
    ) -> Result<(), ComputeError> {
        self.timed("quarantine", self.inner.quarantine(instance_id, at))
            .await
    }

    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>, ComputeError> {
        self.timed("subnets", self.inner.subnets(ids)).await
    }

    async fn offered_zones(&self, instance_type: &str) -> Result<Vec<String>, ComputeError> {
        self.timed("offered_zones", self.inner.offered_zones(instance_type))
            .await
    }

    async fn check(&self) -> Result<(), ComputeError> {
        self.timed("check", self.inner.check()).await
    }
}
