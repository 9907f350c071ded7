//! Scale: one group of many engines on a stream of thousands of shards (issue 9, "Scale").
//!
//! kinesis-local creates at most 1,000 shards per stream, so a group of more shards reads
//! several streams of at most 1,000 each: all its lease rows are still one partition, which
//! is what the tick reads and the leader writes.
//!
//! Every engine runs in this process (`engine::run`, default tuning but a slow idle poll),
//! each in its own thread and single-thread runtime as in a pod ([`Hosted`]: one engine's
//! CPU never delays another's timers), its DynamoDB requests through the cost benchmark's
//! metering relay ([`Relay`], on its own threads), their Kinesis requests through a gate
//! that keeps kinesis-local alive when thousands of readers start at once
//! ([`crate::relay::Gate`]). A group of
//! `workers − 1` engines starts on a fresh stream and settles; then one more engine joins,
//! and the group is watched until it is balanced again and for a steady window after.
//! Measured:
//! - tick length, leader and members, from each engine's own
//!   `kcg_worker_tick_duration_seconds` histogram (so quantiles are bucket bounds: "≤");
//! - the leader's background duty runs (`kcg_worker_leader_duties_duration_seconds`);
//! - time from the join to a balanced group (every shard owned, shares differ by ≤ 1);
//! - read units the group spent per tick (DynamoDB's ConsumedCapacity: one unit per started
//!   4 KB of a consistent read, so units × 4 KB bounds the bytes read).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kcg_worker::config::Tuning;
use kcg_worker::metrics::Metrics;
use kcg_worker::store::StateStore;
use tokio_util::sync::CancellationToken;

use crate::cost::{self, Relay};
use crate::report::{Row, num};
use crate::support::{self, Aws, Counter, Hosted};

/// Most shards kinesis-local creates in one stream.
const SHARDS_PER_STREAM: i32 = 1000;

/// Most Kinesis requests the engines have in flight to kinesis-local at once (through
/// [`crate::relay::Gate`]); the rest wait in the gate.
pub const KINESIS_IN_FLIGHT: usize = 64;

/// One measured group: `shards` shards, `workers` engines once the last one joined.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Shards of the stream.
    pub shards: i32,
    /// Engines of the group after the join.
    pub workers: usize,
}

/// Parameters of the scale benchmark.
#[derive(Clone)]
pub struct Params {
    /// The groups to measure.
    pub scenarios: Vec<Scenario>,
    /// Length of the steady window after the join.
    pub window: Duration,
    /// The relay every engine's DynamoDB requests go through.
    pub relay: Arc<Relay>,
    /// DynamoDB without the relay, for the benchmark's own setup and probes.
    pub direct: aws_sdk_dynamodb::Client,
    /// The engines' heartbeat interval (the default, 1 s, unless `--scale-heartbeat-ms`).
    pub heartbeat: Duration,
}

/// The engines' tuning: defaults, except an idle poll of 240 s (under the 5 minutes a shard
/// iterator lives), which changes no state-store request but keeps thousands of readers from
/// flooding the Kinesis emulator (at 30 s, 5,000 empty shards took most of a core of
/// kinesis-local), and `heartbeat`, with the client timeout the validation's minimum for it,
/// as the default pair (1 s, 4 s) is. A longer heartbeat slows every engine's state-store
/// traffic alike: DynamoDB Local spends about 4 ms of CPU on each tick's client read and
/// heartbeat, so 100 workers at 1 s take most of a core before any lease is claimed.
pub fn tuning(heartbeat: Duration) -> Tuning {
    Tuning {
        poll_interval: Duration::from_secs(240),
        heartbeat_interval: heartbeat,
        client_timeout: kcg_worker::config::timing::min_client_timeout(heartbeat),
        ..Tuning::default()
    }
}

/// Runs every scenario and returns its rows.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let hb = p.heartbeat;
    let mut rows = Vec::new();
    for s in &p.scenarios {
        let name = if hb == Tuning::default().heartbeat_interval {
            format!("{} shards, {} workers", s.shards, s.workers)
        } else {
            format!(
                "{} shards, {} workers, heartbeat {} ms",
                s.shards,
                s.workers,
                hb.as_millis()
            )
        };
        eprintln!("kcg-bench: scale: {name} ...");
        match scenario(aws, p, s).await {
            Ok(m) => rows.extend(m.rows(&name, s.workers, hb)),
            Err(e) => rows.push(Row::failed("scale", &e.context(name))),
        }
    }
    rows
}

/// Cumulative bucket counts of one histogram, summed over engines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// `(upper bound in seconds, observations ≤ it)`, ascending; the last bound is +Inf.
    pub le: Vec<(f64, u64)>,
}

