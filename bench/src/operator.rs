//! The operator's steady-state load on the API server and its memory: a real control plane
//! (`../shared/kube/cluster.sh`, own ports), the real `kcg-operator` binary (admin
//! kubeconfig, no leader election), N groups whose Deployments never get pods (there is no
//! kubelet) and DynamoDB Local for the table. Once every group has its objects and a
//! status, the API server's own request counters (`apiserver_request_total`, verb `APPLY`:
//! server-side applies, which only the operator makes here) are read before and after a
//! quiet window.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kcg_operator::crd::KinesisConsumerGroup;
use kcg_worker::store::StateStore;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;

use crate::report::{Row, num};
use crate::support::Aws;

/// What the operator benchmark runs.
#[derive(Clone, Debug)]
pub struct Params {
    /// Groups created.
    pub groups: usize,
    /// Length of the measured quiet window.
    pub window: Duration,
    /// The `kcg-operator` binary.
    pub operator_bin: PathBuf,
    /// `cluster.sh` of the shared control plane.
    pub cluster_script: PathBuf,
    /// Folder of the benchmark's own cluster.
    pub cluster_dir: PathBuf,
}

const NS: &str = "default";
/// Ports of the benchmark's own cluster (the e2e suites use others).
const KUBE_ENV: [(&str, &str); 3] = [
    ("KUBE_API_PORT", "6674"),
    ("KUBE_ETCD_PORT", "2609"),
    ("KUBE_KCM_PORT", "10487"),
];

/// Runs the benchmark; every failure is a failed row.
pub async fn run(aws: &Aws, p: &Params) -> Vec<Row> {
    let cluster = Cluster::start(p);
    let rows = match &cluster {
        Ok(c) => measure(aws, p, &c.kubeconfig).await,
        Err(e) => Err(anyhow::anyhow!("starting the control plane: {e:#}")),
    };
    if let Ok(c) = cluster {
        c.stop();
    }
    rows.unwrap_or_else(|e| vec![Row::failed("operator", &e)])
}

struct Cluster {
    script: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start(p: &Params) -> anyhow::Result<Self> {
        let status = std::process::Command::new(&p.cluster_script)
            .arg("start")
            .arg(&p.cluster_dir)
            .envs(KUBE_ENV)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", p.cluster_script.display()))?;
        if !status.success() {
            bail!("{} start failed: {status}", p.cluster_script.display());
        }
        Ok(Self {
            script: p.cluster_script.clone(),
            dir: p.cluster_dir.clone(),
            kubeconfig: p.cluster_dir.join("kubeconfig"),
        })
    }

    fn stop(&self) {
        let _ = std::process::Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .envs(KUBE_ENV)
            .stdout(Stdio::null())
            .status();
    }
}

async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// `apiserver_request_total` summed by (verb, resource, subresource).
async fn api_requests(
    client: &Client,
    verb: &str,
    resource: &str,
    sub: &str,
) -> anyhow::Result<u64> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            let label = |name: &str| {
                l.split_once(&format!("{name}=\""))
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(v, _)| v)
                    .unwrap_or("")
            };
            label("verb") == verb && label("resource") == resource && label("subresource") == sub
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// VmHWM and VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0))
}

