//! The heartbeat, on its own schedule: a task that writes our client row's heartbeat every
//! `heartbeatInterval` and, once the store confirmed one, extends every reader's fencing
//! deadline from when it was sent. The tick's reads (the client Query, the lease rows) and
//! writes never delay it, so a slow tick cannot fence our readers or let peers take our
//! leases; the engine only publishes what the heartbeat reports (a `watch`).

use std::sync::Mutex;

use super::*;

/// The readers' fences and the last confirmed heartbeat, shared by the engine (which adds
/// and drops readers) and the heartbeat task (which extends them). One lock keeps a reader
/// started after a heartbeat consistent with it: its deadline counts from the last
/// confirmed send, like everyone else's.
#[derive(Debug, Default)]
pub(super) struct FenceBook {
    inner: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// When the last heartbeat (or registration) that the store confirmed was sent.
    sent: Option<BootInstant>,
    /// The last heartbeat attempt was confirmed.
    ok: bool,
    /// Failed heartbeat attempts so far.
    failures: u64,
    fences: BTreeMap<u64, FenceSetter>,
}

impl FenceBook {
    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let mut book = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut book)
    }

    /// The store confirmed a heartbeat (or registration) sent at `sent`: every reader may
    /// read until `sent + margin`. A reader whose deadline passed stays fenced (see
    /// `FenceSetter::extend`).
    pub(super) fn confirmed(&self, sent: BootInstant, margin: Duration) {
        self.with(|b| {
            b.sent = Some(b.sent.map_or(sent, |s| s.max(sent)));
            b.ok = true;
            let (deadline, now) = (sent + margin, BootInstant::now());
            for f in b.fences.values() {
                f.extend(deadline, now);
            }
        });
    }

    /// A heartbeat attempt failed (or our row was pruned).
    fn failed(&self) {
        self.with(|b| {
            b.ok = false;
            b.failures += 1;
        });
    }

    /// How many heartbeat attempts failed so far.
    pub(super) fn failures(&self) -> u64 {
        self.with(|b| b.failures)
    }

    /// Whether the last heartbeat attempt was confirmed.
    pub(super) fn ok(&self) -> bool {
        self.with(|b| b.ok)
    }

    /// When the last confirmed heartbeat was sent.
    pub(super) fn sent(&self) -> Option<BootInstant> {
        self.with(|b| b.sent)
    }

    /// A fence for reader `generation`, its deadline `margin` after the last confirmed
    /// heartbeat (never later than our other readers': observers judge the lease by our
    /// heartbeat, not by when we claimed it). `None` before any confirmed heartbeat.
    pub(super) fn fence(
        self: &Arc<Self>,
        generation: u64,
        margin: Duration,
    ) -> Option<(FenceGuard, Fence)> {
        self.with(|b| {
            let sent = b.sent?;
            let (setter, fence) = Fence::new(sent + margin);
            b.fences.insert(generation, setter);
            Some((
                FenceGuard {
                    book: self.clone(),
                    generation,
                },
                fence,
            ))
        })
    }
}

/// The engine's hold on one reader's fence: dropping it drops the setter (the reader then
/// sees nobody extends its deadline any more).
#[derive(Debug)]
pub(super) struct FenceGuard {
    book: Arc<FenceBook>,
    generation: u64,
}

impl FenceGuard {
    /// Whether this reader's deadline passed at `now`.
    pub(super) fn expired(&self, now: BootInstant) -> bool {
        self.book.with(|b| {
            b.fences
                .get(&self.generation)
                .is_none_or(|f| f.expired(now))
        })
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        let generation = self.generation;
        self.book.with(|b| b.fences.remove(&generation));
    }
}

/// What the heartbeat task tells the engine.
#[derive(Debug)]
pub(super) enum BeatEvent {
    /// A heartbeat failed: report it, and do not count the time against anyone (see
    /// `ClientWatch::lost_sight`).
    Failed(StoreError),
    /// Our client row is gone (the leader pruned us). The task waits for the engine to
    /// stop every reader and register again, then resumes on `resume`.
    Pruned(oneshot::Sender<()>),
}

