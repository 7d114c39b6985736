//! Honest environments end to end: the runnerd binary on moto, and the real
//! bootstrap (bash, the AWS CLI, git against the fake provider) run as each
//! instance, since moto runs no user data. An environment is RUNNING only
//! once its instance reports its checkout, with the commit; a refused
//! credential, a missing branch and a missing commit end failed naming the
//! stage; an instance that never reports fails at the deadline; a restarted
//! runner reads the stages from the instances' tags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use runner_core::scm::{AuthSource, ScmKind};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase, environment_content::Revision};
use testkit::scm::FakeScm;

use crate::chaos::{free_ports, metric_sum};
use crate::checkout::{bare_repository, head, run_user_data};
use crate::daemon::{Process, World};
use crate::moto_url;
use crate::repository::add_pat;

/// The first runner's deadline, longer than any bootstrap here takes; the
/// second runner's, shorter than the time the silent instance has run by
/// then.
const LONG: &str = "10m";
const SHORT: &str = "30s";

async fn create(world: &World, host: &str, revision: Revision) -> String {
    create_with(world, host, Some(revision), None).await
}

async fn create_with(
    world: &World,
    host: &str,
    revision: Option<Revision>,
    timeout: Option<pb::EnvironmentTimeout>,
) -> String {
    world
        .admin
        .clone()
        .create_environment(admin::CreateEnvironmentRequest {
            runner_id: world.infra.runner_id.clone(),
            environment_class_id: world.class_id.clone(),
            content: Some(pb::EnvironmentContent {
                repository_url: format!("https://{host}/acme/api.git"),
                revision,
            }),
            creator: "alice".into(),
            name: String::new(),
            timeout,
            unchecked: false,
        })
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment")
        .id
}

fn status_of<'a>(envs: &'a [admin::Environment], id: &str) -> Option<&'a pb::EnvironmentStatus> {
    envs.iter()
        .find(|e| e.environment.as_ref().is_some_and(|x| x.id == id))
        .and_then(|e| e.status.as_ref())
}

/// Runs the environment's user data as its instance, in a directory of its own.
async fn boot(world: &World, env: &str, root: &Path, ca: &Path) -> crate::checkout::Run {
    let instance = world
        .instances()
        .await
        .into_iter()
        .find(|(e, ..)| e == env)
        .expect("an instance")
        .1;
    let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
    let user_data = crate::user_data(&ec2, &instance).await;
    let dir = root.join(env);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ca = ca.to_owned();
    tokio::task::spawn_blocking(move || run_user_data(&user_data, &dir, &ca, &instance))
        .await
        .expect("joined")
}

