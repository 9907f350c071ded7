//! Issue 9, "paused process": two real `kcg-worker` processes deliver a 4-shard stream to an
//! http receiver (axum, in the test); one is frozen with SIGSTOP for longer than the client
//! timeout while records flow, the other takes its shards over, then the frozen one gets
//! SIGCONT. The frozen one must not deliver anything once it could have been taken over:
//! per shard, the receiver must see the lease counters of the POSTs (the fencing token the
//! http sink sends) in order, never an older holder's POST after a newer holder's. Then it
//! rejoins, and nothing is lost.
//!
//! The receiver answers after 100 ms and the sink sends one record per POST, so the
//! stopped worker is almost always waiting on an answer that arrives while it is stopped.
//! Without the re-check of the fencing deadline right before every hand-over and send,
//! whether it sends its next POST on SIGCONT is a race between each reader and its
//! supervisor's abort, which the supervisor usually wins: this test guards the property
//! end to end, it does not lose that race on every run of the old code.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS`; skips with a message
//! when they are not set.

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
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// `tuning.clientTimeout` of the workers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// One POST as the receiver saw it.
#[derive(Clone, Debug)]
struct Post {
    /// `w1` or `w2`: each worker posts to its own path.
    worker: String,
    shard: String,
    counter: u64,
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
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let sequences = body["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["sequence"].as_str().expect("sequence").to_owned())
        .collect();
    r.posts.lock().unwrap().push(Post {
        worker,
        shard: header("kcg-shard-id"),
        counter: header("kcg-lease-counter")
            .parse()
            .expect("a lease counter header"),
        at: Instant::now(),
        sequences,
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    StatusCode::NO_CONTENT
}

fn spawn(dir: &std::path::Path, name: &str, config: &str) -> Child {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).expect("config");
    process_support::worker_command(&path, name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
        .spawn()
        .expect("spawning kcg-worker")
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// Owned shard ids per worker name (client id without its suffix).
async fn ownership(store: &StateStore, group: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let snap = store.load_group(group).await.expect("load group");
    for l in snap.leases {
        if let Some(o) = l.owner {
            let name = o.rsplit_once('-').map_or(o.clone(), |(b, _)| b.to_owned());
            out.entry(name).or_default().insert(l.shard_id);
        }
    }
    out
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
async fn a_stopped_worker_delivers_nothing_after_its_shard_was_taken_over() {
    for var in ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_KINESIS"] {
        if std::env::var(var).is_err() {
            eprintln!("SKIP: {var} is not set (start the emulators, see scripts/emulators.sh)");
            return;
        }
    }
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

    let mut w1 = spawn(&dir, "w1", &config("w1"));
    wait_for("w1 owns every shard", Duration::from_secs(30), || async {
        ownership(&store, &group).await.get("w1").map(BTreeSet::len) == Some(4)
    })
    .await;
    let mut w2 = spawn(&dir, "w2", &config("w2"));
    let halves = || async {
        let o = ownership(&store, &group).await;
        o.get("w1").map(BTreeSet::len) == Some(2) && o.get("w2").map(BTreeSet::len) == Some(2)
    };
    wait_for("two shards each", Duration::from_secs(30), halves).await;

    // 60 records/s over 4 shards: more than the receiver's 10 POSTs/s per shard, so each
    // reader always has a backlog and is almost always waiting on an answer.
    let stop = CancellationToken::new();
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
    let posted_by = |worker: &'static str| {
        let posts = receiver.posts.clone();
        move || {
            let n = posts
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.worker == worker)
                .count();
            async move { n > 5 }
        }
    };
    wait_for("w1 delivers", Duration::from_secs(20), posted_by("w1")).await;
    wait_for("w2 delivers", Duration::from_secs(20), posted_by("w2")).await;
    let w1_shards = ownership(&store, &group).await["w1"].clone();

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
    // Let w2 deliver from it for a while, then wake w1 up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&w1, "CONT");
    let continued_at = Instant::now();
    tokio::time::sleep(CLIENT_TIMEOUT * 2).await;
    let w1_running = w1.try_wait().expect("try_wait").is_none();
    // It rejoins: the group is back to two shards each.
    wait_for("w1 rejoins", Duration::from_secs(20), halves).await;
    stop.cancel();
    producer.await.expect("producer");
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
    // The fencing property, as a receiver checking the token would see it.
    let posts = receiver.posts.lock().unwrap().clone();
    let mut newest: BTreeMap<&str, (u64, &Post)> = BTreeMap::new();
    for p in &posts {
        if let Some((counter, by)) = newest.get(p.shard.as_str())
            && p.counter < *counter
        {
            panic!(
                "{} delivered {:?} of {} under lease counter {} {:?} after {} had delivered \
                 under counter {counter} (SIGSTOP {:?} before, SIGCONT {:?} before)",
                p.worker,
                p.sequences,
                p.shard,
                p.counter,
                p.at.duration_since(by.at),
                by.worker,
                p.at.saturating_duration_since(stopped_at),
                p.at.saturating_duration_since(continued_at),
            );
        }
        newest.insert(&p.shard, (p.counter, p));
    }
    let w2_on_it = posts
        .iter()
        .any(|p| p.worker == "w2" && w1_shards.contains(&p.shard));
    assert!(w2_on_it, "w2 delivered from w1's shards after taking them");
    let _ = std::fs::remove_dir_all(&dir);
}
