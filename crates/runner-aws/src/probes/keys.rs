//! The key checks: the KMS key (enabled, symmetric, usable) and the
//! runner's secret (holds a credential; never shown).

use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
use runner_core::error::chain;
use runner_core::traits::{Credentials, SecretError, SecretStore as _};

use super::{Outcome, Probes, aws_fail, fail};
use crate::error::AwsError;

impl Probes {
    /// `kms-key`: the key exists, is an enabled symmetric key, and makes and
    /// opens a data key (thrown away) under the runner's context.
    pub(super) async fn kms_key(&self) -> Outcome {
        let key = &self.settings.kms_key_id;
        let hint = "set RUNNER_KMS_KEY_ID to the stack's KmsKeyArn output";
        let use_hint = "the task role needs kms:GenerateDataKey and kms:Decrypt on the key (the stack grants them)";
        let metadata = match self.kms.describe_key().key_id(key).send().await {
            Ok(output) => output.key_metadata,
            Err(err) => {
                let err = AwsError::new(err);
                return if err.code() == Some("NotFoundException") {
                    fail(
                        format!("key {key} does not exist in {}", self.settings.region),
                        hint,
                    )
                } else if err.is_denied() {
                    fail(
                        err.text(),
                        "the task role needs kms:DescribeKey on the key (the stack grants it)",
                    )
                } else {
                    aws_fail(&err, hint)
                };
            }
        };
        let Some(metadata) = metadata else {
            return fail(format!("key {key} was not described"), hint);
        };
        if metadata.key_state() != Some(&KeyState::Enabled) {
            return fail(
                format!(
                    "key {key} is {}",
                    metadata
                        .key_state()
                        .map_or("in an unknown state", |s| s.as_str())
                ),
                "enable the key (or cancel its deletion)",
            );
        }
        if metadata
            .key_usage()
            .is_some_and(|u| *u != KeyUsageType::EncryptDecrypt)
            || metadata
                .key_spec()
                .is_some_and(|s| *s != KeySpec::SymmetricDefault)
        {
            return fail(format!("key {key} is not a symmetric encryption key"), hint);
        }
        let context = [
            ("purpose", "aws-runner doctor"),
            ("runner-id", self.settings.runner_id.as_str()),
        ];
        let mut generate = self
            .kms
            .generate_data_key()
            .key_id(key)
            .key_spec(DataKeySpec::Aes256);
        let mut decrypt = self.kms.decrypt().key_id(key);
        for (k, v) in context {
            generate = generate.encryption_context(k, v);
            decrypt = decrypt.encryption_context(k, v);
        }
        let blob = match generate.send().await {
            Ok(output) => output.ciphertext_blob,
            Err(err) => return aws_fail(&AwsError::new(err), use_hint),
        };
        let Some(blob) = blob else {
            return fail("GenerateDataKey returned no ciphertext", use_hint);
        };
        match decrypt.ciphertext_blob(blob).send().await {
            Ok(_) => Outcome::Pass(format!(
                "{}: enabled, symmetric; encrypts and decrypts",
                metadata.arn().unwrap_or(key)
            )),
            Err(err) => aws_fail(&AwsError::new(err), use_hint),
        }
    }

    /// `secret`: the runner's secret holds its access token and key, or an
    /// exchange token; `found` gets what it holds.
    pub(super) async fn secret(&self, found: &mut Option<Credentials>) -> Outcome {
        let secret = &self.settings.secret_id;
        let new_token = "create a new exchange token for this runner in the control plane and set it as the stack's ExchangeToken (or, without RUNNER_EXCHANGE_TOKEN_SECRET_ID, put it in the secret as plain text)";
        match self.secrets.load().await {
            Ok(credentials) => {
                let outcome = match (
                    &credentials.access_token,
                    &credentials.private_key,
                    &credentials.exchange_token,
                ) {
                    (Some(_), Some(_), _) => {
                        Outcome::Pass(format!("{secret} holds the runner's access token and key"))
                    }
                    (_, _, Some(_)) => Outcome::Pass(format!(
                        "{secret} holds an exchange token, which runnerd trades at its first start"
                    )),
                    _ => fail(
                        format!("{secret} holds no access token and no exchange token"),
                        new_token,
                    ),
                };
                *found = Some(credentials);
                outcome
            }
            Err(SecretError::Malformed(problem)) => fail(
                problem,
                format!(
                    "set RUNNER_SECRET_ID to the stack's SecretArn output; if it is that secret, {new_token}"
                ),
            ),
            Err(err) => fail(
                chain(&err),
                "set RUNNER_SECRET_ID to the stack's SecretArn output; the task role needs secretsmanager:GetSecretValue and PutSecretValue on it",
            ),
        }
    }
}
