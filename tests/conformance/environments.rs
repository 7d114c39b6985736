//! Environment specs, status reports and what each runner may see.

use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase};
use tonic::Code;

use crate::{Fixture, assert_status, create_environment_request, env_id, spec};

fn status(version: u64, spec_version: u64, phase: Phase) -> pb::EnvironmentStatus {
    pb::EnvironmentStatus {
        status_version: version,
        runner_ack: Some(pb::RunnerAck {
            spec_version,
            code: pb::RunnerAckCode::Ok as i32,
            message: String::new(),
        }),
        phase: phase as i32,
        machine: Some(pb::Machine {
            instance_id: "i-0123456789abcdef0".into(),
            availability_zone: "eu-west-1a".into(),
            subnet_id: "subnet-0abc".into(),
            private_ip: "10.0.1.17".into(),
            phase: pb::MachinePhase::Running as i32,
        }),
        failure_message: String::new(),
        warning_message: String::new(),
        ..Default::default()
    }
}

fn report(id: &str, status: pb::EnvironmentStatus) -> pb::UpdateEnvironmentStatusRequest {
    pb::UpdateEnvironmentStatusRequest {
        environment_id: id.into(),
        status: Some(status),
    }
}

#[tokio::test]
async fn each_change_bumps_the_spec_version() {
    let f = Fixture::new().await;
    let runner = f.runner("specs").await;
    let class = f.class(&runner.id).await;
    let env = f.environment(&runner.id, &class.id).await;
    let id = env_id(&env);
    assert_eq!(spec(&env).spec_version, 1);
    assert_eq!(spec(&env).desired_phase, Phase::Running as i32);
    assert_eq!(
        env.environment
            .as_ref()
            .and_then(|e| e.metadata.as_ref())
            .map(|m| m.creator.as_str()),
        Some("alice")
    );

    let stopped = f.set_phase(&id, Phase::Stopped).await;
    assert_eq!(
        (spec(&stopped).spec_version, spec(&stopped).desired_phase),
        (2, Phase::Stopped as i32)
    );
    // Asking for the phase it already has is not a change.
    let again = f.set_phase(&id, Phase::Stopped).await;
    assert_eq!(spec(&again).spec_version, 2);
    let started = f.set_phase(&id, Phase::Running).await;
    assert_eq!(
        (spec(&started).spec_version, spec(&started).desired_phase),
        (3, Phase::Running as i32)
    );
    let deleted = f.set_phase(&id, Phase::Deleted).await;
    assert_eq!(
        (spec(&deleted).spec_version, spec(&deleted).desired_phase),
        (4, Phase::Deleted as i32)
    );

    let restart = f
        .admin
        .clone()
        .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
            environment_id: id.clone(),
            desired_phase: Phase::Running as i32,
        })
        .await;
    assert_status(restart, Code::FailedPrecondition, "being deleted");
    let creating = f
        .admin
        .clone()
        .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
            environment_id: id,
            desired_phase: Phase::Creating as i32,
        })
        .await;
    assert_status(creating, Code::InvalidArgument, "desired_phase");

    // The runner sees the same spec.
    let seen = runner
        .client
        .clone()
        .get_environment(pb::GetEnvironmentRequest {
            environment_id: env_id(&env),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(seen.spec.expect("spec").spec_version, 4);
}

#[tokio::test]
async fn create_environment_rejects_bad_input_naming_the_field() {
    let f = Fixture::new().await;
    let runner = f.runner("inputs").await;
    let other = f.runner("other").await;
    let class = f.class(&runner.id).await;
    let foreign = f.class(&other.id).await;
    let mut admin = f.admin.clone();

    let mut bad_url = create_environment_request(&runner.id, &class.id);
    bad_url.content.as_mut().expect("content").repository_url = "ftp://github.com/acme/api".into();
    assert_status(
        admin.create_environment(bad_url).await,
        Code::InvalidArgument,
        "content.repository_url",
    );

    let mut secret_url = create_environment_request(&runner.id, &class.id);
    secret_url.content.as_mut().expect("content").repository_url =
        "https://user:ghp_SECRET@github.com/a/b".into();
    let err = admin
        .create_environment(secret_url)
        .await
        .expect_err("credentials in URL");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        !err.message().contains("ghp_SECRET"),
        "secret echoed: {}",
        err.message()
    );

    let mut bad_branch = create_environment_request(&runner.id, &class.id);
    bad_branch.content.as_mut().expect("content").revision =
        Some(pb::environment_content::Revision::Branch("a..b".into()));
    assert_status(
        admin.create_environment(bad_branch).await,
        Code::InvalidArgument,
        "content.branch",
    );

    let mut bad_commit = create_environment_request(&runner.id, &class.id);
    bad_commit.content.as_mut().expect("content").revision =
        Some(pb::environment_content::Revision::Commit("abc".into()));
    assert_status(
        admin.create_environment(bad_commit).await,
        Code::InvalidArgument,
        "content.commit",
    );

    let no_content = admin::CreateEnvironmentRequest {
        content: None,
        ..create_environment_request(&runner.id, &class.id)
    };
    assert_status(
        admin.create_environment(no_content).await,
        Code::InvalidArgument,
        "content",
    );

    let unknown_class = create_environment_request(&runner.id, &uuid::Uuid::new_v4().to_string());
    assert_status(
        admin.create_environment(unknown_class).await,
        Code::InvalidArgument,
        "environment_class_id",
    );
    let foreign_class = create_environment_request(&runner.id, &foreign.id);
    assert_status(
        admin.create_environment(foreign_class).await,
        Code::InvalidArgument,
        "environment_class_id",
    );
    let not_uuid = create_environment_request(&runner.id, "small");
    assert_status(
        admin.create_environment(not_uuid).await,
        Code::InvalidArgument,
        "environment_class_id: is not a UUID",
    );

    admin
        .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
            environment_class_id: class.id.clone(),
            enabled: false,
        })
        .await
        .expect("disable");
    let disabled = create_environment_request(&runner.id, &class.id);
    assert_status(
        admin.create_environment(disabled).await,
        Code::FailedPrecondition,
        "disabled",
    );

    for (disk, instance_type, field) in [
        (4, "m7i.large", "disk_gib"),
        (16_385, "m7i.large", "disk_gib"),
        (50, "large", "instance_type"),
    ] {
        let result = admin
            .create_environment_class(admin::CreateEnvironmentClassRequest {
                runner_id: runner.id.clone(),
                display_name: "x".into(),
                instance_type: instance_type.into(),
                disk_gib: disk,
            })
            .await;
        assert_status(result, Code::InvalidArgument, field);
    }
}

