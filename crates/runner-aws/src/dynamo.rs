//! The DynamoDB state store, leader lease and self-update attempt record,
//! in one table.
//!
//! Keys (single-table design, documented in ARCHITECTURE.md):
//! - `pk = RUNNER#<runner id>`, `sk = ENV#<environment id>`: an environment record;
//! - `pk = RUNNER#<runner id>`, `sk = LEASE#0`: the leader lease;
//! - `pk = RUNNER#<runner id>`, `sk = UPDATE#0`: the self-update attempt
//!   ([`DynamoAttempts`], in `attempts`).
//!
//! Every item carries `schema_version` and `version`. Every record write is a
//! transaction of two parts: a condition check that the lease is still held
//! by this replica at its epoch and not expired, and the write itself,
//! conditional on the record's version. A failed first part is
//! [`StoreError::Fenced`]; a failed second part is [`StoreError::Conflict`].
//! Listing records is a Query on the runner's partition, never a Scan.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, KeyType, Put, ReturnValue, TableStatus,
    TransactWriteItem,
};
use runner_core::leader::{Leadership, Lease, Term};
use runner_core::model::{EnvironmentId, LaunchIntent, LaunchState, Record, Subnet};
use runner_core::traits::{StateStore, StoreError};

mod attempts;
pub use attempts::DynamoAttempts;

/// The schema version written on every item.
pub const SCHEMA_VERSION: u64 = 1;
const LEASE_SK: &str = "LEASE#0";

pub(crate) type Item = HashMap<String, AttributeValue>;

/// Records and the lease of one runner in one table.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    partition: String,
    holder: String,
    leadership: Arc<Leadership>,
    /// The item its `Lease` methods work on.
    lease_sk: &'static str,
}

/// The lease item of the credential claim: the one replica holding it trades
/// the exchange token on first start.
pub const CLAIM_SK: &str = "CLAIM#credential";

/// A failure before or after the call (a request that does not build, a
/// record that does not read).
fn local_error(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(err))
}

/// A failed DynamoDB call, with its whole account.
fn unavailable(err: impl Into<crate::error::AwsError>) -> StoreError {
    StoreError::Unavailable(crate::error::boxed(err))
}

pub(crate) fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// A malformed item.
#[derive(Debug, thiserror::Error)]
#[error("malformed item {sk}: {problem}")]
pub struct Malformed {
    sk: String,
    problem: String,
}

