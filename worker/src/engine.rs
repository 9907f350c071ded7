//! The engine: one worker's membership loop. Heartbeats, reads the group, leads when it is
//! the lowest live client, plans, hands leases over safely, runs one reader per owned shard,
//! checkpoints, and on shutdown drains, checkpoints, releases and deregisters.
//!
//! Decisions are the pure functions of [`crate::membership`], [`crate::assignment`] and
//! [`crate::handoff`]; this module is the I/O around them.
//!
//! Safety: a reader runs only while its lease is fresh. Every successful renewal (or
//! checkpoint, which also bumps the counter) sent at time `t` extends the reader's deadline
//! to `t + clientTimeout − heartbeatInterval`, measured on our monotonic clock. Observers
//! start their clock when they first see the new counter, which is after `t`, and take the
//! lease only `clientTimeout` later; so a reader whose renewals fail is aborted before anyone
//! else may take its shard. Two live clients never read one shard at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use futures::future::join_all;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::assignment::{self, ShardKey};
use crate::config::StartPosition;
use crate::config::{ConfigError, StreamConfig, WorkerConfig};
use crate::delivery::BatchHandler;
use crate::delivery::FailurePolicy;
use crate::delivery::dead_letter::DeadLetterError;
use crate::handoff::{self, Action, FreshStart, HandoffInput, LeaseView, no_checkpoint_start};
use crate::health::Health;
use crate::kinesis::{ErrorKind, KinesisError, StreamClient};
use crate::membership::{self, Identity, Liveness};
use crate::metrics::{Metrics, OperationLabels, ReasonLabels};
use crate::reader::{self, Issue, ShardProgress, ShardTask};
use crate::store::schema::{GroupSnapshot, LeaseRow, ShardCacheRow, ShardInfo, shards_sk};
use crate::store::{CheckpointUpdate, HeartbeatUpdate, StateStore, StoreError, now_ms};

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
        info!(pod = %identity.pod, table = %store.table(), "starting");
        let failure = FailurePolicy::connect(&config.delivery, &config.group, &base).await?;
        let engine = Engine::new(config, identity, store, base, handler, metrics, health)
            .with_failure(failure);
        engine.run(shutdown).await
    }
    .instrument(span)
    .await
}

/// How a shard's supervisor task ended.
#[derive(Debug)]
enum Outcome {
    /// The reader returned (stopped, or the shard ended) with its final progress.
    Finished(ShardProgress),
    /// The reader task panicked.
    Failed(String),
    /// Aborted because its lease could not be renewed in time.
    Fenced,
    /// Aborted on request (lease lost, or shutdown deadline).
    Killed,
}

/// One shard we hold a lease for and run a reader on.
struct Owned {
    /// Tells this reader's done event apart from an earlier reader of the same shard.
    generation: u64,
    stop: CancellationToken,
    kill: CancellationToken,
    progress: watch::Receiver<ShardProgress>,
    deadline: watch::Sender<Instant>,
    join: JoinHandle<Outcome>,
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
    clients: Liveness<String>,
    leases: Liveness<ShardKey>,
    owned: BTreeMap<ShardKey, Owned>,
    /// Releases that could not be written yet (store unavailable), retried every tick.
    pending_release: BTreeMap<ShardKey, CheckpointUpdate>,
    done_tx: mpsc::UnboundedSender<(ShardKey, u64)>,
    done_rx: mpsc::UnboundedReceiver<(ShardKey, u64)>,
    generations: u64,
    /// Shards owned at the end of the previous tick, to count rebalances.
    last_owned: BTreeSet<ShardKey>,
    ticks: u64,
    refresh_caches: bool,
    known_ended: BTreeSet<ShardKey>,
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
        Self {
            config,
            identity,
            store,
            base,
            handler,
            failure: FailurePolicy::default(),
            metrics,
            health,
            streams,
            clients: Liveness::new(timeout),
            leases: Liveness::new(timeout),
            owned: BTreeMap::new(),
            pending_release: BTreeMap::new(),
            done_tx,
            done_rx,
            generations: 0,
            last_owned: BTreeSet::new(),
            ticks: 0,
            refresh_caches: true,
            known_ended: BTreeSet::new(),
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

    fn group(&self) -> &str {
        &self.config.group
    }

    fn me(&self) -> &str {
        &self.identity.client_id
    }

    /// Bound on one state-store request, so a hung connection cannot stall the loop (the
    /// reader deadlines do not depend on the loop, but heartbeats and releases do).
    fn op_timeout(&self) -> Duration {
        self.config
            .tuning
            .heartbeat_interval
            .max(Duration::from_secs(1))
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
            let res = self
                .io(
                    "register",
                    self.store
                        .register(self.group(), self.me(), &self.identity.pod),
                )
                .await;
            match res {
                Ok(_) => {
                    info!("registered");
                    self.health.heartbeat_ok();
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

        let mut ticker = tokio::time::interval(hb);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.tick().await,
                Some((key, generation)) = self.done_rx.recv() => {
                    if self.reap(&key, generation).await {
                        // A shard ended: re-plan now so its children start without waiting
                        // a heartbeat.
                        self.tick().await;
                    }
                }
            }
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
                Ok(c) => self.streams[i].client = Some(Arc::new(c)),
                Err(e) => {
                    warn!(stream = %cfg.name, error = %e, "cannot connect to stream; retrying");
                    self.note(e.reason(), e.to_string());
                }
            }
        }
    }

    // ------------------------------------------------------------------ one round