impl Buckets {
    /// Reads the buckets of `metric` (e.g. `kcg_worker_tick_duration_seconds`) whose labels
    /// contain `label` (e.g. `role="leader"`; empty for any) from a Prometheus text
    /// exposition, adding them to `self`.
    pub fn add_from(&mut self, text: &str, metric: &str, label: &str) {
        let prefix = format!("{metric}_bucket{{");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            if !labels.contains(label) {
                continue;
            }
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|v| v.trim_end_matches('"'))
                .and_then(|v| match v {
                    "+Inf" => Some(f64::INFINITY),
                    v => v.parse::<f64>().ok(),
                });
            let (Some(le), Ok(n)) = (le, value.trim().parse::<u64>()) else {
                continue;
            };
            match self.le.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += n,
                None => {
                    self.le.push((le, n));
                    self.le.sort_by(|a, b| a.0.total_cmp(&b.0));
                }
            }
        }
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.le.last().map_or(0, |(_, c)| *c)
    }

    /// What happened between `earlier` and `self` (same engines, same buckets).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets {
            le: self
                .le
                .iter()
                .map(|(b, c)| {
                    let before = earlier
                        .le
                        .iter()
                        .find(|(eb, _)| eb == b)
                        .map_or(0, |(_, ec)| *ec);
                    (*b, c.saturating_sub(before))
                })
                .collect(),
        }
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1; 1 is the maximum); None
    /// without observations.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        self.le.iter().find(|(_, c)| *c >= rank).map(|(b, _)| *b)
    }

    /// `≤ median / ≤ p99 / ≤ max` in milliseconds.
    fn summary(&self) -> String {
        let ms = |q: f64| match self.quantile_bound(q) {
            Some(b) if b.is_finite() => format!("≤{}", num(b * 1000.0)),
            Some(_) => "over the top bucket".to_owned(),
            None => "-".to_owned(),
        };
        format!("{} / {} / {}", ms(0.5), ms(0.99), ms(1.0))
    }
}

/// The group's histograms and the relay's totals at one moment.
#[derive(Clone, Debug, Default)]
struct Sample {
    leader: Buckets,
    members: Buckets,
    duties: Buckets,
    reads: f64,
}

impl Sample {
    fn take(engines: &[Arc<Metrics>], relay: &Relay) -> Self {
        let mut s = Sample {
            reads: relay.usage().reads,
            ..Sample::default()
        };
        for m in engines {
            let text = m.encode();
            let tick = "kcg_worker_tick_duration_seconds";
            s.leader.add_from(&text, tick, "role=\"leader\"");
            s.members.add_from(&text, tick, "role=\"member\"");
            s.duties
                .add_from(&text, "kcg_worker_leader_duties_duration_seconds", "");
        }
        s
    }

    fn since(&self, earlier: &Sample) -> Sample {
        Sample {
            leader: self.leader.since(&earlier.leader),
            members: self.members.since(&earlier.members),
            duties: self.duties.since(&earlier.duties),
            reads: self.reads - earlier.reads,
        }
    }

    fn reads_per_tick(&self) -> f64 {
        self.reads / (self.leader.count() + self.members.count()).max(1) as f64
    }
}

/// What one scenario measured.
struct Measured {
    stream_created: Duration,
    first_balanced: Duration,
    join_balanced: Duration,
    /// From the start to the first balance.
    start: Sample,
    /// From the join to the balance after it.
    join: Sample,
    /// The steady window after the join.
    steady: Sample,
    /// All three.
    whole: Sample,
}

impl Measured {
    fn rows(&self, name: &str, workers: usize, hb: Duration) -> Vec<Row> {
        let mut rows = vec![
            Row::info(
                "scale",
                format!("{name}: kinesis-local stream creation (at most 1,000 shards a stream)"),
                format!("{:.1}", self.stream_created.as_secs_f64()),
                "s",
            ),
            Row::info(
                "scale",
                format!("{name}: start of {} workers → balanced group", workers - 1),
                format!("{:.1}", self.first_balanced.as_secs_f64()),
                "s",
            ),
            Row::info(
                "scale",
                format!("{name}: one more worker joins → balanced group"),
                format!("{:.1}", self.join_balanced.as_secs_f64()),
                "s",
            ),
        ];
        for (phase, s) in [
            ("start", &self.start),
            ("join", &self.join),
            ("steady", &self.steady),
        ] {
            rows.push(Row::info(
                "scale",
                format!("{name}, {phase}: member tick median / p99 / max"),
                s.members.summary(),
                "ms",
            ));
            rows.push(Row::info(
                "scale",
                format!("{name}, {phase}: leader tick median / p99 / max"),
                s.leader.summary(),
                "ms",
            ));
            rows.push(Row::info(
                "scale",
                format!("{name}, {phase}: read units per tick (× 4 KB bounds the bytes)"),
                num(s.reads_per_tick()),
                "RRU",
            ));
        }
        let duties = self.whole.duties.quantile_bound(1.0).unwrap_or(0.0);
        rows.push(Row::info(
            "scale",
            format!("{name}: longest background run of the leader's duties"),
            format!("≤{}", num(duties * 1000.0)),
            "ms",
        ));
        let p99 = self
            .whole
            .leader
            .quantile_bound(0.99)
            .unwrap_or(f64::INFINITY);
        let goal = hb.as_secs_f64() / 2.0;
        rows.push(Row::goal(
            "scale",
            format!("{name}: leader tick p99, whole run"),
            format!("≤{}", num(p99 * 1000.0)),
            "ms",
            format!("≤ {} (half a heartbeat)", num(goal * 1000.0)),
            p99 <= goal,
        ));
        rows
    }
}

