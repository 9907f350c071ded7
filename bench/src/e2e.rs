//! End-to-end consume throughput: N records in a fresh stream, ONE engine reading from
//! TRIM_HORIZON into a counting handler until every record arrived.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kcg_worker::config::Tuning;
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use anyhow::Context;

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
    /// Folder with `node_modules/lifion-kinesis` for the side-by-side peer run, if any.
    pub peer_dir: Option<PathBuf>,
}

/// The peer's consumer script, shipped in this crate.
const PEER_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peer/lifion-consume.js");
/// The peer and version the script is written and installed for.
pub const PEER: &str = "lifion-kinesis 1.3.3";

/// Runs the benchmark on a fresh stream and table and always deletes both.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let stream = support::unique("e2e");
    let table = support::unique("e2e-state");
    let peer_table = support::unique("e2e-peer-state");
    let mut rows = match measure(aws, p, &stream, &table).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed("e2e consume", &e)],
    };
    // The peer reads the same records from the same stream after kcg is done.
    let kcg_ok = rows.iter().all(|r| r.pass != Some(false));
    match &p.peer_dir {
        Some(dir) if kcg_ok => {
            rows.extend(match peer(p, dir, &stream, &peer_table).await {
                Ok(rows) => rows,
                // The peer is a comparison, not a goal of ours: report, do not fail.
                Err(e) => vec![Row::info(
                    "e2e peer",
                    format!("{PEER}: ERROR {e:#}"),
                    "-",
                    "-",
                )],
            });
            if let Err(e) = aws
                .dynamodb
                .delete_table()
                .table_name(&peer_table)
                .send()
                .await
            {
                eprintln!("kcg-bench: could not delete table {peer_table}: {e}");
            }
        }
        Some(_) => {}
        None => rows.push(Row::info(
            "e2e peer",
            format!("{PEER}: skipped (--no-peer, or not installed: bench/run.sh installs it)"),
            "-",
            "-",
        )),
    }
    support::cleanup(aws, &stream, &table).await;
    rows
}

