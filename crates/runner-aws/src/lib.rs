//! AWS adapters for the runner's core traits: the DynamoDB state store,
//! leader lease and token store, EC2 compute, the Secrets Manager credential
//! store and per-environment secrets, KMS envelope encryption, and
//! self-update through ECS; and the setup checks of the account
//! (`probes`), which `runnerd doctor` and the daemon's start run.
//!
//! Adapters translate and classify errors once; they never decide policy.
//! Every client is pinned to the configured region, and built here: the
//! daemon links no AWS service crate. `AWS_ENDPOINT_URL` (as the SDK reads
//! it) points them at emulated AWS in tests.

pub mod dynamo;
pub mod ec2;
pub mod ecs;
pub mod envelope;
pub mod error;
pub mod probes;
pub mod secrets;
pub mod tokens;

use std::sync::Arc;

pub use aws_config::SdkConfig;
use aws_config::{BehaviorVersion, Region};
use runner_core::leader::Leadership;
use runner_core::update::{Attempts, Deployer};

/// The shared SDK configuration, pinned to `region`.
pub async fn sdk_config(region: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .load()
        .await
}

/// `sdk` with an HTTP client of its own (its own connection pool), the
/// SDK's default one otherwise: requests on it never wait behind the
/// others' connections.
fn with_own_http_client(sdk: &SdkConfig) -> SdkConfig {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::{Builder, ConnectorBuilder, tls};
    let client = Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector = ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    });
    sdk.to_builder().http_client(client).build()
}

/// The leader lease on its own DynamoDB client and connection pool, so that
/// renewals never queue behind bulk work; the same table and holder as
/// [`Adapters::store`].
pub fn lease(
    sdk: &SdkConfig,
    settings: &AdapterSettings,
    leadership: &Arc<Leadership>,
) -> Arc<dynamo::DynamoStore> {
    Arc::new(dynamo::DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&with_own_http_client(sdk)),
        &settings.table,
        &settings.runner_id,
        &settings.holder,
        leadership.clone(),
    ))
}

/// Where the runner's AWS resources are.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    /// The DynamoDB table.
    pub table: String,
    /// This runner's id.
    pub runner_id: String,
    /// This replica's name in the lease.
    pub holder: String,
    /// The runner's Secrets Manager secret (its credential).
    pub secret_id: String,
    /// The stack's exchange-token secret; `None`: the exchange token is in
    /// the runner's secret.
    pub exchange_token_secret_id: Option<String>,
    /// The KMS key for users' tokens and environments' secrets.
    pub kms_key_id: String,
    /// EC2 settings.
    pub ec2: ec2::Ec2Settings,
}

/// The adapters, built on one SDK configuration.
#[derive(Debug)]
pub struct Adapters {
    /// State store and lease.
    pub store: Arc<dynamo::DynamoStore>,
    /// Compute.
    pub compute: Arc<ec2::Ec2Compute>,
    /// Credentials.
    pub secrets: Arc<secrets::SecretsManagerStore>,
    /// Users' host tokens.
    pub tokens: Arc<tokens::DynamoTokenStore>,
    /// Environments' checkout secrets.
    pub environment_secrets: Arc<secrets::EnvironmentSecretsManager>,
}

/// Builds every adapter; mutations and writes are fenced by `leadership`.
pub fn adapters(
    sdk: &SdkConfig,
    settings: &AdapterSettings,
    leadership: &Arc<Leadership>,
) -> Adapters {
    Adapters {
        store: Arc::new(dynamo::DynamoStore::new(
            aws_sdk_dynamodb::Client::new(sdk),
            &settings.table,
            &settings.runner_id,
            &settings.holder,
            leadership.clone(),
        )),
        compute: Arc::new(ec2::Ec2Compute::new(
            aws_sdk_ec2::Client::new(sdk),
            settings.ec2.clone(),
            leadership.clone(),
        )),
        secrets: Arc::new(
            secrets::SecretsManagerStore::new(
                aws_sdk_secretsmanager::Client::new(sdk),
                &settings.secret_id,
            )
            .with_exchange_token_secret(settings.exchange_token_secret_id.as_deref()),
        ),
        tokens: Arc::new(tokens::DynamoTokenStore::new(
            aws_sdk_dynamodb::Client::new(sdk),
            &settings.table,
            &settings.runner_id,
            envelope::Envelope::new(aws_sdk_kms::Client::new(sdk), &settings.kms_key_id),
        )),
        environment_secrets: Arc::new(secrets::EnvironmentSecretsManager::new(
            aws_sdk_secretsmanager::Client::new(sdk),
            &settings.runner_id,
            Some(&settings.kms_key_id),
            &settings.ec2.region,
        )),
    }
}

/// The runner's own ECS service, found from the task metadata at
/// `metadata_uri` (self-update).
pub fn ecs_deployer(sdk: &SdkConfig, metadata_uri: &str) -> Arc<dyn Deployer> {
    Arc::new(ecs::EcsDeployer::new(
        aws_sdk_ecs::Client::new(sdk),
        metadata_uri,
    ))
}

/// The self-update attempt record of `runner_id` in `table`.
pub fn update_attempts(sdk: &SdkConfig, table: &str, runner_id: &str) -> Arc<dyn Attempts> {
    Arc::new(dynamo::DynamoAttempts::new(
        aws_sdk_dynamodb::Client::new(sdk),
        table,
        runner_id,
    ))
}
