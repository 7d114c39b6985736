//! The runner's credentials in Secrets Manager.
//!
//! Two secrets: the runner's own, which the stack creates empty (`{}`) and
//! only the runner writes (a JSON object with the access token and its X25519
//! private key), and the stack's exchange-token secret, whose value is the
//! `ExchangeToken` parameter (plain text). The exchange-token secret is read
//! only while the runner's secret holds no access token, and never written:
//! a stack update with a new exchange token cannot replace a credential.
//! Without an exchange-token secret, the runner's secret holds the exchange
//! token at first (as plain text) and the runner overwrites it. Values never
//! appear in errors or logs.

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runner_core::traits::{Credentials, SecretError, SecretKeyBytes, SecretStore};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The runner's secret, and the stack's exchange-token secret.
#[derive(Debug, Clone)]
pub struct SecretsManagerStore {
    client: Client,
    secret_id: String,
    exchange_token_secret_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exchange_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    private_key: Option<String>,
}

impl SecretsManagerStore {
    /// The secret `secret_id` (name or ARN).
    pub fn new(client: Client, secret_id: &str) -> Self {
        Self {
            client,
            secret_id: secret_id.to_owned(),
            exchange_token_secret_id: None,
        }
    }

    /// Takes the exchange token from the secret `id` (the stack's), read
    /// only while the runner's secret holds no access token.
    #[must_use]
    pub fn with_exchange_token_secret(mut self, id: Option<&str>) -> Self {
        self.exchange_token_secret_id = id.map(str::to_owned);
        self
    }

    async fn read(&self, id: &str) -> Result<Credentials, SecretError> {
        let output = self
            .client
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .map_err(|e| match e.code() {
                Some("ResourceNotFoundException") => {
                    SecretError::Malformed(format!("secret {id} does not exist"))
                }
                _ => SecretError::Unavailable(crate::error::boxed(e)),
            })?;
        parse(output.secret_string().unwrap_or_default())
    }
}

/// Reads a secret's text: a JSON object written by the runner, or the bare
/// exchange token the stack put there.
pub fn parse(text: &str) -> Result<Credentials, SecretError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Credentials::default());
    }
    if !text.starts_with('{') {
        return Ok(Credentials {
            exchange_token: Some(SecretString::from(text.to_owned())),
            ..Credentials::default()
        });
    }
    let stored: Stored = serde_json::from_str(text).map_err(|e| {
        SecretError::Malformed(format!(
            "not the runner's JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let private_key = match stored.private_key {
        None => None,
        Some(b64) => {
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(b64)
                    .map_err(|_| SecretError::Malformed("private_key is not base64".into()))?,
            );
            let key: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| SecretError::Malformed("private_key is not 32 bytes".into()))?;
            Some(SecretKeyBytes(key))
        }
    };
    Ok(Credentials {
        exchange_token: stored.exchange_token.map(SecretString::from),
        access_token: stored.access_token.map(SecretString::from),
        private_key,
    })
}

/// Writes credentials as the secret's JSON text.
pub fn render(credentials: &Credentials) -> Zeroizing<String> {
    let stored = Stored {
        exchange_token: credentials
            .exchange_token
            .as_ref()
            .map(|s| s.expose_secret().to_owned()),
        access_token: credentials
            .access_token
            .as_ref()
            .map(|s| s.expose_secret().to_owned()),
        private_key: credentials
            .private_key
            .as_ref()
            .map(|k| STANDARD.encode(k.0)),
    };
    Zeroizing::new(serde_json::to_string(&stored).expect("strings always serialize"))
}

#[async_trait]
impl SecretStore for SecretsManagerStore {
    async fn load(&self) -> Result<Credentials, SecretError> {
        let mut credentials = self.read(&self.secret_id).await?;
        if credentials.access_token.is_some() {
            return Ok(credentials);
        }
        if let Some(id) = &self.exchange_token_secret_id {
            credentials.exchange_token = self.read(id).await?.exchange_token;
        }
        Ok(credentials)
    }

    async fn save(&self, credentials: &Credentials) -> Result<(), SecretError> {
        let text = if self.exchange_token_secret_id.is_some() {
            // The exchange token stays in the stack's secret only.
            render(&Credentials {
                exchange_token: None,
                ..credentials.clone()
            })
        } else {
            render(credentials)
        };
        self.client
            .put_secret_value()
            .secret_id(&self.secret_id)
            .secret_string(text.as_str())
            .send()
            .await
            .map(drop)
            .map_err(|e| SecretError::Unavailable(crate::error::boxed(e)))
    }
}

