//! Several engines in one process forming a group over a real Kinesis (kinesis-local) and a
//! real DynamoDB (DynamoDB Local): convergence, graceful handoff, crash takeover, resharding.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`. When they are not set
//! the tests print why and skip; when set but unreachable they fail.

mod group_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use group_support::*;
use kcg_worker::assignment::{ShardKey, compact_ranges};
use kcg_worker::delivery::{BatchHandler, HandlerError, Record};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_engines_converge_and_scale_down_without_duplicates() {
    let Some(mut env) = env("converge", 6).await else {
        return;
    };
    // Periodic checkpoints effectively off: zero duplicates must come from the final
    // checkpoint written in each release, not from a lucky periodic one.
    env.checkpoint_interval = "60s".into();
    // A long client timeout: a quick handoff below proves the released leases were taken
    // at once, not after expiry.
    env.client_timeout = "10s".into();
    let mut want = env.put("a", 60).await;
    let w1 = env.start("e1");
    let w2 = env.start("e2");
    let w3 = env.start("e3");
    env.wait_ownership(&[("e1", 2), ("e2", 2), ("e3", 2)], Duration::from_secs(30))
        .await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    // Ranges are contiguous: three runs of two.
    let snap = env.snapshot().await;
    let owners: BTreeMap<ShardKey, Option<String>> = snap
        .leases
        .iter()
        .map(|l| (ShardKey::new(&l.stream, &l.shard_id), l.owner.clone()))
        .collect();
    let ranges = compact_ranges(owners.iter().map(|(k, o)| (k, o.as_deref())));
    assert_eq!(
        ranges.iter().map(|r| r.count).collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{ranges:?}"
    );
    assert_eq!(snap.clients.len(), 3);

    // Graceful scale down: e3 leaves, its shards move without waiting for expiry.
    want.extend(env.put("b", 60).await);
    let stopped = Instant::now();
    w3.stop().await;
    env.wait_ownership(&[("e1", 3), ("e2", 3)], Duration::from_secs(10))
        .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "handoff took {:?}: released leases must be taken at once",
        stopped.elapsed()
    );
    want.extend(env.put("c", 60).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    assert_eq!(env.snapshot().await.clients.len(), 2, "e3 deregistered");

    // Scale back up to three.
    let w4 = env.start("e4");
    env.wait_ownership(&[("e1", 2), ("e2", 2), ("e4", 2)], Duration::from_secs(30))
        .await;
    want.extend(env.put("d", 60).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    for w in [w1, w2, w4] {
        w.stop().await;
    }
    let snap = env.snapshot().await;
    assert!(snap.clients.is_empty(), "all deregistered");
    assert!(
        snap.leases.iter().all(|l| l.owner.is_none()),
        "all released"
    );
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert_eq!(
        duplicates(&log).len(),
        0,
        "graceful scaling must not redeliver: {:?}",
        duplicates(&log)
    );
    assert_eq!(env.log.distinct_ids(), want);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_engine_is_taken_over_after_client_timeout() {
    let Some(mut env) = env("crash", 4).await else {
        return;
    };
    // A long checkpoint interval leaves the crashed engine a known un-checkpointed tail.
    env.checkpoint_interval = "4s".into();
    let mut want = env.put("a", 40).await;
    let w1 = env.start("e1");
    let w2 = env.start("e2");
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    // Wait until every shard's checkpoint covers the "a" records.
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let a_seqs: BTreeMap<String, String> = env
            .log
            .all()
            .into_iter()
            .map(|d| (d.shard, d.sequence))
            .collect();
        let covered = snap.leases.iter().all(|l| {
            a_seqs.get(&l.shard_id).is_none_or(|last| {
                l.checkpoint
                    .as_deref()
                    .is_some_and(|c| seq_key(c) >= seq_key(last))
            })
        });
        if covered {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "checkpoints never covered the first records"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The tail: delivered, not yet checkpointed (next checkpoint is seconds away).
    let tail = env.put("b", 40).await;
    want.extend(tail.iter().cloned());
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    let crashed_at = Instant::now();
    w2.crash().await;

    env.wait_ownership(&[("e1", 4)], Duration::from_secs(15))
        .await;
    let took = crashed_at.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "takeover after {took:?} came before the client timeout"
    );
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    want.extend(env.put("c", 40).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    // The leader pruned the dead client.
    let start = Instant::now();
    while env.snapshot().await.clients.len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dead client not pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w1.stop().await;

    let log = env.log.all();
    assert_order_per_shard(&log);
    assert_eq!(env.log.distinct_ids(), want, "nothing lost");
    // Duplicates: exactly the crashed engine's un-checkpointed tail, redelivered by the
    // survivor, and nothing else.
    let mut first_by: BTreeMap<String, &Delivery> = BTreeMap::new();
    for d in &log {
        first_by.entry(d.id.clone()).or_insert(d);
    }
    let dups = duplicates(&log);
    let e2_tail: BTreeSet<String> = log
        .iter()
        .filter(|d| d.engine == "e2" && tail.contains(&d.id))
        .map(|d| d.id.clone())
        .collect();
    assert!(!e2_tail.is_empty(), "e2 delivered part of the tail");
    let dup_ids: BTreeSet<String> = dups.iter().map(|d| d.id.clone()).collect();
    for d in &dups {
        assert_eq!(
            first_by[&d.id].engine, "e2",
            "{d:?} duplicated but first delivered by e1"
        );
        assert_eq!(d.engine, "e1", "{d:?}");
    }
    assert!(
        dup_ids.is_subset(&e2_tail),
        "only the tail after e2's last checkpoint is redelivered"
    );
    // Per shard, what got redelivered is a suffix of what e2 delivered: everything after
    // its last checkpoint, nothing before it.
    let mut e2_by_shard: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in log.iter().filter(|d| d.engine == "e2") {
        e2_by_shard.entry(d.shard.as_str()).or_default().push(d);
    }
    for (shard, ds) in e2_by_shard {
        let flags: Vec<bool> = ds.iter().map(|d| dup_ids.contains(&d.id)).collect();
        let first_dup = flags.iter().position(|f| *f).unwrap_or(flags.len());
        assert!(
            flags[first_dup..].iter().all(|f| *f),
            "shard {shard}: redelivered records are not a tail: {flags:?}"
        );
    }
    eprintln!(
        "crash: {} of {} tail records redelivered",
        dup_ids.len(),
        e2_tail.len()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_reads_parents_to_the_end_before_children() {
    let Some(mut env) = env("split", 2).await else {
        return;
    };
    // Small GetRecords pages: a parent takes several polls, so a child read too early
    // would interleave with it.
    env.max_records = 5;
    // Records in the parents, a split, records in the children — all before any engine
    // runs, so the parents still hold unread records when the children become readable.
    let mut want = env.put("a", 40).await;
    reshard(&env, 4).await;
    want.extend(env.put("b", 60).await);
    let w1 = env.start("e1");
    let w2 = env.start("e2");
    env.wait_delivered(&want, Duration::from_secs(45)).await;
    // A merge back to two shards while the engines run.
    reshard(&env, 2).await;
    want.extend(env.put("c", 40).await);
    env.wait_delivered(&want, Duration::from_secs(45)).await;

    // Lineage from the stream itself.
    let shards = env
        .kinesis
        .list_shards()
        .stream_name(&env.stream)
        .send()
        .await
        .expect("list shards");
    let parents: BTreeMap<String, Vec<String>> = shards
        .shards()
        .iter()
        .map(|s| {
            let p = s
                .parent_shard_id()
                .into_iter()
                .chain(s.adjacent_parent_shard_id())
                .map(str::to_owned)
                .collect();
            (s.shard_id().to_owned(), p)
        })
        .collect();
    assert!(
        parents.values().any(|p| p.len() == 1),
        "the split created children"
    );
    assert!(
        parents.values().any(|p| p.len() == 2),
        "the merge created a child of two parents"
    );
    let log = env.log.all();
    let last_at: BTreeMap<&str, usize> = log.iter().map(|d| (d.shard.as_str(), d.at)).collect();
    let first_at: BTreeMap<&str, usize> =
        log.iter().rev().map(|d| (d.shard.as_str(), d.at)).collect();
    for (child, ps) in &parents {
        let Some(first) = first_at.get(child.as_str()) else {
            continue;
        };
        for p in ps {
            if let Some(last) = last_at.get(p.as_str()) {
                assert!(
                    last < first,
                    "child {child} delivered (at {first}) before parent {p} finished (at {last})"
                );
            }
        }
    }
    // Every parent is marked ended.
    let snap = env.snapshot().await;
    for p in parents.values().flatten() {
        let l = snap
            .leases
            .iter()
            .find(|l| &l.shard_id == p)
            .expect("parent lease");
        assert!(l.ended, "parent {p} ended");
    }
    assert_order_per_shard(&log);
    assert_eq!(
        env.log.distinct_ids(),
        want,
        "nothing lost across the split"
    );
    w1.stop().await;
    w2.stop().await;
    assert_eq!(duplicates(&env.log.all()).len(), 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_group_reads_two_streams_while_another_group_shares_the_table() {
    let Some(mut g1) = env("multi", 2).await else {
        return;
    };
    // A second stream for g1.
    let second = format!("{}-b", g1.stream);
    create_stream(&g1.kinesis, &second, 2).await;
    g1.extra_streams.push(second.clone());
    // g2: another group in the same table, reading g1's first stream on its own.
    let g2 = Env::new(
        g1.kinesis.clone(),
        g1.store.clone(),
        g1.table.clone(),
        g1.stream.clone(),
        format!("{}-other", g1.group),
    );

    let mut want1 = g1.put("a", 30).await;
    let want2 = want1.clone();
    want1.extend(g1.put_to(&second, "b", 30).await);
    let e1 = g1.start("e1");
    let e2 = g1.start("e2");
    let f1 = g2.start("f1");
    // Two streams x two shards over two clients: two leases each, one of each stream
    // (the client index rotates per stream).
    g1.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;
    g2.wait_ownership(&[("f1", 2)], Duration::from_secs(30))
        .await;
    g1.wait_delivered(&want1, Duration::from_secs(30)).await;
    g2.wait_delivered(&want2, Duration::from_secs(30)).await;
    let snap = g1.snapshot().await;
    for e in ["e1", "e2"] {
        let streams: BTreeSet<&str> = snap
            .leases
            .iter()
            .filter(|l| l.owner.as_deref().is_some_and(|o| base(o) == e))
            .map(|l| l.stream.as_str())
            .collect();
        assert_eq!(streams.len(), 2, "{e} reads one shard of each stream");
    }
    for w in [e1, e2, f1] {
        w.stop().await;
    }
    for (g, want) in [(&g1, &want1), (&g2, &want2)] {
        let log = g.log.all();
        assert_order_per_shard(&log);
        assert_eq!(
            &g.log.distinct_ids(),
            want,
            "group {} got exactly its records",
            g.group
        );
        assert!(duplicates(&log).is_empty());
    }
    g1.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latest_start_drops_nothing_across_handoff_and_split() {
    let Some(mut env) = env("latest", 2).await else {
        return;
    };
    env.start_position = "Latest".into();
    // Records from before the group existed are not wanted (LATEST).
    let old = env.put("old", 10).await;
    let w1 = env.start("e1");
    env.wait_ownership(&[("e1", 2)], Duration::from_secs(30))
        .await;
    // Give the readers time to take their LATEST iterators, then hand the shards over
    // without any checkpoint: e1 acknowledged nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    w1.stop().await;
    assert!(
        env.snapshot()
            .await
            .leases
            .iter()
            .all(|l| l.checkpoint.is_none()),
        "no checkpoint yet"
    );
    // Written while nobody reads: a new owner starting at LATEST would skip them.
    let mut want = env.put("gap", 20).await;
    let w2 = env.start("e2");
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    // A split: records written into the children right away must not be skipped either.
    reshard(&env, 4).await;
    want.extend(env.put("children", 40).await);
    env.wait_delivered(&want, Duration::from_secs(45)).await;
    w2.stop().await;

    let got = env.log.distinct_ids();
    assert!(want.is_subset(&got), "nothing lost");
    let old_seen = got.intersection(&old).count();
    // The handoff start may reach back up to the safety margin, so records written just
    // before the group started can appear; that is extra, never missing.
    eprintln!(
        "records from before the group started delivered: {old_seen} of {}",
        old.len()
    );
    assert_order_per_shard(&env.log.all());
}

/// Refuses every batch until `healthy` is set, then delivers to the log.
struct Flaky {
    healthy: Arc<std::sync::atomic::AtomicBool>,
    inner: Collect,
}

impl BatchHandler for Flaky {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        if !self.healthy.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(HandlerError::new("sink answers 500")) });
        }
        self.inner.handle(batch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_handler_is_reported_and_skips_nothing() {
    let Some(env) = env("handler", 1).await else {
        return;
    };
    let want = env.put("a", 20).await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = Arc::new(Flaky {
        healthy: healthy.clone(),
        inner: Collect {
            engine: "e1".into(),
            log: env.log.clone(),
        },
    });
    let w1 = env.start_full(
        "e1",
        handler,
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(30))),
    );
    // The reader's problem reaches the client row (and so the CR status).
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let reason = snap
            .clients
            .first()
            .and_then(|c| c.last_error_reason.clone());
        if reason.as_deref() == Some("HandlerFailing") {
            let msg = snap.clients[0].last_error.clone().unwrap_or_default();
            assert!(msg.contains("sink answers 500"), "{msg}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "lastErrorReason never set: {reason:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was acknowledged, so nothing is checkpointed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snap = env.snapshot().await;
    assert!(
        snap.leases.iter().all(|l| l.checkpoint.is_none()),
        "checkpoint moved without an ack"
    );

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let cleared = snap
            .clients
            .first()
            .is_some_and(|c| c.last_error_reason.is_none());
        let checkpointed = snap.leases.iter().all(|l| l.checkpoint.is_some());
        if cleared && checkpointed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "error not cleared or no checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w1.stop().await;
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert_eq!(env.log.distinct_ids(), want);
    assert!(
        duplicates(&log).is_empty(),
        "refused batches are not delivered twice"
    );
}

/// Store requests an engine made, by operation (the `kcg_state_store_requests_total`
/// counter).
fn requests(metrics: &Metrics, op: &str) -> u64 {
    metrics
        .store_requests
        .get_or_create(&kcg_worker::metrics::OperationLabels {
            operation: op.to_owned(),
        })
        .get()
}

/// An idle group's coordination is one heartbeat write and one eventually consistent read of
/// the client rows per worker and heartbeat: no lease row is written (no renewal, no
/// checkpoint of an unmoved position), the lease rows are read only as a periodic safety
/// net, and the reads cost half a read unit per tick (DynamoDB Local's `ConsumedCapacity`;
/// a consistent read of the same rows costs a whole one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_group_writes_no_lease_rows() {
    let Some(env) = env("idle", 4).await else {
        return;
    };
    let want = env.put("a", 40).await;
    let metrics = [Arc::new(Metrics::new()), Arc::new(Metrics::new())];
    let workers: Vec<Worker> = ["e1", "e2"]
        .iter()
        .zip(&metrics)
        .map(|(name, m)| {
            env.start_with(
                name,
                m.clone(),
                Arc::new(Health::new(Duration::from_secs(30))),
            )
        })
        .collect();
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    // Settle: the last positions are checkpointed one checkpoint interval (500ms) later.
    let start = Instant::now();
    let settled = loop {
        let before = env.snapshot().await.leases;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = env.snapshot().await.leases;
        if before == after && after.iter().all(|l| l.checkpoint.is_some()) {
            break after;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "lease rows never settled: {after:?}"
        );
    };
    let ops = [
        "heartbeat",
        "load_clients",
        "load_leases",
        // Nobody is dead: no client read needs to be consistent.
        "load_clients_consistent",
        "checkpoint",
        "claim",
        "resume",
        "release",
        "create_lease",
        "delete_lease",
        "prune",
        "put_shard_cache",
    ];
    let count = |m: &Metrics| -> BTreeMap<&str, u64> {
        ops.iter().map(|op| (*op, requests(m, op))).collect()
    };
    let units = |m: &Metrics| m.state_store_read_units.get();
    let before: Vec<_> = metrics.iter().map(|m| count(m)).collect();
    let units_before: Vec<f64> = metrics.iter().map(|m| units(m)).collect();
    // Ten heartbeats (300ms each).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<_> = metrics.iter().map(|m| count(m)).collect();
    let units_after: Vec<f64> = metrics.iter().map(|m| units(m)).collect();
    assert_eq!(env.snapshot().await.leases, settled, "no lease row written");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let d = |op: &str| a[op] - b[op];
        assert!(d("heartbeat") >= 7, "engine {i}: {a:?} vs {b:?}");
        assert!(d("load_clients") >= 7, "engine {i}: {a:?} vs {b:?}");
        // The safety net re-reads leases every 60 heartbeats: at most one in ten ticks
        // (two if the window straddles).
        assert!(d("load_leases") <= 2, "engine {i}: {a:?} vs {b:?}");
        for op in &ops[3..] {
            assert_eq!(d(op), 0, "engine {i}: {op} while idle");
        }
        // Half a unit per client read (two small rows), one unit per lease read (four
        // small rows and a shard cache, consistent).
        let read = units_after[i] - units_before[i];
        let most = 0.5 * d("load_clients") as f64 + d("load_leases") as f64;
        assert!(
            read > 0.0 && read <= most,
            "engine {i}: {read} read units in {} client reads and {} lease reads",
            d("load_clients"),
            d("load_leases")
        );
    }
    for w in workers {
        w.stop().await;
    }
    assert_eq!(env.log.distinct_ids(), want);
    assert!(
        duplicates(&env.log.all()).is_empty(),
        "graceful: no duplicates"
    );
    env.cleanup().await;
}
