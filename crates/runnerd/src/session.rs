//! The control-plane session: credentials, signup, heartbeat, runner status,
//! and the one task that owns the `WatchRequests` stream.
//!
//! The stream task reconnects with full-jitter backoff (250 ms to 2 min,
//! reset after 60 s of healthy stream) and also reconnects cleanly when a
//! stream reaches its maximum age. Every (re)connect tells the informer to
//! list everything, since events sent while disconnected are not replayed.
//! Events go to the informer through a channel; calls are answered here.
//! Nothing in this module ever logs a secret.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use runner_core::backoff::Backoff;
use runner_core::model::EnvironmentId;
use runner_core::traits::{Compute, Credentials, SecretError, SecretKeyBytes, SecretStore};
use runner_core::validate;
use runner_proto::pb::{
    self, identity_service_client::IdentityServiceClient, runner_request::Kind, runner_result,
};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::grpc::{Auth, RunnerClient};
use crate::health::{Health, chain};
use crate::scm::{CallError, Scm};
use crate::telemetry::Metrics;

/// The runner's release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a replica may hold the credential claim before another may
/// take over (the exchange token's trade takes seconds).
const CLAIM_TTL: Duration = Duration::from_secs(60);
/// How often a waiting replica looks for the credential.
const CLAIM_POLL: Duration = Duration::from_millis(500);

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
    #[error("the control plane refused the exchange token ({0}); create a new one")]
    ExchangeRefused(String),
    /// The exchange token belongs to another runner.
    #[error("the exchange token belongs to runner {actual}, not {expected} (--runner-id)")]
    WrongRunner {
        /// The configured id.
        expected: String,
        /// The id the control plane named.
        actual: String,
    },
    /// The control plane refused the signup.
    #[error("the control plane refused the signup: {0}")]
    SignupRefused(String),
    /// The secret store failed for good.
    #[error("the secret store failed")]
    Secrets(#[source] SecretError),
    /// The access token could not be used as a header.
    #[error("{0}")]
    BadToken(String),
    /// Shutdown came first.
    #[error("shut down before the session was established")]
    Cancelled,
}

/// What the session needs.
pub struct Session {
    /// The runner's id.
    pub runner_id: String,
    /// The runner's region.
    pub region: String,
    /// Authenticated client.
    pub client: RunnerClient,
    /// Unauthenticated identity client.
    pub identity: IdentityServiceClient<Channel>,
    /// The bearer token holder shared with `client`.
    pub auth: Auth,
    /// Where credentials live.
    pub secrets: Arc<dyn SecretStore>,
    /// For validate_environment_class.
    pub compute: Arc<dyn Compute>,
    /// The instance types classes may use.
    pub instance_types: validate::AllowedInstanceTypes,
    /// Availability zones of the configured subnets.
    pub zones: std::sync::OnceLock<Vec<String>>,
    /// Health and degradation.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Longest stream age.
    pub max_stream_age: Duration,
    /// Repository access.
    pub scm: Arc<Scm>,
    /// Events for the SCM sync task.
    pub scm_events: mpsc::Sender<ScmEvent>,
    /// Whether this runner can update itself (it runs as an ECS service task
    /// with self-update on).
    pub self_update: bool,
    /// The calls being answered, waited for at shutdown.
    pub calls: tokio_util::task::TaskTracker,
    /// Decides which replica trades the exchange token on first start.
    pub claim: Arc<dyn runner_core::leader::Lease>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("runner_id", &self.runner_id)
            .finish_non_exhaustive()
    }
}

const RECONNECT: Backoff = Backoff {
    base: Duration::from_millis(250),
    max: Duration::from_secs(120),
};
const HEALTHY_STREAM: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(30);

