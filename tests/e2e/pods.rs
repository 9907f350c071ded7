//! Flows of the worker pod spec: the http sink's consumer as a native sidecar (started before
//! the worker, stopped after it) keeps a deleted worker's last batch delivered and
//! checkpointed; `spec.suspend` stops the workers next to an HPA and resumes them from their
//! checkpoints.
//!
//! The consumer is `tests/e2e/consumer.py`, run by the kubelet stand-in for images containing
//! [`CONSUMER_IMAGE`]: it appends every record it gets to one file shared by the group's
//! pods ([`out_file`]), with the name of the pod it runs in, and answers each POST after a
//! delay.

use std::path::PathBuf;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::DeleteParams;

use super::*;

/// Image substring the stand-in runs `consumer.py` for.
pub const CONSUMER_IMAGE: &str = "kcg-test-consumer";
const NS: &str = "pods";
const GROUP: &str = "slow";
/// Records of the sidecar flow: `n` in `0..SIDECAR_RECORDS`.
const SIDECAR_RECORDS: u32 = 160;
/// Records produced while the group is suspended: `n` in `SIDECAR_RECORDS..ALL_RECORDS`.
const ALL_RECORDS: u32 = 200;
/// How long the consumer takes to answer a POST.
const CONSUMER_DELAY: &str = "0.4";

/// `python3` and the consumer script: the command line the stand-in runs for
/// [`CONSUMER_IMAGE`].
pub fn consumer_program() -> (PathBuf, String) {
    let python = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("python3"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
    let script = root().join("tests/e2e/consumer.py");
    (python, script.display().to_string())
}

/// The file every consumer of the group appends to (one per test process).
fn out_file() -> PathBuf {
    std::env::temp_dir().join(format!("kcg-e2e-consumer-{}.jsonl", std::process::id()))
}

/// The stream of this run: a new one per test process, so the group does not first work
/// through the records earlier runs left in the emulator (a backlog that makes the deleted
/// worker's shutdown take as long as its grace period allows, which is not what the flow
/// is about).
fn stream_name() -> String {
    format!("kcg-e2e-sidecar-{}", std::process::id())
}

/// Tags this run's records, so records of an earlier run on the same stream are ignored.
fn run_id() -> String {
    format!("pods-{}", std::process::id())
}

fn group_manifest() -> Value {
    json!({
        "apiVersion": "kcg.dev/v1alpha1",
        "kind": "KinesisConsumerGroup",
        "metadata": {"name": GROUP, "namespace": NS},
        "spec": {
            "replicas": 1,
            "streams": [{"name": stream_name(), "startPosition": "TrimHorizon"}],
            "stateStore": {"table": TABLE, "create": true},
            "delivery": {"http": {
                "url": "http://localhost:9000/records",
                "timeout": "10s",
                "maxBatchRecords": 5
            }},
            "tuning": {"shutdownTimeout": "20s"},
            "worker": {
                // The stand-in gives each container a port of its own on the shared loopback;
                // it points an env value at a pod's container port, not the config file.
                "env": [{"name": "KCG__DELIVERY__HTTP__URL", "value": "http://localhost:9000/records"}],
                "initContainers": [{
                    "name": "consumer",
                    "image": format!("{CONSUMER_IMAGE}:e2e"),
                    "restartPolicy": "Always",
                    "command": ["consumer"],
                    "args": ["--listen=127.0.0.1:9000", format!("--delay={CONSUMER_DELAY}")],
                    "ports": [{"name": "sink", "containerPort": 9000}],
                    "env": [
                        {"name": "KCG_TEST_OUT", "value": out_file().display().to_string()},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                    ]
                }]
            }
        }
    })
}

async fn kinesis() -> aws_sdk_kinesis::Client {
    let aws = aws_config::defaults(BehaviorVersion::latest()).load().await;
    aws_sdk_kinesis::Client::new(&aws)
}

/// Puts records `n` in `range`, four per call, paced so they keep flowing for a while.
async fn produce(
    kinesis: aws_sdk_kinesis::Client,
    range: std::ops::Range<u32>,
) -> Result<(), String> {
    let run = run_id();
    let all: Vec<u32> = range.collect();
    for chunk in all.chunks(4) {
        let batch = chunk
            .iter()
            .map(|n| (format!("key-{}", n % 8), json!({"run": run, "n": n})));
        put_records(&kinesis, &stream_name(), batch).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(())
}

/// One record as the consumer got it.
#[derive(Debug)]
struct Received {
    pod: String,
    /// Seconds since the epoch when the consumer got it.
    at: f64,
    shard: String,
    sequence: String,
    n: u32,
}

/// This run's records in the consumer's file, in the order received.
fn received() -> Vec<Received> {
    let text = std::fs::read_to_string(out_file()).unwrap_or_default();
    let run = run_id();
    text.lines()
        .filter_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            let r = &v["record"];
            let payload = base64_json(r["data"].as_str()?)?;
            if payload["run"] != run.as_str() {
                return None;
            }
            Some(Received {
                pod: v["pod"].as_str()?.to_owned(),
                at: v["at"].as_f64()?,
                shard: r["shard"].as_str()?.to_owned(),
                sequence: r["sequence"].as_str()?.to_owned(),
                n: u32::try_from(payload["n"].as_u64()?).ok()?,
            })
        })
        .collect()
}

