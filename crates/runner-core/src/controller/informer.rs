//! The informer: keeps [`Desired`] in step with the control plane and feeds
//! the work queue.
//!
//! A full sync (on every stream (re)connect and every resync interval) lists
//! all environments and classes and enqueues them (before a term's full
//! view, only those that need none); while leading, the full describe of
//! instances, and the orphan pass after it, run in the background, so
//! neither the first sync nor any reconcile waits on the size of the fleet.
//! A standby describes nothing. An environment missing from a list is only treated as gone
//! after a direct `GetEnvironment` says NOT_FOUND: a partial or empty list
//! never causes a teardown. A watch event re-fetches the one environment.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::chain;
use crate::leader::Leadership;
use crate::model::EnvironmentId;
use crate::orphans::{OrphanPolicy, sweep};
use crate::reconcile::Context;
use crate::retry::{Failures, Policy};
use crate::scheduler::Queue;
use crate::traits::{ControlPlane, ControlPlaneError};

/// What the control-plane stream tells the informer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stream was (re)opened: list everything.
    Connected,
    /// Re-fetch this environment.
    EnvironmentChanged(EnvironmentId),
}

/// Feeds the queue from the control plane.
pub struct Informer {
    /// The control plane.
    pub control_plane: Arc<dyn ControlPlane>,
    /// The reconcile context: what the control plane wants
    /// ([`Context::desired`]), the records and the observation.
    pub context: Arc<Context>,
    /// The work queue.
    pub queue: Queue<EnvironmentId>,
    /// Full resync interval.
    pub resync: Duration,
    /// Whether this replica leads (only the leader reconciles).
    pub leadership: Arc<Leadership>,
    /// How orphans are handled.
    pub orphans: OrphanPolicy,
}

impl std::fmt::Debug for Informer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Informer")
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

/// Environments fetched at once after watch events.
const FETCHES: usize = 16;

/// The fetches after watch events, off the event loop: one per environment
/// at a time (an event during its fetch fetches it once more after), at
/// most [`FETCHES`] at once, so a slow answer delays only its environment.
#[derive(Default)]
struct Fetches {
    running: tokio::task::JoinSet<EnvironmentId>,
    fetching: HashSet<EnvironmentId>,
    again: HashSet<EnvironmentId>,
    waiting: std::collections::VecDeque<EnvironmentId>,
}

impl Fetches {
    fn wanted(&mut self, informer: &Arc<Informer>, id: EnvironmentId) {
        if self.fetching.contains(&id) {
            self.again.insert(id);
        } else if self.running.len() < FETCHES {
            self.start(informer, id);
        } else if !self.waiting.contains(&id) {
            self.waiting.push_back(id);
        }
    }

    fn start(&mut self, informer: &Arc<Informer>, id: EnvironmentId) {
        self.fetching.insert(id);
        let informer = Arc::clone(informer);
        self.running.spawn(async move {
            informer.refetch(id).await;
            id
        });
    }

    fn finished(&mut self, informer: &Arc<Informer>, id: EnvironmentId) {
        self.fetching.remove(&id);
        if self.again.remove(&id) {
            self.start(informer, id);
        }
        while self.running.len() < FETCHES
            && let Some(next) = self.waiting.pop_front()
        {
            self.wanted(informer, next);
        }
    }
}

/// Retries of a failed full sync: from 1 s, doubling, up to 30 s.
const RETRY: Policy = Policy::new(Duration::from_secs(1), Duration::from_secs(30));

