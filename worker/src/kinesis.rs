//! Kinesis I/O for one configured stream: client (own region / assumed role), ListShards,
//! iterators and GetRecords, and for enhanced fan-out the stream consumer (registered or
//! reused) and SubscribeToShard. Owned by the reading side; the engine only calls
//! `list_shards`, the operator only `deregister_consumer`.
//!
//! Everything here is a thin layer over the SDK. Errors are classified by the pure
//! [`classify`] function so the reader (and the engine) can decide what to do: back off,
//! take a new iterator, or report an [`ErrorKind`] that tells the user what to fix.

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::{Region, SharedCredentialsProvider};
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::event_stream::EventReceiver;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};
use aws_smithy_types::event_stream::RawMessage;

use crate::config::{StartPosition, StreamConfig};
use crate::delivery::Record;
use crate::get_records_codec::GetRecordsCodec;
use crate::kinesis_clock::KinesisClock;
use crate::position::Position;
use crate::store::schema::ShardInfo;

/// What kind of failure a Kinesis call hit; decides the reaction and the reported reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The stream does not exist in that region/account.
    StreamNotFound,
    /// The stream exists but the shard does not (trimmed past retention, or a stale id).
    ShardNotFound,
    /// The credentials may not do this (IAM policy, role trust, bad keys).
    AccessDenied,
    /// A per-shard or per-account rate limit: back off and try again.
    Throttled,
    /// The shard iterator is older than 5 minutes: get a new one.
    ExpiredIterator,
    /// Kinesis (or the network to it) failed: back off and try again.
    Unavailable,
    /// The request was malformed (bad sequence number, bad argument). Retried with backoff,
    /// since it may come from a transient state (for example a trimmed checkpoint).
    InvalidRequest,
    /// The resource is busy: a shard's previous subscription is still open, or a stream
    /// consumer is not ACTIVE yet. Retried with backoff.
    InUse,
}

impl ErrorKind {
    /// The machine-readable reason recorded in the client row and the CR status.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::StreamNotFound => "StreamNotFound",
            ErrorKind::ShardNotFound => "ShardNotFound",
            ErrorKind::AccessDenied => "AccessDenied",
            ErrorKind::Throttled => "Throttled",
            ErrorKind::ExpiredIterator => "ExpiredIterator",
            ErrorKind::Unavailable => "KinesisUnavailable",
            ErrorKind::InvalidRequest => "KinesisInvalidRequest",
            ErrorKind::InUse => "ResourceInUse",
        }
    }
}

/// Kinesis errors, classified so callers can react (back off, resume, report).
#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    /// A failed Kinesis call, with its classification and a message that says what to fix.
    #[error("{operation} on stream {stream}: {message}")]
    Call {
        /// What kind of failure; see [`ErrorKind::reason`].
        kind: ErrorKind,
        /// The Kinesis operation, e.g. `ListShards`.
        operation: &'static str,
        /// The stream as configured.
        stream: String,
        /// Human-readable detail, including the hint what to check.
        message: String,
    },
    /// Anything else (for example a malformed stream ARN in the config).
    #[error("{0}")]
    Other(String),
}

impl KinesisError {
    /// The classification; `Other` counts as [`ErrorKind::Unavailable`] (retried).
    pub fn kind(&self) -> ErrorKind {
        match self {
            KinesisError::Call { kind, .. } => *kind,
            KinesisError::Other(_) => ErrorKind::Unavailable,
        }
    }

    /// The machine-readable reason for the client row and metrics.
    pub fn reason(&self) -> &'static str {
        self.kind().reason()
    }
}

