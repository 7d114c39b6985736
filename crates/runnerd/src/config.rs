//! Configuration: one clap struct, every flag with a `RUNNER_*` environment
//! variable (set by the stack), validated into [`Config`] before any task
//! starts. A bad value names its flag and exits with code 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use runner_core::leader::LeaseTiming;
use runner_core::orphans::OrphanPolicy;
use runner_core::update::{ImageRepository, UpdateWindow};
use runner_core::validate::{self, AllowedInstanceTypes};

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// The AWS runner daemon.
#[derive(Debug, Parser)]
#[command(
    name = "runnerd",
    version,
    max_term_width = 100,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A one-off command instead of the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The daemon's settings.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// One-off commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe the daemon's readiness (for the ECS container health check):
    /// exit 0 when /readyz answers 200, 1 otherwise.
    Health {
        /// The readiness URL.
        #[arg(
            long,
            env = "RUNNER_HEALTH_URL",
            default_value = "http://127.0.0.1:9090/readyz"
        )]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Check the account setup with the daemon's configuration (the same
    /// RUNNER_* variables) and print one line per check with a fix hint:
    /// exit 0 when every check passes, 1 otherwise.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when standard output is not a terminal, text otherwise.
    Auto,
    /// One JSON object per line (for CloudWatch).
    Json,
    /// Human-readable text.
    Text,
}

