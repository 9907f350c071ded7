//! Kinesis I/O for one configured stream: client (own region / assumed role), ListShards,
//! iterators and GetRecords. Owned by the reading side; the engine only calls `list_shards`.

use crate::config::StreamConfig;
use crate::store::schema::ShardInfo;

/// Kinesis errors, classified so callers can react (back off, resume, report).
#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    /// Placeholder until the reader lands.
    #[error("{0}")]
    Other(String),
}

/// A Kinesis client bound to one configured stream.
#[derive(Clone, Debug)]
pub struct StreamClient {
    /// The stream as named in the config (name or ARN).
    pub name: String,
}

impl StreamClient {
    /// Builds the client for `stream`: its region, and its role through STS AssumeRole
    /// (credentials refreshed before expiry); the base config carries the worker's own
    /// credentials and `AWS_ENDPOINT_URL_*`.
    pub async fn connect(
        stream: &StreamConfig,
        base: &aws_config::SdkConfig,
    ) -> Result<Self, KinesisError> {
        let _ = (stream, base);
        todo!("reader side")
    }

    /// Every shard of the stream (ListShards with paging), sorted by shard id.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, KinesisError> {
        todo!("reader side")
    }
}
