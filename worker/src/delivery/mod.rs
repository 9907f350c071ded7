//! Delivery: the handler API records go through, and the built-in sinks.
//!
//! Two handler styles:
//! - [`BatchHandler`]: `Ok` acknowledges the batch at once (auto-commit);
//! - [`ManualBatchHandler`], used through the [`ManualCommit`] adapter: the handler accepts
//!   a batch together with a [`CommitToken`] and commits it later; the checkpoint advances
//!   only through the contiguous prefix of committed batches. [`CommitToken::checkpoint`]
//!   moves it inside a batch, up to one record's [`Position`] (for a user record of a KPL
//!   aggregate, its sub-sequence too: a restart resumes at the next user record).
//!
//! The reader only knows [`BatchHandler::deliver`], which reports acknowledgements into a
//! per-shard [`CommitTracker`]; both styles end up there.
//!
//! A batch the handler refuses is retried as the [`FailurePolicy`] (`delivery.retry`,
//! `delivery.onFailure`) says: the decisions are in [`poison`], the dead-letter target's
//! I/O in [`dead_letter`].
//!
//! A handler that keeps state per shard (the [`multilang`] sink runs one KCL record processor
//! per shard) returns its own instance from [`BatchHandler::open_shard`] and hears of the
//! shard's end ([`BatchHandler::end_shard`]) and of a graceful stop
//! ([`BatchHandler::stop_shard`]); it checkpoints by [`CommitTracker::checkpoint_at`], and a
//! [`HandlerError::redeliver`] makes the reader hand out everything after the committed
//! position again. The defaults do nothing, so the other sinks are untouched.
//!
//! A manual-commit handler that hands batches to a background writer and commits once the
//! writer has flushed them:
//!
//! ```no_run
//! use futures::future::BoxFuture;
//! use kcg_worker::delivery::{CommitToken, HandlerError, ManualBatchHandler, ManualCommit, Record};
//! use tokio::sync::mpsc;
//!
//! struct ToWriter(mpsc::Sender<(Vec<Record>, CommitToken)>);
//!
//! impl ManualBatchHandler for ToWriter {
//!     fn handle<'a>(&'a self, batch: &'a [Record], commit: CommitToken)
//!         -> BoxFuture<'a, Result<(), HandlerError>> {
//!         Box::pin(async move {
//!             // Backpressure: a full queue makes the reader wait.
//!             self.0.send((batch.to_vec(), commit)).await
//!                 .map_err(|_| HandlerError::new("writer stopped"))
//!         })
//!     }
//! }
//!
//! # async fn demo() {
//! let (tx, mut rx) = mpsc::channel::<(Vec<Record>, CommitToken)>(8);
//! tokio::spawn(async move {
//!     while let Some((records, commit)) = rx.recv().await {
//!         // ... write `records` durably, then:
//!         let _ = records;
//!         commit.commit();
//!     }
//! });
//! let handler = ManualCommit::arc(ToWriter(tx));
//! // pass `handler` to kcg_worker::engine::run(...)
//! # let _ = handler;
//! # }
//! ```

pub mod commit;
pub mod dead_letter;
pub mod http;
pub mod multilang;
pub mod poison;
pub mod stdout;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;

pub use crate::position::Position;
pub use commit::{CommitState, CommitToken, CommitTracker};

use crate::config::{DeliveryConfig, OnFailure, RetryPolicy};
use crate::reader::ShardProgress;
use dead_letter::{DeadLetterError, DeadLetterWriter};

/// One record as handed to a handler: a Kinesis record, or one user record of a KPL
/// aggregate (then `sub_sequence` is set and `partition_key`/`explicit_hash_key` are the
/// user record's own).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Stream name as configured. Shared by every record of a reader (created once per
    /// reader), so handing a record over allocates nothing for it.
    pub stream: Arc<str>,
    /// Shard id, shared like `stream`.
    pub shard_id: Arc<str>,
    /// Kinesis sequence number (of the aggregate, for a user record of one).
    pub sequence: String,
    /// Index of this user record inside its KPL aggregate (0-based); `None` for a record
    /// that was not aggregated (or an aggregate that could not be decoded, delivered raw).
    pub sub_sequence: Option<u64>,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key the KPL producer set for this user record, if any (plain Kinesis
    /// records do not return theirs).
    pub explicit_hash_key: Option<String>,
    /// Payload bytes.
    pub data: Vec<u8>,
    /// ApproximateArrivalTimestamp (of the aggregate, for a user record of one).
    pub arrival: Option<jiff::Timestamp>,
}

