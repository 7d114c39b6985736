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

fn class(instance_type: &str, disk_gib: u32) -> Kind {
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