    async fn tick(&mut self) {
        self.health.tick();
        self.ticks += 1;
        self.connect_streams().await;
        if !self.heartbeat().await {
            // The store did not answer: the renewals, releases and the group read would each
            // wait out their own timeout too, stretching the tick past the liveness bound
            // while achieving nothing. Readers fence themselves by their last renewal anyway.
            self.finish_tick();
            return;
        }
        self.renew_and_checkpoint().await;
        self.retry_pending_releases().await;

        let snap = match self
            .io("load_group", self.store.load_group(self.group()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.note_store("load_group", &e);
                self.finish_tick();
                return;
            }
        };
        let now = Instant::now();
        let mut live = membership::observe_clients(&mut self.clients, &snap.clients, now);
        // We are alive by definition while we run; others judge us by our heartbeats.
        if !live.iter().any(|c| c == self.me()) {
            live.push(self.me().to_owned());
            live.sort();
        }
        let leader = membership::leader(&live) == Some(self.me());
        self.metrics.is_leader.set(i64::from(leader));
        self.metrics.live_clients.set(live.len() as i64);

        let mut snap = snap;
        if leader {
            self.lead(&mut snap, now).await;
        }

        // Lease liveness, from our own observations of their counters.
        let mut views = BTreeMap::new();
        for l in &snap.leases {
            let key = ShardKey::new(&l.stream, &l.shard_id);
            self.leases.observe(key.clone(), l.lease_counter, now);
            let stale = self.leases.is_stale_at(&key, l.lease_counter, now);
            views.insert(
                key.clone(),
                LeaseView {
                    owner: l.owner.clone(),
                    counter: l.lease_counter,
                    ended: l.ended,
                    stale,
                },
            );
        }
        self.leases.retain(|k| views.contains_key(k));

        let names: Vec<String> = self.streams.iter().map(|s| s.config.name.clone()).collect();
        let plan = assignment::plan(&assignment::streams_from_snapshot(&names, &snap), &live);
        let reading: BTreeSet<ShardKey> = self.owned.keys().cloned().collect();
        let actions = handoff::decide(HandoffInput {
            me: self.me(),
            plan: &plan,
            leases: &views,
            reading: &reading,
        });
        self.act_all(actions, &snap).await;
        self.finish_tick();
    }

    fn finish_tick(&mut self) {
        self.metrics.leases_held.set(self.owned.len() as i64);
        let owned: BTreeSet<ShardKey> = self.owned.keys().cloned().collect();
        if owned != self.last_owned {
            self.metrics.rebalances.inc();
            self.last_owned = owned;
        }
        self.last_issue = self.tick_issue.take();
    }

    /// Writes our heartbeat (registering again if the leader pruned us); false when the
    /// store could not be reached or refused it.
    async fn heartbeat(&mut self) -> bool {
        let reader_issue = self
            .owned
            .values()
            .find_map(|o| o.progress.borrow().issue.clone());
        let issue = reader_issue.or_else(|| self.last_issue.clone());
        let update = HeartbeatUpdate {
            owned_shards: self.owned.len() as u32,
            last_error: issue.map(|i| (i.reason, i.message)),
        };
        let res = self
            .io(
                "heartbeat",
                self.store.heartbeat(self.group(), self.me(), &update),
            )
            .await;
        match res {
            Ok(_) => {
                self.metrics.heartbeats.inc();
                self.health.heartbeat_ok();
                true
            }
            Err(StoreError::Conflict { .. }) => {
                // The leader pruned us (it saw our heartbeat stand still): come back.
                warn!("our client row was pruned; registering again");
                let res = self
                    .io(
                        "register",
                        self.store
                            .register(self.group(), self.me(), &self.identity.pod),
                    )
                    .await;
                match res {
                    Ok(_) => {
                        self.health.heartbeat_ok();
                        true
                    }
                    Err(e) => {
                        self.note_store("register", &e);
                        false
                    }
                }
            }
            Err(e) => {
                self.note_store("heartbeat", &e);
                false
            }
        }
    }

    /// Renews every lease we read (a due checkpoint is the renewal), concurrently, and
    /// extends each reader's deadline from the time its successful request was sent.
    async fn renew_and_checkpoint(&mut self) {
        let now = Instant::now();
        let interval = self.config.tuning.checkpoint_interval;
        let margin = self
            .config
            .tuning
            .client_timeout
            .saturating_sub(self.config.tuning.heartbeat_interval);
        let mut writes = Vec::new();
        for (key, o) in &self.owned {
            if o.join.is_finished() {
                continue;
            }
            let p = o.progress.borrow().clone();
            let update = CheckpointUpdate {
                position: p
                    .acked
                    .clone()
                    .filter(|a| Some(a) != o.written.position.as_ref()),
                ended: false,
                millis_behind: p.millis_behind,
                lag_at_ms: p.lag_at_ms,
            };
            let changed =
                update.position.is_some() || update.millis_behind != o.written.millis_behind;
            let checkpoint = changed && now.duration_since(o.last_checkpoint) >= interval;
            let store = self.store.clone();
            let (group, me) = (self.group().to_owned(), self.me().to_owned());
            let key = key.clone();
            let op_timeout = self.op_timeout();
            let metrics = self.metrics.clone();
            writes.push(async move {
                let sent = Instant::now();
                let res = if checkpoint {
                    io_bounded(
                        &metrics,
                        store.table(),
                        "checkpoint",
                        op_timeout,
                        store.checkpoint(&group, &key.stream, &key.shard_id, &me, &update),
                    )
                    .await
                } else {
                    io_bounded(
                        &metrics,
                        store.table(),
                        "renew",
                        op_timeout,
                        store.renew_lease(&group, &key.stream, &key.shard_id, &me),
                    )
                    .await
                };
                (key, sent, checkpoint.then_some(update), res)
            });
        }
        for (key, sent, checkpoint, res) in join_all(writes).await {
            match res {
                Ok(_) => {
                    let Some(o) = self.owned.get_mut(&key) else {
                        continue;
                    };
                    let _ = o.deadline.send(sent + margin);
                    if let Some(cp) = checkpoint {
                        self.metrics.checkpoints_written.inc();
                        if cp.position.is_some() {
                            o.written.position = cp.position;
                        }
                        o.written.millis_behind = cp.millis_behind;
                        o.written.lag_at_ms = cp.lag_at_ms;
                        o.last_checkpoint = sent;
                    }
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone took it over (our renewals must have failed for too long):
                    // stop at once and write nothing.
                    warn!(stream = %key.stream, shard = %key.shard_id, "lease lost; abandoning shard");
                    self.metrics.lease_conflicts.inc();
                    self.abandon(&key).await;
                }
                Err(e) => self.note_store("lease renewal", &e),
            }
        }
    }

