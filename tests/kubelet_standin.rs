//! The kubelet stand-in of the e2e suite (`tests/e2e_support/kubelet.rs`) against a real API
//! server: it runs the worker Deployment the operator renders (2 replicas, ConfigMap volume,
//! downward-API env) and a pod with a ServiceAccount token as real `kcg-worker` processes, and
//! must get them Running and Ready, restart a SIGKILLed container, stop a deleted pod with
//! SIGTERM and remove it, and give the token pod a kubeconfig that is not the admin's.
//!
//! Needs a disposable cluster and the emulators:
//!
//! ```sh
//! ../shared/kube/cluster.sh start .kube-local && export KUBECONFIG=$PWD/.kube-local/kubeconfig
//! scripts/emulators.sh start dynamodb kinesis && eval "$(scripts/emulators.sh env)"
//! scripts/build-bins.sh && KCG_E2E=1 cargo test --test kubelet_standin -- --nocapture
//! ```
//!
//! Runs only with `KCG_E2E=1` (see `e2e_support::skip_reason`): the stand-in binds every
//! pending pod of the cluster to a fake node, so it must never see a real cluster. With it,
//! a cluster that does not answer or is not on 127.0.0.1, missing emulators or a missing
//! `target/debug/kcg-worker` fail the test.

mod e2e_support;
#[path = "../worker/tests/stream_support/mod.rs"]
mod stream_support;

use std::path::Path;
use std::time::Instant;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use e2e_support::kubelet::{Kubelet, KubeletOptions, Signal};
use e2e_support::{Env, skip_reason, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerStatus, Namespace, Pod, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kcg_operator::crd::{KinesisConsumerGroup, KinesisConsumerGroupSpec};
use kcg_operator::resources::{CONFIG_KEY, OperatorSettings, WORKER_CONTAINER, render};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};

const GROUP: &str = "orders";
const TOKEN_POD: &str = "token-pod";
const TOKEN_SA: &str = "standin";

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    running && ready
}

fn worker_status(pod: &Pod) -> Option<ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == WORKER_CONTAINER)
        .cloned()
}

/// The group the operator would run, with a stream and table of its own.
fn group(ns: &str, stream: &str) -> KinesisConsumerGroup {
    let spec: KinesisConsumerGroupSpec = serde_yaml::from_str(&format!(
        "replicas: 2\n\
         streams: [{{name: {stream}, startPosition: TrimHorizon}}]\n\
         stateStore: {{table: kcg-standin-state, create: true}}\n\
         delivery: {{stdout: {{}}}}\n"
    ))
    .expect("group spec");
    let mut kcg = KinesisConsumerGroup::new(GROUP, spec);
    kcg.metadata.namespace = Some(ns.to_owned());
    kcg
}

