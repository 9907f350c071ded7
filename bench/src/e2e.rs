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

use crate::report::{Row, median, num};
use crate::support::{self, Aws, Counter};

/// Parameters of the throughput run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Records produced and consumed.
    pub records: u64,
    /// Engine (and bare-loop) reads of those records; CPU rows give the median.
    pub runs: usize,
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
    // The peer reads the same records from the same stream after kcg is done (whether or
    // not kcg met its CPU and memory goals: only a stream kcg could not drain is skipped).
    let kcg_ok = rows
        .iter()
        .any(|r| r.bench == "e2e delivered" && r.pass == Some(true));
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

    // CPU time on a shared 2-core machine moves by +-20% from one run to the next, so the
    // engine and the bare loop each read the stream `runs` times and the rows give medians.
    let mut runs = Vec::new();
    for i in 0..p.runs.max(1) {
        // A new group each time: no checkpoints, TRIM_HORIZON again.
        let run = engine_run(p, &format!("bench/{stream}-{i}"), stream, table).await?;
        let complete = run.complete;
        runs.push(run);
        if !complete {
            break;
        }
    }
    let shape = format!(
        "kcg: {} x {} B, {} shards, 1 engine, TRIM_HORIZON, {}/GetRecords",
        p.records, p.payload, p.shards, p.max_records_per_call
    );
    let n = runs.len();
    let all_complete = runs.iter().all(|r| r.complete);
    rows.push(Row::goal(
        "e2e delivered",
        format!("{shape}, in order per shard, {n} run(s)"),
        runs.iter()
            .map(|r| r.distinct)
            .min()
            .unwrap_or(0)
            .to_string(),
        "records",
        format!("= {} within {}s", p.records, p.timeout.as_secs()),
        all_complete,
    ));
    rows.push(Row::info(
        "e2e repeats",
        "kcg: records delivered twice (one engine, no failures), all runs",
        runs.iter().map(|r| r.repeated).sum::<u64>().to_string(),
        "records",
    ));
    if all_complete {
        let rate = |d: Duration| p.records as f64 / d.as_secs_f64().max(1e-9);
        rows.push(Row::info(
            "e2e throughput",
            format!("{shape}, engine start -> last record, median of {n}"),
            num(median(runs.iter().map(|r| rate(r.last)))),
            "records/s",
        ));
        rows.push(Row::info(
            "e2e throughput",
            format!("kcg: first record -> last record, median of {n}"),
            num(median(runs.iter().map(|r| rate(r.last - r.first)))),
            "records/s",
        ));
        rows.push(Row::info(
            "e2e time to first record",
            format!("kcg: engine start (table exists) -> first batch delivered, median of {n}"),
            num(median(runs.iter().map(|r| r.first.as_secs_f64() * 1000.0))),
            "ms",
        ));
    }
    // Issue 2 "Efficiency": at most 2 us of CPU per record with checkpointing on and a
    // library handler that only counts; once from engine start, once in steady state (from
    // the first delivered batch, so the fixed start-up is outside).
    let whole: Vec<CpuSpan> = runs.iter().filter_map(|r| r.whole).collect();
    let steady: Vec<CpuSpan> = runs.iter().filter_map(|r| r.steady).collect();
    rows.push(cpu_row(
        &format!(
            "kcg: process CPU (utime+stime, 10 ms ticks) engine start -> last record, / records; checkpoint every 1s, counting handler; median of {n}"
        ),
        all_complete,
        &whole,
    ));
    rows.push(cpu_row(
        &format!(
            "kcg steady state: process CPU first batch -> last record, / the records after the first batch; median of {n}"
        ),
        all_complete,
        &steady,
    ));
    // For comparison: the same records through a bare GetRecords loop (the SDK alone, with
    // its own decoder; no engine), measured the same way and as often.
    if all_complete {
        let mut bare = Vec::new();
        for _ in 0..n {
            match bare_loop(aws, stream, p).await {
                Ok(b) => bare.push(b),
                Err(e) => {
                    rows.push(Row::info(
                        "e2e CPU per record",
                        format!("bare GetRecords loop: ERROR {e:#}"),
                        "-",
                        "us",
                    ));
                    break;
                }
            }
        }
        if let Some(b) = bare.first() {
            let whole: Vec<CpuSpan> = bare.iter().map(|b| b.whole).collect();
            let steady: Vec<CpuSpan> = bare.iter().filter_map(|b| b.steady).collect();
            rows.push(Row::info(
                "e2e CPU per record",
                format!(
                    "bare GetRecords loop (SDK only, 4 shards concurrently, {}/call, no engine): {} records in {} calls (max {}/call); median of {}: {}",
                    p.max_records_per_call,
                    b.read,
                    b.calls,
                    b.max_per_call,
                    whole.len(),
                    spans(&whole)
                ),
                num(median(whole.iter().map(CpuSpan::us_per_record))),
                "us",
            ));
            if !steady.is_empty() {
                rows.push(Row::info(
                    "e2e CPU per record",
                    format!(
                        "bare loop steady state: first non-empty page -> end; median of {}: {}",
                        steady.len(),
                        spans(&steady)
                    ),
                    num(median(steady.iter().map(CpuSpan::us_per_record))),
                    "us",
                ));
            }
        }
    }
    // Issue 2 "Efficiency": at most 48 MiB RSS while draining 4 shards.
    let peaks: Vec<u64> = runs.iter().filter_map(|r| r.peak_kib).collect();
    rows.push(match peaks.iter().max() {
        Some(&kib) if peaks.len() == n => {
            let mib = kib as f64 / 1024.0;
            let what = if runs.iter().all(|r| r.rss_reset) {
                "kcg: VmHWM of the bench process, reset before each engine run"
            } else {
                "kcg: VmHWM of the whole bench process (reset not permitted)"
            };
            Row::goal(
                "e2e peak RSS",
                format!("{what}, draining {} shards; highest of {n}", p.shards),
                num(mib),
                "MiB",
                "<= 48",
                mib <= 48.0,
            )
        }
        _ => Row::goal(
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

/// Process CPU spent on some records.
#[derive(Clone, Copy, Debug)]
struct CpuSpan {
    user: Duration,
    sys: Duration,
    records: u64,
}

impl CpuSpan {
    /// From two `(user, system)` samples of the process.
    fn between(from: (Duration, Duration), to: (Duration, Duration), records: u64) -> Self {
        Self {
            user: to.0.saturating_sub(from.0),
            sys: to.1.saturating_sub(from.1),
            records,
        }
    }

    fn us_per_record(&self) -> f64 {
        (self.user + self.sys).as_secs_f64() * 1e6 / self.records.max(1) as f64
    }
}

/// `2.05 us (180+25 ms / 190000), ...` for the params column.
fn spans(s: &[CpuSpan]) -> String {
    s.iter()
        .map(|c| {
            format!(
                "{:.2} us ({:.0}+{:.0} ms / {})",
                c.us_per_record(),
                c.user.as_secs_f64() * 1000.0,
                c.sys.as_secs_f64() * 1000.0,
                c.records
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A CPU-per-record goal row (<= 2 us) over the runs' spans.
fn cpu_row(what: &str, complete: bool, spans_: &[CpuSpan]) -> Row {
    if !complete {
        return Row::goal(
            "e2e CPU per record",
            "kcg: not every record arrived",
            "-",
            "us",
            "<= 2",
            false,
        );
    }
    if spans_.is_empty() {
        return Row::goal(
            "e2e CPU per record",
            "/proc/self/stat unreadable",
            "-",
            "us",
            "<= 2",
            false,
        );
    }
    let us = median(spans_.iter().map(CpuSpan::us_per_record));
    Row::goal(
        "e2e CPU per record",
        format!("{what}: {}", spans(spans_)),
        num(us),
        "us",
        "<= 2",
        us <= 2.0,
    )
}

/// One engine reading the stream from TRIM_HORIZON as group `group` until every record
/// arrived.
struct EngineRun {
    complete: bool,
    distinct: u64,
    repeated: u64,
    first: Duration,
    last: Duration,
    whole: Option<CpuSpan>,
    steady: Option<CpuSpan>,
    peak_kib: Option<u64>,
    rss_reset: bool,
}

async fn engine_run(
    p: &Params,
    group: &str,
    stream: &str,
    table: &str,
) -> anyhow::Result<EngineRun> {
    // The worker's defaults (heartbeat 1 s, client timeout 4 s, ...) except: polls at
    // Kinesis' limit of 5 calls/s per shard to drain fast (also at the tip:
    // minCallInterval 200ms), and checkpoints every second (5x
    // the default) so several checkpoints land inside the measured window.
    let tuning = Tuning {
        poll_interval: Duration::from_millis(200),
        min_call_interval: Duration::from_millis(200),
        max_records_per_call: p.max_records_per_call,
        checkpoint_interval: Duration::from_secs(1),
        ..Tuning::default()
    };
    let config = support::worker_config(group, stream, table, tuning);
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
    let distinct = counter.distinct();
    let whole = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(CpuSpan::between(a, b, p.records)),
        _ => None,
    };
    let steady = match (counter.first_cpu(), cpu_end) {
        (Some((a, first_n)), Some(b)) => {
            Some(CpuSpan::between(a, b, p.records.saturating_sub(first_n)))
        }
        _ => None,
    };
    Ok(EngineRun {
        complete: finished && distinct == p.records,
        distinct,
        repeated: counter.repeated(),
        first: counter.first().unwrap_or_default(),
        last: counter.last(),
        whole,
        steady,
        peak_kib: support::peak_rss_kib(),
        rss_reset,
    })
}

/// Process CPU (user, system) when the first non-empty page arrived, and its size.
type FirstPage = (Option<(Duration, Duration)>, u64);

/// What the bare GetRecords loop did: its CPU from start to end, and from the first
/// non-empty page to the end (steady state).
struct Bare {
    read: u64,
    calls: u64,
    max_per_call: u64,
    whole: CpuSpan,
    steady: Option<CpuSpan>,
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
    let steady = match first.get() {
        Some((Some(c), n)) => Some(CpuSpan::between(*c, after, read.saturating_sub(*n))),
        _ => None,
    };
    Ok(Bare {
        read,
        calls,
        max_per_call,
        whole: CpuSpan::between(before, after, read),
        steady,
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
    if let (Some(us), true) = (f("cpuUs"), count > 0) {
        rows.push(Row::info(
            "e2e CPU per record",
            format!("{PEER}: process CPU (user + system) from consumer created -> last record"),
            num(us / count as f64),
            "us",
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
