//! The status builder: a PURE function from plain data (the CR's spec, the Deployment's
//! numbers, one snapshot of the state-store table, the set of live clients) to the
//! `KinesisConsumerGroupStatus` the controller publishes and `kcg-operator status` prints.
//!
//! No I/O here: the controller and the CLI gather the inputs, this module decides.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::apps::v1::DeploymentCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kcg_worker::assignment::{self, OwnerRange, ShardKey};
use kcg_worker::store::schema::{GroupSnapshot, LeaseRow, ShardCacheRow};

use crate::conditions::{
    self, BALANCED, DEGRADED, FALSE, PROGRESSING, READY, TRUE, UNKNOWN, Verdict,
};
use crate::crd::{ClientStatus, KinesisConsumerGroupStatus, ShardRange, StreamStatus};

/// Most clients listed in the status; the count fields stay exact.
pub const MAX_CLIENTS: usize = 100;
/// Most ranges listed per stream; with sorted owners a stream has about one range per
/// client, so this only bites when ownership is fragmented.
pub const MAX_RANGES_PER_STREAM: usize = 128;
/// Most streams detailed in the status.
pub const MAX_STREAMS: usize = 32;
/// Serialized status budget: well under the 64 KiB the issue allows, leaving room for the
/// rest of the object.
pub const MAX_STATUS_BYTES: usize = 56 * 1024;
/// Longest client error string kept.
pub const MAX_ERROR_CHARS: usize = 256;
/// Most shard ids named in a condition message.
const MAX_NAMED_SHARDS: usize = 5;

/// What the Deployment reports, reduced to what the status needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentState {
    /// `.status.replicas`: pods that exist.
    pub replicas: i32,
    /// `.status.readyReplicas`.
    pub ready_replicas: i32,
    /// `.status.updatedReplicas`: pods running the current template.
    pub updated_replicas: i32,
    /// `.status.observedGeneration >= .metadata.generation`: the Deployment controller has
    /// seen our latest apply.
    pub observed_current: bool,
    /// Why the workers cannot run, in the API server's own words, when the Deployment says
    /// so; see [`DeploymentState::failure_of`].
    pub failure: Option<Problem>,
}

impl DeploymentState {
    /// Reads the numbers out of a Deployment as the API server returned it.
    pub fn from_deployment(d: &k8s_openapi::api::apps::v1::Deployment) -> Self {
        let s = d.status.clone().unwrap_or_default();
        let observed_current = match (d.metadata.generation, s.observed_generation) {
            (Some(g), Some(o)) => o >= g,
            (None, _) => true,
            (Some(_), None) => false,
        };
        Self {
            replicas: s.replicas.unwrap_or(0),
            ready_replicas: s.ready_replicas.unwrap_or(0),
            updated_replicas: s.updated_replicas.unwrap_or(0),
            observed_current,
            failure: Self::failure_of(s.conditions.as_deref().unwrap_or_default()),
        }
    }

    /// A Deployment whose `replicas` pods all run the current template and are ready.
    pub fn all_ready(replicas: i32) -> Self {
        Self {
            replicas,
            ready_replicas: replicas,
            updated_replicas: replicas,
            observed_current: true,
            failure: None,
        }
    }

    /// The Deployment's own verdict on its pods, as a Degraded problem:
    /// - `ReplicaFailure=True` (the Deployment controller copies it from the ReplicaSet's
    ///   FailedCreate: a missing ServiceAccount, a quota, an admission policy...) is
    ///   `PodsNotCreated`;
    /// - `Progressing=False` with `ProgressDeadlineExceeded` (pods exist but never became
    ///   ready within `progressDeadlineSeconds`) is `RolloutStalled`.
    ///
    /// Without this, a group whose pods cannot be created only says "rolling out, 0 pods",
    /// and the cause is visible in `kubectl get events` alone.
    pub fn failure_of(conditions: &[DeploymentCondition]) -> Option<Problem> {
        let find = |t: &str, status: &str| {
            conditions
                .iter()
                .find(|c| c.type_.as_deref() == Some(t) && c.status.as_deref() == Some(status))
        };
        if let Some(c) = find("ReplicaFailure", "True") {
            return Some(Problem::new(
                "PodsNotCreated",
                format!(
                    "the worker pods cannot be created ({}): {}",
                    c.reason.as_deref().unwrap_or("ReplicaFailure"),
                    c.message.as_deref().unwrap_or("no message")
                ),
            ));
        }
        find("Progressing", "False")
            .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            .map(|c| {
                Problem::new(
                    "RolloutStalled",
                    format!(
                        "the worker rollout made no progress before its deadline (ProgressDeadlineExceeded): {}",
                        c.message.as_deref().unwrap_or("no message")
                    ),
                )
            })
    }
}

