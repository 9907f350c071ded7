//! The multiLang sink against real KCL record processors: `multilang/processor.py` on PyPI
//! amazon-kclpy and `multilang/processor.js` on npm aws-kcl, unchanged KCL applications,
//! run by the engine over kinesis-local and DynamoDB Local.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_KINESIS` and the library paths
//! `KCG_KCLPY_PATH` / `KCG_AWS_KCL_NODE_PATH` (all from `scripts/emulators.sh env`, which
//! installs the libraries); without them the tests print why and skip.

mod group_support;
mod kpl_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ScalingType};
use group_support::*;
use kcg_worker::config::{DeliveryConfig, MultiLangSink};
use kcg_worker::delivery::{
    BatchHandler, CommitTracker, Position, Record, ShardContext, build_handler,
};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::reader::ShardProgress;
use kpl_support::{User, aggregate, user};

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Node,
}

impl Lang {
    /// The processor's command line, or `None` (with a message) when its library is not
    /// installed.
    fn command(self, log: &Path) -> Option<Vec<String>> {
        let (var, env_name, program, file) = match self {
            Lang::Python => ("KCG_KCLPY_PATH", "PYTHONPATH", "python3", "processor.py"),
            Lang::Node => ("KCG_AWS_KCL_NODE_PATH", "NODE_PATH", "node", "processor.js"),
        };
        let Ok(lib) = std::env::var(var) else {
            eprintln!("SKIP {self:?}: {var} is not set (eval \"$(scripts/emulators.sh env)\")");
            return None;
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/multilang")
            .join(file);
        Some(vec![
            "/usr/bin/env".into(),
            format!("{env_name}={lib}"),
            program.into(),
            script.display().to_string(),
            log.display().to_string(),
        ])
    }
}

/// Reads a processor's event log.
fn read_events(log: &Path) -> Vec<Event> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.split(' ').map(str::to_owned);
            Event {
                shard: parts.next().unwrap_or_default(),
                kind: parts.next().unwrap_or_default(),
                args: parts.collect(),
            }
        })
        .collect()
}

