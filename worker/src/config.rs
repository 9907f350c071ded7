//! The worker configuration: what one consumer group reads, where it keeps its state and
//! where its records go.
//!
//! These types are the single source of truth shared by both binaries: the operator embeds
//! them in the `KinesisConsumerGroup` spec (so their JSON schema, defaults and CEL rules end up
//! in the CRD) and renders them into the worker's ConfigMap as YAML; `kcg-worker` parses that
//! YAML back into the same types.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Errors found while loading or checking a worker configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The path given on the command line.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The YAML did not match the schema.
    #[error("parsing config: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// The YAML parsed but a value is unusable; the message says what to fix.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Everything one `kcg-worker` process needs to join a consumer group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerConfig {
    /// The group id, `namespace/name` of the KinesisConsumerGroup. Partition key of every
    /// state-store row of this group, so one table can serve a whole cluster.
    pub group: String,
    /// The streams the group reads.
    pub streams: Vec<StreamConfig>,
    /// The DynamoDB table that coordinates the group.
    pub state_store: StateStoreConfig,
    /// Where records are delivered.
    pub delivery: DeliveryConfig,
    /// Intervals and limits.
    #[serde(default)]
    pub tuning: Tuning,
}

impl WorkerConfig {
    /// Reads and checks a YAML config file.
    pub fn load(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and checks a YAML config document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Renders the config as YAML, the format `kcg-worker --config` reads.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Checks what the CRD's schema and CEL rules check at admission, for configs that did
    /// not come through the API server (local runs, hand-written files).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.group.contains('/') {
            return invalid(format!("group {:?} must be namespace/name", self.group));
        }
        if self.streams.is_empty() {
            return invalid("at least one stream is required".into());
        }
        for (i, s) in self.streams.iter().enumerate() {
            if self.streams[..i].iter().any(|t| t.name == s.name) {
                return invalid(format!("stream {:?} is listed twice", s.name));
            }
            if s.start_position == StartPosition::AtTimestamp && s.start_timestamp.is_none() {
                return invalid(format!(
                    "stream {:?}: startPosition AtTimestamp needs startTimestamp",
                    s.name
                ));
            }
        }
        if self.delivery.stdout.is_some() == self.delivery.http.is_some() {
            return invalid("delivery needs exactly one of stdout or http".into());
        }
        let t = &self.tuning;
        if t.poll_interval < Duration::from_millis(200) {
            return invalid("tuning.pollInterval must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)".into());
        }
        if !(1..=10_000).contains(&t.max_records_per_call) {
            return invalid("tuning.maxRecordsPerCall must be between 1 and 10000".into());
        }
        if t.client_timeout < t.heartbeat_interval * 2 {
            return invalid("tuning.clientTimeout must be at least twice tuning.heartbeatInterval".into());
        }
        Ok(())
    }
}

/// One stream the group reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.startPosition) || self.startPosition != 'AtTimestamp' || has(self.startTimestamp)",
    "message": "startPosition AtTimestamp needs startTimestamp (an RFC 3339 time such as 2026-01-02T15:04:05Z)"
}]))]
pub struct StreamConfig {
    /// Stream name, or stream ARN for a stream in another account or region.
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-zA-Z0-9_.-]{1,128}$') || self.matches('^arn:aws[a-zA-Z-]*:kinesis:[a-z0-9-]+:[0-9]{12}:stream/[a-zA-Z0-9_.-]{1,128}$')",
        "message": "name must be a Kinesis stream name (1-128 characters of a-z, A-Z, 0-9, _ . -) or a stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"
    }]))]
    pub name: String,
    /// AWS region of the stream; defaults to the worker's region (or the ARN's region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')",
        "message": "region must look like us-east-1"
    }]))]
    pub region: Option<String>,
    /// IAM role to assume (through STS) to read this stream, for a stream in another account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$')",
        "message": "roleArn must be an IAM role ARN: arn:aws:iam::ACCOUNT_ID:role/NAME"
    }]))]
    pub role_arn: Option<String>,
    /// Where to start reading a shard that has no checkpoint yet.
    #[serde(default)]
    pub start_position: StartPosition,
    /// RFC 3339 time to start from; required when `startPosition` is `AtTimestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<jiff::Timestamp>,
}

/// Where a shard without a checkpoint starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StartPosition {
    /// Only records written after the worker starts reading (the default).
    #[default]
    Latest,
    /// The oldest record still in the stream.
    TrimHorizon,
    /// The first record at or after `startTimestamp`.
    AtTimestamp,
}

