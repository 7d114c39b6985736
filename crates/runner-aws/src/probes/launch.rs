//! The launch checks: the environments' instance profile (IAM), the AMI,
//! and a `DryRun` of the launch's own RunInstances request.

use aws_sdk_ec2::types::ImageState;

use super::{Outcome, Probes, aws_fail, fail};
use crate::ec2::{RunPlacement, launch_tags};
use crate::error::AwsError;

/// The instance type of the dry-run launch (offered in every region), unless
/// the runner allows only some types.
const DRY_RUN_TYPE: &str = "t3.micro";
/// The dry-run root disk when the AMI does not say.
const DRY_RUN_DISK_GIB: i32 = 30;

/// The AMI's root device and its size (GiB), for the dry-run launch.
pub(super) type RootDevice = Option<(String, Option<i32>)>;

impl Probes {
    /// `instance-profile`: the profile exists and has a role.
    pub(super) async fn instance_profile(&self) -> Outcome {
        let configured = &self.settings.instance_profile;
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
                let err = AwsError::new(err);
                if err.code() == Some("NoSuchEntity") {
                    fail(format!("instance profile {name} does not exist"), hint)
                } else if err.is_denied() {
                    fail(
                        err.text(),
                        "the task role needs iam:GetInstanceProfile on the profile (the stack grants it)",
                    )
                } else {
                    aws_fail(&err, hint)
                }
            }
        }
    }

    /// `ami`: the AMI exists and is available; notes its root device for the
    /// dry run.
    pub(super) async fn ami(&self, root_device: &mut RootDevice) -> Outcome {
        let ami = &self.settings.ami;
        let region = &self.settings.region;
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
                let err = AwsError::new(err);
                if !err.code().is_some_and(|c| c.starts_with("InvalidAMIID")) {
                    return aws_fail(&err, &hint);
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

    /// `dry-run`: EC2 would accept the launch's RunInstances, in the first
    /// subnet.
    pub(super) async fn dry_run(&self, root_device: RootDevice) -> Outcome {
        let settings = &self.settings;
        let Some(subnet) = settings.subnet_ids.first() else {
            return Outcome::Skip("no subnet configured".into());
        };
        let instance_type = settings.instance_type.as_deref().unwrap_or(DRY_RUN_TYPE);
        // The launch's own tags, for an environment named `doctor`.
        let tags = launch_tags(&settings.runner_id, "doctor", 0);
        let result = crate::ec2::run_request(
            &self.ec2,
            RunPlacement {
                ami: &settings.ami,
                security_group_id: &settings.security_group_id,
                instance_profile: &settings.instance_profile,
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
        let Err(err) = result else {
            return pass();
        };
        let err = AwsError::new(err);
        if err.code() == Some("DryRunOperation") {
            pass()
        } else if err.is_denied() {
            fail(
                err.text(),
                "the task role lacks a permission RunInstances needs (see the stack's Launch* statements and iam:PassRole for the environment role); `aws sts decode-authorization-message` shows which",
            )
        } else {
            aws_fail(
                &err,
                "EC2 refuses a launch with these settings: fix the one the message names",
            )
        }
    }
}
