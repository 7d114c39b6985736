//! runnerd on emulated AWS: in-process under injected faults, and as two
//! real processes sharing one table, the leader frozen past its lease.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use control_plane::{ServerConfig, Settings, SystemClock};
use runner_aws::ec2::{TAG_ENVIRONMENT, TAG_RUNNER};
use runner_core::report;
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb::{self, EnvironmentPhase as Phase};
use testkit::proxy::{Fault, FaultProxy, Rule};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{Infra, moto_url, sdk};

/// A control plane with a runner and a class, and that runner's AWS resources.
pub(crate) struct World {
    pub(crate) cp: tokio::sync::Mutex<Option<testkit::ControlPlane>>,
    pub(crate) plane: Arc<control_plane::ControlPlane>,
    /// Held (shared) by admin calls, (exclusive) by a control-plane restart,
    /// so that no admin call is cut: its outcome would be unknown.
    pub(crate) gate: tokio::sync::RwLock<()>,
    cp_url: String,
    pub(crate) admin: AdminServiceClient<Channel>,
    pub(crate) class_id: String,
    pub(crate) infra: Infra,
    pub(crate) sdk: aws_config::SdkConfig,
    /// The stand-in for the instances' bootstrap, when there is one.
    _bootstraps: Option<AbortOnDrop>,
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// moto runs no user data: this stands in for every instance's bootstrap
/// finishing at once, tagging each running instance of the runner that has
/// not reported yet as ready (what `deploy/bootstrap.sh` writes on a good
/// clone), one `CreateTags` for all of them every 200 ms. The bootstrap
/// itself runs for real in `checkout.rs` and `content.rs`.
async fn bootstraps_succeed(sdk: aws_config::SdkConfig, runner_id: String) {
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(pages) = ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{TAG_RUNNER}"))
                    .values(&runner_id)
                    .build(),
            )
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .send()
            .await
        else {
            continue;
        };
        let silent: Vec<String> = pages
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| !i.tags().iter().any(|t| t.key() == Some(report::TAG_STAGE)))
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        if silent.is_empty() {
            continue;
        }
        let _ = report_ready(&ec2, silent).await;
    }
}

/// Tags the instances as a bootstrap that checked out commit 0…0 would.
pub(crate) async fn report_ready(
    ec2: &aws_sdk_ec2::Client,
    instance_ids: Vec<String>,
) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        .to_string();
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    ec2.create_tags()
        .set_resources(Some(instance_ids))
        .tags(tag(report::TAG_STAGE, "ready"))
        .tags(tag(report::TAG_RESULT, "ok"))
        .tags(tag(report::TAG_AT, &now))
        .tags(tag(report::TAG_STARTED_AT, &now))
        .tags(tag(report::TAG_COMMIT, &"0".repeat(40)))
        .send()
        .await
        .map(drop)
        .map_err(|e| format!("{e:?}"))
}

impl World {
    pub(crate) async fn new() -> Self {
        Self::on(&moto_url()).await
    }

    /// A world whose AWS is the emulator at `aws`, where every instance's
    /// bootstrap succeeds at once.
    pub(crate) async fn on(aws: &str) -> Self {
        let mut world = Self::silent(aws).await;
        let task = tokio::spawn(bootstraps_succeed(
            world.sdk.clone(),
            world.infra.runner_id.clone(),
        ));
        world._bootstraps = Some(AbortOnDrop(task.abort_handle()));
        world
    }

    /// A world whose instances report nothing but what the test makes them.
    pub(crate) async fn silent(aws: &str) -> Self {
        let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
        let cp = testkit::ControlPlane::start(ServerConfig::default(), plane.clone())
            .await
            .expect("control plane");
        let mut admin = AdminServiceClient::new(cp.channel().await.expect("connect"));
        let created = admin
            .create_runner(admin::CreateRunnerRequest {
                name: "moto".into(),
                region: crate::REGION.into(),
            })
            .await
            .expect("create runner")
            .into_inner();
        let runner_id = created.runner.expect("runner").id;
        let class_id = admin
            .create_environment_class(admin::CreateEnvironmentClassRequest {
                runner_id: runner_id.clone(),
                display_name: "Small".into(),
                instance_type: "m5.large".into(),
                disk_gib: 30,
            })
            .await
            .expect("class")
            .into_inner()
            .id;
        let sdk = sdk(aws).await;
        let infra = Infra {
            runner_id,
            ..Infra::create(&sdk).await
        };
        aws_sdk_secretsmanager::Client::new(&sdk)
            .put_secret_value()
            .secret_id(&infra.secret_id)
            .secret_string(&created.exchange_token)
            .send()
            .await
            .expect("the stack's secret");
        Self {
            cp_url: cp.url(),
            cp: tokio::sync::Mutex::new(Some(cp)),
            gate: tokio::sync::RwLock::new(()),
            plane,
            admin,
            class_id,
            infra,
            sdk,
            _bootstraps: None,
        }
    }

