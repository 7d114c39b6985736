//! Users' host tokens in the runner's DynamoDB table, envelope-encrypted.
//!
//! One item per (principal, host, source): `pk = RUNNER#<runner id>`,
//! `sk = TOKEN#<host>#<source>#<principal>`. Hosts hold no `#`, so one Query
//! on `TOKEN#<host>#` finds a host's tokens. The access and refresh tokens
//! are one AES-256-GCM value under a fresh KMS data key, bound to the context
//! {purpose, runner, principal, host, source, endpoint}: an item copied to
//! another key, or whose endpoint attribute was changed, does not decrypt.
//! Expiry, username and endpoint are stored in the clear: none is a secret.
//! Items stored before endpoints were bound have no endpoint, in the item or
//! the context.
//!
//! Token writes are not fenced by the leader lease: any replica answers the
//! calls that store them. Writes are conditional on the item's version.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use runner_core::scm::{AuthSource, TokenKey};
use runner_core::traits::{HostToken, StoredToken, TokenEntry, TokenStore, TokenStoreError};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::dynamo::{Item, SCHEMA_VERSION, get_n, get_s, millis, n, s};
use crate::envelope::{Envelope, EnvelopeError, Sealed};

/// The token store of one runner.
#[derive(Debug, Clone)]
pub struct DynamoTokenStore {
    client: Client,
    table: String,
    runner_id: String,
    partition: String,
    envelope: Envelope,
}

#[derive(Serialize, Deserialize)]
struct Plain {
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

impl Drop for Plain {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.access_token.zeroize();
        if let Some(r) = &mut self.refresh_token {
            r.zeroize();
        }
    }
}

/// A failure before or after the call (a request that does not build, a
/// record that does not read).
fn local_error(err: impl std::error::Error + Send + Sync + 'static) -> TokenStoreError {
    TokenStoreError::Unavailable(Box::new(err))
}

/// A failed AWS call, with its whole account.
fn unavailable(err: impl Into<crate::error::AwsError>) -> TokenStoreError {
    TokenStoreError::Unavailable(crate::error::boxed(err))
}

fn malformed(problem: &str) -> TokenStoreError {
    TokenStoreError::Unavailable(problem.to_owned().into())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn get_b<'a>(item: &'a Item, name: &str) -> Option<&'a [u8]> {
    item.get(name).and_then(|v| v.as_b().ok()).map(Blob::as_ref)
}

fn entry(item: &Item) -> Result<TokenEntry, TokenStoreError> {
    let principal =
        get_s(item, "principal").ok_or_else(|| malformed("token item without principal"))?;
    let host = get_s(item, "host").ok_or_else(|| malformed("token item without host"))?;
    let source = get_s(item, "source")
        .and_then(AuthSource::parse)
        .ok_or_else(|| malformed("token item without a known source"))?;
    Ok(TokenEntry {
        key: TokenKey {
            principal: principal.to_owned(),
            host: host.to_owned(),
            source,
        },
        stored_at: UNIX_EPOCH + Duration::from_millis(get_n(item, "stored_at").unwrap_or(0)),
        version: get_n(item, "version").unwrap_or(0),
        binding: get_s(item, "endpoint").map(str::to_owned),
    })
}

impl DynamoTokenStore {
    /// The tokens of `runner_id` in `table`, sealed under `envelope`.
    pub fn new(client: Client, table: &str, runner_id: &str, envelope: Envelope) -> Self {
        Self {
            client,
            table: table.to_owned(),
            runner_id: runner_id.to_owned(),
            partition: format!("RUNNER#{runner_id}"),
            envelope,
        }
    }

    fn sk(key: &TokenKey) -> String {
        format!(
            "TOKEN#{}#{}#{}",
            key.host,
            key.source.as_str(),
            key.principal
        )
    }

    fn key_item(&self, key: &TokenKey) -> Item {
        HashMap::from([
            ("pk".to_owned(), s(&self.partition)),
            ("sk".to_owned(), s(Self::sk(key))),
        ])
    }

    /// The context a token bound to `binding` is sealed to.
    pub fn context(&self, key: &TokenKey, binding: Option<&str>) -> BTreeMap<String, String> {
        let mut context = BTreeMap::from([
            ("aws-runner:purpose".to_owned(), "scm-token".to_owned()),
            ("aws-runner:runner-id".to_owned(), self.runner_id.clone()),
            ("aws-runner:principal".to_owned(), key.principal.clone()),
            ("aws-runner:host".to_owned(), key.host.clone()),
            (
                "aws-runner:source".to_owned(),
                key.source.as_str().to_owned(),
            ),
        ]);
        if let Some(binding) = binding {
            context.insert("aws-runner:endpoint".to_owned(), binding.to_owned());
        }
        context
    }

