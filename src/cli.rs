//! The `kcg-operator` command line: `run` (the controller), `crd` (print the CRD) and
//! `status` (the status the controller would publish, built from the state-store table by
//! the same code, without a cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use kcg_worker::membership::{ClientWatch, observe_clients};
use kcg_worker::store::StateStore;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use crate::conditions;
use crate::controller::{self, DynamoClients, RunOptions};
use crate::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus};
use crate::metrics::Metrics;
use crate::resources::{self, OperatorSettings};
use crate::server::{self, ServerState};
use crate::status::{self, DeploymentState, Problem, StatusInput};
use crate::telemetry::{self, LogFormat};

/// Default worker image: the worker released with this operator version.
pub const DEFAULT_WORKER_IMAGE: &str =
    concat!("ghcr.io/kcg-dev/kcg-worker:", env!("CARGO_PKG_VERSION"));

/// kcg-operator: runs Kinesis consumer groups on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "kcg-operator", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "KCG_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (with leader election) and the /metrics, /healthz, /readyz server.
    Run(RunArgs),
    /// Print the KinesisConsumerGroup CRD as YAML.
    Crd(CrdArgs),
    /// Print a group's status, built from its state-store table as the controller would.
    Status(StatusArgs),
    /// Render the worker config (the ConfigMap's `config.yaml`) of a KinesisConsumerGroup
    /// file with the operator's own code, for running `kcg-worker` without a cluster.
    Render(RenderArgs),
    /// Show a group's checkpoints, or reset them for reprocessing (state-store table only).
    #[command(subcommand)]
    Checkpoints(crate::checkpoints::Command),
}

/// Arguments of `crd`.
#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Print the Markdown field reference (generated from the CRD schema) instead of YAML.
    #[arg(long)]
    pub reference: bool,
    /// With --reference: rewrite the reference block of this README in place.
    #[arg(long, requires = "reference", value_name = "README")]
    pub update_readme: Option<PathBuf>,
}

/// `crd`: the CRD as YAML, or its field reference as Markdown.
fn crd_cmd(args: &CrdArgs) -> anyhow::Result<()> {
    if !args.reference {
        return crate::crd::crd_yaml()
            .context("rendering the CRD")
            .and_then(|y| out(&y));
    }
    let Some(path) = &args.update_readme else {
        return out(&crate::reference::markdown());
    };
    let readme =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let fresh = crate::reference::splice_into(&readme).with_context(|| {
        format!(
            "{} lacks the line {}",
            path.display(),
            crate::reference::BEGIN_MARKER
        )
    })?;
    std::fs::write(path, fresh).with_context(|| format!("writing {}", path.display()))
}

/// One value `render --field` prints instead of the whole config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Field {
    /// The group id (`namespace/name`), the state-store partition key.
    Group,
    /// The state-store table.
    Table,
    /// The first stream's name.
    Stream,
    /// The config hash the Deployment's pod template carries.
    Hash,
}

