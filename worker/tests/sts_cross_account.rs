//! Cross-account reading through STS AssumeRole, against ministack (which serves both STS
//! and Kinesis and keeps resources of an assumed role's account 111111111111 apart from the
//! default credentials' account).
//!
//! Needs `AWS_ENDPOINT_URL_STS`; skips with a message when it is not set, fails when it is
//! set but ministack does not answer. Kinesis traffic of this test goes to the STS endpoint
//! too (kinesis-local has no accounts), so this binary points AWS_ENDPOINT_URL_KINESIS there.

mod reader_support;

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::sts::AssumeRoleProvider;
use aws_sdk_kinesis::config::SharedCredentialsProvider;
use kcg_worker::kinesis::{ErrorKind, StreamClient};
use kcg_worker::metrics::Metrics;
use kcg_worker::position::Position;
use kcg_worker::reader::{ShardProgress, ShardTask, read_shard};
use reader_support::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const ROLE: &str = "arn:aws:iam::111111111111:role/kcg-reader";

#[tokio::test]
async fn assumed_role_reads_a_stream_default_credentials_cannot_see() {
    let Ok(sts) = std::env::var("AWS_ENDPOINT_URL_STS") else {
        eprintln!(
            "SKIP assumed_role_reads...: AWS_ENDPOINT_URL_STS is not set (start ministack, see scripts/emulators.sh)"
        );
        return;
    };
    // SAFETY: the only test in this binary, run before any SDK client reads the environment.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_KINESIS", &sts) };
    let base = aws_config::defaults(BehaviorVersion::latest()).load().await;

    // The "other account": a Kinesis client on credentials assumed from the role.
    let assumed = AssumeRoleProvider::builder(ROLE)
        .session_name("kcg-test-producer")
        .configure(&base)
        .build()
        .await;
    let other = aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&base)
            .credentials_provider(SharedCredentialsProvider::new(assumed))
            .build(),
    );
    let name = unique("xacct");
    create_stream(&other, &name, 1).await;
    let sent = payloads("x", 12);
    let seqs = put(&other, &name, "k", &sent).await;

    // Default credentials: the stream is not there.
    let plain = StreamClient::connect(&stream_config(&name), &base)
        .await
        .expect("connect");
    let err = plain
        .list_shards()
        .await
        .expect_err("invisible to the default account");
    assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{err}");

    // With roleArn: listed and read.
    let mut cfg = stream_config(&name);
    cfg.role_arn = Some(ROLE.into());
    let client = Arc::new(
        StreamClient::connect(&cfg, &base)
            .await
            .expect("connect with role"),
    );
    let shards = client.list_shards().await.expect("list through the role");
    assert_eq!(shards.len(), 1);

    // Named by ARN (StreamARN parameters) with the role as well.
    let mut by_arn = cfg.clone();
    by_arn.name = format!("arn:aws:kinesis:us-east-1:111111111111:stream/{name}");
    let arn_client = StreamClient::connect(&by_arn, &base)
        .await
        .expect("connect by ARN");
    assert_eq!(arn_client.list_shards().await.expect("list by ARN"), shards);

    let handler = Recording::new();
    let (tx, mut rx) = watch::channel(ShardProgress::default());
    let stop = CancellationToken::new();
    let task = ShardTask {
        client: client.clone(),
        stream: cfg.clone(),
        shard_id: shards[0].shard_id.clone(),
        checkpoint: None,
        failure: Default::default(),
        fence: kcg_worker::fence::Fence::open(),
        lease_counter: 1,
    };
    let join = tokio::spawn(read_shard(
        task,
        tuning(100),
        handler.clone(),
        Arc::new(Metrics::new()),
        tx,
        stop.clone(),
    ));
    handler.wait_for(sent.len(), Duration::from_secs(20)).await;
    let want = seqs.last().cloned().map(Position::whole);
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|p| p.acked == want))
        .await
        .expect("acked")
        .expect("progress");
    stop.cancel();
    let last = tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("stops")
        .expect("task");
    assert_eq!(last.acked, want);
    assert_eq!(handler.payloads(), sent);
    other
        .delete_stream()
        .stream_name(&name)
        .send()
        .await
        .expect("DeleteStream");
}
