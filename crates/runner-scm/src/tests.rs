//! The client against `testkit::scm::FakeScm`, which plays all four
//! providers over HTTPS, plus the pure answer parsers.

use std::path::{Path, PathBuf};

use runner_core::scm::PROVIDERS;
use testkit::scm::FakeScm;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "the-client-id";
const CLIENT_SECRET: &str = "client-secret-1f2e3d";
const REDIRECT_URI: &str = "https://runner.example/oauth/callback";
const HOUR: Duration = Duration::from_secs(3600);

fn client(fake: &FakeScm) -> ScmClient {
    ScmClient::new(
        Some(fake.ca_pem().as_bytes()),
        TIMEOUT,
        "aws-runner-tests",
        &[],
    )
    .unwrap()
}

/// The fake's endpoints for `kind`, built by hand.
fn endpoints(fake: &FakeScm, kind: ScmKind) -> Endpoints {
    let url = |path: &str| Url::parse(&format!("{}{path}", fake.base_url())).unwrap();
    match kind {
        ScmKind::GitHub => Endpoints {
            api: url("/api/v3"),
            user: url("/api/v3/user"),
            token: url("/login/oauth/access_token"),
            authorize: url("/login/oauth/authorize"),
            scope: "repo read:user",
        },
        ScmKind::GitLab => Endpoints {
            api: url("/api/v4"),
            user: url("/api/v4/user"),
            token: url("/oauth/token"),
            authorize: url("/oauth/authorize"),
            scope: "read_api read_repository",
        },
        ScmKind::Bitbucket => Endpoints {
            api: url("/2.0"),
            user: url("/2.0/user"),
            token: url("/site/oauth2/access_token"),
            authorize: url("/site/oauth2/authorize"),
            scope: "repository pullrequest account",
        },
        ScmKind::AzureDevOps => Endpoints {
            api: url(""),
            user: url("/_apis/profile/profiles/me?api-version=7.1"),
            token: url("/entra/token"),
            authorize: url("/entra/authorize"),
            scope: "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access",
        },
    }
}

fn secret(value: &str) -> SecretString {
    SecretString::from(value.to_owned())
}

/// An owner the provider's URLs take: Azure's is `organization/project`,
/// GitLab's may be a nested group.
fn owner(kind: ScmKind) -> &'static str {
    match kind {
        ScmKind::GitHub | ScmKind::Bitbucket => "acme",
        ScmKind::GitLab => "acme/platform",
        ScmKind::AzureDevOps => "acme/Platform",
    }
}

/// Fails when the error's message or `Debug` shows any of `secrets`.
fn assert_hides(err: &ScmError, secrets: &[&str]) {
    let shown = format!("{err} / {err:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{shown:?} shows a secret");
    }
}

async fn exchange(
    client: &ScmClient,
    kind: ScmKind,
    endpoints: &Endpoints,
    client_secret: &str,
    code: &str,
    verifier: Option<&str>,
) -> Result<TokenSet, ScmError> {
    client
        .exchange_code(
            kind,
            endpoints,
            CLIENT_ID,
            &secret(client_secret),
            &secret(code),
            REDIRECT_URI,
            verifier,
        )
        .await
}

#[tokio::test]
async fn whoami_names_the_owner_of_a_token_and_refuses_a_revoked_one() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        for source in [AuthSource::Pat, AuthSource::OAuth] {
            let token = format!("{kind:?}-{}-token-9a8b7c", source.as_str());
            let user = format!("{kind:?}-{}-user", source.as_str()).to_lowercase();
            fake.add_token(kind, source, &token, &user);
            let name = client
                .whoami(kind, source, &endpoints, &secret(&token))
                .await
                .unwrap();
            assert_eq!(name, user, "{kind:?} {source:?}");

            fake.revoke_token(&token);
            let err = client
                .whoami(kind, source, &endpoints, &secret(&token))
                .await
                .unwrap_err();
            assert!(
                err.kind() == ScmErrorKind::Unauthorized && {
                    let m = err.to_string();
                    m.contains("401")
                },
                "{kind:?} {source:?}: {err:?}"
            );
            assert_hides(&err, &[&token]);
        }
    }
    assert_eq!(fake.calls("github.user"), 4);
    assert_eq!(fake.calls("azure.profile"), 4);
}