impl Record {
    /// Where this record sits in its shard: what a checkpoint right after it holds.
    pub fn position(&self) -> Position {
        Position {
            sequence: self.sequence.clone(),
            sub_sequence: self.sub_sequence,
        }
    }
}

/// Why a handler did not acknowledge a batch. The batch is retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// What went wrong, for logs and the client row's `lastError`.
    pub message: String,
    /// The handler lost what it was handed since the committed position (e.g. its process
    /// restarted): the reader must hand out again everything after that position, not just
    /// this batch.
    pub redeliver: bool,
}

impl HandlerError {
    /// A handler error with this message: the same batch is handed out again.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            redeliver: false,
        }
    }

    /// A handler error after which everything since the committed position is handed out
    /// again.
    pub fn redeliver(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            redeliver: true,
        }
    }
}

/// What a per-shard handler ([`BatchHandler::open_shard`]) knows about its shard.
#[derive(Clone, Debug)]
pub struct ShardContext {
    /// Stream name as configured.
    pub stream: Arc<str>,
    /// Shard id.
    pub shard_id: Arc<str>,
    /// Where a shard without checkpoint starts, in KCL's words: `TRIM_HORIZON`, `LATEST`
    /// or `AT_TIMESTAMP`.
    pub initial_position: &'static str,
    /// The reader's progress (lag of the last GetRecords, published before each delivery).
    pub progress: tokio::sync::watch::Receiver<ShardProgress>,
    /// The reader's fencing deadline: a handler that waits on something outside (an http
    /// request) must not let it run past it.
    pub fence: crate::fence::Fence,
    /// The lease counter the reader holds the shard under: it grows with every new holder,
    /// so a receiver can refuse deliveries of an older one (a fencing token).
    pub lease_counter: u64,
}

/// Receives batches of one shard, in order. `Ok` acknowledges the whole batch (it may be
/// checkpointed); `Err` means "retry this batch" (nothing is checkpointed, nothing skipped).
pub trait BatchHandler: Send + Sync + 'static {
    /// Handle one batch. Called for one shard at a time, never concurrently per shard.
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// How the reader hands over a batch: registers it in the shard's `commits` and
    /// resolves once the handler has accepted it. The default acknowledges on `Ok` at once;
    /// [`ManualCommit`] leaves the commit to the handler's [`CommitToken`]. On `Err` the
    /// batch is withdrawn and the reader hands the same records out again.
    fn deliver<'a>(
        &'a self,
        batch: &'a [Record],
        commits: &'a CommitTracker,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(last) = batch.last() else {
                return Ok(());
            };
            let token = commits.begin(last.position());
            match self.handle(batch).await {
                Ok(()) => {
                    token.commit();
                    Ok(())
                }
                Err(e) => {
                    token.abort();
                    Err(e)
                }
            }
        })
    }

    /// A handler of its own for one shard's reader, for handlers that keep per-shard state
    /// (the multiLang sink runs a process per shard). `None` (the default): this handler
    /// serves every shard. The returned handler is dropped when the reader ends; a drop
    /// without [`Self::end_shard`] or [`Self::stop_shard`] means the reader was cut off
    /// (lease lost, fenced, or the shutdown bound passed).
    fn open_shard(&self, _shard: ShardContext) -> Option<Arc<dyn BatchHandler>> {
        None
    }

    /// The shard was read to its end and every batch acknowledged: `Ok` lets it count as
    /// ended (its children may start). `Err` is retried with backoff (with
    /// [`HandlerError::redeliver`], after redelivering from the committed position).
    fn end_shard<'a>(
        &'a self,
        _commits: &'a CommitTracker,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Reading stops while the shard is still ours (released on a rebalance, or the worker
    /// shuts down): a last chance to commit. The reader bounds it by the shutdown timeout.
    fn stop_shard<'a>(&'a self, _commits: &'a CommitTracker) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// A handler that acknowledges later. `Ok` means "accepted"; the batch counts as processed
