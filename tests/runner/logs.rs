//! No secret ever reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;
use secrecy::ExposeSecret as _;

use runner_core::scm::{AuthSource, ScmKind};
use testkit::scm::FakeScm;

use crate::settled;

#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, whichever test wrote it.
pub(crate) fn capture() -> &'static Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter("info,runnerd=trace,runner_core=trace,control_plane=trace")
            .with_writer({
                let capture = capture.clone();
                move || capture.clone()
            })
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("the only global subscriber of this binary");
        capture
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let capture = capture();
    let fake = FakeScm::start().await;
    let world = crate::scm::world_with(&fake).await;
    let runner = world.start_runner().await;
    world.create_env().await;
    world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;

    // A PAT stored through the runner, validated at the (fake) provider.
    let pat = "ghp_4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4";
    fake.add_token(ScmKind::GitHub, AuthSource::Pat, pat, "alice-gh");
    let mut admin = world.admin.clone();
    admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.runner_id.clone(),
            kind: runner_proto::pb::ScmKind::Github as i32,
            host: "github.com".into(),
            oauth: Some(runner_proto::pb::OAuthApp {
                client_id: "Iv1.logs".into(),
                sealed_client_secret: control_plane::cli::seal(
                    &world.runner().await.public_key,
                    control_plane::cli::client_secret_binding("github.com"),
                    b"client-secret-for-logs",
                )
                .expect("seal"),
            }),
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration");
    let public_key = world.runner().await.public_key;
    let sealed = control_plane::cli::seal(
        &public_key,
        control_plane::cli::pat_binding("alice", "github.com"),
        pat.as_bytes(),
    )
    .expect("seal");
    let mut stored = None;
    for _ in 0..100 {
        let answer = admin
            .add_host_token(admin::AddHostTokenRequest {
                runner_id: world.runner_id.clone(),
                principal: "alice".into(),
                host: "github.com".into(),
                sealed_token: sealed.clone(),
                timeout_ms: 5000,
            })
            .await;
        match answer {
            Ok(answer) => {
                stored = Some(answer.into_inner());
                break;
            }
            // The runner has not listed the new integration yet.
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    let stored = stored.expect("the runner stored the PAT");
    assert_eq!(stored.token.expect("token").username, "alice-gh");
    // And an OAuth token, refreshed at once (it expires within the margin).
    fake.add_oauth_app(ScmKind::GitHub, "Iv1.logs", "client-secret-for-logs");
    fake.add_code(
        ScmKind::GitHub,
        "code-for-logs",
        "bob-gh",
        Some(Duration::from_secs(60)),
    );
    let exchanged = crate::calls::call(
        &world,
        runner_proto::pb::runner_request::Kind::ExchangeOauthCode(
            runner_proto::pb::ExchangeOauthCode {
                principal: "bob".into(),
                host: "github.com".into(),
                code: "code-for-logs".into(),
                redirect_uri: "https://cp.example.com/callback".into(),
                code_verifier: String::new(),
            },
        ),
    )
    .await;
    assert!(
        matches!(exchanged, admin::call_runner_response::Outcome::Result(_)),
        "{exchanged:?}"
    );
    let mut bob = world.create_request(&world.class_id);
    bob.creator = "bob".into();
    world.create(bob).await;
    world
        .wait_for(
            "bob's environment RUNNING",
            Duration::from_secs(30),
            |envs| envs.iter().all(|e| settled(e, Phase::Running)),
        )
        .await;
    assert_eq!(fake.issued_tokens().len(), 4, "issued, then refreshed");

    let access = world
        .secrets
        .credentials()
        .access_token
        .expect("the runner stored its access token")
        .expose_secret()
        .to_owned();
    runner.stop().await.expect("clean stop");

    let logs = String::from_utf8_lossy(&capture.0.lock().expect("lock")).into_owned();
    assert!(
        logs.contains("signed up"),
        "the capture saw the daemon's logs"
    );
    assert!(logs.contains("launched"), "the capture saw reconciles");
    for (name, secret) in [
        ("exchange token", world.exchange_token.as_str()),
        ("access token", access.as_str()),
        ("PAT", pat),
        ("OAuth code", "code-for-logs"),
        ("OAuth client secret", "client-secret-for-logs"),
    ] {
        assert!(!logs.contains(secret), "the {name} appears in the logs");
    }
    for token in fake.issued_tokens() {
        assert!(!logs.contains(&token), "an OAuth token appears in the logs");
    }
    assert!(
        logs.contains("stored an OAuth token"),
        "the capture saw the SCM logs"
    );
}