#[tokio::test]
async fn a_token_of_another_provider_or_source_is_refused() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, "gitlab-pat", "alice");
    fake.add_token(ScmKind::AzureDevOps, AuthSource::Pat, "azure-pat", "alice");
    let err = client
        .whoami(
            ScmKind::GitHub,
            AuthSource::Pat,
            &endpoints(&fake, ScmKind::GitHub),
            &secret("gitlab-pat"),
        )
        .await
        .unwrap_err();
    assert!(err.kind() == ScmErrorKind::Unauthorized, "{err:?}");
    // An Azure PAT presented as OAuth goes as Bearer, which Azure refuses.
    let err = client
        .whoami(
            ScmKind::AzureDevOps,
            AuthSource::OAuth,
            &endpoints(&fake, ScmKind::AzureDevOps),
            &secret("azure-pat"),
        )
        .await
        .unwrap_err();
    assert!(err.kind() == ScmErrorKind::Unauthorized, "{err:?}");
}

#[tokio::test]
async fn whoami_on_azure_devops_server_reads_connection_data() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    fake.add_token(
        ScmKind::AzureDevOps,
        AuthSource::Pat,
        "server-pat",
        "CORP\\alice",
    );
    let mut endpoints = endpoints(&fake, ScmKind::AzureDevOps);
    endpoints.user = Url::parse(&format!("{}/_apis/connectionData", fake.base_url())).unwrap();
    let name = client
        .whoami(
            ScmKind::AzureDevOps,
            AuthSource::Pat,
            &endpoints,
            &secret("server-pat"),
        )
        .await
        .unwrap();
    assert_eq!(name, "CORP\\alice");
    assert_eq!(fake.calls("azure.connection_data"), 1);
}

#[tokio::test]
async fn a_code_is_exchanged_once_for_working_tokens() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        let code = format!("code-{kind:?}-5e6f");
        fake.add_oauth_app(kind, CLIENT_ID, CLIENT_SECRET);
        fake.add_code(kind, &code, "carol", Some(HOUR));

        let before = SystemTime::now();
        let tokens = exchange(&client, kind, &endpoints, CLIENT_SECRET, &code, None)
            .await
            .unwrap();
        let issued = fake.issued_tokens();
        assert!(issued.contains(&tokens.access_token.expose_secret().to_owned()));
        let refresh = tokens.refresh_token.as_ref().expect("a refresh token");
        assert!(issued.contains(&refresh.expose_secret().to_owned()));
        let expires_at = tokens.expires_at.expect("an expiry");
        assert!(
            expires_at >= before + HOUR - Duration::from_secs(1),
            "{kind:?}"
        );
        assert!(expires_at <= SystemTime::now() + HOUR, "{kind:?}");
        let name = client
            .whoami(kind, AuthSource::OAuth, &endpoints, &tokens.access_token)
            .await
            .unwrap();
        assert_eq!(name, "carol", "{kind:?}");

        let err = exchange(&client, kind, &endpoints, CLIENT_SECRET, &code, None)
            .await
            .unwrap_err();
        let expected = match kind {
            ScmKind::GitHub => "bad_verification_code",
            _ => "invalid_grant",
        };
        assert!(
            err.kind() == ScmErrorKind::Rejected && {
                let m = err.to_string();
                m.ends_with(&format!("refused the code: {expected}"))
            },
            "{kind:?}: {err:?}"
        );
        assert_hides(&err, &[&code, CLIENT_SECRET]);
        assert_eq!(fake.calls(&format!("{}.token", label(kind))), 2);
    }
}

