//! `runnerd doctor`: checks the account setup with the daemon's own
//! configuration, one line per check (pass, fail with a fix hint, or skip),
//! as text or JSON. The daemon runs the same checks at start, and again
//! until they pass; failures show as DEGRADED with the failing check's
//! message.
//!
//! Checks are read-only: the launch check is a `DryRun` RunInstances, the key
//! check makes a data key it throws away, the secret is read but never shown,
//! and the control-plane check uses the stored access token (never the
//! single-use exchange token). A check that needs a failed one is skipped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{ImageState, Tag};
use runner_aws::ec2::{TAG_ATTEMPT, TAG_ENVIRONMENT, TAG_MANAGED_BY, TAG_RUNNER};
use runner_core::backoff::Backoff;
use runner_core::traits::{Credentials, SecretError, SecretStore as _};
use runner_core::update::{Deployer, UpdateError};
use runner_proto::pb::{self, runner_service_client::RunnerServiceClient};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::grpc::{self, Auth};
use crate::health::{Health, chain, one_line};
use crate::session::VERSION;

/// Longest one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// The instance type of the dry-run launch (offered in every region), unless
/// the runner allows only some types: then the first of those.
const DRY_RUN_TYPE: &str = "t3.micro";
/// The dry-run root disk when the AMI does not say.
const DRY_RUN_DISK_GIB: i32 = 30;

/// The AMI's root device and its size (GiB), for the dry-run launch.
type RootDevice = Option<(String, Option<i32>)>;

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It works.
    Pass,
    /// It does not; see the hint.
    Fail,
    /// Not applicable here, or waiting for a failed check.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name, e.g. `vpc` or `subnet:subnet-0abc`.
    pub name: String,
    /// The result.
    pub status: Status,
    /// What was found.
    pub message: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Every check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    /// The runner.
    pub runner_id: String,
    /// The region.
    pub region: String,
    /// runnerd's version.
    pub version: String,
    /// In order.
    pub checks: Vec<Check>,
}

impl Report {
    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The failing checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// The degraded message: every failure as `name: message`.
    pub fn problem(&self) -> Option<String> {
        let failures: Vec<String> = self
            .failures()
            .map(|c| one_line(&format!("{}: {}", c.name, c.message)))
            .collect();
        (!failures.is_empty()).then(|| failures.join("; "))
    }

    /// The report for a terminal: one line per check, a hint under a failure.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = format!(
            "runnerd {} doctor: runner {} in {}\n",
            self.version, self.runner_id, self.region
        );
        let mut counts = [0; 3];
        for check in &self.checks {
            let (label, i) = match check.status {
                Status::Pass => ("PASS", 0),
                Status::Fail => ("FAIL", 1),
                Status::Skip => ("SKIP", 2),
            };
            counts[i] += 1;
            let _ = writeln!(out, "{label}  {:width$}  {}", check.name, check.message);
            if let Some(hint) = &check.hint {
                let _ = writeln!(out, "      {:width$}  fix: {hint}", "");
            }
        }
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} skipped",
            counts[0], counts[1], counts[2]
        );
        out
    }
}

/// What one check found.
enum Outcome {
    Pass(String),
    Fail(String, String),
    Skip(String),
}

fn fail(message: impl Into<String>, hint: impl Into<String>) -> Outcome {
    Outcome::Fail(message.into(), hint.into())
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn record(&mut self, name: &str, outcome: Outcome) -> bool {
        let (status, message, hint) = match outcome {
            Outcome::Pass(m) => (Status::Pass, m, None),
            Outcome::Fail(m, h) => (Status::Fail, m, Some(h)),
            Outcome::Skip(m) => (Status::Skip, m, None),
        };
        self.0.push(Check {
            name: name.to_owned(),
            status,
            message,
            hint,
        });
        status == Status::Pass
    }

    async fn run(&mut self, name: &str, check: impl Future<Output = Outcome>) -> bool {
        let outcome = tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| {
                fail(
                    format!("no answer within {} s", CHECK_TIMEOUT.as_secs()),
                    "the runner cannot reach the service: its subnets need a route to the internet (NAT) or VPC endpoints",
                )
            });
        self.record(name, outcome)
    }

    fn status(&self, name: &str) -> Option<Status> {
        self.0.iter().find(|c| c.name == name).map(|c| c.status)
    }
}

/// An AWS error as `(code, "Code: message")`; the code is empty when the
/// service never answered (no credentials, network).
fn aws_error<E, R>(err: &SdkError<E, R>) -> (String, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err.as_service_error() {
        Some(e) => {
            let code = e.code().unwrap_or("error").to_owned();
            let text = match e.message() {
                Some(message) if !message.is_empty() => format!("{code}: {message}"),
                _ => code.clone(),
            };
            (code, text)
        }
        None => (String::new(), chain(err)),
    }
}

