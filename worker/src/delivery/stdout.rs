//! The stdout sink: one JSON line per record on the worker's stdout.

use std::io::Write;

use futures::future::BoxFuture;

use super::{BatchHandler, HandlerError, Record, RecordJson};

/// Writes one JSON line per record (`stream`, `shard`, `sequence`, `partitionKey`, `data`
/// in standard base64, `arrival` in RFC 3339) to stdout. A batch is written with one
/// locked write and flushed, so lines of concurrent shards never interleave; an I/O error
/// (for example a closed pipe) fails the batch, which is then retried.
#[derive(Debug, Default)]
pub struct StdoutSink {}

impl StdoutSink {
    /// A sink on the process's stdout.
    pub fn new() -> Self {
        Self {}
    }
}

/// Appends the batch's JSON lines to `buf`.
pub fn format_batch(buf: &mut Vec<u8>, batch: &[Record]) -> Result<(), HandlerError> {
    for r in batch {
        serde_json::to_writer(&mut *buf, &RecordJson::from(r))
            .map_err(|e| HandlerError::new(format!("encoding record {}: {e}", r.sequence)))?;
        buf.push(b'\n');
    }
    Ok(())
}

impl BatchHandler for StdoutSink {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            // ~200 bytes per record is typical; one allocation per batch.
            let mut buf = Vec::with_capacity(batch.len() * 256);
            format_batch(&mut buf, batch)?;
            // Blocking write off the async threads: a slow stdout reader must not stall
            // the runtime.
            tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf)?;
                out.flush()
            })
            .await
            .map_err(|e| HandlerError::new(format!("stdout writer task: {e}")))?
            .map_err(|e| HandlerError::new(format!("writing to stdout: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_line_per_record() {
        let recs: Vec<Record> = (0..3)
            .map(|i| Record {
                stream: "s".into(),
                shard_id: "shardId-000000000000".into(),
                sequence: format!("{i}"),
                partition_key: format!("k{i}"),
                data: vec![0xff, 0x00, i as u8],
                arrival: Some(jiff::Timestamp::from_second(1_700_000_000).unwrap()),
            })
            .collect();
        let mut buf = Vec::new();
        format_batch(&mut buf, &recs).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(v["sequence"], "2");
        assert_eq!(v["partitionKey"], "k2");
        assert_eq!(v["data"], "/wAC");
        assert_eq!(v["arrival"], "2023-11-14T22:13:20Z");
        assert_eq!(v.as_object().unwrap().len(), 6);
    }
}
