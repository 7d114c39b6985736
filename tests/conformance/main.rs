//! Protocol conformance: drives the reference control plane through the
//! generated clients over real gRPC on loopback and asserts each rule of
//! `runner.v1` and of the admin API.

mod environments;
mod host_tokens;
mod identity;
mod limits;
mod runners;
mod stream;
mod tls;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use control_plane::{ManualClock, ServerConfig, Settings};
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb::{self, identity_service_client::IdentityServiceClient};
use testkit::RunnerClient;
use tonic::transport::Channel;

/// A control plane with a hand-moved clock, and clients for it.
pub(crate) struct Fixture {
    pub(crate) cp: testkit::ControlPlane,
    pub(crate) clock: ManualClock,
    pub(crate) admin: AdminServiceClient<Channel>,
    pub(crate) identity: IdentityServiceClient<Channel>,
    pub(crate) channel: Channel,
}

/// A runner that has exchanged its token (and, with `signed_up`, signed up).
pub(crate) struct TestRunner {
    pub(crate) id: String,
    pub(crate) access_token: String,
    pub(crate) client: RunnerClient,
    pub(crate) secret_key: crypto_box::SecretKey,
}

impl Fixture {
    pub(crate) async fn new() -> Self {
        Self::with_config(ServerConfig::default()).await
    }

    pub(crate) async fn with_config(config: ServerConfig) -> Self {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(clock.clone()));
        let cp = testkit::ControlPlane::start(config, plane)
            .await
            .expect("start control plane");
        let channel = cp.channel().await.expect("connect");
        Self {
            admin: AdminServiceClient::new(channel.clone()),
            identity: IdentityServiceClient::new(channel.clone()),
            channel,
            cp,
            clock,
        }
    }

    /// Creates a runner in eu-west-1 and returns its id and exchange token.
    pub(crate) async fn create_runner(&self, name: &str) -> (String, String) {
        let created = self
            .admin
            .clone()
            .create_runner(admin::CreateRunnerRequest {
                name: name.into(),
                region: "eu-west-1".into(),
            })
            .await
            .expect("create runner")
            .into_inner();
        (created.runner.expect("runner").id, created.exchange_token)
    }

    /// Creates, exchanges and signs up a runner.
    pub(crate) async fn runner(&self, name: &str) -> TestRunner {
        let runner = self.exchanged_runner(name).await;
        let mut client = runner.client.clone();
        client
            .signup(signup_request(runner.secret_key.public_key().as_bytes()))
            .await
            .expect("signup");
        runner
    }

    /// Creates a runner and exchanges its token, without signing up.
    pub(crate) async fn exchanged_runner(&self, name: &str) -> TestRunner {
        let (id, exchange_token) = self.create_runner(name).await;
        let access_token = self
            .identity
            .clone()
            .exchange_token(pb::ExchangeTokenRequest {
                public_key: Vec::new(),
                exchange_token,
            })
            .await
            .expect("exchange")
            .into_inner()
            .access_token;
        TestRunner {
            client: testkit::runner_client(self.channel.clone(), &access_token),
            id,
            access_token,
            secret_key: crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng),
        }
    }

    /// Creates an enabled class for `runner_id`.
    pub(crate) async fn class(&self, runner_id: &str) -> pb::EnvironmentClass {
        self.admin
            .clone()
            .create_environment_class(admin::CreateEnvironmentClassRequest {
                runner_id: runner_id.into(),
                display_name: "Small".into(),
                instance_type: "m7i.large".into(),
                disk_gib: 50,
            })
            .await
            .expect("create class")
            .into_inner()
    }

    /// Creates an environment on `runner_id` with `class_id`.
    pub(crate) async fn environment(&self, runner_id: &str, class_id: &str) -> admin::Environment {
        self.admin
            .clone()
            .create_environment(create_environment_request(runner_id, class_id))
            .await
            .expect("create environment")
            .into_inner()
    }

    /// Sets an environment's desired phase.
    pub(crate) async fn set_phase(
        &self,
        env_id: &str,
        phase: pb::EnvironmentPhase,
    ) -> admin::Environment {
        self.admin
            .clone()
            .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
                environment_id: env_id.into(),
                desired_phase: phase as i32,
            })
            .await
            .expect("set desired phase")
            .into_inner()
    }
}

pub(crate) fn signup_request(public_key: &[u8]) -> pb::SignupRequest {
    pb::SignupRequest {
        public_key: public_key.to_vec(),
        version: "0.1.0".into(),
        region: "eu-west-1".into(),
        capabilities: vec![pb::RunnerCapability::StopStart as i32],
        environment_class_schema: r#"{"type":"object"}"#.into(),
        scm_providers: vec![pb::ScmProvider {
            kind: pb::ScmKind::Github as i32,
            auth_methods: vec![pb::AuthMethod::Pat as i32],
            self_hosted: true,
        }],
    }
}

pub(crate) fn create_environment_request(
    runner_id: &str,
    class_id: &str,
) -> admin::CreateEnvironmentRequest {
    admin::CreateEnvironmentRequest {
        runner_id: runner_id.into(),
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

/// The environment's id.
pub(crate) fn env_id(env: &admin::Environment) -> String {
    env.environment.as_ref().expect("environment").id.clone()
}

/// The environment's spec.
pub(crate) fn spec(env: &admin::Environment) -> pb::EnvironmentSpec {
    env.environment
        .as_ref()
        .and_then(|e| e.spec.clone())
        .expect("spec")
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub(crate) fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(value) => panic!("expected {code:?} containing {needle:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "unexpected code; message: {}",
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "message {:?} does not contain {needle:?}",
                status.message()
            );
        }
    }
}
