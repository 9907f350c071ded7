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

use std::cmp::Ordering;

use super::messages::{Action, CheckpointReply, FromProcessor};
use crate::delivery::compare_sequences;

/// A position in a shard: a record's sequence number and, for records of a KPL-aggregated
/// Kinesis record, its sub-sequence number (0 otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// Kinesis sequence number (decimal digits).
    pub sequence: String,
    /// Sub-sequence number.
    pub sub_sequence: u64,
}

impl Position {
    /// A position without sub-sequence.
    pub fn new(sequence: impl Into<String>) -> Self {
        Self {
            sequence: sequence.into(),
            sub_sequence: 0,
        }
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Position {
    /// Numeric order of sequence numbers (they are up to 128 digits), then sub-sequence.
    fn cmp(&self, other: &Self) -> Ordering {
        compare_sequences(&self.sequence, &other.sequence)
            .then(self.sub_sequence.cmp(&other.sub_sequence))
    }
}

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

/// The state of one conversation (one process's lifetime).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conversation {
    awaiting: Option<Action>,
    /// Last record handed to this process.
    delivered: Option<Position>,
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

    /// kcg sends `action`; for `processRecords`, `last` is the batch's last record.
    pub fn sent(&mut self, action: Action, last: Option<Position>) -> Result<(), ProtocolError> {
        if let Some(awaited) = self.awaiting {
            return Err(ProtocolError::Overlap {
                next: action,
                awaited,
            });
        }
        self.awaiting = Some(action);
        if let Some(last) = last {
            self.delivered = Some(last);
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
                let decision = decide_checkpoint(
                    awaited,
                    sequence_number.as_deref(),
                    sub_sequence_number,
                    self.delivered.as_ref(),
                    self.checkpoint.as_ref(),
                );
                let (commit, error) = match decision {
                    Ok(c) => (c, None),
                    Err(e) => (None, Some(e)),
                };
                match &commit {
                    Some(Commit::At(p)) => self.checkpoint = Some(p.clone()),
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

/// Whether a checkpoint request is granted, and what it moves. Pure.
///
/// - only while `processRecords`, `shardEnded` or `shutdownRequested` is pending (after
///   `leaseLost`: `ShutdownException`; else `InvalidStateException`);
/// - no sequence: the end of the shard while `shardEnded` is pending, else the last record
///   delivered (nothing moves when nothing was delivered or it is already checkpointed);
/// - a sequence (sub-sequence absent = 0): must be digits, not before the current
///   checkpoint and not after the last delivered record (`IllegalArgumentException`).
pub fn decide_checkpoint(
    awaited: Action,
    sequence: Option<&str>,
    sub_sequence: Option<u64>,
    delivered: Option<&Position>,
    checkpoint: Option<&Position>,
) -> Result<Option<Commit>, &'static str> {
    match awaited {
        Action::ProcessRecords | Action::ShardEnded | Action::ShutdownRequested => {}
        Action::LeaseLost => return Err(SHUTDOWN),
        Action::Initialize => return Err(INVALID_STATE),
    }
    let target = match sequence {
        None if awaited == Action::ShardEnded => return Ok(Some(Commit::ShardEnd)),
        None => match delivered {
            Some(d) => d.clone(),
            None => return Ok(None),
        },
        Some(s) => {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ILLEGAL_ARGUMENT);
            }
            let p = Position {
                sequence: s.to_owned(),
                sub_sequence: sub_sequence.unwrap_or(0),
            };
            if delivered.is_none_or(|d| p > *d) {
                return Err(ILLEGAL_ARGUMENT);
            }
            if checkpoint.is_some_and(|c| p < *c) {
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
        Position::new(s)
    }

    fn at(s: &str) -> Result<Option<Commit>, &'static str> {
        Ok(Some(Commit::At(p(s))))
    }

    #[test]
    fn checkpoint_decision_table() {
        let d = Some(p("300"));
        let c = Some(p("100"));
        // (name, awaited, sequence, sub, delivered, checkpoint, want)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            Action,
            Option<&str>,
            Option<u64>,
            Option<Position>,
            Option<Position>,
            Result<Option<Commit>, &str>,
        )] = &[
            (
                "all delivered",
                ProcessRecords,
                None,
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
                None,
                c.clone(),
                Ok(None),
            ),
            (
                "already there",
                ProcessRecords,
                None,
                None,
                d.clone(),
                d.clone(),
                Ok(None),
            ),
            (
                "at a record",
                ProcessRecords,
                Some("200"),
                None,
                d.clone(),
                c.clone(),
                at("200"),
            ),
            (
                "at the last record",
                ProcessRecords,
                Some("300"),
                Some(0),
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "numeric order, not text",
                ProcessRecords,
                Some("99"),
                None,
                Some(p("100")),
                Some(p("5")),
                at("99"),
            ),
            (
                "same as checkpoint",
                ProcessRecords,
                Some("100"),
                None,
                d.clone(),
                c.clone(),
                Ok(None),
            ),
            (
                "before the checkpoint",
                ProcessRecords,
                Some("50"),
                None,
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "after the last delivered",
                ProcessRecords,
                Some("301"),
                None,
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "sub-sequence past the last",
                ProcessRecords,
                Some("300"),
                Some(1),
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "nothing delivered, explicit",
                ProcessRecords,
                Some("100"),
                None,
                None,
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "not a number",
                ProcessRecords,
                Some("12a"),
                None,
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "empty",
                ProcessRecords,
                Some(""),
                None,
                d.clone(),
                c.clone(),
                Err(ILLEGAL_ARGUMENT),
            ),
            (
                "shard end",
                ShardEnded,
                None,
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
                None,
                Ok(Some(Commit::ShardEnd)),
            ),
            (
                "at a record during shard end",
                ShardEnded,
                Some("300"),
                None,
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "on shutdown request",
                ShutdownRequested,
                None,
                None,
                d.clone(),
                c.clone(),
                at("300"),
            ),
            (
                "after lease lost",
                LeaseLost,
                None,
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
                None,
                c.clone(),
                Err(INVALID_STATE),
            ),
        ];
        for (name, awaited, seq, sub, delivered, checkpoint, want) in cases {
            assert_eq!(
                decide_checkpoint(
                    *awaited,
                    *seq,
                    *sub,
                    delivered.as_ref(),
                    checkpoint.as_ref()
                ),
                *want,
                "{name}"
            );
        }
    }

    /// A scripted conversation: (kcg sends | processor sends, expected step or error).
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
                    Send(a, last) => c.sent(a, last.map(p)).unwrap(),
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
        c.sent(ProcessRecords, Some(p("1"))).unwrap();
        assert_eq!(
            c.sent(LeaseLost, None),
            Err(ProtocolError::Overlap {
                next: LeaseLost,
                awaited: ProcessRecords
            })
        );
    }
}