/// The prefix of the fake's endpoint names.
fn label(kind: ScmKind) -> &'static str {
    match kind {
        ScmKind::GitHub => "github",
        ScmKind::GitLab => "gitlab",
        ScmKind::Bitbucket => "bitbucket",
        ScmKind::AzureDevOps => "azure",
    }
}

#[tokio::test]
async fn wrong_client_credentials_are_unauthorized() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        fake.add_oauth_app(kind, CLIENT_ID, CLIENT_SECRET);
        fake.add_code(kind, "good-code", "dave", Some(HOUR));
        let err = exchange(
            &client,
            kind,
            &endpoints,
            "wrong-secret-77",
            "good-code",
            None,
        )
        .await
        .unwrap_err();
        let expected = match kind {
            ScmKind::GitHub => "incorrect_client_credentials",
            _ => "invalid_client",
        };
        assert!(
            err.kind() == ScmErrorKind::Unauthorized && {
                let m = err.to_string();
                m.ends_with(expected)
            },
            "{kind:?}: {err:?}"
        );
        assert_hides(&err, &["wrong-secret-77", "good-code"]);
        // The code was not spent by the refused request.
        exchange(&client, kind, &endpoints, CLIENT_SECRET, "good-code", None)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_pkce_code_needs_its_verifier() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        fake.add_oauth_app(kind, CLIENT_ID, CLIENT_SECRET);
        fake.add_code_with_verifier(kind, "pkce-code", "erin", Some(HOUR), "the-verifier");
        for verifier in [None, Some("another-verifier")] {
            let err = exchange(
                &client,
                kind,
                &endpoints,
                CLIENT_SECRET,
                "pkce-code",
                verifier,
            )
            .await
            .unwrap_err();
            assert!(err.kind() == ScmErrorKind::Rejected, "{kind:?}: {err:?}");
        }
        let tokens = exchange(
            &client,
            kind,
            &endpoints,
            CLIENT_SECRET,
            "pkce-code",
            Some("the-verifier"),
        )
        .await
        .unwrap();
        assert!(!tokens.access_token.expose_secret().is_empty());
    }
}

#[tokio::test]
async fn a_classic_github_app_issues_a_token_without_expiry() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    let endpoints = endpoints(&fake, ScmKind::GitHub);
    fake.add_oauth_app(ScmKind::GitHub, CLIENT_ID, CLIENT_SECRET);
    fake.add_code(ScmKind::GitHub, "classic", "frank", None);
    let tokens = exchange(
        &client,
        ScmKind::GitHub,
        &endpoints,
        CLIENT_SECRET,
        "classic",
        None,
    )
    .await
    .unwrap();
    assert!(tokens.refresh_token.is_none());
    assert!(tokens.expires_at.is_none());
}

#[tokio::test]
async fn a_refresh_replaces_both_tokens() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        fake.add_oauth_app(kind, CLIENT_ID, CLIENT_SECRET);
        fake.add_code(kind, "to-refresh", "grace", Some(HOUR));
        let old = exchange(&client, kind, &endpoints, CLIENT_SECRET, "to-refresh", None)
            .await
            .unwrap();
        let old_refresh = old.refresh_token.as_ref().unwrap();

        let new = client
            .refresh(
                kind,
                &endpoints,
                CLIENT_ID,
                &secret(CLIENT_SECRET),
                old_refresh,
            )
            .await
            .unwrap();
        assert_ne!(
            new.access_token.expose_secret(),
            old.access_token.expose_secret()
        );
        let new_refresh = new.refresh_token.as_ref().expect("a new refresh token");
        assert_ne!(new_refresh.expose_secret(), old_refresh.expose_secret());
        assert!(new.expires_at.is_some());
        let name = client
            .whoami(kind, AuthSource::OAuth, &endpoints, &new.access_token)
            .await
            .unwrap();
        assert_eq!(name, "grace");

        let err = client
            .whoami(kind, AuthSource::OAuth, &endpoints, &old.access_token)
            .await
            .unwrap_err();
        assert!(
            err.kind() == ScmErrorKind::Unauthorized,
            "{kind:?}: {err:?}"
        );
        let err = client
            .refresh(
                kind,
                &endpoints,
                CLIENT_ID,
                &secret(CLIENT_SECRET),
                old_refresh,
            )
            .await
            .unwrap_err();
        let expected = match kind {
            ScmKind::GitHub => "bad_refresh_token",
            _ => "invalid_grant",
        };
        assert!(
            err.kind() == ScmErrorKind::Rejected && {
                let m = err.to_string();
                m.ends_with(&format!("refused the refresh token: {expected}"))
            },
            "{kind:?}: {err:?}"
        );
        assert_hides(&err, &[old_refresh.expose_secret(), CLIENT_SECRET]);
    }
}

