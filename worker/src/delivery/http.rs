//! The http sink: POST each batch as JSON to a URL, usually a sidecar in the same pod.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use super::{BatchHandler, HandlerError, Record, RecordJson};
use crate::config::HttpSink as HttpSinkConfig;

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

    async fn post(&self, chunk: &[Record]) -> Result<(), HandlerError> {
        let body = Body {
            records: chunk.iter().map(RecordJson::from).collect(),
        };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| HandlerError::new(format!("encoding batch: {e}")))?;
        let resp = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| {
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
                self.post(chunk).await?;
            }
            Ok(())
        })
    }
}
