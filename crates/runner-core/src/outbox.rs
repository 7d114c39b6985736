//! Status delivery to the control plane.
//!
//! Invariants: every version this process assigns is above every version it
//! assigned before (one counter for all environments, raised under the same
//! lock that assigns), above the highest the control plane accepted for the
//! environment when that lies in the current term's range, and at least the
//! term's floor `epoch · 2³²`, above every version of earlier terms. So a
//! version is never reused within a process's life, whatever the order of
//! publishes, clears, new terms and rechecks, and a restart continues above
//! what the control plane accepted. A status equal to the last published one
//! is not sent again; an unsent status is replaced by a newer one (each
//! status is complete, so the newest carries everything); undelivered
//! statuses are retried with backoff until delivered, the environment
//! disappears, or the control plane rejects them. While the process does
//! not lead, nothing is sent, and nothing is renumbered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::chain;
use crate::model::{EnvironmentId, Phase, Status};
use crate::traits::{ControlPlane, ControlPlaneError};

/// Versions of one leadership term lie in `[epoch · 2³², (epoch + 1) · 2³²)`.
const TERM_BITS: u32 = 32;

/// One per known environment, so kept small: the statuses are shared
/// behind `Arc` (inline, the two took about 850 bytes a slot).
#[derive(Debug, Default)]
struct Entry {
    /// The last status published (sent or waiting).
    last: Option<Arc<Status>>,
    /// Waiting to be sent: (version, status).
    pending: Option<(u64, Arc<Status>)>,
    /// Consecutive failed deliveries.
    failures: u32,
    /// Since when a status has been waiting (a newer one replacing it keeps
    /// the time): `None` while nothing waits.
    waiting_since: Option<Instant>,
    /// Since when the last published status has been in its phase.
    phase_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<EnvironmentId, Entry>,
    /// The current term's epoch.
    epoch: u64,
    /// The highest version this process assigned, across terms.
    issued: u64,
}

impl State {
    /// The next version for a status whose environment the control plane
    /// accepted up to `accepted`: above everything issued, at least the
    /// term's floor, and above `accepted` when that is of this term or an
    /// earlier one (a newer term's version means this process was deposed:
    /// its status will be refused, and must not take the newer term's numbers).
    fn next(&mut self, accepted: u64) -> u64 {
        let floor = self.epoch.saturating_mul(1 << TERM_BITS);
        let ceiling = self.epoch.saturating_add(1).saturating_mul(1 << TERM_BITS);
        let mut version = self.issued.saturating_add(1).max(floor);
        if accepted < ceiling {
            version = version.max(accepted.saturating_add(1));
        }
        self.issued = version;
        version
    }
}

/// Statuses waiting for delivery.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
}

