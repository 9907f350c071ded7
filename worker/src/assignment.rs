//! The assignment planner: which live client should own which shard. Pure functions.
//!
//! Per stream, the consumable shards are sorted by id and cut into contiguous ranges, one
//! per live client by its index in sorted order (kinesumer's scheme): range sizes differ by
//! at most one. The client index is rotated by the stream's position in the config, so a
//! group reading many small streams does not pile every stream's extra shard on one client.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use crate::store::schema::{GroupSnapshot, ShardInfo};

/// Identifies a shard within a group: the stream (as configured) and the shard id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    /// Stream name as configured.
    pub stream: String,
    /// Shard id.
    pub shard_id: String,
}

impl ShardKey {
    /// Builds a key.
    pub fn new(stream: impl Into<String>, shard_id: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            shard_id: shard_id.into(),
        }
    }
}

impl std::fmt::Display for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.stream, self.shard_id)
    }
}

/// Desired owner per shard.
pub type Plan = BTreeMap<ShardKey, String>;

/// The shards of one stream that may be read now, sorted by id: not ended, and every parent
/// ended or gone from the cache (a parent trimmed by retention counts as ended). A child
/// whose parent is still being read waits, so order per partition key holds across a
/// reshard. Closed shards not yet read to their end are consumable: nothing is dropped.
pub fn consumable_shards(shards: &[ShardInfo], ended: &BTreeSet<&str>) -> Vec<String> {
    let present: BTreeSet<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
    let mut out: Vec<String> = shards
        .iter()
        .filter(|s| !ended.contains(s.shard_id.as_str()))
        .filter(|s| {
            s.parents()
                .all(|p| ended.contains(p) || !present.contains(p))
        })
        .map(|s| s.shard_id.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Cuts `n` items into `clients` contiguous ranges; range `i` is `i·n/C .. (i+1)·n/C`, so
/// sizes differ by at most one. Empty when there are no clients.
pub fn split_ranges(n: usize, clients: usize) -> Vec<Range<usize>> {
    (0..clients)
        .map(|i| (i * n / clients)..((i + 1) * n / clients))
        .collect()
}

/// One stream's input to [`plan`]: its consumable shards, sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamShards {
    /// Stream name as configured.
    pub stream: String,
    /// Consumable shard ids, sorted (see [`consumable_shards`]).
    pub consumable: Vec<String>,
}

/// Desired owner of every consumable shard when every live client reads every stream.
/// `streams` in config order, `live` sorted.
pub fn plan(streams: &[StreamShards], live: &[String]) -> Plan {
    plan_with(streams, |k, _| {
        (k, live.iter().map(String::as_str).collect())
    })
}

/// Desired owner of every consumable shard of `streams`, each stream cut over the live
/// clients that read it and rotated by its rank ([`Readers`]). Every planner that sees the
/// same client rows computes the same owners for a stream, whatever its own stream list.
pub fn plan_by_readers(streams: &[StreamShards], readers: &Readers) -> Plan {
    plan_with(streams, |_, stream| readers.of(stream))
}

/// The plan, with `readers(config index, stream)` giving a stream's rotation and its
/// readers (sorted).
fn plan_with<'a>(
    streams: &[StreamShards],
    readers: impl Fn(usize, &str) -> (usize, Vec<&'a str>),
) -> Plan {
    let mut out = Plan::new();
    for (k, s) in streams.iter().enumerate() {
        let (rotation, clients) = readers(k, &s.stream);
        if clients.is_empty() {
            continue;
        }
        for (i, range) in split_ranges(s.consumable.len(), clients.len())
            .into_iter()
            .enumerate()
        {
            let client = clients[(i + rotation) % clients.len()];
            for shard in &s.consumable[range] {
                out.insert(ShardKey::new(&s.stream, shard), client.to_owned());
            }
        }
    }
    out
}

/// Who reads which stream, from the live clients' rows. A stream's readers are the live
/// clients that list it, plus those that list nothing (workers older than the list, which
/// plan as if every client read every stream). A stream's rank, which rotates its ranges,
/// is its position in the lists of the live clients taken in client-id order (first
/// occurrence): the config order when every client reads the same list, as before lists
/// existed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readers {
    /// Per listed stream: its rank and the clients that list it (sorted).
    listed: BTreeMap<String, (usize, Vec<String>)>,
    /// Live clients without a list, sorted.
    unlisted: Vec<String>,
}

