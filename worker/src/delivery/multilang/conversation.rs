//! The conversation with one record-processor process, as a pure state machine: what kcg
//! sent and waits an answer for, what was delivered, where the checkpoint is, and what each
//! message from the processor means. The process I/O around it lives in `process.rs`.
//!
//! The rules follow KCL's MultiLangDaemon: every message kcg sends (except a checkpoint
//! reply) is answered by one `status` naming it; while kcg waits for that status, the
//! processor may send checkpoint requests, each answered at once. A checkpoint must lie
//! between the current checkpoint and the last record delivered to this process; without
//! a sequence number it means "everything delivered so far", or, while `shardEnded` is
//! pending, the end of the shard.
//!
//! KCL numbers every record `(sequence, subSequence)` with sub-sequence 0 for a record that
//! is not a KPL aggregate; kcg's [`Position`] has no sub-sequence for such a record (a whole
//! record). [`requested_position`] maps one to the other.

use std::collections::VecDeque;

use super::messages::{Action, CheckpointReply, FromProcessor};
use crate::position::{Position, compare_sequence};

/// What a granted checkpoint moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Everything up to and including this position is processed.
    At(Position),
    /// The shard's end is processed (its children may start).
    ShardEnd,
}

/// What to do with a message from the processor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record `commit` (when set), then send `reply`.
    Checkpoint {
        /// The checkpoint to record; `None` when it moves nothing (or was refused).
        commit: Option<Commit>,
        /// The answer to send.
        reply: CheckpointReply,
    },
    /// The processor finished the awaited action.
    Done(Action),
}

/// The processor broke the protocol: it cannot be trusted to continue (it is restarted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A `status` for another action than the one awaited.
    #[error("the record processor answered status for {got} while kcg waited for {awaited}")]
    WrongStatus {
        /// What it answered.
        got: Action,
        /// What kcg waited for.
        awaited: Action,
    },
    /// A message while kcg waited for nothing.
    #[error("the record processor sent {0:?} while kcg waited for nothing")]
    Unsolicited(FromProcessor),
    /// kcg itself tried to send while an answer was pending (a bug in the caller).
    #[error("{next} sent while {awaited} is still unanswered")]
    Overlap {
        /// The message kcg tried to send.
        next: Action,
        /// The unanswered one.
        awaited: Action,
    },
}

/// KCL's name for a checkpoint outside the allowed range or malformed.
pub const ILLEGAL_ARGUMENT: &str = "IllegalArgumentException";
/// KCL's name for a checkpoint after the lease was lost.
pub const SHUTDOWN: &str = "ShutdownException";
/// KCL's name for a checkpoint where none is possible (e.g. during `initialize`).
pub const INVALID_STATE: &str = "InvalidStateException";

/// What kcg hands over with a `processRecords`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Sequence number of its first record.
    pub first: String,
    /// Position of its last record.
    pub last: Position,
    /// Sequence numbers of its KPL aggregates, in order (usually none).
    pub aggregates: Vec<String>,
}

/// Most aggregate sequence numbers remembered per process; older ones are forgotten and
/// checkpoints before the oldest remembered one are read conservatively.
const MAX_REMEMBERED_AGGREGATES: usize = 10_000;

/// Which delivered records were KPL aggregates, to read KCL's sub-sequence 0 right: every
/// sequence from `known_from` to the last delivered record is an aggregate exactly when it
/// is in `aggregates`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    /// From here on (inclusive) the records' kinds are known.
    known_from: Option<String>,
    /// Aggregates at or after `known_from`, in order.
    aggregates: VecDeque<String>,
}

impl Lineage {
    /// Remembers a delivered batch.
    fn push(&mut self, batch: &Batch) {
        if self.known_from.is_none() {
            self.known_from = Some(batch.first.clone());
        }
        self.aggregates.extend(batch.aggregates.iter().cloned());
        while self.aggregates.len() > MAX_REMEMBERED_AGGREGATES {
            self.aggregates.pop_front();
            // Records between the dropped aggregate and the next one are now unknown.
            self.known_from = self.aggregates.front().cloned();
        }
    }