/// Maps an error code / HTTP status / error text to an [`ErrorKind`]. Pure, so the mapping
/// is table-tested; the SDK plumbing only extracts these three values.
pub fn classify(code: Option<&str>, status: Option<u16>, text: &str) -> ErrorKind {
    match code {
        Some("ResourceNotFoundException") => return ErrorKind::StreamNotFound,
        Some(
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "KMSAccessDeniedException"
            | "KMSDisabledException"
            | "KMSNotFoundException"
            | "KMSInvalidStateException",
        ) => return ErrorKind::AccessDenied,
        Some(
            "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "KMSThrottlingException"
            | "ThrottlingException",
        ) => return ErrorKind::Throttled,
        Some("ExpiredIteratorException") => return ErrorKind::ExpiredIterator,
        Some("InvalidArgumentException" | "ValidationException") => {
            return ErrorKind::InvalidRequest;
        }
        Some("ResourceInUseException") => return ErrorKind::InUse,
        Some("InternalFailureException" | "ServiceUnavailableException") => {
            return ErrorKind::Unavailable;
        }
        _ => {}
    }
    match status {
        Some(403) => return ErrorKind::AccessDenied,
        Some(429) => return ErrorKind::Throttled,
        _ => {}
    }
    // No code: a credentials failure (e.g. AssumeRole refused) surfaces as a dispatch
    // failure whose text names the provider; everything else is a network/5xx problem.
    let lower = text.to_ascii_lowercase();
    if lower.contains("credential")
        || lower.contains("assumerole")
        || lower.contains("access denied")
    {
        return ErrorKind::AccessDenied;
    }
    ErrorKind::Unavailable
}

/// A stream given as `arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`, split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamArn {
    /// The full ARN.
    pub arn: String,
    /// The region part.
    pub region: String,
    /// The account id part.
    pub account: String,
    /// The stream name.
    pub name: String,
}

/// Parses a stream ARN; `Ok(None)` for a plain stream name.
pub fn parse_stream_arn(s: &str) -> Result<Option<StreamArn>, KinesisError> {
    if !s.starts_with("arn:") {
        return Ok(None);
    }
    let bad = || {
        KinesisError::Other(format!(
            "malformed stream ARN {s:?}: expected arn:aws:kinesis:REGION:ACCOUNT:stream/NAME"
        ))
    };
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    if parts.len() != 6 || !parts[1].starts_with("aws") || parts[2] != "kinesis" {
        return Err(bad());
    }
    let (region, account, resource) = (parts[3], parts[4], parts[5]);
    let name = resource.strip_prefix("stream/").ok_or_else(bad)?;
    if region.is_empty() || account.len() != 12 || name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    Ok(Some(StreamArn {
        arn: s.to_owned(),
        region: region.to_owned(),
        account: account.to_owned(),
        name: name.to_owned(),
    }))
}

/// Where to get a shard iterator.
#[derive(Clone, Debug, PartialEq)]
pub enum IteratorStart {
    /// Right after this sequence number (resume from a checkpoint or acknowledged record).
    After(String),
    /// At this sequence number: resume inside a KPL aggregate whose first user records
    /// were acknowledged (the reader skips those again).
    At(String),
    /// Only new records.
    Latest,
    /// The oldest record still retained.
    TrimHorizon,
    /// The first record at or after this time.
    AtTimestamp(jiff::Timestamp),
}

impl IteratorStart {
    /// The start for a shard: after `checkpoint` if there is one (at its record when it
    /// stops inside an aggregate), else the stream's start position. `AtTimestamp` without
    /// a timestamp (rejected by config validation) falls back to TRIM_HORIZON, which never
    /// loses records.
    pub fn resolve(checkpoint: Option<&Position>, stream: &StreamConfig) -> Self {
        if let Some(cp) = checkpoint {
            return match cp.sub_sequence {
                None => IteratorStart::After(cp.sequence.clone()),
                Some(_) => IteratorStart::At(cp.sequence.clone()),
            };
        }
        match stream.start_position {
            StartPosition::Latest => IteratorStart::Latest,
            StartPosition::TrimHorizon => IteratorStart::TrimHorizon,
            StartPosition::AtTimestamp => match stream.start_timestamp {
                Some(t) => IteratorStart::AtTimestamp(t),
                None => IteratorStart::TrimHorizon,
            },
        }
    }
}

/// One GetRecords answer, with records already converted to the handler's [`Record`].
#[derive(Debug)]
pub struct RecordsPage {
    /// The records, in sequence order.
    pub records: Vec<Record>,
    /// The iterator for the next call; `None` when the shard is closed and fully read.
    pub next_iterator: Option<String>,
    /// How far behind the tip of the shard this answer is.
    pub millis_behind: Option<i64>,
}

