//! Rebalance and handoff latency: engines on one stream, each in its own thread and Tokio
//! runtime (so "kill" can drop a whole engine, readers included, without any release, as a
//! crashed process would), observed only through the state store.
//!
//! Timeline: engines a and b settle on 8 shards, then (a) c joins, (b) c stops gracefully,
//! (c) a (the leader) is killed. Each step is timed until the state store shows what it must.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kcg_worker::assignment;
use kcg_worker::config::{Tuning, WorkerConfig};
use kcg_worker::engine::{self, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::store::StateStore;
use kcg_worker::store::schema::GroupSnapshot;
use tokio_util::sync::CancellationToken;

use crate::report::{Row, num};
use crate::support::{self, Aws, Counter};

/// Shards of the stream.
const SHARDS: i32 = 8;
/// How often the state store is read while waiting.
const PROBE_EVERY: Duration = Duration::from_millis(25);

/// The tuning every engine here runs with.
pub fn tuning() -> Tuning {
    Tuning {
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(500),
        client_timeout: Duration::from_secs(3),
        ..Tuning::default()
    }
}

/// One engine in its own thread and runtime.
struct Hosted {
    shutdown: CancellationToken,
    kill: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hosted {
    fn start(name: &'static str, config: WorkerConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let kill = CancellationToken::new();
        let (s, k) = (shutdown.clone(), kill.clone());
        let thread = std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("kcg-bench: engine {name}: runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async {
                    let handler = Counter::new(Instant::now(), u64::MAX);
                    let run = engine::run(
                        config,
                        EngineOptions {
                            client_id: Some(format!("bench-{name}")),
                            pod: Some(format!("bench-{name}")),
                        },
                        handler,
                        Arc::new(Metrics::new()),
                        Arc::new(Health::new(Duration::from_secs(30))),
                        s,
                    );
                    tokio::select! {
                        res = run => if let Err(e) = res {
                            eprintln!("kcg-bench: engine {name} failed: {e}");
                        },
                        _ = k.cancelled() => {}
                    }
                });
                // Killed: every task of this engine (readers, in-flight writes) is dropped
                // where it stands. Stopped: nothing is left to drop.
                rt.shutdown_background();
            })
            .context("spawning an engine thread")?;
        Ok(Self {
            shutdown,
            kill,
            thread: Some(thread),
        })
    }

    /// Waits (off the async threads) for the engine thread to end.
    async fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Graceful stop: cancel and wait for the drain, release and deregistration.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        self.join().await;
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        // A benchmark that bails out must not leave engines running against deleted
        // resources.
        self.kill.cancel();
    }
}

/// Ids of the client rows whose id starts with one of `prefixes`, sorted.
fn clients_of(snap: &GroupSnapshot, prefixes: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = snap
        .clients
        .iter()
        .filter(|c| prefixes.iter().any(|p| c.client_id.starts_with(p)))
        .map(|c| c.client_id.clone())
        .collect();
    ids.sort();
    ids
}

/// Every lease is held by the owner the planner picks for exactly the engines `prefixes`.
fn plan_applied(snap: &GroupSnapshot, stream: &str, prefixes: &[String]) -> bool {
    let live = clients_of(snap, prefixes);
    if live.len() != prefixes.len() {
        return false;
    }
    let plan = assignment::plan(
        &assignment::streams_from_snapshot(&[stream.to_owned()], snap),
        &live,
    );
    let owners: BTreeMap<&str, Option<&str>> = snap
        .leases
        .iter()
        .filter(|l| l.stream == stream)
        .map(|l| (l.shard_id.as_str(), l.owner.as_deref()))
        .collect();
    plan.len() == SHARDS as usize
        && plan
            .iter()
            .all(|(k, want)| owners.get(k.shard_id.as_str()).copied().flatten() == Some(want))
}

/// Every one of the stream's shards has a lease held by one of the engines `prefixes`.
fn all_owned_by(snap: &GroupSnapshot, stream: &str, prefixes: &[String]) -> bool {
    let held = snap
        .leases
        .iter()
        .filter(|l| l.stream == stream && !l.ended)
        .filter(|l| {
            l.owner
                .as_deref()
                .is_some_and(|o| prefixes.iter().any(|p| o.starts_with(p)))
        })
        .count();
    held == SHARDS as usize
}

type Check<'a> = Box<dyn Fn(&GroupSnapshot) -> bool + 'a>;

