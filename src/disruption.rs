//! The workers' PodDisruptionBudget: whether a group wants one, and how it looks.
//!
//! Pure functions, like [`crate::resources`]; the controller applies or deletes the result.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use kube::ResourceExt;

use crate::crd::KinesisConsumerGroup;
use crate::resources::{effective_replicas, owned_meta, selector_labels};

/// Name of the group's PodDisruptionBudget (the same as the group's and the Deployment's).
pub fn pdb_name(kcg: &KinesisConsumerGroup) -> String {
    kcg.name_any()
}

/// Whether the group wants a budget: enabled (the default) and more than one worker
/// running. A budget over a single pod (maxUnavailable 1 aside) would block every node
/// drain, and a suspended group has no pods to protect.
pub fn wants_pdb(enabled: bool, replicas: i32) -> bool {
    enabled && replicas > 1
}

/// The budget the group wants, or `None` when it wants none (the controller then deletes
/// the one it may have made). The spec's `maxUnavailable` or `minAvailable`; neither set
/// means maxUnavailable 1: one worker at a time, whose leases the others take over.
pub fn pod_disruption_budget(kcg: &KinesisConsumerGroup) -> Option<PodDisruptionBudget> {
    let spec = kcg.spec.worker.pod_disruption_budget.as_ref();
    let enabled = spec.is_none_or(|s| s.enabled);
    if !wants_pdb(enabled, effective_replicas(kcg)) {
        return None;
    }
    let (max_unavailable, min_available) = match spec {
        Some(s) if s.max_unavailable.is_some() || s.min_available.is_some() => {
            (s.max_unavailable.clone(), s.min_available.clone())
        }
        _ => (Some(IntOrString::Int(1)), None),
    };
    Some(PodDisruptionBudget {
        metadata: owned_meta(kcg, pdb_name(kcg)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable,
            min_available,
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(kcg)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// What the controller does about the budget on a reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdbAction {
    /// Server-side apply the rendered budget.
    Apply,
    /// Delete the budget (absent is fine).
    Delete,
    /// Nothing: no budget is wanted and the spec did not change since the last status, so
    /// the one made earlier was already deleted. Saves a DELETE every refresh.
    Nothing,
}

/// Decides [`PdbAction`] from whether a budget is wanted and whether the spec changed since
/// the status was last written (`metadata.generation` != `status.observedGeneration`, or no
/// status yet: a fresh operator cannot know what an earlier one left).
pub fn pdb_action(wanted: bool, spec_changed: bool) -> PdbAction {
    match (wanted, spec_changed) {
        (true, _) => PdbAction::Apply,
        (false, true) => PdbAction::Delete,
        (false, false) => PdbAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::KinesisConsumerGroupSpec;

    fn group(extra: &str) -> KinesisConsumerGroup {
        let spec: KinesisConsumerGroupSpec = serde_yaml::from_str(&format!(
            "streams: [{{name: orders}}]\nstateStore: {{table: t}}\ndelivery: {{stdout: {{}}}}\n{extra}"
        ))
        .unwrap();
        let mut g = KinesisConsumerGroup::new("orders", spec);
        g.metadata.namespace = Some("shop".into());
        g.metadata.uid = Some("uid".into());
        g
    }

    #[test]
    fn budget_follows_replicas_suspend_and_spec() {
        let int = |n| Some(IntOrString::Int(n));
        let pct = |s: &str| Some(IntOrString::String(s.to_owned()));
        let cases = [
            ("default, one replica", "replicas: 1\n", None),
            ("default, no replica", "replicas: 0\n", None),
            (
                "default, two replicas",
                "replicas: 2\n",
                Some((int(1), None)),
            ),
            ("suspended", "replicas: 3\nsuspend: true\n", None),
            (
                "disabled",
                "replicas: 3\nworker: {podDisruptionBudget: {enabled: false}}\n",
                None,
            ),
            (
                "enabled, nothing else",
                "replicas: 3\nworker: {podDisruptionBudget: {enabled: true}}\n",
                Some((int(1), None)),
            ),
            (
                "maxUnavailable",
                "replicas: 4\nworker: {podDisruptionBudget: {maxUnavailable: 25%}}\n",
                Some((pct("25%"), None)),
            ),
            (
                "minAvailable",
                "replicas: 4\nworker: {podDisruptionBudget: {minAvailable: 3}}\n",
                Some((None, int(3))),
            ),
        ];
        for (name, extra, want) in cases {
            let got = pod_disruption_budget(&group(extra)).map(|p| {
                let s = p.spec.unwrap();
                (s.max_unavailable, s.min_available)
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn budget_selects_the_workers_and_is_owned() {
        let g = group("replicas: 2\n");
        let p = pod_disruption_budget(&g).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("orders"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        let owners = p.metadata.owner_references.unwrap();
        assert_eq!(owners[0].kind, "KinesisConsumerGroup");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            p.spec.unwrap().selector.unwrap().match_labels.unwrap(),
            selector_labels(&g)
        );
    }

    #[test]
    fn action_table() {
        let cases = [
            (true, true, PdbAction::Apply),
            (true, false, PdbAction::Apply),
            (false, true, PdbAction::Delete),
            (false, false, PdbAction::Nothing),
        ];
        for (wanted, changed, want) in cases {
            assert_eq!(pdb_action(wanted, changed), want, "{wanted} {changed}");
        }
    }
}
