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
use kcg_operator::controller::{self, Context, DynamoClients, Error};
use kcg_operator::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus};
use kcg_operator::metrics::Metrics;
use kcg_operator::resources::{CONFIG_HASH_ANNOTATION, OperatorSettings};
use kcg_worker::store::StateStore;
use kcg_worker::store::schema::{ShardCacheRow, ShardInfo, shards_sk};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

const NS: &str = "team-a";
const NAME: &str = "orders";
const GROUP: &str = "team-a/orders";

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
        .register(GROUP, "worker-a-1", "orders-7c9-a")
        .await
        .unwrap();
    store
        .register(GROUP, "worker-b-1", "orders-7c9-b")
        .await
        .unwrap();
    let shards: Vec<ShardInfo> = (0..4)
        .map(|i| ShardInfo {
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
            "generation": 1, "finalizers": [controller::FINALIZER]
        },
        "spec": {
            "replicas": 2,
            "streams": [{"name": "orders"}],
            "stateStore": {"table": table},
            "delivery": {"stdout": {}}
        }
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
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

async fn context(endpoint: &str) -> (Arc<Context>, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(
        client,
        OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test"),
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

    /// The ConfigMap apply; returns its body.
    async fn expect_config_map(&mut self) -> Value {
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

    /// The Deployment apply, answered with `status` as the API server would show it;
    /// returns the applied body.
    async fn expect_deployment(&mut self, status: Value) -> Value {
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
        body
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

    /// An event POST; returns (type, reason, note).
    async fn expect_event(&mut self) -> (String, String, String) {
        let s = self.next().await;
        assert_eq!(s.method, Method::POST);
        assert_eq!(
            s.path,
            format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
        );
        assert_eq!(s.body["regarding"]["name"], NAME);
        let out = (
            s.body["type"].as_str().unwrap_or("").to_owned(),
            s.body["reason"].as_str().unwrap_or("").to_owned(),
            s.body["note"].as_str().unwrap_or("").to_owned(),
        );
        let body = s.body.clone();
        Self::reply(s.send, StatusCode::OK, &body);
        out
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
    let extra = tokio::time::timeout(Duration::from_millis(200), v.0.next_request()).await;
    if let Ok(Some((req, _))) = extra {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn create_adds_finalizer_then_applies_config_map_and_deployment_then_status() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("create");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;

    // A brand-new object has no finalizer: the first reconcile only adds it.
    let mut fresh = group(&table, json!({}));
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

#[tokio::test]
async fn unchanged_refresh_writes_no_status_and_emits_no_events() {
    let Some(endpoint) = emulator() else { return };
    let table = unique_table("refresh");
    seeded_store(&endpoint, &table).await;
    let (ctx, verifier) = context(&endpoint).await;
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
            while let Ok(Some((req, send))) =
                tokio::time::timeout(Duration::from_millis(300), v.0.next_request()).await
            {
                assert!(req.uri().path().contains("/events"), "{}", req.uri());
                let b = req.into_body().collect_bytes().await.unwrap();
                send.send_response(Response::builder().body(Body::from(b.to_vec())).unwrap());
            }
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
        let mut warned = false;
        for _ in 0..3 {
            let (ty, reason, _) = v.expect_event().await;
            if reason == "InvalidSpec" {
                assert_eq!(ty, "Warning");
                warned = true;
                break;
            }
        }
        assert!(warned, "a Warning InvalidSpec event");
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
    let kcg = group(
        &table,
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        // Only the finalizer goes; the Deployment is garbage-collected by its owner ref.
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(s.path, format!("/apis/kcg.dev/v1alpha1/namespaces/{NS}/kinesisconsumergroups/{NAME}"));
        assert!(s.body.to_string().contains("remove"), "finalizer removal: {}", s.body);
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
    store.register("team-b/other", "x-1", "x").await.unwrap();
    let (ctx, verifier) = context(&endpoint).await;
    let kcg = group(
        &table,
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"stateStore": {"table": table, "onDelete": "Delete"}}}),
    );

    // First pass: the Deployment is deleted, but a worker pod is still shutting down.
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::DELETE);
        assert_eq!(s.path, format!("/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"));
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": NAME, "namespace": NS}}));
        let s = v.next().await;
        assert_eq!(s.method, Method::GET);
        assert_eq!(s.path, format!("/api/v1/namespaces/{NS}/pods"));
        assert!(s.query.contains("labelSelector="), "{}", s.query);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
            "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "orders-7c9-a", "namespace": NS}}]}));
        (v, ())
    })
    .await;
    let err = res.expect_err("cleanup waits for the workers");
    assert!(err.is_waiting(), "{err}");
    assert_eq!(
        controller::error_policy(Arc::new(kcg.clone()), &err, ctx.clone()),
        Action::requeue(controller::CLEANUP_POLL)
    );
    assert_eq!(
        store.load_group(GROUP).await.unwrap().clients.len(),
        2,
        "rows stay while workers run"
    );

    // Second pass: the Deployment is gone and so are the pods: rows go, then the finalizer.
    let (res, verifier, ()) = run(&kcg, &ctx, verifier, |mut v| async move {
        let s = v.next().await;
        assert_eq!(s.method, Method::DELETE);
        Verifier::not_found(s.send);
        let s = v.next().await;
        assert_eq!(s.method, Method::GET);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}));
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert!(s.body.to_string().contains("remove"), "finalizer removal: {}", s.body);
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
        let mut warned = false;
        for _ in 0..3 {
            let (ty, reason, note) = v.expect_event().await;
            if reason == "ApplyRejected" {
                assert_eq!(ty, "Warning");
                assert!(note.contains("Invalid value"), "{note}");
                warned = true;
                break;
            }
        }
        assert!(warned, "a Warning ApplyRejected event");
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
        assert_eq!(s.method, Method::GET);
        Verifier::reply(s.send, StatusCode::OK, &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}));
        let s = v.next().await;
        assert_eq!(s.method, Method::PATCH);
        assert!(s.body.to_string().contains("remove"), "finalizer removal: {}", s.body);
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
