//! Every `KinesisConsumerGroup` in `examples/*.yaml` is admitted by the generated CRD (schema
//! and CEL rules, as the API server would check them), renders a worker config that passes
//! the worker's own `validate()`, and renders a Deployment. HorizontalPodAutoscalers and KEDA
//! ScaledObjects in the examples must target a group of the same file through the scale
//! subresource; ScaledObjects must also match KEDA's own CRD schema (vendored in
//! `tests/vendor/keda/`, see its README).
//!
//! The inline invalid objects at the end prove the checker rejects what the API server would.

mod crd_support;

use std::path::PathBuf;

use crd_support::{admission_errors, check_schema, valid_group};
use kcg_operator::crd::KinesisConsumerGroup;
use kcg_operator::resources::{OperatorSettings, render};
use kcg_worker::config::WorkerConfig;
use serde::Deserialize;
use serde_json::{Value, json};

fn example_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        // Helm values files are not Kubernetes objects; the chart tests check them.
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("values-")
        })
        .collect();
    files.sort();
    files
}

fn documents(path: &PathBuf) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The `openAPIV3Schema` of KEDA's ScaledObject CRD (vendored, Apache-2.0).
fn keda_scaled_object_schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vendor/keda/keda.sh_scaledobjects.yaml"
    );
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("ScaledObject v1alpha1")["schema"]["openAPIV3Schema"]
        .clone()
}

/// Schema problems of a ScaledObject, as the API server would report them with KEDA's CRD
/// installed (metadata is the API server's own ObjectMeta, not the CRD's to check).
fn scaled_object_errors(doc: &Value) -> Vec<String> {
    let mut body = doc.clone();
    body.as_object_mut().unwrap().remove("metadata");
    let mut errors = Vec::new();
    check_schema(&keda_scaled_object_schema(), &body, "", &mut errors);
    errors
}

/// A scale target of an example must be a group of the same file, by its scale subresource.
fn assert_targets_a_group(path: &std::path::Path, target: &Value, group_names: &[&str]) {
    assert_eq!(
        target["apiVersion"],
        "kcg.dev/v1alpha1",
        "{}",
        path.display()
    );
    assert_eq!(target["kind"], "KinesisConsumerGroup", "{}", path.display());
    let name = target["name"].as_str().unwrap();
    assert!(
        group_names.contains(&name),
        "{}: scales unknown group {name}",
        path.display()
    );
}

/// Admission, worker validation and rendering of one group; returns the problems found.
fn check_group(doc: &Value) -> Vec<String> {
    let mut problems = admission_errors(doc);
    if !problems.is_empty() {
        return problems;
    }
    let mut kcg: KinesisConsumerGroup = match serde_json::from_value(doc.clone()) {
        Ok(k) => k,
        Err(e) => return vec![format!("does not deserialize: {e}")],
    };
    if kcg.metadata.namespace.is_none() {
        kcg.metadata.namespace = Some("default".into());
    }
    let config = kcg.worker_config();
    if let Err(e) = config.validate() {
        problems.push(format!("worker config: {e}"));
    }
    // The ConfigMap text must parse back, in the worker, into the same config.
    match config.to_yaml().map(|y| WorkerConfig::from_yaml(&y)) {
        Ok(Ok(back)) if back == config => {}
        other => problems.push(format!(
            "worker config does not round-trip through YAML: {other:?}"
        )),
    }
    match render(
        &kcg,
        &OperatorSettings::new("ghcr.io/kcg-dev/kcg-worker:test"),
    ) {
        Ok(r) => assert_eq!(r.deployment.spec.replicas, Some(kcg.spec.replicas)),
        Err(e) => problems.push(format!("render: {e}")),
    }
    problems
}

#[test]
fn every_example_group_is_valid() {
    let files = example_files();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "minimal-stdout.yaml",
        "http-sidecar.yaml",
        "cross-account.yaml",
        "enhanced-fan-out.yaml",
        "hpa.yaml",
        "keda-lag.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "examples/{want} is missing"
        );
    }
    let mut groups = 0;
    for path in &files {
        let docs = documents(path);
        let group_names: Vec<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "KinesisConsumerGroup")
            .map(|d| d["metadata"]["name"].as_str().unwrap())
            .collect();
        for doc in &docs {
            match doc["kind"].as_str() {
                Some("KinesisConsumerGroup") => {
                    groups += 1;
                    assert_eq!(doc["apiVersion"], "kcg.dev/v1alpha1", "{}", path.display());
                    let problems = check_group(doc);
                    assert!(problems.is_empty(), "{}: {problems:#?}", path.display());
                }
                Some("HorizontalPodAutoscaler") => {
                    assert_eq!(doc["apiVersion"], "autoscaling/v2", "{}", path.display());
                    assert_targets_a_group(path, &doc["spec"]["scaleTargetRef"], &group_names);
                    let (min, max) = (&doc["spec"]["minReplicas"], &doc["spec"]["maxReplicas"]);
                    assert!(
                        min.as_i64().unwrap_or(1) <= max.as_i64().unwrap(),
                        "{}",
                        path.display()
                    );
                }
                Some("ScaledObject") => {
                    assert_eq!(doc["apiVersion"], "keda.sh/v1alpha1", "{}", path.display());
                    let errors = scaled_object_errors(doc);
                    assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
                    assert_targets_a_group(path, &doc["spec"]["scaleTargetRef"], &group_names);
                    // More workers than shards read nothing: the example caps the count.
                    let (min, max) = (
                        &doc["spec"]["minReplicaCount"],
                        &doc["spec"]["maxReplicaCount"],
                    );
                    let max = max
                        .as_i64()
                        .expect("maxReplicaCount is set (the shard count)");
                    assert!(min.as_i64().unwrap_or(0) <= max, "{}", path.display());
                }
                other => panic!("{}: unexpected kind {other:?} in examples", path.display()),
            }
        }
    }
    assert!(groups >= 5, "found only {groups} example groups");
}