/// What the outbox holds, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Environments by the phase last published for them.
    pub phases: BTreeMap<Phase, usize>,
    /// Statuses waiting for delivery.
    pub pending: usize,
    /// How long the oldest waiting status has waited.
    pub oldest_pending: Option<Duration>,
    /// How long the environment longest in `Creating` or `Starting` has been
    /// there.
    pub oldest_starting: Option<Duration>,
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
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock is never poisoned")
    }

    /// Publishes `status` for `id`; `accepted` is the highest version the
    /// control plane is known to have accepted. Returns the version assigned,
    /// or `None` when the status equals the last one published.
    pub fn publish(&self, id: EnvironmentId, accepted: u64, status: Status) -> Option<u64> {
        let version = {
            let mut state = self.state();
            if state
                .entries
                .get(&id)
                .and_then(|e| e.last.as_deref())
                .is_some_and(|last| *last == status)
            {
                return None;
            }
            let version = state.next(accepted);
            let entry = state.entries.entry(id).or_default();
            let now = Instant::now();
            if entry.last.as_ref().map(|s| s.phase) != Some(status.phase) {
                entry.phase_since = Some(now);
            }
            entry.waiting_since.get_or_insert(now);
            let status = Arc::new(status);
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
    /// plane instead of overwriting a newer one. A term resumed at the same
    /// epoch continues above every version already issued.
    pub fn start_term(&self, epoch: u64) {
        let mut state = self.state();
        state.entries.clear();
        state.epoch = state.epoch.max(epoch);
    }

    /// Drops every pending status and what was last published (on a change
    /// of leadership: the leader owns reporting). Versions already issued
    /// stay issued.
    pub fn clear(&self) {
        self.state().entries.clear();
    }

    /// Forgets an environment the control plane no longer knows.
    pub fn forget(&self, id: EnvironmentId) {
        self.state().entries.remove(&id);
    }

    /// How many statuses wait for delivery.
    pub fn pending(&self) -> usize {
        self.state()
            .entries
            .values()
            .filter(|e| e.pending.is_some())
            .count()
    }

    /// Phases, what waits and since when.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let state = self.state();
        let mut snapshot = Snapshot::default();
        for entry in state.entries.values() {
            if entry.pending.is_some() {
                snapshot.pending += 1;
                let waited = entry.waiting_since.map(|since| now - since);
                snapshot.oldest_pending = snapshot.oldest_pending.max(waited);
            }
            let Some(last) = &entry.last else { continue };
            *snapshot.phases.entry(last.phase).or_default() += 1;
            if matches!(last.phase, Phase::Creating | Phase::Starting) {
                let since = entry.phase_since.map(|since| now - since);
                snapshot.oldest_starting = snapshot.oldest_starting.max(since);
            }
        }
        snapshot
    }

    /// The last status published for `id`.
    pub fn last(&self, id: EnvironmentId) -> Option<Status> {
        self.state()
            .entries
            .get(&id)
            .and_then(|e| e.last.as_deref().cloned())
    }

    /// The highest version this process assigned.
    pub fn issued(&self) -> u64 {
        self.state().issued
    }

    /// Sends everything pending once, at most `concurrency` at a time.
    pub async fn deliver_once(
        &self,
        control_plane: &dyn ControlPlane,
        concurrency: usize,
        leading: &(dyn Fn() -> bool + Send + Sync),
    ) -> Round {
        let batch: BTreeMap<EnvironmentId, (u64, Arc<Status>)> = self
            .state()
            .entries
            .iter()
            .filter_map(|(id, e)| e.pending.clone().map(|p| (*id, p)))
            .collect();
        let mut round = Round::default();
        let mut recheck = Vec::new();
        for (id, version, result) in send_all(batch, concurrency, control_plane, leading).await {
            // Not sent: leadership lapsed during the round; it stays pending.
            let Some(result) = result else {
                continue;
            };
            let mut state = self.state();
            let Some(entry) = state.entries.get_mut(&id) else {
                continue;
            };
            // Versions are never reused, so the number names the status.
            let still_pending = entry.pending.as_ref().is_some_and(|(v, _)| *v == version);
            match result {
                Ok(()) => {
                    round.delivered += 1;
                    entry.failures = 0;
                    if still_pending {
                        entry.pending = None;
                        entry.waiting_since = None;
                    }
                }
                Err(err @ ControlPlaneError::Rejected(_)) => {
                    round.rejected += 1;
                    tracing::warn!(env.id = %id, status_version = version, error = %chain(&err), "control plane rejected a status");
                    if still_pending {
                        recheck.push((id, version));
                    }
                }
                Err(err @ ControlPlaneError::Unavailable(_)) => {
                    round.retrying += 1;
                    entry.failures = entry.failures.saturating_add(1);
                    tracing::debug!(env.id = %id, status_version = version, error = %chain(&err), "status delivery failed; will retry");
                }
            }
        }
        // A rejected status is usually numbered below one the control plane
        // already holds (another replica reported since): renumber it above
        // the accepted version, or drop it if the environment is gone.
        for (id, rejected) in recheck {
            let fetched = control_plane.get_environment(id).await;
            let mut state = self.state();
            let still_pending = state
                .entries
                .get(&id)
                .and_then(|e| e.pending.as_ref())
                .is_some_and(|(v, _)| *v == rejected);
            // A newer status published meanwhile has its own number.
            if !still_pending {
                continue;
            }
            let ceiling = state.epoch.saturating_add(1).saturating_mul(1 << TERM_BITS);
            match fetched {
                Ok(Some(environment))
                    if environment.accepted_status_version >= rejected
                        && environment.accepted_status_version < ceiling =>
                {
                    let version = state.next(environment.accepted_status_version);
                    if let Some(entry) = state.entries.get_mut(&id)
                        && let Some((v, _)) = &mut entry.pending
                    {
                        *v = version;
                    }
                }
                Ok(_) => {
                    // The version was not the problem, the environment is
                    // gone, or a newer term reports it: drop the status.
                    if let Some(entry) = state.entries.get_mut(&id) {
                        entry.pending = None;
                        entry.waiting_since = None;
                        entry.last = None;
                    }
                }
                Err(_) => {}
            }
        }
        round
    }

    /// Delivers while `leading()` holds, until `shutdown`: wakes on publish,
    /// retries failures with `backoff` (by the most failed entry), and makes
    /// a last attempt when shut down, if still leading. Rounds while not
    /// leading send nothing and keep what is pending (a lapse that recovers
    /// at the same epoch delivers it; a new term clears it).
    pub async fn run_while(
        self: Arc<Self>,
        leading: impl Fn() -> bool + Send + Sync,
        control_plane: Arc<dyn ControlPlane>,
        backoff: Backoff,
        concurrency: usize,
        on_round: impl Fn(Round, usize),
        shutdown: CancellationToken,
    ) {
        loop {
            if leading() {
                let round = self
                    .deliver_once(control_plane.as_ref(), concurrency, &leading)
                    .await;
                on_round(round, self.pending());
            }
            let failures = self
                .state()
                .entries
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
            let round = self
                .deliver_once(control_plane.as_ref(), concurrency, &leading)
                .await;
            let pending = self.pending();
            tracing::info!(
                delivered = round.delivered,
                pending,
                "last status delivery before stopping"
            );
            on_round(round, pending);
        }
    }

    /// Wakes the delivery loop (leadership came back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn sleep_or_forever(wait: Duration) {
    if wait == Duration::MAX {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(wait).await;
    }
}

