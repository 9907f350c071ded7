//! Which lease rows belong to an older incarnation of their stream. Pure functions.
//!
//! A stream deleted and recreated under the same name gets the same shard ids
//! (`shardId-000000000000`, ...), so its shards map to the lease rows of the deleted stream.
//! Those rows must not be read: an `ended` row would keep the new shard unread forever, and a
//! checkpoint of the old stream is no position in the new one. What tells them apart is the
//! shard's `StartingSequenceNumber` (ListShards, kept in the shard cache): new for every
//! shard Kinesis creates. A row records the one it was created or claimed for
//! (`shardStart`). A row is of an older incarnation when:
//!
//! - its `shardStart` differs from the cached shard's starting sequence number; or
//! - its checkpoint lies before that starting sequence number: every record of a shard has a
//!   sequence number at or after it, so such a checkpoint came from another shard. This also
//!   covers rows written by workers that predate `shardStart`.
//!
//! Without a starting sequence number in the cache (a cache written by an older leader) no
//! row is judged older. The leader replaces rows of an older incarnation with fresh ones
//! (`StateStore::replace_lease`); until then, every member plans as if they did not exist.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use crate::assignment::ShardKey;
use crate::position::compare_sequence;
use crate::store::schema::{GroupSnapshot, LeaseRow};

/// Whether `row` belongs to an older incarnation of its shard, whose current starting
/// sequence number (from the shard cache) is `listed_start`.
pub fn is_older(row: &LeaseRow, listed_start: Option<&str>) -> bool {
    let Some(start) = listed_start else {
        return false;
    };
    if row.shard_start.as_deref().is_some_and(|s| s != start) {
        return true;
    }
    row.checkpoint
        .as_deref()
        .is_some_and(|cp| compare_sequence(cp, start) == Ordering::Less)
}

/// The starting sequence number of every cached shard, by (stream, shard id). Borrowed:
/// it is built at every tick, over every shard.
pub fn listed_starts(snap: &GroupSnapshot) -> BTreeMap<(&str, &str), &str> {
    snap.shard_caches
        .iter()
        .flat_map(|c| {
            c.shards.iter().filter_map(|s| {
                s.starting_sequence
                    .as_deref()
                    .map(|start| ((c.stream.as_str(), s.shard_id.as_str()), start))
            })
        })
        .collect()
}

/// The cached starting sequence number of one shard.
pub fn listed_start<'a>(snap: &'a GroupSnapshot, key: &ShardKey) -> Option<&'a str> {
    snap.shard_caches
        .iter()
        .find(|c| c.stream == key.stream)
        .and_then(|c| c.shards.iter().find(|s| s.shard_id == key.shard_id))
        .and_then(|s| s.starting_sequence.as_deref())
}

/// The lease rows of `snap` that belong to an older incarnation of their stream, with the
/// starting sequence number of the shard that now has their id.
pub fn older_leases(snap: &GroupSnapshot) -> Vec<(&LeaseRow, &str)> {
    let starts = listed_starts(snap);
    if starts.is_empty() {
        return Vec::new();
    }
    snap.leases
        .iter()
        .filter_map(|l| {
            let start = starts
                .get(&(l.stream.as_str(), l.shard_id.as_str()))
                .copied();
            is_older(l, start).then_some((l, start?))
        })
        .collect()
}

