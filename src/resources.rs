//! The objects a `KinesisConsumerGroup` owns: the ConfigMap holding the rendered worker config
//! and the Deployment running `kcg-worker`; and the default worker ServiceAccount the
//! operator creates in a group's namespace when it is missing (owned by no group).
//!
//! Pure functions from the CR (plus operator settings) to desired objects, so the reconciler
//! only applies them and tests can check every field without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccount,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kcg_worker::config::{ConfigError, ORIGIN_ENV, WorkerConfig};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::KinesisConsumerGroup;

/// Key of the worker config in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the ConfigMap is mounted in the worker container.
pub const CONFIG_DIR: &str = "/etc/kcg";
/// Pod-template annotation carrying the config hash, so a config change rolls the workers.
pub const CONFIG_HASH_ANNOTATION: &str = "kcg.dev/config-hash";
/// Label naming the group on every owned object and pod.
pub const GROUP_LABEL: &str = "kcg.dev/group";
/// Name of the worker container.
pub const WORKER_CONTAINER: &str = "worker";
/// Name (and number) of the worker's metrics and health port.
pub const METRICS_PORT_NAME: &str = "metrics";
/// The worker's metrics and health port.
pub const METRICS_PORT: i32 = 8080;
/// UID and GID the workers run as (distroless `nonroot`).
pub const RUN_AS_USER: i64 = 65532;
/// Label naming who manages an object; on the worker ServiceAccount the operator makes it
/// is [`MANAGED_BY`], which is how the operator tells its own accounts from others.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on what the operator makes.
pub const MANAGED_BY: &str = "kcg-operator";
/// CPU request of the worker container when `spec.worker.resources` is unset.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Memory request of the worker container when `spec.worker.resources` is unset: about
/// twice a worker's measured resident memory (~36 MiB).
pub const DEFAULT_MEMORY_REQUEST: &str = "64Mi";
/// Memory limit of the worker container when `spec.worker.resources` is unset: room for
/// large batches, and a bound on a leak before it hurts the node.
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";
/// Seconds added to the worker's shutdown bound for the grace period, so Kubernetes never
/// SIGKILLs a worker that is still releasing leases.
pub const GRACE_MARGIN_SECONDS: i64 = 10;

/// How the operator was configured (flags, chart values); not part of any CR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSettings {
    /// Worker image used when `spec.worker.image` is not set.
    pub worker_image: String,
    /// Service account for worker pods when `spec.worker.serviceAccountName` is not set
    /// (where IRSA annotations go). `None` leaves the namespace default.
    pub worker_service_account: Option<String>,
    /// Annotations of the worker service account the operator creates and keeps (e.g. the
    /// IRSA role ARN; the chart passes its `workerServiceAccount.annotations`).
    pub worker_service_account_annotations: BTreeMap<String, String>,
    /// Whether the operator creates [`Self::worker_service_account`] in each namespace with
    /// a group using it, and keeps the annotations of the ones it made in sync. `false`:
    /// the user provides the account and the operator never reads or writes it.
    pub create_worker_service_account: bool,
}

impl OperatorSettings {
    /// Settings with a worker image and no default service account.
    pub fn new(worker_image: impl Into<String>) -> Self {
        Self {
            worker_image: worker_image.into(),
            worker_service_account: None,
            worker_service_account_annotations: BTreeMap::new(),
            create_worker_service_account: true,
        }
    }
}

/// The default worker ServiceAccount `name` as the operator applies it in namespace `ns`:
/// the configured annotations, no API token (workers never call the Kubernetes API), and no
/// owner reference, since every group of the namespace uses it.
pub fn worker_service_account(ns: &str, name: &str, settings: &OperatorSettings) -> ServiceAccount {
    let labels = [
        (MANAGED_BY_LABEL, MANAGED_BY),
        ("app.kubernetes.io/component", "worker"),
        ("app.kubernetes.io/part-of", "kcg"),
    ];
    let annotations = &settings.worker_service_account_annotations;
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            annotations: (!annotations.is_empty()).then(|| annotations.clone()),
            ..ObjectMeta::default()
        },
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// Whether an existing worker ServiceAccount must be applied again: it is the operator's
/// ([`MANAGED_BY_LABEL`] is [`MANAGED_BY`]) and lacks one of the configured annotations or
/// holds another value (say the IRSA role changed with `helm upgrade`). An account the
/// operator did not make (the user's, or one an older chart rendered, managed by Helm) is
/// never touched. Only missing or different annotations count: one the settings no longer
/// name is not looked for (the apply would drop it, as the field manager's, but nothing
/// triggers that apply).
pub fn worker_service_account_is_stale(
    existing: &ServiceAccount,
    settings: &OperatorSettings,
) -> bool {
    let ours = existing
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY);
    let annotations = existing.annotations();
    ours && settings
        .worker_service_account_annotations
        .iter()
        .any(|(k, v)| annotations.get(k) != Some(v))
}

