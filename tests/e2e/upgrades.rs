//! Flows of issue 11 (items 4 and 7): the CRD follows `helm upgrade`, the operator says when
//! the installed CRD is older than itself, and the lag reaches Prometheus and autoscalers
//! (the operator's group gauges, `status.maxLagMillis`, the PodMonitor, the KEDA example).

use super::*;

const CRD: &str = "kinesisconsumergroups.kcg.dev";
/// The last commit whose chart installed the CRD from its `crds/` folder (Helm never
/// upgrades those): the release a user upgrades from.
const CRDS_FOLDER_CHART_COMMIT: &str = "dc283ebd0adde71e1c6c7eaba8bc14cbaf3e40bf";
/// The vendored KEDA ScaledObject CRD (see its README).
const KEDA_CRD: &str = "tests/vendor/keda/keda.sh_scaledobjects.yaml";
/// How long the operator may take to notice a changed CRD (it rereads it every 30 s) and
/// refresh the groups' status.
const CRD_NOTICE: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ metrics

/// The leader operator's listen address (`host:port`): its `KCG_LISTEN`, which the kubelet
/// stand-in sets for the pod's `http` port (read from the process' environment).
async fn leader_listen(kubelet: &Kubelet, env: &Env) -> Result<String, String> {
    let leader = lease_holder(env).await?;
    let pid = kubelet
        .pid_of(OPERATOR_NS, &leader, "operator")
        .ok_or_else(|| format!("no operator process for pod {leader}"))?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("reading the environment of pid {pid}: {e}"))?;
    let listen = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("KCG_LISTEN="))
        .ok_or("the operator process has no KCG_LISTEN")?;
    Ok(listen.to_owned())
}

/// `GET /metrics` of the leader operator (HTTP/1.0: the server closes after the answer).
async fn leader_metrics(kubelet: &Kubelet, env: &Env) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = leader_listen(kubelet, env).await?;
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(format!(
            "GET http://{addr}/metrics: {}",
            answer.lines().next().unwrap_or("")
        )),
    }
}

