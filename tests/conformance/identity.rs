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
            public_key: Vec::new(),
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
            public_key: Vec::new(),
            exchange_token: token,
        })
        .await;
    assert_status(second, Code::Unauthenticated, "already used");
}

#[tokio::test]
async fn a_trade_with_a_public_key_can_be_repeated_for_that_key_only() {
    let f = Fixture::new().await;
    let (runner_id, token) = f.create_runner("retrade").await;
    let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let other = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let trade = |public_key: Vec<u8>| {
        let mut identity = f.identity.clone();
        let exchange_token = token.clone();
        async move {
            identity
                .exchange_token(pb::ExchangeTokenRequest {
                    exchange_token,
                    public_key,
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mine = key.public_key().as_bytes().to_vec();
    let first = trade(mine.clone()).await.expect("first trade");
    assert_eq!(first.runner_id, runner_id);
    // The answer was lost: the same key trades again, and gets the same.
    f.clock.advance(Duration::from_secs(9 * 60));
    let again = trade(mine.clone())
        .await
        .expect("repeated within the window");
    assert_eq!(again.access_token, first.access_token);
    // Another key, no key, or after the window: used.
    assert_status(
        trade(other.public_key().as_bytes().to_vec()).await,
        Code::Unauthenticated,
        "already used",
    );
    assert_status(
        trade(Vec::new()).await,
        Code::Unauthenticated,
        "already used",
    );
    assert_status(
        trade(vec![7; 31]).await,
        Code::InvalidArgument,
        "public_key",
    );
    f.clock.advance(Duration::from_secs(2 * 60));
    assert_status(trade(mine).await, Code::Unauthenticated, "already used");
    // Signup takes only the key the token was traded for.
    let mut client = testkit::runner_client(f.channel.clone(), &first.access_token);
    assert_status(
        client
            .signup(crate::signup_request(other.public_key().as_bytes()))
            .await,
        Code::FailedPrecondition,
        "not the key the exchange token was traded for",
    );
    client
        .signup(crate::signup_request(key.public_key().as_bytes()))
        .await
        .expect("signup with the traded key");
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
            public_key: Vec::new(),
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
            public_key: Vec::new(),
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
