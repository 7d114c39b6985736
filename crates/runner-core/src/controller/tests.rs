//! The controller with virtual time: the error policy as the queue applies
//! it, and terms that follow leadership.

use std::sync::Mutex;

use async_trait::async_trait;
use tokio::time::Instant;

use super::*;
use crate::desired::Desired;
use crate::model::{Instance, Record, Subnet};
use crate::observer::Observer;
use crate::outbox::Outbox;
use crate::traits::{Compute, ComputeError, LaunchRequest, StateStore, StoreError};

/// A store holding one record whose deletion always fails with `error()`;
/// it notes when the records are listed (each term starts so) and when a
/// deletion is tried.
struct Store {
    record: Record,
    error: fn() -> StoreError,
    started: Instant,
    lists: Mutex<Vec<Duration>>,
    deletes: Mutex<Vec<Duration>>,
}

#[async_trait]
impl StateStore for Store {
    async fn list(&self) -> Result<Vec<Record>, StoreError> {
        self.lists
            .lock()
            .expect("lock")
            .push(self.started.elapsed());
        Ok(vec![self.record.clone()])
    }
    async fn get(&self, _: EnvironmentId) -> Result<Option<Record>, StoreError> {
        Ok(Some(self.record.clone()))
    }
    async fn put(&self, _: &Record) -> Result<Record, StoreError> {
        unreachable!("a teardown writes no record")
    }
    async fn delete(&self, _: &Record) -> Result<(), StoreError> {
        self.deletes
            .lock()
            .expect("lock")
            .push(self.started.elapsed());
        Err((self.error)())
    }
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// No instances at all.
struct NoInstances;

#[async_trait]
impl Compute for NoInstances {
    async fn launch(&self, _: &LaunchRequest) -> Result<Instance, ComputeError> {
        unreachable!("a teardown launches nothing")
    }
    async fn find_launch(
        &self,
        _: EnvironmentId,
        _: u32,
    ) -> Result<Option<Instance>, ComputeError> {
        Ok(None)
    }
    async fn observe(&self) -> Result<Vec<Instance>, ComputeError> {
        Ok(Vec::new())
    }
    async fn observe_ids(&self, _: &[String]) -> Result<Vec<Instance>, ComputeError> {
        Ok(Vec::new())
    }
    async fn start(&self, _: &str) -> Result<(), ComputeError> {
        unreachable!("nothing to start")
    }
    async fn stop(&self, _: &str) -> Result<(), ComputeError> {
        unreachable!("nothing to stop")
    }
    async fn terminate(&self, _: &str) -> Result<(), ComputeError> {
        unreachable!("nothing to terminate")
    }
    async fn quarantine(&self, _: &str, _: std::time::SystemTime) -> Result<(), ComputeError> {
        unreachable!("no orphans")
    }
    async fn subnets(&self, _: &[String]) -> Result<Vec<Subnet>, ComputeError> {
        Ok(Vec::new())
    }
    async fn offered_zones(&self, _: &str) -> Result<Vec<String>, ComputeError> {
        Ok(Vec::new())
    }
    async fn check(&self) -> Result<(), ComputeError> {
        Ok(())
    }
    async fn console_output(&self, _: &str) -> Result<String, ComputeError> {
        unreachable!("no failed start")
    }
}

/// A controller over one environment the control plane no longer knows,
/// whose record's deletion fails with `error()`, already past its first
/// full sync.
fn controller(error: fn() -> StoreError, leadership: Arc<Leadership>) -> (Controller, Arc<Store>) {
    let id = EnvironmentId(uuid::Uuid::from_u128(7));
    let store = Arc::new(Store {
        record: Record::new(id),
        error,
        started: Instant::now(),
        lists: Mutex::default(),
        deletes: Mutex::default(),
    });
    let compute = Arc::new(NoInstances);
    let desired = Arc::new(Desired::default());
    desired.mark_gone(id);
    let context = Arc::new(Context::new(
        store.clone(),
        compute.clone(),
        Arc::new(Observer::new(compute, Duration::ZERO)),
        Arc::new(Outbox::default()),
        desired,
        Vec::new(),
        ReconcileSettings::default(),
        vec![Record::new(id)],
    ));
    let controller = Controller::new(context, leadership, Arc::new(()), 4, Duration::from_secs(1));
    (controller, store)
}

fn synced() -> CancellationToken {
    let synced = CancellationToken::new();
    synced.cancel();
    synced
}

/// When the deletion was tried in `for_` of leading without end.
async fn deletions(error: fn() -> StoreError, for_: Duration) -> Vec<Duration> {
    let (controller, store) = controller(error, Arc::new(Leadership::always()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(controller.run(synced(), shutdown.clone()));
    tokio::time::sleep(for_).await;
    shutdown.cancel();
    task.await.expect("controller");
    store.deletes.lock().expect("lock").clone()
}

#[test]
fn only_a_lost_lease_is_final() {
    let settings = ReconcileSettings::default();
    let fenced = ReconcileError::Store(StoreError::Fenced);
    assert_eq!(
        error_policy(&fenced, &settings),
        Next::RetryAfter(settings.resync)
    );
    let fenced = ReconcileError::Compute(ComputeError::Fenced);
    assert_eq!(
        error_policy(&fenced, &settings),
        Next::RetryAfter(settings.resync)
    );
    let down = ReconcileError::Store(StoreError::Unavailable("down".into()));
    assert_eq!(error_policy(&down, &settings), Next::Backoff);
    let rejected = ReconcileError::Compute(ComputeError::Rejected("bad image".into()));
    assert_eq!(error_policy(&rejected, &settings), Next::Backoff);
}

#[tokio::test(start_paused = true)]
async fn a_final_error_waits_the_long_retry() {
    let tried = deletions(|| StoreError::Fenced, Duration::from_secs(700)).await;
    let resync = ReconcileSettings::default().resync;
    assert_eq!(tried, [Duration::ZERO, resync, resync * 2]);
}

#[tokio::test(start_paused = true)]
async fn a_transient_error_backs_off_per_key_from_one_second() {
    let tried = deletions(
        || StoreError::Unavailable("throttled".into()),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(tried.first(), Some(&Duration::ZERO));
    let gaps: Vec<Duration> = tried.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "retried {} times in a minute", gaps.len());
    // Equal jitter under ceilings of 1, 2, 4, 8 s: each gap in [c/2, c].
    for (gap, ceiling) in gaps.iter().zip([1u64, 2, 4, 8]) {
        let c = Duration::from_secs(ceiling);
        assert!(
            *gap >= c / 2 && *gap <= c,
            "gap {gap:?} outside [{:?}, {c:?}]",
            c / 2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn terms_follow_leadership_and_nothing_runs_between_them() {
    let leadership = Arc::new(Leadership::default());
    let started = Instant::now();
    let at = |secs| started + Duration::from_secs(secs);
    leadership.set(1, at(10));
    let (controller, store) = controller(
        || StoreError::Unavailable("throttled".into()),
        leadership.clone(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(controller.run(synced(), shutdown.clone()));
    // Validity runs out at 10 s; a renewal at the same epoch brings it back
    // at 20 s; leadership is lost at 30 s.
    tokio::time::sleep_until(at(20)).await;
    leadership.set(1, at(120));
    tokio::time::sleep_until(at(30)).await;
    leadership.clear();
    tokio::time::sleep_until(at(40)).await;
    shutdown.cancel();
    task.await.expect("controller");

    let secs = Duration::from_secs;
    // Each term reloads the records first.
    assert_eq!(*store.lists.lock().expect("lock"), [secs(0), secs(20)]);
    let deletes = store.deletes.lock().expect("lock").clone();
    assert!(
        deletes.contains(&secs(0)) && deletes.contains(&secs(20)),
        "{deletes:?}"
    );
    assert!(
        deletes
            .iter()
            .all(|t| *t < secs(10) || (secs(20) <= *t && *t < secs(30))),
        "reconciled while not leading: {deletes:?}"
    );
}