/// The daemon's flags.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// This runner's id, from the control plane (stack parameter RunnerId).
    #[arg(long, env = "RUNNER_ID", required = true)]
    pub runner_id: Option<String>,
    /// The AWS region the runner works in; fixed for its life.
    #[arg(long, env = "RUNNER_REGION", required = true)]
    pub region: Option<String>,
    /// The control plane's URL (https://...).
    #[arg(long, env = "RUNNER_CONTROL_PLANE_URL", required = true)]
    pub control_plane_url: Option<String>,
    /// PEM file of CA certificates trusted for the control plane and for SCM
    /// hosts (self-hosted GitLab, GitHub Enterprise, ...), in addition to the
    /// system's roots.
    #[arg(long, env = "RUNNER_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Allow an http:// control-plane URL on a loopback address (local runs).
    #[arg(long, env = "RUNNER_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Comma-separated NAME=IP:PORT pairs: reach these SCM host names at
    /// these addresses instead of what DNS says (as curl's --resolve; TLS
    /// still checks the name).
    #[arg(long, env = "RUNNER_SCM_RESOLVE", value_delimiter = ',')]
    pub scm_resolve: Vec<String>,
    /// The VPC environments are launched into.
    #[arg(long, env = "RUNNER_VPC_ID", required = true)]
    pub vpc_id: Option<String>,
    /// Comma-separated subnet ids environments are spread across.
    #[arg(
        long,
        env = "RUNNER_SUBNET_IDS",
        required = true,
        value_delimiter = ','
    )]
    pub subnet_ids: Vec<String>,
    /// The environments' security group.
    #[arg(long, env = "RUNNER_SECURITY_GROUP_ID", required = true)]
    pub security_group_id: Option<String>,
    /// The environments' instance profile (name or ARN).
    #[arg(long, env = "RUNNER_INSTANCE_PROFILE", required = true)]
    pub instance_profile: Option<String>,
    /// The environments' AMI: an id (ami-...) or resolve:ssm:<parameter>.
    #[arg(long, env = "RUNNER_AMI", required = true)]
    pub ami: Option<String>,
    /// Comma-separated instance types environment classes may use (the
    /// stack's AllowedInstanceTypes); a class with another type is refused.
    /// Unset: any type.
    #[arg(long, env = "RUNNER_ALLOWED_INSTANCE_TYPES", value_delimiter = ',')]
    pub allowed_instance_types: Vec<String>,
    /// The DynamoDB table holding the runner's state.
    #[arg(long, env = "RUNNER_TABLE", required = true)]
    pub table: Option<String>,
    /// The Secrets Manager secret holding the runner's credentials.
    #[arg(long, env = "RUNNER_SECRET_ID", required = true)]
    pub secret_id: Option<String>,
    /// The stack's Secrets Manager secret holding the one-time exchange
    /// token, read only while the runner's secret holds no access token.
    /// Unset: the exchange token is in the runner's secret.
    #[arg(long, env = "RUNNER_EXCHANGE_TOKEN_SECRET_ID")]
    pub exchange_token_secret_id: Option<String>,
    /// The KMS key that encrypts users' tokens.
    #[arg(long, env = "RUNNER_KMS_KEY_ID", required = true)]
    pub kms_key_id: Option<String>,
    /// Most environments reconciled at once.
    #[arg(long, env = "RUNNER_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Sustained EC2 mutating calls per second (start, stop, terminate).
    #[arg(long, env = "RUNNER_EC2_MUTATE_RATE", default_value_t = 5.0)]
    pub ec2_mutate_rate: f64,
    /// Burst of EC2 mutating calls.
    #[arg(long, env = "RUNNER_EC2_MUTATE_BURST", default_value_t = 10)]
    pub ec2_mutate_burst: u32,
    /// Sustained RunInstances calls per second.
    #[arg(long, env = "RUNNER_EC2_LAUNCH_RATE", default_value_t = 2.0)]
    pub ec2_launch_rate: f64,
    /// Burst of RunInstances calls.
    #[arg(long, env = "RUNNER_EC2_LAUNCH_BURST", default_value_t = 5)]
    pub ec2_launch_burst: u32,
    /// Sustained EC2 describe calls per second.
    #[arg(long, env = "RUNNER_EC2_DESCRIBE_RATE", default_value_t = 10.0)]
    pub ec2_describe_rate: f64,
    /// Instances per DescribeInstances page (5 to 1000).
    #[arg(long, env = "RUNNER_EC2_DESCRIBE_PAGE_SIZE", default_value_t = 1000)]
    pub ec2_describe_page_size: i32,
    /// Full resync of every environment (list, observe, reconcile).
    #[arg(long, env = "RUNNER_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// How soon an environment in transition is looked at again.
    #[arg(long, env = "RUNNER_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// How long an environment's instance has, from its launch or start, to
    /// report its content ready (repository checked out) before the
    /// environment is failed with the last stage it reported.
    #[arg(long, env = "RUNNER_CONTENT_DEADLINE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub content_deadline: Duration,
    /// Shortest time between two describes of all instances.
    #[arg(long, env = "RUNNER_OBSERVE_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub observe_interval: Duration,
    /// How long the leader lease lasts without renewal.
    #[arg(long, env = "RUNNER_LEASE_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How often the leader renews its lease (and a standby tries to take it).
    #[arg(long, env = "RUNNER_LEASE_RENEW_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_renew_interval: Duration,
    /// How long an orphan instance stays marked before it is terminated.
    #[arg(long, env = "RUNNER_ORPHAN_GRACE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub orphan_grace: Duration,
    /// Most orphan instances terminated per resync pass.
    #[arg(long, env = "RUNNER_ORPHAN_MAX_PER_PASS", default_value_t = 10)]
    pub orphan_max_per_pass: usize,
    /// How often the state store and compute are checked for health (EC2 only when no EC2 call answered within half the resync interval).
    #[arg(long, env = "RUNNER_HEALTH_CHECK_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,
    /// Time to drain in-flight work after SIGTERM (under ECS's 30 s stop timeout).
    #[arg(long, env = "RUNNER_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Timeout of one control-plane call.
    #[arg(long, env = "RUNNER_CONTROL_PLANE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub control_plane_timeout: Duration,
    /// Longest a watch stream is kept before a clean reconnect (plus jitter).
    #[arg(long, env = "RUNNER_MAX_STREAM_AGE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_stream_age: Duration,
    /// Let the leader move its ECS service to a newer release when the
    /// control plane offers one with auto-update on; false: never.
    #[arg(long, env = "RUNNER_SELF_UPDATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub self_update: bool,
    /// UTC hours in which a self-update may start, START-END (e.g. 22-04; at
    /// least 2 hours; 00-24: any time).
    #[arg(long, env = "RUNNER_UPDATE_WINDOW", default_value = "00-24")]
    pub update_window: String,
    /// How often the leader asks the control plane for the latest release
    /// (plus jitter).
    #[arg(long, env = "RUNNER_UPDATE_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub update_interval: Duration,
    /// The container repository self-update may deploy from, without tag or
    /// digest (e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner):
    /// only <repository>@sha256:<digest> images are deployed. Unset: the
    /// repository of the service's image if that is pinned by digest, else none.
    #[arg(long, env = "RUNNER_IMAGE_REPOSITORY")]
    pub image_repository: Option<String>,
    /// Address of the health and metrics port (/healthz, /readyz, /metrics).
    #[arg(long, env = "RUNNER_HEALTH_LISTEN", default_value = "127.0.0.1:9090")]
    pub health_listen: SocketAddr,
    /// How often key metrics go to standard output as CloudWatch embedded
    /// metric format records (one JSON line each, aggregated over the
    /// interval); 0s: none (/metrics still has them).
    #[arg(long, env = "RUNNER_METRICS_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub metrics_interval: Duration,
    /// Log format.
    #[arg(long, env = "RUNNER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber syntax), e.g. "info,runner_core=debug".
    #[arg(long, env = "RUNNER_LOG", default_value = "info")]
    pub log: String,
}

