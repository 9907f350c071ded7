//! The chart's RBAC against the operator's code, so the two cannot drift apart.
//!
//! The chart is rendered with helm (default values: cluster-wide; and
//! `watchNamespaces={team-a}`: Roles only), and the rules bound to the operator's
//! ServiceAccount are collected. The operator, configured with the arguments the chart gives
//! it, then runs every path that calls the Kubernetes API against a recording fake API server
//! that answers like a real one: reconciles of a new group, a refresh, deletes with `Retain`
//! and `Delete`, the controller's startup (its LIST and watches) and the leader election.
//! Every request must be allowed by the rendered rules, as the API server's RBAC authorizer
//! would decide (verb, API group, resource/subresource, namespace, `resourceNames`). The
//! rules must also grant nothing on pods or secrets.
//!
//! helm comes from `$HELM`, else `.tools/bin/helm` (`scripts/tools.sh` installs it there),
//! else `helm` on PATH; the test fails when none runs. DynamoDB is a local stub that
//! answers "table not found" (the table does not matter for RBAC).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use kcg_operator::cli::{self, Cli, RunArgs};
use kcg_operator::controller::{self, Context, DynamoClients, RunOptions};
use kcg_operator::crd::KinesisConsumerGroup;
use kcg_operator::metrics::Metrics;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde::Deserialize as _;
use serde_json::{Value, json};
use tower_test::mock::{self, SendResponse};

const RELEASE: &str = "kcg-operator";
const RELEASE_NS: &str = "kcg-system";

// ------------------------------------------------------------------ the chart

/// The helm binary: `$HELM`, `$KCG_TOOLS_DIR/bin/helm`, `.tools/bin/helm`, or `helm`.
fn helm() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let env_path = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    let candidates: Vec<PathBuf> = env_path("HELM")
        .map(PathBuf::from)
        .into_iter()
        .chain(env_path("KCG_TOOLS_DIR").map(|d| PathBuf::from(d).join("bin/helm")))
        .chain([root.join(".tools/bin/helm"), PathBuf::from("helm")])
        .collect();
    for c in &candidates {
        let runs = Command::new(c)
            .args(["version", "--short"])
            .output()
            .is_ok_and(|o| o.status.success());
        if runs {
            return c.clone();
        }
    }
    panic!(
        "helm is needed to render the chart and none runs (tried {candidates:?}): run `eval \"$(scripts/tools.sh)\"`, which installs it into .tools/bin and sets HELM"
    );
}

/// `helm template` of the chart as release `kcg-operator` in `kcg-system`, one value per
/// document.
fn render(set: &[&str]) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(root.join("charts/kcg-operator"))
        .args(["--namespace", RELEASE_NS]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm template");
    assert!(
        out.status.success(),
        "helm template {set:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// One RBAC rule.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
}

/// A rule as bound to the operator: everywhere (ClusterRoleBinding) or in one namespace.
#[derive(Clone, Debug)]
struct Grant {
    namespace: Option<String>,
    /// `ClusterRole x via ClusterRoleBinding y`, for messages.
    source: String,
    rule: Rule,
}

/// What the chart gives the operator.
struct Chart {
    label: String,
    grants: Vec<Grant>,
    /// `kcg-operator run` parsed from the Deployment's arguments.
    args: RunArgs,
}

fn kind_name(doc: &Value) -> (&str, &str, Option<&str>) {
    (
        doc["kind"].as_str().unwrap_or(""),
        doc["metadata"]["name"].as_str().unwrap_or(""),
        doc["metadata"]["namespace"].as_str(),
    )
}

fn chart(set: &[&str]) -> Chart {
    let docs = render(set);
    let label = if set.is_empty() {
        "default values".to_owned()
    } else {
        format!("--set {}", set.join(" --set "))
    };
    let deployment = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "run"
        })
        .expect("the operator Deployment (args `run ...`)");
    assert_eq!(deployment["metadata"]["namespace"], RELEASE_NS);
    let pod = &deployment["spec"]["template"]["spec"];
    let sa = pod["serviceAccountName"]
        .as_str()
        .expect("the operator's serviceAccountName");
    let container = &pod["containers"][0];
    // The Lease lives in POD_NAMESPACE, the operator's own namespace.
    let pod_ns = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAMESPACE")
        .expect("POD_NAMESPACE env");
    assert_eq!(
        pod_ns["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let argv: Vec<String> = std::iter::once("kcg-operator".to_owned())
        .chain(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        )
        .collect();
    let mut args = match Cli::try_parse_from(&argv) {
        Ok(Cli {
            command: cli::Command::Run(args),
            ..
        }) => args,
        Ok(other) => panic!("not a run command: {other:?}"),
        Err(e) => panic!("the chart's operator arguments {argv:?} do not parse: {e}"),
    };
    args.lease_namespace = RELEASE_NS.to_owned();

    let subject_is_operator = |b: &Value| {
        b["subjects"].as_array().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == RELEASE_NS
        })
    };
    let mut grants = Vec::new();
    for b in docs.iter().filter(|d| {
        (d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") && subject_is_operator(d)
    }) {
        let (bkind, bname, bns) = kind_name(b);
        let role_kind = b["roleRef"]["kind"].as_str().unwrap();
        let role_name = b["roleRef"]["name"].as_str().unwrap();
        let role = docs
            .iter()
            .find(|d| {
                let (k, n, ns) = kind_name(d);
                k == role_kind && n == role_name && (k == "ClusterRole" || ns == bns)
            })
            .unwrap_or_else(|| panic!("{bkind} {bname} refers to {role_kind} {role_name}, which the chart does not render"));
        let rules: Vec<Rule> = serde_json::from_value(role["rules"].clone()).unwrap();
        let namespace = (bkind == "RoleBinding").then(|| bns.unwrap().to_owned());
        for rule in rules {
            grants.push(Grant {
                namespace: namespace.clone(),
                source: format!("{role_kind} {role_name} via {bkind} {bname}"),
                rule,
            });
        }
    }
    assert!(
        !grants.is_empty(),
        "no rules bound to ServiceAccount {RELEASE_NS}/{sa}"
    );
    Chart {
        label,
        grants,
        args,
    }
}

