//! The http sink: POST each batch as JSON to a URL, usually a sidecar in the same pod.
//!
//! Fencing: each reader gets its own [`ShardSink`], which sends nothing once the reader's
//! fencing deadline passed and cuts a request still running at it (no retry past it
//! either: the reader checks the deadline before every hand-over). Every POST carries the
//! shard and the lease counter its reader holds (`Kcg-Stream`, `Kcg-Shard-Id`,
//! `Kcg-Lease-Counter`): the counter grows with every new holder of the shard, so a
//! receiver that remembers the highest counter per shard can refuse a late request of an
//! older holder (one whose connection was cut but that it processes anyway).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use super::{BatchHandler, HandlerError, Record, RecordJson, ShardContext};
use crate::config::HttpSink as HttpSinkConfig;
use crate::fence::Fence;

/// Header naming the stream of the records in a POST.
pub const STREAM_HEADER: &str = "kcg-stream";
/// Header naming the shard of the records in a POST.
pub const SHARD_HEADER: &str = "kcg-shard-id";
/// Header carrying the lease counter of the reader that sent a POST (the fencing token).
pub const LEASE_COUNTER_HEADER: &str = "kcg-lease-counter";

/// POSTs `{"records":[...]}` (same record fields as the stdout sink) in chunks of at most
/// `maxBatchRecords`. A 2xx answer acknowledges a chunk; any other status, a connection
/// error or the timeout fails the batch, which the reader retries with backoff. (A retried
/// batch is sent whole again, so chunks already accepted may arrive twice: at-least-once.)
#[derive(Debug, Clone)]
pub struct HttpSink {
    client: reqwest::Client,
    url: String,
    max_batch: usize,
}

#[derive(Serialize)]
struct Body<'a> {
    records: Vec<RecordJson<'a>>,
}

impl HttpSink {
    /// A sink for `config`.
    pub fn new(config: &HttpSinkConfig) -> Result<Self, HandlerError> {
        Self::with(&config.url, config.timeout, config.max_batch_records)
    }

    /// A sink posting to `url` with `timeout` per request, at most `max_batch` records each.
    pub fn with(url: &str, timeout: Duration, max_batch: u32) -> Result<Self, HandlerError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| HandlerError::new(format!("building http client: {e}")))?;
        Ok(Self {
            client,
            url: url.to_owned(),
            max_batch: max_batch.max(1) as usize,
        })
    }

    /// POSTs one chunk. A reader's chunk (`reader`: its token and fence) is checked against
    /// the fencing deadline after encoding, right before it is sent, and cut at it.
    async fn post(
        &self,
        chunk: &[Record],
        reader: Option<(&Token, &Fence)>,
    ) -> Result<(), HandlerError> {
        let body = Body {
            records: chunk.iter().map(RecordJson::from).collect(),
        };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| HandlerError::new(format!("encoding batch: {e}")))?;
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some((t, _)) = reader {
            req = req
                .header(STREAM_HEADER, &*t.stream)
                .header(SHARD_HEADER, &*t.shard_id)
                .header(LEASE_COUNTER_HEADER, t.lease_counter);
        }
        let send = req.body(bytes).send();
        let sent = match reader {
            None => send.await,
            Some((_, fence)) => {
                fence
                    .check()
                    .map_err(|e| HandlerError::new(format!("POST {} not sent: {e}", self.url)))?;
                tokio::select! {
                    biased;
                    // Dropping the request closes its connection at the deadline.
                    _ = fence.passed() => {
                        return Err(HandlerError::new(format!(
                            "POST {} cut at the fencing deadline (no heartbeat confirmed in time); \
                             the receiver may still process what it already read",
                            self.url
                        )));
                    }
                    res = send => res,
                }
            }
        };
        let resp = sent.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            HandlerError::new(format!("POST {} {what}: {e}", self.url))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        Err(HandlerError::new(format!(
            "POST {} answered {status}: {text}",
            self.url
        )))
    }
}

impl BatchHandler for HttpSink {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for chunk in batch.chunks(self.max_batch) {
                self.post(chunk, None).await?;
            }
            Ok(())
        })
    }

    fn open_shard(&self, shard: ShardContext) -> Option<Arc<dyn BatchHandler>> {
        Some(Arc::new(ShardSink {
            sink: self.clone(),
            fence: shard.fence,
            token: Token {
                stream: shard.stream,
                shard_id: shard.shard_id,
                lease_counter: shard.lease_counter,
            },
        }))
    }
}

/// What identifies a reader to the receiver: its shard and lease counter.
#[derive(Debug, Clone)]
struct Token {
    stream: Arc<str>,
    shard_id: Arc<str>,
    lease_counter: u64,
}

/// The http sink of one reader: never sends past the reader's fencing deadline (see the
/// module doc).
#[derive(Debug)]
pub struct ShardSink {
    sink: HttpSink,
    fence: Fence,
    token: Token,
}

impl BatchHandler for ShardSink {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for chunk in batch.chunks(self.sink.max_batch) {
                self.sink
                    .post(chunk, Some((&self.token, &self.fence)))
                    .await?;
            }
            Ok(())
        })
    }
}
