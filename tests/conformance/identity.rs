//! ExchangeToken is single use and expires; runner calls need a valid bearer.

use std::time::Duration;

use runner_proto::pb;
use tonic::Code;

use crate::{Fixture, assert_status};

#[tokio::test]
async fn exchange_token_works_once() {
    let f = Fixture::new().await;
    let (runner_id, token) = f.create_runner("once").await;
    let first = f
        .identity
        .clone()
        .exchange_token(pb::ExchangeTokenRequest {
            exchange_token: token.clone(),
        })
        .await
        .expect("first exchange")
        .into_inner();
    assert_eq!(first.runner_id, runner_id);
    assert!(first.access_token.len() >= 32);
    assert_ne!(first.access_token, token);

    let second = f
        .identity
        .clone()
        .exchange_token(pb::ExchangeTokenRequest {
            exchange_token: token,
        })
        .await;
    assert_status(second, Code::Unauthenticated, "already used");
}

#[tokio::test]
async fn exchange_token_expires_after_24_hours() {
    let f = Fixture::new().await;
    let (_, token) = f.create_runner("late").await;
    f.clock.advance(Duration::from_secs(24 * 3600));
    let result = f
        .identity
        .clone()
        .exchange_token(pb::ExchangeTokenRequest {
            exchange_token: token,
        })
        .await;
    assert_status(result, Code::Unauthenticated, "expired");
}

#[tokio::test]
async fn unknown_or_empty_exchange_tokens_are_refused() {
    let f = Fixture::new().await;
    let unknown = f
        .identity
        .clone()
        .exchange_token(pb::ExchangeTokenRequest {
            exchange_token: "ret_nope".into(),
        })
        .await;
    assert_status(unknown, Code::Unauthenticated, "not valid");
    let empty = f
        .identity
        .clone()
        .exchange_token(pb::ExchangeTokenRequest::default())
        .await;
    assert_status(empty, Code::InvalidArgument, "exchange_token");
}

#[tokio::test]
async fn runner_calls_need_a_valid_bearer_token() {
    let f = Fixture::new().await;
    let (_, exchange_token) = f.create_runner("auth").await;

    let mut anonymous = pb::runner_service_client::RunnerServiceClient::new(f.channel.clone());
    assert_status(
        anonymous.mark_active(pb::MarkActiveRequest {}).await,
        Code::Unauthenticated,
        "missing authorization",
    );
    assert_status(
        anonymous
            .list_environments(pb::ListEnvironmentsRequest::default())
            .await,
        Code::Unauthenticated,
        "missing authorization",
    );

    let mut wrong = testkit::runner_client(f.channel.clone(), "rat_wrong");
    assert_status(
        wrong.mark_active(pb::MarkActiveRequest {}).await,
        Code::Unauthenticated,
        "not valid",
    );

    // The exchange token is not an access token.
    let mut exchange = testkit::runner_client(f.channel.clone(), &exchange_token);
    assert_status(
        exchange.mark_active(pb::MarkActiveRequest {}).await,
        Code::Unauthenticated,
        "not valid",
    );
}

#[tokio::test]
async fn admin_token_is_enforced_when_configured() {
    let config = control_plane::ServerConfig {
        admin_token: Some("adm-secret".into()),
        ..Default::default()
    };
    let f = Fixture::with_config(config).await;
    let denied = f
        .admin
        .clone()
        .list_runners(runner_proto::admin::v1::ListRunnersRequest {})
        .await;
    assert_status(denied, Code::Unauthenticated, "admin token");

    let mut authed =
        runner_proto::admin::v1::admin_service_client::AdminServiceClient::with_interceptor(
            f.channel.clone(),
            testkit::Bearer::new("adm-secret"),
        );
    let list = authed
        .list_runners(runner_proto::admin::v1::ListRunnersRequest {})
        .await
        .expect("authorized list");
    assert!(list.into_inner().runners.is_empty());
}