// ------------------------------------------------------------------ RBAC evaluation

/// A request as the RBAC authorizer sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(n) = &self.name {
            write!(f, " {n:?}")?;
        }
        write!(f, " (apiGroup {:?})", self.group)?;
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " cluster-wide"),
        }
    }
}

/// Maps a request to its RBAC attributes, like the API server's request-info resolver.
fn access(method: &Method, path: &str, query: &str) -> Result<Access, String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return Err(format!("{method} {path}: not a resource request")),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some((*name).to_owned()), None),
        [resource, name, sub] => (*resource, Some((*name).to_owned()), Some(*sub)),
        _ => return Err(format!("{method} {path}: not a resource path")),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (m, _) => return Err(format!("{m} {path}: unexpected method")),
    };
    Ok(Access {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: match sub {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_owned(),
        },
        namespace,
        name,
    })
}

/// Whether `rule` allows `a` (rbac/v1 semantics: `*` wildcards, `*/sub`, `resourceNames`).
fn rule_allows(rule: &Rule, a: &Access) -> bool {
    let has = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
    let sub = a.resource.split_once('/').map(|(_, s)| s);
    let resource_ok = rule
        .resources
        .iter()
        .any(|r| r == "*" || *r == a.resource || sub.is_some_and(|s| *r == format!("*/{s}")));
    let name_ok = rule.resource_names.is_empty()
        || a.name
            .as_ref()
            .is_some_and(|n| rule.resource_names.contains(n));
    has(&rule.verbs, &a.verb) && has(&rule.api_groups, &a.group) && resource_ok && name_ok
}

fn allowed<'a>(grants: &'a [Grant], a: &Access) -> Option<&'a Grant> {
    grants.iter().find(|g| {
        let in_scope = match &g.namespace {
            None => true,
            Some(ns) => a.namespace.as_deref() == Some(ns),
        };
        in_scope && rule_allows(&g.rule, a)
    })
}

/// The smallest rule that would allow `a`, for the failure message.
fn missing_rule(a: &Access) -> String {
    let names = match (&a.name, a.verb.as_str()) {
        (Some(n), _) => format!(", resourceNames: [{n:?}]"),
        _ => String::new(),
    };
    let scope = match &a.namespace {
        Some(ns) => format!("in a Role of namespace {ns} or the ClusterRole"),
        None => "in the ClusterRole".to_owned(),
    };
    format!(
        "{{apiGroups: [{:?}], resources: [{:?}], verbs: [{:?}]{names}}} {scope}",
        a.group, a.resource, a.verb
    )
}

// ------------------------------------------------------------------ the fake API server

