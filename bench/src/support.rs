//! What the emulator benchmarks share: AWS clients, unique names, a fast producer, a
//! counting handler, engine configs and cleanup.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kcg_worker::config::{
    DeliveryConfig, StartPosition, StateStoreConfig, StdoutSink, StreamConfig, Tuning, WorkerConfig,
};
use kcg_worker::delivery::{BatchHandler, HandlerError, Record};
use kcg_worker::store::StateStore;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Clients for the emulators, configured from the standard `AWS_ENDPOINT_URL_*` variables.
#[derive(Clone)]
pub struct Aws {
    /// Kinesis.
    pub kinesis: aws_sdk_kinesis::Client,
    /// DynamoDB (the state store).
    pub dynamodb: aws_sdk_dynamodb::Client,
}

impl Aws {
    /// Loads the default AWS config (endpoints, credentials, region from the environment).
    pub async fn load() -> Self {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Self {
            kinesis: aws_sdk_kinesis::Client::new(&config),
            dynamodb: aws_sdk_dynamodb::Client::new(&config),
        }
    }

    /// A state store on `table`.
    pub fn store(&self, table: &str) -> StateStore {
        StateStore::new(self.dynamodb.clone(), table)
    }
}

/// A name unique to this run, so concurrent runs and leftovers never collide.
pub fn unique(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("kcg-bench-{prefix}-{}-{ms}", std::process::id())
}

/// Writes `count` records of `payload` bytes to `stream`, 500 per PutRecords call with
/// `in_flight` calls at once, partition keys spread over all shards. Returns the time taken.
pub async fn produce(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    count: u64,
    payload: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    const PER_CALL: u64 = 500;
    let start = Instant::now();
    let body = Blob::new(vec![b'x'; payload]);
    let mut calls = JoinSet::new();
    let mut next = 0u64;
    loop {
        while next < count && calls.len() < in_flight.max(1) {
            let n = PER_CALL.min(count - next);
            let entries = (next..next + n)
                .map(|i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("pk-{i}"))
                        .data(body.clone())
                        .build()
                        .context("building a record")
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries));
            calls.spawn(async move { req.send().await });
            next += n;
        }
        let Some(done) = calls.join_next().await else {
            break;
        };
        let out = done
            .context("producer task")?
            .with_context(|| format!("PutRecords to {stream}"))?;
        let failed = out.failed_record_count().unwrap_or(0);
        anyhow::ensure!(failed == 0, "{failed} records were rejected by PutRecords");
    }
    Ok(start.elapsed())
}

/// True when Kinesis sequence number `a` comes after `b` (decimal strings of any length).
pub fn seq_after(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    (a.len(), a) > (b.len(), b)
}

/// A handler that acknowledges every batch and counts records: distinct ones (each shard's
/// sequence numbers must increase) and repeats, with the time of the first and last record.
pub struct Counter {
    start: Instant,
    target: u64,
    last_seq: Mutex<HashMap<String, String>>,
    distinct: AtomicU64,
    repeated: AtomicU64,
    first: OnceLock<Duration>,
    /// Process CPU (user, system) and batch size when the first batch arrived: the
    /// steady-state CPU per record excludes start-up (SDK config, table check, first
    /// connection) by counting from here.
    first_cpu: OnceLock<(Option<(Duration, Duration)>, u64)>,
    last_ns: AtomicU64,
    done: Notify,
}

impl Counter {
    /// A counter that signals [`Counter::reached`] once `target` distinct records arrived.
    /// Times are measured from `start`.
    pub fn new(start: Instant, target: u64) -> Arc<Self> {
        Arc::new(Self {
            start,
            target,
            last_seq: Mutex::new(HashMap::new()),
            distinct: AtomicU64::new(0),
            repeated: AtomicU64::new(0),
            first: OnceLock::new(),
            first_cpu: OnceLock::new(),
            last_ns: AtomicU64::new(0),
            done: Notify::new(),
        })
    }

    /// Resolves once `target` distinct records were delivered.
    pub async fn reached(&self) {
        if self.distinct() >= self.target {
            return;
        }
        self.done.notified().await;
    }

