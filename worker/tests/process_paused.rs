//! Issue 9, "paused process": two real `kcg-worker` processes deliver a 4-shard stream to an
//! http receiver (axum, in the test, one URL path per worker); one is frozen for longer
//! than the client timeout while records flow, the other takes its shards over, then the
//! frozen one wakes up. The frozen one must not deliver anything once it could have been
//! taken over: no POST of one worker may reach the receiver while the other holds the
//! shard. Then it rejoins, and nothing is lost.
//!
//! The freeze is a VM's: SIGSTOP, and on SIGCONT the worker's `CLOCK_MONOTONIC` goes on
//! from where it stopped, as it does on a suspended machine, while `CLOCK_BOOTTIME` counts
//! the freeze. libfaketime (preloaded, its offset in a file the test rewrites while the
//! worker is stopped) moves the clocks the worker reads through libc back by the time it
//! was stopped: std's `Instant`, so every tokio timer. The worker reads `CLOCK_BOOTTIME`
//! (`fence.rs`) through rustix's direct vDSO call, which libfaketime does not see. Before
//! the fencing deadline moved to `CLOCK_BOOTTIME` and was re-checked before every
//! hand-over, the woken worker's readers saw their deadline still ahead and handed the
//! next batch over at once (the receiver answers each POST after 100 ms, so the frozen
//! worker is waiting on an answer that arrives while it is stopped): this test failed on
//! every run. (With SIGSTOP alone, both clocks run on and the supervisor's abort of the
//! reader usually wins the race on wake-up.)
//!
//! Which worker held a shard when is read from the lease table by a poller every 50 ms: a
//! POST that arrives between two polls that both saw the other worker hold the shard under
//! the same lease counter arrived while the other held it throughout. The sink's fencing
//! token (`Kcg-Lease-Counter`) is checked too: per shard it only grows.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_KINESIS` (skips with a message when
//! they are not set) and libfaketime (Debian package `faketime`; `.ci/run` installs it).

mod process_support;
#[path = "stream_support/mod.rs"]
mod stream_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kcg_worker::store::StateStore;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// `tuning.clientTimeout` of the workers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// One POST as the receiver saw it.
#[derive(Clone, Debug)]
struct Post {
    /// `w1` or `w2`: each worker posts to its own path.
    worker: String,
    /// The shard of its records (from the body: all records of a POST are one shard's).
    shard: String,
    /// The fencing token, when the sink sends one.
    counter: Option<u64>,
    at: Instant,
    sequences: Vec<String>,
}

#[derive(Clone, Default)]
struct Receiver {
    posts: Arc<Mutex<Vec<Post>>>,
}

async fn receive(
    State(r): State<Receiver>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let at = Instant::now();
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let records = body["records"].as_array().expect("records");
    let field = |r: &serde_json::Value, name: &str| r[name].as_str().expect(name).to_owned();
    let shards: BTreeSet<String> = records.iter().map(|r| field(r, "shard")).collect();
    assert_eq!(shards.len(), 1, "one shard per POST: {shards:?}");
    r.posts.lock().unwrap().push(Post {
        worker,
        shard: shards.into_iter().next().expect("a shard"),
        counter: headers.get("kcg-lease-counter").map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .expect("a number")
        }),
        at,
        sequences: records.iter().map(|r| field(r, "sequence")).collect(),
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    StatusCode::NO_CONTENT
}

/// `kcg-worker` as client `name` with `config`; its log goes to `<dir>/<name>.log`.
fn worker(dir: &std::path::Path, name: &str, config: &str) -> Command {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).expect("config");
    let mut cmd = process_support::worker_command(&path, name);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"));
    cmd
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// Worker name of an owner (client id without its suffix).
fn worker_name(owner: &str) -> String {
    owner
        .rsplit_once('-')
        .map_or(owner.to_owned(), |(b, _)| b.to_owned())
}

/// Owned shard ids per worker name.
async fn ownership(store: &StateStore, group: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let snap = store.load_group(group).await.expect("load group");
    for l in snap.leases {
        if let Some(o) = l.owner {
            out.entry(worker_name(&o)).or_default().insert(l.shard_id);
        }
    }
    out
}

/// One read of the lease table: the holders it saw held their shards at some moment
/// between `sent` and `answered`.
struct Poll {
    sent: Instant,
    answered: Instant,
    /// Shard id -> (worker name, lease counter).
    held: BTreeMap<String, (String, u64)>,
}

/// A span over which `worker` held `shard` under `counter` throughout: from the answer
/// of the first poll that saw it to the request of the last one.
#[derive(Debug)]
struct Held {
    shard: String,
    worker: String,
    counter: u64,
    from: Instant,
    to: Instant,
}

/// The spans each holding was seen over (a holding seen by one poll only proves nothing).
fn held_spans(polls: &[Poll]) -> Vec<Held> {
    let mut spans: BTreeMap<(String, String, u64), Held> = BTreeMap::new();
    for p in polls {
        for (shard, (worker, counter)) in &p.held {
            spans
                .entry((shard.clone(), worker.clone(), *counter))
                .and_modify(|h| h.to = p.sent)
                .or_insert_with(|| Held {
                    shard: shard.clone(),
                    worker: worker.clone(),
                    counter: *counter,
                    from: p.answered,
                    to: p.answered,
                });
        }
    }
    spans.into_values().filter(|h| h.to > h.from).collect()
}

