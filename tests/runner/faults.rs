//! Dependency failures: degraded status, capacity errors, lost responses and
//! interrupted launches.

use std::time::Duration;

use runner_core::model::{EnvironmentId, LaunchIntent, LaunchState, Record, Subnet, client_token};
use runner_core::traits::{Compute as _, LaunchRequest, StateStore as _};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;
use testkit::fakes::LaunchFault;

use crate::{World, http_get, id, settled};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_state_store_degrades_the_runner_until_it_recovers() {
    let world = World::new().await;
    let runner = world.start_runner().await;
    let wait_phase = |wanted: admin::RunnerPhase| {
        let world = &world;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let r = world.runner().await;
                if r.phase == wanted as i32 {
                    return r;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "runner never {wanted:?}: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_phase(admin::RunnerPhase::Active).await;
    // Fully started (records loaded, first sync done) before the outage.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http_get(runner.health, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.store.set_down(true);
    let degraded = wait_phase(admin::RunnerPhase::Degraded).await;
    assert!(
        degraded.degraded_message.starts_with("state store: "),
        "{}",
        degraded.degraded_message
    );
    let (code, body) = http_get(runner.health, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("state store failing"), "{body}");
    world.store.set_down(false);
    let healthy = wait_phase(admin::RunnerPhase::Active).await;
    assert_eq!(healthy.degraded_message, "");
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_moves_to_the_next_zone_and_reports_when_none_is_left() {
    let world = World::new().await;
    world
        .compute
        .inject(LaunchFault::NoCapacity("eu-west-1a".into()));
    world
        .compute
        .inject(LaunchFault::NoCapacity("eu-west-1b".into()));
    for _ in 0..6 {
        world.create_env().await;
    }
    let runner = world.start_runner().await;
    world
        .wait_for(
            "6 RUNNING in the zone with capacity",
            Duration::from_secs(30),
            |envs| envs.iter().all(|e| settled(e, Phase::Running)),
        )
        .await;
    assert!(
        world
            .compute
            .instances()
            .iter()
            .all(|i| i.availability_zone == "eu-west-1c")
    );

    world
        .compute
        .inject(LaunchFault::NoCapacity("eu-west-1c".into()));
    let stuck = world.create_env().await;
    let envs = world
        .wait_for("a capacity failure", Duration::from_secs(30), |envs| {
            envs.iter().any(|e| {
                id(e) == stuck
                    && e.status
                        .as_ref()
                        .is_some_and(|s| !s.failure_message.is_empty())
            })
        })
        .await;
    let message = &envs
        .iter()
        .find(|e| id(e) == stuck)
        .and_then(|e| e.status.clone())
        .expect("status")
        .failure_message;
    assert!(
        message.starts_with("no capacity for m7i.large in "),
        "{message}"
    );
    for zone in crate::ZONES {
        assert!(message.contains(zone), "{message} lacks {zone}");
    }
    runner.stop().await.expect("clean stop");
    world.compute.clear_faults();
    let runner = world.start_runner().await;
    world
        .wait_for(
            "the stuck one RUNNING once capacity returns",
            Duration::from_secs(30),
            |envs| envs.iter().all(|e| settled(e, Phase::Running)),
        )
        .await;
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_launch_responses_reuse_the_token_and_never_duplicate() {
    let world = World::new().await;
    world.compute.inject(LaunchFault::LostResponse(4));
    world.compute.inject(LaunchFault::Unavailable(3));
    for _ in 0..8 {
        world.create_env().await;
    }
    let runner = world.start_runner().await;
    world
        .wait_for("8 RUNNING", Duration::from_secs(60), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    assert_eq!(world.compute.instances().len(), 8);
    // Unavailable launches were retried; lost responses were found by tags
    // before any retry.
    assert!(
        world.compute.calls("launch") >= 8 + 3,
        "launches: {}",
        world.compute.calls("launch")
    );
    assert!(
        world.compute.calls("find_launch") >= 4,
        "tag lookups: {}",
        world.compute.calls("find_launch")
    );
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_launch_is_found_by_its_tags_before_any_new_launch() {
    let world = World::new().await;
    let env_id = world.create_env().await;
    let environment = EnvironmentId(uuid::Uuid::parse_str(&env_id).expect("uuid"));
    // A crash after RunInstances and before the instance id was stored:
    // the record holds only the intent, the cloud holds the instance.
    let subnet = Subnet {
        id: "subnet-0000000000000000b".into(),
        availability_zone: "eu-west-1b".into(),
    };
    let mut record = Record::new(environment);
    record.launch = Some(LaunchIntent {
        attempt: 1,
        subnet: subnet.clone(),
        client_token: client_token(environment, 1),
        state: LaunchState::Intended,
    });
    world.store.put(&record).await.expect("seed the record");
    let orphaned = world
        .compute
        .launch(&LaunchRequest {
            environment,
            attempt: 1,
            // Another token, as if EC2 had forgotten it: only the tags can tell.
            client_token: "not-the-runner-token".into(),
            subnet,
            instance_type: "m7i.large".into(),
            disk_gib: 50,
            repository_url: "https://github.com/acme/api.git".into(),
            revision: runner_core::model::Revision::Default,
            checkout_secret: None,
        })
        .await
        .expect("seed the instance");

    let runner = world.start_runner().await;
    let envs = world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    let machine = envs[0]
        .status
        .as_ref()
        .and_then(|s| s.machine.clone())
        .expect("machine");
    assert_eq!(
        machine.instance_id, orphaned.id,
        "the runner adopted the instance it had launched"
    );
    assert_eq!(world.compute.calls("launch"), 1, "no second launch");
    assert_eq!(world.compute.instances().len(), 1);
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_exhausted_before_a_restart_are_not_tried_again_after_it() {
    let world = World::new().await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(world.create_env().await);
        }
        ids
    };
    // What a runner that died right after two zones said "no capacity" left:
    // a failed second attempt and both zones recorded.
    let subnets = world
        .compute
        .subnets(&world.config().placement.subnet_ids)
        .await
        .expect("subnets");
    let in_b = subnets
        .iter()
        .find(|s| s.availability_zone == "eu-west-1b")
        .expect("a subnet in eu-west-1b")
        .clone();
    for id in &ids {
        let environment = EnvironmentId(uuid::Uuid::parse_str(id).expect("uuid"));
        let record = Record {
            launch: Some(LaunchIntent {
                attempt: 2,
                subnet: in_b.clone(),
                client_token: client_token(environment, 2),
                state: LaunchState::Failed,
            }),
            exhausted_zones: vec!["eu-west-1a".into(), "eu-west-1b".into()],
            ..Record::new(environment)
        };
        world.store.put(&record).await.expect("seed the record");
    }
    // Every zone has capacity now, but the restarted runner remembers.
    let runner = world.start_runner().await;
    world
        .wait_for("6 RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;
    let zones: Vec<String> = world
        .compute
        .launch_requests()
        .iter()
        .map(|r| r.subnet.availability_zone.clone())
        .collect();
    assert_eq!(zones.len(), 6, "one launch each: {zones:?}");
    assert!(
        zones.iter().all(|z| z == "eu-west-1c"),
        "a zone exhausted before the restart was tried again: {zones:?}"
    );
    assert!(
        world
            .compute
            .launch_requests()
            .iter()
            .all(|r| r.attempt == 3),
        "the attempt count survives too"
    );
    runner.stop().await.expect("clean stop");
}

/// The lease runs on a thread of its own: with both of the runtime's workers
/// blocked for longer than the lease's TTL (2 s; a huge describe being
/// parsed, say), renewals go on and leadership never lapses, not even
/// locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_runtime_does_not_lapse_the_lease() {
    let world = World::new().await;
    let leadership = std::sync::Arc::new(runner_core::leader::Leadership::default());
    let runner = world.start_runner_with(leadership.clone()).await;
    let env = world.create_env().await;
    world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter()
                .any(|e| id(e) == env && settled(e, Phase::Running))
        })
        .await;
    assert!(leadership.is_leader());

    // Watched from a thread of its own, which the blocked workers cannot stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (leadership, stop) = (leadership.clone(), stop.clone());
        move || {
            let mut lapses = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if !leadership.is_leader() {
                    lapses += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            lapses
        }
    });
    // Spawned from outside the runtime: each worker takes one.
    let blockers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async {
                std::thread::sleep(Duration::from_secs(3));
            })
        })
        .collect();
    for blocker in blockers {
        blocker.await.expect("blocker");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let lapses = watcher.join().expect("watcher");
    assert_eq!(
        lapses, 0,
        "leadership lapsed while the workers were blocked"
    );
    runner.stop().await.expect("clean stop");
}