/// Waits until the consumers got every record `n` in `0..upto`.
async fn wait_received(upto: u32) -> Result<Vec<Received>, String> {
    wait_until(
        &format!("the consumers to get records 0..{upto}"),
        WAIT,
        || async {
            let got = received();
            let distinct: BTreeSet<u32> = got.iter().map(|r| r.n).filter(|n| *n < upto).collect();
            if distinct.len() == upto as usize {
                Ok(got)
            } else {
                Err(format!("{} of {upto} distinct records", distinct.len()))
            }
        },
    )
    .await
}

/// Kinesis sequence numbers are decimal integers too long for u128 in general: compare by
/// length, then text.
fn seq_key(s: &str) -> (usize, &str) {
    (s.len(), s)
}

async fn worker_pods(env: &Env) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    pods.list(&ListParams::default().labels(&format!("kcg.dev/group={GROUP}")))
        .await
        .map(|l| l.items)
        .map_err(|e| e.to_string())
}

/// The flow: a group whose http sink's consumer is a native sidecar answering slowly; a
/// worker pod deleted while records flow; its last batch is checkpointed (its successor
/// does not deliver it again, and the lease checkpoints cover it) and nothing is lost.
pub async fn native_sidecar(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    let _ = std::fs::remove_file(out_file());
    env.kubectl(&["create", "namespace", NS]).await?;
    let kinesis = kinesis().await;
    if kinesis
        .describe_stream_summary()
        .stream_name(stream_name())
        .send()
        .await
        .is_err()
    {
        stream_support::create_stream(&kinesis, &stream_name(), 2).await;
    }
    stream_support::wait_active(&kinesis, &stream_name()).await;
    let group_id = format!("{NS}/{GROUP}");
    let aws = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&aws);
    let _ = kcg_operator::store_admin::delete_group(&dynamo, TABLE, &group_id).await;
    env.kubectl_stdin(&["apply", "-f", "-"], &group_manifest().to_string())
        .await?;
    wait_ready(env, NS, GROUP, 1).await?;
    let pods = worker_pods(env).await?;
    let victim = pods.first().ok_or("no worker pod")?.name_any();
    let statuses = pods[0]
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.clone())
        .unwrap_or_default();
    if !statuses
        .iter()
        .any(|c| c.name == "consumer" && c.started == Some(true))
    {
        return Err(format!(
            "the consumer sidecar of {victim} is not running: {statuses:?}"
        ));
    }

    let producer = tokio::spawn(produce(kinesis.clone(), 0..SIDECAR_RECORDS));
    wait_until(
        "the first pod's consumer to get 20 records",
        WAIT,
        || async {
            let n = received().iter().filter(|r| r.pod == victim).count();
            if n >= 20 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        },
    )
    .await?;
    let api: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let deleted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    api.delete(&victim, &DeleteParams::default())
        .await
        .map_err(|e| e.to_string())?;
    println!("  deleted worker pod {victim} while records flow");
    wait_until(&format!("pod {victim} to be gone"), WAIT, || async {
        match api.get_opt(&victim).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await?;
    producer.await.map_err(|e| e.to_string())??;
    let got = wait_received(SIDECAR_RECORDS).await?;

    // The victim's consumer stopped only after its worker: SIGTERM came when no request
    // of the worker could still be in flight.
    let log = kubelet.logs_matching(|ns, pod, c| ns == NS && pod == victim && c == "consumer");
    if !log.contains("SIGTERM") {
        return Err(format!(
            "the consumer of {victim} never got SIGTERM:\n{log}"
        ));
    }
    // What the victim delivered, its successor never delivered again: its last batch was
    // acknowledged and checkpointed before it let go of the shards.
    let by_victim: BTreeSet<(&str, &str)> = got
        .iter()
        .filter(|r| r.pod == victim)
        .map(|r| (r.shard.as_str(), r.sequence.as_str()))
        .collect();
    let again: Vec<&Received> = got
        .iter()
        .filter(|r| r.pod != victim && by_victim.contains(&(r.shard.as_str(), r.sequence.as_str())))
        .collect();
    if !again.is_empty() {
        return Err(format!(
            "{} records the deleted worker delivered were delivered again by its successor (its last batch was not checkpointed): {:?}",
            again.len(),
            again.iter().take(5).collect::<Vec<_>>()
        ));
    }
    // And the lease rows' checkpoints cover the victim's last record of each shard.
    let store = StateStore::new(dynamo, TABLE.to_owned());
    let snapshot = store
        .load_group(&group_id)
        .await
        .map_err(|e| format!("reading the group's rows: {e}"))?;
    let mut last: BTreeMap<&str, &str> = BTreeMap::new();
    for r in got.iter().filter(|r| r.pod == victim) {
        let slot = last.entry(r.shard.as_str()).or_insert(r.sequence.as_str());
        if seq_key(&r.sequence) > seq_key(slot) {
            *slot = r.sequence.as_str();
        }
    }
    for (shard, seq) in &last {
        let checkpoint = snapshot
            .leases
            .iter()
            .find(|l| l.shard_id == *shard)
            .and_then(|l| l.checkpoint.clone())
            .ok_or(format!("no checkpoint for {shard}"))?;
        if checkpoint.chars().all(|c| c.is_ascii_digit()) && seq_key(&checkpoint) < seq_key(seq) {
            return Err(format!(
                "{shard}: checkpoint {checkpoint} is before {seq}, the last record the deleted worker delivered"
            ));
        }
    }
    let victims = got.iter().filter(|r| r.pod == victim).count();
    // Delivered while the victim's worker was shutting down: what an extra container,
    // SIGTERMed with the worker, could have missed.
    let during_shutdown = got
        .iter()
        .filter(|r| r.pod == victim && r.at >= deleted_at)
        .count();
    println!(
        "  {SIDECAR_RECORDS} records, {} received ({victims} by {victim}, {during_shutdown} of them after its deletion), none delivered twice across the handoff; checkpoints cover {last:?}",
        got.len()
    );
    Ok(())
}

/// The flow: suspend the group next to an HPA; 0 pods, `Suspended` in the status and in
/// `kubectl get kcg`, spec.replicas untouched; resume; records produced meanwhile arrive and
/// none is lost.
/// `kubectl patch kcg GROUP --type merge -p '{"spec":{"suspend":...}}'`.
async fn set_suspend(env: &Env, suspend: bool) -> Result<String, String> {
    let patch = json!({"spec": {"suspend": suspend}}).to_string();
    env.kubectl(&[
        "patch", "kcg", GROUP, "-n", NS, "--type", "merge", "-p", &patch,
    ])
    .await
}

pub async fn suspend(env: &Env) -> Result<(), String> {
    let hpa = json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": GROUP, "namespace": NS},
        "spec": {
            "scaleTargetRef": {"apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup", "name": GROUP},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
        }
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &hpa.to_string())
        .await?;
    set_suspend(env, true).await?;
    wait_until("no worker pod left", WAIT, || async {
        let pods = worker_pods(env).await?;
        if pods.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pods", pods.len()))
        }
    })
    .await?;
    let api = groups(env, NS);
    wait_until("Ready False Suspended", WAIT, || async {
        let g = api.get(GROUP).await.map_err(|e| e.to_string())?;
        let s = g.status.clone().ok_or("no status")?;
        match (condition(&s, "Ready"), condition(&s, "Progressing")) {
            (Some(("False", "Suspended", _)), Some(("False", "Suspended", _)))
                if g.spec.replicas == 1 && s.replicas == 0 =>
            {
                Ok(())
            }
            other => Err(format!(
                "{other:?}, spec.replicas {}, status.replicas {}",
                g.spec.replicas, s.replicas
            )),
        }
    })
    .await?;
    let cols = printer_columns(env, NS, GROUP).await?;
    expect_columns(
        &cols,
        &[("SUSPENDED", "true"), ("DESIRED", "1"), ("STATUS", "False")],
    )?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let d = deployments.get(GROUP).await.map_err(|e| e.to_string())?;
    if d.spec.replicas != Some(0) {
        return Err("the suspended group's Deployment does not run 0 replicas".into());
    }
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), NS);
    if pdbs
        .get_opt(GROUP)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("a suspended group keeps a PodDisruptionBudget".into());
    }
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), NS);
    hpas.get(GROUP).await.map_err(|e| e.to_string())?;

    // Records keep coming while the group is suspended; nobody reads them.
    let before = received().len();
    produce(kinesis().await, SIDECAR_RECORDS..ALL_RECORDS).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if received().len() != before {
        return Err("records were delivered while the group was suspended".into());
    }

    set_suspend(env, false).await?;
    wait_ready(env, NS, GROUP, 1).await?;
    let got = wait_received(ALL_RECORDS).await?;
    let cols = printer_columns(env, NS, GROUP).await?;
    expect_columns(&cols, &[("SUSPENDED", "false"), ("STATUS", "True")])?;
    println!(
        "  suspended to 0 pods next to an HPA, resumed from the checkpoints: {ALL_RECORDS} records, {} received",
        got.len()
    );
    env.kubectl(&["delete", "namespace", NS, "--wait=false"])
        .await?;
    Ok(())
}
