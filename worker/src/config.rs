//! The worker configuration: what one consumer group reads, where it keeps its state and
//! where its records go.
//!
//! These types are the single source of truth shared by both binaries: the operator embeds
//! them in the `KinesisConsumerGroup` spec (so their JSON schema, defaults and CEL rules end up
//! in the CRD) and renders them into the worker's ConfigMap as YAML; `kcg-worker` parses that
//! YAML back into the same types.

use std::sync::LazyLock;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod timing;
mod unknown_fields;

pub use unknown_fields::UnknownField;

/// Prefix of the environment variables that override the config file, e.g.
/// `KCG__TUNING__POLL_INTERVAL=500ms`; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "KCG__";

/// Environment variable the operator sets to `operator` in the worker pods it renders: the
/// config file then comes from the operator, and a field this worker does not know is a
/// warning (a newer operator during a rolling upgrade), not an error.
pub const ORIGIN_ENV: &str = "KCG_CONFIG_ORIGIN";

/// Kinesis stream name. The CRD's CEL rule and [`WorkerConfig::validate`] share this pattern.
pub const STREAM_NAME_PATTERN: &str = "^[a-zA-Z0-9_.-]{1,128}$";
/// Kinesis stream ARN.
pub const STREAM_ARN_PATTERN: &str =
    "^arn:aws[a-zA-Z-]*:kinesis:[a-z0-9-]+:[0-9]{12}:stream/[a-zA-Z0-9_.-]{1,128}$";
/// IAM role ARN.
pub const ROLE_ARN_PATTERN: &str =
    "^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$";
/// AWS region.
pub const REGION_PATTERN: &str = "^[a-z]{2}(-[a-z]+)+-[0-9]+$";
/// Kinesis stream consumer name (enhanced fan-out), as RegisterStreamConsumer accepts it.
pub const CONSUMER_NAME_PATTERN: &str = "^[a-zA-Z0-9_.-]{1,128}$";
/// DynamoDB table name.
pub const TABLE_PATTERN: &str = "^[a-zA-Z0-9_.-]{3,255}$";
/// HTTP sink URL.
pub const HTTP_URL_PATTERN: &str = "^https?://[^ ]+$";
/// A Go-style duration such as `500ms`, `5s`, `1m30s`: what both the API server's CEL
/// `duration()` and this crate's parser understand.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";
/// Longest duration string the schema admits.
const DURATION_MAX_LEN: usize = 32;

/// Compiles one of the constant patterns above; they are fixed and covered by tests, so a
/// failure is a programming error caught before release.
fn compiled(pattern: &'static str) -> Regex {
    Regex::new(pattern).expect("constant pattern compiles")
}