    /// Forgets aggregates before the checkpoint `c` (no request may go there).
    fn prune(&mut self, c: &Position) {
        while self
            .aggregates
            .front()
            .is_some_and(|a| compare_sequence(a, &c.sequence).is_lt())
        {
            self.aggregates.pop_front();
        }
    }

    /// `Some(true)`: an aggregate, `Some(false)`: a whole record, `None`: unknown.
    fn is_aggregate(&self, sequence: &str) -> Option<bool> {
        let known = self
            .known_from
            .as_deref()
            .is_some_and(|k| compare_sequence(sequence, k).is_ge());
        known.then(|| self.aggregates.iter().any(|a| a == sequence))
    }
}

/// The state of one conversation (one process's lifetime).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conversation {
    awaiting: Option<Action>,
    /// Last record handed to this process.
    delivered: Option<Position>,
    /// Which records handed to this process were aggregates.
    lineage: Lineage,
    /// The current checkpoint (where this process was initialized, then its checkpoints).
    checkpoint: Option<Position>,
    /// The processor checkpointed the shard's end.
    shard_end_checkpointed: bool,
}

impl Conversation {
    /// A conversation with a process that starts after `checkpoint`.
    pub fn new(checkpoint: Option<Position>) -> Self {
        Self {
            checkpoint,
            ..Self::default()
        }
    }

    /// kcg sends `action`; with `processRecords`, the batch.
    pub fn sent(&mut self, action: Action, batch: Option<Batch>) -> Result<(), ProtocolError> {
        if let Some(awaited) = self.awaiting {
            return Err(ProtocolError::Overlap {
                next: action,
                awaited,
            });
        }
        self.awaiting = Some(action);
        if let Some(b) = batch {
            self.lineage.push(&b);
            self.delivered = Some(b.last);
        }
        Ok(())
    }

    /// The processor sent `msg`.
    pub fn received(&mut self, msg: FromProcessor) -> Result<Step, ProtocolError> {
        let Some(awaited) = self.awaiting else {
            return Err(ProtocolError::Unsolicited(msg));
        };
        match msg {
            FromProcessor::Status { response_for } if response_for == awaited => {
                self.awaiting = None;
                Ok(Step::Done(awaited))
            }
            FromProcessor::Status { response_for } => Err(ProtocolError::WrongStatus {
                got: response_for,
                awaited,
            }),
            FromProcessor::Checkpoint {
                sequence_number,
                sub_sequence_number,
            } => {
                let requested = match sequence_number.as_deref() {
                    None => Ok(None),
                    Some(s) => requested_position(
                        s,
                        sub_sequence_number,
                        self.delivered.as_ref(),
                        self.lineage.is_aggregate(s),
                    )
                    .map(Some),
                };
                let decision = requested.and_then(|r| {
                    decide_checkpoint(
                        awaited,
                        r,
                        self.delivered.as_ref(),
                        self.checkpoint.as_ref(),
                    )
                });
                let (commit, error) = match decision {
                    Ok(c) => (c, None),
                    Err(e) => (None, Some(e)),
                };
                match &commit {
                    Some(Commit::At(p)) => {
                        self.lineage.prune(p);
                        self.checkpoint = Some(p.clone());
                    }
                    Some(Commit::ShardEnd) => self.shard_end_checkpointed = true,
                    None => {}
                }
                Ok(Step::Checkpoint {
                    commit,
                    reply: CheckpointReply {
                        sequence_number,
                        sub_sequence_number,
                        error,
                    },
                })
            }
        }
    }

    /// Nothing is pending: kcg may send the next message.
    pub fn idle(&self) -> bool {
        self.awaiting.is_none()
    }

    /// The processor checkpointed the shard's end (required before it counts as ended).
    pub fn shard_end_checkpointed(&self) -> bool {
        self.shard_end_checkpointed
    }

    /// The last record delivered to this process.
    pub fn delivered(&self) -> Option<&Position> {
        self.delivered.as_ref()
    }
}

