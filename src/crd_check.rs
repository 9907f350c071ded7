//! Is the installed CRD as new as this operator?
//!
//! With a CRD older than the operator, the API server prunes the new spec fields a user sets
//! (silently), and refuses outright a server-side apply of a status holding a field its
//! schema lacks (`.status.maxLagMillis: field not declared in schema`): no status at all
//! would be written. So the operator reads the installed `kinesisconsumergroups.kcg.dev` at
//! start (and again every [`RECHECK`], so a `helm upgrade` that fixes it clears the
//! finding), compares its schema with the one compiled in ([`missing_paths`], pure) and,
//! when fields are missing, logs it, reports a Degraded `CrdOutdated` problem on every group
//! and leaves the missing fields out of the status it writes ([`prune`]). It keeps running:
//! everything the old schema has still works.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject};
use kube::{Api, Client, CustomResourceExt};
use serde_json::Value;
use tracing::{info, warn};

use crate::crd::{KinesisConsumerGroup, KinesisConsumerGroupStatus};
use crate::status::Problem;

/// Degraded reason when the installed CRD lacks fields of the compiled-in schema.
pub const CRD_OUTDATED: &str = "CrdOutdated";
/// How often the installed CRD is read again.
pub const RECHECK: Duration = Duration::from_secs(30);
/// Most missing field paths named in the message (the count stays exact).
const MAX_NAMED: usize = 5;

/// Why the installed CRD could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum CrdCheckError {
    /// Reading the CRD failed (missing, or no RBAC to read it).
    #[error("reading CustomResourceDefinition {name}: {source}")]
    Read {
        /// The CRD's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The compiled-in CRD could not be turned into JSON (cannot happen, but not unwrapped).
    #[error("serializing the compiled-in CRD: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// Every property path of an OpenAPI v3 schema, like `spec.streams[].name`: objects'
/// `properties` are walked, and arrays' `items` as `[]`. Pure.
pub fn property_paths(schema: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(schema, "", &mut out);
    out
}

fn walk(node: &Value, path: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.insert(p.clone());
            walk(child, &p, out);
        }
    }
    if let Some(items) = node.get("items") {
        walk(items, &format!("{path}[]"), out);
    }
}

/// The openAPIV3Schema of version `version` of a CRD (as JSON), if it serves that version.
fn version_schema<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    crd.pointer("/spec/versions")?
        .as_array()?
        .iter()
        .find(|v| v["name"] == version)
        .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
}

/// The property paths of `expected`'s schema (a CRD as JSON) that `installed` lacks, for
/// every version `expected` defines; a version the installed CRD lacks altogether is
/// named as `VERSION` (all of its fields are missing). Pure.
pub fn missing_paths(installed: &Value, expected: &Value) -> Vec<String> {
    missing_from(installed, &Expected::of(expected))
}

/// What the compiled-in CRD defines, reduced to its name and each version's property paths:
/// a few KB kept for the operator's life instead of the whole schema.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    name: String,
    versions: Vec<(String, BTreeSet<String>)>,
}

impl Expected {
    /// The name and property paths of a CRD given as JSON.
    pub fn of(crd: &Value) -> Self {
        let versions = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        let paths = v
                            .pointer("/schema/openAPIV3Schema")
                            .map(property_paths)
                            .unwrap_or_default();
                        (v["name"].as_str().unwrap_or_default().to_owned(), paths)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            name: crd["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            versions,
        }
    }
}

fn missing_from(installed: &Value, expected: &Expected) -> Vec<String> {
    let mut missing = Vec::new();
    for (name, want) in &expected.versions {
        match version_schema(installed, name) {
            None => missing.push(format!("version {name}")),
            Some(have) => {
                let have = property_paths(have);
                missing.extend(want.difference(&have).cloned());
            }
        }
    }
    missing
}

/// The Degraded problem for `missing` paths of CRD `name`, or `None` when nothing is
/// missing. Pure.
pub fn verdict(name: &str, missing: &[String]) -> Option<Problem> {
    if missing.is_empty() {
        return None;
    }
    let mut named: Vec<&str> = missing.iter().take(MAX_NAMED).map(String::as_str).collect();
    if missing.len() > MAX_NAMED {
        named.push("...");
    }
    Some(Problem::new(
        CRD_OUTDATED,
        format!(
            "the installed CRD {name} is older than this operator: it lacks {} field(s) the operator uses ({}): it drops them from specs and refuses statuses holding them, so the operator leaves them out. Upgrade the CRD: `helm upgrade` the kcg-operator release (crds.enabled: true, the default), or `kubectl apply --server-side -f crds/` from this release",
            missing.len(),
            named.join(", ")
        ),
    ))
}