static STREAM_NAME_RE: LazyLock<Regex> = LazyLock::new(|| compiled(STREAM_NAME_PATTERN));
static STREAM_ARN_RE: LazyLock<Regex> = LazyLock::new(|| compiled(STREAM_ARN_PATTERN));
static ROLE_ARN_RE: LazyLock<Regex> = LazyLock::new(|| compiled(ROLE_ARN_PATTERN));
static REGION_RE: LazyLock<Regex> = LazyLock::new(|| compiled(REGION_PATTERN));
static CONSUMER_NAME_RE: LazyLock<Regex> = LazyLock::new(|| compiled(CONSUMER_NAME_PATTERN));
static TABLE_RE: LazyLock<Regex> = LazyLock::new(|| compiled(TABLE_PATTERN));
static HTTP_URL_RE: LazyLock<Regex> = LazyLock::new(|| compiled(HTTP_URL_PATTERN));
static DURATION_RE: LazyLock<Regex> = LazyLock::new(|| compiled(DURATION_PATTERN));

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
    /// The YAML (or an environment override) did not match the schema; the message names
    /// the field and where its value came from.
    #[error("parsing config: {0}")]
    Parse(String),
    /// The file or an environment override holds fields no config type declares (a typo,
    /// usually); the message names each with its path and a did-you-mean.
    #[error("unknown config field: {}", join_unknown(.0))]
    Unknown(Vec<UnknownField>),
    /// The config could not be rendered as YAML.
    #[error("rendering config: {0}")]
    Render(#[from] serde_yaml::Error),
    /// The config parsed but a value is unusable; the message names the field and says what
    /// to fix.
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn join_unknown(fields: &[UnknownField]) -> String {
    fields
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Who wrote the config file, which decides what an unknown field in it means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigOrigin {
    /// A person: an unknown field is a typo, and an error.
    #[default]
    User,
    /// The operator (see [`ORIGIN_ENV`]): an unknown field is one a newer operator knows,
    /// a warning. `KCG__` overrides are still the user's, so unknown ones stay errors.
    Operator,
}

/// A loaded config and the unknown fields that were only worth a warning.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The checked config.
    pub config: WorkerConfig,
    /// Fields of an operator-rendered file this version ignores.
    pub ignored: Vec<UnknownField>,
}

/// Everything one `kcg-worker` process needs to join a consumer group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Reads a YAML config file, applies the `KCG__...` environment overrides (see
    /// [`env_overrides`]) and checks the result. Unknown fields are errors, except those of
    /// an operator-rendered file, which come back in [`Loaded::ignored`].
    pub fn load(path: &str, origin: ConfigOrigin) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let figment = Figment::from(Yaml::string(&text)).merge(env_overrides());
        Self::extract(figment, path, origin)
    }

    /// Parses and checks a YAML config document, without environment overrides (the
    /// operator renders and re-reads configs with this); unknown fields are errors.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Yaml::string(text)),
            "the config",
            ConfigOrigin::User,
        )
        .map(|l| l.config)
    }

    fn extract(figment: Figment, name: &str, origin: ConfigOrigin) -> Result<Loaded, ConfigError> {
        let config: Self = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe(e, name)))?;
        let (ignored, errors): (Vec<_>, Vec<_>) = unknown_fields::find(&figment, name)
            .into_iter()
            .partition(|u| origin == ConfigOrigin::Operator && !u.from_env);
        if !errors.is_empty() {
            return Err(ConfigError::Unknown(errors));
        }
        config.validate()?;
        Ok(Loaded { config, ignored })
    }

    /// The config with every enhanced fan-out stream's consumer name filled in: the
    /// configured one, else [`default_consumer_name`] of the group. The engine reads with
    /// this, so every worker of a group (and the operator, when it deregisters) agrees on
    /// the name.
    pub fn with_consumer_names(mut self) -> Self {
        for s in &mut self.streams {
            if s.consumer.name.is_none() {
                s.consumer.name = Some(default_consumer_name(&self.group));
            }
        }
        self
    }

    /// Renders the config as YAML, the format `kcg-worker --config` reads.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Checks what the CRD's schema and CEL rules check at admission, for configs that did
    /// not come through the API server (local runs, hand-written files, env overrides).
    /// Every message starts with the field's path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.group.contains('/') {
            return invalid(format!("group: {:?} must be namespace/name", self.group));
        }
        if self.streams.is_empty() {
            return invalid("streams: at least one stream is required".into());
        }
        for (i, s) in self.streams.iter().enumerate() {
            let at = format!("streams[{i}]");
            if s.name.starts_with("arn:") {
                if !STREAM_ARN_RE.is_match(&s.name) {
                    return invalid(format!(
                        "{at}.name: malformed stream ARN {:?} (expected arn:aws:kinesis:REGION:ACCOUNT_ID:stream/NAME)",
                        s.name
                    ));
                }
            } else if !STREAM_NAME_RE.is_match(&s.name) {
                return invalid(format!(
                    "{at}.name: {:?} is not a Kinesis stream name (1-128 characters of a-z, A-Z, 0-9, _ . -) or stream ARN",
                    s.name
                ));
            }
            if self.streams[..i].iter().any(|t| t.name == s.name) {
                return invalid(format!("{at}.name: stream {:?} is listed twice", s.name));
            }
            check_target(&at, s.region.as_deref(), s.role_arn.as_deref())?;
            if let Some(name) = &s.consumer.name
                && !CONSUMER_NAME_RE.is_match(name)
            {
                return invalid(format!(
                    "{at}.consumer.name: {name:?} is not a Kinesis consumer name (1-128 characters of a-z, A-Z, 0-9, _ . -)"
                ));
            }
            if s.start_position == StartPosition::AtTimestamp && s.start_timestamp.is_none() {
                return invalid(format!(
                    "{at}.startTimestamp: startPosition AtTimestamp needs startTimestamp (an RFC 3339 time such as 2026-01-02T15:04:05Z)"
                ));
            }
        }
        let table = &self.state_store.table;
        if table.is_empty() {
            return invalid("stateStore.table: a DynamoDB table name is required".into());
        }
        if !TABLE_RE.is_match(table) {
            return invalid(format!(
                "stateStore.table: {table:?} is not a DynamoDB table name (3-255 characters of a-z, A-Z, 0-9, _ . -)"
            ));
        }
        if let Some(r) = &self.state_store.region {
            check_region("stateStore.region", r)?;
        }
        let d = &self.delivery;
        let sinks = [d.stdout.is_some(), d.http.is_some(), d.multi_lang.is_some()];
        if sinks.iter().filter(|set| **set).count() != 1 {
            return invalid("delivery: needs exactly one of stdout, http or multiLang".into());
        }
        if let Some(m) = &d.multi_lang
            && m.command.first().is_none_or(|program| program.is_empty())
        {
            return invalid(
                "delivery.multiLang.command: needs the program to run and its arguments, e.g. [python3, app.py]".into(),
            );
        }
        if let Some(h) = &self.delivery.http {
            if h.url.len() > 2048 || !HTTP_URL_RE.is_match(&h.url) {
                return invalid(format!(
                    "delivery.http.url: {:?} is not an http:// or https:// URL",
                    h.url
                ));
            }
            if h.timeout.is_zero() {
                return invalid("delivery.http.timeout: must be greater than 0s".into());
            }
            if !(1..=10_000).contains(&h.max_batch_records) {
                return invalid(
                    "delivery.http.maxBatchRecords: must be between 1 and 10000".into(),
                );
            }
        }
        self.delivery.validate_failure_policy()?;
        let t = &self.tuning;
        if t.poll_interval < Duration::from_millis(200) {
            return invalid("tuning.pollInterval: must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)".into());
        }
        if t.min_call_interval < Duration::from_millis(200) {
            return invalid("tuning.minCallInterval: must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)".into());
        }
        if !(1..=10_000).contains(&t.max_records_per_call) {
            return invalid("tuning.maxRecordsPerCall: must be between 1 and 10000".into());
        }
        if t.checkpoint_interval.is_zero() {
            return invalid("tuning.checkpointInterval: must be greater than 0s".into());
        }
        if t.heartbeat_interval < MIN_HEARTBEAT {
            return invalid("tuning.heartbeatInterval: must be at least 100ms".into());
        }
        let min_client_timeout = timing::min_client_timeout(t.heartbeat_interval);
        if t.client_timeout < min_client_timeout {
            return invalid(format!(
                "tuning.clientTimeout: must be at least {} with tuning.heartbeatInterval {} \
                 (4 x heartbeatInterval, or 2 x heartbeatInterval + 2s below 1s), so a live \
                 worker survives one failed heartbeat; set clientTimeout to {} or more, or \
                 shorten heartbeatInterval",
                duration::format(min_client_timeout),
                duration::format(t.heartbeat_interval),
                duration::format(min_client_timeout),
            ));
        }
        if t.shutdown_timeout.is_zero() {
            return invalid("tuning.shutdownTimeout: must be greater than 0s".into());
        }
        Ok(())
    }
}

/// Shortest heartbeat interval: a zero interval would spin (and `tokio::time::interval`
/// panics on it); below 100ms the state store pays for nothing.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

fn check_region(at: &str, region: &str) -> Result<(), ConfigError> {
    if region.len() > 32 || !REGION_RE.is_match(region) {
        return Err(ConfigError::Invalid(format!(
            "{at}: {region:?} is not an AWS region (expected like us-east-1)"
        )));
    }
    Ok(())
}

/// The environment overrides: `KCG__` + the field path in SCREAMING_SNAKE_CASE with `__`
/// between levels, e.g. `KCG__STATE_STORE__TABLE=other` sets `stateStore.table`. Values are
/// parsed like scalars (`500ms`, `true`, `10`); quote a value to force a string
/// (`KCG__STATE_STORE__TABLE='"123"'`).
pub fn env_overrides() -> Env {
    Env::prefixed(ENV_PREFIX)
        .split("__")
        .map(|key| {
            key.as_str()
                .split('.')
                .map(camel_case)
                .collect::<Vec<_>>()
                .join(".")
                .into()
        })
        .lowercase(false)
}

/// `POLL_INTERVAL` → `pollInterval`, the serde name of the field.
fn camel_case(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for (i, word) in segment.split('_').filter(|w| !w.is_empty()).enumerate() {
        let word = word.to_ascii_lowercase();
        let mut chars = word.chars();
        if i > 0
            && let Some(first) = chars.next()
        {
            out.push(first.to_ascii_uppercase());
            out.push_str(chars.as_str());
        } else {
            out.push_str(&word);
        }
    }
    out
}

/// `pollInterval` → `POLL_INTERVAL`, to name the variable an override came from.
fn screaming_snake(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() + 4);
    for c in segment.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// One line per problem, each starting with the field's path (`tuning.pollInterval: ...`)