async fn measure(aws: &Aws, p: &Params, stream: &str, table: &str) -> anyhow::Result<Vec<Row>> {
    support::create(aws, stream, p.shards, table).await?;
    let produced = support::produce(&aws.kinesis, stream, p.records, p.payload, 4).await?;
    let mut rows = vec![Row::info(
        "produce (setup)",
        format!(
            "{} x {} B, PutRecords 500/call, 4 in flight",
            p.records, p.payload
        ),
        num(p.records as f64 / produced.as_secs_f64()),
        "records/s",
    )];

    let tuning = Tuning {
        poll_interval: Duration::from_millis(200),
        max_records_per_call: p.max_records_per_call,
        heartbeat_interval: Duration::from_millis(500),
        client_timeout: Duration::from_secs(3),
        // Checkpointing on, as in production (and often enough to happen during the run).
        checkpoint_interval: Duration::from_secs(1),
        ..Tuning::default()
    };
    let config = support::worker_config(&format!("bench/{stream}"), stream, table, tuning);
    let rss_reset = support::reset_peak_rss();
    // The producer is done: from here on this process only runs the engine (and the
    // counting handler), so its CPU time is the engine's.
    let cpu_start = support::process_cpu_split();
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
    let finished = tokio::time::timeout(p.timeout, counter.reached())
        .await
        .is_ok();
    let cpu_end = support::process_cpu_split();
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
        "kcg: {} x {} B, {} shards, 1 engine, TRIM_HORIZON, {}/GetRecords",
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
        "kcg: records delivered twice (one engine, no failures)",
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
                "kcg: first record -> last record",
                num(p.records as f64 / (last - first).as_secs_f64().max(1e-9)),
                "records/s",
            ));
            rows.push(Row::info(
                "e2e time to first record",
                "kcg: engine start (table exists) -> first batch delivered",
                num(first.as_secs_f64() * 1000.0),
                "ms",
            ));
        }
    }
    // Issue 2 "Efficiency": at most 2 us of CPU per record with checkpointing on and a
    // library handler that only counts.
    rows.push(match (cpu_start, cpu_end) {
        (Some(a), Some(b)) if finished => {
            let (user, sys) = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1));
            let us = (user + sys).as_secs_f64() * 1e6 / p.records as f64;
            Row::goal(
                "e2e CPU per record",
                format!(
                    "kcg: process CPU (utime+stime, 10 ms ticks) engine start -> last record, / records; checkpoint every 1s, counting handler; {:.0} ms user + {:.0} ms sys",
                    user.as_secs_f64() * 1000.0,
                    sys.as_secs_f64() * 1000.0
                ),
                num(us),
                "us",
                "<= 2",
                us <= 2.0,
            )
        }
        _ if !finished => Row::goal(
            "e2e CPU per record",
            "kcg: not every record arrived",
            "-",
            "us",
            "<= 2",
            false,
        ),
        _ => Row::goal(
            "e2e CPU per record",
            "/proc/self/stat unreadable",
            "-",
            "us",
            "<= 2",
            false,
        ),
    });
    // Steady state: from the first delivered batch to the last record, so the fixed
    // start-up (SDK config, table check, registration, first connections) is outside.
    if let (true, Some(((u0, s0), first_n)), Some((u1, s1))) =
        (finished, counter.first_cpu(), cpu_end)
    {
        let (user, sys) = (u1.saturating_sub(u0), s1.saturating_sub(s0));
        let n = p.records.saturating_sub(first_n).max(1);
        let us = (user + sys).as_secs_f64() * 1e6 / n as f64;
        rows.push(Row::goal(
            "e2e CPU per record",
            format!(
                "kcg steady state: process CPU first batch -> last record, / the {n} records after the first batch; {:.0} ms user + {:.0} ms sys",
                user.as_secs_f64() * 1000.0,
                sys.as_secs_f64() * 1000.0
            ),
            num(us),
            "us",
            "<= 2",
            us <= 2.0,
        ));
    }
    // The floor: the same records through a bare GetRecords loop (SDK only, no engine),
    // measured the same way, so kcg's own share is the difference.
    if finished {
        match bare_loop(aws, stream, p).await {
            Ok(b) => {
                rows.push(Row::info(
                    "e2e CPU per record",
                    format!(
                        "bare GetRecords loop (SDK only, 4 shards concurrently, {}/call, no engine): {} records in {} calls (max {}/call), {:.0} ms user + {:.0} ms sys",
                        p.max_records_per_call,
                        b.read,
                        b.calls,
                        b.max_per_call,
                        b.user.as_secs_f64() * 1000.0,
                        b.sys.as_secs_f64() * 1000.0
                    ),
                    num((b.user + b.sys).as_secs_f64() * 1e6 / b.read.max(1) as f64),
                    "us",
                ));
                if let Some(((u0, s0), first_n)) = b.first {
                    let cpu = b.user.saturating_sub(u0) + b.sys.saturating_sub(s0);
                    rows.push(Row::info(
                        "e2e CPU per record",
                        format!(
                            "bare loop steady state: first non-empty page -> end, / the {} records after it",
                            b.read.saturating_sub(first_n)
                        ),
                        num(cpu.as_secs_f64() * 1e6
                            / b.read.saturating_sub(first_n).max(1) as f64),
                        "us",
                    ));
                }
            }
            Err(e) => rows.push(Row::info(
                "e2e CPU per record",
                format!("bare GetRecords loop: ERROR {e:#}"),
                "-",
                "us",
            )),
        }
    }
    // Issue 2 "Efficiency": at most 48 MiB RSS while draining 4 shards.
    let rss_params = |what: &str| format!("{what}, draining {} shards", p.shards);
    rows.push(match peak {
        Some(kib) => {
            let mib = kib as f64 / 1024.0;
            Row::goal(
                "e2e peak RSS",
                rss_params(if rss_reset {
                    "kcg: VmHWM of the bench process, reset before the engine started"
                } else {
                    "kcg: VmHWM of the whole bench process (reset not permitted)"
                }),
                num(mib),
                "MiB",
                "<= 48",
                mib <= 48.0,
            )
        }
        None => Row::goal(
            "e2e peak RSS",
            "/proc/self/status unreadable",
            "-",
            "MiB",
            "<= 48",
            false,
        ),
    });
    Ok(rows)
}

/// Process CPU (user, system) when the first non-empty page arrived, and its size.
type FirstPage = (Option<(Duration, Duration)>, u64);

/// What the bare GetRecords loop did: CPU times are since its start; `first` is the CPU
/// (since its start) when the first non-empty page arrived, and that page's size.
struct Bare {
    read: u64,
    calls: u64,
    max_per_call: u64,
    user: Duration,
    sys: Duration,
    first: Option<((Duration, Duration), u64)>,
}

