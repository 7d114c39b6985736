//! The runner's credentials in Secrets Manager.
//!
//! The stack creates the secret holding only the exchange token (as plain
//! text). The runner overwrites it with a JSON object holding the access
//! token and its X25519 private key. Values never appear in errors or logs.

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runner_core::traits::{Credentials, SecretError, SecretKeyBytes, SecretStore};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The runner's secret.
#[derive(Debug, Clone)]
pub struct SecretsManagerStore {
    client: Client,
    secret_id: String,
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
        }
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
        let output = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .send()
            .await
            .map_err(|e| match e.code() {
                Some("ResourceNotFoundException") => {
                    SecretError::Malformed(format!("secret {} does not exist", self.secret_id))
                }
                _ => SecretError::Unavailable(Box::new(e)),
            })?;
        parse(output.secret_string().unwrap_or_default())
    }

    async fn save(&self, credentials: &Credentials) -> Result<(), SecretError> {
        let text = render(credentials);
        self.client
            .put_secret_value()
            .secret_id(&self.secret_id)
            .secret_string(text.as_str())
            .send()
            .await
            .map(drop)
            .map_err(|e| SecretError::Unavailable(Box::new(e)))
    }
}
