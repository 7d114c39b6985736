//! The reference control plane: the runner protocol's executable spec.
//!
//! It serves `runner.v1` to runners and `admin.v1` to `runnerctl`, keeps its
//! records in memory, and enforces the protocol's rules (single-use exchange
//! tokens, bearer authentication, growing status versions, field limits,
//! message size). It is a test peer and a local-run companion, not a product:
//! restarting it forgets everything.

pub mod admin_api;
pub mod cli;
pub mod clock;
pub mod hub;
pub mod runner_api;
pub mod server;
pub mod state;
mod views;

use std::sync::{Arc, Mutex, MutexGuard};

pub use clock::{Clock, ManualClock, SystemClock};
pub use server::{ServerConfig, Settings, serve};

/// Everything the two APIs share.
pub struct ControlPlane {
    state: Mutex<state::State>,
    hub: hub::Hub,
    clock: Arc<dyn Clock>,
    settings: Settings,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// An empty control plane.
    pub fn new(settings: Settings, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state::State::default()),
            hub: hub::Hub::default(),
            clock,
            settings,
        })
    }

    fn state(&self) -> MutexGuard<'_, state::State> {
        self.state
            .lock()
            .expect("state lock is never poisoned: updates do not panic")
    }
}