/// Waits until the log has an event of `kind`.
async fn wait_event(log: &Path, kind: &str) -> Vec<Event> {
    let start = Instant::now();
    loop {
        let events = read_events(log);
        if events.iter().any(|e| e.kind == kind) {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {kind} event after 10s: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One line of a processor's event log.
#[derive(Clone, Debug, PartialEq)]
struct Event {
    shard: String,
    kind: String,
    /// The rest: sequence, sub-sequence, data, ...
    args: Vec<String>,
}

impl Event {
    fn data(&self) -> Option<&str> {
        (self.kind == "record").then(|| self.args[2].as_str())
    }
}

struct Case {
    env: Env,
    log: PathBuf,
    handler: Arc<dyn BatchHandler>,
    _dir: tempfile::TempDir,
}

impl Case {
    async fn new(test: &str, lang: Lang, shards: i32) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("events.log");
        let command = lang.command(&log)?;
        let env = env(test, shards).await?;
        let handler = build_handler(&DeliveryConfig {
            multi_lang: Some(MultiLangSink { command }),
            ..DeliveryConfig::default()
        })
        .expect("multiLang handler");
        Some(Self {
            env,
            log,
            handler,
            _dir: dir,
        })
    }

    fn start(&self, name: &str) -> Worker {
        self.env.start_full(
            name,
            self.handler.clone(),
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(30))),
        )
    }

    fn events(&self) -> Vec<Event> {
        read_events(&self.log)
    }

    /// Runs a worker until the processors logged every record of `data`, stops it
    /// gracefully and returns the whole event log.
    async fn run_worker(&self, name: &str, data: &[String]) -> Vec<Event> {
        let w = self.start(name);
        self.wait_records(data).await;
        w.stop().await;
        self.events()
    }

    /// Waits until the processors logged every record of `data`.
    async fn wait_records(&self, data: &[String]) -> Vec<Event> {
        let start = Instant::now();
        loop {
            let events = self.events();
            let seen: Vec<&str> = events.iter().filter_map(Event::data).collect();
            if data.iter().all(|d| seen.contains(&d.as_str())) {
                return events;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "records missing after 30s; events so far:\n{events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes records with these payloads, in order (partition key = payload).
    async fn put(&self, data: &[String]) {
        let entries = data
            .iter()
            .map(|d| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(d.clone().into_bytes()))
                    .partition_key(d)
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = self
            .env
            .kinesis
            .put_records()
            .stream_name(&self.env.stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

fn names(prefix: &str, n: usize, special: &[(usize, &str)]) -> Vec<String> {
    (0..n)
        .map(|i| {
            let tag = special
                .iter()
                .find(|(at, _)| *at == i)
                .map_or("", |(_, t)| *t);
            format!("{prefix}-{i}{tag}")
        })
        .collect()
}

/// The sequence number the processors logged for the record `data`.
fn sequence_of(events: &[Event], data: &str) -> String {
    events
        .iter()
        .find(|e| e.data() == Some(data))
        .map(|e| e.args[0].clone())
        .unwrap_or_else(|| panic!("{data} never delivered"))
}

/// The records each process got, in order: split at each `init`.
fn runs(events: &[Event]) -> Vec<(Event, Vec<String>)> {
    let mut out: Vec<(Event, Vec<String>)> = Vec::new();
    for e in events {
        if e.kind == "init" {
            out.push((e.clone(), Vec::new()));
        } else if let (Some(d), Some(run)) = (e.data(), out.last_mut()) {
            run.1.push(d.to_owned());
        }
    }
    out
}

/// Records in order, a checkpoint at a given sequence, and a new worker resumes right after
/// it (what was not checkpointed comes again: KCL's rule, kcg writes no checkpoint of its
/// own).
async fn checkpoint_then_restart_resumes_after_it(lang: Lang) {
    let Some(case) = Case::new(&format!("ml-resume-{lang:?}").to_lowercase(), lang, 1).await else {
        return;
    };
    let first = names("a", 10, &[(5, "#cp")]);
    case.put(&first).await;
    let events = case.run_worker("e1", &first).await;
    let r = runs(&events);
    assert_eq!(r.len(), 1, "one process: {events:#?}");
    assert_eq!(
        r[0].0.args,
        ["TRIM_HORIZON", "0"],
        "initialize without checkpoint"
    );
    assert_eq!(r[0].1, first, "every record once, in order");
    let cp = sequence_of(&events, "a-5#cp");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "checkpoint" && e.args == [cp.clone()]),
        "the checkpoint was granted: {events:#?}"
    );
    assert_eq!(
        events.last().map(|e| e.kind.as_str()),
        Some("shutdownRequested"),
        "a graceful stop asks the processor to shut down"
    );
    let lease = case.env.snapshot().await.leases.remove(0);
    assert_eq!(
        lease.checkpoint.as_deref(),
        Some(cp.as_str()),
        "the processor's checkpoint is the shard's"
    );

    let second = names("b", 3, &[]);
    case.put(&second).await;
    let events = case.run_worker("e2", &second).await;
    let r = runs(&events);
    assert_eq!(r.len(), 2, "{events:#?}");
    assert_eq!(
        r[1].0.args,
        [cp.clone(), "0".into()],
        "initialize at the checkpoint"
    );
    let mut want: Vec<String> = first[6..].to_vec();
    want.extend(second);
    assert_eq!(
        r[1].1, want,
        "resumes right after the checkpoint, nothing before it"
    );
    case.env.cleanup().await;
}

/// A processor that exits mid-batch (or breaks the protocol: `poison`) is restarted and gets
/// everything after its last checkpoint again: nothing lost, duplicates only after the
/// checkpoint.
async fn crashed_processor_restarts_from_its_checkpoint(lang: Lang, poison: &str) {
    let test = format!("ml-{}-{lang:?}", poison.trim_start_matches('!')).to_lowercase();
    let Some(case) = Case::new(&test, lang, 1).await else {
        return;
    };
    let data = names("c", 10, &[(4, "#cp"), (6, poison)]);
    case.put(&data).await;
    let events = case.run_worker("e1", &data).await;
    assert!(events.iter().any(|e| e.kind == "crash"), "{events:#?}");
    let r = runs(&events);
    assert_eq!(r.len(), 2, "restarted once: {events:#?}");
    assert_eq!(
        r[0].1,
        data[..6],
        "the first process got to the poison record"
    );
    let cp = sequence_of(&events, "c-4#cp");
    assert_eq!(
        r[1].0.args,
        [cp, "0".into()],
        "restarted at the last checkpoint"
    );
    assert_eq!(
        r[1].1,
        data[5..],
        "redelivered from right after the checkpoint"
    );
    case.env.cleanup().await;
}

/// A split: the parent is read to its end, the processor checkpoints `shardEnded`, and only
/// then do the children start.
async fn split_ends_the_parent_before_children(lang: Lang) {
    let Some(case) = Case::new(&format!("ml-split-{lang:?}").to_lowercase(), lang, 1).await else {
        return;
    };
    let parent_data = names("p", 5, &[]);
    case.put(&parent_data).await;
    let parent = case
        .env
        .kinesis
        .list_shards()
        .stream_name(&case.env.stream)
        .send()
        .await
        .expect("list shards")
        .shards()[0]
        .shard_id()
        .to_owned();
    case.env
        .kinesis
        .update_shard_count()
        .stream_name(&case.env.stream)
        .target_shard_count(2)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .expect("update shard count");
    wait_active(&case.env.kinesis, &case.env.stream).await;
    let child_data = names("ch", 10, &[]);
    case.put(&child_data).await;
    let w = case.start("e1");
    let events = case.wait_records(&child_data).await;
    let ended_at = events
        .iter()
        .position(|e| e.shard == parent && e.kind == "shardEnded")
        .unwrap_or_else(|| panic!("no shardEnded for {parent}: {events:#?}"));
    let parent_records: Vec<&str> = events
        .iter()
        .filter(|e| e.shard == parent)
        .filter_map(Event::data)
        .collect();
    assert_eq!(parent_records, parent_data, "the parent read to its end");
    let children: Vec<&Event> = events.iter().filter(|e| e.shard != parent).collect();
    assert!(!children.is_empty());
    for (i, e) in events.iter().enumerate().filter(|(_, e)| e.shard != parent) {
        assert!(
            i > ended_at,
            "child event {e:?} before the parent's shardEnded"
        );
    }
    let start = Instant::now();
    loop {
        let snap = case.env.snapshot().await;
        if snap.leases.iter().any(|l| l.shard_id == parent && l.ended) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "parent lease not ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.stop().await;
    case.env.cleanup().await;
}

/// Puts one KPL aggregate of user records with these payloads (partition key = payload),
/// aggregated by AWS's own library.
async fn put_aggregate(case: &Case, python: &str, users: &[String]) {
    let users: Vec<User> = users.iter().map(|u| user(u, u)).collect();
    for r in aggregate(python, &[users]) {
        case.env
            .kinesis
            .put_record()
            .stream_name(&case.env.stream)
            .partition_key(r.partition_key)
            .set_explicit_hash_key(r.explicit_hash_key)
            .data(Blob::new(r.data))
            .send()
            .await
            .expect("put aggregate");
    }
}

/// KPL aggregates: each user record comes with its sub-sequence number; a checkpoint at
/// `(sequence, subSequence)` inside an aggregate makes a restart resume at the next user
/// record (the processor is the kclpy one, which sends the sub-sequence back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_checkpoint_inside_an_aggregate_resumes_at_the_next_user_record() {
    let Ok(python) = std::env::var("KCG_KPL_AGG_PYTHON") else {
        eprintln!("SKIP: KCG_KPL_AGG_PYTHON is not set (eval \"$(scripts/emulators.sh env)\")");
        return;
    };
    let Some(case) = Case::new("ml-kpl-python", Lang::Python, 1).await else {
        return;
    };
    let users = names("k", 6, &[(3, "#cp")]);
    put_aggregate(&case, &python, &users).await;
    let events = case.run_worker("e1", &users).await;
    let records: Vec<&Event> = events.iter().filter(|e| e.kind == "record").collect();
    let subs: Vec<&str> = records.iter().map(|e| e.args[1].as_str()).collect();
    assert_eq!(subs, ["0", "1", "2", "3", "4", "5"], "{events:#?}");
    let seq = records[0].args[0].clone();
    assert!(records.iter().all(|e| e.args[0] == seq), "one aggregate");
    let lease = case.env.snapshot().await.leases.remove(0);
    assert_eq!(lease.checkpoint.as_deref(), Some(seq.as_str()));
    assert_eq!(
        lease.checkpoint_sub_sequence,
        Some(3),
        "checkpoint inside the aggregate"
    );

    let later = names("m", 1, &[]);
    case.put(&later).await;
    let events = case.run_worker("e2", &later).await;
    let r = runs(&events);
    assert_eq!(r.len(), 2, "{events:#?}");
    assert_eq!(
        r[1].0.args,
        [seq, "3".into()],
        "initialize inside the aggregate"
    );
    let mut want = users[4..].to_vec();
    want.extend(later);
    assert_eq!(r[1].1, want, "resumes at the next user record");
    case.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_checkpoint_then_restart_resumes_after_it() {
    checkpoint_then_restart_resumes_after_it(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_checkpoint_then_restart_resumes_after_it() {
    checkpoint_then_restart_resumes_after_it(Lang::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_crashed_processor_restarts_from_its_checkpoint() {
    crashed_processor_restarts_from_its_checkpoint(Lang::Python, "!crash").await;
}

/// A processor that writes a protocol message out of turn is restarted like one that exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_garbage_answer_restarts_from_its_checkpoint() {
    crashed_processor_restarts_from_its_checkpoint(Lang::Python, "!garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_crashed_processor_restarts_from_its_checkpoint() {
    crashed_processor_restarts_from_its_checkpoint(Lang::Node, "!crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_split_ends_the_parent_before_children() {
    split_ends_the_parent_before_children(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_split_ends_the_parent_before_children() {
    split_ends_the_parent_before_children(Lang::Node).await;
}

/// One shard's handler of the multiLang sink, driven directly (no emulators): what the
/// engine does through the reader, minus Kinesis.
struct Direct {
    handler: Arc<dyn BatchHandler>,
    commits: CommitTracker,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Direct {
    fn new(lang: Lang, extra: &[&str]) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("events.log");
        let mut command = lang.command(&log)?;
        command.extend(extra.iter().map(|a| (*a).to_owned()));
        let sink = build_handler(&DeliveryConfig {
            multi_lang: Some(MultiLangSink { command }),
            ..DeliveryConfig::default()
        })
        .expect("multiLang handler");
        let handler = sink
            .open_shard(ShardContext {
                stream: "orders".into(),
                shard_id: "shardId-000000000007".into(),
                initial_position: "LATEST",
                progress: tokio::sync::watch::channel(ShardProgress::default()).1,
                fence: kcg_worker::fence::Fence::open(),
                lease_counter: 1,
            })
            .expect("a handler per shard");
        Some(Self {
            handler,
            commits: CommitTracker::new(None),
            log,
            _dir: dir,
        })
    }

    /// Delivers records with these (sequence, payload) pairs.
    async fn deliver(&self, records: &[(&str, &str)]) {
        let batch: Vec<Record> = records
            .iter()
            .map(|(seq, data)| Record {
                stream: "orders".into(),
                shard_id: "shardId-000000000007".into(),
                sequence: (*seq).to_owned(),
                sub_sequence: None,
                partition_key: (*data).to_owned(),
                explicit_hash_key: None,
                data: data.as_bytes().to_vec(),
                arrival: Some(jiff::Timestamp::now()),
            })
            .collect();
        self.handler
            .deliver(&batch, &self.commits)
            .await
            .expect("the processor accepts the batch");
    }
}

/// The reader is cut off (lease lost): the idle processor is told `leaseLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lease_lost_when_the_reader_is_cut_off() {
    let Some(d) = Direct::new(Lang::Python, &[]) else {
        return;
    };
    d.deliver(&[("100", "x-0"), ("200", "x-1#cp"), ("300", "x-2")])
        .await;
    assert_eq!(
        d.commits.state().committed,
        Some(Position::whole("200")),
        "the processor's checkpoint, mid-batch"
    );
    let Direct {
        handler, log, _dir, ..
    } = d;
    drop(handler);
    let events = wait_event(&log, "leaseLost").await;
    assert_eq!(events[0].args, ["LATEST", "0"], "{events:#?}");
}

/// A graceful stop: `shutdownRequested`, then the process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_shutdown_requested_on_a_graceful_stop() {
    let Some(d) = Direct::new(Lang::Node, &[]) else {
        return;
    };
    d.deliver(&[("100", "y-0")]).await;
    d.handler.stop_shard(&d.commits).await;
    let events = wait_event(&d.log, "shutdownRequested").await;
    assert_eq!(
        d.commits.state().committed,
        None,
        "no checkpoint call, no checkpoint"
    );
    drop(d.handler);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_events(&d.log),
        events,
        "nothing after shutdownRequested (no leaseLost)"
    );
}

/// KCL's rule: the shard only ends once the processor checkpointed `shardEnded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_shard_end_needs_the_processors_checkpoint() {
    let Some(bad) = Direct::new(Lang::Python, &["--no-shard-end-checkpoint"]) else {
        return;
    };
    bad.deliver(&[("100", "z-0")]).await;
    let e = bad
        .handler
        .end_shard(&bad.commits)
        .await
        .expect_err("no checkpoint, no end");
    assert!(!e.redeliver, "the processor is fine; it is asked again");
    assert!(e.message.contains("without checkpointing"), "{e}");
    wait_event(&bad.log, "shardEnded-unchecked").await;

    let Some(good) = Direct::new(Lang::Python, &[]) else {
        return;
    };
    good.deliver(&[("100", "z-0"), ("200", "z-1")]).await;
    good.handler
        .end_shard(&good.commits)
        .await
        .expect("checkpointed shard end");
    wait_event(&good.log, "shardEnded").await;
    assert_eq!(good.commits.state().committed, Some(Position::whole("200")));
}
