//! Wiring and lifetime: builds the parts from a [`Config`] and the adapters,
//! runs every long-lived task under one cancellation token and the
//! [`Supervisor`], and shuts down in order.
//!
//! Shutdown: the root token stops the session, the informer and new work;
//! in-flight reconciles get the grace period; then the status outbox makes a
//! last delivery. A critical task that ends on its own, or panics, is fatal:
//! everything stops and [`run`] returns the reason.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runner_core::backoff::Backoff;
use runner_core::desired::Desired;
use runner_core::leader::{Leadership, Lease, run_lease};
use runner_core::model::{EnvironmentId, Subnet};
use runner_core::observer::Observer;
use runner_core::outbox::Outbox;
use runner_core::reconcile::{Context, ReconcileSettings, reconcile};
use runner_core::scheduler::{Scheduler, SchedulerConfig};
use runner_core::traits::{
    Compute, ControlPlane, EnvironmentSecrets, SecretStore, StateStore, TokenStore,
};
use runner_proto::pb::identity_service_client::IdentityServiceClient;
use runner_proto::pb::runner_service_client::RunnerServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::Config;
use crate::grpc::{self, Auth, GrpcControlPlane};
use crate::health::{self, Health, chain};
use crate::informer::Informer;
use crate::scm::Scm;
use crate::session::{Session, SessionError};
use crate::supervisor::{Fatal, Supervisor};
use crate::telemetry::{InstrumentedCompute, Metrics};

/// The adapters the daemon runs on.
pub struct Deps {
    /// Records.
    pub store: Arc<dyn StateStore>,
    /// Instances.
    pub compute: Arc<dyn Compute>,
    /// The runner's credentials.
    pub secrets: Arc<dyn SecretStore>,
    /// The leader lease.
    pub lease: Arc<dyn Lease>,
    /// The credential claim: on first start, the replica holding it trades
    /// the exchange token; the others wait for its credential.
    pub claim: Arc<dyn Lease>,
    /// This replica's leadership, which the adapters consult before mutating.
    pub leadership: Arc<Leadership>,
    /// Users' host tokens.
    pub tokens: Arc<dyn TokenStore>,
    /// Environments' checkout secrets.
    pub environment_secrets: Arc<dyn EnvironmentSecrets>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deps { .. }")
    }
}