    /// `RUNNER_*` settings for this world.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        [
            ("RUNNER_ID", self.infra.runner_id.clone()),
            ("RUNNER_REGION", crate::REGION.to_owned()),
            ("RUNNER_CONTROL_PLANE_URL", self.cp_url.clone()),
            ("RUNNER_ALLOW_PLAINTEXT", "true".to_owned()),
            ("RUNNER_VPC_ID", self.infra.vpc_id.clone()),
            ("RUNNER_SUBNET_IDS", self.infra.subnet_ids().join(",")),
            (
                "RUNNER_SECURITY_GROUP_ID",
                self.infra.security_group_id.clone(),
            ),
            (
                "RUNNER_INSTANCE_PROFILE",
                "aws-runner-environment".to_owned(),
            ),
            ("RUNNER_AMI", self.infra.ami.clone()),
            ("RUNNER_TABLE", self.infra.table.clone()),
            ("RUNNER_SECRET_ID", self.infra.secret_id.clone()),
            ("RUNNER_KMS_KEY_ID", self.infra.kms_key_id.clone()),
            ("RUNNER_HEALTH_LISTEN", "127.0.0.1:0".to_owned()),
            ("RUNNER_POLL_INTERVAL", "200ms".to_owned()),
            ("RUNNER_OBSERVE_INTERVAL", "200ms".to_owned()),
            ("RUNNER_RESYNC_INTERVAL", "20s".to_owned()),
            ("RUNNER_HEALTH_CHECK_INTERVAL", "1s".to_owned()),
            ("RUNNER_LEASE_TTL", "5s".to_owned()),
            ("RUNNER_LEASE_RENEW_INTERVAL", "1s".to_owned()),
            ("RUNNER_SHUTDOWN_GRACE", "5s".to_owned()),
            ("RUNNER_EC2_LAUNCH_RATE", "20".to_owned()),
            ("RUNNER_EC2_LAUNCH_BURST", "10".to_owned()),
            ("RUNNER_EC2_MUTATE_RATE", "20".to_owned()),
            ("RUNNER_EC2_DESCRIBE_RATE", "20".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub(crate) async fn create_envs(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let _open = self.gate.read().await;
            let env = self
                .admin
                .clone()
                .create_environment(admin::CreateEnvironmentRequest {
                    runner_id: self.infra.runner_id.clone(),
                    environment_class_id: self.class_id.clone(),
                    content: Some(pb::EnvironmentContent {
                        repository_url: "https://github.com/acme/api.git".into(),
                        revision: None,
                    }),
                    creator: "alice".into(),
                    name: String::new(),
                    timeout: None,
                    unchecked: false,
                })
                .await
                .expect("create environment")
                .into_inner();
            ids.push(env.environment.expect("environment").id);
        }
        ids
    }

