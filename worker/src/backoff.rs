//! Exponential backoff with jitter, shared by every retry loop (Kinesis calls, handler
//! retries, dead-letter writes, the engine's store calls).

use std::time::Duration;

/// Exponential backoff with "equal jitter": the delay for attempt n is uniformly drawn from
/// [d/2, d] with d = min(cap, base * 2^n), so retries spread out yet never hammer.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay for `attempt` (0-based) with `jitter` in [0, 1]. Pure.
    pub fn delay(base: Duration, cap: Duration, attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32 << attempt.min(20);
        let full = base.saturating_mul(factor).min(cap);
        let half = full / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The next delay (random jitter), counting the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = Self::delay(self.base, self.cap, self.attempt, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Success: start again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn backoff_table() {
        let (base, cap) = (MS(200), Duration::from_secs(30));
        // (attempt, jitter, want)
        let cases = [
            (0, 0.0, MS(100)),
            (0, 1.0, MS(200)),
            (1, 0.0, MS(200)),
            (1, 1.0, MS(400)),
            (3, 0.5, MS(1200)),
            (7, 1.0, Duration::from_millis(25_600)),
            (8, 1.0, cap),
            (8, 0.0, cap / 2),
            (60, 1.0, cap), // no overflow
        ];
        for (attempt, jitter, want) in cases {
            assert_eq!(
                Backoff::delay(base, cap, attempt, jitter),
                want,
                "attempt {attempt} jitter {jitter}"
            );
        }
        let mut b = Backoff::new(base, cap);
        for i in 0..50 {
            let d = b.next_delay();
            assert!(d <= cap && d >= MS(100), "attempt {i}: {d:?}");
        }
        assert_eq!(b.attempts(), 50);
        b.reset();
        assert!(b.next_delay() <= MS(200));
    }
}
