//! Micro-benchmarks of the pure decision functions: the assignment planner, the handoff
//! state machine and the operator's status builder. A hand loop (warm-up, then the median
//! of many timed samples) keeps the output to the one table `kcg-bench` prints.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use kcg_operator::status::{DeploymentState, MAX_STATUS_BYTES, Problem, StatusInput, build_status};
use kcg_worker::assignment::{self, ShardKey};
use kcg_worker::handoff::{self, HandoffInput, LeaseView};
use kcg_worker::store::schema::{ClientRow, GroupSnapshot, LeaseRow, ShardCacheRow, ShardInfo};

use crate::report::{Row, median, num};

/// Timed samples per measurement; the median is reported.
const SAMPLES: usize = 51;
/// Target duration of one sample; the batch size is calibrated to it.
const SAMPLE_TARGET: Duration = Duration::from_millis(5);
/// Warm-up (and calibration) time per measurement.
const WARMUP: Duration = Duration::from_millis(200);

/// Group sizes measured: (shards, clients).
pub const SIZES: [(u32, u32); 3] = [(4, 2), (100, 10), (1000, 100)];

/// Median nanoseconds per call of `f`.
pub fn time_ns<T>(mut f: impl FnMut() -> T) -> f64 {
    time_ns_with(|| (), |()| f())
}

/// Median nanoseconds per call of `f` on a fresh input from `setup`; the setup (for example
/// cloning an input that `f` consumes) is done before each sample and not timed.
pub fn time_ns_with<I, T>(mut setup: impl FnMut() -> I, mut f: impl FnMut(I) -> T) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    let mut spent = Duration::ZERO;
    while start.elapsed() < WARMUP || calls < 3 {
        let input = setup();
        let t = Instant::now();
        black_box(f(black_box(input)));
        spent += t.elapsed();
        calls += 1;
    }
    let per_call = spent.as_nanos() as f64 / calls as f64;
    let batch = ((SAMPLE_TARGET.as_nanos() as f64 / per_call.max(1.0)).ceil() as usize).max(1);
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let inputs: Vec<I> = (0..batch).map(|_| setup()).collect();
        let t = Instant::now();
        for input in inputs {
            black_box(f(black_box(input)));
        }
        samples.push(t.elapsed().as_nanos() as f64 / batch as f64);
    }
    median(samples)
}

const GROUP: &str = "bench/group";
const STREAM: &str = "orders";

/// A realistic client id: Deployment pod name plus the incarnation suffix.
fn client_id(i: u32) -> String {
    format!("kcg-orders-worker-7d9f8b6c5d-{i:05}-q3x9z1")
}

fn shard_id(i: u32) -> String {
    format!("shardId-{i:012}")
}

/// A healthy group: `clients` live clients on one stream of `shards` open shards, every
/// lease held by its planned owner, with checkpoints and lag as a running group has them.
pub fn snapshot(shards: u32, clients: u32) -> GroupSnapshot {
    let ids: Vec<String> = (0..clients).map(client_id).collect();
    let cache = ShardCacheRow {
        pk: GROUP.into(),
        sk: format!("shards#{STREAM}"),
        stream: STREAM.into(),
        shards: (0..shards)
            .map(|i| ShardInfo {
                starting_sequence: None,
                shard_id: shard_id(i),
                parent: None,
                adjacent_parent: None,
                closed: false,
            })
            .collect(),
        refreshed_at_ms: 1_800_000_000_000,
        refreshed_by: ids[0].clone(),
    };
    let streams = assignment::streams_from_snapshot(
        &[STREAM.to_owned()],
        &GroupSnapshot {
            shard_caches: vec![cache.clone()],
            ..GroupSnapshot::default()
        },
    );
    let plan = assignment::plan(&streams, &ids);
    let leases = plan
        .iter()
        .enumerate()
        .map(|(n, (key, owner))| LeaseRow {
            pk: GROUP.into(),
            sk: format!("lease#{}#{}", key.stream, key.shard_id),
            stream: key.stream.clone(),
            shard_id: key.shard_id.clone(),
            owner: Some(owner.clone()),
            lease_counter: 1000 + n as u64,
            checkpoint: Some(format!(
                "49650000000000000000000000000000000000000000{n:012}"
            )),
            checkpoint_sub_sequence: None,
            ended: false,
            millis_behind: Some((n as i64 * 37) % 5000),
            lag_at_ms: Some(1_800_000_000_000),
            updated_at_ms: 1_800_000_000_000,
            shard_start: None,
        })
        .collect();
    let clients = ids
        .iter()
        .enumerate()
        .map(|(i, id)| ClientRow {
            pk: GROUP.into(),
            sk: format!("client#{id}"),
            client_id: id.clone(),
            pod: id[..id.len() - 7].to_owned(),
            heartbeat: 500 + i as u64,
            heartbeat_at_ms: 1_800_000_000_000,
            started_at_ms: 1_799_999_000_000,
            owned_shards: shards / clients,
            lease_changes: 0,
            shard_changes: None,
            last_error: None,
            last_error_reason: None,
            expires_at: 1_800_000_100,
            streams: None,
            streams_digest: None,
        })
        .collect();
    GroupSnapshot {
        clients,
        shard_caches: vec![cache],
        leases,
    }
}

