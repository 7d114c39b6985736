//! Oversized messages and over-long fields are refused.

use runner_proto::admin::v1 as admin;
use tonic::Code;

use crate::{Fixture, assert_status, signup_request};

#[tokio::test]
async fn oversized_messages_are_refused() {
    let f = Fixture::new().await;
    let runner = f.exchanged_runner("big").await;
    let mut request = signup_request(runner.secret_key.public_key().as_bytes());
    request.environment_class_schema = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
    let result = runner.client.clone().signup(request).await;
    let status = result.expect_err("a 2 MiB message is refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected {status:?}"
    );
    assert!(
        status.message().contains("message length too large"),
        "{}",
        status.message()
    );

    // Under the message limit, a field over its own limit names the field.
    let mut request = signup_request(runner.secret_key.public_key().as_bytes());
    request.environment_class_schema = format!("\"{}\"", "x".repeat(70 * 1024));
    assert_status(
        runner.client.clone().signup(request).await,
        Code::InvalidArgument,
        "environment_class_schema",
    );

    let long_name = f
        .admin
        .clone()
        .create_environment_class(admin::CreateEnvironmentClassRequest {
            runner_id: runner.id.clone(),
            display_name: "n".repeat(129),
            instance_type: "m7i.large".into(),
            disk_gib: 50,
        })
        .await;
    assert_status(
        long_name,
        Code::InvalidArgument,
        "display_name: is 129 bytes long, the limit is 128",
    );
}
