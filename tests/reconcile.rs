//! Reconcile tests in the kube-rs ApiServerVerifier pattern: the Kubernetes API is a
//! `tower_test::mock` that checks every request the reconciler makes and answers like the
//! API server would. The state store is the REAL DynamoDB Local emulator
//! (`AWS_ENDPOINT_URL_DYNAMODB`); without that variable the tests print a skip message, and
//! with it set but the emulator unreachable they fail.

use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kcg_operator::controller::{self, Context, DynamoClients, Error};
use kcg_operator::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus, OnDelete};
use kcg_operator::metrics::Metrics;
use kcg_operator::observed::Observed;
use kcg_operator::resources::{CONFIG_HASH_ANNOTATION, OperatorSettings};
use kcg_worker::store::schema::{ShardCacheRow, ShardInfo, shards_sk};
use kcg_worker::store::{StateStore, now_ms};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

const NS: &str = "team-a";
const NAME: &str = "orders";
const GROUP: &str = "team-a/orders";
/// The default worker ServiceAccount of [`settings_with_worker_sa`].
const WORKER_SA: &str = "kcg-operator-worker";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/kcg-worker";

// ------------------------------------------------------------------ emulator

/// The emulator's endpoint, or None (with a printed skip message) when not configured.
fn emulator() -> Option<String> {
    match std::env::var("AWS_ENDPOINT_URL_DYNAMODB") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIP: AWS_ENDPOINT_URL_DYNAMODB is not set; start DynamoDB Local (scripts/emulators.sh start dynamodb) and export it to run this test"
            );
            None
        }
    }
}

async fn aws(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint)
        .load()
        .await
}

fn unique_table(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("kcg-reconcile-{test}-{}-{nanos}", std::process::id())
}

/// Creates the table (failing the test if the emulator is unreachable) and seeds a group:
/// two clients, one stream of 4 shards, shards 0-1 owned by the first client and 2-3 by
/// the second.
async fn seeded_store(endpoint: &str, table: &str) -> StateStore {
    let client = aws_sdk_dynamodb::Client::new(&aws(endpoint).await);
    let store = StateStore::new(client, table);
    store.ensure_table(true).await.expect(
        "DynamoDB Local is configured (AWS_ENDPOINT_URL_DYNAMODB) but could not create a table",
    );
    store
        .register(GROUP, "worker-a-1", "orders-7c9-a", now_ms(), &[])
        .await
        .unwrap();
    store
        .register(GROUP, "worker-b-1", "orders-7c9-b", now_ms(), &[])
        .await
        .unwrap();
    let shards: Vec<ShardInfo> = (0..4)
        .map(|i| ShardInfo {
            starting_sequence: None,
            shard_id: format!("shardId-{i:012}"),
            parent: None,
            adjacent_parent: None,
            closed: false,
        })
        .collect();
    store
        .put_shard_cache(&ShardCacheRow {
            pk: GROUP.into(),
            sk: shards_sk("orders"),
            stream: "orders".into(),
            shards: shards.clone(),
            refreshed_at_ms: 0,
            refreshed_by: "worker-a-1".into(),
        })
        .await
        .unwrap();
    for (i, s) in shards.iter().enumerate() {
        let owner = if i < 2 { "worker-a-1" } else { "worker-b-1" };
        store
            .create_lease(GROUP, "orders", &s.shard_id)
            .await
            .unwrap();
        store
            .claim_lease(GROUP, "orders", &s.shard_id, owner, None)
            .await
            .unwrap();
    }
    store
}

// ------------------------------------------------------------------ fixtures

fn group(table: &str, extra: Value) -> KinesisConsumerGroup {
    let mut v = json!({
        "apiVersion": "kcg.dev/v1alpha1",
        "kind": "KinesisConsumerGroup",
        "metadata": {
            "name": NAME, "namespace": NS, "uid": "6f1c1d1e-0000-4000-8000-000000000001",
            "generation": 1, "resourceVersion": "100"
        },
        "spec": {
            "replicas": 2,
            "streams": [{"name": "orders"}],
            "stateStore": {"table": table},
            "delivery": {"stdout": {}}
        }
    });
    merge(&mut v, extra);
    let mut kcg: KinesisConsumerGroup = serde_json::from_value(v).unwrap();
    // As the operator leaves it: the cleanup finalizer exactly with onDelete: Delete.
    if kcg.spec.state_store.on_delete == OnDelete::Delete && kcg.metadata.finalizers.is_none() {
        kcg.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    }
    kcg
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// A context whose settings name no default worker ServiceAccount (the pods use the
/// namespace's `default`), so no reconcile looks at ServiceAccounts.
async fn context(endpoint: &str) -> (Arc<Context>, Verifier) {
    context_with(
        endpoint,
        OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test"),
    )
    .await
}

/// Settings as the chart gives them: a default worker ServiceAccount with an IRSA role.
fn settings_with_worker_sa() -> OperatorSettings {
    let mut s = OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test");
    s.worker_service_account = Some(WORKER_SA.into());
    s.worker_service_account_annotations =
        [("eks.amazonaws.com/role-arn".to_owned(), ROLE_ARN.to_owned())].into();
    s
}

async fn context_with(endpoint: &str, settings: OperatorSettings) -> (Arc<Context>, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(
        client,
        settings,
        Arc::new(Metrics::new()),
        DynamoClients::from_config(aws(endpoint).await),
    );
    (Arc::new(ctx), Verifier(handle))
}

// ------------------------------------------------------------------ the verifier

/// The fake API server: each `expect_*` call takes the next request, checks it and answers.
struct Verifier(Handle<Request<Body>, Response<Body>>);

struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
    send: SendResponse<Response<Body>>,
}

impl Verifier {
    async fn next(&mut self) -> Seen {
        let (req, send) = tokio::time::timeout(Duration::from_secs(30), self.0.next_request())
            .await
            .expect("timed out waiting for the reconciler's next API request")
            .expect("the reconciler stopped calling the API");
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Seen {
            method,
            path,
            query,
            body,
            send,
        }
    }

