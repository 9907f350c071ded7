//! A manual-commit handler that drops a commit token without committing must not stall
//! the shard silently (issue 2 §14): the reader reports it and redelivers from the last
//! committed record, skipping nothing. Against the Kinesis emulator (kinesis-local in CI).
//!
//! Needs `AWS_ENDPOINT_URL_KINESIS`; skips with a message when it is not set, fails when it
//! is set but the emulator does not answer.

mod reader_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kcg_worker::delivery::{CommitToken, HandlerError, ManualBatchHandler, ManualCommit, Record};
use kcg_worker::metrics::Metrics;
use kcg_worker::position::Position;
use kcg_worker::reader::{DROPPED_TOKEN_MESSAGE, ShardProgress, ShardTask, read_shard};
use reader_support::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Drops the token of the first batch it sees; commits every later one at once.
struct DropsFirst {
    seen: Mutex<Vec<String>>,
}

impl ManualBatchHandler for DropsFirst {
    fn handle<'a>(
        &'a self,
        batch: &'a [Record],
        commit: CommitToken,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        let mut seen = self.seen.lock().unwrap();
        let first = seen.is_empty();
        seen.extend(batch.iter().map(|r| r.sequence.clone()));
        if first {
            drop(commit);
        } else {
            commit.commit();
        }
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn dropped_commit_token_is_reported_and_redelivered() {
    let Some(conf) = kinesis_config("dropped_commit_token").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("droptoken");
    create_stream(&sdk, &name, 1).await;
    let seqs = put(&sdk, &name, "k", &payloads("d", 6)).await;
    let client = connect(&name, &conf).await;
    let handler = Arc::new(DropsFirst {
        seen: Mutex::new(Vec::new()),
    });
    struct Shared(Arc<DropsFirst>);
    impl ManualBatchHandler for Shared {
        fn handle<'a>(
            &'a self,
            batch: &'a [Record],
            commit: CommitToken,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            self.0.handle(batch, commit)
        }
    }
    let (tx, mut rx) = watch::channel(ShardProgress::default());
    let stop = CancellationToken::new();
    let task = ShardTask {
        client,
        stream: stream_config(&name),
        shard_id: "shardId-000000000000".into(),
        checkpoint: None,
        failure: Default::default(),
        fence: kcg_worker::fence::Fence::open(),
        lease_counter: 1,
    };
    let join = tokio::spawn(read_shard(
        task,
        tuning(3),
        ManualCommit::arc(Shared(handler.clone())),
        Arc::new(Metrics::new()),
        tx,
        stop.clone(),
    ));

    // The dropped token is reported, not waited on silently.
    let mut reported = false;
    let want = Some(Position::whole(seqs[5].clone()));
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            {
                let p = rx.borrow_and_update();
                if p.issue.as_ref().is_some_and(|i| {
                    i.reason == "HandlerFailing" && i.message == DROPPED_TOKEN_MESSAGE
                }) {
                    reported = true;
                }
                if p.acked == want {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "checkpoint stuck at {:?}: a dropped token stalled the shard",
        rx.borrow().acked
    );
    assert!(
        reported,
        "the dropped token must be reported as HandlerFailing"
    );
    // Redelivered from the last committed record (none): the first batch came twice, in
    // order, nothing skipped.
    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!(&seen[..3], &seqs[..3]);
    assert_eq!(
        &seen[3..],
        &seqs[..],
        "redelivery restarts after the committed prefix"
    );
    assert!(
        rx.borrow().issue.is_none(),
        "the issue clears once the handler commits again"
    );
    stop.cancel();
    let last = tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("reader returns")
        .expect("task");
    assert_eq!(last.acked, want);
    delete_stream(&sdk, &name).await;
}
