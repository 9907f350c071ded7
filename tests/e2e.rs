//! The end-to-end suite on a real Kubernetes control plane: every flow a user has, each
//! asserted on what the user sees (`kubectl`, `helm`, the group's status and events).
//!
//! `scripts/test.sh` runs it against the kube-apiserver and controller-manager that
//! `../shared/kube/cluster.sh` starts. There is no kubelet: [`kubelet`] plays one, running
//! each pod's program as a local process: `kcg-operator` for the chart's operator pods (with
//! a token of the chart's own ServiceAccount, so real RBAC judges every call), `kcg-worker`
//! for the worker pods. Records flow from kinesis-local through the workers; the state store
//! is DynamoDB Local.
//!
//! Runs only with `KCG_E2E=1` and `KUBECONFIG` (it registers a fake node: never point it at
//! a real cluster); otherwise it passes after printing why it skipped. One test, flows in
//! order, each printed as it passes, because the flows share one cluster and one install.

mod crd_support;
mod e2e_support;
#[path = "e2e/pods.rs"]
mod pods;
#[path = "e2e/quiet.rs"]
mod quiet;
#[path = "e2e/spec.rs"]
mod spec;
#[path = "../worker/tests/stream_support/mod.rs"]
mod stream_support;
#[path = "e2e/upgrades.rs"]
mod upgrades;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use e2e_support::kubelet::{Kubelet, KubeletOptions, Signal};
use e2e_support::{Env, WAIT, root, skip_reason, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kcg_operator::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus};
use kcg_worker::store::StateStore;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

/// The chart's release, as the README installs it.
const RELEASE: &str = "kcg-operator";
const OPERATOR_NS: &str = "kcg-system";
/// The stream and table of `examples/minimal-stdout.yaml`.
const STREAM: &str = "orders";
const TABLE: &str = "kcg-state";
const SHARDS: i32 = 4;
/// How long the operator may take to take over after its leader died.
const TAKEOVER: Duration = Duration::from_secs(20);
/// How long a delete with `onDelete: Delete` may take.
const DELETE_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_suite() {
    if let Some(why) = skip_reason() {
        println!("skipping e2e: {why}");
        return;
    }
    let env = Env::connect().await;
    let work = tempfile::Builder::new()
        .prefix("kcg-e2e-")
        .tempdir()
        .expect("temp dir");
    let kubelet = Kubelet::start(
        env.client.clone(),
        KubeletOptions::from_kubeconfig(&env.kubeconfig, work.path())
            .expect("kubeconfig")
            .binary("kcg-worker", env.bin_dir.join("kcg-worker"))
            .binary("kcg-operator", env.bin_dir.join("kcg-operator"))
            .command(
                pods::CONSUMER_IMAGE,
                pods::consumer_program().0,
                [pods::consumer_program().1],
            )
            .envs(env.aws_env.clone()),
    )
    .await
    .expect("starting the kubelet stand-in");

    let started = Instant::now();
    let result = flows(&env, &kubelet).await;
    // Whatever happened: the operator must never have been refused by RBAC.
    let rbac = step(
        "RBAC: no Forbidden in any operator log",
        no_forbidden(&kubelet),
    )
    .await;
    if result.is_err() || rbac.is_err() {
        println!("\n--- operator logs (last 80 lines) ---");
        let logs = operator_logs(&kubelet);
        let lines: Vec<&str> = logs.lines().collect();
        for l in &lines[lines.len().saturating_sub(80)..] {
            println!("{l}");
        }
    }
    kubelet.shutdown().await;
    println!("\ne2e: {:.0?} in all", started.elapsed());
    if let Err(e) = result.and(rbac) {
        panic!("e2e failed: {e}");
    }
}

/// Runs one flow, printing its name, its time and its verdict.
async fn step(
    name: &str,
    flow: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    println!("\n▶ {name}");
    let t = Instant::now();
    let r = flow.await;
    match &r {
        Ok(()) => println!("✔ {name} ({:.1}s)", t.elapsed().as_secs_f64()),
        Err(e) => println!("✘ {name}: {e}"),
    }
    r.map_err(|e| format!("{name}: {e}"))
}