#[tokio::test]
async fn status_versions_only_grow() {
    let f = Fixture::new().await;
    let runner = f.runner("versions").await;
    let class = f.class(&runner.id).await;
    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let mut client = runner.client.clone();

    client
        .update_environment_status(report(&id, status(1, 1, Phase::Creating)))
        .await
        .expect("v1");
    // A retried delivery of the same status is harmless.
    client
        .update_environment_status(report(&id, status(1, 1, Phase::Creating)))
        .await
        .expect("v1 again");
    assert_status(
        client
            .update_environment_status(report(&id, status(1, 1, Phase::Running)))
            .await,
        Code::FailedPrecondition,
        "already stored with different content",
    );
    client
        .update_environment_status(report(&id, status(5, 1, Phase::Running)))
        .await
        .expect("v5");
    assert_status(
        client
            .update_environment_status(report(&id, status(4, 1, Phase::Running)))
            .await,
        Code::FailedPrecondition,
        "status.status_version: 4 is lower than the stored 5",
    );
    assert_status(
        client
            .update_environment_status(report(&id, status(0, 1, Phase::Running)))
            .await,
        Code::InvalidArgument,
        "status.status_version",
    );
    assert_status(
        client
            .update_environment_status(report(&id, status(6, 2, Phase::Running)))
            .await,
        Code::InvalidArgument,
        "status.runner_ack.spec_version",
    );
    assert_status(
        client
            .update_environment_status(report(&id, status(6, 1, Phase::Unspecified)))
            .await,
        Code::InvalidArgument,
        "status.phase",
    );
    let mut long_failure = status(6, 1, Phase::Running);
    long_failure.failure_message = "x".repeat(5000);
    assert_status(
        client
            .update_environment_status(report(&id, long_failure))
            .await,
        Code::InvalidArgument,
        "status.failure_message",
    );
    assert_status(
        client
            .update_environment_status(pb::UpdateEnvironmentStatusRequest {
                environment_id: id.clone(),
                status: None,
            })
            .await,
        Code::InvalidArgument,
        "status: must be set",
    );
    assert_status(
        client
            .update_environment_status(report("i-am-not-a-uuid", status(6, 1, Phase::Running)))
            .await,
        Code::InvalidArgument,
        "environment_id",
    );

    let mut failed = status(7, 1, Phase::Creating);
    failed.failure_message = "no capacity for m7i.large in eu-west-1a, eu-west-1b".into();
    client
        .update_environment_status(report(&id, failed))
        .await
        .expect("v7");
    let shown = f
        .admin
        .clone()
        .get_environment(admin::GetEnvironmentRequest { environment_id: id })
        .await
        .expect("get")
        .into_inner();
    let last = shown.status.expect("status");
    assert_eq!(last.status_version, 7);
    assert_eq!(last.phase, Phase::Creating as i32);
    assert_eq!(
        last.failure_message,
        "no capacity for m7i.large in eu-west-1a, eu-west-1b"
    );
    let machine = last.machine.expect("machine");
    assert_eq!(machine.instance_id, "i-0123456789abcdef0");
    assert_eq!(machine.availability_zone, "eu-west-1a");
    assert!(shown.status_updated_at.is_some());
}