/// Credentials of `role`, assumed through STS with the base (worker) credentials. A client
/// built with them caches the assumed credentials (identity cache from `base`) and
/// refreshes them before they expire.
pub async fn assumed_role(
    role: &str,
    region: &Region,
    base: &SdkConfig,
) -> SharedCredentialsProvider {
    let provider = AssumeRoleProvider::builder(role)
        .session_name("kcg-worker")
        .region(region.clone())
        .configure(base)
        .build()
        .await;
    SharedCredentialsProvider::new(provider)
}

/// A Kinesis client bound to one configured stream.
#[derive(Clone, Debug)]
pub struct StreamClient {
    /// The stream as named in the config (name or ARN).
    pub name: String,
    /// The region the client talks to.
    pub region: String,
    /// The parsed ARN when the stream was given as one (requests then carry `StreamARN`).
    pub arn: Option<StreamArn>,
    /// `name`, shared by every [`Record`] this client hands out (no per-record copy).
    shared_name: Arc<str>,
    client: Client,
    /// ListShards page size (None = service default); small values exercise paging.
    list_page_size: Option<i32>,
    /// Enhanced fan-out: the stream's ARN and the registered consumer, looked up once and
    /// shared by every shard reader of this stream (see [`StreamClient::consumer_arn`]).
    fan_out: Arc<tokio::sync::Mutex<FanOutState>>,
    /// Kinesis' clock, from the `Date` header of this client's answers.
    clock: KinesisClock,
}

/// What a [`StreamClient`] learnt about its stream for enhanced fan-out.
#[derive(Debug, Default)]
struct FanOutState {
    stream_arn: Option<String>,
    /// (consumer name, consumer ARN) once the consumer was seen ACTIVE.
    consumer: Option<(String, String)>,
}

/// The event stream of one SubscribeToShard call.
pub type ShardSubscription =
    EventReceiver<SubscribeToShardEventStream, SubscribeToShardEventStreamError>;

/// How long [`StreamClient::consumer_arn`] waits for a consumer to become ACTIVE (AWS takes
/// a few seconds) before it reports an error (the reader retries it with backoff).
pub const CONSUMER_ACTIVE_WAIT: Duration = Duration::from_secs(60);

/// Pause between two DescribeStreamConsumer calls while a consumer is being created or
/// deleted (the call allows 20 per second per stream, shared by every worker).
const CONSUMER_POLL: Duration = Duration::from_secs(1);

/// What to do about a stream consumer, given its status (`None`: not registered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerStep {
    /// ACTIVE: subscribe with it.
    Use,
    /// CREATING, or DELETING (a deregistration still in progress): ask again shortly.
    Wait,
    /// Not registered: register it (a concurrent registration by another worker answers
    /// ResourceInUse, and the next look finds theirs: every worker converges on one).
    Register,
}

/// The step for a consumer status. Pure, table-tested.
pub fn consumer_step(status: Option<&ConsumerStatus>) -> ConsumerStep {
    match status {
        None => ConsumerStep::Register,
        Some(ConsumerStatus::Active) => ConsumerStep::Use,
        Some(_) => ConsumerStep::Wait,
    }
}