fn failure(envs: &[admin::Environment], id: &str) -> String {
    status_of(envs, id).map_or_else(String::new, |s| s.failure_message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_run_only_with_their_content_and_failures_name_the_stage() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    let root: PathBuf = std::env::temp_dir().join(format!("content-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).expect("mkdir");
    let ca = root.join("ca.pem");
    std::fs::write(&ca, fake.ca_pem()).expect("CA");
    let bare = bare_repository(&root);
    fake.add_repository(ScmKind::GitLab, "acme/api", &bare);
    let pat = "glpat-contentR5t8Yw2Qz6";
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, pat, "alice-gl");

    let world = World::silent(&moto_url()).await;
    let [port, _] = free_ports();
    let extra = |deadline: &str| {
        [
            ("RUNNER_CA_BUNDLE", ca.display().to_string()),
            ("RUNNER_CONTENT_DEADLINE", deadline.to_owned()),
            ("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{port}")),
        ]
    };
    let runner = Process::start_with(&world, "content-1", &moto_url(), &extra(LONG));
    world
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
        .expect("integration");
    assert_eq!(add_pat(&world, "alice", &host, pat).await, "alice-gl");

    let good = create(&world, &host, Revision::Branch("main".into())).await;
    let no_branch = create(&world, &host, Revision::Branch("no-such-branch".into())).await;
    let no_commit = create(
        &world,
        &host,
        Revision::Commit("0123456789abcdef0123456789abcdef01234567".into()),
    )
    .await;
    let refused = create(&world, &host, Revision::Branch("main".into())).await;
    let silent = create(&world, &host, Revision::Branch("main".into())).await;

    // EC2 runs every instance, and nothing is checked out yet: STARTING.
    world
        .wait_for(
            "every environment STARTING on a running instance",
            Duration::from_secs(60),
            |envs| {
                envs.len() == 5
                    && envs.iter().all(|e| {
                        e.status.as_ref().is_some_and(|s| {
                            s.phase == Phase::Starting as i32
                                && s.machine
                                    .as_ref()
                                    .is_some_and(|m| m.phase == pb::MachinePhase::Running as i32)
                                && s.failure_message.is_empty()
                                && s.content_stage == pb::ContentStage::Unspecified as i32
                        })
                    })
            },
        )
        .await;

    // The instances' bootstraps, run as they would on each instance.
    let (a, b, c) = tokio::join!(
        boot(&world, &good, &root, &ca),
        boot(&world, &no_branch, &root, &ca),
        boot(&world, &no_commit, &root, &ca),
    );
    assert!(a.ok, "{}", a.output);
    assert!(!b.ok && !c.ok, "{}\n{}", b.output, c.output);
    // The user's token is revoked at the provider before its clone.
    fake.revoke_token(pat);
    let d = boot(&world, &refused, &root, &ca).await;
    assert!(!d.ok, "{}", d.output);

    let commit = head(&bare);
    world
        .wait_for(
            "the good clone RUNNING, the others failed",
            Duration::from_secs(60),
            |envs| {
                status_of(envs, &good).is_some_and(|s| s.phase == Phase::Running as i32)
                    && [&no_branch, &no_commit, &refused]
                        .iter()
                        .all(|id| !failure(envs, id).is_empty())
            },
        )
        .await;
    let envs = list(&world).await;
    let s = status_of(&envs, &good).expect("status");
    assert_eq!(s.content_stage, pb::ContentStage::Ready as i32);
    assert_eq!(s.content_commit, commit);
    assert!(s.content_ready_time.is_some(), "{s:?}");
    let timings = s.start_timings.as_ref().expect("timings");
    assert!(
        timings.launch_to_content_ready.is_some() && timings.running_to_content_ready.is_some(),
        "{timings:?}"
    );
    assert!(s.failure_message.is_empty(), "{s:?}");
    for (id, stage, says, run) in [
        (&no_branch, pb::ContentStage::Clone, "git clone failed", &b),
        (
            &no_commit,
            pb::ContentStage::Checkout,
            "0123456789abcdef",
            &c,
        ),
        (&refused, pb::ContentStage::Clone, "git clone failed", &d),
    ] {
        let s = status_of(&envs, id).expect("status");
        let message = &s.failure_message;
        assert!(
            message.starts_with(&format!(
                "the environment's content is not ready: checkout failed at stage {}: ",
                stage
                    .as_str_name()
                    .trim_start_matches("CONTENT_STAGE_")
                    .to_lowercase()
            )) && message.contains(says),
            "{id}: {message}\n{}",
            run.output
        );
        assert!(!message.contains(pat), "{message}");
        assert_eq!(s.content_stage, stage as i32, "{id}");
        assert_eq!(s.phase, Phase::Starting as i32, "{id}");
    }

    // The operator's log: the boot's last lines next to the environment id.
    assert!(
        runner
            .logged(
                &["console output of the failed instance"],
                Duration::from_secs(10)
            )
            .await
    );
    let logs = runner.logs();
    let console = logs
        .lines()
        .filter(|l| l.contains("console output of the failed instance"))
        .collect::<Vec<_>>();
    for id in [&no_branch, &no_commit, &refused] {
        assert!(
            console.iter().any(|l| l.contains(id.as_str())),
            "no console output logged for {id}"
        );
    }
    assert!(!logs.contains(pat), "the PAT is in the runner's log");
    assert!(
        logs.lines()
            .any(|l| l.contains("the environment's content is ready")
                && l.contains(&good)
                && l.contains("launch_to_ready_ms")),
        "no start line for {good}"
    );
    assert!(
        metric_sum(
            port,
            "runner_environment_start_seconds_count{span=\"launch_to_ready\"}"
        )
        .await
            >= 1.0
    );

    // Within the deadline, the silent instance is only STARTING.
    assert_eq!(failure(&envs, &silent), "");
    assert_eq!(
        status_of(&envs, &silent).map(|s| s.phase),
        Some(Phase::Starting as i32)
    );

    // A restarted runner knows nothing but the tags: the same stages. Its
    // deadline is shorter than the silent instance has run: that one fails.
    let before: Vec<(u64, i32, String)> = [&good, &no_branch]
        .iter()
        .map(|id| {
            let s = status_of(&envs, id).expect("status");
            (s.status_version, s.content_stage, s.failure_message.clone())
        })
        .collect();
    assert_eq!(runner.stop().await, Some(0));
    let again = Process::start_with(&world, "content-2", &moto_url(), &extra(SHORT));
    world
        .wait_for(
            "the restarted runner's statuses",
            Duration::from_secs(60),
            |envs| {
                !failure(envs, &silent).is_empty()
                    && [&good, &no_branch]
                        .iter()
                        .zip(&before)
                        .all(|(id, (version, ..))| {
                            status_of(envs, id).is_some_and(|s| s.status_version > *version)
                        })
            },
        )
        .await;
    let envs = list(&world).await;
    for (id, (_, stage, message)) in [&good, &no_branch].iter().zip(&before) {
        let s = status_of(&envs, id).expect("status");
        assert_eq!((&s.content_stage, &s.failure_message), (stage, message));
    }
    assert_eq!(
        status_of(&envs, &good).map(|s| (s.phase, s.content_commit.clone())),
        Some((Phase::Running as i32, commit))
    );
    assert_eq!(
        failure(&envs, &silent),
        "the environment's content is not ready: no report of it within 30s of the instance's start (the instance reported nothing)"
    );
    assert_eq!(again.stop().await, Some(0));
    std::fs::remove_dir_all(&root).expect("clean up");
}

async fn list(world: &World) -> Vec<admin::Environment> {
    world
        .admin
        .clone()
        .list_environments(admin::ListEnvironmentsRequest {
            runner_id: world.infra.runner_id.clone(),
        })
        .await
        .expect("list")
        .into_inner()
        .environments
}

/// Runs the bootstrap's idle watcher once as `instance_id` (one look at
/// `ports`, a tag written if that changed), as its service would.
fn watch_clients(user_data: &str, root: &Path, instance_id: &str, ports: &str) -> String {
    let venv = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("../.tools/venv/bin");
    let script = root.join("user-data.sh");
    std::fs::write(&script, user_data).expect("write user data");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .env_clear()
        .env(
            "PATH",
            format!(
                "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                venv.display()
            ),
        )
        .env("HOME", root)
        .env("AWS_ENDPOINT_URL", moto_url())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_RUNNER_ETC", root.join("etc"))
        .env("AWS_RUNNER_INSTANCE_ID", instance_id)
        .env("AWS_RUNNER_CLIENT_PORTS", ports)
        .env("AWS_RUNNER_IDLE_ONCE", "1")
        .output()
        .expect("run bash");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_without_a_client_is_stopped_and_stays_stopped() {
    let root: PathBuf = std::env::temp_dir().join(format!("idle-{}", uuid::Uuid::new_v4()));
    let world = World::silent(&moto_url()).await;
    let runner = Process::start_with(&world, "idle", &moto_url(), &[]);
    let timeout = Some(pb::EnvironmentTimeout {
        disconnected: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
    });
    let idle = create_with(&world, "github.com", None, timeout).await;
    let busy = create_with(&world, "github.com", None, timeout).await;
    world
        .wait_for("both instances running", Duration::from_secs(60), |envs| {
            envs.iter()
                .filter(|e| {
                    e.status.as_ref().is_some_and(|s| {
                        s.machine
                            .as_ref()
                            .is_some_and(|m| m.phase == pb::MachinePhase::Running as i32)
                    })
                })
                .count()
                == 2
        })
        .await;
    let instances = world.instances().await;
    let instance = |env: &str| {
        instances
            .iter()
            .find(|(e, ..)| e == env)
            .expect("an instance")
            .1
            .clone()
    };
    let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
    crate::daemon::report_ready(&ec2, vec![instance(&idle), instance(&busy)])
        .await
        .expect("ready");

    // A client on the busy one: an established connection to its port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port().to_string();
    let _client =
        std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let _server = listener.accept().expect("accept");
    for (env, ports, says) in [(&busy, &port, "connected"), (&idle, &port, "idle")] {
        // The idle one is watched on another port, where nobody is.
        let ports = if env == &idle { "1" } else { ports.as_str() };
        let dir = root.join(env.as_str());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let user_data = crate::user_data(&ec2, &instance(env)).await;
        let out = watch_clients(&user_data, &dir, &instance(env), ports);
        assert!(out.contains(&format!("aws-runner-idle: {says}")), "{out}");
        // A second look with nothing changed writes nothing.
        let again = watch_clients(&user_data, &dir, &instance(env), ports);
        assert!(!again.contains("aws-runner-idle:"), "{again}");
    }

    world
        .wait_for(
            "the idle environment STOPPED for want of a client",
            Duration::from_secs(90),
            |envs| {
                status_of(envs, &idle).is_some_and(|s| {
                    s.phase == Phase::Stopped as i32
                        && s.stop_reason == pb::StopReason::DisconnectedTimeout as i32
                        && s.runner_ack.as_ref().is_some_and(|a| a.spec_version == 2)
                })
            },
        )
        .await;
    let envs = list(&world).await;
    let spec = |id: &str| {
        envs.iter()
            .find(|e| e.environment.as_ref().is_some_and(|x| x.id == id))
            .and_then(|e| e.environment.as_ref()?.spec.clone())
            .expect("spec")
    };
    // The control plane took the stop as the runner's: STOPPED is desired.
    assert_eq!(
        (spec(&idle).desired_phase, spec(&idle).spec_version),
        (Phase::Stopped as i32, 2)
    );
    let busy_status = status_of(&envs, &busy).expect("status");
    assert_eq!(busy_status.phase, Phase::Running as i32, "{busy_status:?}");
    assert_eq!(spec(&busy).spec_version, 1);
    assert!(
        runner
            .logged(
                &["stopping the environment: no client connected"],
                Duration::from_secs(1)
            )
            .await
    );
    let states: Vec<(String, String)> = world
        .instances()
        .await
        .into_iter()
        .map(|(e, _, _, state)| (e, state))
        .collect();
    assert!(
        states.contains(&(idle.clone(), "stopped".into()))
            && states.contains(&(busy.clone(), "running".into())),
        "{states:?}"
    );
    assert_eq!(runner.stop().await, Some(0));
    std::fs::remove_dir_all(&root).expect("clean up");
}
