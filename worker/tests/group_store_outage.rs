//! A state-store outage for one engine, injected by cutting a TCP relay between it and the
//! real DynamoDB (no AWS mock): the engine must not crash, must stop reading before another
//! client may take its shards (fencing), must report the outage, and must rejoin after it:
//! the leader prunes its row meanwhile, so it registers again and the group converges.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set. This file holds one test because it points the process-wide
//! `AWS_ENDPOINT_URL_DYNAMODB` at the relay while the first engine starts.

mod group_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use group_support::relay::Relay;
use group_support::*;
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_fences_readers_and_the_engine_recovers() {
    let Some(env) = env("outage", 4).await else {
        return;
    };
    let relay = Relay::to_dynamodb().await;

    // e1 reaches DynamoDB through the relay, e2 directly.
    let e1_metrics = Arc::new(Metrics::new());
    let e1_health = Arc::new(Health::new(Duration::from_secs(3)));
    let w1 = env
        .start_through(&relay, "e1", e1_metrics.clone(), e1_health.clone())
        .await;
    let w2 = env.start("e2");
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;

    let producer = Producer::start(&env);
    tokio::time::sleep(Duration::from_secs(1)).await;

    relay.cut();
    let cut_at = Instant::now();
    env.wait_ownership(&[("e2", 4)], Duration::from_secs(15))
        .await;
    let took = cut_at.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "taken over after {took:?}, before the client timeout"
    );
    let engine_survived = !w1.join.is_finished();
    // Readiness drops once no heartbeat succeeded for the stall bound (3s); the loop
    // itself keeps running (liveness) since every store call is bounded.
    let mut saw_not_ready = false;
    let mut always_live = true;
    // The leader (e2 now) prunes e1's row; e1 must register again when it is back.
    let mut e1_pruned = false;
    while cut_at.elapsed() < Duration::from_secs(6) {
        always_live &= e1_health.is_live();
        saw_not_ready |= !e1_health.is_ready();
        e1_pruned |= !env
            .snapshot()
            .await
            .clients
            .iter()
            .any(|c| base(&c.client_id) == "e1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.restore();
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let want = producer.finish().await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    let ready_again = e1_health.is_ready();
    let e1_registered_again = env
        .snapshot()
        .await
        .clients
        .iter()
        .any(|c| base(&c.client_id) == "e1");
    w1.stop().await;
    w2.stop().await;

    let log = env.log.all();
    assert_order_per_shard(&log);
    assert!(want.is_subset(&env.log.distinct_ids()), "nothing lost");
    // Never two readers at once: per shard, owners change at most twice (e1 → e2 during
    // the outage → e1 after it), and every redelivered record belongs to the run right
    // before the handoff (the un-checkpointed tail), never to older history.
    let mut first_run: BTreeMap<String, usize> = BTreeMap::new();
    let mut runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &log {
        let r = runs.entry(d.shard.clone()).or_default();
        if r.last() != Some(&d.engine) {
            r.push(d.engine.clone());
        }
        let run = r.len();
        match first_run.get(&d.id) {
            None => {
                first_run.insert(d.id.clone(), run);
            }
            Some(first) => assert_eq!(
                *first + 1,
                run,
                "{} redelivered on {} outside a handoff boundary",
                d.id,
                d.shard
            ),
        }
    }
    for (shard, r) in &runs {
        assert!(
            r.len() <= 3,
            "shard {shard} changed readers {} times: {r:?}",
            r.len() - 1
        );
    }
    assert!(
        engine_survived,
        "a failing state store must not end the engine"
    );
    assert!(e1_pruned, "e1's row was pruned while it was cut off");
    assert!(e1_registered_again, "e1 registered again after the prune");
    assert!(always_live, "e1's loop kept running during the outage");
    assert!(saw_not_ready, "e1 could not heartbeat: not ready");
    assert!(ready_again, "e1 heartbeats again after the outage");
    assert!(
        e1_metrics
            .encode()
            .contains("reason=\"StateStoreUnavailable\""),
        "the outage is counted: {}",
        e1_metrics.encode()
    );
    env.cleanup().await;
}