/// once `commit` is called on its token. `Err` means "not accepted, hand it to me again"
/// (do not commit a token of a batch you return `Err` for).
pub trait ManualBatchHandler: Send + Sync + 'static {
    /// Accept one batch of one shard; batches of a shard arrive in order, one at a time.
    fn handle<'a>(
        &'a self,
        batch: &'a [Record],
        commit: CommitToken,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// Adapts a [`ManualBatchHandler`] to the [`BatchHandler`] the engine takes.
pub struct ManualCommit<H> {
    inner: H,
}

impl<H: ManualBatchHandler> ManualCommit<H> {
    /// Wraps `handler`.
    pub fn new(handler: H) -> Self {
        Self { inner: handler }
    }

    /// Wraps `handler` ready for the engine.
    pub fn arc(handler: H) -> Arc<dyn BatchHandler> {
        Arc::new(Self::new(handler))
    }
}

impl<H: ManualBatchHandler> BatchHandler for ManualCommit<H> {
    /// Outside a reader there is no shard tracker: resolve once the handler committed.
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let commits = CommitTracker::new(None);
            let mut rx = commits.subscribe();
            self.deliver(batch, &commits).await?;
            loop {
                let st = rx.borrow_and_update().clone();
                if st.abandoned {
                    return Err(HandlerError::new(
                        "a commit token was dropped without commit",
                    ));
                }
                if st.pending == 0 {
                    return Ok(());
                }
                if rx.changed().await.is_err() {
                    return Err(HandlerError::new("commit tracker closed"));
                }
            }
        })
    }

    fn deliver<'a>(
        &'a self,
        batch: &'a [Record],
        commits: &'a CommitTracker,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(last) = batch.last() else {
                return Ok(());
            };
            let token = commits.begin(last.position());
            let id = token.id();
            let result = self.inner.handle(batch, token).await;
            if result.is_err() {
                commits.abort(id);
            }
            result
        })
    }
}

/// What the reader does with batches the handler refuses: `delivery.retry`, and for
/// records that keep failing alone, `delivery.onFailure` with its dead-letter writer.
#[derive(Clone, Default)]
pub struct FailurePolicy {
    /// Attempts and backoff.
    pub retry: RetryPolicy,
    /// What happens to a poison record.
    pub on_failure: FailureAction,
}

/// `delivery.onFailure`, with the writer `DeadLetter` needs.
#[derive(Clone, Default)]
pub enum FailureAction {
    /// Retry without end.
    #[default]
    Block,
    /// Drop the record (counted, reported).
    Skip,
    /// Write it to the dead-letter target, then go on.
    DeadLetter(Arc<DeadLetterWriter>),
}

impl std::fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match &self.on_failure {
            FailureAction::Block => "Block".to_owned(),
            FailureAction::Skip => "Skip".to_owned(),
            FailureAction::DeadLetter(w) => format!("DeadLetter({})", w.describe()),
        };
        f.debug_struct("FailurePolicy")
            .field("retry", &self.retry)
            .field("on_failure", &action)
            .finish()
    }
}

impl FailurePolicy {
    /// The policy `config` asks for; connects the dead-letter writer of group `group`.
    pub async fn connect(
        config: &DeliveryConfig,
        group: &str,
        base: &aws_config::SdkConfig,
    ) -> Result<Self, DeadLetterError> {
        let on_failure = match (config.on_failure, &config.dead_letter) {
            (OnFailure::Block, _) => FailureAction::Block,
            (OnFailure::Skip, _) => FailureAction::Skip,
            (OnFailure::DeadLetter, Some(target)) => FailureAction::DeadLetter(Arc::new(
                DeadLetterWriter::connect(target, group, base).await?,
            )),
            (OnFailure::DeadLetter, None) => {
                return Err(DeadLetterError {
                    target: "delivery.deadLetter".into(),
                    message: "onFailure DeadLetter needs a dead-letter target".into(),
                });
            }
        };
        Ok(Self {
            retry: config.retry.clone(),
            on_failure,
        })
    }

