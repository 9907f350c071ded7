//! How a stream's shard cache is laid out in rows: pure splitting and joining.
//!
//! One DynamoDB item holds at most 400 KB, about 6,000 shards. A cache of up to
//! [`SHARDS_PER_PART`] shards is one row, `shards#<stream>`, exactly as older workers wrote
//! it. A longer one is split: its parts (`shardpart#<stream>#<generation>#<index>`) are
//! written first, then the head (`shards#<stream>`, shards left empty) naming the
//! generation and the number of parts, then the parts of other generations are deleted.
//!
//! The generation is a digest of the shard list, so two parts of one generation always come
//! from the same list: a reader never combines parts of two different writes. A reader whose
//! Query raced a rewrite (head of one generation, that generation's parts already deleted)
//! sees too few parts and reads again ([`join`] reports it as incomplete).
//!
//! An older worker skips the part rows (unknown kind) and reads a split head as a stream
//! without shards.

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use super::schema::{SHARDS_PREFIX, ShardCacheRow, ShardInfo};

/// Sort key prefix of the part rows of split shard caches. Sorts after `lease#`, so
/// `load_leases` (`sk >= lease#`) reads them, and does not begin with `shards#`, so older
/// readers skip them as an unknown kind.
pub const SHARD_PART_PREFIX: &str = "shardpart#";

/// Shards per row. A shard entry takes at most about 570 bytes (three ids of up to 128
/// characters, a starting sequence number of up to 128 digits and the attribute names), so
/// a full part stays under 300 KB, well under the 400 KB item limit; with real ids (20
/// characters) and sequence numbers (56 digits) it is about 90 KB.
pub const SHARDS_PER_PART: usize = 500;

/// The `shards#<stream>` row as stored: the whole cache (`generation` absent, the format
/// of every version), or the head of a split one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardCacheHead {
    /// Group id.
    pub pk: String,
    /// `shards#<stream>`.
    pub sk: String,
    /// The stream as named in the config.
    pub stream: String,
    /// The shards when not split; empty when split (an older reader sees no shards).
    #[serde(default)]
    pub shards: Vec<ShardInfo>,
    /// When the leader refreshed it, Unix ms.
    pub refreshed_at_ms: i64,
    /// The leader that refreshed it.
    pub refreshed_by: String,
    /// Split only: the generation whose parts hold the shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// Split only: how many parts that generation has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
}

/// One `shardpart#<stream>#<generation>#<index>` row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardCachePart {
    /// Group id.
    pub pk: String,
    /// `shardpart#<stream>#<generation>#<index>`.
    pub sk: String,
    /// The stream as named in the config.
    pub stream: String,
    /// The write this part belongs to.
    pub generation: String,
    /// Position of this part, from 0.
    pub index: u32,
    /// Consecutive shards of the sorted list.
    pub shards: Vec<ShardInfo>,
}

/// Sort-key prefix of every part row of `stream` (all generations).
pub fn parts_prefix(stream: &str) -> String {
    format!("{SHARD_PART_PREFIX}{stream}#")
}

/// Sort key of one part row. The index is zero-padded so parts sort in order.
pub fn part_sk(stream: &str, generation: &str, index: u32) -> String {
    format!("{}{generation}#{index:05}", parts_prefix(stream))
}

/// The generation of a shard list: a digest of its content (16 hex digits).
pub fn generation(shards: &[ShardInfo]) -> String {
    let mut h = Md5::new();
    for s in shards {
        for field in [
            Some(s.shard_id.as_str()),
            s.parent.as_deref(),
            s.adjacent_parent.as_deref(),
        ] {
            // Length-prefixed, so field boundaries cannot shift between lists.
            let bytes = field.unwrap_or("").as_bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
            h.update([u8::from(field.is_some())]);
        }
        h.update([u8::from(s.closed)]);
    }
    hex16(h)
}

/// The first 8 bytes of a digest, as 16 hex digits: short names for lists, not security.
pub(crate) fn hex16(h: Md5) -> String {
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The rows that store `row`, with `per_part` shards per part: the head alone when the
/// list fits in one row, else the head and its parts (write the parts first).
pub fn split(row: &ShardCacheRow, per_part: usize) -> (ShardCacheHead, Vec<ShardCachePart>) {
    let per_part = per_part.max(1);
    let mut head = ShardCacheHead {
        pk: row.pk.clone(),
        sk: row.sk.clone(),
        stream: row.stream.clone(),
        shards: Vec::new(),
        refreshed_at_ms: row.refreshed_at_ms,
        refreshed_by: row.refreshed_by.clone(),
        generation: None,
        parts: None,
    };
    if row.shards.len() <= per_part {
        head.shards = row.shards.clone();
        return (head, Vec::new());
    }
    let generation = generation(&row.shards);
    let parts: Vec<ShardCachePart> = row
        .shards
        .chunks(per_part)
        .zip(0u32..)
        .map(|(chunk, index)| ShardCachePart {
            pk: row.pk.clone(),
            sk: part_sk(&row.stream, &generation, index),
            stream: row.stream.clone(),
            generation: generation.clone(),
            index,
            shards: chunk.to_vec(),
        })
        .collect();
    head.parts = u32::try_from(parts.len()).ok();
    head.generation = Some(generation);
    (head, parts)
}

/// The result of [`join`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Joined {
    /// The complete caches, sorted by stream.
    pub caches: Vec<ShardCacheRow>,
    /// Streams whose head names parts this read did not see (a rewrite raced the read).
    pub incomplete: Vec<String>,
}

