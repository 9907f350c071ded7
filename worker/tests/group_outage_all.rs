//! Issue 9, "store outage": DynamoDB is out for the whole group, longer than the client
//! timeout. Nobody could heartbeat, so nobody may be judged dead for it: no client is
//! pruned, every lease keeps its owner (its counter moves at most once, by the owner's own
//! resume after its readers fenced), nothing is lost. A worker that really died during the
//! outage is still declared dead (pruned) one client timeout after the store is back, and
//! its shards are taken over.
//!
//! Each engine reaches DynamoDB through its own TCP relay (no AWS mock), so the store can
//! come back for one engine before the others, as reconnects do: the first one back must
//! not declare the others dead before they had a chance to heartbeat.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set. This file holds one test because it points the process-wide
//! `AWS_ENDPOINT_URL_DYNAMODB` at a relay while each engine starts.

mod group_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use group_support::relay::Relay;
use group_support::*;
use kcg_worker::metrics::Metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_seen_by_all_kills_nobody_but_the_dead() {
    let Some(env) = env("outageall", 6).await else {
        return;
    };
    let names = ["e1", "e2", "e3"];
    let mut relays = Vec::new();
    let mut workers = Vec::new();
    for name in names {
        let relay = Relay::to_dynamodb().await;
        let metrics = Arc::new(Metrics::new());
        workers.push(
            env.start_through(&relay, name, metrics, default_health())
                .await,
        );
        relays.push(relay);
    }
    env.wait_ownership(&[("e1", 2), ("e2", 2), ("e3", 2)], Duration::from_secs(30))
        .await;
    let producer = Producer::start(&env);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let timeout = Duration::from_secs(3); // the harness's clientTimeout
    let outage = timeout + Duration::from_secs(2);

    // 1. Everyone survives the outage. e1 (the leader: lowest id) is back first, e2 one
    // second later and e3 two, all within the client timeout of e1's first good read.
    let before = leases(&env).await;
    let cut_1 = Instant::now();
    for r in &relays {
        r.cut();
    }
    tokio::time::sleep(outage).await;
    for r in &relays {
        r.restore();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut pruned = BTreeSet::new();
    let mut moved = BTreeSet::new();
    let settle = Instant::now();
    while settle.elapsed() < timeout * 2 {
        let snap = env.snapshot().await;
        for name in names {
            if !snap.clients.iter().any(|c| base(&c.client_id) == name) {
                pruned.insert(name);
            }
        }
        for l in &snap.leases {
            let (was, counter) = &before[&l.shard_id];
            let owner = base(l.owner.as_deref().unwrap_or(""));
            if &owner != was || l.lease_counter > counter + 1 {
                moved.insert(format!(
                    "{} {was}@{counter} -> {owner:?}@{}",
                    l.shard_id, l.lease_counter
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pruned.is_empty(), "pruned after the outage: {pruned:?}");
    // A lease's counter may move once: its owner resumes it after its readers fenced.
    assert!(moved.is_empty(), "leases that changed hands: {moved:?}");

    // 2. e3 dies during a second outage: once the store is back (for e1 first, e2 a second
    // later), its shards are taken over about one client timeout after e1's first good
    // read, and still nobody else is pruned.
    let cut_2 = Instant::now();
    for r in &relays {
        r.cut();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    workers.pop().expect("e3").crash().await;
    tokio::time::sleep(outage.saturating_sub(cut_2.elapsed())).await;
    relays[0].restore();
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    relays[1].restore();
    let mut taken_over_after = None;
    let mut e3_pruned_after = None;
    while back_at.elapsed() < timeout * 3 && taken_over_after.is_none() {
        let snap = env.snapshot().await;
        if e3_pruned_after.is_none() && !snap.clients.iter().any(|c| base(&c.client_id) == "e3") {
            e3_pruned_after = Some(back_at.elapsed());
        }
        for name in ["e1", "e2"] {
            if !snap.clients.iter().any(|c| base(&c.client_id) == name) {
                pruned.insert(name);
            }
        }
        let e3_left = snap
            .leases
            .iter()
            .filter(|l| l.owner.as_deref().is_none_or(|o| base(o) == "e3"))
            .count();
        if e3_left == 0 {
            taken_over_after = Some(back_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = producer.finish().await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    for w in workers {
        w.stop().await;
    }
    assert!(
        pruned.is_empty(),
        "pruned after the second outage: {pruned:?}"
    );
    // The leader declares e3 dead one client timeout after its own first good read.
    let pruned_after = e3_pruned_after.expect("e3 was never pruned");
    assert!(
        pruned_after >= timeout && pruned_after <= timeout + Duration::from_millis(1500),
        "e3 pruned {pruned_after:?} after the store came back"
    );
    // Its shards follow; a member that still saw e3 alive when its row vanished waits one
    // more client timeout from then (the rule for vanished rows), hence the bound.
    let took = taken_over_after.expect("e3's shards were never taken over");
    assert!(
        took <= timeout * 2 + Duration::from_millis(1500),
        "e3's shards taken over {took:?} after the store came back"
    );

    let log = env.log.all();
    assert_order_per_shard(&log);
    assert!(want.is_subset(&env.log.distinct_ids()), "nothing lost");
    // Duplicates are bounded: only what was delivered after the last checkpoint before an
    // outage (checkpointInterval 500 ms, plus a tick) is delivered again, and at most once.
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &log {
        *count.entry(d.id.as_str()).or_default() += 1;
    }
    for d in duplicates(&log) {
        assert!(
            count[d.id.as_str()] <= 2,
            "{} delivered {} times",
            d.id,
            count[d.id.as_str()]
        );
        let first = log.iter().find(|x| x.id == d.id).expect("first delivery");
        let near_a_cut = [cut_1, cut_2].iter().any(|cut| {
            first.when + Duration::from_millis(1500) >= *cut && first.when <= *cut + outage
        });
        assert!(
            near_a_cut,
            "{} redelivered, but first delivered long before an outage",
            d.id
        );
    }
}

/// Every lease's owner (client base name) and counter, by shard id.
async fn leases(env: &Env) -> BTreeMap<String, (String, u64)> {
    env.snapshot()
        .await
        .leases
        .into_iter()
        .map(|l| {
            let owner = base(l.owner.as_deref().unwrap_or(""));
            (l.shard_id, (owner, l.lease_counter))
        })
        .collect()
}
