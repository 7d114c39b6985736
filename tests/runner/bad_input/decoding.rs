//! The runner's own decoding of what the control plane sends: a message
//! that does not decode fails as a whole, and an environment that decodes
//! but is malformed is refused with an error naming the field.

use prost::Message as _;
use runner_proto::pb::{self, runner_request::Kind};
use testkit::tamper::{with_invalid_utf8, with_nested_groups};

use super::runner_request;

#[test]
fn an_environment_with_invalid_utf8_does_not_decode() {
    let bytes = with_invalid_utf8(
        &pb::RunnerEnvironment {
            id: "@@BADUTF8@@".into(),
            ..Default::default()
        },
        "@@BADUTF8@@",
    );
    let err = pb::RunnerEnvironment::decode(bytes.as_slice()).expect_err("invalid UTF-8");
    assert!(
        err.to_string()
            .contains("RunnerEnvironment.id: invalid string value"),
        "{err}"
    );
}

#[test]
fn a_request_nested_10_000_groups_deep_does_not_decode() {
    let bytes = with_nested_groups(&runner_request("r", Kind::Ping(pb::Ping {})), 10_000);
    let err = pb::RunnerRequest::decode(bytes.as_slice()).expect_err("too deep");
    assert!(err.to_string().contains("recursion limit reached"), "{err}");
}

#[test]
fn an_environment_id_that_is_not_a_uuid_is_refused() {
    let err = runnerd::control_plane::environment_from_proto(pb::RunnerEnvironment {
        id: "not-a-uuid".into(),
        ..Default::default()
    })
    .expect_err("not a UUID");
    assert_eq!(err, "environment_id: is not a UUID");
}

#[test]
fn an_environment_without_a_spec_is_refused() {
    let id = uuid::Uuid::new_v4().to_string();
    let err = runnerd::control_plane::environment_from_proto(pb::RunnerEnvironment {
        id: id.clone(),
        ..Default::default()
    })
    .expect_err("no spec");
    assert_eq!(err, format!("environment {id}: spec: must be set"));
}