/// Waits until `worker` has delivered from each of `shards`.
async fn delivering(receiver: &Receiver, worker: &str, shards: &BTreeSet<String>) {
    let what = format!("{worker} delivers from {shards:?}");
    wait_for(&what, Duration::from_secs(20), || {
        let from: BTreeSet<String> = receiver
            .posts
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.worker == worker)
            .map(|p| p.shard.clone())
            .collect();
        let done = from.is_superset(shards);
        async move { done }
    })
    .await;
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_worker_delivers_nothing_after_its_shard_was_taken_over() {
    for var in ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_KINESIS"] {
        if std::env::var(var).is_err() {
            eprintln!("SKIP: {var} is not set (start the emulators, see scripts/emulators.sh)");
            return;
        }
    }
    let libfaketime = process_support::libfaketime("libfaketimeMT.so.1");
    let conf = process_support::aws().await;
    let kinesis = aws_sdk_kinesis::Client::new(&conf);
    let id = format!("{:08x}", rand::random::<u32>());
    let name = format!("kcg-paused-{id}");
    let group = format!("test/paused-{id}");
    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&conf), name.clone());
    store.create_table().await.expect("table");
    stream_support::create_stream(&kinesis, &name, 4).await;
    let dir: PathBuf = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");

    let receiver = Receiver::default();
    let app = Router::new()
        .route("/{worker}", post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = |worker: &str| {
        format!(
            "group: {group}\nstreams:\n  - name: {name}\n    startPosition: TrimHorizon\n\
             stateStore:\n  table: {name}\n\
             delivery:\n  http:\n    url: http://{addr}/{worker}\n    maxBatchRecords: 1\n\
             tuning:\n  pollInterval: 200ms\n  minCallInterval: 200ms\n  heartbeatInterval: 300ms\n  \
             clientTimeout: {}s\n  checkpointInterval: 500ms\n  shutdownTimeout: 5s\n",
            CLIENT_TIMEOUT.as_secs()
        )
    };

    let stop = CancellationToken::new();
    let polls: Arc<Mutex<Vec<Poll>>> = Arc::default();
    let poller = {
        let (store, group, stop, polls) =
            (store.clone(), group.clone(), stop.clone(), polls.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let sent = Instant::now();
                let snap = store.load_group(&group).await.expect("load group");
                let held = snap
                    .leases
                    .into_iter()
                    .filter_map(|l| {
                        let owner = l.owner?;
                        Some((l.shard_id, (worker_name(&owner), l.lease_counter)))
                    })
                    .collect();
                polls.lock().unwrap().push(Poll {
                    sent,
                    answered: Instant::now(),
                    held,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // w1's fake clock offset: none until it wakes up.
    let offset = dir.join("w1.faketime");
    std::fs::write(&offset, "+0\n").expect("offset file");
    let mut w1 = worker(&dir, "w1", &config("w1"))
        .env("LD_PRELOAD", &libfaketime)
        .env("FAKETIME_TIMESTAMP_FILE", &offset)
        // Re-read at most every second: the first clock read after a freeze of seconds
        // sees the new offset.
        .env("FAKETIME_CACHE_DURATION", "1")
        .spawn()
        .expect("spawning kcg-worker under libfaketime");
    wait_for("w1 owns every shard", Duration::from_secs(30), || async {
        ownership(&store, &group).await.get("w1").map(BTreeSet::len) == Some(4)
    })
    .await;
    let mut w2 = worker(&dir, "w2", &config("w2"))
        .spawn()
        .expect("spawning kcg-worker");
    let halves = || async {
        let o = ownership(&store, &group).await;
        o.get("w1").map(BTreeSet::len) == Some(2) && o.get("w2").map(BTreeSet::len) == Some(2)
    };
    wait_for("two shards each", Duration::from_secs(30), halves).await;

    // 60 records/s over 4 shards: more than the receiver's 10 POSTs/s per shard, so each
    // reader always has a backlog and is almost always waiting on an answer.
    let produced = Arc::new(Mutex::new(BTreeSet::new()));
    let producer = {
        let (kinesis, name, stop, produced) = (
            kinesis.clone(),
            name.clone(),
            stop.clone(),
            produced.clone(),
        );
        tokio::spawn(async move {
            let mut round = 0u32;
            while !stop.is_cancelled() {
                let entries: Vec<PutRecordsRequestEntry> = (0..6)
                    .map(|i| {
                        PutRecordsRequestEntry::builder()
                            .data(Blob::new(format!("r{round}-{i}")))
                            .partition_key(format!("k{round}-{i}"))
                            .build()
                            .expect("entry")
                    })
                    .collect();
                let out = kinesis
                    .put_records()
                    .stream_name(&name)
                    .set_records(Some(entries))
                    .send()
                    .await
                    .expect("put records");
                assert_eq!(out.failed_record_count(), Some(0));
                produced.lock().unwrap().extend(
                    out.records()
                        .iter()
                        .filter_map(|r| r.sequence_number().map(str::to_owned)),
                );
                round += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let w1_shards = ownership(&store, &group).await["w1"].clone();
    delivering(&receiver, "w1", &w1_shards).await;

    signal(&w1, "STOP");
    let stopped_at = Instant::now();
    let taken = {
        let (store, group, shards) = (&store, &group, &w1_shards);
        move || async move {
            ownership(store, group)
                .await
                .get("w2")
                .is_some_and(|s| s.is_superset(shards))
        }
    };
    wait_for("w2 takes w1's shards", CLIENT_TIMEOUT * 4, taken).await;
    let took = stopped_at.elapsed();
    delivering(&receiver, "w2", &w1_shards).await;
    // Wake w1 up with its monotonic clock where it stopped, as a VM resumed from suspend
    // would: it reads the new offset on its first clock read after SIGCONT.
    std::fs::write(
        &offset,
        format!("-{:.3}s\n", stopped_at.elapsed().as_secs_f64()),
    )
    .expect("offset file");
    let continued_at = Instant::now();
    signal(&w1, "CONT");
    tokio::time::sleep(CLIENT_TIMEOUT * 2).await;
    let w1_running = w1.try_wait().expect("try_wait").is_none();

    // The fencing property, checked before anything else can fail: no POST reached the
    // receiver while the other worker held its shard throughout.
    let spans = held_spans(&polls.lock().unwrap());
    let posts = receiver.posts.lock().unwrap().clone();
    for shard in &w1_shards {
        assert!(
            spans.iter().any(|h| &h.shard == shard
                && h.worker == "w2"
                && h.from < continued_at
                && h.to > continued_at),
            "the lease table must show w2 holding {shard} before and after w1 woke up, or a \
             late POST of w1 could not be told from a handover back: {spans:?}"
        );
    }
    for p in &posts {
        if let Some(h) = spans
            .iter()
            .find(|h| h.shard == p.shard && h.worker != p.worker && h.from < p.at && p.at < h.to)
        {
            panic!(
                "{} delivered {:?} of {} {:?} after SIGSTOP ({:?} after SIGCONT), while {} \
                 held it under lease counter {} (seen {:?} before and {:?} after)",
                p.worker,
                p.sequences,
                p.shard,
                p.at.saturating_duration_since(stopped_at),
                p.at.saturating_duration_since(continued_at),
                h.worker,
                h.counter,
                p.at.duration_since(h.from),
                h.to.duration_since(p.at),
            );
        }
    }
    // As a receiver checking the token would see it: per shard, counters only grow.
    let mut newest: BTreeMap<&str, (u64, &Post)> = BTreeMap::new();
    for p in &posts {
        let Some(counter) = p.counter else { continue };
        if let Some((seen, by)) = newest.get(p.shard.as_str())
            && counter < *seen
        {
            panic!(
                "{} delivered {:?} of {} under lease counter {counter} {:?} after {} had \
                 delivered under counter {seen}",
                p.worker,
                p.sequences,
                p.shard,
                p.at.duration_since(by.at),
                by.worker,
            );
        }
        newest.insert(&p.shard, (counter, p));
    }

    // It rejoins: the group is back to two shards each.
    wait_for("w1 rejoins", Duration::from_secs(20), halves).await;
    stop.cancel();
    producer.await.expect("producer");
    poller.await.expect("poller");
    let want = produced.lock().unwrap().clone();
    let delivered = || {
        let (posts, want) = (receiver.posts.clone(), want.clone());
        async move {
            let got: BTreeSet<String> = posts
                .lock()
                .unwrap()
                .iter()
                .flat_map(|p| p.sequences.iter().cloned())
                .collect();
            want.is_subset(&got)
        }
    };
    wait_for("every record delivered", Duration::from_secs(60), delivered).await;
    for w in [&w1, &w2] {
        signal(w, "TERM");
    }
    for (n, w) in [("w1", &mut w1), ("w2", &mut w2)] {
        let s = tokio::time::timeout(Duration::from_secs(20), w.wait())
            .await
            .unwrap_or_else(|_| panic!("{n} did not exit after SIGTERM"))
            .expect("wait");
        assert_eq!(
            s.code(),
            Some(0),
            "{n} exit status (log in {})",
            dir.display()
        );
    }
    let _ = kinesis.delete_stream().stream_name(&name).send().await;

    // Not before the fencing rule allows: the last heartbeat w1 sent before it stopped
    // (at most one heartbeat interval, 300 ms, earlier) plus the client timeout.
    assert!(
        took >= CLIENT_TIMEOUT - Duration::from_millis(300),
        "taken over {took:?} after SIGSTOP: before the client timeout"
    );
    assert!(w1_running, "w1 keeps running after SIGCONT");
    let _ = std::fs::remove_dir_all(&dir);
}
