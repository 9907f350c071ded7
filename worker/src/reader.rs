//! Reads one leased shard: GetRecords polling, delivery, and progress reporting.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{StreamConfig, Tuning};
use crate::delivery::BatchHandler;
use crate::kinesis::StreamClient;
use crate::metrics::Metrics;

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
    pub checkpoint: Option<String>,
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
    /// Last sequence number the handler acknowledged (everything up to it is done).
    pub acked: Option<String>,
    /// The shard was read to its end and every record acknowledged.
    pub ended: bool,
    /// MillisBehindLatest of the last GetRecords.
    pub millis_behind: Option<i64>,
    /// When that GetRecords returned, Unix ms.
    pub lag_at_ms: Option<i64>,
    /// The current problem, if any (cleared once reading works again).
    pub issue: Option<Issue>,
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
    let _ = (task, tuning, handler, metrics, progress, stop);
    todo!("reader side")
}
