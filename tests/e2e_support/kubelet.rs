//! A kubelet stand-in for the e2e suite: the test cluster (`/work/shared/kube`) has an API
//! server and the controllers, but no kubelet, scheduler or container runtime. This module
//! plays all three for one Node, with real API calls:
//!
//! - registers the Node `kcg-e2e-node` and keeps it alive (Lease in `kube-node-lease` and the
//!   Ready condition's heartbeat, every 10 s), so the node-lifecycle controller does not
//!   taint it and PodGC leaves its pods alone;
//! - binds every Pending pod without a node to it (`pods/binding`);
//! - runs each container whose image matches a configured image substring as a local process
//!   (the mapped binary + the container's args), with the pod's env (downward API,
//!   ConfigMap/Secret refs), its ConfigMap/Secret/emptyDir volumes as directories under the
//!   work dir (args and env values under a mount path are rewritten to them), a free
//!   127.0.0.1 port per container port (`KCG_LISTEN`, `--listen`) and, unless
//!   `automountServiceAccountToken: false`, a kubeconfig holding a TokenRequest token of the
//!   pod's ServiceAccount (`KUBECONFIG`), never the admin credentials;
//! - patches `pods/status` (Running, container states, Ready from the readiness probe);
//! - runs init containers first, in order, each to completion, before the next one and the
//!   main containers; an init container with `restartPolicy: Always` (a native sidecar) is
//!   started instead and runs next to the main containers, restarted whenever it exits;
//! - lets the containers of a pod reach each other on their declared ports, as in a pod's
//!   network namespace: an env value naming `localhost:<containerPort>` of any container of
//!   the pod is rewritten to that container's local port;
//! - restarts exited containers after about 1 s;
//! - on deletion: SIGTERM to the main (and running init) containers; once they exited,
//!   SIGTERM to the native sidecars, last one first; SIGKILL to what is left when the grace
//!   period ends; then removes the pod (grace 0).
//!
//! Container stdout and stderr go to `<work_dir>/<namespace>/<pod>/<container>.log`.
//! Each process runs in its own process group; signals go to the whole group.
//!
//! ```ignore
//! let opts = KubeletOptions::from_kubeconfig(&kubeconfig_path, work_dir.path())?
//!     .binary("kcg-worker", "target/debug/kcg-worker")
//!     .envs(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")));
//! let kubelet = Kubelet::start(client.clone(), opts).await?;
//! // ... create Deployments; their pods become Running and Ready ...
//! kubelet.kill("ns", "pod", "worker", Signal::Kill)?;
//! kubelet.shutdown().await;
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, EnvVarSource, KeyToPath, Node, ObjectReference, Pod, Probe,
    Secret, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::Kubeconfig;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// The Node name the e2e suite uses.
pub const NODE_NAME: &str = "kcg-e2e-node";
/// How often the Node's Lease and Ready heartbeat are renewed.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// How often each pod is synced (process exits, readiness probes) without an API event.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Delay before an exited container is started again; it doubles while the container keeps
/// crashing within [`BACKOFF_RESET`] of its start, up to [`MAX_RESTART_DELAY`].
const RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// Grace period when a pod does not set one.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// How long [`Kubelet::shutdown`] lets processes stop after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Lifetime of the ServiceAccount tokens given to pods.
const TOKEN_SECONDS: i64 = 3600;
/// Pod IP and host IP of every pod: they all share the test machine's loopback.
const POD_IP: &str = "127.0.0.1";
/// Field manager of the stand-in's server-side applies.
const MANAGER: &str = "kcg-e2e-kubelet";

/// What the stand-in needs besides an admin client.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// Name of the Node to register and bind pods to.
    pub node_name: String,
    /// Pod directories (volumes, logs, kubeconfig) go to `<work_dir>/<namespace>/<pod>/`.
    pub work_dir: PathBuf,
    /// Image-name substring → local binary. A container runs the first binary whose
    /// substring its image contains; containers with no match are not started.
    pub binaries: Vec<(String, PathBuf)>,
    /// Image-name substring → arguments put before the container's own, for a binary that
    /// is an interpreter (`python3 script.py`); see [`KubeletOptions::command`].
    pub leading_args: Vec<(String, Vec<String>)>,
    /// The "node" environment every process starts from (AWS endpoints and credentials, like
    /// IRSA would inject), before the container's own env. PATH and HOME come from the test
    /// process; nothing else does.
    pub env: Vec<(String, String)>,
    /// API server URL written into the pods' kubeconfigs.
    pub api_server: String,
    /// The cluster's CA certificate (PEM) written into the pods' kubeconfigs.
    pub ca_pem: Vec<u8>,
}

impl KubeletOptions {
    /// Options for node [`NODE_NAME`] with the API server and CA of the current context of
    /// the kubeconfig at `path`; no binaries and no env yet.
    pub fn from_kubeconfig(path: &Path, work_dir: impl Into<PathBuf>) -> Result<Self> {
        let config = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let (api_server, ca_pem) = current_cluster(&config, path)?;
        Ok(Self {
            node_name: NODE_NAME.to_owned(),
            work_dir: work_dir.into(),
            binaries: Vec::new(),
            leading_args: Vec::new(),
            env: Vec::new(),
            api_server,
            ca_pem,
        })
    }

    /// Adds a binary for images containing `image_substring`.
    pub fn binary(mut self, image_substring: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.push((image_substring.into(), path.into()));
        self
    }

    /// Adds a command line for images containing `image_substring`: `program`, then
    /// `leading_args`, then the container's command (without its first word) and args.
    pub fn command(
        mut self,
        image_substring: impl Into<String>,
        program: impl Into<PathBuf>,
        leading_args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let needle = image_substring.into();
        self.leading_args.push((
            needle.clone(),
            leading_args.into_iter().map(Into::into).collect(),
        ));
        self.binary(needle, program)
    }

    /// Adds one variable to the node environment.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Adds variables to the node environment, e.g. the test's `AWS_*` variables.
    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    fn binary_for(&self, image: &str) -> Option<PathBuf> {
        self.binaries
            .iter()
            .find(|(needle, _)| image.contains(needle.as_str()))
            .map(|(_, path)| path.clone())
    }

    fn leading_args_for(&self, image: &str) -> Vec<String> {
        self.leading_args
            .iter()
            .find(|(needle, _)| image.contains(needle.as_str()))
            .map(|(_, args)| args.clone())
            .unwrap_or_default()
    }
}

/// Server URL and CA (PEM) of the kubeconfig's current context.
fn current_cluster(config: &Kubeconfig, path: &Path) -> Result<(String, Vec<u8>)> {
    let context_name = config
        .current_context
        .as_deref()
        .context("the kubeconfig has no current-context")?;
    let cluster_name = config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .with_context(|| format!("context {context_name} not found in the kubeconfig"))?;
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("cluster {cluster_name} not found in the kubeconfig"))?;
    let server = cluster
        .server
        .clone()
        .context("the cluster has no server")?;
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => {
            serde_json::from_value::<ByteString>(Value::String(data.clone()))
                .context("certificate-authority-data is not base64")?
                .0
        }
        (None, Some(file)) => {
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
        }
        (None, None) => bail!("the cluster {cluster_name} has no certificate authority"),
    };
    Ok((server, ca_pem))
}

/// A signal for [`Kubelet::kill`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: graceful stop.
    Term,
    /// SIGKILL: a crash.
    Kill,
    /// SIGINT.
    Int,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
            Signal::Int => "INT",
        }
    }
}