    fn reply(send: SendResponse<Response<Body>>, code: StatusCode, body: &Value) {
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    fn assert_ssa(s: &Seen) {
        assert_eq!(s.method, Method::PATCH, "{}", s.path);
        assert!(
            s.query.contains("fieldManager=kcg-operator"),
            "SSA field manager: {}",
            s.query
        );
        assert!(s.query.contains("force=true"), "SSA force: {}", s.query);
    }

    /// The read of an owned object the watch cache does not hold (empty in these tests
    /// unless fed), answered 404.
    async fn expect_read_missing(&mut self, path: &str) {
        let s = self.next().await;
        assert_eq!((s.method.clone(), s.path.as_str()), (Method::GET, path));
        Self::not_found(s.send);
    }

    /// The read of the ConfigMap (missing), then its apply; returns its body.
    async fn expect_config_map(&mut self) -> Value {
        self.expect_read_missing(&format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config"))
            .await;
        let s = self.next().await;
        assert_eq!(
            s.path,
            format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config")
        );
        Self::assert_ssa(&s);
        let body = s.body.clone();
        Self::reply(s.send, StatusCode::OK, &body);
        body
    }

    /// The read of the Deployment (missing), then its apply, answered with `status` as the
    /// API server would show it; returns the applied body.
    async fn expect_deployment(&mut self, status: Value) -> Value {
        self.expect_deployment_and_pdb(status).await.0
    }

    /// [`Verifier::expect_deployment`], also returning the budget applied after it (`None`:
    /// deleted).
    async fn expect_deployment_and_pdb(&mut self, status: Value) -> (Value, Option<Value>) {
        self.expect_read_missing(&format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"))
            .await;
        let s = self.next().await;
        assert_eq!(
            s.path,
            format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}")
        );
        Self::assert_ssa(&s);
        let body = s.body.clone();
        let mut answer = body.clone();
        merge(
            &mut answer,
            json!({"metadata": {"generation": 1}, "status": status}),
        );
        Self::reply(s.send, StatusCode::OK, &answer);
        let pdb = self.expect_pdb().await;
        (body, pdb)
    }

    /// What follows the Deployment: the workers' PodDisruptionBudget applied (more than one
    /// replica) or deleted (fewer; answered 404 as when there is none). Returns the applied
    /// budget, `None` for a delete.
    async fn expect_pdb(&mut self) -> Option<Value> {
        let path = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}");
        let mut s = self.next().await;
        assert_eq!(s.path, path);
        if s.method == Method::DELETE {
            Self::not_found(s.send);
            return None;
        }
        // Read (missing) before it is applied, like the other owned objects.
        assert_eq!(s.method, Method::GET);
        Self::not_found(s.send);
        s = self.next().await;
        assert_eq!(s.path, path);
        Self::assert_ssa(&s);
        let body = s.body.clone();
        Self::reply(s.send, StatusCode::OK, &body);
        Some(body)
    }

    /// Answers every event write until the reconciler is quiet for 300 ms.
    async fn drain_events(&mut self) {
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            assert!(req.uri().path().contains("/events"), "{}", req.uri());
            let b = req.into_body().collect_bytes().await.unwrap();
            send.send_response(Response::builder().body(Body::from(b.to_vec())).unwrap());
        }
    }

    /// The status apply; returns the status written.
    async fn expect_status(&mut self, kcg: &KinesisConsumerGroup) -> KinesisConsumerGroupStatus {
        let s = self.next().await;
        assert_eq!(
            s.path,
            format!("/apis/kcg.dev/v1alpha1/namespaces/{NS}/kinesisconsumergroups/{NAME}/status")
        );
        Self::assert_ssa(&s);
        assert_eq!(s.body["kind"], "KinesisConsumerGroup");
        let status: KinesisConsumerGroupStatus =
            serde_json::from_value(s.body["status"].clone()).unwrap();
        let mut answer = serde_json::to_value(kcg).unwrap();
        answer["status"] = s.body["status"].clone();
        Self::reply(s.send, StatusCode::OK, &answer);
        status
    }

    /// An event write on the group: a POST of a new Event, or a PATCH of an earlier Event
    /// (named in the path) that turns it into a series. Returns the method and the event.
    async fn expect_event_write(&mut self) -> (Method, Value) {
        let s = self.next().await;
        let events = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
        match s.method {
            Method::POST => assert_eq!(s.path, events),
            Method::PATCH => assert_eq!(
                s.path,
                format!(
                    "{events}/{}",
                    s.body["metadata"]["name"].as_str().unwrap_or("?")
                )
            ),
            _ => panic!("expected an event write, got {} {}", s.method, s.path),
        }
        assert_eq!(s.body["regarding"]["name"], NAME);
        let body = s.body.clone();
        Self::reply(s.send, StatusCode::OK, &body);
        (s.method, body)
    }

    /// A new event (a POST); returns (type, reason, note).
    async fn expect_event(&mut self) -> (String, String, String) {
        let (method, body) = self.expect_event_write().await;
        assert_eq!(
            method,
            Method::POST,
            "a new event, not a series update: {body}"
        );
        let field = |f: &str| body[f].as_str().unwrap_or("").to_owned();
        (field("type"), field("reason"), field("note"))
    }

    /// The new events of a reconcile up to the Warning `reason` (it comes after at most a
    /// leader and a distribution event); returns its note.
    async fn expect_warning(&mut self, reason: &str) -> String {
        for _ in 0..3 {
            let (ty, r, note) = self.expect_event().await;
            if r == reason {
                assert_eq!(ty, "Warning", "{reason}: {note}");
                return note;
            }
        }
        panic!("no Warning {reason} event among the reconcile's first three events");
    }

    /// The read of the default worker ServiceAccount, answered with `existing` or 404.
    async fn expect_worker_sa_get(&mut self, existing: Option<Value>) {
        let s = self.next().await;
        assert_eq!(s.method, Method::GET);
        assert_eq!(
            s.path,
            format!("/api/v1/namespaces/{NS}/serviceaccounts/{WORKER_SA}")
        );
        match existing {
            Some(account) => Self::reply(s.send, StatusCode::OK, &account),
            None => Self::not_found(s.send),
        }
    }

    /// The server-side apply of the default worker ServiceAccount, answered with `code` (200,
    /// or an error status); returns the object sent.
    async fn expect_worker_sa_apply(&mut self, code: StatusCode) -> Value {
        let s = self.next().await;
        assert_eq!(
            s.path,
            format!("/api/v1/namespaces/{NS}/serviceaccounts/{WORKER_SA}")
        );
        Self::assert_ssa(&s);
        let body = s.body.clone();
        if code.is_success() {
            Self::reply(s.send, code, &body);
        } else {
            Self::reply(
                s.send,
                code,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": "Forbidden", "code": code.as_u16(),
                        "message": format!("serviceaccounts \"{WORKER_SA}\" is forbidden: User \"system:serviceaccount:kcg-system:kcg-operator\" cannot patch resource \"serviceaccounts\" in API group \"\" in the namespace \"{NS}\"")}),
            );
        }
        body
    }

    fn not_found(send: SendResponse<Response<Body>>) {
        Self::reply(
            send,
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "not found", "reason": "NotFound", "code": 404}),
        );
    }
}

