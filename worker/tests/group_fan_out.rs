//! Engines reading with enhanced fan-out over a real SubscribeToShard (a private ministack
//! whose subscriptions last 2 seconds, so shards are resubscribed all along) and a real
//! DynamoDB (DynamoDB Local): two workers share the shards through one stream consumer, a
//! graceful stop hands shards over without loss or duplicates, a restarted worker resumes
//! from the checkpoints, and a split's ChildShards end the parent so its children start.
//!
//! Needs `KCG_MINISTACK_PYTHON` and `AWS_ENDPOINT_URL_DYNAMODB`; skips with a message when
//! they are not set, fails when they are set but unusable. One test: it points this test
//! process's Kinesis endpoint (`AWS_ENDPOINT_URL_KINESIS`, which the engine reads) at its
//! private ministack.

mod group_support;
#[path = "ministack_support/mod.rs"]
mod ministack_support;

use std::sync::Arc;
use std::time::Duration;

use group_support::*;
use kcg_worker::config::default_consumer_name;
use kcg_worker::health::Health;
use kcg_worker::metrics::{Metrics, StreamLabels};
use ministack_support::PrivateMinistack;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_share_shards_through_one_consumer_across_handoff_restart_and_split() {
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        eprintln!("SKIP: AWS_ENDPOINT_URL_DYNAMODB is not set (scripts/emulators.sh)");
        return;
    }
    let Some(kinesis) =
        PrivateMinistack::start("group_fan_out", &[("SUBSCRIPTION_SECONDS", 2.0)]).await
    else {
        return;
    };
    // SAFETY: the only test of this binary sets it before any engine or SDK config reads
    // the environment, and nothing else touches the environment concurrently.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_KINESIS", &kinesis.endpoint) };
    let Some(mut env) = env("efo", 4).await else {
        return;
    };
    env.fan_out = true;
    env.checkpoint_interval = "60s".into(); // releases, not periodic writes, carry handoffs
    env.client_timeout = "10s".into();

    let mut want = env.put("a", 80).await;
    let m1 = Arc::new(Metrics::new());
    let w1 = env.start_with(
        "e1",
        m1.clone(),
        Arc::new(Health::new(Duration::from_secs(30))),
    );
    let w2 = env.start("e2");
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    // Graceful stop: e2's shards move to e1, which subscribes from e2's checkpoints.
    w2.stop().await;
    env.wait_ownership(&[("e1", 4)], Duration::from_secs(15))
        .await;
    want.extend(env.put("b", 80).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    // A restarted worker resumes from the checkpoints e1 released.
    let w3 = env.start("e3");
    env.wait_ownership(&[("e1", 2), ("e3", 2)], Duration::from_secs(30))
        .await;
    want.extend(env.put("c", 80).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;

    // Split shard 0 while it is subscribed: the subscription's last event names the
    // children, the parent ends, and the children are read next. (ministack removes a
    // split parent from the stream at once, so only the open subscription sees its end.)
    env.kinesis
        .split_shard()
        .stream_name(&env.stream)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((u128::MAX / 8).to_string())
        .send()
        .await
        .expect("SplitShard");
    let parent_ended = async {
        loop {
            let snap = env.snapshot().await;
            if snap
                .leases
                .iter()
                .any(|l| l.shard_id == "shardId-000000000000" && l.ended)
                // (or already deleted as a trimmed, ended lease)
                || snap.leases.iter().all(|l| l.shard_id != "shardId-000000000000")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), parent_ended)
        .await
        .expect("the parent's lease is marked ended");
    want.extend(env.put("d", 80).await);
    env.wait_delivered(&want, Duration::from_secs(30)).await;
    let children: Vec<String> = env
        .log
        .all()
        .into_iter()
        .filter(|d| d.id.starts_with("d-"))
        .map(|d| d.shard)
        .collect();
    assert!(
        children
            .iter()
            .any(|s| s == "shardId-000000000004" || s == "shardId-000000000005"),
        "the children were read: {children:?}"
    );

    w1.stop().await;
    w3.stop().await;
    let labels = StreamLabels {
        stream: env.stream.clone(),
    };
    assert_eq!(
        m1.get_records_calls.get_or_create(&labels).get(),
        0,
        "no polling"
    );
    assert!(
        m1.subscribe_calls.get_or_create(&labels).get() >= 4,
        "e1 subscribed to its shards"
    );
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert_eq!(
        duplicates(&log).len(),
        0,
        "graceful handoffs redeliver nothing: {:?}",
        duplicates(&log)
    );
    assert_eq!(env.log.distinct_ids(), want, "nothing lost");

    // One consumer, under the group's default name, served every worker.
    let arn = env
        .kinesis
        .describe_stream_summary()
        .stream_name(&env.stream)
        .send()
        .await
        .expect("DescribeStreamSummary")
        .stream_description_summary
        .expect("summary")
        .stream_arn;
    let consumers: Vec<String> = env
        .kinesis
        .list_stream_consumers()
        .stream_arn(arn)
        .send()
        .await
        .expect("ListStreamConsumers")
        .consumers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.consumer_name)
        .collect();
    assert_eq!(consumers, vec![default_consumer_name(&env.group)]);
}
