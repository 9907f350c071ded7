//! The engine: one worker's membership loop. Heartbeats (beside the loop), reads the group,
//! leads when it is the lowest live client, plans, hands leases over safely, runs one reader
//! per owned shard, checkpoints, and on shutdown drains, checkpoints, releases and
//! deregisters.
//!
//! Decisions are the pure functions of [`crate::membership`], [`crate::assignment`] and
//! [`crate::handoff`]; this module is the I/O around them.
//!
//! Safety: a lease lives as long as its owner's client row heartbeats; leases are not
//! renewed one by one. Every successful heartbeat sent at time `t` extends the deadline of
//! all our readers to `t + clientTimeout − heartbeatInterval`, measured on the boot clock
//! ([`crate::fence`]), and a reader re-checks it before every hand-over. Observers start
//! their clock when they first see the new heartbeat value, which is after `t`, and take
//! our leases only when it stood still for `clientTimeout` (or our row was gone that long),
//! conditional on the lease's owner and counter; so a reader whose heartbeats fail is
//! aborted before anyone else may take its shard. Two live clients never read one shard at
//! once. See `docs/state-store.md`.
//!
//! The heartbeat runs on its own timer ([`heartbeat`]): no read or write of the tick ever
//! delays it.
//!
//! Cost: one heartbeat write and one Query of the client rows per tick; the lease rows are
//! re-read only when something changed ([`reads`]), and every quarter heartbeat for a few
//! heartbeats while we wait for releases (a join); checkpoints only when a position moved.
//!
//! Latency: besides the heartbeat ticks, the loop runs a tick when a lease owner turns dead
//! (its shards are read again at once), and re-reads the leases while it waits for releases.

mod client_streams;
mod heartbeat;
mod leader;
mod membership_tick;
mod pacing;
mod readers;
mod reads;
mod recreated;
mod shutdown;
mod start;
mod supervise;
mod tick;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::assignment::{self, ShardKey};
use crate::config::StartPosition;
use crate::config::{ConfigError, StreamConfig, WorkerConfig};
use crate::delivery::BatchHandler;
use crate::delivery::FailurePolicy;
use crate::delivery::dead_letter::DeadLetterError;
use crate::fence::{BootInstant, Fence, FenceSetter};

use crate::handoff::{self, Action, FreshStart, HandoffInput, LeaseView, no_checkpoint_start};
use crate::health::Health;
use crate::incarnation;
use crate::kinesis::{ErrorKind, KinesisError, StreamClient};
use crate::membership::{self, ClientWatch, Identity};
use crate::metrics::{Metrics, OperationLabels, ReasonLabels, RoleLabels};
use crate::position::Position;
use crate::reader::{self, Issue, ShardProgress, ShardTask};
use crate::store::schema::{GroupSnapshot, LeaseRow, ShardCacheRow, ShardInfo, shards_sk};
use crate::store::{CheckpointUpdate, ClaimStamp, HeartbeatUpdate, StateStore, StoreError, now_ms};
use heartbeat::{BeatEvent, BeatTask, FenceBook, FenceGuard};

use supervise::Outcome;

/// How this process identifies itself in the group.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Base of the client id (a random suffix is appended); defaults to the pod name.
    pub client_id: Option<String>,
    /// Pod name recorded in the client row; defaults to env `POD_NAME`, then the host name.
    pub pod: Option<String>,
}

/// Why the engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A state-store error that retrying cannot fix.
    #[error("group {group}: {source}")]
    Store {
        /// Group id.
        group: String,
        /// The store error.
        source: StoreError,
    },
    /// The dead-letter target cannot be set up (no region, malformed stream ARN).
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
}

/// The leader refreshes shard caches every this many heartbeats (and right after a shard
/// ended, and whenever a stream has no cache yet).
const REFRESH_EVERY_TICKS: u64 = 5;

