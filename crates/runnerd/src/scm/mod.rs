//! Repository access: the SCM integrations the control plane configured,
//! users' host tokens (stored encrypted, refreshed before they expire,
//! deleted when their method is disabled), the SCM calls of the watch
//! stream, and the checkout credential each instance gets.
//!
//! Revocation is level-triggered: every sync lists the integrations and the
//! (principal, host) pairs the control plane still holds, recomputes which
//! stored tokens they allow and deletes the others, with the environment
//! secrets that hold them; a deletion cut short by a crash or a missed event
//! finishes on the next sync. A token is bound to the endpoints it was
//! issued for, and a sealed token to its principal and host.
//! Nothing here logs or returns a token, code or client secret.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use runner_core::model::EnvironmentId;
use runner_core::scm::{
    self, AuthSource, ContextUrl, Endpoints, Held, Integration, Live, OAuthApp, Purpose, ScmKind,
    Target, TokenKey,
};
use runner_core::sealed::{self, Binding};
use runner_core::traits::{
    Checkout, CheckoutError, EnvironmentSecrets, HostToken, TokenStore, TokenStoreError,
};
use runner_core::validate;
use runner_proto::pb;
use runner_scm::{ScmClient, ScmError};
use secrecy::{ExposeSecret as _, SecretString};
use tonic::Code;
use uuid::Uuid;

use crate::health::chain;

/// An OAuth token is refreshed when it expires within this margin.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// A call's failure: a gRPC code and a message for the user (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The gRPC status code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl CallError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }
}

fn store_unavailable(err: &TokenStoreError) -> CallError {
    tracing::warn!(error = %chain(err), "token store failed");
    CallError::unavailable("the runner's token store is unavailable; try again")
}

/// Why a sync or a deletion could not finish (it is retried). Never
/// carries a token.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The token store failed.
    #[error(transparent)]
    Tokens(#[from] TokenStoreError),
    /// The environment secrets failed.
    #[error(transparent)]
    Secrets(#[from] runner_core::traits::SecretError),
}

/// The SCM kinds of the protocol.
pub fn kind_from_proto(kind: i32) -> Option<ScmKind> {
    match pb::ScmKind::try_from(kind).ok()? {
        pb::ScmKind::Github => Some(ScmKind::GitHub),
        pb::ScmKind::Gitlab => Some(ScmKind::GitLab),
        pb::ScmKind::Bitbucket => Some(ScmKind::Bitbucket),
        pb::ScmKind::AzureDevops => Some(ScmKind::AzureDevOps),
        pb::ScmKind::Unspecified => None,
    }
}

fn kind_to_proto(kind: ScmKind) -> pb::ScmKind {
    match kind {
        ScmKind::GitHub => pb::ScmKind::Github,
        ScmKind::GitLab => pb::ScmKind::Gitlab,
        ScmKind::Bitbucket => pb::ScmKind::Bitbucket,
        ScmKind::AzureDevOps => pb::ScmKind::AzureDevops,
    }
}

fn method_to_proto(source: AuthSource) -> pb::AuthMethod {
    match source {
        AuthSource::OAuth => pb::AuthMethod::Oauth,
        AuthSource::Pat => pb::AuthMethod::Pat,
    }
}

/// What the runner announces at signup: every provider, both methods.
pub fn providers() -> Vec<pb::ScmProvider> {
    scm::PROVIDERS
        .iter()
        .map(|&kind| pb::ScmProvider {
            kind: kind_to_proto(kind) as i32,
            auth_methods: vec![pb::AuthMethod::Oauth as i32, pb::AuthMethod::Pat as i32],
            self_hosted: kind != ScmKind::Bitbucket,
        })
        .collect()
}

/// An integration from the protocol; the error names the problem.
pub fn integration_from_proto(i: pb::ScmIntegration) -> Result<Integration, String> {
    let id =
        Uuid::parse_str(&i.id).map_err(|_| format!("integration id {:?} is not a UUID", i.id))?;
    let kind = kind_from_proto(i.kind).ok_or_else(|| format!("integration {id}: unknown kind"))?;
    validate::host("host", &i.host).map_err(|e| format!("integration {id}: {e}"))?;
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    Ok(Integration {
        id,
        kind,
        host: i.host,
        oauth: i.oauth.map(|o| OAuthApp {
            client_id: o.client_id,
            sealed_client_secret: o.sealed_client_secret,
        }),
        pat_enabled: i.pat_enabled,
        api_base_url: nonempty(i.api_base_url),
        oauth_base_url: nonempty(i.oauth_base_url),
    })
}

#[derive(Debug, Default)]
struct Known {
    integrations: Vec<Integration>,
    listed_at: Option<SystemTime>,
}

/// A usable token and what it is for.
struct Usable {
    source: AuthSource,
    token: HostToken,
    integration: Integration,
}

/// Repository access for one runner.
pub struct Scm {
    key: OnceLock<crypto_box::SecretKey>,
    known: RwLock<Known>,
    tokens: std::sync::Arc<dyn TokenStore>,
    secrets: std::sync::Arc<dyn EnvironmentSecrets>,
    client: ScmClient,
    /// Environments whose checkout needs no credential (no bind call).
    anonymous: Mutex<HashSet<EnvironmentId>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Scm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scm").finish_non_exhaustive()
    }
}

