//! Coordination cost: the DynamoDB read and write units a group of engines spends on the
//! state store, idle and under load, counted with DynamoDB's own unit rules.
//!
//! Every engine of a scenario runs in this process against DynamoDB Local, through a relay
//! ([`Relay`]) that asks for `ReturnConsumedCapacity=TOTAL` on every data request and sums
//! what DynamoDB Local answers (it applies the service's rules: 1 write unit per started
//! KB written, 1 read unit per started 4 KB of a strongly consistent read). A conditional
//! write that fails returns no capacity, but DynamoDB bills it: the relay counts it as one
//! write unit (every kcg row is under 1 KB except shard caches, which are never
//! conditional). The measurement uses only the engine's public entry point
//! (`engine::run`), so the same code measures any version of the engine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kcg_worker::config::Tuning;
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::store::StateStore;
use tokio_util::sync::CancellationToken;

use crate::relay;
use crate::report::{Row, num};
use crate::support::{self, Aws, Counter};

/// On-demand list prices, us-east-1, standard table class (USD per million request units).
pub const USD_PER_MILLION_WRITES: f64 = 0.625;
/// See [`USD_PER_MILLION_WRITES`].
pub const USD_PER_MILLION_READS: f64 = 0.125;
/// Hours in a month, as AWS prices count them.
const HOURS_PER_MONTH: f64 = 730.0;

/// Operations whose cost is counted as reads.
const READS: [&str; 4] = ["GetItem", "Query", "Scan", "BatchGetItem"];
/// Operations whose cost is counted as writes.
const WRITES: [&str; 5] = [
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "BatchWriteItem",
    "TransactWriteItems",
];

/// Totals the relay has seen since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Read units.
    pub reads: f64,
    /// Write units.
    pub writes: f64,
    /// Requests by operation (`PutItem`, `Query`, ...).
    pub requests: BTreeMap<String, u64>,
    /// Write requests to client rows (`sk` = `client#...`) by `UpdateItem`: heartbeats,
    /// one per worker per tick in every engine version, so they count the ticks executed.
    pub heartbeats: u64,
    /// Write requests to lease rows (`sk` = `lease#...`): renewals, checkpoints, claims,
    /// releases.
    pub lease_writes: u64,
    /// Records the group's handlers received (filled in by the scenario, not the relay).
    pub delivered: u64,
    /// Records the producer wrote (filled in by the scenario, not the relay).
    pub produced: u64,
}

impl Usage {
    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            reads: self.reads - earlier.reads,
            writes: self.writes - earlier.writes,
            requests: self
                .requests
                .iter()
                .map(|(op, n)| {
                    (
                        op.clone(),
                        n - earlier.requests.get(op).copied().unwrap_or(0),
                    )
                })
                .collect(),
            heartbeats: self.heartbeats - earlier.heartbeats,
            lease_writes: self.lease_writes - earlier.lease_writes,
            delivered: self.delivered.saturating_sub(earlier.delivered),
            produced: self.produced.saturating_sub(earlier.produced),
        }
    }
}

/// A DynamoDB relay that meters consumed capacity. Listens on a loopback port and forwards
/// every request to `upstream`.
pub struct Relay {
    upstream: String,
    http: reqwest::Client,
    usage: Mutex<Usage>,
}

