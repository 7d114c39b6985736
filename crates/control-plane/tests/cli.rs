//! `runnerctl` end to end: the real `runnerctl serve` process, driven by the
//! real `runnerctl` commands with `--json`, and a runner played in-process.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Stdio};

use runner_proto::pb::{self, runner_request::Kind, runner_result};
use serde_json::Value;
use tokio_stream::StreamExt as _;

const BIN: &str = env!("CARGO_BIN_EXE_runnerctl");

/// A `runnerctl serve` process on a free loopback port, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .env("RUNNERCTL_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start runnerctl serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve printed its address")
                .expect("read stderr");
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().expect("address").to_owned();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Value, String> {
        runnerctl(&self.url, args, stdin)
    }

    fn ok(&self, args: &[&str]) -> Value {
        self.run(args, None)
            .unwrap_or_else(|err| panic!("runnerctl {args:?} failed: {err}"))
    }
}

/// Runs `runnerctl --json <args>` against `url`, feeding `stdin`; returns the
/// printed JSON, or standard error on failure.
fn runnerctl(url: &str, args: &[&str], stdin: Option<&str>) -> Result<Value, String> {
    let mut child = Command::new(BIN)
        .arg("--json")
        .args(args)
        .env("RUNNERCTL_CONTROL_PLANE", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run runnerctl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("runnerctl finished");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("runnerctl --json prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("{v} is not a string"))
}

#[test]
fn every_command_documents_itself() {
    let help = Command::new(BIN).arg("--help").output().expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    for command in [
        "serve", "runner", "class", "env", "scm", "token", "call", "release",
    ] {
        assert!(text.contains(command), "--help lacks {command}");
        let sub = Command::new(BIN)
            .args([command, "--help"])
            .output()
            .expect("sub help");
        assert!(sub.status.success(), "{command} --help failed");
        assert!(String::from_utf8_lossy(&sub.stdout).contains("Usage: runnerctl"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runner_class_and_environment_flow() {
    let server = Server::start();
    let runner = server.ok(&[
        "runner",
        "create",
        "--name",
        "demo",
        "--region",
        "eu-west-1",
    ]);
    let runner_id = s(&runner["id"]).to_owned();
    assert_eq!(runner["phase"], "CREATED");
    assert_eq!(runner["region"], "eu-west-1");
    assert!(s(&runner["exchange_token"]).starts_with("ret_"));
    assert!(s(&runner["quick_create_url"]).contains(&format!("param_RunnerId={runner_id}")));

    let class = server.ok(&[
        "class",
        "create",
        "--runner",
        &runner_id,
        "--name",
        "Small",
        "--instance-type",
        "m7i.large",
        "--disk-gib",
        "50",
    ]);
    let class_id = s(&class["id"]).to_owned();
    assert_eq!(class["enabled"], true);

    let env = server.ok(&[
        "env",
        "create",
        "--runner",
        &runner_id,
        "--class",
        &class_id,
        "--repo",
        "https://github.com/acme/api.git",
        "--branch",
        "main",
    ]);
    let env_id = s(&env["id"]).to_owned();
    assert_eq!(
        (env["desired_phase"].clone(), env["spec_version"].clone()),
        ("RUNNING".into(), 1.into())
    );
    assert_eq!(env["branch"], "main");
    assert_eq!(env["status"], Value::Null);

    let stopped = server.ok(&["env", "stop", &env_id]);
    assert_eq!(
        (
            stopped["desired_phase"].clone(),
            stopped["spec_version"].clone()
        ),
        ("STOPPED".into(), 2.into())
    );
    let started = server.ok(&["env", "start", &env_id]);
    assert_eq!(started["desired_phase"], "RUNNING");
    let deleted = server.ok(&["env", "delete", &env_id]);
    assert_eq!(
        (
            deleted["desired_phase"].clone(),
            deleted["spec_version"].clone()
        ),
        ("DELETED".into(), 4.into())
    );
    let got = server.ok(&["env", "get", &env_id]);
    assert_eq!(got["desired_phase"], "DELETED");
    let listed = server.ok(&["env", "list", "--runner", &runner_id]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    let disabled = server.ok(&["class", "disable", &class_id]);
    assert_eq!(disabled["enabled"], false);
    let refused = server
        .run(
            &[
                "env",
                "create",
                "--runner",
                &runner_id,
                "--class",
                &class_id,
                "--repo",
                "https://github.com/acme/api.git",
            ],
            None,
        )
        .expect_err("a disabled class is refused");
    assert!(
        refused.contains("FailedPrecondition") && refused.contains("disabled"),
        "{refused}"
    );

    let bad = server
        .run(
            &[
                "class",
                "create",
                "--runner",
                &runner_id,
                "--name",
                "Huge",
                "--instance-type",
                "m7i.large",
                "--disk-gib",
                "99999",
            ],
            None,
        )
        .expect_err("disk out of range");
    assert!(bad.contains("disk_gib"), "{bad}");

    let runners = server.ok(&["runner", "list"]);
    assert_eq!(runners[0]["id"], runner_id.as_str());
    assert_eq!(
        server.ok(&["runner", "get", &runner_id])["phase"],
        "CREATED"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_add_seals_the_pat_to_the_runner_key() {
    let server = Server::start();
    let created = server.ok(&["runner", "create", "--name", "tok", "--region", "eu-west-1"]);
    let runner_id = s(&created["id"]).to_owned();

    // Play the runner: exchange, sign up, and answer store_host_token.
    let (mut client, key) = signed_up(&server, &created).await;
    let mut stream = client
        .watch_requests(pb::WatchRequestsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let answering = tokio::spawn(async move {
        let mut opened = Vec::new();
        while let Some(Ok(request)) = stream.next().await {
            if let Some(Kind::StoreHostToken(store)) = request.kind {
                let pat = runner_core::sealed::open(
                    &key,
                    &store.sealed_token,
                    control_plane::cli::pat_binding(&store.principal, &store.host),
                )
                .expect("sealed to this runner, for this principal and host");
                opened.push(
                    secrecy::ExposeSecret::expose_secret(&pat)
                        .as_bytes()
                        .to_vec(),
                );
                client
                    .send_response(pb::SendResponseRequest {
                        request_id: request.request_id,
                        outcome: Some(pb::send_response_request::Outcome::Result(
                            pb::RunnerResult {
                                kind: Some(runner_result::Kind::StoreHostToken(
                                    pb::StoreHostTokenResult {
                                        username: "alice-gh".into(),
                                    },
                                )),
                            },
                        )),
                    })
                    .await
                    .expect("answer");
                return opened;
            }
        }
        opened
    });

    let integration = server.ok(&[
        "scm",
        "create",
        "--runner",
        &runner_id,
        "--kind",
        "github",
        "--host",
        "github.com",
        "--pat",
    ]);
    assert_eq!(integration["kind"], "GITHUB");
    assert_eq!(integration["pat_enabled"], true);

    let token = tokio::task::spawn_blocking({
        let url = server.url.clone();
        let runner_id = runner_id.clone();
        move || {
            runnerctl(
                &url,
                &[
                    "token",
                    "add",
                    "--runner",
                    &runner_id,
                    "--principal",
                    "alice",
                    "--host",
                    "github.com",
                    "--pat-stdin",
                ],
                Some("ghp_cli_secret\n"),
            )
        }
    })
    .await
    .expect("join")
    .expect("token add");
    assert_eq!(token["username"], "alice-gh");
    assert_eq!(token["principal"], "alice");
    let opened = answering.await.expect("runner task");
    assert_eq!(
        opened,
        vec![b"ghp_cli_secret".to_vec()],
        "the runner opened exactly the PAT, newline trimmed, bound to alice on github.com"
    );

    let tokens = server.ok(&["token", "list", "--runner", &runner_id]);
    assert_eq!(tokens[0]["host"], "github.com");
    assert!(!tokens.to_string().contains("ghp_cli_secret"));
}

/// Plays the runner `created` (what `runner create` printed): trades its
/// exchange token and signs up with a new key; its client and key.
async fn signed_up(
    server: &Server,
    created: &Value,
) -> (
    pb::runner_service_client::RunnerServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor + use<>,
        >,
    >,
    crypto_box::SecretKey,
) {
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let access = pb::identity_service_client::IdentityServiceClient::new(channel.clone())
        .exchange_token(pb::ExchangeTokenRequest {
            public_key: Vec::new(),
            exchange_token: s(&created["exchange_token"]).to_owned(),
        })
        .await
        .expect("exchange")
        .into_inner()
        .access_token;
    let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let mut client = testkit_like_client(channel, &access);
    client
        .signup(pb::SignupRequest {
            public_key: key.public_key().as_bytes().to_vec(),
            version: "0.1.0".into(),
            region: "eu-west-1".into(),
            ..Default::default()
        })
        .await
        .expect("signup");
    (client, key)
}

fn testkit_like_client(
    channel: tonic::transport::Channel,
    token: &str,
) -> pb::runner_service_client::RunnerServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor + use<>,
    >,
> {
    let value: tonic::metadata::MetadataValue<_> =
        format!("Bearer {token}").parse().expect("ascii");
    pb::runner_service_client::RunnerServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", value.clone());
            Ok(req)
        },
    )
}

#[tokio::test]
async fn env_get_shows_the_content_its_timings_and_why_the_runner_stopped_it() {
    let server = Server::start();
    let created = server.ok(&["runner", "create", "--name", "st", "--region", "eu-west-1"]);
    let runner_id = s(&created["id"]).to_owned();
    let class = server.ok(&[
        "class",
        "create",
        "--runner",
        &runner_id,
        "--name",
        "Small",
        "--instance-type",
        "m7i.large",
        "--disk-gib",
        "50",
    ]);
    let env = server.ok(&[
        "env",
        "create",
        "--runner",
        &runner_id,
        "--class",
        s(&class["id"]),
        "--repo",
        "https://github.com/acme/api.git",
    ]);
    let env_id = s(&env["id"]).to_owned();

    // Play the runner: exchange, sign up, report.
    let (mut client, _key) = signed_up(&server, &created).await;
    let seconds = |s: i64| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };
    let status = |version: u64, phase: pb::EnvironmentPhase| pb::EnvironmentStatus {
        status_version: version,
        runner_ack: Some(pb::RunnerAck {
            spec_version: 1,
            code: pb::RunnerAckCode::Ok as i32,
            message: String::new(),
        }),
        phase: phase as i32,
        content_stage: pb::ContentStage::Ready as i32,
        content_commit: "0123456789abcdef0123456789abcdef01234567".into(),
        content_ready_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        start_timings: Some(pb::StartTimings {
            launch_to_running: seconds(40),
            running_to_content_ready: seconds(25),
            launch_to_content_ready: seconds(65),
        }),
        ..Default::default()
    };
    client
        .update_environment_status(pb::UpdateEnvironmentStatusRequest {
            environment_id: env_id.clone(),
            status: Some(status(1, pb::EnvironmentPhase::Running)),
        })
        .await
        .expect("a ready status");
    let got = server.ok(&["env", "get", &env_id]);
    let shown = &got["status"];
    assert_eq!(shown["phase"], "RUNNING");
    assert_eq!(shown["content_stage"], "READY");
    assert_eq!(
        shown["content_commit"],
        "0123456789abcdef0123456789abcdef01234567"
    );
    assert_eq!(shown["content_ready_at"], "2023-11-14T22:13:20Z");
    assert_eq!(
        (
            shown["launch_to_running"].clone(),
            shown["running_to_content_ready"].clone(),
            shown["launch_to_content_ready"].clone()
        ),
        ("40s".into(), "25s".into(), "1m 5s".into())
    );
    assert_eq!(shown["stop_reason"], "UNSPECIFIED");

    let mut idle = status(2, pb::EnvironmentPhase::Stopping);
    idle.stop_reason = pb::StopReason::DisconnectedTimeout as i32;
    client
        .update_environment_status(pb::UpdateEnvironmentStatusRequest {
            environment_id: env_id.clone(),
            status: Some(idle),
        })
        .await
        .expect("stopped for want of a client");
    let got = server.ok(&["env", "get", &env_id]);
    assert_eq!(got["status"]["stop_reason"], "DISCONNECTED_TIMEOUT");
    assert_eq!(
        (got["desired_phase"].clone(), got["spec_version"].clone()),
        ("STOPPED".into(), 2.into())
    );
}
