//! runnerd end to end: the real reference control plane over gRPC on
//! loopback, the daemon in-process, and in-memory fakes for AWS.

mod bad_input;
mod calls;
mod faults;
mod lifecycle;
mod logs;
mod scm;
mod trust;
mod urls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use control_plane::{ServerConfig, Settings, SystemClock};
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb;
use runnerd::app::{AppError, Deps};
use runnerd::config::{Cli, Config};
use testkit::fakes::{MemoryCompute, MemoryLease, MemorySecrets, MemoryStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];

/// A control plane with one runner and one class, and the fakes the runner
/// will use.
pub(crate) struct World {
    pub(crate) cp: Option<testkit::ControlPlane>,
    pub(crate) url: String,
    pub(crate) admin: AdminServiceClient<Channel>,
    pub(crate) runner_id: String,
    pub(crate) exchange_token: String,
    pub(crate) class_id: String,
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) compute: Arc<MemoryCompute>,
    pub(crate) secrets: Arc<MemorySecrets>,
    pub(crate) tokens: Arc<testkit::fakes::MemoryTokens>,
    pub(crate) environment_secrets: Arc<testkit::fakes::MemoryEnvironmentSecrets>,
    pub(crate) lease: Arc<MemoryLease>,
    pub(crate) claim: Arc<MemoryLease>,
    /// More daemon flags (e.g. `--ca-bundle`).
    pub(crate) extra_args: Vec<String>,
}

/// A running daemon.
pub(crate) struct Runner {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
    pub(crate) health: SocketAddr,
}

impl Runner {
    /// Sends the shutdown signal and waits for the daemon to return.
    pub(crate) async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("runnerd stops within 30 s")
            .expect("runnerd did not panic")
    }
}

impl World {
    pub(crate) async fn new() -> Self {
        let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
        let cp = testkit::ControlPlane::start(ServerConfig::default(), plane)
            .await
            .expect("start control plane");
        let channel = cp.channel().await.expect("connect");
        let mut admin = AdminServiceClient::new(channel);
        let created = admin
            .create_runner(admin::CreateRunnerRequest {
                name: "e2e".into(),
                region: "eu-west-1".into(),
            })
            .await
            .expect("create runner")
            .into_inner();
        let runner_id = created.runner.expect("runner").id;
        let class_id = admin
            .create_environment_class(admin::CreateEnvironmentClassRequest {
                runner_id: runner_id.clone(),
                display_name: "Small".into(),
                instance_type: "m7i.large".into(),
                disk_gib: 50,
            })
            .await
            .expect("create class")
            .into_inner()
            .id;
        Self {
            url: cp.url(),
            cp: Some(cp),
            admin,
            runner_id,
            class_id,
            secrets: Arc::new(MemorySecrets::with_exchange_token(&created.exchange_token)),
            tokens: Arc::default(),
            environment_secrets: Arc::default(),
            exchange_token: created.exchange_token,
            store: Arc::new(MemoryStore::default()),
            compute: Arc::new(MemoryCompute::with_zones(&ZONES)),
            lease: Arc::new(MemoryLease::default()),
            claim: Arc::new(MemoryLease::default()),
            extra_args: Vec::new(),
        }
    }

    pub(crate) fn config(&self) -> Config {
        let args = [
            "runnerd",
            "--runner-id",
            &self.runner_id,
            "--region",
            "eu-west-1",
            "--control-plane-url",
            &self.url,
            "--allow-plaintext",
            "--vpc-id",
            "vpc-0123456789abcdef0",
            "--subnet-ids",
            "subnet-0000000000000000a,subnet-0000000000000000b,subnet-0000000000000000c",
            "--security-group-id",
            "sg-0123456789abcdef0",
            "--instance-profile",
            "runner-env",
            "--ami",
            "ami-0123456789abcdef0",
            "--table",
            "runner-state",
            "--secret-id",
            "runner/credentials",
            "--kms-key-id",
            "alias/runner",
            "--health-listen",
            "127.0.0.1:0",
            "--poll-interval",
            "50ms",
            "--observe-interval",
            "20ms",
            "--resync-interval",
            "10s",
            "--health-check-interval",
            "100ms",
            "--shutdown-grace",
            "5s",
            "--control-plane-timeout",
            "5s",
            "--lease-ttl",
            "2s",
            "--lease-renew-interval",
            "200ms",
        ];
        // A flag in `extra_args` replaces the default one (and its value).
        let mut base = Vec::new();
        let mut skip_value = false;
        for arg in args {
            if skip_value && !arg.starts_with("--") {
                skip_value = false;
                continue;
            }
            skip_value = self.extra_args.iter().any(|a| a == arg);
            if !skip_value {
                base.push(arg.to_owned());
            }
        }
        Cli::try_parse_from(base.into_iter().chain(self.extra_args.iter().cloned()))
            .expect("parse")
            .daemon
            .validate()
            .expect("valid config")
    }

    pub(crate) async fn start_runner(&self) -> Runner {
        self.start_runner_with(Arc::new(runner_core::leader::Leadership::default()))
            .await
    }