impl Scm {
    /// Repository access over these stores and this HTTP client.
    pub fn new(
        tokens: std::sync::Arc<dyn TokenStore>,
        secrets: std::sync::Arc<dyn EnvironmentSecrets>,
        client: ScmClient,
    ) -> Self {
        Self {
            key: OnceLock::new(),
            known: RwLock::default(),
            tokens,
            secrets,
            client,
            anonymous: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The runner's private key, which opens sealed tokens and secrets.
    pub fn set_key(&self, key: &runner_core::traits::SecretKeyBytes) {
        let _ = self.key.set(crypto_box::SecretKey::from(key.0));
    }

    fn open(&self, sealed: &[u8], binding: Binding<'_>) -> Result<SecretString, CallError> {
        let key = self
            .key
            .get()
            .ok_or_else(|| CallError::unavailable("the runner is starting; try again"))?;
        sealed::open(key, sealed, binding).map_err(CallError::invalid)
    }

    /// Whether the first integration sync happened.
    pub fn synced(&self) -> bool {
        self.known.read().expect("lock").listed_at.is_some()
    }

    /// The integration for `host`.
    pub fn integration(&self, host: &str) -> Option<Integration> {
        self.known
            .read()
            .expect("lock")
            .integrations
            .iter()
            .find(|i| i.host == host)
            .cloned()
    }

    fn endpoints(integration: &Integration) -> Result<Endpoints, CallError> {
        scm::endpoints(
            integration.kind,
            &integration.host,
            integration.api_base_url.as_deref(),
            integration.oauth_base_url.as_deref(),
        )
        .map_err(|problem| {
            CallError::precondition(format!(
                "the integration for {} is misconfigured: {problem}",
                integration.host
            ))
        })
    }

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

    /// Deletes the environment secrets holding `key`'s token, then the
    /// token (only at `version`, when given). False when the token changed
    /// meanwhile (the user stored a new one): it is kept.
    async fn revoke(&self, key: &TokenKey, version: Option<u64>) -> Result<bool, SyncError> {
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

    fn check_principal_host(principal: &str, host: &str) -> Result<(), CallError> {
        validate::text("principal", principal, validate::MAX_PRINCIPAL_LEN)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        validate::host("host", host).map_err(|e| CallError::invalid(e.to_string()))
    }

    fn integration_for_call(&self, host: &str) -> Result<Integration, CallError> {
        self.integration(host).ok_or_else(|| {
            CallError::precondition(format!("this runner has no SCM integration for {host}"))
        })
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
    async fn usable(&self, principal: &str, host: &str) -> Result<Option<Usable>, TokenStoreError> {
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
                .is_some_and(|at| at <= SystemTime::now() + REFRESH_MARGIN);
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
        let now = SystemTime::now();
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
            Err(ScmError::Rejected(_) | ScmError::Unauthorized(_)) => {
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
                tracing::warn!(host = %key.host, error = %err, "cannot refresh an OAuth token now");
                Ok(keep_if_valid(stored.token))
            }
        }
    }

    /// The token stored now (another replica's), if it has not expired.
    async fn current(&self, key: &TokenKey) -> Result<Option<HostToken>, TokenStoreError> {
        let now = SystemTime::now();
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

    /// `check_authentication_for_host`.
    pub async fn check_authentication(
        &self,
        principal: &str,
        host: &str,
    ) -> Result<pb::CheckAuthenticationForHostResult, CallError> {
        Self::check_principal_host(principal, host)?;
        let Some(integration) = self.integration(host) else {
            return Ok(pb::CheckAuthenticationForHostResult::default());
        };
        let authenticated = self
            .usable(principal, host)
            .await
            .map_err(|e| store_unavailable(&e))?
            .is_some();
        let oauth_authorize_url = match (&integration.oauth, Self::endpoints(&integration)) {
            (Some(app), Ok(endpoints)) => {
                scm::authorize_url(&endpoints, &app.client_id).to_string()
            }
            _ => String::new(),
        };
        Ok(pb::CheckAuthenticationForHostResult {
            authenticated,
            available_methods: integration
                .methods()
                .into_iter()
                .map(|m| method_to_proto(m) as i32)
                .collect(),
            oauth_authorize_url,
        })
    }

    /// `parse_context`.
    pub async fn parse_context(
        &self,
        principal: &str,
        url: &str,
    ) -> Result<pb::ParseContextResult, CallError> {
        validate::text("principal", principal, validate::MAX_PRINCIPAL_LEN)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        validate::text("url", url, validate::MAX_REPOSITORY_URL_LEN)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        let host = scm::host_of(url).map_err(|e| CallError::invalid(format!("url: {e}")))?;
        let integration = self.integration(&host);
        let kind = integration
            .as_ref()
            .map(|i| i.kind)
            .or_else(|| scm::public_kind(&host))
            .ok_or_else(|| {
                CallError::invalid(format!(
                    "url: unknown SCM host {host}; an admin must configure an integration for it"
                ))
            })?;
        let parsed: ContextUrl = scm::parse_context_url(url, kind)
            .map_err(|e| CallError::invalid(format!("url: {e}")))?;
        // Only a clone URL the runner will accept in a spec is answered.
        validate::repository_url("url", &parsed.clone_url).map_err(|e| {
            CallError::invalid(format!(
                "url: the repository's clone URL is not in canonical form: {}",
                e.problem
            ))
        })?;
        let usable = match &integration {
            None => None,
            Some(_) => Some(
                self.usable(principal, &host)
                    .await
                    .map_err(|e| store_unavailable(&e))?
                    .ok_or_else(|| {
                        CallError::precondition(format!("authentication required for {host}"))
                    })?,
            ),
        };
        let revision = match &parsed.target {
            Target::Repository | Target::Issue(_) => None,
            Target::Branch(b) => Some(pb::parse_context_result::Revision::Branch(b.clone())),
            Target::Commit(c) => Some(pb::parse_context_result::Revision::Commit(c.clone())),
            Target::PullRequest(number) => {
                let Some(usable) = usable else {
                    return Err(CallError::precondition(format!(
                        "authentication required for {host}: pull request URLs are resolved through its API, which needs an SCM integration"
                    )));
                };
                let endpoints = Self::endpoints(&usable.integration)?;
                let branch = self
                    .client
                    .pull_request_branch(
                        kind,
                        usable.source,
                        &endpoints,
                        &usable.token.access_token,
                        &parsed.owner,
                        &parsed.repository,
                        *number,
                    )
                    .await
                    .map_err(|e| provider_error(&e, &host, "look up the pull request"))?;
                // The provider's answer is input too: only a branch git can check out.
                validate::branch("branch", &branch).map_err(|e| {
                    CallError::precondition(format!(
                        "{host} named a pull request branch git cannot check out: {}",
                        e.problem
                    ))
                })?;
                Some(pb::parse_context_result::Revision::Branch(branch))
            }
        };
        Ok(pb::ParseContextResult {
            kind: kind_to_proto(kind) as i32,
            host,
            owner: parsed.owner,
            repository: parsed.repository,
            clone_url: parsed.clone_url,
            revision,
        })
    }
}

fn provider_error(err: &ScmError, host: &str, doing: &str) -> CallError {
    match err {
        ScmError::Unauthorized(message) | ScmError::Rejected(message) => {
            CallError::invalid(format!("{host} refused to {doing}: {message}"))
        }
        ScmError::NotFound(message) => CallError::new(Code::NotFound, format!("{host}: {message}")),
        ScmError::Config(message) => {
            CallError::precondition(format!("could not {doing} at {host}: {message}"))
        }
        ScmError::Unavailable(message) => CallError::unavailable(format!(
            "could not {doing} at {host} ({message}); try again"
        )),
    }
}

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
