//! The seams between policy (this crate) and the outside world. Adapters
//! implement these; in-memory fakes in `testkit` implement them for tests.

use std::time::SystemTime;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::model::{
    Environment, EnvironmentClass, EnvironmentId, Instance, Record, Revision, Status, Subnet,
};
use crate::scm::TokenKey;

/// A boxed error from an adapter, kept as the source of a typed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the state store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stored item's version differs from the one the write expected:
    /// someone else wrote first. Reload and decide again.
    #[error("record of environment {0} changed concurrently")]
    Conflict(EnvironmentId),
    /// This replica no longer holds the lease; it must not write.
    #[error("this replica lost its lease")]
    Fenced,
    /// The store could not be reached or failed.
    #[error("state store unavailable")]
    Unavailable(#[source] BoxError),
}

/// Where the runner keeps its records. Every write is conditional on the
/// record's `version`; a lost race is [`StoreError::Conflict`], never a
/// silent overwrite.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Every record (one query, used at start-up).
    async fn list(&self) -> Result<Vec<Record>, StoreError>;
    /// One record.
    async fn get(&self, environment: EnvironmentId) -> Result<Option<Record>, StoreError>;
    /// Writes `record` if the stored version equals `record.version` (0: must
    /// not exist yet); returns it with its new version.
    async fn put(&self, record: &Record) -> Result<Record, StoreError>;
    /// Deletes `record` if the stored version equals `record.version`.
    async fn delete(&self, record: &Record) -> Result<(), StoreError>;
    /// A cheap call that proves the store works.
    async fn check(&self) -> Result<(), StoreError>;
}

/// Why a compute call failed, classified once by the adapter.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The zone has no capacity for the instance type, or does not offer it:
    /// definite; try another zone with a new attempt.
    #[error("no capacity in {zone}: {message}")]
    NoCapacity {
        /// The availability zone.
        zone: String,
        /// What the cloud said.
        message: String,
    },
    /// The request cannot succeed as it is (bad image, bad parameters,
    /// missing permission); retrying the same request is pointless.
    #[error("{0}")]
    Rejected(String),
    /// Throttling, 5xx or a timeout that outlived the SDK's retries: retry the
    /// same request (same token, same subnet) later.
    #[error("compute unavailable")]
    Unavailable(#[source] BoxError),
    /// This replica no longer holds the lease; it must not mutate.
    #[error("this replica lost its lease")]
    Fenced,
}

/// What a launch needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// The environment.
    pub environment: EnvironmentId,
    /// Its launch attempt.
    pub attempt: u32,
    /// Idempotency token of this attempt.
    pub client_token: String,
    /// Where.
    pub subnet: Subnet,
    /// EC2 instance type.
    pub instance_type: String,
    /// Root disk in GiB.
    pub disk_gib: u32,
    /// Repository to check out.
    pub repository_url: String,
    /// What to check out.
    pub revision: Revision,
    /// The secret holding the checkout credential, when the host needs one.
    pub checkout_secret: Option<String>,
}

/// The cloud's instances.
#[async_trait]
pub trait Compute: Send + Sync + 'static {
    /// Launches one instance, tagged with the environment and attempt.
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, ComputeError>;
    /// Finds the instance an earlier launch attempt created, by its tags.
    async fn find_launch(
        &self,
        environment: EnvironmentId,
        attempt: u32,
    ) -> Result<Option<Instance>, ComputeError>;
    /// Every instance tagged as this runner's, in one paged call.
    async fn observe(&self) -> Result<Vec<Instance>, ComputeError>;
    /// This runner's instances among `instance_ids` (at most a few hundred),
    /// looked up by id; ids the cloud does not know (yet) are left out.
    async fn observe_ids(&self, instance_ids: &[String]) -> Result<Vec<Instance>, ComputeError>;
    /// Starts a stopped instance.
    async fn start(&self, instance_id: &str) -> Result<(), ComputeError>;
    /// Stops a running instance, keeping its disk.
    async fn stop(&self, instance_id: &str) -> Result<(), ComputeError>;
    /// Terminates an instance.
    async fn terminate(&self, instance_id: &str) -> Result<(), ComputeError>;
    /// Marks an instance as an orphan (with a tag), to terminate it later.
    async fn quarantine(&self, instance_id: &str, at: SystemTime) -> Result<(), ComputeError>;
    /// The configured subnets with their availability zones.
    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>, ComputeError>;
    /// The availability zones (among the configured ones) that offer the type.
    async fn offered_zones(&self, instance_type: &str) -> Result<Vec<String>, ComputeError>;
    /// A cheap call that proves compute works.
    async fn check(&self) -> Result<(), ComputeError>;
    /// The instance's console output (its boot log), as text; read only
    /// after a failed start, for the operator's log.
    async fn console_output(&self, instance_id: &str) -> Result<String, ComputeError>;
}

