//! The DynamoDB state store: schema and the thin I/O layer around it.
//!
//! Every function here is one DynamoDB request (or one paginated Query). Decisions live in
//! [`crate::membership`], [`crate::assignment`] and [`crate::handoff`]; this module only
//! writes what they decided, with the conditions that make those decisions safe under
//! concurrency. See `docs/state-store.md` for the schema and every condition.

pub mod error;
pub mod schema;
pub mod shard_cache;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnConsumedCapacity, ReturnValue, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
    TimeToLiveStatus,
};
use futures::{StreamExt, TryStreamExt};

pub use error::StoreError;

use crate::position::Position;
use error::{Ctx, classify};
use schema::{
    CHECKPOINT_SUB_SEQUENCE, CLIENT_PREFIX, ClientRow, ClientStreamsRow, GroupSnapshot,
    LEASE_PREFIX, LeaseRow, MAX_LAST_ERROR_CHARS, PK, RESET_TO, ResetTo, SHARD_START, SK,
    ShardCacheRow, TTL_ATTRIBUTE, client_sk, client_streams_sk, lease_sk, shards_sk,
    streams_digest, truncate,
};
use shard_cache::{ShardCacheHead, ShardCachePart};

/// Wall-clock now in Unix milliseconds. Only ever written as information, never compared
/// across clients.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// How long a client row outlives its last heartbeat before DynamoDB's TTL may delete it.
/// Cleanup of crashed incarnations only; the leader prunes dead clients long before that.
const CLIENT_ROW_TTL: Duration = Duration::from_secs(24 * 3600);

/// Reads of a group before a shard cache still incomplete (rewritten during each read) is
/// left out.
const INCOMPLETE_CACHE_READS: u32 = 3;

/// Shard-cache part rows written or deleted at once.
const PART_WRITES_IN_FLIGHT: usize = 8;

/// What one Query of a group decoded, before the shard caches are joined.
#[derive(Default)]
struct Rows {
    snap: GroupSnapshot,
    heads: Vec<ShardCacheHead>,
    parts: Vec<ShardCachePart>,
}

/// What a checkpoint write records about a shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointUpdate {
    /// Last acknowledged position; `None` leaves the stored checkpoint untouched.
    pub position: Option<Position>,
    /// The shard was read to its end and everything acknowledged.
    pub ended: bool,
    /// MillisBehindLatest of the last GetRecords.
    pub millis_behind: Option<i64>,
    /// When that GetRecords returned, Unix ms.
    pub lag_at_ms: Option<i64>,
}

/// Lease attribute (Unix ms) set by the very first claim of a shard and never changed. Not
/// part of [`LeaseRow`]: only the engine needs it, to start a shard that has no checkpoint
/// after a handoff where the previous owner left it (see [`crate::handoff::no_checkpoint_start`]).
pub const FIRST_CLAIMED_AT: &str = "firstClaimedAtMs";

/// What a claim records besides its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimStamp<'a> {
    /// The shard's starting sequence number from the shard cache: a row stamped for another
    /// shard of the id (a deleted stream's) is not claimed, an unstamped one is stamped (see
    /// [`crate::incarnation`]).
    pub shard_start: Option<&'a str>,
    /// Recorded as [`FIRST_CLAIMED_AT`] when this is the shard's first claim: now on
    /// Kinesis' clock (Unix ms), since a later owner compares it with arrival timestamps.
    pub first_claim_at_ms: i64,
}

impl ClaimStamp<'_> {
    /// No starting sequence number; our wall clock as the first-claim time.
    pub fn now() -> Self {
        Self {
            shard_start: None,
            first_claim_at_ms: now_ms(),
        }
    }
}

/// Client attribute: the UID of the pod the client runs in, when it runs in one (see
/// [`StateStore::register_in_pod`]). Not part of [`ClientRow`]: only `register` reads it.
pub const POD_UID: &str = "podUid";

/// A claim's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    /// The lease row as written; its checkpoint is where reading resumes.
    pub row: LeaseRow,
    /// This claim was the shard's first ever in this group.
    pub first_claim: bool,
    /// When the first claim happened (Unix ms; Kinesis' clock as the first claimer saw it,
    /// or, from older workers, the first claimer's own clock).
    pub first_claimed_at_ms: Option<i64>,
    /// Where a `checkpoints reset` says the shard restarts while it has no checkpoint.
    pub reset_to: Option<ResetTo>,
}

/// What a `checkpoints reset` saw of a lease row, and requires unchanged when it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetSeen {
    /// No row: the shard is in the shard cache but was never claimed.
    Missing,
    /// The row with this owner (`None`: unowned) and lease counter.
    Row {
        /// The owner seen (a stopped client's id, or none).
        owner: Option<String>,
        /// The counter seen.
        counter: u64,
    },
}

/// What a heartbeat records about the client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatUpdate {
    /// Leases held right now.
    pub owned_shards: u32,
    /// The client's lease-change counter (see [`ClientRow::lease_changes`]).
    pub lease_changes: u64,
    /// The client's shard-change counter (see [`ClientRow::shard_changes`]).
    pub shard_changes: u64,
    /// Current problem: (reason, message). `None` clears it.
    pub last_error: Option<(String, String)>,
}

/// How a read sees the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Every write the table acknowledged before the read (1 read unit per 4 KB).
    Strong,
    /// Possibly a moment behind (usually well under a second): half the read units. Fine
    /// where a decision is confirmed by a strong read or guarded by a conditional write.
    Eventual,
}