/// Sends `signal` to the process group `pgid` (every process is its own group's leader).
fn signal_group(pgid: u32, signal: Signal) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{}", signal.name()))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status()
        .context("running kill(1)")?;
    ensure!(
        status.success(),
        "kill -{} -{pgid}: no such process group",
        signal.name()
    );
    Ok(())
}

/// A running stand-in. Dropping it SIGKILLs every process it started; prefer
/// [`Kubelet::shutdown`], which lets them stop gracefully first.
pub struct Kubelet {
    shared: Arc<Shared>,
    background: Vec<JoinHandle<()>>,
}

impl Kubelet {
    /// Registers the Node, then starts the heartbeat and the pod watch on the current Tokio
    /// runtime. `client` must be an admin client.
    pub async fn start(client: Client, opts: KubeletOptions) -> Result<Kubelet> {
        std::fs::create_dir_all(&opts.work_dir)
            .with_context(|| format!("creating {}", opts.work_dir.display()))?;
        for (image, path) in &opts.binaries {
            ensure!(
                path.is_file(),
                "binary for image *{image}* not found: {}",
                path.display()
            );
        }
        register_node(&client, &opts.node_name).await?;
        let shared = Arc::new(Shared {
            client,
            opts,
            pods: Mutex::new(BTreeMap::new()),
            finished: Mutex::new(HashSet::new()),
        });
        let background = vec![
            tokio::spawn(keep_node_alive(
                shared.client.clone(),
                shared.opts.node_name.clone(),
            )),
            tokio::spawn(watch_pods(shared.clone())),
        ];
        Ok(Kubelet { shared, background })
    }

    /// The Node this stand-in plays.
    pub fn node_name(&self) -> &str {
        &self.shared.opts.node_name
    }

    /// Pods this stand-in runs (bound to its node and not yet removed), as (namespace, name).
    pub fn running_pods(&self) -> Vec<(String, String)> {
        self.shared.pods().keys().cloned().collect()
    }

    /// The live processes of a pod: (container, pid). The pid is also the process group.
    pub fn pids(&self, namespace: &str, pod: &str) -> Vec<(String, u32)> {
        let key = (namespace.to_owned(), pod.to_owned());
        self.shared
            .pods()
            .get(&key)
            .map(|r| r.pids.iter().map(|(c, p)| (c.clone(), *p)).collect())
            .unwrap_or_default()
    }

    /// The pid of one container's process, if it runs.
    pub fn pid_of(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        self.pids(namespace, pod)
            .into_iter()
            .find(|(c, _)| c == container)
            .map(|(_, pid)| pid)
    }

    /// Sends `signal` to a container's process group, e.g. [`Signal::Kill`] to crash it
    /// (it is restarted like a real container).
    pub fn kill(&self, namespace: &str, pod: &str, container: &str, signal: Signal) -> Result<()> {
        let pid = self
            .pid_of(namespace, pod, container)
            .with_context(|| format!("no process for {namespace}/{pod}/{container}"))?;
        println!(
            "[kubelet] test sends SIG{} to {namespace}/{pod}/{container} (pid {pid})",
            signal.name()
        );
        signal_group(pid, signal)
    }

    /// The directory of a pod: `volumes/`, `kubeconfig`, the container logs.
    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.shared.pod_dir(namespace, pod)
    }

    /// Where a container's stdout and stderr go (appended across restarts).
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.pod_dir(namespace, pod)
            .join(format!("{container}.log"))
    }

    /// The logs of every container, past or present, for which `select(namespace, pod,
    /// container)` holds, each after a `==> namespace/pod/container <==` line.
    pub fn logs_matching(&self, select: impl Fn(&str, &str, &str) -> bool) -> String {
        let mut out = String::new();
        for (ns, pod, container, path) in log_files(&self.shared.opts.work_dir) {
            if select(&ns, &pod, &container) {
                let text = std::fs::read(&path).unwrap_or_default();
                out.push_str(&format!("==> {ns}/{pod}/{container} <==\n"));
                out.push_str(&String::from_utf8_lossy(&text));
            }
        }
        out
    }

    /// Stops the watch and heartbeat, SIGTERMs every process, SIGKILLs what is left after a
    /// few seconds. Pods stay in the API (bound to the node) as after a node failure.
    pub async fn shutdown(mut self) {
        for task in self.background.drain(..) {
            task.abort();
        }
        let tasks: Vec<JoinHandle<()>> = {
            let mut pods = self.shared.pods();
            pods.values_mut()
                .filter_map(|record| {
                    record.tx.send_replace(Desired::Shutdown);
                    record.task.take()
                })
                .collect()
        };
        let aborts: Vec<AbortHandle> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), all)
            .await
            .is_err()
        {
            aborts.iter().for_each(AbortHandle::abort);
        }
        self.shared.kill_everything();
        println!("[kubelet] shut down");
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
        self.shared.kill_everything();
    }
}

/// Every `<ns>/<pod>/<container>.log` under the work dir: (ns, pod, container, path).
fn log_files(work_dir: &Path) -> Vec<(String, String, String, PathBuf)> {
    let mut out = Vec::new();
    for ns in sorted_entries(work_dir) {
        for pod in sorted_entries(&ns) {
            for file in sorted_entries(&pod) {
                let Some(container) = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".log"))
                else {
                    continue;
                };
                out.push((file_name(&ns), file_name(&pod), container.to_owned(), file));
            }
        }
    }
    out
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Node: registration and heartbeat.
// ---------------------------------------------------------------------------------------

/// Creates the Node (or takes over an existing one) and sends a first heartbeat.
async fn register_node(client: &Client, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => println!("[kubelet] registered node {name}"),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            println!("[kubelet] node {name} exists: taking it over")
        }
        Err(e) => return Err(e).with_context(|| format!("creating Node {name}")),
    }
    heartbeat(client, name, Timestamp::now()).await
}

/// Renews the node's heartbeat every [`HEARTBEAT_EVERY`]; failures are logged and retried.
async fn keep_node_alive(client: Client, name: String) {
    let since = Timestamp::now();
    loop {
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        if let Err(e) = heartbeat(&client, &name, since).await {
            eprintln!("[kubelet] node heartbeat failed (will retry): {e:#}");
        }
    }
}

/// Renews the node Lease and the Ready condition's heartbeat (Ready since `since`).
async fn heartbeat(client: &Client, name: &str, since: Timestamp) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(name).await.context("reading the Node")?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name, "uid": node.uid(),
            }],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(lease),
        )
        .await
        .context("renewing the node Lease")?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(node_status(since)),
        )
        .await
        .context("patching the Node status")?;
    Ok(())
}