async fn flows(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    let records = Records::new(env).await?;
    step(
        "quick start from the README, command for command",
        quick_start(env, kubelet, &records),
    )
    .await?;
    step(
        "kubectl scale up and down; events for every distribution",
        scaling(env),
    )
    .await?;
    step("HPA on the scale subresource (examples/hpa.yaml)", hpa(env)).await?;
    step(
        "a killed worker process: the status recovers",
        killed_worker(env, kubelet),
    )
    .await?;
    step(
        "drift: a spec change rolls out; an edited or deleted Deployment is put back",
        drift(env),
    )
    .await?;
    step(
        "native sidecar: a deleted worker's last batch is checkpointed, nothing lost",
        pods::native_sidecar(env, kubelet),
    )
    .await?;
    step(
        "suspend next to an HPA: 0 pods, Suspended; resume from the checkpoints",
        pods::suspend(env),
    )
    .await?;
    step(
        "records: none lost, order kept per key",
        records.all_delivered(kubelet),
    )
    .await?;
    step(
        "admission: every schema and CEL rule rejected with its message",
        admission(env),
    )
    .await?;
    step(
        "pods that cannot be created: Degraded PodsNotCreated",
        pods_not_created(env),
    )
    .await?;
    step(
        "operator HA: helm upgrade to 2 replicas, kill the leader",
        operator_ha(env, kubelet),
    )
    .await?;
    step(
        "operator /metrics: group gauges equal the status (maxLagMillis too)",
        upgrades::group_gauges(env, kubelet),
    )
    .await?;
    step(
        "the chart's PodMonitor selects the worker pods' metrics port",
        upgrades::pod_monitor(env),
    )
    .await?;
    step(
        "KEDA ScaledObject example admitted (KEDA's CRD, server dry run)",
        upgrades::keda_example(env),
    )
    .await?;
    step(
        "an outdated CRD: Degraded CrdOutdated; helm upgrade restores it",
        upgrades::outdated_crd(env, kubelet),
    )
    .await?;
    step(
        "quiet: a steady group's objects are not applied, its status hardly written",
        quiet::steady_group_is_quiet(env),
    )
    .await?;
    step(
        "a ConfigMap or Deployment the group does not own is left alone: ResourceNotOwned",
        quiet::foreign_objects_are_left_alone(env),
    )
    .await?;
    step(
        "the finalizer follows onDelete; Retain goes at once with the operator stopped",
        quiet::finalizer_follows_on_delete(env),
    )
    .await?;
    step(
        "the worker pod spec: default requests, strategy, budget, volumes, envFrom, command",
        spec::worker_pod_spec(env, kubelet),
    )
    .await?;
    step(
        "a refusal by RBAC is Degraded Forbidden, naming the verb and the resource",
        spec::forbidden_is_named(env),
    )
    .await?;
    step(
        "delete with onDelete: Retain keeps the rows",
        delete_retain(env),
    )
    .await?;
    step(
        "delete with onDelete: Delete removes the rows within 30 s",
        delete_delete(env),
    )
    .await?;
    step(
        "helm uninstall leaves the CRD and the groups",
        helm_uninstall(env),
    )
    .await?;
    step(
        "helm install with watchNamespaces (Roles only)",
        watch_namespaces(env),
    )
    .await?;
    step(
        "helm upgrade from a chart with crds/: --take-ownership adopts the CRD",
        upgrades::upgrade_from_crds_folder(env),
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ the README

/// The shell commands of the README's first ```sh block after `heading`, one per entry,
/// comments dropped and `\` continuations joined.
fn readme_commands(heading: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = text
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"))
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("a ```sh block")
        .1
        .split_once("```")
        .expect("closed block")
        .0;
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        }
        .trim();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head.trim());
            current.push(' ');
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() && !current.starts_with('#') {
            out.push(current.trim().to_owned());
        }
        current.clear();
    }
    out
}

/// Runs one README command with the suite's `helm`/`kubectl`.
async fn run_readme_command(env: &Env, command: &str) -> Result<String, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.split_first() {
        Some((&"helm", args)) => env.helm(args).await,
        Some((&"kubectl", args)) => env.kubectl(args).await,
        _ => Err(format!("unexpected README command {command:?}")),
    }
}

// ------------------------------------------------------------------ reading a group

fn groups(env: &Env, ns: &str) -> Api<KinesisConsumerGroup> {
    Api::namespaced(env.client.clone(), ns)
}

