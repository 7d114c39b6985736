//! The self-update attempt record in the runner's table: `pk = RUNNER#<runner
//! id>`, `sk = UPDATE#0`, written conditionally on its `version` like every
//! item. Policy lives in `runner_core::update`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use runner_core::update::{Attempt, AttemptState, Attempts, UpdateError};

use super::{Item, SCHEMA_VERSION, get_n, get_s, millis, n, s};

const UPDATE_SK: &str = "UPDATE#0";

/// The attempt record in the runner's table.
#[derive(Debug, Clone)]
pub struct DynamoAttempts {
    client: aws_sdk_dynamodb::Client,
    table: String,
    partition: String,
}

/// A malformed attempt item.
#[derive(Debug, thiserror::Error)]
#[error("malformed item {UPDATE_SK}: {0}")]
struct Malformed(&'static str);

fn time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl DynamoAttempts {
    /// The record of `runner_id` in `table`.
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str, runner_id: &str) -> Self {
        Self {
            client,
            table: table.to_owned(),
            partition: format!("RUNNER#{runner_id}"),
        }
    }

    fn key(&self) -> Item {
        HashMap::from([
            ("pk".to_owned(), s(&self.partition)),
            ("sk".to_owned(), s(UPDATE_SK)),
        ])
    }

    fn encode(&self, attempt: &Attempt, version: u64) -> Item {
        let mut item = self.key();
        item.insert("schema_version".into(), n(SCHEMA_VERSION));
        item.insert("version".into(), n(version));
        for (name, value) in [
            ("release", &attempt.release),
            ("image", &attempt.image),
            ("from_release", &attempt.from_release),
            ("task_definition", &attempt.task_definition),
            (
                "previous_task_definition",
                &attempt.previous_task_definition,
            ),
            ("message", &attempt.message),
        ] {
            if !value.is_empty() {
                item.insert(name.into(), s(value.as_str()));
            }
        }
        item.insert("state".into(), s(attempt.state.as_str()));
        item.insert("started_at".into(), n(millis(attempt.started_at)));
        if let Some(finished) = attempt.finished_at {
            item.insert("finished_at".into(), n(millis(finished)));
        }
        item.insert("updated_at".into(), n(millis(SystemTime::now())));
        item
    }

    fn decode(item: &Item) -> Result<Attempt, Malformed> {
        if get_n(item, "schema_version") != Some(SCHEMA_VERSION) {
            return Err(Malformed("unsupported schema_version"));
        }
        let text = |name| get_s(item, name).unwrap_or_default().to_owned();
        Ok(Attempt {
            release: text("release"),
            image: text("image"),
            from_release: text("from_release"),
            task_definition: text("task_definition"),
            previous_task_definition: text("previous_task_definition"),
            state: get_s(item, "state")
                .and_then(AttemptState::parse)
                .ok_or(Malformed("unknown state"))?,
            message: text("message"),
            started_at: time(get_n(item, "started_at").ok_or(Malformed("no started_at"))?),
            finished_at: get_n(item, "finished_at").map(time),
            version: get_n(item, "version").ok_or(Malformed("no version"))?,
        })
    }
}

#[async_trait]
impl Attempts for DynamoAttempts {
    async fn load(&self) -> Result<Option<Attempt>, UpdateError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| UpdateError::Unavailable {
                what: "GetItem",
                source: crate::error::boxed(e),
            })?;
        output
            .item()
            .map(Self::decode)
            .transpose()
            .map_err(|e| UpdateError::Rejected(e.to_string()))
    }

    async fn save(&self, attempt: &Attempt) -> Result<Attempt, UpdateError> {
        let version = attempt.version + 1;
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.encode(attempt, version)));
        let put = if attempt.version == 0 {
            put.condition_expression("attribute_not_exists(pk)")
        } else {
            put.condition_expression("version = :version")
                .expression_attribute_values(":version", n(attempt.version))
        };
        match put.send().await {
            Ok(_) => Ok(Attempt {
                version,
                ..attempt.clone()
            }),
            Err(err)
                if err.as_service_error().and_then(|e| e.code())
                    == Some("ConditionalCheckFailedException") =>
            {
                Err(UpdateError::Conflict)
            }
            Err(err) => Err(UpdateError::Unavailable {
                what: "PutItem",
                source: crate::error::boxed(err),
            }),
        }
    }
}