/// Per-environment secrets, named `aws-runner/<runner id>/environments/<id>`
/// (the stack's environment role reads only that prefix, and only a secret
/// whose `aws-runner:instance-arn` tag is the reading instance).
///
/// The instance deletes its secret once its clone is done or has failed, so
/// a secret may be gone at any time: `put` creates it again, `bind` and
/// `delete` count "not found" as done. Right after a deletion Secrets
/// Manager may refuse to reuse the name for a short while; `put` then fails
/// as unavailable and the launch is retried with backoff.
#[derive(Debug, Clone)]
pub struct EnvironmentSecretsManager {
    client: Client,
    runner_id: String,
    kms_key_id: Option<String>,
    region: String,
    /// `arn:<partition>:...:<account>` prefix learned from a secret's ARN.
    arn_parts: std::sync::Arc<std::sync::OnceLock<(String, String)>>,
}

fn not_found(code: Option<&str>) -> bool {
    code == Some("ResourceNotFoundException")
}

/// The `aws-runner:holder` tag of a secret holding `holder`'s token: a
/// digest, so the tag names no user. Revocation finds the secrets by it.
pub fn holder_tag(holder: &runner_core::scm::TokenKey) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(holder.principal.as_bytes())
        .chain_update([0])
        .chain_update(holder.host.as_bytes())
        .chain_update([0])
        .chain_update(holder.source.as_str().as_bytes())
        .finalize();
    digest.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

const HOLDER_TAG: &str = "aws-runner:holder";

impl EnvironmentSecretsManager {
    /// Secrets of `runner_id`'s environments, encrypted under `kms_key_id`
    /// (the account's default key when `None`).
    pub fn new(client: Client, runner_id: &str, kms_key_id: Option<&str>, region: &str) -> Self {
        Self {
            client,
            runner_id: runner_id.to_owned(),
            kms_key_id: kms_key_id.map(str::to_owned),
            region: region.to_owned(),
            arn_parts: std::sync::Arc::default(),
        }
    }

    /// The secret name of an environment.
    pub fn name(&self, environment: runner_core::model::EnvironmentId) -> String {
        format!("aws-runner/{}/environments/{environment}", self.runner_id)
    }

    fn learn(&self, arn: Option<&str>) {
        // arn:<partition>:secretsmanager:<region>:<account>:secret:<name>
        if let Some(arn) = arn {
            let parts: Vec<&str> = arn.splitn(6, ':').collect();
            if parts.len() == 6 {
                let _ = self
                    .arn_parts
                    .set((parts[1].to_owned(), parts[4].to_owned()));
            }
        }
    }

    async fn create(
        &self,
        name: &str,
        environment: runner_core::model::EnvironmentId,
        value: &SecretString,
        holder: &str,
    ) -> Result<
        Option<String>,
        aws_sdk_secretsmanager::error::SdkError<
            aws_sdk_secretsmanager::operation::create_secret::CreateSecretError,
        >,
    > {
        use aws_sdk_secretsmanager::types::Tag;
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        let output = self
            .client
            .create_secret()
            .name(name)
            .description("aws-runner: an environment's repository credential")
            .secret_string(value.expose_secret())
            .set_kms_key_id(self.kms_key_id.clone())
            .tags(tag("aws-runner:runner-id", &self.runner_id))
            .tags(tag("aws-runner:environment-id", &environment.to_string()))
            .tags(tag("aws-runner:managed-by", "aws-runner"))
            .tags(tag(HOLDER_TAG, holder))
            .send()
            .await?;
        Ok(output.arn)
    }
}