impl StreamClient {
    /// Builds the client for `stream`: its region, and its role through STS AssumeRole
    /// (credentials refreshed before expiry); the base config carries the worker's own
    /// credentials and `AWS_ENDPOINT_URL_*`.
    pub async fn connect(stream: &StreamConfig, base: &SdkConfig) -> Result<Self, KinesisError> {
        let arn = parse_stream_arn(&stream.name)?;
        // An explicit region wins, then the ARN's region, then the worker's own region.
        let region = stream
            .region
            .clone()
            .or_else(|| arn.as_ref().map(|a| a.region.clone()))
            .or_else(|| base.region().map(|r| r.to_string()))
            .ok_or_else(|| {
                KinesisError::Other(format!(
                    "stream {}: no region: set spec.streams[].region or AWS_REGION",
                    stream.name
                ))
            })?;
        let region = Region::new(region);
        let clock = KinesisClock::default();
        let mut builder = aws_sdk_kinesis::config::Builder::from(base)
            .region(region.clone())
            // Decodes GetRecords pages at about half the SDK codec's CPU; errors and anything
            // unexpected still go through the SDK's deserializer.
            .interceptor(GetRecordsCodec::default())
            .interceptor(clock.interceptor())
            // A hung connection must surface as an error (retried, reported), never as a
            // reader silently waiting forever. Kinesis calls normally take milliseconds.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(15))
                    .operation_timeout(Duration::from_secs(45))
                    .build(),
            );
        if let Some(role) = &stream.role_arn {
            builder = builder.credentials_provider(assumed_role(role, &region, base).await);
        }
        Ok(Self {
            name: stream.name.clone(),
            shared_name: Arc::from(stream.name.as_str()),
            region: region.to_string(),
            arn,
            client: Client::from_conf(builder.build()),
            list_page_size: None,
            fan_out: Arc::default(),
            clock,
        })
    }

    /// Sets the ListShards page size (`MaxResults`); mainly to exercise paging in tests.
    pub fn with_list_page_size(mut self, size: i32) -> Self {
        self.list_page_size = Some(size);
        self
    }

    /// The stream name as configured, shared: what [`Record::stream`] holds.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.shared_name
    }

    /// The underlying SDK client (for tests and tools).
    pub fn sdk(&self) -> &Client {
        &self.client
    }

    /// The stream name without the ARN parts.
    pub fn stream_name(&self) -> &str {
        self.arn
            .as_ref()
            .map_or(self.name.as_str(), |a| a.name.as_str())
    }

    fn stream_name_param(&self) -> Option<String> {
        match self.arn {
            Some(_) => None,
            None => Some(self.name.clone()),
        }
    }

    fn stream_arn_param(&self) -> Option<String> {
        self.arn.as_ref().map(|a| a.arn.clone())
    }

    /// Turns an SDK error into a classified [`KinesisError`] with a message saying what
    /// to check.
    fn error<E>(
        &self,
        operation: &'static str,
        shard_id: Option<&str>,
        err: SdkError<E, aws_sdk_kinesis::config::http::HttpResponse>,
    ) -> KinesisError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let text = format!("{}", DisplayErrorContext(&err));
        self.classified(operation, shard_id, code.as_deref(), status, text)
    }

    /// The error of an open subscription's event stream (an exception event, or the
    /// connection failing), classified like a call's.
    pub fn subscription_error(
        &self,
        shard_id: &str,
        err: SdkError<SubscribeToShardEventStreamError, RawMessage>,
    ) -> KinesisError {
        let code = err.code().map(str::to_owned);
        let text = format!("{}", DisplayErrorContext(&err));
        self.classified(
            "SubscribeToShard",
            Some(shard_id),
            code.as_deref(),
            None,
            text,
        )
    }

    /// A [`KinesisError`] for an error code / HTTP status / text, with a message saying what
    /// to check.
    fn classified(
        &self,
        operation: &'static str,
        shard_id: Option<&str>,
        code: Option<&str>,
        status: Option<u16>,
        text: String,
    ) -> KinesisError {
        let mut kind = classify(code, status, &text);
        // "Not found" naming the shard (not the stream): the stream is there.
        if kind == ErrorKind::StreamNotFound && shard_id.is_some_and(|s| text.contains(s)) {
            kind = ErrorKind::ShardNotFound;
        }
        let message = match kind {
            ErrorKind::ShardNotFound => format!(
                "shard {} of stream {} not found in region {} (expired past retention, or the shard list is stale) ({text})",
                shard_id.unwrap_or_default(),
                self.stream_name(),
                self.region
            ),
            ErrorKind::StreamNotFound => format!(
                "stream {} not found in region {}: check spec.streams[].name/region ({text})",
                self.stream_name(),
                self.region
            ),
            ErrorKind::AccessDenied => format!(
                "access denied to stream {} in region {}: check the worker's IAM role / roleArn ({text})",
                self.stream_name(),
                self.region
            ),
            ErrorKind::Throttled => format!(
                "stream {} in region {} is over its read limits (per shard 5 GetRecords calls/s and 2 MB/s, shared by every group reading it; per account, 100 ListShards or GetShardIterator calls/s): raise tuning.minCallInterval or add shards ({text})",
                self.stream_name(),
                self.region
            ),
            _ => text,
        };
        KinesisError::Call {
            kind,
            operation,
            stream: self.name.clone(),
            message,
        }
    }

    /// PutRecords of `entries` (at most 500, 5 MiB together). Per entry, in order: `None`
    /// when written, else the entry's error (`code: message`), to be retried by the caller.
    pub async fn put_records(
        &self,
        entries: Vec<aws_sdk_kinesis::types::PutRecordsRequestEntry>,
    ) -> Result<Vec<Option<String>>, KinesisError> {
        let out = self
            .client
            .put_records()
            .set_stream_name(self.stream_name_param())
            .set_stream_arn(self.stream_arn_param())
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|e| self.error("PutRecords", None, e))?;
        Ok(out
            .records()
            .iter()
            .map(|r| {
                r.error_code()
                    .map(|code| format!("{code}: {}", r.error_message().unwrap_or_default()))
            })
            .collect())
    }

    /// Every shard of the stream (ListShards with paging), sorted by shard id.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, KinesisError> {
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            // The first call names the stream; follow-ups carry only NextToken (Kinesis
            // rejects both together).
            let req = match &next_token {
                None => self
                    .client
                    .list_shards()
                    .set_stream_name(self.stream_name_param())
                    .set_stream_arn(self.stream_arn_param()),
                Some(token) => self.client.list_shards().next_token(token),
            };
            let out = req
                .set_max_results(self.list_page_size)
                .send()
                .await
                .map_err(|e| self.error("ListShards", None, e))?;
            for s in out.shards() {
                shards.push(ShardInfo {
                    shard_id: s.shard_id().to_owned(),
                    parent: s.parent_shard_id().map(str::to_owned),
                    adjacent_parent: s.adjacent_parent_shard_id().map(str::to_owned),
                    closed: s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some(),
                    starting_sequence: s
                        .sequence_number_range()
                        .map(|r| r.starting_sequence_number().to_owned()),
                });
            }
            match out.next_token() {
                Some(t) if !t.is_empty() => next_token = Some(t.to_owned()),
                _ => break,
            }
        }
        shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        shards.dedup_by(|a, b| a.shard_id == b.shard_id);
        Ok(shards)
    }

    /// Now on Kinesis' clock (Unix ms), as this client's last answer told it; `None` before
    /// the first answer (see [`StreamClient::sync_clock`]).
    pub fn kinesis_now_ms(&self) -> Option<i64> {
        self.clock.now_ms(crate::store::now_ms())
    }

    /// Asks Kinesis once (a ListShards page of one shard) unless an answer already told its
    /// clock.
    pub async fn sync_clock(&self) -> Result<(), KinesisError> {
        if self.kinesis_now_ms().is_some() {
            return Ok(());
        }
        self.client
            .list_shards()
            .set_stream_name(self.stream_name_param())
            .set_stream_arn(self.stream_arn_param())
            .max_results(1)
            .send()
            .await
            .map_err(|e| self.error("ListShards", None, e))?;
        Ok(())
    }

    /// GetShardIterator for `shard_id` at `start`.
    pub async fn shard_iterator(
        &self,
        shard_id: &str,
        start: &IteratorStart,
    ) -> Result<String, KinesisError> {
        let mut req = self
            .client
            .get_shard_iterator()
            .set_stream_name(self.stream_name_param())
            .set_stream_arn(self.stream_arn_param())
            .shard_id(shard_id);
        req = match start {
            IteratorStart::After(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            IteratorStart::At(seq) => req
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(seq),
            IteratorStart::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            IteratorStart::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            IteratorStart::AtTimestamp(t) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(
                    aws_sdk_kinesis::primitives::DateTime::from_nanos(t.as_nanosecond()).map_err(
                        |e| KinesisError::Other(format!("startTimestamp {t} out of range: {e}")),
                    )?,
                ),
        };
        let out = req
            .send()
            .await
            .map_err(|e| self.error("GetShardIterator", Some(shard_id), e))?;
        out.shard_iterator.ok_or_else(|| KinesisError::Call {
            kind: ErrorKind::Unavailable,
            operation: "GetShardIterator",
            stream: self.name.clone(),
            message: format!("no iterator returned for shard {shard_id}"),
        })
    }

    /// One GetRecords call. Records are moved out of the SDK answer (no payload copy); the
    /// stream name and `shard_id` are shared by every record, so the conversion allocates
    /// nothing per record beyond the output vector.
    pub async fn get_records(
        &self,
        shard_id: &Arc<str>,
        iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage, KinesisError> {
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .set_stream_arn(self.stream_arn_param())
            .limit(limit.clamp(1, 10_000) as i32)
            .send()
            .await
            .map_err(|e| self.error("GetRecords", Some(shard_id), e))?;
        let millis_behind = out.millis_behind_latest;
        let next_iterator = out.next_shard_iterator;
        let records = self.records(shard_id, out.records);
        Ok(RecordsPage {
            records,
            next_iterator,
            millis_behind,
        })
    }

    /// Kinesis records (from GetRecords or a SubscribeToShard event) as the handler's
    /// [`Record`]s: payloads moved, stream name and shard id shared.
    pub fn records(
        &self,
        shard_id: &Arc<str>,
        records: Vec<aws_sdk_kinesis::types::Record>,
    ) -> Vec<Record> {
        records
            .into_iter()
            .map(|r| Record {
                stream: Arc::clone(&self.shared_name),
                shard_id: Arc::clone(shard_id),
                sequence: r.sequence_number,
                sub_sequence: None,
                // Required by Kinesis; the SDK types it optional since its schema-based codec.
                partition_key: r.partition_key.unwrap_or_default(),
                explicit_hash_key: None,
                data: r.data.into_inner(),
                arrival: r
                    .approximate_arrival_timestamp
                    .and_then(|t| jiff::Timestamp::new(t.secs(), t.subsec_nanos() as i32).ok()),
            })
            .collect()
    }

    // -------------------------------------------------------------- enhanced fan-out

    /// The stream's ARN: from the config when it was given as one, else DescribeStreamSummary
    /// (once).
    async fn stream_arn(&self, state: &mut FanOutState) -> Result<String, KinesisError> {
        if let Some(a) = self
            .arn
            .as_ref()
            .map(|a| a.arn.clone())
            .or_else(|| state.stream_arn.clone())
        {
            return Ok(a);
        }
        let out = self
            .client
            .describe_stream_summary()
            .stream_name(&self.name)
            .send()
            .await
            .map_err(|e| self.error("DescribeStreamSummary", None, e))?;
        let arn = out
            .stream_description_summary
            .map(|d| d.stream_arn)
            .ok_or_else(|| KinesisError::Call {
                kind: ErrorKind::Unavailable,
                operation: "DescribeStreamSummary",
                stream: self.name.clone(),
                message: "no stream description returned".into(),
            })?;
        state.stream_arn = Some(arn.clone());
        Ok(arn)
    }

    /// The ARN of the stream consumer `name`, registered if it is not yet, once it is ACTIVE.
    /// Looked up once per client: concurrent callers (the stream's shard readers) wait for
    /// the first. Several workers doing this at once converge on one consumer: a
    /// registration that finds it already registered (ResourceInUse) looks it up instead.
    pub async fn consumer_arn(&self, name: &str) -> Result<String, KinesisError> {
        let mut state = self.fan_out.lock().await;
        if let Some((n, arn)) = &state.consumer
            && n == name
        {
            return Ok(arn.clone());
        }
        let stream_arn = self.stream_arn(&mut state).await?;
        let deadline = tokio::time::Instant::now() + CONSUMER_ACTIVE_WAIT;
        loop {
            let described = self
                .client
                .describe_stream_consumer()
                .stream_arn(&stream_arn)
                .consumer_name(name)
                .send()
                .await;
            let found = match described {
                Ok(out) => out
                    .consumer_description
                    .map(|d| (d.consumer_arn, d.consumer_status)),
                Err(e) if e.code() == Some("ResourceNotFoundException") => None,
                Err(e) => return Err(self.error("DescribeStreamConsumer", None, e)),
            };
            let status = found.as_ref().map(|(_, s)| s.clone());
            match (consumer_step(status.as_ref()), found) {
                (ConsumerStep::Use, Some((arn, _))) => {
                    tracing::info!(stream = %self.name, consumer = name, arn = %arn, "stream consumer is active");
                    state.consumer = Some((name.to_owned(), arn.clone()));
                    return Ok(arn);
                }
                (ConsumerStep::Register, _) => {
                    match self
                        .client
                        .register_stream_consumer()
                        .stream_arn(&stream_arn)
                        .consumer_name(name)
                        .send()
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(stream = %self.name, consumer = name, "registered the stream consumer")
                        }
                        // Another worker registered it meanwhile: the next look finds it.
                        Err(e) if e.code() == Some("ResourceInUseException") => {}
                        Err(e) => return Err(self.error("RegisterStreamConsumer", None, e)),
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KinesisError::Call {
                    kind: ErrorKind::Unavailable,
                    operation: "DescribeStreamConsumer",
                    stream: self.name.clone(),
                    message: format!(
                        "stream consumer {name} of stream {} is not ACTIVE after {}s (last status: {})",
                        self.stream_name(),
                        CONSUMER_ACTIVE_WAIT.as_secs(),
                        status.map_or("not registered".into(), |s| s.as_str().to_owned()),
                    ),
                });
            }
            // A new consumer takes a few seconds to become ACTIVE: look again after a pause
            // (which also keeps a registration race from spinning).
            tokio::time::sleep(CONSUMER_POLL).await;
        }
    }

    /// Forgets the consumer looked up by [`StreamClient::consumer_arn`] (it was deregistered
    /// behind our back): the next call looks it up, or registers it, again.
    pub async fn forget_consumer(&self) {
        self.fan_out.lock().await.consumer = None;
    }

    /// SubscribeToShard: the event stream of `shard_id` from `start`, for the consumer
    /// `consumer_arn`. It lasts up to 5 minutes.
    pub async fn subscribe(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        start: &IteratorStart,
    ) -> Result<ShardSubscription, KinesisError> {
        let position = match start {
            IteratorStart::After(seq) => StartingPosition::builder()
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            IteratorStart::At(seq) => StartingPosition::builder()
                .r#type(ShardIteratorType::AtSequenceNumber)
                .sequence_number(seq),
            IteratorStart::Latest => StartingPosition::builder().r#type(ShardIteratorType::Latest),
            IteratorStart::TrimHorizon => {
                StartingPosition::builder().r#type(ShardIteratorType::TrimHorizon)
            }
            IteratorStart::AtTimestamp(t) => StartingPosition::builder()
                .r#type(ShardIteratorType::AtTimestamp)
                .timestamp(
                    aws_sdk_kinesis::primitives::DateTime::from_nanos(t.as_nanosecond()).map_err(
                        |e| KinesisError::Other(format!("startTimestamp {t} out of range: {e}")),
                    )?,
                ),
        }
        .build()
        .map_err(|e| KinesisError::Other(format!("SubscribeToShard starting position: {e}")))?;
        let out = self
            .client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard_id)
            .starting_position(position)
            .send()
            .await
            .map_err(|e| self.error("SubscribeToShard", Some(shard_id), e))?;
        Ok(out.event_stream)
    }

    /// DeregisterStreamConsumer for the consumer `name` of this stream. `Ok(false)` when
    /// there was none (already deregistered, or the stream is gone).
    pub async fn deregister_consumer(&self, name: &str) -> Result<bool, KinesisError> {
        let mut state = self.fan_out.lock().await;
        let stream_arn = match self.stream_arn(&mut state).await {
            Ok(a) => a,
            Err(e) if e.kind() == ErrorKind::StreamNotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        state.consumer = None;
        match self
            .client
            .deregister_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
            Err(e) => Err(self.error("DeregisterStreamConsumer", None, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let cases: &[(Option<&str>, Option<u16>, &str, ErrorKind)] = &[
            (
                Some("ResourceNotFoundException"),
                Some(400),
                "",
                ErrorKind::StreamNotFound,
            ),
            (
                Some("AccessDeniedException"),
                Some(400),
                "",
                ErrorKind::AccessDenied,
            ),
            (
                Some("UnrecognizedClientException"),
                Some(400),
                "",
                ErrorKind::AccessDenied,
            ),
            (
                Some("ProvisionedThroughputExceededException"),
                Some(400),
                "",
                ErrorKind::Throttled,
            ),
            (
                Some("LimitExceededException"),
                Some(400),
                "",
                ErrorKind::Throttled,
            ),
            (
                Some("KMSThrottlingException"),
                Some(400),
                "",
                ErrorKind::Throttled,
            ),
            (
                Some("ExpiredIteratorException"),
                Some(400),
                "",
                ErrorKind::ExpiredIterator,
            ),
            (
                Some("InvalidArgumentException"),
                Some(400),
                "",
                ErrorKind::InvalidRequest,
            ),
            (
                Some("ResourceInUseException"),
                Some(400),
                "",
                ErrorKind::InUse,
            ),
            (
                Some("InternalFailureException"),
                Some(500),
                "",
                ErrorKind::Unavailable,
            ),
            (None, Some(500), "internal error", ErrorKind::Unavailable),
            (None, Some(503), "", ErrorKind::Unavailable),
            (None, Some(403), "", ErrorKind::AccessDenied),
            (None, Some(429), "", ErrorKind::Throttled),
            (
                None,
                None,
                "dispatch failure: connection refused",
                ErrorKind::Unavailable,
            ),
            (
                None,
                None,
                "failed to load credentials from AssumeRoleProvider",
                ErrorKind::AccessDenied,
            ),
        ];
        for (code, status, text, want) in cases {
            assert_eq!(
                classify(*code, *status, text),
                *want,
                "{code:?} {status:?} {text}"
            );
        }
    }

    #[test]
    fn consumer_step_table() {
        let cases = [
            (None, ConsumerStep::Register),
            (Some(ConsumerStatus::Active), ConsumerStep::Use),
            (Some(ConsumerStatus::Creating), ConsumerStep::Wait),
            (Some(ConsumerStatus::Deleting), ConsumerStep::Wait),
        ];
        for (status, want) in cases {
            assert_eq!(consumer_step(status.as_ref()), want, "{status:?}");
        }
    }

    #[test]
    fn parse_arn_table() {
        let ok = parse_stream_arn("arn:aws:kinesis:eu-west-1:123456789012:stream/orders")
            .unwrap()
            .unwrap();
        assert_eq!(ok.region, "eu-west-1");
        assert_eq!(ok.account, "123456789012");
        assert_eq!(ok.name, "orders");
        assert_eq!(parse_stream_arn("orders").unwrap(), None);
        for bad in [
            "arn:aws:kinesis:eu-west-1:123:stream/orders",
            "arn:aws:sqs:eu-west-1:123456789012:stream/orders",
            "arn:aws:kinesis:eu-west-1:123456789012:table/orders",
            "arn:aws:kinesis::123456789012:stream/orders",
            "arn:aws:kinesis:eu-west-1:123456789012:stream/",
        ] {
            assert!(parse_stream_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn iterator_start_resolution() {
        let mut s: StreamConfig = serde_yaml::from_str("name: s").unwrap();
        assert_eq!(
            IteratorStart::resolve(Some(&Position::whole("42")), &s),
            IteratorStart::After("42".into())
        );
        assert_eq!(
            IteratorStart::resolve(Some(&Position::sub("42", 3)), &s),
            IteratorStart::At("42".into())
        );
        assert_eq!(IteratorStart::resolve(None, &s), IteratorStart::Latest);
        s.start_position = StartPosition::TrimHorizon;
        assert_eq!(IteratorStart::resolve(None, &s), IteratorStart::TrimHorizon);
        s.start_position = StartPosition::AtTimestamp;
        assert_eq!(IteratorStart::resolve(None, &s), IteratorStart::TrimHorizon);
        let t: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        s.start_timestamp = Some(t);
        assert_eq!(
            IteratorStart::resolve(None, &s),
            IteratorStart::AtTimestamp(t)
        );
    }
}