/// `snap` without the lease rows of older incarnations: what members plan with, and what
/// the status shows. Borrowed when there are none (the usual case).
pub fn current(snap: &GroupSnapshot) -> Cow<'_, GroupSnapshot> {
    let older: BTreeSet<(&str, &str)> = older_leases(snap)
        .into_iter()
        .map(|(l, _)| (l.stream.as_str(), l.shard_id.as_str()))
        .collect();
    if older.is_empty() {
        return Cow::Borrowed(snap);
    }
    let mut out = snap.clone();
    out.leases
        .retain(|l| !older.contains(&(l.stream.as_str(), l.shard_id.as_str())));
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::{ShardCacheRow, ShardInfo, shards_sk};

    const OLD: &str = "49680813562472315432103294830744821510546937585057398786";
    const NEW: &str = "49680813563542751201632764741538535987634059143502888962";
    const OLD_RECORD: &str = "49680813562472315432103294830746030436366552282951581698";
    const NEW_RECORD: &str = "49680813563542751201632764741539744913453673840778084354";

    fn row(stamp: Option<&str>, checkpoint: Option<&str>) -> LeaseRow {
        LeaseRow {
            shard_start: stamp.map(str::to_owned),
            checkpoint: checkpoint.map(str::to_owned),
            ..LeaseRow::unowned("ns/g", "s", "shardId-000000000000", 0)
        }
    }

    #[test]
    fn is_older_table() {
        // (name, row's shardStart, row's checkpoint, cached start, older)
        let cases = [
            ("same shard", Some(NEW), Some(NEW_RECORD), Some(NEW), false),
            (
                "stamp of the deleted stream",
                Some(OLD),
                None,
                Some(NEW),
                true,
            ),
            (
                "stamp of the deleted stream, with its checkpoint",
                Some(OLD),
                Some(OLD_RECORD),
                Some(NEW),
                true,
            ),
            (
                "older worker's row, checkpoint of the deleted stream",
                None,
                Some(OLD_RECORD),
                Some(NEW),
                true,
            ),
            (
                "older worker's row, checkpoint in this shard",
                None,
                Some(NEW_RECORD),
                Some(NEW),
                false,
            ),
            (
                "checkpoint at the very first record",
                None,
                Some(NEW),
                Some(NEW),
                false,
            ),
            (
                "older worker's row, no checkpoint",
                None,
                None,
                Some(NEW),
                false,
            ),
            (
                "cache of an older leader: cannot tell",
                Some(OLD),
                Some(OLD_RECORD),
                None,
                false,
            ),
            (
                "stamped row whose checkpoint predates the shard (claimed by stamping an old row)",
                Some(NEW),
                Some(OLD_RECORD),
                Some(NEW),
                true,
            ),
        ];
        for (name, stamp, cp, start, want) in cases {
            assert_eq!(is_older(&row(stamp, cp), start), want, "{name}");
        }
    }

    #[test]
    fn current_drops_only_rows_of_older_incarnations() {
        let info = |id: &str, start: Option<&str>| ShardInfo {
            shard_id: id.into(),
            parent: None,
            adjacent_parent: None,
            closed: false,
            starting_sequence: start.map(str::to_owned),
        };
        let lease = |stream: &str, shard: &str, stamp: Option<&str>, ended: bool| LeaseRow {
            shard_start: stamp.map(str::to_owned),
            ended,
            ..LeaseRow::unowned("ns/g", stream, shard, 0)
        };
        let cache = |stream: &str, shards: Vec<ShardInfo>| ShardCacheRow {
            pk: "ns/g".into(),
            sk: shards_sk(stream),
            stream: stream.into(),
            shards,
            refreshed_at_ms: 0,
            refreshed_by: "c".into(),
        };
        let snap = GroupSnapshot {
            clients: vec![],
            shard_caches: vec![
                cache("a", vec![info("0", Some(NEW)), info("1", Some(NEW))]),
                cache("b", vec![info("0", None)]),
            ],
            leases: vec![
                lease("a", "0", Some(OLD), true), // ended row of the deleted stream
                lease("a", "1", Some(NEW), false),
                lease("a", "9", Some(OLD), true), // not listed (trimmed): cannot tell
                lease("b", "0", Some(OLD), true), // cache without starts: cannot tell
            ],
        };
        let older: Vec<(String, &str)> = older_leases(&snap)
            .into_iter()
            .map(|(l, s)| (format!("{}/{}", l.stream, l.shard_id), s))
            .collect();
        assert_eq!(older, vec![("a/0".to_owned(), NEW)]);
        let kept: Vec<String> = current(&snap)
            .leases
            .iter()
            .map(|l| format!("{}/{}", l.stream, l.shard_id))
            .collect();
        assert_eq!(kept, vec!["a/1", "a/9", "b/0"]);
        assert_eq!(
            listed_start(&snap, &ShardKey::new("a", "1")),
            Some(NEW),
            "listed start"
        );
        assert_eq!(listed_start(&snap, &ShardKey::new("b", "0")), None);

        let none_older = GroupSnapshot {
            leases: vec![lease("a", "1", Some(NEW), false)],
            ..snap.clone()
        };
        assert!(matches!(current(&none_older), Cow::Borrowed(_)));
    }
}
