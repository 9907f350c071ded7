//! Status from the real table: real `kcg-worker` PROCESSES consume a real stream
//! (kinesis-local) and coordinate through a real table (DynamoDB Local); the status is built
//! from that table by the same code the controller and `kcg-operator status` use, and must
//! show the right clients, leader, ranges and lag, then follow a scale-up and a SIGKILL.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL_KINESIS` (skips with a message
//! when unset, fails when set but unreachable). Builds `kcg-worker` with
//! `scripts/build-bins.sh` if needed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_kinesis::primitives::Blob;
use kcg_operator::crd::KinesisConsumerGroupStatus;
use kcg_operator::status::{DeploymentState, StatusInput, build_status};
use kcg_worker::membership::{ClientWatch, observe_clients};
use kcg_worker::store::StateStore;
use tokio::process::{Child, Command};

// The worker tests' stream helper, shared rather than copied.
#[path = "../worker/tests/stream_support/mod.rs"]
mod stream_support;
use stream_support::create_stream;

const SHARDS: i32 = 4;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

fn endpoints() -> Option<()> {
    for var in ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_KINESIS"] {
        if std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
            eprintln!(
                "SKIP status_live: {var} is not set; run `eval \"$(scripts/emulators.sh env)\"` after `scripts/emulators.sh start`"
            );
            return None;
        }
    }
    Some(())
}

async fn aws() -> aws_config::SdkConfig {
    // Endpoints come from AWS_ENDPOINT_URL_*; region and credentials are pinned for the
    // emulators so a developer's own AWS settings cannot leak in.
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .load()
        .await
}

/// The `kcg-worker` binary of this workspace, built (debug profile) if missing or stale.
fn worker_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { root.join(p) } else { p })
        .unwrap_or_else(|| root.join("target"));
    // The script builds with the tests' feature resolution, so after a test build this is a
    // no-op rather than a second build of the dependencies.
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/build-bins.sh"))
        .status()
        .expect("running scripts/build-bins.sh");
    assert!(status.success(), "scripts/build-bins.sh failed");
    let bin = target.join("debug").join("kcg-worker");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

struct Harness {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    store: StateStore,
    group: String,
    stream: String,
}

impl Harness {
    fn spawn(&self, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .args(["--client-id", name, "--listen", "127.0.0.1:0"])
            .env("POD_NAME", format!("pod-{name}"))
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("KCG_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            // Records go to stdout; the test only looks at the table.
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning kcg-worker")
    }

    /// Refreshes the status (one table read, the shared liveness tracker) until `done`
    /// accepts it, or fails after `within` with the last status and the worker logs.
    async fn until(
        &self,
        liveness: &mut ClientWatch,
        replicas: i32,
        within: Duration,
        what: &str,
        done: impl Fn(&KinesisConsumerGroupStatus) -> bool,
    ) -> KinesisConsumerGroupStatus {
        let start = Instant::now();
        let mut previous: Option<KinesisConsumerGroupStatus> = None;
        loop {
            let snap = self
                .store
                .load_group(&self.group)
                .await
                .expect("reading the table");
            let live: BTreeSet<String> =
                observe_clients(liveness, Some(&snap.clients), Instant::now())
                    .into_iter()
                    .collect();
            let s = build_status(StatusInput {
                generation: Some(1),
                streams: vec![self.stream.clone()],
                desired_replicas: replicas,
                suspended: false,
                selector: "app.kubernetes.io/instance=live".into(),
                deployment: Some(DeploymentState::all_ready(replicas)),
                snapshot: Some(snap),
                live_clients: live,
                previous_conditions: previous
                    .as_ref()
                    .map(|p| p.conditions.clone())
                    .unwrap_or_default(),
                now: jiff::Timestamp::now(),
                problems: vec![],
            });
            if done(&s) {
                return s;
            }
            if start.elapsed() > within {
                let mut logs = String::new();
                for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    logs.push_str(&format!(
                        "--- {}\n{}\n",
                        entry.path().display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ));
                }
                panic!(
                    "{what}: not reached in {within:?}; last status:\n{}\n{logs}",
                    serde_yaml::to_string(&s).unwrap()
                );
            }
            previous = Some(s);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

const PREFIX: &str = "kcg-live-";

async fn remove_leftovers(kinesis: &aws_sdk_kinesis::Client) {
    let Ok(out) = kinesis.list_streams().send().await else {
        return;
    };
    for name in out.stream_names() {
        // Names are PREFIX<pid>-<nanos>: only a run whose process is gone is a leftover.
        let pid = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next());
        let running = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if name.starts_with(PREFIX) && !running {
            let _ = kinesis
                .delete_stream()
                .stream_name(name)
                .enforce_consumer_deletion(true)
                .send()
                .await;
        }
    }
}

/// Deletes the test's stream when the test ends, also on a failed assertion.
struct StreamGuard {
    client: aws_sdk_kinesis::Client,
    stream: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let (client, stream) = (self.client.clone(), self.stream.clone());
        // Drop cannot await: run the delete on its own thread and runtime, and wait for it.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = client
                        .delete_stream()
                        .stream_name(&stream)
                        .enforce_consumer_deletion(true)
                        .send()
                        .await;
                });
            }
        })
        .join();
    }
}

fn cond<'a>(s: &'a KinesisConsumerGroupStatus, t: &str) -> &'a str {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.as_str())
        .unwrap_or("")
}

/// Every consumable shard is in a range, ranges belong to live clients, and ownership is
/// settled (Ready and Balanced).
fn settled(s: &KinesisConsumerGroupStatus, clients: i32) -> bool {
    let ranged: i32 = s
        .streams
        .first()
        .map(|st| st.ranges.iter().map(|r| r.count).sum())
        .unwrap_or(0);
    s.client_count == clients
        && ranged == SHARDS
        && cond(s, "Ready") == "True"
        && cond(s, "Balanced") == "True"
        && s.streams
            .first()
            .is_some_and(|st| st.max_lag_millis.is_some())
}

