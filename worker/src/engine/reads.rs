//! What a member reads. The client rows are read at every tick (they are small, one per
//! worker), eventually consistent unless a client is about to be judged dead; the lease rows
//! (one per shard) only when something changed.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::membership::ClientWatch;
use crate::store::schema::ClientRow;

/// Whether `watch`, having observed an eventually consistent read, judges any of `watched`
/// (the clients in the read, those live at the previous tick, the lease owners) other than
/// `me` dead at `now`. Then the tick reads the client rows again, consistently, before it
/// acts: a stale read can make a live client look dead (its newest heartbeat not yet
/// visible), never a dead one alive for longer than the read lags.
pub(super) fn judges_dead<'a>(
    watch: &ClientWatch,
    watched: impl IntoIterator<Item = &'a str>,
    me: &str,
    now: Instant,
) -> bool {
    watched
        .into_iter()
        .any(|id| id != me && !watch.is_alive(id, now))
}

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

    fn client(id: &str, heartbeat: u64) -> ClientRow {
        ClientRow::for_test(id, heartbeat)
    }

    #[test]
    fn judges_dead_table() {
        use std::time::Duration;
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Timeout 1 s. Every case starts with a and b seen at t0 (me = a).
        // (case, reads after t0 as (ms, rows), ids watched, judged at ms, judged dead)
        type Case<'a> = (&'a str, Vec<(u64, Vec<ClientRow>)>, Vec<&'a str>, u64, bool);
        let cases: Vec<Case> = vec![
            (
                "everyone moving",
                vec![(500, vec![client("a", 2), client("b", 2)])],
                vec!["a", "b"],
                1200,
                false,
            ),
            (
                "b stood still for the timeout",
                vec![(500, vec![client("a", 2), client("b", 1)])],
                vec!["a", "b"],
                1000,
                true,
            ),
            (
                "b stood still, just under the timeout",
                vec![(500, vec![client("a", 2), client("b", 1)])],
                vec!["a", "b"],
                999,
                false,
            ),
            (
                "we never judge ourselves",
                vec![(500, vec![client("a", 1), client("b", 2)])],
                vec!["a", "b"],
                1200,
                false,
            ),
            (
                "b vanished from the read a timeout ago (watched as last live)",
                vec![(100, vec![client("a", 2)])],
                vec!["a", "b"],
                1100,
                true,
            ),
            (
                "b vanished just now: alive until the timeout",
                vec![(900, vec![client("a", 2)])],
                vec!["a", "b"],
                1200,
                false,
            ),
            (
                "a counter that went back (a lagging replica) is a move",
                vec![
                    (500, vec![client("a", 2), client("b", 0)]),
                    (900, vec![client("a", 3), client("b", 1)]),
                ],
                vec!["a", "b"],
                1800,
                false,
            ),
            (
                "an owner never seen is alive",
                vec![(500, vec![client("a", 2), client("b", 2)])],
                vec!["a", "b", "c"],
                1200,
                false,
            ),
        ];
        for (name, reads, watched, now, want) in cases {
            let mut watch = ClientWatch::new(Duration::from_secs(1));
            watch.observe(&[client("a", 1), client("b", 1)], t0);
            for (t, rows) in &reads {
                watch.observe(rows, at(*t));
            }
            assert_eq!(
                judges_dead(&watch, watched.iter().copied(), "a", at(now)),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn lease_changes_sees_moves_and_membership() {
        let row = |id: &str, changes: u64| ClientRow {
            lease_changes: changes,
            ..ClientRow::for_test(id, 7)
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
