//! Runner creation, signup rules and the phases an admin sees.

use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb;
use tonic::Code;

use crate::{Fixture, assert_status, signup_request};

async fn phase(f: &Fixture, id: &str) -> admin::RunnerPhase {
    let runner = f
        .admin
        .clone()
        .get_runner(admin::GetRunnerRequest {
            runner_id: id.into(),
        })
        .await
        .expect("get runner")
        .into_inner();
    admin::RunnerPhase::try_from(runner.phase).expect("known phase")
}

fn status(degraded: &str) -> pb::UpdateRunnerStatusRequest {
    pb::UpdateRunnerStatusRequest {
        version: "0.1.0".into(),
        region: "eu-west-1".into(),
        capabilities: vec![],
        degraded_message: degraded.into(),
        system_details: [("leader".to_owned(), "true".to_owned())].into(),
    }
}

#[tokio::test]
async fn phases_follow_signup_heartbeats_and_health() {
    let f = Fixture::new().await;
    let runner = f.exchanged_runner("phases").await;
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Created);

    let mut client = runner.client.clone();
    client
        .signup(signup_request(runner.secret_key.public_key().as_bytes()))
        .await
        .expect("signup");
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Active);

    client
        .update_runner_status(status("state store unreachable: timeout"))
        .await
        .expect("status");
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Degraded);
    let shown = f
        .admin
        .clone()
        .get_runner(admin::GetRunnerRequest {
            runner_id: runner.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(shown.degraded_message, "state store unreachable: timeout");
    assert_eq!(shown.version, "0.1.0");
    assert_eq!(shown.region, "eu-west-1");
    assert!(shown.last_seen.is_some());

    client
        .update_runner_status(status(""))
        .await
        .expect("status");
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Active);

    f.clock.advance(Duration::from_secs(89));
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Active);
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Inactive);

    client
        .mark_active(pb::MarkActiveRequest {})
        .await
        .expect("mark active");
    assert_eq!(phase(&f, &runner.id).await, admin::RunnerPhase::Active);
}

#[tokio::test]
async fn signup_is_idempotent_for_one_key_and_refuses_another() {
    let f = Fixture::new().await;
    let runner = f.runner("keys").await;
    let mut client = runner.client.clone();
    let again = client
        .signup(signup_request(runner.secret_key.public_key().as_bytes()))
        .await
        .expect("same key again")
        .into_inner();
    assert_eq!(again.runner_id, runner.id);

    let other = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    assert_status(
        client
            .signup(signup_request(other.public_key().as_bytes()))
            .await,
        Code::FailedPrecondition,
        "public_key",
    );
    assert_status(
        client.signup(signup_request(&[7; 31])).await,
        Code::InvalidArgument,
        "public_key",
    );

    let mut wrong_region = signup_request(runner.secret_key.public_key().as_bytes());
    wrong_region.region = "us-east-1".into();
    assert_status(
        client.signup(wrong_region).await,
        Code::FailedPrecondition,
        "region",
    );

    let mut bad_schema = signup_request(runner.secret_key.public_key().as_bytes());
    bad_schema.environment_class_schema = "{not json".into();
    assert_status(
        client.signup(bad_schema).await,
        Code::InvalidArgument,
        "environment_class_schema",
    );

    let mut bad_version = signup_request(runner.secret_key.public_key().as_bytes());
    bad_version.version = "one".into();
    assert_status(
        client.signup(bad_version).await,
        Code::InvalidArgument,
        "version",
    );
}

#[tokio::test]
async fn create_runner_validates_and_builds_the_quick_create_link() {
    let f = Fixture::new().await;
    let created = f
        .admin
        .clone()
        .create_runner(admin::CreateRunnerRequest {
            name: "prod-eu".into(),
            region: "eu-central-1".into(),
        })
        .await
        .expect("create")
        .into_inner();
    let runner = created.runner.expect("runner");
    let link = &created.quick_create_url;
    assert!(
        link.starts_with("https://eu-central-1.console.aws.amazon.com/cloudformation/"),
        "{link}"
    );
    let (_, query) = link
        .split_once("#/stacks/quickcreate?")
        .expect("quick-create fragment");
    let params: Vec<(String, String)> = query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.replace("%3A", ":").replace("%2F", "/"))
        })
        .collect();
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("param_RunnerId"), Some(runner.id.clone()));
    assert_eq!(
        get("param_ExchangeToken"),
        Some(created.exchange_token.clone())
    );
    assert_eq!(
        get("param_ControlPlaneUrl").as_deref(),
        Some("http://127.0.0.1:7443")
    );
    let expires = created.exchange_token_expires_at.expect("expiry");
    let made = runner.created_at.expect("created_at");
    assert_eq!(expires.seconds - made.seconds, 24 * 3600);

    for (name, region, field) in [
        ("bad name", "eu-west-1", "name"),
        ("ok", "europe", "region"),
        ("", "eu-west-1", "name"),
    ] {
        let result = f
            .admin
            .clone()
            .create_runner(admin::CreateRunnerRequest {
                name: name.into(),
                region: region.into(),
            })
            .await;
        assert_status(result, Code::InvalidArgument, field);
    }
}

#[tokio::test]
async fn runner_status_is_checked() {
    let f = Fixture::new().await;
    let unsigned = f.exchanged_runner("unsigned").await;
    assert_status(
        unsigned
            .client
            .clone()
            .update_runner_status(status(""))
            .await,
        Code::FailedPrecondition,
        "signed up",
    );
    let runner = f.runner("checked").await;
    let mut client = runner.client.clone();
    let mut wrong_region = status("");
    wrong_region.region = "us-west-2".into();
    assert_status(
        client.update_runner_status(wrong_region).await,
        Code::FailedPrecondition,
        "region",
    );
    let long = status(&"x".repeat(1025));
    assert_status(
        client.update_runner_status(long).await,
        Code::InvalidArgument,
        "degraded_message",
    );
    let mut unknown_capability = status("");
    unknown_capability.capabilities = vec![99];
    assert_status(
        client.update_runner_status(unknown_capability).await,
        Code::InvalidArgument,
        "capabilities[0]",
    );
}

#[tokio::test]
async fn latest_version_follows_releases_and_auto_update() {
    let f = Fixture::new().await;
    let runner = f.runner("updates").await;
    let mut client = runner.client.clone();
    let none = client
        .get_latest_version(pb::GetLatestVersionRequest {
            current_version: "0.1.0".into(),
        })
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(none.version, "");

    f.admin
        .clone()
        .publish_release(admin::PublishReleaseRequest {
            version: "0.2.0".into(),
            image: "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner@sha256:2f2bb0a4ac2f6e5b2d2c1c1b0f3f8f1b9e0a4c2d6e8f0a1b3c5d7e9f1a2b3c4d".into(),
        })
        .await
        .expect("publish");
    f.admin
        .clone()
        .set_runner_auto_update(admin::SetRunnerAutoUpdateRequest {
            runner_id: runner.id.clone(),
            auto_update: true,
        })
        .await
        .expect("auto update");
    let latest = client
        .get_latest_version(pb::GetLatestVersionRequest {
            current_version: "0.1.0".into(),
        })
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(latest.version, "0.2.0");
    assert_eq!(
        latest.image,
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner@sha256:2f2bb0a4ac2f6e5b2d2c1c1b0f3f8f1b9e0a4c2d6e8f0a1b3c5d7e9f1a2b3c4d"
    );
    assert!(latest.auto_update);
}
