//! WatchRequests: events after admin changes, reconnects, and calls answered
//! through SendResponse.

use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, runner_request::Kind, runner_result};
use tokio_stream::StreamExt as _;
use tonic::{Code, Streaming};

use crate::{Fixture, TestRunner, assert_status, env_id};

async fn watch(runner: &TestRunner) -> Streaming<pb::RunnerRequest> {
    runner
        .client
        .clone()
        .watch_requests(pb::WatchRequestsRequest {})
        .await
        .expect("watch")
        .into_inner()
}

/// The next request on the stream, failing the test after 5 s.
async fn next(stream: &mut Streaming<pb::RunnerRequest>) -> pb::RunnerRequest {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a request within 5 s")
        .expect("stream open")
        .expect("not an error")
}

fn changed_id(request: &pb::RunnerRequest) -> String {
    match &request.kind {
        Some(Kind::EnvironmentChanged(c)) => c.environment_id.clone(),
        other => panic!("expected environment_changed, got {other:?}"),
    }
}

/// Waits until the control plane counts `n` open streams for the runner.
async fn wait_for_streams(f: &Fixture, runner_id: &str, n: u32) {
    for _ in 0..100 {
        let runner = f
            .admin
            .clone()
            .get_runner(admin::GetRunnerRequest {
                runner_id: runner_id.into(),
            })
            .await
            .expect("get runner")
            .into_inner();
        if runner.open_streams == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("runner never had {n} open streams");
}

#[tokio::test]
async fn admin_changes_emit_environment_changed() {
    let f = Fixture::new().await;
    let runner = f.runner("events").await;
    let class = f.class(&runner.id).await;
    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;

    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let first = next(&mut stream).await;
    assert_eq!(changed_id(&first), id);
    assert!(uuid::Uuid::parse_str(&first.request_id).is_ok());

    f.set_phase(&id, pb::EnvironmentPhase::Stopped).await;
    assert_eq!(changed_id(&next(&mut stream).await), id);
    f.set_phase(&id, pb::EnvironmentPhase::Deleted).await;
    assert_eq!(changed_id(&next(&mut stream).await), id);

    // Disabling a class re-announces the environments that use it.
    let other = env_id(&f.environment(&runner.id, &class.id).await);
    assert_eq!(changed_id(&next(&mut stream).await), other);
    f.admin
        .clone()
        .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
            environment_class_id: class.id.clone(),
            enabled: false,
        })
        .await
        .expect("disable");
    let mut announced = vec![
        changed_id(&next(&mut stream).await),
        changed_id(&next(&mut stream).await),
    ];
    announced.sort();
    let mut expected = vec![id, other];
    expected.sort();
    assert_eq!(announced, expected);
}

#[tokio::test]
async fn a_dropped_stream_can_be_reopened_and_a_full_list_returns_everything() {
    let f = Fixture::new().await;
    let runner = f.runner("reconnect").await;
    let class = f.class(&runner.id).await;
    let mut ids = Vec::new();

    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    for _ in 0..3 {
        ids.push(env_id(&f.environment(&runner.id, &class.id).await));
        next(&mut stream).await;
    }
    drop(stream);
    wait_for_streams(&f, &runner.id, 0).await;

    // Changes while disconnected are not replayed; the list has them.
    for _ in 0..2 {
        ids.push(env_id(&f.environment(&runner.id, &class.id).await));
    }
    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    let listed = runner
        .client
        .clone()
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let mut listed: Vec<String> = listed.environments.into_iter().map(|e| e.id).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);

    let latest = env_id(&f.environment(&runner.id, &class.id).await);
    assert_eq!(changed_id(&next(&mut stream).await), latest);
}

#[tokio::test]
async fn the_control_plane_can_cut_streams() {
    let f = Fixture::new().await;
    let runner = f.runner("cut").await;
    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    let closed = f
        .admin
        .clone()
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("close")
        .into_inner()
        .closed;
    assert_eq!(closed, 1);
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends");
    let status = end.expect("an item").expect_err("an error");
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn a_restart_ends_streams_and_keeps_records() {
    let f = Fixture::new().await;
    let runner = f.runner("restart").await;
    let class = f.class(&runner.id).await;
    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;

    let cp = f.cp.restart().await.expect("restart");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream ends");
    assert!(
        !matches!(end, Some(Ok(_))),
        "stream delivered after restart: {end:?}"
    );

    let channel = cp.channel().await.expect("reconnect");
    let mut client = testkit::runner_client(channel, &runner.access_token);
    let listed = client
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("list after restart")
        .into_inner();
    assert_eq!(listed.environments.len(), 1);
    assert_eq!(listed.environments[0].id, id);
}

/// Answers every call on `stream` the way `answer` says, until the stream ends.
fn serve_calls(
    runner: &TestRunner,
    mut stream: Streaming<pb::RunnerRequest>,
    answer: fn(&crypto_box::SecretKey, Kind) -> Option<pb::send_response_request::Outcome>,
) -> tokio::task::JoinHandle<Vec<Kind>> {
    let mut client = runner.client.clone();
    let key = runner.secret_key.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(request)) = stream.next().await {
            let kind = request.kind.expect("kind");
            seen.push(kind.clone());
            if let Some(outcome) = answer(&key, kind) {
                client
                    .send_response(pb::SendResponseRequest {
                        request_id: request.request_id,
                        outcome: Some(outcome),
                    })
                    .await
                    .expect("send response");
            }
        }
        seen
    })
}

