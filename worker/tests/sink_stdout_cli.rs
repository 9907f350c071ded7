//! The `kcg-worker` binary end to end with the stdout sink: stdout carries exactly one JSON
//! line per record (logs go to stderr) and SIGTERM shuts down gracefully with exit code 0.
//! Bad configs are covered by `config_cli.rs`.
//!
//! The run test needs `AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB`; it skips
//! with a message when they are not set and fails when they are set but unreachable.

mod reader_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reader_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_kcg-worker");

/// Kinesis sequence numbers are decimal strings of varying length.
fn seq_lt(a: &str, b: &str) -> bool {
    (a.len(), a) < (b.len(), b)
}

#[tokio::test]
async fn run_writes_json_lines_and_stops_on_sigterm() {
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        eprintln!("SKIP run_writes_json_lines: AWS_ENDPOINT_URL_DYNAMODB is not set");
        return;
    }
    let Some(conf) = kinesis_config("run_writes_json_lines").await else {
        return;
    };
    let sdk = aws_sdk_kinesis::Client::new(&conf);
    let name = unique("cli");
    create_stream(&sdk, &name, 2).await;
    let mut sent = Vec::new();
    for i in 0..30 {
        let p = format!("c-{i:03}");
        put(
            &sdk,
            &name,
            &format!("key-{}", i % 7),
            std::slice::from_ref(&p),
        )
        .await;
        sent.push(p);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "group: test/{name}\nstreams:\n  - name: {name}\n    startPosition: TrimHorizon\n\
             stateStore:\n  table: {name}\n  create: true\ndelivery:\n  stdout: {{}}\n\
             tuning:\n  pollInterval: 200ms\n  minCallInterval: 200ms\n  checkpointInterval: 1s\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "cli-test",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kcg-worker");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while lines.len() < sent.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "only {} of {} lines; stderr: {:?}",
                    lines.len(),
                    sent.len(),
                    errors.join().ok()
                );
            }
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    lines.extend(rx.try_iter());
    let logs = errors.join().unwrap();
    assert!(
        logs.iter().any(|l| l.contains("\"level\":\"INFO\"")),
        "JSON logs on stderr: {logs:?}"
    );

    // Exactly the records, each once, as JSON lines with the documented keys; per shard in
    // sequence order.
    let mut got = Vec::new();
    let mut last_per_shard = std::collections::HashMap::<String, String>::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "{l}");
        for k in [
            "stream",
            "shard",
            "sequence",
            "partitionKey",
            "data",
            "arrival",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {l}");
        }
        assert_eq!(v["stream"], name.as_str());
        let shard = v["shard"].as_str().unwrap().to_owned();
        let seq = v["sequence"].as_str().unwrap().to_owned();
        if let Some(prev) = last_per_shard.get(&shard) {
            assert!(
                seq_lt(prev, &seq),
                "order within {shard}: {prev} then {seq}"
            );
        }
        last_per_shard.insert(shard, seq);
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap())
            .unwrap();
        got.push(String::from_utf8(data).unwrap());
    }
    got.sort();
    assert_eq!(got, sent);
    delete_stream(&sdk, &name).await;
}