/// Assembles the caches from the heads and parts one read saw. A head without a generation
/// is a whole cache; a split one takes exactly its generation's parts `0..parts`, in
/// order. Parts of other generations (left from an earlier write) are ignored.
pub fn join(heads: Vec<ShardCacheHead>, parts: Vec<ShardCachePart>) -> Joined {
    let mut by_key: BTreeMap<(String, String, u32), ShardCachePart> = parts
        .into_iter()
        .map(|p| ((p.stream.clone(), p.generation.clone(), p.index), p))
        .collect();
    let mut out = Joined::default();
    for head in heads {
        let ShardCacheHead {
            pk,
            sk,
            stream,
            mut shards,
            refreshed_at_ms,
            refreshed_by,
            generation,
            parts,
        } = head;
        if let Some(generation) = generation {
            let want = parts.unwrap_or(0);
            let mut complete = true;
            for index in 0..want {
                match by_key.remove(&(stream.clone(), generation.clone(), index)) {
                    Some(p) => shards.extend(p.shards),
                    None => complete = false,
                }
            }
            if !complete {
                out.incomplete.push(stream);
                continue;
            }
        }
        out.caches.push(ShardCacheRow {
            pk,
            sk,
            stream,
            shards,
            refreshed_at_ms,
            refreshed_by,
        });
    }
    out.caches.sort_by(|a, b| a.stream.cmp(&b.stream));
    out
}

/// The part rows (by sort key) of a stream to delete once its head names `keep`: every
/// part of another generation (`None`: the cache is one row, so every part).
pub fn stale_parts(existing: &[String], stream: &str, keep: Option<&str>) -> Vec<String> {
    let prefix = parts_prefix(stream);
    existing
        .iter()
        .filter(|sk| {
            let Some(rest) = sk.strip_prefix(&prefix) else {
                return false;
            };
            let generation = rest.split('#').next().unwrap_or("");
            keep != Some(generation)
        })
        .cloned()
        .collect()
}

/// Whether `sk` is a shard-cache head (`shards#...`).
pub fn is_head(sk: &str) -> bool {
    sk.starts_with(SHARDS_PREFIX)
}

