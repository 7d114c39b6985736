//! Status delivery to the control plane.
//!
//! Invariants: versions per environment strictly grow (continuing from the
//! highest the control plane accepted, so a restart never reuses one, and
//! starting each leadership term above every version of earlier terms); a
//! status equal to the last published one is not sent again; an unsent status
//! is replaced by a newer one (each status is complete, so the newest carries
//! everything); undelivered statuses are retried with backoff until
//! delivered, the environment disappears, or the control plane rejects them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::model::{EnvironmentId, Status};
use crate::traits::{ControlPlane, ControlPlaneError};

#[derive(Debug, Default)]
struct Entry {
    /// The next version to assign.
    next_version: u64,
    /// The last status published (sent or waiting).
    last: Option<Status>,
    /// Waiting to be sent: (version, status).
    pending: Option<(u64, Status)>,
    /// Consecutive failed deliveries.
    failures: u32,
}

/// Statuses waiting for delivery.
#[derive(Debug, Default)]
pub struct Outbox {
    entries: Mutex<HashMap<EnvironmentId, Entry>>,
    wake: Notify,
    floor: std::sync::atomic::AtomicU64,
    /// The highest version this process assigned, across terms.
    issued: std::sync::atomic::AtomicU64,
}

/// What one delivery round did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Delivered.
    pub delivered: usize,
    /// Failed and kept for a retry.
    pub retrying: usize,
    /// Rejected by the control plane and dropped.
    pub rejected: usize,
}

impl Outbox {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<EnvironmentId, Entry>> {
        self.entries.lock().expect("outbox lock is never poisoned")
    }

    /// Publishes `status` for `id`; `accepted` is the highest version the
    /// control plane is known to have accepted. Returns the version assigned,
    /// or `None` when the status equals the last one published.
    pub fn publish(&self, id: EnvironmentId, accepted: u64, status: Status) -> Option<u64> {
        let version = {
            let mut entries = self.entries();
            let entry = entries.entry(id).or_default();
            let floor = self.floor.load(std::sync::atomic::Ordering::SeqCst);
            entry.next_version = entry.next_version.max(accepted + 1).max(floor);
            if entry.last.as_ref() == Some(&status) {
                return None;
            }
            let version = entry.next_version;
            entry.next_version += 1;
            self.issued
                .fetch_max(version, std::sync::atomic::Ordering::SeqCst);
            entry.last = Some(status.clone());
            entry.pending = Some((version, status));
            version
        };
        self.wake.notify_one();
        Some(version)
    }

