//! Acceptance "Bad config": the real `kcg-worker` binary, given each kind of invalid config
//! (in the file or through a `KCG__` environment override), exits with code 2 before
//! touching AWS, prints nothing on stdout and names the field on stderr. No emulator needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kcg-worker");

const VALID: &str = "group: ns/g\nstreams: [{name: orders}]\nstateStore: {table: kcg-state}\ndelivery: {stdout: {}}\n";

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(format!("{}.yaml", name.replace(' ', "-")));
    std::fs::write(&path, yaml).expect("write config");
    path
}

/// `kcg-worker run --config FILE` without inherited `KCG__` variables.
fn command(path: &PathBuf) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(path)
        .args(["--listen", "127.0.0.1:0"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("KCG__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs [`command`] with `env` added.
fn run(path: &PathBuf, env: &[(&str, &str)]) -> Output {
    command(path)
        .envs(env.iter().copied())
        .output()
        .expect("run kcg-worker")
}

fn assert_config_error(name: &str, out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: exit code; stderr: {err}"
    );
    assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{name}: stderr should contain {needle:?}: {err}"
        );
    }
}

#[test]
fn each_kind_of_bad_config_exits_2_naming_the_field() {
    let cases: [(&str, String, &[&str]); 11] = [
        (
            "no streams",
            VALID.replace("[{name: orders}]", "[]"),
            &["streams: at least one stream is required"],
        ),
        (
            "bad duration",
            format!("{VALID}tuning: {{pollInterval: 5x}}\n"),
            &[r#"tuning.pollInterval: invalid duration "5x" (expected like 500ms, 5s, 1m30s)"#],
        ),
        (
            "duration without unit",
            format!("{VALID}tuning: {{checkpointInterval: 5}}\n"),
            &["tuning.checkpointInterval: invalid duration 5"],
        ),
        (
            "missing table",
            VALID.replace("{table: kcg-state}", "{}"),
            &["stateStore.table: is required"],
        ),
        (
            "bad table name",
            VALID.replace("kcg-state", "ab"),
            &["stateStore.table", "is not a DynamoDB table name"],
        ),
        (
            "malformed stream ARN",
            VALID.replace(
                "orders",
                "\"arn:aws:kinesis:us-east-1:12345:stream/orders\"",
            ),
            &["streams[0].name: malformed stream ARN"],
        ),
        (
            "malformed role ARN",
            VALID.replace(
                "{name: orders}",
                "{name: orders, roleArn: \"arn:aws:iam:role/x\"}",
            ),
            &["streams[0].roleArn: malformed role ARN"],
        ),
        (
            "zero heartbeat",
            format!("{VALID}tuning: {{heartbeatInterval: 0s}}\n"),
            &["tuning.heartbeatInterval: must be at least 100ms"],
        ),
        (
            // Readers would fence themselves at every tick (issue 9).
            "client timeout of two heartbeats",
            format!("{VALID}tuning: {{heartbeatInterval: 2s, clientTimeout: 4s}}\n"),
            &["tuning.clientTimeout: must be at least 8s"],
        ),
        (
            // A heartbeat may wait 1s for the store, longer than its interval.
            "sub-second heartbeat against the store-call timeout",
            format!("{VALID}tuning: {{heartbeatInterval: 100ms, clientTimeout: 2s}}\n"),
            &["tuning.clientTimeout: must be at least 2s200ms"],
        ),
        (
            "no delivery",
            VALID.replace("delivery: {stdout: {}}\n", ""),
            &["delivery: is required"],
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, yaml, needles) in cases {
        let out = run(&write(dir.path(), name, &yaml), &[]);
        assert_config_error(name, &out, needles);
    }
}

#[test]
fn a_bad_env_override_exits_2_naming_field_and_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "env", VALID);
    let out = run(&path, &[("KCG__TUNING__HEARTBEAT_INTERVAL", "soon")]);
    assert_config_error(
        "env duration",
        &out,
        &[
            r#"tuning.heartbeatInterval: invalid duration "soon""#,
            "KCG__TUNING__HEARTBEAT_INTERVAL",
        ],
    );
    let out = run(&path, &[("KCG__STATE_STORE__TABLE", "x")]);
    assert_config_error("env table", &out, &["stateStore.table", "\"x\""]);
}

#[test]
fn a_missing_file_exits_2_naming_it() {
    let out = run(&PathBuf::from("/nonexistent/kcg.yaml"), &[]);
    assert_config_error("missing file", &out, &["/nonexistent/kcg.yaml"]);
}

#[test]
fn an_unknown_field_exits_2_with_a_did_you_mean_in_the_file_and_in_the_env() {
    let dir = tempfile::tempdir().expect("temp dir");
    let typo = write(
        dir.path(),
        "typo",
        &VALID.replace("{name: orders}", "{name: orders, startPositon: Latest}"),
    );
    let out = run(&typo, &[]);
    assert_config_error(
        "file typo",
        &out,
        &["streams[0].startPositon: unknown field (did you mean startPosition?)"],
    );
    let path = write(dir.path(), "valid", VALID);
    for origin in ["user", "operator"] {
        let out = run(
            &path,
            &[
                ("KCG__TUNING__POLL_INTERVALL", "5s"),
                ("KCG_CONFIG_ORIGIN", origin),
            ],
        );
        assert_config_error(
            "env typo",
            &out,
            &[
                "tuning.pollIntervall: unknown field (did you mean pollInterval?)",
                "KCG__TUNING__POLL_INTERVALL",
            ],
        );
    }
}

/// A config the operator rendered with a field this worker does not know (a newer operator
/// during a rolling upgrade): the worker warns and starts. Its state store is a closed port,
/// so it is stopped once the warning and the start are logged.
#[test]
fn an_unknown_field_from_the_operator_is_a_warning() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "rendered",
        &format!("{VALID}tuning: {{fetchMode: fanOut}}\n"),
    );
    let mut cmd = command(&path);
    cmd.env("KCG_CONFIG_ORIGIN", "operator")
        .env("KCG_LOG_FORMAT", "text")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start kcg-worker");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut warned, mut started) = (false, false);
    let mut seen = Vec::new();
    while !(warned && started) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        warned |= line.contains("WARN")
            && line.contains("does not know")
            && line.contains("tuning.fetchMode");
        started |= line.contains("starting");
        seen.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        warned && started,
        "expected a warning naming tuning.fetchMode, then the start: {seen:#?}"
    );
}