/// A problem the controller itself ran into (not reported by a worker), shown as Degraded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason, e.g. `InvalidSpec`, `StateStoreUnavailable`.
    pub reason: String,
    /// The error chain, as text.
    pub message: String,
}

impl Problem {
    /// A problem with a reason and a message.
    pub fn new(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Everything the status is built from. Plain data only.
#[derive(Clone, Debug)]
pub struct StatusInput {
    /// `.metadata.generation` of the CR.
    pub generation: Option<i64>,
    /// Stream names from the spec, in spec order.
    pub streams: Vec<String>,
    /// Pods the Deployment should run: `.spec.replicas`, or 0 while suspended.
    pub desired_replicas: i32,
    /// `.spec.suspend`: the workers are stopped on purpose.
    pub suspended: bool,
    /// The label selector of the worker pods, as a string (for the scale subresource).
    pub selector: String,
    /// The Deployment's numbers; `None` when it does not exist (yet).
    pub deployment: Option<DeploymentState>,
    /// One read of the group's rows; `None` when the read failed (see `problems`).
    pub snapshot: Option<GroupSnapshot>,
    /// Client ids judged live by the liveness tracker.
    pub live_clients: BTreeSet<String>,
    /// The conditions currently published, to keep `lastTransitionTime` stable.
    pub previous_conditions: Vec<Condition>,
    /// The time stamped on conditions that flip.
    pub now: jiff::Timestamp,
    /// The controller's own problems (invalid spec, unreadable state store, ...).
    pub problems: Vec<Problem>,
}

/// Compacts one stream's (shard, owner) list, in shard-id order, into runs of one owner
/// using the worker's own compaction, so the status shows ranges exactly as the planner
/// thinks of them. Unowned shards end a run and are not listed.
pub fn compact_ranges(stream: &str, shards: &[(String, Option<String>)]) -> Vec<OwnerRange> {
    let keyed: Vec<(ShardKey, Option<&str>)> = shards
        .iter()
        .map(|(s, o)| (ShardKey::new(stream, s), o.as_deref()))
        .collect();
    assignment::compact_ranges(keyed.iter().map(|(k, o)| (k, *o)))
}

/// How stale a published client heartbeat may get before a refresh writes the status for
/// that alone. Heartbeats move every few seconds; writing each one would turn every group
/// into a steady stream of API writes.
pub const HEARTBEAT_WRITE_SLACK_MS: i64 = 60_000;

/// Whether `new` must be written over the published `old`: on any change except client
/// heartbeat times, or when a published heartbeat time lags by more than
/// [`HEARTBEAT_WRITE_SLACK_MS`].
pub fn needs_write(
    old: Option<&KinesisConsumerGroupStatus>,
    new: &KinesisConsumerGroupStatus,
) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &KinesisConsumerGroupStatus| {
        let mut s = s.clone();
        for c in &mut s.clients {
            c.last_heartbeat.clear();
        }
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    let ms = |t: &str| {
        t.parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond())
            .ok()
    };
    old.clients.iter().zip(&new.clients).any(|(o, n)| {
        match (ms(&o.last_heartbeat), ms(&n.last_heartbeat)) {
            (Some(o), Some(n)) => n - o > HEARTBEAT_WRITE_SLACK_MS,
            (o, n) => o != n,
        }
    })
}

/// Formats milliseconds as a short human duration: `0s`, `850ms`, `12s`, `3m12s`, `2h5m`.
pub fn human_millis(ms: i64) -> String {
    let ms = ms.max(0);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m, sec) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// Lag as published: whole seconds under a minute, 10-second steps above. Lag moves with
/// every poll; published exactly, every refresh would be a status write.
pub fn coarse_lag_millis(ms: i64) -> i64 {
    let step = if ms < 60_000 { 1_000 } else { 10_000 };
    ms.max(0) / step * step
}

/// `message` without retry counters (`(3 attempts)`, `attempt 4`): a counter that grows
/// with each retry would make each refresh a status write and a new event.
pub fn without_counters(message: &str) -> String {
    static COUNTERS: std::sync::LazyLock<Option<regex::Regex>> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\s*\(\d+ (?:attempts?|retries|tries)\)|\s*\b(?:attempt|retry) #?\d+\b")
            .ok()
    });
    match COUNTERS.as_ref() {
        Some(re) => re.replace_all(message, "").into_owned(),
        None => message.to_owned(),
    }
}