    async fn retry_pending_releases(&mut self) {
        let pending: Vec<(ShardKey, CheckpointUpdate)> = std::mem::take(&mut self.pending_release)
            .into_iter()
            .collect();
        for (key, cp) in pending {
            self.release(key, cp).await;
        }
    }

    // ------------------------------------------------------------------ leader

    async fn lead(&mut self, snap: &mut GroupSnapshot, now: Instant) {
        // Prune clients whose heartbeat stood still for the timeout, conditional on the
        // counter we watched, so a client that just came back is kept.
        for c in &snap.clients {
            if c.client_id == self.me() || self.clients.is_alive(&c.client_id, now) {
                continue;
            }
            let res = self
                .io(
                    "prune",
                    self.store
                        .prune_client(self.group(), &c.client_id, c.heartbeat),
                )
                .await;
            match res {
                Ok(()) => info!(dead = %c.client_id, pod = %c.pod, "pruned dead client"),
                Err(StoreError::Conflict { .. }) => {
                    debug!(client = %c.client_id, "client came back; not pruned")
                }
                Err(e) => self.note_store("prune", &e),
            }
        }

        let mut newly_ended = false;
        for l in snap.leases.iter().filter(|l| l.ended) {
            newly_ended |= self
                .known_ended
                .insert(ShardKey::new(&l.stream, &l.shard_id));
        }
        let missing_cache = self
            .streams
            .iter()
            .any(|s| !snap.shard_caches.iter().any(|c| c.stream == s.config.name));
        if self.refresh_caches
            || newly_ended
            || missing_cache
            || self.ticks.is_multiple_of(REFRESH_EVERY_TICKS)
        {
            self.refresh_shard_caches(snap).await;
        }
        prune_known_ended(&mut self.known_ended, snap);
        self.create_missing_leases(snap).await;
    }

