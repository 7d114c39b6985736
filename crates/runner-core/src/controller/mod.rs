//! The controller: from what the control plane wants to reconciles, one
//! environment id at a time, only while this replica leads.
//!
//! One id, from the watch event to the launch: the session's stream sends an
//! [`informer::Event`]; the [`Informer`] fetches the environment
//! ([`ControlPlane`](crate::traits::ControlPlane)), records it in
//! [`Desired`](crate::desired::Desired) and enqueues the id; while leading,
//! [`Controller::run`] takes it from the queue into [`reconcile`] (which
//! calls [`Compute::launch`](crate::traits::Compute::launch)), inside one
//! span, and reports how it ended to the [`ReconcileObserver`] (the daemon's
//! telemetry: one log line and metric); [`error_policy`] decides when a
//! failed one runs again.
//!
//! A term: when leadership is gained, reload the records, start the outbox's
//! term, expire the full view of instances and take a new one in the
//! background, enqueue the environments that need no view (new ones,
//! unresolved intents) at once and the others when the view is in, and run
//! the queue; when it lapses ([`Leadership::lapsed`]), take no new work,
//! let in-flight reconciles finish within the grace period and drop the
//! statuses not yet delivered (the next leader's to report). Nothing is
//! created or terminated before the first full sync of the control plane's
//! environments, and statuses are sent only while leading.

pub mod informer;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use self::informer::Informer;
use crate::backoff::Backoff;
use crate::error::chain;
use crate::leader::Leadership;
use crate::model::EnvironmentId;
use crate::orphans::OrphanPolicy;
use crate::outbox::Round;
use crate::reconcile::{Context, ReconcileError, ReconcileSettings, reconcile};
use crate::retry::{Policy, retry};
use crate::scheduler::{Drained, Next, Queue, QueueObserver, Scheduler, SchedulerConfig};
use crate::traits::{ComputeError, ControlPlane};

/// Per-key backoff after transient failures: from 1 s, doubling, up to
/// 5 min, with equal jitter; reset by a success.
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(300),
};

/// Retries of status deliveries: from 0.5 s, doubling, up to 30 s.
const STATUS_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// Statuses sent at once.
const STATUS_CONCURRENCY: usize = 16;

/// What the controller reports, besides the queue's depth: the daemon's
/// telemetry (`runnerd::telemetry`), which logs and counts.
pub trait ReconcileObserver: QueueObserver {
    /// A reconcile ended after `took`, failed with `error` or succeeded
    /// (`None`). Called inside the reconcile's span, which names the
    /// environment.
    fn reconciled(&self, took: Duration, error: Option<&ReconcileError>);
}

/// Observes nothing, logs nothing (tests of the controller alone).
impl ReconcileObserver for () {
    fn reconciled(&self, _: Duration, _: Option<&ReconcileError>) {}
}

/// What the queue does after a failed reconcile: a transient error backs
/// off per key ([`BACKOFF`]); a final one (retrying cannot help: the lease
/// is lost) waits the long retry, the resync interval, as a success would.
pub fn error_policy(err: &ReconcileError, settings: &ReconcileSettings) -> Next {
    if err.is_retryable() {
        Next::Backoff
    } else {
        Next::RetryAfter(settings.resync)
    }
}

/// Runs the work queue through terms of leadership.
pub struct Controller {
    context: Arc<Context>,
    leadership: Arc<Leadership>,
    observer: Arc<dyn ReconcileObserver>,
    queue: Queue<EnvironmentId>,
    scheduler: Scheduler<EnvironmentId>,
    grace: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("scheduler", &self.scheduler)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller reconciling at most `concurrency` environments of
    /// `context` at once; in-flight ones get `grace` when a term ends.
    pub fn new(
        context: Arc<Context>,
        leadership: Arc<Leadership>,
        observer: Arc<dyn ReconcileObserver>,
        concurrency: usize,
        grace: Duration,
    ) -> Self {
        let (queue, scheduler) = Scheduler::new(SchedulerConfig {
            concurrency,
            backoff: BACKOFF,
        });
        Self {
            context,
            leadership,
            observer,
            queue,
            scheduler,
            grace,
        }
    }

    /// The informer that feeds this controller's queue from `control_plane`,
    /// with a full sync every `resync`.
    pub fn informer(
        &self,
        control_plane: Arc<dyn ControlPlane>,
        resync: Duration,
        orphans: OrphanPolicy,
    ) -> Informer {
        Informer {
            control_plane,
            context: self.context.clone(),
            queue: self.queue.clone(),
            resync,
            leadership: self.leadership.clone(),
            orphans,
        }
    }

    /// Delivers the statuses reconciles publish while this replica leads,
    /// until `stop`, then once more if still leading; `on_round` hears of
    /// each delivery round and what is left pending.
    pub fn deliver_statuses(
        &self,
        control_plane: Arc<dyn ControlPlane>,
        on_round: impl Fn(Round, usize) + Send + Sync + 'static,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let leadership = self.leadership.clone();
        self.context.outbox.clone().run_while(
            move || leadership.is_leader(),
            control_plane,
            STATUS_BACKOFF,
            STATUS_CONCURRENCY,
            on_round,
            stop,
        )
    }

