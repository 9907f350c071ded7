//! The leader's duties never hold up its heartbeat (issue 9, "slow leader ticks").
//!
//! The leader reaches DynamoDB through a TCP relay that never answers `DeleteItem`, and the
//! group holds 96 client rows of dead workers: every attempt to prune them waits out the
//! store-call timeout (1 s), three rounds of 32 writes, again and again. Run inside the
//! tick, that work stretched the leader's heartbeat gap past the fencing margin (readers
//! fenced, the other worker judged the leader dead, leadership flapped). The duties must run
//! beside the tick: the leader's heartbeat keeps its pace, its readers never fence, the
//! other worker never leads, nothing is lost or delivered twice; and once DynamoDB answers
//! again, the dead rows are pruned.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set. This file holds one test because it points the process-wide
//! `AWS_ENDPOINT_URL_DYNAMODB` at the relay while the leader starts.

mod group_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use group_support::relay::Relay;
use group_support::*;
use kcg_worker::metrics::Metrics;

/// Dead client rows: three rounds of the leader's 32 concurrent writes.
const DEAD_CLIENTS: usize = 96;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_leader_duties_do_not_delay_its_heartbeat() {
    let Some(env) = env("duties", 4).await else {
        return;
    };
    let relay = Relay::to_dynamodb().await;
    relay.stall("DeleteItem");

    // Workers that registered and died: their heartbeats never move. (Named after the live
    // ones, so that e1 is the lowest client id, the leader, all along.)
    join_all((0..DEAD_CLIENTS).map(|i| {
        let id = format!("zz-dead-{i:03}");
        let (store, group) = (&env.store, &env.group);
        async move {
            store
                .register(group, &id, "gone", 1, &[])
                .await
                .expect("register dead client")
        }
    }))
    .await;

    let m1 = Arc::new(Metrics::new());
    let started = Instant::now();
    let w1 = env
        .start_through(&relay, "e1", m1.clone(), default_health())
        .await;
    let m2 = Arc::new(Metrics::new());
    let w2 = env.start_with("e2", m2.clone(), default_health());

    // Watch e1's heartbeat, and who leads, from its registration until the window ends:
    // the dead clients are judged dead 3 s (the client timeout) after they are first seen,
    // and from then on the leader keeps trying to prune them.
    let first = env.put("a", 40).await;
    let mut e1_beats = HeartbeatWatch::default();
    let mut e2_led = false;
    while started.elapsed() < Duration::from_secs(14) {
        if let Some(e1) = env.client("e1").await {
            e1_beats.see(e1.heartbeat);
        }
        e2_led |= m2.is_leader.get() == 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let widest_gap = e1_beats.widest_gap;
    let prunes_tried = m1.encode().lines().any(|l| {
        l.starts_with("kcg_worker_store_requests_total{operation=\"prune\"}") && !l.ends_with(" 0")
    });
    let second = env.put("b", 40).await;
    env.wait_delivered(&first, Duration::from_secs(30)).await;
    env.wait_delivered(&second, Duration::from_secs(30)).await;
    let owners = env.ownership().await;

    // DynamoDB answers again: the duties catch up.
    relay.unstall();
    let unstalled = Instant::now();
    loop {
        let left = env.snapshot().await.clients.len();
        if left == 2 {
            break;
        }
        assert!(
            unstalled.elapsed() < Duration::from_secs(20),
            "{left} client rows left after DynamoDB answered again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w1.stop().await;
    w2.stop().await;

    eprintln!("widest gap between e1's heartbeats: {widest_gap:?}");
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert!(
        prunes_tried,
        "the leader tried to prune the dead clients while DeleteItem stalled"
    );
    assert!(
        widest_gap < Duration::from_millis(1500),
        "the leader's heartbeat stood still for {widest_gap:?} while its duties were slow \
         (heartbeat interval 300ms, fencing margin 2.7s)"
    );
    assert!(!e2_led, "leadership moved to e2 while e1 was alive");
    assert!(!fenced(&m1), "a reader of the leader fenced itself");
    assert_eq!(
        owners,
        [("e1".to_owned(), 2), ("e2".to_owned(), 2)].into(),
        "the group stayed balanced"
    );
    assert!(
        duplicates(&log).is_empty(),
        "no handoff happened, so nothing is delivered twice: {:?}",
        duplicates(&log).first()
    );
    env.cleanup().await;
}