    async fn refresh_shard_caches(&mut self, snap: &mut GroupSnapshot) {
        let mut all_ok = true;
        for i in 0..self.streams.len() {
            let Some(client) = self.streams[i].client.clone() else {
                all_ok = false;
                continue;
            };
            let name = self.streams[i].config.name.clone();
            // Bounded like the store calls: heartbeats and renewals come right after this
            // in the same loop and must never wait behind a hung Kinesis.
            let shards = match list_shards_bounded(&client, self.op_timeout()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(stream = %name, error = %e, "ListShards failed");
                    self.note(e.reason(), e.to_string());
                    all_ok = false;
                    continue;
                }
            };
            for shard_id in trimmed_leases(&name, &shards, &snap.leases) {
                let res = self
                    .io(
                        "delete_lease",
                        self.store.delete_lease(self.group(), &name, &shard_id),
                    )
                    .await;
                match res {
                    Ok(()) => {
                        debug!(stream = %name, shard = %shard_id, "deleted lease of a trimmed shard")
                    }
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => self.note_store("delete_lease", &e),
                }
            }
            let existing = snap.shard_caches.iter().position(|c| c.stream == name);
            if existing.is_some_and(|i| snap.shard_caches[i].shards == shards) {
                continue; // unchanged: save the write
            }
            let row = ShardCacheRow {
                pk: self.group().to_owned(),
                sk: shards_sk(&name),
                stream: name.clone(),
                shards,
                refreshed_at_ms: now_ms(),
                refreshed_by: self.me().to_owned(),
            };
            match self
                .io("put_shard_cache", self.store.put_shard_cache(&row))
                .await
            {
                Ok(()) => {
                    info!(stream = %name, shards = row.shards.len(), "shard cache updated");
                    match existing {
                        Some(i) => snap.shard_caches[i] = row,
                        None => snap.shard_caches.push(row),
                    }
                }
                Err(e) => {
                    self.note_store("put_shard_cache", &e);
                    all_ok = false;
                }
            }
        }
        self.refresh_caches = !all_ok;
    }

    /// Creates an unowned lease row for every consumable shard lacking one, so the status
    /// shows unassigned shards. (Claiming creates missing rows too; this is for visibility.)
    async fn create_missing_leases(&mut self, snap: &GroupSnapshot) {
        let names: Vec<String> = self.streams.iter().map(|s| s.config.name.clone()).collect();
        for s in assignment::streams_from_snapshot(&names, snap) {
            for shard in s.consumable {
                if snap
                    .leases
                    .iter()
                    .any(|l| l.stream == s.stream && l.shard_id == shard)
                {
                    continue;
                }
                let res = self
                    .io(
                        "create_lease",
                        self.store.create_lease(self.group(), &s.stream, &shard),
                    )
                    .await;
                if let Err(e) = res {
                    self.note_store("create_lease", &e);
                }
            }
        }
    }

    // ------------------------------------------------------------------ actions

    /// Carries out one tick's actions. The lease writes of claims and resumes run
    /// concurrently: each may take up to the op timeout with a slow store, and one after
    /// the other they would delay the next renewals past the fencing margin.
    async fn act_all(&mut self, actions: Vec<Action>, snap: &GroupSnapshot) {
        let mut writes = Vec::new();
        for action in actions {
            let (key, claim) = match action {
                Action::Claim { key, from } => (key, Some(from)),
                Action::Resume(key) => (key, None),
                other => {
                    self.act(other).await;
                    continue;
                }
            };
            if self.pending_release.contains_key(&key) {
                continue;
            }
            let Some(idx) = self.stream_index(&key.stream) else {
                continue;
            };
            if self.streams[idx].client.is_none() {
                continue;
            }
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            let (group, me) = (self.group().to_owned(), self.me().to_owned());
            let op_timeout = self.op_timeout();
            writes.push(async move {
                let sent = Instant::now();
                let res = match &claim {
                    Some(from) => {
                        io_bounded(
                            &metrics,
                            store.table(),
                            "claim",
                            op_timeout,
                            store.claim_lease_detailed(
                                &group,
                                &key.stream,
                                &key.shard_id,
                                &me,
                                from.as_ref().map(|(o, c)| (o.as_str(), *c)),
                            ),
                        )
                        .await
                    }
                    None => {
                        io_bounded(
                            &metrics,
                            store.table(),
                            "resume",
                            op_timeout,
                            store.resume_lease(&group, &key.stream, &key.shard_id, &me),
                        )
                        .await
                    }
                };
                (key, idx, claim, sent, res)
            });
        }
        for (key, idx, claim, sent, res) in join_all(writes).await {
            match (claim, res) {
                (Some(from), Ok(claimed)) => {
                    let row = &claimed.row;
                    self.metrics.leases_acquired.inc();
                    match &from {
                        Some((old, _)) => {
                            info!(stream = %key.stream, shard = %key.shard_id, from = %old, checkpoint = ?row.checkpoint_position(), "took over expired lease")
                        }
                        None => {
                            info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?row.checkpoint_position(), "claimed lease")
                        }
                    }
                    let fresh = no_checkpoint_start(
                        self.streams[idx].config.start_position,
                        parent_read_to_end(snap, &key),
                        claimed.first_claim,
                        claimed.first_claimed_at_ms,
                        claimed.reset_to,
                    );
                    self.spawn_reader(key, idx, &claimed.row, sent, fresh);
                }
                (None, Ok(claimed)) => {
                    info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?claimed.row.checkpoint_position(), "resuming owned shard");
                    let fresh = no_checkpoint_start(
                        self.streams[idx].config.start_position,
                        parent_read_to_end(snap, &key),
                        false,
                        claimed.first_claimed_at_ms,
                        claimed.reset_to,
                    );
                    self.spawn_reader(key, idx, &claimed.row, sent, fresh);
                }
                (claim, Err(StoreError::Conflict { .. })) => {
                    self.metrics.lease_conflicts.inc();
                    if claim.is_some() {
                        debug!(stream = %key.stream, shard = %key.shard_id, "lost claim race");
                    }
                }
                (Some(_), Err(e)) => self.note_store("claim", &e),
                (None, Err(e)) => self.note_store("renew", &e),
            }
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            // Claims and resumes go through `act_all`, concurrently.
            Action::Claim { .. } | Action::Resume(_) => {}
            Action::Renew(_) => {} // done for every reader in renew_and_checkpoint
            Action::Release(key) => {
                if let Some(o) = self.owned.get_mut(&key) {
                    match o.stopping {
                        None => {
                            info!(stream = %key.stream, shard = %key.shard_id, "shard leaves our range; draining");
                            o.stopping = Some(Instant::now());
                            o.stop.cancel();
                        }
                        // A batch the handler keeps failing must not pin the shard here
                        // forever: after the shutdown bound, cut it off and hand over what
                        // was acknowledged (the next owner redelivers the rest).
                        Some(since) if since.elapsed() > self.config.tuning.shutdown_timeout => {
                            warn!(stream = %key.stream, shard = %key.shard_id, "in-flight batch did not finish within the shutdown bound; handing the shard over");
                            o.kill.cancel();
                        }
                        Some(_) => {}
                    }
                } else if !self.pending_release.contains_key(&key) {
                    self.release(key, CheckpointUpdate::default()).await;
                }
            }
            Action::Abandon(key) => {
                warn!(stream = %key.stream, shard = %key.shard_id, "lease taken over; abandoning shard");
                self.abandon(&key).await;
            }
            Action::Wait(key) => {
                debug!(stream = %key.stream, shard = %key.shard_id, "waiting for the owner to release");
            }
        }
    }

    fn stream_index(&self, name: &str) -> Option<usize> {
        self.streams.iter().position(|s| s.config.name == name)
    }

    fn spawn_reader(
        &mut self,
        key: ShardKey,
        stream_index: usize,
        row: &LeaseRow,
        sent: Instant,
        fresh: FreshStart,
    ) {
        self.generations += 1;
        let Some(client) = self.streams[stream_index].client.clone() else {
            return;
        };
        let tuning = &self.config.tuning;
        let deadline_at = sent
            + tuning
                .client_timeout
                .saturating_sub(tuning.heartbeat_interval);
        let initial = ShardProgress {
            acked: row.checkpoint_position(),
            ..ShardProgress::default()
        };
        let (progress_tx, progress_rx) = watch::channel(initial);
        let (deadline_tx, deadline_rx) = watch::channel(deadline_at);
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let task = ShardTask {
            client,
            stream: start_config(&self.streams[stream_index].config, row, fresh),
            shard_id: key.shard_id.clone(),
            checkpoint: row.checkpoint_position(),
            failure: self.failure.clone(),
        };
        let span = info_span!("shard", group = %self.config.group, client = %self.identity.client_id, stream = %key.stream, shard = %key.shard_id);
        let reader = reader::read_shard(
            task,
            tuning.clone(),
            self.handler.clone(),
            self.metrics.clone(),
            progress_tx,
            stop.clone(),
        );
        let join = tokio::spawn(
            supervise(
                tokio::spawn(reader.instrument(span.clone())),
                deadline_rx,
                kill.clone(),
                self.done_tx.clone(),
                (key.clone(), self.generations),
            )
            .instrument(span),
        );
        self.owned.insert(
            key,
            Owned {
                generation: self.generations,
                stop,
                kill,
                progress: progress_rx,
                deadline: deadline_tx,
                join,
                stopping: None,
                written: CheckpointUpdate {
                    position: row.checkpoint_position(),
                    ended: false,
                    millis_behind: row.millis_behind,
                    lag_at_ms: row.lag_at_ms,
                },
                last_checkpoint: Instant::now(),
            },
        );
        self.metrics.leases_held.set(self.owned.len() as i64);
    }

    /// Stops a reader at once (we no longer own its lease) and writes nothing.
    async fn abandon(&mut self, key: &ShardKey) {
        if let Some(o) = self.owned.remove(key) {
            o.kill.cancel();
            let _ = o.join.await;
        }
        self.metrics.leases_held.set(self.owned.len() as i64);
    }

    /// A supervisor finished: write the final checkpoint and release (or, when fenced or
    /// killed, write nothing). Returns whether the shard ended.
    async fn reap(&mut self, key: &ShardKey, generation: u64) -> bool {
        if self
            .owned
            .get(key)
            .is_none_or(|o| o.generation != generation)
        {
            return false; // an earlier, abandoned reader of this shard
        }
        let Some(o) = self.owned.remove(key) else {
            return false;
        };
        let outcome = match o.join.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        self.metrics.leases_held.set(self.owned.len() as i64);
        let last = o.progress.borrow().clone();
        match outcome {
            Outcome::Finished(p) => {
                let ended = p.ended;
                if ended {
                    info!(stream = %key.stream, shard = %key.shard_id, "shard read to its end");
                    self.refresh_caches = true;
                }
                self.release(key.clone(), final_update(&p)).await;
                ended
            }
            Outcome::Failed(msg) => {
                error!(stream = %key.stream, shard = %key.shard_id, error = %msg, "reader failed; releasing to retry");
                self.note("ReaderFailed", msg);
                self.release(key.clone(), final_update(&last)).await;
                false
            }
            Outcome::Fenced => {
                warn!(stream = %key.stream, shard = %key.shard_id, "lease renewals failed for too long; reader stopped so another client may take over");
                self.note(
                    "LeaseRenewalFailed",
                    format!("could not renew the lease of {key} in time; stopped reading it"),
                );
                false
            }
            // Killed while draining for a release: hand over what was acknowledged.
            Outcome::Killed if o.stopping.is_some() => {
                self.release(key.clone(), final_update(&last)).await;
                false
            }
            Outcome::Killed => false,
        }
    }

    async fn release(&mut self, key: ShardKey, cp: CheckpointUpdate) {
        let res = self
            .io(
                "release",
                self.store
                    .release_lease(self.group(), &key.stream, &key.shard_id, self.me(), &cp),
            )
            .await;
        match res {
            Ok(()) => {
                self.metrics.leases_released.inc();
                if cp.position.is_some() || cp.ended {
                    self.metrics.checkpoints_written.inc();
                }
                info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?cp.position, ended = cp.ended, "released lease");
            }
            Err(StoreError::Conflict { .. }) => {
                self.metrics.lease_conflicts.inc();
                debug!(stream = %key.stream, shard = %key.shard_id, "lease was no longer ours at release");
            }
            Err(e) => {
                self.note_store("release", &e);
                self.pending_release.insert(key, cp);
            }
        }
    }

    // ------------------------------------------------------------------ shutdown

    async fn shutdown(mut self) {
        let tuning = self.config.tuning.clone();
        let started = Instant::now();
        let deadline = started + tuning.shutdown_timeout;
        // Leave a share of the bound for the writes after the drain.
        let write_reserve = (tuning.shutdown_timeout / 4).min(Duration::from_secs(5));
        let drain_deadline = deadline - write_reserve;
        info!(shards = self.owned.len(), "shutting down: draining readers");
        for o in self.owned.values() {
            o.stop.cancel();
        }
        // Wait for the in-flight batches, renewing meanwhile so no lease expires mid-drain.
        let mut ticker = tokio::time::interval(tuning.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.owned.values().any(|o| !o.join.is_finished()) && Instant::now() < drain_deadline
        {
            tokio::select! {
                _ = tokio::time::sleep_until(drain_deadline.into()) => {}
                _ = ticker.tick() => self.renew_and_checkpoint().await,
                _ = self.done_rx.recv() => {}
            }
        }
        for o in self.owned.values() {
            if !o.join.is_finished() {
                warn!("in-flight batch did not finish within the shutdown bound; abandoning it");
                o.kill.cancel();
            }
        }
        // Final checkpoints and releases, concurrently, bounded by what is left.
        let owned = std::mem::take(&mut self.owned);
        let mut releases = Vec::new();
        for (key, o) in owned {
            let outcome = o.join.await;
            let last = o.progress.borrow().clone();
            let cp = match outcome {
                Ok(Outcome::Finished(p)) => final_update(&p),
                // Only acknowledged progress is ever published, so it is safe to record
                // even for a reader cut off mid-batch.
                Ok(Outcome::Killed | Outcome::Failed(_)) | Err(_) => final_update(&last),
                Ok(Outcome::Fenced) => continue,
            };
            releases.push((key, cp));
        }
        releases.extend(std::mem::take(&mut self.pending_release));
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        let store = self.store.clone();
        let (group, me) = (self.group().to_owned(), self.me().to_owned());
        let writes = releases.into_iter().map(|(key, cp)| {
            let store = store.clone();
            let metrics = self.metrics.clone();
            let (group, me) = (group.clone(), me.clone());
            async move {
                let res = io_bounded(
                    &metrics,
                    store.table(),
                    "release",
                    remaining,
                    store.release_lease(&group, &key.stream, &key.shard_id, &me, &cp),
                )
                .await;
                (key, cp, res)
            }
        });
        for (key, cp, res) in join_all(writes).await {
            match res {
                Ok(()) => {
                    self.metrics.leases_released.inc();
                    self.metrics.checkpoints_written.inc();
                    info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?cp.position, ended = cp.ended, "released lease");
                }
                Err(e) => {
                    warn!(stream = %key.stream, shard = %key.shard_id, error = %e, "could not release lease at shutdown; it will expire")
                }
            }
        }
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        match io_bounded(
            &self.metrics,
            self.store.table(),
            "deregister",
            remaining,
            self.store.deregister(self.group(), self.me()),
        )
        .await
        {
            Ok(()) => info!(elapsed = ?started.elapsed(), "deregistered; shutdown complete"),
            Err(e) => warn!(error = %e, "could not deregister; the leader will prune us"),
        }
        self.health.deregistered();
        self.metrics.leases_held.set(0);
        self.metrics.is_leader.set(0);
    }
}

