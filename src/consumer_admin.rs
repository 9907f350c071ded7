//! Deregistration of a group's enhanced fan-out stream consumers, for streams with
//! `consumer: {mode: EnhancedFanOut, onDelete: Deregister}`, when the group is deleted.
//!
//! [`to_deregister`] decides PURELY which (stream, consumer name) pairs go; [`deregister`]
//! calls DeregisterStreamConsumer for each through the worker's own Kinesis client (the
//! stream's region and `roleArn` apply, as for reading).

use aws_config::SdkConfig;
use kcg_worker::config::{ConsumerOnDelete, StreamConfig, default_consumer_name};
use kcg_worker::kinesis::{KinesisError, StreamClient};

/// Deregistering a consumer failed.
#[derive(Debug, thiserror::Error)]
#[error("deregistering stream consumer {consumer} of stream {stream}: {source}")]
pub struct ConsumerAdminError {
    /// The stream as configured.
    pub stream: String,
    /// The consumer name.
    pub consumer: String,
    /// The classified Kinesis error (its message says what to check).
    #[source]
    pub source: KinesisError,
}

/// The streams of a group whose consumer goes with it, and each consumer's name (the
/// configured one, else the group's default, as the workers resolve it).
pub fn to_deregister<'a>(
    group: &str,
    streams: &'a [StreamConfig],
) -> Vec<(&'a StreamConfig, String)> {
    streams
        .iter()
        .filter(|s| s.consumer.is_fan_out() && s.consumer.on_delete == ConsumerOnDelete::Deregister)
        .map(|s| {
            let name = s
                .consumer
                .name
                .clone()
                .unwrap_or_else(|| default_consumer_name(group));
            (s, name)
        })
        .collect()
}

/// Deregisters the consumers [`to_deregister`] names. Returns the names of those that were
/// registered (a consumer or stream already gone counts as done: idempotent).
pub async fn deregister(
    base: &SdkConfig,
    group: &str,
    streams: &[StreamConfig],
) -> Result<Vec<String>, ConsumerAdminError> {
    let mut gone = Vec::new();
    for (stream, name) in to_deregister(group, streams) {
        let failed = |source| ConsumerAdminError {
            stream: stream.name.clone(),
            consumer: name.clone(),
            source,
        };
        let client = StreamClient::connect(stream, base).await.map_err(failed)?;
        if client.deregister_consumer(&name).await.map_err(failed)? {
            tracing::info!(group, stream = %stream.name, consumer = %name, "deregistered the stream consumer");
            gone.push(name);
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_consumers_go() {
        let streams: Vec<StreamConfig> = serde_yaml::from_str(
            "- {name: polled}\n\
             - {name: polled-but-marked, consumer: {onDelete: Deregister}}\n\
             - {name: kept, consumer: {mode: EnhancedFanOut}}\n\
             - {name: default-name, consumer: {mode: EnhancedFanOut, onDelete: Deregister}}\n\
             - {name: own-name, consumer: {mode: EnhancedFanOut, name: mine, onDelete: Deregister}}\n",
        )
        .unwrap();
        let got: Vec<(&str, String)> = to_deregister("ns/g", &streams)
            .into_iter()
            .map(|(s, n)| (s.name.as_str(), n))
            .collect();
        assert_eq!(
            got,
            [
                ("default-name", "kcg.ns.g".to_owned()),
                ("own-name", "mine".to_owned())
            ]
        );
    }
}