/// Per-stream facts the conditions are decided from.
#[derive(Debug, Default)]
struct StreamFacts {
    name: String,
    listed: bool,
    open: u32,
    draining: u32,
    /// Consumable shards (not ended, parents done) in shard-id order with their owner.
    consumable: Vec<(String, Option<String>)>,
    lag: Option<(i64, String)>,
}

impl StreamFacts {
    fn unowned(&self) -> impl Iterator<Item = &str> {
        self.consumable
            .iter()
            .filter(|(_, o)| o.is_none())
            .map(|(s, _)| s.as_str())
    }
}

fn stream_facts(
    name: &str,
    cache: Option<&ShardCacheRow>,
    leases: &HashMap<(&str, &str), &LeaseRow>,
    live: &BTreeSet<String>,
) -> StreamFacts {
    let mut f = StreamFacts {
        name: name.to_owned(),
        listed: cache.is_some(),
        ..Default::default()
    };
    let Some(cache) = cache else { return f };
    let ended: BTreeSet<&str> = leases
        .iter()
        .filter(|((stream, _), l)| *stream == name && l.ended)
        .map(|((_, shard), _)| *shard)
        .collect();
    for s in &cache.shards {
        if ended.contains(s.shard_id.as_str()) {
            continue;
        }
        if s.closed {
            f.draining += 1;
        } else {
            f.open += 1;
        }
    }
    // The same rule the workers plan with: not ended, parents ended or expired.
    for shard in assignment::consumable_shards(&cache.shards, &ended) {
        let lease = leases.get(&(name, shard.as_str()));
        let owner = lease
            .and_then(|l| l.owner.as_deref())
            .filter(|o| live.contains(*o))
            .map(str::to_owned);
        if let Some(ms) = lease.and_then(|l| l.millis_behind).map(coarse_lag_millis)
            && f.lag.as_ref().is_none_or(|(m, _)| ms > *m)
        {
            f.lag = Some((ms, shard.clone()));
        }
        f.consumable.push((shard, owner));
    }
    f
}

