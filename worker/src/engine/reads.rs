//! What a member reads. The client rows are read at every tick (they are small, one per
//! worker), eventually consistent unless a client is about to be judged dead; the lease rows
//! (one per shard) only when something changed, and then, when only ownership moved, just
//! the rows of the member's own range.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::membership::ClientWatch;
use crate::store::schema::{ClientRow, LeaseRow};

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

/// All lease rows are re-read at least every this many ticks (10 minutes at the default
/// heartbeat) even when nothing signalled a change: a safety net for a change no signal
/// covers (a row edited by hand). Every change the engines make is signalled, and
/// `kcg-operator checkpoints reset` refuses while any worker is alive. At 1,000 shards a
/// whole read costs about 90 read units, as much as 60 ticks of client reads.
pub(super) const LEASE_READ_EVERY_TICKS: u64 = 600;

/// How a claim or resume ended that may have landed without our knowing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unseen {
    /// No answer (a timeout): the write may still land, later than our next read (it
    /// waited in a connection, a proxy or the store's queue).
    NoAnswer,
    /// Refused: usually a lost race, but maybe our own earlier try of it (the SDK retried
    /// a write whose answer was lost). Settled: the row as it is now tells.
    Refused,
}

/// Until when the row of a claim or resume that ended as `outcome` at `at` is read with our
/// range at every tick: a write without an answer for a client timeout (`window`), one that
/// lands later still is left to the safety net (every row is read every
/// [`LEASE_READ_EVERY_TICKS`]); a refused one until the next read. Seen at 1,000 shards: a
/// claim that timed out during a group's start landed after the claimer's next read, and
/// its planned owner waited on the live claimer, which never read that row again.
pub(super) fn watch_until(outcome: Unseen, at: Instant, window: Duration) -> Instant {
    match outcome {
        Unseen::NoAnswer => at + window,
        Unseen::Refused => at,
    }
}

/// Whether a read that started at `read_started` leaves a row watched `until` still to be
/// watched: only a read that started after that shows every write that could land.
pub(super) fn still_watched(until: Instant, read_started: Instant) -> bool {
    read_started < until
}

/// How many sort-key ranges a range read may query; rows of ours spread wider are read
/// whole (one paginated Query).
pub(super) const MAX_RANGES: usize = 8;

/// How many rows not of ours a range may span to join two runs of ours: one Query instead
/// of two, for about one read unit of extra rows.
pub(super) const RANGE_GAP_ROWS: usize = 16;

/// What a client's row says about its changes: its `leaseChanges` and `shardChanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChangeMarks {
    /// `leaseChanges`: it claimed, resumed, released or abandoned a lease.
    pub leases: u64,
    /// `shardChanges`: it changed what plans are made of (absent: an older worker).
    pub shards: Option<u64>,
}

/// Every client's [`ChangeMarks`], by client id: compared tick to tick by [`moved`].
pub(super) fn change_marks(clients: &[ClientRow]) -> BTreeMap<String, ChangeMarks> {
    clients
        .iter()
        .map(|c| {
            let marks = ChangeMarks {
                leases: c.lease_changes,
                shards: c.shard_changes,
            };
            (c.client_id.clone(), marks)
        })
        .collect()
}

/// What moved between two ticks' [`ChangeMarks`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Moved {
    /// Some lease changed owner: the rows of our own range tell us what concerns us.
    pub owners: bool,
    /// The shards or their state changed (a cache written, a shard ended, rows replaced),
    /// or a client left (its last changes may not have reached us): every row is read.
    pub shards: bool,
}

/// What moved from `before` to `after`. A client first seen counts as an owner change,
/// and as a shard change if it already made one; a client gone counts as both. An older
/// worker (no `shardChanges`) makes every lease change a shard change.
pub(super) fn moved(
    before: &BTreeMap<String, ChangeMarks>,
    after: &BTreeMap<String, ChangeMarks>,
) -> Moved {
    let mut out = Moved::default();
    for (id, now) in after {
        match before.get(id) {
            None => {
                out.owners = true;
                out.shards |= now.shards.map_or(now.leases > 0, |s| s > 0);
            }
            Some(then) if then == now => {}
            Some(then) => {
                out.owners |= then.leases != now.leases;
                out.shards |= match (then.shards, now.shards) {
                    (Some(a), Some(b)) => a != b,
                    _ => true,
                };
            }
        }
    }
    if before.keys().any(|id| !after.contains_key(id)) {
        out = Moved {
            owners: true,
            shards: true,
        };
    }
    out
}

