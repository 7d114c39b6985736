//! The trust boundary around users' tokens: revocation that does not depend
//! on an event being delivered, endpoint overrides that stay on the
//! integration's host, refreshes raced between two replicas, and expiry
//! judged by the runner's clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runner_core::scm::{AuthSource, Integration, OAuthApp, ScmKind, TokenKey};
use runner_core::traits::{
    Clock as _, HostToken, ManualClock, SecretKeyBytes, StoredToken, TokenEntry, TokenStore,
    TokenStoreError,
};
use runner_proto::admin::v1 as admin;
use runner_proto::pb;
use testkit::fakes::{MemoryEnvironmentSecrets, MemoryTokens};
use testkit::scm::FakeScm;

use crate::scm::wait_until;
use crate::scm::{Integration as Configured, add_pat, create_integration, world_with};
use crate::settled;

fn key(principal: &str, host: &str) -> TokenKey {
    TokenKey {
        principal: principal.into(),
        host: host.into(),
        source: AuthSource::Pat,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_deleted_while_the_runner_is_away_is_gone_with_its_checkout_secret() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    fake.add_token(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-AliceAway01",
        "alice-gl",
    );
    fake.add_token(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-BobStays002",
        "bob-gl",
    );
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    create_integration(
        &world,
        Configured {
            kind: pb::ScmKind::Gitlab,
            host: &host,
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;
    add_pat(&world, "alice", &host, "glpat-AliceAway01")
        .await
        .expect("alice");
    add_pat(&world, "bob", &host, "glpat-BobStays002")
        .await
        .expect("bob");
    // Alice's environment holds her token in its checkout secret.
    let mut request = world.create_request(&world.class_id);
    request.content = Some(pb::EnvironmentContent {
        repository_url: format!("https://{host}/acme/api.git"),
        revision: None,
    });
    let env = world.create(request).await;
    world
        .wait_for("RUNNING", Duration::from_secs(20), |envs| {
            envs.iter()
                .all(|e| settled(e, pb::EnvironmentPhase::Running))
        })
        .await;
    let env = runner_core::model::EnvironmentId(uuid::Uuid::parse_str(&env).expect("uuid"));
    assert!(world.environment_secrets.value(env).is_some());

    // No runner connected: the control plane's event has nowhere to go.
    runner.stop().await.expect("clean stop");
    world
        .admin
        .clone()
        .delete_host_token(admin::DeleteHostTokenRequest {
            runner_id: world.runner_id.clone(),
            principal: "alice".into(),
            host: host.clone(),
        })
        .await
        .expect("delete alice's token");
    assert!(world.tokens.keys().contains(&key("alice", &host)));

    // Back: its first sync lists what the control plane still holds.
    let runner = world.start_runner().await;
    wait_until("alice's token to be deleted", async || {
        !world.tokens.keys().contains(&key("alice", &host))
    })
    .await;
    assert_eq!(world.tokens.keys(), vec![key("bob", &host)], "bob's stays");
    assert_eq!(
        world.environment_secrets.value(env),
        None,
        "the checkout secret holding the revoked token is deleted"
    );
    runner.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_to_another_host_is_refused_and_no_token_goes_there() {
    let fake = FakeScm::start().await;
    let elsewhere = FakeScm::start().await;
    let host = fake.host();
    fake.add_token(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-Override77",
        "alice-gl",
    );
    elsewhere.add_token(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-Override77",
        "alice-gl",
    );
    let world = world_with(&fake).await;
    let runner = world.start_runner().await;
    // The reference control plane forwards what it is given, as a hostile
    // one would: the runner is the one that refuses.
    create_integration(
        &world,
        Configured {
            kind: pb::ScmKind::Gitlab,
            host: &host,
            pat: true,
            oauth: None,
            api_base_url: format!("{}/api/v4", elsewhere.base_url()),
            oauth_base_url: String::new(),
        },
    )
    .await;
    let refused = add_pat(&world, "alice", &host, "glpat-Override77")
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&format!(
            "api_base_url: must be on the integration's host {host}, not {}",
            elsewhere.host()
        )),
        "{refused:?}"
    );
    assert_eq!(elsewhere.calls("gitlab.user"), 0, "nothing was sent there");
    assert_eq!(fake.calls("gitlab.user"), 0);
    assert!(world.tokens.keys().is_empty());
    runner.stop().await.expect("clean stop");
}

/// A GitLab integration on the fake's host with an OAuth app whose client
/// secret is sealed to `key`.
fn gitlab_oauth(
    fake: &FakeScm,
    key: &crypto_box::SecretKey,
    client: (&str, &[u8]),
    pat_enabled: bool,
) -> Integration {
    let host = fake.host();
    Integration {
        id: uuid::Uuid::new_v4(),
        kind: ScmKind::GitLab,
        oauth: Some(OAuthApp {
            client_id: client.0.into(),
            sealed_client_secret: control_plane::cli::seal(
                key.public_key().as_bytes(),
                control_plane::cli::client_secret_binding(&host),
                client.1,
            )
            .expect("seal"),
        }),
        host,
        pat_enabled,
        api_base_url: None,
        oauth_base_url: None,
    }
}

/// Repository access over `tokens`, talking to the fake, holding `key`.
fn direct_scm(
    fake: &FakeScm,
    tokens: Arc<dyn TokenStore>,
    key: &crypto_box::SecretKey,
) -> runnerd::scm::Scm {
    let client = runner_scm::ScmClient::new(
        Some(fake.ca_pem().as_bytes()),
        Duration::from_secs(5),
        "aws-runner-tests",
        &[],
    )
    .expect("client");
    let scm = runnerd::scm::Scm::new(
        tokens,
        Arc::new(MemoryEnvironmentSecrets::default()),
        client,
    );
    scm.set_key(&SecretKeyBytes(key.to_bytes()));
    scm
}

/// Alice's OAuth `code` for `host`, as the control plane forwards it.
fn alices_code(host: &str, code: &str) -> pb::ExchangeOauthCode {
    pb::ExchangeOauthCode {
        principal: "alice".into(),
        host: host.to_owned(),
        code: code.into(),
        redirect_uri: "https://cp.example.com/cb".into(),
        code_verifier: String::new(),
    }
}

/// A token store whose first `stale` reads return an old snapshot: a
/// replica that read the token just before another one refreshed it.
struct Stale {
    inner: Arc<MemoryTokens>,
    snapshot: Mutex<(usize, Option<StoredToken>)>,
}

#[async_trait]
impl TokenStore for Stale {
    async fn get(&self, key: &TokenKey) -> Result<Option<StoredToken>, TokenStoreError> {
        {
            let mut snapshot = self.snapshot.lock().expect("lock");
            if snapshot.0 > 0 {
                snapshot.0 -= 1;
                return Ok(snapshot.1.clone());
            }
        }
        self.inner.get(key).await
    }

    async fn put(
        &self,
        key: &TokenKey,
        token: &HostToken,
        expected: Option<u64>,
    ) -> Result<u64, TokenStoreError> {
        self.inner.put(key, token, expected).await
    }

    async fn list(&self) -> Result<Vec<TokenEntry>, TokenStoreError> {
        self.inner.list().await
    }

    async fn delete(&self, key: &TokenKey, expected: Option<u64>) -> Result<(), TokenStoreError> {
        self.inner.delete(key, expected).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_lost_to_another_replica_keeps_the_token_it_rotated() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    fake.add_oauth_app(ScmKind::GitLab, "app-race", "s3cr3t-race");
    fake.add_code(
        ScmKind::GitLab,
        "code-race",
        "alice-gl",
        Some(Duration::from_secs(60)),
    );
    let secret_key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let integration = gitlab_oauth(&fake, &secret_key, ("app-race", b"s3cr3t-race"), false);
    let tokens = Arc::new(MemoryTokens::default());
    let replica = |store: Arc<dyn TokenStore>| direct_scm(&fake, store, &secret_key);
    let a = replica(tokens.clone());
    let now = std::time::SystemTime::now();
    a.sync(vec![integration.clone()], None, now)
        .await
        .expect("sync");
    a.exchange_oauth(alices_code(&host, "code-race"))
        .await
        .expect("exchanged");
    let oauth_key = TokenKey {
        principal: "alice".into(),
        host: host.clone(),
        source: AuthSource::OAuth,
    };
    // B read the token (expiring soon) ...
    let before = tokens.get(&oauth_key).await.expect("get").expect("stored");
    let b = replica(Arc::new(Stale {
        inner: tokens.clone(),
        snapshot: Mutex::new((2, Some(before.clone()))),
    }));
    b.sync(vec![integration], None, now).await.expect("sync");
    // ... then A refreshed it, rotating the refresh token B holds.
    assert!(
        a.check_authentication("alice", &host)
            .await
            .expect("a")
            .authenticated
    );
    let after = tokens.get(&oauth_key).await.expect("get").expect("stored");
    assert_eq!(after.version, before.version + 1, "A refreshed");
    // B's refresh is refused by the provider: A's token must survive.
    let calls = fake.calls("gitlab.token");
    assert!(
        b.check_authentication("alice", &host)
            .await
            .expect("b")
            .authenticated
    );
    assert_eq!(
        fake.calls("gitlab.token"),
        calls + 1,
        "B tried its stale refresh token"
    );
    let kept = tokens
        .get(&oauth_key)
        .await
        .expect("get")
        .expect("A's token is kept");
    assert_eq!(kept.version, after.version);
}

/// Expiry is judged by `Scm`'s clock: an OAuth token with an hour left is
/// used as it is, and refreshed once that clock is within the refresh margin
/// of its expiry (the wall clock has not moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_token_is_refreshed_when_the_scm_clock_nears_its_expiry() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    let ttl = Duration::from_secs(3600);
    fake.add_oauth_app(ScmKind::GitLab, "app-clock", "s3cr3t-clock");
    fake.add_code(ScmKind::GitLab, "code-clock", "alice-gl", Some(ttl));
    let secret_key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let integration = gitlab_oauth(&fake, &secret_key, ("app-clock", b"s3cr3t-clock"), false);
    let clock = ManualClock::new(std::time::SystemTime::now());
    let scm = direct_scm(&fake, Arc::new(MemoryTokens::default()), &secret_key)
        .with_clock(Arc::new(clock.clone()));
    scm.sync(vec![integration], None, clock.now())
        .await
        .expect("sync");
    scm.exchange_oauth(alices_code(&host, "code-clock"))
        .await
        .expect("exchanged");
    let exchanged = fake.calls("gitlab.token");
    let authenticated = async || {
        scm.check_authentication("alice", &host)
            .await
            .expect("checked")
            .authenticated
    };

    assert!(authenticated().await);
    assert_eq!(
        fake.calls("gitlab.token"),
        exchanged,
        "an hour left: no refresh"
    );
    // A minute inside the margin (the token's expiry was set a moment after
    // the clock's start).
    clock.advance(ttl - runnerd::scm::REFRESH_MARGIN + Duration::from_secs(60));
    assert!(authenticated().await);
    assert_eq!(
        fake.calls("gitlab.token"),
        exchanged + 1,
        "within the margin by the Scm's clock: refreshed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_provider_account_is_refused() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    fake.add_token(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-AliceOwn11",
        "alice-gl",
    );
    fake.add_oauth_app(ScmKind::GitLab, "app-who", "s3cr3t-who");
    fake.add_code(ScmKind::GitLab, "code-mallory", "mallory-gl", None);
    fake.add_code(ScmKind::GitLab, "code-alice", "Alice-GL", None);
    let secret_key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let public_key = secret_key.public_key();
    let integration = gitlab_oauth(&fake, &secret_key, ("app-who", b"s3cr3t-who"), true);
    let tokens = Arc::new(MemoryTokens::default());
    let scm = direct_scm(&fake, tokens.clone(), &secret_key);
    scm.sync(vec![integration], None, std::time::SystemTime::now())
        .await
        .expect("sync");
    let sealed = control_plane::cli::seal(
        public_key.as_bytes(),
        control_plane::cli::pat_binding("alice", &host),
        b"glpat-AliceOwn11",
    )
    .expect("seal");
    assert_eq!(
        scm.store_pat("alice", &host, &sealed)
            .await
            .expect("stored"),
        "alice-gl"
    );
    let exchange = |code: &str| alices_code(&host, code);
    // An OAuth code that signs in as someone else is not alice's.
    let refused = scm
        .exchange_oauth(exchange("code-mallory"))
        .await
        .expect_err("another account");
    assert_eq!(refused.code, tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message
            .contains("the token authenticates as \"mallory-gl\" on 127.0.0.1")
            && refused
                .message
                .contains("\"alice\"'s pat token there authenticates as \"alice-gl\""),
        "{refused:?}"
    );
    assert_eq!(tokens.keys(), vec![key("alice", &host)]);
    // The same account (names compare without case) is fine.
    scm.exchange_oauth(exchange("code-alice"))
        .await
        .expect("the same account");
    assert_eq!(tokens.keys().len(), 2);
}
