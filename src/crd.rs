//! The `KinesisConsumerGroup` custom resource (`kcg.dev/v1alpha1`).
//!
//! The spec embeds the worker's own configuration types ([`StreamConfig`], [`StateStoreConfig`],
//! [`DeliveryConfig`], [`Tuning`]), so their JSON schema, defaults and CEL rules become the
//! CRD's, and [`KinesisConsumerGroup::worker_config`] renders exactly the type `kcg-worker`
//! parses. Only what is Kubernetes-specific (replicas, the pod template knobs, the delete
//! policy) lives here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DeploymentStrategy;
use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements,
    Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kcg_worker::config::{DeliveryConfig, StateStoreConfig, StreamConfig, Tuning, WorkerConfig};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the CRD.
pub const GROUP: &str = "kcg.dev";
/// API version of the CRD.
pub const VERSION: &str = "v1alpha1";
/// Most streams one group may read; bounds the cost of the CEL uniqueness rule.
pub const MAX_STREAMS: usize = 32;

/// Desired state of a Kinesis consumer group: which streams to read, where the group
/// coordinates, where records go, and how the worker pods look.
// One `printcolumn(...)` per column is how kube-derive takes them; clippy sees repeats.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kcg.dev",
    version = "v1alpha1",
    kind = "KinesisConsumerGroup",
    plural = "kinesisconsumergroups",
    singular = "kinesisconsumergroup",
    namespaced,
    shortname = "kcg",
    status = "KinesisConsumerGroupStatus",
    derive = "PartialEq",
    doc = "A Kinesis consumer group: kcg-worker pods that share the shards of one or more streams, coordinated through one DynamoDB table.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired worker replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready worker replicas"
    ),
    printcolumn(
        name = "Clients",
        type_ = "integer",
        json_path = ".status.clientCount",
        description = "Live clients in the state store"
    ),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        json_path = ".status.shardCount",
        description = "Consumable shards over all streams"
    ),
    printcolumn(
        name = "Max Lag",
        type_ = "string",
        json_path = ".status.maxLag",
        description = "Largest MillisBehindLatest over all shards"
    ),
    printcolumn(
        name = "Suspended",
        type_ = "boolean",
        json_path = ".spec.suspend",
        description = "Whether the workers are stopped by spec.suspend"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "The Ready condition"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KinesisConsumerGroupSpec {
    /// Number of worker pods. The scale subresource (`kubectl scale`, an HPA, KEDA) sets it.
    /// 0 stops the workers too, but `suspend` is the way to pause a group: it keeps this
    /// value for the resume.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Stops the workers (the Deployment goes to 0 pods) and keeps the checkpoints, without
    /// changing `replicas`, so an autoscaler keeps its value; setting it back to false
    /// resumes from the checkpoints. An HPA does not act on a target at 0 pods (the
    /// Kubernetes convention for a paused target).
    #[serde(default)]
    pub suspend: bool,
    /// The streams the group reads, each by name or ARN. Names must be unique.
    #[schemars(
        length(min = 1, max = 32),
        extend("x-kubernetes-validations" = [{
            "rule": "self.all(s, self.exists_one(t, t.name == s.name))",
            "message": "stream names must be unique: list each stream once"
        }])
    )]
    pub streams: Vec<StreamConfig>,
    /// The DynamoDB table that coordinates the group, and what happens to the group's rows
    /// in it when the KinesisConsumerGroup is deleted.
    pub state_store: StateStore,
    /// Where records go: exactly one of `stdout`, `http` or `multiLang`.
    pub delivery: DeliveryConfig,
    /// Intervals and limits; every field has a default.
    #[serde(default)]
    pub tuning: Tuning,
    /// The worker pods: image, resources, scheduling and extra containers (an http sink's
    /// sidecar lives here).
    #[serde(default)]
    pub worker: WorkerPodSpec,
}

fn default_replicas() -> i32 {
    1
}

/// The state store of the CR: the worker's table settings plus the delete policy, which only
/// the operator acts on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateStore {
    /// Table, region and whether to create it; passed to the workers as is.
    #[serde(flatten)]
    pub config: StateStoreConfig,
    /// What to do with the group's rows (leases, checkpoints, clients) when the
    /// KinesisConsumerGroup is deleted. `Retain` (the default) keeps checkpoints, so a group
    /// recreated under the same namespace/name resumes where it stopped.
    #[serde(default)]
    pub on_delete: OnDelete,
}

