//! The stdout sink: one JSON line per record on the worker's stdout.

use std::pin::Pin;

use futures::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

#[cfg(doc)]
use super::RecordJson;
use super::{BatchHandler, HandlerError, Record};

/// Bytes handed to the writer per write: whole lines only, so a write cut off when the
/// reader is aborted never leaves half a line for the next batch to continue. Each write
/// is one trip to tokio's blocking pool (a thread wake-up and a copy), so chunks are large:
/// at 64 KiB their wake-ups and waits were a large share of the sink's CPU. What an aborted
/// reader's last chunk still writes are records the next owner delivers again (they were
/// never checkpointed), so the bound only limits duplicates, never loses a record.
pub const CHUNK_BYTES: usize = 512 * 1024;

type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Writes one JSON line per record (`stream`, `shard`, `sequence`, `subSequence` and
/// `explicitHashKey` for a user record of a KPL aggregate, `partitionKey`, `data` in
/// standard base64, `arrival` in RFC 3339) to stdout. Batches are written one at a time
/// (an async lock per batch), so lines of concurrent shards never interleave; an I/O error
/// (for example a closed pipe) fails the batch, which is then retried.
///
/// The write is async and cancellable: when the engine aborts a reader (its lease may have
/// been taken over), the write stops with it. At most the one chunk already handed to the
/// OS (up to [`CHUNK_BYTES`] of whole lines) still lands; nothing after it does.
pub struct StdoutSink {
    out: Mutex<Out>,
}

struct Out {
    w: Writer,
    /// The rest of a line whose write was cut off (the writing reader was aborted): written
    /// first by the next batch, so the output stays whole JSON lines.
    owed: Vec<u8>,
}

impl Out {
    /// Writes `bytes`, keeping `owed` accurate after every partial write, so that dropping
    /// this future at any await leaves a state the next batch can complete.
    async fn write_lines(&mut self, bytes: &[u8]) -> Result<(), HandlerError> {
        let mut off = 0;
        while off < bytes.len() {
            let n = self
                .w
                .write(&bytes[off..])
                .await
                .map_err(|e| HandlerError::new(format!("writing to stdout: {e}")))?;
            if n == 0 {
                return Err(HandlerError::new("writing to stdout: closed"));
            }
            off += n;
            self.owed.clear();
            if bytes[off - 1] != b'\n' {
                // Cut mid-line: owe the rest of it (rare: only on a short write).
                let end = bytes[off..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |i| off + i + 1);
                self.owed.extend_from_slice(&bytes[off..end]);
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for StdoutSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdoutSink").finish_non_exhaustive()
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl StdoutSink {
    /// A sink on the process's stdout.
    pub fn new() -> Self {
        Self::with_writer(tokio::io::stdout())
    }

    /// A sink on any async writer (tests, or an embedding application's own output).
    pub fn with_writer(w: impl AsyncWrite + Send + 'static) -> Self {
        Self {
            out: Mutex::new(Out {
                w: Box::pin(w),
                owed: Vec::new(),
            }),
        }
    }
}

/// Appends the batch's JSON lines to `buf`: byte for byte what `serde_json` writes for
/// [`RecordJson`] (a test holds them equal), without its per-field machinery. The
/// `{"stream":..,"shard":..,"sequence":` head is escaped once per run of records from the
/// same shard, base64 is encoded straight into `buf`, and the arrival time (digits and
/// `-:.TZ` only, nothing to escape) is written as is.
pub fn format_batch(buf: &mut Vec<u8>, batch: &[Record]) -> Result<(), HandlerError> {
    let mut head: Vec<u8> = Vec::with_capacity(96);
    let mut head_of: Option<(&str, &str)> = None;
    for r in batch {
        let key = (&*r.stream, &*r.shard_id);
        if head_of != Some(key) {
            head.clear();
            head.extend_from_slice(b"{\"stream\":");
            json_str(&mut head, &r.stream, r)?;
            head.extend_from_slice(b",\"shard\":");
            json_str(&mut head, &r.shard_id, r)?;
            head.extend_from_slice(b",\"sequence\":");
            head_of = Some(key);
        }
        buf.extend_from_slice(&head);
        json_str(buf, &r.sequence, r)?;
        if let Some(sub) = r.sub_sequence {
            use std::io::Write;
            write!(buf, ",\"subSequence\":{sub}").map_err(|e| encode_error(r, e))?;
        }
        buf.extend_from_slice(b",\"partitionKey\":");
        json_str(buf, &r.partition_key, r)?;
        if let Some(key) = &r.explicit_hash_key {
            buf.extend_from_slice(b",\"explicitHashKey\":");
            json_str(buf, key, r)?;
        }
        buf.extend_from_slice(b",\"data\":\"");
        base64_into(buf, &r.data, r)?;
        buf.extend_from_slice(b"\",\"arrival\":");
        match r.arrival {
            Some(t) => {
                use std::io::Write;
                // jiff's Display: RFC 3339 in UTC, as `RecordJson` writes it.
                write!(buf, "\"{t}\"").map_err(|e| encode_error(r, e))?;
            }
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(b"}\n");
    }
    Ok(())
}

fn encode_error(r: &Record, e: impl std::fmt::Display) -> HandlerError {
    HandlerError::new(format!("encoding record {}: {e}", r.sequence))
}

/// The bytes [`format_batch`] writes for `batch`, short only by string escapes.
pub fn line_bytes_estimate(batch: &[Record]) -> usize {
    // {"stream":"","shard":"","sequence":"","partitionKey":"","data":"","arrival":""}\n and
    // a 24-character arrival time.
    const FIXED: usize = 80 + 24;
    batch
        .iter()
        .map(|r| {
            FIXED
                + r.stream.len()
                + r.shard_id.len()
                + r.sequence.len()
                + r.partition_key.len()
                + r.data.len().div_ceil(3) * 4
                // `,"subSequence":` and its digits; `,"explicitHashKey":""` and the key.
                + r.sub_sequence.map_or(0, |_| 15 + 20)
                + r.explicit_hash_key.as_ref().map_or(0, |k| 21 + k.len())
        })
        .sum()
}

/// A JSON string with serde_json's escaping.
fn json_str(buf: &mut Vec<u8>, s: &str, r: &Record) -> Result<(), HandlerError> {
    serde_json::to_writer(&mut *buf, s).map_err(|e| encode_error(r, e))
}

/// Standard base64 with padding, encoded in place at the end of `buf`.
fn base64_into(buf: &mut Vec<u8>, data: &[u8], r: &Record) -> Result<(), HandlerError> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let at = buf.len();
    let len = base64::encoded_len(data.len(), true)
        .ok_or_else(|| encode_error(r, "record too large for base64"))?;
    buf.resize(at + len, 0);
    STANDARD
        .encode_slice(data, &mut buf[at..])
        .map_err(|e| encode_error(r, e))?;
    Ok(())
}

/// Splits `buf` (complete lines) into chunks of whole lines of at most `max` bytes; a
/// single line longer than `max` is a chunk of its own. Pure.
pub fn line_chunks(buf: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(max)];
        let end = match window.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            // One line longer than `max`: up to its end (or everything left).
            None => rest
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |i| i + 1),
        };
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

impl BatchHandler for StdoutSink {
    fn handle<'a>(&'a self, batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            // One allocation per batch: the lines' size is known up to the escapes.
            let mut buf = Vec::with_capacity(line_bytes_estimate(batch));
            format_batch(&mut buf, batch)?;
            let mut out = self.out.lock().await;
            if !out.owed.is_empty() {
                let owed = std::mem::take(&mut out.owed);
                out.owed = owed.clone();
                out.write_lines(&owed).await?;
            }
            // tokio's stdout writes each chunk whole on a blocking thread; dropping this
            // future (reader aborted) stops before the next chunk.
            for chunk in line_chunks(&buf, CHUNK_BYTES) {
                out.write_lines(chunk).await?;
            }
            out.w
                .flush()
                .await
                .map_err(|e| HandlerError::new(format!("flushing stdout: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn recs(n: usize) -> Vec<Record> {
        let (stream, shard): (Arc<str>, Arc<str>) = ("s".into(), "shardId-000000000000".into());
        (0..n)
            .map(|i| Record {
                stream: stream.clone(),
                shard_id: shard.clone(),
                sequence: format!("{i}"),
                sub_sequence: None,
                partition_key: format!("k{i}"),
                explicit_hash_key: None,
                data: vec![0xff, 0x00, i as u8],
                arrival: Some(jiff::Timestamp::from_second(1_700_000_000).unwrap()),
            })
            .collect()
    }

    #[test]
    fn one_json_line_per_record() {
        let recs = recs(3);
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

    /// The hand-written lines are exactly serde_json's rendering of `RecordJson`, for
    /// strings that need escaping, any bytes, no arrival time, and batches mixing shards.
    #[test]
    fn lines_are_byte_identical_to_serde_json() {
        use super::super::RecordJson;
        let t = |ms: i64| Some(jiff::Timestamp::from_millisecond(ms).unwrap());
        let rec = |stream: &str, shard: &str, seq: &str, pk: &str, data: &[u8], arrival| Record {
            stream: stream.into(),
            shard_id: shard.into(),
            sequence: seq.into(),
            partition_key: pk.into(),
            data: data.to_vec(),
            arrival,
            sub_sequence: None,
            explicit_hash_key: None,
        };
        // A user record of a KPL aggregate carries its sub-sequence and hash key.
        let user = |sub: u64, key: Option<&str>| Record {
            sub_sequence: Some(sub),
            explicit_hash_key: key.map(str::to_owned),
            ..rec("orders", "shardId-000000000003", "77", "u", b"agg", t(5))
        };
        let batch = vec![
            user(0, None),
            user(12, Some("340282366920938463463374607431768211455")),
            rec(
                "orders",
                "shardId-000000000001",
                "4959",
                "k",
                b"hello",
                t(1_764_351_879_500),
            ),
            rec(
                "orders",
                "shardId-000000000001",
                "4960",
                "p\"k\\\n\t\u{1}",
                b"",
                None,
            ),
            rec(
                "orders",
                "shardId-000000000002",
                "1",
                "\u{e9}\u{1F600}\u{2028}",
                &[0xff, 0, 7],
                t(0),
            ),
            rec("o\"r", "s\\h", "2", "", &[1; 1000], t(1_764_351_879_001)),
            rec(
                "orders",
                "shardId-000000000001",
                "4961",
                "</script>",
                b"x",
                t(-1),
            ),
        ];
        let mut got = Vec::new();
        format_batch(&mut got, &batch).unwrap();
        let mut want = Vec::new();
        for r in &batch {
            serde_json::to_writer(&mut want, &RecordJson::from(r)).unwrap();
            want.push(b'\n');
        }
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want.clone()).unwrap()
        );
        // The estimate that sizes the buffer is close (escapes and `null` differ).
        let estimate = line_bytes_estimate(&batch) as f64;
        let actual = want.len() as f64;
        assert!(
            (estimate - actual).abs() < 0.05 * actual,
            "{estimate} vs {actual}"
        );
    }

    #[test]
    fn line_chunks_table() {
        // (input, max, want chunks)
        let cases: &[(&str, usize, &[&str])] = &[
            ("", 4, &[]),
            ("a\n", 4, &["a\n"]),
            ("a\nb\nc\n", 4, &["a\nb\n", "c\n"]),
            ("a\nb\nc\n", 100, &["a\nb\nc\n"]),
            ("abcdef\ng\n", 4, &["abcdef\n", "g\n"]), // a line longer than max stays whole
            ("a\nbcdefgh\n", 4, &["a\n", "bcdefgh\n"]),
        ];
        for (input, max, want) in cases {
            let got: Vec<&[u8]> = line_chunks(input.as_bytes(), *max).collect();
            let want: Vec<&[u8]> = want.iter().map(|s| s.as_bytes()).collect();
            assert_eq!(got, want, "{input:?} max {max}");
        }
    }

    /// The reader is aborted mid-write (its lease may be gone): the write must stop with
    /// it, never keep writing in the background, and what was written is whole lines.
    #[tokio::test]
    async fn aborted_write_stops_and_leaves_whole_lines() {
        // A pipe nobody reads yet: the write blocks once its buffer is full.
        let (w, mut r) = tokio::io::duplex(CHUNK_BYTES * 2);
        let sink = Arc::new(StdoutSink::with_writer(w));
        let batch = recs(60_000); // ~6 MB of lines, far more than the pipe holds
        let task = {
            let sink = sink.clone();
            tokio::spawn(async move { sink.handle(&batch).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !task.is_finished(),
            "the write should be blocked on the pipe"
        );
        task.abort();
        let _ = task.await;
        // Drain everything that was written, then make sure nothing more comes.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tokio::time::timeout(Duration::from_millis(200), r.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        assert!(!got.is_empty());
        assert!(
            got.len() <= CHUNK_BYTES * 3,
            "wrote {} bytes after the abort",
            got.len()
        );
        // The sink still works for the next batch, starting on a fresh line.
        let next = recs(2);
        let writer = tokio::spawn({
            let sink = sink.clone();
            async move { sink.handle(&next).await }
        });
        let cut_lines = got.iter().filter(|b| **b == b'\n').count();
        let want = cut_lines + usize::from(!got.ends_with(b"\n")) + 2;
        while got.iter().filter(|b| **b == b'\n').count() < want {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap().unwrap();
        // Every line is whole JSON: a line cut by the abort was completed first.
        let lines: Vec<&[u8]> = got
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), want);
        for line in &lines {
            serde_json::from_slice::<serde_json::Value>(line).expect("a whole JSON line");
        }
        let last: serde_json::Value = serde_json::from_slice(lines[want - 1]).unwrap();
        assert_eq!(last["sequence"], "1", "the next batch follows");
    }
}
