//! Delivery: the handler API records go through, and the built-in sinks.

use futures::future::BoxFuture;

/// One Kinesis record as handed to a handler.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Stream name as configured.
    pub stream: String,
    /// Shard id.
    pub shard_id: String,
    /// Kinesis sequence number.
    pub sequence: String,
    /// Partition key.
    pub partition_key: String,
    /// Payload bytes.
    pub data: Vec<u8>,
    /// ApproximateArrivalTimestamp.
    pub arrival: Option<jiff::Timestamp>,
}

/// Why a handler did not acknowledge a batch. The batch is retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// What went wrong, for logs and the client row's `lastError`.
    pub message: String,
}

/// Receives batches of one shard, in order. `Ok` acknowledges the whole batch (it may be
/// checkpointed); `Err` means "retry this batch" (nothing is checkpointed, nothing skipped).
pub trait BatchHandler: Send + Sync + 'static {
    /// Handle one batch. Called for one shard at a time, never concurrently per shard.
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>>;
}
