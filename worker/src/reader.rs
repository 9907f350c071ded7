//! Reads one leased shard: GetRecords polling, delivery, and progress reporting. A stream
//! read with enhanced fan-out gets its records from [`crate::efo`] instead; delivery,
//! commit tracking, checkpoints, lag and issues are this module's for both.
//!
//! The decisions (how long to wait before the next call, how to back off, what an error
//! means) are small pure functions below, table-tested; [`read_shard`] is the thin I/O loop
//! that applies them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{StartPosition, StreamConfig, Tuning};
use crate::delivery::dead_letter::{DeadLetterWriter, Letter};
use crate::delivery::poison::{BatchState, Event, Next};
use crate::delivery::{
    BatchHandler, CommitState, CommitTracker, FailureAction, Record, ShardContext,
};
use crate::fence::Fence;
use crate::handoff::LATEST_HANDOFF_MARGIN_MS;
use crate::kinesis::{ErrorKind, IteratorStart, KinesisError, StreamClient};
use crate::kpl;
use crate::metrics::{Metrics, ReasonLabels, ShardLabels, StreamLabels};
use crate::position::Position;

pub use crate::backoff::Backoff;

/// What the engine hands the reader when it holds a shard's lease.
#[derive(Clone, Debug)]
pub struct ShardTask {
    /// The stream's client.
    pub client: Arc<StreamClient>,
    /// The stream's config (start position for a shard with no checkpoint).
    pub stream: StreamConfig,
    /// The shard.
    pub shard_id: String,
    /// The checkpoint from the lease row: reading resumes after it.
    pub checkpoint: Option<Position>,
    /// Retries, and what happens to records the handler keeps refusing.
    pub failure: crate::delivery::FailurePolicy,
    /// Until when records may be handed over (checked right before every hand-over).
    pub fence: Fence,
    /// The lease counter this reader holds the shard under (the sink's fencing token).
    pub lease_counter: u64,
}

/// A problem worth surfacing in the client row and the CR status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// `StreamNotFound`, `AccessDenied`, `Throttled`, `HandlerFailing`, ...
    pub reason: String,
    /// What happened and what to fix.
    pub message: String,
}

/// The reader's progress, published on a watch channel the engine reads to checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardProgress {
    /// Last position the handler acknowledged (everything up to it is done).
    pub acked: Option<Position>,
    /// The shard was read to its end and every record acknowledged.
    pub ended: bool,
    /// MillisBehindLatest of the last GetRecords.
    pub millis_behind: Option<i64>,
    /// When that GetRecords returned, Unix ms.
    pub lag_at_ms: Option<i64>,
    /// The current problem, if any (cleared once reading works again).
    pub issue: Option<Issue>,
}

// ---------------------------------------------------------------- pure decisions

/// Kinesis allows 5 GetRecords calls per second per shard: never call more often.
pub const MIN_CALL_GAP: Duration = Duration::from_millis(200);

/// Kinesis serves at most 2 MB per second per shard: after a page of `n` bytes, the next
/// call waits `n / SHARD_READ_BYTES_PER_SEC` seconds at least.
pub const SHARD_READ_BYTES_PER_SEC: u64 = 2 * 1024 * 1024;

/// Most batches a manual-commit handler may hold uncommitted per shard before the reader
/// stops fetching (bounds memory when a handler never commits).
pub const MAX_PENDING_BATCHES: usize = 64;

/// What the previous GetRecords on a shard returned, as far as pacing goes. A failed call
/// counts as the default: nothing returned, lag unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastPage {
    /// Records returned.
    pub records: usize,
    /// Their data bytes.
    pub bytes: usize,
    /// MillisBehindLatest of the answer.
    pub millis_behind: Option<i64>,
}

/// How the reader paces a shard, from what the last call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Nothing came back and the shard is not behind: wait `pollInterval` (and at least
    /// `minCallInterval`).
    Idle,
    /// Records came back but the reader is at the tip (a steady trickle): wait
    /// `minCallInterval`, so every group reading the shard leaves room for the others.
    Trickle,
    /// Behind the tip (a full page, or the next records are older than one
    /// `minCallInterval`): as fast as the shard's own limits allow, 5 calls/s and 2 MB/s.
    CatchUp,
}

/// Classifies the last call; see [`Pace`].
pub fn pace(last: &LastPage, max_records_per_call: u32, min_call_interval: Duration) -> Pace {
    let behind_ms = last.millis_behind.unwrap_or(0);
    let full = last.records > 0 && last.records >= max_records_per_call as usize;
    if full || u128::try_from(behind_ms).unwrap_or(0) > min_call_interval.as_millis() {
        Pace::CatchUp
    } else if last.records > 0 {
        Pace::Trickle
    } else {
        Pace::Idle
    }
}

/// How long to wait before the next GetRecords on a shard, given the time since the
/// previous call started and what it returned (see [`Pace`]). Whatever the pace, never
/// sooner than the shard's limits allow: 200ms between calls, and the time the last page's
/// bytes take at 2 MB/s.
pub fn next_poll_delay(since_last_call: Duration, last: &LastPage, tuning: &Tuning) -> Duration {
    let gap = match pace(last, tuning.max_records_per_call, tuning.min_call_interval) {
        Pace::Idle => tuning.poll_interval.max(tuning.min_call_interval),
        Pace::Trickle => tuning.min_call_interval,
        Pace::CatchUp => MIN_CALL_GAP,
    };
    let bytes_gap = Duration::from_secs_f64(last.bytes as f64 / SHARD_READ_BYTES_PER_SEC as f64);
    gap.max(MIN_CALL_GAP)
        .max(bytes_gap)
        .saturating_sub(since_last_call)
}