/// Arguments of `render`.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// A KinesisConsumerGroup YAML file.
    #[arg(long)]
    pub spec: PathBuf,
    /// Namespace of the group (default: the file's, else `default`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print only this value.
    #[arg(long, value_enum)]
    pub field: Option<Field>,
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address of the metrics and health server.
    #[arg(long, default_value = "0.0.0.0:8080", env = "KCG_LISTEN")]
    pub listen: SocketAddr,
    /// Worker image for groups that do not set spec.worker.image.
    #[arg(long, default_value = DEFAULT_WORKER_IMAGE, env = "KCG_WORKER_IMAGE")]
    pub worker_image: String,
    /// Service account for worker pods that do not set spec.worker.serviceAccountName. With
    /// --create-worker-service-account (the default), the operator creates it in a group's
    /// namespace when it is missing there.
    #[arg(long, env = "KCG_WORKER_SERVICE_ACCOUNT")]
    pub worker_service_account: Option<String>,
    /// Create the worker service account in each namespace with a group that uses it, and
    /// keep the annotations of the ones the operator made in sync with
    /// --worker-service-account-annotations. false: the operator never creates or changes
    /// it (you provide it). The chart passes its workerServiceAccount.create.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "KCG_CREATE_WORKER_SERVICE_ACCOUNT")]
    pub create_worker_service_account: bool,
    /// Annotations, as a JSON object, of the worker service account the operator creates and
    /// keeps, e.g. '{"eks.amazonaws.com/role-arn":"arn:aws:iam::123456789012:role/kcg-worker"}'.
    /// The chart passes its workerServiceAccount.annotations.
    #[arg(
        long,
        env = "KCG_WORKER_SERVICE_ACCOUNT_ANNOTATIONS",
        value_name = "JSON",
        default_value = "{}",
        value_parser = parse_annotations
    )]
    pub worker_service_account_annotations: BTreeMap<String, String>,
    /// Watch only these namespaces; repeat the flag or separate with commas (default: all
    /// namespaces). The chart passes one flag per `watchNamespaces` entry.
    #[arg(
        long = "namespace",
        env = "KCG_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Elect a leader through a Lease so several replicas are safe; only the leader
    /// reconciles. Disable only for a single local instance.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "KCG_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Check at start (and every 30 s) that the installed KinesisConsumerGroup CRD has every
    /// field this operator uses; when not, log it and report Degraded `CrdOutdated` on every
    /// group. Needs `get` on customresourcedefinitions/kinesisconsumergroups.kcg.dev; the
    /// chart grants it, and passes false for a namespaced install (no cluster-wide rights).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "KCG_CHECK_CRD")]
    pub check_crd: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kcg-operator", env = "KCG_LEASE_NAME")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, default_value = "default", env = "POD_NAMESPACE")]
    pub lease_namespace: String,
}

impl RunArgs {
    /// The operator settings these arguments give.
    pub fn settings(&self) -> OperatorSettings {
        OperatorSettings {
            worker_image: self.worker_image.clone(),
            worker_service_account: self
                .worker_service_account
                .clone()
                .filter(|s| !s.is_empty()),
            worker_service_account_annotations: self.worker_service_account_annotations.clone(),
            create_worker_service_account: self.create_worker_service_account,
        }
    }
}

/// Parses `--worker-service-account-annotations`: a JSON object of strings (empty = none).
fn parse_annotations(text: &str) -> Result<BTreeMap<String, String>, String> {
    if text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(text).map_err(|e| {
        format!(
            "expected a JSON object of string values, e.g. {{\"eks.amazonaws.com/role-arn\":\"arn:aws:iam::123456789012:role/kcg-worker\"}}: {e}"
        )
    })
}

/// Seconds a leader's Lease lasts without renewal.
pub const LEASE_DURATION_SECONDS: u64 = 15;
/// Seconds before expiry the leader renews its Lease.
pub const LEASE_GRACE_SECONDS: u64 = 5;

/// The leader election as `run` sets it up: Lease `lease_name` in `namespace`, held as
/// `identity`.
pub fn lease_manager_builder(
    client: Client,
    lease_name: &str,
    namespace: &str,
    identity: &str,
) -> LeaseManagerBuilder {
    LeaseManagerBuilder::new(client, lease_name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
}

/// Output format of `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// The status object as YAML, exactly as the controller would write it.
    Yaml,
}

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The state-store table (default: the spec's, when --spec is given).
    #[arg(long)]
    pub table: Option<String>,
    /// The group, NAMESPACE/NAME.
    #[arg(long)]
    pub group: String,
    /// AWS region of the table (default: the spec's, else the AWS default chain's).
    #[arg(long)]
    pub region: Option<String>,
    /// A KinesisConsumerGroup YAML (e.g. from examples/): supplies desired replicas,
    /// streams, the table and the client timeout.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Refresh every SECS seconds; liveness is judged across refreshes (a client whose
    /// heartbeat stops moving drops out after the client timeout).
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
}

