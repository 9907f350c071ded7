//! The dead-letter target: where `onFailure: DeadLetter` writes poison records, an SQS queue
//! or a Kinesis stream. The envelope and the batching under each service's limits are pure
//! functions (tested below); [`DeadLetterWriter`] is the thin I/O around them.
//!
//! The envelope (one JSON object per record, the SQS message body or the Kinesis record's
//! data; documented in README.md, "Poison records"):
//!
//! ```json
//! {"kcgDeadLetter": 1, "group": "shop/orders", "stream": "orders",
//!  "shard": "shardId-000000000001", "sequence": "4959...", "partitionKey": "customer-7",
//!  "arrival": "2026-11-28T17:44:39.5Z", "attempts": 10,
//!  "error": "POST http://localhost:9000/records answered 500 ...",
//!  "deadLetteredAt": "2026-11-28T17:45:02Z", "dataBytes": 5, "data": "aGVsbG8="}
//! ```
//!
//! A payload too large for the target's message limit is left out (`data` null,
//! `dataOmitted` true); the coordinates still find it in the source stream while it is
//! within retention.

use std::ops::Range;
use std::sync::Arc;

use aws_config::SdkConfig;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use serde::Serialize;

use super::Record;
use crate::config::{DeadLetterConfig, KinesisTarget, SqsTarget};
use crate::kinesis::{StreamClient, assumed_role};

/// Version of the envelope format, its `kcgDeadLetter` field.
pub const ENVELOPE_VERSION: u32 = 1;

/// SQS: most entries in one SendMessageBatch.
pub const SQS_MAX_ENTRIES: usize = 10;
/// SQS: largest message body, and largest SendMessageBatch (all bodies together).
pub const SQS_MAX_BYTES: usize = 256 * 1024;
/// Kinesis: most records in one PutRecords.
pub const KINESIS_MAX_ENTRIES: usize = 500;
/// Kinesis: largest record (data plus partition key).
pub const KINESIS_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Kinesis: largest PutRecords request (all records together).
pub const KINESIS_MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;

/// Longest error message kept in an envelope.
const MAX_ERROR_CHARS: usize = 2000;

/// How often one [`DeadLetterWriter::write`] retries the entries a batch call refused,
/// before it reports the failure (the reader then backs off and writes again).
const PARTIAL_RETRIES: usize = 3;

/// One poison record and why it is one.
#[derive(Clone, Copy, Debug)]
pub struct Letter<'a> {
    /// The record.
    pub record: &'a Record,
    /// Attempts the handler refused it alone.
    pub attempts: u32,
    /// The handler's last error.
    pub error: &'a str,
}

/// A dead-letter write failed (the reader reports `DeadLetterFailing` and retries).
#[derive(Debug, thiserror::Error)]
#[error("dead-letter write to {target} failed: {message}")]
pub struct DeadLetterError {
    /// The target, as [`DeadLetterWriter::describe`] names it.
    pub target: String,
    /// What went wrong.
    pub message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    kcg_dead_letter: u32,
    group: &'a str,
    stream: &'a str,
    shard: &'a str,
    sequence: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub_sequence: Option<u64>,
    partition_key: &'a str,
    arrival: Option<String>,
    attempts: u32,
    error: String,
    dead_lettered_at: String,
    data_bytes: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    data_omitted: bool,
    data: Option<String>,
}

/// The envelope of `letter` as JSON, at most `limit` bytes: with the payload (base64) when
/// it fits, else without it (`dataOmitted`). Pure apart from the clock value passed in.
pub fn envelope(group: &str, letter: &Letter<'_>, now: jiff::Timestamp, limit: usize) -> String {
    use base64::Engine as _;
    let r = letter.record;
    let mut env = Envelope {
        kcg_dead_letter: ENVELOPE_VERSION,
        group,
        stream: &r.stream,
        shard: &r.shard_id,
        sequence: &r.sequence,
        sub_sequence: r.sub_sequence,
        partition_key: &r.partition_key,
        arrival: r.arrival.map(|t| t.to_string()),
        attempts: letter.attempts,
        error: letter.error.chars().take(MAX_ERROR_CHARS).collect(),
        dead_lettered_at: now.to_string(),
        data_bytes: r.data.len(),
        data_omitted: false,
        data: Some(base64::engine::general_purpose::STANDARD.encode(&r.data)),
    };
    // Serializing plain strings and numbers cannot fail.
    let full = serde_json::to_string(&env).unwrap_or_default();
    if full.len() <= limit {
        return full;
    }
    env.data = None;
    env.data_omitted = true;
    serde_json::to_string(&env).unwrap_or_default()
}