    /// Runs terms until `shutdown`, starting once `synced` is cancelled (the
    /// first full sync). On shutdown, in-flight reconciles get the grace
    /// period and undelivered statuses stay for the outbox's last delivery.
    pub async fn run(mut self, synced: CancellationToken, shutdown: CancellationToken) {
        // No create or terminate before the first full sync.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = synced.cancelled() => {}
        }
        let leadership = self.leadership.clone();
        let mut changes = leadership.watch();
        loop {
            // Only the leader reconciles.
            while !leadership.is_leader() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = changes.changed() => {}
                }
            }
            let Some(epoch) = leadership.epoch() else {
                continue;
            };
            tracing::info!(epoch, "leading: reconciling");
            let term = shutdown.child_token();
            let drained = {
                let lead = self.lead(epoch, &term);
                tokio::pin!(lead);
                tokio::select! {
                    drained = &mut lead => drained,
                    () = leadership.lapsed() => {
                        term.cancel();
                        lead.await
                    }
                }
            };
            if shutdown.is_cancelled() {
                // The outbox delivers what is pending, still leading.
                drained_log(drained);
                return;
            }
            // Statuses not delivered by now are the next leader's to report.
            self.context.outbox.clear();
            drained_log(drained);
            tracing::warn!(epoch, "no longer leading: reconciling stopped");
        }
    }

    /// One term at `epoch`, until `term` is cancelled.
    async fn lead(&mut self, epoch: u64, term: &CancellationToken) -> Drained {
        let context = &self.context;
        // The previous leader may have written since these were loaded.
        while let Err(err) = context.reload_all().await {
            tracing::warn!(error = %err, "cannot reload the records");
            tokio::select! {
                () = term.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        context.outbox.start_term(epoch);
        // The standby's view of instances may predate the old leader's last
        // launches: until a full describe of this term ends, reconciles look
        // up their own instances by id, and what needs "no instance exists"
        // waits for it. Nothing here waits on a describe of the whole fleet.
        let started = tokio::time::Instant::now();
        context.observer.expire();
        // New environments and unresolved intents at once; those with a
        // launched instance once the term's full view is in (else each
        // would look its instance up by id).
        // (Every launched instance has a record, loaded by now.)
        let (later, now): (Vec<_>, Vec<_>) = known(context)
            .into_iter()
            .partition(|id| context.waits_for_view(*id));
        for id in now {
            self.queue.enqueue(id);
        }
        let (context, queue, term_ended) = (self.context.clone(), self.queue.clone(), term.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = term_ended.cancelled() => {}
                viewed = full_view(&context, started, &term_ended) => {
                    if viewed {
                        for id in later {
                            queue.enqueue(id);
                        }
                    }
                }
            }
        });
        let work = |id| {
            let (context, observer) = (self.context.clone(), self.observer.clone());
            async move { reconcile_one(&context, observer.as_ref(), id).await }
        };
        self.scheduler
            .run(work, self.observer.as_ref(), term.clone(), self.grace)
            .await
    }
}

/// Every environment the control plane describes or the store records.
fn known(context: &Context) -> Vec<EnvironmentId> {
    let mut ids = context.desired.present();
    ids.extend(context.recorded());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Waits until a full view taken after `since` is in, retrying a failed
/// describe with backoff; `false` when `term` ended first.
async fn full_view(
    context: &Context,
    since: tokio::time::Instant,
    term: &CancellationToken,
) -> bool {
    let failed = |err: &ComputeError, _| {
        tracing::warn!(error = %chain(err), "cannot take the full view of instances; retrying");
    };
    let describe = || context.observer.refresh_after(since);
    retry(VIEW_RETRY, term, |_| true, failed, describe)
        .await
        .is_ok()
}

/// Retries of a term's first full describe: from 1 s, doubling, up to 30 s.
const VIEW_RETRY: Policy = Policy::new(Duration::from_secs(1), Duration::from_secs(30));

fn drained_log(drained: Drained) {
    tracing::info!(
        finished = drained.finished,
        aborted = drained.aborted,
        "work queue drained"
    );
}

/// One reconcile of `id` in a span naming it, timed and reported to the
/// observer (which logs a failure and counts); [`error_policy`] decides what
/// follows a failure.
async fn reconcile_one(
    context: &Context,
    observer: &dyn ReconcileObserver,
    id: EnvironmentId,
) -> Next {
    async {
        let started = Instant::now();
        let result = reconcile(context, id).await;
        observer.reconciled(started.elapsed(), result.as_ref().err());
        match result {
            Ok(action) => Next::Done(action),
            Err(err) => error_policy(&err, &context.settings),
        }
    }
    .instrument(tracing::info_span!("reconcile", env.id = %id))
    .await
}

#[cfg(test)]
mod tests;