/// Parses the command line and runs it. Returns the process exit code.
pub async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let text_default = !matches!(cli.command, Command::Run(_));
    let format = if text_default && std::env::var_os("KCG_LOG_FORMAT").is_none() {
        LogFormat::Text
    } else {
        cli.log_format
    };
    telemetry::init(format);
    let is_run = matches!(cli.command, Command::Run(_));
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Crd(args) => crd_cmd(&args),
        Command::Status(args) => status_cmd(args).await,
        Command::Render(args) => render(&args).and_then(|text| out(&text)),
        Command::Checkpoints(c) => crate::checkpoints::run(c).await.and_then(|text| out(&text)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain = chain(&e);
            if is_run {
                error!(error = %chain, "kcg-operator failed");
            } else {
                eprintln!("error: {chain}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error's causes joined with `: `, skipping causes already quoted by their parent
/// (kube and the AWS SDK repeat them).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !text.contains(&c) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&c);
        }
    }
    text
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let server_state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(server::serve(args.listen, server_state));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let opts = RunOptions {
        namespaces: args.namespaces.clone(),
        settings: args.settings(),
        check_crd: args.check_crd,
    };

    let controller = async {
        if !args.leader_election {
            ready.store(true, Ordering::Relaxed);
            return controller::run(client.clone(), opts.clone(), metrics.clone())
                .await
                .context("controller");
        }
        let identity = std::env::var("POD_NAME")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("kcg-operator-{}", std::process::id()));
        let manager = lease_manager_builder(
            client.clone(),
            &args.lease_name,
            &args.lease_namespace,
            &identity,
        )
        .build()
        .await
        .with_context(|| {
            format!(
                "setting up leader election on Lease {}/{}",
                args.lease_namespace, args.lease_name
            )
        })?;
        let (mut leader, _task) = manager.watch().await;
        ready.store(true, Ordering::Relaxed);
        info!(identity, lease = %args.lease_name, "waiting for leadership");
        while_leader(&mut leader, || {
            info!(identity, "leading: starting the controller");
            let (client, opts, metrics) = (client.clone(), opts.clone(), metrics.clone());
            async move {
                controller::run(client, opts, metrics)
                    .await
                    .context("controller")
            }
        })
        .await
    };
    tokio::select! {
        r = controller => r,
        r = server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("http server"),
            Err(e) => Err(e).context("http server task"),
        },
    }
}

/// Runs `work` only while `leader` says this replica leads: waits for leadership, starts
/// `work`, and drops it (stopping the controller) as soon as leadership is lost, then waits
/// again. Returns when `work` returns (shutdown signal) or when the election stops.
pub async fn while_leader<F, Fut>(
    leader: &mut tokio::sync::watch::Receiver<bool>,
    mut work: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        while !*leader.borrow_and_update() {
            leader.changed().await.context("leader election stopped")?;
        }
        let mut lost = leader.clone();
        // Resolves to `true` when the election itself ended (its task died): we can no
        // longer know whether we lead, so we must stop, not keep reconciling.
        let ended = async {
            loop {
                if !*lost.borrow_and_update() {
                    return false;
                }
                if lost.changed().await.is_err() {
                    return true;
                }
            }
        };
        tokio::select! {
            r = work() => return r,
            closed = ended => {
                if closed {
                    bail!("leader election stopped while leading");
                }
                warn!("lost leadership: stopping the controller");
            }
        }
    }
}

/// The output of `render`: the worker config YAML, or one field of it.
pub fn render(args: &RenderArgs) -> anyhow::Result<String> {
    let path = &args.spec;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut kcg: KinesisConsumerGroup = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {} as a KinesisConsumerGroup", path.display()))?;
    if let Some(ns) = &args.namespace {
        kcg.metadata.namespace = Some(ns.clone());
    }
    if kcg.metadata.namespace.is_none() {
        kcg.metadata.namespace = Some("default".into());
    }
    let config = kcg.worker_config();
    config
        .validate()
        .with_context(|| format!("{} is not a valid group", path.display()))?;
    let yaml = config.to_yaml().context("rendering the worker config")?;
    Ok(match args.field {
        None => yaml,
        Some(Field::Group) => format!("{}\n", config.group),
        Some(Field::Table) => format!("{}\n", config.state_store.table),
        Some(Field::Stream) => format!(
            "{}\n",
            config
                .streams
                .first()
                .map(|s| s.name.as_str())
                .unwrap_or("")
        ),
        Some(Field::Hash) => format!("{}\n", resources::config_hash(&yaml)),
    })
}

