//! Failover of real `kcg-worker` processes (issue 9 part 3), on a 4-shard stream of
//! kinesis-local with a DynamoDB Local table, while the test writes a record into every shard
//! every 100 ms:
//! - a container restarted in the same pod (SIGKILL, then a new process with the same
//!   `POD_NAME` and `POD_UID`, as the kubelet does) reads its predecessor's shards again
//!   within about 2 s, far below the client timeout (10 s here), and nothing is lost;
//! - two processes on one host WITHOUT a pod UID are separate clients: a process started
//!   there after another was SIGKILLed does not take its leases before the client timeout.
//!
//! Needs `AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB`: skips with a message
//! when unset.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kcg_worker::store::StateStore;
use tokio::process::Child;

mod process_support;
mod stream_support;
use process_support::fleet::{self, Producer};
use stream_support::create_stream;

const SHARDS: i32 = 4;

/// One worker process, its stdout (the stdout sink's JSON lines) in `out`.
struct Proc {
    child: Child,
    out: PathBuf,
    log: PathBuf,
}

/// A stream, a table and a group, with a producer writing into every shard.
struct Scenario {
    dir: tempfile::TempDir,
    config: PathBuf,
    stream: String,
    group: String,
    kinesis: aws_sdk_kinesis::Client,
    dynamo: aws_sdk_dynamodb::Client,
    store: StateStore,
    producer: Producer,
}

async fn scenario(test: &str, tuning: &str) -> Option<Scenario> {
    for var in ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_KINESIS"] {
        if std::env::var(var).is_err() {
            eprintln!("SKIP {test}: {var} is not set (see scripts/emulators.sh)");
            return None;
        }
    }
    let conf = process_support::aws().await;
    let kinesis = aws_sdk_kinesis::Client::new(&conf);
    let dynamo = aws_sdk_dynamodb::Client::new(&conf);
    let name = format!("kcg-fo-{test}-{:08x}", rand::random::<u32>());
    let store = StateStore::new(dynamo.clone(), name.clone());
    store.create_table().await.expect("create table");
    create_stream(&kinesis, &name, SHARDS).await;
    let dir = tempfile::Builder::new()
        .prefix("kcg-failover-")
        .tempdir()
        .expect("temp dir");
    let group = format!("test/{name}");
    let config = dir.path().join("config.yaml");
    let tuning = format!("  pollInterval: 200ms\n  minCallInterval: 200ms\n{tuning}");
    std::fs::write(&config, fleet::stdout_config(&group, &name, &name, &tuning)).expect("config");
    let producer = Producer::start(kinesis.clone(), name.clone(), Duration::from_millis(100));
    Some(Scenario {
        dir,
        config,
        stream: name,
        group,
        kinesis,
        dynamo,
        store,
        producer,
    })
}

impl Scenario {
    /// Starts a worker named `name` with exactly the environment `env` adds (the test's own
    /// `POD_*` and `HOSTNAME` never leak in).
    fn spawn(&self, name: &str, env: &[(&str, String)]) -> Proc {
        let out = self.dir.path().join(format!("{name}.out"));
        let log = self.dir.path().join(format!("{name}.log"));
        let child = process_support::emulator_command(&self.config)
            .env_remove("POD_NAME")
            .env_remove("POD_UID")
            .env_remove("HOSTNAME")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::fs::File::create(&out).expect("out file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning kcg-worker");
        Proc { child, out, log }
    }

    /// Lease owner per shard.
    async fn owners(&self) -> BTreeMap<String, Option<String>> {
        let snap = self.store.load_leases(&self.group).await.expect("leases");
        snap.leases
            .into_iter()
            .map(|l| (l.shard_id, l.owner))
            .collect()
    }

    /// Waits until every shard is owned and each of `n` clients holds SHARDS / n of them;
    /// returns the shards per client.
    async fn balanced(&self, n: usize, procs: &[&Proc]) -> BTreeMap<String, BTreeSet<String>> {
        let start = Instant::now();
        loop {
            let owners = self.owners().await;
            let mut by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (shard, owner) in &owners {
                if let Some(o) = owner {
                    by.entry(o.clone()).or_default().insert(shard.clone());
                }
            }
            let per = SHARDS as usize / n;
            if owners.len() == SHARDS as usize
                && owners.values().all(Option::is_some)
                && by.len() == n
                && by.values().all(|s| s.len() == per)
            {
                return by;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no balanced group of {n} within 30 s: {owners:?}\n{}",
                logs(procs)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the producer, waits until every produced record was delivered by some process
    /// (nothing lost), and returns how many there were.
    async fn nothing_lost(&mut self, outs: &[&Path], procs: &[&Proc]) -> usize {
        self.producer.stop().await.expect("the producer");
        let produced: BTreeSet<(String, String)> = self.producer.acked().into_iter().collect();
        let start = Instant::now();
        loop {
            let delivered: BTreeSet<(String, String)> =
                outs.iter().flat_map(|p| deliveries(p)).collect();
            let missing: Vec<_> = produced.difference(&delivered).collect();
            if missing.is_empty() {
                return produced.len();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "LOSS: {} of {} produced records never delivered, first {:?}\n{}",
                missing.len(),
                produced.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                logs(procs)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.producer.halt();
        let (kinesis, dynamo, name) = (
            self.kinesis.clone(),
            self.dynamo.clone(),
            self.stream.clone(),
        );
        // Drop cannot await: delete on a thread of its own (kinesis-local caps shards).
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = kinesis.delete_stream().stream_name(&name).send().await;
                    let _ = dynamo.delete_table().table_name(&name).send().await;
                });
            }
        })
        .join();
    }
}

