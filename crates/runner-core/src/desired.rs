//! What the control plane wants: the newest spec seen of each environment,
//! and the runner's environment classes. Filled by the informer, read by
//! reconciles. A spec never replaces a newer one.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::{Environment, EnvironmentClass, EnvironmentId};

/// What is known of an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The control plane describes it so.
    Present(Environment),
    /// The control plane said it does not know it (a direct lookup, never
    /// mere absence from a list).
    Gone,
}

/// The desired state of every environment.
#[derive(Debug, Default)]
pub struct Desired {
    environments: Mutex<HashMap<EnvironmentId, Known>>,
    classes: Mutex<HashMap<String, EnvironmentClass>>,
}

impl Desired {
    fn environments(&self) -> std::sync::MutexGuard<'_, HashMap<EnvironmentId, Known>> {
        self.environments
            .lock()
            .expect("desired lock is never poisoned")
    }

    /// Stores `environment` unless a newer spec is already known. Returns
    /// whether anything changed.
    pub fn upsert(&self, mut environment: Environment) -> bool {
        let mut environments = self.environments();
        match environments.get(&environment.id) {
            Some(Known::Present(existing)) => {
                if existing.spec.spec_version > environment.spec.spec_version {
                    return false;
                }
                environment.accepted_status_version = environment
                    .accepted_status_version
                    .max(existing.accepted_status_version);
                if *existing == environment {
                    return false;
                }
            }
            Some(Known::Gone) | None => {}
        }
        environments.insert(environment.id, Known::Present(environment));
        true
    }

    /// Records that the control plane does not know `id`.
    pub fn mark_gone(&self, id: EnvironmentId) {
        self.environments().insert(id, Known::Gone);
    }

    /// Forgets `id` entirely (its teardown is complete).
    pub fn forget(&self, id: EnvironmentId) {
        self.environments().remove(&id);
    }

    /// What is known of `id`.
    pub fn get(&self, id: EnvironmentId) -> Option<Known> {
        self.environments().get(&id).cloned()
    }

    /// Every environment known to be present.
    pub fn present(&self) -> Vec<EnvironmentId> {
        self.environments()
            .iter()
            .filter(|(_, k)| matches!(k, Known::Present(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// How many environments are known to be present.
    pub fn len(&self) -> usize {
        self.present().len()
    }

    /// Whether no environment is known to be present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the classes.
    pub fn set_classes(&self, classes: Vec<EnvironmentClass>) {
        *self.classes.lock().expect("classes lock is never poisoned") =
            classes.into_iter().map(|c| (c.id.clone(), c)).collect();
    }

    /// One class.
    pub fn class(&self, id: &str) -> Option<EnvironmentClass> {
        self.classes
            .lock()
            .expect("classes lock is never poisoned")
            .get(id)
            .cloned()
    }
}
