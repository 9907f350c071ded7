//! KPL deaggregation: a Kinesis record written by the Kinesis Producer Library may hold
//! many user records. Its data is the magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord`, then the MD5 digest of that protobuf (16 bytes).
//!
//! [`deaggregate`] is a pure function from one Kinesis record to what the handler gets;
//! [`deaggregate_page`] applies it to a GetRecords page and reports failures to the caller
//! (the reader logs and counts them). A record that cannot be decoded is never dropped: it
//! is delivered raw, as it was read.

use md5::{Digest, Md5};
use prost::Message;

use crate::delivery::Record;

/// The first bytes of every KPL aggregate.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 trailer.
const DIGEST_LEN: usize = 16;

/// The KPL's `AggregatedRecord` message (messages.proto of the KPL/KCL), proto2.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    /// Partition keys, referenced by index from each record.
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    /// Explicit hash keys, referenced by index from each record.
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    /// The user records, in order.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<UserRecord>,
}

/// The KPL's `Record` message: one user record. (Its `tags`, field 4, are unused by the
/// KPL and skipped as an unknown field.)
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserRecord {
    /// Index into [`AggregatedRecord::partition_key_table`].
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    /// Index into [`AggregatedRecord::explicit_hash_key_table`], when the producer set one.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// The payload.
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
}

/// Why a record that starts with the KPL magic bytes was delivered raw.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeaggregationError {
    /// Shorter than the magic bytes and the digest.
    #[error("aggregated record too short ({0} bytes)")]
    TooShort(usize),
    /// The MD5 trailer does not match the protobuf.
    #[error("aggregated record fails its MD5 checksum")]
    Checksum,
    /// The protobuf does not parse.
    #[error("aggregated record does not parse: {0}")]
    Decode(String),
    /// A user record names a partition key the table does not have.
    #[error("user record {record} refers to partition key {index} of {len}")]
    PartitionKeyIndex {
        /// Index of the user record.
        record: usize,
        /// The index it names.
        index: u64,
        /// Size of the table.
        len: usize,
    },
    /// A user record names an explicit hash key the table does not have.
    #[error("user record {record} refers to explicit hash key {index} of {len}")]
    ExplicitHashKeyIndex {
        /// Index of the user record.
        record: usize,
        /// The index it names.
        index: u64,
        /// Size of the table.
        len: usize,
    },
    /// Valid, but holding no user record: delivered raw rather than consumed unseen.
    #[error("aggregated record holds no user record")]
    Empty,
}

/// What one Kinesis record becomes.
#[derive(Debug, PartialEq)]
pub enum Deaggregated {
    /// Not a KPL aggregate: delivered as it is.
    Plain(Record),
    /// Its user records, each with its sub-sequence number and own keys.
    Users(Vec<Record>),
    /// Looked like an aggregate but could not be decoded: delivered raw.
    Failed(Record, DeaggregationError),
}