fn result(kind: runner_result::Kind) -> Option<pb::send_response_request::Outcome> {
    Some(pb::send_response_request::Outcome::Result(
        pb::RunnerResult { kind: Some(kind) },
    ))
}

fn call(runner_id: &str, kind: Kind, timeout_ms: u32) -> admin::CallRunnerRequest {
    admin::CallRunnerRequest {
        runner_id: runner_id.into(),
        request: Some(pb::RunnerRequest {
            request_id: String::new(),
            kind: Some(kind),
        }),
        timeout_ms,
    }
}

#[tokio::test]
async fn calls_are_answered_through_send_response() {
    let f = Fixture::new().await;
    let runner = f.runner("calls").await;
    let mut admin = f.admin.clone();

    let offline = admin
        .call_runner(call(&runner.id, Kind::Ping(pb::Ping {}), 0))
        .await;
    assert_status(offline, Code::Unavailable, "no open WatchRequests stream");

    let stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    let task = serve_calls(&runner, stream, |_, kind| match kind {
        Kind::Ping(_) => result(runner_result::Kind::Ping(pb::PingResult {
            version: "0.1.0".into(),
        })),
        Kind::ParseContext(_) => Some(pb::send_response_request::Outcome::Error(pb::RunnerError {
            code: Code::InvalidArgument as i32,
            message: "url: unknown host".into(),
        })),
        _ => None,
    });

    let answer = admin
        .call_runner(call(&runner.id, Kind::Ping(pb::Ping {}), 0))
        .await
        .expect("ping")
        .into_inner();
    match answer.outcome {
        Some(admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::Ping(p)),
        })) => assert_eq!(p.version, "0.1.0"),
        other => panic!("unexpected answer {other:?}"),
    }

    let parse = admin
        .call_runner(call(
            &runner.id,
            Kind::ParseContext(pb::ParseContext {
                principal: "alice".into(),
                url: "https://unknown.example/x".into(),
            }),
            0,
        ))
        .await
        .expect("parse")
        .into_inner();
    match parse.outcome {
        Some(admin::call_runner_response::Outcome::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.message, "url: unknown host");
        }
        other => panic!("unexpected answer {other:?}"),
    }

    let unanswered = admin
        .call_runner(call(
            &runner.id,
            Kind::CheckAuthenticationForHost(pb::CheckAuthenticationForHost {
                principal: "alice".into(),
                host: "github.com".into(),
            }),
            200,
        ))
        .await;
    assert_status(unanswered, Code::DeadlineExceeded, "did not answer");

    let event = admin
        .call_runner(call(
            &runner.id,
            Kind::EnvironmentChanged(pb::EnvironmentChanged {
                environment_id: uuid::Uuid::new_v4().to_string(),
            }),
            0,
        ))
        .await;
    assert_status(
        event,
        Code::InvalidArgument,
        "events cannot be sent as calls",
    );

    let stray = runner
        .client
        .clone()
        .send_response(pb::SendResponseRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            outcome: result(runner_result::Kind::Ping(pb::PingResult::default())),
        })
        .await;
    assert_status(stray, Code::NotFound, "request_id");
    let no_outcome = runner
        .client
        .clone()
        .send_response(pb::SendResponseRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            outcome: None,
        })
        .await;
    assert_status(no_outcome, Code::InvalidArgument, "outcome");

    f.admin
        .clone()
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("close");
    let seen = task.await.expect("answering task");
    assert_eq!(
        seen.len(),
        3,
        "ping, parse_context and check_authentication: {seen:?}"
    );
}

