//! The leader deletes the lease rows of trimmed shards only once the shard cache that no
//! longer lists them is written. Deleted first, a failed (or crashed) cache write would
//! leave a cached shard without its `ended` row: members would take it for a new shard,
//! claim it (creating its row again, never ended, never deleted) and try to read a shard
//! that no longer exists.
//!
//! The cache write is made to fail by a TCP relay between the engine and the real DynamoDB
//! that refuses requests carrying the cache's key. Needs `AWS_ENDPOINT_URL_DYNAMODB` and
//! `AWS_ENDPOINT_URL_KINESIS`; skips with a message when they are not set. This file holds
//! one test because it points the process-wide `AWS_ENDPOINT_URL_DYNAMODB` at the relay.

mod group_support;

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use group_support::relay::Relay;
use group_support::*;
use kcg_worker::kinesis::StreamClient;
use kcg_worker::position::Position;
use kcg_worker::store::CheckpointUpdate;
use kcg_worker::store::schema::{ShardCacheRow, ShardInfo, shards_sk};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trimmed_leases_are_deleted_only_after_the_new_cache_is_written() {
    let Some(env) = env("trimmed", 2).await else {
        return;
    };
    let gone = "shardId-000000000099";
    // What an earlier leader left: a cache that still lists a shard since trimmed from the
    // stream, and that shard's row, read to its end and released.
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let stream_config = env.config().streams[0].clone();
    let client = StreamClient::connect(&stream_config, &conf)
        .await
        .expect("connect");
    let mut shards = client.list_shards().await.expect("list shards");
    shards.push(ShardInfo {
        shard_id: gone.into(),
        parent: None,
        adjacent_parent: None,
        closed: true,
        starting_sequence: None,
    });
    env.store
        .put_shard_cache(&ShardCacheRow {
            pk: env.group.clone(),
            sk: shards_sk(&env.stream),
            stream: env.stream.clone(),
            shards,
            refreshed_at_ms: 0,
            refreshed_by: "old-leader".into(),
        })
        .await
        .expect("cache");
    let row = env
        .store
        .claim_lease(&env.group, &env.stream, gone, "old-leader", None)
        .await
        .expect("claim");
    let end = CheckpointUpdate {
        position: Some(Position::whole("1")),
        ended: true,
        ..CheckpointUpdate::default()
    };
    env.store
        .release_lease(
            &env.group,
            &env.stream,
            gone,
            "old-leader",
            row.lease_counter,
            &end,
        )
        .await
        .expect("release");

    // The new leader's cache write fails on its way to DynamoDB for a while.
    let relay = Relay::to_dynamodb().await;
    relay.refuse(&shards_sk(&env.stream));
    // SAFETY: this test binary runs this single test; nothing else reads the environment
    // concurrently except the engine we are starting.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", relay.url()) };
    let want = env.put("a", 20).await;
    let w1 = env.start("e1");
    let start = Instant::now();
    while relay.refused_requests() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the leader never wrote the cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few ticks with the cache write failing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.allow();

    // Once the cache no longer lists it, the trimmed shard's row goes, and nothing brings
    // it back.
    let start = Instant::now();
    loop {
        let snap = env.snapshot().await;
        let cached = snap
            .shard_caches
            .iter()
            .any(|c| c.shards.iter().any(|s| s.shard_id == gone));
        let row = snap.leases.iter().find(|l| l.shard_id == gone);
        if !cached && row.is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "trimmed shard cached: {cached}, its row: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.wait_delivered(&want, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !env.snapshot()
            .await
            .leases
            .iter()
            .any(|l| l.shard_id == gone),
        "the trimmed shard's row came back"
    );
    w1.stop().await;
    env.cleanup().await;
}
