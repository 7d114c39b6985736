//! Integration sync: the known integrations replaced by each listing, and
//! the stored tokens they no longer allow revoked.

use std::collections::BTreeSet;
use std::time::SystemTime;

use runner_core::scm::{self, Held, Integration, Live};
use runner_core::traits::{SecretError, TokenStoreError};

use super::Scm;

/// Why a sync or a deletion could not finish (it is retried). Never
/// carries a token.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The token store failed.
    #[error(transparent)]
    Tokens(#[from] TokenStoreError),
    /// The environment secrets failed.
    #[error(transparent)]
    Secrets(#[from] SecretError),
}

impl Scm {
    /// Replaces the known integrations with a fresh list taken at
    /// `listed_at`, then (when `authenticated` is given: every integration
    /// was well formed and the control plane's list of (principal, host)
    /// pairs was read whole) deletes every stored token they no longer
    /// allow, after the environment secrets that hold it. Returns how many
    /// tokens were deleted.
    pub async fn sync(
        &self,
        integrations: Vec<Integration>,
        authenticated: Option<BTreeSet<(String, String)>>,
        listed_at: SystemTime,
    ) -> Result<usize, SyncError> {
        {
            let mut known = self.known.write().expect("lock");
            known.integrations = integrations.clone();
            known.listed_at = Some(listed_at);
        }
        let Some(authenticated) = authenticated else {
            return Ok(0);
        };
        let entries = self.tokens.list().await?;
        let live = Live {
            integrations: &integrations,
            authenticated: &authenticated,
            listed_at,
        };
        let revoked = scm::revoked(
            entries.iter().map(|e| Held {
                key: &e.key,
                stored_at: e.stored_at,
                binding: e.binding.as_deref(),
            }),
            &live,
        );
        let mut deleted = 0;
        for (key, why) in &revoked {
            let version = entries.iter().find(|e| &e.key == key).map(|e| e.version);
            if self.revoke(key, version).await? {
                deleted += 1;
                tracing::info!(
                    principal = %key.principal,
                    host = %key.host,
                    source = key.source.as_str(),
                    reason = why.as_str(),
                    "deleted a revoked token"
                );
            }
        }
        Ok(deleted)
    }
}
