//! When a member re-reads the lease rows. The client rows are read at every tick (they are
//! small, one per worker); the lease rows (one per shard) only when something changed.

use std::collections::BTreeMap;

use crate::store::schema::ClientRow;

/// Lease rows are re-read at least every this many ticks (2 minutes at the default
/// heartbeat) even when nothing signalled a change: a safety net for a change no signal
/// covers (a row edited by hand). Every change the engines make is signalled.
pub(super) const LEASE_READ_EVERY_TICKS: u64 = 60;

/// What one tick knows when it decides whether to re-read the lease rows.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReadInput {
    /// Ticks since the last lease read (counting this one).
    pub ticks_since_read: u64,
    /// We asked for it: our own lease writes, a plan not applied yet (a claim to retry, a
    /// release to finish, a lease we wait for), a shard that ended, or no read yet.
    pub asked: bool,
    /// The set of live clients changed: a client joined, left, or stalled.
    pub live_changed: bool,
    /// Some client's `leaseChanges` moved (or a client row appeared or vanished): it
    /// claimed, released or abandoned a lease, or the leader wrote a shard cache.
    pub changes_moved: bool,
}

/// Whether this tick re-reads the lease rows.
pub(super) fn read_leases(i: ReadInput) -> bool {
    i.asked || i.live_changed || i.changes_moved || i.ticks_since_read >= LEASE_READ_EVERY_TICKS
}

/// Every client's `leaseChanges`, by client id: compared tick to tick.
pub(super) fn lease_changes(clients: &[ClientRow]) -> BTreeMap<String, u64> {
    clients
        .iter()
        .map(|c| (c.client_id.clone(), c.lease_changes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_leases_table() {
        let idle = ReadInput {
            ticks_since_read: 1,
            asked: false,
            live_changed: false,
            changes_moved: false,
        };
        let cases = [
            ("idle group: no read", idle, false),
            (
                "just below the safety net",
                ReadInput {
                    ticks_since_read: LEASE_READ_EVERY_TICKS - 1,
                    ..idle
                },
                false,
            ),
            (
                "safety net",
                ReadInput {
                    ticks_since_read: LEASE_READ_EVERY_TICKS,
                    ..idle
                },
                true,
            ),
            (
                "own writes or a plan not applied",
                ReadInput {
                    asked: true,
                    ..idle
                },
                true,
            ),
            (
                "a client joined, left or stalled",
                ReadInput {
                    live_changed: true,
                    ..idle
                },
                true,
            ),
            (
                "another client changed its leases",
                ReadInput {
                    changes_moved: true,
                    ..idle
                },
                true,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(read_leases(input), want, "{name}");
        }
    }

    #[test]
    fn lease_changes_sees_moves_and_membership() {
        let row = |id: &str, changes: u64| ClientRow {
            pk: "ns/g".into(),
            sk: format!("client#{id}"),
            client_id: id.into(),
            pod: "p".into(),
            heartbeat: 7,
            heartbeat_at_ms: 0,
            started_at_ms: 0,
            owned_shards: 0,
            lease_changes: changes,
            last_error: None,
            last_error_reason: None,
            expires_at: 0,
            streams: None,
        };
        let before = lease_changes(&[row("a", 1), row("b", 4)]);
        assert_eq!(before, lease_changes(&[row("b", 4), row("a", 1)]));
        assert_ne!(before, lease_changes(&[row("a", 2), row("b", 4)]), "moved");
        assert_ne!(before, lease_changes(&[row("a", 1)]), "vanished");
        assert_ne!(
            before,
            lease_changes(&[row("a", 1), row("b", 4), row("c", 0)]),
            "appeared"
        );
    }
}
