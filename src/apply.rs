//! Whether an owned object (the group's ConfigMap or Deployment) needs a server-side apply,
//! decided PURELY from the rendered object and the one observed in the cluster.
//!
//! A no-op apply still costs the API server a full request; with hundreds of groups
//! refreshed every few seconds that is steady load. So the operator applies only when the
//! observed object is missing, is not the group's, or differs from what it would apply:
//! - the `kcg.dev/applied-hash` annotation (a hash of the whole rendered object) differs,
//!   which catches every change of what we render, removed fields included;
//! - or a field we set holds another value (someone edited or scaled the object behind our
//!   back): drift is put back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Annotation on every applied owned object: the hash of the rendered object.
pub const APPLIED_HASH_ANNOTATION: &str = "kcg.dev/applied-hash";

/// What to do with one owned object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Missing or different from what we render: apply.
    Apply,
    /// Equal to what we render in every field we set: leave it alone.
    UpToDate,
    /// An object of that name exists but is not the group's: never touch it.
    NotOwned,
}

/// Whether `meta` names the group with uid `group_uid` as its controller.
pub fn is_owned_by(meta: &ObjectMeta, group_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == group_uid)
}

/// Decides for the rendered object `desired` (with its applied-hash annotation, see
/// [`with_applied_hash`]) against `observed`, both as JSON.
pub fn decide(desired: &Value, observed: Option<&Value>, group_uid: &str) -> Decision {
    let Some(observed) = observed else {
        return Decision::Apply;
    };
    let meta: ObjectMeta = serde_json::from_value(observed["metadata"].clone()).unwrap_or_default();
    if !is_owned_by(&meta, group_uid) {
        return Decision::NotOwned;
    }
    let hash = |v: &Value| v["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].clone();
    if hash(desired) != hash(observed) || !is_subset(desired, observed) {
        return Decision::Apply;
    }
    Decision::UpToDate
}

/// Whether every field of `want` is in `have` with the same value. Objects may hold more
/// keys (defaults the API server filled in, fields of other managers); lists must have the
/// same length, element by element (a list we set is ours as a whole).
pub fn is_subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => is_subset(wv, hv),
            // The API server drops empty values; they are not drift.
            None => is_empty(wv),
        }),
        (Value::Object(w), Value::Null) => w.is_empty(),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| is_subset(a, b))
        }
        (Value::Array(w), Value::Null) => w.is_empty(),
        (w, h) => w == h,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The rendered object as JSON with the [`APPLIED_HASH_ANNOTATION`] set to the hash of the
/// rest of it.
pub fn with_applied_hash<T: Serialize>(rendered: &T) -> Result<Value, serde_json::Error> {
    let mut value = serde_json::to_value(rendered)?;
    let digest = Sha256::digest(serde_json::to_vec(&value)?);
    let hash: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let meta = value.as_object_mut().map(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()))
    });
    if let Some(Value::Object(meta)) = meta {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(a) = annotations {
            a.insert(APPLIED_HASH_ANNOTATION.into(), Value::String(hash));
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UID: &str = "uid-1";

    /// The desired object as the API server shows it, changed by `edit`.
    fn owned(edit: impl FnOnce(&mut Value)) -> Value {
        let mut v = desired();
        v["metadata"]["resourceVersion"] = json!("7");
        edit(&mut v);
        v
    }

    fn desired() -> Value {
        json!({
            "metadata": {"name": "orders", "annotations": {APPLIED_HASH_ANNOTATION: "h1"},
                         "ownerReferences": [{"apiVersion": "kcg.dev/v1alpha1", "kind": "KinesisConsumerGroup",
                                              "name": "orders", "uid": UID, "controller": true}]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "worker", "image": "w:1"}]}}}
        })
    }

    #[test]
    fn decisions() {
        let cases: Vec<(&str, Option<Value>, Decision)> = vec![
            ("missing", None, Decision::Apply),
            (
                "same, with server defaults",
                Some(owned(|v| {
                    v["spec"]["strategy"] = json!({"type": "RollingUpdate"})
                })),
                Decision::UpToDate,
            ),
            (
                "scaled behind our back",
                Some(owned(|v| v["spec"]["replicas"] = json!(5))),
                Decision::Apply,
            ),
            (
                "image edited",
                Some(owned(|v| {
                    v["spec"]["template"]["spec"]["containers"][0]["image"] = json!("other")
                })),
                Decision::Apply,
            ),
            (
                "rendered differently (hash)",
                Some(owned(|v| {
                    v["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = json!("h0")
                })),
                Decision::Apply,
            ),
            (
                "no owner reference",
                Some(owned(|v| v["metadata"]["ownerReferences"] = json!([]))),
                Decision::NotOwned,
            ),
            (
                "another group's",
                Some(owned(|v| {
                    v["metadata"]["ownerReferences"][0]["uid"] = json!("uid-2")
                })),
                Decision::NotOwned,
            ),
            (
                "ours but not controller",
                Some(owned(|v| {
                    v["metadata"]["ownerReferences"][0]["controller"] = json!(false)
                })),
                Decision::NotOwned,
            ),
        ];
        for (name, observed, want) in cases {
            assert_eq!(decide(&desired(), observed.as_ref(), UID), want, "{name}");
        }
    }

    #[test]
    fn subset_rules() {
        let cases = [
            (json!({"a": 1}), json!({"a": 1, "b": 2}), true),
            (json!({"a": 1}), json!({"a": 2}), false),
            (json!({"a": [1, 2]}), json!({"a": [1, 2, 3]}), false),
            (
                json!({"a": [{"x": 1}]}),
                json!({"a": [{"x": 1, "y": 2}]}),
                true,
            ),
            (json!({"a": {}}), json!({}), true),
            (json!({"a": {"b": 1}}), json!({}), false),
            (json!({"a": null}), json!({}), true),
            (json!({"a": []}), json!({"a": null}), true),
        ];
        for (want, have, expect) in cases {
            assert_eq!(is_subset(&want, &have), expect, "{want} in {have}");
        }
    }

    #[test]
    fn applied_hash_follows_the_content() {
        let a = with_applied_hash(&json!({"metadata": {"name": "x"}, "data": {"k": "1"}})).unwrap();
        let b = with_applied_hash(&json!({"metadata": {"name": "x"}, "data": {"k": "1"}})).unwrap();
        let c = with_applied_hash(&json!({"metadata": {"name": "x"}, "data": {"k": "2"}})).unwrap();
        let h = |v: &Value| v["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].clone();
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
        assert_eq!(h(&a).as_str().map(str::len), Some(24));
    }
}