impl Relay {
    /// Serves the relay on `listener` (already bound, so its address can be handed to the
    /// engines before any thread starts) until the process ends.
    pub fn serve(listener: std::net::TcpListener, upstream: String) -> anyhow::Result<Arc<Self>> {
        let relay = Arc::new(Self {
            upstream,
            http: relay::client(256)?,
            usage: Mutex::new(Usage::default()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(relay.clone());
        relay::serve("cost-relay", listener, app)?;
        Ok(relay)
    }

    /// The totals so far.
    pub fn usage(&self) -> Usage {
        self.usage.lock().map(|u| u.clone()).unwrap_or_default()
    }

    fn record(&self, op: &str, sk: Option<&str>, units: f64) {
        if let Ok(mut u) = self.usage.lock() {
            *u.requests.entry(op.to_owned()).or_default() += 1;
            if READS.contains(&op) {
                u.reads += units;
            } else if WRITES.contains(&op) {
                u.writes += units;
                match sk {
                    Some(k) if op == "UpdateItem" && k.starts_with("client#") => u.heartbeats += 1,
                    Some(k) if k.starts_with("lease#") => u.lease_writes += 1,
                    _ => {}
                }
            }
        }
    }
}

/// Forwards one DynamoDB request, asking for its consumed capacity, and records it.
async fn forward(State(relay): State<Arc<Relay>>, headers: HeaderMap, body: Bytes) -> Response {
    let op = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("unknown")
        .to_owned();
    let metered = READS.contains(&op.as_str()) || WRITES.contains(&op.as_str());
    let mut sk = None;
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(mut m)) if metered => {
            sk = row_sort_key(&m);
            m.insert("ReturnConsumedCapacity".into(), "TOTAL".into());
            Bytes::from(serde_json::Value::Object(m).to_string())
        }
        _ => body,
    };
    let answer = match relay::pass_on(&relay.http, &relay.upstream, &headers, body).await {
        Ok(a) => a,
        Err(failed) => return failed,
    };
    if metered {
        let units = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["ConsumedCapacity"]["CapacityUnits"].as_f64());
        let failed_condition = answer.status == StatusCode::BAD_REQUEST
            && String::from_utf8_lossy(&answer.body).contains("ConditionalCheckFailed");
        let units = match units {
            Some(u) => u,
            // Billed although the answer carries no capacity.
            None if failed_condition => 1.0,
            None => 0.0,
        };
        relay.record(&op, sk.as_deref(), units);
    }
    answer.into_response()
}

/// The sort key of the one row a single-item request names (`Key` of GetItem, UpdateItem,
/// DeleteItem; `Item` of PutItem).
fn row_sort_key(request: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let row = request.get("Key").or_else(|| request.get("Item"))?;
    row["sk"]["S"].as_str().map(str::to_owned)
}

/// One measured group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scenario {
    /// Shards of the stream.
    pub shards: i32,
    /// Engines of the group.
    pub workers: usize,
    /// Records per second written to each shard during the window (0: idle; 0.1: one
    /// every 10 s).
    pub rate_per_shard: f64,
}

impl std::fmt::Display for Scenario {
    /// The command-line form: `<shards>x<workers>[@<rate>]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.shards, self.workers)?;
        if self.rate_per_shard > 0.0 {
            write!(f, "@{}", self.rate_per_shard)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;

    /// Parses `<shards>x<workers>[@<records per second per shard>]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s} is not <shards>x<workers>[@<rate>]");
        let (group, rate) = match s.split_once('@') {
            Some((g, r)) => match r.parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate >= 0.0 => (g, rate),
                _ => return Err(bad()),
            },
            None => (s, 0.0),
        };
        let (shards, workers) = group.split_once('x').ok_or_else(bad)?;
        Ok(Scenario {
            shards: shards.parse().map_err(|_| bad())?,
            workers: workers.parse().map_err(|_| bad())?,
            rate_per_shard: rate,
        })
    }
}

/// Parameters of the cost benchmark.
#[derive(Clone)]
pub struct Params {
    /// The groups to measure.
    pub scenarios: Vec<Scenario>,
    /// Length of each measured window.
    pub window: Duration,
    /// Wait after the group is balanced, before measuring (first checkpoints, caches).
    pub settle: Duration,
    /// The relay every engine's DynamoDB requests go through.
    pub relay: Arc<Relay>,
    /// DynamoDB without the relay, for the benchmark's own setup and probes.
    pub direct: aws_sdk_dynamodb::Client,
    /// Monthly USD of the engine to compare with, per scenario: the goal is at most a tenth
    /// of it, at the configured tick rate.
    pub baselines: Vec<(Scenario, f64)>,
}

