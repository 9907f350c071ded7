//! Issue 2 §5: a reader whose shard iterator expired resumes from what it delivered, with
//! nothing lost and nothing repeated. Real Kinesis expires iterators after 5 minutes (a
//! handler failing that long is the usual cause); this test runs its own ministack with
//! 2-second iterators and a handler that fails for longer than that.
//!
//! Needs `KCG_MINISTACK_PYTHON` (from `scripts/emulators.sh env`); skips with a message when
//! it is not set, fails when it is set but ministack does not start.

mod reader_support;

use std::time::{Duration, Instant};

use kcg_worker::metrics::ReasonLabels;
use reader_support::*;

const ITERATOR_LIFETIME_SECS: f64 = 2.0;

#[tokio::test]
async fn expired_iterator_resumes_after_the_last_delivered_record() {
    let Some(kinesis) = PrivateMinistack::start(
        "expired_iterator",
        &[("ITERATOR_EXPIRY_SECONDS", ITERATOR_LIFETIME_SECS)],
    )
    .await
    else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&kinesis.conf);
    let name = unique("expired");
    create_stream(&sdk, &name, 1).await;
    let first = payloads("a", 5);
    put(&sdk, &name, "k", &first).await;

    // Fails every batch for twice the iterator lifetime: the next iterator the reader holds
    // while the handler retries is stale by the time the batch is acknowledged.
    let failing_until = Instant::now() + Duration::from_secs_f64(2.0 * ITERATOR_LIFETIME_SECS);
    let handler = Recording::failing(move |_| Instant::now() < failing_until);
    let client = connect(&name, &kinesis.conf).await;
    let r = start(
        client,
        &name,
        "shardId-000000000000",
        None,
        100,
        handler.clone(),
    );

    handler.wait_for(first.len(), Duration::from_secs(30)).await;
    let second = payloads("b", 5);
    put(&sdk, &name, "k", &second).await;
    handler
        .wait_for(first.len() + second.len(), Duration::from_secs(30))
        .await;

    let expired = r
        .metrics
        .errors
        .get_or_create(&ReasonLabels {
            reason: "ExpiredIterator".into(),
        })
        .get();
    assert!(
        expired >= 1,
        "the handler failed for twice the iterator lifetime, so the reader must have met an \
         ExpiredIterator; it did not"
    );
    // Everything once, in order: the new iterator starts after the last delivered record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let want: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_eq!(handler.payloads(), want);
    assert!(
        r.progress.borrow().issue.is_none(),
        "no issue left once reads work"
    );

    let last = stop(r).await;
    assert!(last.acked.is_some(), "the reader reports its checkpoint");
    delete_stream(&sdk, &name).await;
}
