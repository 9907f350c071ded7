//! Shared harness of the multi-engine group tests: emulator setup, a collecting handler,
//! engines started in-process, and the delivery-log checks.
#![allow(dead_code)] // each test binary uses a subset

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use futures::future::BoxFuture;
use kcg_worker::config::WorkerConfig;
use kcg_worker::delivery::{BatchHandler, HandlerError, Record};
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::store::StateStore;
use kcg_worker::store::schema::{ClientRow, GroupSnapshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod relay;
#[path = "../stream_support/mod.rs"]
mod stream_support;
#[allow(unused_imports)] // each test binary uses a subset
pub use stream_support::{create_stream, wait_active};

/// One delivery as the test handler saw it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub engine: String,
    pub stream: String,
    pub shard: String,
    pub sequence: String,
    /// Index inside a KPL aggregate (user records only).
    pub sub_sequence: Option<u64>,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    /// The payload as text (lossy): the record's id in these tests.
    pub id: String,
    /// Global delivery order.
    pub at: usize,
    /// When the handler saw it.
    pub when: Instant,
}

#[derive(Default)]
pub struct Log {
    pub deliveries: Mutex<Vec<Delivery>>,
}

impl Log {
    pub fn all(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }
    pub fn distinct_ids(&self) -> BTreeSet<String> {
        self.all().into_iter().map(|d| d.id).collect()
    }
}

pub struct Collect {
    pub engine: String,
    pub log: Arc<Log>,
}

impl BatchHandler for Collect {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut log = self.log.deliveries.lock().unwrap();
            for r in batch {
                let at = log.len();
                log.push(Delivery {
                    engine: self.engine.clone(),
                    stream: r.stream.to_string(),
                    shard: r.shard_id.to_string(),
                    sequence: r.sequence.clone(),
                    sub_sequence: r.sub_sequence,
                    partition_key: r.partition_key.clone(),
                    explicit_hash_key: r.explicit_hash_key.clone(),
                    id: String::from_utf8_lossy(&r.data).into_owned(),
                    at,
                    when: Instant::now(),
                });
            }
            Ok(())
        })
    }
}

pub struct Env {
    pub kinesis: aws_sdk_kinesis::Client,
    pub store: StateStore,
    pub table: String,
    pub stream: String,
    pub group: String,
    pub log: Arc<Log>,
    /// `tuning.checkpointInterval` of the engines started from now on.
    pub checkpoint_interval: String,
    /// More streams the group reads, after `stream`.
    pub extra_streams: Vec<String>,
    /// `tuning.maxRecordsPerCall`: small values make shards take several polls.
    pub max_records: u32,
    /// `startPosition` of every stream.
    pub start_position: String,
    /// `tuning.clientTimeout`.
    pub client_timeout: String,
    /// Read every stream with enhanced fan-out (SubscribeToShard) instead of polling.
    pub fan_out: bool,
    /// `tuning.minCallInterval`: 200ms (Kinesis' limit) so tests read fast.
    pub min_call_interval: String,
}

pub fn suffix() -> String {
    use rand::Rng;
    format!("{:08x}", rand::rng().random::<u32>())
}

pub async fn env(test: &str, shards: i32) -> Option<Env> {
    for var in ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_KINESIS"] {
        if std::env::var(var).is_err() {
            eprintln!(
                "SKIP {test}: {var} is not set (start the emulators, see scripts/emulators.sh)"
            );
            return None;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let kinesis = aws_sdk_kinesis::Client::new(&conf);
    let id = suffix();
    let table = format!("kcg-grp-{test}-{id}");
    let stream = format!("kcg-grp-{test}-{id}");
    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&conf), table.clone());
    store.create_table().await.expect("create table");
    create_stream(&kinesis, &stream, shards).await;
    Some(Env::new(
        kinesis,
        store,
        table,
        stream,
        format!("test/{test}-{id}"),
    ))
}