/// Whether `sk` is a shard-cache part (`shardpart#...`).
pub fn is_part(sk: &str) -> bool {
    sk.starts_with(SHARD_PART_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::shards_sk;

    fn shard(i: usize) -> ShardInfo {
        ShardInfo {
            starting_sequence: None,
            shard_id: format!("shardId-{i:012}"),
            parent: (i > 0).then(|| format!("shardId-{:012}", i / 2)),
            adjacent_parent: (i.is_multiple_of(3) && i > 0)
                .then(|| format!("shardId-{:012}", i - 1)),
            closed: i.is_multiple_of(2),
        }
    }

    fn cache(stream: &str, n: usize) -> ShardCacheRow {
        ShardCacheRow {
            pk: "ns/g".into(),
            sk: shards_sk(stream),
            stream: stream.into(),
            shards: (0..n).map(shard).collect(),
            refreshed_at_ms: 7,
            refreshed_by: "leader".into(),
        }
    }

    #[test]
    fn split_table() {
        // (shards, per part, parts expected, shards inline in the head)
        for (n, per, want_parts, inline) in [
            (0, 3, 0, 0),
            (1, 3, 0, 1),
            (3, 3, 0, 3),
            (4, 3, 2, 0),
            (6, 3, 2, 0),
            (7, 3, 3, 0),
            (10_000, SHARDS_PER_PART, 20, 0),
        ] {
            let row = cache("a", n);
            let (head, parts) = split(&row, per);
            assert_eq!(parts.len(), want_parts, "{n}/{per}");
            assert_eq!(head.shards.len(), inline, "{n}/{per}");
            assert_eq!(head.sk, "shards#a");
            if want_parts == 0 {
                assert_eq!((head.generation, head.parts), (None, None));
                continue;
            }
            let g = head.generation.clone().expect("generation");
            assert_eq!(head.parts, Some(want_parts as u32));
            for (i, p) in parts.iter().enumerate() {
                assert_eq!(p.index as usize, i);
                assert_eq!(p.generation, g);
                assert_eq!(p.sk, format!("shardpart#a#{g}#{i:05}"));
                assert!(p.shards.len() <= per && !p.shards.is_empty());
            }
            let all: Vec<ShardInfo> = parts.iter().flat_map(|p| p.shards.clone()).collect();
            assert_eq!(all, row.shards);
        }
    }

    #[test]
    fn join_round_trips_and_refuses_mixes() {
        let (h_small, p_small) = split(&cache("a", 2), 3);
        let (h_old, p_old) = split(&cache("b", 7), 3);
        let (h_new, p_new) = split(&cache("b", 8), 3);
        assert_ne!(h_old.generation, h_new.generation);
        let all = |v: &[&[ShardCachePart]]| v.iter().flat_map(|p| p.to_vec()).collect();

        // (case, heads, parts, complete streams, incomplete streams)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<ShardCacheHead>,
            Vec<ShardCachePart>,
            Vec<&str>,
            Vec<&str>,
        )> = vec![
            ("one row", vec![h_small.clone()], vec![], vec!["a"], vec![]),
            (
                "split, with an old generation's parts left over",
                vec![h_new.clone(), h_small.clone()],
                all(&[&p_old, &p_new, &p_small]),
                vec!["a", "b"],
                vec![],
            ),
            (
                "head of the new write, only old parts seen",
                vec![h_new.clone()],
                all(&[&p_old]),
                vec![],
                vec!["b"],
            ),
            (
                "head of the new write, one part missing",
                vec![h_new.clone()],
                all(&[&p_new[..2]]),
                vec![],
                vec!["b"],
            ),
            (
                "parts without a head",
                vec![],
                all(&[&p_new]),
                vec![],
                vec![],
            ),
        ];
        for (case, heads, parts, complete, incomplete) in cases {
            let joined = join(heads, parts);
            let streams: Vec<&str> = joined.caches.iter().map(|c| c.stream.as_str()).collect();
            assert_eq!(streams, complete, "{case}");
            assert_eq!(joined.incomplete, incomplete, "{case}");
            for c in &joined.caches {
                let n = if c.stream == "a" { 2 } else { 8 };
                assert_eq!(c, &cache(&c.stream, n), "{case}");
            }
        }
    }

    #[test]
    fn stale_parts_table() {
        let existing: Vec<String> = [
            "shardpart#a#g1#00000",
            "shardpart#a#g1#00001",
            "shardpart#a#g2#00000",
            "shardpart#ab#g1#00000",
            "shardpart#b#g1#00000",
        ]
        .map(str::to_owned)
        .to_vec();
        for (stream, keep, want) in [
            (
                "a",
                Some("g2"),
                vec!["shardpart#a#g1#00000", "shardpart#a#g1#00001"],
            ),
            ("a", Some("g1"), vec!["shardpart#a#g2#00000"]),
            (
                "a",
                None,
                vec![
                    "shardpart#a#g1#00000",
                    "shardpart#a#g1#00001",
                    "shardpart#a#g2#00000",
                ],
            ),
            ("ab", Some("g1"), vec![]),
            ("c", None, vec![]),
        ] {
            assert_eq!(
                stale_parts(&existing, stream, keep),
                want,
                "{stream} {keep:?}"
            );
        }
    }

    #[test]
    fn generation_depends_on_every_field() {
        let base = cache("a", 4).shards;
        let g = generation(&base);
        assert_eq!(g.len(), 16);
        assert_eq!(g, generation(&base.clone()));
        let mut variants = Vec::new();
        let mut v = base.clone();
        v[1].closed = !v[1].closed;
        variants.push(v);
        let mut v = base.clone();
        v[2].adjacent_parent = Some("x".into());
        variants.push(v);
        let mut v = base.clone();
        v[3].parent = None;
        variants.push(v);
        let mut v = base.clone();
        v.pop();
        variants.push(v);
        for v in variants {
            assert_ne!(generation(&v), g, "{v:?}");
        }
    }

    #[test]
    fn a_full_part_with_the_longest_ids_fits_an_item() {
        let long = |c: char, i: usize| format!("{c}{i:0127}");
        let shards: Vec<ShardInfo> = (0..SHARDS_PER_PART)
            .map(|i| ShardInfo {
                shard_id: long('s', i),
                parent: Some(long('p', i)),
                adjacent_parent: Some(long('q', i)),
                closed: true,
                // Sequence numbers are at most 128 digits.
                starting_sequence: Some("9".repeat(128)),
            })
            .collect();
        let stream = format!(
            "arn:aws:kinesis:eu-west-1:123456789012:stream/{}",
            "n".repeat(128)
        );
        let part = ShardCachePart {
            pk: "namespace/name".repeat(20),
            sk: part_sk(&stream, &generation(&shards), 99),
            stream: stream.clone(),
            generation: generation(&shards),
            index: 99,
            shards,
        };
        // DynamoDB's JSON form is larger than the billed item size, so this bounds it.
        let json = serde_json::to_vec(&part).expect("json");
        assert!(json.len() < 300 * 1024, "{}", json.len());
    }
}