fn ready_deployment(n: i32) -> Value {
    json!({"replicas": n, "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n, "observedGeneration": 1})
}

fn hash_of(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        .as_str()
        .expect("config hash annotation on the pod template")
        .to_owned()
}

fn cond<'a>(
    s: &'a KinesisConsumerGroupStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t}"))
}

/// Runs one reconcile while the verifier script `script` answers the API requests; the
/// script must consume every request the reconcile makes (an extra request finds no
/// responder and fails the reconcile). Returns the reconcile result, the verifier and
/// whatever the script captured.
async fn run<F, Fut, T>(
    kcg: &KinesisConsumerGroup,
    ctx: &Arc<Context>,
    verifier: Verifier,
    script: F,
) -> (Result<Action, Error>, Verifier, T)
where
    F: FnOnce(Verifier) -> Fut,
    Fut: std::future::Future<Output = (Verifier, T)> + Send + 'static,
    T: Send + 'static,
{
    let server = tokio::spawn(script(verifier));
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        controller::reconcile(Arc::new(kcg.clone()), ctx.clone()),
    )
    .await
    .expect("reconcile timed out");
    let (verifier, captured) = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("verifier timed out")
        .expect("verifier panicked");
    (result, verifier, captured)
}

/// Asserts that the API saw no further request (the reconcile is over, so any queued
/// request would be an unexpected extra write).
async fn assert_quiet(mut v: Verifier) {
    assert_no_request(&mut v).await;
}

/// [`assert_quiet`] for a verifier that is used again afterwards.
async fn assert_no_request(v: &mut Verifier) {
    let extra = tokio::time::timeout(Duration::from_millis(200), v.0.next_request()).await;
    if let Ok(Some((req, _))) = extra {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn create_with_on_delete_delete_adds_finalizer_then_applies_config_map_and_deployment_then_status()
 {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("create");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;

    // A brand-new object with onDelete: Delete has no finalizer: the first reconcile only
    // adds it.
    let mut fresh = group(
        &table,
        json!({"spec": {"stateStore": {"onDelete": "Delete"}}}),
    );
    fresh.metadata.finalizers = None;
    let fresh2 = fresh.clone();
    let (res, verifier, ()) = run(&fresh, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(
            s.path,
            format!("/apis/kcg.dev/v1alpha1/namespaces/{NS}/kinesisconsumergroups/{NAME}")
        );
        assert!(
            s.body.to_string().contains(controller::FINALIZER),
            "finalizer patch: {}",
            s.body
        );
        let mut answer = serde_json::to_value(&fresh2).unwrap();
        answer["metadata"]["finalizers"] = json!([controller::FINALIZER]);
        Verifier::reply(s.send, StatusCode::OK, &answer);
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::await_change());

    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let cm = v.expect_config_map().await;
        let yaml = cm["data"]["config.yaml"].as_str().unwrap();
        assert!(
            yaml.contains(GROUP),
            "worker config names the group: {yaml}"
        );
        assert_eq!(
            cm["metadata"]["ownerReferences"][0]["kind"],
            "KinesisConsumerGroup"
        );
        let d = v.expect_deployment(ready_deployment(2)).await;
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
        hash_of(&d);
        let status = v.expect_status(&k2).await;
        // Clients, leader and ranges come from the real table.
        assert_eq!(status.leader.as_deref(), Some("worker-a-1"));
        assert_eq!(status.client_count, 2);
        assert_eq!((status.replicas, status.ready_replicas), (2, 2));
        assert_eq!(status.observed_generation, Some(1));
        assert!(
            status
                .selector
                .as_deref()
                .unwrap()
                .contains("app.kubernetes.io/instance=orders")
        );
        let ranges: Vec<_> = status.streams[0]
            .ranges
            .iter()
            .map(|r| (r.client.as_str(), r.count))
            .collect();
        assert_eq!(ranges, vec![("worker-a-1", 2), ("worker-b-1", 2)]);
        assert_eq!(
            cond(&status, "Ready").status,
            "True",
            "{}",
            cond(&status, "Ready").message
        );
        assert_eq!(cond(&status, "Balanced").status, "True");
        assert_eq!(cond(&status, "Degraded").status, "False");
        // The first status announces the leader and the distribution.
        let mut reasons = vec![v.expect_event().await.1, v.expect_event().await.1];
        reasons.sort();
        assert_eq!(reasons, vec!["LeaderChanged", "Rebalanced"]);
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_quiet(verifier).await;
}

/// A seeded group reconciled once (no status before: the leader and the distribution are
/// announced). Returns the context, the verifier, the group and the status written.
async fn first_reconcile(
    endpoint: &str,
    test: &str,
) -> (
    Arc<Context>,
    Verifier,
    KinesisConsumerGroup,
    KinesisConsumerGroupStatus,
) {
    let table = unique_table(test);
    seeded_store(endpoint, &table).await;
    let (ctx, verifier) = context(endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, status) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_deployment(ready_deployment(2)).await;
        let status = v.expect_status(&k2).await;
        v.expect_event().await;
        v.expect_event().await;
        (v, status)
    })
    .await;
    res.unwrap();
    (ctx, verifier, kcg, status)
}

#[tokio::test]
async fn unchanged_refresh_writes_no_status_and_emits_no_events() {
    let Some(endpoint) = emulator() else { return };
    let (ctx, verifier, kcg, status) = first_reconcile(&endpoint, "refresh").await;

    // The watch hands back the object carrying the published status: a refresh that finds
    // the same group writes nothing and says nothing.
    let mut published = kcg.clone();
    published.status = Some(status);
    let (res, verifier, ()) = run(&published, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_deployment(ready_deployment(2)).await;
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_quiet(verifier).await;
}

#[tokio::test]
async fn spec_change_gives_a_new_config_hash_and_scale_sets_replicas() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("hash");
    seeded_store(&endpoint, &table).await;
    let (ctx, mut verifier) = context(&endpoint).await;

    let mut hashes = Vec::new();
    let mut replicas = Vec::new();
    let variants = [
        json!({}),
        json!({}),                                           // same spec: same hash
        json!({"spec": {"tuning": {"pollInterval": "2s"}}}), // config change: new hash
        json!({"spec": {"replicas": 5}}),                    // scale: replicas only
        json!({"spec": {"replicas": 0}}),                    // suspend
    ];
    for extra in variants {
        let kcg = group(&table, extra);
        let k2 = kcg.clone();
        let (res, v, (hash, n)) = run(&kcg, &ctx, verifier, |mut v| async move {
            let cm = v.expect_config_map().await;
            assert!(cm["data"]["config.yaml"].is_string());
            let d = v.expect_deployment(ready_deployment(2)).await;
            let out = (hash_of(&d), d["spec"]["replicas"].as_i64().unwrap());
            v.expect_status(&k2).await;
            // Events depend on the object's previous status (none here): drain them.
            v.drain_events().await;
            (v, out)
        })
        .await;
        res.unwrap();
        verifier = v;
        hashes.push(hash);
        replicas.push(n);
    }
    assert_eq!(hashes[0], hashes[1], "same spec, same hash");
    assert_ne!(hashes[1], hashes[2], "a config change rolls the workers");
    assert_eq!(
        hashes[1], hashes[3],
        "replicas are not part of the worker config"
    );
    assert_eq!(replicas, vec![2, 2, 2, 5, 0]);
}