/// Backoff for Kinesis errors.
pub fn kinesis_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(20))
}

/// What the reader does after a failed Kinesis call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Get a fresh iterator (after the last delivered record) right away.
    NewIterator,
    /// Wait (backoff) and retry; `drop_iterator` when the iterator itself is suspect.
    Retry {
        /// Take a new iterator before the next GetRecords.
        drop_iterator: bool,
    },
}

/// The reaction to a Kinesis error kind.
pub fn on_kinesis_error(kind: ErrorKind) -> ErrorAction {
    match kind {
        ErrorKind::ExpiredIterator => ErrorAction::NewIterator,
        // The shard may be gone: never skip on our own (that could be a gap); report it and
        // keep trying until the engine, which sees ListShards, takes the shard away.
        ErrorKind::InvalidRequest | ErrorKind::ShardNotFound => ErrorAction::Retry {
            drop_iterator: true,
        },
        ErrorKind::StreamNotFound
        | ErrorKind::AccessDenied
        | ErrorKind::Throttled
        | ErrorKind::InUse
        | ErrorKind::Unavailable => ErrorAction::Retry {
            drop_iterator: false,
        },
    }
}

/// Whether a failure is worth an [`Issue`] (shown to the user): occasional throttling is
/// normal, so it is reported only when it persists; a subscription still held by a shard's
/// previous owner (Kinesis refuses a second one for 5 seconds) only after about 6 seconds
/// of one-per-second attempts; everything else at once.
pub fn should_report(kind: ErrorKind, consecutive_failures: u32) -> bool {
    match kind {
        ErrorKind::Throttled => consecutive_failures >= 3,
        ErrorKind::InUse => consecutive_failures >= 6,
        ErrorKind::ExpiredIterator => false,
        _ => true,
    }
}

/// Where the next shard iterator starts. After the last delivered record when there is one;
/// else at the start pinned when the first iterator was taken ([`pin_start`]); else the
/// stream's configured start. Never LATEST twice: a second LATEST would skip whatever
/// arrived between the two requests.
pub fn iterator_start(
    delivered: Option<&Position>,
    pinned: Option<&IteratorStart>,
    stream: &StreamConfig,
) -> IteratorStart {
    match (delivered, pinned) {
        (Some(_), _) | (None, None) => IteratorStart::resolve(delivered, stream),
        (None, Some(p)) => p.clone(),
    }
}

/// Once the first iterator at `start` was obtained by a request sent at `requested_at`:
/// the start every later iterator uses until a record is delivered. LATEST is pinned to
/// AT_TIMESTAMP of the request time minus [`LATEST_HANDOFF_MARGIN_MS`] (Kinesis' arrival
/// timestamps come from another clock); the margin can only add older records, never skip
/// one. TRIM_HORIZON, AT_TIMESTAMP and after-a-sequence mean the same position every time.
pub fn pin_start(start: &IteratorStart, requested_at: jiff::Timestamp) -> Option<IteratorStart> {
    match start {
        IteratorStart::Latest => Some(
            requested_at
                .checked_sub(jiff::SignedDuration::from_millis(LATEST_HANDOFF_MARGIN_MS))
                .map_or(IteratorStart::TrimHorizon, IteratorStart::AtTimestamp),
        ),
        _ => None,
    }
}

/// Removes the records at the front of `records` that `done` covers: after an iterator
/// AT_SEQUENCE_NUMBER of an aggregate, its user records already acknowledged. Records come
/// in order, so only a prefix can be covered.
pub fn skip_done(records: &mut Vec<Record>, done: Option<&Position>) {
    let Some(done) = done else { return };
    let n = records
        .iter()
        .take_while(|r| done.covers(&r.sequence, r.sub_sequence))
        .count();
    records.drain(..n);
}

/// Issue reasons of the delivery side (the handler, skipped and dead-lettered records);
/// a working GetRecords does not clear them.
pub fn is_delivery_reason(reason: &str) -> bool {
    matches!(
        reason,
        "HandlerFailing" | "DeadLetterFailing" | "RecordsSkipped" | "RecordsDeadLettered"
    )
}

/// How long the `RecordsSkipped` / `RecordsDeadLettered` issue stays up after the last
/// such record, so that the operator's status (and `kubectl describe`) shows it.
pub const POISON_ISSUE_HOLD: Duration = Duration::from_secs(300);

/// The issue a reader reports when a manual-commit handler dropped a token uncommitted.
pub const DROPPED_TOKEN_MESSAGE: &str =
    "a commit token was dropped without commit; redelivering from the last committed record";

// ---------------------------------------------------------------- the I/O loop

/// Per-shard metric handles, looked up once.
pub(crate) struct ShardMetrics {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) stream: StreamLabels,
    shard: ShardLabels,
}

