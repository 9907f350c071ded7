//! End-to-end against a real cluster, gated on a kubeconfig.
//!
//! Needs a cluster where the operator already runs (this test does not start it):
//!
//! ```sh
//! helm install kcg-operator charts/kcg-operator -n kcg-system --create-namespace
//! cargo test --test e2e -- --nocapture
//! ```
//!
//! It installs (server-side applies) the CRD from `crds/`, applies
//! `examples/minimal-stdout.yaml` in a fresh namespace, waits for the group's Deployment,
//! scales the group through its scale subresource (`kubectl scale kcg/NAME --replicas=3` when
//! `kubectl` is on PATH, else a patch of `/scale`), sees the Deployment follow, reads the
//! status, deletes the group (the operator's finalizer must let it go) and the namespace.
//! The workers need no AWS access for this: the test only looks at what the operator does in
//! Kubernetes.
//!
//! Skips (passes, with a message) when no cluster is configured: neither `KUBECONFIG` nor
//! `~/.kube/config`, or only a default `~/.kube/config` whose cluster does not answer. Fails
//! when `KUBECONFIG` is set explicitly and the cluster cannot be reached.
//! `KCG_E2E_TIMEOUT_SECS` (default 120) bounds each wait.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kcg_operator::crd::KinesisConsumerGroup;
use kcg_operator::resources::selector_string;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

const MANAGER: &str = "kcg-e2e";
const NAME: &str = "orders";

fn timeout() -> Duration {
    let secs = std::env::var("KCG_E2E_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// The client, or `None` (after printing why) when the test should skip.
async fn cluster() -> Option<Client> {
    let explicit = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
    let default_file = std::env::var_os("HOME")
        .map(|h| std::path::Path::new(&h).join(".kube/config"))
        .is_some_and(|p| p.exists());
    if !explicit && !default_file {
        println!("skipping e2e: no cluster configured (set KUBECONFIG or create ~/.kube/config)");
        return None;
    }
    let connected = async {
        let client = Client::try_default().await.map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(client)
    }
    .await;
    match connected {
        Ok(client) => Some(client),
        Err(e) if explicit => panic!("KUBECONFIG is set but the cluster cannot be reached: {e}"),
        Err(e) => {
            println!("skipping e2e: no cluster configured (~/.kube/config does not connect: {e})");
            None
        }
    }
}

/// Polls `probe` until it returns `Some`, or fails with `what` after the timeout.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout();
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {:?} waiting for {what}",
                timeout()
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn install_crd(client: &Client) -> Result<(), String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/kinesisconsumergroups.kcg.dev.yaml"
    ))
    .map_err(|e| e.to_string())?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(|e| format!("applying the CRD: {e}"))?;
    wait_for("the CRD to be Established", || async {
        let crd = crds.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await
}

fn kubectl_available() -> bool {
    std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn scale_to(
    groups: &Api<KinesisConsumerGroup>,
    ns: &str,
    replicas: i32,
) -> Result<(), String> {
    if kubectl_available() {
        let out = std::process::Command::new("kubectl")
            .args([
                "scale",
                &format!("kcg/{NAME}"),
                &format!("--replicas={replicas}"),
                "-n",
                ns,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "kubectl scale failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        println!("{}", String::from_utf8_lossy(&out.stdout).trim());
        return Ok(());
    }
    println!("kubectl not on PATH: patching the scale subresource directly");
    groups
        .patch_scale(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .map(drop)
        .map_err(|e| format!("patching /scale: {e}"))
}

async fn scenario(client: &Client, ns: &str) -> Result<(), String> {
    install_crd(client).await?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns}})).map_err(|e| e.to_string())?;
    namespaces
        .patch(ns, &PatchParams::apply(MANAGER), &Patch::Apply(&namespace))
        .await
        .map_err(|e| format!("creating namespace {ns}: {e}"))?;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/minimal-stdout.yaml"
    ))
    .map_err(|e| e.to_string())?;
    let mut group: KinesisConsumerGroup = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    assert_eq!(group.name_any(), NAME);
    group.metadata.namespace = Some(ns.to_owned());
    let groups: Api<KinesisConsumerGroup> = Api::namespaced(client.clone(), ns);
    let applied = groups
        .patch(NAME, &PatchParams::apply(MANAGER), &Patch::Apply(&group))
        .await
        .map_err(|e| {
            format!("applying examples/minimal-stdout.yaml (admission rejected it?): {e}")
        })?;
    let uid = applied
        .meta()
        .uid
        .clone()
        .ok_or("applied group has no uid")?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let owned = |d: &Deployment| {
        d.owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    let deployment = wait_for("a Deployment owned by the group", || async {
        deployments
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|d| owned(d))
    })
    .await
    .map_err(|e| {
        format!(
            "{e}. Is the operator running in this cluster? Install it with \
             `helm install kcg-operator charts/kcg-operator -n kcg-system --create-namespace`"
        )
    })?;
    let dname = deployment.name_any();
    println!(
        "deployment {dname} has replicas {:?}",
        deployment.spec.replicas
    );
    assert_eq!(
        deployment.spec.replicas,
        Some(group.spec.replicas),
        "Deployment follows spec.replicas"
    );

    scale_to(&groups, ns, 3).await?;
    let scaled = groups.get(NAME).await.map_err(|e| e.to_string())?;
    assert_eq!(
        scaled.spec.replicas, 3,
        "the scale subresource writes spec.replicas"
    );
    wait_for("the Deployment to follow the scale to 3", || async {
        let d = deployments.get(&dname).await.ok()?;
        (d.spec.replicas == Some(3)).then_some(())
    })
    .await?;

    let status = wait_for("the group's status with selector and replicas", || async {
        let g = groups.get(NAME).await.ok()?;
        let s = g.status?;
        (s.selector.is_some() && s.observed_generation == g.metadata.generation).then_some(s)
    })
    .await?;
    println!(
        "status: {}",
        serde_yaml::to_string(&status).unwrap_or_default()
    );
    assert_eq!(
        status.selector.as_deref(),
        Some(selector_string(&scaled).as_str())
    );
    let scale = groups
        .get_scale(NAME)
        .await
        .map_err(|e| format!("reading /scale: {e}"))?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    assert_eq!(
        scale.status.and_then(|s| s.selector),
        status.selector,
        "HPA sees the pod selector"
    );
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Ready"),
        "status carries a Ready condition: {:?}",
        status.conditions
    );
    if kubectl_available() {
        // For the human reading --nocapture: the printer columns.
        if let Ok(out) = std::process::Command::new("kubectl")
            .args(["get", "kcg", "-n", ns])
            .output()
        {
            println!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }

    // Deleting the group: with onDelete: Retain the operator's finalizer touches no table and
    // lets the object go.
    groups
        .delete(NAME, &DeleteParams::default())
        .await
        .map_err(|e| format!("deleting the group: {e}"))?;
    wait_for("the group to be deleted (finalizer released)", || async {
        matches!(groups.get_opt(NAME).await, Ok(None)).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn operator_runs_an_example_group() {
    let Some(client) = cluster().await else {
        return;
    };
    let ns = format!("kcg-e2e-{}", std::process::id());
    let result = scenario(&client, &ns).await;

    // Clean up whatever happened; the namespace takes the group and its objects with it.
    let groups: Api<KinesisConsumerGroup> = Api::namespaced(client.clone(), &ns);
    let _ = groups.delete(NAME, &DeleteParams::default()).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Err(e) = namespaces.delete(&ns, &DeleteParams::default()).await {
        println!("cleanup: deleting namespace {ns}: {e}");
    }
    if let Err(e) = result {
        panic!("e2e: {e}");
    }
}
