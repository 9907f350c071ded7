//! End-to-end consume throughput: N records in a fresh stream, ONE engine reading from
//! TRIM_HORIZON into a counting handler until every record arrived.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kcg_worker::config::Tuning;
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::report::{Row, num};
use crate::support::{self, Aws, Counter};

/// Parameters of the throughput run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Records produced and consumed.
    pub records: u64,
    /// Payload bytes per record.
    pub payload: usize,
    /// Shards of the stream.
    pub shards: i32,
    /// Records per GetRecords call.
    pub max_records_per_call: u32,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Runs the benchmark on a fresh stream and table and always deletes both.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let stream = support::unique("e2e");
    let table = support::unique("e2e-state");
    let rows = match measure(aws, p, &stream, &table).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed("e2e consume", &e)],
    };
    support::cleanup(aws, &stream, &table).await;
    rows
}

async fn measure(aws: &Aws, p: &Params, stream: &str, table: &str) -> anyhow::Result<Vec<Row>> {
    support::create(aws, stream, p.shards, table).await?;
    let produced = support::produce(&aws.kinesis, stream, p.records, p.payload, 4).await?;
    let mut rows = vec![Row::info(
        "produce (setup)",
        format!("{} x {} B, PutRecords 500/call, 4 in flight", p.records, p.payload),
        num(p.records as f64 / produced.as_secs_f64()),
        "records/s",
    )];

    let tuning = Tuning {
        poll_interval: Duration::from_millis(200),
        max_records_per_call: p.max_records_per_call,
        heartbeat_interval: Duration::from_millis(500),
        client_timeout: Duration::from_secs(3),
        ..Tuning::default()
    };
    let config = support::worker_config(&format!("bench/{stream}"), stream, table, tuning);
    let rss_reset = support::reset_peak_rss();
    let start = Instant::now();
    let counter = Counter::new(start, p.records);
    let shutdown = CancellationToken::new();
    let engine = tokio::spawn(engine::run(
        config,
        EngineOptions {
            client_id: Some("bench-e2e".into()),
            pod: Some("bench-e2e".into()),
        },
        counter.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(30))),
        shutdown.clone(),
    ));
    let finished = tokio::time::timeout(p.timeout, counter.reached()).await.is_ok();
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(30), engine).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => anyhow::bail!("engine failed: {e}"),
        Ok(Err(e)) => anyhow::bail!("engine task: {e}"),
        Err(_) => anyhow::bail!("engine did not stop within 30s of shutdown"),
    }
    let peak = support::peak_rss_kib();

    let distinct = counter.distinct();
    let shape = format!(
        "{} x {} B, {} shards, 1 engine, TRIM_HORIZON, {}/GetRecords",
        p.records, p.payload, p.shards, p.max_records_per_call
    );
    rows.push(Row::goal(
        "e2e delivered",
        format!("{shape}, in order per shard"),
        distinct.to_string(),
        "records",
        format!("= {} within {}s", p.records, p.timeout.as_secs()),
        finished && distinct == p.records,
    ));
    rows.push(Row::info(
        "e2e repeats",
        "records delivered twice (one engine, no failures)",
        counter.repeated().to_string(),
        "records",
    ));
    if finished {
        let last = counter.last();
        rows.push(Row::info(
            "e2e throughput",
            format!("{shape}, engine start -> last record"),
            num(p.records as f64 / last.as_secs_f64()),
            "records/s",
        ));
        if let Some(first) = counter.first() {
            rows.push(Row::info(
                "e2e throughput",
                "first record -> last record",
                num(p.records as f64 / (last - first).as_secs_f64().max(1e-9)),
                "records/s",
            ));
            rows.push(Row::info(
                "e2e time to first record",
                "engine start (table exists) -> first batch delivered",
                num(first.as_secs_f64() * 1000.0),
                "ms",
            ));
        }
    }
    rows.push(match peak {
        Some(kib) => Row::info(
            "e2e peak RSS",
            if rss_reset {
                "VmHWM of the process, reset before the engine started"
            } else {
                "VmHWM of the whole process (reset not permitted)"
            },
            num(kib as f64 / 1024.0),
            "MiB",
        ),
        None => Row::info("e2e peak RSS", "/proc/self/status unreadable", "-", "MiB"),
    });
    Ok(rows)
}