impl ShardMetrics {
    fn error(&self, reason: &str) {
        self.metrics
            .errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Why the loop stopped early.
pub(crate) enum Exit {
    Stopped,
    /// A commit token was dropped uncommitted: redeliver after the committed prefix.
    Redeliver,
    /// The handler lost its place ([`crate::delivery::HandlerError::redeliver`], already
    /// reported and backed off): redeliver after the committed prefix.
    Rewind,
}

/// KCL's name for where a shard without checkpoint starts (the multiLang `initialize`
/// message carries it as the sequence number).
pub fn kcl_initial_position(stream: &StreamConfig) -> &'static str {
    match stream.start_position {
        StartPosition::Latest => "LATEST",
        StartPosition::TrimHorizon => "TRIM_HORIZON",
        StartPosition::AtTimestamp => "AT_TIMESTAMP",
    }
}

/// One shard's reading state, shared by both sources (the polling loop here and
/// [`crate::efo`]): delivery, commit tracking, progress, issues.
pub(crate) struct Reader {
    pub(crate) task: ShardTask,
    pub(crate) tuning: Tuning,
    handler: Arc<dyn BatchHandler>,
    pub(crate) m: ShardMetrics,
    progress_tx: watch::Sender<ShardProgress>,
    progress: ShardProgress,
    commits: CommitTracker,
    commit_rx: watch::Receiver<CommitState>,
    pub(crate) stop: CancellationToken,
    /// Last position the handler accepted: where a new iterator resumes.
    pub(crate) delivered: Option<Position>,
    /// Where iterators start while nothing was delivered yet (see [`pin_start`]).
    pub(crate) pinned: Option<IteratorStart>,
    /// While the dropped-token issue is up: the committed prefix redelivery started from.
    /// The issue clears once the handler commits past it.
    redelivered_from: Option<Option<Position>>,
    /// When this reader last skipped or dead-lettered a record.
    last_poison: Option<Instant>,
    /// Backoff between redeliveries after the handler lost its place (a processor restart).
    rewind_backoff: Backoff,
    /// Position of the last record of the batch that made the handler lose its place,
    /// until a delivery gets past it.
    rewound_at: Option<Position>,
}

impl Reader {
    fn publish(&mut self) {
        // `borrow`, not `borrow_and_update`: marking a version seen here could swallow the
        // wake-up a waiter in `wait_pending_at_most` relies on.
        self.progress.acked = self.commit_rx.borrow().committed.clone();
        if self
            .redelivered_from
            .as_ref()
            .is_some_and(|from| *from != self.progress.acked)
        {
            info!("the handler commits again after the redelivery");
            self.redelivered_from = None;
            if self
                .progress
                .issue
                .as_ref()
                .is_some_and(|i| i.message == DROPPED_TOKEN_MESSAGE)
            {
                self.progress.issue = None;
            }
        }
        let p = self.progress.clone();
        self.progress_tx.send_if_modified(|cur| {
            if *cur != p {
                *cur = p;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn set_issue(&mut self, issue: Option<Issue>) {
        self.progress.issue = issue;
        self.publish();
    }

    /// Sleeps `d`, republishing commits that arrive meanwhile. `Err` when stopped.
    pub(crate) async fn sleep(&mut self, d: Duration) -> Result<(), Exit> {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                _ = self.stop.cancelled() => return Err(Exit::Stopped),
                r = self.commit_rx.changed() => {
                    if r.is_ok() { self.publish(); }
                }
            }
        }
    }

    /// Right before a hand-over: once the fencing deadline passed (our heartbeats were not
    /// confirmed in time, or this process was stopped or suspended past it), another client
    /// may hold the shard, so nothing more is handed over. The reader then waits for the
    /// engine to stop it (its supervisor fences it, writing nothing).
    async fn check_fence(&mut self) -> Result<(), Exit> {
        let Err(fenced) = self.task.fence.check() else {
            return Ok(());
        };
        warn!(error = %fenced, "not handing records over");
        self.stop.cancelled().await;
        Err(Exit::Stopped)
    }

    /// Waits until at most `max` batches are uncommitted. `Err` when stopped, or
    /// `Redeliver` when a batch was abandoned (it will never be committed: waiting for it
    /// would be a silent stall).
    async fn wait_pending_at_most(
        &mut self,
        max: usize,
        stop: &CancellationToken,
    ) -> Result<(), Exit> {
        loop {
            let (pending, abandoned) = {
                let st = self.commit_rx.borrow_and_update();
                (st.pending, st.abandoned)
            };
            if abandoned {
                self.publish();
                return Err(Exit::Redeliver);
            }
            if pending <= max {
                self.publish();
                return Ok(());
            }
            self.publish();
            tokio::select! {
                _ = stop.cancelled() => return Err(Exit::Stopped),
                r = self.commit_rx.changed() => {
                    if r.is_err() { return Err(Exit::Stopped); }
                }
            }
        }
    }

    pub(crate) fn kinesis_failed(&mut self, e: &KinesisError, backoff: &Backoff) {
        let kind = e.kind();
        self.m.error(kind.reason());
        // Expected now and then (a subscription still held right after a handoff counts).
        if matches!(
            kind,
            ErrorKind::Throttled | ErrorKind::ExpiredIterator | ErrorKind::InUse
        ) {
            debug!(error = %e, "kinesis call failed; retrying");
        } else {
            warn!(error = %e, reason = kind.reason(), "kinesis call failed; retrying with backoff");
        }
        if should_report(kind, backoff.attempts() + 1) {
            self.set_issue(Some(Issue {
                reason: kind.reason().to_owned(),
                message: e.to_string(),
            }));
        }
    }

    /// Hands `batch` to the handler until every record is accepted or, once a record failed
    /// `delivery.retry.maxAttempts` times alone, skipped or dead-lettered as
    /// `delivery.onFailure` says (see [`crate::delivery::poison`]). `Err` only when stopped
    /// while retrying (the rest of the batch is then not acknowledged, and read again by
    /// whoever reads the shard next).
    async fn deliver(&mut self, batch: &[Record]) -> Result<(), Exit> {
        let failure = self.task.failure.clone();
        let policy = failure.decisions();
        let mut backoff = failure.retry.backoff.start();
        let mut last_error = String::new();
        let (mut state, mut next) = BatchState::start(batch.len());
        loop {
            let event = match next {
                Next::Done => return Ok(()),
                Next::Deliver(range) => {
                    backoff.reset();
                    self.hand_over(&batch[range], &mut last_error).await?
                }
                Next::Retry(range) => {
                    self.m
                        .metrics
                        .handler_retries
                        .get_or_create(&self.m.shard)
                        .inc();
                    self.sleep(backoff.next_delay()).await?;
                    self.hand_over(&batch[range], &mut last_error).await?
                }
                // The decisions come from `failure.on_failure`, so the action matches.
                Next::Skip(i) | Next::DeadLetter(i) => match &failure.on_failure {
                    FailureAction::Skip => {
                        self.skipped(&batch[i], state.attempts, &last_error);
                        Event::Resolved
                    }
                    FailureAction::DeadLetter(writer) => {
                        let letter = Letter {
                            record: &batch[i],
                            attempts: state.attempts,
                            error: &last_error,
                        };
                        self.dead_letter(writer, letter, &failure.retry.backoff)
                            .await?;
                        Event::Resolved
                    }
                    // Block never gives a record up: count it refused again (a retry).
                    FailureAction::Block => Event::Refused,
                },
            };
            let range = state.range();
            (state, next) = state.step(event, policy);
            if event == Event::Refused {
                self.report_refusal(&batch[range], state.attempts, &next, &last_error);
            }
        }
    }

    /// One handler call for `records`; the event for the decisions. Keeps the error text.
    /// `Err(Rewind)` when the handler lost its place (reported and backed off here).
    async fn hand_over(
        &mut self,
        records: &[Record],
        last_error: &mut String,
    ) -> Result<Event, Exit> {
        self.check_fence().await?;
        let started = Instant::now();
        let result = self.handler.deliver(records, &self.commits).await;
        self.m
            .metrics
            .delivery_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                let m = &self.m.metrics;
                m.records_delivered
                    .get_or_create(&self.m.stream)
                    .inc_by(records.len() as u64);
                m.batches_delivered.get_or_create(&self.m.stream).inc();
                let bytes: usize = records.iter().map(|r| r.data.len()).sum();
                m.bytes_delivered
                    .get_or_create(&self.m.stream)
                    .inc_by(bytes as u64);
                if let Some(last) = records.last() {
                    self.delivered = Some(last.position());
                    if self
                        .rewound_at
                        .as_ref()
                        .is_some_and(|failed| last.position() >= *failed)
                    {
                        self.rewound_at = None;
                        self.rewind_backoff.reset();
                    }
                }
                // (The dropped-token issue stays until the handler commits again.)
                if self.progress.issue.as_ref().is_some_and(|i| {
                    i.reason == "HandlerFailing" && i.message != DROPPED_TOKEN_MESSAGE
                }) {
                    info!("handler accepts batches again");
                    self.progress.issue = None;
                }
                self.expire_poison_issue();
                self.publish();
                Ok(Event::Accepted)
            }
            Err(e) if e.redeliver => {
                self.m
                    .metrics
                    .delivery_failures
                    .get_or_create(&self.m.stream)
                    .inc();
                self.m.error("HandlerFailing");
                let delay = self.rewind_backoff.next_delay();
                if let Some(last) = records.last() {
                    self.rewound_at = Some(last.position());
                }
                warn!(error = %e, attempt = self.rewind_backoff.attempts(), retry_in_ms = delay.as_millis() as u64,
                    resume_after = ?self.commits.state().committed.map(|c| c.to_string()), "handler lost its place; redelivering after the committed position");
                self.set_issue(Some(Issue {
                    reason: "HandlerFailing".into(),
                    message: format!(
                        "{e} ({} times in a row); redelivering after the last checkpoint",
                        self.rewind_backoff.attempts()
                    ),
                }));
                self.sleep(delay).await?;
                Err(Exit::Rewind)
            }
            Err(e) => {
                self.m
                    .metrics
                    .delivery_failures
                    .get_or_create(&self.m.stream)
                    .inc();
                self.m.error("HandlerFailing");
                *last_error = e.message;
                Ok(Event::Refused)
            }
        }
    }

