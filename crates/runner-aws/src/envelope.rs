//! Envelope encryption with KMS: a fresh data key per value (GenerateDataKey,
//! AES-256), AES-256-GCM over the value, and one context bound twice: as the
//! KMS encryption context (the key only decrypts with it) and as the GCM
//! associated data (the ciphertext only opens with it). A value moved to
//! another record, principal or host therefore fails to decrypt.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use aws_sdk_kms::Client;
use aws_sdk_kms::types::DataKeySpec;
use rand::RngCore as _;
use zeroize::Zeroizing;

/// A sealed value, safe to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The data key, encrypted by KMS.
    pub encrypted_key: Vec<u8>,
    /// The GCM nonce.
    pub nonce: [u8; 12],
    /// The value, encrypted and authenticated.
    pub ciphertext: Vec<u8>,
}

/// Why sealing or opening failed. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// KMS refused or failed (a wrong context is refused here).
    #[error("KMS {operation} failed")]
    Kms {
        /// GenerateDataKey or Decrypt.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The data key or the ciphertext did not authenticate.
    #[error("the sealed value does not open with this context")]
    Open,
}

/// Seals and opens values under one KMS key.
#[derive(Debug, Clone)]
pub struct Envelope {
    client: Client,
    key_id: String,
}

fn associated_data(context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in context {
        // Length-prefixed, so that no two contexts serialize alike.
        for part in [k, v] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

/// The AES-256-GCM cipher of a plaintext data key from KMS.
fn cipher(data_key: Option<&aws_sdk_kms::primitives::Blob>) -> Result<Aes256Gcm, EnvelopeError> {
    let data_key = Zeroizing::new(
        data_key
            .map(|b| b.as_ref().to_vec())
            .ok_or(EnvelopeError::Open)?,
    );
    if data_key.len() != 32 {
        return Err(EnvelopeError::Open);
    }
    Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&data_key)))
}

impl Envelope {
    /// Under the KMS key `key_id` (id, ARN or alias).
    pub fn new(client: Client, key_id: &str) -> Self {
        Self {
            client,
            key_id: key_id.to_owned(),
        }
    }

    /// Seals `plaintext`, bound to `context`.
    pub async fn seal(
        &self,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Sealed, EnvelopeError> {
        let key = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| EnvelopeError::Kms {
                operation: "GenerateDataKey",
                source: crate::error::boxed(e),
            })?;
        let cipher = cipher(key.plaintext())?;
        let encrypted_key = key
            .ciphertext_blob()
            .map(|b| b.as_ref().to_vec())
            .ok_or(EnvelopeError::Open)?;
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = associated_data(context);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::Open)?;
        Ok(Sealed {
            encrypted_key,
            nonce,
            ciphertext,
        })
    }

    /// Opens `sealed` with the context it was sealed with.
    pub async fn open(
        &self,
        sealed: &Sealed,
        context: &BTreeMap<String, String>,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let key = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(
                sealed.encrypted_key.clone(),
            ))
            .set_encryption_context(Some(context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| {
                // A wrong context (a value moved elsewhere) is refused by KMS.
                if e.as_service_error().is_some_and(
                    aws_sdk_kms::operation::decrypt::DecryptError::is_invalid_ciphertext_exception,
                ) {
                    EnvelopeError::Open
                } else {
                    EnvelopeError::Kms {
                        operation: "Decrypt",
                        source: crate::error::boxed(e),
                    }
                }
            })?;
        let cipher = cipher(key.plaintext())?;
        let aad = associated_data(context);
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| EnvelopeError::Open)
    }
}
