//! Shared helpers of the kcg benchmarks and the demo producer, and the benchmarks
//! themselves (`kcg-bench` only parses options and prints the table).

pub mod cost;
pub mod e2e;
pub mod failover;
pub mod micro;
pub mod operator;
pub mod rebalance;
pub mod relay;
pub mod report;
pub mod scale;
pub mod sink;
pub mod support;

use std::time::Duration;

use anyhow::Context;
use aws_sdk_kinesis::types::StreamStatus;

/// Creates `stream` with `shards` shards unless it exists, then waits until it is ACTIVE.
pub async fn ensure_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: i32,
) -> anyhow::Result<()> {
    let exists = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .is_ok();
    if !exists {
        client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
            .with_context(|| format!("creating stream {stream}"))?;
    }
    for _ in 0..120 {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .with_context(|| format!("describing stream {stream}"))?;
        if summary
            .stream_description_summary()
            .is_some_and(|d| d.stream_status() == &StreamStatus::Active)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("stream {stream} did not become ACTIVE within 30s")
}

/// Deletes `stream` if it exists and waits until it is gone (the emulators cap the shards of
/// an account, so a demo or a benchmark gives its shards back).
pub async fn delete_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> anyhow::Result<()> {
    let exists = |c: &aws_sdk_kinesis::Client| {
        let c = c.clone();
        let stream = stream.to_owned();
        async move {
            c.describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .is_ok()
        }
    };
    if !exists(client).await {
        return Ok(());
    }
    client
        .delete_stream()
        .stream_name(stream)
        .enforce_consumer_deletion(true)
        .send()
        .await
        .with_context(|| format!("deleting stream {stream}"))?;
    for _ in 0..120 {
        if !exists(client).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("stream {stream} was not deleted within 30s")
}
