//! ListHostTokens: the (principal, host) pairs whose tokens a runner may
//! keep, listed from the moment the storing call is sent, taken back when
//! it is refused, and gone once deleted.

use std::collections::BTreeSet;
use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, runner_request::Kind, runner_result};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::{Fixture, TestRunner, assert_status};

async fn listed(runner: &TestRunner, page_size: u32) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let response = runner
            .client
            .clone()
            .list_host_tokens(pb::ListHostTokensRequest {
                page: Some(pb::PageRequest {
                    page_size,
                    page_token,
                }),
            })
            .await
            .expect("list host tokens")
            .into_inner();
        if page_size > 0 {
            assert!(response.host_tokens.len() <= page_size as usize);
        }
        for r in response.host_tokens {
            assert!(out.insert((r.principal, r.host)), "listed twice");
        }
        page_token = response.page.expect("page").next_page_token;
        if page_token.is_empty() {
            return out;
        }
    }
}

fn pairs(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(p, h)| ((*p).to_owned(), (*h).to_owned()))
        .collect()
}

/// Answers one call on the stream, after checking what the runner lists
/// while the call is in flight.
async fn answer_next(
    runner: &TestRunner,
    stream: &mut tonic::Streaming<pb::RunnerRequest>,
    outcome: pb::send_response_request::Outcome,
) -> (Kind, BTreeSet<(String, String)>) {
    let request = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a call within 5 s")
        .expect("stream open")
        .expect("request");
    let during = listed(runner, 0).await;
    runner
        .client
        .clone()
        .send_response(pb::SendResponseRequest {
            request_id: request.request_id,
            outcome: Some(outcome),
        })
        .await
        .expect("send response");
    (request.kind.expect("kind"), during)
}

fn stored(username: &str) -> pb::send_response_request::Outcome {
    pb::send_response_request::Outcome::Result(pb::RunnerResult {
        kind: Some(runner_result::Kind::StoreHostToken(
            pb::StoreHostTokenResult {
                username: username.into(),
            },
        )),
    })
}

fn refused() -> pb::send_response_request::Outcome {
    pb::send_response_request::Outcome::Error(pb::RunnerError {
        code: Code::InvalidArgument as i32,
        message: "sealed_token: was sealed for another principal".into(),
    })
}

