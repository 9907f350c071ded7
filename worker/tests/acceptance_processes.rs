//! Acceptance "Loss and order" (issue 2): real `kcg-worker` PROCESSES share a 4-shard stream
//! on kinesis-local and coordinate through a DynamoDB Local table, while a producer in the
//! test writes records with unique ids at a steady rate. One worker is SIGKILLed and a new
//! one started; then the group is scaled 3 → 1 (SIGTERM) → 4 (new processes), waiting for a
//! balanced table after each step. A pure checker then proves, from every process's stdout
//! (the stdout sink's JSON lines) and the producer's PutRecords answers (shard + sequence of
//! every record written):
//! - every produced record was delivered (the union per shard has no gap);
//! - per shard, each process delivered in strictly increasing sequence order;
//! - the only duplicates are the SIGKILLed worker's records after its last checkpoint, on the
//!   shards it owned, each redelivered once by a new owner, and no more than one checkpoint
//!   interval (+ one heartbeat + one poll) of those shards holds at the producer's rate;
//! - graceful steps (SIGTERM, scale-up handoffs) caused zero duplicates.
//!
//! Needs `AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB`: skips with a message
//! when unset, fails when set but the emulators are unreachable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine as _;
use kcg_worker::assignment::{ShardKey, plan, streams_from_snapshot};
use kcg_worker::store::StateStore;
use kcg_worker::store::schema::GroupSnapshot;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

mod process_support;
mod stream_support;
use stream_support::create_stream;

const SHARDS: i32 = 4;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Producer: `PER_TICK` records every `TICK` (up to 60 records/s over 4 shards).
const TICK: Duration = Duration::from_millis(100);
const PER_TICK: usize = 6;
/// Partition keys the producer spreads records over.
const KEYS: u32 = 64;

// ---------------------------------------------------------------------------------------
// The checker: pure functions over plain data.
// ---------------------------------------------------------------------------------------

/// One record the producer wrote, as PutRecords answered for it.
#[derive(Clone, Debug, PartialEq)]
struct Produced {
    id: u64,
    shard: String,
    seq: String,
    /// When PutRecords acknowledged it, since the test started.
    acked_at: Duration,
}

/// One stdout line of a worker process.
#[derive(Clone, Debug, PartialEq)]
struct Delivered {
    shard: String,
    seq: String,
    id: u64,
}

/// The SIGKILL: which process, and the checkpoint (read from the table right after the
/// kill) of every shard it held then.
#[derive(Clone, Debug, Default)]
struct Kill {
    process: String,
    checkpoints: BTreeMap<String, Option<String>>,
}

/// What the checker found, for the report.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    produced: usize,
    lines: usize,
    /// Per killed shard: (duplicates, bound).
    duplicates: BTreeMap<String, (usize, usize)>,
}

/// Kinesis sequence numbers are decimal integers of varying length.
fn seq_key(s: &str) -> (usize, &str) {
    (s.len(), s)
}

/// Most timestamps of `times` (sorted) inside any window of length `w`.
fn max_in_window(times: &[Duration], w: Duration) -> usize {
    let (mut best, mut i) = (0, 0);
    for j in 0..times.len() {
        while times[j] - times[i] > w {
            i += 1;
        }
        best = best.max(j + 1 - i);
    }
    best
}