/// Runs a worker until `shutdown` is cancelled, then drains and leaves the group cleanly.
/// A failing state store or Kinesis never ends it: errors are logged, counted, reported
/// in the client row and health, and retried.
pub async fn run(
    config: WorkerConfig,
    opts: EngineOptions,
    handler: Arc<dyn BatchHandler>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), EngineError> {
    config.validate()?;
    let config = config.with_consumer_names();
    let identity = Identity::new(opts.client_id, opts.pod);
    let span = info_span!("engine", group = %config.group, client = %identity.client_id);
    async move {
        let base = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let mut ddb = aws_sdk_dynamodb::config::Builder::from(&base);
        if let Some(region) = &config.state_store.region {
            ddb = ddb.region(aws_sdk_dynamodb::config::Region::new(region.clone()));
        }
        let store = StateStore::new(
            aws_sdk_dynamodb::Client::from_conf(ddb.build()),
            config.state_store.table.clone(),
        );
        info!(pod = %identity.pod, pod_uid = ?identity.pod_uid, table = %store.table(), "starting");
        let failure = FailurePolicy::connect(&config.delivery, &config.group, &base).await?;
        let engine = Engine::new(config, identity, store, base, handler, metrics, health)
            .with_failure(failure);
        engine.run(shutdown).await
    }
    .instrument(span)
    .await
}

/// One shard we hold a lease for and run a reader on.
struct Owned {
    /// Tells this reader's done event apart from an earlier reader of the same shard.
    generation: u64,
    stop: CancellationToken,
    kill: CancellationToken,
    progress: watch::Receiver<ShardProgress>,
    /// Its fencing deadline, moved forward by every confirmed heartbeat.
    deadline: FenceGuard,
    join: JoinHandle<Outcome>,
    /// The lease counter our claim or resume left: every checkpoint and the release are
    /// conditional on it.
    counter: u64,
    /// A release was requested: the reader is draining since then.
    stopping: Option<Instant>,
    /// What the store holds for this shard (last written checkpoint and lag).
    written: CheckpointUpdate,
    last_checkpoint: Instant,
}

struct StreamSlot {
    config: StreamConfig,
    client: Option<Arc<StreamClient>>,
}