/// Sends `batch`, `concurrency` at a time, each only if still `leading`
/// when its turn comes (`None`: not sent): a round cut by a lapse (a process
/// paused mid-round) sends nothing of its rest.
async fn send_all(
    batch: BTreeMap<EnvironmentId, (u64, Arc<Status>)>,
    concurrency: usize,
    control_plane: &dyn ControlPlane,
    leading: &(dyn Fn() -> bool + Send + Sync),
) -> Vec<(EnvironmentId, u64, Option<Result<(), ControlPlaneError>>)> {
    futures::stream::iter(batch)
        .map(|(id, (version, status))| async move {
            if !leading() {
                return (id, version, None);
            }
            let result = control_plane.update_status(id, version, &status).await;
            (id, version, Some(result))
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;
    use crate::model::{Environment, EnvironmentClass, Phase, Revision, Spec};

    fn status(phase: Phase) -> Status {
        Status {
            spec_version: 1,
            spec_valid: true,
            phase,
            machine: None,
            failure_message: String::new(),
            warning_message: String::new(),
            content: crate::model::Content::default(),
            stop_reason: None,
        }
    }

    #[test]
    fn an_environment_slot_stays_small() {
        // One per known environment: 10,000 of them, in a table with room
        // to spare, must not hold two whole statuses inline.
        let slot = std::mem::size_of::<(EnvironmentId, Entry)>();
        assert!(slot <= 96, "{slot} bytes a slot");
        let outbox = Outbox::default();
        let id = EnvironmentId(uuid::Uuid::new_v4());
        outbox.publish(id, 0, status(Phase::Creating)).expect("new");
        let state = outbox.state();
        let entry = &state.entries[&id];
        let (last, (_, pending)) = (
            entry.last.as_ref(),
            entry.pending.as_ref().expect("pending"),
        );
        assert!(
            last.is_some_and(|last| Arc::ptr_eq(last, pending)),
            "one copy of the status"
        );
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

    #[test]
    fn a_clear_never_lets_a_version_be_reused() {
        // The sequence the chaos suite hit: publish, clear (leadership
        // looked lost), publish again with the same lagging `accepted`.
        let outbox = Outbox::default();
        let id = EnvironmentId(uuid::Uuid::new_v4());
        outbox.start_term(1);
        let a = outbox.publish(id, 0, status(Phase::Creating)).expect("new");
        assert_eq!(a, 1 << 32);
        outbox.clear();
        let b = outbox.publish(id, 0, status(Phase::Starting)).expect("new");
        assert!(b > a, "{b} reuses {a}");
        outbox.forget(id);
        let c = outbox.publish(id, 0, status(Phase::Running)).expect("new");
        assert!(c > b, "{c} reuses {b}");
    }

    #[test]
    fn an_accepted_version_of_a_newer_term_is_not_adopted() {
        let outbox = Outbox::default();
        let id = EnvironmentId(uuid::Uuid::new_v4());
        outbox.start_term(2);
        // A newer leader (epoch 3) already reported: this deposed process
        // must not number its status inside epoch 3's range.
        let v = outbox
            .publish(id, (3 << 32) + 5, status(Phase::Running))
            .expect("new");
        assert_eq!(v, 2 << 32);
        // Its own term's accepted versions are adopted.
        let w = outbox
            .publish(id, (2 << 32) + 40, status(Phase::Stopped))
            .expect("new");
        assert_eq!(w, (2 << 32) + 41);
    }

    /// A control plane that keeps, per environment, the highest accepted
    /// version and its status, and records every (version, status) sent.
    #[derive(Default)]
    struct Plane {
        accepted: Mutex<HashMap<EnvironmentId, (u64, Status)>>,
        sent: Mutex<HashMap<(EnvironmentId, u64), Status>>,
        /// Statuses sent at a version already delivered with other content.
        reused: Mutex<u32>,
    }

    impl Plane {
        fn accepted(&self, id: EnvironmentId) -> u64 {
            self.accepted
                .lock()
                .expect("lock")
                .get(&id)
                .map_or(0, |(v, _)| *v)
        }

        /// Another replica reports, at `version`.
        fn other_reports(&self, id: EnvironmentId, version: u64) {
            let mut accepted = self.accepted.lock().expect("lock");
            let entry = accepted.entry(id).or_insert((0, status(Phase::Creating)));
            if version > entry.0 {
                *entry = (version, status(Phase::Deleting));
            }
        }
    }

    #[async_trait]
    impl ControlPlane for Plane {
        async fn list_environments(&self) -> Result<Vec<Environment>, ControlPlaneError> {
            Ok(Vec::new())
        }

        async fn get_environment(
            &self,
            id: EnvironmentId,
        ) -> Result<Option<Environment>, ControlPlaneError> {
            Ok(Some(Environment {
                id,
                spec: Spec {
                    spec_version: 1,
                    desired: None,
                    class_id: String::new(),
                    repository_url: String::new(),
                    revision: Revision::Default,
                    creator: String::new(),
                    disconnected_timeout: None,
                },
                accepted_status_version: self.accepted(id),
            }))
        }

        async fn list_classes(&self) -> Result<Vec<EnvironmentClass>, ControlPlaneError> {
            Ok(Vec::new())
        }

        async fn update_status(
            &self,
            id: EnvironmentId,
            status_version: u64,
            status: &Status,
        ) -> Result<(), ControlPlaneError> {
            {
                let mut sent = self.sent.lock().expect("lock");
                if let Some(before) = sent.get(&(id, status_version))
                    && before != status
                {
                    *self.reused.lock().expect("lock") += 1;
                }
                sent.insert((id, status_version), status.clone());
            }
            let mut accepted = self.accepted.lock().expect("lock");
            let entry = accepted.entry(id).or_insert((0, status.clone()));
            if status_version > entry.0 || (status_version == entry.0 && &entry.1 == status) {
                *entry = (status_version, status.clone());
                Ok(())
            } else {
                Err(ControlPlaneError::Rejected("stale status_version".into()))
            }
        }
    }

    /// The snapshot counts phases and measures waits on the clock: how long
    /// the oldest undelivered status waited (a newer status replacing it
    /// keeps its time, a delivery ends it) and how long the environment
    /// longest in `Creating` or `Starting` has been there.
    #[tokio::test(start_paused = true)]
    async fn the_snapshot_counts_phases_and_the_oldest_waits() {
        let outbox = Outbox::default();
        let (a, b) = (
            EnvironmentId(uuid::Uuid::from_u128(1)),
            EnvironmentId(uuid::Uuid::from_u128(2)),
        );
        outbox.start_term(1);
        outbox.publish(a, 0, status(Phase::Creating));
        tokio::time::advance(Duration::from_secs(10)).await;
        outbox.publish(b, 0, status(Phase::Running));
        let mut waiting = status(Phase::Creating);
        waiting.warning_message = "still waiting".into();
        outbox.publish(a, 0, waiting);
        let snapshot = outbox.snapshot();
        assert_eq!(
            snapshot.phases,
            BTreeMap::from([(Phase::Creating, 1), (Phase::Running, 1)])
        );
        assert_eq!(snapshot.pending, 2);
        assert_eq!(snapshot.oldest_pending, Some(Duration::from_secs(10)));
        assert_eq!(snapshot.oldest_starting, Some(Duration::from_secs(10)));

        outbox.deliver_once(&Plane::default(), 4, &|| true).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        let snapshot = outbox.snapshot();
        assert_eq!((snapshot.pending, snapshot.oldest_pending), (0, None));
        assert_eq!(snapshot.oldest_starting, Some(Duration::from_secs(15)));
        outbox.publish(a, 0, status(Phase::Running));
        let snapshot = outbox.snapshot();
        assert_eq!(snapshot.phases, BTreeMap::from([(Phase::Running, 2)]));
        assert_eq!(snapshot.oldest_pending, Some(Duration::ZERO));
        assert_eq!(snapshot.oldest_starting, None);
    }

    /// Random interleavings of publish, clear, forget, new terms (new and
    /// resumed epochs), deliveries with rechecks, other replicas' reports
    /// and restarts: no version is ever sent twice with different content,
    /// and each process's versions only grow.
    #[tokio::test]
    async fn no_interleaving_reuses_a_version() {
        let ids: Vec<EnvironmentId> = (0..3)
            .map(|n| EnvironmentId(uuid::Uuid::from_u128(n + 1)))
            .collect();
        let phases = [
            Phase::Creating,
            Phase::Starting,
            Phase::Running,
            Phase::Stopping,
            Phase::Stopped,
        ];
        for seed in 0..300_u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let plane = Plane::default();
            let mut outbox = Outbox::default();
            let mut epoch = 1;
            outbox.start_term(epoch);
            let mut last_issued = 0;
            for _ in 0..200 {
                let id = ids[rng.gen_range(0..ids.len())];
                match rng.gen_range(0..100) {
                    0..45 => {
                        // `accepted` as the caller knows it: current or lagging.
                        let accepted = plane.accepted(id).saturating_sub(rng.gen_range(0..3));
                        let phase = phases[rng.gen_range(0..phases.len())];
                        outbox.publish(id, accepted, status(phase));
                    }
                    45..50 => outbox.clear(),
                    50..53 => outbox.forget(id),
                    53..58 => outbox.start_term(epoch),
                    58..61 => {
                        epoch += 1;
                        outbox.start_term(epoch);
                    }
                    61..64 => {
                        // Another replica's report, in this term or the next.
                        let term = epoch + rng.gen_range(0..2);
                        plane.other_reports(id, (term << 32) + rng.gen_range(0..1000));
                    }
                    64..66 => {
                        // A restart: a new process, a new term.
                        outbox = Outbox::default();
                        epoch += 1;
                        outbox.start_term(epoch);
                        last_issued = 0;
                    }
                    _ => {
                        outbox.deliver_once(&plane, 4, &|| true).await;
                    }
                }
                let issued = outbox.issued();
                assert!(issued >= last_issued, "seed {seed}: issued went back");
                last_issued = issued;
            }
            outbox.deliver_once(&plane, 4, &|| true).await;
            assert_eq!(
                *plane.reused.lock().expect("lock"),
                0,
                "seed {seed}: a version was sent twice with different content"
            );
        }
    }

    /// Leadership checked before each send, not once a round: a lapse in
    /// the middle of a round (a process paused) sends nothing of the rest,
    /// which stays pending for the next term.
    #[tokio::test]
    async fn a_lapse_during_a_round_sends_nothing_more() {
        let outbox = Outbox::default();
        outbox.start_term(1);
        for k in 0..5u128 {
            let id = EnvironmentId(uuid::Uuid::from_u128(k));
            outbox.publish(id, 0, status(Phase::Running));
        }
        let plane = Plane::default();
        // Leading for the first send only.
        let asked = std::sync::atomic::AtomicU32::new(0);
        let leading = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        let round = outbox.deliver_once(&plane, 1, &leading).await;
        assert_eq!(round.delivered, 1);
        assert_eq!(plane.sent.lock().expect("lock").len(), 1, "one sent");
        assert_eq!(outbox.pending(), 4, "the rest stays pending");
        assert_eq!(
            (round.retrying, round.rejected),
            (0, 0),
            "not counted as failures"
        );
    }
}
