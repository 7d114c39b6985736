//! The AWS adapters against emulated AWS (moto, started by `tests/run` on
//! 127.0.0.1 and named by `MOTO_URL`), over real HTTP. What moto cannot do
//! (throttling, capacity errors) comes from `testkit::proxy`.

mod adapters;
mod chaos;
mod checkout;
mod content;
mod daemon;
mod doctor;
mod errors;
mod faults;
mod repository;
mod scan;
mod tokens;
mod update;

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use runner_aws::{AdapterSettings, Adapters};
use runner_core::leader::Leadership;

pub(crate) const REGION: &str = "eu-west-1";
pub(crate) const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];
pub(crate) const INSTANCE_PROFILE: &str = "aws-runner-environment";

/// Emulated AWS's URL, from `tests/run`.
pub(crate) fn moto_url() -> String {
    std::env::var("MOTO_URL")
        .expect("MOTO_URL is not set: run these tests through tests/run, which starts moto")
}

/// An SDK configuration pointed at `endpoint`, with test credentials.
pub(crate) async fn sdk(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .load()
        .await
}

/// One test's own AWS resources: a VPC with a subnet per zone, a security
/// group, a table, a secret and a KMS key, plus a subnet of another VPC.
pub(crate) struct Infra {
    pub(crate) runner_id: String,
    pub(crate) vpc_id: String,
    pub(crate) subnets: Vec<(String, String)>,
    pub(crate) security_group_id: String,
    pub(crate) foreign_subnet: String,
    pub(crate) foreign_security_group: String,
    pub(crate) table: String,
    pub(crate) secret_id: String,
    pub(crate) kms_key_id: String,
    /// An image moto knows (the doctor checks it exists).
    pub(crate) ami: String,
}

impl Infra {
    pub(crate) async fn create(sdk: &SdkConfig) -> Self {
        let ec2 = aws_sdk_ec2::Client::new(sdk);
        let runner_id = uuid::Uuid::new_v4().to_string();
        let short = &runner_id[..8];
        let vpc = |cidr: &'static str| {
            let ec2 = ec2.clone();
            async move {
                ec2.create_vpc()
                    .cidr_block(cidr)
                    .send()
                    .await
                    .expect("create VPC")
                    .vpc
                    .and_then(|v| v.vpc_id)
                    .expect("VPC id")
            }
        };
        let vpc_id = vpc("10.20.0.0/16").await;
        let other_vpc = vpc("10.30.0.0/16").await;
        let mut subnets = Vec::new();
        for (i, zone) in ZONES.iter().enumerate() {
            let id = ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(format!("10.20.{i}.0/24"))
                .availability_zone(*zone)
                .send()
                .await
                .expect("create subnet")
                .subnet
                .and_then(|s| s.subnet_id)
                .expect("subnet id");
            subnets.push((id, (*zone).to_owned()));
        }
        let foreign_subnet = ec2
            .create_subnet()
            .vpc_id(&other_vpc)
            .cidr_block("10.30.0.0/24")
            .availability_zone(ZONES[0])
            .send()
            .await
            .expect("create subnet")
            .subnet
            .and_then(|s| s.subnet_id)
            .expect("subnet id");
        let group = |vpc: String, name: String| {
            let ec2 = ec2.clone();
            async move {
                ec2.create_security_group()
                    .group_name(name)
                    .description("aws-runner test environments")
                    .vpc_id(vpc)
                    .send()
                    .await
                    .expect("create security group")
                    .group_id
                    .expect("group id")
            }
        };
        let security_group_id = group(vpc_id.clone(), format!("env-{short}")).await;
        let foreign_security_group = group(other_vpc, format!("other-{short}")).await;

        let table = format!("runner-{short}");
        aws_sdk_dynamodb::Client::new(sdk)
            .create_table()
            .table_name(&table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attr"),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("sk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attr"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("key"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("sk")
                    .key_type(KeyType::Range)
                    .build()
                    .expect("key"),
            )
            .send()
            .await
            .expect("create table");
        // Created once per moto, with a role, as the stack makes it; later
        // tests find it there.
        let iam = aws_sdk_iam::Client::new(sdk);
        let _ = iam
            .create_instance_profile()
            .instance_profile_name(INSTANCE_PROFILE)
            .send()
            .await;
        let _ = iam
            .create_role()
            .role_name(INSTANCE_PROFILE)
            .assume_role_policy_document(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
            )
            .send()
            .await;
        let _ = iam
            .add_role_to_instance_profile()
            .instance_profile_name(INSTANCE_PROFILE)
            .role_name(INSTANCE_PROFILE)
            .send()
            .await;
        let ami = doctor::existing_ami(&ec2).await;
        let secret_id = format!("runner-{short}/credentials");
        aws_sdk_secretsmanager::Client::new(sdk)
            .create_secret()
            .name(&secret_id)
            .secret_string("placeholder")
            .send()
            .await
            .expect("create secret");
        let kms_key_id = aws_sdk_kms::Client::new(sdk)
            .create_key()
            .description("aws-runner test tokens")
            .send()
            .await
            .expect("create key")
            .key_metadata
            .expect("metadata")
            .key_id;
        Self {
            runner_id,
            vpc_id,
            subnets,
            security_group_id,
            foreign_subnet,
            foreign_security_group,
            table,
            secret_id,
            kms_key_id,
            ami,
        }
    }

    pub(crate) fn subnet_ids(&self) -> Vec<String> {
        self.subnets.iter().map(|(id, _)| id.clone()).collect()
    }

    pub(crate) fn settings(&self, holder: &str) -> AdapterSettings {
        AdapterSettings {
            table: self.table.clone(),
            runner_id: self.runner_id.clone(),
            holder: holder.to_owned(),
            secret_id: self.secret_id.clone(),
            exchange_token_secret_id: None,
            kms_key_id: self.kms_key_id.clone(),
            ec2: runner_aws::ec2::Ec2Settings {
                runner_id: self.runner_id.clone(),
                region: REGION.to_owned(),
                vpc_id: self.vpc_id.clone(),
                security_group_id: self.security_group_id.clone(),
                instance_profile: INSTANCE_PROFILE.to_owned(),
                ami: self.ami.clone(),
                describe_page_size: 5,
                launch_rate: (50.0, 20),
                mutate_rate: (50.0, 20),
                describe_rate: 50.0,
            },
        }
    }

    pub(crate) fn adapters(
        &self,
        sdk: &SdkConfig,
        holder: &str,
        leadership: &Arc<Leadership>,
    ) -> Adapters {
        runner_aws::adapters(sdk, &self.settings(holder), leadership)
    }
}

/// An instance's user data, decoded.
pub(crate) async fn user_data(ec2: &aws_sdk_ec2::Client, instance_id: &str) -> String {
    use base64::Engine as _;
    let encoded = ec2
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("user data")
        .user_data
        .and_then(|u| u.value)
        .expect("user data value");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64"),
    )
    .expect("utf-8")
}

/// Leadership held for a century: for adapter tests that are not about the lease.
pub(crate) fn leading() -> Arc<Leadership> {
    Arc::new(Leadership::always())
}

/// An encryption context for a user's token.
pub(crate) fn context(runner: &str, principal: &str, host: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("runner_id".to_owned(), runner.to_owned()),
        ("principal".to_owned(), principal.to_owned()),
        ("host".to_owned(), host.to_owned()),
        ("source".to_owned(), "pat".to_owned()),
    ])
}