fn condition<'a>(
    s: &'a KinesisConsumerGroupStatus,
    t: &str,
) -> Option<(&'a str, &'a str, &'a str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// Waits until the group is Ready with `clients` live clients, and returns its status.
async fn wait_ready(
    env: &Env,
    ns: &str,
    name: &str,
    clients: i32,
) -> Result<KinesisConsumerGroupStatus, String> {
    let api = groups(env, ns);
    wait_until(
        &format!("{ns}/{name} Ready with {clients} clients"),
        WAIT,
        || async {
            let g = api.get(name).await.map_err(|e| e.to_string())?;
            let s = g.status.clone().ok_or("no status yet")?;
            let ready = condition(&s, "Ready");
            let balanced = condition(&s, "Balanced");
            if matches!(ready, Some(("True", ..)))
                && matches!(balanced, Some(("True", ..)))
                && s.client_count == clients
                && s.observed_generation == g.metadata.generation
            {
                Ok(s)
            } else {
                Err(format!(
                    "clients {}, Ready {ready:?}, Balanced {balanced:?}, Degraded {:?}",
                    s.client_count,
                    condition(&s, "Degraded")
                ))
            }
        },
    )
    .await
}

/// `kubectl get kcg NAME` as a map from printer column to value.
async fn printer_columns(
    env: &Env,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, String> {
    let out = env.kubectl(&["get", "kcg", name, "-n", ns]).await?;
    print!("{out}");
    let mut lines = out.lines();
    let header = lines.next().ok_or("no header")?;
    let row = lines.next().ok_or("no row")?;
    // Columns start where their header word starts; values may be empty.
    let starts: Vec<(usize, &str)> = [
        "NAME",
        "DESIRED",
        "READY",
        "CLIENTS",
        "SHARDS",
        "MAX LAG",
        "SUSPENDED",
        "STATUS",
        "AGE",
    ]
    .iter()
    .map(|h| {
        header
            .find(h)
            .map(|i| (i, *h))
            .ok_or(format!("no column {h} in {header:?}"))
    })
    .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for (i, (start, h)) in starts.iter().enumerate() {
        let end = starts
            .get(i + 1)
            .map(|(s, _)| *s)
            .unwrap_or(row.len())
            .min(row.len());
        out.insert(
            (*h).to_owned(),
            row.get(*start..end).unwrap_or("").trim().to_owned(),
        );
    }
    Ok(out)
}

fn expect_columns(cols: &BTreeMap<String, String>, want: &[(&str, &str)]) -> Result<(), String> {
    for (k, v) in want {
        if cols.get(*k).map(String::as_str) != Some(*v) {
            return Err(format!("column {k}: want {v:?}, got {cols:?}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ records

/// Records written to the quick start's stream, and the check that the workers printed
/// every one, in order per partition key.
struct Records {
    run: String,
    keys: u32,
    per_key: u32,
    kinesis: aws_sdk_kinesis::Client,
}

impl Records {
    /// Makes sure the example's stream exists (it would, for a user) and the group starts
    /// from no rows of an earlier run.
    async fn new(env: &Env) -> Result<Self, String> {
        let aws = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let kinesis = aws_sdk_kinesis::Client::new(&aws);
        if kinesis
            .describe_stream_summary()
            .stream_name(STREAM)
            .send()
            .await
            .is_err()
        {
            stream_support::create_stream(&kinesis, STREAM, SHARDS).await;
        }
        stream_support::wait_active(&kinesis, STREAM).await;
        let dynamo = aws_sdk_dynamodb::Client::new(&aws);
        for group in ["default/orders", "team-a/payments", "team-b/survivor"] {
            // No table yet is fine: `create: true` makes it.
            let _ = kcg_operator::store_admin::delete_group(&dynamo, TABLE, group).await;
        }
        let _ = env;
        Ok(Self {
            run: format!(
                "{}-{}",
                std::process::id(),
                jiff::Timestamp::now().as_millisecond()
            ),
            keys: 8,
            per_key: 25,
            kinesis,
        })
    }

    async fn produce(&self) -> Result<(), String> {
        for n in 0..self.per_key {
            let batch = (0..self.keys).map(|k| {
                (
                    format!("key-{k}"),
                    json!({"run": self.run, "key": k, "n": n}),
                )
            });
            put_records(&self.kinesis, STREAM, batch).await?;
        }
        Ok(())
    }

    /// Per worker container log, per key, the `n`s of this run in the order printed.
    fn seen(&self, kubelet: &Kubelet) -> Vec<BTreeMap<u64, Vec<u64>>> {
        let logs = kubelet.logs_matching(|_, _, container| container == "worker");
        logs.split("\n==> ")
            .map(|text| {
                let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                for line in text.lines() {
                    let Ok(v) = serde_json::from_str::<Value>(line) else {
                        continue;
                    };
                    let Some(data) = v["data"].as_str() else {
                        continue;
                    };
                    let Some(payload) = base64_json(data) else {
                        continue;
                    };
                    if payload["run"] != self.run.as_str() {
                        continue;
                    }
                    if let (Some(k), Some(n)) = (payload["key"].as_u64(), payload["n"].as_u64()) {
                        per_key.entry(k).or_default().push(n);
                    }
                }
                per_key
            })
            .collect()
    }

    async fn all_delivered(&self, kubelet: &Kubelet) -> Result<(), String> {
        let want = self.keys as usize * self.per_key as usize;
        let seen = wait_until("every record printed by a worker", WAIT, || async {
            let files = self.seen(kubelet);
            let distinct: BTreeSet<(u64, u64)> = files
                .iter()
                .flat_map(|f| {
                    f.iter()
                        .flat_map(|(k, ns)| ns.iter().map(move |n| (*k, *n)))
                })
                .collect();
            if distinct.len() == want {
                Ok(files)
            } else {
                Err(format!("{} of {want} distinct records", distinct.len()))
            }
        })
        .await?;
        // Order per key: within one worker's output, the first time each record is printed
        // comes after the first time of every earlier record of its key.
        for file in &seen {
            for (k, ns) in file {
                let mut first = Vec::new();
                for n in ns {
                    if !first.contains(n) {
                        first.push(*n);
                    }
                }
                if first.windows(2).any(|w| w[0] > w[1]) {
                    return Err(format!("key {k} printed out of order: {first:?}"));
                }
            }
        }
        let printed: usize = seen.iter().flat_map(|f| f.values()).map(Vec::len).sum();
        println!(
            "  {want} records, {printed} lines printed ({} duplicates), over {} worker logs",
            printed - want,
            seen.len()
        );
        Ok(())
    }
}

/// One PutRecords call of JSON records, each with its partition key; fails if any record
/// was refused.
pub(crate) async fn put_records(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    records: impl IntoIterator<Item = (String, Value)>,
) -> Result<(), String> {
    let mut batch = kinesis.put_records().stream_name(stream);
    for (key, data) in records {
        batch = batch.records(
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(aws_sdk_kinesis::primitives::Blob::new(data.to_string()))
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    let out = batch.send().await.map_err(|e| format!("PutRecords: {e}"))?;
    if out.failed_record_count().unwrap_or(0) > 0 {
        return Err("PutRecords: some records failed".into());
    }
    Ok(())
}

fn base64_json(data: &str) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

// ------------------------------------------------------------------ flows

async fn quick_start(env: &Env, kubelet: &Kubelet, records: &Records) -> Result<(), String> {
    let install = readme_commands("## Install");
    let usage = readme_commands("## Usage");
    println!("  README install: {install:?}\n  README usage: {usage:?}");
    run_readme_command(env, install.first().ok_or("no install command")?).await?;
    wait_operator_ready(env, 1).await?;

    for command in &usage {
        if command.starts_with("kubectl logs") {
            // `kubectl logs` asks the kubelet's API, which the stand-in does not serve; the
            // same lines are in its log files, checked by the records flow.
            println!("  (stand-in) {command}: read from the stand-in's log files instead");
            let lines = records.seen(kubelet).len();
            if lines == 0 {
                return Err("no worker log file".into());
            }
            continue;
        }
        let out = run_readme_command(env, command).await?;
        print!("{}", indent(&out));
        if command.starts_with("kubectl apply") {
            // A user waits for the group before reading it: so do we.
            let s = wait_ready(env, "default", "orders", 2).await?;
            if s.shard_count != SHARDS {
                return Err(format!("shardCount {} != {SHARDS}", s.shard_count));
            }
            records.produce().await?;
        } else if command.starts_with("kubectl get kcg") {
            // The lag shows once a worker has reported one (it writes it with a checkpoint)
            // and the next refresh published it: right after Ready it may not be there
            // yet, and a user looks again a few seconds later; so do we.
            wait_until("MAX LAG to show", WAIT, || async {
                let cols = printer_columns(env, "default", "orders").await?;
                if cols["MAX LAG"].is_empty() {
                    Err(format!("MAX LAG is empty: {cols:?}"))
                } else {
                    Ok(())
                }
            })
            .await?;
            let cols = printer_columns(env, "default", "orders").await?;
            expect_columns(
                &cols,
                &[
                    ("NAME", "orders"),
                    ("DESIRED", "2"),
                    ("READY", "2"),
                    ("CLIENTS", "2"),
                    ("SHARDS", "4"),
                    ("STATUS", "True"),
                ],
            )?;
        } else if command.starts_with("kubectl describe") {
            let s = groups(env, "default")
                .get_status("orders")
                .await
                .map_err(|e| e.to_string())?;
            let status = s.status.ok_or("no status")?;
            for needle in [
                "Clients:",
                "Ranges:",
                "Max Lag",
                "Conditions:",
                "Balanced",
                "Leader:",
            ] {
                if !out.contains(needle) {
                    return Err(format!("describe lacks {needle:?}"));
                }
            }
            for c in &status.clients {
                if !out.contains(&c.id) {
                    return Err(format!("describe does not name client {}", c.id));
                }
            }
        } else if command.starts_with("kubectl scale") {
            let s = wait_ready(env, "default", "orders", 3).await?;
            let owned: Vec<i32> = s.clients.iter().map(|c| c.owned_shards).collect();
            if owned.iter().sum::<i32>() != SHARDS || owned.contains(&0) {
                return Err(format!("after scaling to 3, owned shards are {owned:?}"));
            }
        }
    }
    // The worker ServiceAccount the pods run as exists in the group's namespace.
    let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), "default");
    sas.get(&format!("{RELEASE}-worker"))
        .await
        .map_err(|e| format!("worker ServiceAccount in default: {e}"))?;
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

async fn operator_pods(env: &Env) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), OPERATOR_NS);
    let lp = ListParams::default().labels("app.kubernetes.io/component=operator");
    Ok(pods.list(&lp).await.map_err(|e| e.to_string())?.items)
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_operator_ready(env: &Env, replicas: usize) -> Result<Vec<String>, String> {
    wait_until(&format!("{replicas} ready operator pods"), WAIT, || async {
        let pods = operator_pods(env).await?;
        let ready: Vec<String> = pods
            .iter()
            .filter(|p| is_ready(p))
            .map(|p| p.name_any())
            .collect();
        if ready.len() == replicas {
            Ok(ready)
        } else {
            Err(format!("{} ready of {} pods", ready.len(), pods.len()))
        }
    })
    .await
}

async fn scale(
    env: &Env,
    ns: &str,
    name: &str,
    replicas: i32,
) -> Result<KinesisConsumerGroupStatus, String> {
    env.kubectl(&[
        "scale",
        &format!("kcg/{name}"),
        &format!("--replicas={replicas}"),
        "-n",
        ns,
    ])
    .await?;
    wait_ready(env, ns, name, replicas).await
}

/// `Rebalanced` events of a group: their notes, each counted once per series.
async fn rebalanced_notes(env: &Env, ns: &str, name: &str) -> Result<Vec<String>, String> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let list = events
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some("Rebalanced")
        })
        .filter_map(|e| e.note)
        .collect())
}

async fn scaling(env: &Env) -> Result<(), String> {
    let mut distributions = Vec::new();
    for n in [1, 2] {
        let s = scale(env, "default", "orders", n).await?;
        let d: Vec<String> = s
            .clients
            .iter()
            .map(|c| format!("{}={}", c.id, c.owned_shards))
            .collect();
        distributions.push(d.join(" "));
    }
    // Each distribution the status went through left its own event, with its own note.
    let notes = wait_until("a Rebalanced event for each distribution", WAIT, || async {
        let notes = rebalanced_notes(env, "default", "orders").await?;
        if distributions
            .iter()
            .all(|d| notes.iter().any(|n| n.ends_with(d.as_str())))
        {
            Ok(notes)
        } else {
            Err(format!("notes {notes:#?} lack one of {distributions:#?}"))
        }
    })
    .await?;
    let distinct: BTreeSet<&String> = notes.iter().collect();
    println!(
        "  {} Rebalanced events, {} distinct notes",
        notes.len(),
        distinct.len()
    );
    if distinct.len() < 4 {
        return Err(format!(
            "2 → 3 → 1 → 2 clients left only {} distinct Rebalanced notes: {notes:#?}",
            distinct.len()
        ));
    }
    Ok(())
}

async fn hpa(env: &Env) -> Result<(), String> {
    let ns = "hpa-example";
    env.kubectl(&["create", "namespace", ns]).await?;
    env.kubectl(&["apply", "-n", ns, "-f", "examples/hpa.yaml"])
        .await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), ns);
    // The HPA controller reads the group's scale subresource (there is no metrics server,
    // so it cannot compute a recommendation; reading /scale is what we own).
    wait_until("the HPA to read the group's /scale", WAIT, || async {
        let h = hpas.get("clicks").await.map_err(|e| e.to_string())?;
        let conds = h.status.and_then(|s| s.conditions).unwrap_or_default();
        let able = conds.iter().find(|c| c.type_ == "AbleToScale");
        match able {
            Some(c) if c.status == "True" => Ok(()),
            other => Err(format!("AbleToScale {other:?}")),
        }
    })
    .await?;
    // The scale subresource's selector matches exactly the group's worker pods.
    let scale = groups(env, ns)
        .get_scale("clicks")
        .await
        .map_err(|e| e.to_string())?;
    let selector = scale
        .status
        .and_then(|s| s.selector)
        .ok_or("no selector in /scale")?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let selected = wait_until(
        "2 worker pods selected by /scale's selector",
        WAIT,
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect();
            if names.len() == 2 {
                Ok(names)
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await?;
    let all = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    if all
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count()
        != selected.len()
    {
        return Err("the selector does not match every worker pod".into());
    }
    println!("  /scale selector {selector:?} selects {selected:?}");
    env.kubectl(&["delete", "namespace", ns, "--wait=false"])
        .await?;
    Ok(())
}

async fn killed_worker(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("kcg.dev/group=orders"))
        .await
        .map_err(|e| e.to_string())?;
    let victim = list
        .items
        .iter()
        .find(|p| is_ready(p))
        .ok_or("no ready worker pod")?
        .name_any();
    kubelet
        .kill("default", &victim, "worker", Signal::Kill)
        .map_err(|e| e.to_string())?;
    println!("  SIGKILLed the worker of pod {victim}");
    wait_until("the killed container to be restarted", WAIT, || async {
        let p = pods.get(&victim).await.map_err(|e| e.to_string())?;
        let restarts: i32 = p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .iter()
            .map(|c| c.restart_count)
            .sum();
        if restarts >= 1 {
            Ok(())
        } else {
            Err("restartCount 0".into())
        }
    })
    .await?;
    let s = wait_ready(env, "default", "orders", 2).await?;
    let ids: Vec<&str> = s.clients.iter().map(|c| c.id.as_str()).collect();
    println!("  recovered: clients {ids:?}");
    Ok(())
}

async fn drift(env: &Env) -> Result<(), String> {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "default");
    let hash = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("kcg.dev/config-hash").cloned())
            .unwrap_or_default()
    };
    let before = deployments.get("orders").await.map_err(|e| e.to_string())?;
    // A spec change: a new config, rolled out to new pods.
    env.kubectl(&[
        "patch",
        "kcg",
        "orders",
        "--type=merge",
        "-p",
        r#"{"spec":{"tuning":{"checkpointInterval":"2s"}}}"#,
    ])
    .await?;
    wait_until("a rollout with the new config", WAIT, || async {
        let d = deployments.get("orders").await.map_err(|e| e.to_string())?;
        let s = d.status.clone().unwrap_or_default();
        if hash(&d) != hash(&before)
            && s.updated_replicas == Some(2)
            && s.ready_replicas == Some(2)
            && s.replicas == Some(2)
        {
            Ok(())
        } else {
            Err(format!(
                "hash {} (was {}), status {s:?}",
                hash(&d),
                hash(&before)
            ))
        }
    })
    .await?;
    wait_ready(env, "default", "orders", 2).await?;

    // Edited behind the operator's back: put back.
    env.kubectl(&["scale", "deployment/orders", "--replicas=5"])
        .await?;
    wait_until("the Deployment's replicas put back to 2", WAIT, || async {
        let d = deployments.get("orders").await.map_err(|e| e.to_string())?;
        match d.spec.replicas {
            Some(2) => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await?;

    // Deleted: recreated.
    let uid = deployments
        .get("orders")
        .await
        .map_err(|e| e.to_string())?
        .uid();
    env.kubectl(&["delete", "deployment", "orders", "--wait=false"])
        .await?;
    wait_until("the Deployment recreated", WAIT, || async {
        let d = deployments.get("orders").await.map_err(|e| e.to_string())?;
        if d.uid() != uid && d.metadata.deletion_timestamp.is_none() {
            Ok(())
        } else {
            Err("still the old one".into())
        }
    })
    .await?;
    wait_ready(env, "default", "orders", 2).await?;
    Ok(())
}

/// One invalid object per schema and CEL rule, and the words the API server must use.
fn admission_cases() -> Vec<(&'static str, Value, &'static str)> {
    use crd_support::rule_messages::*;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut g = crd_support::valid_group();
        g["metadata"]["namespace"] = json!("default");
        g["metadata"]["name"] = json!("invalid");
        f(&mut g["spec"]);
        g
    };
    vec![
        (
            "bad stream name",
            with(&|s| s["streams"][0]["name"] = json!("no spaces")),
            STREAM_NAME,
        ),
        (
            "bad role ARN",
            with(&|s| s["streams"][0]["roleArn"] = json!("arn:aws:iam::1:user/x")),
            ROLE_ARN,
        ),
        (
            "bad consumer name",
            with(&|s| {
                s["streams"][0]["consumer"] = json!({"mode": "EnhancedFanOut", "name": "a/b"})
            }),
            CONSUMER_NAME,
        ),
        (
            "bad region",
            with(&|s| s["stateStore"]["region"] = json!("mars")),
            REGION,
        ),
        (
            "bad table",
            with(&|s| s["stateStore"]["table"] = json!("a")),
            TABLE,
        ),
        (
            "bad duration",
            with(&|s| s["tuning"] = json!({"checkpointInterval": "5 seconds"})),
            DURATION,
        ),
        (
            "poll too fast",
            with(&|s| s["tuning"] = json!({"pollInterval": "100ms"})),
            POLL_MIN,
        ),
        (
            "calls too fast",
            with(&|s| s["tuning"] = json!({"minCallInterval": "100ms"})),
            MIN_CALL_MIN,
        ),
        (
            "heartbeat too fast",
            with(&|s| s["tuning"] = json!({"heartbeatInterval": "50ms", "clientTimeout": "1s"})),
            HEARTBEAT_MIN,
        ),
        (
            "zero shutdown timeout",
            with(&|s| s["tuning"] = json!({"shutdownTimeout": "0s"})),
            POSITIVE,
        ),
        (
            "client timeout under two heartbeats",
            with(&|s| s["tuning"] = json!({"heartbeatInterval": "5s", "clientTimeout": "6s"})),
            CLIENT_TIMEOUT,
        ),
        (
            "sub-second heartbeat without room for the store-call timeout",
            with(&|s| s["tuning"] = json!({"heartbeatInterval": "100ms", "clientTimeout": "2s"})),
            CLIENT_TIMEOUT,
        ),
        (
            "no sink",
            with(&|s| s["delivery"] = json!({})),
            ONE_DELIVERY,
        ),
        (
            "two sinks",
            with(&|s| {
                s["delivery"] = json!({"stdout": {}, "http": {"url": "http://localhost:9000"}})
            }),
            ONE_DELIVERY,
        ),
        (
            "dead letter without a target",
            with(&|s| s["delivery"] = json!({"stdout": {}, "onFailure": "DeadLetter"})),
            DEAD_LETTER_NEEDED,
        ),
        (
            "a target without dead letter",
            with(&|s| {
                s["delivery"] =
                    json!({"stdout": {}, "deadLetter": {"sqs": {"queueUrl": "https://q"}}})
            }),
            DEAD_LETTER_UNUSED,
        ),
        (
            "no dead-letter target kind",
            with(&|s| {
                s["delivery"] = json!({"stdout": {}, "onFailure": "DeadLetter", "deadLetter": {}})
            }),
            ONE_DEAD_LETTER,
        ),
        (
            "bad queue url",
            with(&|s| {
                s["delivery"] = json!({"stdout": {}, "onFailure": "DeadLetter",
                    "deadLetter": {"sqs": {"queueUrl": "dlq"}}})
            }),
            QUEUE_URL,
        ),
        (
            "bad dead-letter stream",
            with(&|s| {
                s["delivery"] = json!({"stdout": {}, "onFailure": "DeadLetter",
                    "deadLetter": {"kinesis": {"stream": "a b"}}})
            }),
            DEAD_LETTER_STREAM,
        ),
        (
            "backoff max below initial",
            with(&|s| {
                s["delivery"] = json!({"stdout": {},
                    "retry": {"backoff": {"initial": "5s", "max": "1s"}}})
            }),
            BACKOFF_MAX,
        ),
        (
            "duplicate streams",
            with(&|s| s["streams"] = json!([{"name": "a"}, {"name": "a"}])),
            UNIQUE_STREAMS,
        ),
        (
            "AtTimestamp without a time",
            with(&|s| s["streams"][0]["startPosition"] = json!("AtTimestamp")),
            AT_TIMESTAMP,
        ),
        (
            "bad http url",
            with(&|s| s["delivery"] = json!({"http": {"url": "ftp://x"}})),
            URL,
        ),
        (
            "negative replicas",
            with(&|s| s["replicas"] = json!(-1)),
            "spec.replicas",
        ),
        (
            "both PDB bounds",
            with(&|s| {
                s["worker"] =
                    json!({"podDisruptionBudget": {"maxUnavailable": 1, "minAvailable": 1}})
            }),
            ONE_PDB_BOUND,
        ),
        (
            "no streams",
            with(&|s| s["streams"] = json!([])),
            "spec.streams",
        ),
        (
            "maxRecordsPerCall 0",
            with(&|s| s["tuning"] = json!({"maxRecordsPerCall": 0})),
            "spec.tuning.maxRecordsPerCall",
        ),
        (
            "unknown start position",
            with(&|s| s["streams"][0]["startPosition"] = json!("Earliest")),
            "spec.streams[0].startPosition",
        ),
        (
            "no state store",
            with(&|s| {
                s.as_object_mut().map(|o| o.remove("stateStore"));
            }),
            "spec.stateStore",
        ),
    ]
}

async fn admission(env: &Env) -> Result<(), String> {
    let cases = admission_cases();
    // Every CEL rule's message is among the cases.
    for m in crd_support::rule_messages::ALL {
        if !cases.iter().any(|(_, _, want)| want == m) {
            return Err(format!("no admission case for the rule {m:?}"));
        }
    }
    for (name, object, want) in cases {
        let result = env
            .kubectl_stdin(
                &["create", "--dry-run=server", "-f", "-"],
                &object.to_string(),
            )
            .await;
        match result {
            Ok(out) => return Err(format!("{name}: admitted ({})", out.trim())),
            Err(e) if e.contains(want) => println!("    rejected {name}: …{}", excerpt(&e, want)),
            Err(e) => return Err(format!("{name}: rejected, but without {want:?}: {e}")),
        }
    }
    Ok(())
}

fn excerpt<'a>(text: &'a str, needle: &str) -> &'a str {
    let i = text.find(needle).unwrap_or(0);
    let end = text[i..]
        .find(['\n', ','])
        .map(|e| i + e)
        .unwrap_or(text.len())
        .min(i + 120);
    &text[i..end]
}