/// The kcg position a KCL checkpoint request `(sequence, subSequence)` names, given
/// whether that record was an aggregate (`None`: not known). Pure.
///
/// KCL's sub-sequence 0 is ambiguous: a whole record, or the first user record of an
/// aggregate. A record known to be whole maps to a whole position; an aggregate, or a
/// record of unknown kind (past the delivered range, refused later; or forgotten), to its
/// user record, which at worst redelivers that one record once, never skips part of an
/// aggregate.
pub fn requested_position(
    sequence: &str,
    sub_sequence: Option<u64>,
    delivered: Option<&Position>,
    aggregate: Option<bool>,
) -> Result<Position, &'static str> {
    if sequence.is_empty() || !sequence.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ILLEGAL_ARGUMENT);
    }
    let within = delivered.is_some_and(|d| compare_sequence(sequence, &d.sequence).is_le());
    Ok(if within && aggregate == Some(false) {
        Position::whole(sequence)
    } else {
        Position::sub(sequence, sub_sequence.unwrap_or(0))
    })
}

/// Whether a checkpoint request (`requested`: `None` when it named no sequence) is
/// granted, and what it moves. Pure.
///
/// - only while `processRecords`, `shardEnded` or `shutdownRequested` is pending (after
///   `leaseLost`: `ShutdownException`; else `InvalidStateException`);
/// - no sequence: the end of the shard while `shardEnded` is pending, else the last record
///   delivered (nothing moves when nothing was delivered or it is already checkpointed);
/// - a position: not before the current checkpoint and not after the last delivered
///   record (`IllegalArgumentException`).
pub fn decide_checkpoint(
    awaited: Action,
    requested: Option<Position>,
    delivered: Option<&Position>,
    checkpoint: Option<&Position>,
) -> Result<Option<Commit>, &'static str> {
    match awaited {
        Action::ProcessRecords | Action::ShardEnded | Action::ShutdownRequested => {}
        Action::LeaseLost => return Err(SHUTDOWN),
        Action::Initialize => return Err(INVALID_STATE),
    }
    let target = match requested {
        None if awaited == Action::ShardEnded => return Ok(Some(Commit::ShardEnd)),
        None => match delivered {
            Some(d) => d.clone(),
            None => return Ok(None),
        },
        Some(p) => {
            if delivered.is_none_or(|d| p > *d) || checkpoint.is_some_and(|c| p < *c) {
                return Err(ILLEGAL_ARGUMENT);
            }
            p
        }
    };
    if checkpoint.is_some_and(|c| target <= *c) {
        return Ok(None);
    }
    Ok(Some(Commit::At(target)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn p(s: &str) -> Position {
        Position::parse(s)
    }

    fn at(s: &str) -> Result<Option<Commit>, &'static str> {
        Ok(Some(Commit::At(p(s))))
    }

    #[test]
    fn requested_position_table() {
        // (sequence, sub, delivered, is it an aggregate, want)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            Option<u64>,
            Option<&str>,
            Option<bool>,
            Result<&str, &str>,
        )] = &[
            ("30", None, Some("30"), Some(false), Ok("30")),
            ("30", Some(0), Some("30"), Some(false), Ok("30")),
            ("25", None, Some("30"), Some(false), Ok("25")),
            ("20", Some(3), Some("30"), Some(true), Ok("20/3")),
            ("20", None, Some("30"), Some(true), Ok("20/0")),
            ("30", Some(2), Some("30/5"), Some(true), Ok("30/2")),
            // A record of unknown kind: its first user record (at worst one duplicate,
            // never a skipped user record).
            ("25", None, Some("30"), None, Ok("25/0")),
            // Past what was delivered: refused by decide_checkpoint.
            ("31", None, Some("30"), Some(false), Ok("31/0")),
            ("3x", None, Some("30"), Some(false), Err(ILLEGAL_ARGUMENT)),
            ("", None, Some("30"), Some(false), Err(ILLEGAL_ARGUMENT)),
        ];
        for (seq, sub, delivered, aggregate, want) in cases {
            let got = requested_position(seq, *sub, delivered.map(p).as_ref(), *aggregate);
            assert_eq!(got, want.map(p), "{seq} {sub:?} after {delivered:?}");
        }
    }

    #[test]
    fn lineage_table() {
        let batch = |first: &str, last: &str, aggs: &[&str]| Batch {
            first: first.into(),
            last: p(last),
            aggregates: aggs.iter().map(|a| (*a).to_owned()).collect(),
        };
        let mut l = Lineage::default();
        assert_eq!(l.is_aggregate("10"), None, "nothing delivered");
        l.push(&batch("10", "30/2", &["20", "30"]));
        l.push(&batch("40", "50", &[]));
        // (sequence, want)
        for (seq, want) in [
            ("5", None),
            ("10", Some(false)),
            ("20", Some(true)),
            ("25", Some(false)),
            ("30", Some(true)),
            ("50", Some(false)),
        ] {
            assert_eq!(l.is_aggregate(seq), want, "{seq}");
        }
        l.prune(&p("30/1"));
        assert_eq!(
            l.is_aggregate("30"),
            Some(true),
            "the checkpoint's aggregate stays"
        );
        // Past the cap the oldest aggregates are forgotten and their range turns unknown.
        let many: Vec<String> = (0..MAX_REMEMBERED_AGGREGATES + 1)
            .map(|i| (1000 + i).to_string())
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        l.push(&batch("1000", "99999", &refs));
        assert_eq!(l.is_aggregate("50"), None);
        assert_eq!(l.is_aggregate("1000"), None);
        assert_eq!(
            l.is_aggregate("1001"),
            Some(true),
            "the next oldest is remembered"
        );
        assert_eq!(l.is_aggregate("20000"), Some(false));
    }

    #[test]
    fn checkpoint_decision_table() {
        let d = Some(p("300"));
        let c = Some(p("100"));
        // (name, awaited, requested, delivered, checkpoint, want)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            Action,
            Option<&str>,
            Option<Position>,
            Option<Position>,
            Result<Option<Commit>, &str>,
        )] = &[
            (
                "all delivered",
                ProcessRecords,
                None,
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "nothing delivered yet",
                ProcessRecords,
                None,
                None,
                c.clone(),
                Ok(None),
            ),
            (
                "already there",
                ProcessRecords,
                None,
                d.clone(),
                d.clone(),
                Ok(None),
            ),
            (
                "at a record",
                ProcessRecords,
                Some("200"),
                d.clone(),
                c.clone(),
                at("200"),
            ),
            (
                "at the last record",
                ProcessRecords,
                Some("300"),
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "numeric order, not text",
                ProcessRecords,
                Some("99"),
                Some(p("100")),
                Some(p("5")),
                at("99"),
            ),
            (
                "inside an aggregate",
                ProcessRecords,
                Some("300/2"),
                Some(p("300/4")),
                c.clone(),
                at("300/2"),
            ),
            (
                "same as checkpoint",
                ProcessRecords,
                Some("100"),
                d.clone(),
                c.clone(),
                Ok(None),
            ),
            (
                "before the checkpoint",
                ProcessRecords,
                Some("50"),
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "after the last delivered",
                ProcessRecords,
                Some("301"),
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "past the aggregate's last",
                ProcessRecords,
                Some("300/5"),
                Some(p("300/4")),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "nothing delivered, explicit",
                ProcessRecords,
                Some("100"),
                None,
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "shard end",
                ShardEnded,
                None,
                d.clone(),
                c.clone(),
                Ok(Some(Commit::ShardEnd)),
            ),
            (
                "shard end, nothing delivered",
                ShardEnded,
                None,
                None,
                None,
                Ok(Some(Commit::ShardEnd)),
            ),
            (
                "at a record during shard end",
                ShardEnded,
                Some("300"),
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "on shutdown request",
                ShutdownRequested,
                None,
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "after lease lost",
                LeaseLost,
                None,
                d.clone(),
                c.clone(),
                Err(SHUTDOWN),
            ),
            (
                "during initialize",
                Initialize,
                None,
                None,
                c.clone(),
                Err(INVALID_STATE),
            ),
        ];
        for (name, awaited, requested, delivered, checkpoint, want) in cases {
            assert_eq!(
                decide_checkpoint(
                    *awaited,
                    requested.map(p),
                    delivered.as_ref(),
                    checkpoint.as_ref()
                ),
                *want,
                "{name}"
            );
        }
    }

    /// Scripted conversations: kcg sends, or the processor sends and the step is checked.
    #[test]
    fn conversation_table() {
        enum Ev {
            Send(Action, Option<&'static str>),
            Recv(FromProcessor, Result<Step, ProtocolError>),
        }
        use Ev::*;
        let status = |a| FromProcessor::Status { response_for: a };
        let cp = |s: Option<&str>| FromProcessor::Checkpoint {
            sequence_number: s.map(str::to_owned),
            sub_sequence_number: None,
        };
        let reply = |s: Option<&str>, error| CheckpointReply {
            sequence_number: s.map(str::to_owned),
            sub_sequence_number: None,
            error,
        };
        let granted = |s: Option<&'static str>, c: &str| Step::Checkpoint {
            commit: Some(Commit::At(p(c))),
            reply: reply(s, None),
        };
        let scripts: Vec<(&str, Vec<Ev>)> = vec![
            (
                "initialize, two batches, checkpoints",
                vec![
                    Send(Initialize, None),
                    Recv(status(Initialize), Ok(Step::Done(Initialize))),
                    Send(ProcessRecords, Some("10")),
                    Recv(cp(Some("10")), Ok(granted(Some("10"), "10"))),
                    Recv(status(ProcessRecords), Ok(Step::Done(ProcessRecords))),
                    Send(ProcessRecords, Some("20")),
                    Recv(cp(None), Ok(granted(None, "20"))),
                    Recv(
                        cp(Some("10")),
                        Ok(Step::Checkpoint {
                            commit: None,
                            reply: reply(Some("10"), Some(ILLEGAL_ARGUMENT)),
                        }),
                    ),
                    Recv(status(ProcessRecords), Ok(Step::Done(ProcessRecords))),
                ],
            ),
            (
                "wrong status",
                vec![
                    Send(ProcessRecords, Some("10")),
                    Recv(
                        status(Initialize),
                        Err(ProtocolError::WrongStatus {
                            got: Initialize,
                            awaited: ProcessRecords,
                        }),
                    ),
                ],
            ),
            (
                "unsolicited",
                vec![Recv(cp(None), Err(ProtocolError::Unsolicited(cp(None))))],
            ),
            (
                "shard end",
                vec![
                    Send(ShardEnded, None),
                    Recv(
                        cp(None),
                        Ok(Step::Checkpoint {
                            commit: Some(Commit::ShardEnd),
                            reply: reply(None, None),
                        }),
                    ),
                    Recv(status(ShardEnded), Ok(Step::Done(ShardEnded))),
                ],
            ),
        ];
        for (name, script) in scripts {
            let mut c = Conversation::new(Some(p("5")));
            for (i, ev) in script.into_iter().enumerate() {
                match ev {
                    Send(a, last) => c
                        .sent(
                            a,
                            last.map(|l| Batch {
                                first: l.to_owned(),
                                last: p(l),
                                aggregates: Vec::new(),
                            }),
                        )
                        .unwrap(),
                    Recv(msg, want) => assert_eq!(c.received(msg), want, "{name}: step {i}"),
                }
            }
        }
        // Shard end is only done with its checkpoint.
        let mut c = Conversation::new(None);
        c.sent(ShardEnded, None).unwrap();
        c.received(status(ShardEnded)).unwrap();
        assert!(!c.shard_end_checkpointed());
        assert!(c.idle());
        // kcg never overlaps two messages.
        c.sent(ProcessRecords, None).unwrap();
        assert_eq!(
            c.sent(LeaseLost, None),
            Err(ProtocolError::Overlap {
                next: LeaseLost,
                awaited: ProcessRecords
            })
        );
    }
}
