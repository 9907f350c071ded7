//! What an API server refusal of an owned-object write means, as a Degraded problem.
//! PURE: from the status the API server sent to a reason and a message that says what
//! happened, so the remedy fits (an RBAC gap is not a bad spec field).

use kube::core::Status;
use regex::Regex;

use crate::status::Problem;

/// Degraded reason: the API server forbids the operator a request (RBAC, 403).
pub const FORBIDDEN: &str = "Forbidden";
/// Degraded reason: an object the write needs does not exist (404): the namespace is
/// being deleted, or a referenced object is gone.
pub const NOT_FOUND: &str = "NotFound";
/// Degraded reason: the API server rejected what the spec rendered to (400, 422).
pub const APPLY_REJECTED: &str = "ApplyRejected";
/// Degraded reason: an object with the name of a group's owned object exists and is not
/// the group's.
pub const RESOURCE_NOT_OWNED: &str = "ResourceNotOwned";

/// Whether the refusal says the namespace is being deleted (403 with cause
/// `NamespaceTerminating`): nothing new may be made there, and the group goes with it.
pub fn namespace_terminating(s: &Status) -> bool {
    s.code == 403
        && s.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// The problem a refusal of `verb` on `kind` `namespace/name` is, or `None` when the
/// request should simply be retried (conflict, throttling, server errors) or the namespace
/// is being deleted ([`namespace_terminating`]).
pub fn classify(
    verb: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    s: &Status,
) -> Option<Problem> {
    let object = format!("{kind} {namespace}/{name}");
    if namespace_terminating(s) {
        return None;
    }
    match s.code {
        403 => {
            let (verb, resource) = forbidden_request(&s.message)
                .unwrap_or_else(|| (verb.to_owned(), kind.to_lowercase()));
            Some(Problem::new(
                FORBIDDEN,
                format!(
                    "the operator may not {verb} {resource} in namespace {namespace} (for {object}): {}",
                    s.message
                ),
            ))
        }
        404 => Some(Problem::new(
            NOT_FOUND,
            format!(
                "{verb} {object} found something missing: {} ({})",
                s.message,
                s.details
                    .as_ref()
                    .filter(|d| !d.kind.is_empty())
                    .map(|d| format!("missing: {} {}", d.kind, d.name))
                    .unwrap_or_else(|| "is the namespace being deleted?".to_owned())
            ),
        )),
        400 | 422 => Some(Problem::new(
            APPLY_REJECTED,
            format!(
                "the API server rejected the {kind} rendered from the spec: {} ({})",
                s.message, s.reason
            ),
        )),
        _ => None,
    }
}

/// The verb and resource of an RBAC refusal, from the API server's message
/// (`... cannot patch resource "deployments" in API group "apps" ...`).
pub fn forbidden_request(message: &str) -> Option<(String, String)> {
    let re = Regex::new(r#"cannot (\w+) resource "([^"]+)""#).ok()?;
    let c = re.captures(message)?;
    Some((c[1].to_owned(), c[2].to_owned()))
}

/// The problem of an owned-object name taken by an object the group does not own.
pub fn not_owned(kind: &str, namespace: &str, name: &str, group: &str) -> Problem {
    Problem::new(
        RESOURCE_NOT_OWNED,
        format!(
            "{kind} {namespace}/{name} exists and is not owned by this group, so the operator leaves it alone; rename the group {group}, or delete or rename that {kind}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> Status {
        Status {
            code,
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    fn terminating() -> Status {
        let mut s = status(
            403,
            "Forbidden",
            "unable to create new content in namespace team-a because it is being terminated",
        );
        s.details = serde_json::from_value(serde_json::json!({
            "causes": [{"reason": "NamespaceTerminating", "message": "namespace team-a is being terminated"}]
        }))
        .ok();
        assert!(s.details.is_some());
        s
    }

    #[test]
    fn classification() {
        let rbac = r#"deployments.apps "orders" is forbidden: User "system:serviceaccount:kcg-system:kcg-operator" cannot patch resource "deployments" in API group "apps" in the namespace "team-a""#;
        let cases = [
            (
                status(403, "Forbidden", rbac),
                Some(FORBIDDEN),
                "may not patch deployments",
            ),
            (
                status(403, "Forbidden", "nope"),
                Some(FORBIDDEN),
                "may not apply deployment",
            ),
            (
                status(404, "NotFound", r#"namespaces "team-a" not found"#),
                Some(NOT_FOUND),
                "namespaces \"team-a\" not found",
            ),
            (
                status(422, "Invalid", "spec.template: Invalid value"),
                Some(APPLY_REJECTED),
                "rejected the Deployment",
            ),
            (
                status(400, "BadRequest", "bad quantity"),
                Some(APPLY_REJECTED),
                "bad quantity",
            ),
            (status(409, "Conflict", "conflict"), None, ""),
            (status(429, "TooManyRequests", "slow down"), None, ""),
            (status(500, "InternalError", "etcd"), None, ""),
            (terminating(), None, ""),
        ];
        for (s, reason, words) in cases {
            let got = classify("apply", "Deployment", "team-a", "orders", &s);
            assert_eq!(
                got.as_ref().map(|p| p.reason.as_str()),
                reason,
                "{}",
                s.code
            );
            if let Some(p) = got {
                assert!(p.message.contains(words), "{}: {}", s.code, p.message);
            }
        }
    }

    #[test]
    fn not_owned_names_object_and_remedy() {
        let p = not_owned("ConfigMap", "team-a", "orders-config", "team-a/orders");
        assert_eq!(p.reason, RESOURCE_NOT_OWNED);
        assert!(p.message.contains("ConfigMap team-a/orders-config"));
        assert!(p.message.contains("rename the group"));
    }
}
