//! Exponential backoff with jitter: the delays of every retry
//! ([`crate::retry`]), of the work queue's and the status outbox's per-key
//! backoff, and of EC2's gated sends.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff: `base · 2^(failures-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The un-jittered delay after `failures` consecutive failures (≥ 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// "Full jitter": uniform in `0..=ceiling`. Spreads reconnects best.
    pub fn full_jitter(&self, failures: u32) -> Duration {
        let cap = self.ceiling(failures);
        rand::thread_rng().gen_range(Duration::ZERO..=cap)
    }

    /// "Equal jitter": uniform in `ceiling/2..=ceiling`; never near zero, so a
    /// failing key cannot spin.
    pub fn equal_jitter(&self, failures: u32) -> Duration {
        let cap = self.ceiling(failures);
        rand::thread_rng().gen_range(cap / 2..=cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_and_caps() {
        let b = Backoff {
            base: Duration::from_millis(250),
            max: Duration::from_secs(120),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(250));
        assert_eq!(b.ceiling(2), Duration::from_millis(500));
        assert_eq!(b.ceiling(4), Duration::from_secs(2));
        assert_eq!(b.ceiling(20), Duration::from_secs(120));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(120));
        for n in 1..12 {
            assert!(b.full_jitter(n) <= b.ceiling(n));
            let e = b.equal_jitter(n);
            assert!(e >= b.ceiling(n) / 2 && e <= b.ceiling(n));
        }
    }
}