/// Delete policy for a group's state-store rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnDelete {
    /// Keep the rows.
    #[default]
    Retain,
    /// Remove the group's rows once its workers are gone.
    Delete,
}

/// How the worker pods look. Everything is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSpec {
    /// The kcg-worker image; defaults to the image the operator was configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Secrets for pulling the worker (and extra containers') images from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// CPU and memory of the worker container. Unset: requests of cpu 100m and memory 64Mi
    /// and a memory limit of 256Mi (a worker's resident memory is about 36 MiB), so the
    /// pods are Burstable and an HPA has requests to compute utilization from. No CPU
    /// limit: throttling would only delay heartbeats. Set, it replaces these as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The worker container's command; default `[kcg-worker]`. Set it to run an image built
    /// on the kcg-worker library with a binary of another name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The worker container's arguments; default `[run, --config, /etc/kcg/config.yaml]`
    /// (the rendered config is mounted there whatever the command).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment of the worker container from whole ConfigMaps or Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Extra volumes of the pods, for the worker's `volumeMounts` and the extra and init
    /// containers. `config` and `tmp` are the operator's names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Extra mounts of the worker container (`/etc/kcg` and `/tmp` are taken).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Init containers. One with `restartPolicy: Always` is a native sidecar: it starts
    /// before the worker and stops after it, which is how the http sink's consumer should
    /// run, so the worker's last batch is delivered and checkpointed during shutdown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
    /// The Deployment's strategy. Default: RollingUpdate with maxSurge 1 and maxUnavailable
    /// 0, so a new worker joins before an old one leaves and shards move by graceful
    /// handoff, never all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<DeploymentStrategy>,
    /// The workers' PodDisruptionBudget, `{enabled, maxUnavailable | minAvailable}` (each a
    /// number or a percentage). Default: one with maxUnavailable 1 whenever replicas > 1
    /// and the group is not suspended, so a node drain stops one worker at a time; none for
    /// a single worker, whose budget would block every drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<PodDisruptionBudgetSpec>,
    /// Extra environment of the worker container, e.g. AWS_REGION or RUST_LOG.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Service account of the pods; where IRSA / pod identity gives the workers AWS access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra labels on the pods (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Node selector of the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Topology spread of the pods, e.g. across zones so one zone outage stops few readers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Containers added next to the worker, e.g. the http sink's consumer listening on
    /// localhost. They get the restricted security context unless they set their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_containers: Vec<Container>,
}

/// The workers' PodDisruptionBudget. The operator renders one only when the group has more
/// than one replica (a budget for a single pod blocks every drain) and is not suspended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.maxUnavailable) && has(self.minAvailable))",
    "message": "podDisruptionBudget: set at most one of maxUnavailable or minAvailable"
}]))]
pub struct PodDisruptionBudgetSpec {
    /// Whether to have a budget at all; default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Workers (a number or a percentage) that may be down at once; default 1 when
    /// neither this nor `minAvailable` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Workers (a number or a percentage) that must stay up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
}

fn default_true() -> bool {
    true
}

/// Kubernetes image pull policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the image is missing on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The value as the Kubernetes API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Observed state, written by the operator from the Deployment and the state-store table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct KinesisConsumerGroupStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods that exist (the Deployment's replicas); the scale subresource reads it.
    pub replicas: i32,
    /// Worker pods that are ready.
    pub ready_replicas: i32,
    /// Label selector of the worker pods, as a string, for the scale subresource (HPA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Live clients registered in the state store.
    pub client_count: i32,
    /// Consumable shards (open, or closed and still draining) over all streams.
    pub shard_count: i32,
    /// Largest lag over all shards, human readable (e.g. `1.2s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,
    /// Largest lag over all shards in milliseconds (MillisBehindLatest): the number to
    /// alert or autoscale on; `maxLag` is the same value for people (the printer column).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lag_millis: Option<i64>,
    /// Client id of the leader (lowest sorted live client id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Live clients, sorted by id (their index).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientStatus>,
    /// Per-stream shard, range and lag summary.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamStatus>,
    /// Ready, Balanced, Progressing and Degraded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One live client of the group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    /// Client id. One per pod, derived from its UID (a worker container restarted in its pod
    /// keeps it); a worker started without `POD_UID` gets a new one per process.
    pub id: String,
    /// Pod the client runs in.
    pub pod: String,
    /// Position in the sorted client list; 0 is the leader.
    pub index: i32,
    /// Time of the last heartbeat (RFC 3339), as the client reported it.
    pub last_heartbeat: String,
    /// Leases the client holds.
    pub owned_shards: i32,
    /// Last error the client reported, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Shards, ranges and lag of one stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// The stream as named in the spec.
    pub name: String,
    /// Open shards.
    pub open_shards: i32,
    /// Closed shards not yet read to their end (children wait for them).
    pub closed_shards_draining: i32,
    /// Contiguous runs of shards per owner, in shard order (compact for big streams).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<ShardRange>,
    /// Largest MillisBehindLatest over the stream's shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_millis: Option<i64>,
    /// Shard with that lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_shard: Option<String>,
}