#[tokio::test]
async fn the_budget_follows_replicas_suspend_and_the_spec() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("pdb");
    seeded_store(&endpoint, &table).await;
    let (ctx, mut verifier) = context(&endpoint).await;
    // (spec change, the budget applied: Some(bounds), or deleted: None)
    let cases = [
        (json!({}), Some(json!({"maxUnavailable": 1}))),
        (json!({"spec": {"replicas": 1}}), None),
        (json!({"spec": {"replicas": 3, "suspend": true}}), None),
        (
            json!({"spec": {"replicas": 3, "worker": {"podDisruptionBudget": {"enabled": false}}}}),
            None,
        ),
        (
            json!({"spec": {"replicas": 3, "worker": {"podDisruptionBudget": {"minAvailable": "50%"}}}}),
            Some(json!({"minAvailable": "50%"})),
        ),
    ];
    for (extra, want) in cases {
        let kcg = group(&table, extra.clone());
        let k2 = kcg.clone();
        let (res, v, pdb) = run(&kcg, &ctx, verifier, |mut v| async move {
            v.expect_config_map().await;
            let (_, pdb) = v.expect_deployment_and_pdb(ready_deployment(2)).await;
            v.expect_status(&k2).await;
            v.drain_events().await;
            (v, pdb)
        })
        .await;
        res.unwrap();
        verifier = v;
        let got = pdb.map(|p| {
            assert_eq!(p["apiVersion"], "policy/v1", "{extra}");
            assert_eq!(
                p["metadata"]["ownerReferences"][0]["kind"],
                "KinesisConsumerGroup"
            );
            assert_eq!(
                p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
                NAME
            );
            let mut bounds = p["spec"].clone();
            bounds.as_object_mut().unwrap().remove("selector");
            bounds
        });
        assert_eq!(got, want, "{extra}");
    }
}

#[tokio::test]
async fn deployment_deleted_behind_our_back_is_recreated() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("recreate");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    // The owned-Deployment watch triggers this reconcile after the delete; the apply
    // creates the Deployment again, and it starts with no ready pods.
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        let d = v.expect_deployment(json!({})).await;
        assert_eq!(d["kind"], "Deployment");
        assert_eq!(d["spec"]["replicas"], 2);
        assert!(
            d["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .contains("kcg-worker")
        );
        let status = v.expect_status(&k2).await;
        assert_eq!(status.ready_replicas, 0);
        assert_eq!(cond(&status, "Ready").reason, "RolloutInProgress");
        assert_eq!(cond(&status, "Progressing").reason, "RollingOut");
        v.expect_event().await;
        v.expect_event().await;
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_quiet(verifier).await;
}

#[tokio::test]
async fn missing_state_store_table_is_degraded_with_a_warning_event() {
    let Some(endpoint) = emulator() else { return };
    // Make sure the emulator answers at all, so "missing table" is not "no emulator".
    let reachable = unique_table("reach");
    seeded_store(&endpoint, &reachable).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group("kcg-no-such-table", json!({}));
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_deployment(ready_deployment(2)).await;
        let status = v.expect_status(&k2).await;
        let d = cond(&status, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "StateStoreUnavailable"),
            "{}",
            d.message
        );
        assert!(d.message.contains("kcg-no-such-table"), "{}", d.message);
        assert!(d.message.contains("fix:"), "{}", d.message);
        assert_eq!(cond(&status, "Ready").status, "Unknown");
        let (ty, reason, note) = v.expect_event().await;
        assert_eq!(
            (ty.as_str(), reason.as_str()),
            ("Warning", "StateStoreUnavailable")
        );
        assert!(
            note.contains("kcg-no-such-table"),
            "the error chain travels: {note}"
        );
        (v, ())
    })
    .await;
    // Not a reconcile error: the group is reported, not crash-looped.
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_quiet(verifier).await;
}

#[tokio::test]
async fn invalid_spec_is_not_applied_but_reported() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("invalid");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    // Slips past admission only if CEL is off (old API server); the controller checks again.
    let kcg = group(
        &table,
        json!({"spec": {"tuning": {"heartbeatInterval": "10s", "clientTimeout": "5s"}}}),
    );
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        // No apply: only a read of the Deployment (absent here).
        let s = v.next().await;
        assert_eq!(s.method, Method::GET);
        assert_eq!(
            s.path,
            format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}")
        );
        Verifier::not_found(s.send);
        let status = v.expect_status(&k2).await;
        let d = cond(&status, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(d.message.contains("clientTimeout"), "{}", d.message);
        v.expect_warning("InvalidSpec").await;
        (v, ())
    })
    .await;
    assert_eq!(
        res.unwrap(),
        Action::requeue(controller::INVALID_SPEC_RETRY)
    );
    let _ = verifier;
}

#[tokio::test]
async fn delete_with_retain_keeps_the_rows() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("retain");
    let store = seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    // A group from an older operator, which added the finalizer whatever the policy.
    let kcg = group(
        &table,
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [controller::FINALIZER]}}),
    );
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        // Only the finalizer goes; the Deployment is garbage-collected by its owner ref.
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(s.path, format!("/apis/kcg.dev/v1alpha1/namespaces/{NS}/kinesisconsumergroups/{NAME}"));
        assert_eq!(s.body["metadata"]["finalizers"], json!([]), "finalizer removal: {}", s.body);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
            "metadata": {"name": NAME, "namespace": NS}, "spec": {"streams": [{"name": "orders"}], "stateStore": {"table": "t"}, "delivery": {"stdout": {}}}}));
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::await_change());
    assert_quiet(verifier).await;
    let snap = store.load_group(GROUP).await.unwrap();
    assert_eq!(
        (
            snap.clients.len(),
            snap.leases.len(),
            snap.shard_caches.len()
        ),
        (2, 4, 1),
        "Retain keeps every row"
    );
}

