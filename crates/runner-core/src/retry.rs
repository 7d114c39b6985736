//! Retrying: one [`Policy`] (backoff, jitter, limit), [`retry`] for a call
//! repeated until it succeeds, fails for good, reaches its limit or shutdown
//! comes, and [`Failures`] for loops that keep a schedule of their own (a
//! stream that reconnects, a periodic sync) and only need the delay after
//! each failure. The runner's retry loops go through these two; the
//! exceptions are the per-key backoffs of the work queue and the status
//! outbox, and EC2's `gated` sends (each attempt takes a bucket token first).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// How a delay is drawn below the backoff's ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `ceiling/2..=ceiling`: a failing call never spins.
    Equal,
    /// Uniform in `0..=ceiling`: spreads many clients' reconnects best.
    Full,
}

/// When retrying stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Never: until success, a final error or shutdown.
    Never,
    /// At most this many attempts, the first included.
    Attempts(u32),
    /// No attempt starts later than this after the first failure.
    Deadline(Duration),
}

/// How one call path retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Ceilings of the delays: from `base`, doubling, up to `max`.
    pub backoff: Backoff,
    /// How a delay is drawn under its ceiling.
    pub jitter: Jitter,
    /// When to give up.
    pub limit: Limit,
}

impl Policy {
    /// Delays from `base` doubling to `max`, equal jitter, no limit.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            backoff: Backoff { base, max },
            jitter: Jitter::Equal,
            limit: Limit::Never,
        }
    }

    /// The same with full jitter.
    pub const fn full_jitter(self) -> Self {
        Self {
            jitter: Jitter::Full,
            ..self
        }
    }

    /// The same, giving up after `attempts` attempts.
    pub const fn attempts(self, attempts: u32) -> Self {
        Self {
            limit: Limit::Attempts(attempts),
            ..self
        }
    }

    /// The same, starting no attempt later than `deadline` after the first
    /// failure.
    pub const fn deadline(self, deadline: Duration) -> Self {
        Self {
            limit: Limit::Deadline(deadline),
            ..self
        }
    }

    /// The delay after `failures` consecutive failures (≥ 1), jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        match self.jitter {
            Jitter::Equal => self.backoff.equal_jitter(failures),
            Jitter::Full => self.backoff.full_jitter(failures),
        }
    }
}

/// A run of consecutive failures under a [`Policy`]: the delay after each
/// one; a success resets it. [`retry`] stops at the policy's limit; a loop
/// that keeps its own schedule never gives up.
#[derive(Debug, Clone)]
pub struct Failures {
    policy: Policy,
    count: u32,
    since: Option<Instant>,
}

impl Failures {
    /// No failure yet.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            count: 0,
            since: None,
        }
    }

    /// Counts a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.count = self.count.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        self.policy.delay(self.count)
    }

    /// Whether the policy's limit allows another attempt after waiting
    /// `delay` (loops that never give up use [`Limit::Never`]).
    pub fn may_retry(&self, delay: Duration) -> bool {
        match self.policy.limit {
            Limit::Never => true,
            Limit::Attempts(attempts) => self.count < attempts,
            Limit::Deadline(deadline) => self
                .since
                .is_none_or(|since| since.elapsed().saturating_add(delay) <= deadline),
        }
    }

    /// A success: the next failure starts from the base delay again.
    pub fn reset(&mut self) {
        self.count = 0;
        self.since = None;
    }

    /// Consecutive failures so far.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// Why [`retry`] returned without a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The last error is not retryable.
    Final(E),
    /// The policy's limit was reached; the last error.
    Exhausted(E),
    /// Shutdown came while waiting to retry.
    Cancelled,
}

impl<E> RetryError<E> {
    /// The last error, unless shutdown came first.
    pub fn into_error(self) -> Option<E> {
        match self {
            Self::Final(err) | Self::Exhausted(err) => Some(err),
            Self::Cancelled => None,
        }
    }
}