/// The tuning of every engine: the engine's defaults, except a slower idle poll, which
/// changes no state-store request but keeps a thousand readers from flooding the Kinesis
/// emulator.
pub fn tuning() -> Tuning {
    Tuning {
        poll_interval: Duration::from_secs(5),
        ..Tuning::default()
    }
}

/// What one window's usage comes to, per worker, per tick and per month.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    /// Ticks (heartbeats) per worker-minute the engines actually ran.
    pub ticks_per_min: f64,
    /// Ticks per worker-minute the tuning asks for (60 s / heartbeat interval).
    pub configured_ticks_per_min: f64,
    /// Read and write units per worker and tick.
    pub per_tick: (f64, f64),
    /// Monthly on-demand USD of the group as measured.
    pub monthly_measured: f64,
    /// Monthly on-demand USD of the group had every engine run its configured tick rate
    /// (the measured units per tick, times the configured ticks). An emulator that
    /// throttles an engine lowers its measured cost, not this one.
    pub monthly_configured: f64,
}

/// Works out [`Figures`] from the usage of a `window` of `workers` engines whose heartbeat
/// interval is `heartbeat`.
pub fn figures(u: &Usage, workers: usize, window: Duration, heartbeat: Duration) -> Figures {
    let minutes = window.as_secs_f64() / 60.0;
    let w = workers as f64;
    let monthly = |reads: f64, writes: f64| {
        let per_hour = 60.0 / minutes;
        (reads * per_hour * HOURS_PER_MONTH) * USD_PER_MILLION_READS / 1e6
            + (writes * per_hour * HOURS_PER_MONTH) * USD_PER_MILLION_WRITES / 1e6
    };
    let ticks_per_min = u.heartbeats as f64 / w / minutes;
    let configured_ticks_per_min = 60.0 / heartbeat.as_secs_f64();
    let ticks = (u.heartbeats as f64).max(1.0);
    let per_tick = (u.reads / ticks, u.writes / ticks);
    let scale = configured_ticks_per_min / ticks_per_min.max(f64::MIN_POSITIVE);
    Figures {
        ticks_per_min,
        configured_ticks_per_min,
        per_tick,
        monthly_measured: monthly(u.reads, u.writes),
        monthly_configured: monthly(u.reads * scale, u.writes * scale),
    }
}

/// Runs every scenario and returns its rows.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in &p.scenarios {
        let name = format!(
            "{} shards, {} workers, {}",
            s.shards,
            s.workers,
            if s.rate_per_shard == 0.0 {
                "idle".to_owned()
            } else {
                format!("{} rec/s per shard", s.rate_per_shard)
            }
        );
        eprintln!("kcg-bench: cost: {name} ...");
        match scenario(aws, p, s).await {
            Ok(u) => {
                let f = figures(&u, s.workers, p.window, tuning().heartbeat_interval);
                rows.extend(scenario_rows(&name, s, &u, &f, p.window));
                if let Some((_, base)) = p.baselines.iter().find(|(b, _)| b == s) {
                    let full = full_checkpoint_writes(s, p.window, tuning().checkpoint_interval);
                    rows.push(goal_row(&name, s, &u, &f, *base, full));
                }
            }
            Err(e) => rows.push(Row::failed("cost", &e.context(name))),
        }
    }
    rows.push(Row::info(
        "cost",
        "prices: on-demand us-east-1, USD per million request units",
        format!("read {USD_PER_MILLION_READS}, write {USD_PER_MILLION_WRITES}"),
        "USD",
    ));
    rows
}

