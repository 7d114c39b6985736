//! Leadership: one replica at a time may reconcile and mutate.
//!
//! A lease in the state store (holder, epoch, expiry) decides who leads. The
//! holder renews it well before expiry; a standby acquires it once expired.
//! [`Leadership`] is the local view: an epoch that is valid only until the
//! lease could have expired, by the monotonic clock, so a replica that was
//! frozen past its lease finds itself fenced when it resumes, before any
//! store write could tell it. Store writes are fenced on the epoch as well.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::traits::StoreError;

/// A held lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// Grows with every change of holder.
    pub epoch: u64,
    /// When the lease expires in the store.
    pub expires_at: SystemTime,
}

/// The lease in the state store.
#[async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Takes the lease if it is free or expired; `None` when someone else holds it.
    async fn acquire(&self, ttl: Duration) -> Result<Option<Term>, StoreError>;
    /// Extends the lease; `Fenced` when it is no longer held at `epoch`.
    async fn renew(&self, epoch: u64, ttl: Duration) -> Result<Term, StoreError>;
    /// Gives the lease up so a standby can take over at once.
    async fn release(&self, epoch: u64) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    valid_until: Instant,
}

/// This replica's view of its leadership.
#[derive(Debug)]
pub struct Leadership {
    held: Mutex<Option<Held>>,
    changed: watch::Sender<Option<u64>>,
    decided: CancellationToken,
}

impl Default for Leadership {
    fn default() -> Self {
        Self {
            held: Mutex::new(None),
            changed: watch::channel(None).0,
            decided: CancellationToken::new(),
        }
    }
}

impl Leadership {
    /// Leadership that is always held at epoch 1 (a single replica without a lease).
    pub fn always() -> Self {
        let leadership = Self::default();
        leadership.set(
            1,
            Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
        );
        leadership.decided.cancel();
        leadership
    }

    /// Whether the store has answered once who leads (this replica or
    /// another): part of readiness.
    pub fn is_decided(&self) -> bool {
        self.decided.is_cancelled()
    }

    /// Resolves once leadership is decided.
    pub async fn decided(&self) {
        self.decided.cancelled().await;
    }

    /// The epoch, if this replica leads right now.
    pub fn epoch(&self) -> Option<u64> {
        let held = *self.held.lock().expect("leadership lock is never poisoned");
        held.filter(|h| Instant::now() < h.valid_until)
            .map(|h| h.epoch)
    }

    /// Whether this replica leads right now.
    pub fn is_leader(&self) -> bool {
        self.epoch().is_some()
    }

    /// Records a held term, valid locally until `valid_until`.
    pub fn set(&self, epoch: u64, valid_until: Instant) {
        let was_leading = self.epoch() == Some(epoch);
        *self.held.lock().expect("leadership lock is never poisoned") =
            Some(Held { epoch, valid_until });
        // Watchers hear of a new epoch, and of validity that lapsed (a slow
        // renewal) and came back at the same epoch.
        self.changed.send_if_modified(|current| {
            let changed = *current != Some(epoch) || !was_leading;
            *current = Some(epoch);
            changed
        });
    }

    /// Records that leadership is lost.
    pub fn clear(&self) {
        *self.held.lock().expect("leadership lock is never poisoned") = None;
        self.changed
            .send_if_modified(|current| current.take().is_some());
    }

    /// Changes of leadership: `Some(epoch)` when gained, `None` when lost.
    pub fn watch(&self) -> watch::Receiver<Option<u64>> {
        self.changed.subscribe()
    }