#[tokio::test]
async fn an_expired_access_token_is_refused() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    let endpoints = endpoints(&fake, ScmKind::GitLab);
    fake.add_oauth_app(ScmKind::GitLab, CLIENT_ID, CLIENT_SECRET);
    // Issued already expired: no race with the clock.
    fake.add_code(ScmKind::GitLab, "short", "heidi", Some(Duration::ZERO));
    let tokens = exchange(
        &client,
        ScmKind::GitLab,
        &endpoints,
        CLIENT_SECRET,
        "short",
        None,
    )
    .await
    .unwrap();
    let err = client
        .whoami(
            ScmKind::GitLab,
            AuthSource::OAuth,
            &endpoints,
            &tokens.access_token,
        )
        .await
        .unwrap_err();
    assert!(err.kind() == ScmErrorKind::Unauthorized, "{err:?}");
}

#[tokio::test]
async fn the_branch_of_a_pull_request_is_found() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    for kind in PROVIDERS {
        let endpoints = endpoints(&fake, kind);
        let token = format!("{kind:?}-pulls-token");
        fake.add_token(kind, AuthSource::Pat, &token, "ivan");
        fake.add_pull_request(owner(kind), "widgets", 42, "feature/fast-boot");
        let presented = secret(&token);
        let lookup = |number| {
            client.pull_request_branch(
                kind,
                AuthSource::Pat,
                &endpoints,
                &presented,
                owner(kind),
                "widgets",
                number,
            )
        };
        assert_eq!(lookup(42).await.unwrap(), "feature/fast-boot", "{kind:?}");

        let err = lookup(43).await.unwrap_err();
        assert!(err.kind() == ScmErrorKind::NotFound, "{kind:?}: {err:?}");

        fake.revoke_token(&token);
        let err = lookup(42).await.unwrap_err();
        assert!(
            err.kind() == ScmErrorKind::Unauthorized,
            "{kind:?}: {err:?}"
        );
        assert_hides(&err, &[&token]);
    }
    assert_eq!(fake.calls("gitlab.merge_request"), 3);
    assert_eq!(fake.calls("azure.pull"), 3);
}

#[tokio::test]
async fn an_azure_owner_must_name_organization_and_project() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    let err = client
        .pull_request_branch(
            ScmKind::AzureDevOps,
            AuthSource::Pat,
            &endpoints(&fake, ScmKind::AzureDevOps),
            &secret("t"),
            "acme",
            "widgets",
            1,
        )
        .await
        .unwrap_err();
    assert!(err.kind() == ScmErrorKind::NotFound, "{err:?}");
    assert_eq!(fake.calls("azure.pull"), 0);
}

