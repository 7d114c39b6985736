//! The runner daemon: configuration, wiring, the control-plane session, the
//! health and metrics port, self-update, `runnerd doctor`, and shutdown.
//! Policy, the controller included, lives in `runner-core`; this crate
//! connects it to gRPC and to the adapters.

pub mod app;
pub mod config;
pub mod control_plane;
pub mod deps;
pub mod doctor;
pub mod error;
pub mod health;
pub mod scm;
pub mod session;
pub mod shutdown;
pub mod startup;
pub mod supervisor;
pub mod telemetry;
pub mod update;

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Runs the daemon on AWS until SIGTERM or SIGINT (a second signal exits at
/// once); returns the process's exit code.
pub async fn daemon(config: config::Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signals(shutdown.clone()));
    let sdk = runner_aws::sdk_config(&config.region).await;
    let deps = aws_deps_with(&sdk, &config);
    let extras = aws_extras(&sdk, &config, ecs_metadata_uri().as_deref());
    match app::run_with(config, deps, extras, shutdown, None).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %health::chain(&err), "runnerd stopped");
            ExitCode::FAILURE
        }
    }
}

/// This replica's name in the leader lease: the ECS task when there is one,
/// and a random suffix so that two processes never share a name.
pub fn holder_name() -> String {
    let task = std::env::var("ECS_CONTAINER_METADATA_URI_V4")
        .ok()
        .and_then(|uri| uri.rsplit('/').next().map(str::to_owned))
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    let suffix: u32 = rand::random();
    format!("{task}-{suffix:08x}")
}

/// The AWS adapters for `config` on a given SDK configuration.
pub fn aws_deps_with(sdk: &runner_aws::SdkConfig, config: &config::Config) -> deps::Deps {
    let leadership = std::sync::Arc::new(runner_core::leader::Leadership::default());
    let settings = runner_aws::AdapterSettings {
        table: config.table.clone(),
        runner_id: config.runner_id.clone(),
        holder: holder_name(),
        secret_id: config.secret_id.clone(),
        exchange_token_secret_id: config.exchange_token_secret_id.clone(),
        kms_key_id: config.kms_key_id.clone(),
        ec2: runner_aws::ec2::Ec2Settings {
            runner_id: config.runner_id.clone(),
            region: config.region.clone(),
            vpc_id: config.placement.vpc_id.clone(),
            security_group_id: config.placement.security_group_id.clone(),
            instance_profile: config.placement.instance_profile.clone(),
            ami: config.placement.ami.clone(),
            describe_page_size: config.rate_limits.describe_page_size,
            launch_rate: (
                config.rate_limits.launch_rate,
                config.rate_limits.launch_burst,
            ),
            mutate_rate: (
                config.rate_limits.mutate_rate,
                config.rate_limits.mutate_burst,
            ),
            describe_rate: config.rate_limits.describe_rate,
        },
    };
    let adapters = runner_aws::adapters(sdk, &settings, &leadership);
    let lease = runner_aws::lease(sdk, &settings, &leadership);
    deps::Deps {
        store: adapters.store.clone(),
        compute: adapters.compute,
        secrets: adapters.secrets,
        tokens: adapters.tokens,
        environment_secrets: adapters.environment_secrets,
        claim: std::sync::Arc::new(adapters.store.credential_claim()),
        lease,
        leadership,
    }
}

/// The task metadata endpoint, when running in an ECS task (read at start).
pub fn ecs_metadata_uri() -> Option<String> {
    std::env::var("ECS_CONTAINER_METADATA_URI_V4")
        .ok()
        .filter(|uri| !uri.is_empty())
}

/// The start checks and, in an ECS task (`ecs_metadata_uri`), self-update.
pub fn aws_extras(
    sdk: &runner_aws::SdkConfig,
    config: &config::Config,
    ecs_metadata_uri: Option<&str>,
) -> deps::Extras {
    let deployer = ecs_metadata_uri.map(|uri| runner_aws::ecs_deployer(sdk, uri));
    deps::Extras {
        doctor: Some(std::sync::Arc::new(doctor::Doctor::new(
            sdk,
            config,
            deployer.clone(),
        ))),
        self_update: deployer.map(|deployer| update::SelfUpdate {
            deployer,
            attempts: runner_aws::update_attempts(sdk, &config.table, &config.runner_id),
            running: session::VERSION.to_owned(),
        }),
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; exits at once on the second.
pub async fn shutdown_on_signals(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            return;
        }
    };
    for count in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if count == 0 {
            tracing::info!("signal received: shutting down (again to exit at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