/// (shard, sequence) of every complete stdout line of a worker, in file order.
fn deliveries(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| fleet::delivery(line.as_bytes()))
        .collect()
}

fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {}:\n{}\n",
                p.log.display(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })
        .collect()
}

async fn sigkill(p: &mut Proc) {
    p.child.start_kill().expect("SIGKILL");
    p.child.wait().await.expect("reaped");
}

async fn sigterm(p: &mut Proc) {
    if let Some(pid) = p.child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), p.child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_restarted_in_its_pod_reads_its_shards_again_at_once() {
    // A client timeout of 10 s: a takeover that waited for it could not pass.
    let Some(mut s) = scenario(
        "pod",
        "  heartbeatInterval: 1s\n  clientTimeout: 10s\n  checkpointInterval: 1s\n",
    )
    .await
    else {
        return;
    };
    let pod = |name: &str, uid: &str| {
        vec![
            ("POD_NAME", name.to_owned()),
            ("POD_UID", format!("{uid}-{}", s.stream)),
        ]
    };
    let mut a = s.spawn("a", &pod("w-a", "uid-a"));
    let mut b = s.spawn("b", &pod("w-b", "uid-b"));
    let before = s.balanced(2, &[&a, &b]).await;
    let a_id = before
        .keys()
        .find(|id| id.starts_with("w-a-"))
        .expect("a's client id")
        .clone();
    let a_shards = before[&a_id].clone();
    // Let both read for a moment, then crash a and start its container again at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigkill(&mut a).await;
    let killed = Instant::now();
    let mut a2 = s.spawn("a2", &pod("w-a", "uid-a"));
    let mut pending = a_shards.clone();
    while !pending.is_empty() {
        let read: BTreeSet<String> = deliveries(&a2.out).into_iter().map(|d| d.0).collect();
        pending.retain(|shard| !read.contains(shard));
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "the restarted container did not read {pending:?} within 3 s of the kill\n{}",
            logs(&[&a, &a2, &b])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = killed.elapsed();
    // The same client: it resumed its predecessor's leases; b never took one.
    let owners = s.owners().await;
    for shard in &a_shards {
        assert_eq!(owners[shard].as_deref(), Some(a_id.as_str()), "{shard}");
    }
    let b_shards: BTreeSet<String> = deliveries(&b.out).into_iter().map(|d| d.0).collect();
    assert!(
        b_shards.is_disjoint(&a_shards),
        "b read a's shards {b_shards:?}"
    );
    let produced = s
        .nothing_lost(&[&a.out, &b.out, &a2.out], &[&a, &a2, &b])
        .await;
    println!(
        "restarted container read its {} shards again {:.2} s after the kill; {produced} records, none lost",
        a_shards.len(),
        took.as_secs_f64()
    );
    sigterm(&mut a2).await;
    sigterm(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_one_host_without_a_pod_uid_never_take_each_others_leases() {
    let Some(mut s) = scenario(
        "host",
        "  heartbeatInterval: 1s\n  clientTimeout: 4s\n  checkpointInterval: 1s\n",
    )
    .await
    else {
        return;
    };
    let host = vec![("HOSTNAME", "shared-host".to_owned())];
    let mut x = s.spawn("x", &host);
    let mut y = s.spawn("y", &host);
    let before = s.balanced(2, &[&x, &y]).await;
    assert!(
        before.keys().all(|id| id.starts_with("shared-host-")),
        "ids from the host name: {before:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let x_id = {
        let lines = std::fs::read_to_string(&x.log).unwrap_or_default();
        before
            .keys()
            .find(|id| lines.contains(id.as_str()))
            .expect("x's client id in its log")
            .clone()
    };
    let x_shards = before[&x_id].clone();
    sigkill(&mut x).await;
    let killed = Instant::now();
    let mut x2 = s.spawn("x2", &host);
    // Inside the client timeout (its last heartbeat may be up to one interval before the
    // kill): x's leases stay x's; nobody reads its shards.
    while killed.elapsed() < Duration::from_millis(2500) {
        let owners = s.owners().await;
        for shard in &x_shards {
            assert_eq!(
                owners[shard].as_deref(),
                Some(x_id.as_str()),
                "{shard} changed hands {:?} after the kill\n{}",
                killed.elapsed(),
                logs(&[&x, &x2, &y])
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let early: BTreeSet<String> = [&x2.out, &y.out]
        .iter()
        .flat_map(|p| deliveries(p))
        .map(|d| d.0)
        .filter(|shard| x_shards.contains(shard))
        .collect();
    assert!(
        early.is_empty(),
        "x's shards {early:?} were read before the client timeout"
    );
    // After the client timeout they are taken over, and nothing was lost.
    while s
        .owners()
        .await
        .values()
        .any(|o| o.as_deref() == Some(x_id.as_str()))
    {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "x's leases never taken over\n{}",
            logs(&[&x, &x2, &y])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = s.balanced(2, &[&x, &x2, &y]).await;
    assert!(!after.contains_key(&x_id), "{after:?}");
    s.nothing_lost(&[&x.out, &y.out, &x2.out], &[&x, &x2, &y])
        .await;
    sigterm(&mut x2).await;
    sigterm(&mut y).await;
}