/// Splits entries of `sizes` bytes, in order, into consecutive runs of at most
/// `max_entries` entries and `max_bytes` bytes together. An entry larger than `max_bytes`
/// goes alone (the service then refuses it and the error is reported). Pure.
pub fn chunks(sizes: &[usize], max_entries: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        let full = i - start >= max_entries || (i > start && bytes + size > max_bytes);
        if full {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// The queue's region from a standard SQS URL (`https://sqs.REGION.amazonaws.com/...`).
pub fn sqs_url_region(url: &str) -> Option<String> {
    let host = url.split("://").nth(1)?.split('/').next()?;
    let rest = host.strip_prefix("sqs.")?;
    let (region, tail) = rest.split_once('.')?;
    tail.starts_with("amazonaws.com").then(|| region.to_owned())
}

enum Target {
    Sqs {
        client: aws_sdk_sqs::Client,
        queue_url: String,
        /// A FIFO queue needs a message group (the shard: dead letters of a shard stay in
        /// order) and a deduplication id (the sequence number, with the sub-sequence for a KPL user record).
        fifo: bool,
    },
    Kinesis(StreamClient),
}

/// Writes dead letters of one group to its configured target.
pub struct DeadLetterWriter {
    group: Arc<str>,
    target: Target,
}

impl DeadLetterWriter {
    /// The writer for `config` (its region, and its role through STS AssumeRole); `base`
    /// carries the worker's credentials and `AWS_ENDPOINT_URL_*`.
    pub async fn connect(
        config: &DeadLetterConfig,
        group: &str,
        base: &SdkConfig,
    ) -> Result<Self, DeadLetterError> {
        let target = match (&config.sqs, &config.kinesis) {
            (Some(q), _) => Self::sqs(q, base).await?,
            (None, Some(k)) => Self::kinesis(k, base).await?,
            (None, None) => {
                return Err(DeadLetterError {
                    target: "deadLetter".into(),
                    message: "needs one of sqs or kinesis".into(),
                });
            }
        };
        Ok(Self {
            group: Arc::from(group),
            target,
        })
    }

    async fn sqs(q: &SqsTarget, base: &SdkConfig) -> Result<Target, DeadLetterError> {
        let region = q
            .region
            .clone()
            .or_else(|| sqs_url_region(&q.queue_url))
            .or_else(|| base.region().map(|r| r.to_string()))
            .ok_or_else(|| DeadLetterError {
                target: format!("SQS queue {}", q.queue_url),
                message: "no region: set delivery.deadLetter.sqs.region or AWS_REGION".into(),
            })?;
        let region = aws_sdk_sqs::config::Region::new(region);
        let mut builder = aws_sdk_sqs::config::Builder::from(base).region(region.clone());
        if let Some(role) = &q.role_arn {
            builder = builder.credentials_provider(assumed_role(role, &region, base).await);
        }
        Ok(Target::Sqs {
            client: aws_sdk_sqs::Client::from_conf(builder.build()),
            queue_url: q.queue_url.clone(),
            fifo: q.queue_url.ends_with(".fifo"),
        })
    }

    async fn kinesis(k: &KinesisTarget, base: &SdkConfig) -> Result<Target, DeadLetterError> {
        StreamClient::connect(&k.as_stream(), base)
            .await
            .map(Target::Kinesis)
            .map_err(|e| DeadLetterError {
                target: format!("Kinesis stream {}", k.stream),
                message: e.to_string(),
            })
    }

    /// The target for messages: `SQS queue URL` or `Kinesis stream NAME`.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Sqs { queue_url, .. } => format!("SQS queue {queue_url}"),
            Target::Kinesis(c) => format!("Kinesis stream {}", c.name),
        }
    }

    fn failed(&self, message: String) -> DeadLetterError {
        DeadLetterError {
            target: self.describe(),
            message,
        }
    }

    /// Writes `letters` in batches under the target's limits; entries a batch call refused
    /// are retried a few times. `Ok` only once every letter is written.
    pub async fn write(&self, letters: &[Letter<'_>]) -> Result<(), DeadLetterError> {
        let now = jiff::Timestamp::now();
        match &self.target {
            Target::Sqs {
                client,
                queue_url,
                fifo,
            } => {
                let bodies: Vec<String> = letters
                    .iter()
                    .map(|l| envelope(&self.group, l, now, SQS_MAX_BYTES))
                    .collect();
                let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
                for run in chunks(&sizes, SQS_MAX_ENTRIES, SQS_MAX_BYTES) {
                    self.send_sqs(
                        client,
                        queue_url,
                        *fifo,
                        &letters[run.clone()],
                        &bodies[run],
                    )
                    .await?;
                }
                Ok(())
            }
            Target::Kinesis(stream) => {
                let datas: Vec<String> = letters
                    .iter()
                    .map(|l| {
                        let limit =
                            KINESIS_MAX_RECORD_BYTES.saturating_sub(l.record.partition_key.len());
                        envelope(&self.group, l, now, limit)
                    })
                    .collect();
                let sizes: Vec<usize> = datas
                    .iter()
                    .zip(letters)
                    .map(|(d, l)| d.len() + l.record.partition_key.len())
                    .collect();
                for run in chunks(&sizes, KINESIS_MAX_ENTRIES, KINESIS_MAX_REQUEST_BYTES) {
                    self.put_kinesis(stream, &letters[run.clone()], &datas[run])
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// One SendMessageBatch, then again for the entries it refused.
    async fn send_sqs(
        &self,
        client: &aws_sdk_sqs::Client,
        queue_url: &str,
        fifo: bool,
        letters: &[Letter<'_>],
        bodies: &[String],
    ) -> Result<(), DeadLetterError> {
        let call = |todo: Vec<usize>| async move {
            let mut entries = Vec::with_capacity(todo.len());
            for &i in &todo {
                let r = letters[i].record;
                let mut e = SendMessageBatchRequestEntry::builder()
                    .id(format!("r{i}"))
                    .message_body(&bodies[i]);
                if fifo {
                    e = e
                        .message_group_id(r.shard_id.as_ref())
                        .message_deduplication_id(dedup_id(r));
                }
                entries.push(e.build().map_err(|e| e.to_string())?);
            }
            let out = client
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| DisplayErrorContext(&e).to_string())?;
            Ok(out
                .failed()
                .iter()
                .filter_map(|f| {
                    let i = f.id().strip_prefix('r')?.parse().ok()?;
                    let why = format!("{}: {}", f.code(), f.message().unwrap_or("entry refused"));
                    Some((i, why))
                })
                .collect())
        };
        send_retrying(letters.len(), call)
            .await
            .map_err(|m| self.failed(m))
    }

    /// One PutRecords, then again for the records it refused.
    async fn put_kinesis(
        &self,
        stream: &StreamClient,
        letters: &[Letter<'_>],
        datas: &[String],
    ) -> Result<(), DeadLetterError> {
        let call = |todo: Vec<usize>| async move {
            let mut entries = Vec::with_capacity(todo.len());
            for &i in &todo {
                // The source's partition key: dead letters of one key stay in one shard.
                let entry = PutRecordsRequestEntry::builder()
                    .partition_key(&letters[i].record.partition_key)
                    .data(Blob::new(datas[i].as_bytes()))
                    .build()
                    .map_err(|e| e.to_string())?;
                entries.push(entry);
            }
            let results = stream
                .put_records(entries)
                .await
                .map_err(|e| e.to_string())?;
            Ok(todo
                .iter()
                .zip(results)
                .filter_map(|(&i, result)| result.map(|why| (i, why)))
                .collect())
        };
        send_retrying(letters.len(), call)
            .await
            .map_err(|m| self.failed(m))
    }
}

/// Sends entries `0..n` through `call` (which gets the indices to send and returns those
/// the service refused, with why), then the refused ones again, at most
/// [`PARTIAL_RETRIES`] more times. `Err` says how many stayed refused, or the call's error.
async fn send_retrying<F, Fut>(n: usize, mut call: F) -> Result<(), String>
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Result<Vec<(usize, String)>, String>>,
{
    let mut todo: Vec<usize> = (0..n).collect();
    let mut last_error = String::new();
    for _ in 0..=PARTIAL_RETRIES {
        if todo.is_empty() {
            return Ok(());
        }
        let refused = call(todo).await?;
        if let Some((_, why)) = refused.last() {
            last_error.clone_from(why);
        }
        todo = refused.into_iter().map(|(i, _)| i).collect();
    }
    if todo.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} of {n} entries refused: {last_error}",
        todo.len()
    ))
}

/// The FIFO deduplication id of a record: its sequence, and its sub-sequence for a user
/// record of a KPL aggregate (those share the aggregate's sequence).
fn dedup_id(r: &Record) -> String {
    match r.sub_sequence {
        Some(sub) => format!("{}-{sub}", r.sequence),
        None => r.sequence.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: Vec<u8>) -> Record {
        Record {
            stream: "orders".into(),
            shard_id: "shardId-000000000001".into(),
            sequence: "4959".into(),
            partition_key: "customer-7".into(),
            data,
            arrival: Some("2026-11-28T17:44:39.5Z".parse().unwrap()),
            sub_sequence: None,
            explicit_hash_key: None,
        }
    }

    #[test]
    fn envelope_shape() {
        let r = record(b"hello".to_vec());
        let letter = Letter {
            record: &r,
            attempts: 3,
            error: "POST http://x answered 500",
        };
        let now: jiff::Timestamp = "2026-11-28T17:45:02Z".parse().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&envelope("shop/orders", &letter, now, SQS_MAX_BYTES)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "kcgDeadLetter": 1,
                "group": "shop/orders",
                "stream": "orders",
                "shard": "shardId-000000000001",
                "sequence": "4959",
                "partitionKey": "customer-7",
                "arrival": "2026-11-28T17:44:39.5Z",
                "attempts": 3,
                "error": "POST http://x answered 500",
                "deadLetteredAt": "2026-11-28T17:45:02Z",
                "dataBytes": 5,
                "data": "aGVsbG8=",
            })
        );
    }

    #[test]
    fn too_large_payload_is_left_out() {
        let r = record(vec![7u8; 300 * 1024]);
        let long_error = "e".repeat(10_000);
        let letter = Letter {
            record: &r,
            attempts: 1,
            error: &long_error,
        };
        let now = jiff::Timestamp::UNIX_EPOCH;
        let small = envelope("g/n", &letter, now, SQS_MAX_BYTES);
        assert!(small.len() <= SQS_MAX_BYTES);
        let v: serde_json::Value = serde_json::from_str(&small).unwrap();
        assert_eq!(v["data"], serde_json::Value::Null);
        assert_eq!(v["dataOmitted"], true);
        assert_eq!(v["dataBytes"], 300 * 1024);
        assert_eq!(v["error"].as_str().unwrap().len(), MAX_ERROR_CHARS);
        // The same record fits a Kinesis record whole.
        let big = envelope("g/n", &letter, now, KINESIS_MAX_RECORD_BYTES);
        let v: serde_json::Value = serde_json::from_str(&big).unwrap();
        assert!(v["data"].is_string());
        assert!(v.get("dataOmitted").is_none());
    }

    /// The service refuses entry 1 `refusals` times: it is sent again alone, until accepted or
    /// out of retries.
    async fn partial(refusals: usize) -> (Result<(), String>, Vec<Vec<usize>>) {
        let calls = std::sync::Mutex::new(Vec::new());
        let result = send_retrying(3, |todo: Vec<usize>| {
            let mut c = calls.lock().unwrap();
            c.push(todo.clone());
            let refuse = c.len() <= refusals;
            async move {
                Ok(todo
                    .into_iter()
                    .filter(|&i| refuse && i == 1)
                    .map(|i| (i, format!("Throttled: entry {i}")))
                    .collect())
            }
        })
        .await;
        (result, calls.into_inner().unwrap())
    }

    #[tokio::test]
    async fn refused_entries_are_sent_again() {
        assert_eq!(partial(0).await, (Ok(()), vec![vec![0, 1, 2]]));
        assert_eq!(
            partial(2).await,
            (Ok(()), vec![vec![0, 1, 2], vec![1], vec![1]])
        );
        let (result, calls) = partial(100).await;
        assert_eq!(calls.len(), PARTIAL_RETRIES + 1);
        assert_eq!(
            result,
            Err("1 of 3 entries refused: Throttled: entry 1".to_owned())
        );
        // A failing call (not a partial refusal) is reported as is.
        let failed = send_retrying(2, |_| async { Err("QueueDoesNotExist".to_owned()) }).await;
        assert_eq!(failed, Err("QueueDoesNotExist".to_owned()));
    }

    #[test]
    fn chunks_table() {
        type Case = (Vec<usize>, usize, usize, Vec<Range<usize>>);
        // (sizes, max entries, max bytes, want)
        let cases: Vec<Case> = vec![
            (vec![], 10, 100, vec![]),
            (vec![1; 25], 10, 1000, vec![0..10, 10..20, 20..25]),
            (vec![40, 40, 40, 40], 10, 100, vec![0..2, 2..4]),
            (vec![100, 1, 100], 10, 100, vec![0..1, 1..2, 2..3]),
            // Too large alone: its own run (the service reports it).
            (vec![5, 500, 5], 10, 100, vec![0..1, 1..2, 2..3]),
            (vec![50, 50], 10, 100, vec![Range { start: 0, end: 2 }]),
        ];
        for (sizes, n, bytes, want) in cases {
            assert_eq!(chunks(&sizes, n, bytes), want, "{sizes:?} {n} {bytes}");
        }
    }

    #[test]
    fn sqs_region_from_url() {
        let cases = [
            (
                "https://sqs.eu-west-1.amazonaws.com/123456789012/q",
                Some("eu-west-1"),
            ),
            (
                "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q",
                Some("cn-north-1"),
            ),
            ("http://127.0.0.1:4566/000000000000/q", None),
            ("https://example.com/q", None),
        ];
        for (url, want) in cases {
            assert_eq!(sqs_url_region(url).as_deref(), want, "{url}");
        }
    }
}
