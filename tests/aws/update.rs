//! Self-update on moto, which never starts tasks: the runner's task is one
//! started with its service's group, and its task metadata endpoint is a
//! fixture server. A release inside the update window registers exactly one
//! task definition revision, identical but for the image, and updates the
//! service once; outside the window nothing happens; a rollback holds the
//! release back until a newer one is offered. Only `<repository>@sha256:...`
//! of the runner's own repository is deployed: a foreign repository, a tag
//! and a look-alike are refused without a single RegisterTaskDefinition or
//! UpdateService, and the refusal shows in the status the control plane
//! holds. ECS calls are counted by a proxy in front of moto.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_ecs::types::{
    AwsVpcConfiguration, Compatibility, ContainerDefinition, DeploymentCircuitBreaker,
    DeploymentConfiguration, KeyValuePair, LaunchType, NetworkConfiguration, NetworkMode,
};
use runner_core::leader::Leadership;
use runner_core::traits::SystemClock;
use runner_core::update::{AttemptState, Attempts, Release, Releases, UpdateError, UpdateWindow};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::RunnerCapability;
use runnerd::config::UpdateConfig;
use runnerd::update::{SelfUpdate, State, Updater};
use testkit::proxy::FaultProxy;
use tokio_util::sync::CancellationToken;

use crate::doctor::{Plane, config, existing_ami};
use crate::{INSTANCE_PROFILE, Infra, REGION, moto_url, sdk};

/// The stack's repository (`--image-repository`).
const REPO: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner";
const SIDECAR_IMAGE: &str = "public.ecr.aws/aws-observability/aws-for-fluent-bit:2";

fn ecs_op(name: &str) -> String {
    format!("AmazonEC2ContainerServiceV20141113.{name}")
}

/// A digest of `version` in `repository`: `<repository>@sha256:<64 hex>`.
fn pinned_in(repository: &str, version: &str) -> String {
    let hex: String = version.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{repository}@sha256:{hex:0<64}")
}

/// The release `version` as the stack's repository holds it.
fn image(version: &str) -> String {
    pinned_in(REPO, version)
}

/// Images a control plane could offer that are not the runner's to run, with
/// the reason the runner gives.
fn hostile_images() -> Vec<(&'static str, String, String)> {
    let not_ours = format!("the image is not in the repository {REPO}");
    vec![
        (
            "another registry",
            pinned_in("evil.example.com/aws-runner", "0.2.0"),
            not_ours.clone(),
        ),
        (
            "a tag only",
            format!("{REPO}:0.2.0"),
            format!("the image is a tag of {REPO}, not a digest"),
        ),
        (
            "a look-alike",
            pinned_in(&format!("{REPO}-evil"), "0.2.0"),
            not_ours,
        ),
    ]
}