async fn pods_not_created(env: &Env) -> Result<(), String> {
    let group = json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": "nosa", "namespace": "default"},
        "spec": {"replicas": 1, "streams": [{"name": STREAM}], "stateStore": {"table": TABLE},
                 "delivery": {"stdout": {}}, "worker": {"serviceAccountName": "does-not-exist"}}
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
        .await?;
    let api = groups(env, "default");
    let message = wait_until(
        "Degraded PodsNotCreated with the API server's words",
        WAIT,
        || async {
            let s = api
                .get_status("nosa")
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            match condition(&s, "Degraded") {
                Some(("True", "PodsNotCreated", m))
                    if m.contains("serviceaccount \"does-not-exist\" not found") =>
                {
                    Ok(m.to_owned())
                }
                other => Err(format!("Degraded {other:?}")),
            }
        },
    )
    .await?;
    println!("  Degraded: {message}");
    let events: Api<Event> = Api::namespaced(env.client.clone(), "default");
    wait_until("a PodsNotCreated Warning event", WAIT, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("PodsNotCreated")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
            .ok_or_else(|| "none yet".to_owned())
    })
    .await?;
    env.kubectl(&["delete", "kcg", "nosa"]).await?;
    Ok(())
}

async fn lease_holder(env: &Env) -> Result<String, String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), OPERATOR_NS);
    leases
        .get(RELEASE)
        .await
        .map_err(|e| e.to_string())?
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "no holder".into())
}

