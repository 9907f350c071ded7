//! The cleanup finalizer, held only while it is needed: a group with `onDelete: Delete`
//! must not go before its rows are deleted, nor one with an enhanced fan-out consumer set
//! to `onDelete: Deregister` before that consumer is deregistered, so such a group carries
//! the finalizer; any other group has nothing to clean up and carries none, so it goes at
//! once, even when the operator is not running (uninstalled first, scaled to zero).
//!
//! [`step`] and [`cleanup_needed`] decide PURELY; [`set`] writes the finalizer list.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::consumer_admin;
use crate::crd::{KinesisConsumerGroup, KinesisConsumerGroupSpec, OnDelete};

/// Finalizer that holds a group until its cleanup ran.
pub const FINALIZER: &str = "kcg.dev/cleanup";

/// What the reconcile does about the finalizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add the finalizer, then wait for the change to come back.
    Add,
    /// Remove the finalizer (the policy changed to Retain), then wait.
    Remove,
    /// Run the cleanup; remove the finalizer when it succeeded.
    Cleanup,
    /// Being deleted without our finalizer: nothing to do.
    Gone,
    /// Reconcile as usual.
    Proceed,
}

/// Whether deleting a group with this spec has work to do: its state-store rows go
/// (`stateStore.onDelete: Delete`), or a stream consumer does (`consumer.onDelete:
/// Deregister`).
pub fn cleanup_needed(group: &str, spec: &KinesisConsumerGroupSpec) -> bool {
    spec.state_store.on_delete == OnDelete::Delete
        || !consumer_admin::to_deregister(group, &spec.streams).is_empty()
}

/// The step for a group being deleted or not, holding the finalizer or not, whose deletion
/// needs a cleanup or not ([`cleanup_needed`]).
pub fn step(deleting: bool, has_finalizer: bool, wanted: bool) -> Step {
    match (deleting, has_finalizer, wanted) {
        (true, true, _) => Step::Cleanup,
        (true, false, _) => Step::Gone,
        (false, false, true) => Step::Add,
        (false, true, false) => Step::Remove,
        (false, _, _) => Step::Proceed,
    }
}

/// The step for `kcg` as it is.
pub fn step_for(kcg: &KinesisConsumerGroup) -> Step {
    step(
        kcg.meta().deletion_timestamp.is_some(),
        kcg.finalizers().iter().any(|f| f == FINALIZER),
        cleanup_needed(&kcg.group_id(), &kcg.spec),
    )
}

/// Writes the finalizer list with [`FINALIZER`] present or not, other finalizers kept.
/// The merge patch carries the resourceVersion the list was read at, so a concurrent
/// change of the list is a conflict (retried), never lost.
pub async fn set(
    api: &Api<KinesisConsumerGroup>,
    kcg: &KinesisConsumerGroup,
    present: bool,
) -> Result<(), kube::Error> {
    let mut finalizers: Vec<String> = kcg
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": kcg.resource_version(),
        }
    });
    api.patch(
        &kcg.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        // (deleting, has the finalizer, cleanup needed, step)
        let cases = [
            (false, false, true, Step::Add),
            (false, true, true, Step::Proceed),
            (false, false, false, Step::Proceed),
            (false, true, false, Step::Remove),
            (true, true, true, Step::Cleanup),
            (true, true, false, Step::Cleanup),
            (true, false, true, Step::Gone),
            (true, false, false, Step::Gone),
        ];
        for (deleting, has, needed, want) in cases {
            assert_eq!(
                step(deleting, has, needed),
                want,
                "{deleting} {has} {needed}"
            );
        }
    }

    #[test]
    fn cleanup_needed_table() {
        let spec = |state_store: &str, consumer: &str| -> KinesisConsumerGroupSpec {
            serde_yaml::from_str(&format!(
                "streams: [{{name: s{consumer}}}]\nstateStore: {{table: tbl{state_store}}}\ndelivery: {{stdout: {{}}}}\n"
            ))
            .unwrap()
        };
        // (stateStore extra, stream extra, needed)
        let cases = [
            ("", "", false),
            (", onDelete: Delete", "", true),
            ("", ", consumer: {mode: EnhancedFanOut}", false),
            (
                "",
                ", consumer: {mode: EnhancedFanOut, onDelete: Deregister}",
                true,
            ),
            // Polling streams register no consumer: nothing to deregister.
            ("", ", consumer: {onDelete: Deregister}", false),
        ];
        for (store, consumer, want) in cases {
            assert_eq!(
                cleanup_needed("ns/g", &spec(store, consumer)),
                want,
                "{store:?} {consumer:?}"
            );
        }
    }
}
