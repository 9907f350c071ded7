//! Which Kubernetes events to emit, decided PURELY from the previously published status and
//! the new one. Events fire only on a change, so a periodic refresh of an unchanged group
//! emits nothing.

use std::collections::BTreeMap;

use crate::conditions::{self, DEGRADED, TRUE};
use crate::crd::KinesisConsumerGroupStatus;

/// Longest event note; the API server rejects notes over 1 kB.
pub const MAX_NOTE_CHARS: usize = 1000;

/// Event severity, mirrored from kube's so this module stays plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Informational.
    Normal,
    /// Something needs attention.
    Warning,
}

/// One event to publish on the KinesisConsumerGroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    /// Normal or Warning.
    pub severity: Severity,
    /// CamelCase reason: `Rebalanced`, `LeaderChanged`, `ShardsChanged`, or a Degraded reason.
    pub reason: String,
    /// What the controller was doing: `Reconcile` here.
    pub action: String,
    /// Human-readable detail.
    pub note: String,
}

impl EventSpec {
    fn new(severity: Severity, reason: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            severity,
            reason: reason.into(),
            action: "Reconcile".into(),
            note: conditions::truncate(&note.into(), MAX_NOTE_CHARS),
        }
    }
}

/// Shards owned per client, summed over streams, from the published ranges.
fn distribution(s: &KinesisConsumerGroupStatus) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for st in &s.streams {
        for r in &st.ranges {
            *out.entry(r.client.clone()).or_insert(0) += r.count;
        }
    }
    out
}