impl Session {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    async fn sleep(shutdown: &CancellationToken, delay: Duration) -> Result<(), SessionError> {
        tokio::select! {
            () = shutdown.cancelled() => Err(SessionError::Cancelled),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    async fn load(&self, shutdown: &CancellationToken) -> Result<Credentials, SessionError> {
        let mut failures = 0;
        loop {
            match self.secrets.load().await {
                Ok(credentials) => return Ok(credentials),
                Err(SecretError::Malformed(message)) => {
                    return Err(SessionError::Secrets(SecretError::Malformed(message)));
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(error = %chain(&err), "cannot read the runner secret; retrying");
                    Self::sleep(shutdown, RECONNECT.full_jitter(failures)).await?;
                }
            }
        }
    }

    async fn save(
        &self,
        credentials: &Credentials,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let mut failures = 0;
        loop {
            match self.secrets.save(credentials).await {
                Ok(()) => return Ok(()),
                Err(err) if failures >= 8 => return Err(SessionError::Secrets(err)),
                Err(err) => {
                    failures += 1;
                    tracing::warn!(error = %chain(&err), "cannot write the runner secret; retrying");
                    Self::sleep(shutdown, RECONNECT.full_jitter(failures)).await?;
                }
            }
        }
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
                self.auth.set(token).map_err(SessionError::BadToken)?;
                if waited {
                    tracing::info!("using the credential another replica stored");
                }
                return Ok(key);
            }
            // First start: exactly one replica trades the exchange token,
            // the one holding the claim; the others wait for its credential
            // (or for its claim to run out, if it died).
            match self.claim.acquire(CLAIM_TTL).await {
                Ok(Some(term)) => {
                    let traded = self.trade(credentials, shutdown).await;
                    if let Err(err) = self.claim.release(term.epoch).await {
                        tracing::warn!(error = %err, "cannot release the credential claim; it expires by itself");
                    }
                    return traded;
                }
                Ok(None) => {
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
        let mut failures = 0;
        let response = loop {
            let result = self
                .identity
                .clone()
                .exchange_token(self.request(pb::ExchangeTokenRequest {
                    exchange_token: exchange.expose_secret().to_owned(),
                    public_key: public_key.clone(),
                }))
                .await;
            match result {
                Ok(response) => break response.into_inner(),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unauthenticated | Code::InvalidArgument | Code::PermissionDenied
                    ) =>
                {
                    // A replica whose claim ran out may have finished.
                    let now = self.load(shutdown).await?;
                    if let (Some(token), Some(key)) = (&now.access_token, now.private_key.clone()) {
                        tracing::info!(
                            "another replica traded the exchange token; using its credential"
                        );
                        self.auth.set(token).map_err(SessionError::BadToken)?;
                        return Ok(key);
                    }
                    return Err(SessionError::ExchangeRefused(status.message().to_owned()));
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(code = ?status.code(), error = %status.message(), "token exchange failed; retrying");
                    Self::sleep(shutdown, RECONNECT.full_jitter(failures)).await?;
                }
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
        self.auth.set(&access).map_err(SessionError::BadToken)?;
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
        let mut failures = 0;
        loop {
            let result = self
                .client
                .clone()
                .signup(self.request(pb::SignupRequest {
                    public_key: public.as_bytes().to_vec(),
                    version: VERSION.to_owned(),
                    region: self.region.clone(),
                    capabilities: self.capabilities(),
                    environment_class_schema: environment_class_schema(),
                    scm_providers: crate::scm::providers(),
                }))
                .await;
            match result {
                Ok(_) => {
                    tracing::info!(runner.id = %self.runner_id, version = VERSION, "signed up");
                    return Ok(());
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::FailedPrecondition
                            | Code::Unauthenticated
                            | Code::PermissionDenied
                    ) =>
                {
                    return Err(SessionError::SignupRefused(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(code = ?status.code(), error = %status.message(), "signup failed; retrying");
                    Self::sleep(shutdown, RECONNECT.full_jitter(failures)).await?;
                }
            }
        }
    }

    /// MarkActive every 30 s, and UpdateRunnerStatus whenever the degraded
    /// message or the system details change (retried until delivered).
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
                let request = self.request(pb::UpdateRunnerStatusRequest {
                    version: VERSION.to_owned(),
                    region: self.region.clone(),
                    capabilities: self.capabilities(),
                    degraded_message: current.0.chars().take(1024).collect(),
                    system_details: current.1.clone().into_iter().collect(),
                });
                match self.client.clone().update_runner_status(request).await {
                    Ok(_) => reported = Some(current),
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), error = %status.message(), "runner status not delivered; will retry");
                    }
                }
            }
            let retry = if reported.is_none() {
                Duration::from_secs(5)
            } else {
                Duration::MAX
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(status) = self.client.clone().mark_active(self.request(pb::MarkActiveRequest {})).await {
                        tracing::warn!(code = ?status.code(), error = %status.message(), "heartbeat failed");
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
        let mut failures = 0u32;
        let mut first = true;
        let calls = Arc::new(Semaphore::new(16));
        loop {
            let mut client = self.client.clone();
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                result = client.watch_requests(pb::WatchRequestsRequest {}) => result,
            };
            let mut stream = match opened {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    self.health.set_session(false);
                    failures = failures.saturating_add(1);
                    let delay = RECONNECT.full_jitter(failures);
                    tracing::warn!(code = ?status.code(), error = %status.message(), retry_in = ?delay, "cannot open the watch stream");
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
                            failures = 0;
                        }
                        self.dispatch(request, &events, &calls, &shutdown).await;
                    }
                    Ok(None) => {
                        tracing::warn!("the control plane ended the watch stream");
                        break false;
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), error = %status.message(), "watch stream failed");
                        break false;
                    }
                }
            };
            if ended_cleanly {
                continue;
            }
            if opened_at.elapsed() >= HEALTHY_STREAM {
                failures = 0;
            }
            self.health.set_session(false);
            failures = failures.saturating_add(1);
            let delay = RECONNECT.full_jitter(failures);
            if Self::sleep(&shutdown, delay).await.is_err() {
                return;
            }
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        request: pb::RunnerRequest,
        events: &mpsc::Sender<SessionEvent>,
        calls: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) {
        let request_id = request.request_id;
        let Some(kind) = request.kind else {
            self.metrics.request("unknown");
            self.answer_later(request_id, None, calls, shutdown);
            return;
        };
        self.metrics.request(kind_name(&kind));
        match kind {
            Kind::EnvironmentChanged(changed) => {
                match validate::uuid("environment_id", &changed.environment_id) {
                    Ok(id) => {
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
            call => self.answer_later(request_id, Some(call), calls, shutdown),
        }
    }

    fn answer_later(
        self: &Arc<Self>,
        request_id: String,
        call: Option<Kind>,
        calls: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) {
        let session = self.clone();
        let calls = calls.clone();
        let shutdown = shutdown.clone();
        self.calls.spawn(async move {
            let Ok(_permit) = calls.acquire_owned().await else {
                return;
            };
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = session.answer(call) => outcome,
            };
            let request = session.request(pb::SendResponseRequest {
                request_id: request_id.clone(),
                outcome: Some(outcome),
            });
            if let Err(status) = session.client.clone().send_response(request).await {
                tracing::warn!(request.id = %request_id, code = ?status.code(), error = %status.message(), "could not answer a call");
            }
        });
    }

    async fn answer(&self, call: Option<Kind>) -> pb::send_response_request::Outcome {
        use pb::send_response_request::Outcome;
        let error = |code: Code, message: String| {
            Outcome::Error(pb::RunnerError {
                code: code as i32,
                message,
            })
        };
        match call {
            Some(Kind::Ping(_)) => Outcome::Result(pb::RunnerResult {
                kind: Some(runner_result::Kind::Ping(pb::PingResult {
                    version: VERSION.to_owned(),
                })),
            }),
            Some(Kind::ValidateEnvironmentClass(request)) => match request.environment_class {
                None => error(
                    Code::InvalidArgument,
                    "environment_class: must be set".into(),
                ),
                Some(class) => Outcome::Result(pb::RunnerResult {
                    kind: Some(runner_result::Kind::ValidateEnvironmentClass(
                        self.validate_class(&class).await,
                    )),
                }),
            },
            Some(Kind::CheckAuthenticationForHost(request)) => respond(
                self.scm
                    .check_authentication(&request.principal, &request.host)
                    .await
                    .map(runner_result::Kind::CheckAuthenticationForHost),
            ),
            Some(Kind::ParseContext(request)) => respond(
                self.scm
                    .parse_context(&request.principal, &request.url)
                    .await
                    .map(runner_result::Kind::ParseContext),
            ),
            Some(Kind::StoreHostToken(request)) => respond(
                self.scm
                    .store_pat(&request.principal, &request.host, &request.sealed_token)
                    .await
                    .map(|username| {
                        runner_result::Kind::StoreHostToken(pb::StoreHostTokenResult { username })
                    }),
            ),
            Some(Kind::ExchangeOauthCode(request)) => {
                respond(self.scm.exchange_oauth(request).await.map(|expires_at| {
                    runner_result::Kind::ExchangeOauthCode(pb::ExchangeOauthCodeResult {
                        expires_at: expires_at.map(prost_types::Timestamp::from),
                    })
                }))
            }
            Some(
                other @ (Kind::EnvironmentChanged(_)
                | Kind::ScmIntegrationChanged(_)
                | Kind::HostTokenDeleted(_)),
            ) => error(
                Code::InvalidArgument,
                format!("{} is an event, not a call", kind_name(&other)),
            ),
            None => error(
                Code::Unimplemented,
                "this runner does not know this kind of call".into(),
            ),
        }
    }

    async fn validate_class(
        &self,
        class: &pb::EnvironmentClass,
    ) -> pb::ValidateEnvironmentClassResult {
        let mut problems = Vec::new();
        if let Err(e) = validate::text(
            "display_name",
            &class.display_name,
            validate::MAX_DISPLAY_NAME_LEN,
        ) {
            problems.push(e.to_string());
        }
        if let Err(e) = validate::disk_gib("disk_gib", i64::from(class.disk_gib)) {
            problems.push(e.to_string());
        }
        let mut availability_zones = Vec::new();
        // The allowlist before the offerings: a refused type costs no AWS call.
        match validate::instance_type("instance_type", &class.instance_type).and_then(|()| {
            self.instance_types
                .check("instance_type", &class.instance_type)
        }) {
            Err(e) => problems.push(e.to_string()),
            Ok(()) => match self.compute.offered_zones(&class.instance_type).await {
                Ok(zones) => {
                    availability_zones = zones
                        .into_iter()
                        .filter(|z| self.zones.get().is_some_and(|zs| zs.contains(z)))
                        .collect();
                    if availability_zones.is_empty() {
                        problems.push(format!(
                            "instance_type: {} is not offered in any of the runner's availability zones ({})",
                            class.instance_type,
                            self.zones.get().map(|zs| zs.join(", ")).unwrap_or_default()
                        ));
                    }
                }
                Err(err) => problems.push(format!(
                    "instance_type: could not check the offerings: {}",
                    chain(&err)
                )),
            },
        }
        pb::ValidateEnvironmentClassResult {
            problems,
            availability_zones,
        }
    }
}

fn respond(result: Result<runner_result::Kind, CallError>) -> pb::send_response_request::Outcome {
    use pb::send_response_request::Outcome;
    match result {
        Ok(kind) => Outcome::Result(pb::RunnerResult { kind: Some(kind) }),
        Err(err) => Outcome::Error(pb::RunnerError {
            code: err.code as i32,
            message: err
                .message
                .chars()
                .take(validate::MAX_MESSAGE_LEN)
                .collect(),
        }),
    }
}

async fn sleep_unless_max(delay: Duration) {
    if delay == Duration::MAX {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(delay).await;
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::EnvironmentChanged(_) => "environment_changed",
        Kind::ScmIntegrationChanged(_) => "scm_integration_changed",
        Kind::HostTokenDeleted(_) => "host_token_deleted",
        Kind::Ping(_) => "ping",
        Kind::CheckAuthenticationForHost(_) => "check_authentication_for_host",
        Kind::ParseContext(_) => "parse_context",
        Kind::ValidateEnvironmentClass(_) => "validate_environment_class",
        Kind::ExchangeOauthCode(_) => "exchange_oauth_code",
        Kind::StoreHostToken(_) => "store_host_token",
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