async fn operator_ha(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    env.helm(&[
        "upgrade",
        RELEASE,
        "charts/kcg-operator",
        "-n",
        OPERATOR_NS,
        "--reuse-values",
        "--set",
        "replicaCount=2",
    ])
    .await?;
    let ready = wait_operator_ready(env, 2).await?;
    let leader = wait_until("a Lease holder among the operator pods", WAIT, || async {
        let h = lease_holder(env).await?;
        if ready.contains(&h) {
            Ok(h)
        } else {
            Err(format!("holder {h} not in {ready:?}"))
        }
    })
    .await?;
    // The leader's node dies: its process is killed and its pod removed at once.
    kubelet
        .kill(OPERATOR_NS, &leader, "operator", Signal::Kill)
        .map_err(|e| e.to_string())?;
    env.kubectl(&[
        "delete",
        "pod",
        &leader,
        "-n",
        OPERATOR_NS,
        "--grace-period=0",
        "--force",
    ])
    .await?;
    let killed = Instant::now();
    println!("  killed the leader {leader}");
    // A change only a reconciling operator turns into a Deployment change.
    env.kubectl(&["scale", "kcg/orders", "--replicas=3"])
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "default");
    wait_until(
        "the Deployment to follow the scale, reconciled by the new leader",
        TAKEOVER,
        || async {
            let d = deployments.get("orders").await.map_err(|e| e.to_string())?;
            match d.spec.replicas {
                Some(3) => Ok(()),
                r => Err(format!("replicas {r:?}")),
            }
        },
    )
    .await?;
    let holder = lease_holder(env).await?;
    println!(
        "  reconciled {:.1}s after the kill, by {holder}",
        killed.elapsed().as_secs_f64()
    );
    if holder == leader {
        return Err(format!("the Lease still names the killed pod {leader}"));
    }
    wait_ready(env, "default", "orders", 3).await?;
    Ok(())
}