impl Env {
    /// A group reading `stream` through `table`, with the tests' default tuning and an empty
    /// delivery log.
    pub fn new(
        kinesis: aws_sdk_kinesis::Client,
        store: StateStore,
        table: String,
        stream: String,
        group: String,
    ) -> Self {
        Self {
            kinesis,
            store,
            table,
            stream,
            group,
            log: Arc::new(Log::default()),
            checkpoint_interval: "500ms".into(),
            extra_streams: Vec::new(),
            max_records: 1000,
            start_position: "TrimHorizon".into(),
            client_timeout: "3s".into(),
            fan_out: false,
            min_call_interval: "200ms".into(),
        }
    }

    pub fn config(&self) -> WorkerConfig {
        let all: Vec<String> = std::iter::once(&self.stream)
            .chain(&self.extra_streams)
            .cloned()
            .collect();
        self.config_reading(&all)
    }

    /// The config of a worker that reads `streams` (of this group) only.
    pub fn config_reading(&self, streams: &[String]) -> WorkerConfig {
        WorkerConfig::from_yaml(&format!(
            r#"
group: {group}
streams:
{streams}stateStore:
  table: {table}
delivery:
  stdout: {{}}
tuning:
  pollInterval: 200ms
  minCallInterval: {min_call_interval}
  heartbeatInterval: 300ms
  clientTimeout: {client_timeout}
  checkpointInterval: {checkpoint}
  maxRecordsPerCall: {max_records}
  shutdownTimeout: 5s
"#,
            group = self.group,
            streams = streams
                .iter()
                .map(|s| format!(
                    "  - name: {s}\n    startPosition: {}\n{}",
                    self.start_position,
                    if self.fan_out {
                        "    consumer: {mode: EnhancedFanOut}\n"
                    } else {
                        ""
                    }
                ))
                .collect::<String>(),
            table = self.table,
            checkpoint = self.checkpoint_interval,
            max_records = self.max_records,
            client_timeout = self.client_timeout,
            min_call_interval = self.min_call_interval,
        ))
        .expect("config")
    }

    pub fn start(&self, name: &str) -> Worker {
        self.start_with(name, Arc::new(Metrics::new()), default_health())
    }

    /// Starts an engine named `name` (its client id base) with the given metrics and health.
    pub fn start_with(&self, name: &str, metrics: Arc<Metrics>, health: Arc<Health>) -> Worker {
        let handler = Arc::new(Collect {
            engine: name.to_owned(),
            log: self.log.clone(),
        });
        self.start_full(name, handler, metrics, health)
    }