/// What the Degraded condition says for each known reason: what to fix.
pub fn remedy(reason: &str) -> &'static str {
    match reason {
        "StreamNotFound" => {
            "check spec.streams[].name and region: the stream must exist in the account and region the worker reads (after assuming roleArn, if set)"
        }
        "AccessDenied" => {
            "grant the worker's identity (spec.worker.serviceAccountName, or the stream's roleArn) kinesis:ListShards, GetShardIterator, GetRecords and DescribeStreamSummary on the stream (with consumer.mode EnhancedFanOut also RegisterStreamConsumer, DescribeStreamConsumer and SubscribeToShard on the stream and its consumers), and dynamodb Query/GetItem/PutItem/UpdateItem/DeleteItem on the state-store table; the operator itself needs dynamodb:Query on the table to report status"
        }
        "StateStoreUnavailable" => {
            "check spec.stateStore.table and region: the table must exist (or set stateStore.create: true) and DynamoDB must be reachable with the operator's and workers' credentials"
        }
        "TableNotFound" => {
            "create the state-store table (or set spec.stateStore.create: true) and check spec.stateStore.region"
        }
        "HandlerFailing" => {
            "the delivery target rejects batches: check spec.delivery (http url, the sidecar's logs); records are retried (spec.delivery.retry), and with onFailure Block (the default) never skipped"
        }
        "RecordsDeadLettered" => {
            "the handler refused some records spec.delivery.retry.maxAttempts times on their own; they went to spec.delivery.deadLetter with the error: fix the handler or the records, then replay them from the dead-letter target"
        }
        "RecordsSkipped" => {
            "the handler refused some records spec.delivery.retry.maxAttempts times on their own and onFailure Skip dropped them (kcg_worker_records_skipped_total; the worker log names each sequence): fix the handler, or use onFailure DeadLetter to keep them"
        }
        "DeadLetterFailing" => {
            "the dead-letter target refuses writes and the shard waits before the poison record: check spec.delivery.deadLetter (queueUrl or stream, region, roleArn) and grant the worker sqs:SendMessage on the queue or kinesis:PutRecords on the stream"
        }
        "ApplyRejected" => {
            "fix the spec fields the API server names (spec.worker: resources, env, tolerations, affinity, extraContainers); the workers keep running with the last applied Deployment"
        }
        "ResourceNotOwned" => {
            "an object with the name of the group's ConfigMap (NAME-config) or Deployment (NAME) exists and is not the group's: rename the group, or delete or rename that object; the operator never overwrites it"
        }
        "Forbidden" => {
            "grant the operator's ServiceAccount the verb on the resource the message names (the chart's ClusterRole or Role does; check `kubectl auth can-i --as=system:serviceaccount:NAMESPACE:kcg-operator VERB RESOURCE -n GROUP_NAMESPACE`)"
        }
        "NotFound" => {
            "an object the write needs is missing: if the group's namespace is being deleted this passes with it; otherwise create the object the message names"
        }
        "InvalidSpec" => {
            "fix the spec as the message says; the workers keep their last good config until then"
        }
        "PodsNotCreated" => {
            "remove what stops the pods as the API server names it: create the missing ServiceAccount (or set spec.worker.serviceAccountName to one in the group's namespace), raise the ResourceQuota or LimitRange, or meet the Pod Security or admission policy"
        }
        "RolloutStalled" => {
            "the worker pods do not become ready: check `kubectl get pods -l kcg.dev/group=NAME` and the worker logs (image pull, crash loop, readiness probe)"
        }
        "ServiceAccountMissing" => {
            "create the worker ServiceAccount in the group's namespace, set spec.worker.serviceAccountName to one that exists, or grant the operator `create`, and `get`/`patch` on that account's name, on serviceaccounts (the chart does)"
        }
        "Throttled" => {
            "the stream is over a shard's read limits (5 GetRecords calls/s and 2 MB/s, shared by every group reading it): raise tuning.minCallInterval in each group reading the stream (each group at the default 1s makes 1 call/s per shard at the tip), or add shards (enhanced fan-out: SubscribeToShard allows one call per second per shard; the workers back off)"
        }
        "ResourceInUse" => {
            "enhanced fan-out: Kinesis keeps refusing a shard's subscription because another is still open for the group's consumer (a vanished worker's clears within minutes); if it persists, make sure no other application subscribes with streams[].consumer.name"
        }
        "CrdOutdated" => {
            "upgrade the CRD to this operator's release: `helm upgrade` (the chart upgrades it with crds.enabled: true) or `kubectl apply --server-side -f crds/`"
        }
        _ => "see the worker logs for details",
    }
}