    pub(crate) async fn set_phase(&self, id: &str, phase: Phase) {
        let _open = self.gate.read().await;
        self.admin
            .clone()
            .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
                environment_id: id.into(),
                desired_phase: phase as i32,
            })
            .await
            .expect("set phase");
    }

    /// The runner as the control plane sees it.
    pub(crate) async fn runner(&self) -> admin::Runner {
        self.admin
            .clone()
            .get_runner(admin::GetRunnerRequest {
                runner_id: self.infra.runner_id.clone(),
            })
            .await
            .expect("runner")
            .into_inner()
    }

    /// Waits at most `within` for the runner to satisfy `done`; fails naming `what`.
    pub(crate) async fn runner_when(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&admin::Runner) -> bool,
    ) -> admin::Runner {
        let deadline = Instant::now() + within;
        loop {
            let runner = self.runner().await;
            if done(&runner) {
                return runner;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {runner:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The runner's public key, once it has signed up.
    pub(crate) async fn public_key(&self) -> Vec<u8> {
        self.runner_when("the runner to sign up", Duration::from_secs(60), |r| {
            !r.public_key.is_empty()
        })
        .await
        .public_key
    }

    pub(crate) async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[admin::Environment]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let envs = self
                .admin
                .clone()
                .list_environments(admin::ListEnvironmentsRequest {
                    runner_id: self.infra.runner_id.clone(),
                })
                .await
                .expect("list")
                .into_inner()
                .environments;
            if done(&envs) {
                return;
            }
            if Instant::now() > deadline {
                let failures: Vec<String> = envs
                    .iter()
                    .filter_map(|e| e.status.as_ref())
                    .filter(|s| !s.failure_message.is_empty())
                    .map(|s| s.failure_message.clone())
                    .take(3)
                    .collect();
                let phases: Vec<Option<i32>> = envs
                    .iter()
                    .map(|e| e.status.as_ref().map(|s| s.phase))
                    .collect();
                panic!("timed out waiting for {what}: phases {phases:?}, failures {failures:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every instance tagged with this runner, as EC2 describes it.
    async fn raw_instances(&self) -> Vec<aws_sdk_ec2::types::Instance> {
        let pages: Vec<_> = aws_sdk_ec2::Client::new(&self.sdk)
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{TAG_RUNNER}"))
                    .values(&self.infra.runner_id)
                    .build(),
            )
            .max_results(100)
            .into_paginator()
            .send()
            .collect::<Vec<_>>()
            .await;
        pages
            .into_iter()
            .flat_map(|page| page.expect("describe").reservations.unwrap_or_default())
            .flat_map(|r| r.instances.unwrap_or_default())
            .collect()
    }

    /// Every instance tagged with this runner, any state: (environment, instance, zone, state).
    pub(crate) async fn instances(&self) -> Vec<(String, String, String, String)> {
        self.raw_instances()
            .await
            .iter()
            .map(|i| {
                let env = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(TAG_ENVIRONMENT))
                    .and_then(|t| t.value())
                    .unwrap_or_default();
                (
                    env.to_owned(),
                    i.instance_id().unwrap_or_default().to_owned(),
                    i.placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or_default()
                        .to_owned(),
                    i.state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Every instance tagged with this runner: its id and client token.
    pub(crate) async fn client_tokens(&self) -> HashMap<String, String> {
        self.raw_instances()
            .await
            .into_iter()
            .map(|i| {
                (
                    i.instance_id.unwrap_or_default(),
                    i.client_token.unwrap_or_default(),
                )
            })
            .collect()
    }

    async fn one_instance_each(&self, expected: usize) -> Vec<(String, String, String, String)> {
        let instances = self.instances().await;
        let mut per_env: HashMap<&str, usize> = HashMap::new();
        for (env, ..) in &instances {
            *per_env.entry(env).or_default() += 1;
        }
        assert_eq!(per_env.len(), expected, "environments with instances");
        assert!(
            per_env.values().all(|n| *n == 1),
            "an environment has two instances: {per_env:?}"
        );
        instances
    }
}

/// A validated configuration from `RUNNER_*` pairs, as flags.
fn config(env: impl IntoIterator<Item = (String, String)>) -> runnerd::config::Config {
    let mut argv = vec!["runnerd".to_owned()];
    for (k, v) in env {
        let flag = format!(
            "--{}",
            k.trim_start_matches("RUNNER_")
                .to_lowercase()
                .replace('_', "-")
        );
        let flag = if flag == "--id" {
            "--runner-id".to_owned()
        } else {
            flag
        };
        if v == "true" {
            argv.push(flag);
        } else {
            argv.extend([flag, v]);
        }
    }
    runnerd::config::Cli::try_parse_from(argv)
        .expect("parse")
        .daemon
        .validate()
        .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_setup_reports_degraded_naming_the_resource_and_launches_nothing() {
    let world = World::new().await;
    let wrong_group = world.infra.foreign_security_group.clone();
    let env = world.env().into_iter().map(|(k, v)| {
        if k == "RUNNER_SECURITY_GROUP_ID" {
            (k, wrong_group.clone())
        } else {
            (k, v)
        }
    });
    let shutdown = CancellationToken::new();
    let config = config(env);
    let deps = runnerd::aws_deps_with(&world.sdk, &config);
    let daemon = tokio::spawn(runnerd::app::run(config, deps, shutdown.clone(), None));
    world.create_envs(1).await;
    let runner = world
        .runner_when("DEGRADED", Duration::from_secs(60), |r| {
            r.phase == admin::RunnerPhase::Degraded as i32
        })
        .await;
    assert!(
        runner.degraded_message.contains(&wrong_group),
        "{}",
        runner.degraded_message
    );
    assert!(
        runner
            .degraded_message
            .starts_with("setup: check the VPC, subnets and security group"),
        "{}",
        runner.degraded_message
    );
    assert!(world.instances().await.is_empty(), "nothing launched");
    shutdown.cancel();
    daemon.await.expect("join").expect("clean stop");
}

pub(crate) fn settled(env: &admin::Environment, phase: Phase) -> bool {
    let spec_version = env
        .environment
        .as_ref()
        .and_then(|e| e.spec.as_ref())
        .map_or(0, |s| s.spec_version);
    env.status.as_ref().is_some_and(|s| {
        s.phase == phase as i32
            && s.runner_ack
                .as_ref()
                .is_some_and(|a| a.spec_version == spec_version)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_environments_run_under_throttling_with_one_zone_out_of_capacity() {
    let world = World::new().await;
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let exhausted = world.infra.subnets[0].clone();
    proxy.set_rules(vec![
        Rule {
            operations: vec!["RunInstances".into()],
            rate: 1.0,
            fault: Fault::NoCapacityInSubnet(exhausted.0.clone()),
        },
        Rule {
            operations: Vec::new(),
            rate: 0.2,
            fault: Fault::Throttle,
        },
    ]);
    let through = sdk(&proxy.url()).await;
    // Production lease timing: a 2 s lease renewed through 20 % throttling
    // would flap, which is not what this test is about.
    let config = config(
        world
            .env()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("RUNNER_LEASE_")),
    );
    let deps = runnerd::aws_deps_with(&through, &config);
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(runnerd::app::run(config, deps, shutdown.clone(), None));

    world.create_envs(100).await;
    world
        .wait_for("100 RUNNING", Duration::from_secs(240), |envs| {
            envs.len() == 100 && envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    world.one_instance_each(100).await;
    // Each environment refused in the exhausted zone moved on: its next
    // attempt went elsewhere, never again into that subnet.
    let refused = exhausted_attempts(&proxy.launches(), &exhausted.0);
    assert!(!refused.is_empty(), "no launch met the exhausted zone");
    for (environment, attempts) in &refused {
        assert_eq!(
            attempts.len(),
            1,
            "{environment} tried the exhausted zone in attempts {attempts:?}"
        );
    }
    assert!(
        proxy.faulted() > 50,
        "faults were injected: {}",
        proxy.faulted()
    );

    // RunInstances that reached EC2 never outpaced the bucket (burst 10,
    // 20/s), and the burst of 100 did reach it.
    let forwarded = proxy.forwarded("RunInstances");
    let worst = (0..forwarded.len())
        .map(|i| {
            forwarded[i..]
                .iter()
                .take_while(|t| t.duration_since(forwarded[i]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(worst <= 10 + 20, "{worst} RunInstances within one second");
    assert!(worst >= 10, "the workload never filled the burst: {worst}");
    shutdown.cancel();
    daemon.await.expect("join").expect("clean stop");
}

/// Per environment, the distinct attempts (client tokens) sent into `subnet`.
pub(crate) fn exhausted_attempts(
    launches: &[testkit::proxy::Launch],
    subnet: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut by_environment = std::collections::BTreeMap::<_, std::collections::BTreeSet<_>>::new();
    for launch in launches.iter().filter(|l| l.subnet == subnet) {
        let (environment, attempt) = launch
            .client_token
            .rsplit_once('-')
            .expect("client tokens are <environment>-<attempt>");
        by_environment
            .entry(environment.to_owned())
            .or_default()
            .insert(attempt.to_owned());
    }
    by_environment
}

/// A runnerd process with its log in a file.
pub(crate) struct Process {
    child: Child,
    log: std::path::PathBuf,
}

impl Process {
    fn start(world: &World, name: &str) -> Self {
        Self::start_with(world, name, &moto_url(), &[])
    }

    /// Starts runnerd with AWS at `endpoint` and more settings.
    pub(crate) fn start_with(
        world: &World,
        name: &str,
        endpoint: &str,
        extra: &[(&str, String)],
    ) -> Self {
        // RUNNERD_BIN: a runnerd built elsewhere; by default the one beside
        // this test binary.
        let bin = std::env::var_os("RUNNERD_BIN").map_or_else(
            || {
                let exe = std::env::current_exe().expect("test binary path");
                exe.parent()
                    .and_then(|deps| deps.parent())
                    .expect("target dir")
                    .join("runnerd")
            },
            std::path::PathBuf::from,
        );
        assert!(
            bin.exists(),
            "{} is missing: build the workspace (tests/run does)",
            bin.display()
        );
        let log =
            std::env::temp_dir().join(format!("runnerd-{}-{name}.log", world.infra.runner_id));
        let child = Command::new(bin)
            .env_clear()
            .envs(world.env())
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUNNER_LOG_FORMAT", "json")
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start runnerd");
        Self { child, log }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits at most `within` for a log line containing any of `needles`.
    pub(crate) async fn logged(&self, needles: &[&str], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let logs = self.logs();
            if needles.iter().any(|n| logs.contains(n)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits at most `within` for the process to exit; its exit code, or
    /// `None` if it is still running.
    pub(crate) async fn exited(&mut self, within: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(mut self) -> Option<i32> {
        self.signal("-TERM");
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        panic!("runnerd did not stop within 30 s after SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_table_with_the_leader_frozen_past_its_lease() {
    let world = World::new().await;
    let a = Process::start(&world, "a");
    // The second replica starts once the first holds the credentials, as in
    // an ECS rolling deployment.
    world
        .runner_when("runner A active", Duration::from_secs(60), |r| {
            r.phase == admin::RunnerPhase::Active as i32
        })
        .await;
    let b = Process::start(&world, "b");
    let first = world.create_envs(20).await;
    world
        .wait_for("some RUNNING", Duration::from_secs(120), |envs| {
            envs.iter().filter(|e| settled(e, Phase::Running)).count() >= 5
        })
        .await;

    // Who leads? The lease item names the holder by process id.
    let lease = aws_sdk_dynamodb::Client::new(&world.sdk)
        .get_item()
        .table_name(&world.infra.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("RUNNER#{}", world.infra.runner_id)),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("LEASE#0".into()),
        )
        .send()
        .await
        .expect("lease")
        .item
        .expect("a lease item");
    let holder = lease
        .get("holder")
        .and_then(|h| h.as_s().ok())
        .expect("holder")
        .clone();
    let (leader, standby) = if holder.starts_with(&format!("pid-{}-", a.child.id())) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(
        holder.starts_with(&format!("pid-{}-", leader.child.id())),
        "holder {holder} is neither process"
    );

    leader.signal("-STOP");
    let more = world.create_envs(10).await;
    for id in &first[..5] {
        world.set_phase(id, Phase::Stopped).await;
    }
    // Frozen well past its 5 s lease.
    tokio::time::sleep(Duration::from_secs(8)).await;
    leader.signal("-CONT");

    world
        .wait_for(
            "25 RUNNING and 5 STOPPED",
            Duration::from_secs(120),
            |envs| {
                envs.len() == 30
                    && envs.iter().filter(|e| settled(e, Phase::Running)).count() == 25
                    && envs.iter().filter(|e| settled(e, Phase::Stopped)).count() == 5
            },
        )
        .await;
    world.one_instance_each(30).await;
    assert_eq!(more.len(), 10);
    // The standby may have settled everything before the thawed leader ran.
    assert!(
        leader
            .logged(
                &["lost the leader lease", "ran out locally"],
                Duration::from_secs(30)
            )
            .await,
        "the frozen leader noticed it lost the lease:\n{}",
        leader.logs()
    );
    assert!(
        standby
            .logged(&["acquired the leader lease"], Duration::from_secs(5))
            .await,
        "the standby took over"
    );
    assert_eq!(leader.stop().await, Some(0));
    assert_eq!(standby.stop().await, Some(0));
}