/// Starts `workers − 1` engines, waits for a balanced group, lets one more join, waits for
/// balance again, then watches a steady window.
async fn scenario(aws: &Aws, p: &Params, s: &Scenario) -> anyhow::Result<Measured> {
    anyhow::ensure!(s.workers >= 2, "a join needs at least 2 workers");
    let table = support::unique(&format!("scale-{}", s.shards));
    let group = format!("bench/{table}");
    let direct = StateStore::new(p.direct.clone(), table.clone());
    direct
        .create_table()
        .await
        .with_context(|| format!("creating table {table}"))?;
    let created = Instant::now();
    let mut streams = Vec::new();
    let mut left = s.shards;
    while left > 0 {
        let n = left.min(SHARDS_PER_STREAM);
        let stream = format!("{table}-{}", streams.len());
        let res = crate::ensure_stream(&aws.kinesis, &stream, n).await;
        streams.push(stream);
        if let Err(e) = res {
            cleanup(aws, &streams, &table).await;
            return Err(e);
        }
        left -= n;
    }
    let stream_created = created.elapsed();
    let mut config = support::worker_config(&group, &streams[0], &table, tuning(p.heartbeat));
    let first = config.streams[0].clone();
    config.streams = streams
        .iter()
        .map(|name| kcg_worker::config::StreamConfig {
            name: name.clone(),
            ..first.clone()
        })
        .collect();

    let shutdown = CancellationToken::new();
    let handler = Counter::new(Instant::now(), u64::MAX);
    // Every engine's metrics exist from the start (zero until it runs), for the progress
    // lines; the samples read those of the engines started so far.
    let all: Vec<Arc<Metrics>> = (0..s.workers).map(|_| Arc::new(Metrics::new())).collect();
    let mut metrics: Vec<Arc<Metrics>> = Vec::new();
    let mut engines: Vec<Hosted> = Vec::new();
    let mut start = |i: usize, metrics: &mut Vec<Arc<Metrics>>| -> anyhow::Result<()> {
        let m = all[i].clone();
        metrics.push(m.clone());
        let id = format!("scale-{i:03}");
        engines.push(Hosted::start(id, config.clone(), handler.clone(), m)?);
        Ok(())
    };
    let balanced = |workers: usize| cost::Scenario {
        shards: s.shards,
        workers,
        rate_per_shard: 0.0,
    };
    let progress = tokio::spawn(progress(all.clone(), p.relay.clone(), shutdown.clone()));
    let measured = async {
        let t0 = Sample::take(&metrics, &p.relay);
        let began = Instant::now();
        for i in 0..s.workers - 1 {
            start(i, &mut metrics)?;
        }
        cost::wait_balanced(&direct, &group, &balanced(s.workers - 1)).await?;
        let first_balanced = began.elapsed();
        let t1 = Sample::take(&metrics, &p.relay);
        let joined = Instant::now();
        start(s.workers - 1, &mut metrics)?;
        cost::wait_balanced(&direct, &group, &balanced(s.workers)).await?;
        let join_balanced = joined.elapsed();
        let t2 = Sample::take(&metrics, &p.relay);
        tokio::time::sleep(p.window).await;
        let t3 = Sample::take(&metrics, &p.relay);
        anyhow::Ok(Measured {
            stream_created,
            first_balanced,
            join_balanced,
            start: t1.since(&t0),
            join: t2.since(&t1),
            steady: t3.since(&t2),
            whole: t3.since(&t0),
        })
    }
    .await;
    shutdown.cancel();
    progress.abort();
    for e in &engines {
        e.cancel();
    }
    for mut e in engines {
        let _ = tokio::time::timeout(Duration::from_secs(60), e.join()).await;
    }
    cleanup(aws, &streams, &table).await;
    measured
}

