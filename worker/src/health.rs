//! Health state shared by the engine (which updates it) and the HTTP server (which serves
//! `/healthz` and `/readyz` from it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the probes report. Cheap to update from the engine loop.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<HealthInner>,
    stall_after: Duration,
}

#[derive(Debug)]
struct HealthInner {
    registered: bool,
    last_tick: Instant,
    last_heartbeat_ok: Option<Instant>,
}

impl Health {
    /// `stall_after`: how long the engine loop may go without a tick before liveness fails.
    pub fn new(stall_after: Duration) -> Self {
        Self {
            inner: Mutex::new(HealthInner {
                registered: false,
                last_tick: Instant::now(),
                last_heartbeat_ok: None,
            }),
            stall_after,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HealthInner) -> R) -> R {
        // A poisoned lock only means a panic elsewhere; the data is still plain values.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// The engine loop ran one iteration.
    pub fn tick(&self) {
        self.with(|h| h.last_tick = Instant::now());
    }

    /// A heartbeat reached the state store.
    pub fn heartbeat_ok(&self) {
        self.with(|h| {
            h.registered = true;
            h.last_heartbeat_ok = Some(Instant::now());
        });
    }

    /// The client deregistered (shutdown): no longer ready.
    pub fn deregistered(&self) {
        self.with(|h| h.registered = false);
    }

    /// Liveness: the engine loop is not stuck.
    pub fn is_live(&self) -> bool {
        self.with(|h| h.last_tick.elapsed() < self.stall_after)
    }

    /// Readiness: registered and heartbeating recently.
    pub fn is_ready(&self) -> bool {
        self.with(|h| {
            h.registered
                && h.last_heartbeat_ok
                    .is_some_and(|t| t.elapsed() < self.stall_after)
        })
    }
}
