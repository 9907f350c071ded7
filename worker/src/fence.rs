//! The fencing deadline of a reader, on a clock that keeps running while the process is
//! stopped or the machine is suspended.
//!
//! A reader may hand records to the sink only until its deadline: the last confirmed
//! heartbeat's send time plus the fencing margin (see `docs/state-store.md`, "Fencing").
//! Rust's `Instant` is `CLOCK_MONOTONIC` on Linux, which does not advance while the system
//! is suspended (a frozen or suspended VM): a process woken from that would see time that
//! passed for everyone else as not passed, and hand over one more batch after another
//! client took its lease. `CLOCK_BOOTTIME` counts suspended time too, so the deadline is
//! measured on it. (Both keep running while only the process is stopped, e.g. SIGSTOP.)

use std::ops::Add;
use std::time::Duration;

use tokio::sync::watch;

/// A point on the fencing clock: time since boot, suspended time included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now on the fencing clock.
    pub fn now() -> Self {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let id = rustix::time::ClockId::Boottime;
        // Elsewhere (macOS, the BSDs) the monotonic clock already counts sleep.
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let id = rustix::time::ClockId::Monotonic;
        let t = rustix::time::clock_gettime(id);
        Self(Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        ))
    }

    /// How long after `earlier` this is; zero when it is not after it.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// A point no deadline ever reaches.
    pub const FAR_FUTURE: BootInstant = BootInstant(Duration::MAX);
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;

    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

/// The engine's side of a reader's fence: moves its deadline forward.
#[derive(Debug)]
pub struct FenceSetter(watch::Sender<BootInstant>);

impl FenceSetter {
    /// Moves the deadline to `to`, unless it already passed: a reader whose deadline
    /// passed may have been taken over, so a heartbeat confirmed later must not revive it.
    /// Returns whether the deadline moved.
    pub fn extend(&self, to: BootInstant, now: BootInstant) -> bool {
        self.0.send_if_modified(|at| {
            if *at > now && to > *at {
                *at = to;
                true
            } else {
                false
            }
        })
    }

    /// Whether the deadline passed at `now`.
    pub fn expired(&self, now: BootInstant) -> bool {
        *self.0.borrow() <= now
    }
}

/// A reader's side of its fence: how long it may still hand records over.
#[derive(Clone, Debug)]
pub struct Fence(watch::Receiver<BootInstant>);

/// How [`Fence::closed`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceEnd {
    /// The deadline passed.
    Passed,
    /// The engine dropped the setter: nobody extends the deadline any more.
    Dropped,
}

/// The fencing deadline passed: the lease may belong to another client now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the fencing deadline passed (no heartbeat confirmed in time); the lease may be taken over"
)]
pub struct Fenced;

impl Fence {
    /// A fence with its deadline at `at`, and the setter that moves it.
    pub fn new(at: BootInstant) -> (FenceSetter, Fence) {
        let (tx, rx) = watch::channel(at);
        (FenceSetter(tx), Fence(rx))
    }

    /// A fence that never closes, for a reader outside a group (tools, tests).
    pub fn open() -> Fence {
        Fence::new(BootInstant::FAR_FUTURE).1
    }

    /// Time left until the deadline, or `Fenced` when it passed.
    pub fn remaining(&self) -> Result<Duration, Fenced> {
        let at = *self.0.borrow();
        let left = at.saturating_duration_since(BootInstant::now());
        if left.is_zero() {
            Err(Fenced)
        } else {
            Ok(left)
        }
    }

    /// `Ok` while the deadline has not passed: checked right before every hand-over.
    pub fn check(&self) -> Result<(), Fenced> {
        self.remaining().map(|_| ())
    }

    /// Resolves once the deadline passed (following every extension). Never resolves for an
    /// open fence, nor once the engine dropped the setter (the reader is being stopped).
    pub async fn passed(&self) {
        if self.closed().await == FenceEnd::Dropped {
            futures::future::pending::<()>().await;
        }
    }

    /// Resolves once the deadline passed, or the engine dropped the setter.
    pub async fn closed(&self) -> FenceEnd {
        let mut rx = self.0.clone();
        loop {
            let Ok(left) = self.remaining() else {
                return FenceEnd::Passed;
            };
            tokio::select! {
                // Woken early or late (a suspend): `remaining` decides on the boot clock.
                _ = tokio::time::sleep(left) => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return FenceEnd::Dropped;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = BootInstant::now();
        std::thread::sleep(ms(5));
        let b = BootInstant::now();
        assert!(b.saturating_duration_since(a) >= ms(5));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert_eq!(BootInstant::FAR_FUTURE + ms(1), BootInstant::FAR_FUTURE);
    }

    #[test]
    fn extend_table() {
        let base = BootInstant(Duration::from_secs(100));
        // (name, deadline, extend to, now, moved, expired at now)
        let cases = [
            (
                "a live deadline moves forward",
                1000,
                2000,
                500,
                true,
                false,
            ),
            ("never backwards", 1000, 900, 500, false, false),
            (
                "a passed deadline is not revived",
                1000,
                3000,
                1000,
                false,
                true,
            ),
            ("long passed", 1000, 3000, 2500, false, true),
        ];
        for (name, at, to, now, moved, expired) in cases {
            let (setter, _fence) = Fence::new(base + ms(at));
            assert_eq!(
                setter.extend(base + ms(to), base + ms(now)),
                moved,
                "{name}"
            );
            assert_eq!(setter.expired(base + ms(now)), expired, "{name}");
        }
    }

    #[tokio::test]
    async fn check_and_passed_follow_the_deadline() {
        let (setter, fence) = Fence::new(BootInstant::now() + ms(100));
        assert!(fence.check().is_ok());
        assert!(fence.remaining().expect("open") <= ms(100));
        // Extended while waiting: `passed` follows the new deadline.
        let extended = BootInstant::now() + ms(300);
        assert!(setter.extend(extended, BootInstant::now()));
        let started = BootInstant::now();
        fence.passed().await;
        assert!(
            BootInstant::now() >= extended,
            "resolved before the extended deadline"
        );
        assert!(BootInstant::now().saturating_duration_since(started) < ms(1000));
        assert_eq!(fence.check(), Err(Fenced));
        assert!(Fence::open().check().is_ok());
    }
}