#[tokio::test]
async fn a_deleted_environment_disappears_for_the_runner_only() {
    let f = Fixture::new().await;
    let runner = f.runner("deletes").await;
    let class = f.class(&runner.id).await;
    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let mut client = runner.client.clone();
    f.set_phase(&id, Phase::Deleted).await;
    client
        .update_environment_status(report(&id, status(1, 2, Phase::Deleting)))
        .await
        .expect("deleting");
    assert!(
        client
            .get_environment(pb::GetEnvironmentRequest {
                environment_id: id.clone()
            })
            .await
            .is_ok()
    );

    let mut gone = status(2, 2, Phase::Deleted);
    gone.machine = None;
    client
        .update_environment_status(report(&id, gone))
        .await
        .expect("deleted");
    assert_status(
        client
            .get_environment(pb::GetEnvironmentRequest {
                environment_id: id.clone(),
            })
            .await,
        Code::NotFound,
        "does not exist",
    );
    let listed = client
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.environments.is_empty());

    let shown = f
        .admin
        .clone()
        .get_environment(admin::GetEnvironmentRequest {
            environment_id: id.clone(),
        })
        .await
        .expect("admin still sees it")
        .into_inner();
    assert_eq!(shown.status.expect("status").phase, Phase::Deleted as i32);
    let again = f
        .admin
        .clone()
        .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
            environment_id: id,
            desired_phase: Phase::Running as i32,
        })
        .await;
    assert_status(again, Code::FailedPrecondition, "was deleted");
}

#[tokio::test]
async fn runners_see_only_their_own_records() {
    let f = Fixture::new().await;
    let a = f.runner("a").await;
    let b = f.runner("b").await;
    let class = f.class(&a.id).await;
    let id = env_id(&f.environment(&a.id, &class.id).await);
    let mut b_client = b.client.clone();
    assert_status(
        b_client
            .get_environment(pb::GetEnvironmentRequest {
                environment_id: id.clone(),
            })
            .await,
        Code::NotFound,
        "does not exist",
    );
    assert_status(
        b_client
            .update_environment_status(report(&id, status(1, 1, Phase::Running)))
            .await,
        Code::NotFound,
        "does not exist",
    );
    let b_list = b_client
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(b_list.environments.is_empty());
    let b_classes = b_client
        .list_environment_classes(pb::ListEnvironmentClassesRequest::default())
        .await
        .expect("classes")
        .into_inner();
    assert!(b_classes.environment_classes.is_empty());
    let a_classes = a
        .client
        .clone()
        .list_environment_classes(pb::ListEnvironmentClassesRequest::default())
        .await
        .expect("classes")
        .into_inner();
    assert_eq!(a_classes.environment_classes, vec![class]);
}