struct Engine {
    config: WorkerConfig,
    identity: Identity,
    store: StateStore,
    base: SdkConfig,
    handler: Arc<dyn BatchHandler>,
    /// Retries and what happens to records the handler keeps refusing.
    failure: FailurePolicy,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    streams: Vec<StreamSlot>,
    clients: ClientWatch,
    /// Lease and shard-cache rows as last read (`clients` is refreshed every tick).
    snap: GroupSnapshot,
    /// Re-read the rows of our range at the next tick: our own writes changed them, or our
    /// plan is not applied yet.
    read_leases: bool,
    /// Re-read every lease row at the next tick (see `reads::ReadInput::asked_full`).
    read_all_leases: bool,
    /// How many claims and resumes a tick may send (limited while the store is overloaded).
    write_pacing: pacing::WritePacing,
    /// Shards whose claim or resume got no answer or was refused, with until when their
    /// rows are read with our range (see `reads::watch_until`).
    unanswered_claims: BTreeMap<ShardKey, Instant>,
    /// Where the current tick's time went (see `tick::Phases`).
    phases: tick::Phases,
    /// Tick of the last read of every lease row.
    leases_read_at: u64,
    /// Tick of the last look for missing shard caches (see `reads::LeaseRead`).
    caches_read_at: u64,
    /// Stream lists of clients whose list differs from ours (see [`client_streams`]).
    client_lists: client_streams::KnownLists,
    /// When the last client read's liveness judgments were made: a lease re-read between
    /// ticks judges owners as of then.
    clients_read_at: Instant,
    /// Shards planned for us that live owners still hold, since when new ones joined that
    /// set, and the last lease re-read between ticks (see `tick::recheck`).
    waiting: BTreeSet<ShardKey>,
    waiting_since: Instant,
    last_recheck: Instant,
    /// The live clients and every client's change counters at the previous tick.
    last_live: Vec<String>,
    last_changes: BTreeMap<String, reads::ChangeMarks>,
    /// Our own `leaseChanges` and `shardChanges`, sent with every heartbeat.
    lease_changes: u64,
    shard_changes: u64,
    /// Our readers' fences and the last confirmed heartbeat, which their deadlines count
    /// from (shared with the heartbeat task).
    book: Arc<FenceBook>,
    /// The heartbeat task, once registered ([`heartbeat`]), what it reports, and what it
    /// records in our client row.
    beat: Option<BeatTask>,
    beat_tx: mpsc::UnboundedSender<BeatEvent>,
    beat_rx: mpsc::UnboundedReceiver<BeatEvent>,
    update_tx: watch::Sender<HeartbeatUpdate>,
    /// Failed heartbeats as of the last client read.
    beat_failures: u64,
    owned: BTreeMap<ShardKey, Owned>,
    /// Releases that could not be written yet (store unavailable), retried every tick:
    /// the counter held and the final checkpoint.
    pending_release: BTreeMap<ShardKey, (u64, CheckpointUpdate)>,
    done_tx: mpsc::UnboundedSender<(ShardKey, u64)>,
    done_rx: mpsc::UnboundedReceiver<(ShardKey, u64)>,
    generations: u64,
    /// Shards owned at the end of the previous tick, to count rebalances.
    last_owned: BTreeSet<ShardKey>,
    ticks: u64,
    /// Refresh the shard caches at the leader's next run of its duties.
    refresh_caches: bool,
    known_ended: BTreeSet<ShardKey>,
    /// The streams whose shard cache and lease rows we keep: those of which we are the
    /// lowest live reader.
    led_streams: BTreeSet<String>,
    /// The live clients of the last client read and the streams each reads: what a plan
    /// (a tick's, or a lease re-read's between ticks) is made over.
    readers: assignment::Readers,
    /// The leader's duties running in the background (see [`leader`]), if any.
    duties: Option<JoinHandle<leader::DutyReport>>,
    /// The problem seen during the current / previous tick, reported by the next heartbeat.
    tick_issue: Option<Issue>,
    last_issue: Option<Issue>,
}

impl Engine {
    fn new(
        config: WorkerConfig,
        identity: Identity,
        store: StateStore,
        base: SdkConfig,
        handler: Arc<dyn BatchHandler>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let timeout = config.tuning.client_timeout;
        let streams = config
            .streams
            .iter()
            .map(|s| StreamSlot {
                config: s.clone(),
                client: None,
            })
            .collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (beat_tx, beat_rx) = mpsc::unbounded_channel();
        let page_timeout =
            crate::config::timing::store_call_timeout(config.tuning.heartbeat_interval);
        Self {
            config,
            identity,
            store: store.with_page_timeout(page_timeout),
            base,
            handler,
            failure: FailurePolicy::default(),
            metrics,
            health,
            streams,
            clients: ClientWatch::new(timeout),
            snap: GroupSnapshot::default(),
            read_leases: true,
            read_all_leases: true,
            write_pacing: pacing::WritePacing::default(),
            unanswered_claims: BTreeMap::new(),
            phases: tick::Phases::new(Instant::now()),
            leases_read_at: 0,
            caches_read_at: 0,
            client_lists: client_streams::KnownLists::new(),
            clients_read_at: Instant::now(),
            waiting: BTreeSet::new(),
            waiting_since: Instant::now(),
            last_recheck: Instant::now(),
            last_live: Vec::new(),
            last_changes: BTreeMap::new(),
            lease_changes: 0,
            shard_changes: 0,
            book: Arc::default(),
            beat: None,
            beat_tx,
            beat_rx,
            update_tx: watch::Sender::new(HeartbeatUpdate::default()),
            beat_failures: 0,
            owned: BTreeMap::new(),
            pending_release: BTreeMap::new(),
            done_tx,
            done_rx,
            generations: 0,
            last_owned: BTreeSet::new(),
            ticks: 0,
            refresh_caches: true,
            known_ended: BTreeSet::new(),
            led_streams: BTreeSet::new(),
            readers: assignment::Readers::default(),
            duties: None,
            tick_issue: None,
            last_issue: None,
        }
    }

