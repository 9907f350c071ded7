//! Helpers for the reader / sink / STS integration tests: emulator discovery, streams with
//! unique names, producers and a recording handler.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use futures::future::BoxFuture;
use kcg_worker::config::{StreamConfig, Tuning};
use kcg_worker::delivery::{BatchHandler, FailurePolicy, HandlerError, Position, Record};
use kcg_worker::kinesis::StreamClient;
use kcg_worker::metrics::Metrics;
use kcg_worker::reader::{ShardProgress, ShardTask, read_shard};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "../ministack_support/mod.rs"]
mod ministack_support;
#[path = "../stream_support/mod.rs"]
mod stream_support;
#[allow(unused_imports)] // each test binary uses a subset
pub use ministack_support::PrivateMinistack;
#[allow(unused_imports)] // each test binary uses a subset
pub use stream_support::{create_stream, wait_active};

/// The SDK config for the Kinesis emulator, or `None` (with a printed reason) when
/// `AWS_ENDPOINT_URL_KINESIS` is not set. When it is set, tests must fail if the emulator
/// does not answer, so nothing here swallows errors.
pub async fn kinesis_config(test: &str) -> Option<SdkConfig> {
    if std::env::var("AWS_ENDPOINT_URL_KINESIS").is_err() {
        eprintln!(
            "SKIP {test}: AWS_ENDPOINT_URL_KINESIS is not set (start kinesis-local, see scripts/emulators.sh)"
        );
        return None;
    }
    Some(aws_config::defaults(BehaviorVersion::latest()).load().await)
}

/// A stream name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    use rand::Rng;
    format!("kcg-{prefix}-{:08x}", rand::rng().random::<u32>())
}

/// Deletes a test stream, so repeated runs stay under the emulator's shard limit.
pub async fn delete_stream(client: &Client, name: &str) {
    client
        .delete_stream()
        .stream_name(name)
        .enforce_consumer_deletion(true)
        .send()
        .await
        .expect("DeleteStream");
}

/// Puts `payloads` with one partition key, in order (PutRecords keeps per-shard order
/// for one key); returns the sequence numbers.
pub async fn put(client: &Client, name: &str, key: &str, payloads: &[String]) -> Vec<String> {
    let mut seqs = Vec::new();
    for chunk in payloads.chunks(100) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|p| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(p.as_bytes()))
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = client
            .put_records()
            .stream_name(name)
            .set_records(Some(entries))
            .send()
            .await
            .expect("PutRecords");
        assert_eq!(
            out.failed_record_count(),
            Some(0),
            "PutRecords had failures"
        );
        seqs.extend(
            out.records()
                .iter()
                .map(|r| r.sequence_number().expect("seq").to_owned()),
        );
    }
    seqs
}

/// `n` payloads `prefix-0000`, `prefix-0001`, ...
pub fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// A stream config reading from TRIM_HORIZON.
pub fn stream_config(name: &str) -> StreamConfig {
    serde_yaml::from_str(&format!("name: {name}\nstartPosition: TrimHorizon\n"))
        .expect("stream config")
}

/// A shared client for stream `name` (read from TRIM_HORIZON), as readers take it.
pub async fn connect(name: &str, conf: &SdkConfig) -> Arc<StreamClient> {
    Arc::new(
        StreamClient::connect(&stream_config(name), conf)
            .await
            .expect("connect"),
    )
}

/// Fast tuning for tests.
pub fn tuning(max_records: u32) -> Tuning {
    Tuning {
        poll_interval: Duration::from_millis(200),
        min_call_interval: Duration::from_millis(200),
        max_records_per_call: max_records,
        shutdown_timeout: Duration::from_secs(5),
        ..Tuning::default()
    }
}

/// Records every accepted batch; fails the calls whose (1-based) number `fail` says.
pub struct Recording {
    pub accepted: Mutex<Vec<Record>>,
    pub calls: Mutex<u32>,
    pub fail: Box<dyn Fn(u32) -> bool + Send + Sync>,
}

impl Recording {
    pub fn new() -> Arc<Self> {
        Self::failing(|_| false)
    }

    pub fn failing(fail: impl Fn(u32) -> bool + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            accepted: Mutex::new(Vec::new()),
            calls: Mutex::new(0),
            fail: Box::new(fail),
        })
    }

    pub fn payloads(&self) -> Vec<String> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8(r.data.clone()).unwrap())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    /// Waits until at least `n` records were accepted.
    pub async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} records delivered within {within:?}",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl BatchHandler for Recording {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        let call = {
            let mut c = self.calls.lock().unwrap();
            *c += 1;
            *c
        };
        let fail = (self.fail)(call);
        if !fail {
            self.accepted.lock().unwrap().extend_from_slice(batch);
        }
        Box::pin(async move {
            if fail {
                Err(HandlerError::new(format!(
                    "scripted failure on call {call}"
                )))
            } else {
                Ok(())
            }
        })
    }
}

/// A reader running on its own task.
pub struct Running {
    pub progress: watch::Receiver<ShardProgress>,
    pub stop: CancellationToken,
    pub join: JoinHandle<ShardProgress>,
    pub metrics: Arc<Metrics>,
}

/// Starts `read_shard` for one shard with the test tuning.
pub fn start(
    client: Arc<StreamClient>,
    name: &str,
    shard: &str,
    checkpoint: Option<Position>,
    max_records: u32,
    handler: Arc<dyn BatchHandler>,
) -> Running {
    start_with(
        client,
        name,
        shard,
        checkpoint,
        max_records,
        handler,
        FailurePolicy::default(),
    )
}

/// [`start`] with a failure policy (retries, skip, dead letter).
pub fn start_with(
    client: Arc<StreamClient>,
    name: &str,
    shard: &str,
    checkpoint: Option<Position>,
    max_records: u32,
    handler: Arc<dyn BatchHandler>,
    failure: FailurePolicy,
) -> Running {
    spawn_reader(
        client,
        stream_config(name),
        shard,
        checkpoint,
        max_records,
        handler,
        failure,
    )
}

/// Starts `read_shard` for one shard of `stream` (any config: enhanced fan-out too).
pub fn start_stream(
    client: Arc<StreamClient>,
    stream: StreamConfig,
    shard: &str,
    checkpoint: Option<Position>,
    max_records: u32,
    handler: Arc<dyn BatchHandler>,
) -> Running {
    spawn_reader(
        client,
        stream,
        shard,
        checkpoint,
        max_records,
        handler,
        FailurePolicy::default(),
    )
}

fn spawn_reader(
    client: Arc<StreamClient>,
    stream: StreamConfig,
    shard: &str,
    checkpoint: Option<Position>,
    max_records: u32,
    handler: Arc<dyn BatchHandler>,
    failure: FailurePolicy,
) -> Running {
    let (tx, rx) = watch::channel(ShardProgress::default());
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let task = ShardTask {
        client,
        stream,
        shard_id: shard.to_owned(),
        checkpoint,
        failure,
        fence: kcg_worker::fence::Fence::open(),
        lease_counter: 1,
    };
    let join = tokio::spawn(read_shard(
        task,
        tuning(max_records),
        handler,
        metrics.clone(),
        tx,
        stop.clone(),
    ));
    Running {
        progress: rx,
        stop,
        join,
        metrics,
    }
}

/// Stops the reader and returns its final progress.
pub async fn stop(r: Running) -> ShardProgress {
    r.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), r.join)
        .await
        .expect("reader returns promptly after stop")
        .expect("reader task")
}