impl Readers {
    /// From the live clients (sorted) and each one's list (`None`: an older worker).
    pub fn new<'a>(live: &'a [String], lists: impl Fn(&str) -> Option<&'a [String]>) -> Self {
        let mut out = Readers::default();
        for client in live {
            let Some(list) = lists(client) else {
                out.unlisted.push(client.clone());
                continue;
            };
            for stream in list {
                let rank = out.listed.len();
                let entry = out
                    .listed
                    .entry(stream.clone())
                    .or_insert((rank, Vec::new()));
                if !entry.1.contains(client) {
                    entry.1.push(client.clone());
                }
            }
        }
        out
    }

    /// A stream's rank and its readers, sorted.
    pub fn of(&self, stream: &str) -> (usize, Vec<&str>) {
        let (rank, listed) = self
            .listed
            .get(stream)
            .map_or((self.listed.len(), &[][..]), |(r, l)| (*r, l.as_slice()));
        let mut clients: Vec<&str> = listed
            .iter()
            .chain(&self.unlisted)
            .map(String::as_str)
            .collect();
        clients.sort_unstable();
        clients.dedup();
        (rank, clients)
    }

    /// Who keeps a stream's shard cache and lease rows: the lowest live client that lists
    /// it. (Older workers do that for their own streams as leader of the whole group, in
    /// which case both write the same ListShards answer.)
    pub fn leader_of(&self, stream: &str) -> Option<&str> {
        self.listed
            .get(stream)
            .and_then(|(_, l)| l.iter().min())
            .map(String::as_str)
    }
}

/// The planner's input for `streams` (config order) from a state-store snapshot: shards
/// from the leader's cache, "ended" from the lease rows. A stream without a cache row yet
/// has no consumable shards.
pub fn streams_from_snapshot(streams: &[String], snap: &GroupSnapshot) -> Vec<StreamShards> {
    streams
        .iter()
        .map(|name| {
            let ended: BTreeSet<&str> = snap
                .leases
                .iter()
                .filter(|l| &l.stream == name && l.ended)
                .map(|l| l.shard_id.as_str())
                .collect();
            let consumable = snap
                .shard_caches
                .iter()
                .find(|c| &c.stream == name)
                .map(|c| consumable_shards(&c.shards, &ended))
                .unwrap_or_default();
            StreamShards {
                stream: name.clone(),
                consumable,
            }
        })
        .collect()
}

/// A contiguous run of one stream's shards owned by one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRange {
    /// Stream name.
    pub stream: String,
    /// Owning client id.
    pub client: String,
    /// First shard id of the run.
    pub first_shard: String,
    /// Last shard id of the run.
    pub last_shard: String,
    /// Shards in the run.
    pub count: usize,
}

