//! Issue 9, "lost register answer": the first `register` of an engine reaches DynamoDB and
//! is applied, but its answer is lost (a TCP relay swallows it). The engine must still
//! become a member and read, instead of meeting its own row as a `Conflict` at every retry.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set. This file holds one test because it points the process-wide
//! `AWS_ENDPOINT_URL_DYNAMODB` at the relay while the engine starts.

mod group_support;

use std::time::Duration;

use group_support::relay::Relay;
use group_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_whose_register_answer_was_lost_joins_and_reads() {
    let Some(env) = env("reglost", 2).await else {
        return;
    };
    let direct = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("checked by env()");
    let relay = Relay::to_dynamodb().await;
    // The engine's first PutItem is its register (the table exists, and lease rows are
    // created only by a member).
    relay.lose_next_answer("PutItem");
    // SAFETY: this test binary runs this single test; nothing else reads the environment
    // concurrently except the engine we are starting.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", relay.url()) };
    let want = env.put("r", 20).await;
    let w = env.start("solo");

    env.wait_ownership(&[("solo", 2)], Duration::from_secs(20))
        .await;
    env.wait_delivered(&want, Duration::from_secs(20)).await;
    assert_eq!(
        relay.lost_answers(),
        1,
        "the register's answer must have been lost, or this test proves nothing"
    );
    let clients = env.snapshot().await.clients;
    assert_eq!(clients.len(), 1, "one client row, ours: {clients:?}");
    w.stop().await;
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", &direct) };
}