/// What one tick knows when it decides how to re-read the lease rows.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReadInput {
    /// Ticks since the last read of every lease row (counting this one).
    pub ticks_since_full: u64,
    /// We asked for a read of our rows: our own lease writes, a plan not applied yet (a
    /// claim to retry, a release to finish, a lease we wait for).
    pub asked: bool,
    /// We asked for a read of every row: none yet, the leader has leases left to create,
    /// a replacement of a deleted stream's rows met a change, or such a read failed.
    pub asked_full: bool,
    /// A stream we read has no shard cache in what we read (a new group whose leader had
    /// not written it yet; a stream that cannot be listed).
    pub missing_cache: bool,
    /// Ticks since we last looked for missing shard caches (or read every row).
    pub ticks_since_caches: u64,
    /// The set of live clients changed: a client joined, left, or stalled.
    pub live_changed: bool,
    /// What the other clients' rows say moved.
    pub moved: Moved,
}

/// How a tick re-reads the lease rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseRead {
    /// Not at all: nothing changed.
    None,
    /// The rows of our range: what the plan gives us, what we hold (the plan itself rests
    /// on the shards and their state, which did not change).
    Ours,
    /// The shard caches we lack, then the rows of our range. The leader signals a cache
    /// write, so this is only the safety net of a stream still without one; at 100 workers
    /// a read of every row instead, every 5 ticks, was most of what the group read.
    MissingCaches,
    /// Every row, and the shard caches.
    All,
}

/// While a stream's shard cache is missing, it is looked for at most every this many ticks:
/// the cache's write is signalled, but a stream that cannot be listed never gets one.
pub(super) const MISSING_CACHE_READ_EVERY_TICKS: u64 = 5;

/// How this tick re-reads the lease rows.
pub(super) fn lease_read(i: ReadInput) -> LeaseRead {
    if i.asked_full || i.moved.shards || i.ticks_since_full >= LEASE_READ_EVERY_TICKS {
        LeaseRead::All
    } else if i.missing_cache && i.ticks_since_caches >= MISSING_CACHE_READ_EVERY_TICKS {
        LeaseRead::MissingCaches
    } else if i.asked || i.live_changed || i.moved.owners {
        LeaseRead::Ours
    } else {
        LeaseRead::None
    }
}

/// The sort-key ranges (first, last, both included) a read of the rows `wanted` queries,
/// given the sort keys of the rows as last read (`known`, a wanted row may be new). Runs of
/// wanted rows are joined across at most [`RANGE_GAP_ROWS`] others. `None` when more than
/// [`MAX_RANGES`] ranges would be needed: then every row is read.
pub(super) fn lease_ranges<'a>(
    known: impl IntoIterator<Item = &'a str>,
    wanted: &'a BTreeSet<String>,
) -> Option<Vec<(String, String)>> {
    let all: BTreeSet<&str> = known
        .into_iter()
        .chain(wanted.iter().map(String::as_str))
        .collect();
    let mut ranges: Vec<(String, String)> = Vec::new();
    // The open run: its first and last wanted key, and the unwanted keys since the last.
    let mut open: Option<(&str, &str, usize)> = None;
    for key in all {
        let is_wanted = wanted.contains(key);
        open = match (open, is_wanted) {
            (None, false) => None,
            (None, true) => Some((key, key, 0)),
            (Some((first, _, gap)), true) if gap <= RANGE_GAP_ROWS => Some((first, key, 0)),
            (Some((first, last, _)), true) => {
                ranges.push((first.to_owned(), last.to_owned()));
                Some((key, key, 0))
            }
            (Some((first, last, gap)), false) => Some((first, last, gap + 1)),
        };
    }
    if let Some((first, last, _)) = open {
        ranges.push((first.to_owned(), last.to_owned()));
    }
    (ranges.len() <= MAX_RANGES).then_some(ranges)
}