pub(crate) fn get_n(item: &Item, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

impl DynamoStore {
    /// A store for `runner_id` in `table`; `holder` names this replica in the lease.
    pub fn new(
        client: Client,
        table: &str,
        runner_id: &str,
        holder: &str,
        leadership: Arc<Leadership>,
    ) -> Self {
        Self {
            client,
            table: table.to_owned(),
            partition: format!("RUNNER#{runner_id}"),
            holder: holder.to_owned(),
            leadership,
            lease_sk: LEASE_SK,
        }
    }

    /// The same store, whose `Lease` is the credential claim instead of the
    /// leader lease.
    pub fn credential_claim(&self) -> Self {
        Self {
            lease_sk: CLAIM_SK,
            ..self.clone()
        }
    }

    fn key(&self, sk: String) -> Item {
        HashMap::from([
            ("pk".to_owned(), s(&self.partition)),
            ("sk".to_owned(), s(sk)),
        ])
    }

    fn encode(&self, record: &Record, version: u64) -> Item {
        let mut item = self.key(format!("ENV#{}", record.environment));
        item.insert("schema_version".into(), n(SCHEMA_VERSION));
        item.insert("version".into(), n(version));
        item.insert("spec_version".into(), n(record.spec_version));
        item.insert("updated_at".into(), n(millis(SystemTime::now())));
        if !record.exhausted_zones.is_empty() {
            item.insert(
                "exhausted_zones".into(),
                AttributeValue::L(
                    record
                        .exhausted_zones
                        .iter()
                        .map(|z| s(z.clone()))
                        .collect(),
                ),
            );
        }
        if let Some(spec) = record.idle_stopped_at_spec {
            item.insert("idle_stopped_at_spec".into(), n(spec));
        }
        if let Some(launch) = &record.launch {
            item.insert("launch_attempt".into(), n(u64::from(launch.attempt)));
            item.insert("launch_subnet_id".into(), s(&launch.subnet.id));
            item.insert("launch_zone".into(), s(&launch.subnet.availability_zone));
            item.insert("launch_client_token".into(), s(&launch.client_token));
            let state = match &launch.state {
                LaunchState::Intended => "intended",
                LaunchState::Launched { instance_id } => {
                    item.insert("instance_id".into(), s(instance_id));
                    "launched"
                }
                LaunchState::Failed => "failed",
            };
            item.insert("launch_state".into(), s(state));
        }
        item
    }

    fn decode(item: &Item) -> Result<Record, Malformed> {
        let sk = get_s(item, "sk").unwrap_or_default().to_owned();
        let bad = |problem: &str| Malformed {
            sk: sk.clone(),
            problem: problem.to_owned(),
        };
        match get_n(item, "schema_version") {
            Some(SCHEMA_VERSION) => {}
            Some(other) => return Err(bad(&format!("schema_version {other} is not supported"))),
            None => return Err(bad("no schema_version")),
        }
        let environment: EnvironmentId = sk
            .strip_prefix("ENV#")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| bad("sort key is not ENV#<uuid>"))?;
        let launch = match get_n(item, "launch_attempt") {
            None => None,
            Some(attempt) => {
                let state = match get_s(item, "launch_state") {
                    Some("intended") => LaunchState::Intended,
                    Some("launched") => LaunchState::Launched {
                        instance_id: get_s(item, "instance_id")
                            .ok_or_else(|| bad("launched without instance_id"))?
                            .to_owned(),
                    },
                    Some("failed") => LaunchState::Failed,
                    _ => return Err(bad("unknown launch_state")),
                };
                Some(LaunchIntent {
                    attempt: u32::try_from(attempt)
                        .map_err(|_| bad("launch_attempt out of range"))?,
                    subnet: Subnet {
                        id: get_s(item, "launch_subnet_id")
                            .ok_or_else(|| bad("no launch_subnet_id"))?
                            .to_owned(),
                        availability_zone: get_s(item, "launch_zone")
                            .ok_or_else(|| bad("no launch_zone"))?
                            .to_owned(),
                    },
                    client_token: get_s(item, "launch_client_token")
                        .ok_or_else(|| bad("no launch_client_token"))?
                        .to_owned(),
                    state,
                })
            }
        };
        let exhausted_zones = item
            .get("exhausted_zones")
            .and_then(|v| v.as_l().ok())
            .map(|l| l.iter().filter_map(|z| z.as_s().ok().cloned()).collect())
            .unwrap_or_default();
        Ok(Record {
            environment,
            version: get_n(item, "version").ok_or_else(|| bad("no version"))?,
            spec_version: get_n(item, "spec_version").unwrap_or(0),
            launch,
            exhausted_zones,
            idle_stopped_at_spec: get_n(item, "idle_stopped_at_spec"),
        })
    }

    /// The condition check that fences every write on the lease.
    fn fence(&self) -> Result<TransactWriteItem, StoreError> {
        let epoch = self.leadership.epoch().ok_or(StoreError::Fenced)?;
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(self.lease_sk.to_owned())))
            .condition_expression("holder = :holder AND epoch = :epoch AND expires_at > :now")
            .expression_attribute_values(":holder", s(&self.holder))
            .expression_attribute_values(":epoch", n(epoch))
            .expression_attribute_values(":now", n(millis(SystemTime::now())))
            .build()
            .map_err(local_error)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    async fn transact(
        &self,
        environment: EnvironmentId,
        write: TransactWriteItem,
    ) -> Result<(), StoreError> {
        let result = self
            .client
            .transact_write_items()
            .transact_items(self.fence()?)
            .transact_items(write)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                if let Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(cancel)) =
                    err.as_service_error()
                {
                    let reasons = cancel.cancellation_reasons();
                    let failed = |i: usize| reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
                    if failed(0) {
                        return Err(StoreError::Fenced);
                    }
                    if failed(1) {
                        return Err(StoreError::Conflict(environment));
                    }
                }
                Err(unavailable(err))
            }
        }
    }

    /// The condition that the stored item has `version` (0: does not exist),
    /// with its attribute values.
    fn version_condition(version: u64) -> (&'static str, Option<Item>) {
        if version == 0 {
            ("attribute_not_exists(pk)", None)
        } else {
            (
                "version = :version",
                Some(HashMap::from([(":version".to_owned(), n(version))])),
            )
        }
    }
}

