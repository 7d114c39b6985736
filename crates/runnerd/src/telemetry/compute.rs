//! A `Compute` that emits [`ComputeCallFinished`] for every call.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use runner_core::model::{EnvironmentId, Instance, Subnet};
use runner_core::traits::{Compute, ComputeError, LaunchRequest};

use super::Metrics;
use super::events::ComputeCallFinished;

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

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, ComputeError>>,
    ) -> Result<T, ComputeError> {
        let started = Instant::now();
        let result = call.await;
        ComputeCallFinished {
            operation,
            error: result.as_ref().err(),
            took: started.elapsed(),
        }
        .emit(&self.metrics);
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

    async fn console_output(&self, instance_id: &str) -> Result<String, ComputeError> {
        self.timed("console_output", self.inner.console_output(instance_id))
            .await
    }
}
