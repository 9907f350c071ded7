//! A worker's heartbeat never waits behind its own tick's reads (issue 9, "its renewals
//! never wait behind its duties").
//!
//! Worker e1 reaches DynamoDB through a TCP relay that, for a while, never answers `Query`:
//! every client read (and lease read) of e1's tick waits out the store-call timeout (1 s),
//! while `UpdateItem` (heartbeats, checkpoints) passes. When the heartbeat was the first
//! step of the tick, its pace was the tick's (over 1 s here; seconds at 1,000 shards on a
//! busy DynamoDB, past the fencing margin). Now it runs on its own schedule: its counter in
//! DynamoDB keeps moving every heartbeat interval, its readers keep delivering (none
//! fences itself), and the other worker takes none of its leases.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set. This file holds one test because it points the process-wide
//! `AWS_ENDPOINT_URL_DYNAMODB` at the relay while e1 starts.

mod group_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use group_support::relay::Relay;
use group_support::*;
use kcg_worker::metrics::Metrics;

/// How long `Query` stalls: twice the client timeout (3 s), so a heartbeat held up by the
/// tick would be seen by everyone.
const STALL: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeat_keeps_its_pace_while_the_tick_reads_stall() {
    let Some(env) = env("hbpace", 4).await else {
        return;
    };
    let relay = Relay::to_dynamodb().await;
    let m1 = Arc::new(Metrics::new());
    let w1 = env
        .start_through(&relay, "e1", m1.clone(), default_health())
        .await;
    let w2 = env.start("e2");
    env.wait_ownership(&[("e1", 2), ("e2", 2)], Duration::from_secs(30))
        .await;
    let first = env.put("a", 40).await;
    env.wait_delivered(&first, Duration::from_secs(30)).await;

    // e1's tick can read nothing now; its heartbeat must not care.
    relay.stall("Query");
    let stalled = Instant::now();
    let during = env.put("b", 40).await;
    let mut e1_beats = HeartbeatWatch::default();
    let mut reported = false;
    while stalled.elapsed() < STALL {
        if let Some(e1) = env.client("e1").await {
            e1_beats.see(e1.heartbeat);
            reported |= e1.last_error_reason.as_deref() == Some("StateStoreUnavailable");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still stalled: e1's readers deliver what they read.
    env.wait_delivered(&during, Duration::from_secs(10)).await;
    let owners = env.ownership().await;
    relay.unstall();

    let last = env.put("c", 40).await;
    env.wait_delivered(&last, Duration::from_secs(30)).await;
    w1.stop().await;
    w2.stop().await;

    let (beats, widest_gap) = (e1_beats.beats, e1_beats.widest_gap);
    eprintln!(
        "e1: {beats} heartbeats, widest gap {widest_gap:?}, reported unavailable: {reported}"
    );
    assert!(
        reported,
        "e1's tick saw its reads time out, and its heartbeat reported it"
    );
    assert!(
        widest_gap < Duration::from_millis(900),
        "e1's heartbeat stood still for {widest_gap:?} while its tick's reads stalled \
         (heartbeat interval 300ms, store-call timeout 1s)"
    );
    assert!(!fenced(&m1), "a reader of e1 fenced itself");
    assert_eq!(
        owners,
        [("e1".to_owned(), 2), ("e2".to_owned(), 2)].into(),
        "e2 took none of e1's leases"
    );
    let log = env.log.all();
    assert_order_per_shard(&log);
    assert!(
        duplicates(&log).is_empty(),
        "no handoff happened, so nothing is delivered twice: {:?}",
        duplicates(&log).first()
    );
    env.cleanup().await;
}