fn show(d: &BTreeMap<String, i32>) -> String {
    if d.is_empty() {
        return "(none)".into();
    }
    d.iter()
        .map(|(c, n)| format!("{c}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The events that the change from `old` to `new` calls for.
pub fn diff(
    old: Option<&KinesisConsumerGroupStatus>,
    new: &KinesisConsumerGroupStatus,
) -> Vec<EventSpec> {
    let mut out = Vec::new();
    let empty = KinesisConsumerGroupStatus::default();
    let old = old.unwrap_or(&empty);

    // Leader: only a change to a new leader is news; losing every client shows in conditions.
    if let Some(new_leader) = &new.leader
        && old.leader.as_ref() != Some(new_leader)
    {
        let was = old.leader.as_deref().unwrap_or("(none)");
        out.push(EventSpec::new(
            Severity::Normal,
            "LeaderChanged",
            format!("leader {was} → {new_leader}"),
        ));
    }

    // Resharding: the set of open or draining shards of a stream changed.
    for st in &new.streams {
        if let Some(prev) = old.streams.iter().find(|p| p.name == st.name)
            && (prev.open_shards, prev.closed_shards_draining)
                != (st.open_shards, st.closed_shards_draining)
            && (prev.open_shards + prev.closed_shards_draining) > 0
        {
            out.push(EventSpec::new(
                Severity::Normal,
                "ShardsChanged",
                format!(
                    "stream {}: {} open + {} draining → {} open + {} draining shards (reshard seen)",
                    st.name, prev.open_shards, prev.closed_shards_draining, st.open_shards, st.closed_shards_draining
                ),
            ));
        }
    }

    // Ownership: the per-client distribution changed (and someone owns something now).
    let (before, after) = (distribution(old), distribution(new));
    if before != after && !after.is_empty() {
        out.push(EventSpec::new(
            Severity::Normal,
            "Rebalanced",
            format!("{} → {}", show(&before), show(&after)),
        ));
    }

    // Degraded: a Warning when the condition turns True or its reason changes.
    if let Some(d) = conditions::find(&new.conditions, DEGRADED).filter(|c| c.status == TRUE) {
        let was = conditions::find(&old.conditions, DEGRADED)
            .filter(|c| c.status == TRUE)
            .map(|c| c.reason.as_str());
        if was != Some(d.reason.as_str()) {
            out.push(EventSpec::new(
                Severity::Warning,
                d.reason.clone(),
                d.message.clone(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ShardRange, StreamStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn range(client: &str, n: i32) -> ShardRange {
        ShardRange {
            client: client.into(),
            first: "shardId-0".into(),
            last: "shardId-9".into(),
            count: n,
        }
    }

    fn status(
        leader: Option<&str>,
        open: i32,
        ranges: Vec<ShardRange>,
        degraded: Option<&str>,
    ) -> KinesisConsumerGroupStatus {
        KinesisConsumerGroupStatus {
            leader: leader.map(str::to_owned),
            streams: vec![StreamStatus {
                name: "orders".into(),
                open_shards: open,
                ranges,
                ..Default::default()
            }],
            conditions: vec![Condition {
                type_: DEGRADED.into(),
                status: if degraded.is_some() { "True" } else { "False" }.into(),
                reason: degraded.unwrap_or("AsExpected").into(),
                message: format!("{}: caused by: boom", degraded.unwrap_or("ok")),
                observed_generation: None,
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        }
    }

    fn reasons(events: &[EventSpec]) -> Vec<&str> {
        events.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn diff_table() {
        let base = status(Some("a"), 4, vec![range("a", 2), range("b", 2)], None);
        let cases: Vec<(
            &str,
            Option<KinesisConsumerGroupStatus>,
            KinesisConsumerGroupStatus,
            Vec<&str>,
        )> = vec![
            (
                "unchanged refresh is silent",
                Some(base.clone()),
                base.clone(),
                vec![],
            ),
            (
                "first status names the leader and the distribution",
                None,
                base.clone(),
                vec!["LeaderChanged", "Rebalanced"],
            ),
            (
                "leader change",
                Some(base.clone()),
                status(Some("b"), 4, vec![range("a", 2), range("b", 2)], None),
                vec!["LeaderChanged"],
            ),
            (
                "leader lost is not an event",
                Some(base.clone()),
                status(None, 4, vec![range("a", 2), range("b", 2)], None),
                vec![],
            ),
            (
                "scale-up moves shards",
                Some(base.clone()),
                status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 1), range("c", 1)],
                    None,
                ),
                vec!["Rebalanced"],
            ),
            (
                "reshard",
                Some(base.clone()),
                status(Some("a"), 5, vec![range("a", 2), range("b", 2)], None),
                vec!["ShardsChanged"],
            ),
            (
                "newly degraded",
                Some(base.clone()),
                status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 2)],
                    Some("AccessDenied"),
                ),
                vec!["AccessDenied"],
            ),
            (
                "still degraded for the same reason is silent",
                Some(status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 2)],
                    Some("AccessDenied"),
                )),
                status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 2)],
                    Some("AccessDenied"),
                ),
                vec![],
            ),
            (
                "degraded for a new reason",
                Some(status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 2)],
                    Some("AccessDenied"),
                )),
                status(
                    Some("a"),
                    4,
                    vec![range("a", 2), range("b", 2)],
                    Some("HandlerFailing"),
                ),
                vec!["HandlerFailing"],
            ),
        ];
        for (name, old, new, want) in cases {
            let got = diff(old.as_ref(), &new);
            assert_eq!(reasons(&got), want, "case {name}: {got:?}");
        }
    }

    #[test]
    fn notes_carry_the_details() {
        let old = status(Some("a"), 4, vec![range("a", 2), range("b", 2)], None);
        let new = status(Some("b"), 4, vec![range("b", 4)], Some("StreamNotFound"));
        let got = diff(Some(&old), &new);
        let by = |r: &str| got.iter().find(|e| e.reason == r).unwrap();
        assert_eq!(by("LeaderChanged").note, "leader a → b");
        assert_eq!(by("Rebalanced").note, "a=2 b=2 → b=4");
        let w = by("StreamNotFound");
        assert_eq!(w.severity, Severity::Warning);
        assert!(
            w.note.contains("caused by: boom"),
            "the error chain travels: {}",
            w.note
        );
        assert!(
            got.iter()
                .filter(|e| e.reason != "StreamNotFound")
                .all(|e| e.severity == Severity::Normal)
        );
    }
}