/// How many rows the group has in the table.
async fn rows(group: &str) -> Result<usize, String> {
    let aws = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&aws), TABLE);
    let snap = store.load_group(group).await.map_err(|e| e.to_string())?;
    Ok(snap.clients.len() + snap.shard_caches.len() + snap.leases.len())
}

async fn wait_gone(env: &Env, ns: &str, name: &str, limit: Duration) -> Result<(), String> {
    let api = groups(env, ns);
    wait_until(&format!("{ns}/{name} to be gone"), limit, || async {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(g) => Err(format!("finalizers {:?}", g.finalizers())),
        }
    })
    .await
}

async fn delete_retain(env: &Env) -> Result<(), String> {
    env.kubectl(&["delete", "kcg", "orders", "--wait=false"])
        .await?;
    wait_gone(env, "default", "orders", DELETE_LIMIT).await?;
    let n = rows("default/orders").await?;
    println!("  {n} rows kept");
    if n == 0 {
        return Err("onDelete: Retain, but the group's rows are gone".into());
    }
    Ok(())
}

async fn delete_delete(env: &Env) -> Result<(), String> {
    env.kubectl(&["create", "namespace", "team-a"]).await?;
    let group = json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": "payments", "namespace": "team-a"},
        "spec": {"replicas": 2, "streams": [{"name": STREAM, "startPosition": "TrimHorizon"}],
                 "stateStore": {"table": TABLE, "onDelete": "Delete"}, "delivery": {"stdout": {}}}
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
        .await?;
    wait_ready(env, "team-a", "payments", 2).await?;
    let before = rows("team-a/payments").await?;
    let t = Instant::now();
    env.kubectl(&["delete", "kcg", "payments", "-n", "team-a", "--wait=false"])
        .await?;
    wait_gone(env, "team-a", "payments", DELETE_LIMIT).await?;
    let after = rows("team-a/payments").await?;
    println!(
        "  gone after {:.1}s; rows {before} → {after}",
        t.elapsed().as_secs_f64()
    );
    if after != 0 {
        return Err(format!("{after} rows left after onDelete: Delete"));
    }
    Ok(())
}