#[test]
fn http_sidecar_example_listens_where_the_worker_posts() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/http-sidecar.yaml"
    ));
    let doc = documents(&path).remove(0);
    let url = doc["spec"]["delivery"]["http"]["url"].as_str().unwrap();
    assert!(url.starts_with("http://localhost:9000"), "{url}");
    // A native sidecar: started before the worker, stopped after it.
    let sidecar = &doc["spec"]["worker"]["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["ports"][0]["containerPort"], 9000);
}

fn invalid(f: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut g = valid_group();
    f(&mut g);
    check_group(&g)
}

fn assert_rejected(name: &str, problems: Vec<String>, needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "{name}: expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn the_checker_accepts_the_base_object() {
    assert_eq!(check_group(&valid_group()), Vec::<String>::new());
}

#[test]
fn rejects_a_missing_required_field() {
    assert_rejected(
        "no table",
        invalid(|g| g["spec"]["stateStore"] = json!({})),
        "required field table is missing",
    );
    assert_rejected(
        "no streams",
        invalid(|g| {
            g["spec"].as_object_mut().unwrap().remove("streams");
        }),
        "required field streams is missing",
    );
}

#[test]
fn rejects_a_wrong_type() {
    assert_rejected(
        "replicas as string",
        invalid(|g| g["spec"]["replicas"] = json!("two")),
        "spec.replicas: must be an integer",
    );
    assert_rejected(
        "create as string",
        invalid(|g| g["spec"]["stateStore"]["create"] = json!("yes")),
        "must be a boolean",
    );
}

#[test]
fn rejects_a_value_outside_an_enum() {
    assert_rejected(
        "onDelete",
        invalid(|g| g["spec"]["stateStore"]["onDelete"] = json!("Purge")),
        "is not one of",
    );
    assert_rejected(
        "startPosition",
        invalid(|g| g["spec"]["streams"][0]["startPosition"] = json!("Earliest")),
        "is not one of",
    );
}

#[test]
fn rejects_unknown_fields() {
    assert_rejected(
        "typo",
        invalid(|g| g["spec"]["replica"] = json!(2)),
        "spec.replica: unknown field",
    );
    assert_rejected(
        "nested typo",
        invalid(|g| g["spec"]["stateStore"]["tableName"] = json!("x")),
        "unknown field",
    );
}

#[test]
fn rejects_bounds() {
    assert_rejected(
        "negative replicas",
        invalid(|g| g["spec"]["replicas"] = json!(-1)),
        "must be at least 0",
    );
    assert_rejected(
        "no streams",
        invalid(|g| g["spec"]["streams"] = json!([])),
        "at least 1 items",
    );
    assert_rejected(
        "maxRecordsPerCall",
        invalid(|g| g["spec"]["tuning"] = json!({"maxRecordsPerCall": 20000})),
        "must be at most 10000",
    );
    assert_rejected(
        "bad timestamp",
        invalid(|g| {
            g["spec"]["streams"][0] =
                json!({"name": "o", "startPosition": "AtTimestamp", "startTimestamp": "yesterday"})
        }),
        "RFC 3339",
    );
}

#[test]
fn rejects_through_cel_rules() {
    assert_rejected(
        "two deliveries",
        invalid(|g| {
            g["spec"]["delivery"] = json!({"stdout": {}, "http": {"url": "http://localhost:1"}})
        }),
        "exactly one of stdout, http or multiLang",
    );
    assert_rejected(
        "bad stream",
        invalid(|g| g["spec"]["streams"][0]["name"] = json!("no spaces please")),
        "Kinesis stream name",
    );
}

#[test]
fn the_keda_schema_rejects_what_keda_would() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/keda-lag.yaml"
    ));
    let so = documents(&path)
        .into_iter()
        .find(|d| d["kind"] == "ScaledObject")
        .unwrap();
    assert_eq!(scaled_object_errors(&so), Vec::<String>::new());
    let mut typo = so.clone();
    typo["spec"]["maxReplicas"] = json!(4);
    assert!(!scaled_object_errors(&typo).is_empty(), "an unknown field");
    let mut no_triggers = so.clone();
    no_triggers["spec"]
        .as_object_mut()
        .unwrap()
        .remove("triggers");
    assert!(
        !scaled_object_errors(&no_triggers).is_empty(),
        "triggers are required"
    );
    let mut bad_threshold = so;
    bad_threshold["spec"]["triggers"][0]["metadata"]["threshold"] = json!(30);
    assert!(
        !scaled_object_errors(&bad_threshold).is_empty(),
        "trigger metadata are strings"
    );
}