/// Compacts an ownership listing into runs. `entries` must be sorted by key (a `BTreeMap`
/// iterates that way); an unowned shard (`None`) breaks a run and is not listed.
pub fn compact_ranges<'a, I>(entries: I) -> Vec<OwnerRange>
where
    I: IntoIterator<Item = (&'a ShardKey, Option<&'a str>)>,
{
    let mut out: Vec<OwnerRange> = Vec::new();
    let mut open = false;
    for (key, owner) in entries {
        let Some(owner) = owner else {
            open = false;
            continue;
        };
        match out.last_mut() {
            Some(last) if open && last.stream == key.stream && last.client == owner => {
                last.last_shard = key.shard_id.clone();
                last.count += 1;
            }
            _ => {
                out.push(OwnerRange {
                    stream: key.stream.clone(),
                    client: owner.to_owned(),
                    first_shard: key.shard_id.clone(),
                    last_shard: key.shard_id.clone(),
                    count: 1,
                });
                open = true;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // table-driven cases are tuples on purpose
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            starting_sequence: None,
            shard_id: id.into(),
            parent: parents.first().map(|p| (*p).into()),
            adjacent_parent: parents.get(1).map(|p| (*p).into()),
            closed,
        }
    }

    #[test]
    fn split_ranges_table() {
        let cases: &[(usize, usize, &[usize])] = &[
            (6, 3, &[2, 2, 2]),
            (6, 4, &[1, 2, 1, 2]),
            (1, 3, &[0, 0, 1]),
            (0, 2, &[0, 0]),
            (10, 1, &[10]),
            (7, 7, &[1, 1, 1, 1, 1, 1, 1]),
            (3, 5, &[0, 1, 0, 1, 1]),
        ];
        for (n, c, sizes) in cases {
            let ranges = split_ranges(*n, *c);
            let got: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            assert_eq!(&got, sizes, "n={n} c={c}");
            // Contiguous, covering, sizes within one.
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, *n);
            let (min, max) = (got.iter().min(), got.iter().max());
            assert!(max.zip(min).is_none_or(|(a, b)| a - b <= 1));
        }
        assert!(split_ranges(5, 0).is_empty());
    }

    #[test]
    fn consumable_table() {
        // (name, shards, ended, expected)
        let cases: Vec<(&str, Vec<ShardInfo>, Vec<&str>, Vec<&str>)> = vec![
            (
                "all open",
                vec![
                    shard("s-2", &[], false),
                    shard("s-0", &[], false),
                    shard("s-1", &[], false),
                ],
                vec![],
                vec!["s-0", "s-1", "s-2"],
            ),
            (
                "split: parent not ended, children wait; closed parent is read",
                vec![
                    shard("s-0", &[], true),
                    shard("s-1", &["s-0"], false),
                    shard("s-2", &["s-0"], false),
                ],
                vec![],
                vec!["s-0"],
            ),
            (
                "split: parent ended, children consumable, parent dropped",
                vec![
                    shard("s-0", &[], true),
                    shard("s-1", &["s-0"], false),
                    shard("s-2", &["s-0"], false),
                ],
                vec!["s-0"],
                vec!["s-1", "s-2"],
            ),
            (
                "parent expired from the cache counts as ended",
                vec![shard("s-1", &["s-0"], false), shard("s-2", &["s-0"], false)],
                vec![],
                vec!["s-1", "s-2"],
            ),
            (
                "merge: one of two parents ended, child waits",
                vec![
                    shard("s-0", &[], true),
                    shard("s-1", &[], true),
                    shard("s-2", &["s-0", "s-1"], false),
                ],
                vec!["s-0"],
                vec!["s-1"],
            ),
            (
                "merge: both parents ended",
                vec![
                    shard("s-0", &[], true),
                    shard("s-1", &[], true),
                    shard("s-2", &["s-0", "s-1"], false),
                ],
                vec!["s-0", "s-1"],
                vec!["s-2"],
            ),
            (
                "merge: one parent ended, the other expired",
                vec![
                    shard("s-1", &[], true),
                    shard("s-2", &["s-0", "s-1"], false),
                ],
                vec!["s-1"],
                vec!["s-2"],
            ),
            (
                "grandchild waits for child, not grandparent",
                vec![
                    shard("s-0", &[], true),
                    shard("s-1", &["s-0"], true),
                    shard("s-2", &["s-0"], false),
                    shard("s-3", &["s-1"], false),
                ],
                vec!["s-0"],
                vec!["s-1", "s-2"],
            ),
            (
                "ended closed shard whose parent was never read (LATEST start) is not revived",
                vec![shard("s-0", &[], true), shard("s-1", &["s-0"], false)],
                vec!["s-0", "s-1"],
                vec![],
            ),
        ];
        for (name, shards, ended, want) in cases {
            let ended: BTreeSet<&str> = ended.into_iter().collect();
            assert_eq!(consumable_shards(&shards, &ended), want, "{name}");
        }
    }

    fn owners(plan: &Plan) -> Vec<(String, String)> {
        plan.iter()
            .map(|(k, v)| (format!("{}/{}", k.stream, k.shard_id), v.clone()))
            .collect()
    }

    #[test]
    fn plan_table() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let st = |name: &str, shards: &[&str]| StreamShards {
            stream: name.into(),
            consumable: ids(shards),
        };
        // (name, streams, live, expected (key, owner))
        let cases: Vec<(&str, Vec<StreamShards>, Vec<String>, Vec<(&str, &str)>)> = vec![
            (
                "no clients, no plan",
                vec![st("a", &["0", "1"])],
                vec![],
                vec![],
            ),
            (
                "6 shards / 3 clients: 2-2-2 contiguous",
                vec![st("a", &["0", "1", "2", "3", "4", "5"])],
                ids(&["c1", "c2", "c3"]),
                vec![
                    ("a/0", "c1"),
                    ("a/1", "c1"),
                    ("a/2", "c2"),
                    ("a/3", "c2"),
                    ("a/4", "c3"),
                    ("a/5", "c3"),
                ],
            ),
            (
                "one client owns all",
                vec![st("a", &["0", "1", "2"])],
                ids(&["c1"]),
                vec![("a/0", "c1"), ("a/1", "c1"), ("a/2", "c1")],
            ),
            (
                "more clients than shards",
                vec![st("a", &["0", "1"])],
                ids(&["c1", "c2", "c3", "c4"]),
                vec![("a/0", "c2"), ("a/1", "c4")],
            ),
            (
                "second stream rotates the client index",
                vec![st("a", &["0"]), st("b", &["0"])],
                ids(&["c1", "c2"]),
                vec![("a/0", "c2"), ("b/0", "c1")],
            ),
        ];
        for (name, streams, live, want) in cases {
            let got = owners(&plan(&streams, &live));
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn readers_table() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let lists: BTreeMap<String, Vec<String>> = [
            ("c1", ids(&["a"])),
            ("c2", ids(&["b", "a"])),
            ("c4", ids(&["c"])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let live = ids(&["c1", "c2", "c3", "c4"]); // c3: an older worker, no list
        let r = Readers::new(&live, |c| lists.get(c).map(Vec::as_slice));
        // (stream, rank, readers, leader)
        let cases: [(&str, usize, &[&str], Option<&str>); 4] = [
            ("a", 0, &["c1", "c2", "c3"], Some("c1")),
            ("b", 1, &["c2", "c3"], Some("c2")),
            ("c", 2, &["c3", "c4"], Some("c4")),
            ("unlisted", 3, &["c3"], None),
        ];
        for (stream, rank, readers, leader) in cases {
            assert_eq!(r.of(stream), (rank, readers.to_vec()), "{stream}");
            assert_eq!(r.leader_of(stream), leader, "{stream}");
        }
    }

    #[test]
    fn plans_agree_whatever_the_planners_stream_lists() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let st = |name: &str, shards: &[&str]| StreamShards {
            stream: name.into(),
            consumable: ids(shards),
        };
        let lists: BTreeMap<String, Vec<String>> = [("c1", ids(&["a"])), ("c2", ids(&["b", "a"]))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let live = ids(&["c1", "c2"]);
        let r = Readers::new(&live, |c| lists.get(c).map(Vec::as_slice));
        let (a, b) = (st("a", &["0", "1", "2", "3"]), st("b", &["0", "1"]));
        // c1 plans its one stream, c2 its two in its own order: both give the same owners.
        let by_c1 = plan_by_readers(std::slice::from_ref(&a), &r);
        let by_c2 = plan_by_readers(&[b.clone(), a.clone()], &r);
        let a_of = |p: &Plan| {
            p.iter()
                .filter(|(k, _)| k.stream == "a")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Plan>()
        };
        assert_eq!(a_of(&by_c1), a_of(&by_c2));
        assert_eq!(
            owners(&by_c2),
            [
                ("a/0", "c1"),
                ("a/1", "c1"),
                ("a/2", "c2"),
                ("a/3", "c2"),
                ("b/0", "c2"),
                ("b/1", "c2")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec()
        );
        // Every client reading the same list in the same order: the plan of old.
        let same: BTreeMap<String, Vec<String>> =
            [("c1", ids(&["a", "b"])), ("c2", ids(&["a", "b"]))]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
        let r = Readers::new(&live, |c| same.get(c).map(Vec::as_slice));
        assert_eq!(
            plan_by_readers(&[a.clone(), b.clone()], &r),
            plan(&[a, b], &live)
        );
    }

    #[test]
    fn plan_from_snapshot_uses_cache_and_ended_leases() {
        use crate::store::schema::{LeaseRow, ShardCacheRow};
        let lease = |shard: &str, ended: bool| LeaseRow {
            lease_counter: 1,
            ended,
            ..LeaseRow::unowned("ns/g", "a", shard, 0)
        };
        let snap = GroupSnapshot {
            clients: vec![],
            shard_caches: vec![ShardCacheRow {
                pk: "ns/g".into(),
                sk: "shards#a".into(),
                stream: "a".into(),
                shards: vec![
                    shard("s-0", &[], true),
                    shard("s-1", &["s-0"], false),
                    shard("s-2", &["s-0"], false),
                    shard("s-3", &[], false),
                ],
                refreshed_at_ms: 0,
                refreshed_by: "c1".into(),
            }],
            leases: vec![lease("s-0", true), lease("s-3", false)],
        };
        let streams = streams_from_snapshot(&["a".into(), "missing".into()], &snap);
        assert_eq!(streams[0].consumable, vec!["s-1", "s-2", "s-3"]);
        assert!(streams[1].consumable.is_empty());
    }

    #[test]
    fn compact_ranges_table() {
        let k = |s: &str, id: &str| ShardKey::new(s, id);
        // (name, entries, expected (stream, client, first, last, count))
        let cases: Vec<(
            &str,
            Vec<(ShardKey, Option<&str>)>,
            Vec<(&str, &str, &str, &str, usize)>,
        )> = vec![
            ("empty", vec![], vec![]),
            (
                "two runs",
                vec![
                    (k("a", "0"), Some("c1")),
                    (k("a", "1"), Some("c1")),
                    (k("a", "2"), Some("c2")),
                ],
                vec![("a", "c1", "0", "1", 2), ("a", "c2", "2", "2", 1)],
            ),
            (
                "unowned breaks a run",
                vec![
                    (k("a", "0"), Some("c1")),
                    (k("a", "1"), None),
                    (k("a", "2"), Some("c1")),
                ],
                vec![("a", "c1", "0", "0", 1), ("a", "c1", "2", "2", 1)],
            ),
            (
                "a new stream starts a new run",
                vec![(k("a", "0"), Some("c1")), (k("b", "0"), Some("c1"))],
                vec![("a", "c1", "0", "0", 1), ("b", "c1", "0", "0", 1)],
            ),
            (
                "interleaved owners",
                vec![
                    (k("a", "0"), Some("c1")),
                    (k("a", "1"), Some("c2")),
                    (k("a", "2"), Some("c1")),
                ],
                vec![
                    ("a", "c1", "0", "0", 1),
                    ("a", "c2", "1", "1", 1),
                    ("a", "c1", "2", "2", 1),
                ],
            ),
        ];
        for (name, entries, want) in cases {
            let got = compact_ranges(entries.iter().map(|(k, o)| (k, *o)));
            let want: Vec<OwnerRange> = want
                .into_iter()
                .map(|(s, c, f, l, n)| OwnerRange {
                    stream: s.into(),
                    client: c.into(),
                    first_shard: f.into(),
                    last_shard: l.into(),
                    count: n,
                })
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }
}