/// Why a full sync did not complete.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("list environment classes")]
    Classes(#[source] ControlPlaneError),
    #[error("list environments")]
    Environments(#[source] ControlPlaneError),
}

impl Informer {
    /// Runs until `shutdown`. `synced` is cancelled after the first full
    /// sync, which is what lets the controller start (and makes the runner
    /// ready).
    pub async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        synced: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let this = Arc::new(self);
        let mut fetches = Fetches::default();
        let mut due = true;
        let mut failures = Failures::new(RETRY);
        let mut next_resync = tokio::time::Instant::now();
        let mut observing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if due {
                let started = tokio::time::Instant::now();
                match this.full_sync().await {
                    Ok(count) => {
                        failures.reset();
                        due = false;
                        next_resync = tokio::time::Instant::now() + this.resync;
                        // One describe (and orphan pass) at a time.
                        if observing
                            .as_ref()
                            .is_none_or(tokio::task::JoinHandle::is_finished)
                        {
                            let this = Arc::clone(&this);
                            observing =
                                Some(tokio::spawn(async move { this.observe(started).await }));
                        }
                        if !synced.is_cancelled() {
                            tracing::info!(environments = count, "first full sync done");
                            synced.cancel();
                        }
                    }
                    Err(err) => {
                        next_resync = tokio::time::Instant::now() + failures.failed();
                        tracing::warn!(error = %chain(&err), "full sync failed; retrying");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(observing) = observing {
                        observing.abort();
                    }
                    return;
                }
                () = tokio::time::sleep_until(next_resync) => due = true,
                Some(done) = fetches.running.join_next() => {
                    if let Ok(id) = done {
                        fetches.finished(&this, id);
                    }
                }
                event = events.recv() => match event {
                    // The stream's task ended: that one is the failure to
                    // report, not this; wait for the shutdown it causes.
                    None => {
                        shutdown.cancelled().await;
                        return;
                    }
                    Some(Event::Connected) => due = true,
                    Some(Event::EnvironmentChanged(id)) => fetches.wanted(&this, id),
                },
            }
        }
    }

    async fn full_sync(&self) -> Result<usize, SyncError> {
        let classes = self
            .control_plane
            .list_classes()
            .await
            .map_err(SyncError::Classes)?;
        let environments = self
            .control_plane
            .list_environments()
            .await
            .map_err(SyncError::Environments)?;
        self.context.desired.set_classes(classes);
        let listed: HashSet<EnvironmentId> = environments.iter().map(|e| e.id).collect();
        let count = environments.len();
        // Before the term's full view, what has a launched instance waits
        // for the term to enqueue it once the view is in.
        let viewed = self.context.observer.taken_at().is_some();
        for environment in environments {
            let id = environment.id;
            self.context.desired.upsert(environment);
            if viewed || !self.context.waits_for_view(id) {
                self.enqueue(id);
            }
        }
        // Known before but not listed now: confirm one by one.
        let mut unlisted: HashSet<EnvironmentId> =
            self.context.desired.present().into_iter().collect();
        unlisted.extend(self.context.recorded());
        for id in unlisted.difference(&listed) {
            self.refetch(*id).await;
        }
        Ok(count)
    }

    /// While leading: the full describe of a sync that started at `since`,
    /// then, with a view taken in this term, the orphan pass.
    async fn observe(&self, since: tokio::time::Instant) {
        // A standby needs no view: a new term takes its own.
        if !self.leadership.is_leader() {
            return;
        }
        if let Err(err) = self.context.observer.refresh_after(since).await {
            tracing::warn!(error = %chain(&err), "cannot refresh the view of instances");
            return;
        }
        // A term that started since expired the view: the orphan pass waits
        // for the next one.
        if !self.leadership.is_leader() || self.context.observer.taken_at().is_none() {
            return;
        }
        match sweep(&self.context, self.orphans, self.context.clock.now()).await {
            Ok(done) if done.quarantined + done.terminated > 0 => {
                tracing::info!(
                    quarantined = done.quarantined,
                    terminated = done.terminated,
                    "orphan pass"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %chain(&err), "orphan pass failed"),
        }
    }

    /// Standbys keep `Desired` warm but queue nothing: a new leader
    /// enqueues everything when its term starts.
    fn enqueue(&self, id: EnvironmentId) {
        if self.leadership.is_leader() {
            self.queue.enqueue(id);
        }
    }

    async fn refetch(&self, id: EnvironmentId) {
        let started = std::time::Instant::now();
        let fetched = self.control_plane.get_environment(id).await;
        tracing::debug!(env.id = %id, took_ms = started.elapsed().as_secs_f64() * 1000.0, "environment fetched");
        match fetched {
            Ok(Some(environment)) => {
                let class_known = self
                    .context
                    .desired
                    .class(&environment.spec.class_id)
                    .is_some_and(|c| c.enabled);
                self.context.desired.upsert(environment);
                if !class_known {
                    // A new or re-enabled class: classes are not watched.
                    match self.control_plane.list_classes().await {
                        Ok(classes) => self.context.desired.set_classes(classes),
                        Err(err) => {
                            tracing::warn!(error = %chain(&err), "cannot refresh environment classes");
                        }
                    }
                }
                self.enqueue(id);
            }
            Ok(None) => {
                tracing::info!(env.id = %id, "the control plane no longer knows the environment");
                self.context.desired.mark_gone(id);
                self.enqueue(id);
            }
            Err(err) => {
                tracing::warn!(env.id = %id, error = %chain(&err), "cannot fetch the environment; the next sync retries");
            }
        }
    }
}