/// The information rows of one scenario.
fn scenario_rows(name: &str, s: &Scenario, u: &Usage, f: &Figures, window: Duration) -> Vec<Row> {
    let minutes = window.as_secs_f64() / 60.0;
    let hours = minutes / 60.0;
    let w = s.workers as f64;
    let shards = f64::from(s.shards);
    let per_worker_min = |op: &str| u.requests.get(op).copied().unwrap_or(0) as f64 / w / minutes;
    let row = |what: &str, result: String, unit: &str| {
        Row::info("cost", format!("{name}: {what}"), result, unit)
    };
    vec![
        row(
            "ticks per worker-minute, run / configured",
            format!(
                "{} / {}",
                num(f.ticks_per_min),
                num(f.configured_ticks_per_min)
            ),
            "ticks",
        ),
        row(
            "read / write units per worker and tick",
            format!("{} / {}", num(f.per_tick.0), num(f.per_tick.1)),
            "RRU / WRU",
        ),
        row(
            "read / write units per worker-minute, as run",
            format!(
                "{} / {}",
                num(u.reads / w / minutes),
                num(u.writes / w / minutes)
            ),
            "RRU / WRU",
        ),
        row(
            "read / write units per worker-minute, at the configured tick rate",
            format!(
                "{} / {}",
                num(f.per_tick.0 * f.configured_ticks_per_min),
                num(f.per_tick.1 * f.configured_ticks_per_min)
            ),
            "RRU / WRU",
        ),
        row(
            "read / write units per shard-hour, as run",
            format!(
                "{} / {}",
                num(u.reads / shards / hours),
                num(u.writes / shards / hours)
            ),
            "RRU / WRU",
        ),
        row(
            "requests per worker-minute (Query / UpdateItem / PutItem / DeleteItem / GetItem)",
            format!(
                "{} / {} / {} / {} / {}",
                num(per_worker_min("Query")),
                num(per_worker_min("UpdateItem")),
                num(per_worker_min("PutItem")),
                num(per_worker_min("DeleteItem")),
                num(per_worker_min("GetItem"))
            ),
            "requests",
        ),
        row(
            "lease-row writes per worker-minute",
            num(u.lease_writes as f64 / w / minutes),
            "requests",
        ),
        row(
            "records produced / delivered in the window",
            format!("{} / {}", u.produced, u.delivered),
            "records",
        ),
        row(
            "monthly on-demand cost of the group, as run / at the configured tick rate",
            format!("{:.2} / {:.2}", f.monthly_measured, f.monthly_configured),
            "USD",
        ),
    ]
}

/// The lease-row writes of a window in which every shard's position moved at every
/// checkpoint interval: the most checkpoints the engine writes, whatever the record rate.
fn full_checkpoint_writes(s: &Scenario, window: Duration, interval: Duration) -> f64 {
    f64::from(s.shards) * (window.as_secs_f64() / interval.as_secs_f64()).floor()
}

/// The goal row of a scenario with a baseline: at most a tenth of it at the configured tick
/// rate. A loaded scenario counts only if the load made every shard checkpoint at its full
/// rate (at least 90% of `full_checkpoints` lease-row writes in the window): past one record
/// per shard and checkpoint interval, more records cost the coordination nothing more, so
/// that is the loaded cost whether or not the emulator served every record.
fn goal_row(
    name: &str,
    s: &Scenario,
    u: &Usage,
    f: &Figures,
    base: f64,
    full_checkpoints: f64,
) -> Row {
    let loaded = s.rate_per_shard == 0.0 || u.lease_writes as f64 >= 0.9 * full_checkpoints;
    let goal = if loaded {
        "<= 0.1".to_owned()
    } else {
        format!(
            "<= 0.1, with every shard checkpointing ({} of {full_checkpoints:.0} lease writes)",
            u.lease_writes
        )
    };
    Row::goal(
        "cost",
        format!("{name}: monthly cost at the configured tick rate against {base:.2} USD"),
        format!("{:.3}", f.monthly_configured / base),
        "x baseline",
        &goal,
        loaded && f.monthly_configured <= base / 10.0,
    )
}

