//! The lease handoff state machine: given the plan and what the table says, what this
//! client does with each shard. Pure; the engine performs the actions.
//!
//! Rules:
//! - Never steal from a live owner: a shard desired for us but held by a client whose lease
//!   counter still moves is a `Wait`; that client sees the same plan and releases it.
//! - A lease is taken over only when unowned, or when its counter stood still for the client
//!   timeout on our clock (its owner is dead): both by conditional write.
//! - A shard leaving our range is released only after its reader stopped, its in-flight
//!   batch finished and its final checkpoint is written (in the release write itself).
//! - Ended shards are released and never claimed again.
//! - A shard we read but no longer own (taken over after our renewals failed) is abandoned
//!   at once, without a checkpoint: the new owner's checkpoint must not be overwritten.

use std::collections::{BTreeMap, BTreeSet};

use crate::assignment::{Plan, ShardKey};
use crate::config::StartPosition;
use crate::store::schema::ResetTo;

/// What the table says about one lease, plus our own judgment of its counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// Current owner, if any.
    pub owner: Option<String>,
    /// Lease counter as read.
    pub counter: u64,
    /// The shard was read to its end.
    pub ended: bool,
    /// The counter has not moved for the client timeout on our clock (owner dead).
    pub stale: bool,
}

/// What to do with one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take the lease: `from` is `None` for an unowned (or missing) lease, or the dead
    /// owner and the counter we watched stand still.
    Claim {
        /// The shard.
        key: ShardKey,
        /// Expected current owner and counter, for the conditional write.
        from: Option<(String, u64)>,
    },
    /// We own it but are not reading it: renew and start reading from its checkpoint.
    Resume(ShardKey),
    /// We own it and read it, and it is still ours: keep the lease alive.
    Renew(ShardKey),
    /// We own it but it is no longer ours to read (outside our range, or ended): stop the
    /// reader, let the in-flight batch finish, write the final checkpoint and release.
    Release(ShardKey),
    /// We read it but do not own it any more: stop at once, write nothing.
    Abandon(ShardKey),
    /// Desired for us, but a live client holds it; it will release it.
    Wait(ShardKey),
}

/// Inputs of one decision round.
#[derive(Clone, Copy, Debug)]
pub struct HandoffInput<'a> {
    /// Our client id.
    pub me: &'a str,
    /// Desired owner per consumable shard.
    pub plan: &'a Plan,
    /// Every lease row of the group.
    pub leases: &'a BTreeMap<ShardKey, LeaseView>,
    /// Shards we currently run a reader for.
    pub reading: &'a BTreeSet<ShardKey>,
}

/// Decides one action per shard that concerns us, in key order. Shards that are neither
/// desired for us, owned by us nor read by us produce nothing.
pub fn decide(input: HandoffInput<'_>) -> Vec<Action> {
    let me = input.me;
    let mut keys: BTreeSet<&ShardKey> = input
        .plan
        .iter()
        .filter(|(_, owner)| owner.as_str() == me)
        .map(|(k, _)| k)
        .collect();
    keys.extend(
        input
            .leases
            .iter()
            .filter(|(_, l)| l.owner.as_deref() == Some(me))
            .map(|(k, _)| k),
    );
    keys.extend(input.reading.iter());

    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let desired_mine = input.plan.get(key).is_some_and(|o| o == me);
        let reading = input.reading.contains(key);
        let action = match input.leases.get(key) {
            None if reading => Some(Action::Abandon(key.clone())),
            None if desired_mine => Some(Action::Claim {
                key: key.clone(),
                from: None,
            }),
            None => None,
            Some(lease) => decide_one(me, key, lease, desired_mine, reading),
        };
        out.extend(action);
    }
    out
}