    /// Sets the failure policy (`delivery.retry` / `onFailure`; the dead-letter writer is
    /// connected asynchronously, so it comes after `new`).
    fn with_failure(mut self, failure: FailurePolicy) -> Self {
        self.failure = failure;
        self
    }

    /// Writes our client row (idempotent for this process: a retry whose first answer was
    /// lost succeeds). `Ok` carries when the request was sent, which bounds our readers'
    /// deadlines like a heartbeat.
    async fn register(&mut self) -> Result<BootInstant, StoreError> {
        let sent = BootInstant::now();
        let streams = self.stream_names();
        self.io(
            "register",
            self.store.register_in_pod(
                self.group(),
                self.me(),
                &self.identity.pod,
                self.identity.started_at_ms,
                &streams,
                self.identity.pod_uid.as_deref(),
            ),
        )
        .await?;
        self.health.heartbeat_ok();
        Ok(sent)
    }

    /// The streams we read, as configured, in config order.
    fn stream_names(&self) -> Vec<String> {
        self.streams.iter().map(|s| s.config.name.clone()).collect()
    }

    fn group(&self) -> &str {
        &self.config.group
    }

    fn me(&self) -> &str {
        &self.identity.client_id
    }

    /// Bound on one state-store request, so a hung connection cannot stall the loop (the
    /// reader deadlines do not depend on the loop, but heartbeats and releases do).
    fn op_timeout(&self) -> Duration {
        crate::config::timing::store_call_timeout(self.config.tuning.heartbeat_interval)
    }

    /// Remembers a problem for the client row and counts it.
    fn note(&mut self, reason: &str, message: String) {
        self.metrics
            .errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        self.tick_issue = Some(Issue {
            reason: reason.to_owned(),
            message,
        });
    }

    fn note_store(&mut self, what: &str, e: &StoreError) {
        warn!(error = %e, "{what} failed");
        self.note(e.reason(), e.to_string());
    }

    /// [`Engine::io`] for a read of many pages, each bounded by the store (see
    /// [`StateStore::with_page_timeout`]): the whole is bounded by
    /// [`PAGED_READ_MAX_PAGES`] store calls, a backstop.
    async fn io_paged<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.op_timeout() * PAGED_READ_MAX_PAGES;
        io_bounded(&self.metrics, self.store.table(), op, limit, fut).await
    }

    async fn io<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        io_bounded(
            &self.metrics,
            self.store.table(),
            op,
            self.op_timeout(),
            fut,
        )
        .await
    }

    fn backoff(attempt: u32, base: Duration) -> Duration {
        let factor = 1u32 << attempt.min(5);
        (base * factor).min(Duration::from_secs(30))
    }

    // ------------------------------------------------------------------ lifecycle

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let hb = self.config.tuning.heartbeat_interval;
        // Table, then registration; both retried until they work or we are told to stop.
        let mut attempt = 0;
        loop {
            self.health.tick();
            let res = self
                .io(
                    "ensure_table",
                    self.store.ensure_table(self.config.state_store.create),
                )
                .await;
            match res {
                Ok(()) => break,
                Err(e) => {
                    error!(error = %e, "state store not usable; retrying");
                    self.note(e.reason(), e.to_string());
                }
            }
            attempt += 1;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Self::backoff(attempt, hb)) => {}
            }
        }
        self.connect_streams().await;
        let mut attempt = 0;
        loop {
            self.health.tick();
            match self.register().await {
                Ok(sent) => {
                    info!("registered");
                    self.book.confirmed(sent, self.fencing_margin());
                    break;
                }
                Err(e) => self.note_store("register", &e),
            }
            attempt += 1;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Self::backoff(attempt, hb)) => {}
            }
        }

        self.start_heartbeat();
        let mut ticker = tokio::time::interval(hb);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Between heartbeats: a tick when a lease owner turns dead (its shards are read
            // again at once), a lease re-read while we wait for releases.
            let dies = self.owner_dies_at();
            let recheck = self.recheck_due();
            let early = match (dies, recheck) {
                (Some(d), Some(r)) => Some(d.min(r)),
                (d, r) => d.or(r),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.tick().await,
                Some(event) = self.beat_rx.recv() => self.on_beat(event).await,
                _ = tokio::time::sleep_until(early.unwrap_or_else(Instant::now).into()), if early.is_some() => {
                    if dies == early {
                        self.tick().await;
                        ticker.reset();
                    } else {
                        self.recheck().await;
                    }
                }
                Some((key, generation)) = self.done_rx.recv() => {
                    if self.reap(&key, generation).await {
                        // A shard ended: re-plan now so its children start without waiting
                        // a heartbeat.
                        self.tick().await;
                    }
                }
            }
            self.publish_update();
        }
        self.shutdown().await;
        Ok(())
    }

    async fn connect_streams(&mut self) {
        for i in 0..self.streams.len() {
            if self.streams[i].client.is_some() {
                continue;
            }
            let cfg = self.streams[i].config.clone();
            match StreamClient::connect(&cfg, &self.base).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    // Learn Kinesis' clock before the first claim needs it (in the
                    // background: a stream that does not answer must not hold the loop).
                    let sync = c.clone();
                    tokio::spawn(async move {
                        let limit = Duration::from_secs(30);
                        if let Ok(Err(e)) = tokio::time::timeout(limit, sync.sync_clock()).await {
                            debug!(stream = %sync.name, error = %e, "could not learn Kinesis' clock yet");
                        }
                    });
                    self.streams[i].client = Some(c);
                }
                Err(e) => {
                    warn!(stream = %cfg.name, error = %e, "cannot connect to stream; retrying");
                    self.note(e.reason(), e.to_string());
                }
            }
        }
    }
}