/// The runner's credentials, kept in the secret store.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The one-time exchange token, until it is traded.
    pub exchange_token: Option<SecretString>,
    /// The access token for RunnerService calls.
    pub access_token: Option<SecretString>,
    /// The X25519 private key that opens sealed boxes.
    pub private_key: Option<SecretKeyBytes>,
}

/// 32 secret bytes; their `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKeyBytes(pub [u8; 32]);

impl std::fmt::Debug for SecretKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKeyBytes(..)")
    }
}

/// Why the secret store failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret holds something the runner cannot read.
    #[error("the runner secret is malformed: {0}")]
    Malformed(String),
    /// The store could not be reached or failed.
    #[error("secret store unavailable")]
    Unavailable(#[source] BoxError),
}

/// Where the runner's own credentials live.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Reads the credentials.
    async fn load(&self) -> Result<Credentials, SecretError>;
    /// Replaces the credentials.
    async fn save(&self, credentials: &Credentials) -> Result<(), SecretError>;
}

/// Why a control-plane call failed, as the adapter classified it (the
/// daemon's classifier of gRPC statuses is the only one); the cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The control plane refused the request as it is (invalid argument,
    /// failed precondition, not found), or answered something malformed;
    /// retrying it unchanged is pointless.
    #[error("control plane rejected the request")]
    Rejected(#[source] BoxError),
    /// Anything else: retry later.
    #[error("control plane unavailable")]
    Unavailable(#[source] BoxError),
}

impl ControlPlaneError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// The control plane, as the reconcile engine needs it.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Every environment assigned to this runner (all pages, or an error).
    async fn list_environments(&self) -> Result<Vec<Environment>, ControlPlaneError>;
    /// One environment; `None` when the control plane does not know it.
    async fn get_environment(
        &self,
        id: EnvironmentId,
    ) -> Result<Option<Environment>, ControlPlaneError>;
    /// Every environment class of this runner.
    async fn list_classes(&self) -> Result<Vec<EnvironmentClass>, ControlPlaneError>;
    /// Reports a status with its version.
    async fn update_status(
        &self,
        id: EnvironmentId,
        status_version: u64,
        status: &Status,
    ) -> Result<(), ControlPlaneError>;
}

/// Wall-clock time, injectable for tests.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests, and the reference control
/// plane's hand-moved time). Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::Mutex<SystemTime>>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(start)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        *self.0.lock().expect("clock lock is never poisoned") += by;
    }

    /// Sets the clock to `at`, forward or back.
    pub fn set(&self, at: SystemTime) {
        *self.0.lock().expect("clock lock is never poisoned") = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().expect("clock lock is never poisoned")
    }
}

/// A user's token for a host, in the clear: only ever in memory.
#[derive(Clone)]
pub struct HostToken {
    /// The token presented to the provider.
    pub access_token: SecretString,
    /// Trades for a new access token (OAuth, when the provider issues one).
    pub refresh_token: Option<SecretString>,
    /// When the access token expires; `None`: it does not.
    pub expires_at: Option<SystemTime>,
    /// The account the token authenticates as.
    pub username: String,
    /// The endpoints it was issued for and may be presented to
    /// ([`crate::scm::Endpoints::binding`]); sealed into the stored item's
    /// encryption context. `None` for a token stored before binding.
    pub binding: Option<String>,
}

impl std::fmt::Debug for HostToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostToken")
            .field("username", &self.username)
            .field("expires_at", &self.expires_at)
            .field("binding", &self.binding)
            .finish_non_exhaustive()
    }
}

/// A stored token and its bookkeeping.
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// Whose, for which host, obtained how.
    pub key: TokenKey,
    /// The token.
    pub token: HostToken,
    /// When it was written.
    pub stored_at: SystemTime,
    /// The item's version, for conditional writes.
    pub version: u64,
}