#[tokio::test]
async fn host_tokens_are_listed_from_the_call_until_deleted() {
    let f = Fixture::new().await;
    let runner = f.runner("host-tokens").await;
    let other = f.runner("someone-else").await;
    let mut admin = f.admin.clone();
    let mut stream = runner
        .client
        .clone()
        .watch_requests(pb::WatchRequestsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let integration = admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: runner.id.clone(),
            kind: pb::ScmKind::Github as i32,
            host: "github.com".into(),
            oauth: None,
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration")
        .into_inner();
    // The integration's event.
    let event = stream.next().await.expect("open").expect("event");
    assert!(matches!(event.kind, Some(Kind::ScmIntegrationChanged(_))));
    assert!(listed(&runner, 0).await.is_empty());

    let public_key = runner.secret_key.public_key().as_bytes().to_vec();
    let add = |principal: &str| admin::AddHostTokenRequest {
        runner_id: runner.id.clone(),
        principal: principal.into(),
        host: "github.com".into(),
        sealed_token: control_plane::cli::seal(
            &public_key,
            control_plane::cli::pat_binding(principal, "github.com"),
            b"ghp_example",
        )
        .expect("seal"),
        timeout_ms: 5000,
    };

    // Refused by the runner: listed while in flight, then taken back.
    let call = tokio::spawn({
        let mut admin = admin.clone();
        let request = add("mallory");
        async move { admin.add_host_token(request).await }
    });
    let (kind, during) = answer_next(&runner, &mut stream, refused()).await;
    assert!(matches!(kind, Kind::StoreHostToken(_)));
    assert_eq!(during, pairs(&[("mallory", "github.com")]));
    assert_status(
        call.await.expect("join"),
        Code::InvalidArgument,
        "another principal",
    );
    assert!(
        listed(&runner, 0).await.is_empty(),
        "a refused token is not listed"
    );

    // Stored: listed during and after, to this runner only.
    for principal in ["alice", "bob", "carol"] {
        let call = tokio::spawn({
            let mut admin = admin.clone();
            let request = add(principal);
            async move { admin.add_host_token(request).await }
        });
        let (_, during) = answer_next(&runner, &mut stream, stored(principal)).await;
        assert!(during.contains(&(principal.to_owned(), "github.com".to_owned())));
        call.await.expect("join").expect("stored");
    }
    // An OAuth code exchanged through the runner is listed too.
    let call = tokio::spawn({
        let mut admin = admin.clone();
        let request = admin::CallRunnerRequest {
            runner_id: runner.id.clone(),
            request: Some(pb::RunnerRequest {
                request_id: String::new(),
                kind: Some(Kind::ExchangeOauthCode(pb::ExchangeOauthCode {
                    principal: "dave".into(),
                    host: "github.com".into(),
                    code: "code-1".into(),
                    redirect_uri: "https://cp.example.com/cb".into(),
                    code_verifier: String::new(),
                })),
            }),
            timeout_ms: 5000,
        };
        async move { admin.call_runner(request).await }
    });
    let exchanged = pb::send_response_request::Outcome::Result(pb::RunnerResult {
        kind: Some(runner_result::Kind::ExchangeOauthCode(
            pb::ExchangeOauthCodeResult { expires_at: None },
        )),
    });
    let (_, during) = answer_next(&runner, &mut stream, exchanged).await;
    assert!(during.contains(&("dave".to_owned(), "github.com".to_owned())));
    call.await.expect("join").expect("exchanged");

    let all = pairs(&[
        ("alice", "github.com"),
        ("bob", "github.com"),
        ("carol", "github.com"),
        ("dave", "github.com"),
    ]);
    assert_eq!(listed(&runner, 0).await, all);
    // Paging walks the same set, one at a time.
    assert_eq!(listed(&runner, 1).await, all);
    assert!(listed(&other, 0).await.is_empty(), "another runner's list");

    // Deleted: gone from the list whether or not the event arrives.
    drop(stream);
    admin
        .delete_host_token(admin::DeleteHostTokenRequest {
            runner_id: runner.id.clone(),
            principal: "bob".into(),
            host: "github.com".into(),
        })
        .await
        .expect("delete");
    assert_eq!(
        listed(&runner, 0).await,
        pairs(&[
            ("alice", "github.com"),
            ("carol", "github.com"),
            ("dave", "github.com"),
        ])
    );
    // The integration deleted: every pair of its host goes.
    admin
        .delete_scm_integration(admin::DeleteScmIntegrationRequest {
            integration_id: integration.id,
        })
        .await
        .expect("delete integration");
    assert!(listed(&runner, 0).await.is_empty());
}

#[tokio::test]
async fn list_host_tokens_needs_a_runner_and_a_valid_page() {
    let f = Fixture::new().await;
    let runner = f.runner("paging").await;
    let mut anonymous = pb::runner_service_client::RunnerServiceClient::new(f.channel.clone());
    assert_status(
        anonymous
            .list_host_tokens(pb::ListHostTokensRequest::default())
            .await,
        Code::Unauthenticated,
        "missing authorization",
    );
    let page = |page_size: u32, page_token: &str| pb::ListHostTokensRequest {
        page: Some(pb::PageRequest {
            page_size,
            page_token: page_token.into(),
        }),
    };
    assert_status(
        runner.client.clone().list_host_tokens(page(1001, "")).await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        runner
            .client
            .clone()
            .list_host_tokens(page(10, "not a token"))
            .await,
        Code::InvalidArgument,
        "page_token",
    );
}
