//! `consumer.onDelete: Deregister` against a real Kinesis consumer API (a private
//! ministack): only the enhanced fan-out streams marked Deregister lose their consumer,
//! under the name the workers use, and a second run (or a stream already gone) is a no-op.
//! Skips with a message without `KCG_MINISTACK_PYTHON`; fails when it is set but ministack
//! does not start.

#[path = "../worker/tests/ministack_support/mod.rs"]
mod ministack_support;

use aws_sdk_kinesis::Client;
use kcg_operator::consumer_admin::deregister;
use kcg_worker::config::StreamConfig;
use kcg_worker::kinesis::StreamClient;
use ministack_support::PrivateMinistack;

async fn consumer_names(sdk: &Client, stream: &str) -> Vec<String> {
    let arn = sdk
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .expect("DescribeStreamSummary")
        .stream_description_summary
        .expect("summary")
        .stream_arn;
    let mut names: Vec<String> = sdk
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
    names.sort();
    names
}

#[tokio::test]
async fn deregisters_only_the_consumers_marked_deregister() {
    let Some(kinesis) = PrivateMinistack::start("consumer_admin", &[]).await else {
        return;
    };
    let sdk = Client::new(&kinesis.conf);
    let id = std::process::id();
    let (gone, kept) = (
        format!("kcg-admin-gone-{id}"),
        format!("kcg-admin-kept-{id}"),
    );
    for s in [&gone, &kept] {
        sdk.create_stream()
            .stream_name(s)
            .shard_count(1)
            .send()
            .await
            .expect("CreateStream");
    }
    let streams: Vec<StreamConfig> = serde_yaml::from_str(&format!(
        "- {{name: {gone}, consumer: {{mode: EnhancedFanOut, onDelete: Deregister}}}}\n\
         - {{name: {kept}, consumer: {{mode: EnhancedFanOut}}}}\n\
         - {{name: kcg-admin-missing-{id}, consumer: {{mode: EnhancedFanOut, onDelete: Deregister}}}}\n"
    ))
    .expect("streams");
    // The consumers as the workers register them (default name of group ns/g), plus one
    // of another group on the same stream.
    for (s, name) in [
        (&streams[0], "kcg.ns.g"),
        (&streams[1], "kcg.ns.g"),
        (&streams[0], "kcg.ns.other"),
    ] {
        StreamClient::connect(s, &kinesis.conf)
            .await
            .expect("connect")
            .consumer_arn(name)
            .await
            .expect("register");
    }

    let done = deregister(&kinesis.conf, "ns/g", &streams)
        .await
        .expect("deregister (a missing stream is no error)");
    assert_eq!(done, ["kcg.ns.g"], "only the marked stream's consumer");
    assert_eq!(
        consumer_names(&sdk, &gone).await,
        ["kcg.ns.other"],
        "another group's consumer stays"
    );
    assert_eq!(
        consumer_names(&sdk, &kept).await,
        ["kcg.ns.g"],
        "Retain keeps it"
    );
    assert!(
        deregister(&kinesis.conf, "ns/g", &streams)
            .await
            .expect("again")
            .is_empty(),
        "idempotent"
    );
}