/// The lease rows after a range read: `read` (what the Queries of `ranges` returned)
/// replaces every row of `rows` inside `ranges`; a row no longer there was deleted. Sorted
/// by (stream, shard id), as a whole read returns them.
pub(super) fn merge_ranges(
    rows: &mut Vec<LeaseRow>,
    ranges: &[(String, String)],
    read: Vec<LeaseRow>,
) {
    rows.retain(|l| {
        !ranges
            .iter()
            .any(|(first, last)| first.as_str() <= l.sk.as_str() && l.sk.as_str() <= last.as_str())
    });
    rows.extend(read);
    rows.sort_by(|a, b| (&a.stream, &a.shard_id).cmp(&(&b.stream, &b.shard_id)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_without_an_answer_is_watched_for_a_client_timeout() {
        let at = Instant::now();
        let ms = Duration::from_millis;
        let window = ms(4000);
        // (outcome, read started this long after the claim ended, still watched after it)
        let cases = [
            (Unseen::NoAnswer, 0, true),
            (Unseen::NoAnswer, 900, true),
            (Unseen::NoAnswer, 3999, true),
            (Unseen::NoAnswer, 4000, false),
            (Unseen::NoAnswer, 60_000, false),
            (Unseen::Refused, 1, false),
            (Unseen::Refused, 900, false),
        ];
        for (outcome, after, watched) in cases {
            let until = watch_until(outcome, at, window);
            assert_eq!(
                still_watched(until, at + ms(after)),
                watched,
                "{outcome:?}, read {after} ms after"
            );
        }
        // A read that started before the claim ended (a recheck overlapping it) shows
        // nothing of it.
        assert!(still_watched(
            watch_until(Unseen::Refused, at + ms(10), window),
            at
        ));
    }

    #[test]
    fn lease_read_table() {
        let idle = ReadInput {
            ticks_since_full: 1,
            asked: false,
            asked_full: false,
            missing_cache: false,
            ticks_since_caches: 1,
            live_changed: false,
            moved: Moved::default(),
        };
        let owners = Moved {
            owners: true,
            shards: false,
        };
        let shards = Moved {
            owners: true,
            shards: true,
        };
        let cases = [
            ("idle group: no read", idle, LeaseRead::None),
            (
                "just below the safety net",
                ReadInput {
                    ticks_since_full: LEASE_READ_EVERY_TICKS - 1,
                    ..idle
                },
                LeaseRead::None,
            ),
            (
                "safety net",
                ReadInput {
                    ticks_since_full: LEASE_READ_EVERY_TICKS,
                    ..idle
                },
                LeaseRead::All,
            ),
            (
                "own writes or a plan not applied",
                ReadInput {
                    asked: true,
                    ..idle
                },
                LeaseRead::Ours,
            ),
            (
                "a client joined, left or stalled",
                ReadInput {
                    live_changed: true,
                    ..idle
                },
                LeaseRead::Ours,
            ),
            (
                "another client changed its leases",
                ReadInput {
                    moved: owners,
                    ..idle
                },
                LeaseRead::Ours,
            ),
            (
                "another client changed the shards",
                ReadInput {
                    moved: shards,
                    ..idle
                },
                LeaseRead::All,
            ),
            (
                "a shard cache missing, just looked for",
                ReadInput {
                    missing_cache: true,
                    ticks_since_caches: MISSING_CACHE_READ_EVERY_TICKS - 1,
                    ..idle
                },
                LeaseRead::None,
            ),
            (
                "a shard cache still missing: look for it again, not at every row",
                ReadInput {
                    missing_cache: true,
                    ticks_since_caches: MISSING_CACHE_READ_EVERY_TICKS,
                    ticks_since_full: MISSING_CACHE_READ_EVERY_TICKS,
                    ..idle
                },
                LeaseRead::MissingCaches,
            ),
            (
                "a shard cache missing and a shard change: every row (caches included)",
                ReadInput {
                    missing_cache: true,
                    ticks_since_caches: MISSING_CACHE_READ_EVERY_TICKS,
                    moved: shards,
                    ..idle
                },
                LeaseRead::All,
            ),
            (
                "we asked for everything (first read, leases to create)",
                ReadInput {
                    asked_full: true,
                    asked: true,
                    ..idle
                },
                LeaseRead::All,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(lease_read(input), want, "{name}");
        }
    }

    #[test]
    fn moved_table() {
        let m = |leases: u64, shards: Option<u64>| ChangeMarks { leases, shards };
        let marks = |rows: &[(&str, ChangeMarks)]| -> BTreeMap<String, ChangeMarks> {
            rows.iter().map(|(id, c)| ((*id).to_owned(), *c)).collect()
        };
        let (none, owners, both) = (
            Moved::default(),
            Moved {
                owners: true,
                shards: false,
            },
            Moved {
                owners: true,
                shards: true,
            },
        );
        let base = [("a", m(3, Some(1))), ("b", m(5, Some(0)))];
        let cases = [
            ("nothing moved", marks(&base), none),
            (
                "a claimed or released",
                marks(&[("a", m(4, Some(1))), ("b", m(5, Some(0)))]),
                owners,
            ),
            (
                "a wrote a cache or ended a shard",
                marks(&[("a", m(4, Some(2))), ("b", m(5, Some(0)))]),
                both,
            ),
            (
                "a newcomer that only claimed",
                marks(&[base[0], base[1], ("c", m(2, Some(0)))]),
                owners,
            ),
            (
                "a newcomer that already changed shards",
                marks(&[base[0], base[1], ("c", m(2, Some(1)))]),
                both,
            ),
            (
                "a newcomer that did nothing yet",
                marks(&[base[0], base[1], ("c", m(0, Some(0)))]),
                owners,
            ),
            ("b left", marks(&[base[0]]), both),
        ];
        for (name, after, want) in cases {
            assert_eq!(moved(&marks(&base), &after), want, "{name}");
        }
        // An older worker (no shardChanges): every lease change may be a shard change.
        let old = marks(&[("a", m(3, None))]);
        assert_eq!(moved(&old, &marks(&[("a", m(4, None))])), both);
        assert_eq!(moved(&old, &old), none);
        assert_eq!(moved(&BTreeMap::new(), &marks(&[("a", m(1, None))])), both);
    }

    #[test]
    fn change_marks_reads_both_counters() {
        let row = |id: &str, leases: u64, shards: Option<u64>| ClientRow {
            lease_changes: leases,
            shard_changes: shards,
            ..ClientRow::for_test(id, 7)
        };
        let got = change_marks(&[row("a", 1, Some(2)), row("b", 4, None)]);
        assert_eq!(
            got.get("a"),
            Some(&ChangeMarks {
                leases: 1,
                shards: Some(2)
            })
        );
        assert_eq!(
            got.get("b"),
            Some(&ChangeMarks {
                leases: 4,
                shards: None
            })
        );
    }

    fn sk(i: usize) -> String {
        crate::store::schema::lease_sk("s", &format!("shardId-{i:012}"))
    }

    #[test]
    fn lease_ranges_table() {
        let known: Vec<String> = (0..1000).map(sk).collect();
        let set = |ids: &[usize]| -> BTreeSet<String> { ids.iter().map(|i| sk(*i)).collect() };
        let range = |a: usize, b: usize| (sk(a), sk(b));
        let many: Vec<usize> = (0..=MAX_RANGES).map(|k| k * (RANGE_GAP_ROWS + 2)).collect();
        type Ranges = Option<Vec<(String, String)>>;
        let cases: Vec<(&str, BTreeSet<String>, Ranges)> = vec![
            ("nothing wanted: no Query", set(&[]), Some(vec![])),
            ("one run", set(&[10, 11, 12]), Some(vec![range(10, 12)])),
            (
                "a gap of RANGE_GAP_ROWS rows is spanned",
                set(&[10, 11 + RANGE_GAP_ROWS]),
                Some(vec![range(10, 11 + RANGE_GAP_ROWS)]),
            ),
            (
                "a wider gap splits",
                set(&[10, 12 + RANGE_GAP_ROWS]),
                Some(vec![
                    range(10, 10),
                    range(12 + RANGE_GAP_ROWS, 12 + RANGE_GAP_ROWS),
                ]),
            ),
            (
                "a wanted row not read yet (a new shard) is covered",
                set(&[999, 1500]),
                Some(vec![range(999, 1500)]),
            ),
            ("too spread: read everything", set(&many), None),
            (
                "just few enough",
                set(&many[..MAX_RANGES]),
                Some(many[..MAX_RANGES].iter().map(|i| range(*i, *i)).collect()),
            ),
        ];
        for (name, wanted, want) in cases {
            assert_eq!(
                lease_ranges(known.iter().map(String::as_str), &wanted),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn merge_ranges_replaces_what_the_ranges_cover() {
        let row = |i: usize, owner: &str| LeaseRow {
            owner: Some(owner.to_owned()),
            sk: sk(i),
            ..LeaseRow::unowned("ns/g", "s", &format!("shardId-{i:012}"), 0)
        };
        let mut rows: Vec<LeaseRow> = (0..6).map(|i| row(i, "old")).collect();
        // Rows 1..=3 re-read: 1 changed owner, 2 was deleted, 3 unchanged; 4 is outside.
        merge_ranges(
            &mut rows,
            &[(sk(1), sk(3))],
            vec![row(1, "new"), row(3, "old")],
        );
        let got: Vec<(String, String)> = rows
            .iter()
            .map(|l| (l.shard_id.clone(), l.owner.clone().unwrap_or_default()))
            .collect();
        let want: Vec<(String, String)> =
            [(0, "old"), (1, "new"), (3, "old"), (4, "old"), (5, "old")]
                .iter()
                .map(|(i, o)| (format!("shardId-{i:012}"), (*o).to_owned()))
                .collect();
        assert_eq!(got, want);
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
}
