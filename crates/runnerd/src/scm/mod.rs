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

mod calls;
mod checkout;
mod proto;
mod sync;
mod tokens;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use runner_core::model::EnvironmentId;
use runner_core::scm::{self, AuthSource, Endpoints, Integration};
use runner_core::sealed::{self, Binding};
use runner_core::traits::{
    Clock, EnvironmentSecrets, HostToken, SystemClock, TokenStore, TokenStoreError,
};
use runner_core::validate;
use runner_scm::{ScmClient, ScmError, ScmErrorKind};
use secrecy::SecretString;
use tonic::Code;

use crate::health::chain;

pub use proto::{IntegrationError, integration_from_proto, kind_from_proto, providers};
pub use sync::SyncError;
pub(crate) use sync::scm_sync;

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

/// The SCM providers' HTTP client for `config`: it trusts what the
/// control-plane channel trusts and has its timeout.
pub fn http_client(config: &crate::config::Config) -> Result<ScmClient, ScmError> {
    let user_agent = format!("aws-runner/{}", crate::session::VERSION);
    let control_plane = &config.control_plane;
    ScmClient::new(
        control_plane.ca_bundle.as_deref(),
        control_plane.timeout,
        &user_agent,
        &config.scm_resolve,
    )
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
    /// Wall-clock time: token expiry, when integrations were listed.
    clock: std::sync::Arc<dyn Clock>,
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
            clock: std::sync::Arc::new(SystemClock),
        }
    }

    /// Reads wall-clock time from `clock` (the default: the system's).
    #[must_use]
    pub fn with_clock(mut self, clock: std::sync::Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
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
        sealed::open(key, sealed, binding).map_err(|e| CallError::invalid(e.to_string()))
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
}

fn provider_error(err: &ScmError, host: &str, doing: &str) -> CallError {
    // The message with its sources: a client error keeps its cause there.
    let message = chain(err);
    match err.kind() {
        ScmErrorKind::Unauthorized | ScmErrorKind::Rejected => {
            CallError::invalid(format!("{host} refused to {doing}: {message}"))
        }
        ScmErrorKind::NotFound => CallError::new(Code::NotFound, format!("{host}: {message}")),
        ScmErrorKind::Config => {
            CallError::precondition(format!("could not {doing} at {host}: {message}"))
        }
        ScmErrorKind::Unavailable => CallError::unavailable(format!(
            "could not {doing} at {host} ({message}); try again"
        )),
    }
}
