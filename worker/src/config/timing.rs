//! How `tuning.heartbeatInterval`, `tuning.clientTimeout` and the bound on one state-store
//! call must relate, so that a live worker's readers are not fenced by a single slow or
//! failed heartbeat (docs/state-store.md, "Fencing").
//!
//! A heartbeat sent at *t* and confirmed lets the worker's readers read until
//! *t + clientTimeout − heartbeatInterval* (the fencing margin). The margin must cover, in
//! the worst case that should not cost a redelivery:
//! 1. the wait for the next heartbeat (`heartbeatInterval`);
//! 2. that heartbeat failing only after waiting out the store-call timeout;
//! 3. the next heartbeat, sent at once (the missed tick is not waited for, since the
//!    store-call timeout is never shorter than the interval), answered just within the
//!    store-call timeout.
//!
//! Hence `clientTimeout − heartbeatInterval ≥ heartbeatInterval + 2 × storeCall`.

use std::time::Duration;

/// Shortest bound on one state-store call. DynamoDB answers in milliseconds, but a call on a
/// new connection (TLS, credentials) can take hundreds: a shorter bound would turn slow
/// answers into failed heartbeats. So the bound does not shrink with sub-second heartbeats;
/// the client timeout must make room for it instead ([`min_client_timeout`]).
pub const STORE_CALL_FLOOR: Duration = Duration::from_secs(1);

/// Bound on one state-store request of the engine: one heartbeat interval, at least
/// [`STORE_CALL_FLOOR`].
pub fn store_call_timeout(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval.max(STORE_CALL_FLOOR)
}

/// Shortest `clientTimeout` for a heartbeat interval (see the module doc):
/// `2 × heartbeatInterval + 2 × storeCall`, that is 4 × the interval from 1s on, and
/// 2 × the interval + 2s below.
pub fn min_client_timeout(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval + store_call_timeout(heartbeat_interval)) * 2
}

/// The same rule as a CEL expression over `tuning` (the API server has no `max` on
/// durations, hence the two branches). Malformed durations are left to their own rule.
pub(super) fn cel_rule(duration_pattern: &str) -> String {
    let hb = "duration(self.heartbeatInterval)";
    let ct = "duration(self.clientTimeout)";
    let floor = format!("duration('{}s')", STORE_CALL_FLOOR.as_secs());
    format!(
        "!has(self.clientTimeout) || !has(self.heartbeatInterval) \
         || !self.clientTimeout.matches('{duration_pattern}') \
         || !self.heartbeatInterval.matches('{duration_pattern}') \
         || ({hb} >= {floor} \
             ? {ct} >= {hb} + {hb} + {hb} + {hb} \
             : {ct} >= {hb} + {hb} + {floor} + {floor})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn store_call_and_client_timeout_table() {
        // (heartbeatInterval, store-call timeout, shortest clientTimeout)
        let cases = [
            (ms(100), ms(1000), ms(2200)),
            (ms(300), ms(1000), ms(2600)),
            (ms(500), ms(1000), ms(3000)),
            (ms(999), ms(1000), ms(3998)),
            (ms(1000), ms(1000), ms(4000)),
            (ms(2000), ms(2000), ms(8000)),
            (ms(60_000), ms(60_000), ms(240_000)),
        ];
        for (hb, call, min) in cases {
            assert_eq!(store_call_timeout(hb), call, "store call for {hb:?}");
            assert_eq!(min_client_timeout(hb), min, "client timeout for {hb:?}");
        }
    }

    #[test]
    fn the_minimum_survives_one_failed_heartbeat() {
        // Walk the worst case of the module doc on the worker's clock and check that the
        // next confirmation comes before the readers' deadline, and that one millisecond
        // less of client timeout would fence them.
        for hb in [ms(100), ms(300), ms(999), ms(1000), ms(2000), ms(7000)] {
            let call = store_call_timeout(hb);
            let confirmed_at = |ct: Duration| {
                let deadline = ct - hb;
                let failed_ends = hb + call;
                let next_sent = failed_ends.max(hb * 2);
                (next_sent + call, deadline)
            };
            let (at, deadline) = confirmed_at(min_client_timeout(hb));
            assert!(
                at <= deadline,
                "{hb:?}: confirmed {at:?} after {deadline:?}"
            );
            let (at, deadline) = confirmed_at(min_client_timeout(hb) - ms(1));
            assert!(at > deadline, "{hb:?}: the minimum is not tight");
        }
    }
}
