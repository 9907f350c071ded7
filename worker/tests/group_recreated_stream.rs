//! A stream deleted and recreated under the same name while its group runs: the new
//! stream reuses the shard ids, so it meets the lease rows of the deleted one. Its shards
//! must all be read (an old `ended` row must not block one), from the group's start
//! position (never from a checkpoint of the deleted stream).
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set.

mod group_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use group_support::*;

async fn wait_gone(env: &Env) {
    let start = Instant::now();
    while env
        .kinesis
        .describe_stream_summary()
        .stream_name(&env.stream)
        .send()
        .await
        .is_ok()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stream not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starting sequence number of every shard of the stream, as Kinesis lists them now.
async fn starts(env: &Env) -> BTreeMap<String, String> {
    let out = env
        .kinesis
        .list_shards()
        .stream_name(&env.stream)
        .send()
        .await
        .expect("list shards");
    out.shards()
        .iter()
        .map(|s| {
            let start = s
                .sequence_number_range()
                .map(|r| r.starting_sequence_number().to_owned())
                .unwrap_or_default();
            (s.shard_id().to_owned(), start)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_recreated_under_its_name_is_read_whole_from_its_start_position() {
    let Some(env) = env("recreate", 1).await else {
        return;
    };
    // The first incarnation: one shard split in two, so the group holds an `ended` row
    // (shard 0) and rows with checkpoints (shards 1 and 2).
    let old = env.put("a", 20).await;
    let w1 = env.start("e1");
    env.wait_delivered(&old, Duration::from_secs(30)).await;
    reshard(&env, 2).await;
    let old2 = env.put("a2", 20).await;
    env.wait_delivered(&old2, Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let row = |id: &str| snap.leases.iter().find(|l| l.shard_id == id).cloned();
        let ended0 = row("shardId-000000000000").is_some_and(|l| l.ended);
        let checkpointed = ["shardId-000000000001", "shardId-000000000002"]
            .iter()
            .all(|id| row(id).is_some_and(|l| l.checkpoint.is_some()));
        if ended0 && checkpointed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the first incarnation's rows never ended / checkpointed: {:?}",
            snap.leases
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleted and recreated with three shards (ids 0, 1, 2 again) while the group runs.
    env.kinesis
        .delete_stream()
        .stream_name(&env.stream)
        .send()
        .await
        .expect("delete stream");
    wait_gone(&env).await;
    create_stream(&env.kinesis, &env.stream, 3).await;
    let new = env.put("b", 30).await;
    env.wait_delivered(&new, Duration::from_secs(30)).await;

    // The rows now belong to the new shards.
    let listed = starts(&env).await;
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let stamped: BTreeMap<String, String> = snap
            .leases
            .iter()
            .filter(|l| listed.contains_key(&l.shard_id) && !l.ended)
            .filter_map(|l| Some((l.shard_id.clone(), l.shard_start.clone()?)))
            .collect();
        if stamped == listed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lease rows {:?}, listed shards {listed:?}",
            snap.leases
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A restart goes on from the new stream's checkpoints.
    w1.stop().await;
    let more = env.put("c", 30).await;
    let w2 = env.start("e2");
    env.wait_delivered(&more, Duration::from_secs(30)).await;
    w2.stop().await;
    let log = env.log.all();
    let b_redelivered = log
        .iter()
        .filter(|d| d.engine == "e2" && new.contains(&d.id))
        .count();
    assert_eq!(b_redelivered, 0, "e2 resumed after e1's final checkpoints");
    assert_order_per_shard(&log);
    env.cleanup().await;
}
