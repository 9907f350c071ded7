//! Flows of issue 11: quiet on the API server, safe with objects the group does not own,
//! the finalizer only with `onDelete: Delete`.

use super::*;

use k8s_openapi::api::core::v1::ConfigMap;

/// The API server's count of requests by verb and resource (its own `/metrics`), summed
/// over codes and scopes; `subresource` is matched exactly ("" for none).
async fn api_requests(
    env: &Env,
    verb: &str,
    resource: &str,
    subresource: &str,
) -> Result<u64, String> {
    let text = env.kubectl(&["get", "--raw", "/metrics"]).await?;
    let mut total = 0u64;
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            line.split_once(&format!("{name}=\""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(v, _)| v)
                .unwrap_or("")
        };
        if label("verb") == verb
            && label("resource") == resource
            && label("subresource") == subresource
        {
            let value = line.rsplit(' ').next().unwrap_or("0");
            total += value.parse::<f64>().unwrap_or(0.0) as u64;
        }
    }
    Ok(total)
}

/// A running group (`default/orders`, Ready) left alone for a while: no apply of its
/// ConfigMap or Deployment at all, and its status written at most once.
pub async fn steady_group_is_quiet(env: &Env) -> Result<(), String> {
    // As the earlier flows left it (the HA flow scales it).
    let replicas = groups(env, "default")
        .get("orders")
        .await
        .map_err(|e| e.to_string())?
        .spec
        .replicas;
    wait_ready(env, "default", "orders", replicas).await?;
    // A new leader (the HA flow) settles first: its liveness trackers start empty.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let count = || async {
        Ok::<_, String>((
            api_requests(env, "APPLY", "configmaps", "").await?
                + api_requests(env, "APPLY", "deployments", "").await?,
            api_requests(env, "APPLY", "kinesisconsumergroups", "status").await?,
        ))
    };
    let rv = |g: &KinesisConsumerGroup| g.resource_version().unwrap_or_default();
    let before_group = groups(env, "default")
        .get("orders")
        .await
        .map_err(|e| e.to_string())?;
    let (applies0, status0) = count().await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (applies1, status1) = count().await?;
    let after_group = groups(env, "default")
        .get("orders")
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "  30 s steady: {} applies of owned objects, {} status applies; group resourceVersion {} → {}",
        applies1 - applies0,
        status1 - status0,
        rv(&before_group),
        rv(&after_group)
    );
    if applies1 != applies0 {
        return Err(format!(
            "{} applies of owned objects in a steady state",
            applies1 - applies0
        ));
    }
    if status1 - status0 > 1 {
        return Err(format!(
            "{} status writes in 30 s of a steady state",
            status1 - status0
        ));
    }
    Ok(())
}

fn group(name: &str, on_delete: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "streams": [{"name": STREAM}],
                 "stateStore": {"table": TABLE, "onDelete": on_delete}, "delivery": {"stdout": {}}}
    })
}

/// Waits for Degraded `reason` with a message holding `needle`.
async fn wait_degraded(env: &Env, name: &str, reason: &str, needle: &str) -> Result<(), String> {
    let api = groups(env, "default");
    wait_until(&format!("{name} Degraded {reason}"), WAIT, || async {
        let g = api.get(name).await.map_err(|e| e.to_string())?;
        let s = g.status.clone().ok_or("no status yet")?;
        match condition(&s, "Degraded") {
            Some(("True", r, m)) if r == reason && m.contains(needle) => Ok(()),
            other => Err(format!("Degraded {other:?}")),
        }
    })
    .await
}

fn owned_by_group(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.kind == "KinesisConsumerGroup" && r.controller == Some(true))
}

