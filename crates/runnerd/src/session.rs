//! The control-plane session: credentials, signup, heartbeat, runner status,
//! and the one task that owns the `WatchRequests` stream.
//!
//! The stream task reconnects with full-jitter backoff (250 ms to 2 min,
//! reset after 60 s of healthy stream) and also reconnects cleanly when a
//! stream reaches its maximum age. Every (re)connect tells the informer to
//! list everything, since events sent while disconnected are not replayed.
//! Events go to the informer and the SCM sync task through channels; calls
//! are answered by [`Calls`]. Every RPC goes through the
//! [`Client`], which classifies its failures. Nothing in this module ever
//! logs a secret.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use runner_core::model::EnvironmentId;
use runner_core::retry::{Failures, Policy, RetryError, retry};
use runner_core::traits::{Credentials, SecretError, SecretKeyBytes, SecretStore};
use runner_core::validate;
use runner_proto::pb::{self, runner_request::Kind};
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control_plane::{self, BadToken, Calls, Client, Operation, calls::kind_name};
use crate::deps::Deps;
use crate::health::{Health, chain};
use crate::telemetry::Metrics;

/// The runner's release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a replica may hold the credential claim before another may
/// take over (the exchange token's trade takes seconds).
const CLAIM_TTL: Duration = Duration::from_secs(60);
/// How often a waiting replica looks for the credential another one is
/// trading (a poll for that replica's result, not a retry).
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// Reconnects of the stream, and retries of the secret, the token exchange
/// and signup: from 250 ms, doubling, up to 2 min, full jitter (many
/// runners reconnecting to one control plane spread best).
const RECONNECT: Policy =
    Policy::new(Duration::from_millis(250), Duration::from_secs(120)).full_jitter();
/// Writes of the runner secret: as [`RECONNECT`], 9 attempts at most.
const SAVE: Policy = RECONNECT.attempts(9);
const HEALTHY_STREAM: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(30);
/// UpdateRunnerStatus is sent again this often until delivered.
const STATUS_RETRY: Duration = Duration::from_secs(5);

/// What the stream task tells the informer.
pub use runner_core::controller::informer::Event as SessionEvent;

/// What the stream task tells the SCM sync task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScmEvent {
    /// A stream was (re)opened, or an integration changed: list them again.
    Resync,
    /// Forget this principal's tokens for this host.
    TokenDeleted {
        /// The user.
        principal: String,
        /// The host.
        host: String,
    },
}

