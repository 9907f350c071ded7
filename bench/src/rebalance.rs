//! Rebalance and handoff latency: engines on one stream, each in its own thread and Tokio
//! runtime (so "kill" can drop a whole engine, readers included, without any release, as a
//! crashed process would), observed only through the state store.
//!
//! Timeline: engines a and b settle on 8 shards, then (a) c joins, (b) c stops gracefully,
//! (c) a (the leader) is killed. Each step is timed until the state store shows what it must.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kcg_worker::assignment;
use kcg_worker::config::{Tuning, WorkerConfig};
use kcg_worker::metrics::Metrics;
use kcg_worker::store::StateStore;
use kcg_worker::store::schema::GroupSnapshot;
use tokio_util::sync::CancellationToken;

use crate::report::{Row, num};
use crate::support::{self, Aws, Counter, Hosted};

/// Shards of the stream.
const SHARDS: i32 = 8;
/// How often the state store is read while waiting.
const PROBE_EVERY: Duration = Duration::from_millis(25);

/// The tuning every engine here runs with.
pub fn tuning() -> Tuning {
    Tuning {
        poll_interval: Duration::from_millis(200),
        min_call_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(500),
        client_timeout: Duration::from_secs(3),
        ..Tuning::default()
    }
}

/// Engine `name` (client id `bench-<name>`), in its own thread and runtime.
fn host(name: &str, config: WorkerConfig) -> anyhow::Result<Hosted> {
    Hosted::start(
        format!("bench-{name}"),
        config,
        Counter::new(Instant::now(), u64::MAX),
        Arc::new(Metrics::new()),
    )
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

/// Shards of `stream` whose lease the engine with client-id prefix `prefix` holds.
fn held_by(snap: &GroupSnapshot, stream: &str, prefix: &str) -> BTreeSet<String> {
    snap.leases
        .iter()
        .filter(|l| l.stream == stream && l.owner.as_deref().is_some_and(|o| o.starts_with(prefix)))
        .map(|l| l.shard_id.clone())
        .collect()
}

/// Every shard in `shards` has a lease held by one of the engines `prefixes`.
fn all_owned_by(
    snap: &GroupSnapshot,
    stream: &str,
    shards: &BTreeSet<String>,
    prefixes: &[String],
) -> bool {
    let held = snap
        .leases
        .iter()
        .filter(|l| l.stream == stream && shards.contains(&l.shard_id))
        .filter(|l| {
            l.owner
                .as_deref()
                .is_some_and(|o| prefixes.iter().any(|p| o.starts_with(p)))
        })
        .count();
    held == shards.len()
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

/// Median and maximum, in ms.
fn stats(samples: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let min = ms.first().copied().unwrap_or(f64::NAN);
    let max = ms.last().copied().unwrap_or(f64::NAN);
    (min, ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN), max)
}

fn med_max(samples: &[Duration]) -> String {
    let (_, med, max) = stats(samples);
    format!("{} / {}", num(med), num(max))
}

/// Runs the benchmark on a fresh stream and table and always deletes both.
pub async fn run(aws: &Aws, rounds: usize, kill_rounds: usize) -> Vec<Row> {
    let stream = support::unique("rebalance");
    let table = support::unique("rebalance-state");
    let stop_load = CancellationToken::new();
    let mut engines = Vec::new();
    let rows = match measure(
        aws,
        &stream,
        &table,
        &stop_load,
        &mut engines,
        rounds.max(1),
        kill_rounds.max(1),
    )
    .await
    {
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
    rounds: usize,
    kill_rounds: usize,
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

    let p =
        |names: &[&str]| -> Vec<String> { names.iter().map(|n| format!("bench-{n}-")).collect() };
    let ab = p(&["a", "b"]);
    let abc = p(&["a", "b", "c"]);
    let b_only = p(&["b"]);

    // Steady state with a and b. engines[0] = a, engines[1] = b.
    let start = Instant::now();
    engines.push(host("a", config.clone())?);
    engines.push(host("b", config.clone())?);
    let settle = wait_for(
        &store,
        &group,
        start,
        limit,
        &[Box::new(|s| plan_applied(s, stream, &ab))],
    )
    .await?;
    let mut rows = vec![Row::info(
        "rebalance start",
        format!("2 engines start on {SHARDS} shards -> plan applied ({tuned})"),
        num(settle[0].as_secs_f64() * 1000.0),
        "ms",
    )];

    let (mut joins, mut stops, mut stop_plans) = (Vec::new(), Vec::new(), Vec::new());
    let mut moved = 0;
    for _ in 0..rounds {
        tokio::time::sleep(hb * 2).await;
        // (a) c joins.
        let start = Instant::now();
        engines.push(host("c", config.clone())?);
        let joined = wait_for(
            &store,
            &group,
            start,
            limit,
            &[Box::new(|s| plan_applied(s, stream, &abc))],
        )
        .await?;
        joins.push(joined[0]);
        tokio::time::sleep(hb * 2).await;

        // (b) c stops gracefully: its shards go to a and b.
        let mut c = engines.pop().context("engine c")?;
        let before = store
            .load_group(&group)
            .await
            .context("reading the group")?;
        let of_c = held_by(&before, stream, "bench-c-");
        anyhow::ensure!(!of_c.is_empty(), "engine c holds no shard before its stop");
        moved = of_c.len();
        let start = Instant::now();
        c.cancel();
        let checks: [Check<'_>; 2] = [
            Box::new(|s| all_owned_by(s, stream, &of_c, &ab)),
            Box::new(|s| plan_applied(s, stream, &ab)),
        ];
        let stopped = wait_for(&store, &group, start, limit, &checks).await;
        c.join().await;
        let stopped = stopped?;
        stops.push(stopped[0]);
        stop_plans.push(stopped[1]);
    }
    let n = format!("median / max of {rounds}");
    let (_, _, max) = stats(&joins);
    rows.push(Row::goal(
        "rebalance join",
        format!("3rd engine starts -> every lease with its planned owner, {n} ({tuned})"),
        med_max(&joins),
        "ms",
        format!("max < 3 heartbeats ({:.0} ms)", 3.0 * hb_ms),
        max < 3.0 * hb_ms,
    ));
    let (_, _, max) = stats(&stops);
    rows.push(Row::goal(
        "handoff graceful stop",
        format!("engine c cancelled -> its {moved} shards owned by a/b, {n}"),
        med_max(&stops),
        "ms",
        format!("max < 2 heartbeats ({:.0} ms)", 2.0 * hb_ms),
        max < 2.0 * hb_ms,
    ));
    rows.push(Row::info(
        "handoff graceful stop",
        format!("engine c cancelled -> plan for a,b fully applied, {n}"),
        med_max(&stop_plans),
        "ms",
    ));

    // (c) a, the leader, is killed: no release, no deregistration. Then a new a joins.
    let mut kills = Vec::new();
    let mut taken = 0;
    for round in 0..kill_rounds {
        tokio::time::sleep(hb * 2).await;
        let before = store
            .load_group(&group)
            .await
            .context("reading the group")?;
        let of_a = held_by(&before, stream, "bench-a-");
        anyhow::ensure!(!of_a.is_empty(), "engine a holds no shard before the kill");
        taken = of_a.len();
        let mut a = engines.remove(0);
        let start = Instant::now();
        a.kill();
        let killed = wait_for(
            &store,
            &group,
            start,
            limit,
            &[Box::new(|s| all_owned_by(s, stream, &of_a, &b_only))],
        )
        .await;
        a.join().await;
        kills.push(killed?[0]);
        if round + 1 < kill_rounds {
            let start = Instant::now();
            engines.insert(0, host("a", config.clone())?);
            wait_for(
                &store,
                &group,
                start,
                limit,
                &[Box::new(|s| plan_applied(s, stream, &ab))],
            )
            .await?;
        }
    }
    // The observer starts its clock when it first sees the last renewal (up to one
    // heartbeat after it), judges staleness on its own tick grid (up to one more), and
    // then claims (one write, tick jitter): clientTimeout + 3 heartbeats bounds it. Less
    // than clientTimeout - 1 heartbeat would mean leases were released, not taken over.
    let (min, _, max) = stats(&kills);
    let (lo, hi) = (timeout_ms - hb_ms, timeout_ms + 3.0 * hb_ms);
    rows.push(Row::goal(
        "takeover after kill",
        format!("leader a killed -> its {taken} shards owned by b, median / max of {kill_rounds} ({tuned})"),
        med_max(&kills),
        "ms",
        format!("all in {lo:.0}..{hi:.0} ms (~ client timeout)"),
        min >= lo && max < hi,
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_applied_and_handover_checks() {
        // Two clients on 8 shards, every lease with its planned owner.
        let mut snap = crate::micro::snapshot(SHARDS as u32, 2);
        let stream = "orders";
        let first = snap.clients[0].client_id.clone();
        let second = snap.clients[1].client_id.clone();
        let both = vec![
            first[..first.len() - 6].to_owned(),
            second[..second.len() - 6].to_owned(),
        ];
        assert!(plan_applied(&snap, stream, &both));
        // A client missing from the rows: not applied.
        assert!(!plan_applied(&snap, stream, &both[..1]));

        let of_second = held_by(&snap, stream, &both[1]);
        assert_eq!(of_second.len(), 4);
        assert!(!all_owned_by(&snap, stream, &of_second, &both[..1]));
        // The second client's shards move to the first one by one.
        for l in snap
            .leases
            .iter_mut()
            .filter(|l| of_second.contains(&l.shard_id))
        {
            l.owner = None;
        }
        assert!(!all_owned_by(&snap, stream, &of_second, &both[..1]));
        assert!(!plan_applied(&snap, stream, &both));
        for l in snap.leases.iter_mut() {
            l.owner = Some(first.clone());
        }
        assert!(all_owned_by(&snap, stream, &of_second, &both[..1]));
        assert!(
            !plan_applied(&snap, stream, &both),
            "an unbalanced group is not the plan"
        );
    }

    #[test]
    fn stats_are_min_median_max() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(stats(&ms(&[30, 10, 20])), (10.0, 20.0, 30.0));
        assert_eq!(med_max(&ms(&[500, 400, 600, 450, 2000])), "500.0 / 2000");
    }
}
