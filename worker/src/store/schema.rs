//! The state-store schema: one DynamoDB table, many groups.
//!
//! Every row of a group shares the partition key `pk` = the group id (`namespace/name`), so
//! one Query reads a whole group and one table serves a whole cluster. The sort key `sk`
//! names the row kind:
//!
//! | `sk`                          | row            | written by                         |
//! |-------------------------------|----------------|------------------------------------|
//! | `client#<clientId>`           | [`ClientRow`]  | that client (heartbeat), leader (prune) |
//! | `shards#<stream>`             | [`ShardCacheRow`] (or the head of a split one) | the leader (ListShards refresh) |
//! | `shardpart#<stream>#<gen>#<n>` | part of a split shard cache ([`super::shard_cache`]) | the leader |
//! | `lease#<stream>#<shardId>`    | [`LeaseRow`]   | the lease owner (conditional on `owner`) |
//! | `clientstreams#<clientId>`    | [`ClientStreamsRow`] | that client (register), deleted with its client row |
//!
//! Timestamps (`*AtMs`, Unix milliseconds) are informational: for humans and the status.
//! Liveness (of a client and of the leases it owns) is judged by watching `heartbeat` stop
//! changing, measured on the observer's own monotonic clock, never by comparing clocks.

use serde::{Deserialize, Serialize};

use crate::position::Position;

/// Partition key attribute name.
pub const PK: &str = "pk";
/// Sort key attribute name.
pub const SK: &str = "sk";
/// TTL attribute (Unix seconds) on client rows, for cleanup only; never for correctness.
pub const TTL_ATTRIBUTE: &str = "expiresAt";

/// Sort key prefix of client rows.
pub const CLIENT_PREFIX: &str = "client#";
/// Sort key prefix of shard-cache rows.
pub const SHARDS_PREFIX: &str = "shards#";
/// Sort key prefix of lease (and checkpoint) rows.
pub const LEASE_PREFIX: &str = "lease#";
/// Sort key prefix of the rows holding each client's stream list ([`ClientStreamsRow`]).
/// Not under `client#`: the Query every worker makes at every tick does not read them.
pub const CLIENT_STREAMS_PREFIX: &str = "clientstreams#";
/// Lease attribute holding the sub-sequence of a checkpoint inside a KPL aggregate
/// ([`LeaseRow::checkpoint_sub_sequence`]).
pub const CHECKPOINT_SUB_SEQUENCE: &str = "checkpointSubSequence";

/// Lease attribute naming the starting sequence number of the shard the row is for
/// ([`LeaseRow::shard_start`]).
pub const SHARD_START: &str = "shardStart";

/// Most characters of a client row's `lastError`: every worker reads every client row at
/// every tick, and an SDK error's text (a Debug dump of its cause) can run to hundreds of
/// characters; the front names the call and the cause.
pub const MAX_LAST_ERROR_CHARS: usize = 256;

/// Cuts `s` to at most `max` characters (on a char boundary), marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Sort key of a client row.
pub fn client_sk(client_id: &str) -> String {
    format!("{CLIENT_PREFIX}{client_id}")
}

/// Sort key of a client's stream-list row.
pub fn client_streams_sk(client_id: &str) -> String {
    format!("{CLIENT_STREAMS_PREFIX}{client_id}")
}