fn live_ids(snap: &GroupSnapshot) -> Vec<String> {
    snap.clients.iter().map(|c| c.client_id.clone()).collect()
}

/// The planner as the engine runs it every heartbeat: snapshot → consumable shards → plan.
pub fn planner() -> Vec<Row> {
    SIZES
        .iter()
        .map(|&(shards, clients)| {
            let snap = snapshot(shards, clients);
            let live = live_ids(&snap);
            let names = [STREAM.to_owned()];
            let ns = time_ns(|| {
                assignment::plan(&assignment::streams_from_snapshot(&names, &snap), &live)
            });
            let goal_ns = 10_000_000.0;
            Row::goal(
                "planner",
                format!("{shards} shards x {clients} clients, snapshot->plan"),
                num(ns),
                "ns/op",
                "< 10 ms (<< heartbeat)",
                ns < goal_ns,
            )
        })
        .collect()
}

/// The handoff decision of one client (the middle one) in a steady group: every lease held
/// by its planned owner, the client reading its own range.
pub fn handoff() -> Vec<Row> {
    SIZES
        .iter()
        .map(|&(shards, clients)| {
            let snap = snapshot(shards, clients);
            let live = live_ids(&snap);
            let plan = assignment::plan(
                &assignment::streams_from_snapshot(&[STREAM.to_owned()], &snap),
                &live,
            );
            let leases: BTreeMap<ShardKey, LeaseView> = snap
                .leases
                .iter()
                .map(|l| {
                    (
                        ShardKey::new(&l.stream, &l.shard_id),
                        LeaseView {
                            owner: l.owner.clone(),
                            counter: l.lease_counter,
                            ended: l.ended,
                            stale: false,
                        },
                    )
                })
                .collect();
            let me = live[live.len() / 2].clone();
            let reading: BTreeSet<ShardKey> = plan
                .iter()
                .filter(|(_, o)| **o == me)
                .map(|(k, _)| k.clone())
                .collect();
            let ns = time_ns(|| {
                handoff::decide(HandoffInput {
                    me: &me,
                    plan: &plan,
                    leases: &leases,
                    reading: &reading,
                })
            });
            Row::goal(
                "handoff decision",
                format!("1 client of {shards} shards x {clients} clients, steady"),
                num(ns),
                "ns/op",
                "< 10 ms (<< heartbeat)",
                ns < 10_000_000.0,
            )
        })
        .collect()
}

fn status_input(snap: GroupSnapshot) -> StatusInput {
    let live: BTreeSet<String> = live_ids(&snap).into_iter().collect();
    let n = live.len() as i32;
    StatusInput {
        generation: Some(7),
        streams: vec![STREAM.to_owned()],
        desired_replicas: n,
        suspended: false,
        selector: "app.kubernetes.io/name=kcg-worker,app.kubernetes.io/instance=orders".into(),
        deployment: Some(DeploymentState::all_ready(n)),
        snapshot: Some(snap),
        live_clients: live,
        previous_conditions: Vec::new(),
        now: jiff::Timestamp::from_second(1_800_000_000).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        problems: Vec::new(),
    }
}

/// `build_status` for 1,000 shards x 100 clients: time per build and serialized size, for a
/// healthy group and for the worst case the size budget must survive (owners interleaved so
/// every shard is its own range, a long error on every client, a controller problem).
pub fn status() -> Vec<Row> {
    let mut rows = Vec::new();
    let healthy = status_input(snapshot(1000, 100));
    let mut worst = status_input(snapshot(1000, 100));
    if let Some(snap) = worst.snapshot.as_mut() {
        let ids = live_ids(snap);
        for (i, l) in snap.leases.iter_mut().enumerate() {
            l.owner = Some(ids[i % ids.len()].clone());
        }
        let long = "delivery failed: ".to_owned() + &"x".repeat(4000);
        for c in &mut snap.clients {
            c.last_error = Some(long.clone());
            c.last_error_reason = Some("HandlerFailing".into());
        }
        worst
            .problems
            .push(Problem::new("StateStoreUnavailable", "y".repeat(4000)));
    }
    for (label, input) in [
        ("healthy", healthy),
        ("interleaved owners + long errors", worst),
    ] {
        let us = time_ns_with(|| input.clone(), build_status) / 1000.0;
        rows.push(Row::goal(
            "status builder",
            format!("1000 shards x 100 clients, {label}"),
            num(us),
            "us/op",
            "< 50 ms (<< refresh)",
            us < 50_000.0,
        ));
        let size = serde_json::to_vec(&build_status(input)).map(|v| v.len());
        rows.push(match size {
            Ok(size) => Row::goal(
                "status size",
                format!("1000 shards x 100 clients, {label}, JSON"),
                size.to_string(),
                "bytes",
                format!("< 65536 (budget {MAX_STATUS_BYTES})"),
                size < 65536,
            ),
            Err(e) => Row::failed("status size", &e.into()),
        });
    }
    rows
}
