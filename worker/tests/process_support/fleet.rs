//! What the failover test (`worker/tests/failover_processes.rs`) and the failover benchmark
//! (`bench/src/failover.rs`, through `#[path]`) share: the worker config, the `kcg-worker`
//! command line, a producer that writes a record into every shard, and reading back what a
//! worker's stdout sink wrote. Errors are returned rather than panicked on, because the
//! benchmark reports them as a failed row.
#![allow(dead_code)] // each includer uses a subset

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The config of a worker of `group` that reads `stream` from the trim horizon into the
/// stdout sink, with its state in `table`. `tuning` holds the lines under `tuning:`
/// (indented by two spaces); empty keeps every default.
pub fn stdout_config(group: &str, stream: &str, table: &str, tuning: &str) -> String {
    let mut yaml = format!(
        "group: {group}\nstreams:\n  - name: {stream}\n    startPosition: TrimHorizon\n\
         stateStore:\n  table: {table}\ndelivery:\n  stdout: {{}}\n"
    );
    if !tuning.is_empty() {
        yaml.push_str("tuning:\n");
        yaml.push_str(tuning);
    }
    yaml
}

/// `<bin> run --config <config>` with a free port for its health server and stdin closed;
/// the caller adds the environment, stdout and stderr.
pub fn run_command(bin: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null());
    cmd
}

/// The (shard, sequence) of one line the stdout sink wrote; `None` for anything else (a
/// line cut short by a kill, say).
pub fn delivery(line: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    Some((
        v.get("shard")?.as_str()?.to_owned(),
        v.get("sequence")?.as_str()?.to_owned(),
    ))
}

/// Writes one record into every shard of a stream (at the shard's starting hash key) at a
/// steady pace, and keeps the (shard, sequence) of every record Kinesis acknowledged. Stops
/// when dropped.
pub struct Producer {
    stop: CancellationToken,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    /// Taken by [`Producer::stop`].
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Producer {
    /// Starts writing into every shard of `stream`, one round every `every`.
    pub fn start(kinesis: aws_sdk_kinesis::Client, stream: String, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let join = tokio::spawn(produce(kinesis, stream, every, acked.clone(), stop.clone()));
        Self {
            stop,
            acked,
            join: Some(join),
        }
    }

    /// Stops writing (a round in flight may still be acknowledged).
    pub fn halt(&self) {
        self.stop.cancel();
    }

    /// The (shard, sequence) of every record acknowledged so far.
    pub fn acked(&self) -> Vec<(String, String)> {
        self.acked.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Stops writing and waits until the last round is acknowledged; fails if the producer
    /// did.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.halt();
        match self.join.take() {
            Some(join) => join.await.context("the producer task")?,
            None => Ok(()),
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn produce(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    every: Duration,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listed = kinesis
        .list_shards()
        .stream_name(&stream)
        .send()
        .await
        .context("ListShards")?;
    let keys: Vec<String> = listed
        .shards()
        .iter()
        .filter_map(|s| s.hash_key_range().map(|r| r.starting_hash_key().to_owned()))
        .collect();
    let mut tick = tokio::time::interval(every);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        let entries = keys
            .iter()
            .map(|k| {
                n += 1;
                PutRecordsRequestEntry::builder()
                    .partition_key("k")
                    .explicit_hash_key(k)
                    .data(Blob::new(format!("record {n}")))
                    .build()
                    .context("a record")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let out = kinesis
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries))
            .send()
            .await
            .context("PutRecords")?;
        let mut acked = acked
            .lock()
            .map_err(|_| anyhow::anyhow!("the acknowledged records' lock is poisoned"))?;
        for r in out.records() {
            if let (Some(shard), Some(seq)) = (r.shard_id(), r.sequence_number()) {
                acked.push((shard.to_owned(), seq.to_owned()));
            }
        }
    }
    Ok(())
}