/// The compiled-in CRD, as JSON.
fn expected_crd() -> Result<Value, CrdCheckError> {
    serde_json::to_value(KinesisConsumerGroup::crd()).map_err(CrdCheckError::Serialize)
}

/// Reads the installed CRD and judges it against `expected` (the compiled-in CRD). The
/// installed one is read as plain JSON: a typed copy of a 400 KB schema would only be
/// converted back, and the operator's memory is a budget.
async fn check(client: Client, expected: &Expected) -> Result<Option<Finding>, CrdCheckError> {
    let name = expected.name.clone();
    let api: Api<DynamicObject> = Api::all_with(client, &crd_api_resource());
    let installed = api.get(&name).await.map_err(|source| CrdCheckError::Read {
        name: name.clone(),
        source,
    })?;
    let installed = serde_json::to_value(installed).map_err(CrdCheckError::Serialize)?;
    let missing = missing_from(&installed, expected);
    Ok(verdict(&name, &missing).map(|problem| Finding { problem, missing }))
}

/// `apiextensions.k8s.io/v1` CustomResourceDefinition, for a dynamic (untyped) read.
fn crd_api_resource() -> ApiResource {
    ApiResource::erase::<CustomResourceDefinition>(&())
}

/// Removes from `object` (a whole object as JSON) the fields at `paths` (as
/// [`property_paths`] names them, e.g. `status.streams[].maxLagMillis`). Pure.
pub fn prune(object: &mut Value, paths: &[String]) {
    for path in paths {
        let segments: Vec<&str> = path.split('.').collect();
        remove_at(object, &segments);
    }
}

fn remove_at(node: &mut Value, segments: &[&str]) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    let (name, each) = match first.strip_suffix("[]") {
        Some(n) => (n, true),
        None => (*first, false),
    };
    let Some(map) = node.as_object_mut() else {
        return;
    };
    if rest.is_empty() && !each {
        map.remove(name);
        return;
    }
    match map.get_mut(name) {
        Some(Value::Array(items)) if each => {
            for item in items {
                remove_at(item, rest);
            }
        }
        Some(child) if !each => remove_at(child, rest),
        _ => {}
    }
}

/// What the last check found: the problem to report and the missing field paths.
#[derive(Clone, Debug, PartialEq)]
struct Finding {
    problem: Problem,
    missing: Vec<String>,
}

/// The latest finding, shared by the reconciles: `Some` while the CRD is outdated.
#[derive(Default)]
pub struct CrdState {
    finding: RwLock<Option<Finding>>,
}

impl CrdState {
    /// The problem to report on every group, if any.
    pub fn problem(&self) -> Option<Problem> {
        self.read().map(|f| f.problem)
    }

    /// `status` without the fields the installed CRD lacks, so that the API server accepts
    /// it (a server-side apply with an undeclared field is refused as a whole).
    pub fn fit_status(&self, status: KinesisConsumerGroupStatus) -> KinesisConsumerGroupStatus {
        let Some(finding) = self.read() else {
            return status;
        };
        let Ok(mut object) = serde_json::to_value(serde_json::json!({ "status": &status })) else {
            return status;
        };
        prune(&mut object, &finding.missing);
        serde_json::from_value(object["status"].take()).unwrap_or(status)
    }