fn client_of<'a>(s: &'a KinesisConsumerGroupStatus, base: &str) -> Option<&'a str> {
    s.clients
        .iter()
        .map(|c| c.id.as_str())
        .find(|id| id.starts_with(&format!("{base}-")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_real_workers_through_scale_up_and_a_kill() {
    let Some(()) = endpoints() else { return };
    let conf = aws().await;
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let table = format!("{PREFIX}{id}");
    let stream = format!("{PREFIX}{id}");
    let group = format!("live/g-{id}");

    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&conf), table.clone());
    store
        .ensure_table(true)
        .await
        .expect("DynamoDB Local is configured but unusable");
    let kinesis = aws_sdk_kinesis::Client::new(&conf);
    // kinesis-local caps the shards of all streams together (50 by default): remove what an
    // earlier, interrupted run of THIS test left (its own prefix only), and delete ours at
    // the end through a guard.
    remove_leftovers(&kinesis).await;
    let _cleanup = StreamGuard {
        client: kinesis.clone(),
        stream: stream.clone(),
    };
    create_stream(&kinesis, &stream, SHARDS).await;
    for i in 0..40 {
        kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("key-{i}"))
            .data(Blob::new(format!("record-{i}")))
            .send()
            .await
            .expect("put record");
    }

    // Deleted when the test ends; a failure message carries the worker logs first.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "group: {group}\nstreams:\n  - name: {stream}\n    startPosition: TrimHorizon\nstateStore:\n  table: {table}\ndelivery:\n  stdout: {{}}\ntuning:\n  pollInterval: 200ms\n  minCallInterval: 200ms\n  heartbeatInterval: 500ms\n  clientTimeout: 3s\n  checkpointInterval: 500ms\n  shutdownTimeout: 5s\n"
        ),
    )
    .unwrap();
    let h = Harness {
        bin: worker_binary(),
        dir: dir.join("logs"),
        config,
        store,
        group,
        stream,
    };
    std::fs::create_dir_all(&h.dir).unwrap();
    let mut liveness = ClientWatch::new(CLIENT_TIMEOUT);

    // Two workers: two clients, the lowest id leads, 2 + 2 contiguous shards, lag measured.
    let mut a = h.spawn("w-a");
    let _b = h.spawn("w-b");
    let s = h
        .until(
            &mut liveness,
            2,
            Duration::from_secs(120),
            "two workers settle",
            |s| settled(s, 2),
        )
        .await;
    let a_id = client_of(&s, "w-a").expect("w-a listed").to_owned();
    let b_id = client_of(&s, "w-b").expect("w-b listed").to_owned();
    assert_eq!(
        s.leader.as_deref(),
        Some(a_id.as_str()),
        "lowest sorted live id leads"
    );
    let pods: Vec<_> = s
        .clients
        .iter()
        .map(|c| (c.index, c.pod.as_str(), c.owned_shards))
        .collect();
    assert_eq!(pods, vec![(0, "pod-w-a", 2), (1, "pod-w-b", 2)]);
    let st = &s.streams[0];
    assert_eq!((st.open_shards, st.closed_shards_draining), (SHARDS, 0));
    let ranges: Vec<_> = st
        .ranges
        .iter()
        .map(|r| {
            (
                r.client.as_str(),
                r.first.as_str(),
                r.last.as_str(),
                r.count,
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (
                a_id.as_str(),
                "shardId-000000000000",
                "shardId-000000000001",
                2
            ),
            (
                b_id.as_str(),
                "shardId-000000000002",
                "shardId-000000000003",
                2
            ),
        ]
    );
    assert!(
        st.max_lag_shard
            .as_deref()
            .is_some_and(|sh| sh.starts_with("shardId-"))
    );
    assert!(s.max_lag.is_some());

    // Scale-up: a third worker joins and the four shards spread 2/1/1.
    let _c = h.spawn("w-c");
    let s = h
        .until(
            &mut liveness,
            3,
            Duration::from_secs(120),
            "scale-up to three",
            |s| settled(s, 3),
        )
        .await;
    let c_id = client_of(&s, "w-c").expect("w-c listed").to_owned();
    let mut owned: Vec<i32> = s.clients.iter().map(|c| c.owned_shards).collect();
    owned.sort();
    assert_eq!(owned, vec![1, 1, 2]);
    assert!(s.streams[0].ranges.iter().any(|r| r.client == c_id));
    assert_eq!(s.leader.as_deref(), Some(a_id.as_str()));

    // SIGKILL the leader: it drops out after the client timeout (on our clock), the next
    // lowest id leads, and the survivors take its shards back to 2 + 2.
    a.start_kill().expect("SIGKILL w-a");
    a.wait().await.expect("w-a exits");
    let s = h
        .until(
            &mut liveness,
            2,
            Duration::from_secs(120),
            "recovery after SIGKILL",
            |s| settled(s, 2) && client_of(s, "w-a").is_none(),
        )
        .await;
    assert_eq!(
        s.leader.as_deref(),
        Some(b_id.as_str()),
        "next lowest id leads"
    );
    let owners: BTreeSet<&str> = s.streams[0]
        .ranges
        .iter()
        .map(|r| r.client.as_str())
        .collect();
    assert_eq!(owners, BTreeSet::from([b_id.as_str(), c_id.as_str()]));
    let mut owned: Vec<i32> = s.clients.iter().map(|c| c.owned_shards).collect();
    owned.sort();
    assert_eq!(owned, vec![2, 2]);
}