/// A configuration value that is not acceptable.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag} ({env}): {problem}")]
pub struct ConfigError {
    /// The flag's long name.
    pub flag: &'static str,
    /// Its environment variable.
    pub env: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn bad(flag: &'static str, env: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        problem: problem.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This runner's id.
    pub runner_id: String,
    /// The region.
    pub region: String,
    /// The control plane.
    pub control_plane: ControlPlaneConfig,
    /// SCM host names pinned to addresses.
    pub scm_resolve: Vec<(String, std::net::SocketAddr)>,
    /// Where environments go.
    pub placement: Placement,
    /// The DynamoDB table.
    pub table: String,
    /// The runner's secret.
    pub secret_id: String,
    /// The stack's exchange-token secret, if separate.
    pub exchange_token_secret_id: Option<String>,
    /// The KMS key for users' tokens.
    pub kms_key_id: String,
    /// EC2 call budgets.
    pub rate_limits: RateLimits,
    /// Work and timing.
    pub engine: EngineConfig,
    /// Self-update.
    pub update: UpdateConfig,
    /// The health port.
    pub health_listen: SocketAddr,
    /// How often metrics records are written; zero: never.
    pub metrics_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log: String,
}

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Its URL.
    pub url: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_bundle: Option<Vec<u8>>,
    /// Timeout of one call.
    pub timeout: Duration,
    /// Longest stream age before a clean reconnect.
    pub max_stream_age: Duration,
}

/// Where and how environments are launched.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The VPC.
    pub vpc_id: String,
    /// Subnets, in the order given.
    pub subnet_ids: Vec<String>,
    /// The environments' security group.
    pub security_group_id: String,
    /// The environments' instance profile.
    pub instance_profile: String,
    /// The AMI (id or resolve:ssm: reference).
    pub ami: String,
    /// The instance types environment classes may use.
    pub allowed_instance_types: AllowedInstanceTypes,
}

/// Self-update through ECS.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// Off: never update, only report what is offered.
    pub enabled: bool,
    /// When a deployment may start.
    pub window: UpdateWindow,
    /// How often the latest release is asked for.
    pub interval: Duration,
    /// The only repository images are deployed from; `None`: the service's
    /// image's, when it is pinned by digest.
    pub repository: Option<ImageRepository>,
}

/// EC2 call budgets (token buckets below EC2's own).
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    /// Mutating calls per second.
    pub mutate_rate: f64,
    /// Mutating burst.
    pub mutate_burst: u32,
    /// RunInstances per second.
    pub launch_rate: f64,
    /// RunInstances burst.
    pub launch_burst: u32,
    /// Describes per second.
    pub describe_rate: f64,
    /// Instances per describe page.
    pub describe_page_size: i32,
}

