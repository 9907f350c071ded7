//! Failover and joins as a user sees them (issue 9 part 3): real `kcg-worker` processes
//! (the release build next to `kcg-bench`) with the DEFAULT tuning, each with its stdout sink
//! redirected into a file of its own, while a record is written into every shard every
//! 100 ms. The bench tails the files (every 10 ms) and times, from the signal or the exec,
//! until a record of each affected shard appears in some worker's file.
//!
//! Each round, with a (pod `w-a`) and b settled on the shards:
//! 1. **join**: c starts; until c's file holds a record;
//! 2. **graceful stop**: c gets SIGTERM (duplicates only; expected none);
//! 3. **restart in the pod**: a is SIGKILLed and started again at once with the same
//!    `POD_NAME` and `POD_UID`, as the kubelet restarts a container; until every shard a
//!    read appears again;
//! 4. **kill**: b is SIGKILLed and not restarted; until every shard b read appears in a's
//!    file. Then a new b joins (timed as a join too).
//!
//! Duplicates (a (shard, sequence) already in some file) are counted per event, up to the
//! next one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::report::{Row, median, num};
use crate::support::{self, Aws};

/// The worker config, command line, producer and output parsing the failover test
/// (`worker/tests/failover_processes.rs`) uses too.
#[path = "../../worker/tests/process_support/fleet.rs"]
mod fleet;

/// Shards of the stream (two workers read two each).
const SHARDS: i32 = 4;
/// A record into every shard this often.
const PRODUCE_EVERY: Duration = Duration::from_millis(100);
/// How often the output files are read.
const TAIL_EVERY: Duration = Duration::from_millis(10);
/// The goals (issue 9 part 3), in ms.
const GOAL_KILL_MS: f64 = 6000.0;
const GOAL_RESTART_MS: f64 = 2000.0;
const GOAL_JOIN_MS: f64 = 2000.0;

/// What the benchmark is given.
pub struct Params {
    /// Rounds (each: join, graceful stop, restart in the pod, kill + join).
    pub rounds: usize,
}

/// Runs the benchmark on a fresh stream and table and always deletes both.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let stream = support::unique("failover");
    let table = support::unique("failover-state");
    let rows = match measure(aws, p, &stream, &table).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed("failover", &e)],
    };
    support::cleanup(aws, &stream, &table).await;
    rows
}

/// The kinds of event, for the per-event results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Join,
    Graceful,
    Restart,
    Kill,
}

/// One line of a worker's file, stamped when the bench read it.
struct Line {
    at: Instant,
    shard: String,
}

/// One worker process and what its file held so far.
struct Worker {
    child: Child,
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
    lines: Vec<Line>,
    alive: bool,
}

/// Every worker of the run, the records seen, and the duplicates per event.
struct Group {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    workers: BTreeMap<String, Worker>,
    seen: HashSet<(String, String)>,
    /// The event whose duplicates are being counted, and the counts per event.
    current: Option<(Event, usize)>,
    duplicates: Vec<(Event, usize, usize)>,
}

impl Group {
    /// Starts worker `name` in pod `pod` (with `POD_UID` `uid`).
    fn start(&mut self, name: &str, pod: &str, uid: &str) -> anyhow::Result<()> {
        let path = self.dir.join(format!("{name}.jsonl"));
        let out = std::fs::File::create(&path).context("creating an output file")?;
        let child = fleet::run_command(&self.bin, &self.config)
            .env("POD_NAME", pod)
            .env("POD_UID", uid)
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.workers.insert(
            name.to_owned(),
            Worker {
                child,
                path,
                pos: 0,
                partial: Vec::new(),
                lines: Vec::new(),
                alive: true,
            },
        );
        Ok(())
    }