/// The task metadata endpoint of one task: `<url>` and `<url>/task`.
async fn metadata_server(cluster: &str, task_arn: &str, image: &str) -> String {
    let container = format!(r#"{{"Name":"runnerd","Image":"{image}","DockerId":"abc"}}"#);
    let task = format!(
        r#"{{"Cluster":"{cluster}","TaskARN":"{task_arn}","Family":"runner","Revision":"1","Containers":[{container}]}}"#
    );
    let app = axum::Router::new()
        .route(
            "/v4/runner-task",
            axum::routing::get(move || async move { container }),
        )
        .route(
            "/v4/runner-task/task",
            axum::routing::get(move || async move { task }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v4/runner-task")
}

/// The runner's ECS service on moto, its task, and its metadata endpoint.
struct Ecs {
    infra: Infra,
    /// Straight to moto: setup and inspection, not counted.
    ecs: aws_sdk_ecs::Client,
    proxy: FaultProxy,
    /// Through the counting proxy: what the runner uses.
    through: aws_config::SdkConfig,
    cluster: String,
    service: String,
    family: String,
    first_revision: String,
    metadata_url: String,
}

impl Ecs {
    /// The service, its task running `first_image`.
    async fn create(infra: Infra, first_image: &str) -> Self {
        let direct = sdk(&moto_url()).await;
        let ecs = aws_sdk_ecs::Client::new(&direct);
        let short = infra.runner_id[..8].to_owned();
        let cluster = format!("runners-{short}");
        let service = format!("runner-{short}");
        let family = format!("aws-runner-{short}");
        // moto gives a task's network interface a DNS name only with this.
        aws_sdk_ec2::Client::new(&direct)
            .modify_vpc_attribute()
            .vpc_id(&infra.vpc_id)
            .enable_dns_hostnames(
                aws_sdk_ec2::types::AttributeBooleanValue::builder()
                    .value(true)
                    .build(),
            )
            .send()
            .await
            .expect("DNS hostnames");
        let cluster_arn = ecs
            .create_cluster()
            .cluster_name(&cluster)
            .send()
            .await
            .expect("create cluster")
            .cluster
            .and_then(|c| c.cluster_arn)
            .expect("cluster ARN");
        let first_revision = ecs
            .register_task_definition()
            .family(&family)
            .task_role_arn("arn:aws:iam::123456789012:role/runner-task")
            .execution_role_arn("arn:aws:iam::123456789012:role/runner-execution")
            .network_mode(NetworkMode::Awsvpc)
            .requires_compatibilities(Compatibility::Fargate)
            .cpu("512")
            .memory("1024")
            .container_definitions(
                ContainerDefinition::builder()
                    .name("runnerd")
                    .image(first_image)
                    // moto needs container-level sizes to run a task.
                    .cpu(384)
                    .memory(768)
                    .essential(true)
                    .readonly_root_filesystem(true)
                    .environment(
                        KeyValuePair::builder()
                            .name("RUNNER_ID")
                            .value(&infra.runner_id)
                            .build(),
                    )
                    .environment(
                        KeyValuePair::builder()
                            .name("RUNNER_UPDATE_WINDOW")
                            .value("00-24")
                            .build(),
                    )
                    .build(),
            )
            .container_definitions(
                ContainerDefinition::builder()
                    .name("log-router")
                    .image(SIDECAR_IMAGE)
                    .cpu(128)
                    .memory(256)
                    .essential(false)
                    .build(),
            )
            .send()
            .await
            .expect("register task definition")
            .task_definition
            .and_then(|t| t.task_definition_arn)
            .expect("task definition ARN");
        let network = NetworkConfiguration::builder()
            .awsvpc_configuration(
                AwsVpcConfiguration::builder()
                    .set_subnets(Some(infra.subnet_ids()))
                    .security_groups(&infra.security_group_id)
                    .build()
                    .expect("network"),
            )
            .build();
        ecs.create_service()
            .cluster(&cluster)
            .service_name(&service)
            .task_definition(&first_revision)
            .desired_count(1)
            .launch_type(LaunchType::Fargate)
            .network_configuration(network.clone())
            .deployment_configuration(
                DeploymentConfiguration::builder()
                    .minimum_healthy_percent(100)
                    .maximum_percent(200)
                    .deployment_circuit_breaker(
                        DeploymentCircuitBreaker::builder()
                            .enable(true)
                            .rollback(true)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("create service");
        // What ECS would start for the service.
        let task_arn = ecs
            .run_task()
            .cluster(&cluster)
            .task_definition(&first_revision)
            .launch_type(LaunchType::Fargate)
            .group(format!("service:{service}"))
            .started_by("ecs-svc/1234567890")
            .network_configuration(network)
            .send()
            .await
            .expect("run task")
            .tasks()
            .first()
            .and_then(|t| t.task_arn())
            .expect("task ARN")
            .to_owned();
        let metadata_url = metadata_server(&cluster_arn, &task_arn, first_image).await;
        let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
        let through = sdk(&proxy.url()).await;
        Self {
            infra,
            ecs,
            proxy,
            through,
            cluster,
            service,
            family,
            first_revision,
            metadata_url,
        }
    }

    fn attempts(&self) -> Arc<dyn Attempts> {
        runner_aws::update_attempts(&self.through, &self.infra.table, &self.infra.runner_id)
    }

    fn parts(&self) -> SelfUpdate {
        SelfUpdate {
            deployer: runner_aws::ecs_deployer(&self.through, &self.metadata_url),
            attempts: self.attempts(),
            running: "0.1.0".into(),
        }
    }

    /// How many `name` calls reached ECS through the runner's clients.
    fn calls(&self, name: &str) -> usize {
        self.proxy.forwarded(&ecs_op(name)).len()
    }

    async fn service_task_definition(&self) -> String {
        self.ecs
            .describe_services()
            .cluster(&self.cluster)
            .services(&self.service)
            .send()
            .await
            .expect("describe service")
            .services()[0]
            .task_definition()
            .expect("task definition")
            .to_owned()
    }

    async fn revisions(&self) -> Vec<String> {
        self.ecs
            .list_task_definitions()
            .family_prefix(&self.family)
            .send()
            .await
            .expect("list task definitions")
            .task_definition_arns()
            .to_vec()
    }

    async fn task_definition(&self, arn: &str) -> aws_sdk_ecs::types::TaskDefinition {
        self.ecs
            .describe_task_definition()
            .task_definition(arn)
            .send()
            .await
            .expect("describe task definition")
            .task_definition
            .expect("task definition")
    }

    /// What the deployment circuit breaker does when the new image fails.
    async fn roll_back(&self) {
        self.ecs
            .update_service()
            .cluster(&self.cluster)
            .service(&self.service)
            .task_definition(&self.first_revision)
            .send()
            .await
            .expect("roll back");
    }
}

/// Releases offered by a test.
#[derive(Default)]
struct Offer(Mutex<Option<Release>>);

impl Offer {
    fn publish(&self, version: &str) {
        self.publish_image(version, &image(version));
    }

    fn publish_image(&self, version: &str, image: &str) {
        *self.0.lock().expect("lock") = Some(Release {
            version: version.into(),
            image: image.into(),
            auto_update: true,
        });
    }
}

#[async_trait]
impl Releases for Offer {
    async fn latest(&self, _running: &str) -> Result<Option<Release>, UpdateError> {
        Ok(self.0.lock().expect("lock").clone())
    }
}

fn updater(ecs: &Ecs, offer: &Arc<Offer>, window: UpdateWindow) -> Updater {
    Updater {
        releases: offer.clone(),
        parts: ecs.parts(),
        leadership: Arc::new(Leadership::always()),
        health: Arc::default(),
        clock: Arc::new(SystemClock),
        config: UpdateConfig {
            enabled: true,
            window,
            interval: Duration::from_secs(3600),
            repository: Some(REPO.parse().expect("a repository")),
        },
    }
}

/// The service on moto with a task running release 0.1.0 of the stack's repository.
async fn ecs() -> Ecs {
    Ecs::create(
        Infra::create(&sdk(&moto_url()).await).await,
        &image("0.1.0"),
    )
    .await
}

/// A two-hour window that starts two hours from now (UTC).
fn window_not_now() -> UpdateWindow {
    let hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        / 3600
        % 24;
    let start = u8::try_from((hour + 2) % 24).expect("an hour");
    UpdateWindow::new(start, (start + 2) % 24).expect("a window")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_service_is_failed_and_changes_nothing() {
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    offer.publish("0.2.0");
    let updater = updater(&ecs, &offer, UpdateWindow::ANY);
    ecs.proxy.set_rules(vec![testkit::proxy::Rule {
        operations: vec![ecs_op("UpdateService")],
        rate: 1.0,
        fault: testkit::proxy::Fault::Refuse("AccessDeniedException".into()),
    }]);
    let outcome = updater.check().await.expect("check");
    assert_eq!(outcome.state, State::Failed, "{outcome:?}");
    assert!(
        outcome.message.contains("AccessDeniedException"),
        "{outcome:?}"
    );
    assert_eq!(
        ecs.proxy.seen(&ecs_op("UpdateService")).len(),
        1,
        "tried once"
    );
    assert_eq!(
        ecs.service_task_definition().await,
        ecs.first_revision,
        "the service still runs the first revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_inside_the_window_registers_one_revision_and_updates_the_service_once() {
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    offer.publish("0.2.0");
    let updater = updater(&ecs, &offer, UpdateWindow::ANY);

    let outcome = updater.check().await.expect("check");
    assert_eq!(outcome.state, State::Deploying, "{outcome:?}");
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 1);
    assert_eq!(ecs.calls("UpdateService"), 1);
    let revisions = ecs.revisions().await;
    assert_eq!(revisions.len(), 2, "{revisions:?}");
    let new = revisions
        .iter()
        .find(|r| **r != ecs.first_revision)
        .expect("a new revision")
        .clone();
    assert_eq!(ecs.service_task_definition().await, new);

    // Identical but for the runner's image.
    let before = ecs.task_definition(&ecs.first_revision).await;
    let after = ecs.task_definition(&new).await;
    assert_eq!(after.family(), before.family());
    assert_eq!(after.task_role_arn(), before.task_role_arn());
    assert_eq!(after.execution_role_arn(), before.execution_role_arn());
    assert_eq!(after.network_mode(), before.network_mode());
    assert_eq!(after.cpu(), before.cpu());
    assert_eq!(after.memory(), before.memory());
    assert_eq!(
        after.requires_compatibilities(),
        before.requires_compatibilities()
    );
    let mut expected = before.container_definitions().to_vec();
    expected[0].image = Some(image("0.2.0"));
    assert_eq!(after.container_definitions(), expected.as_slice());
    assert_eq!(
        after.container_definitions()[1].image(),
        Some(SIDECAR_IMAGE)
    );

    let attempt = ecs
        .attempts()
        .load()
        .await
        .expect("load")
        .expect("recorded");
    assert_eq!(attempt.state, AttemptState::Deploying);
    assert_eq!(attempt.release, "0.2.0");
    assert_eq!(attempt.from_release, "0.1.0");
    assert_eq!(attempt.task_definition, new);
    assert_eq!(attempt.previous_task_definition, ecs.first_revision);

    // The old task keeps running (moto starts none): later checks only watch.
    for _ in 0..3 {
        assert_eq!(
            updater.check().await.expect("check").state,
            State::Deploying
        );
    }
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 1);
    assert_eq!(ecs.calls("UpdateService"), 1);
    assert_eq!(ecs.revisions().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_window_nothing_is_registered_or_updated() {
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    offer.publish("0.2.0");
    let window = window_not_now();
    let outcome = updater(&ecs, &offer, window).check().await.expect("check");
    assert_eq!(outcome.state, State::Scheduled, "{outcome:?}");
    assert!(
        outcome
            .message
            .contains(&format!("update window {window} UTC")),
        "{}",
        outcome.message
    );
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 0);
    assert_eq!(ecs.calls("UpdateService"), 0);
    assert_eq!(
        ecs.revisions().await,
        std::slice::from_ref(&ecs.first_revision)
    );
    assert_eq!(ecs.service_task_definition().await, ecs.first_revision);
    assert!(ecs.attempts().load().await.expect("load").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_release_is_held_back_until_a_newer_one_is_offered() {
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    offer.publish("0.2.0");
    let updater = updater(&ecs, &offer, UpdateWindow::ANY);
    assert_eq!(
        updater.check().await.expect("check").state,
        State::Deploying
    );

    ecs.roll_back().await;
    let outcome = updater.check().await.expect("check");
    assert_eq!(outcome.state, State::HeldBack, "{outcome:?}");
    let attempt = ecs
        .attempts()
        .load()
        .await
        .expect("load")
        .expect("recorded");
    assert_eq!(attempt.state, AttemptState::RolledBack);
    assert_eq!(attempt.release, "0.2.0");
    assert!(attempt.finished_at.is_some());
    for _ in 0..2 {
        assert_eq!(updater.check().await.expect("check").state, State::HeldBack);
    }
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 1);
    assert_eq!(ecs.calls("UpdateService"), 1);
    assert_eq!(ecs.service_task_definition().await, ecs.first_revision);

    offer.publish("0.2.1");
    assert_eq!(
        updater.check().await.expect("check").state,
        State::Deploying
    );
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 2);
    assert_eq!(ecs.calls("UpdateService"), 2);
    let service_td = ecs.service_task_definition().await;
    assert_eq!(
        ecs.task_definition(&service_td)
            .await
            .container_definitions()[0]
            .image(),
        Some(image("0.2.1").as_str())
    );
    assert_eq!(
        ecs.attempts()
            .load()
            .await
            .expect("load")
            .expect("recorded")
            .release,
        "0.2.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_repository_a_tag_and_a_look_alike_are_refused_without_an_ecs_write() {
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    let updater = updater(&ecs, &offer, UpdateWindow::ANY);
    for (what, hostile, why) in hostile_images() {
        offer.publish_image("0.2.0", &hostile);
        let outcome = updater.check().await.expect("check");
        assert_eq!(outcome.state, State::Refused, "{what}: {outcome:?}");
        assert!(
            outcome
                .message
                .starts_with(&format!("0.2.0 refused: {why}")),
            "{what}: {}",
            outcome.message
        );
    }
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 0);
    assert_eq!(ecs.calls("UpdateService"), 0);
    assert_eq!(
        ecs.revisions().await,
        std::slice::from_ref(&ecs.first_revision)
    );
    assert_eq!(ecs.service_task_definition().await, ecs.first_revision);
    assert!(ecs.attempts().load().await.expect("load").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_repository_is_the_one_of_the_services_pinned_image() {
    // Pinned by digest: that repository, and only it.
    let ecs = ecs().await;
    let offer = Arc::new(Offer::default());
    let mut derived = updater(&ecs, &offer, UpdateWindow::ANY);
    derived.config.repository = None;
    offer.publish_image("0.2.0", &pinned_in("evil.example.com/aws-runner", "0.2.0"));
    let outcome = derived.check().await.expect("check");
    assert_eq!(outcome.state, State::Refused, "{outcome:?}");
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 0);
    offer.publish("0.2.0");
    let outcome = derived.check().await.expect("check");
    assert_eq!(outcome.state, State::Deploying, "{outcome:?}");
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 1);
    assert_eq!(ecs.calls("UpdateService"), 1);

    // Pinned by tag: the runner cannot know its repository and refuses all.
    let tagged = Ecs::create(
        Infra::create(&sdk(&moto_url()).await).await,
        &format!("{REPO}:0.1.0"),
    )
    .await;
    let mut unknown = updater(&tagged, &offer, UpdateWindow::ANY);
    unknown.config.repository = None;
    let outcome = unknown.check().await.expect("check");
    assert_eq!(outcome.state, State::Refused, "{outcome:?}");
    assert!(
        outcome
            .message
            .contains("RUNNER_IMAGE_REPOSITORY is not set and the service's image is not pinned"),
        "{}",
        outcome.message
    );
    assert_eq!(tagged.calls("RegisterTaskDefinition"), 0);
    assert_eq!(tagged.calls("UpdateService"), 0);
}

/// The runner's world for the daemon: a reference control plane with the
/// runner in it, the stack's resources and its ECS service on moto.
struct World {
    plane: Plane,
    ecs: Ecs,
    ami: String,
}

impl World {
    /// The service's task runs release 0.1.0 of the stack's repository.
    async fn create() -> Self {
        let plane = Plane::start().await;
        let direct = sdk(&moto_url()).await;
        let infra = Infra {
            runner_id: plane.runner_id.clone(),
            ..Infra::create(&direct).await
        };
        aws_sdk_secretsmanager::Client::new(&direct)
            .put_secret_value()
            .secret_id(&infra.secret_id)
            .secret_string(&plane.exchange_token)
            .send()
            .await
            .expect("the stack's secret");
        let ami = existing_ami(&aws_sdk_ec2::Client::new(&direct)).await;
        let ecs = Ecs::create(infra, &image("0.1.0")).await;
        plane
            .admin
            .clone()
            .set_runner_auto_update(admin::SetRunnerAutoUpdateRequest {
                runner_id: plane.runner_id.clone(),
                auto_update: true,
            })
            .await
            .expect("auto-update on");
        Self { plane, ecs, ami }
    }

    /// Publishes a release in the control plane.
    async fn publish(&self, version: &str, image: &str) {
        self.plane
            .admin
            .clone()
            .publish_release(admin::PublishReleaseRequest {
                version: version.into(),
                image: image.into(),
            })
            .await
            .expect("publish");
    }

    /// Runs runnerd in-process as the service's task (the stack's repository
    /// configured, `window` its update window) until the runner's
    /// `system_details` in the control plane satisfy `done`; stops it and
    /// returns them.
    async fn run_until(
        &self,
        window: &str,
        done: impl Fn(&HashMap<String, String>) -> bool,
    ) -> HashMap<String, String> {
        let ecs = &self.ecs;
        let flags: Vec<(String, String)> = [
            ("runner-id", ecs.infra.runner_id.clone()),
            ("region", REGION.to_owned()),
            ("control-plane-url", self.plane.cp.url()),
            ("allow-plaintext", String::new()),
            ("vpc-id", ecs.infra.vpc_id.clone()),
            ("subnet-ids", ecs.infra.subnet_ids().join(",")),
            ("security-group-id", ecs.infra.security_group_id.clone()),
            ("instance-profile", INSTANCE_PROFILE.to_owned()),
            ("ami", self.ami.clone()),
            ("table", ecs.infra.table.clone()),
            ("secret-id", ecs.infra.secret_id.clone()),
            ("kms-key-id", ecs.infra.kms_key_id.clone()),
            ("health-listen", "127.0.0.1:0".to_owned()),
            ("lease-ttl", "5s".to_owned()),
            ("lease-renew-interval", "1s".to_owned()),
            ("update-window", window.to_owned()),
            ("image-repository", REPO.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = config(&flags);
        let deps = runnerd::aws_deps_with(&ecs.through, &config);
        let extras = runnerd::aws_extras(&ecs.through, &config, Some(&ecs.metadata_url));
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(runnerd::app::run_with(
            config,
            deps,
            extras,
            shutdown.clone(),
            None,
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        let runner = loop {
            let runner = self.plane.runner().await;
            if done(&runner.system_details) {
                break runner;
            }
            assert!(
                Instant::now() < deadline,
                "the runner's status never got there: {:?}",
                runner.system_details
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            runner
                .capabilities
                .contains(&(RunnerCapability::SelfUpdate as i32)),
            "{:?}",
            runner.capabilities
        );
        shutdown.cancel();
        daemon.await.expect("join").expect("clean stop");
        runner.system_details
    }
}

fn detail<'a>(details: &'a HashMap<String, String>, key: &str) -> &'a str {
    details.get(key).map_or("", String::as_str)
}

/// With release 0.2.0 of the stack's repository published, runs the daemon
/// until `update_state` is `state`.
async fn daemon_until(window: &str, state: &str) -> Ecs {
    let world = World::create().await;
    world.publish("0.2.0", &image("0.2.0")).await;
    let details = world
        .run_until(window, |d| detail(d, "update_state") == state)
        .await;
    assert_eq!(detail(&details, "latest_version"), "0.2.0");
    world.ecs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_updates_its_own_service_once_inside_the_window() {
    let ecs = daemon_until("00-24", "deploying").await;
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 1);
    assert_eq!(ecs.calls("UpdateService"), 1);
    let revisions = ecs.revisions().await;
    assert_eq!(revisions.len(), 2, "{revisions:?}");
    let service_td = ecs.service_task_definition().await;
    assert_ne!(service_td, ecs.first_revision);
    assert_eq!(
        ecs.task_definition(&service_td)
            .await
            .container_definitions()[0]
            .image(),
        Some(image("0.2.0").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_waits_for_the_window() {
    let window = window_not_now().to_string();
    let ecs = daemon_until(&window, "scheduled").await;
    assert_eq!(ecs.calls("RegisterTaskDefinition"), 0);
    assert_eq!(ecs.calls("UpdateService"), 0);
    assert_eq!(
        ecs.revisions().await,
        std::slice::from_ref(&ecs.first_revision)
    );
    assert_eq!(ecs.service_task_definition().await, ecs.first_revision);
}

/// Issue 12: the control plane named the image and the runner registered
/// it, handing the task role to whoever chose the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_images_not_of_its_repository_and_says_so_in_its_status() {
    let world = World::create().await;
    // One daemon run per offer, on the same runner (restarts, as ECS does).
    for ((what, hostile, why), version) in hostile_images()
        .into_iter()
        .zip(["0.2.0", "0.3.0", "0.4.0"])
    {
        world.publish(version, &hostile).await;
        let details = world
            .run_until("00-24", |d| {
                detail(d, "update_state") == "refused" && detail(d, "latest_version") == version
            })
            .await;
        let message = detail(&details, "update_message");
        assert!(
            message.starts_with(&format!("{version} refused: {why}; offered ")),
            "{what}: {message}"
        );
    }
    assert_eq!(world.ecs.calls("RegisterTaskDefinition"), 0);
    assert_eq!(world.ecs.calls("UpdateService"), 0);
    assert_eq!(
        world.ecs.revisions().await,
        std::slice::from_ref(&world.ecs.first_revision)
    );
    assert!(world.ecs.attempts().load().await.expect("load").is_none());
}