/// Work and timing of the reconcile engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most reconciles at once.
    pub concurrency: usize,
    /// Full resync interval.
    pub resync_interval: Duration,
    /// Poll interval for environments in transition.
    pub poll_interval: Duration,
    /// How long an instance has to report its content ready.
    pub content_deadline: Duration,
    /// Shortest time between describes.
    pub observe_interval: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Dependency health check interval.
    pub health_check_interval: Duration,
    /// Leader lease timing.
    pub lease: LeaseTiming,
    /// Orphan handling.
    pub orphans: OrphanPolicy,
}

fn prefixed_id(
    flag: &'static str,
    env: &'static str,
    value: &str,
    prefix: &str,
) -> Result<String, ConfigError> {
    let ok = value.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    });
    if !ok {
        return Err(bad(flag, env, format!("{value:?} is not a {prefix}... id")));
    }
    Ok(value.to_owned())
}

fn required(
    flag: &'static str,
    env: &'static str,
    value: Option<&String>,
) -> Result<String, ConfigError> {
    match value.map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(bad(flag, env, "is required")),
    }
}

fn positive(
    flag: &'static str,
    env: &'static str,
    value: Duration,
) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(bad(flag, env, "must be longer than zero"));
    }
    Ok(value)
}

fn rate(flag: &'static str, env: &'static str, value: f64) -> Result<f64, ConfigError> {
    if !value.is_finite() || value <= 0.0 || value > 1000.0 {
        return Err(bad(
            flag,
            env,
            format!("{value} is not between 0 and 1000 per second"),
        ));
    }
    Ok(value)
}

impl DaemonArgs {
    /// Validates every value; the first bad one is returned.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let runner_id = required("runner-id", "RUNNER_ID", self.runner_id.as_ref())?;
        validate::uuid("runner_id", &runner_id)
            .map_err(|e| bad("runner-id", "RUNNER_ID", e.problem))?;
        let region = required("region", "RUNNER_REGION", self.region.as_ref())?;
        validate::region("region", &region)
            .map_err(|e| bad("region", "RUNNER_REGION", e.problem))?;