/// A digest of a stream list, in its order (16 hex digits): what a client row carries
/// instead of the list ([`ClientRow::streams_digest`]).
pub fn streams_digest(streams: &[String]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for s in streams {
        // Length-prefixed, so names cannot shift between lists.
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    super::shard_cache::hex16(h)
}

/// Sort key of a stream's shard-cache row.
pub fn shards_sk(stream: &str) -> String {
    format!("{SHARDS_PREFIX}{stream}")
}

/// Sort key of a shard's lease row.
pub fn lease_sk(stream: &str, shard_id: &str) -> String {
    format!("{LEASE_PREFIX}{stream}#{shard_id}")
}

/// A member of the group. The client id is the pod name plus a suffix: random per process,
/// or derived from the pod UID, so that a container restarted in its pod is the same client
/// (see [`crate::membership::Identity`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientRow {
    /// Group id.
    pub pk: String,
    /// `client#<clientId>`.
    pub sk: String,
    /// The client id; sorted ids decide the leader and range indexes.
    pub client_id: String,
    /// The pod (or host) this client runs in, for the controller.
    pub pod: String,
    /// Incremented on every heartbeat; observers judge liveness by watching it move.
    pub heartbeat: u64,
    /// Wall-clock time of the last heartbeat, Unix ms (informational).
    pub heartbeat_at_ms: i64,
    /// When this incarnation registered, Unix ms.
    pub started_at_ms: i64,
    /// Number of leases this client holds, as of its last heartbeat.
    #[serde(default)]
    pub owned_shards: u32,
    /// Moves (with the next heartbeat) whenever this client claimed, resumed, released or
    /// abandoned a lease, or changed the shards ([`ClientRow::shard_changes`]): other
    /// clients re-read lease rows only when some client's value moved, instead of at every
    /// heartbeat.
    #[serde(default)]
    pub lease_changes: u64,
    /// Moves (with `lease_changes`) whenever this client changed what the plan is made of:
    /// (leader) wrote a shard cache or replaced a deleted stream's rows, or released a
    /// shard it read to its end. Other clients re-read every lease row when it moves; when
    /// only `lease_changes` moved (ownership), the rows of their own range suffice. Absent
    /// for workers that predate it, whose every lease change counts as a shard change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_changes: Option<u64>,
    /// The last error this client hit (delivery, Kinesis, state store), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Machine-readable kind of `last_error`: `StreamNotFound`, `AccessDenied`,
    /// `StateStoreUnavailable`, `HandlerFailing`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_reason: Option<String>,
    /// TTL for cleanup of rows left by crashed clients (Unix seconds).
    pub expires_at: i64,
    /// The streams this client reads, as configured and in config order, as workers before
    /// [`ClientRow::streams_digest`] wrote it: the plan of a stream is made over the live
    /// clients that read it. Absent in rows of newer workers (which carry the digest) and
    /// of workers older than both, which are taken to read every stream (as they plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<String>>,
    /// [`streams_digest`] of the streams this client reads; the list itself is in its
    /// [`ClientStreamsRow`]. Every worker reads every client row at every tick, and a list
    /// of long stream names in each made those reads grow with workers × streams; a
    /// worker reads another's list only when the digest differs from its own list's (a
    /// rollout that changes the streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams_digest: Option<String>,
}

/// The stream list of one client (`clientstreams#<clientId>`), apart from its client row:
/// written by `register` before the client row, deleted with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStreamsRow {
    /// Group id.
    pub pk: String,
    /// `clientstreams#<clientId>`.
    pub sk: String,
    /// The client id.
    pub client_id: String,
    /// The streams the client reads, in config order.
    pub streams: Vec<String>,
    /// [`streams_digest`] of `streams`: a reader checks it against the client row's, so a
    /// list rewritten by another incarnation under the id is never taken for this one's.
    pub streams_digest: String,
}

#[cfg(test)]
impl ClientRow {
    /// A client row of group `ns/g` with only its id and heartbeat set, for tests.
    pub(crate) fn for_test(client_id: &str, heartbeat: u64) -> Self {
        Self {
            pk: "ns/g".into(),
            sk: client_sk(client_id),
            client_id: client_id.into(),
            pod: "p".into(),
            heartbeat,
            heartbeat_at_ms: 0,
            started_at_ms: 0,
            owned_shards: 0,
            lease_changes: 0,
            shard_changes: Some(0),
            last_error: None,
            last_error_reason: None,
            expires_at: 0,
            streams: None,
            streams_digest: None,
        }
    }
}

/// The leader's cached view of one stream's shards, as readers get it (a split cache
/// joined; see [`super::shard_cache`] for how it is stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardCacheRow {
    /// Group id.
    pub pk: String,
    /// `shards#<stream>`.
    pub sk: String,
    /// The stream as named in the config.
    pub stream: String,
    /// Every shard ListShards returned, sorted by shard id.
    pub shards: Vec<ShardInfo>,
    /// When the leader refreshed it, Unix ms.
    pub refreshed_at_ms: i64,
    /// The leader that refreshed it.
    pub refreshed_by: String,
}

/// One shard as ListShards described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardInfo {
    /// Shard id, e.g. `shardId-000000000003`.
    pub shard_id: String,
    /// Parent shard (after a split or a merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Second parent (after a merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjacent_parent: Option<String>,
    /// The shard has an ending sequence number: it takes no new records.
    pub closed: bool,
    /// The shard's `StartingSequenceNumber`: which incarnation of the stream the shard
    /// belongs to (a stream deleted and recreated under its name reuses the shard ids, never
    /// the starting sequence numbers). Absent in caches written by older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_sequence: Option<String>,
}

impl ShardInfo {
    /// The shard's parents, zero, one or two.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.parent
            .iter()
            .chain(self.adjacent_parent.iter())
            .map(String::as_str)
    }
}

