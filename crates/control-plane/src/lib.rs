//! The reference control plane: the runner protocol's executable spec.
//!
//! It serves `runner.v1` to runners and `admin.v1` to `runnerctl`, keeps its
//! records in memory, and enforces the protocol's rules (single-use exchange
//! tokens, bearer authentication, growing status versions, field limits,
//! message size). It is a test peer and a local-run companion, not a product:
//! restarting it forgets everything.

pub mod admin_api;
pub mod cli;
pub mod hub;
pub mod runner_api;
pub mod server;
pub mod state;
mod views;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The control plane's time: `runner_core`'s injectable clock.
pub use runner_core::traits::{Clock, ManualClock, SystemClock};
pub use server::{ServerConfig, Settings, serve};

/// A fault in the environment lists served to runners, for tests of a
/// runner's trust in lists (it must never tear down what a list omits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListFault {
    /// Lists are complete.
    #[default]
    None,
    /// Every list is empty.
    Empty,
    /// Every other environment of each page is left out.
    Partial,
    /// Every list fails with UNAVAILABLE (counted).
    Unavailable,
}

/// Status updates the control plane answered, by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusCounts {
    /// Stored.
    pub accepted: u64,
    /// Refused: a lower version, or the same version with other content.
    pub stale: u64,
}

/// Everything the two APIs share.
pub struct ControlPlane {
    state: Mutex<state::State>,
    hub: hub::Hub,
    clock: Arc<dyn Clock>,
    settings: Settings,
    list_fault: Mutex<ListFault>,
    lists_refused: AtomicU64,
    statuses_accepted: AtomicU64,
    statuses_stale: AtomicU64,
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
            list_fault: Mutex::default(),
            lists_refused: AtomicU64::new(0),
            statuses_accepted: AtomicU64::new(0),
            statuses_stale: AtomicU64::new(0),
        })
    }

    /// Serves faulty environment lists (tests only; not in the admin API).
    pub fn set_list_fault(&self, fault: ListFault) {
        *self.list_fault.lock().expect("lock") = fault;
    }

    fn list_fault(&self) -> ListFault {
        *self.list_fault.lock().expect("lock")
    }

    /// How many environment lists [`ListFault::Unavailable`] refused.
    pub fn lists_refused(&self) -> u64 {
        self.lists_refused.load(Ordering::SeqCst)
    }

    /// How many status updates were stored and refused as stale.
    pub fn status_counts(&self) -> StatusCounts {
        StatusCounts {
            accepted: self.statuses_accepted.load(Ordering::SeqCst),
            stale: self.statuses_stale.load(Ordering::SeqCst),
        }
    }

    fn state(&self) -> MutexGuard<'_, state::State> {
        self.state
            .lock()
            .expect("state lock is never poisoned: updates do not panic")
    }
}