/// The Node status: Ready, no pressure, room for plenty of pods.
fn node_status(since: Timestamp) -> Value {
    let (now, since) = (Time(Timestamp::now()), Time(since));
    let condition = |type_: &str, status: &str, reason: &str| {
        json!({
            "type": type_, "status": status, "reason": reason,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        })
    };
    let resources =
        json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    json!({"status": {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("Ready", "True", "KubeletReady"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [{"type": "InternalIP", "address": POD_IP}],
        "nodeInfo": {
            "architecture": "amd64", "operatingSystem": "linux", "osImage": "kcg e2e",
            "kernelVersion": "", "bootID": "", "machineID": "", "systemUUID": "",
            "containerRuntimeVersion": "kcg-e2e://local-processes",
            "kubeletVersion": "v1.36.2", "kubeProxyVersion": "",
        },
    }})
}

// ---------------------------------------------------------------------------------------
// The pod watch: binding, and one task per pod on this node.
// ---------------------------------------------------------------------------------------

/// (namespace, name).
type PodKey = (String, String);

fn key_of(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

fn id(key: &PodKey) -> String {
    format!("{}/{}", key.0, key.1)
}

/// What a pod's task should do, sent by the watch (latest value wins).
#[derive(Clone)]
enum Desired {
    /// Run this version of the pod (stop it if it has a deletionTimestamp).
    Run(Arc<Pod>),
    /// The pod is gone from the API: kill its processes now.
    Gone,
    /// The stand-in shuts down: stop the processes, leave the pod in the API.
    Shutdown,
}

/// State shared by the watch, the pod tasks and the [`Kubelet`] handle.
struct Shared {
    client: Client,
    opts: KubeletOptions,
    pods: Mutex<BTreeMap<PodKey, PodRecord>>,
    /// Uids of pods whose task ended: late watch events must not start them again.
    finished: Mutex<HashSet<String>>,
}

/// One pod this stand-in runs.
struct PodRecord {
    uid: String,
    tx: watch::Sender<Desired>,
    task: Option<JoinHandle<()>>,
    /// Live process per container.
    pids: BTreeMap<String, u32>,
}

impl Shared {
    fn pods(&self) -> MutexGuard<'_, BTreeMap<PodKey, PodRecord>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.opts.work_dir.join(namespace).join(pod)
    }

    fn set_pid(&self, key: &PodKey, uid: &str, container: &str, pid: Option<u32>) {
        if let Some(record) = self.pods().get_mut(key).filter(|r| r.uid == uid) {
            match pid {
                Some(pid) => record.pids.insert(container.to_owned(), pid),
                None => record.pids.remove(container),
            };
        }
    }

    /// Called by a pod's task when it ends.
    fn forget(&self, key: &PodKey, uid: &str) {
        let mut pods = self.pods();
        if pods.get(key).is_some_and(|r| r.uid == uid) {
            pods.remove(key);
        }
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned());
    }

    fn is_finished(&self, uid: &str) -> bool {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(uid)
    }

    /// SIGKILLs every known process group (Drop, end of shutdown).
    fn kill_everything(&self) {
        let mut pods = self.pods();
        for record in pods.values_mut() {
            for pid in std::mem::take(&mut record.pids).into_values() {
                let _ = signal_group(pid, Signal::Kill);
            }
            if let Some(task) = record.task.take() {
                task.abort();
            }
        }
    }

    /// Handles one version of a pod from the watch.
    async fn on_pod(self: &Arc<Self>, pod: Pod) {
        let key = key_of(&pod);
        let uid = pod.uid().unwrap_or_default();
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        match node {
            None if !deleting && !terminal => self.bind(&key).await,
            Some(node)
                if node == self.opts.node_name && self.wants(&key, &uid, terminal && !deleting) =>
            {
                self.run(key, uid, pod)
            }
            _ => {}
        }
    }

    /// Whether to run a pod bound to this node: not once its task ended, and not if it had
    /// already `finished` (Succeeded/Failed, not deleting) before this stand-in ran it.
    fn wants(&self, key: &PodKey, uid: &str, finished: bool) -> bool {
        let tracked = self.pods().get(key).is_some_and(|r| r.uid == uid);
        !self.is_finished(uid) && (tracked || !finished)
    }

    /// Binds a pod to this node through `pods/binding`, as the scheduler would.
    async fn bind(&self, key: &PodKey) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(key.1.clone()),
                namespace: Some(key.0.clone()),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(self.opts.node_name.clone()),
                ..ObjectReference::default()
            },
        };
        let bound: kube::Result<Value> = pods
            .create_subresource("binding", &key.1, &PostParams::default(), &binding)
            .await;
        match bound {
            Ok(_) => println!("[kubelet] bound {} to {}", id(key), self.opts.node_name),
            Err(e) => eprintln!("[kubelet] binding {} failed: {e}", id(key)),
        }
    }

    /// Hands the pod to its task, starting one for a pod not seen before.
    fn run(self: &Arc<Self>, key: PodKey, uid: String, pod: Pod) {
        let pod = Arc::new(pod);
        let mut pods = self.pods();
        if let Some(record) = pods.get(&key) {
            if record.uid == uid {
                record.tx.send_replace(Desired::Run(pod));
                return;
            }
            // Same name, new pod: the old one is gone even if its Delete event was missed.
            record.tx.send_replace(Desired::Gone);
        }
        let (tx, rx) = watch::channel(Desired::Run(pod.clone()));
        let runner = PodRunner::new(self.clone(), key.clone(), pod);
        let task = tokio::spawn(runner.run(rx));
        let record = PodRecord {
            uid,
            tx,
            task: Some(task),
            pids: BTreeMap::new(),
        };
        // An old pod of the same name ends by itself after `Gone`.
        pods.insert(key, record);
    }

    /// The pod vanished from the API (deleted with grace 0, or its namespace went away).
    fn on_gone(&self, key: &PodKey, uid: &str) {
        if let Some(record) = self.pods().get(key).filter(|r| r.uid == uid) {
            record.tx.send_replace(Desired::Gone);
        }
    }
}

