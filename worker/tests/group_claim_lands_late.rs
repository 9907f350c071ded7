//! A claim that timed out can still land, later than the claimer's next read of its row:
//! it waited in a connection, a proxy or the store's queue. If the plan moved the shard to
//! another client meanwhile, the claimer, alive, owns a lease it does not read, and the
//! planned owner waits on it. Seen at 1,000 shards during a group's start: 5 shards waited
//! until the safety net (every lease row read every 600 ticks).
//!
//! The claimer now reads the row of every claim without an answer at each tick for a
//! client timeout, so it sees the late write and releases the shard to its planned owner.
//!
//! Each engine reaches DynamoDB through its own TCP relay (no AWS mock), which passes
//! their claims of one shard on 2.5 s late: past the 1 s store-call bound, so each claim
//! times out and lands afterwards. Needs `AWS_ENDPOINT_URL_DYNAMODB` and
//! `AWS_ENDPOINT_URL_KINESIS`; skips with a message when they are not set. One test in
//! this file: it points the process-wide `AWS_ENDPOINT_URL_DYNAMODB` at a relay while each
//! engine starts.

mod group_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use group_support::relay::Relay;
use group_support::*;
use kcg_worker::metrics::Metrics;
use kcg_worker::store::schema::lease_sk;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_lands_late_is_released_to_its_planned_owner() {
    let Some(env) = env("claimlate", 2).await else {
        return;
    };
    let shard = "shardId-000000000001";
    // A claim (and nothing else) writes firstClaimedAtMs; the sort key names the shard.
    let sk = lease_sk(&env.stream, shard);
    let claim_of_shard = ["firstClaimedAtMs", sk.as_str()];
    let late = Duration::from_millis(2500);
    let relay_a = Relay::to_dynamodb().await;
    relay_a.delay(&claim_of_shard, late);
    let relay_b = Relay::to_dynamodb().await;
    relay_b.delay(&claim_of_shard, late);

    // a, alone, plans both shards for itself and claims them.
    let a = env
        .start_through(&relay_a, "a", Arc::new(Metrics::new()), default_health())
        .await;
    let started = Instant::now();
    while relay_a.delayed_requests() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a never claimed {shard}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While that claim is on its way, b joins: from a's next tick on, the plan gives the
    // shard to b (clients "a-…" < "b-…", two shards, one each). a's claim times out after
    // 1 s, a reads the row (still unowned), then the claim lands, naming a. b's own claims
    // land later still and are refused: the row names a, which is alive.
    let b = env
        .start_through(&relay_b, "b", Arc::new(Metrics::new()), default_health())
        .await;

    let within = Duration::from_secs(15);
    let waited = Instant::now();
    let row = loop {
        let snap = env.snapshot().await;
        let row = snap
            .leases
            .into_iter()
            .find(|l| l.shard_id == shard)
            .expect("the shard's lease row");
        if row.owner.as_deref().map(base).as_deref() == Some("b") {
            break row;
        }
        assert!(
            waited.elapsed() < within,
            "{shard} still owned by {:?} {within:?} after b joined (a holds it without reading it)",
            row.owner
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The race happened: a's claim landed before b's (its counter step is in the row), and
    // b's claims were delayed too.
    assert!(
        row.lease_counter >= 2,
        "b claimed a row nobody held (counter {}): a's late claim never landed first",
        row.lease_counter
    );
    assert!(
        relay_b.delayed_requests() >= 1,
        "b's claims were not delayed"
    );

    // And the shard is read by its owner: records put now arrive.
    let want = env.put("late", 20).await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    a.stop().await;
    b.stop().await;
}
