//! The placement check: the VPC exists, the security group is in it, and
//! each subnet is in it and in the region. One implementation for the
//! daemon's start (`Ec2Compute::subnets`, first problem ends it) and
//! `runnerd doctor` (each part a check of its own, with a hint).

use aws_sdk_ec2::Client;
use governor::DefaultDirectRateLimiter;
use runner_core::model::Subnet;
use runner_core::traits::ComputeError;

use super::{Outcome, aws_fail, fail};
use crate::error::AwsError;

/// Why the placement is wrong; the texts are the start check's.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The VPC does not exist in the region.
    #[error("VPC {vpc} does not exist in {region}")]
    NoVpc {
        /// The configured VPC.
        vpc: String,
        /// The region.
        region: String,
    },
    /// The security group does not exist.
    #[error("security group {group} does not exist")]
    NoGroup {
        /// The configured group.
        group: String,
    },
    /// The security group is in another VPC.
    #[error("security group {group} is not in VPC {vpc}")]
    GroupElsewhere {
        /// The configured group.
        group: String,
        /// The configured VPC.
        vpc: String,
        /// The group's VPC.
        found: Option<String>,
    },
    /// A subnet does not exist in the region.
    #[error("subnet {id} does not exist in {region}")]
    NoSubnet {
        /// The subnet.
        id: String,
        /// The region.
        region: String,
    },
    /// A subnet is in another VPC.
    #[error("subnet {id} is in VPC {}, not in the configured {vpc}", found.as_deref().unwrap_or("?"))]
    SubnetElsewhere {
        /// The subnet.
        id: String,
        /// The configured VPC.
        vpc: String,
        /// The subnet's VPC.
        found: Option<String>,
    },
    /// A subnet's zone is outside the region.
    #[error("subnet {id} is in {zone}, outside {region}")]
    SubnetOutsideRegion {
        /// The subnet.
        id: String,
        /// Its zone.
        zone: String,
        /// The region.
        region: String,
    },
    /// DescribeVpcs failed.
    #[error("DescribeVpcs")]
    DescribeVpcs(#[source] AwsError),
    /// DescribeSecurityGroups failed.
    #[error("DescribeSecurityGroups")]
    DescribeSecurityGroups(#[source] AwsError),
    /// DescribeSubnets failed.
    #[error("DescribeSubnets")]
    DescribeSubnets(#[source] AwsError),
}

/// A failed call is classified as EC2's errors are; a wrong placement is a
/// rejection.
impl From<PlacementError> for ComputeError {
    fn from(err: PlacementError) -> Self {
        match err {
            PlacementError::DescribeVpcs(e)
            | PlacementError::DescribeSecurityGroups(e)
            | PlacementError::DescribeSubnets(e) => e.into(),
            wrong => Self::Rejected(wrong.to_string()),
        }
    }
}

/// The VPC, as described.
#[derive(Debug, Clone)]
pub struct Vpc {
    /// Its CIDR block.
    pub cidr_block: Option<String>,
    /// Its state.
    pub state: Option<String>,
}

/// A subnet of the VPC in the region.
#[derive(Debug, Clone)]
pub struct PlacedSubnet {
    /// The subnet and its zone.
    pub subnet: Subnet,
    /// Its free IP addresses.
    pub free_addresses: Option<i32>,
}

/// Where launches go, checked against EC2.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    /// EC2.
    pub client: &'a Client,
    /// The region.
    pub region: &'a str,
    /// The VPC.
    pub vpc_id: &'a str,
    /// The environments' security group.
    pub security_group_id: &'a str,
    /// A bucket each call first takes a token from (the compute adapter's
    /// describe bucket); `None`: calls go at once.
    pub bucket: Option<&'a DefaultDirectRateLimiter>,
}

/// Whether `err` is EC2 saying the resource does not exist (its code starts
/// with `prefix`).
fn not_found(err: &AwsError, prefix: &str) -> bool {
    err.code().is_some_and(|c| c.starts_with(prefix))
}

impl Placement<'_> {
    async fn gate(&self) {
        if let Some(bucket) = self.bucket {
            bucket.until_ready().await;
        }
    }

    /// The VPC exists.
    pub async fn vpc(&self) -> Result<Vpc, PlacementError> {
        self.gate().await;
        let missing = || PlacementError::NoVpc {
            vpc: self.vpc_id.to_owned(),
            region: self.region.to_owned(),
        };
        match self
            .client
            .describe_vpcs()
            .vpc_ids(self.vpc_id)
            .send()
            .await
            .map_err(AwsError::new)
        {
            Ok(output) => output.vpcs().first().map_or_else(
                || Err(missing()),
                |found| {
                    Ok(Vpc {
                        cidr_block: found.cidr_block().map(str::to_owned),
                        state: found.state().map(|s| s.as_str().to_owned()),
                    })
                },
            ),
            Err(err) if not_found(&err, "InvalidVpcID") => Err(missing()),
            Err(err) => Err(PlacementError::DescribeVpcs(err)),
        }
    }

    /// The security group exists and is in the VPC; its name.
    pub async fn security_group(&self) -> Result<Option<String>, PlacementError> {
        self.gate().await;
        let group = match self
            .client
            .describe_security_groups()
            .group_ids(self.security_group_id)
            .send()
            .await
            .map_err(AwsError::new)
        {
            Ok(output) => output.security_groups().first().cloned(),
            Err(err) if not_found(&err, "InvalidGroup") => None,
            Err(err) => return Err(PlacementError::DescribeSecurityGroups(err)),
        };
        let Some(group) = group else {
            return Err(PlacementError::NoGroup {
                group: self.security_group_id.to_owned(),
            });
        };
        if group.vpc_id() != Some(self.vpc_id) {
            return Err(PlacementError::GroupElsewhere {
                group: self.security_group_id.to_owned(),
                vpc: self.vpc_id.to_owned(),
                found: group.vpc_id().map(str::to_owned),
            });
        }
        Ok(group.group_name().map(str::to_owned))
    }

    /// The subnet `id` exists, in the VPC, in a zone of the region.
    pub async fn subnet(&self, id: &str) -> Result<PlacedSubnet, PlacementError> {
        self.gate().await;
        let subnet = match self
            .client
            .describe_subnets()
            .subnet_ids(id)
            .send()
            .await
            .map_err(AwsError::new)
        {
            Ok(output) => output.subnets().first().cloned(),
            Err(err) if not_found(&err, "InvalidSubnetID") => None,
            Err(err) => return Err(PlacementError::DescribeSubnets(err)),
        };
        let Some(subnet) = subnet else {
            return Err(PlacementError::NoSubnet {
                id: id.to_owned(),
                region: self.region.to_owned(),
            });
        };
        if subnet.vpc_id() != Some(self.vpc_id) {
            return Err(PlacementError::SubnetElsewhere {
                id: id.to_owned(),
                vpc: self.vpc_id.to_owned(),
                found: subnet.vpc_id().map(str::to_owned),
            });
        }
        let zone = subnet.availability_zone().unwrap_or_default().to_owned();
        if !zone.starts_with(self.region) {
            return Err(PlacementError::SubnetOutsideRegion {
                id: id.to_owned(),
                zone,
                region: self.region.to_owned(),
            });
        }
        Ok(PlacedSubnet {
            subnet: Subnet {
                id: id.to_owned(),
                availability_zone: zone,
            },
            free_addresses: subnet.available_ip_address_count(),
        })
    }

    /// The start check: the VPC, the group, then each of `ids`; the first
    /// problem ends it.
    pub async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>, PlacementError> {
        self.vpc().await?;
        self.security_group().await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.subnet(id).await?.subnet);
        }
        Ok(out)
    }

    /// `runnerd doctor`'s `vpc` check.
    pub(super) async fn vpc_check(&self) -> Outcome {
        let (vpc, region) = (self.vpc_id, self.region);
        let hint = format!(
            "set RUNNER_VPC_ID (stack parameter VpcId) to a VPC in {region}, the one the subnets belong to"
        );
        match self.vpc().await {
            Ok(found) => Outcome::Pass(format!(
                "{vpc}: {}, {}",
                found.cidr_block.as_deref().unwrap_or("?"),
                found.state.as_deref().unwrap_or("?")
            )),
            Err(PlacementError::NoVpc { .. }) => {
                fail(format!("{vpc} does not exist in {region}"), hint)
            }
            Err(PlacementError::DescribeVpcs(err)) => aws_fail(&err, &hint),
            Err(other) => fail(other.to_string(), hint),
        }
    }

    /// `runnerd doctor`'s `subnet:<id>` check.
    pub(super) async fn subnet_check(&self, id: &str) -> Outcome {
        let (vpc, region) = (self.vpc_id, self.region);
        let hint = format!(
            "set RUNNER_SUBNET_IDS (stack parameter SubnetIds) to subnets of {vpc} in {region}"
        );
        match self.subnet(id).await {
            Ok(PlacedSubnet {
                subnet,
                free_addresses: Some(0),
            }) => fail(
                format!(
                    "{id} ({}) has no free IP addresses: launches into it fail",
                    subnet.availability_zone
                ),
                "free addresses in the subnet (terminate unused instances or interfaces) or add a larger subnet",
            ),
            Ok(PlacedSubnet {
                subnet,
                free_addresses,
            }) => Outcome::Pass(format!(
                "{id}: {}, {} free IP addresses",
                subnet.availability_zone,
                free_addresses.map_or_else(|| "?".to_owned(), |n| n.to_string())
            )),
            Err(PlacementError::SubnetElsewhere { found, .. }) => fail(
                format!(
                    "{id} is in VPC {}, not in {vpc} (RUNNER_VPC_ID)",
                    found.as_deref().unwrap_or("?")
                ),
                format!("choose subnets of {vpc}, or set RUNNER_VPC_ID to the subnets' VPC"),
            ),
            Err(PlacementError::SubnetOutsideRegion { zone, .. }) => {
                fail(format!("{id} is in {zone}, outside {region}"), hint)
            }
            Err(PlacementError::NoSubnet { .. }) => {
                fail(format!("{id} does not exist in {region}"), hint)
            }
            Err(PlacementError::DescribeSubnets(err)) => aws_fail(&err, &hint),
            Err(other) => fail(other.to_string(), hint),
        }
    }

    /// `runnerd doctor`'s `security-group` check.
    pub(super) async fn security_group_check(&self) -> Outcome {
        let (group, vpc) = (self.security_group_id, self.vpc_id);
        let hint = "set RUNNER_SECURITY_GROUP_ID to the stack's EnvironmentSecurityGroupId output";
        match self.security_group().await {
            Ok(name) => Outcome::Pass(format!(
                "{group} ({}) in {vpc}",
                name.as_deref().unwrap_or("?")
            )),
            Err(PlacementError::GroupElsewhere { found, .. }) => fail(
                format!(
                    "{group} is in VPC {}, not in {vpc}",
                    found.as_deref().unwrap_or("?")
                ),
                hint,
            ),
            Err(PlacementError::NoGroup { .. }) => {
                fail(format!("{group} does not exist in {}", self.region), hint)
            }
            Err(PlacementError::DescribeSecurityGroups(err)) => aws_fail(&err, hint),
            Err(other) => fail(other.to_string(), hint),
        }
    }
}