/// A ConfigMap `<name>-config`, then a Deployment `<name>`, made by someone else before the
/// group: left untouched, the group Degraded `ResourceNotOwned`; once deleted, the group
/// proceeds and makes its own.
pub async fn foreign_objects_are_left_alone(env: &Env) -> Result<(), String> {
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "default");

    env.kubectl(&[
        "create",
        "configmap",
        "squat-config",
        "--from-literal=theirs=yes",
    ])
    .await?;
    let theirs = config_maps
        .get("squat-config")
        .await
        .map_err(|e| e.to_string())?;
    env.kubectl_stdin(
        &["apply", "-f", "-"],
        &group("squat", "Retain", 1).to_string(),
    )
    .await?;
    wait_degraded(
        env,
        "squat",
        "ResourceNotOwned",
        "ConfigMap default/squat-config",
    )
    .await?;
    let still = config_maps
        .get("squat-config")
        .await
        .map_err(|e| e.to_string())?;
    if still.resource_version() != theirs.resource_version() || owned_by_group(&still.metadata) {
        return Err(format!(
            "the foreign ConfigMap was written: {:?}",
            still.metadata
        ));
    }
    if deployments
        .get_opt("squat")
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("a Deployment was made to mount a ConfigMap that is not the group's".into());
    }
    env.kubectl(&["delete", "configmap", "squat-config"])
        .await?;
    wait_until("squat's own ConfigMap and Deployment", WAIT, || async {
        let cm = config_maps
            .get_opt("squat-config")
            .await
            .map_err(|e| e.to_string())?;
        let d = deployments
            .get_opt("squat")
            .await
            .map_err(|e| e.to_string())?;
        match (cm, d) {
            (Some(cm), Some(d)) if owned_by_group(&cm.metadata) && owned_by_group(&d.metadata) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    env.kubectl(&["delete", "kcg", "squat"]).await?;

    // A Deployment of the group's name, someone else's.
    env.kubectl(&[
        "create",
        "deployment",
        "squat2",
        "--image=example.invalid/theirs",
        "--replicas=0",
    ])
    .await?;
    let theirs = deployments.get("squat2").await.map_err(|e| e.to_string())?;
    env.kubectl_stdin(
        &["apply", "-f", "-"],
        &group("squat2", "Retain", 1).to_string(),
    )
    .await?;
    wait_degraded(
        env,
        "squat2",
        "ResourceNotOwned",
        "Deployment default/squat2",
    )
    .await?;
    let still = deployments.get("squat2").await.map_err(|e| e.to_string())?;
    if still.metadata.generation != theirs.metadata.generation || owned_by_group(&still.metadata) {
        return Err(format!(
            "the foreign Deployment was written: {:?}",
            still.metadata
        ));
    }
    env.kubectl(&["delete", "deployment", "squat2", "--wait=true"])
        .await?;
    wait_ready(env, "default", "squat2", 1).await?;
    env.kubectl(&["delete", "kcg", "squat2"]).await?;
    Ok(())
}

fn has_finalizer(g: &KinesisConsumerGroup) -> bool {
    g.finalizers().iter().any(|f| f == "kcg.dev/cleanup")
}

async fn wait_finalizer(env: &Env, name: &str, present: bool) -> Result<(), String> {
    let api = groups(env, "default");
    wait_until(
        &format!("{name} finalizer present: {present}"),
        WAIT,
        || async {
            let g = api.get(name).await.map_err(|e| e.to_string())?;
            if has_finalizer(&g) == present && g.status.is_some() {
                Ok(())
            } else {
                Err(format!("finalizers {:?}", g.finalizers()))
            }
        },
    )
    .await
}

/// `onDelete: Retain` carries no finalizer (and goes at once with the operator stopped);
/// switching to Delete adds it, back to Retain removes it.
pub async fn finalizer_follows_on_delete(env: &Env) -> Result<(), String> {
    env.kubectl_stdin(
        &["apply", "-f", "-"],
        &group("final", "Retain", 0).to_string(),
    )
    .await?;
    wait_finalizer(env, "final", false).await?;
    for (policy, present) in [("Delete", true), ("Retain", false)] {
        let patch = format!(r#"{{"spec":{{"stateStore":{{"onDelete":"{policy}"}}}}}}"#);
        env.kubectl(&["patch", "kcg", "final", "--type=merge", "-p", &patch])
            .await?;
        wait_finalizer(env, "final", present).await?;
    }

    let operators: Api<Deployment> = Api::namespaced(env.client.clone(), OPERATOR_NS);
    let replicas = operators
        .get(RELEASE)
        .await
        .map_err(|e| e.to_string())?
        .spec
        .replicas
        .unwrap_or(1);
    scale_operator(env, 0).await?;
    env.kubectl(&["delete", "kcg", "final", "--wait=false"])
        .await?;
    let gone = wait_gone(env, "default", "final", Duration::from_secs(10)).await;
    scale_operator(env, usize::try_from(replicas).unwrap_or(1)).await?;
    gone
}