/// and saying where the value came from (the file or the environment variable).
fn describe(error: figment::Error, origin: &str) -> String {
    use figment::error::Kind;
    error
        .into_iter()
        .map(|e| {
            let mut path = e.path.join(".");
            let what = match &e.kind {
                Kind::MissingField(field) => {
                    if path.is_empty() {
                        path = field.to_string();
                    } else {
                        path = format!("{path}.{field}");
                    }
                    "is required".to_owned()
                }
                kind => kind.to_string(),
            };
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let source = if from_env {
                let var: Vec<_> = e.path.iter().map(|s| screaming_snake(s)).collect();
                format!("{ENV_PREFIX}{}", var.join("__"))
            } else {
                origin.to_owned()
            };
            if path.is_empty() {
                format!("{what} (in {source})")
            } else {
                format!("{path}: {what} (in {source})")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
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
        "rule": format!("{} || {}", cel_matches(STREAM_NAME_PATTERN), cel_matches(STREAM_ARN_PATTERN)),
        "message": "name must be a Kinesis stream name (1-128 characters of a-z, A-Z, 0-9, _ . -) or a stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"
    }]))]
    pub name: String,
    /// AWS region of the stream; defaults to the worker's region (or the ARN's region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(REGION_PATTERN),
        "message": "region must look like us-east-1"
    }]))]
    pub region: Option<String>,
    /// IAM role to assume (through STS) to read this stream, for a stream in another account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(ROLE_ARN_PATTERN),
        "message": "roleArn must be an IAM role ARN: arn:aws:iam::ACCOUNT_ID:role/NAME"
    }]))]
    pub role_arn: Option<String>,
    /// Where to start reading a shard that has no checkpoint yet.
    #[serde(default)]
    pub start_position: StartPosition,
    /// RFC 3339 time to start from; required when `startPosition` is `AtTimestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<jiff::Timestamp>,
    /// How the shards are read: `Polling` (GetRecords, the default) or `EnhancedFanOut`
    /// (SubscribeToShard through a registered stream consumer).
    #[serde(default, skip_serializing_if = "ConsumerConfig::is_default")]
    pub consumer: ConsumerConfig,
}

/// How a stream is read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerConfig {
    /// `Polling` (GetRecords; shares the shard's 2 MB/s with every other reader) or
    /// `EnhancedFanOut` (SubscribeToShard: a dedicated 2 MB/s per shard for this group,
    /// records pushed within about 70 ms; billed per consumer-shard hour).
    #[serde(default)]
    pub mode: ConsumerMode,
    /// The stream consumer's name (enhanced fan-out). Default: `kcg.NAMESPACE.NAME` of the
    /// group (over 128 characters: cut, with a hash of the whole). Every worker of the group
    /// registers or reuses this one consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(CONSUMER_NAME_PATTERN),
        "message": "consumer.name must be a Kinesis consumer name: 1-128 characters of a-z, A-Z, 0-9, _ . -"
    }]))]
    pub name: Option<String>,
    /// What the operator does with the stream consumer when the KinesisConsumerGroup is
    /// deleted (enhanced fan-out only). `Retain` (the default) leaves it registered;
    /// `Deregister` removes it once the workers have stopped (a registered consumer is billed
    /// per shard-hour even when nobody reads). The workers ignore it.
    #[serde(default)]
    pub on_delete: ConsumerOnDelete,
}

impl ConsumerConfig {
    /// Whether this is the all-defaults value (left out of rendered configs).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the stream is read with enhanced fan-out.
    pub fn is_fan_out(&self) -> bool {
        self.mode == ConsumerMode::EnhancedFanOut
    }
}

/// How a stream's shards are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConsumerMode {
    /// GetRecords polling.
    #[default]
    Polling,
    /// SubscribeToShard through a registered stream consumer (enhanced fan-out).
    EnhancedFanOut,
}

/// What happens to an enhanced fan-out stream consumer when its group is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConsumerOnDelete {
    /// Leave the consumer registered.
    #[default]
    Retain,
    /// DeregisterStreamConsumer once the group's workers are gone.
    Deregister,
}

/// Longest consumer name Kinesis accepts.
const CONSUMER_NAME_MAX: usize = 128;

/// The consumer name of a group that sets none: `kcg.` + the group id with `/` turned into
/// `.` and any character Kinesis refuses into `-`. Kubernetes namespaces hold no `.`, so two
/// groups never share a name; a name over 128 characters keeps its first 119 and ends with
/// `-` and 8 hex digits of a hash of the whole (FNV-1a), so long names stay distinct.
pub fn default_consumer_name(group: &str) -> String {
    let safe: String = format!("kcg.{group}")
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') => c,
            _ => '-',
        })
        .collect();
    if safe.len() <= CONSUMER_NAME_MAX {
        return safe;
    }
    let hash = safe.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{}-{hash:08x}", &safe[..CONSUMER_NAME_MAX - 9])
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
        "rule": cel_matches(TABLE_PATTERN),
        "message": "table must be a DynamoDB table name: 3-255 characters of a-z, A-Z, 0-9, _ . -"
    }]))]
    pub table: String,
    /// AWS region of the table; defaults to the worker's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(REGION_PATTERN),
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
    "rule": "(has(self.stdout) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.multiLang) ? 1 : 0) == 1",
    "message": "delivery needs exactly one of stdout, http or multiLang"
}, {
    "rule": "!has(self.onFailure) || self.onFailure != 'DeadLetter' || has(self.deadLetter)",
    "message": "delivery.onFailure DeadLetter needs delivery.deadLetter (an sqs queue or a kinesis stream)"
}, {
    "rule": "!has(self.deadLetter) || (has(self.onFailure) && self.onFailure == 'DeadLetter')",
    "message": "delivery.deadLetter is only used with delivery.onFailure: DeadLetter; set it, or remove deadLetter"
}]))]
pub struct DeliveryConfig {
    /// Write one JSON line per record to the worker's stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
    /// POST each batch as JSON to a URL, usually a sidecar in the same pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    /// Run a KCL MultiLangDaemon record processor (amazon-kclpy, aws-kcl, ...) unchanged:
    /// one process per owned shard, speaking KCL's protocol on its stdin/stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_lang: Option<MultiLangSink>,
    /// How a batch the handler refuses is retried.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retry: RetryPolicy,
    /// What happens to a record that still fails after `retry.maxAttempts` attempts on its
    /// own: `Block` (the default) retries it without end, `Skip` drops it, `DeadLetter`
    /// writes it to `deadLetter` first.
    #[serde(default, skip_serializing_if = "OnFailure::is_block")]
    pub on_failure: OnFailure,
    /// Where `onFailure: DeadLetter` writes records that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
}

/// Retries of a refused batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts per batch (and then per record) before `onFailure` applies, 1 to 1000.
    /// With `onFailure: Block` retries go on after it, only the reason shown changes.
    #[serde(default = "defaults::max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: u32,
    /// Delay between attempts.
    #[serde(default)]
    pub backoff: BackoffConfig,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: defaults::max_attempts(),
            backoff: BackoffConfig::default(),
        }
    }
}

