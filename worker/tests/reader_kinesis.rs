//! The reading half against a real Kinesis emulator (kinesis-local in CI): ListShards
//! paging, in-order delivery, resume after a checkpoint, handler failures, shard end after
//! a reshard, stop, and a missing stream.
//!
//! Needs `AWS_ENDPOINT_URL_KINESIS`; skips with a message when it is not set, fails when it
//! is set but the emulator does not answer.

mod reader_support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::types::ScalingType;
use kcg_worker::kinesis::{ErrorKind, StreamClient};
use kcg_worker::position::Position;
use reader_support::*;

#[tokio::test]
async fn list_shards_pages_and_sorts() {
    let Some(conf) = kinesis_config("list_shards_pages_and_sorts").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("list");
    create_stream(&sdk, &name, 5).await;
    // The emulator really pages with MaxResults 2, so the loop below must follow NextToken.
    let first = sdk
        .list_shards()
        .stream_name(&name)
        .max_results(2)
        .send()
        .await
        .expect("ListShards");
    assert_eq!(first.shards().len(), 2);
    assert!(first.next_token().is_some());
    let client = StreamClient::connect(&stream_config(&name), &conf)
        .await
        .expect("connect")
        .with_list_page_size(2);
    let shards = client.list_shards().await.expect("list shards");
    let ids: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
    assert_eq!(
        ids,
        (0..5)
            .map(|i| format!("shardId-{i:012}"))
            .collect::<Vec<_>>(),
        "all 5 shards over 3 pages, sorted"
    );
    assert!(shards.iter().all(|s| !s.closed && s.parent.is_none()));
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn missing_stream_is_classified() {
    let Some(conf) = kinesis_config("missing_stream_is_classified").await else {
        return;
    };
    let name = unique("missing");
    let client = StreamClient::connect(&stream_config(&name), &conf)
        .await
        .expect("connect");
    let err = client
        .list_shards()
        .await
        .expect_err("stream does not exist");
    assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&name) && msg.contains("us-east-1") && msg.contains("spec.streams"),
        "{msg}"
    );

    // The reader reports it as an issue, keeps retrying, and stops on request.
    let handler = Recording::new();
    let mut r = start(
        Arc::new(client),
        &name,
        "shardId-000000000000",
        None,
        100,
        handler,
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        r.progress.wait_for(|p| p.issue.is_some()),
    )
    .await
    .expect("issue published")
    .expect("progress channel");
    let issue = r.progress.borrow().issue.clone().expect("issue");
    assert_eq!(issue.reason, "StreamNotFound", "{issue:?}");
    let metrics = r.metrics.clone();
    let last = stop(r).await;
    assert!(!last.ended);
    assert!(metrics.encode().contains("reason=\"StreamNotFound\""));
}