/// Every 15 s until `stop`, on stderr: the engines' state-store requests per second by
/// operation (whole lease reads are `load_leases`, range reads `load_lease_range`) and the
/// read units per second, so a long scenario shows where the group's time goes.
async fn progress(engines: Vec<Arc<Metrics>>, relay: Arc<Relay>, stop: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(15);
    let requests = || {
        let mut by_op: BTreeMap<String, u64> = BTreeMap::new();
        for m in &engines {
            for line in m.encode().lines() {
                let Some(rest) = line.strip_prefix("kcg_worker_store_requests_total{operation=\"")
                else {
                    continue;
                };
                if let Some((op, n)) = rest.split_once("\"} ")
                    && let Ok(n) = n.trim().parse::<u64>()
                {
                    *by_op.entry(op.to_owned()).or_default() += n;
                }
            }
        }
        by_op
    };
    let began = Instant::now();
    let (mut last_ops, mut last_reads) = (requests(), relay.usage().reads);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        let (ops, reads) = (requests(), relay.usage().reads);
        let secs = EVERY.as_secs_f64();
        let per_sec: Vec<String> = ops
            .iter()
            .filter_map(|(op, n)| {
                let d = n.saturating_sub(last_ops.get(op).copied().unwrap_or(0));
                (d > 0).then(|| format!("{op} {}", num(d as f64 / secs)))
            })
            .collect();
        eprintln!(
            "kcg-bench: scale: {:>4.0} s: requests/s {}; read units/s {}",
            began.elapsed().as_secs_f64(),
            per_sec.join(", "),
            num((reads - last_reads) / secs),
        );
        (last_ops, last_reads) = (ops, reads);
    }
}

/// Deletes the streams and the table.
async fn cleanup(aws: &Aws, streams: &[String], table: &str) {
    for stream in streams {
        if let Err(e) = crate::delete_stream(&aws.kinesis, stream).await {
            eprintln!("kcg-bench: {e:#}");
        }
    }
    if let Err(e) = aws.dynamodb.delete_table().table_name(table).send().await {
        eprintln!("kcg-bench: could not delete table {table}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE kcg_worker_tick_duration_seconds histogram
kcg_worker_tick_duration_seconds_sum{role=\"leader\"} 0.5
kcg_worker_tick_duration_seconds_count{role=\"leader\"} 4
kcg_worker_tick_duration_seconds_bucket{le=\"0.001\",role=\"leader\"} 1
kcg_worker_tick_duration_seconds_bucket{le=\"0.002\",role=\"leader\"} 3
kcg_worker_tick_duration_seconds_bucket{le=\"+Inf\",role=\"leader\"} 4
kcg_worker_tick_duration_seconds_bucket{le=\"0.001\",role=\"member\"} 7
kcg_worker_tick_duration_seconds_bucket{le=\"0.002\",role=\"member\"} 7
kcg_worker_tick_duration_seconds_bucket{le=\"+Inf\",role=\"member\"} 7
";

    #[test]
    fn buckets_parse_sum_and_subtract() {
        let mut b = Buckets::default();
        b.add_from(TEXT, "kcg_worker_tick_duration_seconds", "role=\"leader\"");
        assert_eq!(b.le, vec![(0.001, 1), (0.002, 3), (f64::INFINITY, 4)]);
        b.add_from(TEXT, "kcg_worker_tick_duration_seconds", "role=\"leader\"");
        assert_eq!(b.count(), 8);
        let mut one = Buckets::default();
        one.add_from(TEXT, "kcg_worker_tick_duration_seconds", "role=\"leader\"");
        assert_eq!(b.since(&one), one);
        let mut members = Buckets::default();
        members.add_from(TEXT, "kcg_worker_tick_duration_seconds", "role=\"member\"");
        assert_eq!(members.count(), 7);
    }

    #[test]
    fn quantile_bounds_table() {
        let b = Buckets {
            le: vec![(0.001, 50), (0.01, 99), (0.1, 100), (f64::INFINITY, 100)],
        };
        let cases = [
            ("median", 0.5, Some(0.001)),
            ("p99", 0.99, Some(0.01)),
            ("max", 1.0, Some(0.1)),
            ("p51", 0.51, Some(0.01)),
        ];
        for (name, q, want) in cases {
            assert_eq!(b.quantile_bound(q), want, "{name}");
        }
        assert_eq!(Buckets::default().quantile_bound(0.5), None, "empty");
    }

    #[test]
    fn the_engine_exports_the_parsed_histogram() {
        let m = Metrics::new();
        m.tick_duration
            .get_or_create(&kcg_worker::metrics::RoleLabels {
                role: "leader".into(),
            })
            .observe(0.0015);
        let mut b = Buckets::default();
        b.add_from(
            &m.encode(),
            "kcg_worker_tick_duration_seconds",
            "role=\"leader\"",
        );
        assert_eq!(b.count(), 1);
        assert_eq!(b.quantile_bound(1.0), Some(0.002));
    }
}