    async fn open(&self, key: &TokenKey, item: &Item) -> Result<HostToken, TokenStoreError> {
        let sealed = Sealed {
            encrypted_key: get_b(item, "encrypted_key")
                .ok_or_else(|| malformed("token item without a data key"))?
                .to_vec(),
            nonce: get_b(item, "nonce")
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| malformed("token item without a nonce"))?,
            ciphertext: get_b(item, "ciphertext")
                .ok_or_else(|| malformed("token item without a ciphertext"))?
                .to_vec(),
        };
        let binding = get_s(item, "endpoint");
        let plaintext = match self
            .envelope
            .open(&sealed, &self.context(key, binding))
            .await
        {
            Ok(plaintext) => plaintext,
            Err(EnvelopeError::Open) => return Err(TokenStoreError::Undecryptable),
            Err(err) => return Err(local_error(err)),
        };
        let plain: Plain =
            serde_json::from_slice(&plaintext).map_err(|_| TokenStoreError::Undecryptable)?;
        Ok(HostToken {
            access_token: SecretString::from(plain.access_token.clone()),
            refresh_token: plain.refresh_token.clone().map(SecretString::from),
            expires_at: get_n(item, "expires_at").map(|t| UNIX_EPOCH + Duration::from_secs(t)),
            username: get_s(item, "username").unwrap_or_default().to_owned(),
            binding: binding.map(str::to_owned),
        })
    }
}

#[async_trait]
impl TokenStore for DynamoTokenStore {
    async fn get(&self, key: &TokenKey) -> Result<Option<StoredToken>, TokenStoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key_item(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = output.item else {
            return Ok(None);
        };
        let entry = entry(&item)?;
        let token = self.open(key, &item).await?;
        Ok(Some(StoredToken {
            key: key.clone(),
            token,
            stored_at: entry.stored_at,
            version: entry.version,
        }))
    }

    async fn put(
        &self,
        key: &TokenKey,
        token: &HostToken,
        expected: Option<u64>,
    ) -> Result<u64, TokenStoreError> {
        let plain = Plain {
            access_token: token.access_token.expose_secret().to_owned(),
            refresh_token: token
                .refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_owned()),
        };
        let plaintext = Zeroizing::new(serde_json::to_vec(&plain).map_err(local_error)?);
        drop(plain);
        let sealed = self
            .envelope
            .seal(&plaintext, &self.context(key, token.binding.as_deref()))
            .await
            .map_err(local_error)?;
        let version = expected.unwrap_or(0) + 1;
        let mut item = self.key_item(key);
        item.insert("schema_version".into(), n(SCHEMA_VERSION));
        item.insert("version".into(), n(version));
        item.insert("principal".into(), s(&key.principal));
        item.insert("host".into(), s(&key.host));
        item.insert("source".into(), s(key.source.as_str()));
        item.insert("username".into(), s(&token.username));
        if let Some(binding) = &token.binding {
            item.insert("endpoint".into(), s(binding));
        }
        item.insert("stored_at".into(), n(millis(SystemTime::now())));
        if let Some(expires_at) = token.expires_at {
            item.insert("expires_at".into(), n(secs(expires_at)));
        }
        item.insert(
            "encrypted_key".into(),
            AttributeValue::B(Blob::new(sealed.encrypted_key)),
        );
        item.insert(
            "nonce".into(),
            AttributeValue::B(Blob::new(sealed.nonce.to_vec())),
        );
        item.insert(
            "ciphertext".into(),
            AttributeValue::B(Blob::new(sealed.ciphertext)),
        );
        let mut request = self.client.put_item().table_name(&self.table);
        request = match expected {
            // A user's new token replaces the old one, whatever its version.
            None => request,
            Some(0) => request.condition_expression("attribute_not_exists(pk)"),
            Some(v) => request
                .condition_expression("version = :v")
                .expression_attribute_values(":v", n(v)),
        };
        match request.set_item(Some(item)).send().await {
            Ok(_) => Ok(version),
            Err(err) if err.code() == Some("ConditionalCheckFailedException") => {
                Err(TokenStoreError::Conflict)
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn list(&self) -> Result<Vec<TokenEntry>, TokenStoreError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(&self.partition))
            .expression_attribute_values(":prefix", s("TOKEN#"))
            .projection_expression("principal, host, #source, stored_at, version, endpoint")
            .expression_attribute_names("#source", "source")
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut entries = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(unavailable)?;
            for item in page.items() {
                entries.push(entry(item)?);
            }
        }
        Ok(entries)
    }

    async fn delete(&self, key: &TokenKey, expected: Option<u64>) -> Result<(), TokenStoreError> {
        let mut request = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key_item(key)));
        if let Some(v) = expected {
            // Absent is fine too: deleting a missing token succeeds.
            request = request
                .condition_expression("attribute_not_exists(pk) OR version = :v")
                .expression_attribute_values(":v", n(v));
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("ConditionalCheckFailedException") => {
                Err(TokenStoreError::Conflict)
            }
            Err(err) => Err(unavailable(err)),
        }
    }
}