#[tokio::test]
async fn list_environments_pages_through_everything() {
    let f = Fixture::new().await;
    let runner = f.runner("pages").await;
    let class = f.class(&runner.id).await;
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(env_id(&f.environment(&runner.id, &class.id).await));
    }
    created.sort();
    let mut client = runner.client.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_environments(pb::ListEnvironmentsRequest {
                page: Some(pb::PageRequest {
                    page_size: 3,
                    page_token: token.clone(),
                }),
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.environments.len() <= 3);
        seen.extend(page.environments.into_iter().map(|e| e.id));
        token = page.page.expect("page response").next_page_token;
        if token.is_empty() || pages > 10 {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);

    let too_big = client
        .list_environments(pb::ListEnvironmentsRequest {
            page: Some(pb::PageRequest {
                page_size: 5000,
                page_token: String::new(),
            }),
        })
        .await;
    assert_status(too_big, Code::InvalidArgument, "page.page_size");
    let bad_token = client
        .list_environments(pb::ListEnvironmentsRequest {
            page: Some(pb::PageRequest {
                page_size: 0,
                page_token: "not-a-token!".into(),
            }),
        })
        .await;
    assert_status(bad_token, Code::InvalidArgument, "page.page_token");
}

/// Issue 12: crafted repository URLs that a lenient parser reads as
/// github.com (or that are merely not canonical) are refused at create time,
/// naming the problem and echoing no part of the URL; the canonical forms
/// of real providers pass unchanged.
#[tokio::test]
async fn create_environment_accepts_only_canonical_repository_urls() {
    let f = Fixture::new().await;
    let runner = f.runner("urls").await;
    let class = f.class(&runner.id).await;
    let mut admin = f.admin.clone();
    let with_url = |url: &str| {
        let mut request = create_environment_request(&runner.id, &class.id);
        request.content.as_mut().expect("content").repository_url = url.into();
        request
    };
    for (url, problem) in [
        (
            "https://github.com\\@evil.example/acme/api",
            "must not contain a backslash",
        ),
        (
            "https://ghp_SeCrEt9@github.com/acme/api",
            "must not contain credentials or a user name",
        ),
        (
            "https://github.com/acme%2Fapi",
            "must not contain an encoded slash (%2F)",
        ),
        (
            "https://g\u{456}thub.com/acme/api",
            "host must be plain ASCII",
        ),
        (
            "https://xn--gthub-n2e.com/acme/api",
            "host must be plain ASCII",
        ),
        (
            "https://github.com/@evil.example/acme/api",
            "must not contain '@'",
        ),
        ("https://GitHub.com/acme/api", "host must be lowercase"),
        (
            "https://github.com:443/acme/api",
            "must not name the default port 443",
        ),
        ("https://github.com:0443/acme/api", "has an invalid port"),
        (
            "https://github.com./acme/api",
            "host must not end with a dot",
        ),
        ("https://github.com/acme/api' x", "must not contain spaces"),
        ("https://github.com/acme/it's", "must not contain quotes"),
        (
            "https://github.com/acme/../evil/api",
            "must not have a \".\" or \"..\" path segment",
        ),
        (
            "https://github.com/acme/api\t.git",
            "must not contain control characters",
        ),
        (
            "https://github.com/acme/api\nHost: evil",
            "must not contain control characters",
        ),
    ] {
        let err = admin
            .create_environment(with_url(url))
            .await
            .expect_err(url);
        assert_eq!(err.code(), Code::InvalidArgument, "{url:?}: {err:?}");
        let expected = format!("content.repository_url: {problem}");
        assert!(
            err.message().contains(&expected),
            "{url:?}: {:?} does not say {expected:?}",
            err.message()
        );
        for echo in ["evil", "ghp_SeCrEt9", "acme"] {
            assert!(
                !err.message().contains(echo),
                "{url:?}: {:?}",
                err.message()
            );
        }
    }
    let listed = runner
        .client
        .clone()
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .environments;
    assert!(listed.is_empty(), "a crafted URL was stored: {listed:?}");

    for url in [
        "https://github.com/acme/api.git",
        "https://gitlab.example.com:8443/group/sub/repo.git",
        "https://dev.azure.com/org/My%20Project/_git/repo",
    ] {
        let created = admin
            .create_environment(with_url(url))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"))
            .into_inner();
        let content = spec(&created).content.expect("content");
        assert_eq!(content.repository_url, url, "stored as sent");
    }
}