/// Checks loss, order and duplicates. `deliveries` holds every process's stdout lines in
/// file order; `dup_window` is how long a record may stay delivered but not checkpointed.
fn check(
    produced: &[Produced],
    deliveries: &BTreeMap<String, Vec<Delivered>>,
    kill: &Kill,
    dup_window: Duration,
) -> Result<Summary, Vec<String>> {
    const SHOW: usize = 10;
    let mut errors = Vec::new();
    let mut by_key: HashMap<(&str, &str), &Produced> = HashMap::new();
    for p in produced {
        if by_key.insert((&p.shard, &p.seq), p).is_some() {
            errors.push(format!("producer log: {}/{} twice", p.shard, p.seq));
        }
    }

    // Every line is a record the producer wrote, on that shard, with that id; collect who
    // delivered each.
    let mut copies: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    let mut unknown = 0;
    for (proc, list) in deliveries {
        for d in list {
            match by_key.get(&(d.shard.as_str(), d.seq.as_str())) {
                None => {
                    unknown += 1;
                    if unknown <= SHOW {
                        errors.push(format!(
                            "{proc} delivered {}/{} (id {}), which the producer never wrote there",
                            d.shard, d.seq, d.id
                        ));
                    }
                }
                Some(p) if p.id != d.id => errors.push(format!(
                    "{proc} delivered {}/{} with id {}, the producer wrote id {} there",
                    d.shard, d.seq, d.id, p.id
                )),
                Some(_) => {}
            }
            copies
                .entry((d.shard.as_str(), d.seq.as_str()))
                .or_default()
                .push(proc.as_str());
        }
    }

    // (a) Nothing lost: per shard, the union of deliveries covers what the producer wrote.
    let missing: Vec<&Produced> = produced
        .iter()
        .filter(|p| !copies.contains_key(&(p.shard.as_str(), p.seq.as_str())))
        .collect();
    if !missing.is_empty() {
        errors.push(format!(
            "LOSS: {} of {} produced records never delivered; first: {}",
            missing.len(),
            produced.len(),
            missing
                .iter()
                .take(SHOW)
                .map(|p| format!("id {} at {}/{}", p.id, p.shard, p.seq))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // (b) Order: each process's deliveries of a shard strictly increase. (A process that
    // re-read its own records, or went backwards, fails here.)
    for (proc, list) in deliveries {
        let mut last: HashMap<&str, &str> = HashMap::new();
        let mut bad = 0;
        for (line, d) in list.iter().enumerate() {
            if let Some(prev) = last.get(d.shard.as_str())
                && seq_key(&d.seq) <= seq_key(prev)
            {
                bad += 1;
                if bad <= SHOW {
                    errors.push(format!(
                        "ORDER: {proc} line {}: {}/{} after {prev}",
                        line + 1,
                        d.shard,
                        d.seq
                    ));
                }
            }
            last.insert(&d.shard, &d.seq);
        }
    }

    // (c) Duplicates: only the killed process's records after its last checkpoint, on a
    // shard it held, each redelivered exactly once by another process.
    let after_checkpoint = |shard: &str, seq: &str| match kill.checkpoints.get(shard) {
        Some(Some(cp)) => seq_key(seq) > seq_key(cp),
        Some(None) => true,
        None => false,
    };
    let mut dups: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unexplained = 0;
    for ((shard, seq), procs) in &copies {
        if procs.len() < 2 {
            continue;
        }
        let by_killed = procs.iter().filter(|p| **p == kill.process).count();
        let why = if procs.len() != 2 || by_killed != 1 {
            Some(
                "graceful steps must not duplicate; only the SIGKILLed worker's tail may be redelivered, once",
            )
        } else if !kill.checkpoints.contains_key(*shard) {
            Some("a shard the SIGKILLed worker did not hold when killed")
        } else if !after_checkpoint(shard, seq) {
            Some("at or before the SIGKILLed worker's checkpoint")
        } else {
            None
        };
        match why {
            Some(why) => {
                unexplained += 1;
                if unexplained <= SHOW {
                    errors.push(format!(
                        "DUPLICATE {shard}/{seq} delivered by {procs:?}: {why}"
                    ));
                }
            }
            None => *dups.entry(shard).or_default() += 1,
        }
    }
    // The new owner resumed right after the checkpoint: everything the killed process
    // delivered past it came again.
    for d in deliveries.get(&kill.process).into_iter().flatten() {
        if after_checkpoint(&d.shard, &d.seq)
            && copies
                .get(&(d.shard.as_str(), d.seq.as_str()))
                .is_some_and(|c| c.len() < 2)
        {
            errors.push(format!(
                "{}/{} was delivered by {} after its checkpoint {:?} but never again: the new owner did not resume right after the checkpoint",
                d.shard, d.seq, kill.process, kill.checkpoints[&d.shard]
            ));
        }
    }
    // Bound: what one checkpoint window of that shard holds at the producer's rate.
    let mut summary = Summary {
        produced: produced.len(),
        lines: deliveries.values().map(Vec::len).sum(),
        duplicates: BTreeMap::new(),
    };
    for shard in kill.checkpoints.keys() {
        let mut times: Vec<Duration> = produced
            .iter()
            .filter(|p| &p.shard == shard)
            .map(|p| p.acked_at)
            .collect();
        times.sort();
        let bound = max_in_window(&times, dup_window);
        let n = dups.get(shard.as_str()).copied().unwrap_or(0);
        if n > bound {
            errors.push(format!(
                "DUPLICATES on {shard}: {n} after the SIGKILL, more than the {bound} records one {dup_window:?} window of that shard held at the producer's rate"
            ));
        }
        summary.duplicates.insert(shard.clone(), (n, bound));
    }
    if errors.is_empty() {
        Ok(summary)
    } else {
        Err(errors)
    }
}

/// Parses one stdout line of the stdout sink (`stream`, `shard`, `sequence`, `data` as
/// base64 of the producer's `{"id": N, "key": K}`).
fn parse_line(stream: &str, line: &str) -> Result<Delivered, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .ok_or_else(|| format!("no string {k:?}: {line}"))
    };
    if field("stream")? != stream {
        return Err(format!("another stream: {line}"));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(field("data")?)
        .map_err(|e| format!("data not base64 ({e}): {line}"))?;
    let body: serde_json::Value =
        serde_json::from_slice(&data).map_err(|e| format!("data not JSON ({e}): {line}"))?;
    let id = body["id"]
        .as_u64()
        .ok_or_else(|| format!("data without id: {line}"))?;
    Ok(Delivered {
        shard: field("shard")?.to_owned(),
        seq: field("sequence")?.to_owned(),
        id,
    })
}

/// The complete lines of a process's stdout file. `finished`: the process has exited, so an
/// unterminated last line is an error (mid-run it is a write in progress).
fn read_deliveries(stream: &str, path: &Path, finished: bool) -> (Vec<Delivered>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (complete, rest) = match text.rfind('\n') {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text.as_str()),
    };
    let mut errors = Vec::new();
    if finished && !rest.is_empty() {
        errors.push(format!(
            "{}: unterminated last line {rest:?}",
            path.display()
        ));
    }
    let mut out = Vec::new();
    for line in complete.lines() {
        match parse_line(stream, line) {
            Ok(d) => out.push(d),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    (out, errors)
}

#[cfg(test)]
mod checker_tests {
    use super::*;

    const W: Duration = Duration::from_millis(1700);

    fn p(id: u64, shard: &str, seq: u64, ms: u64) -> Produced {
        Produced {
            id,
            shard: shard.into(),
            seq: seq.to_string(),
            acked_at: Duration::from_millis(ms),
        }
    }

    fn d(id: u64, shard: &str, seq: u64) -> Delivered {
        Delivered {
            shard: shard.into(),
            seq: seq.to_string(),
            id,
        }
    }

    /// Shard a: ids 1..=4 (seq 10..13), shard b: ids 5..=7 (seq 100..102), 100 ms apart.
    fn produced() -> Vec<Produced> {
        vec![
            p(1, "a", 10, 0),
            p(2, "a", 11, 100),
            p(3, "a", 12, 200),
            p(4, "a", 13, 300),
            p(5, "b", 100, 0),
            p(6, "b", 101, 100),
            p(7, "b", 102, 200),
        ]
    }

    /// k holds shard a, checkpointed at 11, delivered 12 and was killed; x resumed after 11.
    /// y handed shard b to z gracefully.
    fn good() -> (BTreeMap<String, Vec<Delivered>>, Kill) {
        let deliveries = BTreeMap::from([
            (
                "k".into(),
                vec![d(1, "a", 10), d(2, "a", 11), d(3, "a", 12)],
            ),
            ("x".into(), vec![d(3, "a", 12), d(4, "a", 13)]),
            ("y".into(), vec![d(5, "b", 100), d(6, "b", 101)]),
            ("z".into(), vec![d(7, "b", 102)]),
        ]);
        let kill = Kill {
            process: "k".into(),
            checkpoints: BTreeMap::from([("a".into(), Some("11".into()))]),
        };
        (deliveries, kill)
    }

    fn errors(deliveries: &BTreeMap<String, Vec<Delivered>>, kill: &Kill) -> String {
        check(&produced(), deliveries, kill, W)
            .expect_err("the checker must fail")
            .join("\n")
    }

    #[test]
    fn a_clean_run_passes_with_the_killed_tail_counted() {
        let (deliveries, kill) = good();
        let s = check(&produced(), &deliveries, &kill, W).expect("clean run");
        assert_eq!(s.lines, 8);
        assert_eq!(s.produced, 7);
        assert_eq!(s.duplicates, BTreeMap::from([("a".into(), (1, 4))]));
    }

    #[test]
    fn a_lost_record_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("y").unwrap().pop(); // id 6 never delivered
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("LOSS: 1 of 7") && e.contains("id 6 at b/101"),
            "{e}"
        );
    }

    #[test]
    fn out_of_order_within_a_process_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("y").unwrap().swap(0, 1);
        let e = errors(&deliveries, &kill);
        assert!(e.contains("ORDER: y line 2: b/100 after 101"), "{e}");
    }

    #[test]
    fn a_graceful_duplicate_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("z").unwrap().insert(0, d(6, "b", 101));
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("DUPLICATE b/101") && e.contains("graceful"),
            "{e}"
        );
    }

    #[test]
    fn a_duplicate_on_a_shard_the_killed_worker_did_not_hold_fails() {
        let (mut deliveries, mut kill) = good();
        // k also read b once (before handing it off) and z re-read that record.
        deliveries.get_mut("k").unwrap().insert(0, d(5, "b", 100));
        deliveries.get_mut("y").unwrap().remove(0);
        deliveries.get_mut("z").unwrap().insert(0, d(5, "b", 100));
        kill.checkpoints.remove("b");
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("DUPLICATE b/100") && e.contains("did not hold"),
            "{e}"
        );
    }

    #[test]
    fn a_redelivery_at_or_before_the_checkpoint_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("x").unwrap().insert(0, d(2, "a", 11));
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("DUPLICATE a/11") && e.contains("checkpoint"),
            "{e}"
        );
    }

    #[test]
    fn a_new_owner_that_skipped_the_tail_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("x").unwrap().remove(0); // x resumed after 12, not after 11
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("a/12 was delivered by k") && e.contains("never again"),
            "{e}"
        );
    }

    #[test]
    fn too_many_duplicates_for_the_rate_fail() {
        let (deliveries, kill) = good();
        // Shard a's 4 records were 100 ms apart: a 150 ms window holds 2, the tail is 1: ok.
        assert!(check(&produced(), &deliveries, &kill, Duration::from_millis(150)).is_ok());
        // Checkpointed at 10: the tail is 2 records, more than a 50 ms window holds (1).
        let kill = Kill {
            checkpoints: BTreeMap::from([("a".into(), Some("10".into()))]),
            ..kill
        };
        let mut deliveries = deliveries;
        deliveries.get_mut("x").unwrap().insert(0, d(2, "a", 11));
        assert!(check(&produced(), &deliveries, &kill, Duration::from_millis(150)).is_ok());
        let e = check(&produced(), &deliveries, &kill, Duration::from_millis(50))
            .expect_err("bound")
            .join("\n");
        assert!(
            e.contains("DUPLICATES on a: 2") && e.contains("more than the 1"),
            "{e}"
        );
    }

    #[test]
    fn a_record_never_produced_or_with_another_id_fails() {
        let (mut deliveries, kill) = good();
        deliveries.get_mut("z").unwrap().push(d(8, "b", 103));
        deliveries.get_mut("y").unwrap()[0].id = 9;
        let e = errors(&deliveries, &kill);
        assert!(
            e.contains("never wrote there") && e.contains("with id 9"),
            "{e}"
        );
    }

    #[test]
    fn windows_and_sequence_order() {
        let t = |ms: &[u64]| {
            ms.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(max_in_window(&t(&[]), W), 0);
        assert_eq!(
            max_in_window(&t(&[0, 100, 2000, 2100, 2200]), Duration::from_millis(200)),
            3
        );
        assert_eq!(
            max_in_window(&t(&[0, 100, 2000]), Duration::from_millis(99)),
            1
        );
        assert!(seq_key("99") < seq_key("100"));
    }

    #[test]
    fn stdout_lines_parse_and_bad_ones_are_named() {
        let data = base64::engine::general_purpose::STANDARD.encode(r#"{"id":42,"key":3}"#);
        let line = format!(
            r#"{{"stream":"s","shard":"shardId-000000000001","sequence":"123","partitionKey":"key-3","data":"{data}","arrival":"2026-01-01T00:00:00Z"}}"#
        );
        assert_eq!(
            parse_line("s", &line),
            Ok(Delivered {
                shard: "shardId-000000000001".into(),
                seq: "123".into(),
                id: 42
            })
        );
        assert!(
            parse_line("other", &line)
                .unwrap_err()
                .contains("another stream")
        );
        assert!(parse_line("s", "garbage").unwrap_err().contains("not JSON"));
        let dir = std::env::temp_dir().join(format!("kcg-acc-parse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("out");
        std::fs::write(&f, format!("{line}\n{{\"stream\":")).unwrap();
        let (ok, errs) = read_deliveries("s", &f, false);
        assert_eq!(
            (ok.len(), errs.len()),
            (1, 0),
            "a write in progress is not an error yet"
        );
        let (ok, errs) = read_deliveries("s", &f, true);
        assert_eq!((ok.len(), errs.len()), (1, 1), "after exit it is");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------------------------------
// The scenario: real processes, real emulators.
// ---------------------------------------------------------------------------------------

use process_support::aws;

const PREFIX: &str = "kcg-acc-";

/// Deletes the stream (kinesis-local caps shards per account) and the table when the test
/// ends, also on a failed assertion.
struct Cleanup {
    kinesis: aws_sdk_kinesis::Client,
    dynamo: aws_sdk_dynamodb::Client,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (kinesis, dynamo, name) =
            (self.kinesis.clone(), self.dynamo.clone(), self.name.clone());
        // Drop cannot await: run the deletes on their own thread and runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = kinesis
                        .delete_stream()
                        .stream_name(&name)
                        .enforce_consumer_deletion(true)
                        .send()
                        .await;
                    let _ = dynamo.delete_table().table_name(&name).send().await;
                });
            }
        })
        .join();
    }
}

