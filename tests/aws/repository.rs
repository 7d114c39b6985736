//! Repository access with the real runnerd binary on moto and a fake
//! provider: a PAT checks out through the environment's secret bound to its
//! instance, no token is anywhere in plaintext, and a revocation cut short by
//! SIGKILL between two deletions finishes after a restart.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use runner_core::scm::{AuthSource, ScmKind};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase};
use testkit::proxy::{Fault, FaultProxy, Rule};
use testkit::scm::FakeScm;

use crate::daemon::{Process, World, settled};
use crate::moto_url;
use crate::tokens::table_dump;

const DELETE_ITEM: &str = "DynamoDB_20120810.DeleteItem";

async fn token_items(world: &World) -> usize {
    aws_sdk_dynamodb::Client::new(&world.sdk)
        .query()
        .table_name(&world.infra.table)
        .key_condition_expression("pk = :pk AND begins_with(sk, :t)")
        .expression_attribute_values(
            ":pk",
            AttributeValue::S(format!("RUNNER#{}", world.infra.runner_id)),
        )
        .expression_attribute_values(":t", AttributeValue::S("TOKEN#".into()))
        .send()
        .await
        .expect("query tokens")
        .items
        .unwrap_or_default()
        .len()
}

pub(crate) async fn add_pat(world: &World, principal: &str, host: &str, pat: &str) -> String {
    let key = world.public_key().await;
    for _ in 0..150 {
        let sealed = control_plane::cli::seal(
            &key,
            control_plane::cli::pat_binding(principal, host),
            pat.as_bytes(),
        )
        .expect("seal");
        match world
            .admin
            .clone()
            .add_host_token(admin::AddHostTokenRequest {
                runner_id: world.infra.runner_id.clone(),
                principal: principal.into(),
                host: host.into(),
                sealed_token: sealed,
                timeout_ms: 20_000,
            })
            .await
        {
            Ok(r) => return r.into_inner().token.expect("token").username,
            // No stream yet, or the integration not listed yet.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("add the PAT: {s:?}"),
        }
    }
    panic!("the runner never took the PAT");
}