/// Whether one of the shard's parents (per the leader's cache) has an ended lease here.
fn parent_read_to_end(snap: &GroupSnapshot, key: &ShardKey) -> bool {
    let Some(info) = snap
        .shard_caches
        .iter()
        .find(|c| c.stream == key.stream)
        .and_then(|c| c.shards.iter().find(|s| s.shard_id == key.shard_id))
    else {
        return false;
    };
    info.parents().any(|p| {
        snap.leases
            .iter()
            .any(|l| l.stream == key.stream && l.shard_id == p && l.ended)
    })
}

/// The stream config a reader gets: the configured one, with the start position replaced
/// as [`no_checkpoint_start`] decided when the lease holds no checkpoint.
fn start_config(configured: &StreamConfig, row: &LeaseRow, fresh: FreshStart) -> StreamConfig {
    let mut stream = configured.clone();
    if row.checkpoint.is_some() {
        return stream;
    }
    match fresh {
        FreshStart::Configured => {}
        FreshStart::TrimHorizon => {
            stream.start_position = StartPosition::TrimHorizon;
            stream.start_timestamp = None;
        }
        FreshStart::AtTimestampMs(ms) => {
            if let Ok(t) = jiff::Timestamp::from_millisecond(ms) {
                stream.start_position = StartPosition::AtTimestamp;
                stream.start_timestamp = Some(t);
            }
        }
    }
    stream
}

