//! Users' host tokens in DynamoDB (envelope-encrypted with KMS) and
//! environments' checkout secrets in Secrets Manager, on moto.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use runner_core::model::EnvironmentId;
use runner_core::scm::{AuthSource, TokenKey};
use runner_core::traits::{EnvironmentSecrets as _, HostToken, TokenStore as _, TokenStoreError};
use secrecy::{ExposeSecret as _, SecretString};

use crate::{Infra, leading, moto_url, sdk};

fn key(principal: &str, host: &str, source: AuthSource) -> TokenKey {
    TokenKey {
        principal: principal.into(),
        host: host.into(),
        source,
    }
}

fn token(access: &str, refresh: Option<&str>) -> HostToken {
    HostToken {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: refresh.map(|r| SecretString::from(r.to_owned())),
        expires_at: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(4_000_000_000)),
        username: "alice-gh".into(),
        binding: Some(BINDING.into()),
    }
}

const BINDING: &str = "https://api.github.com/ https://github.com/login/oauth/access_token";

/// Every attribute of every item in the table, as text.
pub(crate) async fn table_dump(sdk: &aws_config::SdkConfig, table: &str) -> String {
    let items = aws_sdk_dynamodb::Client::new(sdk)
        .scan()
        .table_name(table)
        .send()
        .await
        .expect("scan (test inspection only)")
        .items
        .unwrap_or_default();
    let mut out = String::new();
    for item in items {
        for (name, value) in item {
            let text = match value {
                AttributeValue::B(b) => String::from_utf8_lossy(b.as_ref()).into_owned(),
                other => format!("{other:?}"),
            };
            out.push_str(&format!("{name}={text}\n"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_bound_to_their_key_and_written_conditionally() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let tokens = infra.adapters(&sdk, "a", &leading()).tokens;
    let alice = key("alice", "github.com", AuthSource::OAuth);
    let secret = "gho_16C7e42F292c6912E7710c838347Ae178B4a";
    let refresh =
        "ghr_1B4a2e77838347a7E420ce178F2E7c6912E169246c34E1ccbF66C46812d16D5B1A9Dc86A1498";

    assert!(tokens.get(&alice).await.expect("get").is_none());
    let v1 = tokens
        .put(&alice, &token(secret, Some(refresh)), Some(0))
        .await
        .expect("first write");
    let stored = tokens.get(&alice).await.expect("get").expect("stored");
    assert_eq!(stored.token.access_token.expose_secret(), secret);
    assert_eq!(
        stored
            .token
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_owned()),
        Some(refresh.to_owned())
    );
    assert_eq!(stored.token.username, "alice-gh");
    assert_eq!(stored.token.binding.as_deref(), Some(BINDING));
    assert_eq!(stored.version, v1);

    // No value in plaintext anywhere in the table.
    let dump = table_dump(&sdk, &infra.table).await;
    assert!(dump.contains("TOKEN#github.com#oauth#alice"), "{dump}");
    assert!(!dump.contains(secret) && !dump.contains(refresh), "{dump}");

    // Conditional on the version: a stale writer loses.
    assert!(matches!(
        tokens.put(&alice, &token("gho_other", None), Some(0)).await,
        Err(TokenStoreError::Conflict)
    ));
    let v2 = tokens
        .put(&alice, &token("gho_newer", None), Some(v1))
        .await
        .expect("write at the current version");
    assert_eq!(v2, v1 + 1);

    // An item copied to another principal, or another host, does not decrypt.
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let item = dynamo
        .get_item()
        .table_name(&infra.table)
        .key(
            "pk",
            AttributeValue::S(format!("RUNNER#{}", infra.runner_id)),
        )
        .key(
            "sk",
            AttributeValue::S("TOKEN#github.com#oauth#alice".into()),
        )
        .send()
        .await
        .expect("raw get")
        .item
        .expect("item");
    for moved in [
        key("mallory", "github.com", AuthSource::OAuth),
        key("alice", "gitlab.com", AuthSource::OAuth),
        key("alice", "github.com", AuthSource::Pat),
    ] {
        let mut copy: HashMap<String, AttributeValue> = item.clone();
        copy.insert(
            "sk".into(),
            AttributeValue::S(format!(
                "TOKEN#{}#{}#{}",
                moved.host,
                moved.source.as_str(),
                moved.principal
            )),
        );
        copy.insert(
            "principal".into(),
            AttributeValue::S(moved.principal.clone()),
        );
        copy.insert("host".into(), AttributeValue::S(moved.host.clone()));
        copy.insert(
            "source".into(),
            AttributeValue::S(moved.source.as_str().into()),
        );
        dynamo
            .put_item()
            .table_name(&infra.table)
            .set_item(Some(copy))
            .send()
            .await
            .expect("copy the item");
        assert!(
            matches!(
                tokens.get(&moved).await,
                Err(TokenStoreError::Undecryptable)
            ),
            "a copy moved to {moved:?} decrypted"
        );
    }

    // The endpoint is bound too: an item pointed at other endpoints, or
    // stripped of its endpoint, does not decrypt.
    let elsewhere = key("alice", "github.com", AuthSource::OAuth);
    for endpoint in [
        Some("https://evil.example/ https://evil.example/login/oauth/access_token"),
        None,
    ] {
        let mut copy: HashMap<String, AttributeValue> = item.clone();
        match endpoint {
            Some(e) => copy.insert("endpoint".into(), AttributeValue::S(e.into())),
            None => copy.remove("endpoint"),
        };
        dynamo
            .put_item()
            .table_name(&infra.table)
            .set_item(Some(copy))
            .send()
            .await
            .expect("rewrite the item");
        assert!(
            matches!(
                tokens.get(&elsewhere).await,
                Err(TokenStoreError::Undecryptable)
            ),
            "a token re-pointed at {endpoint:?} decrypted"
        );
    }
    dynamo
        .put_item()
        .table_name(&infra.table)
        .set_item(Some(item.clone()))
        .send()
        .await
        .expect("restore the item");
    let listed = tokens.list().await.expect("list");
    assert!(
        listed.iter().all(|e| e.binding.as_deref() == Some(BINDING)),
        "{listed:?}"
    );

    // Deletion conditional on the version: a stale deleter loses.
    let current = tokens.get(&alice).await.expect("get").expect("stored");
    assert!(matches!(
        tokens.delete(&alice, Some(current.version - 1)).await,
        Err(TokenStoreError::Conflict)
    ));
    assert!(tokens.get(&alice).await.expect("get").is_some(), "kept");

    let listed = tokens.list().await.expect("list");
    assert_eq!(listed.len(), 4, "{listed:?}");
    for entry in listed {
        tokens
            .delete(&entry.key, Some(entry.version))
            .await
            .expect("delete at its version");
        tokens
            .delete(&entry.key, Some(entry.version))
            .await
            .expect("deleting twice succeeds");
        tokens
            .delete(&entry.key, None)
            .await
            .expect("and unconditionally");
    }
    assert!(tokens.list().await.expect("list").is_empty());
    // The records' query still sees only records.
    assert!(
        runner_core::traits::StateStore::list(infra.adapters(&sdk, "a", &leading()).store.as_ref())
            .await
            .expect("records")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_secret_is_created_overwritten_bound_to_its_instance_and_deleted() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let secrets = infra.adapters(&sdk, "a", &leading()).environment_secrets;
    let sm = aws_sdk_secretsmanager::Client::new(&sdk);
    let env = EnvironmentId(uuid::Uuid::new_v4());

    let alice = key("alice", "github.com", AuthSource::OAuth);
    let bob = key("bob", "github.com", AuthSource::OAuth);
    let id = secrets
        .put(env, &SecretString::from("Basic first".to_owned()), &bob)
        .await
        .expect("create");
    assert_eq!(
        id,
        format!("aws-runner/{}/environments/{env}", infra.runner_id)
    );
    let id2 = secrets
        .put(env, &SecretString::from("Basic second".to_owned()), &alice)
        .await
        .expect("overwrite");
    assert_eq!(id, id2);
    let value = sm
        .get_secret_value()
        .secret_id(&id)
        .send()
        .await
        .expect("read back");
    assert_eq!(value.secret_string(), Some("Basic second"));

    secrets
        .bind(env, "i-0123456789abcdef0")
        .await
        .expect("bind");
    let described = sm
        .describe_secret()
        .secret_id(&id)
        .send()
        .await
        .expect("describe");
    let tags: HashMap<String, String> = described
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tags.get("aws-runner:instance-arn").map(String::as_str),
        Some(
            format!(
                "arn:aws:ec2:{}:123456789012:instance/i-0123456789abcdef0",
                crate::REGION
            )
            .as_str()
        ),
        "{tags:?}"
    );
    assert_eq!(
        tags.get("aws-runner:environment-id"),
        Some(&env.to_string())
    );
    assert!(
        tags.values()
            .all(|v| !v.contains("second") && !v.contains("alice")),
        "no value, and no user, in the tags: {tags:?}"
    );
    assert_eq!(
        tags.get("aws-runner:holder"),
        Some(&runner_aws::secrets::holder_tag(&alice)),
        "the holder follows the overwrite"
    );

    // Revoking a token deletes the secrets holding it, and only those.
    let other = EnvironmentId(uuid::Uuid::new_v4());
    let third = EnvironmentId(uuid::Uuid::new_v4());
    for (e, holder) in [(other, &alice), (third, &bob)] {
        secrets
            .put(e, &SecretString::from("Basic x".to_owned()), holder)
            .await
            .expect("create");
    }
    assert_eq!(secrets.delete_holding(&alice).await.expect("revoke"), 2);
    assert_eq!(secrets.delete_holding(&alice).await.expect("again"), 0);
    for (e, exists) in [(env, false), (other, false), (third, true)] {
        let described = sm
            .describe_secret()
            .secret_id(secrets_name(&infra, e))
            .send()
            .await;
        assert_eq!(described.is_ok(), exists, "{e:?}");
    }
    secrets.delete(third).await.expect("delete");
    secrets
        .put(env, &SecretString::from("Basic second".to_owned()), &alice)
        .await
        .expect("create again after the revocation");

    secrets.delete(env).await.expect("delete");
    secrets.delete(env).await.expect("deleting twice succeeds");
    assert!(sm.describe_secret().secret_id(&id).send().await.is_err());
    // Binding an environment without a secret is a no-op.
    secrets
        .bind(EnvironmentId(uuid::Uuid::new_v4()), "i-0123456789abcdef1")
        .await
        .expect("nothing to bind");
}

fn secrets_name(infra: &crate::Infra, environment: EnvironmentId) -> String {
    format!("aws-runner/{}/environments/{environment}", infra.runner_id)
}