fn denied(code: &str) -> bool {
    code.contains("AccessDenied") || code.contains("UnauthorizedOperation")
}

/// The checks, built on one SDK configuration.
pub struct Doctor {
    config: Config,
    sts: aws_sdk_sts::Client,
    ec2: aws_sdk_ec2::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    iam: aws_sdk_iam::Client,
    kms: aws_sdk_kms::Client,
    secrets: runner_aws::secrets::SecretsManagerStore,
    deployer: Option<Arc<dyn Deployer>>,
}

impl std::fmt::Debug for Doctor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doctor")
            .field("runner_id", &self.config.runner_id)
            .finish_non_exhaustive()
    }
}

impl Doctor {
    /// The checks of `config`; `deployer` is the runner's ECS service when it
    /// runs in an ECS task.
    pub fn new(
        sdk: &aws_config::SdkConfig,
        config: &Config,
        deployer: Option<Arc<dyn Deployer>>,
    ) -> Self {
        Self {
            config: config.clone(),
            sts: aws_sdk_sts::Client::new(sdk),
            ec2: aws_sdk_ec2::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            iam: aws_sdk_iam::Client::new(sdk),
            kms: aws_sdk_kms::Client::new(sdk),
            secrets: runner_aws::secrets::SecretsManagerStore::new(
                aws_sdk_secretsmanager::Client::new(sdk),
                &config.secret_id,
            )
            .with_exchange_token_secret(config.exchange_token_secret_id.as_deref()),
            deployer,
        }
    }

    /// Runs every check.
    pub async fn run(&self) -> Report {
        // Boxed: the checks' futures are large.
        Box::pin(self.run_checks()).await
    }