    /// Starts an engine with its own handler.
    pub fn start_full(
        &self,
        name: &str,
        handler: Arc<dyn BatchHandler>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Worker {
        self.start_configured(name, self.config(), handler, metrics, health)
    }

    /// Starts an engine named `name` that reads `streams` only.
    pub fn start_reading(&self, name: &str, streams: &[String]) -> Worker {
        let handler = Arc::new(Collect {
            engine: name.to_owned(),
            log: self.log.clone(),
        });
        self.start_configured(
            name,
            self.config_reading(streams),
            handler,
            Arc::new(Metrics::new()),
            default_health(),
        )
    }

    fn start_configured(
        &self,
        name: &str,
        config: WorkerConfig,
        handler: Arc<dyn BatchHandler>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Worker {
        let token = CancellationToken::new();
        let join = tokio::spawn(engine::run(
            config,
            EngineOptions {
                client_id: Some(name.to_owned()),
                pod: Some(format!("pod-{name}")),
            },
            handler,
            metrics,
            health,
            token.clone(),
        ));
        Worker { token, join }
    }

    /// Starts engine `name` reaching DynamoDB through `relay` (engines started later reach
    /// it directly) and waits until it registered. The SDK reads `AWS_ENDPOINT_URL_DYNAMODB`
    /// when the engine loads its config, so the process-wide variable points at the relay
    /// until then: only for test binaries that hold a single test.
    pub async fn start_through(
        &self,
        relay: &relay::Relay,
        name: &str,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Worker {
        let direct = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("checked by env()");
        // SAFETY: the test binary runs this single test; nothing else reads the environment
        // concurrently except the engine being started.
        unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", relay.url()) };
        let worker = self.start_with(name, metrics, health);
        let started = Instant::now();
        while self.client(name).await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} never registered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", &direct) };
        worker
    }

    /// The client row of engine `name` (by its client id base), read strongly.
    pub async fn client(&self, name: &str) -> Option<ClientRow> {
        self.store
            .load_clients(&self.group)
            .await
            .expect("clients")
            .into_iter()
            .find(|c| base(&c.client_id) == name)
    }

    /// Writes `n` records with ids `<prefix>-<i>`, spread over the hash key space.
    pub async fn put(&self, prefix: &str, n: usize) -> BTreeSet<String> {
        self.put_to(&self.stream.clone(), prefix, n).await
    }

    /// Writes `n` records with ids `<prefix>-<i>` to `stream`.
    pub async fn put_to(&self, stream: &str, prefix: &str, n: usize) -> BTreeSet<String> {
        put_ids(&self.kinesis, stream, prefix, n).await
    }

    pub async fn snapshot(&self) -> GroupSnapshot {
        self.store
            .load_group(&self.group)
            .await
            .expect("load group")
    }

    /// Owned shard count per client base name (the engine name before the suffix).
    pub async fn ownership(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for l in self.snapshot().await.leases {
            if let Some(o) = l.owner {
                *out.entry(base(&o)).or_default() += 1;
            }
        }
        out
    }

    pub async fn wait_delivered(&self, want: &BTreeSet<String>, within: Duration) {
        let start = Instant::now();
        loop {
            let got = self.log.distinct_ids();
            if want.is_subset(&got) {
                return;
            }
            if start.elapsed() > within {
                let missing: Vec<_> = want.difference(&got).take(10).collect();
                panic!(
                    "{} of {} records missing after {within:?}, e.g. {missing:?}",
                    want.difference(&got).count(),
                    want.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ownership(&self, want: &[(&str, usize)], within: Duration) {
        let want: BTreeMap<String, usize> =
            want.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let start = Instant::now();
        loop {
            let got = self.ownership().await;
            if got == want {
                return;
            }
            assert!(start.elapsed() < within, "ownership {got:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams are deleted when the `Env` drops (also when a test fails), so the
    /// emulator's account shard limit is not eaten by leftovers.
    pub async fn cleanup(&self) {}
}

impl Drop for Env {
    fn drop(&mut self) {
        let kinesis = self.kinesis.clone();
        let streams: Vec<String> = std::iter::once(self.stream.clone())
            .chain(self.extra_streams.iter().cloned())
            .collect();
        // Drop cannot await; delete from a helper thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for s in streams {
                    let _ = kinesis
                        .delete_stream()
                        .stream_name(s)
                        .enforce_consumer_deletion(true)
                        .send()
                        .await;
                }
            });
        })
        .join();
    }
}

/// Reshards the group's stream to `target` shards (uniform scaling) and waits until it is
/// ACTIVE again.
pub async fn reshard(env: &Env, target: i32) {
    env.kinesis
        .update_shard_count()
        .stream_name(&env.stream)
        .target_shard_count(target)
        .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
        .send()
        .await
        .expect("update shard count");
    wait_active(&env.kinesis, &env.stream).await;
}

/// The health of an engine the tests do not probe (30 s before a stall counts).
pub fn default_health() -> Arc<Health> {
    Arc::new(Health::new(Duration::from_secs(30)))
}

pub fn base(client_id: &str) -> String {
    client_id
        .rsplit_once('-')
        .map(|(b, _)| b.to_owned())
        .unwrap_or_default()
}

pub struct Worker {
    pub token: CancellationToken,
    pub join: JoinHandle<Result<(), engine::EngineError>>,
}

impl Worker {
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.join)
            .await
            .expect("graceful stop within bound")
            .expect("join")
            .expect("engine result");
    }

    /// Simulates a crash: the engine disappears without releasing or deregistering.
    pub async fn crash(self) {
        self.join.abort();
        let _ = self.join.await;
    }
}

/// Watches a client's heartbeat counter: how often it moved and the longest it stood still,
/// from when the watch began.
pub struct HeartbeatWatch {
    last: (u64, Instant),
    /// Moves seen after the first value.
    pub beats: usize,
    /// The longest time the counter stood still.
    pub widest_gap: Duration,
}

impl Default for HeartbeatWatch {
    /// A watch that begins now.
    fn default() -> Self {
        Self {
            last: (0, Instant::now()),
            beats: 0,
            widest_gap: Duration::ZERO,
        }
    }
}

impl HeartbeatWatch {
    /// Takes in the counter as just read.
    pub fn see(&mut self, heartbeat: u64) {
        if heartbeat != self.last.0 {
            if self.last.0 != 0 {
                self.beats += 1;
            }
            self.last = (heartbeat, Instant::now());
        }
        self.widest_gap = self.widest_gap.max(self.last.1.elapsed());
    }
}

/// Whether a reader of the engine with these metrics fenced itself (its lease renewal
/// failed).
pub fn fenced(metrics: &Metrics) -> bool {
    metrics
        .encode()
        .lines()
        .any(|l| l.contains("reason=\"LeaseRenewalFailed\""))
}

/// Kinesis sequence numbers are decimal strings of varying length: compare numerically.
pub fn seq_key(s: &str) -> (usize, &str) {
    (s.len(), s)
}

/// Per shard, the first deliveries of each record come in increasing sequence order, and a
/// redelivery never goes back beyond what... (only checked as "first occurrence order").
pub fn assert_order_per_shard(log: &[Delivery]) {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut last: BTreeMap<(String, String), String> = BTreeMap::new();
    for d in log {
        if !seen.insert(d.id.clone()) {
            continue;
        }
        let key = (d.stream.clone(), d.shard.clone());
        if let Some(prev) = last.get(&key) {
            assert!(
                seq_key(&d.sequence) > seq_key(prev),
                "shard {} out of order: {} after {}",
                d.shard,
                d.sequence,
                prev
            );
        }
        last.insert(key, d.sequence.clone());
    }
}

pub fn duplicates(log: &[Delivery]) -> Vec<Delivery> {
    let mut seen = BTreeSet::new();
    log.iter()
        .filter(|d| !seen.insert(d.id.clone()))
        .cloned()
        .collect()
}

/// Writes `n` records with ids `<prefix>-<i>` to `stream`, spread over the hash key space.
pub async fn put_ids(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    prefix: &str,
    n: usize,
) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let entries: Vec<PutRecordsRequestEntry> = chunk
            .iter()
            .map(|i| {
                let id = format!("{prefix}-{i}");
                ids.insert(id.clone());
                let hash = (u128::MAX / n as u128) * *i as u128;
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(id.clone().into_bytes()))
                    .partition_key(id)
                    .explicit_hash_key(hash.to_string())
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = kinesis
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0));
    }
    ids
}

/// A steady producer (4 records every 100 ms, spread over the hash key space), so that two
/// readers of one shard would show up as interleaving.
pub struct Producer {
    stop: CancellationToken,
    produced: Arc<Mutex<BTreeSet<String>>>,
    join: JoinHandle<()>,
}

impl Producer {
    /// Starts producing into `env`'s stream.
    pub fn start(env: &Env) -> Self {
        let stop = CancellationToken::new();
        let produced = Arc::new(Mutex::new(BTreeSet::new()));
        let join = {
            let (stop, produced) = (stop.clone(), produced.clone());
            let (kinesis, stream) = (env.kinesis.clone(), env.stream.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.is_cancelled() {
                    let ids = put_ids(&kinesis, &stream, &format!("p{round}"), 4).await;
                    produced.lock().unwrap().extend(ids);
                    round += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Self {
            stop,
            produced,
            join,
        }
    }

    /// Stops and returns the ids of every record written.
    pub async fn finish(self) -> BTreeSet<String> {
        self.stop.cancel();
        self.join.await.expect("producer");
        self.produced.lock().unwrap().clone()
    }
}
