//! The stdout sink as a user runs it: the real `kcg-worker` binary (release build, next to
//! `kcg-bench`), its stdout redirected to a file, reading N records from TRIM_HORIZON. CPU
//! per record is the worker process's whole CPU (utime + stime from `/proc/<pid>/stat`, from
//! exec to the moment the file holds every line, start-up included) divided by N.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::e2e::Params;
use crate::report::{Row, median, num};
use crate::support::{self, Aws};

/// The goal: CPU per record of the whole worker process, start-up included (issue 10).
const GOAL_US: f64 = 2.0;

/// `kcg-worker` next to this benchmark's own executable (bench/run.sh builds both with
/// `--release`).
pub(crate) fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating kcg-bench")?;
    let bin = me.with_file_name("kcg-worker");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: cargo build --release -p kcg-worker --bin kcg-worker (bench/run.sh does)",
        bin.display()
    );
    Ok(bin)
}

/// Runs the benchmark on a fresh stream and table and always deletes both. Takes the e2e
/// benchmark's parameters (records, runs, payload, shards, batch size, timeout).
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let stream = support::unique("sink");
    let table = support::unique("sink-state");
    let rows = match measure(aws, p, &stream, &table).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed("stdout sink", &e)],
    };
    support::cleanup(aws, &stream, &table).await;
    rows
}

/// One worker run: its CPU, the lines it wrote and the distinct records among them.
struct SinkRun {
    user: Duration,
    sys: Duration,
    lines: u64,
    distinct: u64,
    wall: Duration,
}

impl SinkRun {
    fn us_per_record(&self, records: u64) -> f64 {
        (self.user + self.sys).as_secs_f64() * 1e6 / records.max(1) as f64
    }
}

async fn measure(aws: &Aws, p: &Params, stream: &str, table: &str) -> anyhow::Result<Vec<Row>> {
    let bin = worker_binary()?;
    support::create(aws, stream, p.shards, table).await?;
    support::produce(&aws.kinesis, stream, p.records, p.payload, 4).await?;
    let dir = std::env::temp_dir().join(stream);
    std::fs::create_dir_all(&dir).context("creating a temp dir")?;
    let mut runs = Vec::new();
    for i in 0..p.runs.max(1) {
        let group = format!("bench/{stream}-{i}");
        let run = worker_run(&bin, &dir, p, &group, stream, table).await;
        // Each output file holds ~100 MB: remove them whatever happened.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            entries.flatten().for_each(|e| {
                let _ = std::fs::remove_file(e.path());
            });
        }
        runs.push(run.with_context(|| format!("run {i}"))?);
    }
    let _ = std::fs::remove_dir(&dir);
    let shape = format!(
        "kcg-worker (release) > file: {} x {} B, {} shards, TRIM_HORIZON, {}/GetRecords, {} run(s)",
        p.records,
        p.payload,
        p.shards,
        p.max_records_per_call,
        runs.len()
    );
    let complete = runs.iter().all(|r| r.distinct == p.records);
    let mut rows = vec![Row::goal(
        "sink delivered",
        format!("{shape}: distinct records in the file"),
        runs.iter()
            .map(|r| r.distinct)
            .min()
            .unwrap_or(0)
            .to_string(),
        "records",
        format!("= {}", p.records),
        complete,
    )];
    let each = runs
        .iter()
        .map(|r| {
            format!(
                "{:.2} us ({:.0}+{:.0} ms, {} lines, {:.1} s)",
                r.us_per_record(p.records),
                r.user.as_secs_f64() * 1000.0,
                r.sys.as_secs_f64() * 1000.0,
                r.lines,
                r.wall.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let us = median(runs.iter().map(|r| r.us_per_record(p.records)));
    rows.push(Row::goal(
        "sink CPU per record",
        format!(
            "stdout sink into a file: worker process CPU (user + system, /proc/<pid>/stat) from exec to the last line, start-up included, / records: {each}"
        ),
        num(us),
        "us",
        format!("<= {GOAL_US}"),
        complete && us <= GOAL_US,
    ));
    Ok(rows)
}

/// Starts the worker with stdout into a file, waits until the file holds `records` lines,
/// samples the process's CPU, stops it with SIGTERM and checks the lines.
async fn worker_run(
    bin: &Path,
    dir: &Path,
    p: &Params,
    group: &str,
    stream: &str,
    table: &str,
) -> anyhow::Result<SinkRun> {
    let config = dir.join(format!("{}.yaml", group.replace('/', "-")));
    std::fs::write(
        &config,
        format!(
            "group: {group}\nstreams:\n  - name: {stream}\n    startPosition: TrimHorizon\n\
             stateStore:\n  table: {table}\ndelivery:\n  stdout: {{}}\ntuning:\n  \
             pollInterval: 200ms\n  minCallInterval: 200ms\n  checkpointInterval: 1s\n  \
             maxRecordsPerCall: {}\n",
            p.max_records_per_call
        ),
    )
    .context("writing the config")?;
    let out_path = dir.join(format!("{}.jsonl", group.replace('/', "-")));
    let out = std::fs::File::create(&out_path).context("creating the output file")?;
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let result = wait_lines(&mut child, &out_path, p.records, p.timeout).await;
    let cpu = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .ok()
        .and_then(|s| support::cpu_ticks_from_stat(&s));
    let wall = started.elapsed();
    stop(&mut child);
    result?;
    let (utime, stime) = cpu.context("/proc/<pid>/stat unreadable")?;
    let (lines, distinct) = count_distinct(&out_path)?;
    Ok(SinkRun {
        user: Duration::from_millis(utime * 10),
        sys: Duration::from_millis(stime * 10),
        lines,
        distinct,
        wall,
    })
}

/// Polls the file's new bytes for newlines until it holds `want` lines.
async fn wait_lines(
    child: &mut Child,
    path: &Path,
    want: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path).context("opening the output file")?;
    let (mut lines, mut pos) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + timeout;
    loop {
        file.seek(SeekFrom::Start(pos)).context("seeking")?;
        loop {
            let n = file.read(&mut buf).context("reading the output file")?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        if lines >= want {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("checking the worker")? {
            anyhow::bail!("kcg-worker exited ({status}) after {lines} of {want} lines");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {lines} of {want} lines"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM (graceful stop), then SIGKILL if it lingers.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Lines in the file and distinct (shard, sequence) among them; every line must be JSON.
fn count_distinct(path: &Path) -> anyhow::Result<(u64, u64)> {
    let file = std::fs::File::open(path).context("opening the output file")?;
    let mut seen = BTreeSet::new();
    let mut lines = 0;
    for line in BufReader::new(file).lines() {
        let line = line.context("reading a line")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        let key = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        seen.insert((key("shard"), key("sequence")));
        lines += 1;
    }
    Ok((lines, seen.len() as u64))
}