/// Everything `status` needs besides the table contents.
struct StatusTarget {
    group: String,
    table: String,
    region: Option<String>,
    spec: Option<KinesisConsumerGroup>,
}

fn status_target(args: &StatusArgs) -> anyhow::Result<StatusTarget> {
    let Some((ns, name)) = args.group.split_once('/') else {
        bail!("--group must be NAMESPACE/NAME, got {:?}", args.group);
    };
    let spec = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut kcg: KinesisConsumerGroup = serde_yaml::from_str(&text)
                .with_context(|| format!("parsing {} as a KinesisConsumerGroup", path.display()))?;
            // The group id comes from --group, whatever the file says.
            kcg.metadata.namespace = Some(ns.to_owned());
            kcg.metadata.name = Some(name.to_owned());
            Some(kcg)
        }
        None => None,
    };
    let table = match (&args.table, &spec) {
        (Some(t), _) => t.clone(),
        (None, Some(k)) => k.spec.state_store.config.table.clone(),
        (None, None) => bail!("--table is required without --spec"),
    };
    let region = args.region.clone().or_else(|| {
        spec.as_ref()
            .and_then(|k| k.spec.state_store.config.region.clone())
    });
    Ok(StatusTarget {
        group: format!("{ns}/{name}"),
        table,
        region,
        spec,
    })
}

async fn status_cmd(args: StatusArgs) -> anyhow::Result<()> {
    let target = status_target(&args)?;
    let dynamo = DynamoClients::from_env().await;
    let store = StateStore::new(
        dynamo.client(target.region.as_deref()).await,
        target.table.clone(),
    );
    let timeout = target
        .spec
        .as_ref()
        .map(|k| k.spec.tuning.client_timeout)
        .unwrap_or_else(kcg_worker::config::defaults::client_timeout);
    let mut liveness = ClientWatch::new(timeout);
    if args.watch.is_none() {
        settle(&store, &target.group, &mut liveness, timeout).await;
    }
    let mut previous: Option<KinesisConsumerGroupStatus> = None;
    loop {
        let s = status_once(&store, &target, &mut liveness, previous.as_ref()).await;
        match args.output {
            Output::Yaml => {
                let sep = if args.watch.is_some() { "---\n" } else { "" };
                out(&format!(
                    "{sep}{}",
                    serde_yaml::to_string(&s).context("rendering YAML")?
                ))?;
            }
            Output::Table => {
                // With --watch, clear the screen so the table refreshes in place.
                let clear = if args.watch.is_some() {
                    "\x1b[2J\x1b[H"
                } else {
                    ""
                };
                out(&format!(
                    "{clear}{}",
                    render_table(&target.group, &target.table, &s, jiff::Timestamp::now())
                ))?;
            }
        }
        previous = Some(s);
        match args.watch {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs.max(1))).await,
            None => return Ok(()),
        }
    }
}