#[tokio::test]
async fn the_content_fields_are_stored_and_checked() {
    let f = Fixture::new().await;
    let runner = f.runner("content").await;
    let class = f.class(&runner.id).await;
    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let mut client = runner.client.clone();
    let seconds = |s: i64| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };

    let mut ready = status(1, 1, Phase::Running);
    ready.content_stage = pb::ContentStage::Ready as i32;
    ready.content_commit = "0123456789abcdef0123456789abcdef01234567".into();
    ready.content_ready_time = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    });
    ready.start_timings = Some(pb::StartTimings {
        launch_to_running: seconds(40),
        running_to_content_ready: seconds(25),
        launch_to_content_ready: seconds(65),
    });
    client
        .update_environment_status(report(&id, ready.clone()))
        .await
        .expect("a ready status");
    let shown = f
        .admin
        .clone()
        .get_environment(admin::GetEnvironmentRequest {
            environment_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(shown, ready);

    let mut version = 2;
    let mut refused = |change: &dyn Fn(&mut pb::EnvironmentStatus)| {
        let mut s = status(version, 1, Phase::Starting);
        change(&mut s);
        version += 1;
        report(&id, s)
    };
    for (request, field) in [
        (
            refused(&|s| s.content_commit = "0123456789ABCDEF0123456789ABCDEF01234567".into()),
            "status.content_commit",
        ),
        (
            refused(&|s| s.content_commit = "main".into()),
            "status.content_commit",
        ),
        (refused(&|s| s.content_stage = 99), "status.content_stage"),
        (refused(&|s| s.stop_reason = 7), "status.stop_reason"),
        (
            refused(&|s| {
                s.start_timings = Some(pb::StartTimings {
                    launch_to_running: seconds(-1),
                    ..Default::default()
                });
            }),
            "status.start_timings.launch_to_running",
        ),
        (
            refused(&|s| {
                s.content_ready_time = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -5,
                });
            }),
            "status.content_ready_time",
        ),
    ] {
        assert_status(
            client.update_environment_status(request).await,
            Code::InvalidArgument,
            field,
        );
    }
    // A failed stage is a STARTING status with a failure message.
    let mut failed = status(20, 1, Phase::Starting);
    failed.content_stage = pb::ContentStage::Clone as i32;
    failed.failure_message =
        "the environment's content is not ready: checkout failed at stage clone: git clone failed"
            .into();
    client
        .update_environment_status(report(&id, failed))
        .await
        .expect("a failed stage");
}

/// The desired phase and spec version the control plane holds for `id`.
async fn desired(f: &Fixture, id: &str) -> (i32, u64) {
    let env = f
        .admin
        .clone()
        .get_environment(admin::GetEnvironmentRequest {
            environment_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner();
    (spec(&env).desired_phase, spec(&env).spec_version)
}

#[tokio::test]
async fn a_stop_for_want_of_a_client_moves_the_desired_phase_to_stopped() {
    use tokio_stream::StreamExt as _;

    let f = Fixture::new().await;
    let runner = f.runner("idle").await;
    let class = f.class(&runner.id).await;
    let id = env_id(&f.environment(&runner.id, &class.id).await);
    let mut client = runner.client.clone();
    let mut stream = client
        .watch_requests(pb::WatchRequestsRequest {})
        .await
        .expect("watch")
        .into_inner();

    // Stopped without a reason: the desired phase stays RUNNING.
    client
        .update_environment_status(report(&id, status(1, 1, Phase::Stopping)))
        .await
        .expect("v1");
    assert_eq!(desired(&f, &id).await, (Phase::Running as i32, 1));

    let mut idle = status(2, 1, Phase::Stopping);
    idle.stop_reason = pb::StopReason::DisconnectedTimeout as i32;
    client
        .update_environment_status(report(&id, idle.clone()))
        .await
        .expect("v2");
    assert_eq!(desired(&f, &id).await, (Phase::Stopped as i32, 2));
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .expect("open")
        .expect("not an error");
    assert!(
        matches!(
            &event.kind,
            Some(pb::runner_request::Kind::EnvironmentChanged(c)) if c.environment_id == id
        ),
        "{event:?}"
    );
    // The same status again (a retried delivery) changes nothing more.
    client
        .update_environment_status(report(&id, idle))
        .await
        .expect("v2 again");
    assert_eq!(desired(&f, &id).await, (Phase::Stopped as i32, 2));

    // The user starts it again: a late idle status for an older spec does
    // not stop it.
    f.set_phase(&id, Phase::Running).await;
    assert_eq!(desired(&f, &id).await, (Phase::Running as i32, 3));
    let mut late = status(3, 2, Phase::Stopped);
    late.stop_reason = pb::StopReason::DisconnectedTimeout as i32;
    client
        .update_environment_status(report(&id, late))
        .await
        .expect("v3");
    assert_eq!(desired(&f, &id).await, (Phase::Running as i32, 3));
}