async fn helm_uninstall(env: &Env) -> Result<(), String> {
    env.kubectl(&["create", "namespace", "team-b"]).await?;
    let group = json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": "survivor", "namespace": "team-b"},
        "spec": {"replicas": 1, "streams": [{"name": STREAM}], "stateStore": {"table": TABLE},
                 "delivery": {"stdout": {}}}
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
        .await?;
    wait_ready(env, "team-b", "survivor", 1).await?;
    helm_uninstall_operator(env).await?;
    wait_until("the operator pods gone", WAIT, || async {
        let n = operator_pods(env).await?.len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        }
    })
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    crds.get("kinesisconsumergroups.kcg.dev")
        .await
        .map_err(|e| format!("the CRD is gone: {e}"))?;
    groups(env, "team-b")
        .get("survivor")
        .await
        .map_err(|e| format!("the group is gone: {e}"))?;
    Ok(())
}

async fn watch_namespaces(env: &Env) -> Result<(), String> {
    env.helm(&[
        "install",
        RELEASE,
        "charts/kcg-operator",
        "-n",
        OPERATOR_NS,
        "--set",
        "watchNamespaces={team-b}",
    ])
    .await?;
    wait_operator_ready(env, 1).await?;
    let rbac = env
        .kubectl(&[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            &format!("app.kubernetes.io/instance={RELEASE}"),
            "-o",
            "name",
        ])
        .await?;
    if !rbac.trim().is_empty() {
        return Err(format!(
            "a namespaced install created cluster-wide RBAC: {rbac}"
        ));
    }
    // The group left by the uninstall is picked up by the new install.
    scale(env, "team-b", "survivor", 2).await?;
    // A group outside the watched namespaces is not reconciled.
    let group = json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": "ignored", "namespace": "default"},
        "spec": {"replicas": 1, "streams": [{"name": STREAM}], "stateStore": {"table": TABLE},
                 "delivery": {"stdout": {}}}
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ignored = groups(env, "default")
        .get("ignored")
        .await
        .map_err(|e| e.to_string())?;
    if ignored.status.is_some() || !ignored.finalizers().is_empty() {
        return Err("a group outside watchNamespaces was reconciled".into());
    }
    env.kubectl(&["delete", "kcg", "ignored"]).await?;
    env.kubectl(&["delete", "kcg", "survivor", "-n", "team-b", "--wait=false"])
        .await?;
    wait_gone(env, "team-b", "survivor", DELETE_LIMIT).await?;
    helm_uninstall_operator(env).await?;
    Ok(())
}