        let url = required(
            "control-plane-url",
            "RUNNER_CONTROL_PLANE_URL",
            self.control_plane_url.as_ref(),
        )?;
        if url.starts_with("http://") {
            if !self.allow_plaintext {
                return Err(bad(
                    "control-plane-url",
                    "RUNNER_CONTROL_PLANE_URL",
                    "must be https:// (plaintext needs --allow-plaintext, on loopback only)",
                ));
            }
            if !validate::is_loopback_url(&url) {
                return Err(bad(
                    "control-plane-url",
                    "RUNNER_CONTROL_PLANE_URL",
                    "plaintext is only allowed to a loopback address",
                ));
            }
        } else if !url.starts_with("https://") {
            return Err(bad(
                "control-plane-url",
                "RUNNER_CONTROL_PLANE_URL",
                "must start with https://",
            ));
        }
        if url.parse::<tonic::transport::Uri>().is_err() {
            return Err(bad(
                "control-plane-url",
                "RUNNER_CONTROL_PLANE_URL",
                "is not a valid URL",
            ));
        }
        let ca_bundle = match &self.ca_bundle {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad(
                        "ca-bundle",
                        "RUNNER_CA_BUNDLE",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(bad(
                        "ca-bundle",
                        "RUNNER_CA_BUNDLE",
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
                Some(pem)
            }
            None => None,
        };

        let scm_resolve = self
            .scm_resolve
            .iter()
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (name, addr) = pair.trim().split_once('=').ok_or_else(|| {
                    bad(
                        "scm-resolve",
                        "RUNNER_SCM_RESOLVE",
                        format!("{pair:?} is not NAME=IP:PORT"),
                    )
                })?;
                validate::host("name", name)
                    .map_err(|e| bad("scm-resolve", "RUNNER_SCM_RESOLVE", e.to_string()))?;
                let addr = addr.parse::<std::net::SocketAddr>().map_err(|_| {
                    bad(
                        "scm-resolve",
                        "RUNNER_SCM_RESOLVE",
                        format!("{addr:?} is not IP:PORT"),
                    )
                })?;
                Ok((name.to_owned(), addr))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;

        let vpc_id = prefixed_id(
            "vpc-id",
            "RUNNER_VPC_ID",
            &required("vpc-id", "RUNNER_VPC_ID", self.vpc_id.as_ref())?,
            "vpc-",
        )?;
        if self.subnet_ids.is_empty() {
            return Err(bad("subnet-ids", "RUNNER_SUBNET_IDS", "is required"));
        }
        let mut subnet_ids = Vec::new();
        for subnet in &self.subnet_ids {
            let subnet = prefixed_id("subnet-ids", "RUNNER_SUBNET_IDS", subnet.trim(), "subnet-")?;
            if subnet_ids.contains(&subnet) {
                return Err(bad(
                    "subnet-ids",
                    "RUNNER_SUBNET_IDS",
                    format!("{subnet} is listed twice"),
                ));
            }
            subnet_ids.push(subnet);
        }
        let security_group_id = prefixed_id(
            "security-group-id",
            "RUNNER_SECURITY_GROUP_ID",
            &required(
                "security-group-id",
                "RUNNER_SECURITY_GROUP_ID",
                self.security_group_id.as_ref(),
            )?,
            "sg-",
        )?;
        let instance_profile = required(
            "instance-profile",
            "RUNNER_INSTANCE_PROFILE",
            self.instance_profile.as_ref(),
        )?;
        let ami = required("ami", "RUNNER_AMI", self.ami.as_ref())?;
        if !ami.starts_with("resolve:ssm:/") {
            prefixed_id("ami", "RUNNER_AMI", &ami, "ami-")?;
        }
        let table = required("table", "RUNNER_TABLE", self.table.as_ref())?;
        if !(3..=255).contains(&table.len())
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(bad(
                "table",
                "RUNNER_TABLE",
                format!("{table:?} is not a DynamoDB table name"),
            ));
        }
        let allowed_instance_types = AllowedInstanceTypes::new(
            "allowed_instance_types",
            self.allowed_instance_types.iter().map(|t| t.trim()),
        )
        .map_err(|e| {
            bad(
                "allowed-instance-types",
                "RUNNER_ALLOWED_INSTANCE_TYPES",
                e.problem,
            )
        })?;
        let secret_id = required("secret-id", "RUNNER_SECRET_ID", self.secret_id.as_ref())?;
        let exchange_token_secret_id = self
            .exchange_token_secret_id
            .as_ref()
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty());
        if exchange_token_secret_id.as_ref() == Some(&secret_id) {
            return Err(bad(
                "exchange-token-secret-id",
                "RUNNER_EXCHANGE_TOKEN_SECRET_ID",
                "must be another secret than --secret-id (unset it to keep the exchange token in that secret)",
            ));
        }
        let kms_key_id = required("kms-key-id", "RUNNER_KMS_KEY_ID", self.kms_key_id.as_ref())?;