    fn read(&self) -> Option<Finding> {
        self.finding
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a new finding; logs only when it changed, so a recheck is quiet.
    fn set(&self, new: Option<Finding>) {
        let mut cur = self.finding.write().unwrap_or_else(|e| e.into_inner());
        if *cur == new {
            return;
        }
        match &new {
            Some(f) => warn!(reason = CRD_OUTDATED, "{}", f.problem.message),
            None if cur.is_some() => {
                info!("the installed CRD now has every field this operator uses")
            }
            None => info!("the installed CRD has every field this operator uses"),
        }
        *cur = new;
    }
}

/// Checks the CRD now and every [`RECHECK`] until dropped, keeping `state` current. A
/// failed read is logged (once per distinct error) and leaves the last finding in place.
pub async fn keep_checking(client: Client, state: Arc<CrdState>) {
    let mut last_error = None;
    // Rendered once: it is the same for the operator's whole life.
    let expected = match expected_crd() {
        Ok(e) => Expected::of(&e),
        Err(e) => {
            warn!(error = %e, "could not render the compiled-in CRD; not checking the installed one");
            return;
        }
    };
    loop {
        match check(client.clone(), &expected).await {
            Ok(p) => {
                last_error = None;
                state.set(p);
            }
            Err(e) => {
                let text = crate::controller::error_chain(&e);
                if last_error.as_ref() != Some(&text) {
                    warn!(error = %text, "could not check the installed CRD's fields; carrying on without that check");
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(RECHECK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd(version: &str, schema: Value) -> Value {
        json!({"spec": {"versions": [{"name": version, "schema": {"openAPIV3Schema": schema}}]}})
    }

    fn schema_with_status(fields: &[&str]) -> Value {
        let props: serde_json::Map<String, Value> = fields
            .iter()
            .map(|f| ((*f).to_owned(), json!({"type": "string"})))
            .collect();
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "streams": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
            }},
            "status": {"type": "object", "properties": props}
        }})
    }

    #[test]
    fn paths_walk_properties_and_items() {
        let paths = property_paths(&schema_with_status(&["maxLag"]));
        let want: BTreeSet<String> = [
            "spec",
            "spec.streams",
            "spec.streams[].name",
            "status",
            "status.maxLag",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(paths, want);
    }

    #[test]
    fn missing_paths_cases() {
        let new = crd("v1alpha1", schema_with_status(&["maxLag", "maxLagMillis"]));
        let cases: &[(&str, Value, &[&str])] = &[
            ("same schema", new.clone(), &[]),
            (
                "older CRD without a status field",
                crd("v1alpha1", schema_with_status(&["maxLag"])),
                &["status.maxLagMillis"],
            ),
            (
                "newer CRD with more fields is fine",
                crd(
                    "v1alpha1",
                    schema_with_status(&["maxLag", "maxLagMillis", "later"]),
                ),
                &[],
            ),
            (
                "the version is not served",
                crd("v1beta9", schema_with_status(&["maxLag", "maxLagMillis"])),
                &["version v1alpha1"],
            ),
        ];
        for (name, installed, want) in cases {
            assert_eq!(missing_paths(installed, &new), *want, "{name}");
        }
    }

    #[test]
    fn compiled_in_crd_is_not_outdated_against_itself() {
        let c = expected_crd().unwrap();
        assert!(missing_paths(&c, &c).is_empty());
        assert!(
            property_paths(version_schema(&c, "v1alpha1").unwrap()).contains("status.maxLagMillis")
        );
    }

    #[test]
    fn prune_removes_paths_through_objects_and_arrays() {
        let cases: &[(&str, Value, &[&str], Value)] = &[
            (
                "a top-level status field",
                json!({"status": {"maxLag": "1s", "maxLagMillis": 1000}}),
                &["status.maxLagMillis"],
                json!({"status": {"maxLag": "1s"}}),
            ),
            (
                "a field of every array item",
                json!({"status": {"streams": [{"name": "a", "x": 1}, {"name": "b", "x": 2}]}}),
                &["status.streams[].x"],
                json!({"status": {"streams": [{"name": "a"}, {"name": "b"}]}}),
            ),
            (
                "absent paths and versions are ignored",
                json!({"status": {"a": 1}}),
                &["status.b.c", "version v1alpha1", "status.a[].b"],
                json!({"status": {"a": 1}}),
            ),
        ];
        for (name, input, paths, want) in cases {
            let mut got = input.clone();
            let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
            prune(&mut got, &paths);
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn fit_status_leaves_out_what_the_crd_lacks() {
        let state = CrdState::default();
        let status = KinesisConsumerGroupStatus {
            max_lag: Some("1s".into()),
            max_lag_millis: Some(1000),
            ..KinesisConsumerGroupStatus::default()
        };
        assert_eq!(state.fit_status(status.clone()), status, "nothing missing");
        let missing = vec!["status.maxLagMillis".to_owned()];
        state.set(Some(Finding {
            problem: verdict("x", &missing).unwrap(),
            missing,
        }));
        let fitted = state.fit_status(status);
        assert_eq!(
            (fitted.max_lag.as_deref(), fitted.max_lag_millis),
            (Some("1s"), None)
        );
    }

    #[test]
    fn verdict_names_the_fields_and_the_fix() {
        assert_eq!(verdict("x", &[]), None);
        let many: Vec<String> = (0..7).map(|i| format!("status.f{i}")).collect();
        let p = verdict("kinesisconsumergroups.kcg.dev", &many).unwrap();
        assert_eq!(p.reason, CRD_OUTDATED);
        for needle in [
            "lacks 7 field(s)",
            "status.f0",
            "status.f4, ...",
            "helm upgrade",
            "kubectl apply --server-side -f crds/",
        ] {
            assert!(p.message.contains(needle), "{needle} in {}", p.message);
        }
        assert!(!p.message.contains("status.f5"));
    }
}
