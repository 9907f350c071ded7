//! Enhanced fan-out readers on a real SubscribeToShard (a private ministack whose
//! subscriptions last 2 seconds instead of 5 minutes, so every test crosses several
//! resubscriptions): order and completeness, resuming from a checkpoint, a split's
//! ChildShards ending the parent, and one consumer shared by concurrent clients.
//!
//! Needs `KCG_MINISTACK_PYTHON` (from `scripts/emulators.sh env`); skips with a message when
//! it is not set, fails when it is set but ministack does not start.

mod reader_support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use kcg_worker::config::StreamConfig;
use kcg_worker::kinesis::StreamClient;
use kcg_worker::metrics::StreamLabels;
use reader_support::*;

/// Subscription lifetime of the private ministack, in seconds.
const SUBSCRIPTION_SECS: f64 = 2.0;

fn fan_out_config(name: &str, consumer: &str) -> StreamConfig {
    serde_yaml::from_str(&format!(
        "name: {name}\nstartPosition: TrimHorizon\nconsumer: {{mode: EnhancedFanOut, name: {consumer}}}\n"
    ))
    .expect("stream config")
}

async fn fan_out_client(
    name: &str,
    consumer: &str,
    kinesis: &PrivateMinistack,
) -> Arc<StreamClient> {
    Arc::new(
        StreamClient::connect(&fan_out_config(name, consumer), &kinesis.conf)
            .await
            .expect("connect"),
    )
}

async fn consumers(sdk: &Client, stream: &str) -> Vec<String> {
    let arn = sdk
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .expect("DescribeStreamSummary")
        .stream_description_summary
        .expect("summary")
        .stream_arn;
    sdk.list_stream_consumers()
        .stream_arn(arn)
        .send()
        .await
        .expect("ListStreamConsumers")
        .consumers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.consumer_arn)
        .collect()
}

#[tokio::test]
async fn delivers_in_order_across_resubscriptions_and_resumes_from_the_checkpoint() {
    let Some(kinesis) =
        PrivateMinistack::start("efo_order", &[("SUBSCRIPTION_SECONDS", SUBSCRIPTION_SECS)]).await
    else {
        return;
    };
    let sdk = Client::new(&kinesis.conf);
    let name = unique("efo-order");
    create_stream(&sdk, &name, 1).await;
    let first = payloads("a", 120);
    put(&sdk, &name, "k", &first).await;

    let handler = Recording::new();
    let client = fan_out_client(&name, "kcg.test.order", &kinesis).await;
    let r = start_stream(
        client.clone(),
        fan_out_config(&name, "kcg.test.order"),
        "shardId-000000000000",
        None,
        100,
        handler.clone(),
    );
    handler.wait_for(first.len(), Duration::from_secs(30)).await;
    // Records written while subscriptions end and are renewed.
    let mut second = Vec::new();
    for round in 0..3 {
        let batch = payloads(&format!("b{round}"), 10);
        put(&sdk, &name, "k", &batch).await;
        second.extend(batch);
        tokio::time::sleep(Duration::from_secs_f64(SUBSCRIPTION_SECS * 0.7)).await;
    }
    let want: Vec<String> = first.iter().chain(&second).cloned().collect();
    handler.wait_for(want.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handler.payloads(), want, "everything once, in order");
    let subscribes = r
        .metrics
        .subscribe_calls
        .get_or_create(&StreamLabels {
            stream: name.clone(),
        })
        .get();
    assert!(
        subscribes >= 2,
        "subscriptions last {SUBSCRIPTION_SECS}s, the test ran longer: the reader must have \
         subscribed again (got {subscribes} subscribe calls)"
    );
    assert!(
        r.progress.borrow().issue.is_none(),
        "no issue: {:?}",
        r.progress.borrow().issue
    );
    assert!(
        r.progress.borrow().millis_behind.is_some(),
        "lag is reported"
    );
    let last = stop(r).await;
    let checkpoint = last
        .acked
        .clone()
        .expect("the reader reports its checkpoint");
    assert_eq!(
        Some(&checkpoint),
        handler
            .accepted
            .lock()
            .unwrap()
            .last()
            .map(|r| r.position())
            .as_ref(),
        "the checkpoint is the last delivered record"
    );
    assert!(!last.ended, "an open shard never ends");

    // A new reader (a restart, or the next owner) starts after the checkpoint.
    let third = payloads("c", 7);
    put(&sdk, &name, "k", &third).await;
    let again = Recording::new();
    let r2 = start_stream(
        fan_out_client(&name, "kcg.test.order", &kinesis).await,
        fan_out_config(&name, "kcg.test.order"),
        "shardId-000000000000",
        Some(checkpoint),
        100,
        again.clone(),
    );
    again.wait_for(third.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        again.payloads(),
        third,
        "only what came after the checkpoint"
    );
    stop(r2).await;
    assert_eq!(
        consumers(&sdk, &name).await.len(),
        1,
        "one consumer for both readers"
    );
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn a_split_ends_the_parent_through_child_shards() {
    let Some(kinesis) =
        PrivateMinistack::start("efo_split", &[("SUBSCRIPTION_SECONDS", SUBSCRIPTION_SECS)]).await
    else {
        return;
    };
    let sdk = Client::new(&kinesis.conf);
    let name = unique("efo-split");
    create_stream(&sdk, &name, 1).await;
    let before = payloads("p", 30);
    put(&sdk, &name, "k", &before).await;
    let handler = Recording::new();
    let r = start_stream(
        fan_out_client(&name, "kcg.test.split", &kinesis).await,
        fan_out_config(&name, "kcg.test.split"),
        "shardId-000000000000",
        None,
        100,
        handler.clone(),
    );
    handler
        .wait_for(before.len(), Duration::from_secs(30))
        .await;
    // ministack drops a split parent at once (its GetRecords and new subscriptions find no
    // shard): only the subscription open at the split sees the end, as its last event with
    // the ChildShards. So split while the reader is subscribed and has everything.
    sdk.split_shard()
        .stream_name(&name)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("SplitShard");
    let last = tokio::time::timeout(Duration::from_secs(10), r.join)
        .await
        .expect("the reader returns at the shard's end")
        .expect("reader task");
    assert!(
        last.ended,
        "the parent is marked ended: its children may start"
    );
    assert_eq!(
        handler.payloads(),
        before,
        "every parent record, once, in order"
    );
    assert_eq!(
        last.acked.as_ref(),
        handler
            .accepted
            .lock()
            .unwrap()
            .last()
            .map(|r| r.position())
            .as_ref()
    );
    delete_stream(&sdk, &name).await;
}

/// Workers starting together (one client each) converge on one consumer; a consumer that
/// is already registered is reused; a deregistered one is registered again after
/// `forget_consumer`.
#[tokio::test]
async fn concurrent_clients_share_one_consumer() {
    let Some(kinesis) = PrivateMinistack::start("efo_consumer", &[]).await else {
        return;
    };
    let sdk = Client::new(&kinesis.conf);
    let name = unique("efo-consumer");
    create_stream(&sdk, &name, 1).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(fan_out_client(&name, "kcg.test.shared", &kinesis).await);
    }
    let arns = futures::future::join_all(clients.iter().map(|c| c.consumer_arn("kcg.test.shared")))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("every client gets the consumer");
    assert!(arns.windows(2).all(|w| w[0] == w[1]), "{arns:?}");
    assert_eq!(consumers(&sdk, &name).await, vec![arns[0].clone()]);

    // Deregistered behind the workers' back: a client that forgets it registers it anew.
    assert!(
        clients[0]
            .deregister_consumer("kcg.test.shared")
            .await
            .expect("deregister")
    );
    assert!(consumers(&sdk, &name).await.is_empty());
    assert!(
        !clients[0]
            .deregister_consumer("kcg.test.shared")
            .await
            .expect("idempotent"),
        "nothing left to deregister"
    );
    clients[1].forget_consumer().await;
    let again = clients[1]
        .consumer_arn("kcg.test.shared")
        .await
        .expect("re-registered");
    assert_eq!(consumers(&sdk, &name).await, vec![again.clone()]);
    // A fresh client reuses it.
    let fresh = fan_out_client(&name, "kcg.test.shared", &kinesis).await;
    assert_eq!(
        fresh.consumer_arn("kcg.test.shared").await.expect("reused"),
        again
    );
    assert_eq!(consumers(&sdk, &name).await.len(), 1);
    delete_stream(&sdk, &name).await;
}