#[tokio::test]
async fn delete_with_delete_waits_for_workers_then_removes_the_rows() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("delete");
    let store = seeded_store(&endpoint, &table).await;
    // Another group in the same table must survive.
    store
        .register("team-b/other", "x-1", "x", now_ms(), &[])
        .await
        .unwrap();
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(
        &table,
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"stateStore": {"table": table, "onDelete": "Delete"}}}),
    );

    // First pass: the Deployment is deleted in the foreground, so it stays while a worker
    // pod is still shutting down. Pods are never read (the chart grants no pods access).
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::DELETE);
        assert_eq!(s.path, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"));
        assert_eq!(s.body["propagationPolicy"], "Foreground", "foreground deletion: {}", s.body);
        let terminating = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NS, "deletionTimestamp": "2026-01-01T00:00:01Z", "finalizers": ["foregroundDeletion"]},
            "status": {"replicas": 1}});
        Verifier::reply(s.send, StatusCode::OK, &terminating);
        let s = v.next().await;
        assert!(!s.path.contains("/pods"), "no pods request: {} {}", s.method, s.path);
        assert_eq!(s.method, Method::GET);
        assert_eq!(s.path, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"));
        Verifier::reply(s.send, StatusCode::OK, &terminating);
        (v, ())
    })
    .await;
    let mut verifier = verifier;
    assert_no_request(&mut verifier).await;
    let err = res.expect_err("cleanup waits for the workers");
    assert!(err.is_waiting(), "{err}");
    assert!(
        controller::error_chain(&err).contains("waiting for 1 worker pods"),
        "{}",
        controller::error_chain(&err)
    );
    assert_eq!(
        controller::error_policy(Arc::new(kcg.clone()), &err, ctx.clone()),
        Action::requeue(controller::CLEANUP_POLL)
    );
    assert_eq!(
        store.load_group(GROUP).await.unwrap().clients.len(),
        2,
        "rows stay while workers run"
    );

    // Second pass: the Deployment is gone, so are its pods: rows go, then the finalizer.
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::DELETE);
        assert_eq!(s.body["propagationPolicy"], "Foreground", "{}", s.body);
        Verifier::not_found(s.send);
        let s = v.next().await;
        assert_eq!((s.method.clone(), s.path.as_str()), (Method::GET, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}").as_str()));
        Verifier::not_found(s.send);
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(s.body["metadata"]["finalizers"], json!([]), "finalizer removal: {}", s.body);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
            "metadata": {"name": NAME, "namespace": NS}, "spec": {"streams": [{"name": "orders"}], "stateStore": {"table": "t"}, "delivery": {"stdout": {}}}}));
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::await_change());
    assert_quiet(verifier).await;
    let snap = store.load_group(GROUP).await.unwrap();
    assert_eq!(
        (
            snap.clients.len(),
            snap.leases.len(),
            snap.shard_caches.len()
        ),
        (0, 0, 0),
        "Delete removes the group's rows"
    );
    assert_eq!(
        store
            .load_group("team-b/other")
            .await
            .unwrap()
            .clients
            .len(),
        1,
        "other groups are untouched"
    );
}

#[tokio::test]
async fn deployment_rejected_by_the_api_server_is_degraded_not_crash_looped() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("rejected");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_read_missing(&format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}")).await;
        let s = v.next().await;
        assert_eq!(s.path, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"));
        Verifier::reply(
            s.send,
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Invalid", "code": 422,
                    "message": "Deployment.apps \"orders\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"1x\""}),
        );
        // The last applied Deployment (if any) is read for the status.
        let s = v.next().await;
        assert_eq!(s.method, Method::GET);
        Verifier::not_found(s.send);
        let status = v.expect_status(&k2).await;
        let d = cond(&status, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "ApplyRejected"));
        assert!(d.message.contains("resources.requests"), "{}", d.message);
        let note = v.expect_warning("ApplyRejected").await;
        assert!(note.contains("Invalid value"), "{note}");
        (v, ())
    })
    .await;
    assert_eq!(
        res.unwrap(),
        Action::requeue(controller::INVALID_SPEC_RETRY)
    );
    let _ = verifier;
}

#[tokio::test]
async fn delete_with_delete_and_no_table_does_not_block_the_deletion() {
    let Some(endpoint) = emulator() else { return };
    // The emulator must answer, so "no table" is really a missing table.
    seeded_store(&endpoint, &unique_table("reach2")).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(
        "kcg-table-never-created",
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"stateStore": {"table": "kcg-table-never-created", "onDelete": "Delete"}}}),
    );
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::DELETE);
        Verifier::not_found(s.send);
        let s = v.next().await;
        assert_eq!((s.method.clone(), s.path.as_str()), (Method::GET, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}").as_str()));
        Verifier::not_found(s.send);
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(s.body["metadata"]["finalizers"], json!([]), "finalizer removal: {}", s.body);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
            "metadata": {"name": NAME, "namespace": NS}, "spec": {"streams": [{"name": "orders"}], "stateStore": {"table": "t"}, "delivery": {"stdout": {}}}}));
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::await_change());
    assert_quiet(verifier).await;
}

#[tokio::test]
async fn backoff_grows_per_object_and_resets_after_a_success() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("backoff");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(&table, json!({}));
    let other = group(&table, json!({"metadata": {"name": "other"}}));
    let err = Error::NoNamespace("x".into());
    let policy =
        |k: &KinesisConsumerGroup| controller::error_policy(Arc::new(k.clone()), &err, ctx.clone());
    assert_eq!(policy(&kcg), Action::requeue(Duration::from_secs(1)));
    assert_eq!(policy(&kcg), Action::requeue(Duration::from_secs(2)));
    assert_eq!(policy(&kcg), Action::requeue(Duration::from_secs(4)));
    assert_eq!(
        policy(&other),
        Action::requeue(Duration::from_secs(1)),
        "per object"
    );

    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_deployment(ready_deployment(2)).await;
        v.expect_status(&k2).await;
        v.expect_event().await;
        v.expect_event().await;
        (v, ())
    })
    .await;
    res.unwrap();
    assert_quiet(verifier).await;
    assert_eq!(
        policy(&kcg),
        Action::requeue(Duration::from_secs(1)),
        "reset by the success"
    );
    assert_eq!(
        policy(&other),
        Action::requeue(Duration::from_secs(2)),
        "the other object keeps its count"
    );
}

// ------------------------------------------------------------------ worker ServiceAccount

/// The worker ServiceAccount step of a reconcile.
#[derive(Clone, Debug)]
enum WorkerSa {
    /// Not found: applied (created).
    Missing,
    /// Found as this object; `apply`: applied again (the operator's own, with stale
    /// annotations), else left alone.
    Found { account: Value, apply: bool },
    /// Not looked at: the group names its own account, or the operator may not create it.
    NotAsked,
}

/// An existing worker ServiceAccount, `managed-by` (None: no labels), with `annotations`.
fn existing_worker_sa(managed_by: Option<&str>, annotations: Value) -> Value {
    let mut account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": WORKER_SA, "namespace": NS, "uid": "5a1e0000-0000-4000-8000-000000000002",
                     "resourceVersion": "7", "annotations": annotations},
        "automountServiceAccountToken": false});
    if let Some(m) = managed_by {
        account["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": m,
            "app.kubernetes.io/component": "worker", "app.kubernetes.io/part-of": "kcg"});
    }
    account
}

