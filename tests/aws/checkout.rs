//! The instance bootstrap script, run for real: bash, the AWS CLI against
//! moto, and git against the fake provider over HTTPS. Only the instance
//! itself is missing (moto runs no user data), so the script runs here.

use std::path::{Path, PathBuf};
use std::process::Command;

use runner_core::model::{EnvironmentId, Revision, Subnet};
use runner_core::scm::{self, AuthSource, Purpose, ScmKind};
use runner_core::traits::{EnvironmentSecrets as _, LaunchRequest};
use secrecy::SecretString;
use testkit::scm::FakeScm;

use crate::{Infra, leading, moto_url, sdk};

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?}");
}

/// A bare repository with one commit on `main` holding README.md.
fn bare_repository(root: &Path) -> PathBuf {
    let work = root.join("work");
    let bare = root.join("api.git");
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("README.md"), "checked out by the bootstrap\n").expect("write");
    git(&work, &["add", "README.md"]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    git(root, &["clone", "--quiet", "--bare", "work", "api.git"]);
    git(&bare, &["update-server-info"]);
    bare
}

struct Run {
    ok: bool,
    output: String,
}

/// Runs the user data as the instance would, with the venv's AWS CLI.
fn run_user_data(user_data: &str, root: &Path, ca: &Path) -> Run {
    let venv = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("../.tools/venv/bin");
    assert!(
        venv.join("aws").exists(),
        "the AWS CLI is missing from {}: run tests/run, which installs it",
        venv.display()
    );
    let script = root.join("user-data.sh");
    std::fs::write(&script, user_data).expect("write user data");
    let output = Command::new("bash")
        .arg(&script)
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", venv.display()),
        )
        .env("HOME", root)
        .env("AWS_ENDPOINT_URL", moto_url())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_RUNNER_WORKSPACE", root.join("workspace"))
        .env("AWS_RUNNER_ETC", root.join("etc"))
        .env("AWS_RUNNER_SECRET_ATTEMPTS", "2")
        .env("GIT_SSL_CAINFO", ca)
        .output()
        .expect("run bash");
    Run {
        ok: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Every file under `dir`, as text.
fn all_files(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_clones_with_the_environment_secret_and_keeps_no_token() {
    let fake = FakeScm::start().await;
    let root = std::env::temp_dir().join(format!("bootstrap-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).expect("mkdir");
    let ca = root.join("ca.pem");
    std::fs::write(&ca, fake.ca_pem()).expect("write CA");
    let bare = bare_repository(&root);
    let pat = "glpat-bootstrapQ8v1Zx4Lm7";
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, pat, "alice");
    fake.add_repository(ScmKind::GitLab, "acme/api", &bare);

    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let secrets = infra.adapters(&sdk, "a", &leading()).environment_secrets;
    let env = EnvironmentId(uuid::Uuid::new_v4());
    let header = scm::authorization(ScmKind::GitLab, AuthSource::Pat, pat, Purpose::Git);
    let secret_id = secrets
        .put(env, &SecretString::from(header), &holder())
        .await
        .expect("the environment's secret");
    let request = LaunchRequest {
        environment: env,
        attempt: 1,
        client_token: "t".into(),
        subnet: Subnet {
            id: infra.subnets[0].0.clone(),
            availability_zone: infra.subnets[0].1.clone(),
        },
        instance_type: "m5.large".into(),
        disk_gib: 30,
        repository_url: format!("https://{}/acme/api.git", fake.host()),
        revision: Revision::Branch("main".into()),
        checkout_secret: Some(secret_id.clone()),
    };
    let user_data = runner_aws::ec2::user_data(&request, crate::REGION);
    assert!(!user_data.contains(pat), "the token is in the user data");

    let run = run_user_data(&user_data, &root, &ca);
    assert!(run.ok, "bootstrap failed:\n{}", run.output);
    assert_eq!(
        std::fs::read_to_string(root.join("workspace/README.md")).expect("checked out"),
        "checked out by the bootstrap\n"
    );
    assert!(fake.calls("git") > 0);
    assert!(
        !run.output.contains(pat),
        "the token is in the script's output"
    );
    let kept = all_files(&root.join("workspace")) + &all_files(&root.join("etc"));
    assert!(!kept.contains(pat), "the token was written to disk");
    let encoded = header_value(pat);
    assert!(
        !kept.contains(&encoded),
        "the credential was written to disk"
    );
    assert!(
        !kept.to_lowercase().contains("extraheader"),
        "the clone keeps a header"
    );

    // A second run finds the checkout and does nothing.
    let again = run_user_data(&user_data, &root, &ca);
    assert!(
        again.ok && again.output.contains("already checked out"),
        "{}",
        again.output
    );

    // A wrong credential: git is refused, the script fails, nothing leaks.
    std::fs::remove_dir_all(root.join("workspace")).expect("clean");
    let wrong = scm::authorization(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-wrong",
        Purpose::Git,
    );
    secrets
        .put(env, &SecretString::from(wrong), &holder())
        .await
        .expect("overwrite");
    let refused = run_user_data(&user_data, &root, &ca);
    assert!(
        !refused.ok,
        "cloned with a wrong token:\n{}",
        refused.output
    );
    assert!(
        !refused.output.contains("glpat-wrong"),
        "{}",
        refused.output
    );

    // No secret (deleted with its environment): the script says so and fails.
    secrets.delete(env).await.expect("delete");
    let missing = run_user_data(&user_data, &root, &ca);
    assert!(!missing.ok);
    assert!(
        missing
            .output
            .contains(&format!("cannot read the checkout credential {secret_id}")),
        "{}",
        missing.output
    );
    std::fs::remove_dir_all(&root).expect("clean up");
}

fn header_value(pat: &str) -> String {
    scm::authorization(ScmKind::GitLab, AuthSource::Pat, pat, Purpose::Git)
        .trim_start_matches("Basic ")
        .to_owned()
}

fn holder() -> runner_core::scm::TokenKey {
    runner_core::scm::TokenKey {
        principal: "alice".into(),
        host: "git.example.com".into(),
        source: AuthSource::Pat,
    }
}
