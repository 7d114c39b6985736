//! The peers a benchmark runs against: a fresh moto on 127.0.0.1, the AWS
//! resources a runner needs in it, the reference control plane in-process
//! with a runner and a class, and `runnerd` processes.
//!
//! Every process started here is killed when its handle is dropped, so an
//! error anywhere leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use control_plane::{ServerConfig, Settings, SystemClock};
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

pub(crate) const REGION: &str = "eu-west-1";
pub(crate) const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];
pub(crate) const INSTANCE_PROFILE: &str = "aws-runner-environment";
pub(crate) const INSTANCE_TYPE: &str = "m5.large";
pub(crate) const DISK_GIB: u32 = 30;
pub(crate) const REPOSITORY: &str = "https://github.com/acme/api.git";

/// Where the benchmark finds its tools and puts its logs.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) moto_server: PathBuf,
    pub(crate) runnerd: PathBuf,
    pub(crate) work_dir: PathBuf,
    /// Extra environment for every runnerd started (after the figure's own).
    pub(crate) runnerd_env: Vec<(String, String)>,
}

fn free_port(range: std::ops::Range<u16>) -> anyhow::Result<u16> {
    range
        .into_iter()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .context("no free port in the benchmark's range")
}

/// Sends `signal` (`-TERM`, `-KILL`) to `pid`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child.
fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child.id(), "-TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A moto server of its own.
#[derive(Debug)]
pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
}