/// Builds the status. Pure: same input, same output.
pub fn build_status(input: StatusInput) -> KinesisConsumerGroupStatus {
    let StatusInput {
        generation,
        streams,
        desired_replicas,
        suspended,
        selector,
        deployment,
        snapshot,
        live_clients,
        previous_conditions,
        now,
        problems,
    } = input;
    let snap = snapshot.clone().unwrap_or_default();

    // Clients: live ones only, sorted by id; the index is the position in that order, which
    // is also how the workers number themselves.
    let mut live_rows: Vec<_> = snap
        .clients
        .iter()
        .filter(|c| live_clients.contains(&c.client_id))
        .collect();
    live_rows.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    live_rows.dedup_by(|a, b| a.client_id == b.client_id);
    let live: BTreeSet<String> = live_rows.iter().map(|c| c.client_id.clone()).collect();
    let leader = live_rows.first().map(|c| c.client_id.clone());

    // Rows of a deleted stream's shards (the stream was recreated under its name) say
    // nothing about the shards now listed: the workers replace them.
    let current = kcg_worker::incarnation::current(&snap);
    let leases: HashMap<(&str, &str), &LeaseRow> = current
        .leases
        .iter()
        .map(|l| ((l.stream.as_str(), l.shard_id.as_str()), l))
        .collect();
    let facts: Vec<StreamFacts> = streams
        .iter()
        .map(|name| {
            let cache = snap.shard_caches.iter().find(|c| &c.stream == name);
            stream_facts(name, cache, &leases, &live)
        })
        .collect();

    // Owned shards per live client, counted from lease rows (the truth), not from what the
    // client last said about itself.
    let mut owned: BTreeMap<&str, u32> = live.iter().map(|c| (c.as_str(), 0)).collect();
    for f in &facts {
        for (_, o) in &f.consumable {
            if let Some(o) = o
                && let Some(n) = owned.get_mut(o.as_str())
            {
                *n += 1;
            }
        }
    }

    let clients: Vec<ClientStatus> = live_rows
        .iter()
        .take(MAX_CLIENTS)
        .enumerate()
        .map(|(i, c)| ClientStatus {
            id: c.client_id.clone(),
            pod: c.pod.clone(),
            index: i as i32,
            last_heartbeat: jiff::Timestamp::from_millisecond(c.heartbeat_at_ms)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            owned_shards: owned.get(c.client_id.as_str()).copied().unwrap_or(0) as i32,
            last_error: c
                .last_error
                .as_deref()
                .map(|e| conditions::truncate(&without_counters(e), MAX_ERROR_CHARS)),
        })
        .collect();

    let stream_status: Vec<StreamStatus> = facts
        .iter()
        .take(MAX_STREAMS)
        .map(|f| {
            let mut ranges = compact_ranges(&f.name, &f.consumable);
            ranges.truncate(MAX_RANGES_PER_STREAM);
            StreamStatus {
                name: f.name.clone(),
                open_shards: f.open as i32,
                closed_shards_draining: f.draining as i32,
                ranges: ranges
                    .into_iter()
                    .map(|r| ShardRange {
                        client: r.client,
                        first: r.first_shard,
                        last: r.last_shard,
                        count: r.count as i32,
                    })
                    .collect(),
                max_lag_millis: f.lag.as_ref().map(|(ms, _)| *ms),
                max_lag_shard: f.lag.as_ref().map(|(_, shard)| shard.clone()),
            }
        })
        .collect();

    let shard_count: u32 = facts.iter().map(|f| f.open + f.draining).sum();
    let max_lag = facts
        .iter()
        .filter_map(|f| f.lag.as_ref().map(|l| l.0))
        .max();

    let verdicts = decide(Decide {
        desired_replicas,
        suspended,
        deployment: deployment.as_ref(),
        store_read: snapshot.is_some(),
        facts: &facts,
        owned: &owned,
        live: &live,
        snapshot: &snap,
        problems: &problems,
    });
    let conditions = conditions::apply(verdicts, &previous_conditions, generation, now);

    let d = deployment.unwrap_or_default();
    fit(KinesisConsumerGroupStatus {
        observed_generation: generation,
        replicas: d.replicas,
        ready_replicas: d.ready_replicas,
        selector: Some(selector).filter(|s| !s.is_empty()),
        leader,
        client_count: live.len() as i32,
        shard_count: shard_count as i32,
        max_lag: max_lag.map(human_millis),
        max_lag_millis: max_lag,
        clients,
        streams: stream_status,
        conditions,
    })
}

fn json_size(s: &KinesisConsumerGroupStatus) -> usize {
    serde_json::to_vec(s).map(|v| v.len()).unwrap_or(usize::MAX)
}

/// Keeps the status within [`MAX_STATUS_BYTES`] whatever the group looks like: first shorter
/// client errors (the Degraded condition keeps the full first one), then fewer ranges per
/// stream (only fragmented ownership makes many), then fewer clients. Counts and conditions
/// are never cut.
fn fit(mut s: KinesisConsumerGroupStatus) -> KinesisConsumerGroupStatus {
    if json_size(&s) > MAX_STATUS_BYTES {
        for c in &mut s.clients {
            if let Some(e) = &mut c.last_error {
                *e = conditions::truncate(e, 64);
            }
        }
    }
    let mut cap = MAX_RANGES_PER_STREAM;
    while json_size(&s) > MAX_STATUS_BYTES && cap > 1 {
        cap /= 2;
        for st in &mut s.streams {
            st.ranges.truncate(cap);
        }
    }
    while json_size(&s) > MAX_STATUS_BYTES && !s.clients.is_empty() {
        let keep = s.clients.len() / 2;
        s.clients.truncate(keep);
    }
    s
}

struct Decide<'a> {
    desired_replicas: i32,
    suspended: bool,
    deployment: Option<&'a DeploymentState>,
    store_read: bool,
    facts: &'a [StreamFacts],
    owned: &'a BTreeMap<&'a str, u32>,
    live: &'a BTreeSet<String>,
    snapshot: &'a GroupSnapshot,
    problems: &'a [Problem],
}

