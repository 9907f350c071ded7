//! The controller: reconciles each `KinesisConsumerGroup` into a ConfigMap and a worker
//! Deployment (server-side apply, field manager `kcg-operator`), refreshes its status from
//! the Deployment and the state-store table every few seconds, publishes events on change,
//! and on deletion (finalizer) removes the group's rows when `onDelete: Delete` and
//! deregisters its stream consumers with `consumer.onDelete: Deregister`. Before the
//! Deployment it makes sure the default worker ServiceAccount exists in the group's
//! namespace (applied when missing or when its annotations are stale, only ever on an
//! account the operator made; never deleted).
//!
//! Decisions live in pure modules ([`crate::status`], [`crate::events`],
//! [`crate::resources`]); this module is the I/O around them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kcg_worker::membership::{ClientWatch, observe_clients};
use kcg_worker::store::StateStore;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::consumer_admin::{self, ConsumerAdminError};
use crate::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus, OnDelete};
use crate::crd_check::{self, CrdState};
use crate::events::{self, Severity};
use crate::finalizing::{self, Step};
use crate::metrics::Metrics;
use crate::observed::{self, Observed};
use crate::owned;
use crate::resources::{self, OperatorSettings};
use crate::status::{self, DeploymentState, Problem, StatusInput};
use crate::store_admin::{self, StoreAdminError};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kcg-operator";
pub use crate::finalizing::FINALIZER;
/// How often the status is refreshed while a group exists.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How often a group whose spec is invalid is looked at again (a spec edit triggers a
/// reconcile anyway).
pub const INVALID_SPEC_RETRY: Duration = Duration::from_secs(60);
/// Upper bound of a state-store read, so an unreachable endpoint cannot stall a reconcile.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the workers to stop before deleting rows.
pub const CLEANUP_POLL: Duration = Duration::from_secs(5);
/// Most event recorders kept (one per distinct event, see [`EventRecorders`]); the least
/// recently used one goes first.
pub const MAX_EVENT_RECORDERS: usize = 1000;
/// How long a namespace's default worker ServiceAccount, once found in order, is not read
/// again.
pub const SERVICE_ACCOUNT_RECHECK: Duration = Duration::from_secs(300);
/// Degraded reason when the default worker ServiceAccount is missing from the group's
/// namespace and the operator could not create it (or could not read or update it).
pub const SERVICE_ACCOUNT_MISSING: &str = "ServiceAccountMissing";