/// A stored token without its value, as listing returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Whose, for which host, obtained how.
    pub key: TokenKey,
    /// When it was written.
    pub stored_at: SystemTime,
    /// The item's version.
    pub version: u64,
    /// The endpoints it is bound to, as [`HostToken::binding`].
    pub binding: Option<String>,
}

/// Why the token store refused or failed. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    /// The item changed since it was read.
    #[error("the stored token changed concurrently")]
    Conflict,
    /// The item does not decrypt under its own key (tampered with, or moved
    /// from another principal or host).
    #[error("the stored token does not decrypt for this principal and host")]
    Undecryptable,
    /// The store or KMS could not be reached or failed.
    #[error("token store unavailable")]
    Unavailable(#[source] BoxError),
}

/// Where users' host tokens live, encrypted; one per [`TokenKey`].
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// One token, decrypted.
    async fn get(&self, key: &TokenKey) -> Result<Option<StoredToken>, TokenStoreError>;
    /// Writes a token: over whatever is stored (`expected: None`), or only
    /// if the stored version is `expected`. Returns the new version.
    async fn put(
        &self,
        key: &TokenKey,
        token: &HostToken,
        expected: Option<u64>,
    ) -> Result<u64, TokenStoreError>;
    /// Every stored token, without values (one query).
    async fn list(&self) -> Result<Vec<TokenEntry>, TokenStoreError>;
    /// Deletes a token: whatever is stored (`expected: None`), or only if
    /// the stored version is `expected` ([`TokenStoreError::Conflict`]
    /// otherwise). Deleting a missing one succeeds.
    async fn delete(&self, key: &TokenKey, expected: Option<u64>) -> Result<(), TokenStoreError>;
}

/// Per-environment secrets: the checkout credential an instance reads once.
#[async_trait]
pub trait EnvironmentSecrets: Send + Sync + 'static {
    /// Creates or overwrites the environment's secret, which holds
    /// `holder`'s token; returns its id for the instance to fetch.
    async fn put(
        &self,
        environment: EnvironmentId,
        value: &SecretString,
        holder: &TokenKey,
    ) -> Result<String, SecretError>;
    /// Lets only `instance_id` read the environment's secret.
    async fn bind(&self, environment: EnvironmentId, instance_id: &str) -> Result<(), SecretError>;
    /// Deletes the environment's secret at once; a missing one succeeds.
    async fn delete(&self, environment: EnvironmentId) -> Result<(), SecretError>;
    /// Deletes every environment secret that holds `holder`'s token (it was
    /// revoked); returns how many.
    async fn delete_holding(&self, holder: &TokenKey) -> Result<usize, SecretError>;
}

/// Why the checkout credential could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The creator has no usable token for the repository's host.
    #[error("authentication required for {0}")]
    AuthRequired(String),
    /// The repository cannot be checked out as asked (for the user).
    #[error("{0}")]
    Invalid(String),
    /// A store, KMS or the provider failed: retry later.
    #[error("checkout credential unavailable")]
    Unavailable(#[source] BoxError),
}

/// Gets an environment's repository credential to its instance, and only
/// to it.
#[async_trait]
pub trait Checkout: Send + Sync + 'static {
    /// Prepares the credential for `creator`'s checkout of `repository_url`;
    /// returns the secret id for the instance, or `None` when the host needs
    /// no credential.
    async fn prepare(
        &self,
        environment: EnvironmentId,
        creator: &str,
        repository_url: &str,
    ) -> Result<Option<String>, CheckoutError>;
    /// Lets only the environment's instance read its credential.
    async fn bind(
        &self,
        environment: EnvironmentId,
        instance_id: &str,
    ) -> Result<(), CheckoutError>;
    /// Deletes the environment's credential (idempotent).
    async fn remove(&self, environment: EnvironmentId) -> Result<(), CheckoutError>;
}

/// No repository credentials: every checkout is anonymous.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnonymousCheckout;

#[async_trait]
impl Checkout for AnonymousCheckout {
    async fn prepare(
        &self,
        _environment: EnvironmentId,
        _creator: &str,
        _repository_url: &str,
    ) -> Result<Option<String>, CheckoutError> {
        Ok(None)
    }

    async fn bind(
        &self,
        _environment: EnvironmentId,
        _instance_id: &str,
    ) -> Result<(), CheckoutError> {
        Ok(())
    }

    async fn remove(&self, _environment: EnvironmentId) -> Result<(), CheckoutError> {
        Ok(())
    }
}