#[tokio::test]
async fn delivers_everything_in_order_and_resumes_after_checkpoint() {
    let Some(conf) = kinesis_config("delivers_everything_in_order").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("order");
    create_stream(&sdk, &name, 1).await;
    let sent = payloads("r", 60);
    let seqs = put(&sdk, &name, "k", &sent).await;
    let client = connect(&name, &conf).await;
    let shard = "shardId-000000000000";

    // From TRIM_HORIZON, 7 records per call: many batches, all in order.
    let handler = Recording::new();
    let mut r = start(client.clone(), &name, shard, None, 7, handler.clone());
    handler.wait_for(60, Duration::from_secs(30)).await;
    let want_last = seqs.last().cloned().map(Position::whole);
    tokio::time::timeout(
        Duration::from_secs(5),
        r.progress.wait_for(|p| p.acked == want_last),
    )
    .await
    .expect("acked reaches the last record")
    .expect("progress channel");
    assert!(r.progress.borrow().lag_at_ms.is_some());
    assert!(r.progress.borrow().millis_behind.is_some());
    let metrics = r.metrics.clone();
    let last = stop(r).await;
    assert_eq!(handler.payloads(), sent);
    assert_eq!(last.acked, want_last);
    assert!(!last.ended, "an open shard never ends");
    let text = metrics.encode();
    assert!(
        text.contains("kcg_worker_records_delivered_total"),
        "{text}"
    );
    assert!(
        text.contains("kcg_worker_get_records_calls_total"),
        "{text}"
    );

    // Resume after record 20: exactly records 21.. arrive, no gap, no duplicate.
    let handler = Recording::new();
    let r = start(
        client.clone(),
        &name,
        shard,
        Some(Position::whole(seqs[20].clone())),
        1000,
        handler.clone(),
    );
    handler.wait_for(39, Duration::from_secs(30)).await;
    // A little longer: nothing beyond the 39 may show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = stop(r).await;
    assert_eq!(handler.payloads(), sent[21..].to_vec());
    assert_eq!(last.acked, want_last);
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn failing_handler_is_retried_without_skipping() {
    let Some(conf) = kinesis_config("failing_handler_is_retried").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("retry");
    create_stream(&sdk, &name, 1).await;
    let sent = payloads("f", 30);
    let seqs = put(&sdk, &name, "k", &sent).await;
    let client = connect(&name, &conf).await;

    // Calls 1-3 fail, then every other call fails.
    let handler = Recording::failing(|n| n <= 3 || n % 2 == 0);
    let mut r = start(
        client,
        &name,
        "shardId-000000000000",
        None,
        10,
        handler.clone(),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        r.progress.wait_for(|p| {
            p.issue
                .as_ref()
                .is_some_and(|i| i.reason == "HandlerFailing")
        }),
    )
    .await
    .expect("HandlerFailing published")
    .expect("progress channel");
    assert_eq!(
        r.progress.borrow().acked,
        None,
        "nothing acknowledged while failing"
    );
    handler.wait_for(30, Duration::from_secs(30)).await;
    let want_last = seqs.last().cloned().map(Position::whole);
    tokio::time::timeout(
        Duration::from_secs(5),
        r.progress
            .wait_for(|p| p.acked == want_last && p.issue.is_none()),
    )
    .await
    .expect("acked at the end and issue cleared")
    .expect("progress channel");
    let metrics = r.metrics.clone();
    stop(r).await;
    assert_eq!(
        handler.payloads(),
        sent,
        "every record exactly once among accepted batches, in order"
    );
    assert!(
        metrics
            .encode()
            .contains("kcg_worker_delivery_failures_total")
    );
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn closed_shard_is_read_to_its_end() {
    let Some(conf) = kinesis_config("closed_shard_is_read_to_its_end").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("reshard");
    create_stream(&sdk, &name, 1).await;
    let sent = payloads("p", 25);
    let seqs = put(&sdk, &name, "k", &sent).await;
    sdk.update_shard_count()
        .stream_name(&name)
        .target_shard_count(2)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .expect("UpdateShardCount");
    wait_active(&sdk, &name).await;

    let client = connect(&name, &conf).await;
    let shards = client.list_shards().await.expect("list");
    let parent = shards
        .iter()
        .find(|s| s.shard_id == "shardId-000000000000")
        .expect("parent listed");
    assert!(
        parent.closed,
        "parent is closed after the reshard: {shards:?}"
    );
    let children: Vec<_> = shards
        .iter()
        .filter(|s| s.parents().any(|p| p == parent.shard_id))
        .collect();
    assert!(
        !children.is_empty() && children.iter().all(|c| !c.closed),
        "{shards:?}"
    );

    let handler = Recording::new();
    let r = start(client, &name, &parent.shard_id, None, 10, handler.clone());
    let last = tokio::time::timeout(Duration::from_secs(30), r.join)
        .await
        .expect("reader returns at shard end")
        .expect("reader task");
    assert!(last.ended, "{last:?}");
    assert_eq!(last.acked, seqs.last().cloned().map(Position::whole));
    assert_eq!(handler.payloads(), sent);
    assert!(r.progress.borrow().ended);
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn stop_returns_promptly_on_an_idle_shard() {
    let Some(conf) = kinesis_config("stop_returns_promptly").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("idle");
    create_stream(&sdk, &name, 1).await;
    let client = connect(&name, &conf).await;
    let handler = Recording::new();
    let mut r = start(
        client,
        &name,
        "shardId-000000000000",
        None,
        100,
        handler.clone(),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        r.progress.wait_for(|p| p.lag_at_ms.is_some()),
    )
    .await
    .expect("first GetRecords")
    .expect("progress channel");
    let started = std::time::Instant::now();
    let last = stop(r).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        started.elapsed()
    );
    assert_eq!(last.acked, None);
    assert!(!last.ended);
    assert_eq!(handler.len(), 0);
    delete_stream(&sdk, &name).await;
}

/// Keeps every commit token for the test to commit in any order.
struct Holding(std::sync::Mutex<Vec<(String, kcg_worker::delivery::CommitToken)>>);

impl kcg_worker::delivery::ManualBatchHandler for Holding {
    fn handle<'a>(
        &'a self,
        batch: &'a [kcg_worker::delivery::Record],
        commit: kcg_worker::delivery::CommitToken,
    ) -> futures::future::BoxFuture<'a, Result<(), kcg_worker::delivery::HandlerError>> {
        let last = batch.last().map(|r| r.sequence.clone()).unwrap_or_default();
        self.0.lock().unwrap().push((last, commit));
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn manual_commit_checkpoints_only_a_contiguous_prefix() {
    let Some(conf) = kinesis_config("manual_commit_checkpoints").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("manual");
    create_stream(&sdk, &name, 1).await;
    let seqs = put(&sdk, &name, "k", &payloads("m", 9)).await;
    let client = connect(&name, &conf).await;
    let holding = Arc::new(Holding(std::sync::Mutex::new(Vec::new())));
    struct Shared(Arc<Holding>);
    impl kcg_worker::delivery::ManualBatchHandler for Shared {
        fn handle<'a>(
            &'a self,
            batch: &'a [kcg_worker::delivery::Record],
            commit: kcg_worker::delivery::CommitToken,
        ) -> futures::future::BoxFuture<'a, Result<(), kcg_worker::delivery::HandlerError>>
        {
            self.0.handle(batch, commit)
        }
    }
    let handler = kcg_worker::delivery::ManualCommit::arc(Shared(holding.clone()));
    // 3 records per call: batches end at records 2, 5 and 8.
    let mut r = start(client, &name, "shardId-000000000000", None, 3, handler);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while holding.0.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "3 batches handed out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tokens: Vec<_> = holding.0.lock().unwrap().drain(..).collect();
    assert_eq!(
        tokens.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        vec![seqs[2].clone(), seqs[5].clone(), seqs[8].clone()]
    );
    assert_eq!(r.progress.borrow().acked, None, "nothing committed yet");
    let (_, t3) = tokens.pop().unwrap();
    let (_, t2) = tokens.pop().unwrap();
    let (_, t1) = tokens.pop().unwrap();
    t3.commit();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        r.progress.borrow().acked,
        None,
        "batch 3 alone does not move the checkpoint"
    );
    t1.commit();
    let want = Some(Position::whole(seqs[2].clone()));
    tokio::time::timeout(
        Duration::from_secs(5),
        r.progress.wait_for(|p| p.acked == want),
    )
    .await
    .expect("prefix through batch 1")
    .expect("progress");
    // Stop while batch 2 is outstanding: the reader waits for it (within the shutdown
    // bound), so the final progress includes batches 2 and 3.
    r.stop.cancel();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        t2.commit();
    });
    let last = tokio::time::timeout(Duration::from_secs(10), r.join)
        .await
        .expect("returns")
        .expect("task");
    assert_eq!(last.acked, Some(Position::whole(seqs[8].clone())));
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn http_sink_failing_for_a_while_loses_nothing() {
    use axum::http::StatusCode;
    let Some(conf) = kinesis_config("http_sink_failing_for_a_while").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("http");
    create_stream(&sdk, &name, 1).await;
    let sent = payloads("h", 20);
    let seqs = put(&sdk, &name, "k", &sent).await;

    // The sidecar answers 500 to its first 4 requests, then 200; it records accepted bodies.
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let accepted = accepted.clone();
        let requests = requests.clone();
        axum::Router::new().route(
            "/records",
            axum::routing::post(move |body: String| {
                let accepted = accepted.clone();
                let requests = requests.clone();
                async move {
                    if requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 4 {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                    let mut acc = accepted.lock().unwrap();
                    for r in v["records"].as_array().expect("records") {
                        use base64::Engine;
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(r["data"].as_str().expect("data"))
                            .expect("base64");
                        acc.push(String::from_utf8(data).expect("utf8"));
                    }
                    StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/records", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let sink =
        kcg_worker::delivery::http::HttpSink::with(&url, Duration::from_secs(2), 4).expect("sink");
    let client = connect(&name, &conf).await;
    let mut r = start(
        client,
        &name,
        "shardId-000000000000",
        None,
        10,
        Arc::new(sink),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        r.progress.wait_for(|p| {
            p.issue
                .as_ref()
                .is_some_and(|i| i.reason == "HandlerFailing")
        }),
    )
    .await
    .expect("HandlerFailing while the sidecar answers 500")
    .expect("progress");
    assert_eq!(
        r.progress.borrow().acked,
        None,
        "checkpoint does not advance while failing"
    );
    let want = seqs.last().cloned().map(Position::whole);
    tokio::time::timeout(
        Duration::from_secs(30),
        r.progress
            .wait_for(|p| p.acked == want && p.issue.is_none()),
    )
    .await
    .expect("recovers and acknowledges everything")
    .expect("progress");
    stop(r).await;
    let got = accepted.lock().unwrap().clone();
    // Nothing lost, order kept, and no repeats: every failed attempt failed on the first
    // chunk of its batch, so no chunk was accepted twice.
    assert_eq!(got, sent);
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn missing_shard_is_reported_not_skipped() {
    let Some(conf) = kinesis_config("missing_shard_is_reported").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("noshard");
    create_stream(&sdk, &name, 1).await;
    let client = connect(&name, &conf).await;
    let mut r = start(
        client,
        &name,
        "shardId-000000000042",
        None,
        100,
        Recording::new(),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        r.progress.wait_for(|p| p.issue.is_some()),
    )
    .await
    .expect("issue published")
    .expect("progress channel");
    let issue = r.progress.borrow().issue.clone().expect("issue");
    assert_eq!(issue.reason, "ShardNotFound", "{issue:?}");
    assert!(issue.message.contains("shardId-000000000042"), "{issue:?}");
    let last = stop(r).await;
    assert!(
        !last.ended,
        "a missing shard is never declared ended by the reader"
    );
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn stream_named_by_arn_uses_stream_arn_parameters() {
    let Some(conf) = kinesis_config("stream_named_by_arn").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("arn");
    create_stream(&sdk, &name, 1).await;
    let arn = sdk
        .describe_stream_summary()
        .stream_name(&name)
        .send()
        .await
        .expect("DescribeStreamSummary")
        .stream_description_summary()
        .map(|s| s.stream_arn().to_owned())
        .expect("summary");
    let sent = payloads("a", 5);
    let seqs = put(&sdk, &name, "k", &sent).await;
    // Region from the ARN; requests carry StreamARN, not StreamName.
    let client = StreamClient::connect(&stream_config(&arn), &conf)
        .await
        .expect("connect");
    assert_eq!(client.region, "us-east-1");
    assert_eq!(client.stream_name(), name);
    let shards = client.list_shards().await.expect("list by ARN");
    assert_eq!(shards.len(), 1);
    let handler = Recording::new();
    let mut r = start(
        Arc::new(client),
        &arn,
        &shards[0].shard_id,
        None,
        100,
        handler.clone(),
    );
    handler.wait_for(5, Duration::from_secs(20)).await;
    let want = seqs.last().cloned().map(Position::whole);
    tokio::time::timeout(
        Duration::from_secs(5),
        r.progress.wait_for(|p| p.acked == want),
    )
    .await
    .expect("acked")
    .expect("progress");
    stop(r).await;
    assert_eq!(handler.payloads(), sent);
    assert!(
        handler
            .accepted
            .lock()
            .unwrap()
            .iter()
            .all(|rec| *rec.stream == *arn)
    );
    delete_stream(&sdk, &name).await;
}
