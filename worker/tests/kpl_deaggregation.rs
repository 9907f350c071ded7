//! KPL deaggregation end to end: records aggregated by AWS's aggregation library (PyPI
//! aws-kinesis-agg, through worker/tests/kpl_aggregate.py), put into kinesis-local, read by
//! engines coordinating through DynamoDB Local.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_KINESIS` and `KCG_KPL_AGG_PYTHON`
//! (all from `scripts/emulators.sh env`); without them the tests print why and skip.

mod group_support;
mod kpl_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use futures::future::BoxFuture;
use group_support::*;
use kcg_worker::delivery::{CommitToken, HandlerError, ManualBatchHandler, ManualCommit, Record};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::position::Position;
use kpl_support::*;

/// Puts `records` in order (one shard, one PutRecords) and returns their sequence numbers.
async fn put_all(env: &Env, records: &[Put]) -> Vec<String> {
    let entries = records
        .iter()
        .map(|p| {
            PutRecordsRequestEntry::builder()
                .partition_key(&p.partition_key)
                .set_explicit_hash_key(p.explicit_hash_key.clone())
                .data(Blob::new(p.data.clone()))
                .build()
                .expect("entry")
        })
        .collect();
    let out = env
        .kinesis
        .put_records()
        .stream_name(&env.stream)
        .set_records(Some(entries))
        .send()
        .await
        .expect("put records");
    assert_eq!(out.failed_record_count(), Some(0));
    out.records()
        .iter()
        .map(|r| r.sequence_number().expect("sequence").to_owned())
        .collect()
}

fn agg_python(test: &str) -> Option<String> {
    let python = std::env::var("KCG_KPL_AGG_PYTHON").ok();
    if python.is_none() {
        eprintln!(
            "SKIP {test}: KCG_KPL_AGG_PYTHON is not set (eval \"$(scripts/emulators.sh env)\")"
        );
    }
    python
}

/// What a delivery shows: (id, sub-sequence, partition key, explicit hash key).
type Shown = (String, Option<u64>, String, Option<String>);

fn shown(d: &Delivery) -> Shown {
    (
        d.id.clone(),
        d.sub_sequence,
        d.partition_key.clone(),
        d.explicit_hash_key.clone(),
    )
}

fn users_shown(aggregate: &[User]) -> Vec<Shown> {
    aggregate
        .iter()
        .enumerate()
        .map(|(i, u)| {
            (
                u.data.clone(),
                Some(i as u64),
                u.partition_key.clone(),
                u.explicit_hash_key.clone(),
            )
        })
        .collect()
}