    /// Distinct records delivered (in order per shard).
    pub fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::SeqCst)
    }

    /// Records delivered again (at or before a shard's highest sequence number seen).
    pub fn repeated(&self) -> u64 {
        self.repeated.load(Ordering::SeqCst)
    }

    /// Time from start to the first record.
    pub fn first(&self) -> Option<Duration> {
        self.first.get().copied()
    }

    /// Process CPU (user, system) when the first batch arrived (before counting it), and
    /// that batch's size.
    pub fn first_cpu(&self) -> Option<((Duration, Duration), u64)> {
        let (cpu, n) = self.first_cpu.get()?;
        Some(((*cpu)?, *n))
    }

    /// Time from start to the latest delivered record.
    pub fn last(&self) -> Duration {
        Duration::from_nanos(self.last_ns.load(Ordering::SeqCst))
    }

    fn count(&self, batch: &[Record]) {
        let Some(head) = batch.first() else {
            return;
        };
        if self.first.set(self.start.elapsed()).is_ok() {
            let _ = self
                .first_cpu
                .set((process_cpu_split(), batch.len() as u64));
        }
        let key = format!("{}/{}", head.stream, head.shard_id);
        let (mut fresh, mut again) = (0u64, 0u64);
        {
            let mut last = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
            // Borrow the highest sequence from the batch and copy it once per batch, so the
            // counting handler itself costs no allocation per record.
            let mut high: Option<&str> = last.get(&key).map(String::as_str);
            let mut moved = false;
            for r in batch {
                if high.is_none_or(|h| seq_after(&r.sequence, h)) {
                    fresh += 1;
                    high = Some(&r.sequence);
                    moved = true;
                } else {
                    again += 1;
                }
            }
            if let (true, Some(h)) = (moved, high) {
                let h = h.to_owned();
                last.insert(key, h);
            }
        }
        self.repeated.fetch_add(again, Ordering::SeqCst);
        let total = self.distinct.fetch_add(fresh, Ordering::SeqCst) + fresh;
        self.last_ns
            .fetch_max(self.start.elapsed().as_nanos() as u64, Ordering::SeqCst);
        if total >= self.target && total - fresh < self.target {
            self.done.notify_one();
        }
    }
}

impl BatchHandler for Counter {
    fn handle<'a>(
        &'a self,
        batch: &'a [Record],
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>> {
        self.count(batch);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A worker config for one stream read from TRIM_HORIZON, state in `table`.
pub fn worker_config(group: &str, stream: &str, table: &str, tuning: Tuning) -> WorkerConfig {
    WorkerConfig {
        group: group.to_owned(),
        streams: vec![StreamConfig {
            name: stream.to_owned(),
            region: None,
            role_arn: None,
            start_position: StartPosition::TrimHorizon,
            start_timestamp: None,
            consumer: Default::default(),
        }],
        state_store: StateStoreConfig {
            table: table.to_owned(),
            region: None,
            create: false,
        },
        // Required by validation; the benchmark passes its own handler to the engine.
        delivery: DeliveryConfig {
            stdout: Some(StdoutSink {}),
            ..DeliveryConfig::default()
        },
        tuning,
    }
}

/// Creates the state-store table and the stream (`shards` shards, ACTIVE).
pub async fn create(aws: &Aws, stream: &str, shards: i32, table: &str) -> anyhow::Result<()> {
    aws.store(table)
        .create_table()
        .await
        .with_context(|| format!("creating table {table}"))?;
    crate::ensure_stream(&aws.kinesis, stream, shards).await
}

/// Deletes what a benchmark created; reports (does not fail on) what could not be deleted.
pub async fn cleanup(aws: &Aws, stream: &str, table: &str) {
    if let Err(e) = aws
        .kinesis
        .delete_stream()
        .stream_name(stream)
        .enforce_consumer_deletion(true)
        .send()
        .await
    {
        eprintln!("kcg-bench: could not delete stream {stream}: {e}");
    }
    if let Err(e) = aws.dynamodb.delete_table().table_name(table).send().await {
        eprintln!("kcg-bench: could not delete table {table}: {e}");
    }
}

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system, every thread) this process consumed so far, from
/// `/proc/self/stat` (fields 14 and 15, in clock ticks of 1/100 s: Linux reports
/// USER_HZ = 100 there on every architecture). `None` when unreadable.
pub fn process_cpu_time() -> Option<Duration> {
    process_cpu_split().map(|(u, s)| u + s)
}

/// (user, system) CPU time of this process so far; see [`process_cpu_time`].
pub fn process_cpu_split() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (u, s) = cpu_ticks_from_stat(&stat)?;
    Some((Duration::from_millis(u * 10), Duration::from_millis(s * 10)))
}

