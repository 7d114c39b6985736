//! No secret ever reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;
use secrecy::ExposeSecret as _;

use crate::{World, settled};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

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
fn capture() -> &'static Capture {
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
    let world = World::new().await;
    let runner = world.start_runner().await;
    world.create_env().await;
    world
        .wait_for("RUNNING", Duration::from_secs(30), |envs| {
            envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;

    // A PAT on its way to the runner (which does not store tokens yet).
    let pat = "ghp_4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4";
    let mut admin = world.admin.clone();
    admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.runner_id.clone(),
            kind: runner_proto::pb::ScmKind::Github as i32,
            host: "github.com".into(),
            oauth: None,
            pat_enabled: true,
            api_base_url: String::new(),
        })
        .await
        .expect("integration");
    let public_key = world.runner().await.public_key;
    let sealed = control_plane::cli::seal(&public_key, pat.as_bytes()).expect("seal");
    let answer = admin
        .add_host_token(admin::AddHostTokenRequest {
            runner_id: world.runner_id.clone(),
            principal: "alice".into(),
            host: "github.com".into(),
            sealed_token: sealed,
            timeout_ms: 5000,
        })
        .await;
    assert_eq!(
        answer.expect_err("not handled yet").code(),
        tonic::Code::Unimplemented
    );

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
    ] {
        assert!(!logs.contains(secret), "the {name} appears in the logs");
    }
}