/// The DynamoDB table that coordinates the group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateStoreConfig {
    /// DynamoDB table name.
    #[schemars(length(max = 255), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-zA-Z0-9_.-]{3,255}$')",
        "message": "table must be a DynamoDB table name: 3-255 characters of a-z, A-Z, 0-9, _ . -"
    }]))]
    pub table: String,
    /// AWS region of the table; defaults to the worker's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')",
        "message": "region must look like us-east-1"
    }]))]
    pub region: Option<String>,
    /// Create the table (on-demand billing) when it does not exist.
    #[serde(default)]
    pub create: bool,
}

/// Where records go. Exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.stdout) != has(self.http)",
    "message": "delivery needs exactly one of stdout or http"
}]))]
pub struct DeliveryConfig {
    /// Write one JSON line per record to the worker's stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
    /// POST each batch as JSON to a URL, usually a sidecar in the same pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
}

/// The stdout sink has no settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StdoutSink {}

/// POST each batch to `url`; a 2xx answer acknowledges it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSink {
    /// The endpoint, for example `http://localhost:9000/records`.
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^https?://[^ ]+$')",
        "message": "url must be an http:// or https:// URL"
    }]))]
    pub url: String,
    /// How long one POST may take before it is retried.
    #[serde(default = "defaults::http_timeout", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub timeout: Duration,
    /// Most records in one POST.
    #[serde(default = "defaults::http_max_batch")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_batch_records: u32,
}

/// Intervals and limits. Every field has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.clientTimeout) || !has(self.heartbeatInterval) || !self.clientTimeout.matches('^([0-9]+(ms|s|m|h))+$') || !self.heartbeatInterval.matches('^([0-9]+(ms|s|m|h))+$') || duration(self.clientTimeout) >= duration(self.heartbeatInterval) + duration(self.heartbeatInterval)",
    "message": "tuning.clientTimeout must be at least twice tuning.heartbeatInterval, so one late heartbeat does not expire a live client"
}]))]
pub struct Tuning {
    /// Pause between GetRecords calls on a shard that returned nothing new. At least 200ms.
    #[serde(default = "defaults::poll_interval", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), {
        "rule": "!self.matches('^([0-9]+(ms|s|m|h))+$') || duration(self) >= duration('200ms')",
        "message": "tuning.pollInterval must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)"
    }]))]
    pub poll_interval: Duration,
    /// Records per GetRecords call, 1 to 10000.
    #[serde(default = "defaults::max_records")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_records_per_call: u32,
    /// How often a shard's acknowledged position is written to the state store.
    #[serde(default = "defaults::checkpoint_interval", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub checkpoint_interval: Duration,
    /// How often a worker heartbeats, renews its leases and re-plans.
    #[serde(default = "defaults::heartbeat_interval", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub heartbeat_interval: Duration,
    /// A client (or lease) whose counter has not moved for this long is dead (expired).
    #[serde(default = "defaults::client_timeout", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub client_timeout: Duration,
    /// Bound on a graceful shutdown: finish the batch, checkpoint, release, deregister.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub shutdown_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            poll_interval: defaults::poll_interval(),
            max_records_per_call: defaults::max_records(),
            checkpoint_interval: defaults::checkpoint_interval(),
            heartbeat_interval: defaults::heartbeat_interval(),
            client_timeout: defaults::client_timeout(),
            shutdown_timeout: defaults::shutdown_timeout(),
        }
    }
}

/// The CEL rule every duration field carries: a Go-style duration such as `500ms`, `5s`,
/// `1m30s`, which both the API server and `humantime` understand.
fn duration_rule() -> serde_json::Value {
    serde_json::json!({
        "rule": "self.matches('^([0-9]+(ms|s|m|h))+$')",
        "message": "must be a duration such as 500ms, 5s, 1m or 1m30s"
    })
}

/// Default values, shared by serde and the CRD schema.
pub mod defaults {
    use std::time::Duration;

    /// GetRecords pause on an idle shard.
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    /// Records per GetRecords call.
    pub fn max_records() -> u32 {
        1000
    }
    /// Checkpoint write interval per shard.
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(5)
    }
    /// Heartbeat and re-plan interval.
    pub fn heartbeat_interval() -> Duration {
        Duration::from_secs(2)
    }
    /// Client and lease expiry.
    pub fn client_timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// Graceful shutdown bound.
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(20)
    }
    /// HTTP sink request timeout.
    pub fn http_timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// HTTP sink batch size.
    pub fn http_max_batch() -> u32 {
        500
    }
}