    /// Logs and reports a refusal of `records`, after `attempts` attempts, going to `next`.
    fn report_refusal(&mut self, records: &[Record], attempts: u32, next: &Next, error: &str) {
        let n = records.len();
        let first = records.first().map_or("", |r| r.sequence.as_str());
        let what = match next {
            Next::Retry(_) => "retrying the same records",
            Next::Deliver(_) => "maxAttempts reached; handing the records over one at a time",
            Next::Skip(_) => "maxAttempts reached alone; skipping the record",
            Next::DeadLetter(_) => "maxAttempts reached alone; dead-lettering the record",
            Next::Done => "",
        };
        warn!(error = %error, attempts, first = %first, records = n, "handler refused records; {what}");
        let block = matches!(self.task.failure.on_failure, FailureAction::Block)
            && attempts >= self.task.failure.retry.max_attempts;
        let suffix = if block {
            " (delivery.onFailure is Block: retrying without end)"
        } else {
            ""
        };
        self.set_issue(Some(Issue {
            reason: "HandlerFailing".into(),
            message: format!(
                "the handler refused {n} records from sequence {first} ({attempts} attempts){suffix}: {error}"
            ),
        }));
    }

    /// `onFailure: Skip`: counts and reports the record, and moves the checkpoint past it.
    fn skipped(&mut self, record: &Record, attempts: u32, error: &str) {
        self.m
            .metrics
            .records_skipped
            .get_or_create(&self.m.shard)
            .inc();
        warn!(sequence = %record.sequence, attempts, error = %error, "skipped a record the handler keeps refusing");
        self.poison_resolved(record, "RecordsSkipped", "skipped", attempts, error);
    }

