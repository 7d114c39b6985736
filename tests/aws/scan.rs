//! The planted-secret scan: the real `runnerd` binary on moto, logging at
//! trace level, checks out with a PAT and with an OAuth token; then every
//! secret it held is searched for, in every form it could take (raw, HTTP
//! header, base64, hex), in its logs (stdout and stderr), every DynamoDB
//! item of its table, every instance's user data, the tags of instances,
//! volumes and secrets, and its process arguments and environment. Nothing
//! is found; and the scan does find each value planted in those places.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use runner_core::scm::{self, AuthSource, Purpose, ScmKind};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase};
use secrecy::ExposeSecret as _;
use testkit::scm::FakeScm;

use crate::daemon::{World, settled};
use crate::moto_url;
use crate::repository::add_pat;

/// runnerd with its stdout and stderr in files; killed when dropped.
struct Traced {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Traced {
    fn start(world: &World, extra: &[(&str, String)]) -> Self {
        let bin = std::env::var_os("RUNNERD_BIN").map_or_else(
            || {
                let exe = std::env::current_exe().expect("test binary path");
                exe.parent()
                    .and_then(|deps| deps.parent())
                    .expect("target dir")
                    .join("runnerd")
            },
            PathBuf::from,
        );
        assert!(bin.exists(), "{} is missing: build runnerd", bin.display());
        let base = std::env::temp_dir().join(format!("runnerd-scan-{}", world.infra.runner_id));
        let stdout = base.with_extension("out");
        let stderr = base.with_extension("err");
        let child = Command::new(bin)
            .env_clear()
            .envs(world.env())
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUNNER_LOG", "trace")
            .env("RUNNER_LOG_FORMAT", "json")
            .env("AWS_ENDPOINT_URL", moto_url())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start runnerd");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    async fn stop(&mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "runnerd ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// A secret in one of its forms, named without its value.
struct Needle {
    name: String,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Needles(Vec<Needle>);

impl Needles {
    fn add(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let bytes = value.as_ref().to_vec();
        assert!(bytes.len() >= 16, "{name} is too short to search for");
        self.0.push(Needle {
            name: name.to_owned(),
            bytes,
        });
    }

    /// A token as itself and as every Authorization header the runner may
    /// build from it (and the header's credential alone).
    fn token(&mut self, name: &str, kind: ScmKind, source: AuthSource, token: &str) {
        self.add(name, token);
        for (purpose, label) in [(Purpose::Git, "git"), (Purpose::Api, "api")] {
            let header = scm::authorization(kind, source, token, purpose);
            self.add(&format!("{name} ({label} header)"), &header);
            if let Some((_, credential)) = header.split_once(' ')
                && credential != token
            {
                self.add(&format!("{name} ({label} header credential)"), credential);
            }
        }
    }

    /// Bytes as themselves, base64 (both alphabets) and hex.
    fn key(&mut self, name: &str, bytes: &[u8]) {
        self.add(&format!("{name} (raw)"), bytes);
        self.add(&format!("{name} (base64)"), STANDARD.encode(bytes));
        self.add(
            &format!("{name} (base64url)"),
            URL_SAFE_NO_PAD.encode(bytes),
        );
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.add(&format!("{name} (hex)"), hex);
    }

    /// "`needle` in `source`" for every needle found in a source.
    fn find(&self, sources: &[(String, Vec<u8>)]) -> Vec<String> {
        let mut found = Vec::new();
        for (source, haystack) in sources {
            for needle in &self.0 {
                if haystack
                    .windows(needle.bytes.len())
                    .any(|w| w == needle.bytes.as_slice())
                {
                    found.push(format!("{} in {source}", needle.name));
                }
            }
        }
        found
    }
}

fn attribute_bytes(value: &AttributeValue, out: &mut Vec<u8>) {
    match value {
        AttributeValue::S(s) | AttributeValue::N(s) => out.extend_from_slice(s.as_bytes()),
        AttributeValue::B(b) => out.extend_from_slice(b.as_ref()),
        AttributeValue::Ss(v) | AttributeValue::Ns(v) => {
            for s in v {
                out.extend_from_slice(s.as_bytes());
                out.push(b'\n');
            }
        }
        AttributeValue::Bs(v) => {
            for b in v {
                out.extend_from_slice(b.as_ref());
                out.push(b'\n');
            }
        }
        AttributeValue::M(m) => {
            for (k, v) in m {
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                attribute_bytes(v, out);
                out.push(b'\n');
            }
        }
        AttributeValue::L(l) => {
            for v in l {
                attribute_bytes(v, out);
                out.push(b'\n');
            }
        }
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
}

/// Every item of the table (all pages), attribute by attribute, binary
/// values as their bytes.
async fn dynamodb(world: &World) -> (usize, Vec<u8>) {
    let client = aws_sdk_dynamodb::Client::new(&world.sdk);
    let (mut items, mut out) = (0, Vec::new());
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(&world.infra.table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan (test inspection only)");
        for item in page.items() {
            items += 1;
            for (name, value) in item {
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                attribute_bytes(value, &mut out);
                out.push(b'\n');
            }
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return (items, out);
        }
    }
}

/// What the scan reads on AWS: the table, every instance of the runner
/// (user data and tags), the tags of its volumes and of its secrets (secret
/// names and descriptions too, never their values).
struct Aws {
    items: usize,
    instances: usize,
    volumes: usize,
    secrets: usize,
    sources: Vec<(String, Vec<u8>)>,
}

async fn aws(world: &World) -> Aws {
    let (items, table) = dynamodb(world).await;
    let mut sources = vec![("DynamoDB".to_owned(), table)];
    let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
    let instance_ids: Vec<String> = world
        .instances()
        .await
        .into_iter()
        .map(|(_, id, _, _)| id)
        .collect();
    let instances = instance_ids.len();
    for instance_id in &instance_ids {
        let user_data = crate::user_data(&ec2, instance_id).await;
        sources.push((
            format!("user data of {instance_id}"),
            user_data.into_bytes(),
        ));
    }
    let described: Vec<_> = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", runner_aws::ec2::TAG_RUNNER))
                .values(&world.infra.runner_id)
                .build(),
        )
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await;
    let mut tags = String::new();
    for page in described {
        for reservation in page.expect("describe instances").reservations() {
            for i in reservation.instances() {
                tags.push_str(&format!("{:?}\n", i.tags()));
            }
        }
    }
    sources.push(("instance tags".to_owned(), tags.into_bytes()));
    let volume_pages: Vec<_> = ec2
        .describe_volumes()
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await;
    let (mut tags, mut volumes) = (String::new(), 0);
    for page in volume_pages {
        for volume in page.expect("describe volumes").volumes() {
            // This runner's volumes: the emulator also holds other tests'.
            let ours = volume.tags().iter().any(|t| {
                t.key() == Some(runner_aws::ec2::TAG_RUNNER)
                    && t.value() == Some(world.infra.runner_id.as_str())
            }) || volume.attachments().iter().any(|a| {
                a.instance_id()
                    .is_some_and(|id| instance_ids.iter().any(|i| i == id))
            });
            if ours {
                volumes += 1;
                tags.push_str(&format!("{:?}\n", volume.tags()));
            }
        }
    }
    sources.push(("volume tags".to_owned(), tags.into_bytes()));
    let listed: Vec<_> = aws_sdk_secretsmanager::Client::new(&world.sdk)
        .list_secrets()
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await;
    let (mut text, mut secrets) = (String::new(), 0);
    let prefix = format!("aws-runner/{}/", world.infra.runner_id);
    for page in listed {
        for secret in page.expect("list secrets").secret_list() {
            // This runner's secrets: the emulator also holds other tests'.
            let name = secret.name().unwrap_or_default();
            if !name.starts_with(&prefix) && name != world.infra.secret_id {
                continue;
            }
            secrets += 1;
            text.push_str(&format!(
                "{:?} {:?} {:?}\n",
                secret.name(),
                secret.description(),
                secret.tags()
            ));
        }
    }
    sources.push((
        "secret names, descriptions and tags".to_owned(),
        text.into_bytes(),
    ));
    Aws {
        items,
        instances,
        volumes,
        secrets,
        sources,
    }
}

/// Exchanges `code` for `principal`'s OAuth token through the runner.
async fn exchange(world: &World, principal: &str, host: &str, code: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outcome = world
            .admin
            .clone()
            .call_runner(admin::CallRunnerRequest {
                runner_id: world.infra.runner_id.clone(),
                request: Some(pb::RunnerRequest {
                    request_id: String::new(),
                    kind: Some(pb::runner_request::Kind::ExchangeOauthCode(
                        pb::ExchangeOauthCode {
                            principal: principal.into(),
                            host: host.into(),
                            code: code.into(),
                            redirect_uri: "https://cp.example.com/oauth/callback".into(),
                            code_verifier: String::new(),
                        },
                    )),
                }),
                timeout_ms: 20_000,
            })
            .await;
        match outcome.map(|r| r.into_inner().outcome) {
            Ok(Some(admin::call_runner_response::Outcome::Result(_))) => return,
            // No stream yet, or the integration not listed yet.
            Ok(Some(admin::call_runner_response::Outcome::Error(e)))
                if e.message.contains("no SCM integration") => {}
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                ) => {}
            other => panic!("exchange the code: {other:?}"),
        }
        assert!(Instant::now() < deadline, "the runner never took the code");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_environment(world: &World, creator: &str, host: &str) -> String {
    world
        .admin
        .clone()
        .create_environment(admin::CreateEnvironmentRequest {
            runner_id: world.infra.runner_id.clone(),
            environment_class_id: world.class_id.clone(),
            content: Some(pb::EnvironmentContent {
                repository_url: format!("https://{host}/acme/api.git"),
                revision: Some(pb::environment_content::Revision::Branch("main".into())),
            }),
            creator: creator.into(),
            name: String::new(),
            timeout: None,
            unchecked: false,
        })
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment")
        .id
}

fn logs(traced: &Traced) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "runnerd's stdout".to_owned(),
            std::fs::read(&traced.stdout).expect("stdout"),
        ),
        (
            "runnerd's stderr".to_owned(),
            std::fs::read(&traced.stderr).expect("stderr"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_the_runner_holds_is_in_its_logs_table_user_data_tags_or_process() {
    let fake = FakeScm::start().await;
    let host = fake.host();
    let ca = std::env::temp_dir().join(format!("fake-scm-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca, fake.ca_pem()).expect("CA");
    let pat = "glpat-scanR7t2Vw9Xy4Za6";
    let (client_id, client_secret) = ("scan-app", "gloas-scanClientSecretQ3m8");
    let code = "code-scan-Hq5n2Lp8Wd";
    fake.add_token(ScmKind::GitLab, AuthSource::Pat, pat, "alice-gl");
    fake.add_oauth_app(ScmKind::GitLab, client_id, client_secret);
    fake.add_code(
        ScmKind::GitLab,
        code,
        "bob-gl",
        Some(Duration::from_secs(7200)),
    );

    let world = World::new().await;
    let sm = aws_sdk_secretsmanager::Client::new(&world.sdk);
    let runner_secret = || async {
        sm.get_secret_value()
            .secret_id(&world.infra.secret_id)
            .send()
            .await
            .expect("the runner's secret")
            .secret_string
            .expect("text")
    };
    let exchange_token = runner_secret().await;
    let mut runnerd = Traced::start(&world, &[("RUNNER_CA_BUNDLE", ca.display().to_string())]);

    let sealed_client_secret = control_plane::cli::seal(
        &world.public_key().await,
        control_plane::cli::client_secret_binding(&host),
        client_secret.as_bytes(),
    )
    .expect("seal");
    world
        .admin
        .clone()
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.infra.runner_id.clone(),
            kind: pb::ScmKind::Gitlab as i32,
            host: host.clone(),
            oauth: Some(pb::OAuthApp {
                client_id: client_id.into(),
                sealed_client_secret,
            }),
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration");
    assert_eq!(add_pat(&world, "alice", &host, pat).await, "alice-gl");
    exchange(&world, "bob", &host, code).await;
    let issued = fake.issued_tokens();
    assert!(!issued.is_empty(), "no OAuth token issued");
    // One checkout with the PAT, one with the OAuth token.
    create_environment(&world, "alice", &host).await;
    create_environment(&world, "bob", &host).await;
    world
        .wait_for("RUNNING", Duration::from_secs(60), |envs| {
            envs.len() == 2 && envs.iter().all(|e| settled(e, Phase::Running))
        })
        .await;

    let credentials = runner_aws::secrets::parse(&runner_secret().await).expect("credentials");
    let access_token = credentials.access_token.expect("an access token");
    let private_key = credentials.private_key.expect("a private key");
    let mut needles = Needles::default();
    needles.token("the PAT", ScmKind::GitLab, AuthSource::Pat, pat);
    for (i, token) in issued.iter().enumerate() {
        needles.token(
            &format!("OAuth token {i}"),
            ScmKind::GitLab,
            AuthSource::OAuth,
            token,
        );
    }
    needles.add("the OAuth client secret", client_secret);
    needles.add("the OAuth code", code);
    needles.add("the exchange token", &exchange_token);
    needles.add("the runner's access token", access_token.expose_secret());
    needles.add(
        "the runner's access token (bearer header)",
        format!("Bearer {}", access_token.expose_secret()),
    );
    needles.key("the runner's private key", &private_key.0);

    // The process, while it runs.
    let pid = runnerd.child.id();
    let mut sources = vec![
        (
            "runnerd's arguments".to_owned(),
            std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline"),
        ),
        (
            "runnerd's environment".to_owned(),
            std::fs::read(format!("/proc/{pid}/environ")).expect("environ"),
        ),
    ];
    assert!(
        sources[1].1.windows(10).any(|w| w == b"RUNNER_LOG"),
        "the environment was not read"
    );
    assert_eq!(runnerd.stop().await, Some(0), "a clean stop");

    let logged = logs(&runnerd);
    let traced_lines = String::from_utf8_lossy(&logged[0].1)
        .lines()
        .filter(|l| l.contains("\"level\":\"TRACE\""))
        .count();
    assert!(traced_lines > 0, "no trace-level line was logged");
    let found = aws(&world).await;
    assert!(found.items >= 4, "{} items", found.items);
    assert_eq!(found.instances, 2, "instances");
    assert!(found.volumes >= 2, "{} volumes", found.volumes);
    assert!(found.secrets >= 3, "{} secrets", found.secrets);
    println!(
        "scanning for {} forms of secrets: {} + {} bytes of logs ({traced_lines} trace lines), \
         {} items, {} instances, {} volumes, {} secrets",
        needles.0.len(),
        logged[0].1.len(),
        logged[1].1.len(),
        found.items,
        found.instances,
        found.volumes,
        found.secrets
    );
    sources.extend(logged);
    sources.extend(found.sources);
    let leaks = needles.find(&sources);
    assert!(leaks.is_empty(), "secrets found: {leaks:#?}");

    // The scan finds what is planted in each place it reads.
    let planted_line = format!(
        "{{\"level\":\"TRACE\",\"fields\":{{\"message\":\"planted {}\"}}}}\n",
        STANDARD.encode(private_key.0)
    );
    {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&runnerd.stderr)
            .expect("stderr")
            .write_all(planted_line.as_bytes())
            .expect("plant a log line");
    }
    aws_sdk_dynamodb::Client::new(&world.sdk)
        .put_item()
        .table_name(&world.infra.table)
        .item("pk", AttributeValue::S("PLANTED".into()))
        .item("sk", AttributeValue::S("PLANTED".into()))
        .item(
            "blob",
            AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(
                access_token.expose_secret().as_bytes(),
            )),
        )
        .send()
        .await
        .expect("plant an item");
    let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
    let volume = ec2
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", runner_aws::ec2::TAG_RUNNER))
                .values(&world.infra.runner_id)
                .build(),
        )
        .send()
        .await
        .expect("volumes")
        .volumes()
        .first()
        .and_then(|v| v.volume_id())
        .expect("a volume")
        .to_owned();
    ec2.create_tags()
        .resources(&volume)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("planted")
                .value(scm::authorization(
                    ScmKind::GitLab,
                    AuthSource::Pat,
                    pat,
                    Purpose::Api,
                ))
                .build(),
        )
        .send()
        .await
        .expect("plant a volume tag");
    let (_, instance, _, _) = world.instances().await.remove(0);
    ec2.create_tags()
        .resources(&instance)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("planted")
                .value(&exchange_token)
                .build(),
        )
        .send()
        .await
        .expect("plant an instance tag");
    let secret = format!("aws-runner/{}/environments/", world.infra.runner_id);
    let listed = sm.list_secrets().send().await.expect("list");
    let env_secret = listed
        .secret_list()
        .iter()
        .filter_map(|s| s.name())
        .find(|n| n.starts_with(&secret))
        .expect("an environment secret")
        .to_owned();
    sm.tag_resource()
        .secret_id(&env_secret)
        .tags(
            aws_sdk_secretsmanager::types::Tag::builder()
                .key("planted")
                .value(client_secret)
                .build(),
        )
        .send()
        .await
        .expect("plant a secret tag");
    // An instance of the runner whose user data holds an OAuth token.
    ec2.run_instances()
        .image_id(&world.infra.ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
        .min_count(1)
        .max_count(1)
        .subnet_id(&world.infra.subnets[0].0)
        .user_data(STANDARD.encode(format!("#!/bin/bash\ntoken={}\n", issued[0])))
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(runner_aws::ec2::TAG_RUNNER)
                        .value(&world.infra.runner_id)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("plant user data");

    let mut sources = logs(&runnerd);
    sources.extend(aws(&world).await.sources);
    let found = needles.find(&sources);
    for expected in [
        "the runner's private key (base64) in runnerd's stderr".to_owned(),
        "the runner's access token in DynamoDB".to_owned(),
        "the PAT (api header) in volume tags".to_owned(),
        "the PAT in volume tags".to_owned(),
        "the exchange token in instance tags".to_owned(),
        "the OAuth client secret in secret names, descriptions and tags".to_owned(),
    ] {
        assert!(found.contains(&expected), "missed {expected:?}: {found:#?}");
    }
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("OAuth token 0 in user data of ")),
        "missed the planted user data: {found:#?}"
    );
    let _ = std::fs::remove_file(ca);
}