/// Watches all pods; errors are logged and the watch is retried with backoff.
async fn watch_pods(shared: Arc<Shared>) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut events = watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listed: Option<HashSet<PodKey>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let Some(seen) = listed.as_mut() {
                    seen.insert(key_of(&pod));
                }
                shared.on_pod(pod).await;
            }
            Ok(Event::InitDone) => {
                // Pods deleted while the watch was down: no Delete event comes for them.
                let seen = listed.take().unwrap_or_default();
                let gone: Vec<(PodKey, String)> = shared
                    .pods()
                    .iter()
                    .filter(|(key, _)| !seen.contains(*key))
                    .map(|(key, r)| (key.clone(), r.uid.clone()))
                    .collect();
                for (key, uid) in gone {
                    shared.on_gone(&key, &uid);
                }
            }
            Ok(Event::Apply(pod)) => shared.on_pod(pod).await,
            Ok(Event::Delete(pod)) => shared.on_gone(&key_of(&pod), &pod.uid().unwrap_or_default()),
            Err(e) => eprintln!("[kubelet] pod watch error (retrying): {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// One pod: volumes, processes, probes, status, termination.
// ---------------------------------------------------------------------------------------

/// Why a container is not running, as a waiting state.
#[derive(Clone, Debug, PartialEq)]
struct Waiting {
    reason: &'static str,
    message: String,
}

impl Waiting {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// How a container's process ended.
#[derive(Clone, Debug)]
struct Exit {
    code: i32,
    signal: Option<i32>,
    started_at: Timestamp,
    finished_at: Timestamp,
}

impl Exit {
    fn new(status: ExitStatus, started_at: Timestamp) -> Self {
        let signal = status.signal();
        Self {
            code: status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
            signal,
            started_at,
            finished_at: Timestamp::now(),
        }
    }

    fn to_json(&self) -> Value {
        let reason = if self.code == 0 { "Completed" } else { "Error" };
        let mut terminated = json!({
            "exitCode": self.code, "reason": reason,
            "startedAt": Time(self.started_at), "finishedAt": Time(self.finished_at),
        });
        if let Some(signal) = self.signal {
            terminated["signal"] = json!(signal);
        }
        json!({ "terminated": terminated })
    }
}

/// Local ports of one container: container port number or name → 127.0.0.1 port.
#[derive(Debug, Default)]
struct Ports {
    by_number: HashMap<i32, u16>,
    by_name: HashMap<String, u16>,
    /// The port of the first containerPort (`KCG_LISTEN`, `--listen`).
    first: Option<u16>,
}

impl Ports {
    /// A free local port for each containerPort.
    fn allocate(container: &Container) -> Result<Self> {
        let mut ports = Ports::default();
        for declared in container.ports.iter().flatten() {
            let local = free_port()?;
            ports.first.get_or_insert(local);
            ports.by_number.insert(declared.container_port, local);
            if let Some(name) = &declared.name {
                ports.by_name.insert(name.clone(), local);
            }
        }
        Ok(ports)
    }

    /// The local port a probe's port refers to; an undeclared number is used as is.
    fn resolve(&self, port: &IntOrString) -> Option<u16> {
        match port {
            IntOrString::Int(n) => self
                .by_number
                .get(n)
                .copied()
                .or_else(|| u16::try_from(*n).ok()),
            IntOrString::String(name) => self.by_name.get(name).copied(),
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((POD_IP, 0)).context("finding a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// Mount path → local directory of one container, longest mount path first.
#[derive(Debug, Default)]
struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    fn new(mut mounts: Vec<(String, PathBuf)>) -> Self {
        for (path, _) in &mut mounts {
            while path.len() > 1 && path.ends_with('/') {
                path.pop();
            }
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Self(mounts)
    }

    /// `value` with a leading mount path replaced by its local directory.
    fn rewrite_path(&self, value: &str) -> String {
        for (mount, local) in &self.0 {
            if let Some(rest) = value.strip_prefix(mount.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", local.display());
            }
        }
        value.to_owned()
    }

    /// Like [`Mounts::rewrite_path`], also for the value of a `--flag=/path` argument.
    fn rewrite_arg(&self, arg: &str) -> String {
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with('-') => {
                format!("{flag}={}", self.rewrite_path(value))
            }
            _ => self.rewrite_path(arg),
        }
    }
}

/// `value` with each `localhost:<port>` (or `127.0.0.1:<port>`) whose port is one of the
/// pod's declared container ports pointed at that port's local stand-in.
fn rewrite_localhost_ports(value: &str, ports: &HashMap<i32, u16>) -> String {
    let mut out = value.to_owned();
    for (declared, local) in ports {
        for host in ["localhost", "127.0.0.1"] {
            let from = format!("{host}:{declared}");
            let mut rest = out.as_str();
            let mut rewritten = String::new();
            while let Some(at) = rest.find(&from) {
                let after = &rest[at + from.len()..];
                rewritten.push_str(&rest[..at]);
                // `localhost:90` must not match `localhost:9000`.
                if after.starts_with(|c: char| c.is_ascii_digit()) {
                    rewritten.push_str(&from);
                } else {
                    rewritten.push_str(&format!("{POD_IP}:{local}"));
                }
                rest = after;
            }
            rewritten.push_str(rest);
            out = rewritten;
        }
    }
    out
}

/// Replaces the value of `--listen=X` or `--listen X` by `addr`.
fn rewrite_listen(args: Vec<String>, addr: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--listen" {
            args.next();
            out.push(arg);
            out.push(addr.to_owned());
        } else if arg.starts_with("--listen=") {
            out.push(format!("--listen={addr}"));
        } else {
            out.push(arg);
        }
    }
    out
}

/// A process to start for a container.
#[derive(Debug)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
}

impl Launch {
    fn spawn(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))
    }
}

/// What a container is to its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A regular init container: runs to completion before anything after it starts.
    Init,
    /// An init container with `restartPolicy: Always`: started before what follows it,
    /// runs next to the main containers, stopped after them.
    Sidecar,
    /// A container of `spec.containers`.
    Main,
}

impl Role {
    fn of_init(spec: &Container) -> Self {
        if spec.restart_policy.as_deref() == Some("Always") {
            Role::Sidecar
        } else {
            Role::Init
        }
    }
}

/// One container of a pod and its process.
struct ContainerRun {
    spec: Container,
    role: Role,
    /// Arguments before the container's own (see [`KubeletOptions::command`]).
    leading_args: Vec<String>,
    /// `None`: unknown image, not started, reported as running and ready.
    binary: Option<PathBuf>,
    ports: Ports,
    child: Option<Child>,
    pid: Option<u32>,
    started_at: Option<Timestamp>,
    running_since: Option<Instant>,
    /// The last restart delay (zero before the first restart).
    backoff: Duration,
    restarts: i32,
    last_exit: Option<Exit>,
    /// When to start again after an exit; `None` with `last_exit`: never (restartPolicy).
    restart_at: Option<Instant>,
    waiting: Waiting,
    ready: bool,
}

impl ContainerRun {
    fn new(spec: Container, role: Role, binary: Option<PathBuf>, ports: Ports) -> Self {
        Self {
            spec,
            role,
            leading_args: Vec::new(),
            binary,
            ports,
            child: None,
            pid: None,
            started_at: None,
            restarts: 0,
            last_exit: None,
            running_since: None,
            backoff: Duration::ZERO,
            restart_at: None,
            waiting: Waiting::new("ContainerCreating", ""),
            ready: false,
        }
    }

    /// Whether a start is due now (first start, or the restart delay has passed).
    fn start_due(&self) -> bool {
        if self.binary.is_none() || self.child.is_some() {
            return false;
        }
        match (&self.last_exit, self.restart_at) {
            (None, _) => true,
            (Some(_), Some(at)) => Instant::now() >= at,
            (Some(_), None) => false,
        }
    }

    /// The delay before the next restart: [`RESTART_DELAY`], doubled for each crash soon
    /// after a start.
    fn next_backoff(&mut self) -> Duration {
        let ran = self.running_since.map_or(Duration::ZERO, |t| t.elapsed());
        self.backoff = if self.backoff.is_zero() || ran >= BACKOFF_RESET {
            RESTART_DELAY
        } else {
            (self.backoff * 2).min(MAX_RESTART_DELAY)
        };
        self.backoff
    }

    /// Collects the process's exit status if it ended.
    fn reap(&mut self) -> Option<Exit> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        let exit = Exit::new(status, self.started_at.unwrap_or_else(Timestamp::now));
        self.child = None;
        self.pid = None;
        self.ready = false;
        self.last_exit = Some(exit.clone());
        Some(exit)
    }

    fn image(&self) -> String {
        self.spec.image.clone().unwrap_or_default()
    }

    /// Whether what follows this init container may start: a regular one exited with code
    /// 0, a sidecar runs. An unknown image counts as done.
    fn lets_the_next_start(&self) -> bool {
        if self.binary.is_none() {
            return true;
        }
        match self.role {
            Role::Init => {
                self.child.is_none() && self.last_exit.as_ref().is_some_and(|e| e.code == 0)
            }
            Role::Sidecar => self.child.is_some(),
            Role::Main => true,
        }
    }

    /// The `containerStatuses` entry.
    fn status(&self, pod_started: Timestamp) -> Value {
        let running = self.binary.is_none() || self.child.is_some();
        let state = match (&self.binary, self.started_at, &self.last_exit) {
            (None, _, _) => json!({"running": {"startedAt": Time(pod_started)}}),
            (Some(_), Some(at), _) if self.child.is_some() => {
                json!({"running": {"startedAt": Time(at)}})
            }
            (Some(_), _, Some(exit)) if self.restart_at.is_none() => exit.to_json(),
            _ => json!({"waiting": {
                "reason": self.waiting.reason,
                "message": self.waiting.message,
            }}),
        };
        // The previous exit, unless `state` shows it as the final one.
        let last_state = match &self.last_exit {
            Some(exit) if running || self.restart_at.is_some() => exit.to_json(),
            _ => json!({}),
        };
        let image_id = self
            .binary
            .as_ref()
            .map(|b| format!("local://{}", b.display()));
        let mut status = json!({
            "name": self.spec.name,
            "image": self.image(),
            "imageID": image_id.unwrap_or_default(),
            "ready": self.ready,
            "started": running,
            "restartCount": self.restarts,
            "state": state,
            "lastState": last_state,
        });
        if let Some(pid) = self.pid {
            status["containerID"] = json!(format!("kcg-e2e://{pid}"));
        }
        status
    }
}