#[tokio::test]
async fn a_provider_that_is_down_is_unavailable() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    let all: Vec<_> = PROVIDERS
        .into_iter()
        .map(|kind| (kind, endpoints(&fake, kind)))
        .collect();
    fake.stop().await;
    for (kind, endpoints) in &all {
        let kind = *kind;
        let token = secret("down-token-31");
        let errors = [
            client
                .whoami(kind, AuthSource::Pat, endpoints, &token)
                .await
                .unwrap_err(),
            exchange(
                &client,
                kind,
                endpoints,
                CLIENT_SECRET,
                "down-code-32",
                None,
            )
            .await
            .unwrap_err(),
            client
                .refresh(kind, endpoints, CLIENT_ID, &secret(CLIENT_SECRET), &token)
                .await
                .unwrap_err(),
            client
                .pull_request_branch(
                    kind,
                    AuthSource::Pat,
                    endpoints,
                    &token,
                    owner(kind),
                    "w",
                    1,
                )
                .await
                .unwrap_err(),
        ];
        for err in errors {
            assert!(
                err.kind() == ScmErrorKind::Unavailable && {
                    let m = err.to_string();
                    m.contains("127.0.0.1")
                },
                "{kind:?}: {err:?}"
            );
            assert!(err.is_retryable());
            assert_hides(&err, &["down-token-31", "down-code-32", CLIENT_SECRET]);
        }
    }
}