/// Which rows of a group's partition a Query reads, by sort key.
#[derive(Clone, Copy, Debug)]
enum SortKeys<'a> {
    /// Every row.
    All,
    /// Sort keys beginning with this prefix.
    Prefix(&'a str),
    /// Sort keys from this one on.
    From(&'a str),
    /// Sort keys from the first to the second, both included.
    Between(&'a str, &'a str),
}

/// The state store of one table. Cheap to clone; clones share the read-unit count.
#[derive(Clone, Debug)]
pub struct StateStore {
    client: Client,
    table: String,
    /// Read units the table reported for this store's Queries, in hundredths (DynamoDB
    /// reports halves for eventually consistent reads).
    read_units: Arc<AtomicU64>,
    /// Bound on each page of a paginated Query (see [`StateStore::with_page_timeout`]).
    page_timeout: Option<Duration>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl StateStore {
    /// A store over `table`, using `client` (its region and credentials are the worker's own).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            read_units: Arc::default(),
            page_timeout: None,
        }
    }

    /// Bounds each page of a paginated Query by `limit`, so a caller can bound a read of
    /// many pages by its pages, not by one request: at 5,000 shards, a whole read is two
    /// 1 MB pages, and under one request's bound it failed tick after tick on a slow store
    /// while its worker, alive by its heartbeats, held leases it could not plan.
    pub fn with_page_timeout(mut self, limit: Duration) -> Self {
        self.page_timeout = Some(limit);
        self
    }

    /// Read units the table reported as consumed by this store's Queries so far (its
    /// `ConsumedCapacity`): what the coordination's reads cost.
    pub fn read_units(&self) -> f64 {
        self.read_units.load(Ordering::Relaxed) as f64 / 100.0
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn ctx<'a>(
        &'a self,
        op: &'static str,
        group: &'a str,
        key: &'a str,
        what: &'static str,
    ) -> Ctx<'a> {
        Ctx {
            table: &self.table,
            op,
            group,
            key,
            what,
        }
    }

    fn key(group: &str, sk: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_owned(), s(group)), (SK.to_owned(), s(sk))])
    }

    // ---------------------------------------------------------------- table

    /// Creates the table (pk S HASH, sk S RANGE, on-demand billing), waits until it is
    /// ACTIVE and turns on TTL on `expiresAt`. Idempotent: an existing table is fine.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let key = |name: &str, kt: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kt)
                .build()
        };
        let build_err = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Other {
            table: self.table.clone(),
            op: "CreateTable",
            message: e.to_string(),
        };
        let res = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attr(PK).map_err(build_err)?)
            .attribute_definitions(attr(SK).map_err(build_err)?)
            .key_schema(key(PK, KeyType::Hash).map_err(build_err)?)
            .key_schema(key(SK, KeyType::Range).map_err(build_err)?)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        if let Err(e) = res {
            let already = e
                .as_service_error()
                .is_some_and(|se| se.is_resource_in_use_exception());
            if !already {
                return Err(classify(e, self.ctx("CreateTable", "", "", "")));
            }
        }
        self.wait_active().await?;
        self.enable_ttl().await
    }

    async fn wait_active(&self) -> Result<(), StoreError> {
        // Real DynamoDB takes seconds; bound the wait so a stuck CREATING table surfaces.
        for _ in 0..120 {
            if self.table_status().await? == Some(TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(StoreError::Unavailable {
            table: self.table.clone(),
            op: "DescribeTable",
            message: "table did not become ACTIVE within 60s".into(),
        })
    }

    async fn enable_ttl(&self) -> Result<(), StoreError> {
        let current = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("DescribeTimeToLive", "", "", "")))?;
        let status = current
            .time_to_live_description()
            .and_then(|d| d.time_to_live_status().cloned());
        if matches!(
            status,
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        ) {
            return Ok(());
        }
        let spec = TimeToLiveSpecification::builder()
            .attribute_name(TTL_ATTRIBUTE)
            .enabled(true)
            .build()
            .map_err(|e| StoreError::Other {
                table: self.table.clone(),
                op: "UpdateTimeToLive",
                message: e.to_string(),
            })?;
        self.client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(spec)
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("UpdateTimeToLive", "", "", "")))?;
        Ok(())
    }

    /// The table's status, `None` when it does not exist.
    async fn table_status(&self) -> Result<Option<TableStatus>, StoreError> {
        match self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(out) => Ok(out.table().and_then(|t| t.table_status().cloned())),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify(e, self.ctx("DescribeTable", "", "", ""))),
        }
    }

    /// Checks the table exists; creates it when missing and `create` is set. A missing table
    /// without `create` is [`StoreError::TableMissing`], whose message names the table and
    /// the `stateStore.create` option.
    pub async fn ensure_table(&self, create: bool) -> Result<(), StoreError> {
        match self.table_status().await? {
            Some(TableStatus::Active) => Ok(()),
            Some(_) => self.wait_active().await,
            None if create => self.create_table().await,
            None => Err(StoreError::TableMissing {
                table: self.table.clone(),
            }),
        }
    }

    // ---------------------------------------------------------------- reads

    /// Every row of `group`: one consistent, paginated Query on the partition key. The
    /// operator builds the CR status from this, so its shape is part of the contract.
    pub async fn load_group(&self, group: &str) -> Result<GroupSnapshot, StoreError> {
        self.query_group(group, SortKeys::All, Consistency::Strong)
            .await
    }

    /// The client rows of `group` only (`sk` begins with `client#`): what a member reads at
    /// every heartbeat. Consistent, paginated.
    pub async fn load_clients(&self, group: &str) -> Result<Vec<ClientRow>, StoreError> {
        self.load_clients_read(group, Consistency::Strong).await
    }

    /// [`StateStore::load_clients`] with the given consistency: a member reads eventually
    /// consistent at every tick (half the read units) and strongly only before it judges a
    /// client dead (see docs/state-store.md, "Reads").
    pub async fn load_clients_read(
        &self,
        group: &str,
        consistency: Consistency,
    ) -> Result<Vec<ClientRow>, StoreError> {
        Ok(self
            .query_group(group, SortKeys::Prefix(CLIENT_PREFIX), consistency)
            .await?
            .clients)
    }

    /// The lease and shard-cache rows of `group` (every `sk` from `lease#` on, which skips
    /// the client rows): what a member re-reads when the group changed. Consistent,
    /// paginated; `clients` of the result is empty.
    pub async fn load_leases(&self, group: &str) -> Result<GroupSnapshot, StoreError> {
        self.query_group(group, SortKeys::From(LEASE_PREFIX), Consistency::Strong)
            .await
    }

    /// The lease rows of `group` whose sort keys lie from `first` to `last` (both
    /// [`lease_sk`]s, included): what a member re-reads when only ownership moved, the rows
    /// of its own range (see docs/state-store.md, "Reads"). Consistent, paginated; billed by
    /// the size of these rows alone.
    pub async fn load_lease_range(
        &self,
        group: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<LeaseRow>, StoreError> {
        Ok(self
            .query_group(group, SortKeys::Between(first, last), Consistency::Strong)
            .await?
            .leases)
    }

    /// The shard caches of `streams` in `group` (those that have one): the head row and the
    /// parts of each, two small Queries a stream. What a member reads while a stream it
    /// reads has no cache in its snapshot, instead of every lease row. Consistent.
    pub async fn load_shard_caches(
        &self,
        group: &str,
        streams: &[String],
    ) -> Result<Vec<ShardCacheRow>, StoreError> {
        let heads: Vec<String> = streams.iter().map(|s| shards_sk(s)).collect();
        let parts: Vec<String> = streams
            .iter()
            .map(|s| shard_cache::parts_prefix(s))
            .collect();
        let keys: Vec<SortKeys<'_>> = heads
            .iter()
            .map(|h| SortKeys::Between(h, h))
            .chain(parts.iter().map(|p| SortKeys::Prefix(p)))
            .collect();
        Ok(self
            .query_keys(group, &keys, Consistency::Strong)
            .await?
            .shard_caches)
    }

    /// One paginated Query of a group, narrowed to the rows `keys` selects.
    async fn query_group(
        &self,
        group: &str,
        keys: SortKeys<'_>,
        consistency: Consistency,
    ) -> Result<GroupSnapshot, StoreError> {
        self.query_keys(group, &[keys], consistency).await
    }

    /// The rows of a group that any of `keys` selects (one paginated Query each, in turn),
    /// with split shard caches joined.
    async fn query_keys(
        &self,
        group: &str,
        keys: &[SortKeys<'_>],
        consistency: Consistency,
    ) -> Result<GroupSnapshot, StoreError> {
        let mut attempt = 1;
        let mut snap = loop {
            let mut rows = Rows::default();
            for k in keys {
                self.for_each_row(group, *k, consistency, |item| {
                    self.decode_into(group, item, &mut rows)
                })
                .await?;
            }
            let joined = shard_cache::join(rows.heads, rows.parts);
            // A split cache rewritten while this Query ran: read again, the rewrite is a
            // few requests long. Past the attempts, the stream is left out (as without a
            // cache), and the leader writes it again.
            if !joined.incomplete.is_empty() && attempt < INCOMPLETE_CACHE_READS {
                attempt += 1;
                continue;
            }
            if !joined.incomplete.is_empty() {
                tracing::warn!(group, streams = ?joined.incomplete, "shard cache parts missing; stream left out of this read");
            }
            rows.snap.shard_caches = joined.caches;
            break rows.snap;
        };
        snap.clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        snap.leases
            .sort_by(|a, b| (&a.stream, &a.shard_id).cmp(&(&b.stream, &b.shard_id)));
        Ok(snap)
    }

    /// The rows of `group` that `keys` selects, one paginated Query, handed to `f` in key
    /// order.
    async fn for_each_row(
        &self,
        group: &str,
        keys: SortKeys<'_>,
        consistency: Consistency,
        mut f: impl FnMut(&HashMap<String, AttributeValue>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(group))
                .consistent_read(consistency == Consistency::Strong)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            let (cond, from, to) = match keys {
                SortKeys::All => ("", None, None),
                SortKeys::Prefix(p) => (" AND begins_with(#sk, :from)", Some(p), None),
                SortKeys::From(f) => (" AND #sk >= :from", Some(f), None),
                SortKeys::Between(f, t) => (" AND #sk BETWEEN :from AND :to", Some(f), Some(t)),
            };
            req = req.key_condition_expression(format!("#pk = :pk{cond}"));
            if let Some(from) = from {
                req = req
                    .expression_attribute_names("#sk", SK)
                    .expression_attribute_values(":from", s(from));
            }
            if let Some(to) = to {
                req = req.expression_attribute_values(":to", s(to));
            }
            let sent = req.send();
            let answered = match self.page_timeout {
                None => sent.await,
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| {
                    StoreError::Unavailable {
                        table: self.table.clone(),
                        op: "Query",
                        message: format!("no page within {limit:?}"),
                    }
                })?,
            };
            let out = answered.map_err(|e| classify(e, self.ctx("Query", group, "", "")))?;
            if let Some(units) = out.consumed_capacity().and_then(|c| c.capacity_units()) {
                // Hundredths: the smallest step DynamoDB reports is half a unit.
                self.read_units
                    .fetch_add((units * 100.0).round() as u64, Ordering::Relaxed);
            }
            for item in out.items() {
                f(item)?;
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(()),
            }
        }
    }

    fn decode_into(
        &self,
        group: &str,
        item: &HashMap<String, AttributeValue>,
        rows: &mut Rows,
    ) -> Result<(), StoreError> {
        let sk = match item.get(SK) {
            Some(AttributeValue::S(sk)) => sk.as_str(),
            _ => return Ok(()),
        };
        if sk.starts_with(CLIENT_PREFIX) {
            rows.snap
                .clients
                .push(self.decode(group, sk, item.clone())?);
        } else if shard_cache::is_head(sk) {
            rows.heads.push(self.decode(group, sk, item.clone())?);
        } else if shard_cache::is_part(sk) {
            rows.parts.push(self.decode(group, sk, item.clone())?);
        } else if sk.starts_with(LEASE_PREFIX) {
            rows.snap.leases.push(self.decode(group, sk, item.clone())?);
        }
        // Unknown row kinds are skipped so newer workers can add kinds without breaking
        // older readers (the operator, a rolling deploy).
        Ok(())
    }

    /// One row of `group` under sort key `key`, decoded.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        group: &str,
        key: &str,
        item: HashMap<String, AttributeValue>,
    ) -> Result<T, StoreError> {
        serde_dynamo::from_item(item).map_err(|e| StoreError::Decode {
            table: self.table.clone(),
            group: group.to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
        })
    }

    fn encode<T: serde::Serialize>(
        &self,
        group: &str,
        key: &str,
        row: &T,
    ) -> Result<HashMap<String, AttributeValue>, StoreError> {
        serde_dynamo::to_item(row).map_err(|e| StoreError::Decode {
            table: self.table.clone(),
            group: group.to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
        })
    }

    // ---------------------------------------------------------------- clients

    /// Registers an incarnation that started at `started_at_ms`. Conditional on the row not
    /// existing, or being this incarnation's own (same `startedAtMs`): a register whose
    /// answer was lost but whose write landed succeeds when retried, instead of meeting its
    /// own row. Any other row under the id is an id clash (a `Conflict`). `streams`: the
    /// streams the client reads, in config order.
    pub async fn register(
        &self,
        group: &str,
        client_id: &str,
        pod: &str,
        started_at_ms: i64,
        streams: &[String],
    ) -> Result<ClientRow, StoreError> {
        self.register_in_pod(group, client_id, pod, started_at_ms, streams, None)
            .await
    }

    /// [`register`](Self::register) for a process that runs in the pod with UID `pod_uid`
    /// (recorded as [`POD_UID`]). It may also replace a row of the same pod UID: an earlier
    /// incarnation of the same container, which the kubelet started only after it exited.
    /// The new row's heartbeat starts again at 1, which observers see as a moved counter.
    pub async fn register_in_pod(
        &self,
        group: &str,
        client_id: &str,
        pod: &str,
        started_at_ms: i64,
        streams: &[String],
        pod_uid: Option<&str>,
    ) -> Result<ClientRow, StoreError> {
        let now = now_ms();
        let digest = streams_digest(streams);
        let row = ClientRow {
            pk: group.to_owned(),
            sk: client_sk(client_id),
            client_id: client_id.to_owned(),
            pod: pod.to_owned(),
            heartbeat: 1,
            heartbeat_at_ms: now,
            started_at_ms,
            owned_shards: 0,
            lease_changes: 0,
            shard_changes: Some(0),
            last_error: None,
            last_error_reason: None,
            expires_at: now / 1000 + CLIENT_ROW_TTL.as_secs() as i64,
            streams: None,
            streams_digest: Some(digest.clone()),
        };
        // The list first, then the row naming its digest: whoever sees the row finds it.
        let list = ClientStreamsRow {
            pk: group.to_owned(),
            sk: client_streams_sk(client_id),
            client_id: client_id.to_owned(),
            streams: streams.to_vec(),
            streams_digest: digest,
        };
        self.put_row("register", group, &list.sk, &list).await?;
        let mut item = self.encode(group, &row.sk, &row)?;
        let ctx = self.ctx(
            "register",
            group,
            &row.sk,
            "client id already registered by another incarnation",
        );
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#started", "startedAtMs")
            .expression_attribute_values(":started", AttributeValue::N(started_at_ms.to_string()));
        req = match pod_uid {
            Some(uid) => {
                item.insert(POD_UID.to_owned(), s(uid));
                req.condition_expression(
                    "attribute_not_exists(#pk) OR #started = :started OR #uid = :uid",
                )
                .expression_attribute_names("#uid", POD_UID)
                .expression_attribute_values(":uid", s(uid))
            }
            None => req.condition_expression("attribute_not_exists(#pk) OR #started = :started"),
        };
        req.set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify(e, ctx))?;
        Ok(row)
    }

    /// PutItem of a row that must not exist yet; `Conflict` when it does.
    async fn put_new(
        &self,
        item: HashMap<String, AttributeValue>,
        ctx: Ctx<'_>,
    ) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await
            .map_err(|e| classify(e, ctx))?;
        Ok(())
    }

    /// Heartbeats: increments the counter observers watch, and records owned shards and the
    /// current error. Conditional on the row existing: `Conflict` means the leader pruned us
    /// (it saw us dead) and the caller must re-register. Returns the new counter.
    pub async fn heartbeat(
        &self,
        group: &str,
        client_id: &str,
        update: &HeartbeatUpdate,
    ) -> Result<u64, StoreError> {
        let sk = client_sk(client_id);
        let now = now_ms();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#hb", "heartbeat")
            .expression_attribute_names("#hbat", "heartbeatAtMs")
            .expression_attribute_names("#owned", "ownedShards")
            .expression_attribute_names("#changes", "leaseChanges")
            .expression_attribute_names("#shards", "shardChanges")
            .expression_attribute_names("#exp", TTL_ATTRIBUTE)
            .expression_attribute_names("#err", "lastError")
            .expression_attribute_names("#reason", "lastErrorReason")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":owned", n(update.owned_shards))
            .expression_attribute_values(":changes", n(update.lease_changes))
            .expression_attribute_values(":shards", n(update.shard_changes))
            .expression_attribute_values(":exp", n(now / 1000 + CLIENT_ROW_TTL.as_secs() as i64))
            .return_values(ReturnValue::UpdatedNew);
        let set = "SET #hb = #hb + :one, #hbat = :now, #owned = :owned, #changes = :changes, \
                   #shards = :shards, #exp = :exp";
        req = match &update.last_error {
            Some((reason, message)) => req
                .update_expression(format!("{set}, #err = :err, #reason = :reason"))
                .expression_attribute_values(
                    ":err",
                    s(truncate(message, MAX_LAST_ERROR_CHARS).as_str()),
                )
                .expression_attribute_values(":reason", s(reason.as_str())),
            None => req.update_expression(format!("{set} REMOVE #err, #reason")),
        };
        let out = req.send().await.map_err(|e| {
            classify(
                e,
                self.ctx("heartbeat", group, &sk, "client row is gone (pruned)"),
            )
        })?;
        Ok(read_n(out.attributes(), "heartbeat"))
    }

    /// Removes our own client row and stream list (graceful shutdown).
    pub async fn deregister(&self, group: &str, client_id: &str) -> Result<(), StoreError> {
        self.delete_row("deregister", group, &client_sk(client_id))
            .await?;
        self.delete_row("deregister", group, &client_streams_sk(client_id))
            .await
    }

    /// An unconditional DeleteItem of one row; `op` names it in errors.
    async fn delete_row(&self, op: &'static str, group: &str, sk: &str) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, sk)))
            .send()
            .await
            .map_err(|e| classify(e, self.ctx(op, group, sk, "")))?;
        Ok(())
    }

    /// The stream list a client registered with ([`ClientStreamsRow`]), if it has one.
    /// Consistent.
    pub async fn load_client_streams(
        &self,
        group: &str,
        client_id: &str,
    ) -> Result<Option<ClientStreamsRow>, StoreError> {
        let sk = client_streams_sk(client_id);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("load_client_streams", group, &sk, "")))?;
        out.item
            .map(|item| self.decode(group, &sk, item))
            .transpose()
    }

    /// The leader deletes a dead client's row, conditional on its heartbeat counter still
    /// being the value it watched stand still: a client that came back is not pruned.
    pub async fn prune_client(
        &self,
        group: &str,
        client_id: &str,
        observed_heartbeat: u64,
    ) -> Result<(), StoreError> {
        let sk = client_sk(client_id);
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .condition_expression("#hb = :hb")
            .expression_attribute_names("#hb", "heartbeat")
            .expression_attribute_values(":hb", n(observed_heartbeat))
            .send()
            .await
            .map_err(|e| {
                classify(
                    e,
                    self.ctx("prune", group, &sk, "heartbeat moved (client alive)"),
                )
            })?;
        // Its stream list goes with it. A failure leaves a small row no one reads (lists
        // are read by client id, and a new incarnation writes its own): not worth failing
        // the prune that happened.
        let list = client_streams_sk(client_id);
        if let Err(e) = self.delete_row("prune", group, &list).await {
            tracing::debug!(group, client = client_id, error = %e, "stream list of a pruned client not deleted");
        }
        Ok(())
    }

    // ---------------------------------------------------------------- shard cache

    /// Writes a stream's shard cache: one row, or, past [`shard_cache::SHARDS_PER_PART`]
    /// shards, its parts then its head; then deletes the parts of earlier writes. Only the
    /// leader writes it; a brief second leader writes the same ListShards answer, so it is
    /// unconditional.
    pub async fn put_shard_cache(&self, row: &ShardCacheRow) -> Result<(), StoreError> {
        let (head, parts) = shard_cache::split(row, shard_cache::SHARDS_PER_PART);
        // Parts first, then the head naming them: a reader that sees the head finds its
        // parts (see `shard_cache`).
        // Collected first: a lazy iterator of borrowing futures is not `Send` for spawn.
        let writes: Vec<_> = parts
            .iter()
            .map(|p| self.put_cache_row(&p.pk, &p.sk, p))
            .collect();
        futures::stream::iter(writes)
            .buffer_unordered(PART_WRITES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        self.put_cache_row(&head.pk, &head.sk, &head).await?;
        self.delete_stale_parts(&head).await
    }

    /// Deletes the part rows of `head`'s stream that it does not name (an earlier write's).
    async fn delete_stale_parts(&self, head: &ShardCacheHead) -> Result<(), StoreError> {
        let prefix = shard_cache::parts_prefix(&head.stream);
        let mut existing = Vec::new();
        self.for_each_row(
            &head.pk,
            SortKeys::Prefix(&prefix),
            Consistency::Strong,
            |item| {
                if let Some(AttributeValue::S(sk)) = item.get(SK) {
                    existing.push(sk.clone());
                }
                Ok(())
            },
        )
        .await?;
        let stale = shard_cache::stale_parts(&existing, &head.stream, head.generation.as_deref());
        let deletes: Vec<_> = stale
            .iter()
            .map(|sk| self.delete_row("delete_shard_cache_part", &head.pk, sk))
            .collect();
        futures::stream::iter(deletes)
            .buffer_unordered(PART_WRITES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// An unconditional PutItem of one shard-cache row (whole, head or part).
    async fn put_cache_row<T: serde::Serialize>(
        &self,
        group: &str,
        sk: &str,
        row: &T,
    ) -> Result<(), StoreError> {
        self.put_row("put_shard_cache", group, sk, row).await
    }

    /// An unconditional PutItem of one row; `op` names it in errors.
    async fn put_row<T: serde::Serialize>(
        &self,
        op: &'static str,
        group: &str,
        sk: &str,
        row: &T,
    ) -> Result<(), StoreError> {
        let item = self.encode(group, sk, row)?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify(e, self.ctx(op, group, sk, "")))?;
        Ok(())
    }

    // ---------------------------------------------------------------- leases

    /// Creates an unowned lease row unless one exists. Returns whether it created it.
    pub async fn create_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
    ) -> Result<bool, StoreError> {
        self.create_lease_at(group, stream, shard_id, None).await
    }

    /// [`create_lease`](Self::create_lease) for the shard whose starting sequence number is
    /// `start` (recorded as `shardStart`, see [`crate::incarnation`]).
    pub async fn create_lease_at(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        start: Option<&str>,
    ) -> Result<bool, StoreError> {
        let row = LeaseRow {
            shard_start: start.map(str::to_owned),
            ..LeaseRow::unowned(group, stream, shard_id, now_ms())
        };
        let item = self.encode(group, &row.sk, &row)?;
        match self
            .put_new(
                item,
                self.ctx("create_lease", group, &row.sk, "lease exists"),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Claims a lease. `observed` is what the caller planned from: `None` (no owner, or no
    /// row yet: the row is created) or `Some((owner, counter))` of an expired lease, which is
    /// taken only if neither moved since. Never claims an ended shard. Returns the row as
    /// written, whose checkpoint is where reading must resume.
    pub async fn claim_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
        observed: Option<(&str, u64)>,
    ) -> Result<LeaseRow, StoreError> {
        self.claim_lease_detailed(group, stream, shard_id, me, observed, ClaimStamp::now())
            .await
            .map(|c| c.row)
    }

    /// [`claim_lease`](Self::claim_lease), also telling whether this was the shard's very
    /// first claim and when that first claim happened (see [`Claimed`]), with what `stamp`
    /// says.
    pub async fn claim_lease_detailed(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
        observed: Option<(&str, u64)>,
        stamp: ClaimStamp<'_>,
    ) -> Result<Claimed, StoreError> {
        let start = stamp.shard_start;
        let first = stamp.first_claim_at_ms;
        let sk = lease_sk(stream, shard_id);
        let now = now_ms();
        let not_ended = "(attribute_not_exists(#ended) OR #ended = :false)";
        // With the shard's starting sequence number: only a row of this shard (or one not
        // stamped yet, which is stamped now).
        let (stamp_set, stamp_cond) = match start {
            Some(_) => (
                ", #start = :start",
                " AND (attribute_not_exists(#start) OR #start = :start)",
            ),
            None => ("", ""),
        };
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .update_expression(format!(
                "SET #owner = :me, #ctr = if_not_exists(#ctr, :zero) + :one, #upd = :now, \
                 #stream = :stream, #shard = :shard, #ended = if_not_exists(#ended, :false), \
                 #first = if_not_exists(#first, :first){stamp_set}"
            ))
            .expression_attribute_names("#first", FIRST_CLAIMED_AT)
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#ctr", "leaseCounter")
            .expression_attribute_names("#upd", "updatedAtMs")
            .expression_attribute_names("#stream", "stream")
            .expression_attribute_names("#shard", "shardId")
            .expression_attribute_names("#ended", "ended")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":first", n(first))
            .expression_attribute_values(":stream", s(stream))
            .expression_attribute_values(":shard", s(shard_id))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .return_values(ReturnValue::AllNew);
        if let Some(start) = start {
            req = req
                .expression_attribute_names("#start", SHARD_START)
                .expression_attribute_values(":start", s(start));
        }
        let what;
        req = match observed {
            None => {
                what = "lease is owned (or of another shard with this id)";
                req.condition_expression(format!(
                    "attribute_not_exists(#owner) AND {not_ended}{stamp_cond}"
                ))
            }
            Some((owner, counter)) => {
                what = "lease owner or counter moved (owner alive)";
                req.condition_expression(format!(
                    "#owner = :old AND #ctr = :seen AND {not_ended}{stamp_cond}"
                ))
                .expression_attribute_values(":old", s(owner))
                .expression_attribute_values(":seen", n(counter))
            }
        };
        let out = req
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("claim", group, &sk, what)))?;
        let attrs = out.attributes().cloned().unwrap_or_default();
        let first_claimed_at_ms = read_i(Some(&attrs), FIRST_CLAIMED_AT);
        let reset_to = read_reset(&attrs);
        let row = self.decode_lease(group, sk, attrs)?;
        Ok(Claimed {
            row,
            first_claim: first_claimed_at_ms == Some(first),
            first_claimed_at_ms,
            reset_to,
        })
    }

    /// Takes up a lease we still own (counter + 1) and returns its whole row: used to resume
    /// reading a shard we own but do not read, from the checkpoint it holds.
    pub async fn resume_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
    ) -> Result<Claimed, StoreError> {
        let sk = lease_sk(stream, shard_id);
        // A new ownership epoch: a checkpoint or release of an earlier reader of ours (same
        // client, before a restart of the reader) can no longer land.
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .update_expression("SET #ctr = #ctr + :one, #upd = :now")
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#ctr", "leaseCounter")
            .expression_attribute_names("#upd", "updatedAtMs")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now_ms()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("resume", group, &sk, "not the lease owner")))?;
        let attrs = out.attributes().cloned().unwrap_or_default();
        let first_claimed_at_ms = read_i(Some(&attrs), FIRST_CLAIMED_AT);
        let reset_to = read_reset(&attrs);
        Ok(Claimed {
            row: self.decode_lease(group, sk, attrs)?,
            first_claim: false,
            first_claimed_at_ms,
            reset_to,
        })
    }

    fn decode_lease(
        &self,
        group: &str,
        sk: String,
        attrs: HashMap<String, AttributeValue>,
    ) -> Result<LeaseRow, StoreError> {
        self.decode(group, &sk, attrs)
    }

    /// Writes a checkpoint (and lag) of a lease we own, conditional on `owner` = `me` and on
    /// the counter we hold (`held`, from our claim or resume). `Conflict` means we lost the
    /// lease, or this write arrived after a newer ownership: the new owner's checkpoint is
    /// never overwritten and a late write cannot move it back. The counter is left alone.
    pub async fn checkpoint(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
        held: u64,
        cp: &CheckpointUpdate,
    ) -> Result<(), StoreError> {
        self.write_lease(group, stream, shard_id, me, held, cp, false)
            .await
            .map(|_| ())
    }

    /// Releases a lease we own, writing the final checkpoint in the same UpdateItem
    /// (conditional like [`checkpoint`](Self::checkpoint)), so the next owner starts
    /// exactly after what we acknowledged. Moves the counter. Returns the new counter.
    pub async fn release_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
        held: u64,
        cp: &CheckpointUpdate,
    ) -> Result<u64, StoreError> {
        self.write_lease(group, stream, shard_id, me, held, cp, true)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        me: &str,
        held: u64,
        cp: &CheckpointUpdate,
        release: bool,
    ) -> Result<u64, StoreError> {
        let sk = lease_sk(stream, shard_id);
        let mut set = vec!["#upd = :now"];
        if release {
            set.push("#ctr = #ctr + :one");
        }
        let mut remove = Vec::new();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .condition_expression("#owner = :me AND #ctr = :held")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#ctr", "leaseCounter")
            .expression_attribute_names("#upd", "updatedAtMs")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":held", n(held))
            .expression_attribute_values(":now", n(now_ms()))
            .return_values(ReturnValue::UpdatedNew);
        if release {
            req = req.expression_attribute_values(":one", n(1));
        }
        if let Some(pos) = &cp.position {
            set.push("#cp = :cp");
            req = req
                .expression_attribute_names("#cp", "checkpoint")
                .expression_attribute_values(":cp", s(pos.sequence.as_str()));
            // The sub-sequence is its own attribute, so rows without it (older workers,
            // whole records) keep their meaning; a whole-record checkpoint removes it.
            req = req.expression_attribute_names("#cpsub", CHECKPOINT_SUB_SEQUENCE);
            match pos.sub_sequence {
                Some(sub) => {
                    set.push("#cpsub = :cpsub");
                    req = req.expression_attribute_values(":cpsub", n(sub));
                }
                None => remove.push("#cpsub"),
            }
        }
        if cp.ended {
            // Only ever set, never cleared: an ended shard stays ended.
            set.push("#ended = :true");
            req = req
                .expression_attribute_names("#ended", "ended")
                .expression_attribute_values(":true", AttributeValue::Bool(true));
        }
        if let Some(mb) = cp.millis_behind {
            set.push("#mb = :mb");
            req = req
                .expression_attribute_names("#mb", "millisBehind")
                .expression_attribute_values(":mb", n(mb));
        }
        if let Some(at) = cp.lag_at_ms {
            set.push("#lagat = :lagat");
            req = req
                .expression_attribute_names("#lagat", "lagAtMs")
                .expression_attribute_values(":lagat", n(at));
        }
        if release {
            remove.push("#owner");
        }
        let mut expr = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expr.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        let op = if release { "release" } else { "checkpoint" };
        let out = req.update_expression(expr).send().await.map_err(|e| {
            classify(
                e,
                self.ctx(op, group, &sk, "not the lease owner or counter moved"),
            )
        })?;
        Ok(read_n(out.attributes(), "leaseCounter"))
    }

    /// Resets a shard for `kcg-operator checkpoints reset`: removes the checkpoint, the owner
    /// (a stopped client's) and the lag, clears `ended` (so parents are read again before
    /// their children) and records where the next reader starts ([`RESET_TO`]). Conditional
    /// on the row being as `seen` (owner and counter unchanged, or still missing), so a
    /// worker that came back meanwhile is never overwritten: `Conflict` then. `start`: the
    /// listed shard's starting sequence number, recorded as the row's `shardStart`.
    pub async fn reset_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        seen: &ResetSeen,
        to: ResetTo,
        start: Option<&str>,
    ) -> Result<(), StoreError> {
        let sk = lease_sk(stream, shard_id);
        let ctx = self.ctx("reset", group, &sk, "the lease changed since it was read");
        let (owner, counter) = match seen {
            ResetSeen::Missing => {
                let row = LeaseRow {
                    shard_start: start.map(str::to_owned),
                    ..LeaseRow::unowned(group, stream, shard_id, now_ms())
                };
                let mut item = self.encode(group, &row.sk, &row)?;
                item.insert(RESET_TO.to_owned(), s(to.to_string()));
                return self.put_new(item, ctx).await;
            }
            ResetSeen::Row { owner, counter } => (owner, counter),
        };
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            // Stamped for the shard now listed: a reset row of a deleted stream's shard
            // becomes the current shard's row (see `crate::incarnation`).
            .update_expression(format!(
                "SET #reset = :reset, #ended = :false, #ctr = #ctr + :one, #upd = :now{} \
                 REMOVE #owner, #cp, #cpsub, #mb, #lagat",
                if start.is_some() {
                    ", #start = :start"
                } else {
                    ""
                }
            ))
            .expression_attribute_names("#reset", RESET_TO)
            .expression_attribute_names("#cpsub", CHECKPOINT_SUB_SEQUENCE)
            .expression_attribute_names("#ended", "ended")
            .expression_attribute_names("#ctr", "leaseCounter")
            .expression_attribute_names("#upd", "updatedAtMs")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#cp", "checkpoint")
            .expression_attribute_names("#mb", "millisBehind")
            .expression_attribute_names("#lagat", "lagAtMs")
            .expression_attribute_values(":reset", s(to.to_string()))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now_ms()))
            .expression_attribute_values(":seen", n(*counter));
        if let Some(start) = start {
            req = req
                .expression_attribute_names("#start", SHARD_START)
                .expression_attribute_values(":start", s(start));
        }
        req = match owner {
            Some(o) => req
                .condition_expression("#ctr = :seen AND #owner = :old")
                .expression_attribute_values(":old", s(o.as_str())),
            None => req.condition_expression("#ctr = :seen AND attribute_not_exists(#owner)"),
        };
        req.send().await.map_err(|e| classify(e, ctx))?;
        Ok(())
    }

    /// Replaces the lease row of a shard of an older incarnation of the stream (deleted and
    /// recreated under its name, see [`crate::incarnation`]) with a fresh one for the shard
    /// that starts at `start`: no owner, checkpoint, end, lag, first-claim time or reset
    /// point. The counter moves, so nothing its old owner still writes can land.
    /// Conditional on the counter as `seen`; `Conflict` when it moved.
    pub async fn replace_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
        seen: u64,
        start: &str,
    ) -> Result<(), StoreError> {
        let sk = lease_sk(stream, shard_id);
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .update_expression(
                "SET #start = :start, #ended = :false, #ctr = #ctr + :one, #upd = :now \
                 REMOVE #owner, #cp, #cpsub, #mb, #lagat, #first, #reset",
            )
            .condition_expression("#ctr = :seen")
            .expression_attribute_names("#start", SHARD_START)
            .expression_attribute_names("#ended", "ended")
            .expression_attribute_names("#ctr", "leaseCounter")
            .expression_attribute_names("#upd", "updatedAtMs")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#cp", "checkpoint")
            .expression_attribute_names("#cpsub", CHECKPOINT_SUB_SEQUENCE)
            .expression_attribute_names("#mb", "millisBehind")
            .expression_attribute_names("#lagat", "lagAtMs")
            .expression_attribute_names("#first", FIRST_CLAIMED_AT)
            .expression_attribute_names("#reset", RESET_TO)
            .expression_attribute_values(":start", s(start))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now_ms()))
            .expression_attribute_values(":seen", n(seen))
            .send()
            .await
            .map_err(|e| {
                classify(
                    e,
                    self.ctx("replace_lease", group, &sk, "lease counter moved"),
                )
            })?;
        Ok(())
    }

    /// The `resetTo` of each lease row of `group` that has one, by (stream, shard id): the
    /// restart points `checkpoints show` lists for shards not read since a reset.
    pub async fn lease_resets(
        &self,
        group: &str,
    ) -> Result<std::collections::BTreeMap<(String, String), ResetTo>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        let leases = SortKeys::Prefix(LEASE_PREFIX);
        self.for_each_row(group, leases, Consistency::Strong, |item| {
            let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
            let is_lease = text(SK).is_some_and(|sk| sk.starts_with(LEASE_PREFIX));
            if let (true, Some(stream), Some(shard), Some(to)) =
                (is_lease, text("stream"), text("shardId"), read_reset(item))
            {
                out.insert((stream, shard), to);
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Deletes the lease row of a shard that no longer exists in the stream (trimmed after
    /// retention), conditional on nobody owning it. Cleanup only.
    pub async fn delete_lease(
        &self,
        group: &str,
        stream: &str,
        shard_id: &str,
    ) -> Result<(), StoreError> {
        let sk = lease_sk(stream, shard_id);
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(group, &sk)))
            .condition_expression("attribute_not_exists(#owner)")
            .expression_attribute_names("#owner", "owner")
            .send()
            .await
            .map_err(|e| classify(e, self.ctx("delete_lease", group, &sk, "lease is owned")))?;
        Ok(())
    }
}

/// The `resetTo` attribute, if present and readable (a value this version cannot read is
/// ignored: the configured start applies, as for a worker that predates resets).
fn read_reset(attrs: &HashMap<String, AttributeValue>) -> Option<ResetTo> {
    attrs
        .get(RESET_TO)
        .and_then(|v| v.as_s().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a signed number attribute, if present.
fn read_i(attrs: Option<&HashMap<String, AttributeValue>>, name: &str) -> Option<i64> {
    attrs
        .and_then(|a| a.get(name))
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a number attribute from an UpdateItem answer; 0 when absent (never for the
/// attributes we just incremented).
fn read_n(attrs: Option<&HashMap<String, AttributeValue>>, name: &str) -> u64 {
    attrs
        .and_then(|a| a.get(name))
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