    async fn run_checks(&self) -> Report {
        let mut checks = Checks::default();
        let placement = &self.config.placement;
        let subnet_names: Vec<String> = placement
            .subnet_ids
            .iter()
            .map(|s| format!("subnet:{s}"))
            .collect();
        let mut credentials = None;
        if checks.run("credentials", self.credentials()).await {
            checks.run("region", self.region()).await;
            checks.run("table", self.table()).await;
            checks.run("vpc", self.vpc()).await;
            for (subnet, name) in placement.subnet_ids.iter().zip(&subnet_names) {
                checks.run(name, self.subnet(subnet)).await;
            }
            checks.run("security-group", self.security_group()).await;
            checks
                .run("instance-profile", self.instance_profile())
                .await;
            let mut root_device: RootDevice = None;
            checks.run("ami", self.ami(&mut root_device)).await;
            let launchable = ["vpc", "security-group", "instance-profile", "ami"]
                .into_iter()
                .chain(subnet_names.iter().map(String::as_str))
                .all(|name| checks.status(name) != Some(Status::Fail));
            if launchable {
                checks
                    .run("dry-run", Box::pin(self.dry_run(root_device)))
                    .await;
            } else {
                checks.record(
                    "dry-run",
                    Outcome::Skip("waits for the network, profile and AMI checks above".into()),
                );
            }
            checks.run("kms-key", self.kms_key()).await;
            checks.run("secret", self.secret(&mut credentials)).await;
        } else {
            let skipped = ["region", "table", "vpc"]
                .into_iter()
                .map(str::to_owned)
                .chain(subnet_names.iter().cloned())
                .chain(
                    [
                        "security-group",
                        "instance-profile",
                        "ami",
                        "dry-run",
                        "kms-key",
                        "secret",
                    ]
                    .map(str::to_owned),
                );
            for name in skipped {
                checks.record(&name, Outcome::Skip("needs working AWS credentials".into()));
            }
        }
        self.control_plane(&mut checks, credentials.as_ref()).await;
        checks.run("self-update", self.self_update()).await;
        let checks = checks.0;
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            runner_id: self.config.runner_id.clone(),
            region: self.config.region.clone(),
            version: VERSION.to_owned(),
            checks,
        }
    }

    async fn credentials(&self) -> Outcome {
        match self.sts.get_caller_identity().send().await {
            Ok(identity) => Outcome::Pass(format!(
                "{} (account {})",
                identity.arn().unwrap_or("?"),
                identity.account().unwrap_or("?")
            )),
            Err(err) => fail(
                aws_error(&err).1,
                "runnerd finds credentials the AWS SDK's usual way: the task role on ECS; elsewhere AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance profile",
            ),
        }
    }

    async fn region(&self) -> Outcome {
        let region = &self.config.region;
        let hint = "set RUNNER_REGION to the region the stack is deployed in (enable it for the account if it is opt-in)";
        match self.ec2.describe_availability_zones().send().await {
            Ok(output) => {
                let zones: Vec<&str> = output
                    .availability_zones()
                    .iter()
                    .filter(|z| z.region_name() == Some(region.as_str()))
                    .filter_map(|z| z.zone_name())
                    .collect();
                if zones.is_empty() {
                    fail(format!("{region} has no availability zones here"), hint)
                } else {
                    Outcome::Pass(format!("{region}: {}", zones.join(", ")))
                }
            }
            Err(err) => fail(aws_error(&err).1, hint),
        }
    }

    async fn table(&self) -> Outcome {
        use aws_sdk_dynamodb::types::{KeyType, ScalarAttributeType, TableStatus};
        let table = &self.config.table;
        let region = &self.config.region;
        let hint = "set RUNNER_TABLE to the stack's TableName output";
        let described = match self
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
        {
            Ok(output) => output.table,
            Err(err) => {
                let (code, text) = aws_error(&err);
                return match code.as_str() {
                    "ResourceNotFoundException" => {
                        fail(format!("table {table} does not exist in {region}"), hint)
                    }
                    c if denied(c) => fail(
                        text,
                        "the task role needs dynamodb:DescribeTable on the table (the stack grants it)",
                    ),
                    _ => fail(text, hint),
                };
            }
        };
        let Some(described) = described else {
            return fail(format!("table {table} was not described"), hint);
        };
        let types: HashMap<&str, &ScalarAttributeType> = described
            .attribute_definitions()
            .iter()
            .map(|a| (a.attribute_name(), a.attribute_type()))
            .collect();
        let keys: Vec<(&str, &KeyType)> = described
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name(), k.key_type()))
            .collect();
        let expected = [("pk", &KeyType::Hash), ("sk", &KeyType::Range)];
        let strings = ["pk", "sk"]
            .iter()
            .all(|k| types.get(k) == Some(&&ScalarAttributeType::S));
        if keys != expected || !strings {
            let found: Vec<String> = keys
                .iter()
                .map(|(name, kind)| format!("{name} {}", kind.as_str()))
                .collect();
            return fail(
                format!(
                    "table {table} has the key ({}), not (pk HASH, sk RANGE) of strings",
                    found.join(", ")
                ),
                "use the table the stack creates: set RUNNER_TABLE to its TableName output",
            );
        }
        let status = described.table_status();
        if status != Some(&TableStatus::Active) && status != Some(&TableStatus::Updating) {
            return fail(
                format!(
                    "table {table} is {}",
                    status.map_or("in an unknown state", |s| s.as_str())
                ),
                "wait until the table is ACTIVE",
            );
        }
        // Reading an item proves the runner may use the table.
        let read = self
            .dynamodb
            .get_item()
            .table_name(table)
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S(format!(
                    "RUNNER#{}",
                    self.config.runner_id
                )),
            )
            .key(
                "sk",
                aws_sdk_dynamodb::types::AttributeValue::S("LEASE#0".into()),
            )
            .consistent_read(true)
            .send()
            .await;
        match read {
            Ok(_) => Outcome::Pass(format!("{table}: ACTIVE, key (pk, sk), readable")),
            Err(err) => fail(
                aws_error(&err).1,
                "the task role needs dynamodb:GetItem, PutItem, UpdateItem, DeleteItem, Query and ConditionCheckItem on the table (the stack grants them)",
            ),
        }
    }

    async fn vpc(&self) -> Outcome {
        let vpc = &self.config.placement.vpc_id;
        let region = &self.config.region;
        let hint = format!(
            "set RUNNER_VPC_ID (stack parameter VpcId) to a VPC in {region}, the one the subnets belong to"
        );
        match self.ec2.describe_vpcs().vpc_ids(vpc).send().await {
            Ok(output) => match output.vpcs().first() {
                Some(found) => Outcome::Pass(format!(
                    "{vpc}: {}, {}",
                    found.cidr_block().unwrap_or("?"),
                    found.state().map_or("?", |s| s.as_str())
                )),
                None => fail(format!("{vpc} does not exist in {region}"), hint),
            },
            Err(err) => {
                let (code, text) = aws_error(&err);
                if code.starts_with("InvalidVpcID") {
                    fail(format!("{vpc} does not exist in {region}"), hint)
                } else {
                    fail(text, hint)
                }
            }
        }
    }

    async fn subnet(&self, id: &str) -> Outcome {
        let vpc = &self.config.placement.vpc_id;
        let region = &self.config.region;
        let hint = format!(
            "set RUNNER_SUBNET_IDS (stack parameter SubnetIds) to subnets of {vpc} in {region}"
        );
        let subnet = match self.ec2.describe_subnets().subnet_ids(id).send().await {
            Ok(output) => output.subnets().first().cloned(),
            Err(err) => {
                let (code, text) = aws_error(&err);
                if !code.starts_with("InvalidSubnetID") {
                    return fail(text, hint);
                }
                None
            }
        };
        let Some(subnet) = subnet else {
            return fail(format!("{id} does not exist in {region}"), hint);
        };
        let zone = subnet.availability_zone().unwrap_or_default();
        if subnet.vpc_id() != Some(vpc.as_str()) {
            return fail(
                format!(
                    "{id} is in VPC {}, not in {vpc} (RUNNER_VPC_ID)",
                    subnet.vpc_id().unwrap_or("?")
                ),
                format!("choose subnets of {vpc}, or set RUNNER_VPC_ID to the subnets' VPC"),
            );
        }
        if !zone.starts_with(region.as_str()) {
            return fail(format!("{id} is in {zone}, outside {region}"), hint);
        }
        match subnet.available_ip_address_count() {
            Some(0) => fail(
                format!("{id} ({zone}) has no free IP addresses: launches into it fail"),
                "free addresses in the subnet (terminate unused instances or interfaces) or add a larger subnet",
            ),
            free => Outcome::Pass(format!(
                "{id}: {zone}, {} free IP addresses",
                free.map_or_else(|| "?".to_owned(), |n| n.to_string())
            )),
        }
    }

    async fn security_group(&self) -> Outcome {
        let group = &self.config.placement.security_group_id;
        let vpc = &self.config.placement.vpc_id;
        let hint = "set RUNNER_SECURITY_GROUP_ID to the stack's EnvironmentSecurityGroupId output";
        let found = match self
            .ec2
            .describe_security_groups()
            .group_ids(group)
            .send()
            .await
        {
            Ok(output) => output.security_groups().first().cloned(),
            Err(err) => {
                let (code, text) = aws_error(&err);
                if !code.starts_with("InvalidGroup") {
                    return fail(text, hint);
                }
                None
            }
        };
        match found {
            None => fail(
                format!("{group} does not exist in {}", self.config.region),
                hint,
            ),
            Some(g) if g.vpc_id() != Some(vpc.as_str()) => fail(
                format!(
                    "{group} is in VPC {}, not in {vpc}",
                    g.vpc_id().unwrap_or("?")
                ),
                hint,
            ),
            Some(g) => Outcome::Pass(format!(
                "{group} ({}) in {vpc}",
                g.group_name().unwrap_or("?")
            )),
        }
    }

    async fn instance_profile(&self) -> Outcome {
        let configured = &self.config.placement.instance_profile;
        // An ARN ends in instance-profile/<path>/<name>.
        let name = configured.rsplit('/').next().unwrap_or(configured);
        let hint =
            "set RUNNER_INSTANCE_PROFILE to the stack's EnvironmentInstanceProfileArn output";
        match self
            .iam
            .get_instance_profile()
            .instance_profile_name(name)
            .send()
            .await
        {
            Ok(output) => {
                let Some(profile) = output.instance_profile() else {
                    return fail(format!("instance profile {name} was not described"), hint);
                };
                if configured.starts_with("arn:") && profile.arn() != configured {
                    return fail(
                        format!(
                            "{configured} does not exist (a profile {name} does: {})",
                            profile.arn()
                        ),
                        hint,
                    );
                }
                match profile.roles().first() {
                    Some(role) => Outcome::Pass(format!("{name}: role {}", role.role_name())),
                    None => fail(
                        format!(
                            "instance profile {name} has no role: environments would get no credentials"
                        ),
                        "add the environment role to the instance profile (the stack does)",
                    ),
                }
            }
            Err(err) => {
                let (code, text) = aws_error(&err);
                if code == "NoSuchEntity" {
                    fail(format!("instance profile {name} does not exist"), hint)
                } else if denied(&code) {
                    fail(
                        text,
                        "the task role needs iam:GetInstanceProfile on the profile (the stack grants it)",
                    )
                } else {
                    fail(text, hint)
                }
            }
        }
    }

    async fn ami(&self, root_device: &mut RootDevice) -> Outcome {
        let ami = &self.config.placement.ami;
        let region = &self.config.region;
        if let Some(parameter) = ami.strip_prefix("resolve:ssm:") {
            return Outcome::Skip(format!(
                "EC2 resolves SSM parameter {parameter} at launch; the dry run checks it"
            ));
        }
        let hint = format!(
            "set RUNNER_AMI (stack parameter EnvironmentAmi) to an AMI available in {region} (owned by or shared with this account)"
        );
        let image = match self.ec2.describe_images().image_ids(ami).send().await {
            Ok(output) => output.images().first().cloned(),
            Err(err) => {
                let (code, text) = aws_error(&err);
                if !code.starts_with("InvalidAMIID") {
                    return fail(text, hint);
                }
                None
            }
        };
        let Some(image) = image else {
            return fail(format!("{ami} does not exist in {region}"), hint);
        };
        if image.state() != Some(&ImageState::Available) {
            return fail(
                format!(
                    "{ami} is {}, not available",
                    image.state().map_or("in an unknown state", |s| s.as_str())
                ),
                hint,
            );
        }
        *root_device = image.root_device_name().map(|device| {
            let size = image
                .block_device_mappings()
                .iter()
                .find(|m| m.device_name() == Some(device))
                .and_then(|m| m.ebs())
                .and_then(|ebs| ebs.volume_size());
            (device.to_owned(), size)
        });
        Outcome::Pass(format!(
            "{ami}: {} ({})",
            image.name().unwrap_or("unnamed"),
            image.architecture().map_or("?", |a| a.as_str())
        ))
    }

    async fn dry_run(&self, root_device: RootDevice) -> Outcome {
        let placement = &self.config.placement;
        let Some(subnet) = placement.subnet_ids.first() else {
            return Outcome::Skip("no subnet configured".into());
        };
        let instance_type = placement
            .allowed_instance_types
            .types()
            .first()
            .map_or(DRY_RUN_TYPE, String::as_str);
        let tags: Vec<Tag> = [
            (TAG_RUNNER, self.config.runner_id.as_str()),
            (TAG_ENVIRONMENT, "doctor"),
            (TAG_ATTEMPT, "0"),
            (TAG_MANAGED_BY, "aws-runner"),
        ]
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
        let result = runner_aws::ec2::run_request(
            &self.ec2,
            runner_aws::ec2::RunPlacement {
                ami: &placement.ami,
                security_group_id: &placement.security_group_id,
                instance_profile: &placement.instance_profile,
            },
            instance_type,
            subnet,
            // The launch's encrypted gp3 root disk, when the AMI's root is
            // known (an SSM-resolved AMI is only known to EC2).
            root_device.map(|(device, size)| (device, size.unwrap_or(DRY_RUN_DISK_GIB))),
            tags,
        )
        .dry_run(true)
        .send()
        .await;
        let pass = || {
            Outcome::Pass(format!(
                "RunInstances would succeed ({instance_type} in {subnet}, the environments' group, profile, tags and encrypted disk)"
            ))
        };
        match result {
            Ok(_) => pass(),
            Err(err) => {
                let (code, text) = aws_error(&err);
                match code.as_str() {
                    "DryRunOperation" => pass(),
                    c if denied(c) => fail(
                        text,
                        "the task role lacks a permission RunInstances needs (see the stack's Launch* statements and iam:PassRole for the environment role); `aws sts decode-authorization-message` shows which",
                    ),
                    _ => fail(
                        text,
                        "EC2 refuses a launch with these settings: fix the one the message names",
                    ),
                }
            }
        }
    }

    async fn kms_key(&self) -> Outcome {
        use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
        let key = &self.config.kms_key_id;
        let hint = "set RUNNER_KMS_KEY_ID to the stack's KmsKeyArn output";
        let use_hint = "the task role needs kms:GenerateDataKey and kms:Decrypt on the key (the stack grants them)";
        let metadata = match self.kms.describe_key().key_id(key).send().await {
            Ok(output) => output.key_metadata,
            Err(err) => {
                let (code, text) = aws_error(&err);
                return if code == "NotFoundException" {
                    fail(
                        format!("key {key} does not exist in {}", self.config.region),
                        hint,
                    )
                } else if denied(&code) {
                    fail(
                        text,
                        "the task role needs kms:DescribeKey on the key (the stack grants it)",
                    )
                } else {
                    fail(text, hint)
                };
            }
        };
        let Some(metadata) = metadata else {
            return fail(format!("key {key} was not described"), hint);
        };
        if metadata.key_state() != Some(&KeyState::Enabled) {
            return fail(
                format!(
                    "key {key} is {}",
                    metadata
                        .key_state()
                        .map_or("in an unknown state", |s| s.as_str())
                ),
                "enable the key (or cancel its deletion)",
            );
        }
        if metadata
            .key_usage()
            .is_some_and(|u| *u != KeyUsageType::EncryptDecrypt)
            || metadata
                .key_spec()
                .is_some_and(|s| *s != KeySpec::SymmetricDefault)
        {
            return fail(format!("key {key} is not a symmetric encryption key"), hint);
        }
        let context = [
            ("purpose", "aws-runner doctor"),
            ("runner-id", self.config.runner_id.as_str()),
        ];
        let mut generate = self
            .kms
            .generate_data_key()
            .key_id(key)
            .key_spec(DataKeySpec::Aes256);
        let mut decrypt = self.kms.decrypt().key_id(key);
        for (k, v) in context {
            generate = generate.encryption_context(k, v);
            decrypt = decrypt.encryption_context(k, v);
        }
        let blob = match generate.send().await {
            Ok(output) => output.ciphertext_blob,
            Err(err) => return fail(aws_error(&err).1, use_hint),
        };
        let Some(blob) = blob else {
            return fail("GenerateDataKey returned no ciphertext", use_hint);
        };
        match decrypt.ciphertext_blob(blob).send().await {
            Ok(_) => Outcome::Pass(format!(
                "{}: enabled, symmetric; encrypts and decrypts",
                metadata.arn().unwrap_or(key)
            )),
            Err(err) => fail(aws_error(&err).1, use_hint),
        }
    }

    async fn secret(&self, found: &mut Option<Credentials>) -> Outcome {
        let secret = &self.config.secret_id;
        let new_token = "create a new exchange token for this runner in the control plane and set it as the stack's ExchangeToken (or, without RUNNER_EXCHANGE_TOKEN_SECRET_ID, put it in the secret as plain text)";
        match self.secrets.load().await {
            Ok(credentials) => {
                let outcome = match (
                    &credentials.access_token,
                    &credentials.private_key,
                    &credentials.exchange_token,
                ) {
                    (Some(_), Some(_), _) => {
                        Outcome::Pass(format!("{secret} holds the runner's access token and key"))
                    }
                    (_, _, Some(_)) => Outcome::Pass(format!(
                        "{secret} holds an exchange token, which runnerd trades at its first start"
                    )),
                    _ => fail(
                        format!("{secret} holds no access token and no exchange token"),
                        new_token,
                    ),
                };
                *found = Some(credentials);
                outcome
            }
            Err(SecretError::Malformed(problem)) => fail(
                problem,
                format!(
                    "set RUNNER_SECRET_ID to the stack's SecretArn output; if it is that secret, {new_token}"
                ),
            ),
            Err(err) => fail(
                chain(&err),
                "set RUNNER_SECRET_ID to the stack's SecretArn output; the task role needs secretsmanager:GetSecretValue and PutSecretValue on it",
            ),
        }
    }

    async fn control_plane(&self, checks: &mut Checks, credentials: Option<&Credentials>) {
        let url = &self.config.control_plane.url;
        let skip = |checks: &mut Checks, names: &[&str], why: &str| {
            for name in names {
                checks.record(name, Outcome::Skip(why.to_owned()));
            }
        };
        let uri: tonic::transport::Uri = match url.parse() {
            Ok(uri) => uri,
            Err(err) => {
                checks.record(
                    "control-plane-dns",
                    fail(
                        format!("{url} is not a URL: {err}"),
                        "fix RUNNER_CONTROL_PLANE_URL",
                    ),
                );
                return skip(
                    checks,
                    &[
                        "control-plane-connect",
                        "control-plane-tls",
                        "control-plane-auth",
                    ],
                    "needs a valid URL",
                );
            }
        };
        let tls = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });

        let mut addresses = Vec::new();
        let resolved = checks
            .run("control-plane-dns", async {
                match tokio::net::lookup_host((host.as_str(), port)).await {
                    Ok(found) => {
                        addresses = found.collect();
                        let list: Vec<String> =
                            addresses.iter().map(|a| a.ip().to_string()).collect();
                        Outcome::Pass(format!("{host} is {}", list.join(", ")))
                    }
                    Err(err) => fail(
                        format!("cannot resolve {host}: {err}"),
                        "check RUNNER_CONTROL_PLANE_URL; the runner's VPC needs DNS resolution (enableDnsSupport)",
                    ),
                }
            })
            .await;
        if !resolved {
            return skip(
                checks,
                &[
                    "control-plane-connect",
                    "control-plane-tls",
                    "control-plane-auth",
                ],
                "needs the control plane's address",
            );
        }

        let mut stream = None;
        let connected = checks
            .run("control-plane-connect", async {
                let mut last = String::new();
                for address in &addresses {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio::net::TcpStream::connect(address),
                    )
                    .await
                    {
                        Ok(Ok(connected)) => {
                            stream = Some(connected);
                            return Outcome::Pass(format!("{host}:{port} ({address}) accepts connections"));
                        }
                        Ok(Err(err)) => last = format!("{address}: {err}"),
                        Err(_) => last = format!("{address}: no answer within 10 s"),
                    }
                }
                fail(
                    format!("cannot connect to {host}:{port} ({last})"),
                    "check that the control plane is up at RUNNER_CONTROL_PLANE_URL; the runner's subnets need a route to the internet (NAT) and its security group must allow outbound HTTPS",
                )
            })
            .await;
        let Some(stream) = stream.filter(|_| connected) else {
            return skip(
                checks,
                &["control-plane-tls", "control-plane-auth"],
                "needs a connection",
            );
        };

        if tls {
            let handshake = checks
                .run("control-plane-tls", self.tls_handshake(stream, &host))
                .await;
            if !handshake {
                return skip(
                    checks,
                    &["control-plane-auth"],
                    "needs a trusted TLS connection",
                );
            }
        } else {
            drop(stream);
            checks.record(
                "control-plane-tls",
                Outcome::Skip("plaintext to a loopback address (--allow-plaintext)".into()),
            );
        }
        checks
            .run("control-plane-auth", self.authenticated_call(credentials))
            .await;
    }

    async fn tls_handshake(&self, stream: tokio::net::TcpStream, host: &str) -> Outcome {
        let hint = "if the control plane's certificate comes from a private CA, put that CA's certificate (PEM) in the file RUNNER_CA_BUNDLE names";
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(pem) = &self.config.control_plane.ca_bundle {
            use rustls::pki_types::pem::PemObject as _;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem).flatten() {
                let _ = roots.add(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => {
                let mut config = builder.with_root_certificates(roots).with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                config
            }
            Err(err) => return fail(format!("TLS setup: {err}"), hint),
        };
        let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_owned()) else {
            return fail(
                format!("{host} is not a TLS server name"),
                "fix RUNNER_CONTROL_PLANE_URL",
            );
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        match connector.connect(name, stream).await {
            Ok(tls) => {
                let version = tls
                    .get_ref()
                    .1
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("TLS");
                Outcome::Pass(format!("{host}: certificate trusted ({version})"))
            }
            Err(err) => fail(format!("TLS handshake with {host} failed: {err}"), hint),
        }
    }

    async fn authenticated_call(&self, credentials: Option<&Credentials>) -> Outcome {
        let Some(credentials) = credentials else {
            return Outcome::Skip("needs the runner secret".into());
        };
        let Some(token) = &credentials.access_token else {
            return Outcome::Skip(
                "the secret holds only the single-use exchange token, which runnerd trades at its first start".into(),
            );
        };
        let auth = Auth::default();
        if let Err(problem) = auth.set(token) {
            return fail(
                problem,
                "create a new exchange token in the control plane and put it in the secret",
            );
        }
        let channel = match grpc::channel(&self.config.control_plane) {
            Ok(channel) => channel,
            Err(err) => {
                return fail(
                    chain(&err),
                    "check RUNNER_CONTROL_PLANE_URL and RUNNER_CA_BUNDLE",
                );
            }
        };
        let mut client = RunnerServiceClient::with_interceptor(channel, auth);
        let mut request = tonic::Request::new(pb::GetLatestVersionRequest {
            current_version: VERSION.to_owned(),
        });
        request.set_timeout(self.config.control_plane.timeout);
        match client.get_latest_version(request).await {
            Ok(response) => {
                let latest = response.into_inner();
                let release = if latest.version.is_empty() {
                    "nothing is released yet".to_owned()
                } else {
                    format!(
                        "the latest release is {} (auto-update {})",
                        latest.version,
                        if latest.auto_update { "on" } else { "off" }
                    )
                };
                Outcome::Pass(format!("the runner's access token is accepted; {release}"))
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => fail(
                format!(
                    "the control plane refused the runner's access token: {}",
                    status.message()
                ),
                "the runner's credential was revoked or is for another control plane: create a new exchange token for this runner, set it as the stack's ExchangeToken, and remove access_token from the runner's secret (RUNNER_SECRET_ID; keep private_key)",
            ),
            Err(status) => fail(
                format!("{:?}: {}", status.code(), status.message()),
                "check that RUNNER_CONTROL_PLANE_URL is the control plane's gRPC endpoint",
            ),
        }
    }

    async fn self_update(&self) -> Outcome {
        if !self.config.update.enabled {
            return Outcome::Skip("turned off (RUNNER_SELF_UPDATE=false)".into());
        }
        let Some(deployer) = &self.deployer else {
            return Outcome::Skip(
                "not in an ECS task (ECS_CONTAINER_METADATA_URI_V4 is not set)".into(),
            );
        };
        match deployer.service().await {
            Ok(service) => Outcome::Pass(format!(
                "service {} in cluster {} runs {} ({})",
                service.name, service.cluster, service.image, service.task_definition
            )),
            Err(UpdateError::NotAService(why)) => {
                Outcome::Skip(format!("{why}: only the service's own tasks update it"))
            }
            Err(err) => fail(
                chain(&err),
                "the task role needs ecs:DescribeTasks, ecs:DescribeServices and ecs:DescribeTaskDefinition (the stack grants them)",
            ),
        }
    }

    /// The daemon's start checks: runs every check, reports failures as the
    /// degraded problem `checks`, and runs them again (30 s to 10 min apart)
    /// until they all pass or `shutdown`.
    pub async fn watch(self: Arc<Self>, health: Arc<Health>, shutdown: CancellationToken) {
        let backoff = Backoff {
            base: Duration::from_secs(30),
            max: Duration::from_secs(600),
        };
        let mut failures = 0;
        loop {
            let report = tokio::select! {
                () = shutdown.cancelled() => return,
                report = self.run() => report,
            };
            for check in report.failures() {
                tracing::warn!(
                    check = %check.name,
                    problem = %check.message,
                    hint = check.hint.as_deref().unwrap_or_default(),
                    "setup check failed"
                );
            }
            health.set_problem("checks", report.problem());
            if report.ok {
                tracing::info!(checks = report.checks.len(), "setup checks pass");
                return;
            }
            failures += 1;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff.equal_jitter(failures)) => {}
            }
        }
    }
}