#[tokio::test]
async fn a_server_error_is_unavailable_and_its_body_is_not_echoed() {
    let fake = FakeScm::start().await;
    let client = client(&fake);
    fake.add_token(ScmKind::GitHub, AuthSource::Pat, "t", "judy");
    fake.set_outage(Some(503));
    let endpoints = endpoints(&fake, ScmKind::GitHub);
    let err = client
        .whoami(ScmKind::GitHub, AuthSource::Pat, &endpoints, &secret("t"))
        .await
        .unwrap_err();
    assert!(
        err.kind() == ScmErrorKind::Unavailable && {
            let m = err.to_string();
            m.contains("503")
        },
        "{err:?}"
    );
    assert!(!err.to_string().contains("the fake is down"), "{err}");
    let err = exchange(
        &client,
        ScmKind::GitHub,
        &endpoints,
        CLIENT_SECRET,
        "c",
        None,
    )
    .await
    .unwrap_err();
    assert!(
        err.kind() == ScmErrorKind::Unavailable && {
            let m = err.to_string();
            m.contains("503")
        },
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unknown_ca_is_not_trusted() {
    let fake = FakeScm::start().await;
    let other = FakeScm::start().await;
    fake.add_token(ScmKind::GitHub, AuthSource::Pat, "t", "ken");
    let endpoints = endpoints(&fake, ScmKind::GitHub);
    let strangers = [
        ScmClient::new(None, TIMEOUT, "aws-runner-tests", &[]).unwrap(),
        ScmClient::new(
            Some(other.ca_pem().as_bytes()),
            TIMEOUT,
            "aws-runner-tests",
            &[],
        )
        .unwrap(),
    ];
    for stranger in strangers {
        let err = stranger
            .whoami(ScmKind::GitHub, AuthSource::Pat, &endpoints, &secret("t"))
            .await
            .unwrap_err();
        assert!(
            err.kind() == ScmErrorKind::Unavailable && {
                let m = err.to_string();
                m.contains("certificate")
            },
            "{err:?}"
        );
    }
    assert_eq!(fake.calls("github.user"), 0);
}

#[test]
fn extra_ca_certificates_must_be_pem() {
    for pem in [&b"not a certificate"[..], b""] {
        let err = ScmClient::new(Some(pem), TIMEOUT, "t", &[]).unwrap_err();
        assert!(err.kind() == ScmErrorKind::Config, "{err:?}");
    }
}

#[test]
fn token_sets_hide_their_tokens_in_debug() {
    let tokens = TokenSet {
        access_token: secret("access-abc"),
        refresh_token: Some(secret("refresh-def")),
        expires_at: None,
    };
    let shown = format!("{tokens:?}");
    assert!(
        !shown.contains("access-abc") && !shown.contains("refresh-def"),
        "{shown}"
    );
    assert!(shown.contains("redacted"), "{shown}");
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status: StatusCode::from_u16(status).unwrap(),
        rate_limited: false,
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn oauth_errors_name_only_a_sanitised_code() {
    let err = token_set(
        &reply(
            400,
            r#"{"error":"invalid_grant\"; code=abc123 DROP","error_description":"code abc123 is bad"}"#,
        ),
        "h",
        Grant::Code,
    )
    .unwrap_err();
    assert!(
        err.kind() == ScmErrorKind::Rejected && {
            let m = err.to_string();
            m == "h refused the code: invalid_grantcodeabc"
        },
        "{err:?}"
    );
    assert_eq!(oauth_error_code(&"a".repeat(100)).len(), 64);
    assert_eq!(oauth_error_code("ÄÖ-42"), "unknown_error");
}

#[test]
fn token_answers_are_read_per_the_oauth_spec() {
    // Microsoft's older endpoints send expires_in as a string.
    let tokens = token_set(
        &reply(
            200,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"60"}"#,
        ),
        "h",
        Grant::Code,
    )
    .unwrap();
    assert!(tokens.expires_at.unwrap() > SystemTime::now());
    assert!(tokens.refresh_token.is_none());
    for body in [
        r#"{"token_type":"bearer"}"#,
        r#"{"access_token":"a","token_type":"mac"}"#,
        "access_token=a&token_type=bearer",
    ] {
        let err = token_set(&reply(200, body), "h", Grant::Code).unwrap_err();
        assert!(err.kind() == ScmErrorKind::Unavailable, "{body}: {err:?}");
        assert_hides(&err, &["access_token=a"]);
    }
    let err = token_set(&reply(401, "denied"), "h", Grant::Refresh).unwrap_err();
    assert!(err.kind() == ScmErrorKind::Unauthorized, "{err:?}");
}

#[test]
fn user_names_follow_each_providers_fields() {
    let name = |kind, body: &str| username(kind, &serde_json::from_str(body).unwrap());
    assert_eq!(
        name(
            ScmKind::Bitbucket,
            r#"{"nickname":"nick","display_name":"D"}"#
        )
        .as_deref(),
        Some("nick")
    );
    assert_eq!(
        name(ScmKind::Bitbucket, r#"{"username":"","display_name":"D"}"#).as_deref(),
        Some("D")
    );
    assert_eq!(
        name(
            ScmKind::AzureDevOps,
            r#"{"displayName":"D","emailAddress":"e@x"}"#
        )
        .as_deref(),
        Some("e@x")
    );
    assert_eq!(
        name(ScmKind::AzureDevOps, r#"{"displayName":"D"}"#).as_deref(),
        Some("D")
    );
    assert_eq!(name(ScmKind::GitHub, r#"{"username":"u"}"#), None);
}

#[test]
fn api_errors_are_classified() {
    let check = |status, rate_limited| {
        let mut reply = reply(status, "{}");
        reply.rate_limited = rate_limited;
        check_api_status(&reply, "h", "it")
            .unwrap_err()
            .metric_label()
    };
    assert_eq!(check(401, false), "unauthorized");
    assert_eq!(check(403, false), "unauthorized");
    assert_eq!(check(203, false), "unauthorized");
    assert_eq!(check(403, true), "unavailable");
    assert_eq!(check(429, false), "unavailable");
    assert_eq!(check(404, false), "not_found");
    assert_eq!(check(502, false), "unavailable");
}

#[test]
fn pull_request_urls_encode_each_segment() {
    let api = Url::parse("https://gitlab.example/api/v4/").unwrap();
    let url = pull_request_url(ScmKind::GitLab, &api, "group/sub group", "repo", 7).unwrap();
    assert_eq!(
        url.as_str(),
        "https://gitlab.example/api/v4/projects/group%2Fsub%20group%2Frepo/merge_requests/7"
    );
    let api = Url::parse("https://dev.azure.com").unwrap();
    let url = pull_request_url(ScmKind::AzureDevOps, &api, "org/My Project", "repo", 7).unwrap();
    assert_eq!(
        url.as_str(),
        "https://dev.azure.com/org/My%20Project/_apis/git/repositories/repo/pullrequests/7?api-version=7.1"
    );
}

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("runner-scm-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs git with no user or system configuration; `Ok` is its stdout.
async fn git(
    dir: &Path,
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(&str, String)],
) -> Result<String, String> {
    let output = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env_remove("SSH_ASKPASS")
        .envs(env.iter().map(|(key, value)| (*key, value)))
        .output()
        .await
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[tokio::test]
async fn git_clones_over_https_with_the_git_authorization_header() {
    let temp = TempDir::new("git");
    let root = temp.0.as_path();
    let author = [
        ("GIT_AUTHOR_NAME", "Test".to_owned()),
        ("GIT_AUTHOR_EMAIL", "test@example.com".to_owned()),
        ("GIT_COMMITTER_NAME", "Test".to_owned()),
        ("GIT_COMMITTER_EMAIL", "test@example.com".to_owned()),
    ];
    git(root, &["init", "-q", "-b", "main", "work"], &[])
        .await
        .unwrap();
    std::fs::write(root.join("work/README"), "served by the fake\n").unwrap();
    git(&root.join("work"), &["add", "README"], &[])
        .await
        .unwrap();
    git(
        &root.join("work"),
        &["commit", "-q", "-m", "first"],
        &author,
    )
    .await
    .unwrap();
    git(root, &["clone", "-q", "--bare", "work", "widgets.git"], &[])
        .await
        .unwrap();
    git(&root.join("widgets.git"), &["update-server-info"], &[])
        .await
        .unwrap();

    let fake = FakeScm::start().await;
    let ca = root.join("ca.pem");
    std::fs::write(&ca, fake.ca_pem()).unwrap();
    let cases = [
        (ScmKind::GitHub, AuthSource::Pat),
        (ScmKind::GitLab, AuthSource::OAuth),
        (ScmKind::Bitbucket, AuthSource::OAuth),
        (ScmKind::AzureDevOps, AuthSource::Pat),
        (ScmKind::AzureDevOps, AuthSource::OAuth),
    ];
    for (n, (kind, source)) in cases.into_iter().enumerate() {
        let path = format!("{}/repo{n}", label(kind));
        fake.add_repository(kind, &path, &root.join("widgets.git"));
        let token = format!("git-token-{n}");
        fake.add_token(kind, source, &token, "lena");
        let url = format!("{}/{path}.git", fake.base_url());
        let clone = |presented: &str, into: &str| {
            let header = authorization(kind, source, presented, Purpose::Git);
            let env = [
                ("GIT_SSL_CAINFO", ca.display().to_string()),
                ("GIT_CONFIG_COUNT", "1".to_owned()),
                ("GIT_CONFIG_KEY_0", "http.extraHeader".to_owned()),
                ("GIT_CONFIG_VALUE_0", format!("Authorization: {header}")),
            ];
            let args = [
                "clone".to_owned(),
                "-q".to_owned(),
                url.clone(),
                into.to_owned(),
            ];
            async move { git(root, &args, &env).await }
        };

        let into = format!("good{n}");
        clone(&token, &into)
            .await
            .unwrap_or_else(|err| panic!("{kind:?} {source:?}: {err}"));
        let readme = std::fs::read_to_string(root.join(&into).join("README")).unwrap();
        assert_eq!(readme, "served by the fake\n");

        let into = format!("bad{n}");
        let calls = fake.calls("git");
        let err = clone("not-the-token", &into).await.unwrap_err();
        assert!(
            fake.calls("git") > calls,
            "the refused clone reached the fake"
        );
        assert!(!root.join(&into).join("README").exists(), "{err}");
    }
}