    /// Starts a leadership term: versions from now on are at least
    /// `epoch · 2³²`, above anything an earlier leader (a lower epoch) can
    /// send, so a late status from a deposed leader is refused by the control
    /// plane instead of overwriting a newer one.
    pub fn start_term(&self, epoch: u64) {
        self.clear();
        // A term resumed at the same epoch (local validity lapsed and came
        // back) continues after every version already issued.
        let issued = self.issued.load(std::sync::atomic::Ordering::SeqCst);
        self.floor.store(
            epoch.saturating_mul(1 << 32).max(issued + 1),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Drops every pending status and what was last published (on a change
    /// of leadership: the leader owns reporting).
    pub fn clear(&self) {
        self.entries().clear();
    }

    /// Forgets an environment the control plane no longer knows.
    pub fn forget(&self, id: EnvironmentId) {
        self.entries().remove(&id);
    }

    /// How many statuses wait for delivery.
    pub fn pending(&self) -> usize {
        self.entries()
            .values()
            .filter(|e| e.pending.is_some())
            .count()
    }

    /// The last status published for `id`.
    pub fn last(&self, id: EnvironmentId) -> Option<Status> {
        self.entries().get(&id).and_then(|e| e.last.clone())
    }

    /// Sends everything pending once, at most `concurrency` at a time.
    pub async fn deliver_once(
        &self,
        control_plane: &dyn ControlPlane,
        concurrency: usize,
    ) -> Round {
        let batch: BTreeMap<EnvironmentId, (u64, Status)> = self
            .entries()
            .iter()
            .filter_map(|(id, e)| e.pending.clone().map(|p| (*id, p)))
            .collect();
        let mut round = Round::default();
        let mut recheck = Vec::new();
        for (id, version, result) in send_all(batch, concurrency, control_plane).await {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&id) else {
                continue;
            };
            let still_pending = entry.pending.as_ref().is_some_and(|(v, _)| *v == version);
            match result {
                Ok(()) => {
                    round.delivered += 1;
                    entry.failures = 0;
                    if still_pending {
                        entry.pending = None;
                    }
                }
                Err(ControlPlaneError::Rejected(message)) => {
                    round.rejected += 1;
                    tracing::warn!(env.id = %id, status_version = version, error = %message, "control plane rejected a status");
                    if still_pending {
                        recheck.push(id);
                    }
                }
                Err(ControlPlaneError::Unavailable(message)) => {
                    round.retrying += 1;
                    entry.failures = entry.failures.saturating_add(1);
                    tracing::debug!(env.id = %id, status_version = version, error = %message, "status delivery failed; will retry");
                }
            }
        }
        // A rejected status is usually numbered below one the control plane
        // already holds (another replica reported since): continue from the
        // accepted version, or drop it if the environment is gone.
        for id in recheck {
            let fetched = control_plane.get_environment(id).await;
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&id) else {
                continue;
            };
            match fetched {
                Ok(Some(environment))
                    if environment.accepted_status_version + 1 > entry.next_version =>
                {
                    entry.next_version = environment.accepted_status_version + 1;
                    if let Some((version, _)) = &mut entry.pending {
                        *version = entry.next_version;
                        entry.next_version += 1;
                    }
                }
                Ok(Some(_)) | Ok(None) => {
                    // The version was not the problem, or the environment is gone.
                    entry.pending = None;
                    entry.last = None;
                }
                Err(_) => {}
            }
        }
        round
    }

    /// Delivers while `leading()` holds, until `shutdown`: wakes on publish,
    /// retries failures with
    /// `backoff` (by the most failed entry), and makes a last attempt when
    /// shut down.
    pub async fn run_while(
        self: Arc<Self>,
        leading: impl Fn() -> bool,
        control_plane: Arc<dyn ControlPlane>,
        backoff: Backoff,
        concurrency: usize,
        on_round: impl Fn(Round, usize),
        shutdown: CancellationToken,
    ) {
        loop {
            if !leading() {
                // Only the leader reports; what a former leader left is stale.
                self.clear();
            }
            let round = self.deliver_once(control_plane.as_ref(), concurrency).await;
            on_round(round, self.pending());
            let failures = self
                .entries()
                .values()
                .filter(|e| e.pending.is_some())
                .map(|e| e.failures)
                .max();
            let wait = match failures {
                Some(n) if n > 0 => backoff.equal_jitter(n),
                // A publish during the round already left a permit in `wake`.
                _ => Duration::MAX,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = sleep_or_forever(wait) => {}
            }
        }
        if leading() {
            let round = self.deliver_once(control_plane.as_ref(), concurrency).await;
            on_round(round, self.pending());
        }
    }
}

async fn sleep_or_forever(wait: Duration) {
    if wait == Duration::MAX {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(wait).await;
    }
}

async fn send_all(
    batch: BTreeMap<EnvironmentId, (u64, Status)>,
    concurrency: usize,
    control_plane: &dyn ControlPlane,
) -> Vec<(EnvironmentId, u64, Result<(), ControlPlaneError>)> {
    futures::stream::iter(batch)
        .map(|(id, (version, status))| async move {
            let result = control_plane.update_status(id, version, &status).await;
            (id, version, result)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn status(phase: Phase) -> Status {
        Status {
            spec_version: 1,
            spec_valid: true,
            phase,
            machine: None,
            failure_message: String::new(),
            warning_message: String::new(),
        }
    }

    #[test]
    fn a_term_resumed_at_the_same_epoch_never_reuses_a_version() {
        let outbox = Outbox::default();
        let id = EnvironmentId(uuid::Uuid::new_v4());
        outbox.start_term(3);
        let first = outbox.publish(id, 0, status(Phase::Creating)).expect("new");
        assert_eq!(first, 3 << 32);
        // Local validity lapsed and came back: a new term, the same epoch.
        outbox.start_term(3);
        let second = outbox.publish(id, 0, status(Phase::Running)).expect("new");
        assert!(second > first, "{second} after {first}");
        outbox.start_term(4);
        let third = outbox.publish(id, 0, status(Phase::Stopped)).expect("new");
        assert_eq!(third, 4 << 32);
    }
}