    /// Resolves once this replica does not lead: at once if it does not,
    /// else when the local validity runs out (a renewal moves that end) or
    /// leadership is cleared.
    pub async fn lapsed(&self) {
        // Subscribed before reading, so a clear in between is not missed.
        let mut changes = self.watch();
        loop {
            let held = *self.held.lock().expect("leadership lock is never poisoned");
            let Some(valid_until) = held
                .map(|h| h.valid_until)
                .filter(|end| Instant::now() < *end)
            else {
                return;
            };
            // A renewal in time is not announced: look again at the old end.
            tokio::select! {
                () = tokio::time::sleep_until(valid_until) => {}
                changed = changes.changed() => {
                    // The sender lives as long as `self`.
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew_every: Duration,
}

/// Acquires, renews and finally releases the lease until `shutdown`.
/// Loss is noticed at the latest when the local validity runs out, even if
/// the store cannot be reached (or this process was frozen).
pub async fn run_lease(
    lease: &dyn Lease,
    leadership: &Leadership,
    timing: LeaseTiming,
    shutdown: CancellationToken,
) {
    // Local validity stops short of the store's expiry, for clock skew.
    let margin = timing.ttl / 5;
    let mut held: Option<u64> = None;
    loop {
        let started = Instant::now();
        match held {
            None => match lease.acquire(timing.ttl).await {
                Ok(Some(term)) => {
                    tracing::info!(epoch = term.epoch, "acquired the leader lease");
                    held = Some(term.epoch);
                    leadership.set(term.epoch, started + timing.ttl - margin);
                    leadership.decided.cancel();
                }
                Ok(None) => leadership.decided.cancel(),
                Err(err) => tracing::warn!(error = %err, "cannot acquire the leader lease"),
            },
            Some(epoch) => match lease.renew(epoch, timing.ttl).await {
                Ok(_) => leadership.set(epoch, started + timing.ttl - margin),
                Err(StoreError::Fenced) => {
                    tracing::warn!(epoch, "lost the leader lease");
                    held = None;
                    leadership.clear();
                }
                Err(err) => {
                    tracing::warn!(epoch, error = %err, "cannot renew the leader lease");
                    if !leadership.is_leader() {
                        tracing::warn!(epoch, "the leader lease ran out locally");
                        held = None;
                        leadership.clear();
                    }
                }
            },
        }
        // A frozen process sees its local validity run out here.
        if let Some(epoch) = held
            && !leadership.is_leader()
        {
            tracing::warn!(
                epoch,
                "the leader lease ran out locally (was this process paused?)"
            );
            held = None;
            leadership.clear();
        }
        // Renewals start every `renew_every`, however long one took.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(started + timing.renew_every) => {}
        }
    }
    if let Some(epoch) = held {
        leadership.clear();
        match lease.release(epoch).await {
            Ok(()) => tracing::info!(epoch, "released the leader lease"),
            Err(err) => {
                tracing::warn!(epoch, error = %err, "cannot release the leader lease; it expires by itself");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn validity_that_lapses_and_returns_at_the_same_epoch_wakes_watchers() {
        let leadership = Leadership::default();
        let mut watch = leadership.watch();
        leadership.set(5, Instant::now() + Duration::from_secs(2));
        assert!(watch.has_changed().expect("open"));
        watch.borrow_and_update();
        // A renewal in time is not news.
        leadership.set(5, Instant::now() + Duration::from_secs(2));
        assert!(!watch.has_changed().expect("open"));
        // A slow renewal: validity lapses, then comes back at the same epoch.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!leadership.is_leader());
        leadership.set(5, Instant::now() + Duration::from_secs(2));
        assert!(watch.has_changed().expect("open"));
        assert!(leadership.is_leader());
    }

    #[tokio::test(start_paused = true)]
    async fn lapsed_resolves_when_the_local_validity_runs_out() {
        let leadership = Leadership::default();
        let started = Instant::now();
        leadership.lapsed().await;
        assert_eq!(started.elapsed(), Duration::ZERO, "not leading: at once");
        leadership.set(1, started + Duration::from_secs(10));
        leadership.lapsed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(!leadership.is_leader());
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_moves_the_end_of_lapsed() {
        let leadership = Arc::new(Leadership::default());
        let started = Instant::now();
        leadership.set(1, started + Duration::from_secs(10));
        let renewer = tokio::spawn({
            let leadership = leadership.clone();
            async move {
                // Renewed in time twice, at the same epoch (not announced).
                for at in [4, 8] {
                    tokio::time::sleep_until(started + Duration::from_secs(at)).await;
                    leadership.set(1, Instant::now() + Duration::from_secs(10));
                }
            }
        });
        leadership.lapsed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(18));
        renewer.await.expect("renewer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_clear_resolves_lapsed_at_once() {
        let leadership = Arc::new(Leadership::default());
        let started = Instant::now();
        leadership.set(1, started + Duration::from_secs(100));
        let clearer = tokio::spawn({
            let leadership = leadership.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                leadership.clear();
            }
        });
        leadership.lapsed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        clearer.await.expect("clearer");
    }

    /// Answers `acquire` from a script, then says someone else holds it.
    struct Scripted(Mutex<Vec<Result<Option<Term>, StoreError>>>);

    #[async_trait]
    impl Lease for Scripted {
        async fn acquire(&self, _: Duration) -> Result<Option<Term>, StoreError> {
            self.0.lock().expect("lock").pop().unwrap_or(Ok(None))
        }
        async fn renew(&self, _: u64, _: Duration) -> Result<Term, StoreError> {
            Err(StoreError::Fenced)
        }
        async fn release(&self, _: u64) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_is_decided_once_the_store_answers_who_leads() {
        let lease = Arc::new(Scripted(Mutex::new(vec![Err(StoreError::Unavailable(
            "down".into(),
        ))])));
        let leadership = Arc::new(Leadership::default());
        let timing = LeaseTiming {
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (lease, leadership, stop) = (lease.clone(), leadership.clone(), stop.clone());
            async move { run_lease(lease.as_ref(), &leadership, timing, stop).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!leadership.is_decided(), "a failed attempt decides nothing");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(leadership.is_decided(), "another replica holds it");
        assert!(!leadership.is_leader());
        stop.cancel();
        task.await.expect("the lease task ends");
    }
}