/// The shard's previous subscription is still open (a previous owner that vanished without
/// closing it): Kinesis refuses a new one (ResourceInUse) for a while. The reader retries
/// with backoff and then reads everything, in order.
#[tokio::test]
async fn a_subscription_still_held_elsewhere_is_retried() {
    let Some(kinesis) = PrivateMinistack::start("efo_in_use", &[]).await else {
        return;
    };
    let sdk = Client::new(&kinesis.conf);
    let name = unique("efo-in-use");
    create_stream(&sdk, &name, 1).await;
    let records = payloads("r", 20);
    put(&sdk, &name, "k", &records).await;
    let client = fan_out_client(&name, "kcg.test.inuse", &kinesis).await;
    let arn = client
        .consumer_arn("kcg.test.inuse")
        .await
        .expect("consumer");
    // The "previous owner": a subscription opened with the plain SDK and kept open.
    let held = sdk
        .subscribe_to_shard()
        .consumer_arn(&arn)
        .shard_id("shardId-000000000000")
        .starting_position(
            aws_sdk_kinesis::types::StartingPosition::builder()
                .r#type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .build()
                .expect("position"),
        )
        .send()
        .await
        .expect("the first subscription");

    let handler = Recording::new();
    let r = start_stream(
        client,
        fan_out_config(&name, "kcg.test.inuse"),
        "shardId-000000000000",
        None,
        100,
        handler.clone(),
    );
    handler
        .wait_for(records.len(), Duration::from_secs(30))
        .await;
    let in_use = r
        .metrics
        .errors
        .get_or_create(&kcg_worker::metrics::ReasonLabels {
            reason: "ResourceInUse".into(),
        })
        .get();
    assert!(
        in_use >= 1,
        "the reader must have met the held subscription (ResourceInUse)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handler.payloads(), records, "everything once, in order");
    drop(held);
    stop(r).await;
    delete_stream(&sdk, &name).await;
}