/// Lease rows of `stream` that can go: the shard is no longer listed (trimmed after the
/// retention period), it was read to its end, and nobody owns it. A parent missing from
/// the cache counts as ended for its children, so deleting such a row changes no decision;
/// rows of shards that did not end are kept, in case a listing was incomplete.
fn trimmed_leases(stream: &str, listed: &[ShardInfo], leases: &[LeaseRow]) -> Vec<String> {
    leases
        .iter()
        .filter(|l| l.stream == stream && l.ended && l.owner.is_none())
        .filter(|l| !listed.iter().any(|s| s.shard_id == l.shard_id))
        .map(|l| l.shard_id.clone())
        .collect()
}

/// The release write for a reader's last progress: the acknowledged position, the end flag
/// and the lag.
fn final_update(p: &ShardProgress) -> CheckpointUpdate {
    CheckpointUpdate {
        position: p.acked.clone(),
        ended: p.ended,
        millis_behind: p.millis_behind,
        lag_at_ms: p.lag_at_ms,
    }
}

/// ListShards, bounded by `limit`; a timeout counts as Kinesis being unavailable.
async fn list_shards_bounded(
    client: &StreamClient,
    limit: Duration,
) -> Result<Vec<ShardInfo>, KinesisError> {
    match tokio::time::timeout(limit, client.list_shards()).await {
        Ok(res) => res,
        Err(_) => Err(KinesisError::Call {
            kind: ErrorKind::Unavailable,
            operation: "ListShards",
            stream: client.name.clone(),
            message: format!("no answer within {limit:?}"),
        }),
    }
}

/// Keeps `known_ended` bounded: only shards still in a shard cache, or whose ended lease
/// row is still there (dropping those would make them "newly ended" again next tick).
fn prune_known_ended(known: &mut BTreeSet<ShardKey>, snap: &GroupSnapshot) {
    let mut keep: BTreeSet<ShardKey> = BTreeSet::new();
    for c in &snap.shard_caches {
        for s in &c.shards {
            keep.insert(ShardKey::new(&c.stream, &s.shard_id));
        }
    }
    for l in snap.leases.iter().filter(|l| l.ended) {
        keep.insert(ShardKey::new(&l.stream, &l.shard_id));
    }
    known.retain(|k| keep.contains(k));
}

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

