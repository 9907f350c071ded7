//! A LATEST shard handed over before anything was acknowledged: the next owner starts at
//! the time of the shard's first claim (less a margin), so nothing that arrived after it
//! is skipped. That time must not come from the first claimer's wall clock: here the first
//! claimer is a `kcg-worker` process whose clock runs two minutes ahead (libfaketime), and
//! records that arrive after its claim must still be read by the next owner.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_KINESIS` (skips with a message when
//! they are not set) and libfaketime (Debian package `faketime`; `.ci/run` installs it).

mod group_support;
mod process_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use group_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_latest_shard_handed_over_does_not_depend_on_the_first_claimers_clock() {
    let Some(mut env) = env("handover", 1).await else {
        return;
    };
    let libfaketime = process_support::libfaketime("libfaketime.so.1");
    env.start_position = "Latest".into();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "group: {}\nstreams:\n- name: {}\n  startPosition: Latest\nstateStore:\n  table: {}\n\
             delivery:\n  stdout: {{}}\ntuning:\n  heartbeatInterval: 300ms\n  clientTimeout: 3s\n",
            env.group, env.stream, env.table
        ),
    )
    .expect("config");
    // The first claimer: its wall clock two minutes ahead (monotonic time left alone).
    let mut skewed = process_support::worker_command(&config, "skewed")
        .env("LD_PRELOAD", &libfaketime)
        .env("FAKETIME", "+120s")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("skewed.log")).expect("log"))
        .spawn()
        .expect("spawning kcg-worker under faketime");
    let start = Instant::now();
    loop {
        let owned = env
            .snapshot()
            .await
            .leases
            .iter()
            .any(|l| l.owner.as_deref().is_some_and(|o| o.starts_with("skewed-")));
        if owned {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the skewed worker never claimed the shard; its log: {}",
            std::fs::read_to_string(dir.path().join("skewed.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It reads at LATEST from its claim on; it dies before any record arrives, so it
    // acknowledges nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    skewed.kill().await.expect("kill");
    let want = env.put("x", 20).await;

    // The next owner takes the shard over after the client timeout, without checkpoint.
    let w = env.start("e2");
    env.wait_delivered(&want, Duration::from_secs(20)).await;
    w.stop().await;
    env.cleanup().await;
}
