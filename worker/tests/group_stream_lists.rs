//! A rollout that changes the stream list: for a while, old and new workers of one group
//! read different streams. Every shard of every stream some live worker reads must have an
//! owner meanwhile, and the planners must agree (no lease moving back and forth).
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set.

mod group_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use group_support::*;

/// Owned shards per (stream, client base name).
async fn owners(env: &Env) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for l in env.snapshot().await.leases {
        if let Some(o) = l.owner {
            *out.entry((l.stream, base(&o))).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_with_different_stream_lists_read_every_shard_without_ping_pong() {
    let Some(mut env) = env("lists", 4).await else {
        return;
    };
    let a = env.stream.clone();
    let b = format!("{a}-b");
    create_stream(&env.kinesis, &b, 2).await;
    env.extra_streams.push(b.clone());
    let mut want = env.put("a", 40).await;
    want.extend(env.put_to(&b, "b", 20).await);

    // e1 (the lowest client id: the group's leader) reads A only, as an old pod would;
    // e2 reads B and A, in that order, as a new pod would.
    let w1 = env.start_reading("e1", std::slice::from_ref(&a));
    let w2 = env.start_reading("e2", &[b.clone(), a.clone()]);
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    let expected: BTreeMap<(String, String), usize> = [
        ((a.clone(), "e1".to_owned()), 2),
        ((a.clone(), "e2".to_owned()), 2),
        ((b.clone(), "e2".to_owned()), 2),
    ]
    .into_iter()
    .collect();
    let start = Instant::now();
    loop {
        let got = owners(&env).await;
        if got == expected {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "owners {got:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Settled: no lease changes hands any more (every claim and release moves its counter).
    let counters = |snap: kcg_worker::store::schema::GroupSnapshot| {
        snap.leases
            .into_iter()
            .map(|l| ((l.stream, l.shard_id), (l.owner, l.lease_counter)))
            .collect::<BTreeMap<_, _>>()
    };
    let before = counters(env.snapshot().await);
    let more = env.put("c", 40).await;
    want.extend(more);
    want.extend(env.put_to(&b, "d", 20).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counters(env.snapshot().await),
        before,
        "leases moved after the group settled"
    );

    w1.stop().await;
    w2.stop().await;
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert_eq!(env.log.distinct_ids(), want, "nothing lost");
    assert_eq!(
        duplicates(&log).len(),
        0,
        "graceful handoffs only: {:?}",
        duplicates(&log)
    );
    env.cleanup().await;
}