/// Why the session cannot go on; the process exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The secret holds neither an access token nor an exchange token.
    #[error(
        "the runner secret holds no access token and there is no exchange token; create a new exchange token in the control plane and set it as the stack's ExchangeToken"
    )]
    NoCredentials,
    /// The control plane refused the exchange token.
    #[error("the control plane refused the exchange token; create a new one")]
    ExchangeRefused(#[source] control_plane::Error),
    /// The exchange token belongs to another runner.
    #[error("the exchange token belongs to runner {actual}, not {expected} (--runner-id)")]
    WrongRunner {
        /// The configured id.
        expected: String,
        /// The id the control plane named.
        actual: String,
    },
    /// The control plane refused the signup.
    #[error("the control plane refused the signup")]
    SignupRefused(#[source] control_plane::Error),
    /// The secret store failed for good.
    #[error("the secret store failed")]
    Secrets(#[source] SecretError),
    /// The access token could not be used as a header.
    #[error(transparent)]
    BadToken(#[from] BadToken),
    /// Shutdown came first.
    #[error("shut down before the session was established")]
    Cancelled,
}

impl SessionError {
    /// A secret-store retry's end.
    fn secrets(err: RetryError<SecretError>) -> Self {
        err.into_error().map_or(Self::Cancelled, Self::Secrets)
    }
}

/// The runner's session with the control plane.
pub struct Session {
    runner_id: String,
    region: String,
    client: Client,
    secrets: Arc<dyn SecretStore>,
    claim: Arc<dyn runner_core::leader::Lease>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    max_stream_age: Duration,
    calls: Arc<Calls>,
    scm_events: mpsc::Sender<ScmEvent>,
    self_update: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("runner_id", &self.runner_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The session of the runner `config` describes, over `client`, with
    /// the credentials and the claim of `deps`; calls are answered by
    /// `calls`. Returns the receiver of the events for the SCM sync task.
    pub fn new(
        config: &Config,
        client: Client,
        deps: &Deps,
        calls: Arc<Calls>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<ScmEvent>) {
        let (scm_events, scm_events_rx) = mpsc::channel(256);
        let session = Self {
            runner_id: config.runner_id.clone(),
            region: config.region.clone(),
            client,
            secrets: deps.secrets.clone(),
            claim: deps.claim.clone(),
            health,
            metrics,
            max_stream_age: config.control_plane.max_stream_age,
            calls,
            scm_events,
            self_update: false,
        };
        (session, scm_events_rx)
    }

    /// Advertises self-update (the runner runs as an ECS service task with
    /// self-update on).
    #[must_use]
    pub fn with_self_update(self, self_update: bool) -> Self {
        Self {
            self_update,
            ..self
        }
    }

    /// Credentials, then signup: the runner's key pair, or `None` when
    /// shutdown came first.
    pub async fn establish(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<SecretKeyBytes>, SessionError> {
        let established = match self.credentials(shutdown).await {
            Ok(key) => self.signup(&key, shutdown).await.map(|()| key),
            Err(err) => Err(err),
        };
        match established {
            Ok(key) => Ok(Some(key)),
            Err(SessionError::Cancelled) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn sleep(shutdown: &CancellationToken, delay: Duration) -> Result<(), SessionError> {
        tokio::select! {
            () = shutdown.cancelled() => Err(SessionError::Cancelled),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// Reads the credentials, retrying until the store answers (a malformed
    /// secret is final).
    async fn load(&self, shutdown: &CancellationToken) -> Result<Credentials, SessionError> {
        retry(
            RECONNECT,
            shutdown,
            |err| !matches!(err, SecretError::Malformed(_)),
            |err, _| tracing::warn!(error = %chain(err), "cannot read the runner secret; retrying"),
            || self.secrets.load(),
        )
        .await
        .map_err(SessionError::secrets)
    }

    async fn save(
        &self,
        credentials: &Credentials,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        retry(
            SAVE,
            shutdown,
            |_| true,
            |err, _| tracing::warn!(error = %chain(err), "cannot write the runner secret; retrying"),
            || self.secrets.save(credentials),
        )
        .await
        .map_err(SessionError::secrets)
    }

    /// Makes sure the runner has an access token and a key pair: reuses the
    /// stored credential whenever there is one (a new exchange token never
    /// replaces it), or trades the exchange token on first start. The key
    /// pair is stored before the exchange, so a crash in between never leads
    /// to signing up with a different key.
    pub async fn credentials(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<SecretKeyBytes, SessionError> {
        let mut waited = false;
        loop {
            let credentials = self.load(shutdown).await?;
            if let (Some(token), Some(key)) =
                (&credentials.access_token, credentials.private_key.clone())
            {
                self.client.authenticate(token)?;
                if waited {
                    tracing::info!("using the credential another replica stored");
                }
                return Ok(key);
            }
            // First start: exactly one replica trades the exchange token,
            // the one holding the claim; the others wait for its credential
            // (or for its claim to run out, if it died).
            match self.claim.acquire(CLAIM_TTL).await {
                // Renewed at once: a second conditional write confirms that
                // no other replica's claim landed meanwhile (an emulator may
                // let two land), and the credential is read again, in case
                // the previous holder finished since it was loaded.
                Ok(Some(term)) if self.claim.renew(term.epoch, CLAIM_TTL).await.is_ok() => {
                    let credentials = self.load(shutdown).await?;
                    let traded = match (&credentials.access_token, credentials.private_key.clone())
                    {
                        (Some(token), Some(key)) => {
                            self.client.authenticate(token)?;
                            Ok(key)
                        }
                        _ => self.trade(credentials, shutdown).await,
                    };
                    if let Err(err) = self.claim.release(term.epoch).await {
                        tracing::warn!(error = %err, "cannot release the credential claim; it expires by itself");
                    }
                    return traded;
                }
                Ok(_) => {
                    if !waited {
                        tracing::info!(
                            "another replica is trading the exchange token; waiting for its credential"
                        );
                    }
                    waited = true;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot claim the exchange token; retrying");
                }
            }
            Self::sleep(shutdown, CLAIM_POLL).await?;
        }
    }

    /// Trades the exchange token, holding the claim. A key pair left by a
    /// replica that died mid-trade is reused: the control plane answers a
    /// repeated trade with the same public key, so a lost answer is not fatal.
    async fn trade(
        &self,
        mut credentials: Credentials,
        shutdown: &CancellationToken,
    ) -> Result<SecretKeyBytes, SessionError> {
        let key = match credentials.private_key.clone() {
            Some(key) => key,
            None => {
                let secret = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
                let key = SecretKeyBytes(secret.to_bytes());
                credentials.private_key = Some(key.clone());
                self.save(&credentials, shutdown).await?;
                tracing::info!("generated the runner's key pair");
                key
            }
        };
        let public_key = crypto_box::SecretKey::from(key.0)
            .public_key()
            .as_bytes()
            .to_vec();
        let exchange = credentials
            .exchange_token
            .clone()
            .ok_or(SessionError::NoCredentials)?;
        let traded = retry(
            RECONNECT,
            shutdown,
            control_plane::Error::is_retryable,
            |err, _| tracing::warn!(code = ?err.code(), error = %chain(err), "token exchange failed; retrying"),
            || self.client.exchange_token(&exchange, public_key.clone()),
        )
        .await;
        let response = match traded {
            Ok(response) => response,
            Err(RetryError::Cancelled) => return Err(SessionError::Cancelled),
            Err(RetryError::Final(refused) | RetryError::Exhausted(refused)) => {
                // A replica whose claim ran out may have finished.
                let now = self.load(shutdown).await?;
                if let (Some(token), Some(key)) = (&now.access_token, now.private_key.clone()) {
                    tracing::info!(
                        "another replica traded the exchange token; using its credential"
                    );
                    self.client.authenticate(token)?;
                    return Ok(key);
                }
                return Err(SessionError::ExchangeRefused(refused));
            }
        };
        if response.runner_id != self.runner_id {
            return Err(SessionError::WrongRunner {
                expected: self.runner_id.clone(),
                actual: response.runner_id,
            });
        }
        let access = SecretString::from(response.access_token);
        credentials.access_token = Some(access.clone());
        credentials.exchange_token = None;
        self.save(&credentials, shutdown).await?;
        self.client.authenticate(&access)?;
        tracing::info!("traded the exchange token for an access token");
        Ok(key)
    }

    fn capabilities(&self) -> Vec<i32> {
        let mut capabilities = vec![
            pb::RunnerCapability::StopStart as i32,
            pb::RunnerCapability::ParseContext as i32,
            pb::RunnerCapability::Oauth as i32,
        ];
        if self.self_update {
            capabilities.push(pb::RunnerCapability::SelfUpdate as i32);
        }
        capabilities
    }

    /// Signs up with the public key; retries until the control plane answers.
    pub async fn signup(
        &self,
        key: &SecretKeyBytes,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let public = crypto_box::SecretKey::from(key.0).public_key();
        let signed_up = retry(
            RECONNECT,
            shutdown,
            control_plane::Error::is_retryable,
            |err, _| tracing::warn!(code = ?err.code(), error = %chain(err), "signup failed; retrying"),
            || {
                self.client.signup(pb::SignupRequest {
                    public_key: public.as_bytes().to_vec(),
                    version: VERSION.to_owned(),
                    region: self.region.clone(),
                    capabilities: self.capabilities(),
                    environment_class_schema: environment_class_schema(),
                    scm_providers: crate::scm::providers(),
                })
            },
        )
        .await;
        match signed_up {
            Ok(()) => {
                tracing::info!(runner.id = %self.runner_id, version = VERSION, "signed up");
                Ok(())
            }
            Err(RetryError::Cancelled) => Err(SessionError::Cancelled),
            Err(RetryError::Final(refused) | RetryError::Exhausted(refused)) => {
                Err(SessionError::SignupRefused(refused))
            }
        }
    }

    /// MarkActive every 30 s, and UpdateRunnerStatus whenever the degraded
    /// message or the system details change (sent again every 5 s until
    /// delivered).
    pub async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let mut degraded = self.health.degraded();
        let mut details = self.health.details();
        let mut reported = None;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = (
                degraded.borrow_and_update().clone(),
                details.borrow_and_update().clone(),
            );
            if reported.as_ref() != Some(&current) {
                let request = pb::UpdateRunnerStatusRequest {
                    version: VERSION.to_owned(),
                    region: self.region.clone(),
                    capabilities: self.capabilities(),
                    degraded_message: current.0.chars().take(1024).collect(),
                    system_details: current.1.clone().into_iter().collect(),
                };
                match self.client.update_runner_status(request).await {
                    Ok(()) => reported = Some(current),
                    Err(err) => {
                        tracing::warn!(code = ?err.code(), error = %chain(&err), "runner status not delivered; will retry");
                    }
                }
            }
            let retry = if reported.is_none() {
                STATUS_RETRY
            } else {
                Duration::MAX
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(err) = self.client.mark_active().await {
                        tracing::warn!(code = ?err.code(), error = %chain(&err), "heartbeat failed");
                    }
                }
                changed = degraded.changed() => if changed.is_err() { return },
                changed = details.changed() => if changed.is_err() { return },
                () = sleep_unless_max(retry) => {}
            }
        }
    }

    /// Owns the watch stream until `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        events: mpsc::Sender<SessionEvent>,
        shutdown: CancellationToken,
    ) {
        let mut failures = Failures::new(RECONNECT);
        let mut first = true;
        loop {
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.client.watch_requests() => result,
            };
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(err) => {
                    self.health.set_session(false);
                    let delay = failures.failed();
                    tracing::warn!(code = ?err.code(), error = %chain(&err), retry_in = ?delay, "cannot open the watch stream");
                    if Self::sleep(&shutdown, delay).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if !first {
                self.metrics.reconnected();
            }
            first = false;
            self.health.set_session(true);
            tracing::info!("watch stream open");
            if events.send(SessionEvent::Connected).await.is_err() {
                return;
            }
            let _ = self.scm_events.try_send(ScmEvent::Resync);
            let opened_at = Instant::now();
            let jitter = rand::thread_rng().gen_range(Duration::ZERO..=self.max_stream_age / 10);
            let retire_at = opened_at + self.max_stream_age + jitter;
            let ended_cleanly = loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(retire_at) => {
                        tracing::info!("watch stream reached its maximum age; reconnecting");
                        break true;
                    }
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(request)) => {
                        if opened_at.elapsed() >= HEALTHY_STREAM {
                            failures.reset();
                        }
                        self.dispatch(request, &events, &shutdown).await;
                    }
                    Ok(None) => {
                        tracing::warn!("the control plane ended the watch stream");
                        break false;
                    }
                    Err(status) => {
                        let err = control_plane::Error::classify(Operation::WatchRequests, status);
                        tracing::warn!(code = ?err.code(), error = %chain(&err), "watch stream failed");
                        break false;
                    }
                }
            };
            if ended_cleanly {
                continue;
            }
            if opened_at.elapsed() >= HEALTHY_STREAM {
                failures.reset();
            }
            self.health.set_session(false);
            if Self::sleep(&shutdown, failures.failed()).await.is_err() {
                return;
            }
        }
    }

    /// Events go to their task; calls are answered in the background.
    async fn dispatch(
        &self,
        request: pb::RunnerRequest,
        events: &mpsc::Sender<SessionEvent>,
        shutdown: &CancellationToken,
    ) {
        let request_id = request.request_id;
        let Some(kind) = request.kind else {
            self.metrics.request("unknown");
            self.calls.answer_later(request_id, None, shutdown);
            return;
        };
        self.metrics.request(kind_name(&kind));
        match kind {
            Kind::EnvironmentChanged(changed) => {
                match validate::uuid("environment_id", &changed.environment_id) {
                    Ok(id) => {
                        tracing::debug!(env.id = %id, "environment changed");
                        let _ = events
                            .send(SessionEvent::EnvironmentChanged(EnvironmentId(id)))
                            .await;
                    }
                    Err(err) => {
                        tracing::warn!(request.id = %request_id, error = %err, "ignoring a malformed environment_changed");
                    }
                }
            }
            Kind::ScmIntegrationChanged(_) => {
                // Level-triggered: whatever changed, list them all again.
                let _ = self.scm_events.try_send(ScmEvent::Resync);
            }
            Kind::HostTokenDeleted(deleted) => {
                let _ = self
                    .scm_events
                    .send(ScmEvent::TokenDeleted {
                        principal: deleted.principal,
                        host: deleted.host,
                    })
                    .await;
            }
            call => self.calls.answer_later(request_id, Some(call), shutdown),
        }
    }
}

async fn sleep_unless_max(delay: Duration) {
    if delay == Duration::MAX {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(delay).await;
    }
}

/// The JSON Schema of an environment class this runner accepts.
fn environment_class_schema() -> String {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["instance_type", "disk_gib"],
        "properties": {
            "instance_type": { "type": "string", "pattern": "^[a-z][a-z0-9-]*\\.[a-z0-9]+$" },
            "disk_gib": {
                "type": "integer",
                "minimum": validate::MIN_DISK_GIB,
                "maximum": validate::MAX_DISK_GIB
            }
        }
    })
    .to_string()
}
