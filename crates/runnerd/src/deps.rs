//! What the daemon runs on: the core's adapters ([`Deps`]) and, on AWS, the
//! start checks and self-update ([`Extras`]). Built by `runnerd::aws_deps_with`
//! and `runnerd::aws_extras` in production, from fakes in tests.

use std::sync::Arc;

use runner_core::leader::{Leadership, Lease};
use runner_core::traits::{Compute, EnvironmentSecrets, SecretStore, StateStore, TokenStore};

/// The adapters the daemon runs on.
pub struct Deps {
    /// Records.
    pub store: Arc<dyn StateStore>,
    /// Instances.
    pub compute: Arc<dyn Compute>,
    /// The runner's credentials.
    pub secrets: Arc<dyn SecretStore>,
    /// The leader lease.
    pub lease: Arc<dyn Lease>,
    /// The credential claim: on first start, the replica holding it trades
    /// the exchange token; the others wait for its credential.
    pub claim: Arc<dyn Lease>,
    /// This replica's leadership, which the adapters consult before mutating.
    pub leadership: Arc<Leadership>,
    /// Users' host tokens.
    pub tokens: Arc<dyn TokenStore>,
    /// Environments' checkout secrets.
    pub environment_secrets: Arc<dyn EnvironmentSecrets>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deps { .. }")
    }
}

/// What the daemon runs on AWS besides the core's adapters; tests of the
/// core leave these out.
#[derive(Debug, Default)]
pub struct Extras {
    /// Setup checks run at start (and again until they pass); failures show
    /// as DEGRADED.
    pub doctor: Option<Arc<crate::doctor::Doctor>>,
    /// Self-update, when the runner runs as an ECS service task.
    pub self_update: Option<crate::update::SelfUpdate>,
}
