//! A `Compute` that emits [`ComputeCallFinished`] for every call.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use runner_core::model::{EnvironmentId, Instance, Subnet};
use runner_core::traits::{Compute, ComputeError, LaunchRequest};

use super::Metrics;
use super::events::ComputeCallFinished;

/// A `Compute` that counts and times every call, and spares the health
/// check's probe while the calls themselves show that compute answers.
pub struct InstrumentedCompute {
    inner: Arc<dyn Compute>,
    metrics: Arc<Metrics>,
    /// The last call that reached compute: when, and whether it answered.
    last: Mutex<Option<(tokio::time::Instant, bool)>>,
    fresh_for: Duration,
}

impl std::fmt::Debug for InstrumentedCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedCompute")
            .finish_non_exhaustive()
    }
}

impl InstrumentedCompute {
    /// Wraps `inner`. [`Compute::check`] probes only when no call answered
    /// within `fresh_for`, or the last one failed.
    pub fn new(inner: Arc<dyn Compute>, metrics: Arc<Metrics>, fresh_for: Duration) -> Self {
        Self {
            inner,
            metrics,
            last: Mutex::new(None),
            fresh_for,
        }
    }

    /// Whether compute answered recently and has not failed since.
    fn answered_recently(&self) -> bool {
        let last = *self.last.lock().expect("last lock is never poisoned");
        last.is_some_and(|(at, answered)| answered && at.elapsed() < self.fresh_for)
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, ComputeError>>,
    ) -> Result<T, ComputeError> {
        let started = Instant::now();
        let result = call.await;
        // A refusal is an answer too; a lost lease says nothing of compute.
        let answered = match &result {
            Ok(_) | Err(ComputeError::Rejected(_) | ComputeError::NoCapacity { .. }) => Some(true),
            Err(ComputeError::Unavailable(_)) => Some(false),
            Err(ComputeError::Fenced) => None,
        };
        if let Some(answered) = answered {
            let now = tokio::time::Instant::now();
            *self.last.lock().expect("last lock is never poisoned") = Some((now, answered));
        }
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
        if self.answered_recently() {
            return Ok(());
        }
        self.timed("check", self.inner.check()).await
    }

    async fn console_output(&self, instance_id: &str) -> Result<String, ComputeError> {
        self.timed("console_output", self.inner.console_output(instance_id))
            .await
    }
}

#[cfg(test)]
mod tests {
    use testkit::fakes::MemoryCompute;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_check_probes_only_when_no_call_answered_lately() {
        let cloud = Arc::new(MemoryCompute::with_zones(&["z1"]));
        let fresh_for = Duration::from_secs(150);
        let compute = InstrumentedCompute::new(cloud.clone(), Arc::default(), fresh_for);
        compute.check().await.expect("up");
        assert_eq!(cloud.calls("check"), 1, "nothing answered yet: probed");

        compute.subnets(&["s".into()]).await.expect("up");
        tokio::time::advance(fresh_for - Duration::from_secs(1)).await;
        compute.check().await.expect("up");
        assert_eq!(
            cloud.calls("check"),
            1,
            "a call answered lately: not probed"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        compute.check().await.expect("up");
        assert_eq!(
            cloud.calls("check"),
            2,
            "nothing answered within the window"
        );

        compute.subnets(&["s".into()]).await.expect("up");
        cloud.set_down(true);
        compute.subnets(&["s".into()]).await.expect_err("down");
        compute
            .check()
            .await
            .expect_err("a failed call: probed, and failing");
        assert_eq!(cloud.calls("check"), 3);
    }
}