impl Moto {
    /// Starts a fresh one on a free port in 5100..5150 and waits until it answers.
    pub(crate) async fn start(tools: &Tools) -> anyhow::Result<Self> {
        let port = free_port(5100..5150)?;
        let log = std::fs::File::create(tools.work_dir.join(format!("moto-{port}.log")))?;
        let child = Command::new(&tools.moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", tools.moto_server.display()))?;
        let moto = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(port, "/moto-api/")
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                bail!("moto did not answer on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// A minimal HTTP/1.0 GET on 127.0.0.1: (status, body).
pub(crate) async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .context("no answer within 5 s")?
}

/// An SDK configuration for `endpoint` with test credentials.
pub(crate) async fn sdk(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .load()
        .await
}

/// A runner's AWS resources, as `tests/aws` creates them: a VPC with a
/// subnet per zone, a security group, a table, a secret and a KMS key.
#[derive(Debug, Clone)]
pub(crate) struct Infra {
    pub(crate) vpc_id: String,
    pub(crate) subnets: Vec<(String, String)>,
    pub(crate) security_group_id: String,
    pub(crate) table: String,
    pub(crate) secret_id: String,
    pub(crate) kms_key_id: String,
    /// An image moto knows (runnerd's setup checks look it up).
    pub(crate) ami: String,
}

impl Infra {
    pub(crate) async fn create(sdk: &SdkConfig) -> anyhow::Result<Self> {
        let ec2 = aws_sdk_ec2::Client::new(sdk);
        let vpc_id = ec2
            .create_vpc()
            .cidr_block("10.20.0.0/16")
            .send()
            .await?
            .vpc
            .and_then(|v| v.vpc_id)
            .context("VPC id")?;
        let mut subnets = Vec::new();
        for (i, zone) in ZONES.iter().enumerate() {
            let id = ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(format!("10.20.{}.0/20", i * 16))
                .availability_zone(*zone)
                .send()
                .await?
                .subnet
                .and_then(|s| s.subnet_id)
                .context("subnet id")?;
            subnets.push((id, (*zone).to_owned()));
        }
        let security_group_id = ec2
            .create_security_group()
            .group_name("bench-environments")
            .description("aws-runner benchmark environments")
            .vpc_id(&vpc_id)
            .send()
            .await?
            .group_id
            .context("group id")?;
        let table = "runner-bench".to_owned();
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
        };
        aws_sdk_dynamodb::Client::new(sdk)
            .create_table()
            .table_name(&table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute("pk")?)
            .attribute_definitions(attribute("sk")?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .send()
            .await?;
        // A profile with a role, as the stack makes it.
        let iam = aws_sdk_iam::Client::new(sdk);
        iam.create_instance_profile()
            .instance_profile_name(INSTANCE_PROFILE)
            .send()
            .await?;
        iam.create_role()
            .role_name(INSTANCE_PROFILE)
            .assume_role_policy_document(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
            )
            .send()
            .await?;
        iam.add_role_to_instance_profile()
            .instance_profile_name(INSTANCE_PROFILE)
            .role_name(INSTANCE_PROFILE)
            .send()
            .await?;
        let ami = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await?
            .images()
            .iter()
            .find(|i| i.root_device_name().is_some())
            .and_then(|i| i.image_id())
            .context("moto lists no AMI")?
            .to_owned();
        let secret_id = "runner-bench/credentials".to_owned();
        aws_sdk_secretsmanager::Client::new(sdk)
            .create_secret()
            .name(&secret_id)
            .secret_string("placeholder")
            .send()
            .await?;
        let kms_key_id = aws_sdk_kms::Client::new(sdk)
            .create_key()
            .description("aws-runner benchmark tokens")
            .send()
            .await?
            .key_metadata
            .context("key metadata")?
            .key_id;
        Ok(Self {
            vpc_id,
            subnets,
            security_group_id,
            table,
            secret_id,
            kms_key_id,
            ami,
        })
    }
}

/// moto, the control plane with a runner and a class, and the runner's
/// AWS resources, with the exchange token in the runner's secret.
pub(crate) struct World {
    pub(crate) moto: Moto,
    pub(crate) cp: testkit::ControlPlane,
    pub(crate) admin: AdminServiceClient<Channel>,
    pub(crate) runner_id: String,
    pub(crate) class_id: String,
    pub(crate) infra: Infra,
    /// Direct to moto (set-up and inspection, not counted).
    pub(crate) sdk: SdkConfig,
}

impl World {
    pub(crate) async fn new(tools: &Tools) -> anyhow::Result<Self> {
        let moto = Moto::start(tools).await?;
        let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
        let cp = testkit::ControlPlane::start(ServerConfig::default(), plane).await?;
        let mut admin = AdminServiceClient::new(cp.channel().await?);
        let created = admin
            .create_runner(admin::CreateRunnerRequest {
                name: "bench".into(),
                region: REGION.into(),
            })
            .await?
            .into_inner();
        let runner_id = created.runner.context("runner")?.id;
        let class_id = admin
            .create_environment_class(admin::CreateEnvironmentClassRequest {
                runner_id: runner_id.clone(),
                display_name: "Small".into(),
                instance_type: INSTANCE_TYPE.into(),
                disk_gib: DISK_GIB,
            })
            .await?
            .into_inner()
            .id;
        let sdk = sdk(&moto.url).await;
        let infra = Infra::create(&sdk).await?;
        aws_sdk_secretsmanager::Client::new(&sdk)
            .put_secret_value()
            .secret_id(&infra.secret_id)
            .secret_string(&created.exchange_token)
            .send()
            .await?;
        Ok(Self {
            moto,
            cp,
            admin,
            runner_id,
            class_id,
            infra,
            sdk,
        })
    }

    /// Creates one environment; its id.
    pub(crate) async fn create_env(&self) -> anyhow::Result<String> {
        let env = self
            .admin
            .clone()
            .create_environment(admin::CreateEnvironmentRequest {
                runner_id: self.runner_id.clone(),
                environment_class_id: self.class_id.clone(),
                content: Some(pb::EnvironmentContent {
                    repository_url: REPOSITORY.into(),
                    revision: None,
                }),
                creator: "alice".into(),
                name: String::new(),
                timeout: None,
                unchecked: false,
            })
            .await?
            .into_inner();
        Ok(env.environment.context("environment")?.id)
    }

    pub(crate) async fn set_phase(
        &self,
        id: &str,
        phase: pb::EnvironmentPhase,
    ) -> anyhow::Result<()> {
        self.admin
            .clone()
            .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
                environment_id: id.into(),
                desired_phase: phase as i32,
            })
            .await?;
        Ok(())
    }

    /// Waits until the runner reported `phase` for the environment's current spec.
    pub(crate) async fn wait_phase(
        &self,
        id: &str,
        phase: pb::EnvironmentPhase,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let env = self
                .admin
                .clone()
                .get_environment(admin::GetEnvironmentRequest {
                    environment_id: id.into(),
                })
                .await?
                .into_inner();
            let spec_version = env
                .environment
                .as_ref()
                .and_then(|e| e.spec.as_ref())
                .map_or(0, |s| s.spec_version);
            if env.status.as_ref().is_some_and(|s| {
                s.phase == phase as i32
                    && s.runner_ack
                        .as_ref()
                        .is_some_and(|a| a.spec_version == spec_version)
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "environment {id} did not reach {phase:?} within {within:?}: {:?}",
                    env.status
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many of the runner's environments have `phase` reported for
    /// their current spec.
    pub(crate) async fn count_phase(&self, phase: pb::EnvironmentPhase) -> anyhow::Result<usize> {
        let listed = self
            .admin
            .clone()
            .list_environments(admin::ListEnvironmentsRequest {
                runner_id: self.runner_id.clone(),
            })
            .await?
            .into_inner();
        Ok(listed
            .environments
            .iter()
            .filter(|env| {
                let spec_version = env
                    .environment
                    .as_ref()
                    .and_then(|e| e.spec.as_ref())
                    .map_or(0, |s| s.spec_version);
                env.status.as_ref().is_some_and(|s| {
                    s.phase == phase as i32
                        && s.runner_ack
                            .as_ref()
                            .is_some_and(|a| a.spec_version == spec_version)
                })
            })
            .count())
    }

    /// Waits until `n` environments have `phase` reported (see
    /// [`World::count_phase`]); when the last one was seen.
    pub(crate) async fn wait_all_phase(
        &self,
        n: usize,
        phase: pb::EnvironmentPhase,
        within: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let count = self.count_phase(phase).await?;
            if count >= n {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("{count} of {n} environments reached {phase:?} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `RUNNER_*` settings for a runnerd with AWS behind `endpoint`.
    pub(crate) fn runnerd_env(&self, health_port: u16) -> Vec<(String, String)> {
        let subnets: Vec<&str> = self
            .infra
            .subnets
            .iter()
            .map(|(id, _)| id.as_str())
            .collect();
        [
            ("RUNNER_ID", self.runner_id.clone()),
            ("RUNNER_REGION", REGION.to_owned()),
            ("RUNNER_CONTROL_PLANE_URL", self.cp.url()),
            ("RUNNER_ALLOW_PLAINTEXT", "true".to_owned()),
            ("RUNNER_VPC_ID", self.infra.vpc_id.clone()),
            ("RUNNER_SUBNET_IDS", subnets.join(",")),
            (
                "RUNNER_SECURITY_GROUP_ID",
                self.infra.security_group_id.clone(),
            ),
            ("RUNNER_INSTANCE_PROFILE", INSTANCE_PROFILE.to_owned()),
            ("RUNNER_AMI", self.infra.ami.clone()),
            ("RUNNER_TABLE", self.infra.table.clone()),
            ("RUNNER_SECRET_ID", self.infra.secret_id.clone()),
            ("RUNNER_KMS_KEY_ID", self.infra.kms_key_id.clone()),
            ("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{health_port}")),
            ("RUNNER_LOG_FORMAT", "json".to_owned()),
            ("RUNNER_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts runnerd with AWS at `endpoint` and `extra` settings on top.
    pub(crate) fn runnerd(
        &self,
        tools: &Tools,
        name: &str,
        endpoint: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Runnerd> {
        let port = free_port(5150..5200)?;
        let log = tools.work_dir.join(format!("runnerd-{name}-{port}.log"));
        let started = Instant::now();
        let started_at = SystemTime::now();
        let child = Command::new(&tools.runnerd)
            .env_clear()
            .envs(self.runnerd_env(port))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(tools.runnerd_env.iter().map(|(k, v)| (k, v)))
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", tools.runnerd.display()))?;
        Ok(Runnerd {
            child,
            log,
            port,
            started,
            started_at,
        })
    }
}

/// A runnerd process with its JSON log in a file.
#[derive(Debug)]
pub(crate) struct Runnerd {
    child: Child,
    log: PathBuf,
    /// Its health port.
    pub(crate) port: u16,
    /// When it was spawned.
    pub(crate) started: Instant,
    pub(crate) started_at: SystemTime,
}

impl Runnerd {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/readyz` answers 200; the time since spawn.
    pub(crate) async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + within;
        loop {
            if http_get(self.port, "/readyz")
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(self.started.elapsed());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "runnerd not ready within {within:?}; log {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a log line has `message`; its timestamp.
    pub(crate) async fn wait_log(
        &mut self,
        message: &str,
        within: Duration,
    ) -> anyhow::Result<SystemTime> {
        self.wait_log_after(message, self.started_at, within).await
    }

    /// Waits until a log line stamped after `after` has `message`; its timestamp.
    pub(crate) async fn wait_log_after(
        &mut self,
        message: &str,
        after: SystemTime,
        within: Duration,
    ) -> anyhow::Result<SystemTime> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(at) = log_time(&self.log, message, after) {
                return Ok(at);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("no {message:?} within {within:?} in {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many log lines stamped after `after` have `message`.
    pub(crate) fn log_count(&self, message: &str, after: SystemTime) -> usize {
        log_lines(&self.log, message, after).len()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("runnerd exited ({status}); log {}", self.log.display());
        }
        Ok(())
    }

    /// A gauge or counter from `/metrics` (summed over its labels).
    pub(crate) async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (_, body) = http_get(self.port, "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Resident memory (`VmRSS`) and its peak (`VmHWM`), in MiB.
    pub(crate) fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<f64> {
            let kib: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} in /proc/{}/status", self.pid()))?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// User plus system CPU time so far.
    pub(crate) fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (SIGKILL after 30 s).
    pub(crate) fn stop(mut self) {
        stop_child(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Runnerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// CPU time of `pid` from /proc/<pid>/stat (utime + stime).
pub(crate) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields
        .get(11..13)
        .context("stat fields")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The timestamp of the first JSON log line in `path` stamped after `after`
/// whose message is `message`.
fn log_time(path: &Path, message: &str, after: SystemTime) -> Option<SystemTime> {
    log_lines(path, message, after).first().copied()
}

/// The timestamps of the JSON log lines in `path` stamped after `after`
/// whose message is `message`, in file order.
fn log_lines(path: &Path, message: &str, after: SystemTime) -> Vec<SystemTime> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            if value.get("message")?.as_str()? != message {
                return None;
            }
            humantime::parse_rfc3339_weak(value.get("timestamp")?.as_str()?)
                .ok()
                .filter(|at| *at >= after)
        })
        .collect()
}