#[async_trait]
impl runner_core::traits::EnvironmentSecrets for EnvironmentSecretsManager {
    async fn put(
        &self,
        environment: runner_core::model::EnvironmentId,
        value: &SecretString,
        holder: &runner_core::scm::TokenKey,
    ) -> Result<String, SecretError> {
        use aws_sdk_secretsmanager::types::Tag;
        let name = self.name(environment);
        let holder = holder_tag(holder);
        let unavailable = |e: Box<dyn std::error::Error + Send + Sync>| SecretError::Unavailable(e);
        let overwrite = async || {
            self.client
                .put_secret_value()
                .secret_id(&name)
                .secret_string(value.expose_secret())
                .send()
                .await
        };
        let retag = async || {
            self.client
                .tag_resource()
                .secret_id(&name)
                .tags(Tag::builder().key(HOLDER_TAG).value(&holder).build())
                .send()
                .await
                .map(drop)
                .map_err(|e| unavailable(crate::error::boxed(e)))
        };
        match overwrite().await {
            Ok(output) => {
                self.learn(output.arn());
                retag().await?;
            }
            Err(err) if not_found(err.code()) => {
                match self.create(&name, environment, value, &holder).await {
                    Ok(arn) => self.learn(arn.as_deref()),
                    // Created concurrently: overwrite.
                    Err(err) if err.code() == Some("ResourceExistsException") => {
                        let output = overwrite()
                            .await
                            .map_err(|e| unavailable(crate::error::boxed(e)))?;
                        self.learn(output.arn());
                        retag().await?;
                    }
                    Err(err) => return Err(unavailable(crate::error::boxed(err))),
                }
            }
            Err(err) => return Err(unavailable(crate::error::boxed(err))),
        }
        Ok(name)
    }

    async fn bind(
        &self,
        environment: runner_core::model::EnvironmentId,
        instance_id: &str,
    ) -> Result<(), SecretError> {
        use aws_sdk_secretsmanager::types::Tag;
        let name = self.name(environment);
        if self.arn_parts.get().is_none() {
            match self.client.describe_secret().secret_id(&name).send().await {
                Ok(output) => self.learn(output.arn()),
                Err(err) if not_found(err.code()) => return Ok(()),
                Err(err) => return Err(SecretError::Unavailable(crate::error::boxed(err))),
            }
        }
        let Some((partition, account)) = self.arn_parts.get() else {
            return Err(SecretError::Malformed(format!(
                "secret {name} has no parsable ARN"
            )));
        };
        let instance_arn = format!(
            "arn:{partition}:ec2:{}:{account}:instance/{instance_id}",
            self.region
        );
        match self
            .client
            .tag_resource()
            .secret_id(&name)
            .tags(
                Tag::builder()
                    .key("aws-runner:instance-arn")
                    .value(instance_arn)
                    .build(),
            )
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // No credential for this environment: nothing to bind.
            Err(err) if not_found(err.code()) => Ok(()),
            Err(err) => Err(SecretError::Unavailable(crate::error::boxed(err))),
        }
    }

    async fn delete(
        &self,
        environment: runner_core::model::EnvironmentId,
    ) -> Result<(), SecretError> {
        match self
            .client
            .delete_secret()
            .secret_id(self.name(environment))
            .force_delete_without_recovery(true)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if not_found(err.code()) => Ok(()),
            Err(err) => Err(SecretError::Unavailable(crate::error::boxed(err))),
        }
    }

    async fn delete_holding(
        &self,
        holder: &runner_core::scm::TokenKey,
    ) -> Result<usize, SecretError> {
        use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
        let prefix = format!("aws-runner/{}/environments/", self.runner_id);
        let tag = holder_tag(holder);
        let mut pages = self
            .client
            .list_secrets()
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values(&prefix)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::TagValue)
                    .values(&tag)
                    .build(),
            )
            .into_paginator()
            .send();
        let mut names = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| SecretError::Unavailable(crate::error::boxed(e)))?;
            for secret in page.secret_list() {
                // The filters match by prefix and on any tag: check exactly.
                let holds = secret
                    .tags()
                    .iter()
                    .any(|t| t.key() == Some(HOLDER_TAG) && t.value() == Some(tag.as_str()));
                match secret.name() {
                    Some(name) if holds && name.starts_with(&prefix) => names.push(name.to_owned()),
                    _ => {}
                }
            }
        }
        for name in &names {
            match self
                .client
                .delete_secret()
                .secret_id(name)
                .force_delete_without_recovery(true)
                .send()
                .await
            {
                Ok(_) => {}
                Err(err) if not_found(err.code()) => {}
                Err(err) => return Err(SecretError::Unavailable(crate::error::boxed(err))),
            }
        }
        Ok(names.len())
    }
}
