//! Poison records (issue 10): a handler that always refuses records carrying a marker.
//! With `onFailure: DeadLetter` only those records reach the dead-letter target (SQS on
//! ministack, or a Kinesis stream on kinesis-local) with the envelope, every other record is
//! delivered in order and the checkpoint moves past them; `Skip` drops and counts them;
//! `Block` keeps the shard stuck with a reason; a failing dead-letter target blocks the shard
//! (`DeadLetterFailing`) without moving the checkpoint past the poison record.
//!
//! Needs `AWS_ENDPOINT_URL_KINESIS` (kinesis-local), `AWS_ENDPOINT_URL_SQS` (ministack) and,
//! for the engine test, `AWS_ENDPOINT_URL_DYNAMODB` (DynamoDB Local), as
//! `scripts/emulators.sh env` exports them; skips with a message when one is not set.

mod reader_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::SdkConfig;
use base64::Engine as _;
use futures::future::BoxFuture;
use kcg_worker::config::{DeliveryConfig, WorkerConfig};
use kcg_worker::delivery::{BatchHandler, FailurePolicy, HandlerError, Record};
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::reader::ShardProgress;
use kcg_worker::store::StateStore;
use reader_support::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SHARD: &str = "shardId-000000000000";

/// Refuses every batch that holds a record whose payload starts with `poison`; keeps the
/// records of the batches it accepts, in order.
#[derive(Default)]
struct RefusesMarked {
    accepted: Mutex<Vec<Record>>,
}

impl RefusesMarked {
    fn payloads(&self) -> Vec<String> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8(r.data.clone()).unwrap())
            .collect()
    }

    async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.accepted.lock().unwrap().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {:?} delivered within {within:?}",
                self.payloads()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl BatchHandler for RefusesMarked {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if let Some(r) = batch.iter().find(|r| r.data.starts_with(b"poison")) {
                return Err(HandlerError::new(format!(
                    "cannot parse record {}",
                    String::from_utf8_lossy(&r.data)
                )));
            }
            self.accepted.lock().unwrap().extend_from_slice(batch);
            Ok(())
        })
    }
}

/// Shares one handler between the test and the reader.
struct Shared(Arc<RefusesMarked>);

impl BatchHandler for Shared {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.0.handle(batch)
    }
}

/// 12 payloads, `poison-03` and `poison-08` among `good-NN`.
fn mixed() -> Vec<String> {
    (0..12)
        .map(|i| {
            if i == 3 || i == 8 {
                format!("poison-{i:02}")
            } else {
                format!("good-{i:02}")
            }
        })
        .collect()
}

fn good(payloads: &[String]) -> Vec<String> {
    payloads
        .iter()
        .filter(|p| p.starts_with("good"))
        .cloned()
        .collect()
}

/// The emulators this file needs, or `None` (with a printed reason).
async fn aws(test: &str) -> Option<SdkConfig> {
    if std::env::var("AWS_ENDPOINT_URL_SQS").is_err() {
        eprintln!(
            "SKIP {test}: AWS_ENDPOINT_URL_SQS is not set (ministack, see scripts/emulators.sh)"
        );
        return None;
    }
    kinesis_config(test).await
}

/// The failure policy of a `delivery:` block (after `stdout: {}`), connected like the engine
/// does: small attempts and backoff so the test takes seconds.
async fn policy(conf: &SdkConfig, extra: &str) -> FailurePolicy {
    let yaml = format!(
        "stdout: {{}}\nretry: {{maxAttempts: 2, backoff: {{initial: 10ms, max: 50ms}}}}\n{extra}"
    );
    let delivery: DeliveryConfig = serde_yaml::from_str(&yaml).expect("delivery config");
    FailurePolicy::connect(&delivery, "test/poison", conf)
        .await
        .expect("failure policy")
}

async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("CreateQueue")
        .queue_url()
        .expect("queue url")
        .to_owned()
}

/// Receives messages until `n` arrived (or fails after `within`); deletes nothing.
async fn receive(sqs: &aws_sdk_sqs::Client, url: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} dead letters within {within:?}: {got:?}",
            got.len()
        );
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("ReceiveMessage");
        for m in out.messages() {
            got.push(serde_json::from_str(m.body().expect("body")).expect("envelope JSON"));
        }
    }
    got
}

/// Waits until `progress` satisfies `cond`.
async fn wait_progress(
    rx: &mut tokio::sync::watch::Receiver<ShardProgress>,
    within: Duration,
    cond: impl Fn(&ShardProgress) -> bool,
) -> ShardProgress {
    let reached = tokio::time::timeout(within, rx.wait_for(|p| cond(p)))
        .await
        .ok()
        .and_then(|r| r.ok().map(|p| p.clone()));
    reached.unwrap_or_else(|| panic!("progress not reached within {within:?}: {:?}", rx.borrow()))
}