    /// A runner whose leadership the test can watch.
    pub(crate) async fn start_runner_with(
        &self,
        leadership: Arc<runner_core::leader::Leadership>,
    ) -> Runner {
        let deps = Deps {
            store: self.store.clone(),
            compute: self.compute.clone(),
            secrets: self.secrets.clone(),
            lease: Arc::new(self.lease.handle(&uuid::Uuid::new_v4().to_string())),
            claim: Arc::new(self.claim.handle(&uuid::Uuid::new_v4().to_string())),
            leadership,
            tokens: self.tokens.clone(),
            environment_secrets: self.environment_secrets.clone(),
        };
        let shutdown = CancellationToken::new();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(runnerd::app::run(
            self.config(),
            deps,
            shutdown.clone(),
            Some(bound_tx),
        ));
        let health = bound_rx.await.expect("runnerd binds its health port");
        Runner {
            shutdown,
            task,
            health,
        }
    }

    pub(crate) async fn restart_control_plane(&mut self) {
        let cp = self
            .cp
            .take()
            .expect("running")
            .restart()
            .await
            .expect("restart");
        // The old connection died with the old server: a fresh one, so the
        // next admin call does not race its discovery.
        self.admin = AdminServiceClient::new(cp.channel().await.expect("connect"));
        self.cp = Some(cp);
    }

    pub(crate) fn create_request(&self, class_id: &str) -> admin::CreateEnvironmentRequest {
        admin::CreateEnvironmentRequest {
            runner_id: self.runner_id.clone(),
            environment_class_id: class_id.into(),
            content: Some(pb::EnvironmentContent {
                repository_url: "https://github.com/acme/api.git".into(),
                revision: Some(pb::environment_content::Revision::Branch("main".into())),
            }),
            creator: "alice".into(),
            name: String::new(),
            timeout: None,
            unchecked: false,
        }
    }

    pub(crate) async fn create_env(&self) -> String {
        self.create(self.create_request(&self.class_id)).await
    }

    pub(crate) async fn create(&self, request: admin::CreateEnvironmentRequest) -> String {
        self.admin
            .clone()
            .create_environment(request)
            .await
            .expect("create environment")
            .into_inner()
            .environment
            .expect("environment")
            .id
    }

    pub(crate) async fn set_phase(&self, id: &str, phase: pb::EnvironmentPhase) {
        self.admin
            .clone()
            .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
                environment_id: id.into(),
                desired_phase: phase as i32,
            })
            .await
            .expect("set desired phase");
    }

    pub(crate) async fn environments(&self) -> Vec<admin::Environment> {
        self.admin
            .clone()
            .list_environments(admin::ListEnvironmentsRequest {
                runner_id: self.runner_id.clone(),
            })
            .await
            .expect("list")
            .into_inner()
            .environments
    }

    pub(crate) async fn runner(&self) -> admin::Runner {
        self.admin
            .clone()
            .get_runner(admin::GetRunnerRequest {
                runner_id: self.runner_id.clone(),
            })
            .await
            .expect("get runner")
            .into_inner()
    }

    /// Polls the control plane until `done` holds for the listed
    /// environments, failing after `within`.
    pub(crate) async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[admin::Environment]) -> bool,
    ) -> Vec<admin::Environment> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let envs = self.environments().await;
            if done(&envs) {
                return envs;
            }
            if tokio::time::Instant::now() > deadline {
                let summary: Vec<String> = envs.iter().map(describe).collect();
                panic!(
                    "timed out waiting for {what}; environments:\n{}",
                    summary.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One line about an environment, for failure messages.
pub(crate) fn describe(env: &admin::Environment) -> String {
    let spec = spec(env);
    format!(
        "{} desired={:?} spec={} status={:?}",
        id(env),
        pb::EnvironmentPhase::try_from(spec.desired_phase),
        spec.spec_version,
        env.status.as_ref().map(|s| (
            pb::EnvironmentPhase::try_from(s.phase),
            s.status_version,
            s.runner_ack.as_ref().map(|a| a.spec_version),
            s.failure_message.clone()
        ))
    )
}

pub(crate) fn id(env: &admin::Environment) -> String {
    env.environment.as_ref().expect("environment").id.clone()
}

pub(crate) fn spec(env: &admin::Environment) -> pb::EnvironmentSpec {
    env.environment
        .as_ref()
        .and_then(|e| e.spec.clone())
        .expect("spec")
}

/// Reported `phase` and acknowledged the current spec.
pub(crate) fn settled(env: &admin::Environment, phase_wanted: pb::EnvironmentPhase) -> bool {
    let spec_version = spec(env).spec_version;
    env.status.as_ref().is_some_and(|s| {
        s.phase == phase_wanted as i32
            && s.runner_ack
                .as_ref()
                .is_some_and(|a| a.spec_version == spec_version)
    })
}

/// Fetches `path` from the health port with a plain HTTP/1.0 request.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the health port");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}