/// One reconcile of a healthy group (`extra` merged into the spec) with `settings`: the
/// ServiceAccount step as `sa`, then ConfigMap, Deployment (whose pods run as
/// `want_account`), status and the first two events. Returns the ServiceAccount applied.
async fn reconcile_with_worker_sa(
    test: &str,
    settings: OperatorSettings,
    extra: Value,
    sa: WorkerSa,
    want_account: &'static str,
) -> Option<Value> {
    let endpoint = emulator()?;
    let table = unique_table(test);
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context_with(&endpoint, settings).await;
    let kcg = group(&table, extra);
    let k2 = kcg.clone();
    let (res, verifier, applied) = run(&kcg, &ctx, verifier, move |mut v| async move {
        let applied = match sa {
            WorkerSa::Missing => {
                v.expect_worker_sa_get(None).await;
                Some(v.expect_worker_sa_apply(StatusCode::CREATED).await)
            }
            WorkerSa::Found { account, apply } => {
                v.expect_worker_sa_get(Some(account)).await;
                if apply {
                    Some(v.expect_worker_sa_apply(StatusCode::OK).await)
                } else {
                    None
                }
            }
            // The first request is the ConfigMap's.
            WorkerSa::NotAsked => None,
        };
        v.expect_config_map().await;
        let d = v.expect_deployment(ready_deployment(2)).await;
        assert_eq!(
            d["spec"]["template"]["spec"]["serviceAccountName"],
            want_account
        );
        let status = v.expect_status(&k2).await;
        assert_eq!(cond(&status, "Degraded").status, "False");
        v.expect_event().await;
        v.expect_event().await;
        (v, applied)
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    // No write besides the ones the script expected.
    assert_quiet(verifier).await;
    applied
}

/// The worker ServiceAccount as the operator applies it with [`settings_with_worker_sa`].
fn assert_is_the_operators_worker_sa(sa: &Value) {
    assert_eq!(sa["apiVersion"], "v1");
    assert_eq!(sa["kind"], "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], WORKER_SA);
    assert_eq!(sa["metadata"]["namespace"], NS);
    assert_eq!(
        sa["metadata"]["annotations"],
        json!({"eks.amazonaws.com/role-arn": ROLE_ARN}),
        "the configured annotations, and only those: {sa}"
    );
    assert_eq!(sa["automountServiceAccountToken"], false);
    let labels = &sa["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kcg-operator");
    assert_eq!(labels["app.kubernetes.io/component"], "worker");
    assert_eq!(labels["app.kubernetes.io/part-of"], "kcg");
    assert!(
        sa["metadata"].get("ownerReferences").is_none(),
        "shared by the namespace's groups, owned by none: {sa}"
    );
    // An apply carries no read-back fields (they would fail or pin the object).
    for field in ["uid", "resourceVersion", "managedFields"] {
        assert!(sa["metadata"].get(field).is_none(), "{field} in {sa}");
    }
}

/// [`reconcile_with_worker_sa`] of a group without an account of its own, with the chart's
/// settings.
async fn reconcile_default_worker_sa(test: &str, sa: WorkerSa) -> Option<Value> {
    reconcile_with_worker_sa(test, settings_with_worker_sa(), json!({}), sa, WORKER_SA).await
}

/// The operator's own worker ServiceAccount with the IRSA role of before a `helm upgrade`.
fn stale_worker_sa() -> Value {
    existing_worker_sa(
        Some("kcg-operator"),
        json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kcg-worker-old"}),
    )
}

#[tokio::test]
async fn missing_worker_service_account_is_applied_before_the_deployment() {
    if let Some(sa) = reconcile_default_worker_sa("sa-create", WorkerSa::Missing).await {
        assert_is_the_operators_worker_sa(&sa);
    }
}

#[tokio::test]
async fn the_operators_worker_service_account_with_a_stale_annotation_is_applied_again() {
    let stale = WorkerSa::Found {
        account: stale_worker_sa(),
        apply: true,
    };
    if let Some(sa) = reconcile_default_worker_sa("sa-stale", stale).await {
        assert_is_the_operators_worker_sa(&sa);
    }
}

#[tokio::test]
async fn the_operators_current_worker_service_account_is_not_written() {
    // An annotation the settings do not name (another tool's, or one the chart stopped
    // setting) is no reason to write.
    let current = existing_worker_sa(
        Some("kcg-operator"),
        json!({"eks.amazonaws.com/role-arn": ROLE_ARN, "example.com/note": "kept"}),
    );
    let current = WorkerSa::Found {
        account: current,
        apply: false,
    };
    reconcile_default_worker_sa("sa-current", current).await;
}

#[tokio::test]
async fn a_worker_service_account_the_operator_did_not_make_is_never_written() {
    // One an older chart rendered (managed by Helm), and the user's own (no labels): both with
    // other annotations than the settings', both left alone.
    let other = json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/theirs",
                       "owner": "the-chart"});
    for (test, managed_by) in [("sa-helm", Some("Helm")), ("sa-users", None)] {
        let found = WorkerSa::Found {
            account: existing_worker_sa(managed_by, other.clone()),
            apply: false,
        };
        reconcile_default_worker_sa(test, found).await;
    }
}

#[tokio::test]
async fn group_with_its_own_service_account_needs_no_default_one() {
    let own = json!({"spec": {"worker": {"serviceAccountName": "orders-reader"}}});
    reconcile_with_worker_sa(
        "sa-own",
        settings_with_worker_sa(),
        own,
        WorkerSa::NotAsked,
        "orders-reader",
    )
    .await;
}

#[tokio::test]
async fn without_create_worker_service_account_no_service_account_is_read_or_written() {
    // --create-worker-service-account=false: the user provides the account; the pods still
    // run as it.
    let mut settings = settings_with_worker_sa();
    settings.create_worker_service_account = false;
    reconcile_with_worker_sa(
        "sa-no-create",
        settings,
        json!({}),
        WorkerSa::NotAsked,
        WORKER_SA,
    )
    .await;
}

#[tokio::test]
async fn forbidden_worker_service_account_apply_is_degraded_not_crash_looped() {
    let Some(endpoint) = emulator() else { return };
    // Missing and not creatable; the operator's own with a stale role and not updatable.
    let cases = [
        (
            "sa-forbidden",
            None,
            vec![
                "it is missing and creating it failed".to_owned(),
                format!("kubectl -n {NS} create serviceaccount {WORKER_SA}"),
                "spec.worker.serviceAccountName".to_owned(),
            ],
        ),
        (
            "sa-forbidden-update",
            Some(stale_worker_sa()),
            vec![
                "updating them failed".to_owned(),
                "`patch` on serviceaccounts".to_owned(),
                format!("kubectl -n {NS} annotate serviceaccount {WORKER_SA}"),
            ],
        ),
    ];
    for (test, existing, needles) in cases {
        let table = unique_table(test);
        seeded_store(&endpoint, &table).await;
        let (ctx, verifier) = context_with(&endpoint, settings_with_worker_sa()).await;
        let kcg = group(&table, json!({}));
        let k2 = kcg.clone();
        let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
            v.expect_worker_sa_get(existing).await;
            v.expect_worker_sa_apply(StatusCode::FORBIDDEN).await;
            // The Deployment is applied all the same: its pods start once the account exists.
            v.expect_config_map().await;
            v.expect_deployment(json!({})).await;
            let status = v.expect_status(&k2).await;
            let d = cond(&status, "Degraded");
            assert_eq!(
                (d.status.as_str(), d.reason.as_str()),
                ("True", "ServiceAccountMissing"),
                "{}",
                d.message
            );
            let common = [format!("{NS}/{WORKER_SA}"), "forbidden".to_owned()];
            for needle in common.iter().chain(&needles) {
                assert!(d.message.contains(needle), "{needle:?} in: {}", d.message);
            }
            let note = v.expect_warning("ServiceAccountMissing").await;
            assert!(note.contains(WORKER_SA), "{note}");
            (v, ())
        })
        .await;
        // Reported and retried later, not a reconcile error.
        assert_eq!(
            res.unwrap(),
            Action::requeue(controller::INVALID_SPEC_RETRY),
            "{test}"
        );
        assert_quiet(verifier).await;
    }
}

