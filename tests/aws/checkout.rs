//! The instance bootstrap script, run for real: bash, the AWS CLI against
//! moto, and git against the fake provider over HTTPS. Only the instance
//! itself is missing (moto runs no user data), so the script runs here.
//! The script deletes the checkout secret once the clone is done or has
//! failed; the user data's shell header keeps hostile values inert.

use std::path::{Path, PathBuf};
use std::process::Command;

use runner_core::model::{EnvironmentId, Revision, Subnet};
use runner_core::report::{Report, Stage};
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
pub(crate) fn bare_repository(root: &Path) -> PathBuf {
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

pub(crate) struct Run {
    pub(crate) ok: bool,
    pub(crate) output: String,
}

/// Runs the user data as the instance `instance_id` would, with the venv's
/// AWS CLI (its reports go to moto, on that instance).
pub(crate) fn run_user_data(user_data: &str, root: &Path, ca: &Path, instance_id: &str) -> Run {
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
        .env("AWS_RUNNER_INSTANCE_ID", instance_id)
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
    let user_data = runner_aws::ec2::user_data(&request, crate::REGION).expect("canonical URL");
    assert!(!user_data.contains(pat), "the token is in the user data");
    assert!(
        user_data.contains(&format!(
            "AWS_RUNNER_REPOSITORY_ORIGIN='https://{}/'\n",
            fake.host()
        )),
        "{user_data}"
    );
    let sm = aws_sdk_secretsmanager::Client::new(&sdk);
    // The instance the script runs as: its reports are tags on it.
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let instance = ec2
        .run_instances()
        .image_id(&infra.ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
        .subnet_id(&infra.subnets[0].0)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("an instance")
        .instances()[0]
        .instance_id()
        .expect("id")
        .to_owned();

    // An origin that does not cover the URL: the credential is not even read.
    let elsewhere = user_data.replace(
        &format!("AWS_RUNNER_REPOSITORY_ORIGIN='https://{}/'", fake.host()),
        "AWS_RUNNER_REPOSITORY_ORIGIN='https://127.0.0.1:1/'",
    );
    let refused = run_user_data(&elsewhere, &root, &ca, &instance);
    assert!(!refused.ok, "{}", refused.output);
    assert!(
        refused
            .output
            .contains("the repository URL is not under its origin https://127.0.0.1:1/"),
        "{}",
        refused.output
    );
    assert_eq!(fake.calls("git"), 0, "git ran");
    assert!(
        secret_exists(&sm, &secret_id).await,
        "deleted without a clone"
    );
    let r = report(&ec2, &instance).await;
    assert_eq!(r.failure(), Some(Stage::Credential), "{r:?}");
    assert_eq!(
        r.detail,
        "the repository URL is not under its origin https://127.0.0.1:1/: not sending the credential"
    );

    let run = run_user_data(&user_data, &root, &ca, &instance);
    assert!(run.ok, "bootstrap failed:\n{}", run.output);
    assert!(
        !secret_exists(&sm, &secret_id).await,
        "the secret outlived the clone:\n{}",
        run.output
    );
    assert!(
        run.output
            .contains(&format!("deleted the checkout credential {secret_id}")),
        "{}",
        run.output
    );
    assert_eq!(
        std::fs::read_to_string(root.join("workspace/README.md")).expect("checked out"),
        "checked out by the bootstrap\n"
    );
    let head = head(&bare);
    let r = report(&ec2, &instance).await;
    assert!(r.ready(), "{r:?}\n{}", run.output);
    assert_eq!(r.commit.as_deref(), Some(head.as_str()));
    assert!(r.started_at.is_some() && r.at >= r.started_at, "{r:?}");
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
    let again = run_user_data(&user_data, &root, &ca, &instance);
    assert!(
        again.ok && again.output.contains("already checked out"),
        "{}",
        again.output
    );

    // A wrong credential (a relaunch writes the secret again, although the
    // first instance deleted it): git is refused, the script fails, nothing
    // leaks, and the secret is deleted all the same.
    std::fs::remove_dir_all(root.join("workspace")).expect("clean");
    let wrong = scm::authorization(
        ScmKind::GitLab,
        AuthSource::Pat,
        "glpat-wrong",
        Purpose::Git,
    );
    assert_eq!(
        secrets
            .put(env, &SecretString::from(wrong), &holder())
            .await
            .expect("written again"),
        secret_id
    );
    assert!(secret_exists(&sm, &secret_id).await);
    let refused = run_user_data(&user_data, &root, &ca, &instance);
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
    assert!(
        !secret_exists(&sm, &secret_id).await,
        "the secret outlived a failed clone:\n{}",
        refused.output
    );
    assert!(
        !root.join("workspace/.git").exists(),
        "a failed clone left a checkout"
    );
    let r = report(&ec2, &instance).await;
    assert_eq!(r.failure(), Some(Stage::Clone), "{r:?}\n{}", refused.output);
    assert!(r.detail.starts_with("git clone failed: "), "{r:?}");
    assert!(!r.detail.contains("glpat-wrong"), "{r:?}");

    // The runner's own delete (environment removed) finds it gone: done.
    secrets
        .delete(env)
        .await
        .expect("delete of a deleted secret");
    // No secret: the script says so and fails.
    let missing = run_user_data(&user_data, &root, &ca, &instance);
    assert!(!missing.ok);
    assert!(
        missing
            .output
            .contains(&format!("cannot read the checkout credential {secret_id}")),
        "{}",
        missing.output
    );
    let r = report(&ec2, &instance).await;
    assert_eq!(r.failure(), Some(Stage::Credential), "{r:?}");
    assert_eq!(
        r.detail,
        format!("cannot read the checkout credential {secret_id}")
    );
    std::fs::remove_dir_all(&root).expect("clean up");
}

/// The commit `main` points at in the bare repository.
pub(crate) fn head(bare: &Path) -> String {
    let out = Command::new("git")
        .args(["rev-parse", "main"])
        .current_dir(bare)
        .output()
        .expect("git rev-parse");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// What the instance reported, read from its tags as the runner reads them.
pub(crate) async fn report(ec2: &aws_sdk_ec2::Client, instance_id: &str) -> Report {
    let described = ec2
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .expect("describe");
    let instance = described.reservations()[0].instances()[0].clone();
    Report::from_tags(
        instance
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
    )
}

async fn secret_exists(sm: &aws_sdk_secretsmanager::Client, id: &str) -> bool {
    use aws_sdk_secretsmanager::error::ProvideErrorMetadata as _;
    match sm.describe_secret().secret_id(id).send().await {
        Ok(_) => true,
        Err(err) if err.code() == Some("ResourceNotFoundException") => false,
        Err(err) => panic!("describe {id}: {err:?}"),
    }
}

/// The user data's shell header hands every value to the script verbatim,
/// whatever quotes, expansions or newlines it holds: nothing in it runs.
#[test]
fn the_user_data_header_keeps_hostile_values_inert() {
    let root = std::env::temp_dir().join(format!("header-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).expect("mkdir");
    let pwned = root.join("pwned");
    let p = pwned.display();
    // Branch names git accepts and validate::branch lets through.
    for branch in [
        format!("x';touch${{IFS}}{p};'"),
        format!("$(touch${{IFS}}{p})"),
        format!("`touch${{IFS}}{p}`"),
        format!("x\"$(touch${{IFS}}{p})\"'"),
        "a'b''c;id|x&y".to_owned(),
    ] {
        assert_eq!(
            runner_core::validate::branch("b", &branch),
            Ok(()),
            "{branch}"
        );
        let request = LaunchRequest {
            environment: EnvironmentId(uuid::Uuid::new_v4()),
            attempt: 1,
            client_token: "t".into(),
            subnet: Subnet {
                id: "subnet-1".into(),
                availability_zone: "eu-west-1a".into(),
            },
            instance_type: "m5.large".into(),
            disk_gib: 30,
            repository_url: "https://github.com/acme/api.git".into(),
            revision: Revision::Branch(branch.clone()),
            checkout_secret: None,
        };
        let user_data = runner_aws::ec2::user_data(&request, crate::REGION).expect("user data");
        let header = user_data
            .strip_suffix(runner_aws::ec2::BOOTSTRAP)
            .expect("the header, then the script");
        let script = root.join("header.sh");
        std::fs::write(
            &script,
            format!("{header}printf '%s' \"$AWS_RUNNER_BRANCH\"\n"),
        )
        .expect("write");
        let output = Command::new("bash").arg(&script).output().expect("bash");
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), branch);
        assert!(!pwned.exists(), "{branch:?} ran a command");
    }
    // A URL that is not canonical makes no user data at all.
    let mut request = LaunchRequest {
        environment: EnvironmentId(uuid::Uuid::new_v4()),
        attempt: 1,
        client_token: "t".into(),
        subnet: Subnet {
            id: "subnet-1".into(),
            availability_zone: "eu-west-1a".into(),
        },
        instance_type: "m5.large".into(),
        disk_gib: 30,
        repository_url: "https://github.com\\@evil.example/acme/api".into(),
        revision: Revision::Default,
        checkout_secret: None,
    };
    let err = runner_aws::ec2::user_data(&request, crate::REGION).expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("spec.content.repository_url: must not contain a backslash"),
        "{err}"
    );
    request.repository_url = "https://git.example.com:8443/acme/api.git".into();
    assert!(
        runner_aws::ec2::user_data(&request, crate::REGION)
            .expect("user data")
            .contains("\nAWS_RUNNER_REPOSITORY_ORIGIN='https://git.example.com:8443/'\n")
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