/// Liveness is judged by watching heartbeat counters move, never by comparing clocks, so a
/// single read cannot tell a live client from a dead one. Before a one-shot status, watch
/// the table until every client's counter has moved (typically one heartbeat interval) or
/// the client timeout has passed (then the still ones are dead).
async fn settle(store: &StateStore, group: &str, liveness: &mut ClientWatch, timeout: Duration) {
    let start = Instant::now();
    let mut first: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        let Ok(snap) = store.load_group(group).await else {
            return;
        };
        observe_clients(liveness, Some(&snap.clients), Instant::now());
        for c in &snap.clients {
            first.entry(c.client_id.clone()).or_insert(c.heartbeat);
        }
        let all_moved = snap
            .clients
            .iter()
            .all(|c| first.get(&c.client_id) != Some(&c.heartbeat));
        if all_moved || start.elapsed() > timeout {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One status build from the table: the same [`status::build_status`] the controller uses.
/// Without a cluster there is no Deployment: live clients stand in for ready replicas.
async fn status_once(
    store: &StateStore,
    target: &StatusTarget,
    liveness: &mut ClientWatch,
    previous: Option<&KinesisConsumerGroupStatus>,
) -> KinesisConsumerGroupStatus {
    let mut problems = Vec::new();
    let snapshot = match store.load_group(&target.group).await {
        Ok(s) => Some(s),
        Err(e) => {
            let reason = if e.reason() == "AccessDenied" {
                "AccessDenied"
            } else {
                "StateStoreUnavailable"
            };
            problems.push(Problem::new(
                reason,
                format!(
                    "reading table {}: {}",
                    target.table,
                    controller::error_chain(&e)
                ),
            ));
            None
        }
    };
    let rows = snapshot.as_ref().map(|s| s.clients.as_slice());
    let live: BTreeSet<String> = observe_clients(liveness, rows, Instant::now())
        .into_iter()
        .collect();
    let streams = match &target.spec {
        Some(k) => k.spec.streams.iter().map(|s| s.name.clone()).collect(),
        None => snapshot
            .as_ref()
            .map(|s| s.shard_caches.iter().map(|c| c.stream.clone()).collect())
            .unwrap_or_default(),
    };
    let n = live.len() as i32;
    // Without a spec, "desired" is what runs (at least one: an empty group is not suspended).
    let desired = target
        .spec
        .as_ref()
        .map(|k| k.spec.replicas)
        .unwrap_or(n.max(1));
    if let Some(k) = &target.spec
        && let Err(e) = k.worker_config().validate()
    {
        problems.push(Problem::new("InvalidSpec", e.to_string()));
    }
    status::build_status(StatusInput {
        generation: target.spec.as_ref().and_then(|k| k.metadata.generation),
        streams,
        desired_replicas: desired,
        suspended: target.spec.as_ref().is_some_and(|k| k.spec.suspend),
        selector: target
            .spec
            .as_ref()
            .map(resources::selector_string)
            .unwrap_or_default(),
        deployment: Some(DeploymentState::all_ready(n)),
        snapshot,
        live_clients: live,
        previous_conditions: previous.map(|p| p.conditions.clone()).unwrap_or_default(),
        now: jiff::Timestamp::now(),
        problems,
    })
}

fn age(rfc3339: &str, now: jiff::Timestamp) -> String {
    match rfc3339.parse::<jiff::Timestamp>() {
        Ok(t) => {
            let ms = now.as_millisecond() - t.as_millisecond();
            format!("{} ago", status::human_millis(ms.max(0)))
        }
        Err(_) => "-".into(),
    }
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str("  ");
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The human-readable rendering of a status, as `kcg-operator status` prints it.
pub fn render_table(
    group: &str,
    table: &str,
    s: &KinesisConsumerGroupStatus,
    now: jiff::Timestamp,
) -> String {
    let mut out = String::new();
    let ready = conditions::find(&s.conditions, conditions::READY)
        .map(|c| c.status.as_str())
        .unwrap_or("Unknown");
    out.push_str(&format!(
        "GROUP {group}  TABLE {table}  READY {ready}\nLEADER {}  CLIENTS {}  REPLICAS {}/{}  SHARDS {}  MAX LAG {}\n",
        s.leader.as_deref().unwrap_or("-"),
        s.client_count,
        s.ready_replicas,
        s.replicas,
        s.shard_count,
        s.max_lag.as_deref().unwrap_or("-"),
    ));

    out.push_str("\nCLIENTS\n");
    let mut rows = vec![
        ["INDEX", "ID", "POD", "OWNED", "HEARTBEAT", "ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for c in &s.clients {
        rows.push(vec![
            c.index.to_string(),
            c.id.clone(),
            c.pod.clone(),
            c.owned_shards.to_string(),
            age(&c.last_heartbeat, now),
            c.last_error
                .as_deref()
                .map(|e| conditions::truncate(e, 60))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    if s.clients.is_empty() {
        out.push_str("  (no live clients)\n");
    } else {
        out.push_str(&columns(&rows));
    }

    for st in &s.streams {
        let lag = match (&st.max_lag_millis, &st.max_lag_shard) {
            (Some(ms), Some(shard)) => format!("max lag {} on {shard}", status::human_millis(*ms)),
            _ => "lag unknown".into(),
        };
        out.push_str(&format!(
            "\nSTREAM {}  ({} open, {} draining, {lag})\n",
            st.name, st.open_shards, st.closed_shards_draining
        ));
        if st.ranges.is_empty() {
            out.push_str("  (no owned shards)\n");
            continue;
        }
        let mut rows = vec![
            ["CLIENT", "FIRST", "LAST", "COUNT"]
                .map(String::from)
                .to_vec(),
        ];
        for r in &st.ranges {
            rows.push(vec![
                r.client.clone(),
                r.first.clone(),
                r.last.clone(),
                r.count.to_string(),
            ]);
        }
        out.push_str(&columns(&rows));
    }

    out.push_str("\nCONDITIONS\n");
    let mut rows = vec![
        ["TYPE", "STATUS", "REASON", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for c in &s.conditions {
        rows.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClientStatus, ShardRange, StreamStatus};

    #[test]
    fn cli_parses_the_documented_commands() {
        let c = Cli::try_parse_from([
            "kcg-operator",
            "status",
            "--table",
            "t",
            "--group",
            "ns/g",
            "--output",
            "yaml",
            "--watch",
            "2",
        ])
        .unwrap();
        match c.command {
            Command::Status(a) => {
                assert_eq!(
                    (a.table.as_deref(), a.group.as_str(), a.output, a.watch),
                    (Some("t"), "ns/g", Output::Yaml, Some(2))
                );
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "kcg-operator",
            "run",
            "--namespace",
            "team-a",
            "--namespace=team-b,team-c",
            "--leader-election",
            "false",
        ])
        .unwrap();
        match c.command {
            Command::Run(a) => {
                assert_eq!(a.namespaces, vec!["team-a", "team-b", "team-c"]);
                assert!(!a.leader_election);
                assert_eq!(a.listen.to_string(), "0.0.0.0:8080");
                assert!(
                    a.worker_image.starts_with("ghcr.io/kcg-dev/kcg-worker:")
                        || std::env::var("KCG_WORKER_IMAGE").is_ok()
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["kcg-operator", "crd"]).is_ok());
    }

    /// The settings of `run --worker-service-account=kcg-worker` plus `extra`, or the
    /// parse error.
    fn run_settings(extra: &[&str]) -> Result<OperatorSettings, String> {
        let mut argv = vec!["kcg-operator", "run", "--worker-service-account=kcg-worker"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Run(a)) => Ok(a.settings()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn worker_service_account_annotations_are_a_json_object() {
        let run = run_settings;
        let s = run(&[
            r#"--worker-service-account-annotations={"eks.amazonaws.com/role-arn":"arn:aws:iam::123456789012:role/kcg-worker"}"#,
        ])
        .unwrap();
        assert_eq!(s.worker_service_account.as_deref(), Some("kcg-worker"));
        assert_eq!(
            s.worker_service_account_annotations["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::123456789012:role/kcg-worker"
        );
        for empty in ["{}", ""] {
            let flag = format!("--worker-service-account-annotations={empty}");
            assert!(
                run(&[&flag])
                    .unwrap()
                    .worker_service_account_annotations
                    .is_empty()
            );
        }
        if std::env::var_os("KCG_WORKER_SERVICE_ACCOUNT_ANNOTATIONS").is_none() {
            assert!(
                run(&[])
                    .unwrap()
                    .worker_service_account_annotations
                    .is_empty()
            );
        }
        let err = run(&[r#"--worker-service-account-annotations={"a": 1}"#]).unwrap_err();
        assert!(err.contains("JSON object of string values"), "{err}");
    }

    #[test]
    fn create_worker_service_account_takes_a_value_and_defaults_to_true() {
        let run = run_settings;
        if std::env::var_os("KCG_CREATE_WORKER_SERVICE_ACCOUNT").is_none() {
            assert!(run(&[]).unwrap().create_worker_service_account);
        }
        // The chart's form, and the separate-value form.
        for (args, want) in [
            (&["--create-worker-service-account=true"][..], true),
            (&["--create-worker-service-account=false"][..], false),
            (&["--create-worker-service-account", "false"][..], false),
        ] {
            let s = run(args).unwrap();
            assert_eq!(s.create_worker_service_account, want, "{args:?}");
            assert_eq!(s.worker_service_account.as_deref(), Some("kcg-worker"));
        }
        let err = run(&["--create-worker-service-account=maybe"]).unwrap_err();
        assert!(err.contains("maybe"), "{err}");
        assert!(
            run(&["--create-worker-service-account"]).is_err(),
            "a value is required, as for --leader-election"
        );
    }

    #[tokio::test]
    async fn only_the_leader_runs_the_controller() {
        use std::sync::atomic::AtomicUsize;
        struct Running(Arc<AtomicBool>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let (s2, r2) = (started.clone(), running.clone());
        let task = tokio::spawn(async move {
            while_leader(&mut rx, move || {
                let (s, r) = (s2.clone(), r2.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    r.store(true, Ordering::SeqCst);
                    let _guard = Running(r);
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .await
        });
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            0,
            "a follower does not reconcile"
        );
        tx.send(true).unwrap();
        settle().await;
        assert!(running.load(Ordering::SeqCst));
        tx.send(false).unwrap();
        settle().await;
        assert!(
            !running.load(Ordering::SeqCst),
            "losing the lease stops the controller"
        );
        tx.send(true).unwrap();
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "regaining it starts it again"
        );
        drop(tx);
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            r.is_err(),
            "the election ending ends the run (the pod restarts)"
        );
        assert!(!running.load(Ordering::SeqCst));
    }

    #[test]
    fn render_gives_the_worker_config_and_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("g.yaml");
        std::fs::write(
            &spec,
            "apiVersion: kcg.dev/v1alpha1\nkind: KinesisConsumerGroup\nmetadata: {name: orders}\nspec:\n  streams: [{name: orders-stream}]\n  stateStore: {table: kcg-state}\n  delivery: {stdout: {}}\n",
        )
        .unwrap();
        let args = |field| RenderArgs {
            spec: spec.clone(),
            namespace: Some("demo".into()),
            field,
        };
        let yaml = render(&args(None)).unwrap();
        let parsed = kcg_worker::config::WorkerConfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed.group, "demo/orders");
        assert_eq!(render(&args(Some(Field::Group))).unwrap(), "demo/orders\n");
        assert_eq!(render(&args(Some(Field::Table))).unwrap(), "kcg-state\n");
        assert_eq!(
            render(&args(Some(Field::Stream))).unwrap(),
            "orders-stream\n"
        );
        assert_eq!(
            render(&args(Some(Field::Hash))).unwrap().trim(),
            resources::config_hash(&yaml)
        );
    }

    #[test]
    fn status_target_needs_a_table_and_a_namespaced_group() {
        let args = |group: &str, table: Option<&str>| StatusArgs {
            table: table.map(str::to_owned),
            group: group.into(),
            region: None,
            spec: None,
            output: Output::Table,
            watch: None,
        };
        assert!(status_target(&args("nogroup", Some("t"))).is_err());
        assert!(status_target(&args("ns/g", None)).is_err());
        let t = status_target(&args("ns/g", Some("t"))).unwrap();
        assert_eq!((t.group.as_str(), t.table.as_str()), ("ns/g", "t"));
    }

    #[test]
    fn table_shows_leader_clients_ranges_lag_and_conditions() {
        let s = KinesisConsumerGroupStatus {
            leader: Some("c0".into()),
            client_count: 1,
            shard_count: 2,
            max_lag: Some("3s".into()),
            clients: vec![ClientStatus {
                id: "c0".into(),
                pod: "p0".into(),
                index: 0,
                last_heartbeat: "2026-01-01T00:00:00Z".into(),
                owned_shards: 2,
                last_error: Some("boom".into()),
            }],
            streams: vec![StreamStatus {
                name: "orders".into(),
                open_shards: 2,
                ranges: vec![ShardRange {
                    client: "c0".into(),
                    first: "shardId-000000000000".into(),
                    last: "shardId-000000000001".into(),
                    count: 2,
                }],
                max_lag_millis: Some(3000),
                max_lag_shard: Some("shardId-000000000001".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let now: jiff::Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        let text = render_table("ns/g", "t", &s, now);
        for needle in [
            "LEADER c0",
            "5s ago",
            "boom",
            "STREAM orders",
            "max lag 3s on shardId-000000000001",
            "shardId-000000000000  shardId-000000000001  2",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
    }
}
