//! Environments reach their desired phases, and stay single-instance across
//! control-plane restarts and daemon restarts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use runner_core::model::InstanceState;
use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;

use crate::{World, http_get, id, settled};

/// Every environment has exactly one instance over its life.
fn one_instance_each(world: &World, expected_envs: usize) {
    let instances = world.compute.instances();
    let mut per_env: HashMap<_, usize> = HashMap::new();
    for i in &instances {
        *per_env.entry(i.environment).or_default() += 1;
    }
    assert_eq!(per_env.len(), expected_envs, "environments with instances");
    assert!(
        per_env.values().all(|n| *n == 1),
        "an environment got two instances: {per_env:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_environments_run_with_acks_for_their_specs() {
    let mut world = World::new().await;
    // No resync during the test: every full describe is the term's first.
    world.extra_args = vec!["--resync-interval".into(), "10m".into()];
    for _ in 0..25 {
        world.create_env().await;
    }
    let runner = world.start_runner().await;
    world
        .wait_for("25 environments RUNNING", Duration::from_secs(60), |envs| {
            envs.len() == 25 && envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    let full = world.compute.calls("observe");
    let by_id = world.compute.observed_ids();
    for _ in 0..25 {
        world.create_env().await;
    }
    let envs = world
        .wait_for("50 environments RUNNING", Duration::from_secs(60), |envs| {
            envs.len() == 50 && envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    for env in &envs {
        let status = env.status.as_ref().expect("status");
        let machine = status.machine.as_ref().expect("machine");
        assert!(machine.instance_id.starts_with("i-"));
        assert!(crate::ZONES.contains(&machine.availability_zone.as_str()));
        assert!(status.failure_message.is_empty());
    }
    one_instance_each(&world, 50);
    assert_eq!(
        world.compute.calls("launch"),
        50,
        "one launch per environment"
    );
    let zones: HashSet<String> = world
        .compute
        .instances()
        .into_iter()
        .map(|i| i.availability_zone)
        .collect();
    assert_eq!(zones.len(), 3, "placement spreads across the zones");
    // A burst is observed by id: no full describe, and each launch's
    // instance looked up at least once.
    assert_eq!(
        world.compute.calls("observe"),
        full,
        "full describes during the burst"
    );
    assert!(
        world.compute.observed_ids() >= by_id + 25,
        "ids looked up: {}",
        world.compute.observed_ids() - by_id
    );
    assert!(
        world.compute.calls("observe_ids") < 25,
        "lookups share calls: {}",
        world.compute.calls("observe_ids")
    );
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_delete_reach_their_phases() {
    let world = World::new().await;
    let runner = world.start_runner().await;
    let ids = [
        world.create_env().await,
        world.create_env().await,
        world.create_env().await,
    ];
    let envs = world
        .wait_for("3 RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().filter(|e| settled(e, Phase::Running)).count() == 3
        })
        .await;
    let first_instances: HashMap<String, String> = envs
        .iter()
        .map(|e| {
            (
                id(e),
                e.status
                    .as_ref()
                    .and_then(|s| s.machine.as_ref())
                    .expect("machine")
                    .instance_id
                    .clone(),
            )
        })
        .collect();

    for env in &ids {
        world.set_phase(env, Phase::Stopped).await;
    }
    world
        .wait_for("3 STOPPED", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Stopped))
        })
        .await;
    assert!(
        world
            .compute
            .instances()
            .iter()
            .all(|i| i.state == InstanceState::Stopped)
    );

    for env in &ids {
        world.set_phase(env, Phase::Running).await;
    }
    let envs = world
        .wait_for("3 RUNNING again", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    for env in &envs {
        let instance = &env
            .status
            .as_ref()
            .and_then(|s| s.machine.as_ref())
            .expect("machine")
            .instance_id;
        assert_eq!(
            instance,
            &first_instances[&id(env)],
            "start resumes the same instance"
        );
    }

    for env in &ids {
        world.set_phase(env, Phase::Deleted).await;
    }
    world
        .wait_for("3 DELETED", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Deleted))
        })
        .await;
    assert!(world.compute.instances().iter().all(|i| matches!(
        i.state,
        InstanceState::ShuttingDown | InstanceState::Terminated
    )));
    // Records go once termination is confirmed, a moment after the status.
    for _ in 0..200 {
        if world.store.records().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        world.store.records().is_empty(),
        "records removed after termination: {:?}",
        world.store.records()
    );
    one_instance_each(&world, 3);
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_loses_no_status_and_launches_nothing_twice() {
    let mut world = World::new().await;
    for _ in 0..20 {
        world.create_env().await;
    }
    let runner = world.start_runner().await;
    world
        .wait_for("a few RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().filter(|e| settled(e, Phase::Running)).count() >= 5
        })
        .await;
    world.restart_control_plane().await;
    for _ in 0..5 {
        world.create_env().await;
    }
    world
        .wait_for("25 RUNNING", Duration::from_secs(60), |envs| {
            envs.len() == 25 && envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    one_instance_each(&world, 25);
    assert_eq!(world.compute.calls("launch"), 25);
    let runner_view = world.runner().await;
    assert_eq!(
        runner_view.open_streams, 1,
        "the runner reconnected its stream"
    );
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_a_restart_converges() {
    let world = World::new().await;
    for _ in 0..30 {
        world.create_env().await;
    }
    let runner = world.start_runner().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while world.compute.calls("launch") < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no launches started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    runner
        .stop()
        .await
        .expect("shutdown during a burst is clean");
    let launched_before = world.compute.calls("launch");

    let runner = world.start_runner().await;
    world
        .wait_for(
            "30 RUNNING after restart",
            Duration::from_secs(60),
            |envs| envs.iter().all(|e| settled(e, Phase::Running)),
        )
        .await;
    one_instance_each(&world, 30);
    assert!(world.compute.calls("launch") >= launched_before);
    // The restart reused the stored credentials: no second exchange.
    assert!(world.secrets.credentials().exchange_token.is_none());
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_fail_with_a_clear_message_and_the_rest_runs() {
    let world = World::new().await;
    let disabled_class = world
        .admin
        .clone()
        .create_environment_class(admin::CreateEnvironmentClassRequest {
            runner_id: world.runner_id.clone(),
            display_name: "Retired".into(),
            instance_type: "m5.large".into(),
            disk_gib: 30,
        })
        .await
        .expect("class")
        .into_inner()
        .id;
    let retired = world.create_env_with(&disabled_class).await;
    world
        .admin
        .clone()
        .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
            environment_class_id: disabled_class.clone(),
            enabled: false,
        })
        .await
        .expect("disable");

    let unknown_class = uuid::Uuid::new_v4().to_string();
    let mut request = world.create_request(&unknown_class);
    request.unchecked = true;
    let unknown = world.create(request).await;
    let mut request = world.create_request(&world.class_id);
    request.unchecked = true;
    request.content.as_mut().expect("content").repository_url = "ftp://example.com/repo".into();
    let bad_url = world.create(request).await;
    let mut request = world.create_request("small");
    request.unchecked = true;
    let not_uuid = world.create(request).await;
    for _ in 0..5 {
        world.create_env().await;
    }

    let runner = world.start_runner().await;
    let envs = world
        .wait_for("5 RUNNING and 4 failed", Duration::from_secs(30), |envs| {
            let running = envs.iter().filter(|e| settled(e, Phase::Running)).count();
            let failed = envs
                .iter()
                .filter(|e| {
                    e.status
                        .as_ref()
                        .is_some_and(|s| !s.failure_message.is_empty())
                })
                .count();
            running == 5 && failed == 4
        })
        .await;
    let failure = |env_id: &str| {
        let env = envs.iter().find(|e| id(e) == env_id).expect("listed");
        let status = env.status.as_ref().expect("status");
        let ack = status.runner_ack.as_ref().expect("ack");
        assert_eq!(
            ack.code,
            runner_proto::pb::RunnerAckCode::InvalidSpec as i32
        );
        status.failure_message.clone()
    };
    assert_eq!(
        failure(&unknown),
        format!("environment class {unknown_class} does not exist")
    );
    assert!(
        failure(&bad_url)
            .starts_with("spec.content.repository_url: scheme \"ftp\" is not supported"),
        "{}",
        failure(&bad_url)
    );
    assert!(
        failure(&not_uuid).starts_with("spec.environment_class_id: is not a UUID"),
        "{}",
        failure(&not_uuid)
    );
    assert_eq!(
        failure(&retired),
        format!("environment class {disabled_class} (Retired) is disabled")
    );
    assert_eq!(
        world.compute.calls("launch"),
        5,
        "nothing launched for invalid specs"
    );
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_health_and_metrics() {
    let world = World::new().await;
    world.create_env().await;
    let runner = world.start_runner().await;
    let (code, _) = http_get(runner.health, "/healthz").await;
    assert_eq!(code, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(runner.health, "/readyz").await;
        if code == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert_eq!(code, 503);
        assert!(body.starts_with("not ready: "), "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = runnerd::health::probe(
        &format!("http://{}/readyz", runner.health),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(probe, Ok(true));
    world.create_env().await;
    world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    let (code, metrics) = http_get(runner.health, "/metrics").await;
    assert_eq!(code, 200);
    for series in [
        "runner_reconciles_total{outcome=\"ok\"}",
        "runner_compute_calls_total{operation=\"launch\",outcome=\"ok\"} 2",
        "runner_reconcile_duration_seconds_bucket",
        "runner_queue_waiting",
        "runner_control_plane_reconnects_total 0",
        "runner_status_updates_pending",
        "runner_status_updates_total{outcome=\"delivered\"}",
        "runner_control_plane_requests_total{operation=\"environment_changed\"}",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    let addr = runner.health;
    runner.stop().await.expect("clean stop");
    let probe =
        runnerd::health::probe(&format!("http://{addr}/readyz"), Duration::from_secs(2)).await;
    assert!(!matches!(probe, Ok(true)), "a stopped runner is not ready");
}

impl World {
    pub(crate) async fn create_env_with(&self, class_id: &str) -> String {
        self.create(self.create_request(class_id)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_created_or_terminated_before_the_first_full_sync() {
    use runner_core::traits::Compute as _;
    let world = World::new().await;
    let plane = world.cp.as_ref().expect("control plane").plane.clone();
    plane.set_list_fault(control_plane::ListFault::Unavailable);
    // An instance wearing the runner's tags, for an environment the control
    // plane does not know: an orphan, but only a complete list can say so.
    let stranger = runner_core::model::EnvironmentId(uuid::Uuid::new_v4());
    let zone = world
        .compute
        .instances()
        .first()
        .map_or_else(|| "eu-west-1a".to_owned(), |i| i.availability_zone.clone());
    world
        .compute
        .launch(&runner_core::traits::LaunchRequest {
            environment: stranger,
            attempt: 1,
            client_token: runner_core::model::client_token(stranger, 1),
            subnet: runner_core::model::Subnet {
                id: world.config().placement.subnet_ids[0].clone(),
                availability_zone: zone,
            },
            instance_type: "m5.large".into(),
            disk_gib: 20,
            repository_url: "https://github.com/acme/api.git".into(),
            revision: runner_core::model::Revision::Default,
            checkout_secret: None,
        })
        .await
        .expect("a stray instance");
    let launched_before = world.compute.launch_requests().len();

    let runner = world.start_runner().await;
    let env = world.create_env().await;
    // The event for `env` arrives at once; lists keep failing meanwhile.
    for _ in 0..400 {
        if plane.lists_refused() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(plane.lists_refused() >= 3, "the runner kept listing");
    assert_eq!(
        world.compute.launch_requests().len(),
        launched_before,
        "launched before the first full sync"
    );
    assert_eq!(world.compute.calls("terminate"), 0, "terminated before it");
    assert_eq!(
        world.compute.calls("quarantine"),
        0,
        "marked an orphan before it"
    );
    // Readiness is the session and leadership, not the first full sync.
    let (code, body) = http_get(runner.health, "/readyz").await;
    assert_eq!(code, 200, "{body}");

    // Lists work again: the environment runs, the stray is handled as an orphan.
    plane.set_list_fault(control_plane::ListFault::None);
    world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter()
                .any(|e| id(e) == env && settled(e, Phase::Running))
        })
        .await;
    runner.stop().await.expect("clean stop");
}

/// Readiness does not grow with the fleet: with every full describe held, a
/// restarted runner is ready, reports its known environments from lookups by
/// id, and launches a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_is_ready_and_launches_before_its_first_full_describe_ends() {
    let world = World::new().await;
    let first = world.start_runner().await;
    let mut known = Vec::new();
    for _ in 0..40 {
        known.push(world.create_env().await);
    }
    world
        .wait_for("known RUNNING", Duration::from_secs(30), |envs| {
            known.iter().all(|k| {
                envs.iter()
                    .any(|e| id(e) == *k && settled(e, Phase::Running))
            })
        })
        .await;
    first.stop().await.expect("clean stop");

    world.compute.hold_full_describes(true);
    let described = world.compute.calls("observe");
    let looked_up = world.compute.observed_ids();
    let stopped = known.pop().expect("forty");
    world.set_phase(&stopped, Phase::Stopped).await;
    let runner = world.start_runner().await;
    // Ready before the full describe.
    ready(runner.health).await;
    let fresh = world.create_env().await;
    world
        .wait_for(
            "new RUNNING, one STOPPED",
            Duration::from_secs(30),
            |envs| {
                envs.iter()
                    .any(|e| id(e) == fresh && settled(e, Phase::Running))
                    && envs
                        .iter()
                        .any(|e| id(e) == stopped && settled(e, Phase::Stopped))
            },
        )
        .await;
    assert_eq!(
        world.compute.calls("observe"),
        described,
        "no full describe ended meanwhile"
    );
    // The 39 unchanged environments wait for the full view: none of their
    // instances is looked up by id.
    let ids = world.compute.observed_ids() - looked_up;
    assert!(ids < 20, "{ids} instances looked up by id");
    world.compute.hold_full_describes(false);
    runner.stop().await.expect("clean stop");
}

/// Waits until `/readyz` answers 200, at most 10 s.
async fn ready(health: std::net::SocketAddr) {
    for _ in 0..400 {
        if http_get(health, "/readyz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (code, body) = http_get(health, "/readyz").await;
    assert_eq!(code, 200, "not ready: {body}");
}

/// Readiness does not wait for the start-up reads whose time grows with the
/// fleet: with the subnets lookup and the records' load held, a restarted
/// runner is ready; a class validated meanwhile is answered once the
/// subnets are known, and an environment created meanwhile runs once the
/// records are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_is_ready_while_its_subnets_and_records_load() {
    use runner_proto::admin::v1::call_runner_response::Outcome;
    use runner_proto::pb::{RunnerResult, runner_result};

    let world = World::new().await;
    let first = world.start_runner().await;
    let known = world.create_env().await;
    world
        .wait_for("known RUNNING", Duration::from_secs(30), |envs| {
            envs.iter()
                .any(|e| id(e) == known && settled(e, Phase::Running))
        })
        .await;
    first.stop().await.expect("clean stop");

    world.compute.hold_subnets(true);
    world.store.hold_lists(true);
    let runner = world.start_runner().await;
    ready(runner.health).await;

    // Sent while the zones are unknown: answered only once they are.
    let validating = crate::calls::call(&world, crate::calls::class("m7i.large", 50));
    tokio::pin!(validating);
    let early = tokio::time::timeout(Duration::from_millis(500), &mut validating).await;
    assert!(
        early.is_err(),
        "answered before the subnets were known: {early:?}"
    );
    world.compute.hold_subnets(false);
    match validating.await {
        Outcome::Result(RunnerResult {
            kind: Some(runner_result::Kind::ValidateEnvironmentClass(v)),
        }) => {
            assert!(v.problems.is_empty(), "{:?}", v.problems);
            assert_eq!(v.availability_zones, crate::ZONES);
        }
        other => panic!("unexpected {other:?}"),
    }

    let fresh = world.create_env().await;
    assert_eq!(
        http_get(runner.health, "/readyz").await.0,
        200,
        "still ready"
    );
    world.store.hold_lists(false);
    world
        .wait_for("both RUNNING", Duration::from_secs(30), |envs| {
            [&known, &fresh].iter().all(|k| {
                envs.iter()
                    .any(|e| id(e) == **k && settled(e, Phase::Running))
            })
        })
        .await;
    assert_eq!(
        world.compute.launch_requests().len(),
        2,
        "one launch each, none again for the known environment"
    );
    runner.stop().await.expect("clean stop");
}