/// One request the operator made.
#[derive(Clone, Debug)]
struct Seen {
    phase: String,
    method: Method,
    path: String,
    query: String,
    /// What the API server authorizes besides the request itself, see [`implied`].
    implied: Vec<(Access, &'static str)>,
}

/// A recording fake API server: objects are stored by path; GET answers them or 404, LIST
/// an empty list, POST/PATCH/PUT store and echo, DELETE removes (foreground: marks the
/// object deleted and keeps it until [`FakeApi::collect_garbage`]), and watches stay open
/// without events.
#[derive(Default)]
struct FakeApi {
    objects: Mutex<BTreeMap<String, Value>>,
    seen: Mutex<Vec<Seen>>,
    phase: Mutex<String>,
}

impl FakeApi {
    /// A client whose every request this fake answers.
    fn client(self: &Arc<Self>) -> Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            // Watches are held open (never answered) until the client goes.
            let mut open_watches: Vec<SendResponse<Response<Body>>> = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                let query = req.uri().query().unwrap_or("").to_owned();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let mut seen = Seen {
                    phase: fake.phase.lock().unwrap().clone(),
                    method: method.clone(),
                    path: path.clone(),
                    query: query.clone(),
                    implied: Vec::new(),
                };
                let (code, answer) = match access(&method, &path, &query) {
                    Ok(a) if a.verb == "watch" => {
                        fake.seen.lock().unwrap().push(seen);
                        open_watches.push(send);
                        continue;
                    }
                    Ok(a) => {
                        let existed = fake.objects.lock().unwrap().contains_key(&path);
                        seen.implied = implied(&a, existed, &body);
                        fake.answer(&method, &path, &a, body)
                    }
                    // Reported by `check`.
                    Err(e) => (StatusCode::NOT_FOUND, status(404, "NotFound", &e)),
                };
                fake.seen.lock().unwrap().push(seen);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        Client::new(service, "default")
    }