/// A lone worker pod running as ServiceAccount [`TOKEN_SA`], with its token mounted.
fn token_pod(deployment: &Deployment) -> Pod {
    let mut spec = deployment.spec.clone().template.spec.unwrap_or_default();
    spec.service_account_name = Some(TOKEN_SA.to_owned());
    spec.automount_service_account_token = Some(true);
    Pod {
        // Labels of its own: the Deployment's ReplicaSet must not adopt it.
        metadata: ObjectMeta {
            name: Some(TOKEN_POD.to_owned()),
            labels: Some([("app".to_owned(), "token-pod".to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        ..Pod::default()
    }
}

fn named<K: Default + kube::Resource>(name: &str) -> K {
    let mut k = K::default();
    k.meta_mut().name = Some(name.to_owned());
    k
}

/// The environment of a live process.
fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

fn admin_token(kubeconfig: &Path) -> String {
    let text = std::fs::read_to_string(kubeconfig).expect("read the admin kubeconfig");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    doc["users"][0]["user"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A client that uses the kubeconfig the stand-in wrote for a pod.
async fn client_from(kubeconfig: &Path) -> Client {
    let config = Kubeconfig::read_from(kubeconfig).expect("the pod's kubeconfig parses");
    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .expect("the pod's kubeconfig is usable");
    Client::try_from(config).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_standin_runs_binds_restarts_and_deletes_pods() {
    if let Some(why) = skip_reason() {
        println!("skipping: {why}");
        return;
    }
    let env = Env::connect().await;
    let (client, kubeconfig) = (env.client.clone(), env.kubeconfig.clone());
    let binary = env.bin_dir.join("kcg-worker");

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let suffix = format!("{}-{}", std::process::id(), nanos % 10_000);
    let ns = format!("kubelet-standin-{suffix}");
    let stream = format!("kubelet-standin-{suffix}");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &named(&ns))
        .await
        .expect("create namespace");
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .load()
        .await;
    let kinesis = aws_sdk_kinesis::Client::new(&aws);
    stream_support::create_stream(&kinesis, &stream, 2).await;

    let work = tempfile::Builder::new()
        .prefix("kcg-kubelet-")
        .tempdir()
        .expect("work dir");
    let opts = KubeletOptions::from_kubeconfig(&kubeconfig, work.path())
        .expect("kubelet options")
        .binary("kcg-worker", &binary)
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")));
    let kubelet = Kubelet::start(client.clone(), opts)
        .await
        .expect("start the stand-in");

    // What the operator would apply, plus a pod that runs as a ServiceAccount of its own.
    let kcg = group(&ns, &stream);
    let rendered = render(
        &kcg,
        &OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test"),
    )
    .expect("render");
    let pp = PostParams::default();
    let created = Instant::now();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&pp, &rendered.config_map)
        .await
        .expect("create ConfigMap");
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&pp, &rendered.deployment)
        .await
        .expect("create Deployment");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&pp, &named(TOKEN_SA))
        .await
        .expect("create ServiceAccount");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&pp, &token_pod(&rendered.deployment))
        .await
        .expect("create the token pod");

    // 1. Bound, started, Running and Ready; the Deployment counts them.
    let group_pods = ListParams::default().labels(&format!("app.kubernetes.io/instance={GROUP}"));
    let workers: Vec<String> = wait_for("2 Ready worker pods and the Ready token pod", || async {
        let list = pods.list(&group_pods).await.ok()?;
        let token = pods.get(TOKEN_POD).await.ok()?;
        let ready: Vec<String> = list
            .items
            .iter()
            .filter(|p| is_ready(p))
            .map(|p| p.name_any())
            .collect();
        (ready.len() == 2 && is_ready(&token)).then_some(ready)
    })
    .await;
    println!(
        "pods Ready {:.1}s after the Deployment was created",
        created.elapsed().as_secs_f64()
    );
    for name in workers.iter().chain([&TOKEN_POD.to_owned()]) {
        let pod = pods.get(name).await.expect("get pod");
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(kubelet.node_name())
        );
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
            Some("127.0.0.1")
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for("the Deployment to report 2 ready replicas", || async {
        let d = deployments.get(GROUP).await.ok()?;
        (d.status?.ready_replicas == Some(2)).then_some(())
    })
    .await;

    // 2. The ConfigMap volume, the downward API, no token for automount: false.
    let (a, b) = (&workers[0], &workers[1]);
    let config_file = kubelet
        .pod_dir(&ns, a)
        .join("volumes/config")
        .join(CONFIG_KEY);
    let mounted = std::fs::read_to_string(&config_file).expect("config.yaml mounted");
    let expected = rendered
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .cloned();
    assert_eq!(
        Some(mounted),
        expected,
        "the mounted config is the ConfigMap's"
    );
    let pid_a = kubelet
        .pid_of(&ns, a, WORKER_CONTAINER)
        .expect("worker pid");
    let env_a = environ(pid_a);
    assert!(
        env_a.contains(&format!("POD_NAME={a}")),
        "POD_NAME from the downward API: {env_a:?}"
    );
    assert!(env_a.contains(&format!("POD_NAMESPACE={ns}")), "{env_a:?}");
    let uid_a = pods.get(a).await.expect("get pod").metadata.uid;
    assert!(
        uid_a.is_some_and(|uid| env_a.contains(&format!("POD_UID={uid}"))),
        "POD_UID from the downward API: {env_a:?}"
    );
    assert!(
        !env_a.iter().any(|v| v.starts_with("KUBECONFIG=")),
        "automount false: no token"
    );
    assert!(
        cmdline(pid_a).contains(&config_file.display().to_string()),
        "--config points at the mounted file: {}",
        cmdline(pid_a)
    );

    // 3. The token pod: its own kubeconfig, a ServiceAccount token, no admin rights.
    let token_kubeconfig = kubelet.pod_dir(&ns, TOKEN_POD).join("kubeconfig");
    let pid_t = kubelet
        .pid_of(&ns, TOKEN_POD, WORKER_CONTAINER)
        .expect("token pod pid");
    assert!(environ(pid_t).contains(&format!("KUBECONFIG={}", token_kubeconfig.display())));
    let text = std::fs::read_to_string(&token_kubeconfig).expect("token pod kubeconfig");
    assert!(
        !text.contains(&admin_token(&kubeconfig)),
        "the admin token must not leak"
    );
    let sa_client = client_from(&token_kubeconfig).await;
    let review = Api::<SelfSubjectReview>::all(sa_client.clone())
        .create(&pp, &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview with the pod's token");
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(
        user.as_deref(),
        Some(format!("system:serviceaccount:{ns}:{TOKEN_SA}").as_str())
    );
    let forbidden = Api::<Secret>::namespaced(sa_client, &ns)
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(&forbidden, Err(kube::Error::Api(s)) if s.code == 403),
        "the ServiceAccount has no RBAC: {forbidden:?}"
    );

    // 4. SIGKILL: restarted, restartCount 1, Ready again.
    kubelet
        .kill(&ns, a, WORKER_CONTAINER, Signal::Kill)
        .expect("SIGKILL");
    let restarted = wait_for("the killed worker to be restarted and Ready", || async {
        let pod = pods.get(a).await.ok()?;
        let status = worker_status(&pod)?;
        (status.restart_count == 1 && is_ready(&pod)).then_some(status)
    })
    .await;
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .expect("lastState.terminated");
    assert_eq!(last.exit_code, 137, "SIGKILL exit: {last:?}");
    let new_pid = kubelet.pid_of(&ns, a, WORKER_CONTAINER).expect("new pid");
    assert_ne!(new_pid, pid_a, "a new process");

    // 5. Delete: SIGTERM (the worker logs its graceful shutdown), the pod is removed, and the
    //    Deployment's replacement comes up.
    let pid_b = kubelet.pid_of(&ns, b, WORKER_CONTAINER).expect("pid of b");
    pods.delete(b, &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("the deleted pod to be removed", || async {
        matches!(pods.get_opt(b).await, Ok(None)).then_some(())
    })
    .await;
    assert!(
        !Path::new(&format!("/proc/{pid_b}")).exists(),
        "process {pid_b} is gone"
    );
    let log_b =
        std::fs::read_to_string(kubelet.log_path(&ns, b, WORKER_CONTAINER)).unwrap_or_default();
    assert!(
        log_b.contains("shutting down"),
        "SIGTERM, not SIGKILL; log:\n{log_b}"
    );
    wait_for("the replacement pod to be Ready", || async {
        let list = pods.list(&group_pods).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|p| is_ready(p) && p.name_any() != *b)
            .count();
        (ready == 2).then_some(())
    })
    .await;
    let logs = kubelet.logs_matching(|n, _, c| n == ns && c == WORKER_CONTAINER);
    assert!(
        logs.contains(&format!("==> {ns}/{a}/{WORKER_CONTAINER} <==")),
        "{logs}"
    );

    // Cleanup: the namespace's pods go through the stand-in's graceful deletion.
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete namespace");
    wait_for("the namespace's pods to be removed", || async {
        pods.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("the stand-in to forget the namespace's pods", || async {
        kubelet
            .running_pods()
            .iter()
            .all(|(n, _)| *n != ns)
            .then_some(())
    })
    .await;
    kubelet.shutdown().await;
    let _ = kinesis.delete_stream().stream_name(&stream).send().await;
}