    /// `onFailure: DeadLetter`: writes the record until the target takes it (the shard waits
    /// meanwhile, reporting `DeadLetterFailing`), then moves the checkpoint past it. `Err`
    /// when stopped while waiting.
    async fn dead_letter(
        &mut self,
        writer: &DeadLetterWriter,
        letter: Letter<'_>,
        backoff: &crate::config::BackoffConfig,
    ) -> Result<(), Exit> {
        let mut backoff = backoff.start();
        loop {
            self.check_fence().await?;
            match writer.write(&[letter]).await {
                Ok(()) => {
                    self.m
                        .metrics
                        .records_dead_lettered
                        .get_or_create(&self.m.shard)
                        .inc();
                    warn!(sequence = %letter.record.sequence, attempts = letter.attempts, error = %letter.error,
                        target = %writer.describe(), "dead-lettered a record the handler keeps refusing");
                    let what = format!("dead-lettered to {}", writer.describe());
                    self.poison_resolved(
                        letter.record,
                        "RecordsDeadLettered",
                        &what,
                        letter.attempts,
                        letter.error,
                    );
                    return Ok(());
                }
                Err(e) => {
                    self.m.error("DeadLetterFailing");
                    let delay = backoff.next_delay();
                    warn!(error = %e, sequence = %letter.record.sequence, retry_in_ms = delay.as_millis() as u64,
                        "dead-letter write failed; the shard waits and retries");
                    self.set_issue(Some(Issue {
                        reason: "DeadLetterFailing".into(),
                        message: format!(
                            "record {} could not be dead-lettered ({} attempts); the shard waits: {e}",
                            letter.record.sequence,
                            backoff.attempts()
                        ),
                    }));
                    self.sleep(delay).await?;
                }
            }
        }
    }

    /// Clears the `RecordsSkipped` / `RecordsDeadLettered` issue once
    /// [`POISON_ISSUE_HOLD`] passed since the last such record.
    fn expire_poison_issue(&mut self) {
        let held = self
            .progress
            .issue
            .as_ref()
            .is_some_and(|i| i.reason == "RecordsSkipped" || i.reason == "RecordsDeadLettered");
        if held
            && self
                .last_poison
                .is_none_or(|at| at.elapsed() >= POISON_ISSUE_HOLD)
        {
            self.progress.issue = None;
        }
    }

    /// A poison record is done with: the checkpoint may pass it, and the issue says so.
    fn poison_resolved(
        &mut self,
        record: &Record,
        reason: &str,
        what: &str,
        attempts: u32,
        error: &str,
    ) {
        self.commits.begin(record.position()).commit();
        self.delivered = Some(record.position());
        self.last_poison = Some(Instant::now());
        self.set_issue(Some(Issue {
            reason: reason.into(),
            message: format!(
                "records the handler refuses on their own are {what}; last: sequence {} ({attempts} attempts): {error}",
                record.sequence
            ),
        }));
    }

    /// A handler dropped a commit token uncommitted: forget the pending batches, report it,
    /// and resume after the committed prefix (redelivery, never a skip).
    fn redeliver(&mut self) {
        let from = self.commits.restart();
        warn!(resume_after = ?from, "{DROPPED_TOKEN_MESSAGE}");
        self.m.error("HandlerFailing");
        self.delivered = from.clone();
        self.redelivered_from = Some(from);
        self.progress.issue = Some(Issue {
            reason: "HandlerFailing".into(),
            message: DROPPED_TOKEN_MESSAGE.into(),
        });
        self.publish();
    }

    /// The handler lost its place: forget what is pending and resume after the committed
    /// prefix (the issue was reported by [`Self::hand_over`]).
    pub(crate) fn rewind(&mut self) {
        self.delivered = self.commits.restart();
        self.publish();
    }

