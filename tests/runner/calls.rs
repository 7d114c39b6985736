//! Calls on the watch stream are answered through SendResponse.

use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, runner_request::Kind, runner_result};

use crate::World;

pub(crate) async fn call(world: &World, kind: Kind) -> admin::call_runner_response::Outcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let result = world
            .admin
            .clone()
            .call_runner(admin::CallRunnerRequest {
                runner_id: world.runner_id.clone(),
                request: Some(pb::RunnerRequest {
                    request_id: String::new(),
                    kind: Some(kind.clone()),
                }),
                timeout_ms: 5000,
            })
            .await;
        match result {
            Ok(response) => return response.into_inner().outcome.expect("an outcome"),
            // The stream may not be open yet.
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("call failed: {status:?}"),
        }
    }
}

pub(crate) fn class(instance_type: &str, disk_gib: u32) -> Kind {
    Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
        environment_class: Some(pb::EnvironmentClass {
            id: uuid::Uuid::new_v4().to_string(),
            display_name: "Probe".into(),
            instance_type: instance_type.into(),
            disk_gib,
            enabled: true,
        }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_validate_class_and_parse_context() {
    let world = World::new().await;
    let runner = world.start_runner().await;

    match call(&world, Kind::Ping(pb::Ping {})).await {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::Ping(p)),
        }) => assert_eq!(p.version, env!("CARGO_PKG_VERSION")),
        other => panic!("unexpected {other:?}"),
    }

    let validated = |outcome| match outcome {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ValidateEnvironmentClass(v)),
        }) => v,
        other => panic!("unexpected {other:?}"),
    };
    let ok = validated(call(&world, class("m7i.large", 50)).await);
    assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    assert_eq!(ok.availability_zones, crate::ZONES);
    let bad = validated(call(&world, class("unoffered.large", 4)).await);
    assert_eq!(bad.problems.len(), 2, "{:?}", bad.problems);
    assert!(
        bad.problems[0].starts_with("disk_gib: 4 GiB is outside"),
        "{:?}",
        bad.problems
    );
    assert!(
        bad.problems[1].contains("is not offered in any of the runner's availability zones"),
        "{:?}",
        bad.problems
    );

    let parse = Kind::ParseContext(pb::ParseContext {
        principal: "alice".into(),
        url: "https://github.com/acme/api".into(),
    });
    // A public host needs no integration for a repository URL.
    match call(&world, parse).await {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ParseContext(r)),
        }) => {
            assert_eq!(r.kind, pb::ScmKind::Github as i32);
            assert_eq!(r.clone_url, "https://github.com/acme/api.git");
        }
        other => panic!("unexpected {other:?}"),
    }
    runner.stop().await.expect("clean stop");
}

/// Regression (issue 12): the control plane chose any instance type, so the
/// cost. With `--allowed-instance-types`, a class of another type is refused
/// by validate_environment_class and by the spec check, before any AWS call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_outside_the_instance_type_allowlist_are_refused_before_any_aws_call() {
    let mut world = World::new().await;
    world.extra_args = vec![
        "--allowed-instance-types".into(),
        "t3.medium,m7i.xlarge".into(),
    ];
    let runner = world.start_runner().await;
    let refusal =
        "m7i.large is not one of the instance types this runner allows (t3.medium, m7i.xlarge)";

    let validated = |outcome| match outcome {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ValidateEnvironmentClass(v)),
        }) => v,
        other => panic!("unexpected {other:?}"),
    };
    let offerings = world.compute.calls("offered_zones");
    let refused = validated(call(&world, class("m7i.large", 50)).await);
    assert_eq!(refused.problems, [format!("instance_type: {refusal}")]);
    assert!(refused.availability_zones.is_empty());
    assert_eq!(
        world.compute.calls("offered_zones"),
        offerings,
        "a refused type costs no AWS call"
    );
    let allowed = validated(call(&world, class("m7i.xlarge", 50)).await);
    assert!(allowed.problems.is_empty(), "{:?}", allowed.problems);

    // The world's class is m7i.large.
    let mut request = world.create_request(&world.class_id);
    request.unchecked = true;
    let env_id = world.create(request).await;
    let envs = world
        .wait_for("the environment refused", Duration::from_secs(20), |envs| {
            envs.iter().any(|e| {
                crate::id(e) == env_id
                    && e.status
                        .as_ref()
                        .is_some_and(|s| !s.failure_message.is_empty())
            })
        })
        .await;
    let status = envs
        .iter()
        .find(|e| crate::id(e) == env_id)
        .and_then(|e| e.status.clone())
        .expect("status");
    assert_eq!(
        status.failure_message,
        format!("environment_class.instance_type: {refusal}")
    );
    assert_eq!(
        status.runner_ack.map(|a| a.code),
        Some(pb::RunnerAckCode::InvalidSpec as i32)
    );
    assert!(
        world.compute.launch_requests().is_empty(),
        "nothing was launched"
    );
    runner.stop().await.expect("clean stop");
}