/// Streams an earlier, interrupted run of THIS test left behind (its pid is gone).
async fn remove_leftovers(kinesis: &aws_sdk_kinesis::Client) {
    let Ok(out) = kinesis.list_streams().send().await else {
        return;
    };
    for name in out.stream_names() {
        let pid = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next());
        let running = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if name.starts_with(PREFIX) && !running {
            let _ = kinesis.delete_stream().stream_name(name).send().await;
        }
    }
}

/// Writes `PER_TICK` records every `TICK` until stopped; every written record goes to `log`
/// with the shard and sequence number PutRecords gave it. Entries PutRecords refused are
/// retried with the same id.
async fn produce(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    started: Instant,
    log: Arc<Mutex<Vec<Produced>>>,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut next_id = 0u64;
    let mut pending: Vec<(u64, u32)> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        while pending.len() < PER_TICK {
            let key = rand::random_range(0..KEYS);
            pending.push((next_id, key));
            next_id += 1;
        }
        let entries = pending
            .iter()
            .map(|(id, key)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("key-{key}"))
                    .data(Blob::new(format!(r#"{{"id":{id},"key":{key}}}"#)))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A failed call may or may not have written: the test cannot know, so it fails.
        let out = kinesis
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|e| format!("PutRecords: {e:?}"))?;
        let acked_at = started.elapsed();
        let mut retry = Vec::new();
        let mut log = log.lock().unwrap();
        for ((id, key), r) in pending.drain(..).zip(out.records()) {
            match (r.error_code(), r.shard_id(), r.sequence_number()) {
                (None, Some(shard), Some(seq)) => log.push(Produced {
                    id,
                    shard: shard.to_owned(),
                    seq: seq.to_owned(),
                    acked_at,
                }),
                _ => retry.push((id, key)),
            }
        }
        pending = retry;
    }
}

struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    log: PathBuf,
    /// Exit status once it exited (or was killed).
    exit: Option<std::process::ExitStatus>,
}