impl RetryPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Exponential backoff with jitter between `initial` and `max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": format!("!has(self.initial) || !has(self.max) || !self.initial.matches('{DURATION_PATTERN}') || !self.max.matches('{DURATION_PATTERN}') || duration(self.max) >= duration(self.initial)"),
    "message": "delivery.retry.backoff.max must be at least delivery.retry.backoff.initial"
}]))]
pub struct BackoffConfig {
    /// Delay after the first failure; doubles with each further one. More than 0s.
    #[serde(default = "defaults::backoff_initial", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), positive_duration_rule()]))]
    pub initial: Duration,
    /// Longest delay between two attempts.
    #[serde(default = "defaults::backoff_max", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub max: Duration,
}

impl BackoffConfig {
    /// A fresh backoff sequence with these bounds.
    pub fn start(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(self.initial, self.max)
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: defaults::backoff_initial(),
            max: defaults::backoff_max(),
        }
    }
}

/// What to do with a record that exhausted its attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnFailure {
    /// Keep retrying it; the shard waits (nothing is ever lost or skipped).
    #[default]
    Block,
    /// Drop it (counted and reported) and go on with the next record.
    Skip,
    /// Write it to `deadLetter`, then go on; the shard waits while that write fails.
    DeadLetter,
}

impl OnFailure {
    fn is_block(&self) -> bool {
        *self == OnFailure::Block
    }
}

/// The dead-letter target. Exactly one field is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.sqs) != has(self.kinesis)",
    "message": "deadLetter needs exactly one of sqs or kinesis"
}]))]
pub struct DeadLetterConfig {
    /// An SQS queue: one message per record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqs: Option<SqsTarget>,
    /// A Kinesis stream: one record per record, same partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis: Option<KinesisTarget>,
}

/// An SQS dead-letter queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqsTarget {
    /// The queue URL, for example `https://sqs.us-east-1.amazonaws.com/123456789012/orders-dlq`.
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(HTTP_URL_PATTERN),
        "message": "queueUrl must be an http:// or https:// URL"
    }]))]
    pub queue_url: String,
    /// AWS region of the queue; defaults to the worker's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(REGION_PATTERN),
        "message": "region must look like us-east-1"
    }]))]
    pub region: Option<String>,
    /// IAM role to assume (through STS) to send to the queue, for a queue in another account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(ROLE_ARN_PATTERN),
        "message": "roleArn must be an IAM role ARN: arn:aws:iam::ACCOUNT_ID:role/NAME"
    }]))]
    pub role_arn: Option<String>,
}

/// A Kinesis dead-letter stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KinesisTarget {
    /// Stream name, or stream ARN for a stream in another account or region.
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-validations" = [{
        "rule": format!("{} || {}", cel_matches(STREAM_NAME_PATTERN), cel_matches(STREAM_ARN_PATTERN)),
        "message": "stream must be a Kinesis stream name (1-128 characters of a-z, A-Z, 0-9, _ . -) or a stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"
    }]))]
    pub stream: String,
    /// AWS region of the stream; defaults to the worker's region (or the ARN's region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(REGION_PATTERN),
        "message": "region must look like us-east-1"
    }]))]
    pub region: Option<String>,
    /// IAM role to assume (through STS) to write the stream, for a stream in another account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": cel_matches(ROLE_ARN_PATTERN),
        "message": "roleArn must be an IAM role ARN: arn:aws:iam::ACCOUNT_ID:role/NAME"
    }]))]
    pub role_arn: Option<String>,
}

impl KinesisTarget {
    /// The target as a [`StreamConfig`], so the reading side's client builder (region,
    /// ARN, assumed role) serves it too.
    pub fn as_stream(&self) -> StreamConfig {
        StreamConfig {
            name: self.stream.clone(),
            region: self.region.clone(),
            role_arn: self.role_arn.clone(),
            start_position: StartPosition::default(),
            start_timestamp: None,
            consumer: ConsumerConfig::default(),
        }
    }
}

impl DeliveryConfig {
    /// The checks of `retry`, `onFailure` and `deadLetter` (the CRD's CEL rules, for configs
    /// that did not come through the API server).
    fn validate_failure_policy(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !(1..=1000).contains(&self.retry.max_attempts) {
            return invalid("delivery.retry.maxAttempts: must be between 1 and 1000");
        }
        let b = &self.retry.backoff;
        if b.initial.is_zero() {
            return invalid("delivery.retry.backoff.initial: must be greater than 0s");
        }
        if b.max < b.initial {
            return invalid(
                "delivery.retry.backoff.max: must be at least delivery.retry.backoff.initial",
            );
        }
        match (&self.on_failure, &self.dead_letter) {
            (OnFailure::DeadLetter, None) => {
                return invalid(
                    "delivery.deadLetter: onFailure DeadLetter needs a dead-letter target (deadLetter.sqs.queueUrl or deadLetter.kinesis.stream)",
                );
            }
            (OnFailure::Block | OnFailure::Skip, Some(_)) => {
                return invalid(
                    "delivery.deadLetter: only used with onFailure: DeadLetter; set it, or remove deadLetter",
                );
            }
            _ => {}
        }
        let Some(dl) = &self.dead_letter else {
            return Ok(());
        };
        match (&dl.sqs, &dl.kinesis) {
            (Some(q), None) => {
                if q.queue_url.len() > 2048 || !HTTP_URL_RE.is_match(&q.queue_url) {
                    return Err(ConfigError::Invalid(format!(
                        "delivery.deadLetter.sqs.queueUrl: {:?} is not an http:// or https:// URL",
                        q.queue_url
                    )));
                }
                check_target(
                    "delivery.deadLetter.sqs",
                    q.region.as_deref(),
                    q.role_arn.as_deref(),
                )
            }
            (None, Some(k)) => {
                if !STREAM_NAME_RE.is_match(&k.stream) && !STREAM_ARN_RE.is_match(&k.stream) {
                    return Err(ConfigError::Invalid(format!(
                        "delivery.deadLetter.kinesis.stream: {:?} is not a Kinesis stream name or stream ARN",
                        k.stream
                    )));
                }
                check_target(
                    "delivery.deadLetter.kinesis",
                    k.region.as_deref(),
                    k.role_arn.as_deref(),
                )
            }
            _ => invalid("delivery.deadLetter: needs exactly one of sqs or kinesis"),
        }
    }
}

/// Region and role of a stream or a dead-letter target.
fn check_target(at: &str, region: Option<&str>, role: Option<&str>) -> Result<(), ConfigError> {
    if let Some(r) = region {
        check_region(&format!("{at}.region"), r)?;
    }
    if let Some(role) = role
        && (role.len() > 2048 || !ROLE_ARN_RE.is_match(role))
    {
        return Err(ConfigError::Invalid(format!(
            "{at}.roleArn: malformed role ARN {role:?} (expected arn:aws:iam::ACCOUNT_ID:role/NAME)"
        )));
    }
    Ok(())
}