#[tokio::test]
async fn a_result_must_match_its_call() {
    let f = Fixture::new().await;
    let runner = f.runner("mismatch").await;
    let mut stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    let mut admin = f.admin.clone();
    let pending = tokio::spawn({
        let id = runner.id.clone();
        async move {
            admin
                .call_runner(call(&id, Kind::Ping(pb::Ping {}), 2000))
                .await
        }
    });
    let request = next(&mut stream).await;
    let wrong = runner
        .client
        .clone()
        .send_response(pb::SendResponseRequest {
            request_id: request.request_id.clone(),
            outcome: result(runner_result::Kind::StoreHostToken(
                pb::StoreHostTokenResult::default(),
            )),
        })
        .await;
    assert_status(wrong, Code::InvalidArgument, "result.kind");
    runner
        .client
        .clone()
        .send_response(pb::SendResponseRequest {
            request_id: request.request_id,
            outcome: result(runner_result::Kind::Ping(pb::PingResult {
                version: "0.1.0".into(),
            })),
        })
        .await
        .expect("right kind");
    assert!(pending.await.expect("join").is_ok());
}

#[tokio::test]
async fn events_reach_every_stream_and_calls_exactly_one() {
    let f = Fixture::new().await;
    let runner = f.runner("replicas").await;
    let class = f.class(&runner.id).await;
    let old = watch(&runner).await;
    let new = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 2).await;
    let answer: fn(&crypto_box::SecretKey, Kind) -> Option<pb::send_response_request::Outcome> =
        |_, kind| match kind {
            Kind::Ping(_) => result(runner_result::Kind::Ping(pb::PingResult::default())),
            _ => None,
        };
    let old_task = serve_calls(&runner, old, answer);
    let new_task = serve_calls(&runner, new, answer);

    f.environment(&runner.id, &class.id).await;
    for _ in 0..3 {
        f.admin
            .clone()
            .call_runner(call(&runner.id, Kind::Ping(pb::Ping {}), 0))
            .await
            .expect("ping");
    }
    f.admin
        .clone()
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("close");
    let old_seen = old_task.await.expect("old");
    let new_seen = new_task.await.expect("new");
    let count = |seen: &[Kind], f: fn(&Kind) -> bool| seen.iter().filter(|k| f(k)).count();
    let is_event = |k: &Kind| matches!(k, Kind::EnvironmentChanged(_));
    let is_ping = |k: &Kind| matches!(k, Kind::Ping(_));
    assert_eq!(count(&old_seen, is_event), 1);
    assert_eq!(count(&new_seen, is_event), 1);
    // Calls go to the newest stream only.
    assert_eq!(count(&old_seen, is_ping), 0, "calls on the older stream");
    assert_eq!(count(&new_seen, is_ping), 3, "calls on the newest stream");
}