    /// The shard was read to its end: the handler confirms (a KCL processor checkpoints
    /// the end), retried with backoff until it does. `Err(Rewind)` when the handler lost
    /// its place meanwhile.
    async fn end_shard(&mut self) -> Result<(), Exit> {
        let mut backoff = self.task.failure.retry.backoff.start();
        loop {
            match self.handler.end_shard(&self.commits).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if e.redeliver {
                        self.rewound_at = self.delivered.clone();
                    }
                    let delay = if e.redeliver {
                        self.rewind_backoff.next_delay()
                    } else {
                        backoff.next_delay()
                    };
                    self.m.error("HandlerFailing");
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "handler did not confirm the shard end; the shard stays open");
                    self.set_issue(Some(Issue {
                        reason: "HandlerFailing".into(),
                        message: format!("at the shard's end: {e}"),
                    }));
                    self.sleep(delay).await?;
                    if e.redeliver {
                        return Err(Exit::Rewind);
                    }
                }
            }
        }
    }

    async fn run(&mut self) -> Result<(), Exit> {
        let client = self.task.client.clone();
        // Shared by every record of this reader: created once, not per record.
        let shard: Arc<str> = Arc::from(self.task.shard_id.as_str());
        let limit = self.tuning.max_records_per_call;
        let mut iterator: Option<String> = None;
        let mut backoff = kinesis_backoff();
        let mut last_call: Option<Instant> = None;
        let mut last_page = LastPage::default();
        loop {
            if self.stop.is_cancelled() {
                return Err(Exit::Stopped);
            }
            if self.make_room().await? {
                iterator = None;
                continue;
            }

            let it = match iterator.take() {
                Some(it) => it,
                None => {
                    let start = iterator_start(
                        self.delivered.as_ref(),
                        self.pinned.as_ref(),
                        &self.task.stream,
                    );
                    debug!(?start, "getting shard iterator");
                    let requested_at = jiff::Timestamp::now();
                    let got = tokio::select! {
                        r = client.shard_iterator(&shard, &start) => r,
                        _ = self.stop.cancelled() => return Err(Exit::Stopped),
                    };
                    match got {
                        Ok(it) => {
                            if self.pinned.is_none() {
                                self.pinned = pin_start(&start, requested_at);
                            }
                            it
                        }
                        Err(e) => {
                            self.kinesis_failed(&e, &backoff);
                            let d = backoff.next_delay();
                            self.sleep(d).await?;
                            continue;
                        }
                    }
                }
            };

            if let Some(at) = last_call {
                let d = next_poll_delay(at.elapsed(), &last_page, &self.tuning);
                if !d.is_zero() {
                    self.sleep(d).await?;
                }
            }
            last_call = Some(Instant::now());
            self.m
                .metrics
                .get_records_calls
                .get_or_create(&self.m.stream)
                .inc();
            let got = tokio::select! {
                r = client.get_records(&shard, &it, limit) => r,
                _ = self.stop.cancelled() => return Err(Exit::Stopped),
            };
            let page = match got {
                Ok(p) => p,
                Err(e) => {
                    // Failures count as "nothing returned" for pacing.
                    last_page = LastPage::default();
                    self.kinesis_failed(&e, &backoff);
                    match on_kinesis_error(e.kind()) {
                        ErrorAction::NewIterator => {
                            info!(resume_after = ?self.delivered, "shard iterator expired; taking a new one");
                        }
                        ErrorAction::Retry { drop_iterator } => {
                            if !drop_iterator {
                                iterator = Some(it);
                            }
                            let d = backoff.next_delay();
                            self.sleep(d).await?;
                        }
                    }
                    continue;
                }
            };
            backoff.reset();
            last_page = LastPage {
                records: page.records.len(),
                bytes: page.records.iter().map(|r| r.data.len()).sum(),
                millis_behind: page.millis_behind,
            };
            match self.accept(page.records, page.millis_behind).await {
                Ok(()) => {}
                Err(Exit::Rewind) => {
                    self.rewind();
                    iterator = None;
                    continue;
                }
                Err(e) => return Err(e),
            }
            match page.next_iterator {
                Some(next) => iterator = Some(next),
                None => {
                    if self.finish().await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    // The steps both sources share, in the order they use them.

    /// Before fetching more: waits while a manual-commit handler holds too many batches.
    /// `Ok(true)` when a batch was abandoned and the reader now redelivers from the
    /// committed prefix: the source must drop its iterator or subscription and resume
    /// after [`Reader::delivered`].
    pub(crate) async fn make_room(&mut self) -> Result<bool, Exit> {
        let stop = self.stop.clone();
        match self
            .wait_pending_at_most(MAX_PENDING_BATCHES - 1, &stop)
            .await
        {
            Ok(()) => Ok(false),
            Err(Exit::Redeliver) => {
                self.redeliver();
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// A successful read: clears a Kinesis issue, records the lag, and delivers `records`
    /// (until the handler accepts them; `Err` only when stopped).
    pub(crate) async fn accept(
        &mut self,
        records: Vec<Record>,
        millis_behind: Option<i64>,
    ) -> Result<(), Exit> {
        if self
            .progress
            .issue
            .as_ref()
            .is_some_and(|i| !is_delivery_reason(&i.reason))
        {
            info!("kinesis reads work again");
            self.progress.issue = None;
        }
        self.expire_poison_issue();
        self.progress.millis_behind = millis_behind;
        self.progress.lag_at_ms = Some(jiff::Timestamp::now().as_millisecond());
        if let Some(ms) = millis_behind {
            self.m
                .metrics
                .behind_latest
                .get_or_create(&self.m.shard)
                .set(ms as f64 / 1000.0);
        }
        self.publish();
        let failures = &self.m;
        let mut records = kpl::deaggregate_page(records, |raw, e| {
            warn!(sequence = %raw.sequence, error = %e, "KPL aggregated record could not be deaggregated; delivering it raw");
            failures
                .metrics
                .deaggregation_failures
                .get_or_create(&failures.shard)
                .inc();
        });
        skip_done(&mut records, self.delivered.as_ref());
        if !records.is_empty() {
            self.deliver(&records).await?;
        }
        Ok(())
    }

    /// The shard's end was reached: it counts as ended only once every batch is committed.
    /// `Ok(true)` when ended; `Ok(false)` when a batch was abandoned meanwhile and the
    /// reader redelivers from the committed prefix (the source resumes after
    /// [`Reader::delivered`]).
    pub(crate) async fn finish(&mut self) -> Result<bool, Exit> {
        let stop = self.stop.clone();
        match self.wait_pending_at_most(0, &stop).await {
            Ok(()) => {}
            Err(Exit::Redeliver) => {
                self.redeliver();
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        match self.end_shard().await {
            Ok(()) => {}
            Err(Exit::Rewind) => {
                self.rewind();
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        if self
            .progress
            .issue
            .as_ref()
            .is_some_and(|i| i.reason == "HandlerFailing")
        {
            self.progress.issue = None;
        }
        self.progress.ended = true;
        self.publish();
        info!(last = ?self.progress.acked, "shard read to its end");
        Ok(true)
    }
}

/// Removes a shard's `behind_latest` gauge when dropped.
pub struct LagGaugeGuard {
    /// The metrics holding the gauge.
    pub metrics: Arc<Metrics>,
    /// The shard's labels.
    pub labels: ShardLabels,
}

impl Drop for LagGaugeGuard {
    fn drop(&mut self) {
        self.metrics.behind_latest.remove(&self.labels);
    }
}

/// Reads `task`'s shard until it ends or `stop` is cancelled. On stop it fetches nothing
/// more, lets the in-flight delivery finish (the engine bounds that by dropping this future
/// at the shutdown deadline) and returns the final progress, also published on `progress`.
pub async fn read_shard(
    task: ShardTask,
    tuning: Tuning,
    handler: Arc<dyn BatchHandler>,
    metrics: Arc<Metrics>,
    progress: watch::Sender<ShardProgress>,
    stop: CancellationToken,
) -> ShardProgress {
    let span = info_span!("read_shard", stream = %task.client.name, shard = %task.shard_id);
    // Removes the shard's lag gauge however the reader ends: returned, or aborted by the
    // engine (fenced, lease lost, shutdown bound), which drops this future mid-way.
    let _gauge = LagGaugeGuard {
        metrics: metrics.clone(),
        labels: ShardLabels {
            stream: task.client.name.clone(),
            shard: task.shard_id.clone(),
        },
    };
    async move {
        let commits = CommitTracker::new(task.checkpoint.clone());
        let commit_rx = commits.subscribe();
        let m = ShardMetrics {
            stream: StreamLabels {
                stream: task.client.name.clone(),
            },
            shard: ShardLabels {
                stream: task.client.name.clone(),
                shard: task.shard_id.clone(),
            },
            metrics,
        };
        let initial = ShardProgress {
            acked: task.checkpoint.clone(),
            ..progress.borrow().clone()
        };
        // A handler that keeps per-shard state gets its own instance for this reader.
        let handler = handler
            .open_shard(ShardContext {
                stream: Arc::from(task.client.name.as_str()),
                shard_id: Arc::from(task.shard_id.as_str()),
                initial_position: kcl_initial_position(&task.stream),
                progress: progress.subscribe(),
                fence: task.fence.clone(),
                lease_counter: task.lease_counter,
            })
            .unwrap_or(handler);
        let task_backoff = task.failure.retry.backoff.start();
        let mut reader = Reader {
            delivered: task.checkpoint.clone(),
            task,
            tuning,
            handler,
            m,
            progress_tx: progress,
            progress: initial,
            commits,
            commit_rx,
            stop,
            pinned: None,
            redelivered_from: None,
            last_poison: None,
            rewind_backoff: task_backoff,
            rewound_at: None,
        };
        debug!(checkpoint = ?reader.delivered, "reading shard");
        let outcome = if reader.task.stream.consumer.is_fan_out() {
            crate::efo::run(&mut reader).await
        } else {
            reader.run().await
        };
        if let Err(Exit::Stopped | Exit::Redeliver | Exit::Rewind) = outcome {
            // Batches a manual-commit handler still holds: give it until the shutdown
            // bound to commit them, so the final checkpoint includes them.
            if reader.commits.state().pending > 0 {
                let grace = CancellationToken::new();
                let timer = {
                    let grace = grace.clone();
                    let d = reader.tuning.shutdown_timeout;
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        grace.cancel();
                    })
                };
                let _ = reader.wait_pending_at_most(0, &grace).await;
                timer.abort();
            }
            // The shard is still ours: the handler's last chance to commit.
            let bound = reader.tuning.shutdown_timeout;
            if tokio::time::timeout(bound, reader.handler.stop_shard(&reader.commits))
                .await
                .is_err()
            {
                warn!("the handler did not finish stopping within the shutdown bound");
            }
            reader.publish();
            debug!(acked = ?reader.progress.acked, "reader stopped");
        }
        reader.progress.clone()
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn poll_delay_table() {
        let tuning = Tuning {
            poll_interval: MS(2000),
            min_call_interval: MS(1000),
            max_records_per_call: 100,
            ..Tuning::default()
        };
        let page = |records: usize, bytes: usize, behind: Option<i64>| LastPage {
            records,
            bytes,
            millis_behind: behind,
        };
        const MB: usize = 1024 * 1024;
        // (since last call, last page, want)
        let cases = [
            // Idle, caught up: the poll interval.
            (MS(0), page(0, 0, Some(0)), MS(2000)),
            (MS(300), page(0, 0, Some(0)), MS(1700)),
            (MS(2500), page(0, 0, Some(0)), MS(0)),
            (MS(0), LastPage::default(), MS(2000)), // failed call / unknown lag: idle
            // A trickle at the tip: minCallInterval, not the 200ms the limit would allow.
            (MS(0), page(3, 300, Some(0)), MS(1000)),
            (MS(400), page(3, 300, None), MS(600)),
            (MS(0), page(3, 300, Some(1000)), MS(1000)), // behind by one interval: still a trickle
            // Behind the tip: as fast as the shard's limits allow.
            (MS(0), page(3, 300, Some(1001)), MS(200)),
            (MS(0), page(0, 0, Some(60_000)), MS(200)), // an empty page far behind
            (MS(0), page(100, 1000, Some(0)), MS(200)), // a full page: more is waiting
            (MS(50), page(100, 1000, Some(0)), MS(150)),
            (MS(0), page(100, 4 * MB, Some(5000)), MS(2000)), // 4 MB at 2 MB/s
            (MS(0), page(100, 10 * MB, Some(5000)), MS(5000)), // a 10 MB page: 5s
            (MS(0), page(3, 3 * MB, Some(0)), MS(1500)),      // bytes bound the trickle too
        ];
        for (since, last, want) in cases {
            assert_eq!(
                next_poll_delay(since, &last, &tuning),
                want,
                "{since:?} {last:?}"
            );
        }
        // The poll interval never undercuts minCallInterval, nor either the limit.
        let short = Tuning {
            poll_interval: MS(200),
            min_call_interval: MS(700),
            ..tuning.clone()
        };
        assert_eq!(
            next_poll_delay(MS(0), &page(0, 0, Some(0)), &short),
            MS(700)
        );
        let tiny = Tuning {
            poll_interval: MS(10),
            min_call_interval: MS(10),
            ..tuning
        };
        assert_eq!(
            next_poll_delay(MS(0), &page(0, 0, Some(0)), &tiny),
            MIN_CALL_GAP
        );
        assert_eq!(
            next_poll_delay(MS(0), &page(1, 1, Some(0)), &tiny),
            MIN_CALL_GAP
        );
    }

    /// An aborted reader (the engine drops its future) must not leave its shard's lag
    /// gauge behind.
    #[tokio::test]
    async fn lag_gauge_removed_when_the_reader_is_aborted() {
        let metrics = Arc::new(Metrics::new());
        let labels = ShardLabels {
            stream: "s".into(),
            shard: "shardId-000000000007".into(),
        };
        let (m, l) = (metrics.clone(), labels.clone());
        let task = tokio::spawn(async move {
            let _g = LagGaugeGuard {
                metrics: m.clone(),
                labels: l.clone(),
            };
            m.behind_latest.get_or_create(&l).set(1.5);
            futures::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(metrics.encode().contains("shardId-000000000007"));
        task.abort();
        let _ = task.await;
        assert!(
            !metrics.encode().contains("shardId-000000000007"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn iterator_start_table() {
        let latest: StreamConfig = serde_yaml::from_str("name: s").unwrap();
        let trim: StreamConfig =
            serde_yaml::from_str("name: s\nstartPosition: TrimHorizon").unwrap();
        let t: jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let pinned_latest = IteratorStart::AtTimestamp(
            t.checked_sub(jiff::SignedDuration::from_millis(LATEST_HANDOFF_MARGIN_MS))
                .unwrap(),
        );
        // (name, delivered, pinned, stream, want)
        let cases = [
            ("first iterator", None, None, &latest, IteratorStart::Latest),
            (
                "iterator dropped before any delivery: never LATEST again",
                None,
                Some(pinned_latest.clone()),
                &latest,
                pinned_latest.clone(),
            ),
            (
                "after a delivery: right after it",
                Some("42"),
                Some(pinned_latest.clone()),
                &latest,
                IteratorStart::After("42".into()),
            ),
            (
                "after a delivery inside an aggregate: at the aggregate",
                Some("42/3"),
                Some(pinned_latest.clone()),
                &latest,
                IteratorStart::At("42".into()),
            ),
            (
                "trim horizon",
                None,
                None,
                &trim,
                IteratorStart::TrimHorizon,
            ),
        ];
        for (name, delivered, pinned, stream, want) in cases {
            let delivered = delivered.map(Position::parse);
            assert_eq!(
                iterator_start(delivered.as_ref(), pinned.as_ref(), stream),
                want,
                "{name}"
            );
        }
        // (start, pinned)
        let pins = [
            (IteratorStart::Latest, Some(pinned_latest)),
            (IteratorStart::TrimHorizon, None),
            (IteratorStart::AtTimestamp(t), None),
            (IteratorStart::After("7".into()), None),
        ];
        for (start, want) in pins {
            assert_eq!(pin_start(&start, t), want, "{start:?}");
        }
        // The whole decision: LATEST, iterator lost before any delivery, LATEST is not
        // asked again; the re-resolved start lies before the first request.
        let first = iterator_start(None, None, &latest);
        let pinned = pin_start(&first, t);
        let again = iterator_start(None, pinned.as_ref(), &latest);
        assert_ne!(again, IteratorStart::Latest);
        match again {
            IteratorStart::AtTimestamp(at) => assert!(at < t),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_action_table() {
        use ErrorKind::*;
        const KEEP: ErrorAction = ErrorAction::Retry {
            drop_iterator: false,
        };
        const DROP: ErrorAction = ErrorAction::Retry {
            drop_iterator: true,
        };
        // (kind, action, reported on the first failure)
        let cases = [
            (ExpiredIterator, ErrorAction::NewIterator, false),
            (InvalidRequest, DROP, true),
            (ShardNotFound, DROP, true),
            (Throttled, KEEP, false),
            (Unavailable, KEEP, true),
            (StreamNotFound, KEEP, true),
            (AccessDenied, KEEP, true),
            (InUse, KEEP, false),
        ];
        for (kind, action, report_first) in cases {
            assert_eq!(on_kinesis_error(kind), action, "{kind:?}");
            assert_eq!(should_report(kind, 1), report_first, "{kind:?}");
        }
        assert!(should_report(Throttled, 3));
        assert!(!should_report(InUse, 5));
        assert!(should_report(InUse, 6));
    }

    #[test]
    fn skip_done_table() {
        let rec = |seq: &str, sub: Option<u64>| Record {
            stream: "s".into(),
            shard_id: "x".into(),
            sequence: seq.into(),
            sub_sequence: sub,
            partition_key: "k".into(),
            explicit_hash_key: None,
            data: Vec::new(),
            arrival: None,
        };
        let page = || {
            vec![
                rec("10", Some(0)),
                rec("10", Some(1)),
                rec("10", Some(2)),
                rec("11", None),
            ]
        };
        let shown = |r: &[Record]| {
            r.iter()
                .map(|r| r.position().to_string())
                .collect::<Vec<_>>()
        };
        // (done, what remains)
        let cases = [
            (None, vec!["10/0", "10/1", "10/2", "11"]),
            (Some(Position::sub("10", 0)), vec!["10/1", "10/2", "11"]),
            (Some(Position::sub("10", 2)), vec!["11"]),
            (Some(Position::whole("10")), vec!["11"]),
            (
                Some(Position::whole("9")),
                vec!["10/0", "10/1", "10/2", "11"],
            ),
            (Some(Position::whole("11")), vec![]),
        ];
        for (done, want) in cases {
            let mut records = page();
            skip_done(&mut records, done.as_ref());
            assert_eq!(shown(&records), want, "{done:?}");
        }
    }
}
