//! The runner daemon: configuration, wiring, the control-plane session, the
//! informer, the health and metrics port, and shutdown. Policy lives in
//! `runner-core`; this crate connects it to gRPC and to the adapters.

pub mod app;
pub mod config;
pub mod grpc;
pub mod health;
pub mod informer;
pub mod session;
pub mod telemetry;

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Runs the daemon on AWS until SIGTERM or SIGINT (a second signal exits at
/// once); returns the process's exit code.
pub async fn daemon(config: config::Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signals(shutdown.clone()));
    let deps = match aws_deps(&config).await {
        Ok(deps) => deps,
        Err(err) => {
            tracing::error!(error = %err, "cannot set up the AWS clients");
            return ExitCode::FAILURE;
        }
    };
    match app::run(config, deps, shutdown, None).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %health::chain(&err), "runnerd stopped");
            ExitCode::FAILURE
        }
    }
}

async fn aws_deps(_config: &config::Config) -> Result<app::Deps, String> {
    Err("the AWS adapters are not part of this build yet".to_owned())
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