/// Reads the group every [`PROBE_EVERY`] until every check held once; returns, per check,
/// the time from `start` to the first snapshot it held in.
async fn wait_for(
    store: &StateStore,
    group: &str,
    start: Instant,
    timeout: Duration,
    checks: &[Check<'_>],
) -> anyhow::Result<Vec<Duration>> {
    let mut seen: Vec<Option<Duration>> = vec![None; checks.len()];
    loop {
        let snap = store.load_group(group).await.context("reading the group")?;
        let at = start.elapsed();
        for (s, check) in seen.iter_mut().zip(checks) {
            if s.is_none() && check(&snap) {
                *s = Some(at);
            }
        }
        if seen.iter().all(Option::is_some) {
            return Ok(seen.into_iter().flatten().collect());
        }
        anyhow::ensure!(
            at < timeout,
            "not reached within {}s (owners: {:?})",
            timeout.as_secs(),
            snap.leases
                .iter()
                .map(|l| l.owner.as_deref().unwrap_or("-"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// A light, steady load (about 100 records/s) so readers have batches in flight when
/// shards move.
fn trickle(client: aws_sdk_kinesis::Client, stream: String, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            let entries: Vec<PutRecordsRequestEntry> = (0..20)
                .filter_map(|i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("pk-{}", n + i))
                        .data(Blob::new(vec![b'x'; 200]))
                        .build()
                        .ok()
                })
                .collect();
            n += 20;
            if let Err(e) = client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                eprintln!("kcg-bench: trickle producer: {e}");
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
}

/// Runs the benchmark on a fresh stream and table and always deletes both.
pub async fn run(aws: &Aws) -> Vec<Row> {
    let stream = support::unique("rebalance");
    let table = support::unique("rebalance-state");
    let stop_load = CancellationToken::new();
    let mut engines = Vec::new();
    let rows = match measure(aws, &stream, &table, &stop_load, &mut engines).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed("rebalance", &e)],
    };
    stop_load.cancel();
    for e in &mut engines {
        e.stop().await;
    }
    support::cleanup(aws, &stream, &table).await;
    rows
}

async fn measure(
    aws: &Aws,
    stream: &str,
    table: &str,
    stop_load: &CancellationToken,
    engines: &mut Vec<Hosted>,
) -> anyhow::Result<Vec<Row>> {
    let t = tuning();
    let hb = t.heartbeat_interval;
    let timeout = t.client_timeout;
    let hb_ms = hb.as_secs_f64() * 1000.0;
    let timeout_ms = timeout.as_secs_f64() * 1000.0;
    let limit = timeout * 10;
    let tuned = format!("hb {}ms, timeout {}ms", hb.as_millis(), timeout.as_millis());

    support::create(aws, stream, SHARDS, table).await?;
    let group = format!("bench/{stream}");
    let config = support::worker_config(&group, stream, table, t.clone());
    let store = aws.store(table);
    trickle(aws.kinesis.clone(), stream.to_owned(), stop_load.clone());

    let p = |names: &[&str]| -> Vec<String> { names.iter().map(|n| format!("bench-{n}-")).collect() };

    // Steady state with a and b.
    let start = Instant::now();
    engines.push(Hosted::start("a", config.clone())?);
    engines.push(Hosted::start("b", config.clone())?);
    let ab = p(&["a", "b"]);
    let settle = wait_for(&store, &group, start, limit, &[Box::new(|s| plan_applied(s, stream, &ab))]).await?;
    let mut rows = vec![Row::info(
        "rebalance start",
        format!("2 engines start on {SHARDS} shards -> plan applied ({tuned})"),
        num(settle[0].as_secs_f64() * 1000.0),
        "ms",
    )];
    tokio::time::sleep(hb * 2).await;

    // (a) c joins.
    let abc = p(&["a", "b", "c"]);
    let start = Instant::now();
    engines.push(Hosted::start("c", config.clone())?);
    let joined = wait_for(&store, &group, start, limit, &[Box::new(|s| plan_applied(s, stream, &abc))]).await?;
    let ms = joined[0].as_secs_f64() * 1000.0;
    rows.push(Row::goal(
        "rebalance join",
        format!("3rd engine starts -> every lease with its planned owner ({tuned})"),
        num(ms),
        "ms",
        format!("< 3 heartbeats ({:.0} ms)", 3.0 * hb_ms),
        ms < 3.0 * hb_ms,
    ));
    tokio::time::sleep(hb * 2).await;

    // (b) c stops gracefully: its shards go to a and b.
    let c = engines.pop().context("engine c")?;
    let start = Instant::now();
    c.shutdown.cancel();
    let mut c = c;
    let graceful = {
        let checks: [Check<'_>; 2] = [
            Box::new(|s| all_owned_by(s, stream, &ab)),
            Box::new(|s| plan_applied(s, stream, &ab)),
        ];
        wait_for(&store, &group, start, limit, &checks).await?
    };
    c.join().await;
    let ms = graceful[0].as_secs_f64() * 1000.0;
    rows.push(Row::goal(
        "handoff graceful stop",
        format!("engine c cancelled -> all its shards owned by a/b ({tuned})"),
        num(ms),
        "ms",
        format!("< 2 heartbeats ({:.0} ms)", 2.0 * hb_ms),
        ms < 2.0 * hb_ms,
    ));
    rows.push(Row::info(
        "handoff graceful stop",
        "engine c cancelled -> plan for a,b fully applied",
        num(graceful[1].as_secs_f64() * 1000.0),
        "ms",
    ));
    tokio::time::sleep(hb * 2).await;

    // (c) a, the leader, is killed: no release, no deregistration.
    let b_only = p(&["b"]);
    let start = Instant::now();
    engines[0].kill.cancel();
    let killed = wait_for(&store, &group, start, limit, &[Box::new(|s| all_owned_by(s, stream, &b_only))]).await?;
    engines[0].join().await;
    let ms = killed[0].as_secs_f64() * 1000.0;
    // The observer starts its clock when it first sees the last renewal (up to one
    // heartbeat after it), judges staleness on its own tick grid (up to one more), and
    // then claims (one write, tick jitter): clientTimeout + 3 heartbeats bounds it. Less
    // than clientTimeout - 1 heartbeat would mean leases were released, not taken over.
    let max = timeout_ms + 3.0 * hb_ms;
    rows.push(Row::goal(
        "takeover after kill",
        format!("leader a killed -> all its shards owned by b ({tuned})"),
        num(ms),
        "ms",
        format!("~ client timeout: {:.0}..{:.0} ms", timeout_ms - hb_ms, max),
        ms >= timeout_ms - hb_ms && ms < max,
    ));
    Ok(rows)
}
