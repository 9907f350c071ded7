//! Flows on what the operator renders and reports, as the real API server keeps it: the
//! worker pod spec (default requests, strategy, budget, volumes, envFrom, command/args),
//! and a refusal by RBAC named as `Forbidden`.

use super::*;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;

const NS: &str = "spec";

/// A group that names volumes, envFrom and its command, and leaves requests and strategy to
/// the defaults: the Deployment and the budget hold them, and the workers run with them.
pub async fn worker_pod_spec(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    env.kubectl(&["create", "namespace", NS]).await?;
    env.kubectl(&[
        "create",
        "configmap",
        "settings",
        "-n",
        NS,
        "--from-literal=KCG_E2E_FROM_ENVFROM=yes",
    ])
    .await?;
    let group = json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": "shaped", "namespace": NS},
        "spec": {"replicas": 2, "streams": [{"name": STREAM}], "stateStore": {"table": TABLE},
                 "delivery": {"stdout": {}},
                 "worker": {
                     "command": ["kcg-worker"],
                     "args": ["run", "--config", "/etc/kcg/config.yaml"],
                     "envFrom": [{"configMapRef": {"name": "settings"}}],
                     "volumes": [{"name": "scratch", "emptyDir": {}}],
                     "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
                 }}
    });
    env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
        .await?;
    wait_ready(env, NS, "shaped", 2).await?;

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let d = deployments.get("shaped").await.map_err(|e| e.to_string())?;
    let pod = d.spec.template.spec.clone().ok_or("no pod spec")?;
    let worker = pod
        .containers
        .iter()
        .find(|c| c.name == "worker")
        .ok_or("no worker container")?;
    let requests = worker
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    let request = |k: &str| requests.get(k).map(|q| q.0.clone());
    if (request("cpu").as_deref(), request("memory").as_deref()) != (Some("100m"), Some("64Mi")) {
        return Err(format!("default requests: {requests:?}"));
    }
    let strategy = d.spec.strategy.clone().unwrap_or_default();
    let rolling = strategy.rolling_update.clone().unwrap_or_default();
    let int = |v: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>| match v {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => Some(n),
        _ => None,
    };
    if strategy.type_.as_deref() != Some("RollingUpdate")
        || int(rolling.max_surge) != Some(1)
        || int(rolling.max_unavailable) != Some(0)
    {
        return Err(format!("strategy: {strategy:?}"));
    }
    if worker.command.as_deref() != Some(&["kcg-worker".to_owned()][..])
        || !worker
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/scratch")
        || !pod.volumes.iter().flatten().any(|v| v.name == "scratch")
    {
        return Err(format!(
            "command, volumeMounts or volumes not rendered: {worker:?}"
        ));
    }
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), NS);
    let pdb = budgets
        .get("shaped")
        .await
        .map_err(|e| format!("the budget of a 2-replica group: {e}"))?;
    let pdb_spec = pdb.spec.unwrap_or_default();
    if int(pdb_spec.max_unavailable.clone()) != Some(1) {
        return Err(format!("budget: {pdb_spec:?}"));
    }
    // envFrom reached the running workers.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let names: Vec<String> = pods
        .list(&ListParams::default().labels("kcg.dev/group=shaped"))
        .await
        .map_err(|e| e.to_string())?
        .items
        .iter()
        .filter(|p| is_ready(p))
        .map(|p| p.name_any())
        .collect();
    for name in &names {
        let pid = kubelet
            .pid_of(NS, name, "worker")
            .ok_or(format!("no worker process for {name}"))?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string())?;
        if !String::from_utf8_lossy(&environ).contains("KCG_E2E_FROM_ENVFROM=yes") {
            return Err(format!("{name}: envFrom did not reach the worker"));
        }
    }
    println!(
        "  requests {requests:?}, RollingUpdate 1/0, budget maxUnavailable 1, envFrom in {} workers",
        names.len()
    );
    env.kubectl(&["delete", "namespace", NS, "--wait=false"])
        .await?;
    Ok(())
}