// ------------------------------------------------------------------ events

/// `status` with every shard of the stream on `client`.
fn all_shards_on(status: &KinesisConsumerGroupStatus, client: &str) -> KinesisConsumerGroupStatus {
    let mut v = serde_json::to_value(status).unwrap();
    v["streams"][0]["ranges"] = json!([{"client": client, "first": "shardId-000000000000",
                                        "last": "shardId-000000000003", "count": 4}]);
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn every_distribution_change_is_an_event_and_identical_repeats_are_a_series() {
    let Some(endpoint) = emulator() else { return };
    let (ctx, mut verifier, kcg, status) = first_reconcile(&endpoint, "events").await;

    // The table says a=2 b=2 each time; the previously published status differs, so each
    // reconcile publishes one Rebalanced event. Within kube's 6-minute series window, a
    // new distribution must still be an Event of its own, with its own note.
    let mut names = Vec::new();
    for (from, want_method) in [
        ("worker-a-1", Method::POST),
        ("worker-b-1", Method::POST),
        ("worker-a-1", Method::PATCH),
    ] {
        let mut published = kcg.clone();
        published.status = Some(all_shards_on(&status, from));
        let k2 = published.clone();
        let (res, v, (method, event)) = run(&published, &ctx, verifier, |mut v| async move {
            v.expect_config_map().await;
            v.expect_deployment(ready_deployment(2)).await;
            v.expect_status(&k2).await;
            let event = v.expect_event_write().await;
            (v, event)
        })
        .await;
        assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
        verifier = v;
        assert_no_request(&mut verifier).await;
        assert_eq!(event["reason"], "Rebalanced");
        assert_eq!(
            event["note"],
            format!("{from}=4 → worker-a-1=2 worker-b-1=2"),
            "the note of this change"
        );
        assert_eq!(method, want_method, "{from}: {event}");
        names.push(event["metadata"]["name"].as_str().unwrap().to_owned());
        if method == Method::PATCH {
            assert_eq!(event["series"]["count"], 2, "{event}");
        }
    }
    assert_ne!(names[0], names[1], "two distributions, two Events");
    assert_eq!(
        names[2], names[0],
        "the identical repeat updates the series of the first"
    );

    // The Event of a series is gone (expired, or deleted by someone): a new one is made.
    let mut published = kcg.clone();
    published.status = Some(all_shards_on(&status, "worker-b-1"));
    let k2 = published.clone();
    let gone = names[1].clone();
    let (res, verifier, note) = run(&published, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        v.expect_deployment(ready_deployment(2)).await;
        v.expect_status(&k2).await;
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH, "a series update of {gone}");
        assert!(s.path.ends_with(&format!("/events/{gone}")), "{}", s.path);
        Verifier::not_found(s.send);
        let (_, _, note) = v.expect_event().await;
        (v, note)
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_eq!(note, "worker-b-1=4 → worker-a-1=2 worker-b-1=2");
    assert_quiet(verifier).await;
}

// ------------------------------------------------------------------ quiet, safe, reasons

/// A context comparing against watch caches the test feeds through the returned writers.
async fn context_with_caches(
    endpoint: &str,
) -> (
    Arc<Context>,
    Verifier,
    Writer<ConfigMap>,
    Writer<Deployment>,
    Writer<PodDisruptionBudget>,
) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (config_maps, cm_writer) = reflector::store();
    let (deployments, dep_writer) = reflector::store();
    let (budgets, pdb_writer) = reflector::store();
    let ctx = Context::new(
        Client::new(service, "default"),
        OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test"),
        Arc::new(Metrics::new()),
        DynamoClients::from_config(aws(endpoint).await),
    )
    .with_observed(Observed::new(
        vec![config_maps],
        vec![deployments],
        vec![budgets],
    ));
    (
        Arc::new(ctx),
        Verifier(handle),
        cm_writer,
        dep_writer,
        pdb_writer,
    )
}

fn feed<K>(writer: &mut Writer<K>, object: Value)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned,
{
    let object: K = serde_json::from_value(object).unwrap();
    writer.apply_watcher_event(&watcher::Event::Apply(object));
}

#[tokio::test]
async fn objects_as_rendered_are_not_applied_and_drift_is_put_back() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("quiet");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier, mut cms, mut deps, mut pdbs) = context_with_caches(&endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, (cm, dep, pdb, status)) = run(&kcg, &ctx, verifier, |mut v| async move {
        let cm = v.expect_config_map().await;
        let (mut dep, pdb) = v.expect_deployment_and_pdb(ready_deployment(2)).await;
        merge(
            &mut dep,
            json!({"metadata": {"generation": 1}, "status": ready_deployment(2)}),
        );
        let status = v.expect_status(&k2).await;
        v.expect_event().await;
        v.expect_event().await;
        (v, (cm, dep, pdb, status))
    })
    .await;
    res.unwrap();
    assert!(
        cm["metadata"]["annotations"]["kcg.dev/applied-hash"].is_string(),
        "{cm}"
    );
    // The watch sees what was applied.
    feed::<ConfigMap>(&mut cms, cm);
    feed::<Deployment>(&mut deps, dep.clone());
    feed::<PodDisruptionBudget>(&mut pdbs, pdb.expect("two replicas want a budget"));

    // The periodic refresh: objects as rendered, status unchanged: no request at all.
    let mut published = kcg.clone();
    published.status = Some(status);
    let (res, mut verifier, ()) = run(&published, &ctx, verifier, |v| async move { (v, ()) }).await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    assert_no_request(&mut verifier).await;

    // Scaled behind our back: only the Deployment is applied, nothing is read.
    let mut scaled = dep.clone();
    scaled["spec"]["replicas"] = json!(5);
    feed::<Deployment>(&mut deps, scaled);
    let (res, verifier, ()) = run(&published, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(
            s.path,
            format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}")
        );
        Verifier::assert_ssa(&s);
        assert_eq!(s.body["spec"]["replicas"], 2);
        Verifier::reply(s.send, StatusCode::OK, &dep);
        (v, ())
    })
    .await;
    res.unwrap();
    assert_quiet(verifier).await;
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("kcg_operator_applies_total{kind=\"Deployment\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kcg_operator_applies_total{kind=\"ConfigMap\"} 1"),
        "{metrics}"
    );
}

