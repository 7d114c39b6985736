//! Wiring: builds the parts from a [`Config`] and the adapters and starts
//! every long-lived task through the one [`Supervisor`] under one
//! cancellation token; [`crate::shutdown`] stops them in order. What is
//! reconciled, and when, is the controller's ([`runner_core::controller`]);
//! the control plane is reached through one [`Client`]. A critical task
//! that ends on its own, or panics, is fatal: everything stops and [`run`]
//! returns the reason.

use std::sync::Arc;

use runner_core::controller::Controller;
use runner_core::leader::run_lease;
use runner_core::observer::Observer;
use runner_core::reconcile::{Context, ReconcileSettings};
use runner_core::traits::{Compute, StateStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control_plane::{Calls, Client};
pub use crate::deps::{Deps, Extras};
pub use crate::error::AppError;
use crate::health::Health;
use crate::scm::Scm;
use crate::session::Session;
use crate::shutdown::{Stages, run_until_stopped};
pub use crate::startup::BoundAddr;
use crate::startup::{health_port, on_own_thread, until_done};
use crate::supervisor::Supervisor;
use crate::telemetry::emf;
use crate::telemetry::sample::{Sources, watch_leadership};
use crate::telemetry::{InstrumentedCompute, InstrumentedStore, Metrics};
use crate::update::Updater;

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
    let health = Arc::new(Health::default().with_leadership(deps.leadership.clone()));
    let (supervisor, failures) = Supervisor::new(shutdown.clone(), health.clone());
    let stop = shutdown.clone();

    // The health port first, so ECS sees the process alive while it starts.
    let port = health_port(config.health_listen, bound, &health, &metrics, &stop).await;
    supervisor.spawn_critical("health-port", port.map_err(AppError::Listen)?);
    // Compute is probed only when no EC2 call answered for half a resync
    // interval: in steady state, the resync's describe pages are the proof.
    let every = config.engine.health_check_interval;
    let fresh_for = every.max(config.engine.resync_interval / 2);
    let instrumented = InstrumentedCompute::new(deps.compute.clone(), metrics.clone(), fresh_for);
    let compute: Arc<dyn Compute> = Arc::new(instrumented);
    let store: Arc<dyn StateStore> =
        Arc::new(InstrumentedStore::new(deps.store.clone(), metrics.clone()));
    let monitor = health
        .clone()
        .monitor(store.clone(), compute.clone(), every, stop.clone());
    supervisor.spawn_critical("health-monitor", monitor);

    let client = Client::new(&config.control_plane)?;
    let scm_client = crate::scm::http_client(&config).map_err(AppError::Scm)?;
    let (tokens, secrets) = (deps.tokens.clone(), deps.environment_secrets.clone());
    let scm = Arc::new(Scm::new(tokens, secrets, scm_client));
    let types = config.placement.allowed_instance_types.clone();
    let calls = Calls::new(client.clone(), scm.clone(), compute.clone(), types.clone());
    let calls = Arc::new(calls);
    let (session, scm_events) = Session::new(
        &config,
        client.clone(),
        &deps,
        calls.clone(),
        health.clone(),
        metrics.clone(),
    );
    let session =
        Arc::new(session.with_self_update(extras.self_update.is_some() && config.update.enabled));
    let Some(key) = session
        .establish(&shutdown)
        .await
        .map_err(AppError::Session)?
    else {
        return Ok(());
    };
    scm.set_key(&key);

    // The self-update state (or why there is none) goes with the first status.
    let (releases, leadership) = (Arc::new(client.clone()), deps.leadership.clone());
    let updater = Updater::start(
        extras.self_update,
        releases,
        leadership,
        health.clone(),
        config.update,
    );
    if let Some(updater) = updater {
        supervisor.spawn_critical("self-update", updater.run(stop.clone()));
    }
    // The session runs before the setup checks, so that a broken setup
    // shows as DEGRADED in the control plane. The watch stream opens before
    // the reads below, whose time grows with the fleet: readiness waits for
    // the stream, not for them, and its events queue until the informer runs.
    supervisor.spawn_critical("heartbeat", session.clone().heartbeat(stop.clone()));
    let (events_tx, events_rx) = mpsc::channel(1024);
    supervisor.spawn_critical("watch", session.watch(events_tx, stop.clone()));
    if let Some(doctor) = extras.doctor {
        supervisor.spawn("setup-checks", doctor.watch(health.clone(), stop.clone()));
    }
    // The lease is released last, after the outbox's last delivery: a
    // status is only ever sent while leading. It is campaigned for before
    // the records load, since readiness waits for it and not for them, and
    // on its own thread and DynamoDB client: bulk work never delays a renewal.
    let lease_stop = CancellationToken::new();
    let stopped = lease_stop.clone();
    let released_on_early_return = lease_stop.drop_guard();
    let (lease, leadership, timing) = (
        deps.lease.clone(),
        deps.leadership.clone(),
        config.engine.lease,
    );
    let lease_task = async move { run_lease(lease.as_ref(), &leadership, timing, stopped).await };
    supervisor.spawn_critical("lease", on_own_thread("lease", lease_task));

    // The lease's first answer before the bulk reads below, which would
    // share the store's capacity with it (a few seconds at most).
    let decided = deps.leadership.clone();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), decided.decided()).await;
    let placement = "check the VPC, subnets and security group";
    let subnet_ids = &config.placement.subnet_ids;
    let Some(subnets) = until_done(placement, &health, &stop, || compute.subnets(subnet_ids)).await
    else {
        return Ok(());
    };
    calls.set_subnets(&subnets);
    let Some(records) =
        until_done("load the runner's records", &health, &stop, || store.list()).await
    else {
        return Ok(());
    };
    tracing::info!(
        records = records.len(),
        subnets = subnets.len(),
        "state loaded"
    );

    let engine = &config.engine;
    let resync = engine.resync_interval;
    let observer = Arc::new(Observer::new(compute.clone(), engine.observe_interval));
    let settings = ReconcileSettings {
        poll: engine.poll_interval,
        resync,
        auth_retry: engine.poll_interval * 5,
        content_deadline: engine.content_deadline,
        ..ReconcileSettings::default()
    };
    let (outbox, desired) = (Arc::default(), Arc::default());
    let context = Context::new(
        store, compute, observer, outbox, desired, subnets, settings, records,
    )
    .with_checkout(scm.clone())
    .with_instance_types(types)
    .with_start_observer(metrics.clone());
    let sources = Sources {
        health: health.clone(),
        leadership: deps.leadership.clone(),
        outbox: context.outbox.clone(),
    };
    let (id, every) = (config.runner_id.clone(), config.metrics_interval);
    let records = emf::run(metrics.clone(), sources, id, every, stop.clone());
    supervisor.spawn("metrics-records", records);
    let changes = watch_leadership(&deps.leadership, metrics.clone(), stop.clone());
    supervisor.spawn("leadership-metrics", changes);
    let scm_sync = crate::scm::scm_sync(scm, client.clone(), scm_events, resync, stop.clone());
    supervisor.spawn_critical("scm-sync", scm_sync);

    let (leadership, grace) = (deps.leadership.clone(), engine.shutdown_grace);
    let context = Arc::new(context);
    let controller = Controller::new(
        context,
        leadership,
        metrics.clone(),
        engine.concurrency,
        grace,
    );
    // The informer's first full sync of what the control plane wants.
    let synced = CancellationToken::new();
    let control_plane = Arc::new(client);
    let informer = controller.informer(control_plane.clone(), resync, engine.orphans);
    let informer = informer.run(events_rx, synced.clone(), stop.clone());
    supervisor.spawn_critical("informer", informer);

    // Status delivery outlives the scheduler, for a last flush. Both are
    // critical: either ending before shutdown stops the process.
    let outbox_stop = CancellationToken::new();
    let on_round = move |round, pending| metrics.status_round(round, pending);
    let statuses = controller.deliver_statuses(control_plane, on_round, outbox_stop.clone());
    let outbox_done = supervisor.spawn_critical_done("status-outbox", statuses);
    let scheduler_done = supervisor.spawn_critical_done("scheduler", controller.run(synced, stop));

    let stages = Stages {
        scheduler_done,
        grace,
        calls,
        outbox_stop,
        outbox_done,
        lease_stop: released_on_early_return.disarm(),
    };
    run_until_stopped(&shutdown, failures, &health, &supervisor, stages).await
}
