//! An AWS error as the runner reports it: the call, the HTTP status, the
//! service's code and message (moto's answers), or, for a bare 5xx or no
//! answer at all (the fault proxy's), the status or the SDK's cause; and the
//! setup check a failing service breaks sends nobody to change a setting.

use runner_aws::error::AwsError;
use runner_core::model::EnvironmentId;
use runner_core::traits::{StateStore as _, StoreError};
use runnerd::doctor::{Doctor, Status};
use testkit::proxy::{Fault, FaultProxy, Rule};

use crate::doctor::{Setup, config};
use crate::{Infra, leading, moto_url, sdk};

const DESCRIBE_KEY: &str = "TrentService.DescribeKey";

fn always(operation: &str, fault: Fault) -> Vec<Rule> {
    vec![Rule {
        operations: vec![operation.to_owned()],
        rate: 1.0,
        fault,
    }]
}

async fn describe_missing_key(sdk: &aws_config::SdkConfig) -> AwsError {
    let err = aws_sdk_kms::Client::new(sdk)
        .describe_key()
        .key_id("00000000-0000-0000-0000-000000000000")
        .send()
        .await
        .expect_err("no such key");
    AwsError::new(err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_reported_with_its_call_status_code_and_message() {
    let sdk = sdk(&moto_url()).await;
    let err = describe_missing_key(&sdk).await;
    let text = err.to_string();
    let prefix = "kms:DescribeKey: HTTP 400: NotFoundException: ";
    assert!(text.starts_with(prefix), "{text}");
    assert!(
        text.len() > prefix.len() + 10,
        "the service's message: {text}"
    );
    assert!(!err.is_fault());
    assert_eq!(err.hint("set the key"), "set the key");

    // An adapter's error carries the same account.
    let infra = Infra {
        table: "no-such-table".to_owned(),
        ..Infra::create(&sdk).await
    };
    let store = infra.adapters(&sdk, "a", &leading()).store;
    let err = store
        .get(EnvironmentId(uuid::Uuid::new_v4()))
        .await
        .expect_err("no table");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let text = runner_core::error::chain(&err);
    assert!(
        text.contains("dynamodb:GetItem: HTTP 400: ResourceNotFoundException: "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_5xx_and_no_answer_name_the_call_and_the_cause() {
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let through = sdk(&proxy.url()).await;

    proxy.set_rules(always(DESCRIBE_KEY, Fault::Status(500)));
    let err = describe_missing_key(&through).await;
    assert_eq!(err.to_string(), "kms:DescribeKey: HTTP 500: no error code");
    assert_eq!(err.status(), Some(500));
    assert!(err.is_fault());
    assert!(
        !err.hint("set RUNNER_KMS_KEY_ID")
            .contains("RUNNER_KMS_KEY_ID"),
        "{}",
        err.hint("set RUNNER_KMS_KEY_ID")
    );

    proxy.set_rules(always(DESCRIBE_KEY, Fault::Reset));
    let err = describe_missing_key(&through).await;
    let text = err.to_string();
    assert!(text.starts_with("kms:DescribeKey: "), "{text}");
    // The SDK's account, down to the cause.
    assert!(text.contains("dispatch failure"), "{text}");
    assert!(err.status().is_none() && err.is_fault());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_service_fails_to_describe_fails_its_check_with_the_cause_not_a_setting() {
    let setup = Setup::new().await;
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let through = sdk(&proxy.url()).await;
    // As moto answers DescribeKey for a key its CloudFormation created.
    proxy.set_rules(always(DESCRIBE_KEY, Fault::Status(500)));
    let report = Doctor::new(&through, &config(&setup.flags(&[])), None)
        .run()
        .await;
    let check = report.check("kms-key").expect("the key check");
    assert_eq!(check.status, Status::Fail, "{}", report.text());
    assert_eq!(check.message, "kms:DescribeKey: HTTP 500: no error code");
    let hint = check.hint.as_deref().unwrap_or_default();
    assert!(
        !hint.contains("RUNNER_KMS_KEY_ID") && hint.contains("HTTP 500"),
        "{hint}"
    );
    assert_eq!(
        report.problem().as_deref(),
        Some("kms-key: kms:DescribeKey: HTTP 500: no error code")
    );
}