/// A run of consecutive shards (in shard-id order) with one owner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardRange {
    /// Owning client id; empty when the shards are unowned.
    pub client: String,
    /// First shard id of the run.
    pub first: String,
    /// Last shard id of the run.
    pub last: String,
    /// Shards in the run.
    pub count: i32,
}

impl KinesisConsumerGroup {
    /// The group id the workers use as the state-store partition key: `namespace/name`.
    pub fn group_id(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_else(|| "default".to_owned()),
            self.name_any()
        )
    }

    /// The worker configuration this group renders into its ConfigMap: the same type
    /// `kcg-worker` parses.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            group: self.group_id(),
            streams: self.spec.streams.clone(),
            state_store: self.spec.state_store.config.clone(),
            delivery: self.spec.delivery.clone(),
            tuning: self.spec.tuning.clone(),
        }
    }
}

/// The CRD as YAML: what `kcg-operator crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&KinesisConsumerGroup::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcg_worker::config::StdoutSink;

    fn group() -> KinesisConsumerGroup {
        let spec: KinesisConsumerGroupSpec = serde_yaml::from_str(
            "streams: [{name: orders}]\nstateStore: {table: kcg-state}\ndelivery: {stdout: {}}\n",
        )
        .unwrap();
        let mut g = KinesisConsumerGroup::new("orders", spec);
        g.metadata.namespace = Some("shop".into());
        g
    }

    #[test]
    fn spec_defaults() {
        let g = group();
        assert_eq!(g.spec.replicas, 1);
        assert_eq!(g.spec.state_store.on_delete, OnDelete::Retain);
        assert!(!g.spec.state_store.config.create);
        assert_eq!(g.spec.tuning, Tuning::default());
        assert_eq!(g.spec.worker, WorkerPodSpec::default());
        assert_eq!(g.spec.delivery.stdout, Some(StdoutSink {}));
    }

    #[test]
    fn worker_config_uses_namespace_slash_name() {
        let cfg = group().worker_config();
        assert_eq!(cfg.group, "shop/orders");
        assert_eq!(cfg.streams[0].name, "orders");
        assert_eq!(cfg.state_store.table, "kcg-state");
        cfg.validate().unwrap();
        // The rendered YAML must parse back into the same config.
        let back = WorkerConfig::from_yaml(&cfg.to_yaml().unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn compound_durations_survive_the_config_map() {
        let spec: KinesisConsumerGroupSpec = serde_yaml::from_str(
            "streams: [{name: orders}]\nstateStore: {table: kcg-state}\ndelivery: {http: {url: 'http://localhost:9000', timeout: 1m30s}}\ntuning: {clientTimeout: 1h2m3s, pollInterval: 250ms}\n",
        )
        .unwrap();
        let mut g = KinesisConsumerGroup::new("orders", spec);
        g.metadata.namespace = Some("shop".into());
        let cfg = g.worker_config();
        assert_eq!(
            cfg.tuning.client_timeout,
            std::time::Duration::from_secs(3723)
        );
        assert_eq!(
            cfg.delivery.http.as_ref().unwrap().timeout,
            std::time::Duration::from_secs(90)
        );
        assert_eq!(
            WorkerConfig::from_yaml(&cfg.to_yaml().unwrap()).unwrap(),
            cfg
        );
    }

    #[test]
    fn on_delete_is_flattened_next_to_table() {
        let v = serde_json::to_value(&group().spec.state_store).unwrap();
        assert_eq!(v["table"], "kcg-state");
        assert_eq!(v["onDelete"], "Retain");
    }

    #[test]
    fn crd_yaml_names_the_kind() {
        let y = crd_yaml().unwrap();
        assert!(y.contains("kind: KinesisConsumerGroup"));
        assert!(y.contains("name: kinesisconsumergroups.kcg.dev"));
    }
}