    /// The plain data the decisions ([`poison::BatchState::step`]) take.
    pub fn decisions(&self) -> poison::Policy {
        poison::Policy {
            max_attempts: self.retry.max_attempts,
            on_failure: match self.on_failure {
                FailureAction::Block => OnFailure::Block,
                FailureAction::Skip => OnFailure::Skip,
                FailureAction::DeadLetter(_) => OnFailure::DeadLetter,
            },
        }
    }
}

/// Builds the handler the config asks for.
pub fn build_handler(config: &DeliveryConfig) -> Result<Arc<dyn BatchHandler>, HandlerError> {
    match (&config.stdout, &config.http, &config.multi_lang) {
        (Some(_), None, None) => Ok(Arc::new(stdout::StdoutSink::new())),
        (None, Some(h), None) => Ok(Arc::new(http::HttpSink::new(h)?)),
        (None, None, Some(m)) => Ok(Arc::new(multilang::MultiLangSink::new(m))),
        _ => Err(HandlerError::new(
            "delivery needs exactly one of stdout, http or multiLang",
        )),
    }
}

/// The JSON shape of one record, shared by the stdout and http sinks. Borrowing, so
/// serializing allocates nothing per record beyond the output buffer.
#[derive(Serialize)]
pub struct RecordJson<'a> {
    stream: &'a str,
    shard: &'a str,
    sequence: &'a str,
    /// Only for a user record of a KPL aggregate.
    #[serde(rename = "subSequence", skip_serializing_if = "Option::is_none")]
    sub_sequence: Option<u64>,
    #[serde(rename = "partitionKey")]
    partition_key: &'a str,
    #[serde(rename = "explicitHashKey", skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<&'a str>,
    #[serde(serialize_with = "ser_base64")]
    data: &'a [u8],
    #[serde(serialize_with = "ser_arrival")]
    arrival: Option<jiff::Timestamp>,
}

impl<'a> From<&'a Record> for RecordJson<'a> {
    fn from(r: &'a Record) -> Self {
        Self {
            stream: &r.stream,
            shard: &r.shard_id,
            sequence: &r.sequence,
            sub_sequence: r.sub_sequence,
            partition_key: &r.partition_key,
            explicit_hash_key: r.explicit_hash_key.as_deref(),
            data: &r.data,
            arrival: r.arrival,
        }
    }
}

/// Serializes bytes as standard base64 (the sinks' and KCL's encoding of record data).
pub(crate) fn ser_base64<S: serde::Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::display::Base64Display;
    use base64::engine::general_purpose::STANDARD;
    s.collect_str(&Base64Display::new(data, &STANDARD))
}

