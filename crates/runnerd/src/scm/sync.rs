//! Integration sync: the task that lists the integrations (on every event,
//! reconnect and resync), the known integrations replaced by each listing,
//! and the stored tokens they no longer allow revoked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runner_core::retry::{Failures, Policy};
use runner_core::scm::{self, Held, Integration, Live};
use runner_core::traits::{SecretError, TokenStoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Scm, integration_from_proto};
use crate::control_plane::{self, Client};
use crate::health::chain;
use crate::session::ScmEvent;

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
    /// The integrations or the authenticated users could not be listed.
    #[error(transparent)]
    List(#[from] control_plane::Error),
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

/// Retries of a failed sync: from 0.5 s, doubling, up to 1 min, full jitter.
const RETRY: Policy =
    Policy::new(Duration::from_millis(500), Duration::from_secs(60)).full_jitter();

/// Keeps the SCM integrations in sync (on every event, reconnect and
/// resync) and applies their revocations; deletes tokens on request. A
/// failed sync or deletion is retried with backoff, without end: the next
/// full sync deletes whatever a failed or missed deletion left.
pub(crate) async fn scm_sync(
    scm: Arc<Scm>,
    control_plane: Client,
    mut events: mpsc::Receiver<ScmEvent>,
    resync: Duration,
    shutdown: CancellationToken,
) {
    let mut failures = Failures::new(RETRY);
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
            event = events.recv() => match event {
                None => return,
                Some(ScmEvent::Resync) => {}
                Some(ScmEvent::TokenDeleted { principal, host }) => {
                    if let Err(err) = scm.delete_tokens(&principal, &host).await {
                        // The control plane no longer lists the pair: a
                        // full sync deletes it.
                        tracing::warn!(error = %chain(&err), host = %host, "cannot delete the user's tokens now; a sync will");
                    } else {
                        continue;
                    }
                }
            },
        }
        let listed_at = scm.clock.now();
        let result = match (
            control_plane.list_integrations().await,
            control_plane.list_host_tokens().await,
        ) {
            (Ok(list), Ok(authenticated)) => {
                let listed = list.len();
                let integrations = list
                    .into_iter()
                    .filter_map(|i| {
                        integration_from_proto(i)
                            .map_err(|problem| tracing::warn!(problem = %problem, "skipping a malformed SCM integration"))
                            .ok()
                    })
                    .collect::<Vec<_>>();
                let count = integrations.len();
                // A malformed integration's tokens must not look revoked.
                let authenticated = (count == listed).then_some(authenticated);
                scm.sync(integrations, authenticated, listed_at)
                    .await
                    .map(|revoked| (count, revoked))
            }
            (Err(err), _) | (_, Err(err)) => Err(SyncError::List(err)),
        };
        match result {
            Ok((integrations, revoked)) => {
                failures.reset();
                tracing::debug!(integrations, revoked, "SCM integrations synced");
                next = tokio::time::Instant::now() + resync;
            }
            Err(err) => {
                tracing::warn!(error = %chain(&err), "cannot sync the SCM integrations; retrying");
                next = tokio::time::Instant::now() + failures.failed();
            }
        }
    }
}
