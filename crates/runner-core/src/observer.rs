//! The batched view of the runner's instances.
//!
//! One `Compute::observe` call (a paged, tag-filtered describe) refreshes the
//! view of every environment at once. Reconciles that need a view newer than
//! their last mutation share one refresh, and refreshes are spaced by at
//! least `min_interval`, so the describe rate is bounded however many
//! environments are busy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{EnvironmentId, Instance};
use crate::traits::{Compute, ComputeError};

#[derive(Debug, Default)]
struct Snapshot {
    /// When the describe that produced it started; `None` before the first.
    taken_at: Option<Instant>,
    by_environment: HashMap<EnvironmentId, Vec<Instance>>,
}

/// The latest observation of all instances.
pub struct Observer {
    compute: Arc<dyn Compute>,
    min_interval: Duration,
    snapshot: Mutex<Snapshot>,
    refresh: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// An empty view over `compute`.
    pub fn new(compute: Arc<dyn Compute>, min_interval: Duration) -> Self {
        Self {
            compute,
            min_interval,
            snapshot: Mutex::new(Snapshot::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot
            .lock()
            .expect("snapshot lock is never poisoned")
    }

    /// When the current view was taken.
    pub fn taken_at(&self) -> Option<Instant> {
        self.snapshot().taken_at
    }

    /// The instances of `environment` in the current view.
    pub fn instances(&self, environment: EnvironmentId) -> Vec<Instance> {
        self.snapshot()
            .by_environment
            .get(&environment)
            .cloned()
            .unwrap_or_default()
    }

    /// Every instance in the current view.
    pub fn all(&self) -> Vec<Instance> {
        self.snapshot()
            .by_environment
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// Records what a mutation returned, so the view shows it before the next
    /// describe does.
    pub fn record(&self, instance: Instance) {
        let mut snapshot = self.snapshot();
        let list = snapshot
            .by_environment
            .entry(instance.environment)
            .or_default();
        match list.iter_mut().find(|i| i.id == instance.id) {
            Some(existing) => *existing = instance,
            None => list.push(instance),
        }
    }

    /// Makes sure the view was taken after `since`: waits for a refresh in
    /// flight, or starts one (no sooner than `min_interval` after the last).
    pub async fn refresh_after(&self, since: Instant) -> Result<(), ComputeError> {
        if self.taken_at().is_some_and(|t| t >= since) {
            return Ok(());
        }
        let _turn = self.refresh.lock().await;
        // Someone else refreshed while this call waited for its turn.
        let last = self.taken_at();
        if last.is_some_and(|t| t >= since) {
            return Ok(());
        }
        if let Some(last) = last {
            tokio::time::sleep_until(last + self.min_interval).await;
        }
        self.refresh_now_locked().await
    }

    /// Refreshes the view now (one describe), for a resync pass.
    pub async fn refresh(&self) -> Result<(), ComputeError> {
        let _turn = self.refresh.lock().await;
        self.refresh_now_locked().await
    }

    async fn refresh_now_locked(&self) -> Result<(), ComputeError> {
        let started = Instant::now();
        let instances = self.compute.observe().await?;
        let mut by_environment: HashMap<EnvironmentId, Vec<Instance>> = HashMap::new();
        for instance in instances {
            by_environment
                .entry(instance.environment)
                .or_default()
                .push(instance);
        }
        let mut snapshot = self.snapshot();
        snapshot.taken_at = Some(started);
        snapshot.by_environment = by_environment;
        Ok(())
    }
}
