//! Wiring and lifetime: builds the parts from a [`Config`] and the adapters,
//! starts every long-lived task through the one [`Supervisor`] under one
//! cancellation token, and shuts down in order. What is reconciled, and
//! when, is the controller's ([`runner_core::controller`]).
//!
//! Shutdown: the root token stops the session, the informer and new work;
//! in-flight reconciles get the grace period; then the status outbox makes a
//! last delivery. A critical task that ends on its own, or panics, is fatal:
//! everything stops and [`run`] returns the reason.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runner_core::backoff::Backoff;
use runner_core::controller::Controller;
use runner_core::desired::Desired;
use runner_core::leader::{Leadership, Lease, run_lease};
use runner_core::model::Subnet;
use runner_core::observer::Observer;
use runner_core::outbox::Outbox;
use runner_core::reconcile::{Context, ReconcileSettings};
use runner_core::traits::{
    Compute, ControlPlane, EnvironmentSecrets, SecretStore, StateStore, TokenStore,
};
use runner_proto::pb::identity_service_client::IdentityServiceClient;
use runner_proto::pb::runner_service_client::RunnerServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::grpc::{self, Auth, GrpcControlPlane};
use crate::health::{self, Health, chain};
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

/// A session step's value; `None` when shutdown cancelled it.
fn established<T>(step: Result<T, SessionError>) -> Result<Option<T>, AppError> {
    match step {
        Ok(value) => Ok(Some(value)),
        Err(SessionError::Cancelled) => Ok(None),
        Err(err) => Err(AppError::Session(err)),
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

    // The health port first, so ECS sees the process alive while it starts.
    let listener = health::bind(config.health_listen)
        .await
        .map_err(AppError::Listen)?;
    if let Some(bound) = bound {
        let _ = bound.send(listener.local_addr().map_err(AppError::Listen)?);
    }
    let serve = health::serve(listener, health.clone(), metrics.clone(), shutdown.clone());
    supervisor.spawn_critical("health-port", async move {
        if let Err(err) = serve.await {
            tracing::error!(error = %err, "health port failed");
        }
    });

    let compute: Arc<dyn Compute> = Arc::new(InstrumentedCompute::new(
        deps.compute.clone(),
        metrics.clone(),
    ));
    let store = deps.store.clone();
    supervisor.spawn_critical(
        "health-monitor",
        health.clone().monitor(
            store.clone(),
            compute.clone(),
            config.engine.health_check_interval,
            shutdown.clone(),
        ),
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
    let Some(key) = established(session.credentials(&shutdown).await)? else {
        return Ok(());
    };
    scm.set_key(&key);
    if established(session.signup(&key, &shutdown).await)?.is_none() {
        return Ok(());
    }

    // The self-update state (or why there is none) goes with the first status.
    match extras.self_update {
        Some(parts) => supervisor.spawn_critical(
            "self-update",
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
        None => {
            health.set_detail("update_state", "unavailable");
            health.set_detail("update_message", "not running as an ECS service task");
        }
    }
    // The session runs before the setup checks, so that a broken setup
    // shows as DEGRADED in the control plane.
    supervisor.spawn_critical("heartbeat", session.clone().heartbeat(shutdown.clone()));
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
    let context = Arc::new(
        Context::new(
            store.clone(),
            compute.clone(),
            observer,
            Arc::new(Outbox::default()),
            Arc::new(Desired::default()),
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

    supervisor.spawn_critical(
        "scm-sync",
        crate::scm::scm_sync(
            scm.clone(),
            grpc_control_plane.clone(),
            scm_events_rx,
            config.engine.resync_interval,
            shutdown.clone(),
        ),
    );

    // The lease is released last, after the outbox's last delivery: a
    // status is only ever sent while leading.
    let lease_stop = CancellationToken::new();
    supervisor.spawn_critical("lease", {
        let (lease, leadership, stop) = (
            deps.lease.clone(),
            deps.leadership.clone(),
            lease_stop.clone(),
        );
        let timing = config.engine.lease;
        async move { run_lease(lease.as_ref(), &leadership, timing, stop).await }
    });

    let (events_tx, events_rx) = mpsc::channel(1024);
    supervisor.spawn_critical("watch", session.clone().watch(events_tx, shutdown.clone()));

    let grace = config.engine.shutdown_grace;
    let controller = Controller::new(
        context,
        deps.leadership.clone(),
        metrics.clone(),
        config.engine.concurrency,
        grace,
    );
    let synced = health.first_sync();
    let informer = controller.informer(
        control_plane.clone(),
        config.engine.resync_interval,
        config.engine.orphans,
    );
    supervisor.spawn_critical(
        "informer",
        informer.run(events_rx, synced.clone(), shutdown.clone()),
    );

    // Status delivery outlives the scheduler, for a last flush. Both are
    // critical: either ending before shutdown stops the process.
    let outbox_stop = CancellationToken::new();
    let statuses = controller.deliver_statuses(
        control_plane,
        move |round, pending| metrics.status_round(round, pending),
        outbox_stop.clone(),
    );
    let outbox_done = supervisor.spawn_critical_done("status-outbox", statuses);
    let scheduler_done =
        supervisor.spawn_critical_done("scheduler", controller.run(synced, shutdown.clone()));

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
