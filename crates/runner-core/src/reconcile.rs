//! Reconciling one environment: from (desired spec, stored record, observed
//! instance) to the next step, level-triggered and idempotent.
//!
//! Invariants:
//! - intent before side effect: a launch's attempt, subnet and client token
//!   are stored before `launch` is called, and its instance id after;
//! - an intent without an instance id is resolved by a tag lookup before any
//!   new launch, so an environment never gets two instances;
//! - only a definite failure (no capacity, unsupported, rejected) starts a new
//!   attempt; anything else retries the same token in the same subnet;
//! - an invalid spec produces a status naming the problem and no side effect
//!   (deletion excepted);
//! - every `.await` may be a cancellation point: nothing here relies on
//!   finishing a step that the next pass could not redo.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::desired::{Desired, Known};
use crate::model::{
    Action, Content, DesiredPhase, Environment, EnvironmentClass, EnvironmentId, Instance,
    InstanceState, LaunchIntent, LaunchState, Phase, Record, Revision, Spec, Status, StopReason,
    Subnet, Timings, client_token,
};
use crate::observer::Observer;
use crate::outbox::Outbox;
use crate::report::{self, Report, Stage};
use crate::traits::{
    AnonymousCheckout, Checkout, CheckoutError, Clock, Compute, ComputeError, LaunchRequest,
    StateStore, StoreError, SystemClock,
};
use crate::validate;

/// Why a reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading or writing the record failed.
    #[error("state store")]
    Store(#[from] StoreError),
    /// A compute call failed.
    #[error("compute")]
    Compute(#[from] ComputeError),
    /// The checkout credential could not be prepared, bound or removed.
    #[error("checkout credential")]
    Checkout(#[from] CheckoutError),
}

impl ReconcileError {
    /// Whether retrying can help (everything but a lost lease).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::Store(StoreError::Fenced) | Self::Compute(ComputeError::Fenced)
        )
    }

    /// A low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Store(StoreError::Conflict(_)) => "store_conflict",
            Self::Store(StoreError::Fenced) | Self::Compute(ComputeError::Fenced) => "fenced",
            Self::Store(StoreError::Unavailable(_)) => "store_unavailable",
            Self::Compute(ComputeError::Unavailable(_)) => "compute_unavailable",
            Self::Compute(ComputeError::NoCapacity { .. }) => "no_capacity",
            Self::Compute(ComputeError::Rejected(_)) => "compute_rejected",
            Self::Checkout(_) => "checkout_unavailable",
        }
    }
}

/// Told when an environment's content is ready, once per start seen.
pub trait StartObserver: Send + Sync + 'static {
    /// The start's timings (each known once both its ends are).
    fn content_ready(&self, timings: &Timings);
}

/// Timing of the reconcile loop.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    /// How soon to look again while an instance changes state.
    pub poll: Duration,
    /// How soon to look again when nothing is happening (the resync).
    pub resync: Duration,
    /// How long to wait after every zone said "no capacity".
    pub capacity_retry: Duration,
    /// How long to wait after the cloud rejected a launch.
    pub rejected_retry: Duration,
    /// How soon to look again for the creator's token.
    pub auth_retry: Duration,
    /// How long an instance has, from its launch (or start), to report its
    /// content ready before its environment is failed.
    pub content_deadline: Duration,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(2),
            resync: Duration::from_secs(300),
            capacity_retry: Duration::from_secs(60),
            rejected_retry: Duration::from_secs(300),
            auth_retry: Duration::from_secs(60),
            content_deadline: Duration::from_secs(15 * 60),
        }
    }
}