/// Errors of one reconcile. Each names the object and the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A server-side apply of an owned object failed.
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        /// `ConfigMap` or `Deployment`.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading an object failed.
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Get {
        /// Kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing `/status` failed.
    #[error("patching status of {group}: {source}")]
    PatchStatus {
        /// Group id.
        group: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Serializing the status failed (cannot happen with these types, but is not unwrapped).
    #[error("serializing status of {group}: {source}")]
    SerializeStatus {
        /// Group id.
        group: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Rendering the worker config failed.
    #[error("rendering the worker config of {group}: {source}")]
    Render {
        /// Group id.
        group: String,
        /// The config error.
        #[source]
        source: kcg_worker::config::ConfigError,
    },
    /// Deleting the Deployment during cleanup failed.
    #[error("deleting Deployment {namespace}/{name}: {source}")]
    DeleteDeployment {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting an owned object the spec no longer wants (the PodDisruptionBudget) failed.
    #[error("deleting {kind} {namespace}/{name}: {source}")]
    Delete {
        /// Kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading or creating the default worker ServiceAccount failed for a reason that may
    /// pass (a refusal of the API server is a Degraded problem instead, not an error).
    #[error("ensuring ServiceAccount {namespace}/{name}: {source}")]
    ServiceAccount {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Cleanup waits until the workers are gone (they release leases and checkpoint on the
    /// way out) before it deletes the rows or deregisters consumers: the worker Deployment, deleted in the
    /// foreground, exists until its pods are gone. Not a failure: the finalizer stays and
    /// the reconcile is retried shortly.
    #[error(
        "waiting for {pods} worker pods of {group} to stop before its cleanup (state-store rows, stream consumers)"
    )]
    WorkersStillRunning {
        /// Group id.
        group: String,
        /// Pods the Deployment still counts (its `status.replicas`).
        pods: usize,
    },
    /// Deleting the group's rows failed.
    #[error("cleanup of {group}: {source}")]
    StoreAdmin {
        /// Group id.
        group: String,
        /// The store error.
        #[source]
        source: StoreAdminError,
    },
    /// Deregistering the group's stream consumers failed.
    #[error("cleanup of {group}: {source}")]
    ConsumerAdmin {
        /// Group id.
        group: String,
        /// The Kinesis error.
        #[source]
        source: ConsumerAdminError,
    },
    /// The object has no namespace (the CRD is namespaced, so only a hand-built object).
    #[error("KinesisConsumerGroup {0} has no namespace")]
    NoNamespace(String),
    /// Adding or removing the cleanup finalizer failed.
    #[error("{action} the finalizer {FINALIZER} of {group}: {source}")]
    Finalizer {
        /// `adding` or `removing`.
        action: &'static str,
        /// Group id.
        group: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The group's namespace is being deleted: nothing new may be made there, and the group
    /// goes with it. Not reported on the group (events cannot be created there either).
    #[error("namespace {namespace} is being deleted; the group goes with it")]
    NamespaceTerminating {
        /// Namespace.
        namespace: String,
    },
    /// Serializing an owned object failed (cannot happen with these types).
    #[error("serializing {kind} {name}: {source}")]
    SerializeOwned {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The CRD is not installed, or the operator may not list the resource.
    #[error(
        "cannot list KinesisConsumerGroups (is the CRD installed? `kcg-operator crd | kubectl apply -f -`): {0}"
    )]
    CrdMissing(#[source] kube::Error),
}

impl Error {
    /// Short kind for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "Apply",
            Error::Get { .. } => "Get",
            Error::PatchStatus { .. } => "PatchStatus",
            Error::SerializeStatus { .. } => "SerializeStatus",
            Error::Render { .. } => "Render",
            Error::DeleteDeployment { .. } => "DeleteDeployment",
            Error::Delete { .. } => "Delete",
            Error::ServiceAccount { .. } => "ServiceAccount",
            Error::WorkersStillRunning { .. } => "WorkersStillRunning",
            Error::StoreAdmin { .. } => "StoreAdmin",
            Error::ConsumerAdmin { .. } => "ConsumerAdmin",
            Error::NoNamespace(_) => "NoNamespace",
            Error::Finalizer { .. } => "Finalizer",
            Error::SerializeOwned { .. } => "SerializeOwned",
            Error::NamespaceTerminating { .. } => "NamespaceTerminating",
            Error::CrdMissing(_) => "CrdMissing",
        }
    }

    /// True when this is the "workers still stopping" wait, which is polled, not backed off.
    pub fn is_waiting(&self) -> bool {
        matches!(self, Error::WorkersStillRunning { .. })
    }
}

/// DynamoDB clients per region, built lazily from the default credential chain (IRSA in a
/// cluster, env vars locally; `AWS_ENDPOINT_URL_DYNAMODB` points them at an emulator).
pub struct DynamoClients {
    base: aws_config::SdkConfig,
    by_region: tokio::sync::Mutex<HashMap<String, aws_sdk_dynamodb::Client>>,
}

impl DynamoClients {
    /// Loads the default AWS config once.
    pub async fn from_env() -> Self {
        Self {
            base: aws_config::defaults(BehaviorVersion::latest()).load().await,
            by_region: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Clients derived from an explicit AWS config (tests, the CLI with overrides).
    pub fn from_config(base: aws_config::SdkConfig) -> Self {
        Self {
            base,
            by_region: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The AWS config every client derives from (also the operator's Kinesis calls, which
    /// deregister stream consumers).
    pub fn base(&self) -> &aws_config::SdkConfig {
        &self.base
    }

    /// A client for `region`, or the default region.
    pub async fn client(&self, region: Option<&str>) -> aws_sdk_dynamodb::Client {
        let key = region.unwrap_or("").to_owned();
        let mut map = self.by_region.lock().await;
        map.entry(key)
            .or_insert_with(|| {
                let mut b = aws_sdk_dynamodb::config::Builder::from(&self.base);
                if let Some(r) = region {
                    b = b.region(Region::new(r.to_owned()));
                }
                aws_sdk_dynamodb::Client::from_conf(b.build())
            })
            .clone()
    }
}

/// Publishes events through kube's [`Recorder`], one recorder per distinct event.
///
/// A `Recorder` aggregates an event into the series of an earlier one (same object, type,
/// reason, action and reporter, within 6 minutes) by PATCHing that earlier event's
/// `series.count`, whatever the new note says: a second `Rebalanced` with another
/// distribution would only bump the first one's count, and its note would be lost. Keyed
/// by the note as well, each distinct event is created as an Event of its own, and only
/// identical repeats aggregate into a series. At most [`MAX_EVENT_RECORDERS`] are kept;
/// the least recently used goes first (kube forgets a series after 6 minutes anyway).
pub struct EventRecorders {
    client: Client,
    reporter: Reporter,
    cache: Mutex<RecorderCache>,
}

#[derive(Default)]
struct RecorderCache {
    /// Use counter: a larger stamp is a more recent use.
    clock: u64,
    by_event: HashMap<EventKey, (u64, Recorder)>,
}

/// What makes two events "the same" for aggregation: the object (by kind, namespace, name
/// and uid), type, reason, action and note.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    regarding: [Option<String>; 4],
    type_: EventType,
    reason: String,
    action: String,
    note: Option<String>,
}

impl EventKey {
    fn new(event: &KubeEvent, regarding: &ObjectReference) -> Self {
        Self {
            regarding: [
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ],
            type_: event.type_,
            reason: event.reason.clone(),
            action: event.action.clone(),
            note: event.note.clone(),
        }
    }
}

impl EventRecorders {
    /// Recorders that publish as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            cache: Mutex::new(RecorderCache::default()),
        }
    }

    /// Publishes `event` on the object `regarding`: a new Event, or, for a repeat of an
    /// identical event within kube's 6-minute window, a series update of that Event.
    pub async fn publish(
        &self,
        event: &KubeEvent,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = EventKey::new(event, regarding);
        match self.recorder(&key).publish(event, regarding).await {
            // The series update of an Event that is gone (expired or deleted): forget it and
            // create a new one.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                lock(&self.cache).by_event.remove(&key);
                self.recorder(&key).publish(event, regarding).await
            }
            other => other,
        }
    }

    fn recorder(&self, key: &EventKey) -> Recorder {
        let mut cache = lock(&self.cache);
        cache.clock += 1;
        let now = cache.clock;
        if let Some((used, recorder)) = cache.by_event.get_mut(key) {
            *used = now;
            return recorder.clone();
        }
        if cache.by_event.len() >= MAX_EVENT_RECORDERS
            && let Some(oldest) = cache
                .by_event
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
        {
            cache.by_event.remove(&oldest);
        }
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        cache.by_event.insert(key.clone(), (now, recorder.clone()));
        recorder
    }
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event publishing (repeated identical events become series).
    pub events: EventRecorders,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Operator settings (default worker image, ...).
    pub settings: OperatorSettings,
    /// Per-group liveness trackers: client heartbeats observed on our own clock across
    /// reconciles, failed reads not counted against anyone. Keyed by group id.
    pub liveness: Mutex<HashMap<String, ClientWatch>>,
    /// DynamoDB clients per region.
    pub dynamo: DynamoClients,
    /// Consecutive failures per object, for exponential backoff; reset on success.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Whether the installed CRD lacks fields (see [`crate::crd_check`]), kept current by
    /// [`run`]; reported on every group.
    pub crd: Arc<CrdState>,
    /// Namespaces whose default worker ServiceAccount was last found in order, and when.
    pub service_accounts_checked: Mutex<HashMap<String, Instant>>,
    /// The owned objects as the watches see them (empty without watches: then each is
    /// read before it is applied).
    pub observed: Observed,
}

impl Context {
    /// A context with the given parts.
    pub fn new(
        client: Client,
        settings: OperatorSettings,
        metrics: Arc<Metrics>,
        dynamo: DynamoClients,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            events: EventRecorders::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            liveness: Mutex::new(HashMap::new()),
            dynamo,
            failures: Mutex::new(HashMap::new()),
            crd: Arc::default(),
            observed: Observed::default(),
            service_accounts_checked: Mutex::new(HashMap::new()),
        }
    }

    /// The same context comparing against `observed` caches.
    pub fn with_observed(mut self, observed: Observed) -> Self {
        self.observed = observed;
        self
    }
}

fn object_key(kcg: &KinesisConsumerGroup) -> String {
    kcg.group_id()
}

/// Backoff after `failures` consecutive failures: 1s, 2s, 4s, ... capped at 5 minutes.
pub fn backoff_delay(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Reconciles one group. Never panics on a bad CR: problems become conditions.
pub async fn reconcile(kcg: Arc<KinesisConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let group = kcg.group_id();
    let span = info_span!("reconcile", group = %group);
    async move {
        let _timer = ctx.metrics.reconcile_started();
        let ns = kcg
            .namespace()
            .ok_or_else(|| Error::NoNamespace(kcg.name_any()))?;
        let api: Api<KinesisConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
        let set_finalizer = |present: bool| {
            let (api, kcg, group) = (&api, &kcg, &group);
            async move {
                finalizing::set(api, kcg, present)
                    .await
                    .map_err(|source| Error::Finalizer {
                        action: if present { "adding" } else { "removing" },
                        group: group.clone(),
                        source,
                    })
            }
        };
        // The finalizer only while onDelete is Delete; its change comes back as a watch
        // event (the group watch passes finalizer changes), which reconciles again.
        let result = match finalizing::step_for(&kcg) {
            Step::Add => set_finalizer(true).await.map(|()| Action::await_change()),
            Step::Remove => set_finalizer(false).await.map(|()| Action::await_change()),
            Step::Cleanup => match cleanup(kcg.clone(), ctx.clone()).await {
                Ok(action) => set_finalizer(false).await.map(|()| action),
                Err(e) => Err(e),
            },
            Step::Gone => {
                forget(&kcg, &ctx);
                Ok(Action::await_change())
            }
            Step::Proceed => apply(kcg.clone(), ctx.clone()).await,
        };
        match &result {
            Ok(_) => {
                lock(&ctx.failures).remove(&object_key(&kcg));
            }
            Err(e) => ctx.metrics.reconcile_failed(e.metric_label()),
        }
        result
    }
    .instrument(span)
    .await
}

/// Requeue policy on error: per-object exponential backoff (reset by a success), except
/// the cleanup wait for workers, which is polled at a fixed pace.
pub fn error_policy(kcg: Arc<KinesisConsumerGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_waiting() {
        info!(group = %kcg.group_id(), "{error}");
        return Action::requeue(CLEANUP_POLL);
    }
    if matches!(error, Error::NamespaceTerminating { .. }) {
        debug!(group = %kcg.group_id(), "{error}");
        return Action::requeue(INVALID_SPEC_RETRY);
    }
    let failures = {
        let mut map = lock(&ctx.failures);
        let n = map.entry(object_key(&kcg)).or_insert(0);
        *n += 1;
        *n
    };
    let delay = backoff_delay(failures);
    warn!(group = %kcg.group_id(), failures, retry_in = ?delay, error = %error_chain(error), "reconcile failed");
    Action::requeue(delay)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the maps hold plain values.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error and its sources, joined with `: ` (what a Warning event carries).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

async fn apply(kcg: Arc<KinesisConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let group = kcg.group_id();
    let ns = kcg.namespace().unwrap_or_default();
    let mut problems = Vec::new();

    // What the schema and CEL could not catch (cross-field rules) is checked here; a bad
    // spec is reported, not applied, and the workers keep their last good config.
    let valid = match kcg.worker_config().validate() {
        Ok(()) => true,
        Err(e) => {
            problems.push(Problem::new("InvalidSpec", e.to_string()));
            false
        }
    };

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let applied = if valid {
        // The pods cannot start without their ServiceAccount. A missing one that cannot be
        // created is reported; the Deployment is applied all the same and starts its pods
        // as soon as the account exists.
        if let Some(problem) = ensure_worker_service_account(&kcg, &ctx, &ns).await? {
            problems.push(problem);
        }
        let (deployment, refused) = owned::ensure_group_objects(&kcg, &ctx, &ns).await?;
        problems.extend(refused);
        if deployment.is_some() {
            problems.extend(owned::ensure_disruption_budget(&kcg, &ctx, &ns).await?);
        }
        deployment
    } else {
        None
    };
    let deployment = match applied {
        Some(d) => Some(d),
        None => {
            let name = resources::deployment_name(&kcg);
            let found = match ctx.observed.deployment(&ns, &name) {
                Some(d) => Some((*d).clone()),
                None => deployments
                    .get_opt(&name)
                    .await
                    .map_err(|source| Error::Get {
                        kind: "Deployment",
                        namespace: ns.clone(),
                        name,
                        source,
                    })?,
            };
            // Another object of that name says nothing about the group's workers.
            found.filter(|d| crate::apply::is_owned_by(&d.metadata, &kcg.uid().unwrap_or_default()))
        }
    };
    // A name taken by an object the group does not own is looked at again at the refresh
    // pace (one read): the watch of owned objects does not see it go, and the group should
    // proceed as soon as it does.
    let valid = valid
        && problems
            .iter()
            .all(|p| p.reason == crate::api_problem::RESOURCE_NOT_OWNED);
    // Not a spec problem: the group is applied and refreshed as usual.
    problems.extend(ctx.crd.problem());

    // The state store: a failure is a condition, never a crash or a reconcile error.
    let store_cfg = &kcg.spec.state_store.config;
    let client = ctx.dynamo.client(store_cfg.region.as_deref()).await;
    let store = StateStore::new(client, store_cfg.table.clone());
    let snapshot = match tokio::time::timeout(STORE_READ_TIMEOUT, store.load_group(&group)).await {
        Ok(Ok(snap)) => Some(snap),
        Ok(Err(e)) => {
            let reason = match e.reason() {
                "AccessDenied" => "AccessDenied",
                _ => "StateStoreUnavailable",
            };
            problems.push(Problem::new(
                reason,
                format!("reading table {}: {}", store_cfg.table, error_chain(&e)),
            ));
            None
        }
        Err(_) => {
            problems.push(Problem::new(
                "StateStoreUnavailable",
                format!(
                    "reading table {} took longer than {STORE_READ_TIMEOUT:?}",
                    store_cfg.table
                ),
            ));
            None
        }
    };

    let live = {
        let mut trackers = lock(&ctx.liveness);
        let timeout = kcg.spec.tuning.client_timeout;
        let tracker = trackers
            .entry(group.clone())
            .or_insert_with(|| ClientWatch::new(timeout));
        if tracker.timeout() != timeout {
            // The spec changed the client timeout: judge with the new one from now on.
            *tracker = ClientWatch::new(timeout);
        }
        let rows = snapshot.as_ref().map(|s| s.clients.as_slice());
        observe_clients(tracker, rows, Instant::now())
    };

    let input = StatusInput {
        generation: kcg.metadata.generation,
        streams: kcg.spec.streams.iter().map(|s| s.name.clone()).collect(),
        desired_replicas: resources::effective_replicas(&kcg),
        suspended: kcg.spec.suspend,
        selector: resources::selector_string(&kcg),
        deployment: deployment.as_ref().map(DeploymentState::from_deployment),
        snapshot,
        live_clients: live.into_iter().collect::<BTreeSet<_>>(),
        previous_conditions: kcg
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        now: now_seconds(),
        problems,
    };
    let new_status = status::build_status(input);
    ctx.metrics
        .groups
        .observe(&ns, &kcg.name_any(), &new_status);
    let new_status = ctx.crd.fit_status(new_status);
    publish_status(&kcg, &ctx, new_status).await?;

    Ok(if valid {
        Action::requeue(REFRESH)
    } else {
        Action::requeue(INVALID_SPEC_RETRY)
    })
}

/// Makes sure the worker pods' default ServiceAccount exists in the group's namespace, when
/// the group does not name its own (`spec.worker.serviceAccountName`), the operator has one
/// (`--worker-service-account`) and may make it (`--create-worker-service-account`). A pod
/// can only use an account of its own namespace, and the operator is the only maker of
/// these accounts (the chart renders none).
///
/// A missing account is server-side applied with the configured annotations (the IRSA
/// role) and no owner: the groups of a namespace share it, so it stays until the namespace
/// goes. An existing one is applied again only when it is the operator's
/// (`app.kubernetes.io/managed-by: kcg-operator`) and misses a configured annotation or
/// holds another value, say a new IRSA role after `helm upgrade`. An annotation the
/// settings no longer name does not trigger that apply, so it stays until some other
/// change does (the apply then drops it). An account the operator did not make (the user's,
/// or one an older chart rendered) is never touched. An account the API server does not let
/// the operator read or write is returned as a Degraded problem.
async fn ensure_worker_service_account(
    kcg: &KinesisConsumerGroup,
    ctx: &Context,
    ns: &str,
) -> Result<Option<Problem>, Error> {
    if kcg.spec.worker.service_account_name.is_some() || !ctx.settings.create_worker_service_account
    {
        return Ok(None);
    }
    let Some(name) = ctx.settings.worker_service_account.as_deref() else {
        return Ok(None);
    };
    // Found in order lately: not read again on every refresh (a read per group every few
    // seconds is the steady API traffic the operator avoids).
    if lock(&ctx.service_accounts_checked)
        .get(ns)
        .is_some_and(|at| at.elapsed() < SERVICE_ACCOUNT_RECHECK)
    {
        return Ok(None);
    }
    let checked = || {
        lock(&ctx.service_accounts_checked).insert(ns.to_owned(), Instant::now());
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let create_it = format!(
        "Create it (`kubectl -n {ns} create serviceaccount {name}`) or set spec.worker.serviceAccountName to an account of namespace {ns}"
    );
    let (step, fix, failure) = match api.get_opt(name).await {
        Ok(Some(existing))
            if !resources::worker_service_account_is_stale(&existing, &ctx.settings) =>
        {
            checked();
            return Ok(None);
        }
        Ok(existing) => {
            let (step, fix, done) = match existing {
                None => (
                    "it is missing and creating it failed",
                    create_it,
                    "created the worker ServiceAccount",
                ),
                Some(_) => (
                    "its annotations differ from --worker-service-account-annotations and updating them failed",
                    format!(
                        "Grant the operator `patch` on serviceaccounts named {name} (the chart does), or set the annotations yourself (`kubectl -n {ns} annotate serviceaccount {name} KEY=VALUE --overwrite`)"
                    ),
                    "updated the worker ServiceAccount's annotations",
                ),
            };
            let account = resources::worker_service_account(ns, name, &ctx.settings);
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch(name, &pp, &Patch::Apply(&account)).await {
                Ok(_) => {
                    info!(namespace = ns, service_account = name, "{done}");
                    checked();
                    return Ok(None);
                }
                Err(e) => (step, fix, e),
            }
        }
        Err(e) => ("reading it failed", create_it, e),
    };
    match failure {
        // The namespace is being deleted (its accounts with it): nothing is missing that
        // the group still needs.
        kube::Error::Api(s) if crate::api_problem::namespace_terminating(&s) => Ok(None),
        kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 409 && s.code != 429 => {
            Ok(Some(Problem::new(
                SERVICE_ACCOUNT_MISSING,
                format!(
                    "the worker pods run as ServiceAccount {ns}/{name}, and {step}: {} ({}). {fix}",
                    s.message, s.reason
                ),
            )))
        }
        source => Err(Error::ServiceAccount {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}

/// `now` truncated to whole seconds: the API server stores condition times with second
/// precision, so a finer time would make every refresh look like a change.
fn now_seconds() -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// Writes the status if it changed, then publishes the events the change calls for.
async fn publish_status(
    kcg: &KinesisConsumerGroup,
    ctx: &Context,
    new_status: KinesisConsumerGroupStatus,
) -> Result<(), Error> {
    let group = kcg.group_id();
    let old = kcg.status.as_ref();
    if !status::needs_write(old, &new_status) {
        debug!("status unchanged; nothing written");
        return Ok(());
    }
    let api: Api<KinesisConsumerGroup> =
        Api::namespaced(ctx.client.clone(), &kcg.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": KinesisConsumerGroup::api_version(&()),
        "kind": KinesisConsumerGroup::kind(&()),
        "status": serde_json::to_value(&new_status).map_err(|source| Error::SerializeStatus {
            group: group.clone(),
            source,
        })?,
    });
    api.patch_status(
        &kcg.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::PatchStatus {
        group: group.clone(),
        source,
    })?;
    ctx.metrics.status_patches.inc();

    let reference = kcg.object_ref(&());
    for ev in events::diff(old, &new_status) {
        let event = KubeEvent {
            type_: match ev.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: ev.reason.clone(),
            note: Some(ev.note.clone()),
            action: ev.action.clone(),
            secondary: None,
        };
        // An event that cannot be published is logged; it must not fail the reconcile.
        match ctx.events.publish(&event, &reference).await {
            Ok(()) => {
                ctx.metrics
                    .events
                    .get_or_create(&crate::metrics::EventLabels {
                        reason: ev.reason.clone(),
                    })
                    .inc();
                info!(reason = %ev.reason, note = %ev.note, "event");
            }
            // A namespace being deleted takes no new events, and the group goes with it.
            Err(kube::Error::Api(s)) if crate::api_problem::namespace_terminating(&s) => {
                debug!(reason = %ev.reason, "namespace terminating: event not published");
            }
            Err(e) => warn!(reason = %ev.reason, error = %e, "publishing event failed"),
        }
    }
    Ok(())
}

async fn cleanup(kcg: Arc<KinesisConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let group = kcg.group_id();
    let ns = kcg.namespace().unwrap_or_default();
    let delete_rows = kcg.spec.state_store.on_delete == OnDelete::Delete;
    let consumers = !consumer_admin::to_deregister(&group, &kcg.spec.streams).is_empty();
    if !delete_rows && !consumers {
        info!("onDelete Retain: the group's state-store rows (and stream consumers) are kept");
        forget(&kcg, &ctx);
        return Ok(Action::await_change());
    }
    // Stop the workers first: they release leases and checkpoint on the way out, and a
    // running worker would recreate rows we delete, or register again a consumer we
    // deregister. Deleted in the foreground, the Deployment stays (with a deletionTimestamp)
    // until the garbage collector has removed its ReplicaSets and their pods, so once it is
    // gone every worker has stopped; no need to read pods (the operator may not).
    let name = resources::deployment_name(&kcg);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    match deployments.delete(&name, &DeleteParams::foreground()).await {
        Ok(_) => debug!(deployment = %name, "deleting the worker Deployment (foreground)"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(Error::DeleteDeployment {
                namespace: ns,
                name,
                source,
            });
        }
    }
    let remaining = deployments
        .get_opt(&name)
        .await
        .map_err(|source| Error::Get {
            kind: "Deployment",
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?;
    if let Some(d) = remaining {
        let pods = d.status.and_then(|s| s.replicas).unwrap_or(0);
        return Err(Error::WorkersStillRunning {
            group,
            pods: usize::try_from(pods).unwrap_or(0),
        });
    }
    let mut result = Ok(());
    if delete_rows {
        let cfg = &kcg.spec.state_store.config;
        let client = ctx.dynamo.client(cfg.region.as_deref()).await;
        if let Err(source) = store_admin::delete_group(&client, &cfg.table, &group).await {
            result = Err(Error::StoreAdmin {
                group: group.clone(),
                source,
            });
        }
    }
    if result.is_ok()
        && consumers
        && let Err(source) =
            consumer_admin::deregister(ctx.dynamo.base(), &group, &kcg.spec.streams).await
    {
        result = Err(Error::ConsumerAdmin {
            group: group.clone(),
            source,
        });
    }
    if let Err(err) = result {
        // The finalizer holds the object until this works: say why, on the object.
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "CleanupFailed".into(),
            note: Some(crate::conditions::truncate(
                &error_chain(&err),
                events::MAX_NOTE_CHARS,
            )),
            action: "Cleanup".into(),
            secondary: None,
        };
        if let Err(e) = ctx.events.publish(&event, &kcg.object_ref(&())).await {
            warn!(error = %e, "publishing event failed");
        }
        return Err(err);
    }
    forget(&kcg, &ctx);
    Ok(Action::await_change())
}

/// Drops what the context keeps about a group that goes.
fn forget(kcg: &KinesisConsumerGroup, ctx: &Context) {
    lock(&ctx.liveness).remove(&kcg.group_id());
    lock(&ctx.failures).remove(&object_key(kcg));
    ctx.metrics
        .groups
        .forget(&kcg.namespace().unwrap_or_default(), &kcg.name_any());
}

/// Where and how the controller runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Watch only these namespaces; empty watches all.
    pub namespaces: Vec<String>,
    /// Operator settings passed to the resource builders.
    pub settings: OperatorSettings,
    /// Check the installed CRD's fields against the compiled-in schema (needs `get` on the
    /// CRD, a cluster-scoped right).
    pub check_crd: bool,
}

/// Runs the controller until shutdown (SIGTERM/ctrl-c) or until the future is dropped
/// (lost leadership).
pub async fn run(client: Client, opts: RunOptions, metrics: Arc<Metrics>) -> Result<(), Error> {
    // One controller per watched namespace (a watch is per namespace or cluster-wide);
    // they share the context, so trackers, backoff, metrics and the owned-object caches
    // are common.
    let scopes: Vec<Option<String>> = if opts.namespaces.is_empty() {
        vec![None]
    } else {
        opts.namespaces.iter().cloned().map(Some).collect()
    };
    let mut observed = Observed::default();
    let mut wired = Vec::new();
    for ns in scopes {
        let (groups, deployments, config_maps, pdbs) = match &ns {
            Some(ns) => (
                Api::<KinesisConsumerGroup>::namespaced(client.clone(), ns),
                Api::<Deployment>::namespaced(client.clone(), ns),
                Api::<ConfigMap>::namespaced(client.clone(), ns),
                Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
            ),
            None => (
                Api::<KinesisConsumerGroup>::all(client.clone()),
                Api::<Deployment>::all(client.clone()),
                Api::<ConfigMap>::all(client.clone()),
                Api::<PodDisruptionBudget>::all(client.clone()),
            ),
        };
        groups
            .list(&ListParams::default().limit(1))
            .await
            .map_err(Error::CrdMissing)?;
        let (cm_store, cm_stream) = observed::owned_stream(config_maps);
        let (dep_store, dep_stream) = observed::owned_stream(deployments);
        let (pdb_store, pdb_stream) = observed::owned_stream(pdbs);
        observed.add(cm_store, dep_store, pdb_store);
        wired.push((ns, groups, cm_stream, dep_stream, pdb_stream));
    }
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            opts.settings.clone(),
            metrics,
            DynamoClients::from_env().await,
        )
        .with_observed(observed),
    );
    // Dropped with this future, like the controllers (lost leadership, shutdown).
    let _crd_check = opts.check_crd.then(|| {
        AbortOnDrop(tokio::spawn(crd_check::keep_checking(
            client.clone(),
            ctx.crd.clone(),
        )))
    });
    let mut controllers = Vec::new();
    for (ns, groups, cm_stream, dep_stream, pdb_stream) in wired {
        // Our own status writes must not reconcile again: only a spec change (generation),
        // a finalizer or label/annotation change, or deletion (which bumps the generation)
        // does. The status is refreshed by each reconcile's requeue.
        let (reader, writer) = reflector::store();
        let group_stream = reflector::reflector(
            writer,
            // Managed fields are the bulk of a cached object and never read.
            watcher(groups, watcher::Config::default().any_semantic()).map_ok(|ev| {
                ev.modify(|g| {
                    g.managed_fields_mut().clear();
                })
            }),
        )
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::finalizers)
                .combine(predicates::labels)
                .combine(predicates::annotations),
            Default::default(),
        );
        info!(namespace = ?ns, "controller starting");
        let ctx = ctx.clone();
        controllers.push(async move {
            Controller::for_stream(group_stream, reader)
                .owns_stream(dep_stream)
                .owns_stream(cm_stream)
                .owns_stream(pdb_stream)
                .shutdown_on_signal()
                .run(reconcile, error_policy, ctx)
                .for_each(|res| async move {
                    match res {
                        Ok((obj, _)) => debug!(object = %obj.name, "reconciled"),
                        Err(e) => debug!(error = %error_chain(&e), "reconcile error"),
                    }
                })
                .await;
        });
    }
    futures::future::join_all(controllers).await;
    info!("controller stopped");
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let got: Vec<u64> = [1, 2, 3, 4, 9, 10, 30]
            .iter()
            .map(|n| backoff_delay(*n).as_secs())
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 256, 300, 300]);
    }

    #[tokio::test]
    async fn event_recorders_are_per_note_and_bounded() {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let recorders = EventRecorders::new(Client::new(service, "default"), "test".into());
        let key = |note: usize| EventKey {
            regarding: [
                Some("KinesisConsumerGroup".into()),
                Some("ns".into()),
                Some("g".into()),
                None,
            ],
            type_: EventType::Normal,
            reason: "Rebalanced".into(),
            action: "Reconcile".into(),
            note: Some(format!("note {note}")),
        };
        let held = || lock(&recorders.cache).by_event.len();
        recorders.recorder(&key(0));
        recorders.recorder(&key(0));
        assert_eq!(held(), 1, "an identical event reuses its recorder (series)");
        recorders.recorder(&key(1));
        assert_eq!(held(), 2, "another note, another recorder");
        for n in 2..MAX_EVENT_RECORDERS + 10 {
            // Keep note 0 in use: the least recently used recorders go first.
            recorders.recorder(&key(0));
            recorders.recorder(&key(n));
        }
        let cache = lock(&recorders.cache);
        assert_eq!(cache.by_event.len(), MAX_EVENT_RECORDERS);
        assert!(cache.by_event.contains_key(&key(0)));
        assert!(!cache.by_event.contains_key(&key(1)));
        assert!(cache.by_event.contains_key(&key(MAX_EVENT_RECORDERS + 9)));
    }

    #[test]
    fn namespace_terminating_only_for_its_cause() {
        let status = |code: u16, cause: &str| -> kube::core::Status {
            serde_json::from_value(serde_json::json!({
                "code": code,
                "details": {"causes": [{"reason": cause}]}
            }))
            .unwrap()
        };
        let cases = [
            (status(403, "NamespaceTerminating"), true),
            (status(403, "FieldValueInvalid"), false),
            (status(422, "NamespaceTerminating"), false),
            (
                kube::core::Status {
                    code: 403,
                    ..Default::default()
                },
                false,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(crate::api_problem::namespace_terminating(&s), want, "{s:?}");
        }
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let e = Error::StoreAdmin {
            group: "ns/g".into(),
            source: StoreAdminError::Unprocessed {
                group: "ns/g".into(),
                table: "t".into(),
                left: 3,
            },
        };
        let chain = error_chain(&e);
        assert!(
            chain.starts_with("cleanup of ns/g: deleting rows"),
            "{chain}"
        );
        assert_eq!(
            chain.matches("3 rows still unprocessed").count(),
            1,
            "{chain}"
        );
    }
}