fn name_some<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = items.collect();
    let mut s = all
        .iter()
        .take(MAX_NAMED_SHARDS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > MAX_NAMED_SHARDS {
        s.push_str(&format!(" and {} more", all.len() - MAX_NAMED_SHARDS));
    }
    s
}

fn distribution(owned: &BTreeMap<&str, u32>) -> String {
    owned
        .iter()
        .map(|(c, n)| format!("{c}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn decide(d: Decide<'_>) -> Vec<Verdict> {
    let dep = d.deployment.cloned().unwrap_or_default();
    let rollout_pending = d.deployment.is_some()
        && (!dep.observed_current
            || dep.updated_replicas < d.desired_replicas
            || dep.replicas != d.desired_replicas
            || dep.ready_replicas < d.desired_replicas);
    let unowned: u32 = d.facts.iter().map(|f| f.unowned().count() as u32).sum();
    let consumable: u32 = d.facts.iter().map(|f| f.consumable.len() as u32).sum();
    let unlisted: Vec<&str> = d
        .facts
        .iter()
        .filter(|f| !f.listed)
        .map(|f| f.name.as_str())
        .collect();
    // Shards whose lease names an owner that is not live: held by a dead or departed client.
    let stale: Vec<String> = d
        .facts
        .iter()
        .flat_map(|f| {
            f.consumable.iter().filter_map(move |(s, o)| {
                if o.is_some() {
                    return None;
                }
                let row = d
                    .snapshot
                    .leases
                    .iter()
                    .find(|l| l.stream == f.name && &l.shard_id == s)?;
                row.owner.as_ref().filter(|o| !d.live.contains(*o))?;
                Some(format!("{}/{}", f.name, s))
            })
        })
        .collect();
    // The planner's invariant is per stream: each live client's share of a stream's
    // consumable shards differs by at most one. Find the stream furthest from it.
    let mut spread = 0u32;
    let mut uneven = String::new();
    for f in d.facts {
        let mut per: BTreeMap<&str, u32> = d.live.iter().map(|c| (c.as_str(), 0)).collect();
        for (_, o) in &f.consumable {
            if let Some(o) = o
                && let Some(n) = per.get_mut(o.as_str())
            {
                *n += 1;
            }
        }
        let (min, max) = (
            per.values().min().copied().unwrap_or(0),
            per.values().max().copied().unwrap_or(0),
        );
        if max - min > spread {
            spread = max - min;
            uneven = format!("stream {}: {}", f.name, distribution(&per));
        }
    }

    // Degraded first: the other conditions' messages may point at it. The controller's own
    // problems come first, then the Deployment's, then what the workers report.
    let mut degraded_reasons: Vec<(String, String)> = d
        .problems
        .iter()
        .chain(d.deployment.and_then(|dep| dep.failure.as_ref()))
        .map(|p| (p.reason.clone(), p.message.clone()))
        .collect();
    let mut by_reason: BTreeMap<String, Vec<(&str, &str)>> = BTreeMap::new();
    for c in &d.snapshot.clients {
        if !d.live.contains(&c.client_id) {
            continue;
        }
        if let Some(reason) = c.last_error_reason.as_deref().filter(|r| !r.is_empty()) {
            by_reason
                .entry(reason.to_owned())
                .or_default()
                .push((c.client_id.as_str(), c.last_error.as_deref().unwrap_or("")));
        }
    }
    let mut client_reasons: Vec<_> = by_reason.into_iter().collect();
    client_reasons.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    for (reason, hits) in client_reasons {
        let (client, err) = hits[0];
        let more = if hits.len() > 1 {
            format!(" (and {} more clients)", hits.len() - 1)
        } else {
            String::new()
        };
        degraded_reasons.push((
            reason,
            format!(
                "client {client}{more}: {}",
                conditions::truncate(&without_counters(err), MAX_ERROR_CHARS)
            ),
        ));
    }
    let degraded = match degraded_reasons.first() {
        None => Verdict::new(DEGRADED, FALSE, "AsExpected", "no errors reported"),
        Some((reason, _)) => {
            let message = degraded_reasons
                .iter()
                .map(|(r, m)| format!("{r}: {m}; fix: {}", remedy(r)))
                .collect::<Vec<_>>()
                .join(". ");
            Verdict::new(DEGRADED, TRUE, reason.clone(), message)
        }
    };

    let ready = if d.suspended {
        Verdict::new(
            READY,
            FALSE,
            "Suspended",
            "spec.suspend is true: the workers are stopped and the checkpoints kept; spec.replicas is kept for the resume",
        )
    } else if d.desired_replicas == 0 {
        Verdict::new(
            READY,
            FALSE,
            "Suspended",
            "spec.replicas is 0: the group is suspended",
        )
    } else if !d.store_read {
        Verdict::new(
            READY,
            UNKNOWN,
            "StateStoreUnavailable",
            "the state-store table could not be read; see the Degraded condition",
        )
    } else if d.deployment.is_none() {
        Verdict::new(
            READY,
            FALSE,
            "DeploymentMissing",
            "the worker Deployment does not exist yet",
        )
    } else if rollout_pending {
        Verdict::new(
            READY,
            FALSE,
            "RolloutInProgress",
            format!(
                "{} ready of {} desired ({} pods, {} on the current template){}",
                dep.ready_replicas,
                d.desired_replicas,
                dep.replicas,
                dep.updated_replicas,
                match &dep.failure {
                    Some(f) => format!("; {}: see the Degraded condition", f.reason),
                    None => String::new(),
                }
            ),
        )
    } else if !unlisted.is_empty() {
        Verdict::new(
            READY,
            FALSE,
            "ShardsNotListed",
            format!(
                "the group leader has not listed the shards of {} yet",
                unlisted.join(", ")
            ),
        )
    } else if unowned > 0 {
        let names = name_some(d.facts.iter().flat_map(|f| f.unowned()));
        Verdict::new(
            READY,
            FALSE,
            "ShardsUnowned",
            format!("{unowned} of {consumable} consumable shards have no live owner: {names}"),
        )
    } else {
        Verdict::new(
            READY,
            TRUE,
            "Ready",
            format!(
                "{}/{} replicas ready; {consumable} shards owned by {} live clients",
                dep.ready_replicas,
                d.desired_replicas,
                d.live.len()
            ),
        )
    };

    let balanced = if !d.store_read {
        Verdict::new(
            BALANCED,
            UNKNOWN,
            "StateStoreUnavailable",
            "the state-store table could not be read",
        )
    } else if !unlisted.is_empty() && consumable == 0 {
        Verdict::new(
            BALANCED,
            UNKNOWN,
            "ShardsNotListed",
            format!("no shards known yet for {}", unlisted.join(", ")),
        )
    } else if !stale.is_empty() {
        Verdict::new(
            BALANCED,
            FALSE,
            "StaleOwners",
            format!(
                "{} shards are held by clients that are no longer live: {}",
                stale.len(),
                name_some(stale.iter().map(String::as_str))
            ),
        )
    } else if unowned > 0 {
        Verdict::new(
            BALANCED,
            FALSE,
            "UnownedShards",
            format!("{unowned} of {consumable} consumable shards are unowned"),
        )
    } else if d.live.is_empty() {
        Verdict::new(BALANCED, FALSE, "NoClients", "no live clients")
    } else if spread > 1 {
        Verdict::new(
            BALANCED,
            FALSE,
            "Uneven",
            format!("owned shard counts differ by {spread} ({uneven})"),
        )
    } else {
        Verdict::new(
            BALANCED,
            TRUE,
            "Balanced",
            format!(
                "{consumable} shards over {} clients: {}",
                d.live.len(),
                distribution(d.owned)
            ),
        )
    };

    let rebalancing =
        d.store_read && !d.live.is_empty() && (unowned > 0 || !stale.is_empty() || spread > 1);
    let progressing = if rollout_pending {
        Verdict::new(
            PROGRESSING,
            TRUE,
            "RollingOut",
            format!(
                "rolling out workers: {} desired, {} pods, {} on the current template, {} ready",
                d.desired_replicas, dep.replicas, dep.updated_replicas, dep.ready_replicas
            ),
        )
    } else if rebalancing {
        Verdict::new(
            PROGRESSING,
            TRUE,
            "Rebalancing",
            format!("clients are moving shard leases: {}", distribution(d.owned)),
        )
    } else if d.suspended {
        Verdict::new(
            PROGRESSING,
            FALSE,
            "Suspended",
            "spec.suspend is true: nothing to roll out until it is resumed",
        )
    } else {
        Verdict::new(
            PROGRESSING,
            FALSE,
            "Stable",
            "no rollout or rebalance under way",
        )
    };

    vec![ready, balanced, progressing, degraded]
}

#[cfg(test)]
mod tests;