/// Everything a reconcile uses.
pub struct Context {
    /// The record store.
    pub store: Arc<dyn StateStore>,
    /// The instances.
    pub compute: Arc<dyn Compute>,
    /// The batched view of instances.
    pub observer: Arc<Observer>,
    /// Status delivery.
    pub outbox: Arc<Outbox>,
    /// What the control plane wants.
    pub desired: Arc<Desired>,
    /// Where environments may be placed.
    pub subnets: Vec<Subnet>,
    /// Timing.
    pub settings: ReconcileSettings,
    /// Repository credentials for instances.
    pub checkout: Arc<dyn Checkout>,
    /// The instance types classes may use.
    pub instance_types: crate::validate::AllowedInstanceTypes,
    /// Wall-clock time (when an orphan is marked, and how long ago; an
    /// instance's deadline and idleness).
    pub clock: Arc<dyn Clock>,
    /// Told when an environment's content is ready (the daemon's metrics).
    pub starts: Option<Arc<dyn StartObserver>>,
    records: Mutex<HashMap<EnvironmentId, Record>>,
    mutated: Mutex<HashMap<EnvironmentId, Instant>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("subnets", &self.subnets)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context with the given records (the store's content at start-up).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn StateStore>,
        compute: Arc<dyn Compute>,
        observer: Arc<Observer>,
        outbox: Arc<Outbox>,
        desired: Arc<Desired>,
        subnets: Vec<Subnet>,
        settings: ReconcileSettings,
        records: Vec<Record>,
    ) -> Self {
        Self {
            store,
            compute,
            observer,
            outbox,
            desired,
            subnets,
            settings,
            checkout: Arc::new(AnonymousCheckout),
            instance_types: crate::validate::AllowedInstanceTypes::default(),
            clock: Arc::new(SystemClock),
            starts: None,
            records: Mutex::new(records.into_iter().map(|r| (r.environment, r)).collect()),
            mutated: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `checkout` for repository credentials (the default: none).
    #[must_use]
    pub fn with_checkout(mut self, checkout: Arc<dyn Checkout>) -> Self {
        self.checkout = checkout;
        self
    }

    /// Refuses classes whose instance type `allowed` does not hold (the
    /// default: any type).
    #[must_use]
    pub fn with_instance_types(mut self, allowed: crate::validate::AllowedInstanceTypes) -> Self {
        self.instance_types = allowed;
        self
    }

    /// Reads wall-clock time from `clock` (the default: the system's).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Tells `observer` the timings of every start that ends ready.
    #[must_use]
    pub fn with_start_observer(mut self, observer: Arc<dyn StartObserver>) -> Self {
        self.starts = Some(observer);
        self
    }

    /// Every environment the runner holds a record of.
    pub fn recorded(&self) -> Vec<EnvironmentId> {
        self.records
            .lock()
            .expect("records lock is never poisoned")
            .keys()
            .copied()
            .collect()
    }

    /// Whether `id` can wait for a term's first full view: it has a
    /// launched instance (its reconcile would look it up by id) and no
    /// newer spec than the one acted on (or none known yet). A new
    /// environment, an unresolved intent or a changed spec does not wait.
    pub fn waits_for_view(&self, id: EnvironmentId) -> bool {
        let Some(record) = self.record(id) else {
            return false;
        };
        let launched = record
            .launch
            .as_ref()
            .is_some_and(|l| l.instance_id().is_some());
        let changed = matches!(
            self.desired.get(id),
            Some(Known::Present(env)) if env.spec.spec_version > record.spec_version
        );
        launched && !changed
    }

    fn record(&self, id: EnvironmentId) -> Option<Record> {
        self.records
            .lock()
            .expect("records lock is never poisoned")
            .get(&id)
            .cloned()
    }

    async fn save(&self, record: Record) -> Result<Record, ReconcileError> {
        match self.store.put(&record).await {
            Ok(saved) => {
                self.records
                    .lock()
                    .expect("records lock is never poisoned")
                    .insert(saved.environment, saved.clone());
                Ok(saved)
            }
            Err(err) => {
                if matches!(err, StoreError::Conflict(_)) {
                    self.reload(record.environment).await?;
                }
                Err(err.into())
            }
        }
    }

    async fn remove(&self, record: &Record) -> Result<(), ReconcileError> {
        match self.store.delete(record).await {
            Ok(()) => {
                self.records
                    .lock()
                    .expect("records lock is never poisoned")
                    .remove(&record.environment);
                // Nothing of a removed environment stays in memory.
                self.mutated
                    .lock()
                    .expect("mutated lock is never poisoned")
                    .remove(&record.environment);
                Ok(())
            }
            Err(err) => {
                if matches!(err, StoreError::Conflict(_)) {
                    self.reload(record.environment).await?;
                }
                Err(err.into())
            }
        }
    }

    async fn reload(&self, id: EnvironmentId) -> Result<(), StoreError> {
        let fresh = self.store.get(id).await?;
        let mut records = self.records.lock().expect("records lock is never poisoned");
        match fresh {
            Some(record) => records.insert(id, record),
            None => records.remove(&id),
        };
        Ok(())
    }

    /// Replaces the cached records with the store's (on gaining leadership:
    /// the previous leader may have written since).
    pub async fn reload_all(&self) -> Result<(), StoreError> {
        let records = self.store.list().await?;
        *self.records.lock().expect("records lock is never poisoned") =
            records.into_iter().map(|r| (r.environment, r)).collect();
        Ok(())
    }

    fn mark_mutated(&self, id: EnvironmentId) {
        self.mutated
            .lock()
            .expect("mutated lock is never poisoned")
            .insert(id, Instant::now());
    }

    /// The instances of `id`, from a view taken after its last mutation.
    /// Before this term's full view, its known instances are looked up by
    /// id; only `full` (the answer must show that no other instance exists)
    /// waits for the full view.
    async fn instances(
        &self,
        id: EnvironmentId,
        full: bool,
    ) -> Result<Vec<Instance>, ReconcileError> {
        let since = self
            .mutated
            .lock()
            .expect("mutated lock is never poisoned")
            .get(&id)
            .copied();
        match (since, self.observer.taken_at()) {
            (_, None) if full => {
                tracing::debug!(env.id = %id, "no full view yet in this term: waiting for one");
                self.observer.refresh_after(Instant::now()).await?;
            }
            (_, None) => {
                let mut ids: Vec<String> = self
                    .observer
                    .instances(id)
                    .into_iter()
                    .map(|i| i.id)
                    .collect();
                let recorded = self.record(id).and_then(|r| {
                    r.launch
                        .as_ref()
                        .and_then(|l| l.instance_id().map(str::to_owned))
                });
                ids.extend(recorded.filter(|r| !ids.contains(r)));
                // None known: a new environment (its intent write guards
                // against a second launch).
                if !ids.is_empty() {
                    let since = since.unwrap_or_else(Instant::now);
                    self.observer.refresh_ids(&ids, since).await?;
                }
            }
            // Its own instances, looked up by id with others' in one batch.
            (Some(since), Some(taken)) if taken < since => {
                let ids: Vec<String> = self
                    .observer
                    .instances(id)
                    .into_iter()
                    .map(|i| i.id)
                    .collect();
                if ids.is_empty() {
                    tracing::debug!(env.id = %id, "mutated, and no instance in the view: waiting for a full view");
                    self.observer.refresh_after(since).await?;
                } else {
                    self.observer.refresh_ids(&ids, since).await?;
                }
            }
            _ => {}
        }
        Ok(self.observer.instances(id))
    }

    fn publish(&self, environment: &Environment, status: Status) {
        self.outbox
            .publish(environment.id, environment.accepted_status_version, status);
    }
}

/// A spec that passed validation.
#[derive(Debug, Clone)]
struct Valid {
    desired: DesiredPhase,
    class: Option<EnvironmentClass>,
}

/// Checks a spec against the field rules and the runner's classes; the error
/// names the problem for the user.
pub fn validate_spec(
    spec: &Spec,
    class: Option<&EnvironmentClass>,
) -> Result<DesiredPhase, String> {
    let desired = spec
        .desired
        .ok_or_else(|| "spec.desired_phase: must be RUNNING, STOPPED or DELETED".to_owned())?;
    if desired == DesiredPhase::Deleted {
        return Ok(desired);
    }
    validate::uuid("spec.environment_class_id", &spec.class_id).map_err(|e| e.to_string())?;
    let class =
        class.ok_or_else(|| format!("environment class {} does not exist", spec.class_id))?;
    if !class.enabled {
        return Err(format!(
            "environment class {} ({}) is disabled",
            class.id,
            validate::printable(&class.display_name, validate::MAX_DISPLAY_NAME_LEN)
        ));
    }
    validate::instance_type("environment_class.instance_type", &class.instance_type)
        .map_err(|e| e.to_string())?;
    validate::disk_gib("environment_class.disk_gib", i64::from(class.disk_gib))
        .map_err(|e| e.to_string())?;
    validate::repository_url("spec.content.repository_url", &spec.repository_url)
        .map_err(|e| e.to_string())?;
    match &spec.revision {
        Revision::Default => {}
        Revision::Branch(b) => {
            validate::branch("spec.content.branch", b).map_err(|e| e.to_string())?;
        }
        Revision::Commit(c) => {
            validate::commit("spec.content.commit", c).map_err(|e| e.to_string())?;
        }
    }
    validate::text(
        "metadata.creator",
        &spec.creator,
        validate::MAX_PRINCIPAL_LEN,
    )
    .map_err(|e| e.to_string())?;
    Ok(desired)
}

/// The subnet for a launch attempt: spread by environment, moving on with
/// each attempt, among zones that offer the type and had capacity.
pub fn place(
    environment: EnvironmentId,
    attempt: u32,
    subnets: &[Subnet],
    offered: &[String],
    exhausted: &[String],
) -> Option<Subnet> {
    let candidates: Vec<&Subnet> = subnets
        .iter()
        .filter(|s| {
            offered.contains(&s.availability_zone) && !exhausted.contains(&s.availability_zone)
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let (hi, lo) = environment.0.as_u64_pair();
    let spread = (hi ^ lo) as usize;
    let index = spread.wrapping_add(attempt.saturating_sub(1) as usize) % candidates.len();
    Some(candidates[index].clone())
}

fn lost(instance: &Instance) -> bool {
    matches!(
        instance.state,
        InstanceState::ShuttingDown | InstanceState::Terminated
    )
}

fn status(
    spec: &Spec,
    phase: Phase,
    machine: Option<&Instance>,
    failure: impl Into<String>,
) -> Status {
    let failure_message = failure.into();
    Status {
        spec_version: spec.spec_version,
        spec_valid: true,
        phase,
        machine: machine
            .filter(|m| m.state != InstanceState::Terminated)
            .cloned(),
        failure_message,
        warning_message: String::new(),
        content: machine.map(content).unwrap_or_default(),
        stop_reason: None,
    }
}

/// The content as the instance reported it, with the start's timings.
fn content(instance: &Instance) -> Content {
    let r = &instance.report;
    let ready_at = r.ready().then_some(r.at).flatten();
    let between = |from: Option<SystemTime>, to: Option<SystemTime>| to?.duration_since(from?).ok();
    // A report from before the last start (the bootstrap runs on the first
    // boot only) times that first boot, not this start: no timings. (The
    // report's times are whole seconds.)
    let this_start = !matches!(
        (instance.launched_at, r.started_at),
        (Some(l), Some(s)) if s + Duration::from_secs(1) < l
    );
    Content {
        stage: r.stage,
        commit: r.commit.clone().filter(|_| r.ready()),
        ready_at,
        timings: if this_start {
            Timings {
                launch_to_running: between(instance.launched_at, r.started_at),
                running_to_ready: between(r.started_at, ready_at),
                launch_to_ready: between(instance.launched_at, ready_at),
            }
        } else {
            Timings::default()
        },
    }
}

/// Where a running instance's bootstrap stands.
enum Bootstrap {
    Ready,
    Failed(String),
    Waiting,
}

fn bootstrap(instance: &Instance, now: SystemTime, deadline: Duration) -> Bootstrap {
    let r = &instance.report;
    if r.ready() {
        return Bootstrap::Ready;
    }
    if let Some(stage) = r.failure() {
        let detail = if r.detail.is_empty() {
            "no reason given"
        } else {
            r.detail.as_str()
        };
        return Bootstrap::Failed(format!(
            "the environment's content is not ready: checkout failed at stage {stage}: {detail}"
        ));
    }
    let waited = instance
        .launched_at
        .and_then(|at| now.duration_since(at).ok())
        .unwrap_or_default();
    if waited >= deadline {
        let last = r.stage.map_or_else(
            || "the instance reported nothing".to_owned(),
            |s| format!("last stage reported: {s}"),
        );
        return Bootstrap::Failed(format!(
            "the environment's content is not ready: no report of it within {} of the instance's start ({last})",
            short_duration(deadline)
        ));
    }
    Bootstrap::Waiting
}

/// `deadline` as people write it: `15m`, `90s`, `1h30m`.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Reconciles one environment.
pub async fn reconcile(ctx: &Context, id: EnvironmentId) -> Result<Action, ReconcileError> {
    tracing::trace!(env.id = %id, "reconcile starts");
    match ctx.desired.get(id) {
        None => Ok(Action::AwaitChange),
        Some(Known::Gone) => teardown(ctx, id).await,
        Some(Known::Present(environment)) => converge(ctx, &environment).await,
    }
}

/// The control plane does not know the environment: remove what is ours.
async fn teardown(ctx: &Context, id: EnvironmentId) -> Result<Action, ReconcileError> {
    let instances = ctx.instances(id, true).await?;
    let mut waiting = false;
    for instance in instances.iter().filter(|i| !lost(i)) {
        ctx.compute.terminate(&instance.id).await?;
        ctx.mark_mutated(id);
        tracing::info!(instance.id = %instance.id, "terminated the instance of an environment the control plane no longer knows");
        waiting = true;
    }
    if waiting
        || instances
            .iter()
            .any(|i| i.state == InstanceState::ShuttingDown)
    {
        return Ok(Action::Requeue(ctx.settings.poll));
    }
    ctx.checkout.remove(id).await?;
    if let Some(record) = ctx.record(id) {
        ctx.remove(&record).await?;
    }
    ctx.outbox.forget(id);
    ctx.desired.forget(id);
    Ok(Action::AwaitChange)
}

async fn converge(ctx: &Context, env: &Environment) -> Result<Action, ReconcileError> {
    let id = env.id;
    let spec = &env.spec;
    let mut record = ctx.record(id).unwrap_or_else(|| Record::new(id));
    if spec.spec_version < record.spec_version {
        // Stale: a newer spec was acted on; the informer will bring it.
        return Ok(Action::Requeue(ctx.settings.poll));
    }
    let class = ctx.desired.class(&spec.class_id);
    let valid = match validate_spec(spec, class.as_ref()).and_then(|desired| match &class {
        // Before any AWS call: the class's type must be one the runner allows.
        Some(class) if desired != DesiredPhase::Deleted => ctx
            .instance_types
            .check("environment_class.instance_type", &class.instance_type)
            .map(|()| desired)
            .map_err(|e| e.to_string()),
        _ => Ok(desired),
    }) {
        Ok(desired) => Valid { desired, class },
        Err(problem) => return invalid(ctx, env, &record, problem).await,
    };

    // Resolve an intent without an instance id before anything else.
    if let Some(launch) = record.launch.clone()
        && launch.state == LaunchState::Intended
        && let Some(found) = ctx.compute.find_launch(id, launch.attempt).await?
    {
        tracing::info!(instance.id = %found.id, attempt = launch.attempt, "found the instance of an interrupted launch");
        // A launched record implies a bound credential.
        ctx.checkout.bind(id, &found.id).await?;
        record.launch = Some(LaunchIntent {
            state: LaunchState::Launched {
                instance_id: found.id.clone(),
            },
            ..launch
        });
        record.spec_version = record.spec_version.max(spec.spec_version);
        record = ctx.save(record).await?;
        ctx.observer.record(found);
    }

    // Deleting ends in "no instance left": that needs the full view.
    let full = valid.desired == DesiredPhase::Deleted;
    let mut instances = ctx.instances(id, full).await?;
    let current_id = record
        .launch
        .as_ref()
        .and_then(|l| l.instance_id().map(str::to_owned));
    // The view may predate the launch (another replica launched it): look
    // again before believing the instance is gone.
    if let Some(cid) = &current_id
        && !instances.iter().any(|i| &i.id == cid)
    {
        ctx.observer
            .refresh_ids(std::slice::from_ref(cid), Instant::now())
            .await?;
        instances = ctx.observer.instances(id);
    }
    let current = current_id
        .as_ref()
        .and_then(|cid| instances.iter().find(|i| &i.id == cid))
        .cloned();

    // Instances of this environment that are not its instance (a launch the
    // runner lost track of) are terminated: an environment has one instance.
    if current_id.is_some() {
        for extra in instances
            .iter()
            .filter(|i| Some(&i.id) != current_id.as_ref() && !lost(i))
        {
            tracing::warn!(instance.id = %extra.id, "terminating a second instance of the environment");
            ctx.compute.terminate(&extra.id).await?;
            ctx.mark_mutated(id);
        }
    }

    match valid.desired {
        DesiredPhase::Deleted => delete(ctx, env, record, &instances).await,
        DesiredPhase::Stopped => {
            let reason = record
                .idle_stopped_at_spec
                .map(|_| StopReason::DisconnectedTimeout);
            stop(ctx, env, current.as_ref(), current_id.as_deref(), reason).await
        }
        DesiredPhase::Running => {
            run(
                ctx,
                env,
                record,
                &valid,
                current.as_ref(),
                current_id.as_deref(),
            )
            .await
        }
    }
}

async fn invalid(
    ctx: &Context,
    env: &Environment,
    record: &Record,
    problem: String,
) -> Result<Action, ReconcileError> {
    tracing::warn!(problem = %problem, "invalid spec");
    let current_id = record
        .launch
        .as_ref()
        .and_then(|l| l.instance_id().map(str::to_owned));
    let instances = if current_id.is_some() {
        ctx.instances(env.id, false).await?
    } else {
        Vec::new()
    };
    let current = instances
        .iter()
        .find(|i| Some(&i.id) == current_id.as_ref());
    let phase = match current.map(|i| i.state) {
        None => Phase::Creating,
        Some(InstanceState::Pending | InstanceState::Running) => Phase::Running,
        Some(InstanceState::Stopping | InstanceState::Stopped) => Phase::Stopped,
        Some(InstanceState::ShuttingDown | InstanceState::Terminated) => Phase::Deleted,
    };
    let mut s = status(&env.spec, phase, current, problem);
    s.spec_valid = false;
    ctx.publish(env, s);
    Ok(Action::Requeue(ctx.settings.resync))
}

async fn delete(
    ctx: &Context,
    env: &Environment,
    record: Record,
    instances: &[Instance],
) -> Result<Action, ReconcileError> {
    let mut alive = false;
    for instance in instances.iter().filter(|i| !lost(i)) {
        ctx.compute.terminate(&instance.id).await?;
        ctx.mark_mutated(env.id);
        alive = true;
    }
    let machine = instances
        .iter()
        .find(|i| !lost(i) || i.state == InstanceState::ShuttingDown);
    let shutting_down: Vec<String> = instances
        .iter()
        .filter(|i| i.state == InstanceState::ShuttingDown)
        .map(|i| i.id.clone())
        .collect();
    // The next pass reads what a lookup found.
    ctx.observer.look_up_soon(&shutting_down);
    if alive || !shutting_down.is_empty() {
        ctx.publish(env, status(&env.spec, Phase::Deleting, machine, ""));
        return Ok(Action::Requeue(ctx.settings.poll));
    }
    ctx.checkout.remove(env.id).await?;
    if record.version > 0 {
        ctx.remove(&record).await?;
    }
    ctx.publish(env, status(&env.spec, Phase::Deleted, None, ""));
    Ok(Action::AwaitChange)
}

fn lost_message(instance_id: &str) -> String {
    format!(
        "instance {instance_id} was terminated outside the runner; delete this environment and create a new one"
    )
}

async fn stop(
    ctx: &Context,
    env: &Environment,
    current: Option<&Instance>,
    current_id: Option<&str>,
    reason: Option<StopReason>,
) -> Result<Action, ReconcileError> {
    let Some(instance_id) = current_id else {
        // Never launched: nothing to stop.
        ctx.publish(env, status(&env.spec, Phase::Stopped, None, ""));
        return Ok(Action::Requeue(ctx.settings.resync));
    };
    let Some(instance) = current else {
        return Ok(lost_instance(ctx, env, None, instance_id));
    };
    let (phase, next) = match instance.state {
        InstanceState::Running => {
            ctx.compute.stop(&instance.id).await?;
            ctx.mark_mutated(env.id);
            (Phase::Stopping, ctx.settings.poll)
        }
        // A pending instance cannot be stopped yet. The next pass reads
        // what a lookup found.
        InstanceState::Pending | InstanceState::Stopping => {
            ctx.observer
                .look_up_soon(std::slice::from_ref(&instance.id));
            (Phase::Stopping, ctx.settings.poll)
        }
        InstanceState::Stopped => (Phase::Stopped, ctx.settings.resync),
        InstanceState::ShuttingDown | InstanceState::Terminated => {
            return Ok(lost_instance(ctx, env, Some(instance), &instance.id));
        }
    };
    let mut s = status(&env.spec, phase, Some(instance), "");
    s.stop_reason = reason;
    ctx.publish(env, s);
    Ok(Action::Requeue(next))
}

/// The environment's instance was terminated outside the runner, or so long
/// ago that EC2 no longer lists it (`machine` is `None` then).
fn lost_instance(
    ctx: &Context,
    env: &Environment,
    machine: Option<&Instance>,
    instance_id: &str,
) -> Action {
    ctx.publish(
        env,
        status(
            &env.spec,
            Phase::Stopped,
            machine,
            lost_message(instance_id),
        ),
    );
    Action::Requeue(ctx.settings.resync)
}

async fn run(
    ctx: &Context,
    env: &Environment,
    record: Record,
    valid: &Valid,
    current: Option<&Instance>,
    current_id: Option<&str>,
) -> Result<Action, ReconcileError> {
    if let Some(instance_id) = current_id {
        let Some(instance) = current else {
            return Ok(lost_instance(ctx, env, None, instance_id));
        };
        if record.idle_stopped_at_spec == Some(env.spec.spec_version) {
            // Stopped for want of a client: stays stopped until a newer spec.
            return stop(
                ctx,
                env,
                current,
                current_id,
                Some(StopReason::DisconnectedTimeout),
            )
            .await;
        }
        let last_phase = ctx.outbox.last(env.id).map(|s| s.phase);
        if matches!(
            instance.state,
            InstanceState::Pending | InstanceState::Stopping
        ) {
            // In transition: the next pass reads what a lookup found.
            ctx.observer
                .look_up_soon(std::slice::from_ref(&instance.id));
        }
        let (phase, next) = match instance.state {
            InstanceState::Running => return running(ctx, env, record, instance).await,
            InstanceState::Pending if last_phase == Some(Phase::Starting) => {
                (Phase::Starting, ctx.settings.poll)
            }
            InstanceState::Pending => (Phase::Creating, ctx.settings.poll),
            InstanceState::Stopped => {
                ctx.compute.start(&instance.id).await?;
                ctx.mark_mutated(env.id);
                if record.idle_stopped_at_spec.is_some() {
                    let mut record = record;
                    record.idle_stopped_at_spec = None;
                    ctx.save(record).await?;
                }
                (Phase::Starting, ctx.settings.poll)
            }
            // Wait for the stop to finish, then start.
            InstanceState::Stopping => (Phase::Starting, ctx.settings.poll),
            InstanceState::ShuttingDown | InstanceState::Terminated => {
                return Ok(lost_instance(ctx, env, Some(instance), &instance.id));
            }
        };
        ctx.publish(env, status(&env.spec, phase, Some(instance), ""));
        return Ok(Action::Requeue(next));
    }
    launch(ctx, env, record, valid).await
}

/// A running instance: STARTING until it reports its content ready (looked
/// up by id, batched, every poll), then RUNNING; failed on a reported
/// failure or at the deadline; stopped once idle for the spec's
/// `timeout.disconnected`.
async fn running(
    ctx: &Context,
    env: &Environment,
    mut record: Record,
    instance: &Instance,
) -> Result<Action, ReconcileError> {
    if !instance.report.ready() && instance.report.failure().is_none() {
        // Waiting on the instance's report: looked up by id in a batch with
        // others', not waited for; the next pass reads what it found.
        ctx.observer
            .look_up_soon(std::slice::from_ref(&instance.id));
    }
    let last = ctx.outbox.last(env.id);
    let now = ctx.clock.now();
    match bootstrap(instance, now, ctx.settings.content_deadline) {
        Bootstrap::Ready => {
            let s = status(&env.spec, Phase::Running, Some(instance), "");
            if last.as_ref().is_none_or(|l| l.phase != Phase::Running) {
                started(ctx, instance, &s);
            }
            if let Some(timeout) = env.spec.disconnected_timeout
                && let Some(idle) = idle_for(&instance.report, instance.launched_at, now)
                && idle >= timeout
            {
                tracing::info!(
                    instance.id = %instance.id,
                    idle_secs = idle.as_secs(),
                    timeout_secs = timeout.as_secs(),
                    "stopping the environment: no client connected for its timeout.disconnected"
                );
                record.idle_stopped_at_spec = Some(env.spec.spec_version);
                ctx.save(record.clone()).await?;
                return stop(
                    ctx,
                    env,
                    Some(instance),
                    Some(&instance.id),
                    Some(StopReason::DisconnectedTimeout),
                )
                .await;
            }
            ctx.publish(env, s);
            Ok(Action::Requeue(ctx.settings.resync))
        }
        Bootstrap::Failed(message) => {
            if last.as_ref().is_none_or(|l| l.failure_message != message) {
                tracing::warn!(
                    instance.id = %instance.id,
                    stage = instance.report.stage.map_or("none", Stage::as_str),
                    problem = %message,
                    "the environment's start failed"
                );
                console_tail(ctx, &instance.id).await;
            }
            ctx.publish(
                env,
                status(&env.spec, Phase::Starting, Some(instance), message),
            );
            Ok(Action::Requeue(ctx.settings.resync))
        }
        Bootstrap::Waiting => {
            ctx.publish(env, status(&env.spec, Phase::Starting, Some(instance), ""));
            Ok(Action::Requeue(ctx.settings.poll))
        }
    }
}

/// How long no client has been connected: since the instance said so, or
/// since it last started if that is later (a report from before a stop
/// does not count).
fn idle_for(report: &Report, launched_at: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    let since = report.idle_since?;
    let since = launched_at.map_or(since, |l| l.max(since));
    now.duration_since(since).ok()
}

/// The log line of a start that ended ready, with its stage durations, and
/// the metrics; only for a start the bootstrap timed (a restarted runner
/// counts again the starts it sees end ready).
fn started(ctx: &Context, instance: &Instance, status: &Status) {
    let t = &status.content.timings;
    if *t == Timings::default() {
        return;
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    tracing::info!(
        instance.id = %instance.id,
        commit = status.content.commit.as_deref().unwrap_or(""),
        launch_to_running_ms = ms(t.launch_to_running),
        running_to_ready_ms = ms(t.running_to_ready),
        launch_to_ready_ms = ms(t.launch_to_ready),
        "the environment's content is ready"
    );
    if let Some(observer) = &ctx.starts {
        observer.content_ready(t);
    }
}

/// Lines of console output logged after a failed start.
const CONSOLE_LINES: usize = 40;

/// The last lines of a failed instance's console output, scrubbed, into the
/// runner's log (never into a status): the operator sees the boot error next
/// to the environment id. A failure to read it is logged, never fatal.
async fn console_tail(ctx: &Context, instance_id: &str) {
    match ctx.compute.console_output(instance_id).await {
        Ok(output) => {
            let lines: Vec<&str> = output.lines().collect();
            let tail = lines[lines.len().saturating_sub(CONSOLE_LINES)..]
                .iter()
                .map(|l| report::scrub(l, 300))
                .collect::<Vec<_>>()
                .join("\n");
            tracing::warn!(instance.id = %instance_id, console = %tail, "console output of the failed instance (last lines, scrubbed)");
        }
        Err(err) => {
            tracing::warn!(instance.id = %instance_id, error = %crate::error::chain(&err), "could not read the failed instance's console output");
        }
    }
}

async fn launch(
    ctx: &Context,
    env: &Environment,
    mut record: Record,
    valid: &Valid,
) -> Result<Action, ReconcileError> {
    let class = valid
        .class
        .as_ref()
        .expect("a valid running spec has a class");
    let id = env.id;
    // The credential before the intent: no launch for a creator without a token.
    let checkout_secret = match ctx
        .checkout
        .prepare(id, &env.spec.creator, &env.spec.repository_url)
        .await
    {
        Ok(secret) => secret,
        Err(err @ (CheckoutError::AuthRequired(_) | CheckoutError::Invalid(_))) => {
            let message = err.to_string();
            tracing::warn!(problem = %message, "cannot check out the repository");
            ctx.publish(env, status(&env.spec, Phase::Creating, None, message));
            return Ok(Action::Requeue(ctx.settings.auth_retry));
        }
        Err(err) => return Err(err.into()),
    };
    // Intent first: reuse an unresolved intent (same token, same subnet), or
    // decide a new one.
    let intent = match record.launch.clone() {
        Some(intent) if intent.state == LaunchState::Intended => intent,
        _ => {
            let offered = ctx.compute.offered_zones(&class.instance_type).await?;
            if !ctx
                .subnets
                .iter()
                .any(|s| offered.contains(&s.availability_zone))
            {
                let zones: Vec<&str> = ctx
                    .subnets
                    .iter()
                    .map(|s| s.availability_zone.as_str())
                    .collect();
                let message = format!(
                    "instance type {} is not offered in any of the runner's availability zones ({})",
                    class.instance_type,
                    zones.join(", ")
                );
                ctx.publish(env, status(&env.spec, Phase::Creating, None, message));
                return Ok(Action::Requeue(ctx.settings.rejected_retry));
            }
            let attempt = record.launch.as_ref().map_or(1, |l| l.attempt + 1);
            let Some(subnet) = place(id, attempt, &ctx.subnets, &offered, &record.exhausted_zones)
            else {
                return no_capacity(ctx, env, record, &class.instance_type).await;
            };
            let intent = LaunchIntent {
                attempt,
                subnet,
                client_token: client_token(id, attempt),
                state: LaunchState::Intended,
            };
            record.launch = Some(intent.clone());
            record.spec_version = record.spec_version.max(env.spec.spec_version);
            record = ctx.save(record).await?;
            intent
        }
    };
    ctx.publish(env, status(&env.spec, Phase::Creating, None, ""));
    let request = LaunchRequest {
        environment: id,
        attempt: intent.attempt,
        client_token: intent.client_token.clone(),
        subnet: intent.subnet.clone(),
        instance_type: class.instance_type.clone(),
        disk_gib: class.disk_gib,
        repository_url: env.spec.repository_url.clone(),
        revision: env.spec.revision.clone(),
        checkout_secret,
    };
    match ctx.compute.launch(&request).await {
        Ok(instance) => {
            tracing::info!(instance.id = %instance.id, attempt = intent.attempt, subnet.id = %intent.subnet.id, "launched");
            ctx.mark_mutated(id);
            // Until bound, the record stays an intent: the next pass finds the
            // instance by its tags and binds then.
            ctx.checkout.bind(id, &instance.id).await?;
            record.launch = Some(LaunchIntent {
                state: LaunchState::Launched {
                    instance_id: instance.id.clone(),
                },
                ..intent
            });
            record.exhausted_zones.clear();
            ctx.observer.record(instance.clone());
            ctx.save(record).await?;
            ctx.publish(env, status(&env.spec, Phase::Creating, Some(&instance), ""));
            Ok(Action::Requeue(ctx.settings.poll))
        }
        Err(ComputeError::NoCapacity { zone, message }) => {
            tracing::warn!(zone = %zone, error = %message, attempt = intent.attempt, "no capacity; trying another zone");
            record.exhausted_zones.push(zone);
            // The next pass decides a new attempt in another zone.
            record.launch = Some(LaunchIntent {
                state: LaunchState::Failed,
                ..intent
            });
            next_attempt(ctx, env, record, &class.instance_type).await
        }
        Err(ComputeError::Rejected(message)) => {
            tracing::warn!(error = %message, attempt = intent.attempt, "launch rejected");
            // No instance came of it; the retry is a new attempt.
            record.launch = Some(LaunchIntent {
                state: LaunchState::Failed,
                ..intent
            });
            ctx.save(record).await?;
            ctx.publish(
                env,
                status(
                    &env.spec,
                    Phase::Creating,
                    None,
                    format!("launch failed: {message}"),
                ),
            );
            Ok(Action::Requeue(ctx.settings.rejected_retry))
        }
        Err(err) => Err(err.into()),
    }
}

async fn next_attempt(
    ctx: &Context,
    env: &Environment,
    record: Record,
    instance_type: &str,
) -> Result<Action, ReconcileError> {
    let attempt = record.launch.as_ref().map_or(1, |l| l.attempt + 1);
    let offered = ctx.compute.offered_zones(instance_type).await?;
    if place(
        env.id,
        attempt,
        &ctx.subnets,
        &offered,
        &record.exhausted_zones,
    )
    .is_none()
    {
        return no_capacity(ctx, env, record, instance_type).await;
    }
    ctx.save(record).await?;
    Ok(Action::Requeue(Duration::ZERO))
}

async fn no_capacity(
    ctx: &Context,
    env: &Environment,
    mut record: Record,
    instance_type: &str,
) -> Result<Action, ReconcileError> {
    let zones = record.exhausted_zones.join(", ");
    record.exhausted_zones.clear();
    ctx.save(record).await?;
    ctx.publish(
        env,
        status(
            &env.spec,
            Phase::Creating,
            None,
            format!("no capacity for {instance_type} in {zones}; retrying"),
        ),
    );
    Ok(Action::Requeue(ctx.settings.capacity_retry))
}