/// Reads every shard of `stream` from TRIM_HORIZON to its tip with plain GetRecords calls
/// (all shards at once), dropping the records.
async fn bare_loop(aws: &Aws, stream: &str, p: &Params) -> anyhow::Result<Bare> {
    use aws_sdk_kinesis::types::ShardIteratorType;
    let shards = aws
        .kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await?
        .shards
        .unwrap_or_default();
    let before = support::process_cpu_split().context("/proc/self/stat")?;
    let first: Arc<std::sync::OnceLock<FirstPage>> = Arc::new(std::sync::OnceLock::new());
    let mut set = tokio::task::JoinSet::new();
    for s in shards {
        let client = aws.kinesis.clone();
        let stream = stream.to_owned();
        let limit = p.max_records_per_call as i32;
        let first = first.clone();
        set.spawn(async move {
            let mut it = client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(s.shard_id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator;
            let (mut read, mut calls, mut max) = (0u64, 0u64, 0u64);
            while let Some(i) = it {
                let out = client
                    .get_records()
                    .shard_iterator(i)
                    .limit(limit)
                    .send()
                    .await?;
                let n = out.records.len() as u64;
                calls += 1;
                max = max.max(n);
                if n > 0 && first.get().is_none() {
                    let _ = first.set((support::process_cpu_split(), n));
                }
                read += n;
                if n == 0 && out.millis_behind_latest.unwrap_or(0) == 0 {
                    break;
                }
                it = out.next_shard_iterator;
            }
            anyhow::Ok((read, calls, max))
        });
    }
    let (mut read, mut calls, mut max_per_call) = (0, 0, 0);
    while let Some(r) = set.join_next().await {
        let (r, c, m) = r??;
        read += r;
        calls += c;
        max_per_call = max_per_call.max(m);
    }
    let after = support::process_cpu_split().context("/proc/self/stat")?;
    let since =
        |c: (Duration, Duration)| (c.0.saturating_sub(before.0), c.1.saturating_sub(before.1));
    let first = match first.get() {
        Some((Some(c), n)) => Some((since(*c), *n)),
        _ => None,
    };
    let (user, sys) = since(after);
    Ok(Bare {
        read,
        calls,
        max_per_call,
        user,
        sys,
        first,
    })
}

/// Runs the peer's consumer (Node) on the stream kcg just read and reports it the same way.
async fn peer(
    p: &Params,
    dir: &std::path::Path,
    stream: &str,
    table: &str,
) -> anyhow::Result<Vec<Row>> {
    let run = tokio::process::Command::new("node")
        .arg(PEER_SCRIPT)
        .env("NODE_PATH", dir.join("node_modules"))
        .env("NODE_NO_WARNINGS", "1")
        .env("PEER_STREAM", stream)
        .env("PEER_TABLE", table)
        .env("PEER_COUNT", p.records.to_string())
        .env("PEER_TIMEOUT_MS", p.timeout.as_millis().to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(p.timeout + Duration::from_secs(30), run)
        .await
        .context("timed out")?
        .context("starting node")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "no result (exit {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(line).context("parsing its result")?;
    let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let count = f("count").unwrap_or(0.0) as u64;
    let shape = format!(
        "{PEER}: same stream, 1 consumer, polling, TRIM_HORIZON, 10000/GetRecords, 200ms gap"
    );
    let mut rows = vec![Row::info(
        "e2e delivered",
        format!("{shape}, in order per shard"),
        count.to_string(),
        "records",
    )];
    rows.push(Row::info(
        "e2e repeats",
        format!("{PEER}: records delivered twice"),
        (f("repeated").unwrap_or(0.0) as u64).to_string(),
        "records",
    ));
    if let (Some(first), Some(last), true) = (f("firstMs"), f("lastMs"), count >= p.records) {
        rows.push(Row::info(
            "e2e throughput",
            format!("{PEER}: consumer created (creates its table) -> last record"),
            num(count as f64 / (last / 1000.0)),
            "records/s",
        ));
        rows.push(Row::info(
            "e2e throughput",
            format!("{PEER}: first record -> last record (checkpoints every batch)"),
            num(count as f64 / ((last - first).max(1e-6) / 1000.0)),
            "records/s",
        ));
        rows.push(Row::info(
            "e2e time to first record",
            format!("{PEER}: consumer created -> first batch delivered"),
            num(first),
            "ms",
        ));
    }
    if let Some(kib) = f("maxRssKiB") {
        rows.push(Row::info(
            "e2e peak RSS",
            format!("{PEER}: maxRSS of the node process"),
            num(kib / 1024.0),
            "MiB",
        ));
    }
    Ok(rows)
}