    fn signal(&mut self, name: &str, signal: &str) -> anyhow::Result<()> {
        let w = self.workers.get_mut(name).context("no such worker")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), w.child.id().to_string()])
            .status()
            .context("kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {name} failed");
        Ok(())
    }

    /// SIGKILL, and reaped (as the kubelet waits for the container to exit); then its
    /// file's last lines are read.
    fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        self.signal(name, "KILL")?;
        let w = self.workers.get_mut(name).context("no such worker")?;
        w.child.wait().context("reaping")?;
        w.alive = false;
        self.tail()
    }

    /// Reads every file's new lines, counting duplicates for the current event.
    fn tail(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for (name, w) in &mut self.workers {
            if w.alive && w.child.try_wait().context("checking a worker")?.is_some() {
                anyhow::bail!("worker {name} exited on its own");
            }
            let mut file = std::fs::File::open(&w.path).context("opening an output file")?;
            file.seek(SeekFrom::Start(w.pos)).context("seeking")?;
            let mut buf = Vec::new();
            w.pos += file.read_to_end(&mut buf).context("reading")? as u64;
            w.partial.extend_from_slice(&buf);
            while let Some(end) = w.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = w.partial.drain(..=end).collect();
                let (shard, seq) = fleet::delivery(&line).with_context(|| {
                    format!("{name}: not a delivery: {}", String::from_utf8_lossy(&line))
                })?;
                if !self.seen.insert((shard.clone(), seq))
                    && let Some((_, n)) = &mut self.current
                {
                    *n += 1;
                }
                w.lines.push(Line { at: now, shard });
            }
        }
        Ok(())
    }

    /// Starts counting duplicates for `event`, which affects `shards` shards.
    fn begin(&mut self, event: Event, shards: usize) {
        self.end();
        self.current = Some((event, 0));
        self.duplicates.push((event, shards, 0));
    }

    fn end(&mut self) {
        if let (Some((_, n)), Some(last)) = (self.current.take(), self.duplicates.last_mut()) {
            last.2 = n;
        }
    }

    /// Shards worker `name` delivered within `window` before now.
    fn recent_shards(&self, name: &str, window: Duration) -> BTreeSet<String> {
        let since = Instant::now() - window;
        self.workers.get(name).map_or_else(BTreeSet::new, |w| {
            w.lines
                .iter()
                .rev()
                .take_while(|l| l.at >= since)
                .map(|l| l.shard.clone())
                .collect()
        })
    }

    /// Tails until every shard of `shards` has a line read after `since` in a running
    /// worker's file (`only`: in that worker's); returns when the last one came.
    async fn until_read(
        &mut self,
        shards: &BTreeSet<String>,
        since: Instant,
        only: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        loop {
            self.tail()?;
            let mut last = Some(since);
            for shard in shards {
                let first = self
                    .workers
                    .iter()
                    .filter(|(n, w)| w.alive && only.is_none_or(|o| o == n.as_str()))
                    .filter_map(|(_, w)| {
                        w.lines
                            .iter()
                            .find(|l| l.at > since && &l.shard == shard)
                            .map(|l| l.at)
                    })
                    .min();
                last = match (last, first) {
                    (Some(l), Some(f)) => Some(l.max(f)),
                    _ => None,
                };
            }
            if let Some(at) = last {
                return Ok(at - since);
            }
            anyhow::ensure!(
                since.elapsed() < timeout,
                "not every shard of {shards:?} read again within {timeout:?}"
            );
            tokio::time::sleep(TAIL_EVERY).await;
        }
    }

    /// Waits until, over the last second, each shard came from exactly one running worker,
    /// every running worker read some and their counts differ by at most one, plus a
    /// second more; fails after 30 s.
    async fn settle(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let window = Duration::from_millis(1500);
        loop {
            self.tail()?;
            let running: Vec<String> = self
                .workers
                .iter()
                .filter(|(_, w)| w.alive)
                .map(|(n, _)| n.clone())
                .collect();
            let sets: Vec<BTreeSet<String>> = running
                .iter()
                .map(|n| self.recent_shards(n, window))
                .collect();
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<&String> = sets.iter().flatten().collect();
            let (min, max) = (
                sets.iter().map(BTreeSet::len).min().unwrap_or(0),
                sets.iter().map(BTreeSet::len).max().unwrap_or(0),
            );
            if union.len() == SHARDS as usize && total == union.len() && min >= 1 && max - min <= 1
            {
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    self.tail()?;
                    tokio::time::sleep(TAIL_EVERY).await;
                }
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "workers {running:?} did not settle within 30 s: {sets:?}"
            );
            tokio::time::sleep(TAIL_EVERY).await;
        }
    }

    /// SIGTERM to every running worker (SIGKILL after 30 s).
    fn stop_all(&mut self) {
        for w in self.workers.values_mut().filter(|w| w.alive) {
            let _ = Command::new("kill")
                .args(["-TERM", &w.child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for w in self.workers.values_mut().filter(|w| w.alive) {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = w.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
            w.alive = false;
        }
    }
}

async fn measure(aws: &Aws, p: &Params, stream: &str, table: &str) -> anyhow::Result<Vec<Row>> {
    let bin = crate::sink::worker_binary()?;
    support::create(aws, stream, SHARDS, table).await?;
    let dir = std::env::temp_dir().join(stream);
    std::fs::create_dir_all(&dir).context("creating a temp dir")?;
    let config = dir.join("config.yaml");
    // The default tuning: nothing but the stream, the table and the sink.
    std::fs::write(
        &config,
        fleet::stdout_config(&format!("bench/{stream}"), stream, table, ""),
    )
    .context("writing the config")?;
    let mut producer =
        fleet::Producer::start(aws.kinesis.clone(), stream.to_owned(), PRODUCE_EVERY);
    let mut g = Group {
        bin,
        dir: dir.clone(),
        config,
        workers: BTreeMap::new(),
        seen: HashSet::new(),
        current: None,
        duplicates: Vec::new(),
    };
    let result = rounds(&mut g, p).await;
    g.stop_all();
    let produced = producer.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let times = result?;
    produced.context("the producer failed")?;
    Ok(rows(&times, &g.duplicates, p.rounds))
}

/// The rounds; returns every timing per event, in ms.
async fn rounds(g: &mut Group, p: &Params) -> anyhow::Result<BTreeMap<Event, Vec<f64>>> {
    let mut times: BTreeMap<Event, Vec<f64>> = BTreeMap::new();
    let uid = |n: &str| format!("{n}-{:08x}", std::process::id());
    g.start("a0", "w-a", &uid("a"))?;
    g.start("b0", "w-b0", &uid("b0"))?;
    g.settle().await?;
    let (mut a, mut b) = ("a0".to_owned(), "b0".to_owned());
    for round in 0..p.rounds.max(1) {
        // 1. A join.
        let c = format!("c{round}");
        g.begin(Event::Join, 0);
        let t0 = Instant::now();
        g.start(&c, &format!("w-{c}"), &uid(&c))?;
        let any = g.until_first_line(&c, t0).await?;
        times.entry(Event::Join).or_default().push(ms(any));
        g.settle().await?;

        // 2. Graceful stop of the joiner.
        let shards = g.recent_shards(&c, Duration::from_secs(1)).len();
        g.begin(Event::Graceful, shards);
        g.signal(&c, "TERM")?;
        let w = g.workers.get_mut(&c).context("c")?;
        w.child.wait().context("waiting for c")?;
        w.alive = false;
        g.settle().await?;

        // 3. The container restarts in its pod: same POD_NAME and POD_UID.
        let shards = g.recent_shards(&a, Duration::from_secs(1));
        g.begin(Event::Restart, shards.len());
        let t0 = Instant::now();
        g.kill(&a)?;
        a = format!("a{}", round + 1);
        g.start(&a, "w-a", &uid("a"))?;
        let took = g
            .until_read(&shards, t0, None, Duration::from_secs(30))
            .await?;
        times.entry(Event::Restart).or_default().push(ms(took));
        g.settle().await?;

        // 4. b is killed and not restarted; then a new b joins.
        let shards = g.recent_shards(&b, Duration::from_secs(1));
        g.begin(Event::Kill, shards.len());
        let t0 = Instant::now();
        g.kill(&b)?;
        let took = g
            .until_read(&shards, t0, None, Duration::from_secs(30))
            .await?;
        times.entry(Event::Kill).or_default().push(ms(took));
        g.settle().await?;
        b = format!("b{}", round + 1);
        g.begin(Event::Join, 0);
        let t0 = Instant::now();
        g.start(&b, &format!("w-{b}"), &uid(&b))?;
        let first = g.until_first_line(&b, t0).await?;
        times.entry(Event::Join).or_default().push(ms(first));
        g.settle().await?;
    }
    g.end();
    Ok(times)
}

impl Group {
    /// Tails until worker `name`'s file holds a line; returns when it came.
    async fn until_first_line(&mut self, name: &str, since: Instant) -> anyhow::Result<Duration> {
        loop {
            self.tail()?;
            if let Some(l) = self.workers.get(name).and_then(|w| w.lines.first()) {
                return Ok(l.at - since);
            }
            anyhow::ensure!(
                since.elapsed() < Duration::from_secs(30),
                "{name} delivered nothing within 30 s"
            );
            tokio::time::sleep(TAIL_EVERY).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The result rows: times (median / max against the goal) and duplicates per event.
fn rows(
    times: &BTreeMap<Event, Vec<f64>>,
    dups: &[(Event, usize, usize)],
    rounds: usize,
) -> Vec<Row> {
    let shape = format!(
        "kcg-worker (release) processes, default tuning, {SHARDS} shards, a record into each every {} ms",
        PRODUCE_EVERY.as_millis()
    );
    let timed = |event: Event, what: &str, goal: f64| {
        let v = times.get(&event).cloned().unwrap_or_default();
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        Row::goal(
            "failover",
            format!(
                "{what}, median / max of {}: {}; {shape}",
                v.len(),
                v.iter()
                    .map(|t| format!("{t:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("{} / {}", num(median(v.iter().copied())), num(max)),
            "ms",
            format!("max <= {goal:.0}"),
            !v.is_empty() && max <= goal,
        )
    };
    let per_shard_bound = per_shard_bound();
    let dup_row = |event: Event, what: &str| {
        let of: Vec<&(Event, usize, usize)> = dups.iter().filter(|d| d.0 == event).collect();
        let max = of.iter().map(|d| d.2).max().unwrap_or(0);
        let (goal, pass) = match event {
            Event::Join | Event::Graceful => ("= 0".to_owned(), of.iter().all(|d| d.2 == 0)),
            Event::Restart | Event::Kill => (
                format!("<= 1 checkpoint interval of its shards ({per_shard_bound}/shard)"),
                of.iter().all(|d| d.2 <= d.1 * per_shard_bound),
            ),
        };
        Row::goal(
            "failover duplicates",
            format!(
                "{what}: records delivered twice, per event ({rounds} rounds): {}",
                of.iter()
                    .map(|d| d.2.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            max.to_string(),
            "records",
            goal,
            pass,
        )
    };
    vec![
        timed(
            Event::Kill,
            "SIGKILL (not restarted) -> each of its shards read again by the others",
            GOAL_KILL_MS,
        ),
        timed(
            Event::Restart,
            "container restarted in its pod (SIGKILL, exec with the same POD_NAME and POD_UID) -> each of its shards read again",
            GOAL_RESTART_MS,
        ),
        timed(
            Event::Join,
            "a new process (exec) -> its first record",
            GOAL_JOIN_MS,
        ),
        dup_row(Event::Join, "join"),
        dup_row(Event::Graceful, "graceful stop (SIGTERM)"),
        dup_row(Event::Restart, "restart in the pod"),
        dup_row(Event::Kill, "SIGKILL"),
    ]
}

/// Records a crash may redeliver per shard: one default `checkpointInterval` of them.
fn per_shard_bound() -> usize {
    let interval = kcg_worker::config::defaults::checkpoint_interval();
    (interval.as_millis() / PRODUCE_EVERY.as_millis()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(times: &[(Event, &[f64])], dups: &[(Event, usize, usize)]) -> Vec<Option<bool>> {
        let times = times.iter().map(|(e, v)| (*e, v.to_vec())).collect();
        rows(&times, dups, 1).iter().map(|r| r.pass).collect()
    }

    #[test]
    fn goals_and_duplicate_bounds() {
        let good: &[(Event, &[f64])] = &[
            (Event::Kill, &[4200.0, 5900.0]),
            (Event::Restart, &[600.0]),
            (Event::Join, &[900.0, 1990.0]),
        ];
        let clean = [
            (Event::Join, 0, 0),
            (Event::Graceful, 2, 0),
            (Event::Restart, 2, 2 * per_shard_bound()),
            (Event::Kill, 2, 37),
        ];
        assert_eq!(verdicts(good, &clean), vec![Some(true); 7]);
        let slow: &[(Event, &[f64])] = &[
            (Event::Kill, &[4200.0, 6100.0]),
            (Event::Restart, &[2100.0]),
            (Event::Join, &[]),
        ];
        assert_eq!(
            verdicts(slow, &clean)[..3],
            [Some(false), Some(false), Some(false)],
            "a max over the goal, or no measurement at all, misses"
        );
        let noisy = [
            (Event::Join, 0, 1),
            (Event::Graceful, 2, 1),
            (Event::Restart, 2, 2 * per_shard_bound() + 1),
            (Event::Kill, 1, per_shard_bound() + 1),
        ];
        assert_eq!(verdicts(good, &noisy)[3..], [Some(false); 4]);
    }
}