struct Harness {
    dir: PathBuf,
    config: PathBuf,
    store: StateStore,
    group: String,
    stream: String,
    procs: Vec<Proc>,
    produced: Arc<Mutex<Vec<Produced>>>,
}

impl Harness {
    fn spawn(&mut self, name: &str) {
        let out = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        let child = process_support::worker_command(&self.config, name)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning kcg-worker");
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            out,
            log,
            exit: None,
        });
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs.iter_mut().find(|p| p.name == name).unwrap()
    }

    /// Names of the processes still running, as the test believes; a process that died on
    /// its own fails the test.
    fn running(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for p in self.procs.iter_mut().filter(|p| p.exit.is_none()) {
            if let Ok(Some(s)) = p.child.try_wait() {
                p.exit = Some(s);
                dead.push(format!("{} exited on its own: {s}", p.name));
            }
        }
        if !dead.is_empty() {
            self.fail(&dead.join("; "));
        }
        self.procs
            .iter()
            .filter(|p| p.exit.is_none())
            .map(|p| p.name.clone())
            .collect()
    }

    fn tails(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!(
                "--- {} ({}, exit {:?}), last log lines:\n{}\n",
                p.name,
                p.log.display(),
                p.exit,
                lines[lines.len().saturating_sub(25)..].join("\n")
            ));
        }
        s
    }

    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\nfiles in {}\n{}", self.dir.display(), self.tails());
    }

    /// Waits until the table shows a settled group: exactly the running processes are
    /// clients (one incarnation each; the killed one pruned, the stopped ones gone), the
    /// shard cache lists the stream's shards, and every lease is held by the owner the
    /// planner gives it. Returns process name → client id, and the snapshot.
    async fn wait_balanced(&mut self, what: &str) -> (BTreeMap<String, String>, GroupSnapshot) {
        let start = Instant::now();
        loop {
            let running = self.running();
            let snap = self
                .store
                .load_group(&self.group)
                .await
                .unwrap_or_else(|e| self.fail(&format!("reading the table: {e}")));
            let mut ids = BTreeMap::new();
            for c in &snap.clients {
                let base = c.client_id.rsplit_once('-').map(|(b, _)| b).unwrap_or("");
                ids.insert(base.to_owned(), c.client_id.clone());
            }
            let names: BTreeSet<&String> = ids.keys().collect();
            let want: BTreeSet<&String> = running.iter().collect();
            let mut live: Vec<String> = snap.clients.iter().map(|c| c.client_id.clone()).collect();
            live.sort();
            let planned = plan(
                &streams_from_snapshot(std::slice::from_ref(&self.stream), &snap),
                &live,
            );
            let owners: BTreeMap<ShardKey, Option<String>> = snap
                .leases
                .iter()
                .filter(|l| l.stream == self.stream)
                .map(|l| (ShardKey::new(&l.stream, &l.shard_id), l.owner.clone()))
                .collect();
            let balanced = names == want
                && snap.clients.len() == running.len()
                && planned.len() == SHARDS as usize
                && owners.len() == SHARDS as usize
                && planned
                    .iter()
                    .all(|(k, c)| owners.get(k) == Some(&Some(c.clone())));
            if balanced {
                eprintln!(
                    "[{:>6.1?}] {what}: balanced: {}",
                    start.elapsed(),
                    owners
                        .iter()
                        .map(|(k, o)| format!(
                            "{}→{}",
                            &k.shard_id[k.shard_id.len() - 1..],
                            o.as_deref().unwrap_or("-")
                        ))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                return (ids, snap);
            }
            if start.elapsed() > Duration::from_secs(60) {
                self.fail(&format!(
                    "{what}: not balanced within 60s; last: clients {names:?} (want {want:?}); planned {planned:?}; leases {owners:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// (shard, sequence) of every record delivered so far, by any process.
    fn delivered(&self) -> BTreeSet<(String, String)> {
        self.procs
            .iter()
            .flat_map(|p| read_deliveries(&self.stream, &p.out, false).0)
            .map(|d| (d.shard, d.seq))
            .collect()
    }

    /// Waits until every record produced so far was delivered.
    async fn wait_caught_up(&mut self, what: &str, within: Duration) {
        let target: Vec<(String, String)> = self
            .produced
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.shard.clone(), p.seq.clone()))
            .collect();
        let start = Instant::now();
        loop {
            let got = self.delivered();
            let missing = target.iter().filter(|k| !got.contains(*k)).count();
            if missing == 0 {
                eprintln!(
                    "[{:>6.1?}] {what}: all {} delivered",
                    start.elapsed(),
                    target.len()
                );
                return;
            }
            if start.elapsed() > within {
                self.fail(&format!(
                    "{what}: {missing} of {} produced records still undelivered after {within:?}",
                    target.len()
                ));
            }
            let _ = self.running();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn sigkill(&mut self, name: &str) {
        let p = self.proc(name);
        p.child.start_kill().expect("SIGKILL");
        let s = p.child.wait().await.expect("wait after SIGKILL");
        p.exit = Some(s);
    }

    /// SIGTERM to each, then every one must exit 0 within the shutdown bound (+ margin).
    async fn sigterm(&mut self, names: &[String]) {
        for name in names {
            let pid = self.proc(name).child.id().expect("pid of a running worker");
            let ok = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill -TERM {pid}");
        }
        for name in names {
            let res =
                tokio::time::timeout(Duration::from_secs(25), self.proc(name).child.wait()).await;
            match res {
                Ok(Ok(s)) => {
                    self.proc(name).exit = Some(s);
                    if s.code() != Some(0) {
                        self.fail(&format!("{name} exited with {s} after SIGTERM, want 0"));
                    }
                }
                _ => self.fail(&format!("{name} did not exit within 25s of SIGTERM")),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_order_with_real_worker_processes() {
    for var in ["AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL_DYNAMODB"] {
        if std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
            eprintln!(
                "SKIP loss_and_order: {var} is not set; run `scripts/emulators.sh start` and `eval \"$(scripts/emulators.sh env)\"`"
            );
            return;
        }
    }
    let started = Instant::now();
    let conf = aws().await;
    let name = format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let dynamo = aws_sdk_dynamodb::Client::new(&conf);
    let kinesis = aws_sdk_kinesis::Client::new(&conf);
    let store = StateStore::new(dynamo.clone(), name.clone());
    let _cleanup = Cleanup {
        kinesis: kinesis.clone(),
        dynamo: dynamo.clone(),
        name: name.clone(),
    };
    store
        .create_table()
        .await
        .expect("AWS_ENDPOINT_URL_DYNAMODB is set but DynamoDB Local is unusable");
    remove_leftovers(&kinesis).await;
    create_stream(&kinesis, &name, SHARDS).await;

    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    let group = format!("acceptance/{name}");
    std::fs::write(
        &config,
        format!(
            "group: {group}\nstreams:\n  - name: {name}\n    startPosition: TrimHorizon\n\
             stateStore:\n  table: {name}\ndelivery:\n  stdout: {{}}\ntuning:\n\
             \x20 pollInterval: {poll}ms\n  minCallInterval: {poll}ms\n  heartbeatInterval: {hb}ms\n  clientTimeout: 3s\n\
             \x20 checkpointInterval: {cp}ms\n  shutdownTimeout: 10s\n",
            poll = POLL_INTERVAL.as_millis(),
            hb = HEARTBEAT_INTERVAL.as_millis(),
            cp = CHECKPOINT_INTERVAL.as_millis(),
        ),
    )
    .unwrap();
    eprintln!("loss_and_order: files in {}", dir.display());

    let produced = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let producer = tokio::spawn(produce(
        kinesis.clone(),
        name.clone(),
        started,
        produced.clone(),
        stop.clone(),
    ));
    let mut h = Harness {
        dir,
        config,
        store,
        group,
        stream: name.clone(),
        procs: Vec::new(),
        produced: produced.clone(),
    };
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());

    step("start w1 w2 w3");
    for n in ["w1", "w2", "w3"] {
        h.spawn(n);
    }
    let (ids, _) = h.wait_balanced("three workers").await;
    // Caught up before the kill, so its un-checkpointed tail is one checkpoint window, not
    // a backlog.
    h.wait_caught_up("before the SIGKILL", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    step("SIGKILL w3, start w4");
    let killed_id = ids["w3"].clone();
    h.sigkill("w3").await;
    // Its rows are frozen now (nobody takes a lease before it expires): its shards and
    // checkpoints at the moment of death.
    let snap = h
        .store
        .load_group(&h.group)
        .await
        .expect("reading the table after the kill");
    let kill = Kill {
        process: "w3".into(),
        checkpoints: snap
            .leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(killed_id.as_str()))
            .map(|l| (l.shard_id.clone(), l.checkpoint.clone()))
            .collect(),
    };
    assert!(!kill.checkpoints.is_empty(), "w3 held no shard: {snap:?}");
    eprintln!("w3 ({killed_id}) held {:?}", kill.checkpoints);
    h.spawn("w4");
    h.wait_balanced("after the SIGKILL").await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    step("scale 3 → 1: SIGTERM w1 w2");
    h.sigterm(&["w1".into(), "w2".into()]).await;
    h.wait_balanced("scaled to one").await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    step("scale 1 → 4: start w5 w6 w7");
    for n in ["w5", "w6", "w7"] {
        h.spawn(n);
    }
    h.wait_balanced("scaled to four").await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    step("stop the producer");
    stop.cancel();
    match producer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => h.fail(&format!("producer: {e}")),
        Err(e) => h.fail(&format!("producer task: {e}")),
    }
    h.wait_caught_up("after the producer stopped", Duration::from_secs(60))
        .await;
    step("SIGTERM everyone");
    let running = h.running();
    h.sigterm(&running).await;

    // Check the whole run.
    let mut deliveries = BTreeMap::new();
    let mut parse_errors = Vec::new();
    for p in &h.procs {
        let (list, errs) = read_deliveries(&h.stream, &p.out, true);
        parse_errors.extend(errs);
        deliveries.insert(p.name.clone(), list);
    }
    if !parse_errors.is_empty() {
        h.fail(&format!("bad stdout lines:\n{}", parse_errors.join("\n")));
    }
    let produced = produced.lock().unwrap().clone();
    let secs = produced
        .last()
        .map(|p| p.acked_at.as_secs_f64())
        .unwrap_or(0.0);
    let dup_window = CHECKPOINT_INTERVAL + HEARTBEAT_INTERVAL + POLL_INTERVAL;
    match check(&produced, &deliveries, &kill, dup_window) {
        Ok(s) => eprintln!(
            "loss_and_order: {} records produced (~{:.0}/s), {} lines delivered by {} processes; duplicates per killed shard (count, bound): {:?}; took {:.1?}",
            s.produced,
            s.produced as f64 / secs.max(1.0),
            s.lines,
            deliveries.len(),
            s.duplicates,
            started.elapsed()
        ),
        Err(errors) => h.fail(&format!("checker:\n{}", errors.join("\n"))),
    }
    // Kept for inspection only when the test fails.
    let _ = std::fs::remove_dir_all(&h.dir);
}
