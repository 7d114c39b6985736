//! Repository access end to end: integrations configured in the control
//! plane, tokens added by PAT and OAuth against a fake provider on loopback
//! HTTPS, revocation, parse_context, and the checkout credential.

use std::time::Duration;

use base64::Engine as _;
use runner_core::model::EnvironmentId;
use runner_core::scm::{AuthSource, ScmKind, TokenKey};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, runner_request::Kind, runner_result};
use testkit::scm::FakeScm;

use crate::calls::call;
use crate::{World, id, settled};

/// A world whose runner trusts the fake provider's CA.
pub(crate) async fn world_with(fake: &FakeScm) -> World {
    let ca = std::env::temp_dir().join(format!("fake-scm-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca, fake.ca_pem()).expect("write the CA");
    let mut world = World::new().await;
    // The providers' public hosts resolve to the fake, which answers at
    // their real URLs: no endpoint override is needed (or allowed) for them.
    world.extra_args = vec![
        "--ca-bundle".into(),
        ca.display().to_string(),
        "--scm-resolve".into(),
        fake.resolve(),
    ];
    world
}

pub(crate) struct Integration<'a> {
    pub(crate) kind: pb::ScmKind,
    pub(crate) host: &'a str,
    pub(crate) pat: bool,
    pub(crate) oauth: Option<(&'a str, &'a str)>,
    pub(crate) api_base_url: String,
    pub(crate) oauth_base_url: String,
}

impl<'a> Integration<'a> {
    /// Personal access tokens only, at the kind's default endpoints.
    pub(crate) fn pat(kind: pb::ScmKind, host: &'a str) -> Self {
        Self {
            kind,
            host,
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        }
    }
}

/// A request for an environment of a repository on `host`.
pub(crate) fn repository_on(world: &World, host: &str) -> admin::CreateEnvironmentRequest {
    let mut request = world.create_request(&world.class_id);
    request.content = Some(pb::EnvironmentContent {
        repository_url: format!("https://{host}/acme/api.git"),
        revision: None,
    });
    request
}

pub(crate) async fn public_key(world: &World) -> Vec<u8> {
    for _ in 0..200 {
        let key = world.runner().await.public_key;
        if !key.is_empty() {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the runner never signed up");
}

pub(crate) async fn create_integration(world: &World, i: Integration<'_>) -> String {
    let oauth = match i.oauth {
        None => None,
        Some((client_id, secret)) => Some(pb::OAuthApp {
            client_id: client_id.into(),
            sealed_client_secret: control_plane::cli::seal(
                &public_key(world).await,
                control_plane::cli::client_secret_binding(i.host),
                secret.as_bytes(),
            )
            .expect("seal"),
        }),
    };
    world
        .admin
        .clone()
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.runner_id.clone(),
            kind: i.kind as i32,
            host: i.host.into(),
            oauth,
            pat_enabled: i.pat,
            api_base_url: i.api_base_url,
            oauth_base_url: i.oauth_base_url,
        })
        .await
        .expect("create integration")
        .into_inner()
        .id
}

pub(crate) async fn add_pat(
    world: &World,
    principal: &str,
    host: &str,
    pat: &str,
) -> Result<String, tonic::Status> {
    let sealed = control_plane::cli::seal(
        &public_key(world).await,
        control_plane::cli::pat_binding(principal, host),
        pat.as_bytes(),
    )
    .expect("seal");
    // The runner syncs integrations on its own; retry while it has not yet.
    let mut last = None;
    for _ in 0..100 {
        match world
            .admin
            .clone()
            .add_host_token(admin::AddHostTokenRequest {
                runner_id: world.runner_id.clone(),
                principal: principal.into(),
                host: host.into(),
                sealed_token: sealed.clone(),
                timeout_ms: 10_000,
            })
            .await
        {
            Ok(response) => return Ok(response.into_inner().token.expect("token").username),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains("no SCM integration") =>
            {
                last = Some(status);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status),
        }
    }
    Err(last.expect("tried"))
}

async fn check_auth(
    world: &World,
    principal: &str,
    host: &str,
) -> pb::CheckAuthenticationForHostResult {
    match call(
        world,
        Kind::CheckAuthenticationForHost(pb::CheckAuthenticationForHost {
            principal: principal.into(),
            host: host.into(),
        }),
    )
    .await
    {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::CheckAuthenticationForHost(r)),
        }) => r,
        other => panic!("unexpected {other:?}"),
    }
}