/// Name of the group's Deployment (the same as the group's).
pub fn deployment_name(kcg: &KinesisConsumerGroup) -> String {
    kcg.name_any()
}

/// Name of the group's ConfigMap.
pub fn config_map_name(kcg: &KinesisConsumerGroup) -> String {
    format!("{}-config", kcg.name_any())
}

/// Labels that select the group's pods. Kept minimal and stable: a Deployment's selector is
/// immutable.
pub fn selector_labels(kcg: &KinesisConsumerGroup) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kcg-worker".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), kcg.name_any()),
    ])
}

/// Labels on every object the group owns, and on its pods.
pub fn labels(kcg: &KinesisConsumerGroup) -> BTreeMap<String, String> {
    let mut l = selector_labels(kcg);
    l.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "kcg-operator".to_owned(),
    );
    l.insert(GROUP_LABEL.to_owned(), kcg.name_any());
    l
}

/// The pod selector as a string (`k=v,k=v`), for `.status.selector` and so for the scale
/// subresource that an HPA reads.
pub fn selector_string(kcg: &KinesisConsumerGroup) -> String {
    selector_labels(kcg)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Hex SHA-256 of the rendered config; it changes exactly when the config text does.
pub fn config_hash(config_yaml: &str) -> String {
    let digest = Sha256::digest(config_yaml.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Metadata shared by the owned objects: namespace, labels, controller owner reference.
pub(crate) fn owned_meta(kcg: &KinesisConsumerGroup, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: kcg.namespace(),
        labels: Some(labels(kcg)),
        // None only for an object that was never stored (no uid), e.g. in a dry render.
        owner_references: kcg.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The ConfigMap holding `config.yaml`, the worker config rendered by the worker's own type.
pub fn config_map(
    kcg: &KinesisConsumerGroup,
    config: &WorkerConfig,
) -> Result<ConfigMap, ConfigError> {
    Ok(config_map_from_yaml(kcg, config.to_yaml()?))
}

/// The ConfigMap for an already rendered config (so the hash and the data come from one text).
pub fn config_map_from_yaml(kcg: &KinesisConsumerGroup, config_yaml: String) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(kcg, config_map_name(kcg)),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config_yaml)])),
        ..ConfigMap::default()
    }
}

/// Everything the reconciler applies for one group.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The worker config.
    pub config: WorkerConfig,
    /// Hash of the rendered config text.
    pub config_hash: String,
    /// The ConfigMap.
    pub config_map: ConfigMap,
    /// The Deployment.
    pub deployment: Deployment,
}

/// Renders the config, its ConfigMap and the Deployment from one config text.
pub fn render(
    kcg: &KinesisConsumerGroup,
    settings: &OperatorSettings,
) -> Result<Rendered, ConfigError> {
    let config = kcg.worker_config();
    let yaml = config.to_yaml()?;
    let config_hash = config_hash(&yaml);
    let deployment = deployment(kcg, settings, &config_hash);
    Ok(Rendered {
        config,
        config_map: config_map_from_yaml(kcg, yaml),
        config_hash,
        deployment,
    })
}

/// The security context of the restricted Pod Security Standard, for a container.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, initial_delay: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(METRICS_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Grace period: the worker's shutdown bound rounded up, plus a margin.
pub fn termination_grace_seconds(kcg: &KinesisConsumerGroup) -> i64 {
    let shutdown = kcg.spec.tuning.shutdown_timeout;
    let secs = shutdown.as_secs() + u64::from(shutdown.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX - GRACE_MARGIN_SECONDS) + GRACE_MARGIN_SECONDS
}

