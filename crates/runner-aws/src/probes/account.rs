//! The account checks: credentials (STS), the region (EC2's zones) and the
//! runner's DynamoDB table (key, state, readable).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, KeyType, ScalarAttributeType, TableStatus};

use super::{Outcome, Probes, aws_fail, fail};
use crate::error::AwsError;

impl Probes {
    /// `credentials`: who the SDK's credentials are.
    pub(super) async fn credentials(&self) -> Outcome {
        match self.sts.get_caller_identity().send().await {
            Ok(identity) => Outcome::Pass(format!(
                "{} (account {})",
                identity.arn().unwrap_or("?"),
                identity.account().unwrap_or("?")
            )),
            Err(err) => aws_fail(
                &AwsError::new(err),
                "runnerd finds credentials the AWS SDK's usual way: the task role on ECS; elsewhere AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance profile",
            ),
        }
    }

    /// `region`: the region has availability zones for this account.
    pub(super) async fn region(&self) -> Outcome {
        let region = &self.settings.region;
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
            Err(err) => aws_fail(&AwsError::new(err), hint),
        }
    }

    /// `table`: the table exists with the key (pk, sk) of strings, is active,
    /// and the runner may read it.
    pub(super) async fn table(&self) -> Outcome {
        let table = &self.settings.table;
        let region = &self.settings.region;
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
                let err = AwsError::new(err);
                return if err.code() == Some("ResourceNotFoundException") {
                    fail(format!("table {table} does not exist in {region}"), hint)
                } else if err.is_denied() {
                    fail(
                        err.text(),
                        "the task role needs dynamodb:DescribeTable on the table (the stack grants it)",
                    )
                } else {
                    aws_fail(&err, hint)
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
                AttributeValue::S(format!("RUNNER#{}", self.settings.runner_id)),
            )
            .key("sk", AttributeValue::S("LEASE#0".into()))
            .consistent_read(true)
            .send()
            .await;
        match read {
            Ok(_) => Outcome::Pass(format!("{table}: ACTIVE, key (pk, sk), readable")),
            Err(err) => aws_fail(
                &AwsError::new(err),
                "the task role needs dynamodb:GetItem, PutItem, UpdateItem, DeleteItem, Query and ConditionCheckItem on the table (the stack grants them)",
            ),
        }
    }
}