/// The heartbeat task's inputs.
pub(super) struct Beater {
    pub(super) store: StateStore,
    pub(super) group: String,
    pub(super) me: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) book: Arc<FenceBook>,
    /// What each heartbeat records, as the engine last published it.
    pub(super) update: watch::Receiver<HeartbeatUpdate>,
    pub(super) events: mpsc::UnboundedSender<BeatEvent>,
    pub(super) interval: Duration,
    pub(super) margin: Duration,
    pub(super) op_timeout: Duration,
}

impl Beater {
    /// Heartbeats every `interval` until `stop` is cancelled or the engine is gone.
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let update = self.update.borrow().clone();
            let sent = BootInstant::now();
            let res = tokio::select! {
                _ = stop.cancelled() => return,
                res = io_bounded(
                    &self.metrics,
                    self.store.table(),
                    "heartbeat",
                    self.op_timeout,
                    self.store.heartbeat(&self.group, &self.me, &update),
                ) => res,
            };
            match res {
                Ok(_) => {
                    self.metrics.heartbeats.inc();
                    self.health.heartbeat_ok();
                    self.book.confirmed(sent, self.margin);
                }
                Err(StoreError::Conflict { .. }) => {
                    self.book.failed();
                    let (tx, rx) = oneshot::channel();
                    if self.events.send(BeatEvent::Pruned(tx)).is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        resumed = rx => if resumed.is_err() { return },
                    }
                    // Registering again confirmed a send; the next beat is an interval on.
                    ticker.reset();
                }
                Err(e) => {
                    self.book.failed();
                    if self.events.send(BeatEvent::Failed(e)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The running heartbeat task: stopped when dropped.
pub(super) struct BeatTask {
    stop: CancellationToken,
    join: JoinHandle<()>,
}

impl BeatTask {
    pub(super) fn spawn(beater: Beater) -> Self {
        let stop = CancellationToken::new();
        let join = tokio::spawn(beater.run(stop.clone()).in_current_span());
        Self { stop, join }
    }

    /// Stops the task and waits until no heartbeat is in flight any more.
    pub(super) async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.join).await;
    }
}

impl Drop for BeatTask {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Engine {
    /// Starts the heartbeat task (after registering).
    pub(super) fn start_heartbeat(&mut self) {
        let events = self.beat_tx.clone();
        let beater = Beater {
            store: self.store.clone(),
            group: self.group().to_owned(),
            me: self.me().to_owned(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            book: self.book.clone(),
            update: self.update_tx.subscribe(),
            events,
            interval: self.config.tuning.heartbeat_interval,
            margin: self.fencing_margin(),
            op_timeout: self.op_timeout(),
        };
        self.beat = Some(BeatTask::spawn(beater));
    }

    /// Stops the heartbeat task, if it runs (at shutdown, before deregistering).
    pub(super) async fn stop_heartbeat(&mut self) {
        if let Some(task) = self.beat.take() {
            task.stop().await;
        }
    }

    /// Publishes what the next heartbeat records: leases held, our change counters, and the
    /// current problem (a reader's, else the last tick's).
    pub(super) fn publish_update(&self) {
        let reader_issue = self
            .owned
            .values()
            .find_map(|o| o.progress.borrow().issue.clone());
        let issue = reader_issue.or_else(|| self.last_issue.clone());
        let update = HeartbeatUpdate {
            owned_shards: self.owned.len() as u32,
            lease_changes: self.lease_changes,
            shard_changes: self.shard_changes,
            last_error: issue.map(|i| (i.reason, i.message)),
        };
        self.update_tx.send_if_modified(|u| {
            let changed = *u != update;
            *u = update;
            changed
        });
    }

    /// Handles what the heartbeat task reported.
    pub(super) async fn on_beat(&mut self, event: BeatEvent) {
        match event {
            BeatEvent::Failed(e) => {
                // We cannot see the group either; see `ClientWatch::lost_sight`.
                self.clients.lost_sight();
                self.note_store("heartbeat", &e);
            }
            BeatEvent::Pruned(resume) => {
                self.rejoin().await;
                let _ = resume.send(());
            }
        }
    }

    /// The leader pruned us: it watched our heartbeat stand still for the client timeout,
    /// so our readers are past their deadline and others may hold our leases. Stop every
    /// reader; what is still ours is resumed under a new counter, so no write of the old
    /// readers can land. A failed registration is retried at the next heartbeat.
    async fn rejoin(&mut self) {
        warn!("our client row was pruned; stopping every reader and registering again");
        let keys: Vec<ShardKey> = self.owned.keys().cloned().collect();
        for key in &keys {
            self.abandon(key).await;
        }
        match self.register().await {
            Ok(sent) => {
                self.book.confirmed(sent, self.fencing_margin());
                self.leases_changed();
            }
            Err(e) => self.note_store("register", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::ms;
    use super::*;
    use crate::fence::FenceEnd;

    #[test]
    fn no_fence_before_a_confirmed_heartbeat() {
        let book = Arc::new(FenceBook::default());
        assert!(book.fence(1, ms(2700)).is_none());
        assert!(!book.ok());
    }

    #[test]
    fn a_confirmed_heartbeat_extends_every_reader_from_its_send_time() {
        let book = Arc::new(FenceBook::default());
        let t0 = BootInstant::now();
        book.confirmed(t0, ms(60_000));
        let (g1, f1) = book.fence(1, ms(60_000)).expect("fence");
        let left = f1.remaining().expect("open");
        assert!(left <= ms(60_000) && left > ms(59_000), "{left:?}");
        // A later heartbeat, sent 10 s after t0, moves it 10 s on.
        book.confirmed(t0 + ms(10_000), ms(60_000));
        assert!(f1.remaining().expect("open") > ms(69_000));
        // A reader started now counts from the same (latest) send, not from now.
        let (_g2, f2) = book.fence(2, ms(60_000)).expect("fence");
        let (a, b) = (f1.remaining().expect("open"), f2.remaining().expect("open"));
        assert!(a.abs_diff(b) < ms(100), "{a:?} vs {b:?}");
        // An answer that comes back late (an older send) never moves anything back.
        book.confirmed(t0, ms(60_000));
        assert!(f1.remaining().expect("open") > ms(69_000));
        assert_eq!(book.sent(), Some(t0 + ms(10_000)));
        assert!(!g1.expired(BootInstant::now()));
    }

    #[test]
    fn a_passed_deadline_stays_fenced() {
        let book = Arc::new(FenceBook::default());
        book.confirmed(BootInstant::now(), Duration::ZERO);
        let (guard, fence) = book.fence(1, Duration::ZERO).expect("fence");
        assert!(fence.remaining().is_err());
        book.confirmed(BootInstant::now(), ms(60_000));
        assert!(fence.remaining().is_err());
        assert!(guard.expired(BootInstant::now()));
    }

    #[test]
    fn a_failed_heartbeat_is_remembered_until_one_is_confirmed() {
        let book = FenceBook::default();
        book.confirmed(BootInstant::now(), ms(1000));
        assert!(book.ok());
        book.failed();
        assert!(!book.ok());
        assert_eq!(book.failures(), 1);
        book.confirmed(BootInstant::now(), ms(1000));
        assert!(book.ok());
    }

    #[tokio::test]
    async fn dropping_the_guard_drops_the_setter() {
        let book = Arc::new(FenceBook::default());
        book.confirmed(BootInstant::now(), ms(60_000));
        let (guard, fence) = book.fence(1, ms(60_000)).expect("fence");
        drop(guard);
        assert_eq!(fence.closed().await, FenceEnd::Dropped);
        assert!(book.with(|b| b.fences.is_empty()));
    }
}