/// Runs `command` once per owned shard as a KCL record processor; its checkpoints are the
/// shard's checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MultiLangSink {
    /// The program and its arguments (no shell), e.g. `[python3, /app/record_processor.py]`:
    /// what KCL's `executableName` property ran. Its stderr goes to the worker log.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 4096)))]
    pub command: Vec<String>,
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
        "rule": cel_matches(HTTP_URL_PATTERN),
        "message": "url must be an http:// or https:// URL"
    }]))]
    pub url: String,
    /// How long one POST may take before it is retried. More than 0s.
    #[serde(default = "defaults::http_timeout", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), positive_duration_rule()]))]
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
    "rule": timing::cel_rule(DURATION_PATTERN),
    "message": "tuning.clientTimeout must be at least 4 x tuning.heartbeatInterval (2 x heartbeatInterval + 2s below 1s), so a live worker survives one failed heartbeat"
}]))]
pub struct Tuning {
    /// Pause before the next GetRecords on a shard whose last call returned nothing and that
    /// is not behind (never shorter than `minCallInterval`). At least 200ms. Polling only
    /// (enhanced fan-out is pushed).
    #[serde(default = "defaults::poll_interval", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), {
        "rule": format!("!self.matches('{DURATION_PATTERN}') || duration(self) >= duration('200ms')"),
        "message": "tuning.pollInterval must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)"
    }]))]
    pub poll_interval: Duration,
    /// Least time between two GetRecords calls on a shard while the reader is at the tip,
    /// whatever they returned: a shard allows 5 calls per second shared by every group
    /// reading it, and a steady trickle needs no more than one. A reader behind the tip
    /// (a full page, or records older than this interval) calls as often as the shard's
    /// limits allow, 5 per second and 2 MB/s. At least 200ms.
    #[serde(default = "defaults::min_call_interval", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), {
        "rule": format!("!self.matches('{DURATION_PATTERN}') || duration(self) >= duration('200ms')"),
        "message": "tuning.minCallInterval must be at least 200ms (Kinesis allows 5 GetRecords calls per second per shard)"
    }]))]
    pub min_call_interval: Duration,
    /// Records per GetRecords call, 1 to 10000. Polling only.
    #[serde(default = "defaults::max_records")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_records_per_call: u32,
    /// How often a shard's acknowledged position is written to the state store (only when it
    /// moved; always on release). A crash redelivers at most this much; each moving shard
    /// costs one write per interval. More than 0s.
    #[serde(default = "defaults::checkpoint_interval", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), positive_duration_rule()]))]
    pub checkpoint_interval: Duration,
    /// How often a worker heartbeats (which keeps all its leases alive) and re-plans. At least 100ms.
    #[serde(default = "defaults::heartbeat_interval", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), {
        "rule": format!("!self.matches('{DURATION_PATTERN}') || duration(self) >= duration('100ms')"),
        "message": "tuning.heartbeatInterval must be at least 100ms"
    }]))]
    pub heartbeat_interval: Duration,
    /// A client (or lease) whose counter has not moved for this long is dead (expired).
    /// At least 4 x heartbeatInterval (2 x heartbeatInterval + 2s below 1s: a state-store
    /// call may take 1s), so a live worker survives one failed heartbeat.
    #[serde(default = "defaults::client_timeout", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule()]))]
    pub client_timeout: Duration,
    /// Bound on a graceful shutdown (finish the batch, checkpoint, release, deregister). More than 0s.
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    #[schemars(with = "String", length(max = 32), extend("x-kubernetes-validations" = [duration_rule(), positive_duration_rule()]))]
    pub shutdown_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            poll_interval: defaults::poll_interval(),
            min_call_interval: defaults::min_call_interval(),
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
        "rule": cel_matches(DURATION_PATTERN),
        "message": "must be a duration such as 500ms, 5s, 1m or 1m30s"
    })
}

/// For durations where zero is unusable (a zero interval spins, a zero timeout always
/// fails). A malformed value is left to [`duration_rule`].
fn positive_duration_rule() -> serde_json::Value {
    serde_json::json!({
        "rule": format!("!self.matches('{DURATION_PATTERN}') || duration(self) > duration('0s')"),
        "message": "must be a duration greater than 0s"
    })
}

/// The CEL expression matching `self` against one of the shared patterns (none contains a
/// quote or a backslash, so it embeds as is).
fn cel_matches(pattern: &str) -> String {
    format!("self.matches('{pattern}')")
}

/// Serde for durations in the one format both CEL and the worker accept (`500ms`, `5s`,
/// `1m30s`, `1h`), so a value admitted by the API server always loads and vice versa.
mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    use super::{DURATION_MAX_LEN, DURATION_RE};

    /// Parses `500ms`, `5s`, `1m30s`, ...; `None` when malformed or too large.
    pub(super) fn parse(text: &str) -> Option<Duration> {
        if text.len() > DURATION_MAX_LEN || !DURATION_RE.is_match(text) {
            return None;
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit())?;
            let n: u64 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            let (part, unit_len) = if rest.starts_with("ms") {
                (Duration::from_millis(n), 2)
            } else if rest.starts_with('s') {
                (Duration::from_secs(n), 1)
            } else if rest.starts_with('m') {
                (Duration::from_secs(n.checked_mul(60)?), 1)
            } else {
                (Duration::from_secs(n.checked_mul(3600)?), 1)
            };
            total = total.checked_add(part)?;
            rest = &rest[unit_len..];
        }
        Some(total)
    }

    /// Renders the compact form `parse` reads back (`1m30s`, not `1m 30s`); sub-millisecond
    /// parts, which the format cannot express, are dropped.
    pub(super) fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms == 0 {
            return "0s".to_owned();
        }
        let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        let mut out = String::new();
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                out.push_str(&n.to_string());
                out.push_str(unit);
            }
        }
        out
    }

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Visitor)
    }

    fn invalid<E: serde::de::Error>(shown: impl std::fmt::Display) -> E {
        E::custom(format!(
            "invalid duration {shown} (expected like 500ms, 5s, 1m30s)"
        ))
    }

    /// Strings are parsed; a bare number (`5`) gets the same clear message, since its unit
    /// is unknown.
    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as 500ms, 5s, 1m30s")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).ok_or_else(|| invalid(format_args!("{v:?}")))
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Err(invalid(v))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(invalid(v))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(invalid(v))
        }
    }
}

/// Default values, shared by serde and the CRD schema.
pub mod defaults {
    use std::time::Duration;

    /// GetRecords pause on an idle shard.
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    /// Least gap between GetRecords calls on a shard at the tip.
    pub fn min_call_interval() -> Duration {
        Duration::from_secs(1)
    }
    /// Records per GetRecords call.
    pub fn max_records() -> u32 {
        1000
    }
    /// Checkpoint write interval per shard: one write a minute per moving shard, so a busy
    /// 1,000-shard stream costs about 27 USD a month in checkpoints (330 at 5 s), at the
    /// price of up to a minute redelivered after a crash (graceful handoffs write a final
    /// checkpoint and redeliver nothing).
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(60)
    }
    /// Heartbeat and re-plan interval.
    pub fn heartbeat_interval() -> Duration {
        Duration::from_secs(1)
    }
    /// Client and lease expiry.
    pub fn client_timeout() -> Duration {
        Duration::from_secs(4)
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
    /// Attempts before `onFailure` applies.
    pub fn max_attempts() -> u32 {
        10
    }
    /// First handler retry delay.
    pub fn backoff_initial() -> Duration {
        Duration::from_millis(200)
    }
    /// Longest handler retry delay.
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
}