/// The value of the series `name{labels}` in a Prometheus text page.
fn sample(page: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `kcg_operator_group_*` of `default/orders` equal its status, and `status.maxLagMillis`
/// is an integer beside the human `maxLag`.
pub async fn group_gauges(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    let api = groups(env, "default");
    let (status, page) = wait_until(
        "the operator's group gauges to equal the status of default/orders",
        WAIT,
        || async {
            let page = leader_metrics(kubelet, env).await?;
            let s = api
                .get("orders")
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            let group = r#"namespace="default",group="orders""#;
            let shards = sample(&page, "kcg_operator_group_shards", group);
            let clients = sample(&page, "kcg_operator_group_clients", group);
            let lag = sample(
                &page,
                "kcg_operator_group_max_lag_seconds",
                &format!(r#"{group},stream="{STREAM}""#),
            );
            let want_lag = s
                .streams
                .iter()
                .find(|st| st.name == STREAM)
                .and_then(|st| st.max_lag_millis)
                .map(|ms| ms as f64 / 1000.0);
            let got = (shards, clients, lag);
            let want = (
                Some(f64::from(s.shard_count)),
                Some(f64::from(s.client_count)),
                want_lag,
            );
            if got == want && want_lag.is_some() && s.max_lag_millis.is_some() {
                Ok((s, page))
            } else {
                Err(format!(
                    "gauges (shards, clients, lag) {got:?}, status {want:?}, maxLagMillis {:?}",
                    s.max_lag_millis
                ))
            }
        },
    )
    .await?;
    if status.shard_count != SHARDS {
        return Err(format!("{} shards in the status", status.shard_count));
    }
    println!(
        "  shards {}, clients {}, max lag {:?} ({:?} ms)",
        status.shard_count, status.client_count, status.max_lag, status.max_lag_millis
    );
    for help in [
        "# HELP kcg_operator_group_max_lag_seconds",
        "# TYPE kcg_operator_group_shards gauge",
        "# TYPE kcg_operator_group_clients gauge",
    ] {
        if !page.contains(help) {
            return Err(format!("/metrics lacks {help:?}"));
        }
    }
    Ok(())
}

/// The chart's PodMonitor (rendered: the Prometheus Operator's CRDs are not installed here)
/// selects the real worker pods, which have the port it scrapes.
pub async fn pod_monitor(env: &Env) -> Result<(), String> {
    let rendered = env
        .helm(&[
            "template",
            RELEASE,
            "charts/kcg-operator",
            "-n",
            OPERATOR_NS,
            "--set",
            "podMonitor.enabled=true",
            "-s",
            "templates/podmonitor.yaml",
        ])
        .await?;
    let pm: Value = serde_yaml::from_str(&rendered).map_err(|e| e.to_string())?;
    if pm["kind"] != "PodMonitor" || pm["spec"]["namespaceSelector"]["any"] != true {
        return Err(format!("not a PodMonitor over all namespaces:\n{rendered}"));
    }
    let selector: Vec<String> = pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .ok_or("no matchLabels")?
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .ok_or("no port")?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    let selected = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let workers: Vec<&Pod> = selected
        .iter()
        .filter(|p| p.labels().get("kcg.dev/group").map(String::as_str) == Some("orders"))
        .collect();
    if workers.is_empty() || workers.len() != selected.len() {
        return Err(format!(
            "the selector {selector:?} picks {} pods, {} of them orders workers",
            selected.len(),
            workers.len()
        ));
    }
    for p in workers {
        let named = p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .any(|cp| cp.name.as_deref() == Some(port));
        if !named {
            return Err(format!(
                "worker pod {} has no port named {port}",
                p.name_any()
            ));
        }
    }
    println!(
        "  selector {selector:?} picks the {} orders workers, port {port}",
        selected.len()
    );
    Ok(())
}

/// KEDA's ScaledObject CRD installed (KEDA's controller does not run here): the API server
/// admits `examples/keda-lag.yaml` (server-side dry run) and refuses a misspelt field.
pub async fn keda_example(env: &Env) -> Result<(), String> {
    env.kubectl(&["apply", "--server-side", "-f", KEDA_CRD])
        .await?;
    env.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/scaledobjects.keda.sh",
        "--timeout=60s",
    ])
    .await?;
    let result = async {
        let out = env
            .kubectl(&["apply", "--dry-run=server", "-f", "examples/keda-lag.yaml"])
            .await?;
        println!("  {}", out.trim().replace('\n', "\n  "));
        if !out.contains("scaledobject.keda.sh/clicks-lag") {
            return Err(format!("the ScaledObject was not admitted: {out}"));
        }
        let text = std::fs::read_to_string(root().join("examples/keda-lag.yaml"))
            .map_err(|e| e.to_string())?;
        let typo = text.replace("maxReplicaCount:", "maxReplicas:");
        match env
            .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &typo)
            .await
        {
            Err(e) if e.contains("maxReplicas") => Ok(()),
            other => Err(format!(
                "a misspelt ScaledObject field was not refused: {other:?}"
            )),
        }
    }
    .await;
    env.kubectl(&["delete", "crd", "scaledobjects.keda.sh", "--wait=false"])
        .await?;
    result
}

// ------------------------------------------------------------------ the CRD

/// The installed CRD as JSON.
async fn installed_crd(env: &Env) -> Result<Value, String> {
    let out = env.kubectl(&["get", "crd", CRD, "-o", "json"]).await?;
    serde_json::from_str(&out).map_err(|e| e.to_string())
}

fn has_max_lag_millis(crd: &Value) -> bool {
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/maxLagMillis")
        .is_some()
}

/// The Degraded condition of `default/orders` as (status, reason, message).
async fn degraded(env: &Env) -> Result<(String, String, String), String> {
    let s = groups(env, "default")
        .get("orders")
        .await
        .map_err(|e| e.to_string())?
        .status
        .ok_or("no status")?;
    condition(&s, "Degraded")
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
        .ok_or_else(|| "no Degraded condition".to_owned())
}

