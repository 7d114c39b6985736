//! Crafted repository URLs end to end (issue 12): the creator has a token
//! for github.com, and a control plane sends URLs that name github.com to a
//! lenient parser but lead git elsewhere, or are merely not canonical. Each
//! environment fails with a message naming the problem, and the runner
//! writes no checkout secret and launches nothing for it; the one canonical
//! URL among them gets its secret and its instance.

use std::time::Duration;

use runner_core::model::EnvironmentId;
use runner_core::scm::{AuthSource, ScmKind};
use runner_proto::pb::{self, EnvironmentPhase as Phase};
use testkit::scm::FakeScm;

use crate::scm::{Integration, add_pat, create_integration, world_with};
use crate::{id, settled};

/// (what, URL, the failure message's start after the field name).
const CRAFTED: &[(&str, &str, &str)] = &[
    (
        "backslash before '@'",
        "https://github.com\\@evil.example/acme/api",
        "must not contain a backslash",
    ),
    (
        "user name",
        "https://alice@github.com/acme/api",
        "must not contain credentials or a user name",
    ),
    (
        "encoded slash",
        "https://github.com/acme%2Fapi",
        "must not contain an encoded slash (%2F)",
    ),
    (
        "Cyrillic look-alike host",
        "https://g\u{456}thub.com/acme/api",
        "host must be plain ASCII",
    ),
    (
        "punycode of the look-alike",
        "https://xn--gthub-n2e.com/acme/api",
        "host must be plain ASCII",
    ),
    (
        "'@' in the path",
        "https://github.com/@evil.example/acme/api",
        "must not contain '@'",
    ),
    (
        "encoded '@' in the path",
        "https://github.com/acme%40evil.example/api",
        "must not contain '@', even percent-encoded",
    ),
    (
        "mixed-case host",
        "https://GitHub.com/acme/api",
        "host must be lowercase",
    ),
    (
        "explicit port 443",
        "https://github.com:443/acme/api",
        "must not name the default port 443",
    ),
    (
        "port with a leading zero",
        "https://github.com:0443/acme/api",
        "has an invalid port",
    ),
    (
        "host with a trailing dot",
        "https://github.com./acme/api",
        "host must not end with a dot",
    ),
    (
        "quote and space in the path",
        "https://github.com/acme/api' x",
        "must not contain spaces or other whitespace",
    ),
    (
        "quote in the path",
        "https://github.com/acme/it's",
        "must not contain quotes",
    ),
    (
        "'..' segment",
        "https://github.com/acme/../evil/api",
        "must not have a \".\" or \"..\" path segment",
    ),
    (
        "encoded '..' segment",
        "https://github.com/acme/%2E%2E/api",
        "must not have a \".\" or \"..\" path segment",
    ),
    (
        "trailing slash",
        "https://github.com/acme/api/",
        "must not have an empty path segment",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_repository_urls_fail_without_a_secret_or_a_launch() {
    let fake = FakeScm::start().await;
    let pat = "ghp_CraftedUrlK7v2Qx9Lm4";
    fake.add_token(ScmKind::GitHub, AuthSource::Pat, pat, "alice-gh");
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    create_integration(
        &world,
        Integration {
            kind: pb::ScmKind::Github,
            host: "github.com",
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;
    assert_eq!(
        add_pat(&world, "alice", "github.com", pat)
            .await
            .expect("stored"),
        "alice-gh"
    );

    let mut crafted = Vec::new();
    for (what, url, problem) in CRAFTED {
        let mut request = world.create_request(&world.class_id);
        // Past the reference control plane's own check (a conformance test
        // shows it refuses them): as another control plane could send them.
        request.unchecked = true;
        request.content.as_mut().expect("content").repository_url = (*url).to_owned();
        crafted.push((*what, world.create(request).await, *problem));
    }
    // The canonical URL: a secret and a launch, so the machinery that must
    // not run for the others does run.
    let canonical = world.create_env().await;

    let envs = world
        .wait_for(
            "every crafted URL to fail and the canonical one to run",
            Duration::from_secs(30),
            |envs| {
                let failed = envs
                    .iter()
                    .filter(|e| {
                        crafted.iter().any(|(_, c, _)| *c == id(e))
                            && e.status
                                .as_ref()
                                .is_some_and(|s| !s.failure_message.is_empty())
                    })
                    .count();
                failed == crafted.len()
                    && envs
                        .iter()
                        .any(|e| id(e) == canonical && settled(e, Phase::Running))
            },
        )
        .await;
    for (what, env_id, problem) in &crafted {
        let env = envs.iter().find(|e| id(e) == *env_id).expect("listed");
        let status = env.status.as_ref().expect("status");
        let expected = format!("spec.content.repository_url: {problem}");
        assert!(
            status.failure_message.starts_with(&expected),
            "{what}: {:?} does not start with {expected:?}",
            status.failure_message
        );
        assert!(
            !status.failure_message.contains("evil"),
            "{what}: the message echoes the URL: {:?}",
            status.failure_message
        );
        let ack = status.runner_ack.as_ref().expect("ack");
        assert_eq!(
            ack.code,
            pb::RunnerAckCode::InvalidSpec as i32,
            "{what}: {ack:?}"
        );
        assert!(status.machine.is_none(), "{what}: a machine");
        let env_id = EnvironmentId(uuid::Uuid::parse_str(env_id).expect("uuid"));
        assert_eq!(
            world.environment_secrets.value(env_id),
            None,
            "{what}: a checkout secret was written"
        );
    }
    let launched: Vec<String> = world
        .compute
        .launch_requests()
        .iter()
        .map(|r| r.environment.to_string())
        .collect();
    assert_eq!(
        launched,
        vec![canonical.clone()],
        "only the canonical URL launches"
    );
    assert_eq!(
        world.environment_secrets.len(),
        1,
        "only the canonical URL has a checkout secret"
    );
    runner.stop().await.expect("clean stop");
}
