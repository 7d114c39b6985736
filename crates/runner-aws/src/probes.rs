//! Setup checks of the runner's AWS account (`runnerd doctor`, and the
//! daemon's start checks): read-only calls with the daemon's own settings,
//! each a named check that passes, fails with a fix hint, or is skipped. A
//! check that needs a failed one is skipped. The binary renders them and
//! adds its own (control plane, self-update).
//!
//! Read-only: the launch check is a `DryRun` RunInstances, the key check
//! makes a data key it throws away, the secret is read but never shown.

mod account;
mod keys;
mod launch;
pub mod placement;

use std::time::Duration;

use aws_config::SdkConfig;
use runner_core::traits::Credentials;

use crate::secrets::SecretsManagerStore;

/// Longest one check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It works: what was found.
    Pass(String),
    /// It does not.
    Fail {
        /// What was found.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// Not applicable here, or waiting for a failed check: why.
    Skip(String),
}

/// A failed check.
pub fn fail(message: impl Into<String>, hint: impl Into<String>) -> Outcome {
    Outcome::Fail {
        message: message.into(),
        hint: hint.into(),
    }
}

/// A check failed by the AWS call `err`: its whole account as the message;
/// `hint` unless the service failed rather than the request (then what to do
/// about that: no setting is wrong).
pub(crate) fn aws_fail(err: &crate::error::AwsError, hint: &str) -> Outcome {
    fail(err.text(), err.hint(hint))
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable name, e.g. `vpc` or `subnet:subnet-0abc`.
    pub name: String,
    /// The result.
    pub outcome: Outcome,
}

/// Check results, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct Findings(Vec<Finding>);

impl Findings {
    /// Adds `outcome` as the check `name`; whether it passed.
    pub fn record(&mut self, name: &str, outcome: Outcome) -> bool {
        let passed = matches!(outcome, Outcome::Pass(_));
        self.0.push(Finding {
            name: name.to_owned(),
            outcome,
        });
        passed
    }

    /// Runs the check `name`, failing it after [`CHECK_TIMEOUT`]; whether it
    /// passed.
    pub async fn run(&mut self, name: &str, check: impl Future<Output = Outcome>) -> bool {
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

    /// Whether the check `name` ran and failed.
    pub fn failed(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|f| f.name == name && matches!(f.outcome, Outcome::Fail { .. }))
    }
}

impl IntoIterator for Findings {
    type Item = Finding;
    type IntoIter = std::vec::IntoIter<Finding>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// What the checks look at: the daemon's settings.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// This runner's id.
    pub runner_id: String,
    /// The region.
    pub region: String,
    /// The DynamoDB table.
    pub table: String,
    /// The VPC.
    pub vpc_id: String,
    /// The subnets launches go into.
    pub subnet_ids: Vec<String>,
    /// The environments' security group.
    pub security_group_id: String,
    /// The environments' instance profile, a name or an ARN.
    pub instance_profile: String,
    /// The AMI: an id, or `resolve:ssm:<parameter>`.
    pub ami: String,
    /// The dry run's instance type (the first the runner allows); `None`:
    /// one offered in every region.
    pub instance_type: Option<String>,
    /// The KMS key.
    pub kms_key_id: String,
    /// The runner's secret.
    pub secret_id: String,
    /// The stack's exchange-token secret, if separate.
    pub exchange_token_secret_id: Option<String>,
}

/// The AWS checks, on one SDK configuration.
pub struct Probes {
    settings: ProbeSettings,
    sts: aws_sdk_sts::Client,
    ec2: aws_sdk_ec2::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    iam: aws_sdk_iam::Client,
    kms: aws_sdk_kms::Client,
    secrets: SecretsManagerStore,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Probes {
    /// The checks of `settings`.
    pub fn new(sdk: &SdkConfig, settings: ProbeSettings) -> Self {
        Self {
            sts: aws_sdk_sts::Client::new(sdk),
            ec2: aws_sdk_ec2::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            iam: aws_sdk_iam::Client::new(sdk),
            kms: aws_sdk_kms::Client::new(sdk),
            secrets: SecretsManagerStore::new(
                aws_sdk_secretsmanager::Client::new(sdk),
                &settings.secret_id,
            )
            .with_exchange_token_secret(settings.exchange_token_secret_id.as_deref()),
            settings,
        }
    }

    fn placement(&self) -> placement::Placement<'_> {
        placement::Placement {
            client: &self.ec2,
            region: &self.settings.region,
            vpc_id: &self.settings.vpc_id,
            security_group_id: &self.settings.security_group_id,
            bucket: None,
        }
    }

    /// Runs every AWS check into `checks`, in order: credentials, region,
    /// table, VPC, subnets, security group, instance profile, AMI, dry-run
    /// launch, KMS key, secret. Returns the runner's credentials when the
    /// secret could be read (for the control-plane checks).
    pub async fn run(&self, checks: &mut Findings) -> Option<Credentials> {
        let subnet_names: Vec<String> = self
            .settings
            .subnet_ids
            .iter()
            .map(|s| format!("subnet:{s}"))
            .collect();
        if !checks.run("credentials", self.credentials()).await {
            let skipped = ["region", "table", "vpc"]
                .into_iter()
                .chain(subnet_names.iter().map(String::as_str))
                .chain([
                    "security-group",
                    "instance-profile",
                    "ami",
                    "dry-run",
                    "kms-key",
                    "secret",
                ]);
            for name in skipped {
                checks.record(name, Outcome::Skip("needs working AWS credentials".into()));
            }
            return None;
        }
        checks.run("region", self.region()).await;
        checks.run("table", self.table()).await;
        let placement = self.placement();
        checks.run("vpc", placement.vpc_check()).await;
        for (subnet, name) in self.settings.subnet_ids.iter().zip(&subnet_names) {
            checks.run(name, placement.subnet_check(subnet)).await;
        }
        checks
            .run("security-group", placement.security_group_check())
            .await;
        checks
            .run("instance-profile", self.instance_profile())
            .await;
        let mut root_device = None;
        checks.run("ami", self.ami(&mut root_device)).await;
        let launchable = ["vpc", "security-group", "instance-profile", "ami"]
            .into_iter()
            .chain(subnet_names.iter().map(String::as_str))
            .all(|name| !checks.failed(name));
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
        let mut credentials = None;
        checks.run("secret", self.secret(&mut credentials)).await;
        credentials
    }
}
