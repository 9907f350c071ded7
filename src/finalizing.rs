//! The cleanup finalizer, held only while it is needed: a group with `onDelete: Delete`
//! must not go before its rows are deleted, so it carries the finalizer; a group with
//! `onDelete: Retain` has nothing to clean up and carries none, so it goes at once, even
//! when the operator is not running (uninstalled first, scaled to zero).
//!
//! [`step`] decides PURELY; [`set`] writes the finalizer list.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{KinesisConsumerGroup, OnDelete};

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

/// The step for a group being deleted or not, holding the finalizer or not, with a policy.
pub fn step(deleting: bool, has_finalizer: bool, on_delete: OnDelete) -> Step {
    let wanted = on_delete == OnDelete::Delete;
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
        kcg.spec.state_store.on_delete,
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
        use OnDelete::{Delete, Retain};
        let cases = [
            (false, false, Delete, Step::Add),
            (false, true, Delete, Step::Proceed),
            (false, false, Retain, Step::Proceed),
            (false, true, Retain, Step::Remove),
            (true, true, Delete, Step::Cleanup),
            (true, true, Retain, Step::Cleanup),
            (true, false, Delete, Step::Gone),
            (true, false, Retain, Step::Gone),
        ];
        for (deleting, has, policy, want) in cases {
            assert_eq!(
                step(deleting, has, policy),
                want,
                "{deleting} {has} {policy:?}"
            );
        }
    }
}