pub(crate) async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn env_id(id: &str) -> EnvironmentId {
    EnvironmentId(uuid::Uuid::parse_str(id).expect("uuid"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pat_checks_out_the_repository_and_disabling_pats_deletes_it() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    let pat = "glpat-Zq3xKv9Lm2Np5Rs8Tu1W";
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, pat, "alice-gl");
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    let integration = create_integration(
        &world,
        Integration {
            kind: pb::ScmKind::Gitlab,
            host: &host,
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;

    // Before the user has a token, the environment waits, saying why.
    let mut request = world.create_request(&world.class_id);
    request.content = Some(pb::EnvironmentContent {
        repository_url: format!("https://{host}/acme/api.git"),
        revision: None,
    });
    let env = world.create(request).await;
    let expected = format!("authentication required for {host}");
    world
        .wait_for(
            "the authentication failure",
            Duration::from_secs(20),
            |envs| {
                envs.iter().any(|e| {
                    e.status
                        .as_ref()
                        .is_some_and(|s| s.failure_message == expected)
                })
            },
        )
        .await;
    assert!(
        world.compute.launch_requests().is_empty(),
        "launched without a token"
    );
    assert!(!check_auth(&world, "alice", &host).await.authenticated);

    // A wrong token is refused by the provider and not stored.
    let refused = add_pat(&world, "alice", &host, "glpat-wrong").await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(world.tokens.keys().is_empty());

    assert_eq!(
        add_pat(&world, "alice", &host, pat).await.expect("stored"),
        "alice-gl"
    );
    assert_eq!(fake.calls("gitlab.user"), 2, "each PAT was validated once");
    let auth = check_auth(&world, "alice", &host).await;
    assert!(auth.authenticated);
    assert_eq!(auth.available_methods, vec![pb::AuthMethod::Pat as i32]);
    assert!(auth.oauth_authorize_url.is_empty());

    let envs = world
        .wait_for("RUNNING", Duration::from_secs(20), |envs| {
            envs.iter()
                .all(|e| settled(e, pb::EnvironmentPhase::Running))
        })
        .await;
    assert_eq!(id(&envs[0]), env);
    let launch = world
        .compute
        .launch_requests()
        .into_iter()
        .find(|r| r.environment == env_id(&env))
        .expect("launched");
    assert_eq!(
        launch.checkout_secret.as_deref(),
        Some(format!("memory/environments/{env}").as_str())
    );
    let instance = world.compute.instances()[0].id.clone();
    assert_eq!(
        world.environment_secrets.bound(env_id(&env)),
        Some(Some(instance)),
        "the secret is bound to the instance"
    );
    let header = world
        .environment_secrets
        .value(env_id(&env))
        .expect("secret");
    let basic = header.strip_prefix("Basic ").expect("basic auth for git");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(basic)
            .expect("base64"),
        format!("oauth2:{pat}").into_bytes()
    );

    // PATs disabled: the runner deletes them, and says so.
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
    wait_until("the PAT to be deleted", async || {
        world.tokens.keys().is_empty()
    })
    .await;
    assert_eq!(
        world.environment_secrets.value(env_id(&env)),
        None,
        "the checkout secret holding the revoked PAT went first"
    );
    let auth = check_auth(&world, "alice", &host).await;
    assert!(!auth.authenticated);
    assert!(auth.available_methods.is_empty());

    // Deleting the environment deletes its secret.
    world.set_phase(&env, pb::EnvironmentPhase::Deleted).await;
    world
        .wait_for("DELETED", Duration::from_secs(20), |envs| {
            envs.iter()
                .all(|e| settled(e, pb::EnvironmentPhase::Deleted))
        })
        .await;
    assert!(world.environment_secrets.is_empty());
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_code_is_exchanged_refreshed_before_expiry_and_revoked_with_oauth() {
    let fake = FakeScm::start().await;
    fake.add_oauth_app(ScmKind::GitHub, "Iv1.8a61f9b3a7aba766", "s3cr3t-client");
    // Expires within the refresh margin: the first use refreshes it.
    fake.add_code(
        ScmKind::GitHub,
        "code-0f3c",
        "alice-gh",
        Some(Duration::from_secs(120)),
    );
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    let integration = create_integration(
        &world,
        Integration {
            kind: pb::ScmKind::Github,
            host: "github.com",
            pat: false,
            oauth: Some(("Iv1.8a61f9b3a7aba766", "s3cr3t-client")),
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;
    let exchange = |code: &str| {
        Kind::ExchangeOauthCode(pb::ExchangeOauthCode {
            principal: "alice".into(),
            host: "github.com".into(),
            code: code.into(),
            redirect_uri: "https://cp.example.com/oauth/callback".into(),
            code_verifier: String::new(),
        })
    };
    // The integration may not be synced on the first call.
    let mut outcome = call(&world, exchange("code-0f3c")).await;
    if let admin::call_runner_response::Outcome::Error(e) = &outcome
        && e.message.contains("no SCM integration")
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        outcome = call(&world, exchange("code-0f3c")).await;
    }
    let expires_at = match outcome {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ExchangeOauthCode(r)),
        }) => r.expires_at.expect("an expiring token"),
        other => panic!("unexpected {other:?}"),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!(
        (now + 60..=now + 180).contains(&expires_at.seconds),
        "{expires_at:?}"
    );
    assert_eq!(fake.calls("github.token"), 1);
    assert_eq!(
        world.tokens.keys(),
        vec![TokenKey {
            principal: "alice".into(),
            host: "github.com".into(),
            source: AuthSource::OAuth,
        }]
    );
    let first_access = fake.issued_tokens()[0].clone();

    // A used code is refused, and the refusal names no secret.
    match call(&world, exchange("code-0f3c")).await {
        admin::call_runner_response::Outcome::Error(e) => {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
            assert!(
                !e.message.contains("code-0f3c") && !e.message.contains("s3cr3t"),
                "{e:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }

    // Checking authentication uses the token: it expires within the margin,
    // so the runner refreshes it first.
    let auth_now = check_auth(&world, "alice", "github.com").await;
    assert!(auth_now.authenticated);
    assert_eq!(
        fake.calls("github.token"),
        3,
        "exchange, refused reuse, refresh"
    );
    assert_eq!(
        auth_now.available_methods,
        vec![pb::AuthMethod::Oauth as i32]
    );
    assert!(
        auth_now
            .oauth_authorize_url
            .starts_with("https://github.com/login/oauth/authorize?client_id=Iv1.8a61f9b3a7aba766"),
        "{}",
        auth_now.oauth_authorize_url
    );
    assert_ne!(
        fake.issued_tokens().last().expect("refreshed"),
        &first_access,
        "a new token was issued"
    );

    // OAuth turned off: the OAuth tokens of the host are deleted.
    world
        .admin
        .clone()
        .update_scm_integration(admin::UpdateScmIntegrationRequest {
            integration_id: integration,
            oauth: Some(admin::OAuthUpdate { app: None }),
            pat_enabled: Some(true),
            api_base_url: None,
            oauth_base_url: None,
        })
        .await
        .expect("OAuth off");
    wait_until("the OAuth token to be deleted", async || {
        world.tokens.keys().is_empty()
    })
    .await;
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_token_or_the_integration_deletes_the_stored_tokens() {
    let fake = FakeScm::start().await;
    fake.add_token(
        ScmKind::Bitbucket,
        AuthSource::Pat,
        "bbat-alice",
        "alice-bb",
    );
    fake.add_token(ScmKind::Bitbucket, AuthSource::Pat, "bbat-bob", "bob-bb");
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    let integration = create_integration(
        &world,
        Integration {
            kind: pb::ScmKind::Bitbucket,
            host: "bitbucket.org",
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;
    assert_eq!(
        add_pat(&world, "alice", "bitbucket.org", "bbat-alice")
            .await
            .expect("alice"),
        "alice-bb"
    );
    assert_eq!(
        add_pat(&world, "bob", "bitbucket.org", "bbat-bob")
            .await
            .expect("bob"),
        "bob-bb"
    );
    assert_eq!(world.tokens.keys().len(), 2);

    world
        .admin
        .clone()
        .delete_host_token(admin::DeleteHostTokenRequest {
            runner_id: world.runner_id.clone(),
            principal: "bob".into(),
            host: "bitbucket.org".into(),
        })
        .await
        .expect("delete bob's token");
    wait_until("bob's token to be deleted", async || {
        world.tokens.keys().iter().all(|k| k.principal != "bob")
    })
    .await;
    assert_eq!(world.tokens.keys().len(), 1, "alice's token stays");

    world
        .admin
        .clone()
        .delete_scm_integration(admin::DeleteScmIntegrationRequest {
            integration_id: integration,
        })
        .await
        .expect("delete the integration");
    wait_until("every token to be deleted", async || {
        world.tokens.keys().is_empty()
    })
    .await;
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_context_answers_for_every_provider_and_url_form() {
    let fake = FakeScm::start().await;
    let gitlab = fake.host();
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    for (kind, scm_kind, host, api, oauth, pat) in [
        (
            pb::ScmKind::Github,
            ScmKind::GitHub,
            "github.com".to_owned(),
            String::new(),
            String::new(),
            "ghp_alice",
        ),
        (
            pb::ScmKind::Gitlab,
            ScmKind::GitLab,
            gitlab.clone(),
            String::new(),
            String::new(),
            "glpat-alice",
        ),
        (
            pb::ScmKind::Bitbucket,
            ScmKind::Bitbucket,
            "bitbucket.org".to_owned(),
            String::new(),
            String::new(),
            "bbat-alice",
        ),
        (
            pb::ScmKind::AzureDevops,
            ScmKind::AzureDevOps,
            "dev.azure.com".to_owned(),
            String::new(),
            String::new(),
            "azpat-alice",
        ),
    ] {
        fake.add_token(scm_kind, AuthSource::Pat, pat, "alice");
        create_integration(
            &world,
            Integration {
                kind,
                host: &host,
                pat: true,
                oauth: None,
                api_base_url: api,
                oauth_base_url: oauth,
            },
        )
        .await;
        add_pat(&world, "alice", &host, pat)
            .await
            .expect("PAT stored");
    }
    fake.add_pull_request("acme", "api", 42, "feature/login");
    fake.add_pull_request("acme/platform", "api", 7, "fix/cache");
    fake.add_pull_request("acme/web", "ui", 9, "topic");

    let parse = async |principal: &str, url: String| match call(
        &world,
        Kind::ParseContext(pb::ParseContext {
            principal: principal.into(),
            url,
        }),
    )
    .await
    {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ParseContext(r)),
        }) => Ok(r),
        admin::call_runner_response::Outcome::Error(e) => Err(e),
        other => panic!("unexpected {other:?}"),
    };
    use pb::parse_context_result::Revision::{Branch, Commit};
    let sha = "9fceb02d0ae598e95dc970b74767f19372d61af8";
    type Case = (
        String,
        pb::ScmKind,
        &'static str,
        &'static str,
        String,
        Option<pb::parse_context_result::Revision>,
    );
    let cases: Vec<Case> = vec![
        (
            "https://github.com/acme/api".into(),
            pb::ScmKind::Github,
            "acme",
            "api",
            "https://github.com/acme/api.git".into(),
            None,
        ),
        (
            "https://github.com/acme/api/tree/release/2.0".into(),
            pb::ScmKind::Github,
            "acme",
            "api",
            "https://github.com/acme/api.git".into(),
            Some(Branch("release/2.0".into())),
        ),
        (
            format!("https://github.com/acme/api/commit/{sha}"),
            pb::ScmKind::Github,
            "acme",
            "api",
            "https://github.com/acme/api.git".into(),
            Some(Commit(sha.into())),
        ),
        (
            "https://github.com/acme/api/pull/42".into(),
            pb::ScmKind::Github,
            "acme",
            "api",
            "https://github.com/acme/api.git".into(),
            Some(Branch("feature/login".into())),
        ),
        (
            "https://github.com/acme/api/issues/3".into(),
            pb::ScmKind::Github,
            "acme",
            "api",
            "https://github.com/acme/api.git".into(),
            None,
        ),
        (
            format!("https://{gitlab}/acme/platform/api/-/merge_requests/7"),
            pb::ScmKind::Gitlab,
            "acme/platform",
            "api",
            format!("https://{gitlab}/acme/platform/api.git"),
            Some(Branch("fix/cache".into())),
        ),
        (
            format!("https://{gitlab}/acme/platform/api/-/tree/main"),
            pb::ScmKind::Gitlab,
            "acme/platform",
            "api",
            format!("https://{gitlab}/acme/platform/api.git"),
            Some(Branch("main".into())),
        ),
        (
            "https://bitbucket.org/acme/api/pull-requests/42".into(),
            pb::ScmKind::Bitbucket,
            "acme",
            "api",
            "https://bitbucket.org/acme/api.git".into(),
            Some(Branch("feature/login".into())),
        ),
        (
            format!("https://bitbucket.org/acme/api/commits/{sha}"),
            pb::ScmKind::Bitbucket,
            "acme",
            "api",
            "https://bitbucket.org/acme/api.git".into(),
            Some(Commit(sha.into())),
        ),
        (
            "https://dev.azure.com/acme/web/_git/ui/pullrequest/9".into(),
            pb::ScmKind::AzureDevops,
            "acme/web",
            "ui",
            "https://dev.azure.com/acme/web/_git/ui".into(),
            Some(Branch("topic".into())),
        ),
        (
            "https://dev.azure.com/acme/web/_git/ui?version=GBdevelop".into(),
            pb::ScmKind::AzureDevops,
            "acme/web",
            "ui",
            "https://dev.azure.com/acme/web/_git/ui".into(),
            Some(Branch("develop".into())),
        ),
        // A public host without an integration parses without a token.
        (
            "https://gitlab.com/gnome/gtk/-/issues/1".into(),
            pb::ScmKind::Gitlab,
            "gnome",
            "gtk",
            "https://gitlab.com/gnome/gtk.git".into(),
            None,
        ),
    ];
    for (url, kind, owner, repository, clone_url, revision) in cases {
        let r = parse("alice", url.clone())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert_eq!(r.kind, kind as i32, "{url}");
        assert_eq!(
            (r.owner.as_str(), r.repository.as_str()),
            (owner, repository),
            "{url}"
        );
        assert_eq!(r.clone_url, clone_url, "{url}");
        assert_eq!(r.revision, revision, "{url}");
    }

    for (principal, url, code, needle) in [
        (
            "alice",
            "https://git.unknown.example/acme/api".to_owned(),
            tonic::Code::InvalidArgument,
            "unknown SCM host git.unknown.example",
        ),
        (
            "alice",
            "https://github.com/acme".to_owned(),
            tonic::Code::InvalidArgument,
            "url:",
        ),
        (
            "alice",
            "http://github.com/acme/api".to_owned(),
            tonic::Code::InvalidArgument,
            "https",
        ),
        (
            "alice",
            "https://github.com/acme/api/pull/404".to_owned(),
            tonic::Code::NotFound,
            "github.com",
        ),
        (
            "bob",
            "https://github.com/acme/api".to_owned(),
            tonic::Code::FailedPrecondition,
            "authentication required for github.com",
        ),
        (
            "alice",
            "https://gitlab.com/gnome/gtk/-/merge_requests/5".to_owned(),
            tonic::Code::FailedPrecondition,
            "authentication required for gitlab.com",
        ),
    ] {
        let e = parse(principal, url.clone()).await.expect_err(&url);
        assert_eq!(e.code, code as i32, "{url}: {e:?}");
        assert!(e.message.contains(needle), "{url}: {e:?}");
    }
    runner.stop().await.expect("clean stop");
}