fn foreign(kind: &str, name: &str) -> Value {
    let api_version = if kind == "Deployment" {
        "apps/v1"
    } else {
        "v1"
    };
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": name, "namespace": NS, "uid": "someone-else", "resourceVersion": "3",
                        "labels": {"app": "theirs"}},
           "data": {"theirs": "yes"}})
}

#[tokio::test]
async fn a_config_map_the_group_does_not_own_is_left_alone_and_reported() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("notowned-cm");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(
            (s.method.clone(), s.path.clone()),
            (
                Method::GET,
                format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config")
            )
        );
        Verifier::reply(
            s.send,
            StatusCode::OK,
            &foreign("ConfigMap", &format!("{NAME}-config")),
        );
        // No apply of anything: the Deployment would mount a ConfigMap that is not ours. It
        // is only read for the status.
        v.expect_read_missing(&format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"))
            .await;
        let status = v.expect_status(&k2).await;
        let d = cond(&status, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "ResourceNotOwned"),
            "{}",
            d.message
        );
        for needle in [
            format!("ConfigMap {NS}/{NAME}-config"),
            "rename the group".into(),
            "delete or rename".into(),
        ] {
            assert!(d.message.contains(&needle), "{needle} in {}", d.message);
        }
        v.expect_warning("ResourceNotOwned").await;
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    let _ = verifier;
}

#[tokio::test]
async fn a_deployment_the_group_does_not_own_is_left_alone_and_reported() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("notowned-dep");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(&table, json!({}));
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        v.expect_config_map().await;
        let path = format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}");
        for _ in 0..2 {
            // Read before the apply (not ours: no apply), then for the status (ignored).
            let s = v.next().await;
            assert_eq!(
                (s.method.clone(), s.path.clone()),
                (Method::GET, path.clone())
            );
            Verifier::reply(s.send, StatusCode::OK, &foreign("Deployment", NAME));
        }
        let status = v.expect_status(&k2).await;
        let d = cond(&status, "Degraded");
        assert_eq!(d.reason, "ResourceNotOwned", "{}", d.message);
        assert!(
            d.message.contains(&format!("Deployment {NS}/{NAME}")),
            "{}",
            d.message
        );
        assert_eq!(
            status.replicas, 0,
            "the foreign Deployment's pods are not the group's"
        );
        v.expect_warning("ResourceNotOwned").await;
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::requeue(controller::REFRESH));
    let _ = verifier;
}

#[tokio::test]
async fn refusals_are_named_for_what_they_are() {
    let Some(endpoint) = emulator() else { return };
    let forbidden = format!(
        "deployments.apps \"{NAME}\" is forbidden: User \"system:serviceaccount:kcg-system:kcg-operator\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"{NS}\""
    );
    let cases = [
        (
            403,
            "Forbidden",
            forbidden.clone(),
            "Forbidden",
            vec!["may not patch deployments", "kubectl auth can-i"],
        ),
        (
            404,
            "NotFound",
            format!("namespaces \"{NS}\" not found"),
            "NotFound",
            vec!["not found", "namespace is being deleted"],
        ),
        (
            400,
            "BadRequest",
            "bad request".to_owned(),
            "ApplyRejected",
            vec!["rejected the Deployment"],
        ),
    ];
    for (code, reason, message, want, needles) in cases {
        let table = unique_table(&format!("refused-{code}"));
        seeded_store(&endpoint, &table).await;
        let (ctx, verifier) = context(&endpoint).await;
        let kcg = group(&table, json!({}));
        let k2 = kcg.clone();
        let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
            v.expect_config_map().await;
            let path = format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}");
            v.expect_read_missing(&path).await;
            let s = v.next().await;
            Verifier::assert_ssa(&s);
            Verifier::reply(
                s.send,
                StatusCode::from_u16(code).unwrap(),
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": reason, "code": code, "message": message}),
            );
            v.expect_read_missing(&path).await;
            let status = v.expect_status(&k2).await;
            let d = cond(&status, "Degraded");
            assert_eq!(d.reason, want, "{code}: {}", d.message);
            for needle in needles {
                assert!(
                    d.message.contains(needle),
                    "{code}: {needle} in {}",
                    d.message
                );
            }
            v.expect_warning(want).await;
            (v, ())
        })
        .await;
        assert_eq!(
            res.unwrap(),
            Action::requeue(controller::INVALID_SPEC_RETRY),
            "{code}"
        );
        let _ = verifier;
    }
}

/// One reconcile of `kcg` that only writes the finalizer list `want` (with the
/// resourceVersion read, so a concurrent change conflicts) and waits for the change.
async fn expect_finalizer_patch(endpoint: &str, kcg: KinesisConsumerGroup, want: Value) {
    let (ctx, verifier) = context(endpoint).await;
    let path = format!("/apis/kcg.dev/v1alpha1/namespaces/{NS}/kinesisconsumergroups/{NAME}");
    let k2 = kcg.clone();
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!((s.method.clone(), s.path.clone()), (Method::PATCH, path));
        assert_eq!(s.body["metadata"]["finalizers"], want, "{}", s.body);
        assert_eq!(s.body["metadata"]["resourceVersion"], "100", "{}", s.body);
        Verifier::reply(s.send, StatusCode::OK, &serde_json::to_value(&k2).unwrap());
        (v, ())
    })
    .await;
    assert_eq!(res.unwrap(), Action::await_change());
    assert_quiet(verifier).await;
}

#[tokio::test]
async fn the_finalizer_follows_on_delete() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("finalizer");
    seeded_store(&endpoint, &table).await;
    // Retain with the finalizer (switched from Delete): it is removed, keeping others.
    let kcg = group(
        &table,
        json!({"metadata": {"finalizers": ["other.example/keep", controller::FINALIZER]}}),
    );
    expect_finalizer_patch(&endpoint, kcg, json!(["other.example/keep"])).await;
    // Delete without it (switched from Retain): it is added.
    let mut kcg = group(
        &table,
        json!({"spec": {"stateStore": {"onDelete": "Delete"}}}),
    );
    kcg.metadata.finalizers = None;
    expect_finalizer_patch(&endpoint, kcg, json!([controller::FINALIZER])).await;
    // Rows retained, but an enhanced fan-out consumer to deregister: it is added too.
    let kcg = group(
        &table,
        json!({"spec": {"streams": [{"name": "orders", "consumer": {"mode": "EnhancedFanOut", "onDelete": "Deregister"}}]}}),
    );
    expect_finalizer_patch(&endpoint, kcg, json!([controller::FINALIZER])).await;

    // Retain, no finalizer, being deleted: nothing to do, no request.
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(
        &table,
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |v| async move { (v, ()) }).await;
    assert_eq!(res.unwrap(), Action::await_change());
    assert_quiet(verifier).await;
}