/// (utime, stime) from a `/proc/<pid>/stat` line. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its closing parenthesis.
pub fn cpu_ticks_from_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first; utime is field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// Resets the peak RSS counter (Linux: write 5 to clear_refs), so VmHWM then covers only
/// what follows. Returns whether the kernel accepted it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One engine in its own thread and single-thread Tokio runtime, as `kcg-worker` runs in a
/// pod: a CPU burst or a slow poll of one engine never delays another's timers and I/O.
pub struct Hosted {
    shutdown: tokio_util::sync::CancellationToken,
    kill: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hosted {
    /// Starts `engine::run` with client id base and pod name `id`.
    pub fn start(
        id: String,
        config: WorkerConfig,
        handler: Arc<Counter>,
        metrics: Arc<kcg_worker::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        use kcg_worker::engine::{self, EngineOptions};
        let shutdown = tokio_util::sync::CancellationToken::new();
        let kill = tokio_util::sync::CancellationToken::new();
        let (s, k) = (shutdown.clone(), kill.clone());
        let thread = std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || {
                let rt =
                    match kcg_worker::runtime::build(kcg_worker::runtime::DEFAULT_WORKER_THREADS) {
                        Ok(rt) => rt,
                        Err(e) => {
                            eprintln!("kcg-bench: engine {id}: runtime: {e}");
                            return;
                        }
                    };
                rt.block_on(async {
                    let run = engine::run(
                        config,
                        EngineOptions {
                            client_id: Some(id.clone()),
                            pod: Some(id.clone()),
                        },
                        handler,
                        metrics,
                        Arc::new(kcg_worker::health::Health::new(Duration::from_secs(600))),
                        s,
                    );
                    tokio::select! {
                        res = run => if let Err(e) = res {
                            eprintln!("kcg-bench: engine {id} failed: {e}");
                        },
                        _ = k.cancelled() => {}
                    }
                });
                // Killed: every task of this engine (readers, in-flight writes) is dropped
                // where it stands. Stopped: nothing is left to drop.
                rt.shutdown_background();
            })
            .context("spawning an engine thread")?;
        Ok(Self {
            shutdown,
            kill,
            thread: Some(thread),
        })
    }

    /// Waits (off the async threads) for the engine thread to end.
    pub async fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Graceful stop: cancel and wait for the drain, release and deregistration.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Asks for a graceful stop without waiting for it.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Kills the engine: its runtime is dropped with every task where it stands (no
    /// release, no deregistration), as a SIGKILL would.
    pub fn kill(&self) {
        self.kill.cancel();
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        // A benchmark that bails out must not leave engines running against deleted
        // resources.
        self.kill.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_parse() {
        let line = "1234 (kcg bench (x)) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 8 0 100";
        assert_eq!(cpu_ticks_from_stat(line), Some((250, 17)));
        assert_eq!(cpu_ticks_from_stat("garbage"), None);
        assert!(process_cpu_time().is_some());
    }

    #[test]
    fn seq_after_table() {
        let cases = [
            ("2", "1", true),
            ("1", "2", false),
            ("1", "1", false),
            ("10", "9", true),
            ("000000000010", "9", true),
            ("0009", "10", false),
            (
                "49650000000000000000000000000000000000000000000000000002",
                "49650000000000000000000000000000000000000000000000000001",
                true,
            ),
        ];
        for (a, b, want) in cases {
            assert_eq!(seq_after(a, b), want, "{a} after {b}");
        }
    }

    fn record(shard: &str, seq: &str) -> Record {
        Record {
            stream: "s".into(),
            shard_id: shard.into(),
            sequence: seq.into(),
            sub_sequence: None,
            partition_key: "k".into(),
            explicit_hash_key: None,
            data: Vec::new(),
            arrival: None,
        }
    }

    #[tokio::test]
    async fn counter_tells_repeats_from_new_records_per_shard() {
        let c = Counter::new(Instant::now(), 4);
        c.count(&[record("a", "1"), record("a", "2")]);
        c.count(&[record("b", "1")]);
        c.count(&[record("a", "2"), record("a", "3")]);
        assert_eq!((c.distinct(), c.repeated()), (4, 1));
        assert!(c.first().is_some());
        tokio::time::timeout(Duration::from_secs(1), c.reached())
            .await
            .expect("target reached");
    }
}