/// A shard's lease and checkpoint. Every write is conditional: taking it on `owner` being
/// absent or on the observed owner and `leaseCounter` (owner dead), everything else on
/// `owner` = self and the counter the owner holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRow {
    /// Group id.
    pub pk: String,
    /// `lease#<stream>#<shardId>`.
    pub sk: String,
    /// The stream as named in the config.
    pub stream: String,
    /// The shard.
    pub shard_id: String,
    /// The client id holding the lease; absent when released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Incremented by every claim, resume and release: the ownership epoch, the fencing
    /// token every owner write is conditioned on. Checkpoints leave it alone.
    pub lease_counter: u64,
    /// Last acknowledged sequence number; reading resumes after it (see
    /// [`LeaseRow::checkpoint_position`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// With `checkpoint`: the last acknowledged user record inside the KPL aggregate at
    /// `checkpoint`; absent when the whole record was acknowledged. Reading then resumes at
    /// the aggregate, skipping its user records up to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_sub_sequence: Option<u64>,
    /// The shard was read to its end and everything acknowledged: children may start.
    #[serde(default)]
    pub ended: bool,
    /// MillisBehindLatest of the owner's last GetRecords on this shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis_behind: Option<i64>,
    /// When that GetRecords returned, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_at_ms: Option<i64>,
    /// Last write to this row, Unix ms (informational).
    pub updated_at_ms: i64,
    /// The `StartingSequenceNumber` of the shard this row was created or claimed for (see
    /// [`ShardInfo::starting_sequence`]): tells a row of a deleted stream from one of the
    /// stream recreated under the same name ([`crate::incarnation`]). Absent in rows of
    /// older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_start: Option<String>,
}

impl LeaseRow {
    /// A fresh, unowned lease row of `shard_id` (no checkpoint, counter 0), as the leader
    /// creates it for a newly listed shard.
    pub fn unowned(group: &str, stream: &str, shard_id: &str, now_ms: i64) -> Self {
        Self {
            pk: group.to_owned(),
            sk: lease_sk(stream, shard_id),
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            owner: None,
            lease_counter: 0,
            checkpoint: None,
            checkpoint_sub_sequence: None,
            ended: false,
            millis_behind: None,
            lag_at_ms: None,
            updated_at_ms: now_ms,
            shard_start: None,
        }
    }
}

impl LeaseRow {
    /// The checkpoint as a position: `checkpoint` with `checkpointSubSequence`.
    pub fn checkpoint_position(&self) -> Option<Position> {
        self.checkpoint.as_ref().map(|seq| Position {
            sequence: seq.clone(),
            sub_sequence: self.checkpoint_sub_sequence,
        })
    }
}

/// Lease attribute written by `kcg-operator checkpoints reset`: where a reader starts the
/// shard while the row holds no checkpoint, instead of the configured start position. Text:
/// [`ResetTo`]'s `Display`. Not part of [`LeaseRow`]: only the engine (and the reset
/// command) read it.
pub const RESET_TO: &str = "resetTo";

/// Where a reset shard restarts (the `resetTo` lease attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest record still retained.
    TrimHorizon,
    /// The first record that arrived at or after this time.
    AtTimestamp(jiff::Timestamp),
}

impl std::fmt::Display for ResetTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetTo::TrimHorizon => f.write_str("TrimHorizon"),
            ResetTo::AtTimestamp(t) => write!(f, "AtTimestamp={t}"),
        }
    }
}

impl std::str::FromStr for ResetTo {
    type Err = String;

    /// `TrimHorizon` or `AtTimestamp=<RFC 3339 time>`.
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "TrimHorizon" {
            return Ok(ResetTo::TrimHorizon);
        }
        let Some(time) = text.strip_prefix("AtTimestamp=") else {
            return Err(format!(
                "{text:?}: expected TrimHorizon or AtTimestamp=<RFC 3339 time>"
            ));
        };
        time.parse::<jiff::Timestamp>()
            .map(ResetTo::AtTimestamp)
            .map_err(|e| {
                format!("{time:?} is not an RFC 3339 time such as 2026-01-02T15:04:05Z: {e}")
            })
    }
}

/// Every row of one group, as one Query returns them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupSnapshot {
    /// Client rows, sorted by client id.
    pub clients: Vec<ClientRow>,
    /// Shard caches, one per stream the leader has listed (split ones joined).
    pub shard_caches: Vec<ShardCacheRow>,
    /// Lease rows, sorted by (stream, shard id).
    pub leases: Vec<LeaseRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_to_round_trips_and_rejects_the_rest() {
        let t: jiff::Timestamp = "2026-01-02T15:04:05Z".parse().expect("time");
        for (text, want) in [
            ("TrimHorizon", ResetTo::TrimHorizon),
            ("AtTimestamp=2026-01-02T15:04:05Z", ResetTo::AtTimestamp(t)),
        ] {
            assert_eq!(text.parse::<ResetTo>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        for bad in [
            "Latest",
            "trimhorizon",
            "AtTimestamp=",
            "AtTimestamp=yesterday",
            "",
        ] {
            assert!(bad.parse::<ResetTo>().is_err(), "{bad:?}");
        }
    }
}