async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pat_checks_out_leaks_nowhere_and_a_revocation_cut_by_sigkill_finishes_after_restart() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    let ca = std::env::temp_dir().join(format!("fake-scm-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca, fake.ca_pem()).expect("CA");
    let (alice_pat, bob_pat) = ("glpat-aliceK2v8Qx5Zr1", "glpat-bobM4n7Pq2Ws9");
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, alice_pat, "alice-gl");
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, bob_pat, "bob-gl");

    let world = World::new().await;
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let extra = [("RUNNER_CA_BUNDLE", ca.display().to_string())];
    let a = Process::start_with(&world, "scm-a", &proxy.url(), &extra);
    let integration = world
        .admin
        .clone()
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.infra.runner_id.clone(),
            kind: pb::ScmKind::Gitlab as i32,
            host: host.clone(),
            oauth: None,
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration")
        .into_inner()
        .id;
    assert_eq!(add_pat(&world, "alice", &host, alice_pat).await, "alice-gl");
    assert_eq!(add_pat(&world, "bob", &host, bob_pat).await, "bob-gl");
    assert_eq!(token_items(&world).await, 2);

    let env = world
        .admin
        .clone()
        .create_environment(admin::CreateEnvironmentRequest {
            runner_id: world.infra.runner_id.clone(),
            environment_class_id: world.class_id.clone(),
            content: Some(pb::EnvironmentContent {
                repository_url: format!("https://{host}/acme/api.git"),
                revision: Some(pb::environment_content::Revision::Branch("main".into())),
            }),
            creator: "alice".into(),
            name: String::new(),
            timeout: None,
            unchecked: false,
        })
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment")
        .id;
    world
        .wait_for("RUNNING", Duration::from_secs(60), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;

    // The instance: its user data names the secret; the secret is bound to it.
    let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
    let reservations = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:aws-runner:environment-id")
                .values(&env)
                .build(),
        )
        .send()
        .await
        .expect("describe")
        .reservations
        .unwrap_or_default();
    let instance = reservations
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .expect("one instance")
        .clone();
    let instance_id = instance.instance_id().expect("id").to_owned();
    let user_data = crate::user_data(&ec2, &instance_id).await;
    let secret_id = format!("aws-runner/{}/environments/{env}", world.infra.runner_id);
    assert!(
        user_data.contains(&format!("AWS_RUNNER_SECRET_ID='{secret_id}'")),
        "{user_data}"
    );
    let sm = aws_sdk_secretsmanager::Client::new(&world.sdk);
    let described = sm
        .describe_secret()
        .secret_id(&secret_id)
        .send()
        .await
        .expect("the environment's secret");
    let bound = described
        .tags()
        .iter()
        .find(|t| t.key() == Some("aws-runner:instance-arn"))
        .and_then(|t| t.value())
        .expect("bound to an instance");
    assert!(
        bound.ends_with(&format!(":instance/{instance_id}")),
        "{bound}"
    );
    let header = sm
        .get_secret_value()
        .secret_id(&secret_id)
        .send()
        .await
        .expect("value")
        .secret_string
        .expect("string");
    let credential = header.trim_start_matches("Basic ").to_owned();

    // No token in plaintext: DynamoDB, user data, tags.
    let dump = table_dump(&world.sdk, &world.infra.table).await;
    let tags = format!("{:?}{:?}", instance.tags(), described.tags());
    for secret in [alice_pat, bob_pat, credential.as_str()] {
        assert!(!dump.contains(secret), "a token is in DynamoDB");
        assert!(!user_data.contains(secret), "a token is in the user data");
        assert!(!tags.contains(secret), "a token is in the tags");
    }

    // PATs disabled; the runner deletes the first token, then hangs on the
    // second deletion and is killed there.
    proxy.set_rules(vec![Rule {
        operations: vec![DELETE_ITEM.into()],
        rate: 1.0,
        fault: Fault::DelayAfter {
            pass: 1,
            delay: Duration::from_secs(600),
        },
    }]);
    world
        .admin
        .clone()
        .update_scm_integration(admin::UpdateScmIntegrationRequest {
            integration_id: integration,
            oauth: None,
            pat_enabled: Some(false),
            api_base_url: None,
            oauth_base_url: None,
        })
        .await
        .expect("disable PATs");
    wait_until(
        "the second deletion to hang",
        Duration::from_secs(30),
        async || proxy.seen(DELETE_ITEM).len() >= 2,
    )
    .await;
    assert_eq!(token_items(&world).await, 1, "one token deleted, one left");
    wait_until(
        "the first deletion's log line",
        Duration::from_secs(10),
        async || a.logs().contains("deleted a revoked token"),
    )
    .await;
    a.signal("-KILL");
    let logs_a = a.logs();
    drop(a);

    proxy.set_rules(Vec::new());
    let b = Process::start_with(&world, "scm-b", &proxy.url(), &extra);
    wait_until(
        "the restart to finish the revocation",
        Duration::from_secs(60),
        async || token_items(&world).await == 0,
    )
    .await;
    wait_until(
        "the restart's deletion log line",
        Duration::from_secs(10),
        async || b.logs().contains("deleted a revoked token"),
    )
    .await;
    let answer = world
        .admin
        .clone()
        .call_runner(admin::CallRunnerRequest {
            runner_id: world.infra.runner_id.clone(),
            request: Some(pb::RunnerRequest {
                request_id: String::new(),
                kind: Some(pb::runner_request::Kind::CheckAuthenticationForHost(
                    pb::CheckAuthenticationForHost {
                        principal: "alice".into(),
                        host: host.clone(),
                    },
                )),
            }),
            timeout_ms: 10_000,
        })
        .await
        .expect("check authentication")
        .into_inner()
        .outcome;
    match answer {
        Some(admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(pb::runner_result::Kind::CheckAuthenticationForHost(r)),
        })) => {
            assert!(!r.authenticated, "{r:?}");
            assert!(r.available_methods.is_empty(), "PATs are off: {r:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let logs_b = b.logs();
    assert_eq!(b.stop().await, Some(0));
    for (name, logs) in [("first", &logs_a), ("second", &logs_b)] {
        assert!(logs.contains("deleted a revoked token"), "{name}");
        for secret in [alice_pat, bob_pat, credential.as_str()] {
            assert!(
                !logs.contains(secret),
                "a token is in the {name} process's logs"
            );
        }
    }
    let _ = std::fs::remove_file(ca);
}