/// Starts the group, waits until every shard is owned and the group settled, and returns
/// the usage of one window.
async fn scenario(aws: &Aws, p: &Params, s: &Scenario) -> anyhow::Result<Usage> {
    let stream = support::unique(&format!("cost-{}", s.shards));
    let table = stream.clone();
    let group = format!("bench/{stream}");
    let direct = StateStore::new(p.direct.clone(), table.clone());
    direct
        .create_table()
        .await
        .with_context(|| format!("creating table {table}"))?;
    crate::ensure_stream(&aws.kinesis, &stream, s.shards).await?;
    let shutdown = CancellationToken::new();
    let mut engines = Vec::new();
    // One counter for the whole group (records are in order per shard whoever reads them).
    let handler = Counter::new(Instant::now(), u64::MAX);
    for i in 0..s.workers {
        let config = support::worker_config(&group, &stream, &table, tuning());
        let handler = handler.clone();
        engines.push(tokio::spawn(engine::run(
            config,
            EngineOptions {
                client_id: Some(format!("cost-{i:03}")),
                pod: Some(format!("cost-{i:03}")),
            },
            handler,
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(600))),
            shutdown.clone(),
        )));
    }
    let produced = Arc::new(AtomicU64::new(0));
    let measured = async {
        wait_balanced(&direct, &group, s).await?;
        let producer = (s.rate_per_shard > 0.0).then(|| {
            let client = aws.kinesis.clone();
            let (stream, rate) = (
                stream.clone(),
                (s.rate_per_shard * f64::from(s.shards)).round() as u32,
            );
            let produced = produced.clone();
            tokio::spawn(async move { produce_at(&client, &stream, rate, &produced).await })
        });
        tokio::time::sleep(p.settle).await;
        let snapshot = || Usage {
            delivered: handler.distinct(),
            produced: produced.load(Ordering::Relaxed),
            ..p.relay.usage()
        };
        let before = snapshot();
        tokio::time::sleep(p.window).await;
        let used = snapshot().since(&before);
        if let Some(pr) = producer {
            pr.abort();
        }
        anyhow::Ok(used)
    }
    .await;
    shutdown.cancel();
    for e in engines {
        let _ = tokio::time::timeout(Duration::from_secs(60), e).await;
    }
    support::cleanup(aws, &stream, &table).await;
    measured
}

