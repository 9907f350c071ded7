//! `kcg-produce`: a small Kinesis producer for the demo and the benchmarks.
//!
//! Writes JSON records `{"key": "key-3", "n": 17}` where `n` counts up per partition key, so a
//! consumer's output can be checked for gaps and per-key order.

use std::time::Duration;

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use clap::Parser;

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Create a Kinesis stream and write numbered records to it")]
struct Args {
    /// Stream name.
    #[arg(long)]
    stream: String,
    /// Create the stream with this many shards when it does not exist.
    #[arg(long)]
    create_shards: Option<i32>,
    /// Delete the stream first if it exists (with --create-shards: start from an empty one).
    #[arg(long)]
    recreate: bool,
    /// Only delete the stream, write nothing.
    #[arg(long, conflicts_with_all = ["create_shards", "recreate"])]
    delete: bool,
    /// Number of distinct partition keys.
    #[arg(long, default_value_t = 16)]
    keys: u32,
    /// Records per second (0: as fast as possible).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Stop after this many records (default: run until killed).
    #[arg(long)]
    count: Option<u64>,
    /// Records per PutRecords call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// After every call, write `{"key-0": N, ...}` (records written per key) to this file,
    /// so a checker knows exactly what was produced even if the producer is killed.
    #[arg(long)]
    summary: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_kinesis::Client::new(&config);
    if args.delete || args.recreate {
        kcg_bench::delete_stream(&client, &args.stream).await?;
        if args.delete {
            return Ok(());
        }
    }
    if let Some(shards) = args.create_shards {
        kcg_bench::ensure_stream(&client, &args.stream, shards).await?;
    }
    let mut counters = vec![0u64; args.keys as usize];
    let mut written = 0u64;
    let total = args.count.unwrap_or(u64::MAX);
    let per_call = if args.rate == 0 {
        args.batch
    } else {
        args.batch.min(args.rate as usize).max(1)
    };
    let pause = if args.rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(per_call as f64 / args.rate as f64)
    };
    while written < total {
        let n = per_call.min((total - written) as usize);
        let entries = (0..n)
            .map(|i| {
                let key = ((written + i as u64) % u64::from(args.keys)) as usize;
                counters[key] += 1;
                let body = serde_json::json!({ "key": format!("key-{key}"), "n": counters[key] });
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("key-{key}"))
                    .data(Blob::new(body.to_string()))
                    .build()
                    .context("building a record")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let out = client
            .put_records()
            .stream_name(&args.stream)
            .set_records(Some(entries))
            .send()
            .await
            .with_context(|| format!("PutRecords to {}", args.stream))?;
        // The demo's gap check assumes every numbered record landed: fail loudly otherwise.
        anyhow::ensure!(
            out.failed_record_count().unwrap_or(0) == 0,
            "{} records were rejected by PutRecords",
            out.failed_record_count().unwrap_or(0)
        );
        written += n as u64;
        if let Some(path) = &args.summary {
            write_summary(path, &counters)?;
        }
        tokio::time::sleep(pause).await;
    }
    eprintln!("kcg-produce: wrote {written} records to {}", args.stream);
    Ok(())
}

/// Writes the per-key counts atomically (temp file + rename): a reader never sees half a file.
fn write_summary(path: &std::path::Path, counters: &[u64]) -> anyhow::Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = counters
        .iter()
        .enumerate()
        .map(|(k, n)| (format!("key-{k}"), (*n).into()))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::Value::Object(map).to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