    fn answer(&self, method: &Method, path: &str, a: &Access, body: Value) -> (StatusCode, Value) {
        let mut objects = self.objects.lock().unwrap();
        // A subresource (`/status`) reads and writes its object.
        let key = if a.resource.contains('/') {
            path.rsplit_once('/').unwrap().0.to_owned()
        } else {
            path.to_owned()
        };
        match a.verb.as_str() {
            "list" => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}),
            ),
            "get" => match objects.get(&key) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => not_found(),
            },
            "create" => {
                let name = body["metadata"]["name"].as_str().unwrap_or("generated");
                let key = format!("{path}/{name}");
                if objects.contains_key(&key) {
                    return (
                        StatusCode::CONFLICT,
                        status(409, "AlreadyExists", "already exists"),
                    );
                }
                objects.insert(key, body.clone());
                (StatusCode::CREATED, body)
            }
            "update" => {
                objects.insert(key, body.clone());
                (StatusCode::OK, body)
            }
            "patch" => {
                let mut object = objects.get(&key).cloned().unwrap_or(json!({}));
                if body.is_array() {
                    if !objects.contains_key(&key) {
                        return not_found();
                    }
                    json_patch(&mut object, &body);
                } else {
                    merge(&mut object, body);
                }
                objects.insert(key, object.clone());
                (StatusCode::OK, object)
            }
            "delete" => match objects.get_mut(&key) {
                None => not_found(),
                Some(o) if body["propagationPolicy"] == "Foreground" => {
                    o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    o["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
                    (StatusCode::OK, o.clone())
                }
                Some(_) => (StatusCode::OK, objects.remove(&key).unwrap()),
            },
            verb => (
                StatusCode::METHOD_NOT_ALLOWED,
                status(
                    405,
                    "MethodNotAllowed",
                    &format!("the fake does not answer {verb} ({method} {path})"),
                ),
            ),
        }
    }

    fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_owned();
    }

    fn put(&self, path: &str, object: Value) {
        self.objects.lock().unwrap().insert(path.to_owned(), object);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// What the garbage collector does once the dependents of a foreground deletion are
    /// gone: removes the objects it was holding.
    fn collect_garbage(&self) {
        self.objects
            .lock()
            .unwrap()
            .retain(|_, o| o["metadata"]["finalizers"] != json!(["foregroundDeletion"]));
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The checks the API server makes besides the request's own verb:
/// - a PATCH that creates its object (server-side apply of a new ConfigMap or Deployment)
///   is authorized as `create` as well;
/// - a write that sets an owner reference with `blockOwnerDeletion` needs `update` on the
///   owner's `finalizers` subresource where the OwnerReferencesPermissionEnforcement
///   admission plugin is on (OpenShift, many hardened clusters).
fn implied(a: &Access, existed: bool, body: &Value) -> Vec<(Access, &'static str)> {
    let mut out = Vec::new();
    if a.verb == "patch" && !existed && !a.resource.contains('/') {
        out.push((
            Access {
                verb: "create".into(),
                ..a.clone()
            },
            "a PATCH that creates its object is also authorized as create",
        ));
    }
    if matches!(a.verb.as_str(), "create" | "update" | "patch") {
        let owners = body["metadata"]["ownerReferences"].as_array();
        for o in owners.into_iter().flatten() {
            if o["blockOwnerDeletion"] != true {
                continue;
            }
            let api_version = o["apiVersion"].as_str().unwrap_or("");
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let kind = o["kind"].as_str().unwrap_or("").to_lowercase();
            out.push((
                Access {
                    verb: "update".into(),
                    group: group.to_owned(),
                    resource: format!("{kind}s/finalizers"),
                    namespace: a.namespace.clone(),
                    name: o["name"].as_str().map(str::to_owned),
                },
                "blockOwnerDeletion on an owner reference (OwnerReferencesPermissionEnforcement)",
            ));
        }
    }
    out
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": message})
}

fn not_found() -> (StatusCode, Value) {
    (StatusCode::NOT_FOUND, status(404, "NotFound", "not found"))
}

/// JSON merge patch (RFC 7386): objects merge, `null` removes, anything else replaces.
fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

/// The JSON patch operations kube's finalizer helper sends: `test` (not checked), `add`,
/// `remove` and `replace` on object keys and array indexes (`-` appends).
fn json_patch(target: &mut Value, ops: &Value) {
    for op in ops.as_array().unwrap() {
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let parent = match target.pointer_mut(parent) {
            Some(p) => p,
            None if op["op"] == "test" => continue,
            None => panic!("json patch {op} on a missing path"),
        };
        match (op["op"].as_str().unwrap(), parent) {
            ("test", _) => {}
            ("add" | "replace", Value::Array(items)) => {
                let value = op["value"].clone();
                match last.parse::<usize>() {
                    Ok(i) if op["op"] == "replace" => items[i] = value,
                    Ok(i) => items.insert(i, value),
                    Err(_) => items.push(value),
                }
            }
            ("add" | "replace", Value::Object(map)) => {
                map.insert(last.to_owned(), op["value"].clone());
            }
            ("remove", Value::Array(items)) => {
                items.remove(last.parse::<usize>().unwrap());
            }
            ("remove", Value::Object(map)) => {
                map.remove(last);
            }
            (other, parent) => panic!("json patch {other} on {parent}"),
        }
    }
}

/// A DynamoDB endpoint that answers every call with ResourceNotFoundException: the group
/// has no table, so its status is Degraded and a `Delete` cleanup finds no rows.
async fn dynamodb_without_tables() -> aws_config::SdkConfig {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/x-amz-json-1.0")],
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ResourceNotFoundException","message":"Requested resource not found"}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(format!("http://{addr}"))
        .load()
        .await
}

// ------------------------------------------------------------------ driving the operator

fn group_path(ns: &str, name: &str) -> String {
    format!("/apis/kcg.dev/v1alpha1/namespaces/{ns}/kinesisconsumergroups/{name}")
}

fn new_group(ns: &str, name: &str, on_delete: &str) -> Value {
    json!({
        "apiVersion": "kcg.dev/v1alpha1",
        "kind": "KinesisConsumerGroup",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {
            "replicas": 2,
            "streams": [{"name": "orders"}],
            "stateStore": {"table": "kcg-state", "onDelete": on_delete},
            "delivery": {"stdout": {}}
        }
    })
}

/// Reconciles the group as the fake API server currently stores it.
async fn reconcile(fake: &FakeApi, ctx: &Arc<Context>, path: &str) -> Result<Action, String> {
    let kcg: KinesisConsumerGroup = serde_json::from_value(fake.get(path).unwrap()).unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        controller::reconcile(Arc::new(kcg), ctx.clone()),
    )
    .await
    .expect("reconcile timed out");
    result.map_err(|e| controller::error_chain(&e))
}

fn mark_deleted(fake: &FakeApi, path: &str) {
    let mut g = fake.get(path).unwrap();
    g["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    fake.put(path, g);
}

/// What a reconcile should end with.
#[derive(Debug)]
enum Want {
    /// Any success.
    Done,
    /// This action.
    Action(Action),
    /// An error whose chain contains this text.
    Error(&'static str),
}

/// The operator's requests, and the outcomes that differed from what this test expects of
/// the code. Those are reported after the RBAC check, so that a request the chart does not
/// allow is named even when it also changed the outcome.
struct Run {
    seen: Vec<Seen>,
    surprises: Vec<String>,
}

/// Runs every API path of the operator against the fake, configured as `chart` configures
/// it, with the groups in `ns`.
async fn drive(chart: &Chart, ns: &str) -> Run {
    let fake = Arc::new(FakeApi::default());
    let settings = chart.args.settings();
    let ctx = Arc::new(Context::new(
        fake.client(),
        settings.clone(),
        Arc::new(Metrics::new()),
        DynamoClients::from_config(dynamodb_without_tables().await),
    ));
    let mut surprises = Vec::new();
    let mut step = async |phase: &str, path: &str, want: Want| {
        fake.set_phase(phase);
        let got = reconcile(&fake, &ctx, path).await;
        let ok = match (&got, &want) {
            (Ok(_), Want::Done) => true,
            (Ok(a), Want::Action(w)) => a == w,
            (Err(e), Want::Error(w)) => e.contains(w),
            _ => false,
        };
        if !ok {
            surprises.push(format!("{phase}: expected {want:?}, got {got:?}"));
        }
    };

    // A new group: finalizer, ServiceAccount, ConfigMap, Deployment, status, events.
    let orders = group_path(ns, "orders");
    fake.put(&orders, new_group(ns, "orders", "Delete"));
    let added = Want::Action(Action::await_change());
    step("reconcile of a new group (finalizer)", &orders, added).await;
    step("reconcile of a new group (apply)", &orders, Want::Done).await;
    step("refresh", &orders, Want::Done).await;
    // The same findings on an object that shows no status yet: the same Warning again,
    // which the recorder turns into a series (a PATCH of the first event).
    let mut without_status = fake.get(&orders).unwrap();
    without_status.as_object_mut().unwrap().remove("status");
    fake.put(&orders, without_status);
    step("repeated event (series)", &orders, Want::Done).await;
    // Scaled to one worker: the spec changed (a new generation), the budget goes.
    let mut scaled = fake.get(&orders).unwrap();
    scaled["spec"]["replicas"] = json!(1);
    scaled["metadata"]["generation"] = json!(2);
    fake.put(&orders, scaled);
    step("scaled to 1 (the budget is deleted)", &orders, Want::Done).await;
    let pdb = format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/orders");
    let pdb_left = fake.get(&pdb).is_some();

    // onDelete: Delete: foreground deletion of the workers, wait, rows, finalizer.
    mark_deleted(&fake, &orders);
    let waiting = Want::Error("waiting for");
    step(
        "delete with onDelete Delete (workers stopping)",
        &orders,
        waiting,
    )
    .await;
    fake.collect_garbage();
    let removed = Want::Action(Action::await_change());
    step(
        "delete with onDelete Delete (workers gone)",
        &orders,
        removed,
    )
    .await;

    // onDelete: Retain: only the finalizer goes.
    let archive = group_path(ns, "archive");
    let mut g = new_group(ns, "archive", "Retain");
    g["metadata"]["finalizers"] = json!([controller::FINALIZER]);
    g["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    fake.put(&archive, g);
    let removed = Want::Action(Action::await_change());
    step("delete with onDelete Retain", &archive, removed).await;
    if pdb_left {
        surprises.push("the PodDisruptionBudget is left after scaling to 1".to_owned());
    }
    for path in [&orders, &archive] {
        let finalizers = fake.get(path).unwrap()["metadata"]["finalizers"].clone();
        if finalizers != json!([]) {
            surprises.push(format!(
                "{path}: finalizers left after cleanup: {finalizers}"
            ));
        }
    }

    // The controller's startup: the CRD check and the watches.
    fake.set_phase("controller startup");
    let opts = RunOptions {
        namespaces: chart.args.namespaces.clone(),
        settings,
        check_crd: chart.args.check_crd,
    };
    let running = tokio::spawn(controller::run(
        fake.client(),
        opts,
        Arc::new(Metrics::new()),
    ));
    let watched = |seen: &[Seen]| {
        let resources: BTreeSet<String> = seen
            .iter()
            .filter_map(|s| access(&s.method, &s.path, &s.query).ok())
            .filter(|a| a.verb == "watch")
            .map(|a| a.resource)
            .collect();
        resources.len() >= 4
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !watched(&fake.seen()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer, for requests that follow the watches.
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.abort();
    let _ = running.await;

    // Leader election, with the chart's Lease name in the operator's namespace.
    fake.set_phase("leader election");
    if let Err(e) = elect(&fake, chart).await {
        surprises.push(format!("leader election: {e}"));
    }

    Run {
        seen: fake.seen(),
        surprises,
    }
}

/// Becomes leader as `run` does, then gives the Lease back.
async fn elect(fake: &Arc<FakeApi>, chart: &Chart) -> Result<(), String> {
    let manager = cli::lease_manager_builder(
        fake.client(),
        &chart.args.lease_name,
        &chart.args.lease_namespace,
        "kcg-operator-0",
    )
    .build()
    .await
    .map_err(|e| e.to_string())?;
    let (mut leader, task) = manager.watch().await;
    tokio::time::timeout(Duration::from_secs(30), leader.wait_for(|l| *l))
        .await
        .map_err(|_| "not leader after 30s".to_owned())?
        .map_err(|e| e.to_string())?;
    fake.set_phase("leader election (release)");
    drop(leader);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .map_err(|_| "the Lease was not released within 30s".to_owned())?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Every request allowed; the paths this test means to cover were covered; and the code
/// behaved as expected.
fn check(chart: &Chart, ns: &str, run: &Run) {
    let seen = &run.seen;
    let mut denied = BTreeMap::<String, Vec<String>>::new();
    let mut used = BTreeSet::new();
    let mut allowed_by = BTreeSet::new();
    for s in seen {
        let query = if s.query.is_empty() {
            String::new()
        } else {
            format!("?{}", s.query)
        };
        let request = format!("{} {}{query} (during {})", s.method, s.path, s.phase);
        let a = match access(&s.method, &s.path, &s.query) {
            Ok(a) => a,
            Err(e) => {
                denied.entry(e).or_default().push(request);
                continue;
            }
        };
        let checks = std::iter::once((a, "")).chain(s.implied.iter().cloned());
        for (a, why) in checks {
            used.insert((a.verb.clone(), a.resource.clone()));
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(" [{why}]")
            };
            if let Some(g) = allowed(&chart.grants, &a) {
                allowed_by.insert(format!("{a}: {}{why}", g.source));
            } else {
                denied
                    .entry(format!("{a}{why}: needs {}", missing_rule(&a)))
                    .or_default()
                    .push(request.clone());
            }
        }
    }
    if !denied.is_empty() {
        let rules: Vec<String> = chart
            .grants
            .iter()
            .map(|g| {
                format!(
                    "  {:?} in {}: {:?}",
                    g.rule,
                    g.namespace.as_deref().unwrap_or("all namespaces"),
                    g.source
                )
            })
            .collect();
        let list: Vec<String> = denied
            .iter()
            .map(|(what, reqs)| format!("- {what}\n    e.g. {}", reqs[0]))
            .collect();
        panic!(
            "chart ({}), groups in namespace {ns}: {} kind(s) of request the operator makes are not allowed by the chart's RBAC:\n{}\nrules bound to the operator:\n{}",
            chart.label,
            denied.len(),
            list.join("\n"),
            rules.join("\n")
        );
    }
    eprintln!(
        "chart ({}), groups in {ns}: {} requests, all allowed:\n  {}",
        chart.label,
        seen.len(),
        allowed_by.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    let expected = [
        ("patch", "kinesisconsumergroups"),
        ("patch", "kinesisconsumergroups/status"),
        ("list", "kinesisconsumergroups"),
        ("watch", "kinesisconsumergroups"),
        ("watch", "deployments"),
        ("watch", "configmaps"),
        ("watch", "poddisruptionbudgets"),
        // The workers' budget: applied with 2 replicas, deleted once scaled to 1.
        ("patch", "poddisruptionbudgets"),
        ("create", "poddisruptionbudgets"),
        ("delete", "poddisruptionbudgets"),
        // The worker ServiceAccount's server-side apply (a PATCH that creates it, so
        // authorized as create too), after its GET.
        ("get", "serviceaccounts"),
        ("patch", "serviceaccounts"),
        ("create", "serviceaccounts"),
        ("patch", "configmaps"),
        ("create", "configmaps"),
        ("patch", "deployments"),
        ("create", "deployments"),
        ("delete", "deployments"),
        ("get", "deployments"),
        ("create", "events"),
        ("patch", "events"),
        ("get", "leases"),
        ("create", "leases"),
        ("patch", "leases"),
        // The CRD check at start (cluster-wide installs only).
        ("get", "customresourcedefinitions"),
    ];
    // With workerServiceAccount.create=false the operator leaves ServiceAccounts alone.
    let creates_worker_sa = chart.args.create_worker_service_account;
    let missing: Vec<_> = expected
        .iter()
        .filter(|(_, r)| creates_worker_sa || *r != "serviceaccounts")
        .filter(|(_, r)| chart.args.check_crd || *r != "customresourcedefinitions")
        .filter(|(v, r)| !used.contains(&((*v).to_owned(), (*r).to_owned())))
        .collect();
    assert!(
        missing.is_empty(),
        "these paths were not exercised, so their RBAC is unchecked: {missing:?}; requests made: {used:?}"
    );
    if !creates_worker_sa {
        let accounts: Vec<_> = used
            .iter()
            .filter(|(_, r)| r == "serviceaccounts")
            .collect();
        assert!(
            accounts.is_empty(),
            "chart ({}): --create-worker-service-account=false, yet the operator made {accounts:?} on serviceaccounts",
            chart.label
        );
    }
    let pods: Vec<_> = seen.iter().filter(|s| s.path.contains("/pods")).collect();
    assert!(pods.is_empty(), "the operator reads no pods: {pods:?}");
    assert!(
        run.surprises.is_empty(),
        "the operator's code did not behave as expected:\n{}",
        run.surprises.join("\n")
    );
}

/// Least privilege: nothing on pods or secrets, in any namespace, by any verb.
fn check_least_privilege(chart: &Chart, namespaces: &[&str]) {
    let verbs = [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ];
    let resources = ["pods", "pods/log", "pods/exec", "pods/eviction", "secrets"];
    for ns in namespaces
        .iter()
        .map(|n| Some((*n).to_owned()))
        .chain([None])
    {
        for verb in verbs {
            for resource in resources {
                for name in [None, Some("any".to_owned())] {
                    let a = Access {
                        verb: verb.into(),
                        group: String::new(),
                        resource: resource.into(),
                        namespace: ns.clone(),
                        name,
                    };
                    if let Some(g) = allowed(&chart.grants, &a) {
                        panic!(
                            "chart ({}): the operator must have no access to pods or secrets, but {} allows {a}: {:?}",
                            chart.label, g.source, g.rule
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ tests

/// Renders the chart with `set`, checks that it watches `watched` (empty: everything, with
/// cluster-wide rules) and grants nothing on pods or secrets, runs the operator with groups
/// in `ns` and checks every request it made.
async fn check_install(set: &[&str], watched: &[&str], ns: &str) {
    let chart = chart(set);
    assert_eq!(chart.args.namespaces, watched, "chart ({})", chart.label);
    assert_eq!(
        chart.grants.iter().any(|g| g.namespace.is_none()),
        watched.is_empty(),
        "chart ({}): cluster-wide rules only for a cluster-wide install",
        chart.label
    );
    check_least_privilege(&chart, &[RELEASE_NS, "default", "team-a"]);
    let run = drive(&chart, ns).await;
    check(&chart, ns, &run);
}

#[tokio::test]
async fn default_install_allows_every_request_of_the_operator_and_nothing_on_pods_or_secrets() {
    // A group outside the release namespace: the quick start's `kubectl apply` into default.
    check_install(&[], &[], "default").await;
}

#[tokio::test]
async fn namespaced_install_allows_every_request_of_the_operator_and_nothing_on_pods_or_secrets() {
    check_install(&["watchNamespaces={team-a}"], &["team-a"], "team-a").await;
}

#[tokio::test]
async fn install_without_worker_service_account_creation_grants_nothing_on_service_accounts() {
    let chart = chart(&["workerServiceAccount.create=false"]);
    assert!(!chart.args.create_worker_service_account);
    let on_accounts: Vec<_> = chart
        .grants
        .iter()
        .filter(|g| {
            g.rule
                .resources
                .iter()
                .any(|r| r == "*" || r.starts_with("serviceaccounts"))
        })
        .collect();
    assert!(
        on_accounts.is_empty(),
        "the operator makes no worker ServiceAccount, so it needs no rule on them: {on_accounts:?}"
    );
    check_least_privilege(&chart, &[RELEASE_NS, "default", "team-a"]);
    let run = drive(&chart, "default").await;
    check(&chart, "default", &run);
}

#[test]
fn the_chart_passes_its_worker_service_account_settings_to_the_operator() {
    let chart = chart(&[
        "workerServiceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/kcg-worker",
    ]);
    let settings = chart.args.settings();
    assert!(settings.create_worker_service_account);
    assert_eq!(
        settings.worker_service_account.as_deref(),
        Some("kcg-operator-worker")
    );
    assert_eq!(
        settings.worker_service_account_annotations["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/kcg-worker"
    );
    let sa_rules: Vec<_> = chart
        .grants
        .iter()
        .filter(|g| g.rule.resources.iter().any(|r| r == "serviceaccounts"))
        .map(|g| (g.rule.verbs.clone(), g.rule.resource_names.clone()))
        .collect();
    assert_eq!(
        sa_rules,
        vec![
            (vec!["create".to_owned()], vec![]),
            (
                vec!["get".to_owned(), "patch".to_owned()],
                vec!["kcg-operator-worker".to_owned()]
            ),
        ],
        "create (cannot be limited by name), and get/patch on the worker account's name only"
    );
}

#[test]
fn the_rbac_evaluator_matches_kubernetes_semantics() {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]| Rule {
        api_groups: groups.iter().map(|s| (*s).to_owned()).collect(),
        resources: resources.iter().map(|s| (*s).to_owned()).collect(),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        resource_names: names.iter().map(|s| (*s).to_owned()).collect(),
    };
    let a = |m: Method, path: &str, q: &str| access(&m, path, q).unwrap();
    let get_sa = a(Method::GET, "/api/v1/namespaces/ns/serviceaccounts/w", "");
    assert_eq!(
        (
            get_sa.verb.as_str(),
            get_sa.group.as_str(),
            get_sa.resource.as_str(),
            get_sa.namespace.as_deref(),
            get_sa.name.as_deref()
        ),
        ("get", "", "serviceaccounts", Some("ns"), Some("w"))
    );
    let watch = a(
        Method::GET,
        "/apis/apps/v1/deployments",
        "watch=true&labelSelector=x",
    );
    assert_eq!(
        (watch.verb.as_str(), watch.namespace.clone()),
        ("watch", None)
    );
    let status = a(
        Method::PATCH,
        "/apis/kcg.dev/v1alpha1/namespaces/ns/kinesisconsumergroups/g/status",
        "",
    );
    assert_eq!(status.resource, "kinesisconsumergroups/status");
    let create = a(
        Method::POST,
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
        "",
    );
    assert_eq!(
        (create.verb.as_str(), create.name.clone()),
        ("create", None)
    );

    let named_get = rule(&[""], &["serviceaccounts"], &["get"], &["w"]);
    assert!(rule_allows(&named_get, &get_sa));
    assert!(!rule_allows(
        &named_get,
        &a(
            Method::GET,
            "/api/v1/namespaces/ns/serviceaccounts/other",
            ""
        )
    ));
    assert!(
        !rule_allows(
            &named_get,
            &a(Method::GET, "/api/v1/namespaces/ns/serviceaccounts", "")
        ),
        "a list has no name"
    );
    let named_create = rule(&["coordination.k8s.io"], &["leases"], &["create"], &["l"]);
    assert!(
        !rule_allows(&named_create, &create),
        "create cannot be limited by name"
    );
    assert!(
        !rule_allows(
            &rule(&["kcg.dev"], &["kinesisconsumergroups"], &["patch"], &[]),
            &status
        ),
        "a subresource needs its own rule"
    );
    assert!(rule_allows(&rule(&["*"], &["*"], &["*"], &[]), &status));
    assert!(rule_allows(
        &rule(&["kcg.dev"], &["*/status"], &["patch"], &[]),
        &status
    ));
    let grants = vec![Grant {
        namespace: Some("a".into()),
        source: "Role".into(),
        rule: rule(&["apps"], &["deployments"], &["watch"], &[]),
    }];
    assert!(
        allowed(
            &grants,
            &a(
                Method::GET,
                "/apis/apps/v1/namespaces/a/deployments",
                "watch=1"
            )
        )
        .is_some()
    );
    assert!(
        allowed(
            &grants,
            &a(
                Method::GET,
                "/apis/apps/v1/namespaces/b/deployments",
                "watch=1"
            )
        )
        .is_none()
    );
    assert!(
        allowed(&grants, &watch).is_none(),
        "a Role never allows a cluster-wide request"
    );
}