/// Waits until every consumable shard has an owner and ownership is balanced over all
/// engines (sizes differ by at most one).
pub(crate) async fn wait_balanced(
    store: &StateStore,
    group: &str,
    s: &Scenario,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let snap = store.load_group(group).await?;
        let mut per_owner: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &snap.leases {
            if let Some(o) = &l.owner {
                *per_owner.entry(o.as_str()).or_default() += 1;
            }
        }
        let owned: usize = per_owner.values().sum();
        let (lo, hi) = (
            per_owner.values().min().copied().unwrap_or(0),
            per_owner.values().max().copied().unwrap_or(0),
        );
        if owned == s.shards as usize && per_owner.len() == s.workers && hi - lo <= 1 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "group not balanced after 10 minutes: {owned} of {} shards owned by {} clients",
            s.shards,
            per_owner.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Writes `per_second` records a second, spread over every shard, until aborted, and counts
/// the records Kinesis accepted in `produced`.
async fn produce_at(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    per_second: u32,
    produced: &Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut next = 0u64;
    loop {
        tick.tick().await;
        let mut left = per_second;
        while left > 0 {
            let n = left.min(500);
            left -= n;
            let entries: Vec<PutRecordsRequestEntry> = (0..n)
                .filter_map(|_| {
                    next += 1;
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("pk-{next}"))
                        .data(Blob::new(vec![b'x'; 100]))
                        .build()
                        .ok()
                })
                .collect();
            let req = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries));
            let produced = produced.clone();
            tokio::spawn(async move {
                if let Ok(out) = req.send().await {
                    let failed = u64::try_from(out.failed_record_count().unwrap_or(0)).unwrap_or(0);
                    produced.fetch_add(u64::from(n).saturating_sub(failed), Ordering::Relaxed);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_since_subtracts_per_operation() {
        let earlier = Usage {
            reads: 1.0,
            writes: 2.0,
            requests: [("Query".to_owned(), 3)].into_iter().collect(),
            delivered: 10,
            ..Usage::default()
        };
        let later = Usage {
            reads: 5.5,
            writes: 4.0,
            requests: [("Query".to_owned(), 7), ("PutItem".to_owned(), 1)]
                .into_iter()
                .collect(),
            delivered: 25,
            ..Usage::default()
        };
        let d = later.since(&earlier);
        assert_eq!(d.delivered, 15);
        assert_eq!((d.reads, d.writes), (4.5, 2.0));
        assert_eq!(d.requests["Query"], 4);
        assert_eq!(d.requests["PutItem"], 1);
    }

    #[test]
    fn scenario_parses_and_prints_its_cli_form() {
        for text in ["8x2", "1000x50@1", "8x2@100", "1000x50@0.1"] {
            let s: Scenario = text.parse().expect(text);
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(
            "1000x50@1".parse::<Scenario>(),
            Ok(Scenario {
                shards: 1000,
                workers: 50,
                rate_per_shard: 1.0
            })
        );
        for bad in ["8", "8x", "x2", "8x2@", "8x2@fast", "8x2@-1"] {
            assert!(bad.parse::<Scenario>().is_err(), "{bad}");
        }
    }

    #[test]
    fn figures_scale_a_throttled_engine_to_its_configured_rate() {
        // 2 workers, 1 minute, heartbeat 2 s (30 ticks a minute configured), but only 15
        // ticks each ran: 30 heartbeats, 60 read and 30 write units in all.
        let u = Usage {
            reads: 60.0,
            writes: 30.0,
            heartbeats: 30,
            ..Usage::default()
        };
        let f = figures(&u, 2, Duration::from_secs(60), Duration::from_secs(2));
        assert_eq!(f.ticks_per_min, 15.0);
        assert_eq!(f.configured_ticks_per_min, 30.0);
        assert_eq!(f.per_tick, (2.0, 1.0));
        let month_minutes = 60.0 * HOURS_PER_MONTH;
        let measured =
            month_minutes * (60.0 * USD_PER_MILLION_READS + 30.0 * USD_PER_MILLION_WRITES) / 1e6;
        assert!((f.monthly_measured - measured).abs() < 1e-9);
        assert!((f.monthly_configured - 2.0 * measured).abs() < 1e-9);
    }

    #[test]
    fn a_loaded_goal_needs_every_shard_checkpointing() {
        let s = |rate| Scenario {
            shards: 1000,
            workers: 50,
            rate_per_shard: rate,
        };
        let full =
            full_checkpoint_writes(&s(0.1), Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(full, 1000.0);
        let cheap = Figures {
            monthly_configured: 120.0,
            ..figures(
                &Usage::default(),
                50,
                Duration::from_secs(60),
                Duration::from_secs(1),
            )
        };
        let dear = Figures {
            monthly_configured: 150.0,
            ..cheap.clone()
        };
        let writes = |lease_writes| Usage {
            lease_writes,
            ..Usage::default()
        };
        // (case, scenario, lease writes, figures, met)
        let cases = [
            ("idle, under a tenth", s(0.0), 0, &cheap, true),
            ("idle, over a tenth", s(0.0), 0, &dear, false),
            (
                "loaded, every shard checkpointed",
                s(0.1),
                1000,
                &cheap,
                true,
            ),
            ("loaded, 90% checkpointed", s(0.1), 900, &cheap, true),
            (
                "loaded, the load did not reach most shards",
                s(0.1),
                300,
                &cheap,
                false,
            ),
            ("loaded, over a tenth", s(0.1), 1000, &dear, false),
        ];
        for (name, scenario, lease_writes, f, met) in cases {
            let row = goal_row("x", &scenario, &writes(lease_writes), f, 1384.0, full);
            assert_eq!(row.pass, Some(met), "{name}");
        }
    }
}