/// `runnerd doctor`: runs the checks of `config`, prints the report (text or
/// JSON) and returns 0 when no check failed, 1 otherwise.
pub async fn command(config: Config, json: bool) -> std::process::ExitCode {
    let sdk = runner_aws::sdk_config(&config.region).await;
    let deployer = crate::ecs_metadata_uri().map(|uri| crate::ecs_deployer(&sdk, &uri));
    let report = Doctor::new(&sdk, &config, deployer).run().await;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("runnerd doctor: {err}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, status: Status, message: &str, hint: Option<&str>) -> Check {
        Check {
            name: name.into(),
            status,
            message: message.into(),
            hint: hint.map(str::to_owned),
        }
    }

    fn report(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            runner_id: "r".into(),
            region: "eu-west-1".into(),
            version: "0.1.0".into(),
            checks,
        }
    }

    #[test]
    fn failures_become_the_degraded_message() {
        let r = report(vec![
            check("vpc", Status::Pass, "vpc-1", None),
            check(
                "ami",
                Status::Fail,
                "ami-1 does not exist",
                Some("set RUNNER_AMI"),
            ),
            check("dry-run", Status::Skip, "waits", None),
            check("secret", Status::Fail, "holds nothing", Some("new token")),
        ]);
        assert!(!r.ok);
        assert_eq!(
            r.problem().as_deref(),
            Some("ami: ami-1 does not exist; secret: holds nothing")
        );
        let passing = report(vec![check("vpc", Status::Pass, "vpc-1", None)]);
        assert!(passing.ok);
        assert_eq!(passing.problem(), None);
    }

    #[test]
    fn the_degraded_message_has_no_control_characters() {
        let r = report(vec![check(
            "kms-key",
            Status::Fail,
            "line one\nline two\t.",
            None,
        )]);
        assert_eq!(r.problem().as_deref(), Some("kms-key: line one line two ."));
    }

    #[test]
    fn the_text_report_has_a_line_per_check_and_a_hint_under_failures() {
        let text = report(vec![
            check("vpc", Status::Pass, "vpc-1", None),
            check(
                "ami",
                Status::Fail,
                "ami-1 does not exist",
                Some("set RUNNER_AMI"),
            ),
        ])
        .text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "PASS  vpc  vpc-1");
        assert_eq!(lines[2], "FAIL  ami  ami-1 does not exist");
        assert_eq!(lines[3], "           fix: set RUNNER_AMI");
        assert_eq!(lines[4], "1 passed, 1 failed, 0 skipped");
    }

    #[test]
    fn the_json_report_names_status_and_hint() {
        let json = serde_json::to_value(report(vec![check(
            "ami",
            Status::Fail,
            "gone",
            Some("fix it"),
        )]))
        .unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["status"], "fail");
        assert_eq!(json["checks"][0]["hint"], "fix it");
        let pass = serde_json::to_value(check("vpc", Status::Pass, "ok", None)).unwrap();
        assert!(pass.get("hint").is_none());
    }
}