async fn wait_count(env: &Env, n: usize, within: Duration) {
    let start = Instant::now();
    while env.log.all().len() < n {
        assert!(
            start.elapsed() < within,
            "{} of {n} deliveries after {within:?}: {:?}",
            env.log.all().len(),
            env.log.all().iter().map(shown).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one engine until it delivered `n` records, stops it, and returns its metrics.
async fn read_all(env: &Env, n: usize) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    let w = env.start_with(
        "e1",
        metrics.clone(),
        Arc::new(Health::new(Duration::from_secs(30))),
    );
    wait_count(env, n, Duration::from_secs(30)).await;
    w.stop().await;
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_records_are_delivered_in_order_with_sub_sequence_and_keys() {
    let Some(python) = agg_python("deagg") else {
        return;
    };
    let Some(env) = env("deagg", 1).await else {
        return;
    };
    let first = vec![
        user("pk-a", "a-0"),
        user("pk-b", "a-1"),
        User {
            explicit_hash_key: Some("85070591730234615865843651857942052864".into()),
            ..user("pk-c", "a-2")
        },
        user("pk-a", "a-3"),
        user("pk-b", "a-4"),
    ];
    let second = vec![user("pk-z", "b-0"), user("pk-y", "b-1")];
    let aggregates = [first, second];
    let [agg_a, agg_b] = <[Put; 2]>::try_from(aggregate(&python, &aggregates))
        .ok()
        .expect("two aggregates");
    // Interleaved with plain records, which stay as they are.
    let seqs = put_all(
        &env,
        &[plain("p-0"), agg_a, plain("p-1"), agg_b, plain("p-2")],
    )
    .await;
    let metrics = read_all(&env, 10).await;

    let log = env.log.all();
    let plain_shown = |id: &str| (id.to_owned(), None, id.to_owned(), None);
    let mut want = vec![plain_shown("p-0")];
    want.extend(users_shown(&aggregates[0]));
    want.push(plain_shown("p-1"));
    want.extend(users_shown(&aggregates[1]));
    want.push(plain_shown("p-2"));
    assert_eq!(log.iter().map(shown).collect::<Vec<_>>(), want);
    // User records carry their aggregate's sequence number.
    let by_seq: Vec<&str> = log.iter().map(|d| d.sequence.as_str()).collect();
    let want_seq: Vec<&str> = [0, 1, 1, 1, 1, 1, 2, 3, 3, 4]
        .iter()
        .map(|&i| seqs[i].as_str())
        .collect();
    assert_eq!(by_seq, want_seq);
    // The final checkpoint is the last record, a whole plain one.
    let snap = env.snapshot().await;
    assert_eq!(
        snap.leases[0].checkpoint_position(),
        Some(Position::whole(seqs[4].clone()))
    );
    assert!(
        !metrics
            .encode()
            .contains("kcg_worker_deaggregation_failures_total{"),
        "no failure counted: {}",
        metrics.encode()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_aggregate_is_delivered_raw_and_counted() {
    let Some(python) = agg_python("deagg-corrupt") else {
        return;
    };
    let Some(env) = env("deagg-corrupt", 1).await else {
        return;
    };
    let mut aggs = aggregate(
        &python,
        &[
            vec![user("k", "c-0"), user("k", "c-1")],
            vec![user("k", "d-0")],
        ],
    );
    // Flip one bit of the first aggregate's MD5 trailer (its last 16 bytes).
    let corrupt = &mut aggs[0].data;
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x01;
    let raw = String::from_utf8_lossy(corrupt).into_owned();
    let agg_pk = aggs[0].partition_key.clone();
    put_all(&env, &aggs).await;
    let metrics = read_all(&env, 2).await;
    assert_eq!(
        env.log.all().iter().map(shown).collect::<Vec<_>>(),
        vec![
            (raw, None, agg_pk, None),
            ("d-0".to_owned(), Some(0), "k".to_owned(), None),
        ],
        "the corrupt aggregate raw, never dropped; the next one deaggregated"
    );
    let text = metrics.encode();
    let series = format!(
        "kcg_worker_deaggregation_failures_total{{stream=\"{}\",shard=\"shardId-000000000000\"}} 1",
        env.stream
    );
    assert!(text.contains(&series), "{series} missing from:\n{text}");
}

/// Takes each batch, checkpoints inside it up to user record `upto`, and holds the token
/// (never commits): a worker that processed only part of an aggregate when it stopped.
struct PartlyDone {
    upto: u64,
    seen: Arc<Mutex<Vec<Shown>>>,
    held: Arc<Mutex<Vec<CommitToken>>>,
}

impl ManualBatchHandler for PartlyDone {
    fn handle<'a>(
        &'a self,
        batch: &'a [Record],
        commit: CommitToken,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut seen = self.seen.lock().unwrap();
            for r in batch {
                seen.push((
                    String::from_utf8_lossy(&r.data).into_owned(),
                    r.sub_sequence,
                    r.partition_key.clone(),
                    r.explicit_hash_key.clone(),
                ));
            }
            if let Some(r) = batch.iter().find(|r| r.sub_sequence == Some(self.upto)) {
                commit.checkpoint(r.position());
            }
            self.held.lock().unwrap().push(commit);
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stopped_inside_an_aggregate_resumes_at_the_next_user_record() {
    let Some(python) = agg_python("deagg-resume") else {
        return;
    };
    let Some(env) = env("deagg-resume", 1).await else {
        return;
    };
    let aggregates = [(0..10)
        .map(|i| user(&format!("pk-{}", i % 3), &format!("u-{i}")))
        .collect::<Vec<_>>()];
    let aggs = aggregate(&python, &aggregates);
    let seqs = put_all(&env, &aggs).await;
    let k = 3;

    // e1 processes user records 0..=k of the aggregate, then stops.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let w1 = env.start_full(
        "e1",
        ManualCommit::arc(PartlyDone {
            upto: k,
            seen: seen.clone(),
            held: held.clone(),
        }),
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(30))),
    );
    let start = Instant::now();
    while seen.lock().unwrap().len() < 10 {
        assert!(start.elapsed() < Duration::from_secs(30), "e1 got nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w1.token.cancel();
    // The rest of the batch will never be committed: give up the token so the stop does
    // not wait for it (the reader then releases with the partial checkpoint). The pause
    // lets the reader see the stop first; were it to see the dropped token first, it would
    // hand 4.. to this handler again, which changes nothing below.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.lock().unwrap().clear();
    w1.stop().await;
    let lease = env.snapshot().await.leases.remove(0);
    assert_eq!(lease.owner, None, "released");
    assert_eq!(lease.checkpoint.as_deref(), Some(seqs[0].as_str()));
    assert_eq!(lease.checkpoint_sub_sequence, Some(k));

    // e2 takes over and starts at user record k + 1: no gap, no duplicate of 0..=k.
    let w2 = env.start("e2");
    wait_count(&env, 6, Duration::from_secs(30)).await;
    // Nothing more arrives (a redelivery of earlier user records would show up here).
    tokio::time::sleep(Duration::from_millis(800)).await;
    w2.stop().await;
    let got: Vec<Shown> = env.log.all().iter().map(shown).collect();
    assert_eq!(
        got,
        users_shown(&aggregates[0])[(k as usize + 1)..].to_vec()
    );
    let lease = env.snapshot().await.leases.remove(0);
    assert_eq!(
        lease.checkpoint_position(),
        Some(Position::sub(seqs[0].clone(), 9)),
        "e2 acknowledged the aggregate to its last user record"
    );
}