#[async_trait]
impl StateStore for DynamoStore {
    async fn list(&self) -> Result<Vec<Record>, StoreError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(&self.partition))
            .expression_attribute_values(":prefix", s("ENV#"))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        let mut records = Vec::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(unavailable)?;
            records.push(Self::decode(&item).map_err(local_error)?);
        }
        Ok(records)
    }

    async fn get(&self, environment: EnvironmentId) -> Result<Option<Record>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(format!("ENV#{environment}"))))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        output
            .item()
            .map(Self::decode)
            .transpose()
            .map_err(local_error)
    }

    async fn put(&self, record: &Record) -> Result<Record, StoreError> {
        let version = record.version + 1;
        let (condition, values) = Self::version_condition(record.version);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.encode(record, version)))
            .condition_expression(condition)
            .set_expression_attribute_values(values)
            .build()
            .map_err(local_error)?;
        self.transact(
            record.environment,
            TransactWriteItem::builder().put(put).build(),
        )
        .await?;
        Ok(Record {
            version,
            ..record.clone()
        })
    }

    async fn delete(&self, record: &Record) -> Result<(), StoreError> {
        let (condition, values) = Self::version_condition(record.version);
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(format!("ENV#{}", record.environment))))
            .condition_expression(condition)
            .set_expression_attribute_values(values)
            .build()
            .map_err(local_error)?;
        self.transact(
            record.environment,
            TransactWriteItem::builder().delete(delete).build(),
        )
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        let table = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| {
                let code = e.code().unwrap_or("unknown error").to_owned();
                StoreError::Unavailable(format!("table {}: {code}", self.table).into())
            })?
            .table
            .ok_or_else(|| {
                StoreError::Unavailable(format!("table {} not described", self.table).into())
            })?;
        let keys: Vec<(String, KeyType)> = table
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
            .collect();
        if keys
            != [
                ("pk".to_owned(), KeyType::Hash),
                ("sk".to_owned(), KeyType::Range),
            ]
        {
            return Err(StoreError::Unavailable(
                format!("table {} must have the key (pk HASH, sk RANGE)", self.table).into(),
            ));
        }
        if table.table_status() != Some(&TableStatus::Active)
            && table.table_status() != Some(&TableStatus::Updating)
        {
            return Err(StoreError::Unavailable(
                format!("table {} is not active", self.table).into(),
            ));
        }
        Ok(())
    }
}

fn conditional_failed<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    err: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    err.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

#[async_trait]
impl Lease for DynamoStore {
    async fn acquire(&self, ttl: Duration) -> Result<Option<Term>, StoreError> {
        let now = SystemTime::now();
        let expires_at = now + ttl;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(self.lease_sk.to_owned())))
            .update_expression(
                "SET holder = :holder, expires_at = :expires, schema_version = :schema, epoch = if_not_exists(epoch, :zero) + :one",
            )
            .condition_expression("attribute_not_exists(pk) OR expires_at < :now OR holder = :holder")
            .expression_attribute_values(":holder", s(&self.holder))
            .expression_attribute_values(":expires", n(millis(expires_at)))
            .expression_attribute_values(":schema", n(SCHEMA_VERSION))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(millis(now)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(output) => {
                let epoch = output
                    .attributes()
                    .and_then(|a| get_n(a, "epoch"))
                    .ok_or_else(|| StoreError::Unavailable("the lease has no epoch".into()))?;
                Ok(Some(Term { epoch, expires_at }))
            }
            Err(err) if conditional_failed(&err) => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn renew(&self, epoch: u64, ttl: Duration) -> Result<Term, StoreError> {
        let expires_at = SystemTime::now() + ttl;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(self.lease_sk.to_owned())))
            .update_expression("SET expires_at = :expires")
            .condition_expression("holder = :holder AND epoch = :epoch")
            .expression_attribute_values(":holder", s(&self.holder))
            .expression_attribute_values(":epoch", n(epoch))
            .expression_attribute_values(":expires", n(millis(expires_at)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Term { epoch, expires_at }),
            Err(err) if conditional_failed(&err) => Err(StoreError::Fenced),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn release(&self, epoch: u64) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(self.lease_sk.to_owned())))
            .update_expression("SET expires_at = :zero")
            .condition_expression("holder = :holder AND epoch = :epoch")
            .expression_attribute_values(":holder", s(&self.holder))
            .expression_attribute_values(":epoch", n(epoch))
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if conditional_failed(&err) => Ok(()),
            Err(err) => Err(unavailable(err)),
        }
    }
}