/// How many state-store writes of one kind (checkpoints, claims, the leader's duties) are
/// in flight at once per worker: hundreds in a few round trips (a 10 ms write makes 1,600 a
/// second), few enough that a group starting at once does not queue up its partition: at
/// 32, the 19 workers of a new 1,000-shard group sent 600 claims at once, and DynamoDB
/// Local answered many after the 1 s timeout.
const WRITES_IN_FLIGHT: usize = 16;

/// Runs `futs` with at most [`WRITES_IN_FLIGHT`] at a time, results in completion order.
/// (A `Vec`, not any iterator: an iterator of closures held across the await would make
/// the engine's future lose `Send`.)
async fn bounded<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    futures::stream::iter(futs)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await
}

/// Pages a read of every lease row may take, at one store call each, before it is given up:
/// 10,000 shards (open and closed) are about 3 MB of rows, 3 pages, and their split shard
/// cache about as much again.
const PAGED_READ_MAX_PAGES: u32 = 16;

/// Bounds one state-store request; a timeout counts as the store being unavailable.
async fn io_bounded<T>(
    metrics: &Metrics,
    table: &str,
    op: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    metrics
        .store_requests
        .get_or_create(&OperationLabels {
            operation: op.to_owned(),
        })
        .inc();
    match tokio::time::timeout(limit, fut).await {
        Ok(res) => res,
        Err(_) => Err(StoreError::Unavailable {
            table: table.to_owned(),
            op,
            message: format!("no answer within {limit:?}"),
        }),
    }
}

#[cfg(test)]
pub(super) mod test_support {
    use super::*;

    pub(crate) fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// An endpoint that accepts connections and never answers: a hung Kinesis / DynamoDB.
    pub(crate) async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (url, task)
    }

    pub(crate) async fn sdk_config(url: &str) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::ms;
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let hb = ms(300);
        assert_eq!(Engine::backoff(0, hb), ms(300));
        assert_eq!(Engine::backoff(2, hb), ms(1200));
        assert_eq!(
            Engine::backoff(40, hb),
            Duration::from_secs(30).min(hb * 32)
        );
    }
}