/// Scales the operator's Deployment and waits for its pods (ready, or gone at 0).
pub(crate) async fn scale_operator(env: &Env, replicas: usize) -> Result<(), String> {
    env.kubectl(&[
        "scale",
        "deployment",
        RELEASE,
        "-n",
        OPERATOR_NS,
        &format!("--replicas={replicas}"),
    ])
    .await?;
    if replicas > 0 {
        wait_operator_ready(env, replicas).await?;
        return Ok(());
    }
    wait_until("the operator pods gone", WAIT, || async {
        match operator_pods(env).await?.len() {
            0 => Ok(()),
            n => Err(format!("{n} pods")),
        }
    })
    .await
}

/// `helm uninstall` of the operator, stopped first: Helm deletes its RBAC while the pod's
/// grace period still runs, and the suite's RBAC check judges only an operator that holds
/// the chart's rights.
pub(crate) async fn helm_uninstall_operator(env: &Env) -> Result<(), String> {
    scale_operator(env, 0).await?;
    env.helm(&["uninstall", RELEASE, "-n", OPERATOR_NS, "--wait"])
        .await
        .map(drop)
}

fn operator_logs(kubelet: &Kubelet) -> String {
    kubelet.logs_matching(|ns, _, container| ns == OPERATOR_NS && container == "operator")
}

async fn no_forbidden(kubelet: &Kubelet) -> Result<(), String> {
    let logs = operator_logs(kubelet);
    if logs.is_empty() {
        return Err("no operator log at all".into());
    }
    // An RBAC refusal reads `... is forbidden: User "system:serviceaccount:..." cannot VERB
    // resource ...`; other 403s (a namespace being terminated, a pod admission refusal quoted
    // in a condition) are not RBAC's.
    let bad: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("is forbidden: User ") && !spec::expected_refusal(l))
        .collect();
    println!("  {} operator log lines read", logs.lines().count());
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} lines name Forbidden, first: {}",
            bad.len(),
            bad[0]
        ))
    }
}