/// Runs `attempt` until it succeeds, returns an error `retryable` refuses,
/// reaches the `policy`'s limit, or `shutdown` is cancelled while waiting.
/// `failed` hears each error that will be retried, with the delay before the
/// next attempt (to log it). An attempt in flight is not cut by shutdown:
/// each is bounded by its own timeout.
pub async fn retry<T, E, Fut>(
    policy: Policy,
    shutdown: &CancellationToken,
    retryable: impl Fn(&E) -> bool,
    mut failed: impl FnMut(&E, Duration),
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, RetryError<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = Failures::new(policy);
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !retryable(&err) {
            return Err(RetryError::Final(err));
        }
        let delay = failures.failed();
        if !failures.may_retry(delay) {
            return Err(RetryError::Exhausted(err));
        }
        failed(&err, delay);
        tokio::select! {
            () = shutdown.cancelled() => return Err(RetryError::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// An attempt that fails with its own number (1, 2, ...) and records
    /// when it started, relative to `start`.
    struct Calls {
        start: Instant,
        at: Mutex<Vec<Duration>>,
    }

    impl Calls {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                at: Mutex::default(),
            }
        }

        async fn fail(&self) -> Result<(), u32> {
            let mut at = self.at.lock().unwrap();
            at.push(self.start.elapsed());
            Err(u32::try_from(at.len()).unwrap())
        }

        fn at(&self) -> Vec<Duration> {
            self.at.lock().unwrap().clone()
        }
    }

    /// `retry` run to its end, which must come within a (virtual) day: a
    /// retry that never stops fails the test instead of hanging it.
    async fn ended<T>(retry: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(86_400), retry)
            .await
            .expect("the retries ended")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_the_predicate_allows() {
        let calls = Calls::new();
        let mut heard = Vec::new();
        let result = ended(retry(
            Policy::new(SECOND, 8 * SECOND),
            &CancellationToken::new(),
            |n| *n < 3,
            |n, delay| heard.push((*n, delay)),
            || calls.fail(),
        ))
        .await;
        assert_eq!(result, Err(RetryError::Final(3)));
        assert_eq!(calls.at().len(), 3, "the third error is final");
        assert_eq!(
            heard.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 2],
            "only retried errors are heard"
        );

        // A final error at once: no wait at all.
        let calls = Calls::new();
        let result = ended(retry(
            Policy::new(SECOND, 8 * SECOND),
            &CancellationToken::new(),
            |_| false,
            |_, _| panic!("nothing is retried"),
            || calls.fail(),
        ))
        .await;
        assert_eq!(result, Err(RetryError::Final(1)));
        assert_eq!(calls.at(), [Duration::ZERO]);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_the_policys_delays_between_attempts() {
        let calls = Calls::new();
        let result = ended(retry(
            Policy::new(SECOND, 4 * SECOND),
            &CancellationToken::new(),
            |n| *n < 6,
            |_, _| {},
            || calls.fail(),
        ))
        .await;
        assert_eq!(result, Err(RetryError::Final(6)));
        // Ceilings 1, 2, 4, 4, 4 s with equal jitter: each gap in [c/2, c].
        let at = calls.at();
        for (i, ceiling) in [1, 2, 4, 4, 4].into_iter().enumerate() {
            let gap = at[i + 1] - at[i];
            let ceiling = ceiling * SECOND;
            assert!(
                gap >= ceiling / 2 && gap <= ceiling,
                "gap {i}: {gap:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_retries() {
        let calls = Calls::new();
        let result = ended(retry(
            Policy::new(SECOND, SECOND),
            &CancellationToken::new(),
            |_| true,
            |_, _| {},
            || async {
                match calls.fail().await {
                    Err(n) if n < 3 => Err(n),
                    _ => Ok("done"),
                }
            },
        ))
        .await;
        assert_eq!(result, Ok("done"));
        assert_eq!(calls.at().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_waiting_when_shut_down() {
        let calls = Calls::new();
        let shutdown = CancellationToken::new();
        let cancel = {
            let shutdown = shutdown.clone();
            async move {
                tokio::time::sleep(SECOND).await;
                shutdown.cancel();
            }
        };
        // The first retry would come after half an hour at least.
        let hour = Duration::from_secs(3600);
        let (result, ()) = tokio::join!(
            ended(retry(
                Policy::new(hour, hour),
                &shutdown,
                |_| true,
                |_, _| {},
                || calls.fail(),
            )),
            cancel,
        );
        assert_eq!(result, Err(RetryError::Cancelled));
        assert_eq!(calls.at().len(), 1);
        assert_eq!(calls.start.elapsed(), SECOND, "stopped when shut down");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_its_attempts() {
        let calls = Calls::new();
        let result = ended(retry(
            Policy::new(SECOND, 60 * SECOND).attempts(4),
            &CancellationToken::new(),
            |_| true,
            |_, _| {},
            || calls.fail(),
        ))
        .await;
        assert_eq!(result, Err(RetryError::Exhausted(4)));
        let at = calls.at();
        assert_eq!(at.len(), 4);
        // Ceilings 1, 2, 4 s: at least half of each was waited, no more.
        let last = at[3];
        assert!(last >= Duration::from_millis(3500) && last <= 7 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_its_deadline() {
        let calls = Calls::new();
        let result = ended(retry(
            Policy::new(4 * SECOND, 4 * SECOND).deadline(10 * SECOND),
            &CancellationToken::new(),
            |_| true,
            |_, _| {},
            || calls.fail(),
        ))
        .await;
        let at = calls.at();
        // Delays of 2 to 4 s fit between 2 and 5 times into 10 s.
        assert!((3..=6).contains(&at.len()), "{at:?}");
        assert_eq!(
            result,
            Err(RetryError::Exhausted(u32::try_from(at.len()).unwrap()))
        );
        let last = *at.last().unwrap();
        assert!(last <= 10 * SECOND, "no attempt after the deadline: {at:?}");
        assert!(
            last > 6 * SECOND,
            "retried until the next would pass it: {at:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_starts_again_from_the_base_delay() {
        let mut failures = Failures::new(Policy::new(SECOND, 64 * SECOND).attempts(3));
        for _ in 0..2 {
            let delay = failures.failed();
            assert!(failures.may_retry(delay));
        }
        let delay = failures.failed();
        assert!(!failures.may_retry(delay), "the third failure is the last");
        failures.reset();
        let delay = failures.failed();
        assert!(failures.may_retry(delay), "counted from zero again");
        assert!(delay >= SECOND / 2 && delay <= SECOND, "{delay:?}");
        assert_eq!(failures.count(), 1);
    }
}
