//! The batched view of the runner's instances.
//!
//! A full view comes from one `Compute::observe` call (a paged, tag-filtered
//! describe), taken in the background on resync and at the start of a term;
//! refreshes are spaced by at least `min_interval`. A reconcile that needs
//! to see its own mutation asks for its instance ids instead: requests
//! arriving within a short window ([`LOOKUPS`], through a
//! [`Batcher`](crate::batch::Batcher)) share one `Compute::observe_ids` call
//! per 200 ids, so the describe cost follows what changed, not the size of
//! the fleet.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::batch::Batcher;
use crate::error::chain;
use crate::model::{EnvironmentId, Instance};
use crate::traits::{Compute, ComputeError};

pub use crate::batch::Batching;

/// How lookups by id are batched: 100 ms without a new id, 1 s at most,
/// 200 ids per call.
pub const LOOKUPS: Batching = Batching {
    idle: Duration::from_millis(100),
    max_wait: Duration::from_secs(1),
    max_ids: 200,
};

#[derive(Debug, Default)]
struct Snapshot {
    /// When the full describe that produced it started; `None` before the first.
    taken_at: Option<Instant>,
    /// When the view was last expired: a describe that started before
    /// does not renew it.
    expired_at: Option<Instant>,
    by_environment: HashMap<EnvironmentId, Vec<Instance>>,
    /// Instance ids looked up by id (or returned by a launch) since then,
    /// with when their lookup started: a full describe that started before
    /// may not show them yet.
    seen_at: HashMap<String, Instant>,
}

impl Snapshot {
    fn fresh(&self, id: &str, since: Instant) -> bool {
        self.taken_at.is_some_and(|t| t >= since)
            || self.seen_at.get(id).is_some_and(|t| *t >= since)
    }

    fn remove_all(&mut self, ids: &HashSet<&str>) {
        if ids.is_empty() {
            return;
        }
        for list in self.by_environment.values_mut() {
            list.retain(|i| !ids.contains(i.id.as_str()));
        }
    }

    fn insert(&mut self, instance: Instance) {
        // Almost every environment has one instance: a list of exactly one
        // (a first push would reserve room for four).
        let list = match self.by_environment.entry(instance.environment) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(vec![instance]);
                return;
            }
            std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
        };
        match list.iter_mut().find(|i| i.id == instance.id) {
            Some(existing) => *existing = instance,
            None => list.push(instance),
        }
    }
}

/// The latest observation of all instances.
pub struct Observer {
    compute: Arc<dyn Compute>,
    min_interval: Duration,
    snapshot: Mutex<Snapshot>,
    refresh: tokio::sync::Mutex<()>,
    /// Lookups by id; a batch's outcome is the error of its failed call.
    lookups: Arc<Batcher<(), Result<(), String>>>,
    /// Ids asked for by [`Observer::look_up_soon`] whose lookup has not
    /// answered yet.
    soon: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("min_interval", &self.min_interval)
            .field("lookups", &self.lookups)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// An empty view over `compute`, with the default batching.
    pub fn new(compute: Arc<dyn Compute>, min_interval: Duration) -> Self {
        Self {
            compute,
            min_interval,
            snapshot: Mutex::new(Snapshot::default()),
            refresh: tokio::sync::Mutex::new(()),
            lookups: Batcher::new(LOOKUPS),
            soon: Mutex::new(HashSet::new()),
        }
    }

    /// The same with other batching.
    #[must_use]
    pub fn with_batching(mut self, batching: Batching) -> Self {
        self.lookups = Batcher::new(batching);
        self
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot
            .lock()
            .expect("snapshot lock is never poisoned")
    }

    /// When the current full view was taken; `None` before the first, and
    /// after [`Observer::expire`] until the next.
    pub fn taken_at(&self) -> Option<Instant> {
        self.snapshot().taken_at
    }