/// Replicas the Deployment runs: `spec.replicas`, or 0 while `spec.suspend` is set.
pub fn effective_replicas(kcg: &KinesisConsumerGroup) -> i32 {
    if kcg.spec.suspend {
        0
    } else {
        kcg.spec.replicas
    }
}

/// The worker container's resources: the spec's as a whole, or the defaults (requests so
/// the pods are not BestEffort and an HPA can compute utilization; a memory limit; no CPU
/// limit, whose throttling would only delay heartbeats).
pub fn worker_resources(spec: Option<&ResourceRequirements>) -> ResourceRequirements {
    if let Some(r) = spec {
        return r.clone();
    }
    let q = |v: &str| Quantity(v.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q(DEFAULT_CPU_REQUEST)),
            ("memory".to_owned(), q(DEFAULT_MEMORY_REQUEST)),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            q(DEFAULT_MEMORY_LIMIT),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The Deployment strategy: the spec's, or a rolling update that adds a worker before it
/// removes one (maxSurge 1, maxUnavailable 0), so leases move by graceful handoff to a
/// worker that is already up instead of waiting for a replacement.
pub fn strategy(spec: Option<&DeploymentStrategy>) -> DeploymentStrategy {
    spec.cloned().unwrap_or_else(|| DeploymentStrategy {
        type_: Some("RollingUpdate".to_owned()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    })
}

/// The worker's command line: the spec's command and args, each defaulting on its own to
/// `kcg-worker` and `run --config <mounted config>`.
pub fn worker_command(command: &[String], args: &[String]) -> (Vec<String>, Vec<String>) {
    let command = if command.is_empty() {
        vec!["kcg-worker".to_owned()]
    } else {
        command.to_vec()
    };
    let args = if args.is_empty() {
        vec![
            "run".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]
    } else {
        args.to_vec()
    };
    (command, args)
}

/// A user container with the restricted security context unless it sets its own.
fn restricted_unless_set(mut c: Container) -> Container {
    if c.security_context.is_none() {
        c.security_context = Some(restricted_container_security());
    }
    c
}

/// The worker container.
fn worker_container(kcg: &KinesisConsumerGroup, settings: &OperatorSettings) -> Container {
    let w = &kcg.spec.worker;
    // Ours first; a user entry with the same name replaces ours in place, so the list never
    // holds a name twice (the API server warns on duplicates, and only the last one counts).
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // Proves "same pod" to a restarted container: the kubelet starts it only after the
        // previous one exited, so it takes its predecessor's leases at once (see the
        // worker's `membership::Identity`).
        field_env("POD_UID", "metadata.uid"),
        // Structured logs for the cluster's log pipeline; `spec.worker.env` may override.
        EnvVar {
            name: "KCG_LOG_FORMAT".to_owned(),
            value: Some("json".to_owned()),
            ..EnvVar::default()
        },
        // The mounted config is ours: a field that this worker image does not know yet (the
        // operator upgraded first) is a warning in its log, not a crash loop.
        EnvVar {
            name: ORIGIN_ENV.to_owned(),
            value: Some("operator".to_owned()),
            ..EnvVar::default()
        },
    ];
    for user in &w.env {
        match env.iter_mut().find(|e| e.name == user.name) {
            Some(slot) => *slot = user.clone(),
            None => env.push(user.clone()),
        }
    }
    let (command, args) = worker_command(&w.command, &w.args);
    let mut volume_mounts = vec![
        VolumeMount {
            name: "config".to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        // The root filesystem is read-only; give the process a scratch directory.
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    volume_mounts.extend(w.volume_mounts.iter().cloned());
    Container {
        name: WORKER_CONTAINER.to_owned(),
        image: Some(
            w.image
                .clone()
                .unwrap_or_else(|| settings.worker_image.clone()),
        ),
        image_pull_policy: w.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(command),
        args: Some(args),
        env: Some(env),
        env_from: (!w.env_from.is_empty()).then(|| w.env_from.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(METRICS_PORT_NAME.to_owned()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 2, 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 10, 3)),
        resources: Some(worker_resources(w.resources.as_ref())),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    }
}

/// The worker Deployment. `config_hash` goes on the pod template, so a config change rolls
/// the pods.
pub fn deployment(
    kcg: &KinesisConsumerGroup,
    settings: &OperatorSettings,
    config_hash: &str,
) -> Deployment {
    let w = &kcg.spec.worker;

    // User labels first, ours on top: the selector labels must not be overridden.
    let mut pod_labels = w.pod_labels.clone();
    pod_labels.extend(labels(kcg));
    let mut pod_annotations = w.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned());

    let mut containers = vec![worker_container(kcg, settings)];
    containers.extend(
        w.extra_containers
            .iter()
            .cloned()
            .map(restricted_unless_set),
    );
    let init_containers: Vec<Container> = w
        .init_containers
        .iter()
        .cloned()
        .map(restricted_unless_set)
        .collect();
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(kcg),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    volumes.extend(w.volumes.iter().cloned());

    let pod = PodSpec {
        containers,
        service_account_name: w
            .service_account_name
            .clone()
            .or_else(|| settings.worker_service_account.clone()),
        // Workers talk to AWS, never to the Kubernetes API.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(termination_grace_seconds(kcg)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            fs_group: Some(RUN_AS_USER),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        node_selector: (!w.node_selector.is_empty()).then(|| w.node_selector.clone()),
        tolerations: (!w.tolerations.is_empty()).then(|| w.tolerations.clone()),
        affinity: w.affinity.clone(),
        topology_spread_constraints: (!w.topology_spread_constraints.is_empty())
            .then(|| w.topology_spread_constraints.clone()),
        priority_class_name: w.priority_class_name.clone(),
        image_pull_secrets: (!w.image_pull_secrets.is_empty())
            .then(|| w.image_pull_secrets.clone()),
        volumes: Some(volumes),
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        ..PodSpec::default()
    };

    Deployment {
        metadata: owned_meta(kcg, deployment_name(kcg)),
        spec: DeploymentSpec {
            replicas: Some(effective_replicas(kcg)),
            revision_history_limit: Some(3),
            strategy: Some(strategy(w.strategy.as_ref())),
            selector: LabelSelector {
                match_labels: Some(selector_labels(kcg)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::KinesisConsumerGroupSpec;

    const BASE: &str = "
streams: [{name: orders}]
stateStore: {table: kcg-state}
delivery: {stdout: {}}
";

    fn group(spec_yaml: &str) -> KinesisConsumerGroup {
        let spec: KinesisConsumerGroupSpec = serde_yaml::from_str(spec_yaml).unwrap();
        let mut g = KinesisConsumerGroup::new("orders", spec);
        g.metadata.namespace = Some("shop".into());
        g.metadata.uid = Some("1234-uid".into());
        g
    }

    fn settings() -> OperatorSettings {
        OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:0.1.0")
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.template.spec.as_ref().unwrap()
    }

    fn hash_of(spec_yaml: &str) -> String {
        render(&group(spec_yaml), &settings()).unwrap().config_hash
    }

    #[test]
    fn config_hash_follows_the_worker_config() {
        let base = hash_of(BASE);
        let cases = [
            ("same spec", BASE.to_owned(), true),
            ("replicas only", format!("{BASE}replicas: 5\n"), true),
            (
                "worker pod only",
                format!("{BASE}worker: {{image: other:1}}\n"),
                true,
            ),
            (
                "stream added",
                BASE.replace("[{name: orders}]", "[{name: orders}, {name: refunds}]"),
                false,
            ),
            (
                "table changed",
                BASE.replace("kcg-state", "other-table"),
                false,
            ),
            (
                "tuning changed",
                format!("{BASE}tuning: {{pollInterval: 2s}}\n"),
                false,
            ),
            (
                "delivery changed",
                BASE.replace("{stdout: {}}", "{http: {url: 'http://localhost:9000/r'}}"),
                false,
            ),
        ];
        for (name, spec, same) in cases {
            assert_eq!(hash_of(&spec) == base, same, "{name}");
        }
        assert_eq!(base.len(), 64);
    }

    #[test]
    fn hash_is_on_the_pod_template() {
        let r = render(&group(BASE), &settings()).unwrap();
        let ann = r
            .deployment
            .spec
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap();
        assert_eq!(ann[CONFIG_HASH_ANNOTATION], r.config_hash);
        assert_eq!(
            r.config_hash,
            config_hash(&r.config_map.data.unwrap()[CONFIG_KEY])
        );
    }

    #[test]
    fn replicas_follow_the_spec() {
        for n in [0, 1, 7] {
            let d = deployment(&group(&format!("{BASE}replicas: {n}\n")), &settings(), "h");
            assert_eq!(d.spec.replicas, Some(n));
        }
    }

    #[test]
    fn suspend_stops_the_pods_and_keeps_replicas() {
        let cases = [
            ("replicas: 3\n", 3),
            ("replicas: 3\nsuspend: false\n", 3),
            ("replicas: 3\nsuspend: true\n", 0),
            ("replicas: 0\nsuspend: true\n", 0),
        ];
        for (extra, want) in cases {
            let g = group(&format!("{BASE}{extra}"));
            let d = deployment(&g, &settings(), "h");
            assert_eq!(d.spec.replicas, Some(want), "{extra:?}");
        }
    }

    #[test]
    fn default_resources_unless_the_spec_sets_them() {
        let q = |v: &str| Quantity(v.to_owned());
        let d = deployment(&group(BASE), &settings(), "h");
        let r = pod(&d).containers[0].resources.clone().unwrap();
        let requests = r.requests.unwrap();
        assert_eq!(requests["cpu"], q("100m"));
        assert_eq!(requests["memory"], q("64Mi"));
        let limits = r.limits.unwrap();
        assert_eq!(limits["memory"], q("256Mi"));
        assert!(!limits.contains_key("cpu"), "no CPU limit: no throttling");
        let own = format!("{BASE}worker: {{resources: {{limits: {{memory: 1Gi}}}}}}\n");
        let d = deployment(&group(&own), &settings(), "h");
        let r = pod(&d).containers[0].resources.clone().unwrap();
        assert_eq!(
            r.requests, None,
            "the spec's resources replace ours as a whole"
        );
        assert_eq!(r.limits.unwrap()["memory"], q("1Gi"));
    }

    #[test]
    fn strategy_surges_one_before_stopping_one_by_default() {
        let d = deployment(&group(BASE), &settings(), "h");
        let s = d.spec.strategy.unwrap();
        assert_eq!(s.type_.as_deref(), Some("RollingUpdate"));
        let ru = s.rolling_update.unwrap();
        assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        let own = format!("{BASE}worker: {{strategy: {{type: Recreate}}}}\n");
        let s = deployment(&group(&own), &settings(), "h")
            .spec
            .strategy
            .unwrap();
        assert_eq!(s.type_.as_deref(), Some("Recreate"));
        assert_eq!(s.rolling_update, None);
    }

    #[test]
    fn command_and_args_default_each_on_their_own() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let default_args = s(&["run", "--config", "/etc/kcg/config.yaml"]);
        let cases = [
            (vec![], vec![], s(&["kcg-worker"]), default_args.clone()),
            (
                s(&["my-consumer"]),
                vec![],
                s(&["my-consumer"]),
                default_args,
            ),
            (
                s(&["my-consumer"]),
                s(&["serve", "-c", "/etc/kcg/config.yaml"]),
                s(&["my-consumer"]),
                s(&["serve", "-c", "/etc/kcg/config.yaml"]),
            ),
            (vec![], s(&["check"]), s(&["kcg-worker"]), s(&["check"])),
        ];
        for (command, args, want_command, want_args) in cases {
            assert_eq!(
                worker_command(&command, &args),
                (want_command, want_args),
                "{command:?} {args:?}"
            );
        }
        let spec = format!("{BASE}worker: {{command: [my-consumer]}}\n");
        let d = deployment(&group(&spec), &settings(), "h");
        assert_eq!(
            pod(&d).containers[0].command,
            Some(vec!["my-consumer".to_owned()])
        );
    }

    #[test]
    fn volumes_env_from_and_init_containers_are_added_to_ours() {
        let spec = format!(
            "{BASE}worker:
  envFrom: [{{secretRef: {{name: sink-token}}}}]
  volumes: [{{name: certs, secret: {{secretName: ca}}}}]
  volumeMounts: [{{name: certs, mountPath: /etc/certs, readOnly: true}}]
  initContainers:
  - {{name: migrate, image: tool:1}}
  - {{name: consumer, image: consumer:1, restartPolicy: Always}}
  - {{name: own, image: own:1, securityContext: {{runAsUser: 1000}}}}
"
        );
        let d = deployment(&group(&spec), &settings(), "h");
        let p = pod(&d);
        assert_eq!(
            p.volumes
                .iter()
                .flatten()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["config", "tmp", "certs"]
        );
        let c = &p.containers[0];
        assert_eq!(
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect::<Vec<_>>(),
            ["/etc/kcg", "/tmp", "/etc/certs"]
        );
        let env_from = c.env_from.as_ref().unwrap();
        assert_eq!(env_from[0].secret_ref.as_ref().unwrap().name, "sink-token");
        let init = p.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 3);
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        for c in &init[..2] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
        }
        assert_eq!(
            init[2].security_context.as_ref().unwrap().run_as_user,
            Some(1000)
        );
        let bare = deployment(&group(BASE), &settings(), "h");
        assert_eq!(pod(&bare).init_containers, None);
        assert_eq!(pod(&bare).containers[0].env_from, None);
    }

    #[test]
    fn config_map_holds_the_worker_yaml() {
        let g = group(BASE);
        let cm = config_map(&g, &g.worker_config()).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("orders-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
        let parsed = WorkerConfig::from_yaml(&cm.data.unwrap()[CONFIG_KEY]).unwrap();
        assert_eq!(parsed, g.worker_config());
        assert_eq!(parsed.group, "shop/orders");
    }

    #[test]
    fn owner_reference_is_the_controller() {
        let r = render(&group(BASE), &settings()).unwrap();
        for meta in [&r.deployment.metadata, &r.config_map.metadata] {
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "KinesisConsumerGroup");
            assert_eq!(owners[0].api_version, "kcg.dev/v1alpha1");
            assert_eq!(owners[0].name, "orders");
            assert_eq!(owners[0].uid, "1234-uid");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(meta.labels.as_ref().unwrap()[GROUP_LABEL], "orders");
        }
    }

    #[test]
    fn selector_matches_pod_labels() {
        let g = group(&format!(
            "{BASE}worker: {{podLabels: {{team: data, app.kubernetes.io/name: evil}}}}\n"
        ));
        let d = deployment(&g, &settings(), "h");
        let spec = d.spec;
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.match_labels.unwrap() {
            assert_eq!(pod_labels[&k], v, "selector label {k}");
        }
        assert_eq!(pod_labels["team"], "data");
        assert_eq!(
            pod_labels["app.kubernetes.io/name"], "kcg-worker",
            "our labels win"
        );
        assert_eq!(
            selector_string(&g),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/name=kcg-worker"
        );
    }

    #[test]
    fn worker_container_runs_the_mounted_config() {
        let d = deployment(&group(BASE), &settings(), "h");
        let p = pod(&d);
        let c = &p.containers[0];
        assert_eq!(c.name, WORKER_CONTAINER);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/kcg-dev/kcg-worker:0.1.0"));
        let cmd: Vec<_> = c
            .command
            .iter()
            .chain(c.args.iter())
            .flatten()
            .cloned()
            .collect();
        assert_eq!(
            cmd,
            ["kcg-worker", "run", "--config", "/etc/kcg/config.yaml"]
        );
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "config")
            .unwrap();
        assert_eq!(mount.mount_path, CONFIG_DIR);
        assert_eq!(mount.read_only, Some(true));
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "config")
            .unwrap();
        assert_eq!(vol.config_map.as_ref().unwrap().name, "orders-config");
    }

    #[test]
    fn probes_and_named_metrics_port() {
        let d = deployment(&group(BASE), &settings(), "h");
        let c = &pod(&d).containers[0];
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("metrics"), 8080)
        );
        for (probe, path) in [
            (&c.readiness_probe, "/readyz"),
            (&c.liveness_probe, "/healthz"),
        ] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("metrics".into()));
        }
    }

    #[test]
    fn user_env_replaces_ours_without_duplicates() {
        let spec = format!(
            "{BASE}worker: {{env: [{{name: AWS_REGION, value: us-west-2}}, {{name: POD_NAME, value: fixed}}]}}\n"
        );
        let env = pod(&deployment(&group(&spec), &settings(), "h")).containers[0]
            .env
            .clone()
            .unwrap();
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "POD_UID",
                "KCG_LOG_FORMAT",
                "KCG_CONFIG_ORIGIN",
                "AWS_REGION"
            ]
        );
        assert_eq!(env[0].value.as_deref(), Some("fixed"));
        assert_eq!(env[4].value.as_deref(), Some("operator"));
        assert_eq!(env[5].value.as_deref(), Some("us-west-2"));
    }

    /// The worker reads the marker as "this config is the operator's": unknown fields in it
    /// are warnings (rolling upgrade), see `kcg_worker::config::ConfigOrigin`.
    #[test]
    fn env_marks_the_config_as_the_operators() {
        use clap::ValueEnum;
        use kcg_worker::config::ConfigOrigin;
        let env = pod(&deployment(&group(BASE), &settings(), "h")).containers[0]
            .env
            .clone()
            .unwrap();
        let marker = env.iter().find(|e| e.name == ORIGIN_ENV).unwrap();
        let value = marker.value.as_deref().unwrap();
        assert_eq!(
            ConfigOrigin::from_str(value, false),
            Ok(ConfigOrigin::Operator)
        );
    }

    #[test]
    fn env_has_downward_api_then_user_env() {
        let g = group(&format!(
            "{BASE}worker: {{env: [{{name: RUST_LOG, value: debug}}]}}\n"
        ));
        let d = deployment(&g, &settings(), "h");
        let env = pod(&d).containers[0].env.clone().unwrap();
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "POD_UID",
                "KCG_LOG_FORMAT",
                "KCG_CONFIG_ORIGIN",
                "RUST_LOG"
            ]
        );
        let field = |i: usize| {
            env[i]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path
                .clone()
        };
        assert_eq!(field(0), "metadata.name");
        assert_eq!(field(1), "metadata.namespace");
        assert_eq!(field(2), "metadata.uid");
        assert_eq!(env[3].value.as_deref(), Some("json"));
        assert_eq!(env[5].value.as_deref(), Some("debug"));
    }

    #[test]
    fn grace_period_exceeds_shutdown_bound() {
        let cases = [
            ("", 30),
            ("tuning: {shutdownTimeout: 45s}\n", 55),
            ("tuning: {shutdownTimeout: 1500ms}\n", 12),
        ];
        for (extra, want) in cases {
            let d = deployment(&group(&format!("{BASE}{extra}")), &settings(), "h");
            assert_eq!(
                pod(&d).termination_grace_period_seconds,
                Some(want),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn restricted_security_everywhere() {
        let spec = format!(
            "{BASE}worker:\n  extraContainers:\n  - {{name: sink, image: sink:1}}\n  - {{name: own, image: own:1, securityContext: {{runAsUser: 1000}}}}\n"
        );
        let d = deployment(&group(&spec), &settings(), "h");
        let p = pod(&d);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(p.containers.len(), 3);
        for c in &p.containers[..2] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop,
                Some(vec!["ALL".to_owned()])
            );
        }
        let own = p.containers[2].security_context.as_ref().unwrap();
        assert_eq!(
            own.run_as_user,
            Some(1000),
            "a container's own securityContext is kept"
        );
        assert_eq!(own.read_only_root_filesystem, None);
    }

    #[test]
    fn pod_knobs_come_from_spec_worker() {
        let spec = format!(
            "{BASE}worker:
  image: my/worker:2
  imagePullPolicy: Always
  serviceAccountName: kcg-irsa
  podAnnotations: {{a: b}}
  nodeSelector: {{disk: ssd}}
  tolerations: [{{key: dedicated, operator: Equal, value: kcg, effect: NoSchedule}}]
  affinity: {{podAntiAffinity: {{preferredDuringSchedulingIgnoredDuringExecution: [{{weight: 1, podAffinityTerm: {{topologyKey: kubernetes.io/hostname}}}}]}}}}
  resources: {{requests: {{cpu: 100m}}}}
  imagePullSecrets: [{{name: registry}}]
  priorityClassName: high
  topologySpreadConstraints: [{{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}}]
"
        );
        let d = deployment(&group(&spec), &settings(), "h");
        let tpl = d.spec.template.clone();
        let p = tpl.spec.unwrap();
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("my/worker:2"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert!(
            c.resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()
                .contains_key("cpu")
        );
        assert_eq!(p.service_account_name.as_deref(), Some("kcg-irsa"));
        assert_eq!(p.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(p.tolerations.unwrap()[0].key.as_deref(), Some("dedicated"));
        assert!(p.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(p.image_pull_secrets.unwrap()[0].name, "registry");
        assert_eq!(p.priority_class_name.as_deref(), Some("high"));
        assert_eq!(
            p.topology_spread_constraints.unwrap()[0].topology_key,
            "topology.kubernetes.io/zone"
        );
        assert_eq!(tpl.metadata.unwrap().annotations.unwrap()["a"], "b");
    }

    #[test]
    fn default_service_account_from_settings() {
        let mut s = settings();
        s.worker_service_account = Some("kcg-worker".into());
        let d = deployment(&group(BASE), &s, "h");
        assert_eq!(pod(&d).service_account_name.as_deref(), Some("kcg-worker"));
        let d = deployment(&group(BASE), &settings(), "h");
        assert_eq!(pod(&d).service_account_name, None);
        assert_eq!(pod(&d).node_selector, None);
    }

    #[test]
    fn worker_service_account_has_annotations_no_token_and_no_owner() {
        let mut s = settings();
        s.worker_service_account_annotations = BTreeMap::from([(
            "eks.amazonaws.com/role-arn".to_owned(),
            "arn:aws:iam::123456789012:role/kcg-worker".to_owned(),
        )]);
        let sa = worker_service_account("shop", "kcg-worker", &s);
        assert_eq!(sa.metadata.name.as_deref(), Some("kcg-worker"));
        assert_eq!(sa.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(sa.automount_service_account_token, Some(false));
        assert_eq!(sa.metadata.owner_references, None);
        let labels = sa.metadata.labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "kcg-operator");
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(labels["app.kubernetes.io/part-of"], "kcg");
        assert_eq!(
            sa.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::123456789012:role/kcg-worker"
        );
        let bare = worker_service_account("shop", "kcg-worker", &settings());
        assert_eq!(bare.metadata.annotations, None);
    }

    #[test]
    fn only_the_operators_own_worker_service_account_with_other_annotations_is_stale() {
        const ROLE: &str = "eks.amazonaws.com/role-arn";
        let mut s = settings();
        s.worker_service_account_annotations =
            BTreeMap::from([(ROLE.to_owned(), "arn:aws:iam::1:role/new".to_owned())]);
        let ours = |annotations: &[(&str, &str)]| {
            let mut sa = worker_service_account("shop", "kcg-worker", &settings());
            sa.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
            sa
        };
        assert!(worker_service_account_is_stale(&ours(&[]), &s), "missing");
        assert!(
            worker_service_account_is_stale(&ours(&[(ROLE, "arn:aws:iam::1:role/old")]), &s),
            "another value"
        );
        assert!(!worker_service_account_is_stale(
            &worker_service_account("shop", "kcg-worker", &s),
            &s
        ));
        assert!(
            !worker_service_account_is_stale(
                &ours(&[(ROLE, "arn:aws:iam::1:role/new"), ("extra", "kept")]),
                &s
            ),
            "an annotation the settings do not name is no reason to apply"
        );
        assert!(
            !worker_service_account_is_stale(&ours(&[]), &settings()),
            "nothing configured, nothing missing"
        );
        let mut helms = ours(&[(ROLE, "arn:aws:iam::1:role/old")]);
        helms
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(MANAGED_BY_LABEL.to_owned(), "Helm".to_owned());
        assert!(!worker_service_account_is_stale(&helms, &s), "not ours");
        let mut unlabelled = ours(&[]);
        unlabelled.metadata.labels = None;
        assert!(
            !worker_service_account_is_stale(&unlabelled, &s),
            "not ours"
        );
    }
}