/// RBAC refusals a flow provoked on purpose, between two times, naming one resource: the
/// suite's RBAC check does not count them.
pub struct ExpectedRefusal {
    /// The resource in the refusal's message.
    pub resource: &'static str,
    /// When the flow took the right away.
    pub from: jiff::Timestamp,
    /// When it gave it back and the operator recovered.
    pub to: jiff::Timestamp,
}

/// The refusals flows provoked on purpose.
pub static EXPECTED_REFUSALS: std::sync::Mutex<Vec<ExpectedRefusal>> =
    std::sync::Mutex::new(Vec::new());

/// Whether an operator log line is a refusal some flow provoked on purpose.
pub fn expected_refusal(line: &str) -> bool {
    let at = serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v["timestamp"].as_str()?.parse::<jiff::Timestamp>().ok());
    let Some(at) = at else { return false };
    EXPECTED_REFUSALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|r| line.contains(r.resource) && r.from <= at && at <= r.to)
}

/// The operator loses `patch`/`create` on PodDisruptionBudgets: a new group's budget cannot
/// be applied, and the group says `Forbidden`, naming the verb and the resource. With the
/// right given back, the group recovers.
pub async fn forbidden_is_named(env: &Env) -> Result<(), String> {
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    let original = roles.get(RELEASE).await.map_err(|e| e.to_string())?;
    let mut reduced = original.clone();
    for rule in reduced.rules.iter_mut().flatten() {
        if rule
            .resources
            .iter()
            .flatten()
            .any(|r| r == "poddisruptionbudgets")
        {
            rule.verbs.retain(|v| v != "patch" && v != "create");
        }
    }
    let from = jiff::Timestamp::now();
    roles
        .replace(RELEASE, &Default::default(), &reduced)
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        env.kubectl(&["create", "namespace", "rbac-probe"]).await?;
        let group = json!({
            "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
            "metadata": {"name": "guarded", "namespace": "rbac-probe"},
            "spec": {"replicas": 2, "streams": [{"name": STREAM}], "stateStore": {"table": TABLE},
                     "delivery": {"stdout": {}}}
        });
        env.kubectl_stdin(&["apply", "-f", "-"], &group.to_string())
            .await?;
        let api = groups(env, "rbac-probe");
        wait_until(
            "Degraded Forbidden naming the verb and resource",
            WAIT,
            || async {
                let s = api
                    .get_status("guarded")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .ok_or("no status")?;
                match condition(&s, "Degraded") {
                    Some(("True", "Forbidden", m)) if m.contains("poddisruptionbudgets") => {
                        println!(
                            "  Degraded Forbidden: {}",
                            excerpt(m, "the operator may not")
                        );
                        Ok(())
                    }
                    other => Err(format!("Degraded {other:?}")),
                }
            },
        )
        .await
    }
    .await;
    // Give the right back whatever happened, then see the group recover.
    let mut restored = roles.get(RELEASE).await.map_err(|e| e.to_string())?;
    restored.rules = original.rules.clone();
    roles
        .replace(RELEASE, &Default::default(), &restored)
        .await
        .map_err(|e| e.to_string())?;
    result?;
    // A spec-level touch reconciles at once instead of at the refused write's retry pace.
    env.kubectl(&[
        "annotate",
        "kcg",
        "guarded",
        "-n",
        "rbac-probe",
        "e2e/kick=1",
    ])
    .await?;
    wait_ready(env, "rbac-probe", "guarded", 2).await?;
    EXPECTED_REFUSALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ExpectedRefusal {
            resource: "poddisruptionbudgets",
            from,
            to: jiff::Timestamp::now(),
        });
    env.kubectl(&["delete", "namespace", "rbac-probe", "--wait=false"])
        .await?;
    Ok(())
}