/// Whether `data` starts with the KPL magic bytes.
pub fn is_aggregated(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// Splits a KPL aggregate into its user records (sub-sequence = index in the aggregate,
/// partition key and explicit hash key from the aggregate's tables, stream, shard, sequence
/// and arrival of the Kinesis record). Anything else comes back as it is.
pub fn deaggregate(record: Record) -> Deaggregated {
    if !is_aggregated(&record.data) {
        return Deaggregated::Plain(record);
    }
    match decode(&record.data) {
        Ok(agg) => match users(&record, agg) {
            Ok(users) => Deaggregated::Users(users),
            Err(e) => Deaggregated::Failed(record, e),
        },
        Err(e) => Deaggregated::Failed(record, e),
    }
}

/// Checks the digest and parses the protobuf of an aggregate's `data`.
fn decode(data: &[u8]) -> Result<AggregatedRecord, DeaggregationError> {
    if data.len() < MAGIC.len() + DIGEST_LEN {
        return Err(DeaggregationError::TooShort(data.len()));
    }
    let (body, digest) = data[MAGIC.len()..].split_at(data.len() - MAGIC.len() - DIGEST_LEN);
    if Md5::digest(body).as_slice() != digest {
        return Err(DeaggregationError::Checksum);
    }
    AggregatedRecord::decode(body).map_err(|e| DeaggregationError::Decode(e.to_string()))
}

/// The user records of a decoded aggregate, as handler records.
fn users(outer: &Record, agg: AggregatedRecord) -> Result<Vec<Record>, DeaggregationError> {
    if agg.records.is_empty() {
        return Err(DeaggregationError::Empty);
    }
    let lookup = |table: &[String], index: u64| table.get(usize::try_from(index).ok()?).cloned();
    let mut out = Vec::with_capacity(agg.records.len());
    for (i, user) in agg.records.into_iter().enumerate() {
        let partition_key = lookup(&agg.partition_key_table, user.partition_key_index).ok_or(
            DeaggregationError::PartitionKeyIndex {
                record: i,
                index: user.partition_key_index,
                len: agg.partition_key_table.len(),
            },
        )?;
        let explicit_hash_key = match user.explicit_hash_key_index {
            None => None,
            Some(index) => Some(lookup(&agg.explicit_hash_key_table, index).ok_or(
                DeaggregationError::ExplicitHashKeyIndex {
                    record: i,
                    index,
                    len: agg.explicit_hash_key_table.len(),
                },
            )?),
        };
        out.push(Record {
            stream: outer.stream.clone(),
            shard_id: outer.shard_id.clone(),
            sequence: outer.sequence.clone(),
            sub_sequence: Some(i as u64),
            partition_key,
            explicit_hash_key,
            data: user.data,
            arrival: outer.arrival,
        });
    }
    Ok(out)
}

/// Deaggregates a page of records, in order. `failed` is told about every aggregate that
/// is delivered raw. A page without aggregates is returned as it is (no copy).
pub fn deaggregate_page(
    records: Vec<Record>,
    mut failed: impl FnMut(&Record, &DeaggregationError),
) -> Vec<Record> {
    if !records.iter().any(|r| is_aggregated(&r.data)) {
        return records;
    }
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        match deaggregate(r) {
            Deaggregated::Plain(r) => out.push(r),
            Deaggregated::Users(users) => out.extend(users),
            Deaggregated::Failed(r, e) => {
                failed(&r, &e);
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: &str, data: Vec<u8>) -> Record {
        Record {
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
            sequence: seq.into(),
            sub_sequence: None,
            partition_key: "outer".into(),
            explicit_hash_key: None,
            data,
            arrival: Some(jiff::Timestamp::from_second(1_700_000_000).unwrap()),
        }
    }

    /// Frames a protobuf body as the KPL does: magic, body, MD5 of the body.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(body);
        v.extend_from_slice(Md5::digest(body).as_slice());
        v
    }

    fn user(pk: u64, ehk: Option<u64>, data: &str) -> UserRecord {
        UserRecord {
            partition_key_index: pk,
            explicit_hash_key_index: ehk,
            data: data.as_bytes().to_vec(),
        }
    }

    fn agg(pks: &[&str], ehks: &[&str], records: Vec<UserRecord>) -> Vec<u8> {
        AggregatedRecord {
            partition_key_table: pks.iter().map(|s| s.to_string()).collect(),
            explicit_hash_key_table: ehks.iter().map(|s| s.to_string()).collect(),
            records,
        }
        .encode_to_vec()
    }

    /// (sub-sequence, partition key, explicit hash key, data) of each delivered record.
    type Shown = Vec<(Option<u64>, String, Option<String>, String)>;

    fn show(records: &[Record]) -> Shown {
        records
            .iter()
            .map(|r| {
                (
                    r.sub_sequence,
                    r.partition_key.clone(),
                    r.explicit_hash_key.clone(),
                    String::from_utf8_lossy(&r.data).into_owned(),
                )
            })
            .collect()
    }

    fn users_of(list: &[(u64, &str, Option<&str>, &str)]) -> Shown {
        list.iter()
            .map(|(i, pk, ehk, d)| {
                (
                    Some(*i),
                    pk.to_string(),
                    ehk.map(str::to_owned),
                    d.to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn deaggregate_table() {
        let good = agg(
            &["a", "b"],
            &["170141183460469231731687303715884105728"],
            vec![
                user(0, None, "one"),
                user(1, Some(0), "two"),
                user(0, None, "three"),
            ],
        );
        let mut bad_digest = frame(&good);
        let last = bad_digest.len() - 1;
        bad_digest[last] ^= 0x01;
        let mut truncated = frame(&good);
        truncated.truncate(truncated.len() - 3);
        let garbage = [0xFFu8, 0xFF, 0xFF];
        // (name, data, want: Ok(user records) or Err(the failure))
        let cases: Vec<(&str, Vec<u8>, Result<Shown, DeaggregationError>)> = vec![
            (
                "aggregate: every user record, its own keys, its index",
                frame(&good),
                Ok(users_of(&[
                    (0, "a", None, "one"),
                    (
                        1,
                        "b",
                        Some("170141183460469231731687303715884105728"),
                        "two",
                    ),
                    (2, "a", None, "three"),
                ])),
            ),
            (
                "one user record",
                frame(&agg(&["k"], &[], vec![user(0, None, "")])),
                Ok(users_of(&[(0, "k", None, "")])),
            ),
            (
                "digest flipped",
                bad_digest,
                Err(DeaggregationError::Checksum),
            ),
            (
                "truncated: digest no longer matches",
                truncated,
                Err(DeaggregationError::Checksum),
            ),
            (
                "magic only",
                MAGIC.to_vec(),
                Err(DeaggregationError::TooShort(4)),
            ),
            (
                "digest matches but the protobuf does not parse",
                frame(&garbage),
                Err(DeaggregationError::Decode(String::new())),
            ),
            (
                "partition key index out of range",
                frame(&agg(
                    &["a"],
                    &[],
                    vec![user(0, None, "x"), user(3, None, "y")],
                )),
                Err(DeaggregationError::PartitionKeyIndex {
                    record: 1,
                    index: 3,
                    len: 1,
                }),
            ),
            (
                "explicit hash key index out of range",
                frame(&agg(&["a"], &[], vec![user(0, Some(0), "x")])),
                Err(DeaggregationError::ExplicitHashKeyIndex {
                    record: 0,
                    index: 0,
                    len: 0,
                }),
            ),
            (
                "no user record",
                frame(&agg(&["a"], &[], vec![])),
                Err(DeaggregationError::Empty),
            ),
        ];
        for (name, data, want) in cases {
            let outer = record("42", data.clone());
            match (deaggregate(outer.clone()), want) {
                (Deaggregated::Users(got), Ok(want)) => {
                    assert_eq!(show(&got), want, "{name}");
                    for r in &got {
                        assert_eq!(
                            (&r.stream, &r.shard_id, r.sequence.as_str(), r.arrival),
                            (&outer.stream, &outer.shard_id, "42", outer.arrival),
                            "{name}: the aggregate's identity"
                        );
                    }
                }
                (Deaggregated::Failed(raw, got), Err(want)) => {
                    assert_eq!(raw, outer, "{name}: delivered raw, untouched");
                    match (&got, &want) {
                        // prost's message wording is its own; the kind is what matters.
                        (DeaggregationError::Decode(_), DeaggregationError::Decode(_)) => {}
                        _ => assert_eq!(got, want, "{name}"),
                    }
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn plain_records_pass_through() {
        for data in [b"hello".to_vec(), Vec::new(), vec![0xF3, 0x89, 0x9A]] {
            let r = record("7", data);
            assert_eq!(deaggregate(r.clone()), Deaggregated::Plain(r));
        }
    }

    #[test]
    fn page_keeps_order_and_reports_failures() {
        let aggregate = frame(&agg(
            &["p", "q"],
            &[],
            vec![user(0, None, "u0"), user(1, None, "u1")],
        ));
        let mut corrupt = aggregate.clone();
        corrupt[5] ^= 0xFF;
        let page = vec![
            record("1", b"plain".to_vec()),
            record("2", aggregate),
            record("3", corrupt.clone()),
            record("4", b"plain again".to_vec()),
        ];
        let mut failures = Vec::new();
        let out = deaggregate_page(page, |r, e| failures.push((r.sequence.clone(), e.clone())));
        let got: Vec<String> = out.iter().map(|r| r.position().to_string()).collect();
        assert_eq!(got, ["1", "2/0", "2/1", "3", "4"]);
        assert_eq!(out[1].partition_key, "p");
        assert_eq!(out[2].partition_key, "q");
        assert_eq!(out[3].data, corrupt, "the corrupt aggregate raw");
        assert_eq!(failures, [("3".to_owned(), DeaggregationError::Checksum)]);
        // Nothing aggregated: the very same page back.
        let plain = vec![record("5", b"x".to_vec())];
        assert_eq!(deaggregate_page(plain.clone(), |_, _| panic!()), plain);
    }
}