/// Checks one dead letter against the record it came from.
fn check_envelope(env: &Value, group: &str, stream: &str, payload: &str, seq: &str) {
    assert_eq!(env["kcgDeadLetter"], 1, "{env}");
    assert_eq!(env["group"], group, "{env}");
    assert_eq!(env["stream"], stream, "{env}");
    assert_eq!(env["shard"], SHARD, "{env}");
    assert_eq!(env["sequence"], seq, "{env}");
    assert_eq!(env["partitionKey"], "k", "{env}");
    assert_eq!(env["attempts"], 2, "{env}");
    assert_eq!(
        env["error"],
        format!("cannot parse record {payload}"),
        "{env}"
    );
    assert_eq!(env["dataBytes"], payload.len(), "{env}");
    let data = base64::engine::general_purpose::STANDARD
        .decode(env["data"].as_str().expect("data"))
        .expect("base64");
    assert_eq!(data, payload.as_bytes(), "{env}");
    assert!(env["deadLetteredAt"].is_string(), "{env}");
    assert!(env["arrival"].is_string(), "{env}");
}

fn counter(metrics: &Metrics, name: &str, stream: &str) -> f64 {
    let text = metrics.encode();
    let prefix = format!("{name}{{stream=\"{stream}\",shard=\"{SHARD}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.parse().expect("number"))
}

#[tokio::test]
async fn dead_letter_to_a_kinesis_stream() {
    let Some(conf) = aws("dead_letter_to_a_kinesis_stream").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let (name, dlq) = (unique("poison-src"), unique("poison-dlq"));
    create_stream(&sdk, &name, 1).await;
    create_stream(&sdk, &dlq, 1).await;
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    let failure = policy(
        &conf,
        &format!("onFailure: DeadLetter\ndeadLetter: {{kinesis: {{stream: {dlq}}}}}\n"),
    )
    .await;
    let handler = Arc::new(RefusesMarked::default());
    let client = connect(&name, &conf).await;
    let mut r = start_with(
        client,
        &name,
        SHARD,
        None,
        5,
        Arc::new(Shared(handler.clone())),
        failure,
    );
    let last = seqs.last().unwrap().clone();
    let p = wait_progress(&mut r.progress, Duration::from_secs(30), |p| {
        p.acked.as_ref().map(|a| a.sequence.as_str()) == Some(last.as_str())
    })
    .await;
    assert_eq!(
        handler.payloads(),
        good(&payloads),
        "good records, in order"
    );
    assert_eq!(
        p.issue.as_ref().map(|i| i.reason.as_str()),
        Some("RecordsDeadLettered"),
        "{p:?}"
    );
    assert_eq!(
        counter(&r.metrics, "kcg_worker_records_dead_lettered_total", &name),
        2.0
    );
    assert!(counter(&r.metrics, "kcg_worker_handler_retries_total", &name) >= 2.0);

    // The target stream holds the two poison records, in order, keyed like the source.
    let it = sdk
        .get_shard_iterator()
        .stream_name(&dlq)
        .shard_id(SHARD)
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator()
        .expect("iterator")
        .to_owned();
    let out = sdk
        .get_records()
        .shard_iterator(it)
        .send()
        .await
        .expect("GetRecords");
    let letters: Vec<(String, Value)> = out
        .records()
        .iter()
        .map(|r| {
            (
                r.partition_key().unwrap_or_default().to_owned(),
                serde_json::from_slice(r.data().as_ref()).expect("envelope"),
            )
        })
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    for ((key, env), i) in letters.iter().zip([3, 8]) {
        assert_eq!(key, "k");
        check_envelope(env, "test/poison", &name, &payloads[i], &seqs[i]);
    }
    stop(r).await;
    delete_stream(&sdk, &name).await;
    delete_stream(&sdk, &dlq).await;
}

#[tokio::test]
async fn skip_drops_and_counts_only_the_poison_records() {
    let Some(conf) = aws("skip_poison").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("poison-skip");
    create_stream(&sdk, &name, 1).await;
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    let failure = policy(&conf, "onFailure: Skip\n").await;
    let handler = Arc::new(RefusesMarked::default());
    let mut r = start_with(
        connect(&name, &conf).await,
        &name,
        SHARD,
        None,
        5,
        Arc::new(Shared(handler.clone())),
        failure,
    );
    let last = seqs.last().unwrap().clone();
    let p = wait_progress(&mut r.progress, Duration::from_secs(30), |p| {
        p.acked.as_ref().map(|a| a.sequence.as_str()) == Some(last.as_str())
    })
    .await;
    assert_eq!(handler.payloads(), good(&payloads));
    let issue = p.issue.expect("an issue while records are skipped");
    assert_eq!(issue.reason, "RecordsSkipped");
    assert!(issue.message.contains(&seqs[8]), "{}", issue.message);
    assert_eq!(
        counter(&r.metrics, "kcg_worker_records_skipped_total", &name),
        2.0
    );
    stop(r).await;
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn block_keeps_the_shard_stuck_with_a_reason() {
    let Some(conf) = aws("block_poison").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("poison-block");
    create_stream(&sdk, &name, 1).await;
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    let failure = policy(&conf, "").await;
    let handler = Arc::new(RefusesMarked::default());
    let mut r = start_with(
        connect(&name, &conf).await,
        &name,
        SHARD,
        None,
        5,
        Arc::new(Shared(handler.clone())),
        failure,
    );
    let p = wait_progress(&mut r.progress, Duration::from_secs(30), |p| {
        p.issue
            .as_ref()
            .is_some_and(|i| i.message.contains("retrying without end"))
    })
    .await;
    let issue = p.issue.clone().unwrap();
    assert_eq!(issue.reason, "HandlerFailing");
    assert!(issue.message.contains(&seqs[0]), "{}", issue.message);
    // Well past maxAttempts: still stuck on the first batch, nothing acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(counter(&r.metrics, "kcg_worker_handler_retries_total", &name) >= 4.0);
    assert_eq!(handler.payloads(), Vec::<String>::new());
    assert_eq!(r.progress.borrow().acked, None);
    assert_eq!(
        counter(&r.metrics, "kcg_worker_records_skipped_total", &name),
        0.0
    );
    stop(r).await;
    delete_stream(&sdk, &name).await;
}

#[tokio::test]
async fn failing_dead_letter_target_blocks_before_the_poison_record() {
    let Some(conf) = aws("failing_dead_letter").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let name = unique("poison-dlqfail");
    create_stream(&sdk, &name, 1).await;
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    // A queue URL like a real one, of a queue that does not exist.
    let real = create_queue(&sqs, &unique("exists")).await;
    let missing = format!("{}-missing", real);
    let failure = policy(
        &conf,
        &format!("onFailure: DeadLetter\ndeadLetter: {{sqs: {{queueUrl: \"{missing}\"}}}}\n"),
    )
    .await;
    let handler = Arc::new(RefusesMarked::default());
    let mut r = start_with(
        connect(&name, &conf).await,
        &name,
        SHARD,
        None,
        5,
        Arc::new(Shared(handler.clone())),
        failure,
    );
    let p = wait_progress(&mut r.progress, Duration::from_secs(30), |p| {
        p.issue
            .as_ref()
            .is_some_and(|i| i.reason == "DeadLetterFailing")
    })
    .await;
    let issue = p.issue.clone().unwrap();
    assert!(issue.message.contains(&seqs[3]), "{}", issue.message);
    assert!(issue.message.contains(&missing), "{}", issue.message);
    // Retried, and the checkpoint stays right before the poison record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = r.progress.borrow().clone();
    assert_eq!(
        p.acked.as_ref().map(|a| a.sequence.as_str()),
        Some(seqs[2].as_str()),
        "{p:?}"
    );
    assert_eq!(
        p.issue.as_ref().map(|i| i.reason.as_str()),
        Some("DeadLetterFailing")
    );
    assert_eq!(handler.payloads(), good(&payloads[..3]));
    assert_eq!(
        counter(&r.metrics, "kcg_worker_records_dead_lettered_total", &name),
        0.0
    );
    let text = r.metrics.encode();
    assert!(
        text.contains("kcg_worker_errors_total{reason=\"DeadLetterFailing\"}"),
        "{text}"
    );
    stop(r).await;
    delete_stream(&sdk, &name).await;
}

/// The whole worker: DynamoDB Local holds the checkpoint past the poison records and the
/// client row's reason; the dead letters arrive in SQS.
#[tokio::test]
async fn engine_dead_letters_to_sqs_and_checkpoints_past_them() {
    let Some(conf) = aws("engine_dead_letter_sqs").await else {
        return;
    };
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        eprintln!("SKIP engine_dead_letter_sqs: AWS_ENDPOINT_URL_DYNAMODB is not set");
        return;
    }
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let name = unique("poison-engine");
    let table = unique("poison-table");
    let group = format!("test/{name}");
    create_stream(&sdk, &name, 1).await;
    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&conf), table.clone());
    store.create_table().await.expect("create table");
    let queue = create_queue(&sqs, &unique("dlq")).await;
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    let config = WorkerConfig::from_yaml(&format!(
        r#"
group: {group}
streams: [{{name: {name}, startPosition: TrimHorizon}}]
stateStore: {{table: {table}}}
delivery:
  stdout: {{}}
  retry: {{maxAttempts: 2, backoff: {{initial: 10ms, max: 50ms}}}}
  onFailure: DeadLetter
  deadLetter: {{sqs: {{queueUrl: "{queue}"}}}}
tuning: {{pollInterval: 200ms, heartbeatInterval: 300ms, clientTimeout: 3s, checkpointInterval: 300ms, maxRecordsPerCall: 5, shutdownTimeout: 5s}}
"#
    ))
    .expect("config");
    let handler = Arc::new(RefusesMarked::default());
    let metrics = Arc::new(Metrics::new());
    let token = CancellationToken::new();
    let join = tokio::spawn(engine::run(
        config,
        EngineOptions {
            client_id: Some("dlq".into()),
            pod: Some("pod-dlq".into()),
        },
        Arc::new(Shared(handler.clone())),
        metrics.clone(),
        Arc::new(Health::new(Duration::from_secs(30))),
        token.clone(),
    ));
    handler.wait_for(10, Duration::from_secs(30)).await;
    assert_eq!(
        handler.payloads(),
        good(&payloads),
        "good records, in order"
    );
    let mut letters = receive(&sqs, &queue, 2, Duration::from_secs(15)).await;
    letters.sort_by_key(|e| e["sequence"].as_str().map(str::to_owned));
    for (env, i) in letters.iter().zip([3, 8]) {
        check_envelope(env, &group, &name, &payloads[i], &seqs[i]);
    }
    // The state store: the checkpoint passed the poison records, the client row says why.
    let last = seqs.last().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let snap = store.load_group(&group).await.expect("load group");
        let checkpoint = snap.leases.iter().find_map(|l| l.checkpoint.clone());
        let reason = snap
            .clients
            .iter()
            .find_map(|c| c.last_error_reason.clone());
        if checkpoint.as_ref() == Some(last) && reason.as_deref() == Some("RecordsDeadLettered") {
            let message = snap.clients[0].last_error.clone().unwrap_or_default();
            assert!(message.contains(&queue), "{message}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "checkpoint {checkpoint:?} (want {last}), reason {reason:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    token.cancel();
    tokio::time::timeout(Duration::from_secs(15), join)
        .await
        .expect("engine stops")
        .expect("engine task")
        .expect("engine ok");
    delete_stream(&sdk, &name).await;
}

/// A FIFO queue takes the dead letters too (message group: the shard; deduplication id: the
/// sequence number), in shard order.
#[tokio::test]
async fn dead_letter_to_a_fifo_queue() {
    let Some(conf) = aws("dead_letter_fifo").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let name = unique("poison-fifo");
    create_stream(&sdk, &name, 1).await;
    let queue = sqs
        .create_queue()
        .queue_name(format!("{}.fifo", unique("dlq")))
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .expect("CreateQueue FIFO")
        .queue_url()
        .expect("queue url")
        .to_owned();
    let payloads = mixed();
    let seqs = put(&sdk, &name, "k", &payloads).await;
    let failure = policy(
        &conf,
        &format!("onFailure: DeadLetter\ndeadLetter: {{sqs: {{queueUrl: \"{queue}\"}}}}\n"),
    )
    .await;
    let handler = Arc::new(RefusesMarked::default());
    let mut r = start_with(
        connect(&name, &conf).await,
        &name,
        SHARD,
        None,
        5,
        Arc::new(Shared(handler.clone())),
        failure,
    );
    let last = seqs.last().unwrap().clone();
    wait_progress(&mut r.progress, Duration::from_secs(30), |p| {
        p.acked.as_ref().map(|a| a.sequence.as_str()) == Some(last.as_str())
    })
    .await;
    assert_eq!(handler.payloads(), good(&payloads));
    let letters = receive(&sqs, &queue, 2, Duration::from_secs(15)).await;
    for (env, i) in letters.iter().zip([3, 8]) {
        check_envelope(env, "test/poison", &name, &payloads[i], &seqs[i]);
    }
    stop(r).await;
    delete_stream(&sdk, &name).await;
}