/// A copy of this chart whose CRD lacks `status.maxLagMillis`: the chart of a release
/// before that field existed.
fn chart_with_older_crd() -> Result<tempfile::TempDir, String> {
    let dir = tempfile::Builder::new()
        .prefix("kcg-older-crd-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(root().join("charts/kcg-operator"))
        .arg(dir.path())
        .status()
        .map_err(|e| e.to_string())?;
    if !copied.success() {
        return Err("copying the chart failed".into());
    }
    let file = dir
        .path()
        .join("kcg-operator/files")
        .join(format!("{CRD}.yaml"));
    let mut crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&file).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    crd.pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/status/properties")
        .and_then(Value::as_object_mut)
        .ok_or("no status schema")?
        .remove("maxLagMillis")
        .ok_or("the chart's CRD has no status.maxLagMillis")?;
    std::fs::write(
        &file,
        serde_yaml::to_string(&crd).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    Ok(dir)
}

/// The release runs with an older CRD (a chart without `status.maxLagMillis`): every group
/// turns Degraded `CrdOutdated`, with the fix, and its status is still written; `helm
/// upgrade` to this chart upgrades the CRD, and the condition clears.
pub async fn outdated_crd(env: &Env, kubelet: &Kubelet) -> Result<(), String> {
    if !has_max_lag_millis(&installed_crd(env).await?) {
        return Err("the release's CRD lacks status.maxLagMillis".into());
    }
    let older = chart_with_older_crd()?;
    let older_chart = older.path().join("kcg-operator");
    env.helm(&[
        "upgrade",
        RELEASE,
        older_chart.to_str().ok_or("temp path")?,
        "-n",
        OPERATOR_NS,
        "--reuse-values",
    ])
    .await?;
    if has_max_lag_millis(&installed_crd(env).await?) {
        return Err("the older chart's CRD still has status.maxLagMillis".into());
    }
    println!("  helm upgrade to a chart whose CRD lacks status.maxLagMillis");
    let (_, _, message) = wait_until(
        "default/orders Degraded CrdOutdated",
        CRD_NOTICE,
        || async {
            let d = degraded(env).await?;
            if d.0 == "True" && d.1 == "CrdOutdated" {
                Ok(d)
            } else {
                Err(format!("Degraded {d:?}"))
            }
        },
    )
    .await?;
    println!("  Degraded CrdOutdated: {}", excerpt(&message, "lacks"));
    for needle in [
        "status.maxLagMillis",
        "helm upgrade",
        "kubectl apply --server-side -f crds/",
    ] {
        if !message.contains(needle) {
            return Err(format!("the message does not name {needle:?}: {message}"));
        }
    }
    if !operator_logs(kubelet).contains("is older than this operator") {
        return Err("the operator did not log the outdated CRD".into());
    }
    // The status is still written (without the field the CRD lacks): Ready follows a scale.
    scale(env, "default", "orders", 2).await?;

    env.helm(&[
        "upgrade",
        RELEASE,
        "charts/kcg-operator",
        "-n",
        OPERATOR_NS,
        "--reuse-values",
    ])
    .await?;
    if !has_max_lag_millis(&installed_crd(env).await?) {
        return Err("helm upgrade did not bring status.maxLagMillis back".into());
    }
    println!("  helm upgrade: the CRD has status.maxLagMillis again");
    wait_until(
        "the condition to clear and status.maxLagMillis to return",
        CRD_NOTICE,
        || async {
            let d = degraded(env).await?;
            let s = groups(env, "default")
                .get("orders")
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            if d.1 != "CrdOutdated" && s.max_lag_millis.is_some() {
                Ok(())
            } else {
                Err(format!(
                    "Degraded {d:?}, maxLagMillis {:?}",
                    s.max_lag_millis
                ))
            }
        },
    )
    .await
}

/// A release installed by the chart that shipped the CRD in `crds/` moves to this chart:
/// plain `helm upgrade` is refused (the CRD has no Helm ownership), `--take-ownership` adopts
/// and upgrades it, and `helm uninstall` then keeps it.
pub async fn upgrade_from_crds_folder(env: &Env) -> Result<(), String> {
    let old_chart = tempfile::Builder::new()
        .prefix("kcg-old-chart-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let archive = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git archive {CRDS_FOLDER_CHART_COMMIT} charts/kcg-operator | tar -x -C '{}'",
            old_chart.path().display()
        ))
        .current_dir(root())
        .output()
        .map_err(|e| e.to_string())?;
    if !archive.status.success() {
        println!(
            "  SKIPPED: the chart of commit {CRDS_FOLDER_CHART_COMMIT} is not in this clone (shallow?): {}",
            String::from_utf8_lossy(&archive.stderr).trim()
        );
        return Ok(());
    }
    let old = old_chart.path().join("charts/kcg-operator");
    let old = old.to_str().ok_or("temp path")?;
    // A clean slate: the old chart installs the CRD from crds/ only when it does not exist.
    let api = kube::Api::<KinesisConsumerGroup>::all(env.client.clone());
    wait_until("no group left", WAIT, || async {
        let n = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} groups"))
        }
    })
    .await?;
    env.kubectl(&["delete", "crd", CRD, "--wait=true"]).await?;
    // No operator pod for the old chart: the stand-in would run today's binary under the
    // old chart's RBAC, a pairing no user runs (and its refusals would fail the suite's
    // RBAC check). This flow is about the CRD.
    env.helm(&[
        "install",
        RELEASE,
        old,
        "-n",
        OPERATOR_NS,
        "--set",
        "replicaCount=0",
    ])
    .await?;
    let crd = installed_crd(env).await?;
    if crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        || has_max_lag_millis(&crd)
    {
        return Err(
            "the old chart's CRD should come from crds/: no Helm labels, no maxLagMillis".into(),
        );
    }
    // What the old chart's README said to do after each upgrade.
    env.kubectl(&["apply", "--server-side", "-f", &format!("{old}/crds/")])
        .await?;
    println!(
        "  old chart installed; its CRD came from crds/ and `kubectl apply --server-side` (no Helm ownership)"
    );
    let upgrade = |extra: &'static [&'static str]| {
        let mut args = vec![
            "upgrade",
            RELEASE,
            "charts/kcg-operator",
            "-n",
            OPERATOR_NS,
            "--reset-values",
        ];
        args.extend_from_slice(extra);
        async move { env.helm(&args).await }
    };
    match upgrade(&[]).await {
        Err(e) if e.contains("invalid ownership metadata") => {
            println!(
                "  plain helm upgrade refused, as documented: {}",
                excerpt(&e, "invalid ownership")
            );
        }
        other => {
            return Err(format!(
                "expected Helm to refuse adopting the CRD, got {other:?}"
            ));
        }
    }
    // kubectl's server-side apply owns the CRD's fields: Helm 4 applies server-side too, and
    // takes them over only with --force-conflicts.
    upgrade(&["--take-ownership", "--force-conflicts"]).await?;
    let crd = installed_crd(env).await?;
    let annotations = &crd["metadata"]["annotations"];
    if !has_max_lag_millis(&crd)
        || annotations["meta.helm.sh/release-name"] != RELEASE
        || annotations["helm.sh/resource-policy"] != "keep"
    {
        return Err(format!(
            "after --take-ownership the CRD should be this release's, current, and kept: annotations {annotations}"
        ));
    }
    println!(
        "  helm upgrade --take-ownership --force-conflicts: the CRD is the release's, with status.maxLagMillis"
    );
    wait_operator_ready(env, 1).await?;
    helm_uninstall_operator(env).await?;
    installed_crd(env)
        .await
        .map_err(|e| format!("helm uninstall deleted the CRD despite crds.keep: {e}"))?;
    Ok(())
}
