//! Messages that do not decode at all end what carries them: a watch stream
//! reconnects and relists, a list page fails the sync, which is retried,
//! and nothing is torn down meanwhile. Each case breaks its runner's
//! connection, so each has a world of its own. And a runner created for
//! another region is refused at sign-up.

use std::sync::Arc;
use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase, runner_request::Kind};
use testkit::tamper::{Tamper, with_invalid_utf8, with_nested_groups};

use super::{changed, logged, reconnects, runner_request, wait_reconnected};
use crate::calls::call;
use crate::{Runner, World, id, settled};

/// A runner behind the tampering proxy, with its watch stream open.
async fn tampered() -> (World, Tamper, Runner) {
    crate::logs::capture();
    let mut world = World::new().await;
    let tamper = Tamper::start(&world.url).await.expect("start the proxy");
    world.url = tamper.url().to_owned();
    let runner = world.start_runner().await;
    // Answered through the watch stream: it is open.
    call(&world, Kind::Ping(pb::Ping {})).await;
    (world, tamper, runner)
}

/// A new environment runs: the runner relisted and still serves.
async fn still_serves(world: &World) -> String {
    let env = world.create_env().await;
    world
        .wait_for(
            "the new environment RUNNING",
            Duration::from_secs(30),
            |envs| {
                envs.iter()
                    .any(|e| id(e) == env && settled(e, Phase::Running))
            },
        )
        .await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_that_is_not_utf8_ends_the_stream_and_the_runner_reconnects() {
    let (world, tamper, runner) = tampered().await;
    let before = reconnects(runner.health).await;
    tamper.inject(with_invalid_utf8(
        &runner_request("r", changed("@@BADUTF8@@")),
        "@@BADUTF8@@",
    ));
    logged(
        "the stream with invalid UTF-8 failed",
        &[
            "watch stream failed",
            "EnvironmentChanged.environment_id: ",
            "data is not UTF-8 encoded",
        ],
    )
    .await;
    wait_reconnected(&runner, before).await;
    still_serves(&world).await;
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_nested_10_000_groups_deep_ends_the_stream_and_the_runner_reconnects() {
    let (world, tamper, runner) = tampered().await;
    let before = reconnects(runner.health).await;
    tamper.inject(with_nested_groups(
        &runner_request("r", Kind::Ping(pb::Ping {})),
        10_000,
    ));
    logged(
        "the stream with deep nesting failed",
        &["watch stream failed", "recursion limit reached"],
    )
    .await;
    wait_reconnected(&runner, before).await;
    still_serves(&world).await;
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_that_does_not_decode_fails_the_sync_and_nothing_is_torn_down() {
    let (world, tamper, runner) = tampered().await;
    let running = still_serves(&world).await;

    tamper.append_to_lists([with_invalid_utf8(
        &pb::RunnerEnvironment {
            id: "@@BADUTF8@@".into(),
            ..Default::default()
        },
        "@@BADUTF8@@",
    )]);
    let served = tamper.pages_with_appended();
    let before = reconnects(runner.health).await;
    world
        .admin
        .clone()
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: world.runner_id.clone(),
        })
        .await
        .expect("close streams");
    wait_reconnected(&runner, before).await;
    logged(
        "the list that does not decode failed the sync",
        &[
            "full sync failed; retrying",
            "RunnerEnvironment.id: ",
            "data is not UTF-8 encoded",
        ],
    )
    .await;
    assert!(tamper.pages_with_appended() > served, "the page was served");
    assert_eq!(world.compute.calls("terminate"), 0, "nothing torn down");
    let envs = world.environments().await;
    let env = envs.iter().find(|e| id(e) == running).expect("listed");
    assert!(settled(env, Phase::Running), "{env:?}");

    tamper.clear_appended();
    still_serves(&world).await;
    assert_eq!(world.compute.calls("terminate"), 0, "nothing torn down");
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_created_for_another_region_is_refused_at_signup() {
    let mut other = World::new().await;
    let created = other
        .admin
        .create_runner(admin::CreateRunnerRequest {
            name: "elsewhere".into(),
            region: "us-east-1".into(),
        })
        .await
        .expect("runner")
        .into_inner();
    other.runner_id = created.runner.expect("runner").id;
    other.secrets = Arc::new(testkit::fakes::MemorySecrets::with_exchange_token(
        &created.exchange_token,
    ));
    let err = other
        .start_runner()
        .await
        .stop()
        .await
        .expect_err("the signup is refused");
    let chain = runnerd::health::chain(&err);
    assert!(
        chain.contains("region: the runner was created for us-east-1, not eu-west-1"),
        "{chain}"
    );
}