async fn measure(aws: &Aws, p: &Params, kubeconfig: &Path) -> anyhow::Result<Vec<Row>> {
    let client = client(kubeconfig).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &KinesisConsumerGroup::crd())
        .await
        .context("creating the CRD")?;
    wait("the CRD established", Duration::from_secs(30), || async {
        let crd = crds.get("kinesisconsumergroups.kcg.dev").await?;
        let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        Ok(established)
    })
    .await?;

    let table = format!(
        "kcg-bench-operator-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_millisecond()
    );
    let store = StateStore::new(aws.dynamodb.clone(), table.clone());
    store
        .ensure_table(true)
        .await
        .context("creating the table")?;
    let groups: Api<KinesisConsumerGroup> = Api::namespaced(client.clone(), NS);
    for i in 0..p.groups {
        let g: KinesisConsumerGroup = serde_json::from_value(json!({
            "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
            "metadata": {"name": format!("bench-{i:03}"), "namespace": NS},
            "spec": {"replicas": 1, "streams": [{"name": "orders"}],
                     "stateStore": {"table": table}, "delivery": {"stdout": {}}}
        }))?;
        groups.create(&PostParams::default(), &g).await?;
    }

    let mut operator = tokio::process::Command::new(&p.operator_bin)
        .args(["run", "--leader-election=false", "--listen=127.0.0.1:0"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", p.operator_bin.display()))?;
    let pid = operator.id().context("operator pid")?;
    let result = steady_window(p, &client, &groups, pid).await;
    let _ = operator.kill().await;
    let _ = aws.dynamodb.delete_table().table_name(&table).send().await;
    result
}

async fn steady_window(
    p: &Params,
    client: &Client,
    groups: &Api<KinesisConsumerGroup>,
    pid: u32,
) -> anyhow::Result<Vec<Row>> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    // Steady: the Deployment controller has made every ReplicaSet and pod (its client is
    // rate-limited, so 100 Deployments take a while) and every group's status shows it.
    wait(
        "every group with its Deployment, pods made, and a status showing them",
        Duration::from_secs(300),
        || async {
            let pods_made = deployments
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|d| d.status.as_ref().and_then(|s| s.replicas) == Some(1))
                .count();
            let shown = groups
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|g| g.status.as_ref().is_some_and(|s| s.replicas == 1))
                .count();
            Ok(pods_made == p.groups && shown == p.groups)
        },
    )
    .await?;
    let settle = started.elapsed();
    // The last watch events and refreshes they cause pass.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let counts = || async {
        Ok::<_, anyhow::Error>((
            api_requests(client, "APPLY", "configmaps", "").await?,
            api_requests(client, "APPLY", "deployments", "").await?,
            api_requests(client, "APPLY", "kinesisconsumergroups", "status").await?,
            api_requests(client, "PATCH", "kinesisconsumergroups", "").await?,
        ))
    };
    let rvs = || async {
        Ok::<_, anyhow::Error>(
            groups
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(|g| (g.name_any(), g.resource_version()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
    };
    let (cm0, dep0, st0, patch0) = counts().await?;
    let rv0 = rvs().await?;
    tokio::time::sleep(p.window).await;
    let (cm1, dep1, st1, patch1) = counts().await?;
    let rv1 = rvs().await?;
    let (hwm, rss) = rss_mib(pid)?;

    let n = p.groups as f64;
    let minutes = p.window.as_secs_f64() / 60.0;
    let per = |a: u64, b: u64| (b - a) as f64 / n / minutes;
    let applies = per(cm0, cm1) + per(dep0, dep1);
    let status = per(st0, st1);
    let moved = rv0.iter().filter(|(k, v)| rv1.get(*k) != Some(v)).count();
    let what = format!(
        "{} groups, no pods, {:.0} s window",
        p.groups,
        p.window.as_secs_f64()
    );
    Ok(vec![
        Row::info(
            "operator",
            format!("{what}: every group with objects, pods made and shown in its status after"),
            num(settle.as_secs_f64()),
            "s",
        ),
        Row::goal(
            "operator",
            format!(
                "{what}: server-side applies of ConfigMaps + Deployments ({} + {})",
                cm1 - cm0,
                dep1 - dep0
            ),
            num(applies),
            "/group/min",
            "0",
            applies == 0.0,
        ),
        Row::goal(
            "operator",
            format!(
                "{what}: status applies ({}), other group patches ({})",
                st1 - st0,
                patch1 - patch0
            ),
            num(status),
            "/group/min",
            "<= 1",
            status <= 1.0,
        ),
        Row::info(
            "operator",
            format!("{what}: groups whose resourceVersion moved"),
            moved.to_string(),
            "groups",
        ),
        Row::goal(
            "operator",
            format!(
                "{what}: operator VmRSS at the end ({})",
                p.operator_bin.display()
            ),
            num(rss),
            "MiB",
            "<= 40",
            rss <= 40.0,
        ),
        Row::info(
            "operator",
            format!("{what}: operator VmHWM (peak, start-up included)"),
            num(hwm),
            "MiB",
        ),
    ])
}

async fn wait<F, Fut>(what: &str, limit: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if start.elapsed() >= limit => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(_) => {}
        }
        if start.elapsed() >= limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
