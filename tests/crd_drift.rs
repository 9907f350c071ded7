//! The checked-in CRD (`crds/`) must equal what the code generates, and the generated CRD must
//! carry the subresources, columns and names that `kubectl` and HPAs rely on.
//!
//! To refresh `crds/` after changing the types:
//! `cargo run -- crd > crds/kinesisconsumergroups.kcg.dev.yaml`
//! (or `KCG_UPDATE_CRDS=1 cargo test --test crd_drift`, which also refreshes the chart's copy).
//!
//! The chart renders its copy (`charts/kcg-operator/files/`) through `templates/crd.yaml`, so
//! that `helm upgrade` upgrades the CRD; `scripts/check-chart.sh` checks the rendered object.

use kcg_operator::crd::{KinesisConsumerGroup, crd_yaml};
use kube::CustomResourceExt;

const CRD_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/kinesisconsumergroups.kcg.dev.yaml"
);
const CHART_CRD_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/kcg-operator/files/kinesisconsumergroups.kcg.dev.yaml"
);

#[test]
fn crds_dir_is_up_to_date() {
    let generated = crd_yaml().unwrap();
    // The Helm chart ships its own copy (a chart reads files only from inside itself).
    for path in [CRD_PATH, CHART_CRD_PATH] {
        if std::env::var_os("KCG_UPDATE_CRDS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} is out of date with src/crd.rs (or the worker config types).\n\
             Regenerate both copies with: KCG_UPDATE_CRDS=1 cargo test --test crd_drift"
        );
    }
}

#[test]
fn the_chart_templates_its_copy_and_has_no_crds_folder() {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/kcg-operator/templates/crd.yaml"
    ))
    .unwrap();
    assert!(
        template.contains(".Files.Get \"files/kinesisconsumergroups.kcg.dev.yaml\""),
        "templates/crd.yaml must render the synced copy, not a text of its own"
    );
    // A crds/ folder would be installed by Helm besides the template, and the two would clash.
    let crds_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kcg-operator/crds");
    assert!(
        !std::path::Path::new(crds_dir).exists(),
        "{crds_dir} must not exist: the CRD is a template (templates/crd.yaml)"
    );
}

#[test]
fn names_and_scope() {
    let crd = KinesisConsumerGroup::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("kinesisconsumergroups.kcg.dev")
    );
    assert_eq!(crd.spec.group, "kcg.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "KinesisConsumerGroup");
    assert_eq!(crd.spec.names.plural, "kinesisconsumergroups");
    assert_eq!(crd.spec.names.short_names, Some(vec!["kcg".to_owned()]));
    assert_eq!(crd.spec.versions.len(), 1);
    assert_eq!(crd.spec.versions[0].name, "v1alpha1");
    assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
}

#[test]
fn status_and_scale_subresources() {
    let crd = KinesisConsumerGroup::crd();
    let sub = crd.spec.versions[0].subresources.clone().unwrap();
    assert!(sub.status.is_some(), "status subresource");
    let scale = sub.scale.expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}

#[test]
fn printer_columns() {
    let crd = KinesisConsumerGroup::crd();
    let cols: Vec<(String, String, String)> = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.type_, c.json_path))
        .collect();
    let want = [
        ("Desired", "integer", ".spec.replicas"),
        ("Ready", "integer", ".status.readyReplicas"),
        ("Clients", "integer", ".status.clientCount"),
        ("Shards", "integer", ".status.shardCount"),
        ("Max Lag", "string", ".status.maxLag"),
        ("Suspended", "boolean", ".spec.suspend"),
        (
            "Status",
            "string",
            ".status.conditions[?(@.type==\"Ready\")].status",
        ),
        ("Age", "date", ".metadata.creationTimestamp"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(cols, want);
}

#[test]
fn schema_essentials() {
    let crd = KinesisConsumerGroup::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let spec = &schema["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in ["streams", "stateStore", "delivery"] {
        assert!(required.contains(&field), "spec.{field} is required");
    }
    assert_eq!(spec["properties"]["replicas"]["default"], 1);
    assert_eq!(spec["properties"]["replicas"]["minimum"], 0.0);
    assert_eq!(spec["properties"]["streams"]["minItems"], 1);
    assert_eq!(
        spec["properties"]["stateStore"]["properties"]["onDelete"]["default"],
        "Retain"
    );
    assert_eq!(
        spec["properties"]["stateStore"]["properties"]["onDelete"]["enum"],
        serde_json::json!(["Retain", "Delete"])
    );
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(status["selector"]["type"], "string");
}