fn decide_one(
    me: &str,
    key: &ShardKey,
    lease: &LeaseView,
    desired_mine: bool,
    reading: bool,
) -> Option<Action> {
    let key = key.clone();
    match lease.owner.as_deref() {
        Some(owner) if owner == me => {
            if lease.ended || !desired_mine {
                Some(Action::Release(key))
            } else if reading {
                Some(Action::Renew(key))
            } else {
                Some(Action::Resume(key))
            }
        }
        // Someone else (or nobody) owns what we read: we lost it.
        _ if reading => Some(Action::Abandon(key)),
        _ if lease.ended || !desired_mine => None,
        None => Some(Action::Claim { key, from: None }),
        Some(owner) if lease.stale => Some(Action::Claim {
            key,
            from: Some((owner.to_owned(), lease.counter)),
        }),
        Some(_) => Some(Action::Wait(key)),
    }
}

/// Where a shard that has no checkpoint starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreshStart {
    /// The stream's configured start position.
    Configured,
    /// The oldest record. The shard continues a parent this group read to its end, so
    /// everything in it is new to the group, whatever the configured start (KCL starts
    /// child leases at TRIM_HORIZON for the same reason). Reading a child at LATEST would
    /// drop what arrived between the split and the first read.
    TrimHorizon,
    /// Records that arrived from this time (Unix ms) on. The shard was claimed before and
    /// left without a checkpoint (its owner read nothing it acknowledged, then handed it
    /// over or died); LATEST now would drop what arrived since that first claim.
    AtTimestampMs(i64),
}

/// Subtracted from the first claim time when resuming a LATEST shard without checkpoint,
/// to cover skew between the first claimer's clock and Kinesis' arrival timestamps. It
/// can only add records (older ones), never skip any.
pub const LATEST_HANDOFF_MARGIN_MS: i64 = 30_000;

