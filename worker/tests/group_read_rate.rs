//! A fair read rate: two groups read one single-shard stream that receives a steady trickle
//! (a record every 100ms). At the default `tuning.minCallInterval` (1s) each group calls
//! GetRecords about once a second, so together they stay well within the shard's 5 calls
//! per second, as `kcg_worker_get_records_calls_total` shows. (Before minCallInterval a
//! reader called again 200ms after every page with records: 5 calls/s per group, 10 for
//! two.) Needs DynamoDB Local and kinesis-local (scripts/emulators.sh).

mod group_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use group_support::{Env, env};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;

/// `kcg_worker_get_records_calls_total` of `stream` in a worker's /metrics text.
fn get_records_calls(metrics: &Metrics, stream: &str) -> f64 {
    let prefix = format!("kcg_worker_get_records_calls_total{{stream=\"{stream}\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().expect("counter value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_groups_on_a_trickle_stay_within_the_shard_call_limit() {
    let Some(mut g1) = env("rate", 1).await else {
        return;
    };
    g1.min_call_interval = "1s".into(); // the default
    let mut g2 = Env::new(
        g1.kinesis.clone(),
        g1.store.clone(),
        g1.table.clone(),
        g1.stream.clone(),
        format!("{}-other", g1.group),
    );
    g2.min_call_interval = g1.min_call_interval.clone();
    let health = || Arc::new(Health::new(Duration::from_secs(30)));
    let (m1, m2) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let e1 = g1.start_with("e1", m1.clone(), health());
    let e2 = g2.start_with("f1", m2.clone(), health());
    g1.wait_ownership(&[("e1", 1)], Duration::from_secs(30))
        .await;
    g2.wait_ownership(&[("f1", 1)], Duration::from_secs(30))
        .await;
    // Both readers at the tip before the window starts.
    let warm = g1.put("warm", 1).await;
    g1.wait_delivered(&warm, Duration::from_secs(10)).await;
    g2.wait_delivered(&warm, Duration::from_secs(10)).await;

    let calls = || get_records_calls(&m1, &g1.stream) + get_records_calls(&m2, &g2.stream);
    let before = calls();
    let started = Instant::now();
    let mut want = std::collections::BTreeSet::new();
    for i in 0..40 {
        want.extend(g1.put(&format!("t{i}"), 1).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = started.elapsed().as_secs_f64();
    let rate = (calls() - before) / window;
    eprintln!("two groups: {rate:.2} GetRecords calls/s on the shard over {window:.1}s");
    assert!(
        rate <= 5.0,
        "two groups together call GetRecords {rate:.2} times/s on one shard (limit 5)"
    );
    // About one call a second per group: reading went on throughout.
    assert!(rate >= 1.0, "the readers kept polling: {rate:.2} calls/s");
    g1.wait_delivered(&want, Duration::from_secs(10)).await;
    g2.wait_delivered(&want, Duration::from_secs(10)).await;
    e1.stop().await;
    e2.stop().await;
    g1.cleanup().await;
}
