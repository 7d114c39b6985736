//! The runner's view of environments: what the control plane wants (the
//! spec), what the runner stored (the record), and what the cloud shows (the
//! instance). Plain data, no I/O.

use std::fmt;
use std::time::Duration;

use uuid::Uuid;

/// An environment's id, a UUID assigned by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvironmentId(pub Uuid);

impl fmt::Display for EnvironmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for EnvironmentId {
    type Err = crate::validate::FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::validate::uuid("environment_id", s).map(Self)
    }
}

/// The phase the control plane wants an environment in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredPhase {
    /// An instance exists and runs.
    Running,
    /// The instance (if any) is stopped; its disk is kept.
    Stopped,
    /// The instance is terminated and the runner's records are removed.
    Deleted,
}

/// The phase the runner reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Launching the first instance.
    Creating,
    /// Starting a stopped instance.
    Starting,
    /// The instance runs.
    Running,
    /// Stopping the instance.
    Stopping,
    /// The instance is stopped (or none was ever launched).
    Stopped,
    /// Terminating the instance.
    Deleting,
    /// The instance is gone.
    Deleted,
}

/// What to check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revision {
    /// The repository's default branch.
    Default,
    /// A branch.
    Branch(String),
    /// A full commit id.
    Commit(String),
}

/// What the control plane wants, as received (not yet validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Grows with every change.
    pub spec_version: u64,
    /// Where the environment should be; `None` when the wire value was not
    /// one of RUNNING, STOPPED, DELETED (reported as an invalid spec).
    pub desired: Option<DesiredPhase>,
    /// The class id, as received.
    pub class_id: String,
    /// The repository URL, as received.
    pub repository_url: String,
    /// What to check out.
    pub revision: Revision,
    /// The user whose tokens are used.
    pub creator: String,
    /// Stop the environment once no client has been connected for this long
    /// (`timeout.disconnected`); `None` means never.
    pub disconnected_timeout: Option<Duration>,
}

/// An environment as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its id.
    pub id: EnvironmentId,
    /// What it should be.
    pub spec: Spec,
    /// The highest status version the control plane accepted for it.
    pub accepted_status_version: u64,
}

/// An environment class: instance type and root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentClass {
    /// Its id.
    pub id: String,
    /// Shown to users.
    pub display_name: String,
    /// EC2 instance type.
    pub instance_type: String,
    /// Root disk size in GiB.
    pub disk_gib: u32,
    /// Whether environments may use it.
    pub enabled: bool,
}

/// EC2's view of an instance's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Launching or starting.
    Pending,
    /// Running.
    Running,
    /// Stopping.
    Stopping,
    /// Stopped.
    Stopped,
    /// Terminating.
    ShuttingDown,
    /// Terminated.
    Terminated,
}

/// An instance the runner launched, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// EC2 instance id.
    pub id: String,
    /// The environment it belongs to (from its tags).
    pub environment: EnvironmentId,
    /// The launch attempt that created it (from its tags).
    pub attempt: u32,
    /// Its availability zone.
    pub availability_zone: String,
    /// Its subnet.
    pub subnet_id: String,
    /// Its private IPv4 address, once assigned.
    pub private_ip: Option<String>,
    /// Its state.
    pub state: InstanceState,
    /// When the runner marked it as an orphan, if it did.
    pub quarantined_at: Option<std::time::SystemTime>,
    /// When EC2 last launched or started it.
    pub launched_at: Option<std::time::SystemTime>,
    /// What the instance reported about itself (its tags; untrusted).
    pub report: crate::report::Report,
}

/// A subnet environments may be placed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    /// The subnet id.
    pub id: String,
    /// Its availability zone.
    pub availability_zone: String,
}

/// A launch the runner decided on, written before `RunInstances` is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchIntent {
    /// Launch attempt, from 1; a new attempt only after a definite failure.
    pub attempt: u32,
    /// Where.
    pub subnet: Subnet,
    /// The idempotency token, derived from (environment, attempt).
    pub client_token: String,
    /// How far the launch got.
    pub state: LaunchState,
}

/// How far a launch attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchState {
    /// Decided; `RunInstances` may or may not have happened.
    Intended,
    /// The instance exists.
    Launched {
        /// Its id.
        instance_id: String,
    },
    /// Definitely failed: no instance came of it.
    Failed,
}

impl LaunchIntent {
    /// The instance id, once launched.
    pub fn instance_id(&self) -> Option<&str> {
        match &self.state {
            LaunchState::Launched { instance_id } => Some(instance_id),
            LaunchState::Intended | LaunchState::Failed => None,
        }
    }
}

/// The runner's own record of an environment, kept in the state store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The environment.
    pub environment: EnvironmentId,
    /// The item's version in the store: every write is conditional on it.
    /// 0 means "not stored yet".
    pub version: u64,
    /// The highest spec version acted on; an older spec is stale.
    pub spec_version: u64,
    /// The current (or last) launch.
    pub launch: Option<LaunchIntent>,
    /// Availability zones that said "no capacity" or "unsupported" for this
    /// environment's instance type, in order; cleared by a successful launch.
    pub exhausted_zones: Vec<String>,
    /// The spec version the runner stopped the environment at because no
    /// client was connected for `timeout.disconnected`: while the spec is
    /// still that one, the instance stays stopped.
    pub idle_stopped_at_spec: Option<u64>,
}

impl Record {
    /// A record not stored yet.
    pub fn new(environment: EnvironmentId) -> Self {
        Self {
            environment,
            version: 0,
            spec_version: 0,
            launch: None,
            exhausted_zones: Vec::new(),
            idle_stopped_at_spec: None,
        }
    }
}

/// The client token of a launch attempt: stable for (environment, attempt),
/// at most 64 ASCII characters as EC2 requires.
pub fn client_token(environment: EnvironmentId, attempt: u32) -> String {
    format!("{}-{attempt}", environment.0.simple())
}

/// The status the runner reports for an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The spec version this status answers.
    pub spec_version: u64,
    /// Whether that spec was valid.
    pub spec_valid: bool,
    /// The reported phase.
    pub phase: Phase,
    /// The instance, if any.
    pub machine: Option<Instance>,
    /// Why the environment cannot reach its desired phase; empty when it can.
    pub failure_message: String,
    /// A problem that does not block; empty when none.
    pub warning_message: String,
    /// How far the instance got in making its content ready.
    pub content: Content,
    /// Why the runner stopped the environment on its own, if it did.
    pub stop_reason: Option<StopReason>,
}

/// The content of an environment (its repository checkout), as the
/// instance reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Content {
    /// The bootstrap's last stage (the failed one, with a failure message).
    pub stage: Option<crate::report::Stage>,
    /// The commit checked out, once ready.
    pub commit: Option<String>,
    /// When the content was ready.
    pub ready_at: Option<std::time::SystemTime>,
    /// How long the start took, stage by stage.
    pub timings: Timings,
}

/// The durations users wait for, each known once both ends are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// From the launch (EC2's launch time) to the instance running (its
    /// bootstrap started).
    pub launch_to_running: Option<Duration>,
    /// From the instance running to its content ready.
    pub running_to_ready: Option<Duration>,
    /// From the launch to the content ready.
    pub launch_to_ready: Option<Duration>,
}

/// Why the runner stopped an environment on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// No client was connected for the spec's `timeout.disconnected`.
    DisconnectedTimeout,
}

/// What to do after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long (also used as the periodic resync).
    Requeue(Duration),
    /// Nothing to do until the environment changes.
    AwaitChange,
}