/// Decides where a shard without a checkpoint starts. `parent_read_to_end`: one of its
/// parents has an ended lease in this group. `first_claim`: this claim is the shard's first
/// ever; `first_claimed_at_ms`: when that first claim happened. `reset`: the restart point
/// a `checkpoints reset` wrote into the row; it wins over everything else, since the user
/// asked for exactly that position (a child reset with its parents starts at the same point,
/// which holds none of the parents' records).
pub fn no_checkpoint_start(
    configured: StartPosition,
    parent_read_to_end: bool,
    first_claim: bool,
    first_claimed_at_ms: Option<i64>,
    reset: Option<ResetTo>,
) -> FreshStart {
    match reset {
        Some(ResetTo::TrimHorizon) => return FreshStart::TrimHorizon,
        Some(ResetTo::AtTimestamp(t)) => return FreshStart::AtTimestampMs(t.as_millisecond()),
        None => {}
    }
    if parent_read_to_end {
        return FreshStart::TrimHorizon;
    }
    match (configured, first_claim, first_claimed_at_ms) {
        (StartPosition::Latest, false, Some(t)) => {
            FreshStart::AtTimestampMs(t - LATEST_HANDOFF_MARGIN_MS)
        }
        _ => FreshStart::Configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "c1";

    fn key(s: &str) -> ShardKey {
        ShardKey::new("st", s)
    }

    fn lease(owner: Option<&str>, counter: u64, ended: bool, stale: bool) -> LeaseView {
        LeaseView {
            owner: owner.map(str::to_owned),
            counter,
            ended,
            stale,
        }
    }

    struct Case {
        name: &'static str,
        desired: Option<&'static str>,
        lease: Option<LeaseView>,
        reading: bool,
        want: Option<Action>,
    }

    #[test]
    fn decide_table() {
        let k = || key("0");
        let cases = vec![
            Case {
                name: "mine, no row: claim (creates row)",
                desired: Some(ME),
                lease: None,
                reading: false,
                want: Some(Action::Claim {
                    key: k(),
                    from: None,
                }),
            },
            Case {
                name: "mine, unowned: claim",
                desired: Some(ME),
                lease: Some(lease(None, 4, false, false)),
                reading: false,
                want: Some(Action::Claim {
                    key: k(),
                    from: None,
                }),
            },
            Case {
                name: "mine, unowned but stale counter: plain claim",
                desired: Some(ME),
                lease: Some(lease(None, 4, false, true)),
                reading: false,
                want: Some(Action::Claim {
                    key: k(),
                    from: None,
                }),
            },
            Case {
                name: "mine, live other owner: wait, never steal",
                desired: Some(ME),
                lease: Some(lease(Some("c2"), 9, false, false)),
                reading: false,
                want: Some(Action::Wait(k())),
            },
            Case {
                name: "mine, dead other owner: take over from observed counter",
                desired: Some(ME),
                lease: Some(lease(Some("c2"), 9, false, true)),
                reading: false,
                want: Some(Action::Claim {
                    key: k(),
                    from: Some(("c2".into(), 9)),
                }),
            },
            Case {
                name: "mine, owned and read: renew",
                desired: Some(ME),
                lease: Some(lease(Some(ME), 3, false, false)),
                reading: true,
                want: Some(Action::Renew(k())),
            },
            Case {
                name: "mine, owned, not read: resume",
                desired: Some(ME),
                lease: Some(lease(Some(ME), 3, false, false)),
                reading: false,
                want: Some(Action::Resume(k())),
            },
            Case {
                name: "owned but desired elsewhere: release",
                desired: Some("c2"),
                lease: Some(lease(Some(ME), 3, false, false)),
                reading: true,
                want: Some(Action::Release(k())),
            },
            Case {
                name: "owned but not consumable any more: release",
                desired: None,
                lease: Some(lease(Some(ME), 3, false, false)),
                reading: true,
                want: Some(Action::Release(k())),
            },
            Case {
                name: "owned and ended: release even if desired",
                desired: Some(ME),
                lease: Some(lease(Some(ME), 3, true, false)),
                reading: false,
                want: Some(Action::Release(k())),
            },
            Case {
                name: "ended and unowned: never claimed",
                desired: Some(ME),
                lease: Some(lease(None, 3, true, true)),
                reading: false,
                want: None,
            },
            Case {
                name: "ended, dead owner: never claimed",
                desired: Some(ME),
                lease: Some(lease(Some("c2"), 3, true, true)),
                reading: false,
                want: None,
            },
            Case {
                name: "reading but stolen: abandon",
                desired: Some(ME),
                lease: Some(lease(Some("c2"), 10, false, false)),
                reading: true,
                want: Some(Action::Abandon(k())),
            },
            Case {
                name: "reading but unowned: abandon",
                desired: Some(ME),
                lease: Some(lease(None, 10, false, false)),
                reading: true,
                want: Some(Action::Abandon(k())),
            },
            Case {
                name: "reading, row gone: abandon",
                desired: None,
                lease: None,
                reading: true,
                want: Some(Action::Abandon(k())),
            },
            Case {
                name: "not mine, dead owner: leave it to the desired owner",
                desired: Some("c3"),
                lease: Some(lease(Some("c2"), 9, false, true)),
                reading: false,
                want: None,
            },
            Case {
                name: "not mine, unowned: nothing",
                desired: Some("c2"),
                lease: Some(lease(None, 1, false, false)),
                reading: false,
                want: None,
            },
            Case {
                name: "not mine, not consumable: nothing",
                desired: None,
                lease: Some(lease(Some("c2"), 1, false, false)),
                reading: false,
                want: None,
            },
        ];
        for c in cases {
            let plan: Plan = c.desired.map(|o| (k(), o.to_owned())).into_iter().collect();
            let leases: BTreeMap<ShardKey, LeaseView> =
                c.lease.map(|l| (k(), l)).into_iter().collect();
            let reading: BTreeSet<ShardKey> = c.reading.then(k).into_iter().collect();
            let got = decide(HandoffInput {
                me: ME,
                plan: &plan,
                leases: &leases,
                reading: &reading,
            });
            assert_eq!(got, c.want.into_iter().collect::<Vec<_>>(), "{}", c.name);
        }
    }

    #[test]
    fn no_checkpoint_start_table() {
        use StartPosition::*;
        let m = LATEST_HANDOFF_MARGIN_MS;
        // (name, configured, parent ended, first claim, first claimed at, want)
        let cases = [
            (
                "first claim at LATEST",
                Latest,
                false,
                true,
                Some(1_000_000),
                FreshStart::Configured,
            ),
            (
                "LATEST shard handed over without checkpoint",
                Latest,
                false,
                false,
                Some(1_000_000),
                FreshStart::AtTimestampMs(1_000_000 - m),
            ),
            (
                "LATEST row from an older worker (no first-claim time)",
                Latest,
                false,
                false,
                None,
                FreshStart::Configured,
            ),
            (
                "TRIM_HORIZON is always safe",
                TrimHorizon,
                false,
                false,
                Some(1_000_000),
                FreshStart::Configured,
            ),
            (
                "AT_TIMESTAMP keeps its timestamp",
                AtTimestamp,
                false,
                false,
                Some(1_000_000),
                FreshStart::Configured,
            ),
            (
                "child of a parent we read to its end",
                Latest,
                true,
                true,
                Some(5),
                FreshStart::TrimHorizon,
            ),
            (
                "child, AT_TIMESTAMP configured",
                AtTimestamp,
                true,
                false,
                None,
                FreshStart::TrimHorizon,
            ),
        ];
        for (name, configured, parent, first, at, want) in cases {
            assert_eq!(
                no_checkpoint_start(configured, parent, first, at, None),
                want,
                "{name}"
            );
        }
        // A reset's restart point wins over the configured start, the parent rule and the
        // LATEST handoff rule.
        let t: jiff::Timestamp = "2026-01-02T15:04:05Z".parse().expect("time");
        for (configured, parent, first, at) in [
            (Latest, false, true, Some(1_000_000)),
            (Latest, false, false, Some(1_000_000)),
            (TrimHorizon, true, false, None),
            (AtTimestamp, false, false, None),
        ] {
            assert_eq!(
                no_checkpoint_start(configured, parent, first, at, Some(ResetTo::TrimHorizon)),
                FreshStart::TrimHorizon
            );
            assert_eq!(
                no_checkpoint_start(configured, parent, first, at, Some(ResetTo::AtTimestamp(t))),
                FreshStart::AtTimestampMs(t.as_millisecond())
            );
        }
    }

    /// Simulates two clients handing over a shard: the plan moves shard 1 from c1 to c2.
    /// At no step do both read it.
    #[test]
    fn rebalance_never_double_reads() {
        let plan_before: Plan = [(key("0"), "c1".to_owned()), (key("1"), "c1".to_owned())].into();
        let plan_after: Plan = [(key("0"), "c1".to_owned()), (key("1"), "c2".to_owned())].into();
        let mut leases: BTreeMap<ShardKey, LeaseView> = [
            (key("0"), lease(Some("c1"), 5, false, false)),
            (key("1"), lease(Some("c1"), 5, false, false)),
        ]
        .into();
        let c1_reading: BTreeSet<ShardKey> = [key("0"), key("1")].into();
        let c2_reading: BTreeSet<ShardKey> = BTreeSet::new();
        // Before: both agree; c2 has nothing to do.
        assert!(
            decide(HandoffInput {
                me: "c2",
                plan: &plan_before,
                leases: &leases,
                reading: &c2_reading
            })
            .is_empty()
        );
        // c2 sees the new plan first: it waits, it does not steal.
        assert_eq!(
            decide(HandoffInput {
                me: "c2",
                plan: &plan_after,
                leases: &leases,
                reading: &c2_reading
            }),
            vec![Action::Wait(key("1"))]
        );
        // c1 sees it: renews 0, releases 1.
        assert_eq!(
            decide(HandoffInput {
                me: "c1",
                plan: &plan_after,
                leases: &leases,
                reading: &c1_reading
            }),
            vec![Action::Renew(key("0")), Action::Release(key("1"))]
        );
        // c1 released (owner removed, counter bumped): c2 claims, c1 has nothing more on 1.
        leases.insert(key("1"), lease(None, 6, false, false));
        let c1_reading: BTreeSet<ShardKey> = [key("0")].into();
        assert_eq!(
            decide(HandoffInput {
                me: "c2",
                plan: &plan_after,
                leases: &leases,
                reading: &c2_reading
            }),
            vec![Action::Claim {
                key: key("1"),
                from: None
            }]
        );
        assert_eq!(
            decide(HandoffInput {
                me: "c1",
                plan: &plan_after,
                leases: &leases,
                reading: &c1_reading
            }),
            vec![Action::Renew(key("0"))]
        );
    }
}