/// Runs one pod until it is deleted, vanishes, or the stand-in shuts down.
struct PodRunner {
    shared: Arc<Shared>,
    key: PodKey,
    uid: String,
    pod: Arc<Pod>,
    dir: PathBuf,
    /// Volume name → local directory, once every volume is prepared.
    volumes: Option<BTreeMap<String, PathBuf>>,
    volume_error: Option<String>,
    containers: Vec<ContainerRun>,
    /// Every init container completed (or, a sidecar, started): the main ones may run.
    initialized: bool,
    started: Timestamp,
    /// Condition type → (status, lastTransitionTime).
    conditions: BTreeMap<&'static str, (bool, Timestamp)>,
    /// The last status patch that went through.
    published: Option<Value>,
}

impl PodRunner {
    fn new(shared: Arc<Shared>, key: PodKey, pod: Arc<Pod>) -> Self {
        let dir = shared.pod_dir(&key.0, &key.1);
        Self {
            uid: pod.uid().unwrap_or_default(),
            shared,
            key,
            pod,
            dir,
            volumes: None,
            volume_error: None,
            containers: Vec::new(),
            initialized: false,
            started: Timestamp::now(),
            conditions: BTreeMap::new(),
            published: None,
        }
    }

    /// The pod's containers with their roles: init containers first, in order.
    fn spec_containers(&self) -> Vec<(Container, Role)> {
        let Some(spec) = self.pod.spec.as_ref() else {
            return Vec::new();
        };
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.clone(), Role::of_init(c)));
        let main = spec.containers.iter().map(|c| (c.clone(), Role::Main));
        init.chain(main).collect()
    }

    /// The task's loop: follow the latest desired state, sync every second.
    async fn run(mut self, mut rx: watch::Receiver<Desired>) {
        if let Err(e) = self.setup() {
            eprintln!("[kubelet] {}: cannot set up the pod: {e:#}", id(&self.key));
        }
        loop {
            let desired = rx.borrow_and_update().clone();
            match desired {
                Desired::Shutdown => {
                    self.stop(SHUTDOWN_GRACE, &mut rx).await;
                    break;
                }
                Desired::Gone => {
                    println!(
                        "[kubelet] {} vanished from the API: killing it",
                        id(&self.key)
                    );
                    self.kill_all().await;
                    break;
                }
                Desired::Run(pod) => {
                    self.pod = pod;
                    if self.pod.metadata.deletion_timestamp.is_some() {
                        self.terminate(&mut rx).await;
                        break;
                    }
                    self.sync().await;
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    self.kill_all().await;
                    break;
                },
                () = tokio::time::sleep(SYNC_EVERY) => {}
            }
        }
        self.shared.forget(&self.key, &self.uid);
    }

    /// The pod directory, container list and ports.
    fn setup(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        for (spec, role) in self.spec_containers() {
            let image = spec.image.clone().unwrap_or_default();
            let binary = self.shared.opts.binary_for(&image);
            let leading_args = self.shared.opts.leading_args_for(&image);
            if binary.is_none() {
                println!(
                    "[kubelet] {}/{}: no binary for image {image:?}: not started, reported running",
                    id(&self.key),
                    spec.name
                );
            }
            let ports = Ports::allocate(&spec)?;
            let mut run = ContainerRun::new(spec, role, binary, ports);
            run.leading_args = leading_args;
            self.containers.push(run);
        }
        Ok(())
    }

    /// One round: volumes, process exits and (re)starts, probes, status.
    async fn sync(&mut self) {
        if self.volumes.is_none() {
            match self.prepare_volumes().await {
                Ok(volumes) => {
                    self.volumes = Some(volumes);
                    self.volume_error = None;
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    for c in &mut self.containers {
                        c.waiting = Waiting::new("ContainerCreating", error.clone());
                    }
                    self.volume_error = Some(error);
                }
            }
        }
        if self.volumes.is_some() {
            // Init containers in order, each a gate for what follows; then the main ones.
            let mut gate_open = true;
            for i in 0..self.containers.len() {
                if !gate_open {
                    break;
                }
                self.step_container(i).await;
                if self.containers[i].role != Role::Main {
                    gate_open = self.containers[i].lets_the_next_start();
                }
            }
            self.initialized = self
                .containers
                .iter()
                .filter(|c| c.role != Role::Main)
                .all(ContainerRun::lets_the_next_start);
        }
        self.probe_all().await;
        self.publish_status().await;
    }

    /// Notices an exit of container `i`, starts it when due.
    async fn step_container(&mut self, i: usize) {
        let restart_policy = self.restart_policy();
        let name = format!("{}/{}", id(&self.key), self.containers[i].spec.name);
        if let Some(exit) = self.containers[i].reap() {
            self.shared
                .set_pid(&self.key, &self.uid, &self.containers[i].spec.name, None);
            let restart = match (self.containers[i].role, restart_policy.as_str()) {
                (Role::Sidecar, _) => true,
                (_, "Never") => false,
                (Role::Init, _) | (_, "OnFailure") => exit.code != 0,
                (Role::Main, _) => true,
            };
            let c = &mut self.containers[i];
            let delay = c.next_backoff();
            c.restart_at = restart.then(|| Instant::now() + delay);
            c.waiting = Waiting::new(
                "CrashLoopBackOff",
                format!("back-off {delay:?} restarting failed container"),
            );
            println!(
                "[kubelet] {name} exited with code {}{}",
                exit.code,
                if restart { "; restarting" } else { "" }
            );
        }
        if !self.containers[i].start_due() {
            return;
        }
        let started = match self.launch(&self.containers[i]).await {
            Ok(launch) => launch
                .spawn()
                .map(|child| (child, launch))
                .map_err(|e| Waiting::new("RunContainerError", format!("{e:#}"))),
            Err(waiting) => Err(waiting),
        };
        let c = &mut self.containers[i];
        match started {
            Ok((child, launch)) => {
                let pid = child.id().unwrap_or_default();
                if c.last_exit.is_some() {
                    c.restarts += 1;
                }
                c.child = Some(child);
                c.pid = Some(pid);
                c.started_at = Some(Timestamp::now());
                c.running_since = Some(Instant::now());
                c.ready = false;
                self.shared
                    .set_pid(&self.key, &self.uid, &c.spec.name, Some(pid));
                println!(
                    "[kubelet] started {name} (pid {pid}, restarts {}): {} {}",
                    c.restarts,
                    launch.program.display(),
                    launch.args.join(" ")
                );
            }
            Err(waiting) => {
                if c.waiting != waiting {
                    eprintln!("[kubelet] {name}: {}: {}", waiting.reason, waiting.message);
                }
                c.waiting = waiting;
            }
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned())
    }

    /// Everything needed to start container `c`; a waiting state when something is missing.
    async fn launch(&self, c: &ContainerRun) -> Result<Launch, Waiting> {
        let binary = c
            .binary
            .clone()
            .expect("launch is only called with a binary");
        let mounts = self.mounts(&c.spec);
        let mut env = self.node_env();
        let container_env = container_env(&self.shared.client, &self.pod, &c.spec, self.node())
            .await
            .map_err(|e| Waiting::new("CreateContainerConfigError", format!("{e:#}")))?;
        env.extend(
            container_env
                .into_iter()
                .map(|(k, v)| (k, mounts.rewrite_path(&v))),
        );
        // The pod's containers share one network namespace: `localhost:<containerPort>` in
        // an env value is that container's local port.
        let pod_ports: HashMap<i32, u16> = self
            .containers
            .iter()
            .flat_map(|c| c.ports.by_number.iter().map(|(k, v)| (*k, *v)))
            .collect();
        for (_, value) in &mut env {
            *value = rewrite_localhost_ports(value, &pod_ports);
        }
        let mut args: Vec<String> = c
            .leading_args
            .iter()
            .cloned()
            .chain(
                c.spec
                    .command
                    .iter()
                    .flatten()
                    .skip(1)
                    .chain(c.spec.args.iter().flatten())
                    .map(|a| mounts.rewrite_arg(a)),
            )
            .collect();
        if let Some(port) = c.ports.first {
            let addr = format!("{POD_IP}:{port}");
            args = rewrite_listen(args, &addr);
            env.push(("KCG_LISTEN".to_owned(), addr));
        }
        if self.automount_token() {
            let kubeconfig = self
                .write_kubeconfig()
                .await
                .map_err(|e| Waiting::new("ContainerCreating", format!("{e:#}")))?;
            env.push(("KUBECONFIG".to_owned(), kubeconfig.display().to_string()));
        }
        Ok(Launch {
            program: binary,
            args,
            env,
            cwd: self.dir.clone(),
            log: self.dir.join(format!("{}.log", c.spec.name)),
        })
    }

    fn node(&self) -> &str {
        &self.shared.opts.node_name
    }

    /// PATH and HOME of the test process, then the configured node environment.
    fn node_env(&self) -> Vec<(String, String)> {
        ["PATH", "HOME"]
            .into_iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_owned(), v)))
            .chain(self.shared.opts.env.iter().cloned())
            .collect()
    }

    fn mounts(&self, spec: &Container) -> Mounts {
        let volumes = self.volumes.as_ref();
        let mounts = spec
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let dir = volumes?.get(&m.name)?;
                let local = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => dir.join(sub),
                    _ => dir.clone(),
                };
                Some((m.mount_path.clone(), local))
            })
            .collect();
        Mounts::new(mounts)
    }

    fn automount_token(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            != Some(false)
    }

    /// Writes every volume into `<pod dir>/volumes/<name>`.
    async fn prepare_volumes(&self) -> Result<BTreeMap<String, PathBuf>> {
        let mut out = BTreeMap::new();
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for volume in volumes {
            let dir = self.dir.join("volumes").join(&volume.name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("clearing {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            self.fill_volume(&volume, &dir).await.with_context(|| {
                format!("MountVolume.SetUp failed for volume {:?}", volume.name)
            })?;
            out.insert(volume.name, dir);
        }
        Ok(out)
    }

    async fn fill_volume(&self, volume: &Volume, dir: &Path) -> Result<()> {
        let client = &self.shared.client;
        let ns = &self.key.0;
        if let Some(cm) = &volume.config_map {
            let source = KeySource::ConfigMap(cm.name.clone());
            return source
                .write_files(client, ns, cm.items.as_deref(), cm.optional, dir)
                .await;
        }
        if let Some(secret) = &volume.secret {
            let source = KeySource::Secret(secret.secret_name.clone().unwrap_or_default());
            return source
                .write_files(client, ns, secret.items.as_deref(), secret.optional, dir)
                .await;
        }
        if let Some(projected) = &volume.projected {
            for part in projected.sources.iter().flatten() {
                if let Some(cm) = &part.config_map {
                    KeySource::ConfigMap(cm.name.clone())
                        .write_files(client, ns, cm.items.as_deref(), cm.optional, dir)
                        .await?;
                }
                if let Some(secret) = &part.secret {
                    KeySource::Secret(secret.name.clone())
                        .write_files(client, ns, secret.items.as_deref(), secret.optional, dir)
                        .await?;
                }
                // serviceAccountToken: the process gets KUBECONFIG instead.
            }
            return Ok(());
        }
        if volume.empty_dir.is_none() {
            println!(
                "[kubelet] {}: volume {:?} of an unsupported kind: an empty directory",
                id(&self.key),
                volume.name
            );
        }
        Ok(())
    }

    /// Requests a token for the pod's ServiceAccount, bound to the pod, and writes
    /// `<pod dir>/kubeconfig` with it.
    async fn write_kubeconfig(&self) -> Result<PathBuf> {
        let (ns, pod) = &self.key;
        let sa = service_account(&self.pod);
        let request = TokenRequest {
            // No audiences: the API server's own.
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod.clone()),
                    uid: Some(self.uid.clone()),
                }),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let token = Api::<ServiceAccount>::namespaced(self.shared.client.clone(), ns)
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {ns}/{sa}"))?
            .status
            .context("the TokenRequest has no status")?
            .token;
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {
                "server": self.shared.opts.api_server,
                "certificate-authority-data": ByteString(self.shared.opts.ca_pem.clone()),
            }}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{
                "name": "pod",
                "context": {"cluster": "e2e", "user": sa, "namespace": ns},
            }],
            "current-context": "pod",
        });
        let path = self.dir.join("kubeconfig");
        write_private(&path, &serde_json::to_vec_pretty(&kubeconfig)?)?;
        Ok(path)
    }

    /// Runs the readiness probe of every running container.
    async fn probe_all(&mut self) {
        let checks = self.containers.iter().map(|c| async move {
            match (&c.binary, &c.child) {
                (None, _) => true,
                (Some(_), Some(_)) => probe(c.spec.readiness_probe.as_ref(), &c.ports).await,
                (Some(_), None) => false,
            }
        });
        let results = futures::future::join_all(checks).await;
        for (c, ready) in self.containers.iter_mut().zip(results) {
            c.ready = ready;
        }
    }

    /// The pod status as a merge patch; its timestamps only change with the state.
    fn status_patch(&mut self) -> Value {
        let started = self.started;
        let of = |role: fn(Role) -> bool| {
            self.containers
                .iter()
                .filter(move |c| role(c.role))
                .collect::<Vec<_>>()
        };
        let main = of(|r| r == Role::Main);
        let containers: Vec<Value> = main.iter().map(|c| c.status(started)).collect();
        let init_statuses: Vec<Value> = of(|r| r != Role::Main)
            .iter()
            .map(|c| c.status(started))
            .collect();
        // Ready needs the main containers and the sidecars ready, as the kubelet has it.
        let all_ready = self.initialized
            && self
                .containers
                .iter()
                .filter(|c| c.role != Role::Init)
                .all(|c| c.ready);
        let any_running = self
            .containers
            .iter()
            .any(|c| c.binary.is_none() || c.child.is_some());
        let all_done = main
            .iter()
            .all(|c| c.child.is_none() && c.last_exit.is_some() && c.restart_at.is_none());
        let phase = if all_done && !main.is_empty() {
            let ok = main
                .iter()
                .all(|c| c.last_exit.as_ref().is_some_and(|e| e.code == 0));
            if ok { "Succeeded" } else { "Failed" }
        } else if any_running || self.containers.iter().any(|c| c.last_exit.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let volumes_ready = self.volumes.is_some();
        let mut conditions = vec![
            self.condition("PodScheduled", true, None),
            self.condition(
                "PodReadyToStartContainers",
                volumes_ready,
                self.volume_error.clone(),
            ),
            self.condition("Initialized", self.initialized, None),
            self.condition("ContainersReady", all_ready, None),
            self.condition("Ready", all_ready, None),
        ];
        // Keep conditions others own (e.g. DisruptionTarget): a merge patch replaces lists.
        let ours: HashSet<&str> = self.conditions.keys().copied().collect();
        for other in self
            .pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
        {
            if !ours.contains(other.type_.as_str()) {
                conditions.push(serde_json::to_value(other).unwrap_or_default());
            }
        }
        json!({"status": {
            "phase": phase,
            "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": Time(started),
            "conditions": conditions,
            "containerStatuses": containers,
            "initContainerStatuses": init_statuses,
        }})
    }

    /// A pod condition; its transition time is kept until its status changes.
    fn condition(&mut self, type_: &'static str, status: bool, message: Option<String>) -> Value {
        let entry = self
            .conditions
            .entry(type_)
            .or_insert((status, Timestamp::now()));
        if entry.0 != status {
            *entry = (status, Timestamp::now());
            if type_ == "Ready" {
                let word = if status { "ready" } else { "not ready" };
                println!("[kubelet] {} is {word}", id(&self.key));
            }
        }
        let mut condition = json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": Time(entry.1),
        });
        if let Some(message) = message {
            condition["reason"] = json!("VolumeSetupFailed");
            condition["message"] = json!(message);
        }
        condition
    }

    /// Patches `pods/status` when it changed; a failure is logged and retried next round.
    async fn publish_status(&mut self) {
        let patch = self.status_patch();
        if self.published.as_ref() == Some(&patch) && !self.api_disagrees(&patch) {
            return;
        }
        let pods: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.key.0);
        match pods
            .patch_status(&self.key.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.published = Some(patch),
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => eprintln!(
                "[kubelet] {}: status patch failed (will retry): {e}",
                id(&self.key)
            ),
        }
    }

    /// Whether the pod in the API shows another phase or condition status than `patch`, e.g.
    /// after the node-lifecycle controller marked it not ready: then it is patched again.
    fn api_disagrees(&self, patch: &Value) -> bool {
        let Some(status) = self.pod.status.as_ref() else {
            return true;
        };
        let mut ours = patch["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten();
        let theirs = status.conditions.iter().flatten();
        let condition_differs = ours.any(|c| {
            !theirs
                .clone()
                .any(|t| c["type"] == t.type_.as_str() && c["status"] == t.status.as_str())
        });
        condition_differs || patch["status"]["phase"] != status.phase.as_deref().unwrap_or("")
    }

    /// Graceful deletion: SIGTERM, the grace period, SIGKILL, then remove the pod.
    async fn terminate(&mut self, rx: &mut watch::Receiver<Desired>) {
        let grace = grace_period(&self.pod);
        println!(
            "[kubelet] deleting {}: SIGTERM, grace period {}s",
            id(&self.key),
            grace.as_secs()
        );
        let vanished = self.stop(grace, rx).await;
        if !vanished {
            self.remove_pod().await;
        }
    }

    /// SIGTERM to every process, SIGKILL to what is left after `grace` (at once if the pod
    /// vanishes or the stand-in shuts down meanwhile). Returns whether the pod vanished.
    /// Native sidecars get their SIGTERM only once the other containers exited (in reverse
    /// order, within the same grace period), so they serve the main containers' shutdown.
    async fn stop(&mut self, grace: Duration, rx: &mut watch::Receiver<Desired>) -> bool {
        let start = Instant::now();
        let mut hurry = None;
        let first = |c: &ContainerRun| c.role != Role::Sidecar;
        self.signal(first, Signal::Term);
        while self.reap_all(first) > 0 && start.elapsed() < grace && hurry.is_none() {
            hurry = Self::hurry(rx).await;
        }
        if hurry.is_none() {
            let sidecars: Vec<u32> = self
                .containers
                .iter()
                .rev()
                .filter(|c| c.role == Role::Sidecar)
                .filter_map(|c| c.pid)
                .collect();
            if !sidecars.is_empty() {
                println!(
                    "[kubelet] {}: main containers stopped after {:.1}s: SIGTERM to the sidecars",
                    id(&self.key),
                    start.elapsed().as_secs_f64()
                );
            }
            for pid in sidecars {
                let _ = signal_group(pid, Signal::Term);
            }
        }
        while self.reap_all(|_| true) > 0 && start.elapsed() < grace && hurry.is_none() {
            hurry = Self::hurry(rx).await;
        }
        let vanished = hurry.unwrap_or(false);
        if self.reap_all(|_| true) > 0 {
            println!(
                "[kubelet] {}: still running after {:.1}s: SIGKILL",
                id(&self.key),
                start.elapsed().as_secs_f64()
            );
            self.kill_all().await;
        } else {
            println!(
                "[kubelet] {}: stopped after {:.1}s",
                id(&self.key),
                start.elapsed().as_secs_f64()
            );
        }
        vanished
    }

    /// Waits up to 100 ms for a change of the desired state; `Some(vanished)` when the
    /// pod must go at once (it vanished, or the stand-in shuts down).
    async fn hurry(rx: &mut watch::Receiver<Desired>) -> Option<bool> {
        tokio::select! {
            changed = rx.changed() => {
                let hurry = changed.is_err()
                    || matches!(*rx.borrow(), Desired::Gone | Desired::Shutdown);
                hurry.then(|| !matches!(*rx.borrow(), Desired::Shutdown))
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => None,
        }
    }

    /// Collects exits; returns how many processes of the containers `which` selects still
    /// run.
    fn reap_all(&mut self, which: impl Fn(&ContainerRun) -> bool) -> usize {
        for c in &mut self.containers {
            if c.reap().is_some() {
                self.shared
                    .set_pid(&self.key, &self.uid, &c.spec.name, None);
            }
        }
        self.containers
            .iter()
            .filter(|c| which(c) && c.child.is_some())
            .count()
    }

    fn signal(&self, which: impl Fn(&ContainerRun) -> bool, signal: Signal) {
        for pid in self
            .containers
            .iter()
            .filter(|c| which(c))
            .filter_map(|c| c.pid)
        {
            let _ = signal_group(pid, signal);
        }
    }

    fn signal_all(&self, signal: Signal) {
        self.signal(|_| true, signal);
    }

    /// SIGKILLs every process group and waits for the processes.
    async fn kill_all(&mut self) {
        self.signal_all(Signal::Kill);
        for c in &mut self.containers {
            if let Some(mut child) = c.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.shared
                    .set_pid(&self.key, &self.uid, &c.spec.name, None);
            }
            c.pid = None;
        }
    }

    /// Deletes the pod with grace 0 (the kubelet's last word), only if it is still this pod.
    async fn remove_pod(&self) {
        let pods: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.key.0);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&self.key.1, &params).await {
            Ok(_) => println!("[kubelet] removed {}", id(&self.key)),
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
            Err(e) => eprintln!("[kubelet] removing {} failed: {e}", id(&self.key)),
        }
    }
}