fn ser_arrival<S: serde::Serializer>(t: &Option<jiff::Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        // jiff's Display is RFC 3339 in UTC, e.g. 2026-11-28T17:44:39.123Z.
        Some(t) => s.collect_str(t),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn rec(seq: &str) -> Record {
        Record {
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
            sequence: seq.into(),
            sub_sequence: None,
            partition_key: "k".into(),
            explicit_hash_key: None,
            data: b"x".to_vec(),
            arrival: None,
        }
    }

    /// Keeps every token; the test commits them in any order.
    struct Holding(Mutex<Vec<CommitToken>>);
    impl ManualBatchHandler for Holding {
        fn handle<'a>(
            &'a self,
            _b: &'a [Record],
            c: CommitToken,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            self.0.lock().unwrap().push(c);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn manual_commit_advances_only_through_contiguous_prefix() {
        let h = ManualCommit::new(Holding(Mutex::new(Vec::new())));
        let commits = CommitTracker::new(Some(Position::whole("0")));
        for seq in ["10", "20", "30"] {
            h.deliver(&[rec(seq)], &commits).await.unwrap();
        }
        assert_eq!(commits.state().pending, 3);
        let mut tokens: Vec<_> = h.inner.0.lock().unwrap().drain(..).collect();
        let t3 = tokens.pop().unwrap();
        let t2 = tokens.pop().unwrap();
        let t1 = tokens.pop().unwrap();
        t1.commit();
        assert_eq!(commits.state().committed, Some(Position::whole("10")));
        t3.commit();
        assert_eq!(
            commits.state().committed,
            Some(Position::whole("10")),
            "batch 3 must wait for batch 2"
        );
        t2.commit();
        assert_eq!(
            commits.state(),
            CommitState {
                committed: Some(Position::whole("30")),
                pending: 0,
                abandoned: false,
            }
        );
    }

    struct Refusing;
    impl ManualBatchHandler for Refusing {
        fn handle<'a>(
            &'a self,
            _b: &'a [Record],
            c: CommitToken,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            drop(c);
            Box::pin(async { Err(HandlerError::new("no")) })
        }
    }

    #[tokio::test]
    async fn manual_err_withdraws_the_batch() {
        let h = ManualCommit::new(Refusing);
        let commits = CommitTracker::new(None);
        assert!(h.deliver(&[rec("10")], &commits).await.is_err());
        assert_eq!(commits.state(), CommitState::default());
    }

    struct Auto(Mutex<u32>);
    impl BatchHandler for Auto {
        fn handle<'a>(&'a self, _b: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
            let mut n = self.0.lock().unwrap();
            *n += 1;
            let fail = *n == 1;
            Box::pin(async move {
                if fail {
                    Err(HandlerError::new("first fails"))
                } else {
                    Ok(())
                }
            })
        }
    }

    #[tokio::test]
    async fn auto_handler_commits_on_ok_only() {
        let h = Auto(Mutex::new(0));
        let commits = CommitTracker::new(None);
        assert!(h.deliver(&[rec("10")], &commits).await.is_err());
        assert_eq!(commits.state(), CommitState::default());
        h.deliver(&[rec("10")], &commits).await.unwrap();
        assert_eq!(commits.state().committed, Some(Position::whole("10")));
    }

    /// Commits later, from another task.
    struct Later;
    impl ManualBatchHandler for Later {
        fn handle<'a>(
            &'a self,
            _b: &'a [Record],
            c: CommitToken,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                c.commit();
            });
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn manual_handle_outside_reader_waits_for_commit() {
        let h = ManualCommit::new(Later);
        h.handle(&[rec("1")]).await.unwrap();
    }

    #[test]
    fn record_json_shape() {
        let r = Record {
            stream: "orders".into(),
            shard_id: "shardId-000000000001".into(),
            sequence: "4959".into(),
            sub_sequence: None,
            partition_key: "p\"k".into(),
            explicit_hash_key: None,
            data: b"hello".to_vec(),
            arrival: Some("2026-11-28T17:44:39.5Z".parse().unwrap()),
        };
        let v: serde_json::Value = serde_json::to_value(RecordJson::from(&r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "stream": "orders",
                "shard": "shardId-000000000001",
                "sequence": "4959",
                "partitionKey": "p\"k",
                "data": "aGVsbG8=",
                "arrival": "2026-11-28T17:44:39.5Z",
            })
        );
        let none = Record {
            arrival: None,
            ..r.clone()
        };
        let v: serde_json::Value = serde_json::to_value(RecordJson::from(&none)).unwrap();
        assert_eq!(v["arrival"], serde_json::Value::Null);
        // A user record of a KPL aggregate carries its index and explicit hash key.
        let user = Record {
            sub_sequence: Some(3),
            explicit_hash_key: Some("170141183460469231731687303715884105728".into()),
            ..r
        };
        let v: serde_json::Value = serde_json::to_value(RecordJson::from(&user)).unwrap();
        assert_eq!(v["subSequence"], 3);
        assert_eq!(
            v["explicitHashKey"],
            "170141183460469231731687303715884105728"
        );
    }
}