/// What the daemon runs on AWS besides the core's adapters; tests of the
/// core leave these out.
#[derive(Debug, Default)]
pub struct Extras {
    /// Setup checks run at start (and again until they pass); failures show
    /// as DEGRADED.
    pub doctor: Option<Arc<crate::doctor::Doctor>>,
    /// Self-update, when the runner runs as an ECS service task.
    pub self_update: Option<crate::update::SelfUpdate>,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The health port could not be opened.
    #[error("listen on the health port")]
    Listen(#[source] std::io::Error),
    /// The control-plane channel could not be configured.
    #[error(transparent)]
    Channel(#[from] grpc::ChannelError),
    /// The session could not be established.
    #[error("control-plane session")]
    Session(#[source] SessionError),
    /// The SCM HTTP client could not be configured.
    #[error("SCM client")]
    Scm(#[source] runner_scm::ScmError),
    /// A task that must run for the daemon's life ended.
    #[error("critical task {task} ended: {reason}")]
    TaskEnded {
        /// The task.
        task: &'static str,
        /// How.
        reason: String,
    },
}

/// Where the health port listens, once bound (for tests that bind port 0).
pub type BoundAddr = tokio::sync::oneshot::Sender<std::net::SocketAddr>;

async fn retry_until<T, E: std::error::Error, Fut: Future<Output = Result<T, E>>>(
    what: &str,
    health: &Health,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
) -> Option<T> {
    let backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };
    let mut failures = 0;
    loop {
        match attempt().await {
            Ok(value) => {
                health.set_problem("setup", None);
                return Some(value);
            }
            Err(err) => {
                failures += 1;
                let problem = chain(&err);
                tracing::warn!(error = %problem, "{what} failed; retrying");
                health.set_problem("setup", Some(format!("{what}: {problem}")));
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff.full_jitter(failures)) => {}
                }
            }
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled (Ok) or a critical task
/// fails (Err).
pub async fn run(
    config: Config,
    deps: Deps,
    shutdown: CancellationToken,
    bound: Option<BoundAddr>,
) -> Result<(), AppError> {
    run_with(config, deps, Extras::default(), shutdown, bound).await
}

/// [`run`] with the start checks and self-update of `extras`.
pub async fn run_with(
    config: Config,
    deps: Deps,
    extras: Extras,
    shutdown: CancellationToken,
    bound: Option<BoundAddr>,
) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let (supervisor, mut failures) = Supervisor::new(shutdown.clone(), health.clone());
    let spawn_critical =
        |name: &'static str, task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            supervisor.spawn_critical(name, task);
        };

    // The health port first, so ECS sees the process alive while it starts.
    let listener = health::bind(config.health_listen)
        .await
        .map_err(AppError::Listen)?;
    if let Some(bound) = bound {
        let _ = bound.send(listener.local_addr().map_err(AppError::Listen)?);
    }
    spawn_critical(
        "health-port",
        Box::pin({
            let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
            async move {
                if let Err(err) = health::serve(listener, health, metrics, shutdown).await {
                    tracing::error!(error = %err, "health port failed");
                }
            }
        }),
    );

    let compute: Arc<dyn Compute> = Arc::new(InstrumentedCompute::new(
        deps.compute.clone(),
        metrics.clone(),
    ));
    let store = deps.store.clone();
    spawn_critical(
        "health-monitor",
        Box::pin(health.clone().monitor(
            store.clone(),
            compute.clone(),
            config.engine.health_check_interval,
            shutdown.clone(),
        )),
    );

    let channel = grpc::channel(&config.control_plane)?;
    let auth = Auth::default();
    let client = RunnerServiceClient::with_interceptor(channel.clone(), auth.clone());
    let grpc_control_plane = GrpcControlPlane::new(client.clone(), config.control_plane.timeout);
    let control_plane: Arc<dyn ControlPlane> = Arc::new(grpc_control_plane.clone());
    let scm_client = runner_scm::ScmClient::new(
        config.control_plane.ca_bundle.as_deref(),
        config.control_plane.timeout,
        &format!("aws-runner/{}", crate::session::VERSION),
        &config.scm_resolve,
    )
    .map_err(AppError::Scm)?;
    let scm = Arc::new(Scm::new(
        deps.tokens.clone(),
        deps.environment_secrets.clone(),
        scm_client,
    ));
    let (scm_events_tx, scm_events_rx) = mpsc::channel(256);
    let session = Arc::new(Session {
        runner_id: config.runner_id.clone(),
        region: config.region.clone(),
        client,
        identity: IdentityServiceClient::new(channel),
        auth,
        secrets: deps.secrets.clone(),
        compute: compute.clone(),
        instance_types: config.placement.allowed_instance_types.clone(),
        zones: std::sync::OnceLock::new(),
        health: health.clone(),
        metrics: metrics.clone(),
        timeout: config.control_plane.timeout,
        max_stream_age: config.control_plane.max_stream_age,
        scm: scm.clone(),
        scm_events: scm_events_tx,
        self_update: extras.self_update.is_some() && config.update.enabled,
        calls: TaskTracker::new(),
        claim: deps.claim.clone(),
    });
    let key = match session.credentials(&shutdown).await {
        Ok(key) => key,
        Err(SessionError::Cancelled) => return Ok(()),
        Err(err) => return Err(AppError::Session(err)),
    };
    scm.set_key(&key);
    match session.signup(&key, &shutdown).await {
        Ok(()) => {}
        Err(SessionError::Cancelled) => return Ok(()),
        Err(err) => return Err(AppError::Session(err)),
    }

    // The self-update state (or why there is none) goes with the first status.
    match extras.self_update {
        Some(parts) => spawn_critical(
            "self-update",
            Box::pin(
                crate::update::Updater {
                    releases: Arc::new(crate::update::GrpcReleases::new(
                        session.client.clone(),
                        config.control_plane.timeout,
                    )),
                    parts,
                    leadership: deps.leadership.clone(),
                    health: health.clone(),
                    clock: Arc::new(runner_core::traits::SystemClock),
                    config: config.update,
                }
                .run(shutdown.clone()),
            ),
        ),
        None => {
            health.set_detail("update_state", "unavailable");
            health.set_detail("update_message", "not running as an ECS service task");
        }
    }
    // The session runs before the setup checks, so that a broken setup
    // shows as DEGRADED in the control plane.
    spawn_critical(
        "heartbeat",
        Box::pin(session.clone().heartbeat(shutdown.clone())),
    );
    if let Some(doctor) = extras.doctor {
        supervisor.spawn(
            "setup-checks",
            doctor.watch(health.clone(), shutdown.clone()),
        );
    }

    let Some(subnets) = retry_until(
        "check the VPC, subnets and security group",
        &health,
        &shutdown,
        async || compute.subnets(&config.placement.subnet_ids).await,
    )
    .await
    else {
        return Ok(());
    };
    let Some(records) = retry_until(
        "load the runner's records",
        &health,
        &shutdown,
        async || store.list().await,
    )
    .await
    else {
        return Ok(());
    };
    tracing::info!(
        records = records.len(),
        subnets = subnets.len(),
        "state loaded"
    );

    let _ = session.zones.set(zones(&subnets));

    let observer = Arc::new(Observer::new(
        compute.clone(),
        config.engine.observe_interval,
    ));
    let outbox = Arc::new(Outbox::default());
    let desired = Arc::new(Desired::default());
    let context = Arc::new(
        Context::new(
            store.clone(),
            compute.clone(),
            observer.clone(),
            outbox.clone(),
            desired.clone(),
            subnets,
            ReconcileSettings {
                poll: config.engine.poll_interval,
                resync: config.engine.resync_interval,
                auth_retry: config.engine.poll_interval * 5,
                ..ReconcileSettings::default()
            },
            records,
        )
        .with_checkout(scm.clone())
        .with_instance_types(config.placement.allowed_instance_types.clone()),
    );

    spawn_critical(
        "scm-sync",
        Box::pin(crate::scm::scm_sync(
            scm.clone(),
            grpc_control_plane.clone(),
            scm_events_rx,
            config.engine.resync_interval,
            shutdown.clone(),
        )),
    );

    // The lease is released last, after the outbox's last delivery: a
    // status is only ever sent while leading.
    let lease_stop = CancellationToken::new();
    spawn_critical(
        "lease",
        Box::pin({
            let (lease, leadership, stop) = (
                deps.lease.clone(),
                deps.leadership.clone(),
                lease_stop.clone(),
            );
            let timing = config.engine.lease;
            async move { run_lease(lease.as_ref(), &leadership, timing, stop).await }
        }),
    );

    let (events_tx, events_rx) = mpsc::channel(1024);
    spawn_critical(
        "watch",
        Box::pin(session.clone().watch(events_tx, shutdown.clone())),
    );

    let (queue, scheduler) = Scheduler::<EnvironmentId>::new(SchedulerConfig {
        concurrency: config.engine.concurrency,
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        },
    });
    let synced = CancellationToken::new();
    spawn_critical(
        "informer",
        Box::pin(
            Informer {
                control_plane: control_plane.clone(),
                desired: desired.clone(),
                context: context.clone(),
                observer: observer.clone(),
                queue: queue.clone(),
                health: health.clone(),
                resync: config.engine.resync_interval,
                leadership: deps.leadership.clone(),
                orphans: config.engine.orphans,
            }
            .run(events_rx, synced.clone(), shutdown.clone()),
        ),
    );

    // Status delivery outlives the scheduler, for a last flush. Both are
    // critical: either ending before shutdown stops the process.
    let outbox_stop = CancellationToken::new();
    let outbox_done = CancellationToken::new();
    spawn_critical(
        "status-outbox",
        Box::pin({
            let (outbox, metrics, stop) = (outbox.clone(), metrics.clone(), outbox_stop.clone());
            let done = outbox_done.clone().drop_guard();
            let backoff = Backoff {
                base: Duration::from_millis(500),
                max: Duration::from_secs(30),
            };
            let leadership = deps.leadership.clone();
            async move {
                outbox
                    .run_while(
                        move || leadership.is_leader(),
                        control_plane,
                        backoff,
                        16,
                        move |round, pending| metrics.status_round(round, pending),
                        stop,
                    )
                    .await;
                drop(done);
            }
        }),
    );

    let grace = config.engine.shutdown_grace;
    let scheduler_done = CancellationToken::new();
    spawn_critical(
        "scheduler",
        Box::pin({
            let (metrics, shutdown, synced) = (metrics.clone(), shutdown.clone(), synced.clone());
            let done = scheduler_done.clone().drop_guard();
            let leadership = deps.leadership.clone();
            let (term_context, term_desired, term_queue) =
                (context.clone(), desired.clone(), queue.clone());
            let term_outbox = outbox.clone();
            let term_observer = observer.clone();
            async move {
                let _done = done;
                // No create or terminate before the first full sync.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = synced.cancelled() => {}
                }
                let work_metrics = metrics.clone();
                let work = |id: EnvironmentId| {
                    let context = context.clone();
                    let metrics = work_metrics.clone();
                    async move {
                    let started = Instant::now();
                    let result = reconcile(&context, id).await;
                    let outcome = match &result {
                        Ok(_) => "ok",
                        Err(err) => {
                            tracing::warn!(error = %chain(err), retryable = err.is_retryable(), "reconcile failed");
                            err.metric_label()
                        }
                    };
                    metrics.reconciled(outcome, started.elapsed());
                    result
                }
                .instrument(tracing::info_span!("reconcile", env.id = %id))
                };
                let mut scheduler = scheduler;
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
                    let watcher = tokio::spawn({
                        let (leadership, term) = (leadership.clone(), term.clone());
                        async move {
                            while leadership.is_leader() && !term.is_cancelled() {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            term.cancel();
                        }
                    });
                    // The previous leader may have written since these were loaded.
                    while let Err(err) = term_context.reload_all().await {
                        tracing::warn!(error = %err, "cannot reload the records");
                        tokio::select! {
                            () = term.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    term_outbox.start_term(epoch);
                    // The standby's view of instances may predate the old leader's last launches.
                    if let Err(err) = term_observer.refresh().await {
                        tracing::warn!(error = %chain(&err), "cannot refresh the view of instances");
                    }
                    for id in term_desired
                        .present()
                        .into_iter()
                        .chain(term_context.recorded())
                    {
                        term_queue.enqueue(id);
                    }
                    let drained = scheduler
                        .run(&work, metrics.as_ref(), term.clone(), grace)
                        .await;
                    watcher.abort();
                    if shutdown.is_cancelled() {
                        // The outbox delivers what is pending, still leading.
                        tracing::info!(
                            finished = drained.finished,
                            aborted = drained.aborted,
                            "work queue drained"
                        );
                        return;
                    }
                    // Statuses not delivered by now are the next leader's to report.
                    term_outbox.clear();
                    tracing::info!(
                        finished = drained.finished,
                        aborted = drained.aborted,
                        "work queue drained"
                    );
                    tracing::warn!(epoch, "no longer leading: reconciling stopped");
                }
            }
        }),
    );

    let result = tokio::select! {
        () = shutdown.cancelled() => {
            health.set_stopping();
            tracing::info!("shutting down: no new work, draining in-flight reconciles");
            Ok(())
        }
        Some(Fatal { task, reason }) = failures.recv() => {
            tracing::error!(task, reason = %reason, "critical task ended; stopping");
            shutdown.cancel();
            Err(AppError::TaskEnded { task, reason })
        }
    };
    if result.is_err() {
        // A critical task died: stop now. What was in flight is safe to cut
        // (intent before side effect); the lease expires by itself.
        lease_stop.cancel();
        supervisor.wait(Duration::from_millis(200)).await;
        tracing::info!("stopped");
        return result;
    }
    // In-flight reconciles drain within the grace period.
    let _ = tokio::time::timeout(grace + Duration::from_secs(5), scheduler_done.cancelled()).await;
    session.calls.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), session.calls.wait()).await;
    outbox_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), outbox_done.cancelled()).await;
    lease_stop.cancel();
    supervisor.wait(Duration::from_secs(2)).await;
    tracing::info!("stopped");
    result
}

fn zones(subnets: &[Subnet]) -> Vec<String> {
    let mut zones: Vec<String> = subnets
        .iter()
        .map(|s| s.availability_zone.clone())
        .collect();
    zones.sort();
    zones.dedup();
    zones
}