/// The pod's grace period: the deletion's, else the spec's, else 30 s.
fn grace_period(pod: &Pod) -> Duration {
    let seconds = pod.metadata.deletion_grace_period_seconds.or_else(|| {
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
    });
    seconds.map_or(DEFAULT_GRACE, |s| Duration::from_secs(s.max(0) as u64))
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Writes a file only the owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Env, ConfigMaps and Secrets.
// ---------------------------------------------------------------------------------------

/// A ConfigMap or a Secret, by name, as a source of keys.
enum KeySource {
    ConfigMap(String),
    Secret(String),
}

impl KeySource {
    fn describe(&self) -> String {
        match self {
            KeySource::ConfigMap(name) => format!("configmap {name:?}"),
            KeySource::Secret(name) => format!("secret {name:?}"),
        }
    }

    /// Its keys and values, `None` if it does not exist.
    async fn data(&self, client: &Client, ns: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
        let data = match self {
            KeySource::ConfigMap(name) => {
                let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
                    .get_opt(name)
                    .await
                    .with_context(|| format!("reading {}", self.describe()))?;
                cm.map(|cm| {
                    let text = cm.data.unwrap_or_default().into_iter();
                    let binary = cm.binary_data.unwrap_or_default().into_iter();
                    text.map(|(k, v)| (k, v.into_bytes()))
                        .chain(binary.map(|(k, v)| (k, v.0)))
                        .collect()
                })
            }
            KeySource::Secret(name) => Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await
                .with_context(|| format!("reading {}", self.describe()))?
                .map(|s| {
                    let data = s.data.unwrap_or_default().into_iter();
                    data.map(|(k, v)| (k, v.0)).collect()
                }),
        };
        Ok(data)
    }

    /// Its data, or an error (empty data if `optional`) when it does not exist.
    async fn require(
        &self,
        client: &Client,
        ns: &str,
        optional: Option<bool>,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        match self.data(client, ns).await? {
            Some(data) => Ok(data),
            None if optional == Some(true) => Ok(BTreeMap::new()),
            None => bail!("{} not found", self.describe()),
        }
    }

    /// One key as a string; `None` if missing and `optional`.
    async fn key(
        &self,
        client: &Client,
        ns: &str,
        key: &str,
        optional: Option<bool>,
    ) -> Result<Option<String>> {
        let data = self.require(client, ns, optional).await?;
        match data.get(key) {
            Some(value) => Ok(Some(String::from_utf8_lossy(value).into_owned())),
            None if optional == Some(true) => Ok(None),
            None => bail!("couldn't find key {key} in {}", self.describe()),
        }
    }

    /// Writes its keys (or only `items`) as files into `dir`.
    async fn write_files(
        &self,
        client: &Client,
        ns: &str,
        items: Option<&[KeyToPath]>,
        optional: Option<bool>,
        dir: &Path,
    ) -> Result<()> {
        let data = self.require(client, ns, optional).await?;
        let files: Vec<(&str, &[u8])> = match items {
            None => data
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            Some(items) => items
                .iter()
                .map(|item| match data.get(&item.key) {
                    Some(v) => Ok((item.path.as_str(), v.as_slice())),
                    None if optional == Some(true) => Ok((item.path.as_str(), &[][..])),
                    None => bail!("{} has no key {}", self.describe(), item.key),
                })
                .collect::<Result<_>>()?,
        };
        for (path, bytes) in files {
            let file = dir.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(())
    }
}

/// The container's `envFrom` then `env`, resolved like the kubelet does (no `$(VAR)`).
async fn container_env(
    client: &Client,
    pod: &Pod,
    spec: &Container,
    node: &str,
) -> Result<Vec<(String, String)>> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for from in spec.env_from.iter().flatten() {
        let (source, optional) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(cm), _) => (KeySource::ConfigMap(cm.name.clone()), cm.optional),
            (None, Some(s)) => (KeySource::Secret(s.name.clone()), s.optional),
            (None, None) => continue,
        };
        let prefix = from.prefix.clone().unwrap_or_default();
        for (k, v) in source.require(client, &ns, optional).await? {
            out.push((
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
    }
    for var in spec.env.iter().flatten() {
        let value = match &var.value_from {
            Some(from) => match env_source(client, pod, &ns, from, node).await? {
                Some(v) => v,
                None => continue,
            },
            None => var.value.clone().unwrap_or_default(),
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// A `valueFrom`; `None` for an optional reference that is missing.
async fn env_source(
    client: &Client,
    pod: &Pod,
    ns: &str,
    from: &EnvVarSource,
    node: &str,
) -> Result<Option<String>> {
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path, node).map(Some);
    }
    if let Some(r) = &from.config_map_key_ref {
        return KeySource::ConfigMap(r.name.clone())
            .key(client, ns, &r.key, r.optional)
            .await;
    }
    if let Some(r) = &from.secret_key_ref {
        return KeySource::Secret(r.name.clone())
            .key(client, ns, &r.key, r.optional)
            .await;
    }
    bail!("unsupported valueFrom (only fieldRef, configMapKeyRef, secretKeyRef): {from:?}")
}

/// A downward-API `fieldRef` value.
fn field_value(pod: &Pod, path: &str, node: &str) -> Result<String> {
    let meta = &pod.metadata;
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => node.to_owned(),
        "spec.serviceAccountName" => service_account(pod),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => POD_IP.to_owned(),
        _ => {
            let map = |field: &str| -> Option<&str> {
                path.strip_prefix(field)?
                    .strip_prefix("['")?
                    .strip_suffix("']")
            };
            if let Some(label) = map("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(label))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(annotation) = map("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation))
                    .cloned()
                    .unwrap_or_default()
            } else {
                bail!("unsupported fieldRef {path:?}")
            }
        }
    };
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// Probes.
// ---------------------------------------------------------------------------------------

/// A readiness probe against 127.0.0.1: httpGet (2xx or 3xx passes, like the kubelet) or
/// tcpSocket; no probe, or an exec/grpc probe, counts as ready.
async fn probe(probe: Option<&Probe>, ports: &Ports) -> bool {
    let Some(probe) = probe else { return true };
    if let Some(http) = &probe.http_get {
        let path = http.path.as_deref().unwrap_or("/");
        return match ports.resolve(&http.port) {
            Some(port) => http_get_ok(port, path).await,
            None => false,
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = ports.resolve(&tcp.port) else {
            return false;
        };
        let connect = TcpStream::connect((POD_IP, port));
        return matches!(
            tokio::time::timeout(PROBE_TIMEOUT, connect).await,
            Ok(Ok(_))
        );
    }
    true
}

/// `GET path` on 127.0.0.1:`port`; true for a 2xx or 3xx status within the timeout.
async fn http_get_ok(port: u16, path: &str) -> bool {
    let get = async {
        let mut stream = TcpStream::connect((POD_IP, port)).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {POD_IP}:{port}\r\n\
             User-Agent: kube-probe/1.36\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(head)
    };
    let Ok(Ok(head)) = tokio::time::timeout(PROBE_TIMEOUT, get).await else {
        return false;
    };
    // "HTTP/1.1 200 OK"
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok());
    status.is_some_and(|code| (200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_ports_of_the_pod_are_rewritten() {
        let ports = HashMap::from([(9000, 41234u16), (80, 41000u16)]);
        let cases = [
            (
                "http://localhost:9000/records",
                "http://127.0.0.1:41234/records",
            ),
            ("http://127.0.0.1:9000", "http://127.0.0.1:41234"),
            (
                "localhost:80,localhost:9000",
                "127.0.0.1:41000,127.0.0.1:41234",
            ),
            ("http://localhost:8000/", "http://localhost:8000/"),
            ("http://localhost:9000", "http://127.0.0.1:41234"),
            ("localhost:800", "localhost:800"),
            ("plain", "plain"),
        ];
        for (value, want) in cases {
            assert_eq!(rewrite_localhost_ports(value, &ports), want, "{value}");
        }
    }

    #[test]
    fn init_container_roles() {
        let c = |policy: Option<&str>| Container {
            name: "c".into(),
            restart_policy: policy.map(str::to_owned),
            ..Container::default()
        };
        assert_eq!(Role::of_init(&c(None)), Role::Init);
        assert_eq!(Role::of_init(&c(Some("Always"))), Role::Sidecar);
        assert_eq!(Role::of_init(&c(Some("OnFailure"))), Role::Init);
    }
}