#[cfg(test)]
// figment's Jail closures return its (large) Error type; nothing to shrink on our side.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const BASE: &str = "group: ns/g\nstreams: [{name: orders}]\nstateStore: {table: kcg-state}\ndelivery: {stdout: {}}\ntuning: {pollInterval: 2s, checkpointInterval: 7s}\n";

    /// Loads BASE from a file inside the jail, with the jail's environment.
    fn load_in(jail: &Jail, yaml: &str) -> Result<WorkerConfig, ConfigError> {
        let path = jail.directory().join("kcg.yaml");
        std::fs::write(&path, yaml).expect("write config");
        WorkerConfig::load(path.to_str().expect("utf-8 path"), ConfigOrigin::User).map(|l| l.config)
    }

    #[test]
    fn env_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.set_env("KCG__TUNING__POLL_INTERVAL", "500ms");
            jail.set_env("KCG__STATE_STORE__TABLE", "other");
            jail.set_env("KCG__GROUP", "ns/name");
            jail.set_env("KCG__TUNING__MAX_RECORDS_PER_CALL", "2000");
            jail.set_env("KCG__STATE_STORE__CREATE", "true");
            // Not ours: ignored.
            jail.set_env("KCG_LOG_FORMAT", "json");
            let c = load_in(jail, BASE).expect("loads");
            assert_eq!(c.group, "ns/name");
            assert_eq!(c.state_store.table, "other");
            assert!(c.state_store.create);
            assert_eq!(c.tuning.poll_interval, Duration::from_millis(500));
            assert_eq!(c.tuning.max_records_per_call, 2000);
            // Untouched file values and defaults stay.
            assert_eq!(c.tuning.checkpoint_interval, Duration::from_secs(7));
            assert_eq!(c.tuning.heartbeat_interval, defaults::heartbeat_interval());
            assert_eq!(c.streams[0].name, "orders");
            Ok(())
        });
    }

    #[test]
    fn without_env_the_file_wins_and_from_yaml_ignores_env() {
        Jail::expect_with(|jail| {
            let c = load_in(jail, BASE).expect("loads");
            assert_eq!(c.tuning.poll_interval, Duration::from_secs(2));
            assert_eq!(c.state_store.table, "kcg-state");
            jail.set_env("KCG__STATE_STORE__TABLE", "other");
            let c = WorkerConfig::from_yaml(BASE).expect("parses");
            assert_eq!(
                c.state_store.table, "kcg-state",
                "the operator's path takes no env"
            );
            // A quoted value stays a string even when it looks like a number.
            jail.set_env("KCG__STATE_STORE__TABLE", "\"12345\"");
            assert_eq!(
                load_in(jail, BASE).expect("loads").state_store.table,
                "12345"
            );
            Ok(())
        });
    }

    #[test]
    fn env_errors_name_the_field_and_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("KCG__TUNING__POLL_INTERVAL", "5x");
            let e = load_in(jail, BASE).unwrap_err().to_string();
            assert!(
                e.contains(
                    r#"tuning.pollInterval: invalid duration "5x" (expected like 500ms, 5s, 1m30s)"#
                ),
                "{e}"
            );
            assert!(e.contains("KCG__TUNING__POLL_INTERVAL"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            // An override is validated like the file.
            jail.set_env("KCG__TUNING__HEARTBEAT_INTERVAL", "0s");
            let e = load_in(jail, BASE).unwrap_err().to_string();
            assert!(
                e.contains("tuning.heartbeatInterval: must be at least 100ms"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_fields_fail_except_an_operator_files_own() {
        let typo = BASE.replace("{name: orders}", "{name: orders, startPositon: Latest}");
        Jail::expect_with(|jail| {
            let e = load_in(jail, &typo).unwrap_err().to_string();
            assert!(
                e.contains(
                    "streams[0].startPositon: unknown field (did you mean startPosition?) (in "
                ),
                "{e}"
            );
            // The same file rendered by the operator: loaded, the field reported.
            let path = jail.directory().join("kcg.yaml");
            let loaded = WorkerConfig::load(path.to_str().expect("utf-8"), ConfigOrigin::Operator)
                .expect("an operator file with a newer field loads");
            assert_eq!(loaded.config.streams[0].name, "orders");
            let ignored: Vec<_> = loaded.ignored.iter().map(|u| u.path.as_str()).collect();
            assert_eq!(ignored, ["streams[0].startPositon"]);
            // A known-field file has nothing to report.
            load_in(jail, BASE).expect("loads");
            Ok(())
        });
        Jail::expect_with(|jail| {
            // An override is the user's even on an operator pod: always an error.
            jail.set_env("KCG__TUNING__POLL_INTERVALL", "5s");
            let path = jail.directory().join("kcg.yaml");
            std::fs::write(&path, BASE).expect("write");
            for origin in [ConfigOrigin::User, ConfigOrigin::Operator] {
                let e = WorkerConfig::load(path.to_str().expect("utf-8"), origin)
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains("tuning.pollIntervall: unknown field (did you mean pollInterval?) (in KCG__TUNING__POLL_INTERVALL)"),
                    "{origin:?}: {e}"
                );
            }
            Ok(())
        });
    }

    /// Each invalid config, then a fragment of the expected message.
    #[test]
    fn each_invalid_config_names_its_field() {
        let cases: Vec<(String, &str)> = vec![
            (
                "group: ns/g\nstreams: []\nstateStore: {table: t12}\ndelivery: {stdout: {}}\n".into(),
                "streams: at least one stream is required",
            ),
            (
                "group: g\nstreams: [{name: s}]\nstateStore: {table: t12}\ndelivery: {stdout: {}}\n".into(),
                "group: \"g\" must be namespace/name",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {}\ndelivery: {stdout: {}}\n".into(),
                "stateStore.table: is required",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: \"\"}\ndelivery: {stdout: {}}\n".into(),
                "stateStore.table: a DynamoDB table name is required",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: ab}\ndelivery: {stdout: {}}\n".into(),
                "stateStore.table: \"ab\" is not a DynamoDB table name",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc, region: Virginia}\ndelivery: {stdout: {}}\n".into(),
                "stateStore.region: \"Virginia\" is not an AWS region",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\n".into(),
                "delivery: is required",
            ),
            (
                "group: ns/g\nstreams: [{name: \"arn:aws:kinesis:us-east-1:1234:stream/o\"}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[0].name: malformed stream ARN",
            ),
            (
                "group: ns/g\nstreams: [{name: s}, {name: \"a b\"}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[1].name: \"a b\" is not a Kinesis stream name",
            ),
            (
                "group: ns/g\nstreams: [{name: s}, {name: s}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[1].name: stream \"s\" is listed twice",
            ),
            (
                "group: ns/g\nstreams: [{name: s, roleArn: \"arn:aws:iam::123:role/r\"}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[0].roleArn: malformed role ARN",
            ),
            (
                "group: ns/g\nstreams: [{name: s, region: us_east_1}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[0].region: \"us_east_1\" is not an AWS region",
            ),
            (
                "group: ns/g\nstreams: [{name: s, startPosition: AtTimestamp}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[0].startTimestamp: startPosition AtTimestamp needs startTimestamp",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {stdout: {}, http: {url: \"http://x\"}}\n".into(),
                "delivery: needs exactly one of stdout, http or multiLang",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {stdout: {}, multiLang: {command: [python3, app.py]}}\n".into(),
                "delivery: needs exactly one of stdout, http or multiLang",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {}\n".into(),
                "delivery: needs exactly one of stdout, http or multiLang",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {multiLang: {command: []}}\n".into(),
                "delivery.multiLang.command: needs the program to run",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {multiLang: {command: [\"\", app.py]}}\n".into(),
                "delivery.multiLang.command: needs the program to run",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {multiLang: {}}\n".into(),
                "delivery.multiLang.command: is required",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {http: {url: \"localhost:9000\"}}\n".into(),
                "delivery.http.url: \"localhost:9000\" is not an http:// or https:// URL",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {http: {url: \"http://x\", timeout: 0s}}\n".into(),
                "delivery.http.timeout: must be greater than 0s",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {http: {url: \"http://x\", maxBatchRecords: 0}}\n".into(),
                "delivery.http.maxBatchRecords: must be between 1 and 10000",
            ),
            (
                "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {http: {url: \"http://x\", timeout: 10 seconds}}\n".into(),
                "delivery.http.timeout: invalid duration \"10 seconds\"",
            ),
            (
                "group: ns/g\nstreams: [{name: s, consumer: {mode: EnhancedFanOut, name: \"a/b\"}}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams[0].consumer.name: \"a/b\" is not a Kinesis consumer name",
            ),
            (
                "group: ns/g\nstreams: [{name: s, consumer: {mode: Push}}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n".into(),
                "streams.0.consumer.mode: unknown variant: found `Push`",
            ),
            (BASE.replace("pollInterval: 2s", "pollInterval: 5x"),
                "tuning.pollInterval: invalid duration \"5x\" (expected like 500ms, 5s, 1m30s)"),
            (BASE.replace("pollInterval: 2s", "pollInterval: 5"), "tuning.pollInterval: invalid duration 5 (expected"),
            (BASE.replace("pollInterval: 2s", "pollInterval: 1.5s"), "tuning.pollInterval: invalid duration \"1.5s\""),
            (BASE.replace("pollInterval: 2s", "pollInterval: 100ms"), "tuning.pollInterval: must be at least 200ms"),
            (BASE.replace("pollInterval: 2s", "minCallInterval: 199ms"), "tuning.minCallInterval: must be at least 200ms"),
            (BASE.replace("checkpointInterval: 7s", "checkpointInterval: 0s"), "tuning.checkpointInterval: must be greater than 0s"),
            (BASE.replace("pollInterval: 2s", "heartbeatInterval: 0ms"), "tuning.heartbeatInterval: must be at least 100ms"),
            (BASE.replace("pollInterval: 2s", "heartbeatInterval: 99ms"), "tuning.heartbeatInterval: must be at least 100ms"),
            (BASE.replace("pollInterval: 2s", "heartbeatInterval: 6s"), "tuning.clientTimeout: must be at least 24s with tuning.heartbeatInterval 6s"),
            (BASE.replace("pollInterval: 2s", "heartbeatInterval: 2s, clientTimeout: 4s"), "set clientTimeout to 8s or more"),
            (BASE.replace("pollInterval: 2s", "heartbeatInterval: 100ms, clientTimeout: 2s"), "tuning.clientTimeout: must be at least 2s200ms"),
            (BASE.replace("pollInterval: 2s", "shutdownTimeout: 0s"), "tuning.shutdownTimeout: must be greater than 0s"),
            (BASE.replace("pollInterval: 2s", "maxRecordsPerCall: 10001"), "tuning.maxRecordsPerCall: must be between 1 and 10000"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter}"),
                "delivery.deadLetter: onFailure DeadLetter needs a dead-letter target"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, deadLetter: {sqs: {queueUrl: \"https://q\"}}}"),
                "delivery.deadLetter: only used with onFailure: DeadLetter"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: Skip, deadLetter: {sqs: {queueUrl: \"https://q\"}}}"),
                "delivery.deadLetter: only used with onFailure: DeadLetter"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {}}"),
                "delivery.deadLetter: needs exactly one of sqs or kinesis"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {sqs: {queueUrl: \"https://q\"}, kinesis: {stream: dlq}}}"),
                "delivery.deadLetter: needs exactly one of sqs or kinesis"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {sqs: {queueUrl: \"sqs/q\"}}}"),
                "delivery.deadLetter.sqs.queueUrl: \"sqs/q\" is not an http:// or https:// URL"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {sqs: {queueUrl: \"https://q\", region: EU}}}"),
                "delivery.deadLetter.sqs.region: \"EU\" is not an AWS region"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {kinesis: {stream: \"a b\"}}}"),
                "delivery.deadLetter.kinesis.stream: \"a b\" is not a Kinesis stream name"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: DeadLetter, deadLetter: {kinesis: {stream: dlq, roleArn: \"arn:aws:iam::1:role/r\"}}}"),
                "delivery.deadLetter.kinesis.roleArn: malformed role ARN"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, onFailure: Drop}"),
                "delivery.onFailure: unknown variant: found `Drop`, expected `one of `Block`, `Skip`, `DeadLetter``"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, retry: {maxAttempts: 0}}"),
                "delivery.retry.maxAttempts: must be between 1 and 1000"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, retry: {backoff: {initial: 0s}}}"),
                "delivery.retry.backoff.initial: must be greater than 0s"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, retry: {backoff: {initial: 5s, max: 1s}}}"),
                "delivery.retry.backoff.max: must be at least delivery.retry.backoff.initial"),
            (BASE.replace("{stdout: {}}", "{stdout: {}, retry: {backoff: {initial: 1.5s}}}"),
                "delivery.retry.backoff.initial: invalid duration \"1.5s\""),
        ];
        for (yaml, want) in cases {
            let e = WorkerConfig::from_yaml(&yaml)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{yaml}\nwant {want:?}\ngot  {e}");
        }
    }

    #[test]
    fn valid_configs_load() {
        for yaml in [
            BASE.to_owned(),
            "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: abc}\ndelivery: {multiLang: {command: [node, processor.js]}}\n".to_owned(),
            "group: ns/g\nstreams: [{name: \"arn:aws:kinesis:eu-west-1:123456789012:stream/o\", roleArn: \"arn:aws:iam::123456789012:role/reader\", region: eu-west-1}]\nstateStore: {table: abc, region: us-gov-west-1}\ndelivery: {http: {url: \"https://sink.example.com/r\", timeout: 1m30s}}\ntuning: {heartbeatInterval: 100ms, clientTimeout: 2s200ms}\n".to_owned(),
        ] {
            WorkerConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }

    #[test]
    fn failure_policy_defaults_and_round_trip() {
        let c = WorkerConfig::from_yaml(BASE).expect("parses");
        assert_eq!(c.delivery.on_failure, OnFailure::Block);
        assert_eq!(c.delivery.retry.max_attempts, 10);
        assert_eq!(c.delivery.retry.backoff.initial, Duration::from_millis(200));
        assert_eq!(c.delivery.retry.backoff.max, Duration::from_secs(30));
        // Defaults are not rendered: an existing group's worker config stays byte-identical.
        assert!(!c.to_yaml().expect("renders").contains("retry"));
        let yaml = BASE.replace(
            "{stdout: {}}",
            "{stdout: {}, retry: {maxAttempts: 3, backoff: {initial: 50ms, max: 2s}}, onFailure: DeadLetter, deadLetter: {kinesis: {stream: \"arn:aws:kinesis:eu-west-1:123456789012:stream/dlq\", roleArn: \"arn:aws:iam::123456789012:role/w\"}}}",
        );
        let c = WorkerConfig::from_yaml(&yaml).expect("parses");
        assert_eq!(c.delivery.retry.max_attempts, 3);
        assert_eq!(c.delivery.retry.backoff.max, Duration::from_secs(2));
        assert_eq!(c.delivery.on_failure, OnFailure::DeadLetter);
        let back = WorkerConfig::from_yaml(&c.to_yaml().expect("renders")).expect("re-parses");
        assert_eq!(back, c);
    }

    #[test]
    fn durations_round_trip_in_the_cel_format() {
        for (text, d) in [
            ("500ms", Duration::from_millis(500)),
            ("5s", Duration::from_secs(5)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(duration::parse(text), Some(d), "{text}");
            assert_eq!(duration::format(d), text);
        }
        // Accepted although not canonical.
        assert_eq!(duration::parse("90s"), Some(Duration::from_secs(90)));
        assert_eq!(
            duration::parse("1s500ms"),
            Some(Duration::from_millis(1500))
        );
        for bad in [
            "",
            "5",
            "5 s",
            "1.5s",
            "-1s",
            "5sec",
            "1d",
            "99999999999999999999h",
        ] {
            assert_eq!(duration::parse(bad), None, "{bad:?}");
        }
        let c = WorkerConfig::from_yaml(BASE).expect("parses");
        let back = WorkerConfig::from_yaml(&c.to_yaml().expect("renders")).expect("re-parses");
        assert_eq!(back, c);
    }

    #[test]
    fn consumer_names() {
        // (group, want)
        let cases = [
            ("default/orders", "kcg.default.orders".to_owned()),
            ("ns/a.b", "kcg.ns.a.b".to_owned()),
            ("ns/a b+c", "kcg.ns.a-b-c".to_owned()),
        ];
        for (group, want) in cases {
            assert_eq!(default_consumer_name(group), want, "{group}");
        }
        let long = format!("ns/{}", "x".repeat(200));
        let other = format!("ns/{}y", "x".repeat(199));
        let (a, b) = (default_consumer_name(&long), default_consumer_name(&other));
        assert_eq!(a.len(), 128);
        assert!(CONSUMER_NAME_RE.is_match(&a), "{a}");
        assert_ne!(a, b, "cut names of different groups stay distinct");
        assert_eq!(a, default_consumer_name(&long), "stable");

        let yaml = "group: ns/g\nstreams: [{name: s, consumer: {mode: EnhancedFanOut}}, {name: t, consumer: {mode: EnhancedFanOut, name: mine}}, {name: u}]\nstateStore: {table: abc}\ndelivery: {stdout: {}}\n";
        let c = WorkerConfig::from_yaml(yaml).unwrap().with_consumer_names();
        let names: Vec<_> = c
            .streams
            .iter()
            .map(|s| s.consumer.name.as_deref())
            .collect();
        assert_eq!(names, [Some("kcg.ns.g"), Some("mine"), Some("kcg.ns.g")]);
        assert!(c.streams[0].consumer.is_fan_out() && !c.streams[2].consumer.is_fan_out());
        // A polling stream's defaults stay out of the rendered config.
        let polling = WorkerConfig::from_yaml(yaml).unwrap();
        assert!(!polling.to_yaml().unwrap().contains("name: u\n  consumer"));
    }

    #[test]
    fn camel_and_snake_case() {
        assert_eq!(camel_case("POLL_INTERVAL"), "pollInterval");
        assert_eq!(camel_case("STATE_STORE"), "stateStore");
        assert_eq!(camel_case("GROUP"), "group");
        assert_eq!(camel_case("MAX_RECORDS_PER_CALL"), "maxRecordsPerCall");
        assert_eq!(screaming_snake("maxRecordsPerCall"), "MAX_RECORDS_PER_CALL");
    }

    /// Each CEL rule of the generated schema embeds the very pattern `validate` uses, so the
    /// admission check and the worker's check cannot drift apart.
    #[test]
    fn cel_rules_use_the_shared_patterns() {
        fn rules(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::Array(rs)) = m.get("x-kubernetes-validations") {
                        for r in rs {
                            out.push((
                                r["message"].as_str().unwrap_or_default().to_owned(),
                                r["rule"].as_str().unwrap_or_default().to_owned(),
                            ));
                        }
                    }
                    m.values().for_each(|c| rules(c, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|c| rules(c, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        for schema in [
            schemars::schema_for!(StreamConfig),
            schemars::schema_for!(StateStoreConfig),
            schemars::schema_for!(DeliveryConfig),
            schemars::schema_for!(Tuning),
        ] {
            rules(
                &serde_json::to_value(schema).expect("schema is JSON"),
                &mut all,
            );
        }
        let expect = [
            (
                "name must be a Kinesis stream name",
                vec![STREAM_NAME_PATTERN, STREAM_ARN_PATTERN],
            ),
            ("roleArn must be an IAM role ARN", vec![ROLE_ARN_PATTERN]),
            ("region must look like us-east-1", vec![REGION_PATTERN]),
            (
                "consumer.name must be a Kinesis consumer name",
                vec![CONSUMER_NAME_PATTERN],
            ),
            ("table must be a DynamoDB table name", vec![TABLE_PATTERN]),
            (
                "url must be an http:// or https:// URL",
                vec![HTTP_URL_PATTERN],
            ),
            ("must be a duration such as", vec![DURATION_PATTERN]),
            (
                "tuning.pollInterval must be at least 200ms",
                vec![DURATION_PATTERN],
            ),
            (
                "tuning.minCallInterval must be at least 200ms",
                vec![DURATION_PATTERN],
            ),
            (
                "tuning.heartbeatInterval must be at least 100ms",
                vec![DURATION_PATTERN],
            ),
            ("must be a duration greater than 0s", vec![DURATION_PATTERN]),
            (
                "delivery.retry.backoff.max must be at least",
                vec![DURATION_PATTERN],
            ),
            (
                "queueUrl must be an http:// or https:// URL",
                vec![HTTP_URL_PATTERN],
            ),
            (
                "stream must be a Kinesis stream name",
                vec![STREAM_NAME_PATTERN, STREAM_ARN_PATTERN],
            ),
            (
                "tuning.clientTimeout must be at least 4 x",
                vec![DURATION_PATTERN],
            ),
        ];
        for (message, patterns) in expect {
            let found: Vec<_> = all.iter().filter(|(m, _)| m.starts_with(message)).collect();
            assert!(!found.is_empty(), "no rule with message {message:?}");
            for (_, rule) in found {
                for p in &patterns {
                    assert!(rule.contains(&format!("'{p}'")), "{rule} lacks {p}");
                }
            }
        }
    }
}
