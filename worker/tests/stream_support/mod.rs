//! Creating a test stream and waiting until it is ACTIVE: the one copy every emulator test
//! uses (worker tests through `reader_support`/`group_support` or directly, the operator's
//! `tests/status_live.rs` through `#[path]`). The SDK's `wait_until_stream_exists` waiter
//! polls at most every 10 s, which would add seconds to every test.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::StreamStatus;

/// Creates a stream and waits until it is ACTIVE.
pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream (is the Kinesis emulator running?)");
    wait_active(client, name).await;
}

/// Waits until the stream is ACTIVE (after create or UpdateShardCount); fails after 60 s.
pub async fn wait_active(client: &Client, name: &str) {
    let start = Instant::now();
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .expect("DescribeStreamSummary");
        if d.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active)
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stream {name} did not become ACTIVE within 60s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
