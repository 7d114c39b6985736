//! The checkout credential each instance gets: prepared from the creator's
//! usable token before launch, bound to the instance, removed with it.

use async_trait::async_trait;
use runner_core::model::EnvironmentId;
use runner_core::scm::{self, Purpose, TokenKey};
use runner_core::traits::{Checkout, CheckoutError};
use secrecy::{ExposeSecret as _, SecretString};

use super::Scm;

#[async_trait]
impl Checkout for Scm {
    async fn prepare(
        &self,
        environment: EnvironmentId,
        creator: &str,
        repository_url: &str,
    ) -> Result<Option<String>, CheckoutError> {
        let host = scm::host_of(repository_url)
            .map_err(|e| CheckoutError::Invalid(format!("spec.content.repository_url: {e}")))?;
        if !self.synced() {
            return Err(CheckoutError::Unavailable(
                "the SCM integrations have not been listed yet".into(),
            ));
        }
        if self.integration(&host).is_none() {
            // No integration: the repository is cloned without credentials.
            self.anonymous.lock().expect("lock").insert(environment);
            return Ok(None);
        }
        let usable = self
            .usable(creator, &host)
            .await
            .map_err(|e| CheckoutError::Unavailable(Box::new(e)))?
            .ok_or_else(|| CheckoutError::AuthRequired(host.clone()))?;
        let header = SecretString::from(scm::authorization(
            usable.integration.kind,
            usable.source,
            usable.token.access_token.expose_secret(),
            Purpose::Git,
        ));
        let holder = TokenKey {
            principal: creator.to_owned(),
            host: host.clone(),
            source: usable.source,
        };
        let secret = self
            .secrets
            .put(environment, &header, &holder)
            .await
            .map_err(|e| CheckoutError::Unavailable(Box::new(e)))?;
        // A revocation that swept the secrets between the read and the put
        // missed this one: look again now that it is tagged.
        let still_stored = self
            .tokens
            .get(&holder)
            .await
            .map_err(|e| CheckoutError::Unavailable(Box::new(e)))?
            .is_some();
        if !still_stored {
            self.secrets
                .delete(environment)
                .await
                .map_err(|e| CheckoutError::Unavailable(Box::new(e)))?;
            return Err(CheckoutError::AuthRequired(host));
        }
        self.anonymous.lock().expect("lock").remove(&environment);
        Ok(Some(secret))
    }

    async fn bind(
        &self,
        environment: EnvironmentId,
        instance_id: &str,
    ) -> Result<(), CheckoutError> {
        if self.anonymous.lock().expect("lock").contains(&environment) {
            return Ok(());
        }
        self.secrets
            .bind(environment, instance_id)
            .await
            .map_err(|e| CheckoutError::Unavailable(Box::new(e)))
    }

    async fn remove(&self, environment: EnvironmentId) -> Result<(), CheckoutError> {
        self.secrets
            .delete(environment)
            .await
            .map_err(|e| CheckoutError::Unavailable(Box::new(e)))?;
        self.anonymous.lock().expect("lock").remove(&environment);
        Ok(())
    }
}