#[tokio::test]
async fn scm_and_token_changes_reach_the_runner_sealed() {
    let f = Fixture::new().await;
    let runner = f.runner("scm").await;
    let mut admin = f.admin.clone();
    let stream = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    let task = serve_calls(&runner, stream, |key, kind| match kind {
        Kind::StoreHostToken(store) => {
            let pat = runner_core::sealed::open(
                key,
                &store.sealed_token,
                control_plane::cli::pat_binding(&store.principal, &store.host),
            )
            .expect("the runner opens what was sealed to it, for this principal and host");
            let username = if secrecy::ExposeSecret::expose_secret(&pat) == "ghp_example_token" {
                "alice-gh"
            } else {
                "wrong"
            };
            result(runner_result::Kind::StoreHostToken(
                pb::StoreHostTokenResult {
                    username: username.into(),
                },
            ))
        }
        _ => None,
    });

    let public_key = admin
        .get_runner(admin::GetRunnerRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("get runner")
        .into_inner()
        .public_key;
    assert_eq!(
        public_key,
        runner.secret_key.public_key().as_bytes().to_vec()
    );

    let secret = control_plane::cli::seal(
        &public_key,
        control_plane::cli::client_secret_binding("github.com"),
        b"oauth-client-secret",
    )
    .expect("seal");
    let integration = admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: runner.id.clone(),
            kind: pb::ScmKind::Github as i32,
            host: "github.com".into(),
            oauth: Some(pb::OAuthApp {
                client_id: "Iv1.abc".into(),
                sealed_client_secret: secret,
            }),
            pat_enabled: false,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("create integration")
        .into_inner();
    let duplicate = admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: runner.id.clone(),
            kind: pb::ScmKind::Github as i32,
            host: "github.com".into(),
            oauth: None,
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await;
    assert_status(duplicate, Code::AlreadyExists, "host");

    let sealed = control_plane::cli::seal(
        &public_key,
        control_plane::cli::pat_binding("alice", "github.com"),
        b"ghp_example_token",
    )
    .expect("seal");
    assert!(!sealed.windows(17).any(|w| w == b"ghp_example_token"));
    let add = |sealed: Vec<u8>| admin::AddHostTokenRequest {
        runner_id: runner.id.clone(),
        principal: "alice".into(),
        host: "github.com".into(),
        sealed_token: sealed,
        timeout_ms: 0,
    };
    assert_status(
        admin.add_host_token(add(sealed.clone())).await,
        Code::FailedPrecondition,
        "disabled",
    );

    admin
        .update_scm_integration(admin::UpdateScmIntegrationRequest {
            integration_id: integration.id.clone(),
            oauth: None,
            pat_enabled: Some(true),
            api_base_url: None,
            oauth_base_url: None,
        })
        .await
        .expect("enable PAT");
    let token = admin
        .add_host_token(add(sealed))
        .await
        .expect("add token")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(token.username, "alice-gh");
    let listed = admin
        .list_scm_integrations(admin::ListScmIntegrationsRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("list")
        .into_inner()
        .integrations;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].pat_enabled);
    assert_eq!(
        listed[0].oauth.as_ref().map(|o| o.client_id.as_str()),
        Some("Iv1.abc"),
        "OAuth kept"
    );
    assert_status(
        admin.add_host_token(add(vec![1, 2, 3])).await,
        Code::InvalidArgument,
        "sealed_token",
    );

    admin
        .delete_host_token(admin::DeleteHostTokenRequest {
            runner_id: runner.id.clone(),
            principal: "alice".into(),
            host: "github.com".into(),
        })
        .await
        .expect("delete token");
    admin
        .delete_scm_integration(admin::DeleteScmIntegrationRequest {
            integration_id: integration.id.clone(),
        })
        .await
        .expect("delete integration");
    admin
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("close");

    let seen = task.await.expect("answering task");
    let names: Vec<&str> = seen
        .iter()
        .map(|k| match k {
            Kind::ScmIntegrationChanged(c) => {
                assert_eq!(c.integration_id, integration.id);
                "scm_integration_changed"
            }
            Kind::StoreHostToken(_) => "store_host_token",
            Kind::HostTokenDeleted(d) => {
                assert_eq!(
                    (d.principal.as_str(), d.host.as_str()),
                    ("alice", "github.com")
                );
                "host_token_deleted"
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "scm_integration_changed",
            "scm_integration_changed",
            "store_host_token",
            "host_token_deleted",
            "scm_integration_changed"
        ]
    );
}

#[tokio::test]
async fn a_stream_that_is_not_read_is_closed_and_a_new_one_gets_events() {
    let f = Fixture::new().await;
    let runner = f.runner("stuck").await;
    let class = f.class(&runner.id).await;
    let env = f.environment(&runner.id, &class.id).await;
    let id = env.environment.expect("environment").id;
    // Opened, on a connection of its own, and never read: events pile up in
    // HTTP/2's window and the hub's buffer until the stream is closed (by the
    // hub when its buffer is full, or by the server's HTTP/2 flood guard,
    // whichever comes first: the runner sees the same end either way).
    let own = f.cp.channel().await.expect("connect");
    let stuck = testkit::runner_client(own, &runner.access_token)
        .watch_requests(pb::WatchRequestsRequest {})
        .await
        .expect("watch")
        .into_inner();
    wait_for_streams(&f, &runner.id, 1).await;
    let mut closed = false;
    for i in 0..20_000 {
        let phase = if i % 2 == 0 {
            pb::EnvironmentPhase::Stopped
        } else {
            pb::EnvironmentPhase::Running
        };
        f.set_phase(&id, phase).await;
        if i % 100 == 99 {
            let open = f
                .admin
                .clone()
                .get_runner(admin::GetRunnerRequest {
                    runner_id: runner.id.clone(),
                })
                .await
                .expect("get runner")
                .into_inner()
                .open_streams;
            if open == 0 {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the hub kept a stream nobody reads");
    // Its reader gets what was buffered, then the end.
    let drained = tokio::time::timeout(Duration::from_secs(10), async move {
        let mut stuck = stuck;
        let mut n = 0;
        while let Some(Ok(_)) = stuck.next().await {
            n += 1;
        }
        n
    })
    .await
    .expect("the stream ends");
    assert!(drained > 0);
    // A new stream gets events again.
    let mut fresh = watch(&runner).await;
    wait_for_streams(&f, &runner.id, 1).await;
    f.set_phase(&id, pb::EnvironmentPhase::Stopped).await;
    f.set_phase(&id, pb::EnvironmentPhase::Running).await;
    let event = next(&mut fresh).await;
    assert!(matches!(event.kind, Some(Kind::EnvironmentChanged(_))));
}