        if !(1..=1024).contains(&self.concurrency) {
            return Err(bad(
                "concurrency",
                "RUNNER_CONCURRENCY",
                "must be between 1 and 1024",
            ));
        }
        let rate_limits = RateLimits {
            mutate_rate: rate(
                "ec2-mutate-rate",
                "RUNNER_EC2_MUTATE_RATE",
                self.ec2_mutate_rate,
            )?,
            mutate_burst: self.ec2_mutate_burst.max(1),
            launch_rate: rate(
                "ec2-launch-rate",
                "RUNNER_EC2_LAUNCH_RATE",
                self.ec2_launch_rate,
            )?,
            launch_burst: self.ec2_launch_burst.max(1),
            describe_rate: rate(
                "ec2-describe-rate",
                "RUNNER_EC2_DESCRIBE_RATE",
                self.ec2_describe_rate,
            )?,
            describe_page_size: if (5..=1000).contains(&self.ec2_describe_page_size) {
                self.ec2_describe_page_size
            } else {
                return Err(bad(
                    "ec2-describe-page-size",
                    "RUNNER_EC2_DESCRIBE_PAGE_SIZE",
                    "must be between 5 and 1000",
                ));
            },
        };
        let engine = EngineConfig {
            concurrency: self.concurrency,
            resync_interval: positive(
                "resync-interval",
                "RUNNER_RESYNC_INTERVAL",
                self.resync_interval,
            )?,
            poll_interval: positive("poll-interval", "RUNNER_POLL_INTERVAL", self.poll_interval)?,
            content_deadline: positive(
                "content-deadline",
                "RUNNER_CONTENT_DEADLINE",
                self.content_deadline,
            )?,
            observe_interval: self.observe_interval,
            shutdown_grace: self.shutdown_grace,
            health_check_interval: positive(
                "health-check-interval",
                "RUNNER_HEALTH_CHECK_INTERVAL",
                self.health_check_interval,
            )?,
            lease: LeaseTiming {
                ttl: positive("lease-ttl", "RUNNER_LEASE_TTL", self.lease_ttl)?,
                renew_every: positive(
                    "lease-renew-interval",
                    "RUNNER_LEASE_RENEW_INTERVAL",
                    self.lease_renew_interval,
                )?,
            },
            orphans: OrphanPolicy {
                grace: self.orphan_grace,
                max_per_pass: self.orphan_max_per_pass,
            },
        };
        if engine.lease.renew_every * 2 > engine.lease.ttl {
            return Err(bad(
                "lease-renew-interval",
                "RUNNER_LEASE_RENEW_INTERVAL",
                "must be at most half of --lease-ttl, so that one missed renewal does not lose the lease",
            ));
        }
        if self.shutdown_grace > Duration::from_secs(120) {
            return Err(bad(
                "shutdown-grace",
                "RUNNER_SHUTDOWN_GRACE",
                "must be at most 2m",
            ));
        }
        let update = UpdateConfig {
            enabled: self.self_update,
            window: self
                .update_window
                .parse()
                .map_err(|e: runner_core::update::WindowError| {
                    bad("update-window", "RUNNER_UPDATE_WINDOW", e.to_string())
                })?,
            interval: if (Duration::from_secs(60)..=Duration::from_secs(24 * 3600))
                .contains(&self.update_interval)
            {
                self.update_interval
            } else {
                return Err(bad(
                    "update-interval",
                    "RUNNER_UPDATE_INTERVAL",
                    "must be between 1m and 24h",
                ));
            },
            repository: match self.image_repository.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(name) => Some(name.parse().map_err(
                    |e: runner_core::update::RepositoryError| {
                        bad("image-repository", "RUNNER_IMAGE_REPOSITORY", e.to_string())
                    },
                )?),
            },
        };
        tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| bad("log", "RUNNER_LOG", e.to_string()))?;

        Ok(Config {
            runner_id,
            region,
            scm_resolve,
            control_plane: ControlPlaneConfig {
                url,
                ca_bundle,
                timeout: positive(
                    "control-plane-timeout",
                    "RUNNER_CONTROL_PLANE_TIMEOUT",
                    self.control_plane_timeout,
                )?,
                max_stream_age: positive(
                    "max-stream-age",
                    "RUNNER_MAX_STREAM_AGE",
                    self.max_stream_age,
                )?,
            },
            placement: Placement {
                vpc_id,
                subnet_ids,
                security_group_id,
                instance_profile,
                ami,
                allowed_instance_types,
            },
            table,
            secret_id,
            exchange_token_secret_id,
            kms_key_id,
            rate_limits,
            engine,
            update,
            health_listen: self.health_listen,
            metrics_interval: self.metrics_interval,
            log_format: self.log_format,
            log: self.log.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete command line with `extra` flags replacing or adding to it.
    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut flags: Vec<(String, Option<String>)> = [
            ("--runner-id", "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69"),
            ("--region", "eu-west-1"),
            ("--control-plane-url", "https://cp.example.com"),
            ("--vpc-id", "vpc-0123456789abcdef0"),
            (
                "--subnet-ids",
                "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
            ),
            ("--security-group-id", "sg-0123456789abcdef0"),
            ("--instance-profile", "runner-env"),
            ("--ami", "ami-0123456789abcdef0"),
            ("--table", "runner-state"),
            ("--secret-id", "runner/credentials"),
            ("--kms-key-id", "alias/runner"),
        ]
        .iter()
        .map(|(f, v)| ((*f).to_owned(), Some((*v).to_owned())))
        .collect();
        let mut rest = extra.iter().peekable();
        while let Some(flag) = rest.next() {
            let value = rest
                .next_if(|v| !v.starts_with("--"))
                .map(|v| (*v).to_owned());
            match flags.iter_mut().find(|(f, _)| f == flag) {
                Some(entry) => entry.1 = value,
                None => flags.push(((*flag).to_owned(), value)),
            }
        }
        let mut argv = vec!["runnerd".to_owned()];
        for (flag, value) in flags {
            argv.push(flag);
            argv.extend(value);
        }
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.daemon.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn a_complete_configuration_validates() {
        let config = args(&[]).expect("valid");
        assert_eq!(config.placement.subnet_ids.len(), 2);
        assert_eq!(config.engine.shutdown_grace, Duration::from_secs(25));
        assert_eq!(config.engine.resync_interval, Duration::from_secs(300));
    }

    #[test]
    fn each_bad_value_names_its_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--region", "europe"], "--region (RUNNER_REGION)"),
            (
                &["--runner-id", "abc"],
                "--runner-id (RUNNER_ID): is not a UUID",
            ),
            (&["--vpc-id", "vpc-xyz"], "--vpc-id (RUNNER_VPC_ID)"),
            (
                &[
                    "--subnet-ids",
                    "subnet-0123456789abcdef0,subnet-0123456789abcdef0",
                ],
                "listed twice",
            ),
            (
                &["--subnet-ids", "sub-1"],
                "--subnet-ids (RUNNER_SUBNET_IDS)",
            ),
            (&["--security-group-id", "sg-1"], "--security-group-id"),
            (&["--ami", "ubuntu"], "--ami (RUNNER_AMI)"),
            (&["--table", "x"], "--table (RUNNER_TABLE)"),
            (
                &["--control-plane-url", "http://cp.example.com"],
                "must be https://",
            ),
            (
                &[
                    "--control-plane-url",
                    "http://10.0.0.1:80",
                    "--allow-plaintext",
                ],
                "loopback",
            ),
            (
                &["--control-plane-url", "ftp://x"],
                "must start with https://",
            ),
            (
                &["--ca-bundle", "/nonexistent/ca.pem"],
                "--ca-bundle (RUNNER_CA_BUNDLE): cannot read",
            ),
            (&["--concurrency", "0"], "--concurrency"),
            (&["--ec2-launch-rate", "0"], "--ec2-launch-rate"),
            (&["--poll-interval", "0s"], "--poll-interval"),
            (&["--shutdown-grace", "10m"], "--shutdown-grace"),
            (&["--log", "info,[[["], "--log (RUNNER_LOG)"),
            (
                &["--update-window", "03-04"],
                "--update-window (RUNNER_UPDATE_WINDOW): 03-04 is 1 h wide",
            ),
            (&["--update-window", "night"], "--update-window"),
            (&["--update-interval", "10s"], "--update-interval"),
            (&["--self-update", "maybe"], "--self-update"),
            (
                &["--image-repository", "example.com/Aws-Runner"],
                "--image-repository (RUNNER_IMAGE_REPOSITORY): \"example.com/Aws-Runner\" has the path component \"Aws-Runner\"",
            ),
            (
                &[
                    "--image-repository",
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner:1.0",
                ],
                "--image-repository (RUNNER_IMAGE_REPOSITORY): \"123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner:1.0\" holds a tag",
            ),
            (
                &["--image-repository", "public.ecr.aws/a/b@sha256:00"],
                "holds a digest",
            ),
            (
                &["--allowed-instance-types", "t3.medium,large"],
                "--allowed-instance-types (RUNNER_ALLOWED_INSTANCE_TYPES): \"large\" is not an EC2 instance type",
            ),
            (
                &["--exchange-token-secret-id", "runner/credentials"],
                "--exchange-token-secret-id (RUNNER_EXCHANGE_TOKEN_SECRET_ID): must be another secret",
            ),
        ];
        for (extra, expected) in cases {
            let err = args(extra).expect_err(&format!("{extra:?} must be refused"));
            assert!(
                err.contains(expected),
                "{extra:?}: {err:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn plaintext_is_allowed_only_to_loopback_and_only_when_asked() {
        assert!(
            args(&[
                "--control-plane-url",
                "http://127.0.0.1:7443",
                "--allow-plaintext"
            ])
            .is_ok()
        );
        assert!(
            args(&[
                "--control-plane-url",
                "http://localhost:7443",
                "--allow-plaintext"
            ])
            .is_ok()
        );
        assert!(
            args(&[
                "--control-plane-url",
                "http://[::1]:7443",
                "--allow-plaintext"
            ])
            .is_ok()
        );
        assert!(args(&["--control-plane-url", "http://127.0.0.1:7443"]).is_err());
        assert!(
            args(&[
                "--control-plane-url",
                "http://10.0.0.1:7443",
                "--allow-plaintext"
            ])
            .is_err()
        );
    }

    #[test]
    fn self_update_defaults_to_on_any_time_hourly() {
        let config = args(&[]).expect("valid");
        assert!(config.update.enabled);
        assert_eq!(config.update.window, UpdateWindow::ANY);
        assert_eq!(config.update.interval, Duration::from_secs(3600));
        assert_eq!(config.update.repository, None);
        let config = args(&[
            "--self-update",
            "false",
            "--update-window",
            "22-04",
            "--update-interval",
            "30m",
        ])
        .expect("valid");
        assert!(!config.update.enabled);
        assert_eq!(config.update.window.to_string(), "22-04");
        assert_eq!(config.update.interval, Duration::from_secs(1800));
    }

    #[test]
    fn the_image_repository_is_kept_as_given() {
        let repository = "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner";
        let config = args(&["--image-repository", repository]).expect("valid");
        assert_eq!(
            config
                .update
                .repository
                .as_ref()
                .map(ImageRepository::as_str),
            Some(repository)
        );
        let config = args(&["--image-repository", ""]).expect("empty is unset");
        assert_eq!(config.update.repository, None);
    }

    #[test]
    fn the_allowlist_and_the_exchange_token_secret_are_optional() {
        let config = args(&[]).expect("valid");
        assert!(config.placement.allowed_instance_types.is_any());
        assert_eq!(config.exchange_token_secret_id, None);
        let config = args(&[
            "--allowed-instance-types",
            "t3.medium, m7i.large",
            "--exchange-token-secret-id",
            "runner/exchange-token",
        ])
        .expect("valid");
        assert_eq!(
            config.placement.allowed_instance_types.types(),
            ["t3.medium", "m7i.large"]
        );
        assert_eq!(
            config.exchange_token_secret_id.as_deref(),
            Some("runner/exchange-token")
        );
    }

    #[test]
    fn doctor_reads_the_daemon_flags() {
        let cli = Cli::try_parse_from(["runnerd", "--region", "eu-west-1", "doctor", "--json"])
            .expect("doctor parses");
        assert!(matches!(cli.command, Some(Command::Doctor { json: true })));
        assert_eq!(cli.daemon.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn health_needs_none_of_the_daemon_flags() {
        let cli = Cli::try_parse_from(["runnerd", "health"]).expect("health parses alone");
        assert!(matches!(cli.command, Some(Command::Health { .. })));
    }
}