/// Watches one reader: returns when it finishes, aborts it when its lease deadline passes
/// without renewal (fencing) or when told to, and tells the engine it is done.
async fn supervise(
    mut reader: JoinHandle<ShardProgress>,
    mut deadline: watch::Receiver<Instant>,
    kill: CancellationToken,
    done: mpsc::UnboundedSender<(ShardKey, u64)>,
    key: (ShardKey, u64),
) -> Outcome {
    let outcome = loop {
        let at = *deadline.borrow_and_update();
        tokio::select! {
            res = &mut reader => break match res {
                Ok(p) => Outcome::Finished(p),
                Err(e) => Outcome::Failed(e.to_string()),
            },
            _ = kill.cancelled() => {
                reader.abort();
                let _ = (&mut reader).await;
                break Outcome::Killed;
            }
            _ = tokio::time::sleep_until(at.into()) => {
                if *deadline.borrow() > Instant::now() {
                    continue; // extended meanwhile
                }
                reader.abort();
                let _ = (&mut reader).await;
                break Outcome::Fenced;
            }
            changed = deadline.changed() => {
                if changed.is_err() {
                    // The engine dropped us: never read without an owner watching.
                    reader.abort();
                    let _ = (&mut reader).await;
                    break Outcome::Killed;
                }
            }
        }
    };
    let _ = done.send(key);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Position;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A reader that runs until aborted, flagging when it is dropped.
    fn endless(dropped: Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<ShardProgress> {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        tokio::spawn(async move {
            let _flag = Flag(dropped);
            futures::future::pending::<()>().await;
            ShardProgress::default()
        })
    }

    enum Poke {
        Nothing,
        ExtendEvery(u64),
        Kill,
        DropEngine,
    }

    /// (name, initial deadline ms, what the engine does, expected outcome, returns before ms)
    #[tokio::test]
    async fn supervise_table() {
        let cases: Vec<(&str, u64, Poke, &str, u64)> = vec![
            (
                "deadline passes without renewal: fenced",
                100,
                Poke::Nothing,
                "Fenced",
                1000,
            ),
            ("engine kills it", 10_000, Poke::Kill, "Killed", 1000),
            (
                "engine gone: never read unwatched",
                10_000,
                Poke::DropEngine,
                "Killed",
                1000,
            ),
            (
                "renewals keep it running until it is killed",
                100,
                Poke::ExtendEvery(30),
                "Killed",
                2000,
            ),
        ];
        for (name, initial, poke, want, bound) in cases {
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = endless(dropped.clone());
            let (dtx, drx) = watch::channel(Instant::now() + ms(initial));
            let kill = CancellationToken::new();
            let (done_tx, mut done_rx) = mpsc::unbounded_channel();
            let key = (ShardKey::new("s", "shard-0"), 7);
            let started = Instant::now();
            let sup = tokio::spawn(supervise(reader, drx, kill.clone(), done_tx, key.clone()));
            let mut dtx = Some(dtx);
            match poke {
                Poke::Nothing => {}
                Poke::Kill => kill.cancel(),
                Poke::DropEngine => drop(dtx.take()),
                Poke::ExtendEvery(every) => {
                    // Keep extending for 500ms (well past the initial deadline), then kill.
                    while started.elapsed() < ms(500) {
                        tokio::time::sleep(ms(every)).await;
                        if let Some(d) = &dtx {
                            let _ = d.send(Instant::now() + ms(100));
                        }
                        assert!(!sup.is_finished(), "{name}: stopped while renewed");
                    }
                    kill.cancel();
                }
            }
            let outcome = tokio::time::timeout(ms(bound), sup)
                .await
                .expect(name)
                .expect(name);
            let got = match outcome {
                Outcome::Finished(_) => "Finished",
                Outcome::Failed(_) => "Failed",
                Outcome::Fenced => "Fenced",
                Outcome::Killed => "Killed",
            };
            assert_eq!(got, want, "{name}");
            assert!(
                dropped.load(std::sync::atomic::Ordering::SeqCst),
                "{name}: reader must be gone"
            );
            assert_eq!(done_rx.recv().await, Some(key), "{name}: engine told");
        }
    }

    #[tokio::test]
    async fn supervise_reports_a_finished_reader() {
        let reader = tokio::spawn(async {
            ShardProgress {
                acked: Some(Position::whole("9")),
                ended: true,
                ..ShardProgress::default()
            }
        });
        let (_dtx, drx) = watch::channel(Instant::now() + ms(5000));
        let (done_tx, _done_rx) = mpsc::unbounded_channel();
        let out = supervise(
            reader,
            drx,
            CancellationToken::new(),
            done_tx,
            (ShardKey::new("s", "x"), 1),
        )
        .await;
        match out {
            Outcome::Finished(p) => {
                assert!(p.ended);
                assert_eq!(final_update(&p).position, Some(Position::whole("9")));
                assert!(final_update(&p).ended);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trimmed_leases_table() {
        let lease = |stream: &str, shard: &str, owner: Option<&str>, ended: bool| LeaseRow {
            owner: owner.map(str::to_owned),
            lease_counter: 1,
            ended,
            ..LeaseRow::unowned("ns/g", stream, shard, 0)
        };
        let listed = vec![ShardInfo {
            shard_id: "s-1".into(),
            parent: Some("s-0".into()),
            adjacent_parent: None,
            closed: false,
        }];
        let leases = vec![
            lease("a", "s-0", None, true),      // trimmed, ended, free: delete
            lease("a", "s-1", None, false),     // still listed: keep
            lease("a", "s-2", None, false),     // not listed but never ended: keep
            lease("a", "s-3", Some("c"), true), // owned: keep
            lease("b", "s-0", None, true),      // another stream: keep
        ];
        assert_eq!(
            trimmed_leases("a", &listed, &leases),
            vec!["s-0".to_owned()]
        );
    }

    #[test]
    fn start_config_table() {
        let configured: StreamConfig =
            serde_yaml::from_str("name: s\nstartPosition: Latest").expect("stream");
        let row = |cp: Option<&str>| LeaseRow {
            owner: Some("me".into()),
            lease_counter: 1,
            checkpoint: cp.map(str::to_owned),
            ..LeaseRow::unowned("ns/g", "s", "x", 0)
        };
        let ts = |ms: i64| jiff::Timestamp::from_millisecond(ms).ok();
        // (name, checkpoint, decision, want position, want timestamp)
        let cases = [
            (
                "configured",
                None,
                FreshStart::Configured,
                StartPosition::Latest,
                None,
            ),
            (
                "child",
                None,
                FreshStart::TrimHorizon,
                StartPosition::TrimHorizon,
                None,
            ),
            (
                "handoff",
                None,
                FreshStart::AtTimestampMs(1_700_000_000_000),
                StartPosition::AtTimestamp,
                ts(1_700_000_000_000),
            ),
            (
                "a checkpoint wins",
                Some("42"),
                FreshStart::TrimHorizon,
                StartPosition::Latest,
                None,
            ),
        ];
        for (name, cp, fresh, pos, at) in cases {
            let got = start_config(&configured, &row(cp), fresh);
            assert_eq!(
                (got.start_position, got.start_timestamp),
                (pos, at),
                "{name}"
            );
        }
    }

    #[test]
    fn prune_known_ended_table() {
        let info = |id: &str| ShardInfo {
            shard_id: id.into(),
            parent: None,
            adjacent_parent: None,
            closed: true,
        };
        let lease = |shard: &str, ended: bool| LeaseRow {
            lease_counter: 1,
            ended,
            ..LeaseRow::unowned("ns/g", "a", shard, 0)
        };
        let snap = GroupSnapshot {
            shard_caches: vec![ShardCacheRow {
                pk: "ns/g".into(),
                sk: shards_sk("a"),
                stream: "a".into(),
                shards: vec![info("s-1")],
                refreshed_at_ms: 0,
                refreshed_by: "c".into(),
            }],
            leases: vec![lease("s-2", true), lease("s-3", false)],
            ..GroupSnapshot::default()
        };
        let mut known: BTreeSet<ShardKey> = ["s-1", "s-2", "s-3", "s-4"]
            .iter()
            .map(|s| ShardKey::new("a", *s))
            .chain([ShardKey::new("b", "s-1")])
            .collect();
        prune_known_ended(&mut known, &snap);
        // s-1: still cached; s-2: its ended row is still there; s-3 (row not ended), s-4
        // (gone) and another stream's shard absent from every cache: dropped.
        let want: BTreeSet<ShardKey> = [ShardKey::new("a", "s-1"), ShardKey::new("a", "s-2")]
            .into_iter()
            .collect();
        assert_eq!(known, want);
    }

    /// An endpoint that accepts connections and never answers: a hung Kinesis / DynamoDB.
    async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
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

    async fn sdk_config(url: &str) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await
    }

    #[tokio::test]
    async fn list_shards_is_bounded() {
        let (url, hole) = black_hole().await;
        let base = sdk_config(&url).await;
        let stream: StreamConfig = serde_yaml::from_str("name: s").unwrap();
        let client = StreamClient::connect(&stream, &base).await.unwrap();
        let started = Instant::now();
        let res = list_shards_bounded(&client, ms(300)).await;
        assert!(started.elapsed() < ms(3000), "{:?}", started.elapsed());
        assert_eq!(res.unwrap_err().kind(), ErrorKind::Unavailable);
        hole.abort();
    }

    /// Claims against a store that never answers take one op timeout in all, not one per
    /// claim: the next renewals must not fall behind the fencing margin.
    #[tokio::test]
    async fn claims_of_one_tick_run_concurrently() {
        let (url, hole) = black_hole().await;
        let base = sdk_config(&url).await;
        let config: WorkerConfig = serde_yaml::from_str(
            "group: ns/g\nstreams:\n- name: s\nstateStore:\n  table: t\ndelivery:\n  stdout: {}\ntuning:\n  heartbeatInterval: 500ms\n",
        )
        .expect("config");
        let store = StateStore::new(aws_sdk_dynamodb::Client::new(&base), "t");
        struct Nop;
        impl BatchHandler for Nop {
            fn handle<'a>(
                &'a self,
                _b: &'a [crate::delivery::Record],
            ) -> futures::future::BoxFuture<'a, Result<(), crate::delivery::HandlerError>>
            {
                Box::pin(async { Ok(()) })
            }
        }
        let mut engine = Engine::new(
            config,
            Identity::new(Some("c1".into()), Some("pod".into())),
            store,
            base.clone(),
            Arc::new(Nop),
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(30))),
        );
        engine.connect_streams().await;
        assert!(engine.streams[0].client.is_some());
        let timeout = engine.op_timeout();
        let actions: Vec<Action> = (0..4)
            .map(|i| Action::Claim {
                key: ShardKey::new("s", format!("shardId-00000000000{i}")),
                from: None,
            })
            .chain([Action::Resume(ShardKey::new("s", "shardId-000000000009"))])
            .collect();
        let started = Instant::now();
        engine.act_all(actions, &GroupSnapshot::default()).await;
        let took = started.elapsed();
        assert!(
            took < timeout * 2,
            "5 claims/resumes took {took:?} with an op timeout of {timeout:?}"
        );
        assert!(engine.owned.is_empty());
        assert_eq!(
            engine.tick_issue.as_ref().map(|i| i.reason.as_str()),
            Some("StateStoreUnavailable")
        );
        hole.abort();
    }

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
