//! Status conditions: the four condition types the controller publishes and the rule that
//! keeps `lastTransitionTime` stable while a condition's status does not flip.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// All replicas ready, every consumable shard owned by a live client, rollout current.
pub const READY: &str = "Ready";
/// No shard unowned or held by a dead client, client range sizes differ by at most one.
pub const BALANCED: &str = "Balanced";
/// A rollout or a rebalance is under way.
pub const PROGRESSING: &str = "Progressing";
/// Something needs a human: the reason says what, the message says what to fix.
pub const DEGRADED: &str = "Degraded";

/// Condition status `True`.
pub const TRUE: &str = "True";
/// Condition status `False`.
pub const FALSE: &str = "False";
/// Condition status `Unknown`.
pub const UNKNOWN: &str = "Unknown";

/// Longest condition message kept; longer ones are cut so the status stays small.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// One condition as the status builder decides it, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Condition type, one of the constants above.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase machine-readable reason.
    pub reason: String,
    /// Human-readable message; for bad states it says what to fix.
    pub message: String,
}

impl Verdict {
    /// A verdict with the given fields.
    pub fn new(
        type_: &'static str,
        status: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Turns verdicts into conditions. `lastTransitionTime` is copied from the previous
/// condition of the same type when its status is unchanged (so a refresh that changes only a
/// message does not look like a flip), and set to `now` otherwise.
pub fn apply(
    verdicts: Vec<Verdict>,
    previous: &[Condition],
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Vec<Condition> {
    verdicts
        .into_iter()
        .map(|v| {
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == v.status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: v.type_.to_owned(),
                status: v.status.to_owned(),
                reason: v.reason,
                message: truncate(&v.message, MAX_MESSAGE_CHARS),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of this type exists and has status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

/// Cuts a text to at most `max` characters (on a char boundary), marking the cut with `…`:
/// the worker's own, which clips the errors it records too.
pub use kcg_worker::store::schema::truncate;

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn keeps_transition_time_while_status_holds_and_moves_it_on_flip() {
        let first = apply(
            vec![Verdict::new(
                READY,
                FALSE,
                "DeploymentNotReady",
                "0/2 ready",
            )],
            &[],
            Some(1),
            ts(100),
        );
        assert_eq!(first[0].last_transition_time, Time(ts(100)));
        // Same status, new message: the time stays.
        let second = apply(
            vec![Verdict::new(
                READY,
                FALSE,
                "DeploymentNotReady",
                "1/2 ready",
            )],
            &first,
            Some(1),
            ts(200),
        );
        assert_eq!(second[0].last_transition_time, Time(ts(100)));
        assert_eq!(second[0].message, "1/2 ready");
        // Flip: the time moves.
        let third = apply(
            vec![Verdict::new(READY, TRUE, "Ready", "2/2 ready")],
            &second,
            Some(2),
            ts(300),
        );
        assert_eq!(third[0].last_transition_time, Time(ts(300)));
        assert_eq!(third[0].observed_generation, Some(2));
    }

    #[test]
    fn truncate_cuts_on_char_boundary() {
        assert_eq!(truncate("héllo", 10), "héllo");
        assert_eq!(truncate("héllo", 3), "hé…");
        assert_eq!(truncate("ééééé", 5).chars().count(), 5);
    }
}
