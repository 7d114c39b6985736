//! Users' host tokens: stored (a personal access token, or an OAuth code
//! traded), found usable, refreshed before they expire, and revoked with the
//! checkout secrets that hold them.

use std::time::SystemTime;

use runner_core::scm::{self, AuthSource, Integration, TokenKey};
use runner_core::sealed::{self, Binding};
use runner_core::traits::{HostToken, TokenStoreError};
use runner_core::validate;
use runner_proto::pb;
use runner_scm::ScmErrorKind;
use secrecy::{ExposeSecret as _, SecretString};

use super::sync::SyncError;
use super::{CallError, REFRESH_MARGIN, Scm, Usable, provider_error, store_unavailable};
use crate::health::chain;

impl Scm {
    /// Deletes the environment secrets holding `key`'s token, then the
    /// token (only at `version`, when given). False when the token changed
    /// meanwhile (the user stored a new one): it is kept.
    pub(super) async fn revoke(
        &self,
        key: &TokenKey,
        version: Option<u64>,
    ) -> Result<bool, SyncError> {
        let secrets = self.secrets.delete_holding(key).await?;
        if secrets > 0 {
            tracing::info!(
                principal = %key.principal,
                host = %key.host,
                secrets,
                "deleted the checkout secrets holding a revoked token"
            );
        }
        match self.tokens.delete(key, version).await {
            Ok(()) => Ok(true),
            Err(TokenStoreError::Conflict) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// `host_token_deleted`: forgets the principal's tokens for the host and
    /// the checkout secrets holding them.
    pub async fn delete_tokens(&self, principal: &str, host: &str) -> Result<(), SyncError> {
        for source in [AuthSource::OAuth, AuthSource::Pat] {
            let key = TokenKey {
                principal: principal.to_owned(),
                host: host.to_owned(),
                source,
            };
            self.revoke(&key, None).await?;
        }
        tracing::info!(principal = %principal, host = %host, "deleted the user's tokens for the host");
        Ok(())
    }

    /// `store_host_token`: opens, validates and stores a personal access
    /// token; returns the account it authenticates as.
    pub async fn store_pat(
        &self,
        principal: &str,
        host: &str,
        sealed: &[u8],
    ) -> Result<String, CallError> {
        Self::check_principal_host(principal, host)?;
        let integration = self.integration_for_call(host)?;
        if !integration.pat_enabled {
            return Err(CallError::precondition(format!(
                "personal access tokens are disabled for {host}"
            )));
        }
        let endpoints = Self::endpoints(&integration)?;
        let token = self.open(
            sealed,
            Binding {
                purpose: sealed::Purpose::Pat,
                principal,
                host,
            },
        )?;
        let username = self
            .client
            .whoami(integration.kind, AuthSource::Pat, &endpoints, &token)
            .await
            .map_err(|e| provider_error(&e, host, "validate the token"))?;
        self.same_account(principal, host, AuthSource::Pat, &username)
            .await?;
        let key = TokenKey {
            principal: principal.to_owned(),
            host: host.to_owned(),
            source: AuthSource::Pat,
        };
        let stored = HostToken {
            access_token: token,
            refresh_token: None,
            expires_at: None,
            username: username.clone(),
            binding: Some(endpoints.binding()),
        };
        self.tokens
            .put(&key, &stored, None)
            .await
            .map_err(|e| store_unavailable(&e))?;
        tracing::info!(principal = %principal, host = %host, username = %username, "stored a personal access token");
        Ok(username)
    }

    fn client_secret(
        &self,
        integration: &Integration,
    ) -> Result<(String, SecretString), CallError> {
        let app = integration.oauth.as_ref().ok_or_else(|| {
            CallError::precondition(format!("OAuth is not enabled for {}", integration.host))
        })?;
        let secret = self
            .open(
                &app.sealed_client_secret,
                Binding {
                    purpose: sealed::Purpose::OAuthClientSecret,
                    principal: "",
                    host: &integration.host,
                },
            )
            .map_err(|e| {
                CallError::precondition(format!(
                    "the OAuth client secret of {} cannot be used ({}); set it again",
                    integration.host, e.message
                ))
            })?;
        Ok((app.client_id.clone(), secret))
    }

    /// `exchange_oauth_code`: trades the code at the provider and stores the
    /// token; returns when it expires.
    pub async fn exchange_oauth(
        &self,
        request: pb::ExchangeOauthCode,
    ) -> Result<Option<SystemTime>, CallError> {
        let pb::ExchangeOauthCode {
            principal,
            host,
            code,
            redirect_uri,
            code_verifier,
        } = request;
        let code = SecretString::from(code);
        Self::check_principal_host(&principal, &host)?;
        if code.expose_secret().is_empty() {
            return Err(CallError::invalid("code: must not be empty"));
        }
        validate::text("redirect_uri", &redirect_uri, 2048)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        let integration = self.integration_for_call(&host)?;
        let endpoints = Self::endpoints(&integration)?;
        let (client_id, client_secret) = self.client_secret(&integration)?;
        let set = self
            .client
            .exchange_code(
                integration.kind,
                &endpoints,
                &client_id,
                &client_secret,
                &code,
                &redirect_uri,
                (!code_verifier.is_empty()).then_some(code_verifier.as_str()),
            )
            .await
            .map_err(|e| provider_error(&e, &host, "exchange the code"))?;
        let username = self
            .client
            .whoami(
                integration.kind,
                AuthSource::OAuth,
                &endpoints,
                &set.access_token,
            )
            .await
            .map_err(|e| provider_error(&e, &host, "identify the OAuth token"))?;
        self.same_account(&principal, &host, AuthSource::OAuth, &username)
            .await?;
        let token = HostToken {
            access_token: set.access_token,
            refresh_token: set.refresh_token,
            expires_at: set.expires_at,
            username: username.clone(),
            binding: Some(endpoints.binding()),
        };
        let key = TokenKey {
            principal: principal.clone(),
            host: host.clone(),
            source: AuthSource::OAuth,
        };
        self.tokens
            .put(&key, &token, None)
            .await
            .map_err(|e| store_unavailable(&e))?;
        tracing::info!(principal = %principal, host = %host, username = %username, "stored an OAuth token");
        Ok(token.expires_at)
    }

    /// The principal's usable token for the host, OAuth first, refreshing
    /// one that expires soon. Tokens that no longer work are deleted.
    pub(super) async fn usable(
        &self,
        principal: &str,
        host: &str,
    ) -> Result<Option<Usable>, TokenStoreError> {
        let Some(integration) = self.integration(host) else {
            return Ok(None);
        };
        for source in integration.methods() {
            let key = TokenKey {
                principal: principal.to_owned(),
                host: host.to_owned(),
                source,
            };
            let stored = match self.tokens.get(&key).await {
                Ok(Some(stored)) => stored,
                Ok(None) => continue,
                Err(TokenStoreError::Undecryptable) => {
                    tracing::warn!(principal = %principal, host = %host, source = source.as_str(), "deleting a stored token that does not decrypt");
                    self.tokens.delete(&key, None).await?;
                    continue;
                }
                Err(err) => return Err(err),
            };
            if !scm::binding_allowed(&integration, stored.token.binding.as_deref()) {
                // Issued for other endpoints: never presented to these.
                tracing::warn!(principal = %principal, host = %host, source = source.as_str(), "deleting a stored token issued for other endpoints than the integration's");
                match self.tokens.delete(&key, Some(stored.version)).await {
                    Ok(()) | Err(TokenStoreError::Conflict) => {}
                    Err(err) => return Err(err),
                }
                continue;
            }
            let expiring = stored
                .token
                .expires_at
                .is_some_and(|at| at <= self.clock.now() + REFRESH_MARGIN);
            if !expiring {
                return Ok(Some(Usable {
                    source,
                    token: stored.token,
                    integration,
                }));
            }
            if let Some(token) = self.refresh(&integration, &key).await? {
                return Ok(Some(Usable {
                    source,
                    token,
                    integration,
                }));
            }
        }
        Ok(None)
    }

    /// Refreshes an expiring OAuth token; `None` when it cannot be used any
    /// more (then it is deleted).
    async fn refresh(
        &self,
        integration: &Integration,
        key: &TokenKey,
    ) -> Result<Option<HostToken>, TokenStoreError> {
        let _one_at_a_time = self.refreshing.lock().await;
        // Another task may have refreshed it while this one waited.
        let Some(stored) = self.tokens.get(key).await? else {
            return Ok(None);
        };
        let now = self.clock.now();
        let expired = stored.token.expires_at.is_some_and(|at| at <= now);
        if stored
            .token
            .expires_at
            .is_some_and(|at| at > now + REFRESH_MARGIN)
        {
            return Ok(Some(stored.token));
        }
        let keep_if_valid = |token: HostToken| (!expired).then_some(token);
        let Some(refresh_token) = stored.token.refresh_token.clone() else {
            if expired {
                return match self.tokens.delete(key, Some(stored.version)).await {
                    Ok(()) => {
                        tracing::info!(principal = %key.principal, host = %key.host, "deleted an expired OAuth token without a refresh token");
                        Ok(None)
                    }
                    Err(TokenStoreError::Conflict) => self.current(key).await,
                    Err(err) => Err(err),
                };
            }
            return Ok(keep_if_valid(stored.token));
        };
        let (Ok(endpoints), Ok((client_id, client_secret))) = (
            Self::endpoints(integration),
            self.client_secret(integration),
        ) else {
            tracing::warn!(host = %key.host, "cannot refresh: the integration's OAuth settings are unusable");
            return Ok(keep_if_valid(stored.token));
        };
        match self
            .client
            .refresh(
                integration.kind,
                &endpoints,
                &client_id,
                &client_secret,
                &refresh_token,
            )
            .await
        {
            Ok(set) => {
                let token = HostToken {
                    access_token: set.access_token,
                    // Providers that do not rotate refresh tokens keep the old one.
                    refresh_token: set.refresh_token.or(Some(refresh_token)),
                    expires_at: set.expires_at,
                    username: stored.token.username.clone(),
                    binding: Some(endpoints.binding()),
                };
                match self.tokens.put(key, &token, Some(stored.version)).await {
                    Ok(_) => {
                        tracing::info!(principal = %key.principal, host = %key.host, "refreshed an OAuth token");
                        Ok(Some(token))
                    }
                    // Another replica refreshed it first: use theirs.
                    Err(TokenStoreError::Conflict) => self.current(key).await,
                    Err(err) => Err(err),
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    ScmErrorKind::Rejected | ScmErrorKind::Unauthorized
                ) =>
            {
                // Only the version whose refresh failed: another replica may
                // have rotated the refresh token first (the provider then
                // refuses the old one), and its token is good.
                match self.tokens.delete(key, Some(stored.version)).await {
                    Ok(()) => {
                        tracing::info!(principal = %key.principal, host = %key.host, "the provider refused to refresh an OAuth token; deleted it");
                        Ok(None)
                    }
                    Err(TokenStoreError::Conflict) => self.current(key).await,
                    Err(err) => Err(err),
                }
            }
            Err(err) => {
                tracing::warn!(host = %key.host, error = %chain(&err), "cannot refresh an OAuth token now");
                Ok(keep_if_valid(stored.token))
            }
        }
    }

    /// The token stored now (another replica's), if it has not expired.
    async fn current(&self, key: &TokenKey) -> Result<Option<HostToken>, TokenStoreError> {
        let now = self.clock.now();
        Ok(self
            .tokens
            .get(key)
            .await?
            .map(|s| s.token)
            .filter(|t| t.expires_at.is_none_or(|at| at > now)))
    }

    /// Refuses a new token for `principal` on `host` that authenticates as
    /// another provider account than the principal's token of the other
    /// source: one user, one account per host.
    async fn same_account(
        &self,
        principal: &str,
        host: &str,
        source: AuthSource,
        username: &str,
    ) -> Result<(), CallError> {
        let other = TokenKey {
            principal: principal.to_owned(),
            host: host.to_owned(),
            source: match source {
                AuthSource::OAuth => AuthSource::Pat,
                AuthSource::Pat => AuthSource::OAuth,
            },
        };
        match self.tokens.get(&other).await {
            Ok(Some(stored))
                if !stored.token.username.is_empty()
                    && !stored.token.username.eq_ignore_ascii_case(username) =>
            {
                Err(CallError::precondition(format!(
                    "the token authenticates as {username:?} on {host}, but {principal:?}'s {} token there authenticates as {:?}; delete that one first",
                    other.source.as_str(),
                    stored.token.username
                )))
            }
            Ok(_) | Err(TokenStoreError::Undecryptable) => Ok(()),
            Err(err) => Err(store_unavailable(&err)),
        }
    }
}