    /// Stops trusting the full view for "no instance exists" (a view taken
    /// as a standby may predate the old leader's last launches), keeping
    /// what it shows; lookups by id and the next full describe renew it.
    pub fn expire(&self) {
        let mut snapshot = self.snapshot();
        snapshot.taken_at = None;
        snapshot.expired_at = Some(Instant::now());
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

    /// Records what a mutation returned (a launch's instance), so the view
    /// shows it before the next describe does. It counts as looked at now:
    /// the reconcile that launched it does not wait for a lookup to see it.
    pub fn record(&self, instance: Instance) {
        let mut snapshot = self.snapshot();
        snapshot.seen_at.insert(instance.id.clone(), Instant::now());
        snapshot.insert(instance);
    }

    /// Makes sure the full view was taken after `since`: waits for a refresh
    /// in flight, or starts one (no sooner than `min_interval` after the last).
    pub async fn refresh_after(&self, since: Instant) -> Result<(), ComputeError> {
        // Again when the view was expired while a describe ran.
        loop {
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
            self.refresh_now_locked().await?;
        }
    }

    /// Refreshes the full view now (one describe), for a resync pass.
    pub async fn refresh(&self) -> Result<(), ComputeError> {
        let _turn = self.refresh.lock().await;
        self.refresh_now_locked().await
    }

    async fn refresh_now_locked(&self) -> Result<(), ComputeError> {
        let started = Instant::now();
        let instances = self.compute.observe().await?;
        let mut snapshot = self.snapshot();
        // Lookups by id that started after this describe know better, and
        // so do launches answered after it started (its pages may predate
        // them).
        let newer: HashMap<String, Instant> = snapshot
            .seen_at
            .drain()
            .filter(|(_, at)| *at > started)
            .collect();
        let keep = |id: &String| newer.contains_key(id);
        let kept: Vec<Instance> = snapshot
            .by_environment
            .values()
            .flatten()
            .filter(|i| keep(&i.id))
            .cloned()
            .collect();
        snapshot.by_environment = HashMap::new();
        for instance in instances.into_iter().filter(|i| !keep(&i.id)).chain(kept) {
            snapshot.insert(instance);
        }
        snapshot.seen_at = newer;
        if snapshot.expired_at.is_none_or(|expired| expired <= started) {
            snapshot.taken_at = Some(started);
        }
        Ok(())
    }

    /// Makes sure each of `instance_ids` was looked at after `since`: the
    /// stale ones join the next batched lookup by id, and this waits for it.
    /// An id the cloud does not return leaves the view.
    pub async fn refresh_ids(
        self: &Arc<Self>,
        instance_ids: &[String],
        since: Instant,
    ) -> Result<(), ComputeError> {
        let stale: Vec<String> = {
            let snapshot = self.snapshot();
            instance_ids
                .iter()
                .filter(|id| !snapshot.fresh(id, since))
                .cloned()
                .collect()
        };
        if stale.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(self);
        let outcome = self
            .lookups
            .submit((), stale, move |ids| async move { this.look_up(ids).await })
            .await
            .ok_or_else(|| ComputeError::Unavailable("the lookup by id ended unanswered".into()))?;
        outcome.map_err(|message| ComputeError::Unavailable(message.into()))
    }

    /// Looks `instance_ids` up by id in the next batch without waiting for
    /// it: whoever reads the view next sees the outcome (a reconcile
    /// watching a transition, which would otherwise hold a worker for the
    /// batch's window). An id whose lookup is still pending is not asked
    /// again; a failed lookup is asked again by the next caller.
    pub fn look_up_soon(self: &Arc<Self>, instance_ids: &[String]) {
        let ids: Vec<String> = {
            let mut soon = self.soon.lock().expect("soon lock is never poisoned");
            instance_ids
                .iter()
                .filter(|id| soon.insert((*id).clone()))
                .cloned()
                .collect()
        };
        if ids.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = this.refresh_ids(&ids, Instant::now()).await;
            let mut soon = this.soon.lock().expect("soon lock is never poisoned");
            for id in &ids {
                soon.remove(id);
            }
            if let Err(err) = outcome {
                tracing::debug!(error = %chain(&err), "a lookup by id failed; the next pass asks again");
            }
        });
    }

    /// One batch's lookup, a call per `max_ids`; the view learns what it
    /// found, and that the ids it did not find are gone.
    async fn look_up(&self, ids: Vec<String>) -> Result<(), String> {
        let started = Instant::now();
        let mut found = Vec::new();
        for chunk in ids.chunks(self.lookups.batching().max_ids.max(1)) {
            found.extend(
                self.compute
                    .observe_ids(chunk)
                    .await
                    .map_err(|e| chain(&e))?,
            );
        }
        let mut snapshot = self.snapshot();
        // What was found replaces its entry; only what was not leaves (one
        // pass over the view for the batch, not one per id).
        let returned: HashSet<&str> = found.iter().map(|i| i.id.as_str()).collect();
        let gone: HashSet<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| !returned.contains(id))
            .collect();
        if !gone.is_empty() {
            tracing::debug!(
                gone = gone.len(),
                looked_up = ids.len(),
                "instances looked up by id and not found leave the view"
            );
        }
        snapshot.remove_all(&gone);
        for id in &ids {
            snapshot.seen_at.insert(id.clone(), started);
        }
        for instance in found {
            snapshot.insert(instance);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use async_trait::async_trait;

    use super::*;
    use crate::model::{InstanceState, Subnet};
    use crate::traits::LaunchRequest;

    /// A cloud of `n` running instances that records every lookup by id and
    /// fails the ones after `fail_from`.
    struct Cloud {
        instances: Vec<Instance>,
        full: Mutex<u32>,
        by_id: Mutex<Vec<Vec<String>>>,
        fail: bool,
        /// How long a full describe takes (its answer is the fleet as it
        /// was when it started).
        full_takes: Duration,
    }

    impl Cloud {
        fn new(n: usize) -> Self {
            let instances = (0..n)
                .map(|k| Instance {
                    id: format!("i-{k:04}"),
                    environment: EnvironmentId(uuid::Uuid::from_u128(k as u128)),
                    attempt: 1,
                    availability_zone: "eu-west-1a".into(),
                    subnet_id: "subnet-a".into(),
                    private_ip: None,
                    state: InstanceState::Running,
                    quarantined_at: None,
                    launched_at: None,
                    report: crate::report::Report::default(),
                })
                .collect();
            Self {
                instances,
                full: Mutex::new(0),
                by_id: Mutex::new(Vec::new()),
                fail: false,
                full_takes: Duration::ZERO,
            }
        }

        fn calls(&self) -> Vec<Vec<String>> {
            self.by_id.lock().expect("lock").clone()
        }
    }

    /// A launch answered while a full describe runs: the describe's pages
    /// predate it, and the view keeps it.
    #[tokio::test(start_paused = true)]
    async fn an_instance_recorded_during_a_full_describe_stays_in_the_view() {
        let mut cloud = Cloud::new(2);
        cloud.full_takes = Duration::from_secs(5);
        let observer = Arc::new(Observer::new(Arc::new(cloud), Duration::ZERO));
        let describing = {
            let observer = observer.clone();
            tokio::spawn(async move { observer.refresh().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut launched = Cloud::new(3).instances.remove(2);
        launched.state = InstanceState::Pending;
        observer.record(launched.clone());
        describing.await.expect("joined").expect("describe");
        assert_eq!(observer.instances(launched.environment), [launched]);
        assert_eq!(observer.all().len(), 3);
    }

    #[tokio::test]
    async fn the_view_keeps_one_slot_per_instance() {
        let observer = Observer::new(Arc::new(Cloud::new(3)), Duration::ZERO);
        observer.refresh().await.expect("describe");
        let snapshot = observer.snapshot();
        assert_eq!(snapshot.by_environment.len(), 3);
        for list in snapshot.by_environment.values() {
            assert_eq!((list.len(), list.capacity()), (1, 1));
        }
    }

    #[async_trait]
    impl Compute for Cloud {
        async fn launch(&self, _: &LaunchRequest) -> Result<Instance, ComputeError> {
            unreachable!()
        }
        async fn find_launch(
            &self,
            _: EnvironmentId,
            _: u32,
        ) -> Result<Option<Instance>, ComputeError> {
            unreachable!()
        }
        async fn observe(&self) -> Result<Vec<Instance>, ComputeError> {
            *self.full.lock().expect("lock") += 1;
            let instances = self.instances.clone();
            tokio::time::sleep(self.full_takes).await;
            Ok(instances)
        }
        async fn observe_ids(&self, ids: &[String]) -> Result<Vec<Instance>, ComputeError> {
            self.by_id.lock().expect("lock").push(ids.to_vec());
            tokio::time::sleep(Duration::from_millis(30)).await;
            if self.fail {
                return Err(ComputeError::Unavailable("throttled".into()));
            }
            Ok(self
                .instances
                .iter()
                .filter(|i| ids.contains(&i.id))
                .cloned()
                .collect())
        }
        async fn start(&self, _: &str) -> Result<(), ComputeError> {
            unreachable!()
        }
        async fn stop(&self, _: &str) -> Result<(), ComputeError> {
            unreachable!()
        }
        async fn terminate(&self, _: &str) -> Result<(), ComputeError> {
            unreachable!()
        }
        async fn quarantine(&self, _: &str, _: SystemTime) -> Result<(), ComputeError> {
            unreachable!()
        }
        async fn subnets(&self, _: &[String]) -> Result<Vec<Subnet>, ComputeError> {
            unreachable!()
        }
        async fn offered_zones(&self, _: &str) -> Result<Vec<String>, ComputeError> {
            unreachable!()
        }
        async fn check(&self) -> Result<(), ComputeError> {
            Ok(())
        }
        async fn console_output(&self, _: &str) -> Result<String, ComputeError> {
            unreachable!()
        }
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|k| format!("i-{k:04}")).collect()
    }

    /// `callers` lookups of one id each, the k-th starting `k × gap` in.
    async fn lookups(observer: &Arc<Observer>, callers: usize, gap: Duration) -> Vec<Duration> {
        tokio::time::advance(Duration::from_millis(1)).await;
        let start = Instant::now();
        let since = start;
        let tasks: Vec<_> = (0..callers)
            .map(|k| {
                let observer = Arc::clone(observer);
                tokio::spawn(async move {
                    tokio::time::sleep(gap * u32::try_from(k).expect("few")).await;
                    observer
                        .refresh_ids(&ids(k..k + 1), since)
                        .await
                        .expect("looked up");
                    start.elapsed()
                })
            })
            .collect();
        let mut done = Vec::new();
        for task in tasks {
            done.push(task.await.expect("joined"));
        }
        done
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_within_the_window_share_one_call_per_two_hundred_ids() {
        let cloud = Arc::new(Cloud::new(500));
        let observer = Arc::new(Observer::new(cloud.clone(), Duration::ZERO));
        observer.refresh().await.expect("full view");
        let done = lookups(&observer, 450, Duration::ZERO).await;
        let calls = cloud.calls();
        assert_eq!(
            calls.iter().map(Vec::len).collect::<Vec<_>>(),
            [200, 200, 50],
            "one batch, cut into calls of 200"
        );
        // Out 100 ms after the last id joined; three calls of 30 ms each.
        assert!(
            done.iter().all(|d| *d == Duration::from_millis(190)),
            "{:?}",
            &done[..3]
        );
        assert_eq!(
            *cloud.full.lock().expect("lock"),
            1,
            "no second full describe"
        );

        // Looked at after `since` already (at 100 ms): not asked again.
        let since = Instant::now() - Duration::from_millis(150);
        observer
            .refresh_ids(&ids(0..10), since)
            .await
            .expect("fresh");
        assert_eq!(cloud.calls().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_keeps_growing_goes_out_after_a_second() {
        let cloud = Arc::new(Cloud::new(100));
        let observer = Arc::new(Observer::new(cloud.clone(), Duration::ZERO));
        observer.refresh().await.expect("full view");
        // A new id every 30 ms for 1.5 s: the window never idles.
        let done = lookups(&observer, 50, Duration::from_millis(30)).await;
        let calls = cloud.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].len(), 34, "ids of the first second, 0 to 990 ms");
        assert_eq!(done[0], Duration::from_millis(1030));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_updates_and_prunes_only_its_ids_and_failures_reach_every_waiter() {
        let mut cloud = Cloud::new(3);
        let gone = cloud.instances.pop().expect("three");
        let cloud = Arc::new(cloud);
        let observer = Arc::new(Observer::new(cloud.clone(), Duration::ZERO));
        observer.record(gone.clone());
        observer.record(Instance {
            state: InstanceState::Pending,
            ..cloud.instances[0].clone()
        });
        // Recorded counts as seen then: a lookup asked for later looks.
        tokio::time::advance(Duration::from_millis(1)).await;
        observer
            .refresh_ids(
                &[gone.id.clone(), cloud.instances[0].id.clone()],
                Instant::now(),
            )
            .await
            .expect("looked up");
        assert!(
            observer.instances(gone.environment).is_empty(),
            "an id not returned leaves the view"
        );
        assert_eq!(
            observer.instances(cloud.instances[0].environment)[0].state,
            InstanceState::Running
        );

        let failing = Arc::new(Cloud {
            fail: true,
            ..Cloud::new(2)
        });
        let observer = Arc::new(Observer::new(failing.clone(), Duration::ZERO));
        let (first, second) = (ids(0..1), ids(1..2));
        let (a, b) = tokio::join!(
            observer.refresh_ids(&first, Instant::now()),
            observer.refresh_ids(&second, Instant::now()),
        );
        assert!(matches!(a, Err(ComputeError::Unavailable(_))), "{a:?}");
        assert!(matches!(b, Err(ComputeError::Unavailable(_))), "{b:?}");
        assert_eq!(failing.calls().len(), 1);
    }
}
