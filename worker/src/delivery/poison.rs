//! Poison records: the retry / skip / dead-letter decisions for one batch, as a pure state
//! machine over plain data (table-tested below). The reader applies its [`Next`] steps.
//!
//! A batch is first handed over whole. Once it failed `maxAttempts` times (and `onFailure`
//! is not `Block`), its records are handed over one at a time from the first: a record the
//! handler accepts is done; a record that fails `maxAttempts` times alone is poison and is
//! skipped or dead-lettered, then the next record follows, again alone. So only the records
//! that fail on their own leave the normal path, and the handler still sees every other
//! record in order. With `Block` the whole batch is retried without end, as before.

use std::ops::Range;

use crate::config::OnFailure;

/// The part of the delivery config the decisions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Attempts before a batch is split, and before a single record is poison.
    pub max_attempts: u32,
    /// What happens to a poison record.
    pub on_failure: OnFailure,
}

/// How the batch is being handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// All records in one call.
    Whole,
    /// One record per call; the index is the record being handed over.
    OneByOne(usize),
}

/// Where delivery of one batch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchState {
    /// Records in the batch.
    pub len: usize,
    /// Whole batch, or which record alone.
    pub phase: Phase,
    /// Failed attempts of the current phase's records (reset for each new record).
    pub attempts: u32,
}

/// What happened to the last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handler accepted the records handed over.
    Accepted,
    /// The handler refused them.
    Refused,
    /// The poison record was skipped, or its dead-letter write succeeded.
    Resolved,
}

/// What the reader does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Hand these records (indices into the batch) to the handler now.
    Deliver(Range<usize>),
    /// Back off, then hand the same records over again.
    Retry(Range<usize>),
    /// Record `i` is poison: drop it (counted), then report [`Event::Resolved`].
    Skip(usize),
    /// Record `i` is poison: write it to the dead-letter target; report
    /// [`Event::Resolved`] once that write succeeded (until then the shard waits).
    DeadLetter(usize),
    /// Every record is accepted or resolved.
    Done,
}

impl BatchState {
    /// A batch of `len` records, and the first step.
    pub fn start(len: usize) -> (Self, Next) {
        let state = Self {
            len,
            phase: Phase::Whole,
            attempts: 0,
        };
        let next = if len == 0 {
            Next::Done
        } else {
            Next::Deliver(0..len)
        };
        (state, next)
    }

    /// The records the current phase hands over.
    pub fn range(&self) -> Range<usize> {
        match self.phase {
            Phase::Whole => 0..self.len,
            Phase::OneByOne(i) => i..i + 1,
        }
    }

    /// The transition for `event` under `policy`. Pure.
    pub fn step(self, event: Event, policy: Policy) -> (Self, Next) {
        match (event, self.phase) {
            (Event::Accepted, Phase::Whole) => (self, Next::Done),
            (Event::Accepted | Event::Resolved, Phase::OneByOne(i)) => self.advance(i + 1),
            // Only a split batch has a poison record to resolve; nothing else to do.
            (Event::Resolved, Phase::Whole) => (self, Next::Done),
            (Event::Refused, phase) => {
                let attempts = self.attempts.saturating_add(1);
                let failed = Self { attempts, ..self };
                if policy.on_failure == OnFailure::Block || attempts < policy.max_attempts {
                    return (failed, Next::Retry(failed.range()));
                }
                match phase {
                    // A single-record batch needs no split: that record is the poison.
                    Phase::Whole if self.len == 1 => failed.poison(0, policy),
                    Phase::Whole => Self {
                        phase: Phase::OneByOne(0),
                        attempts: 0,
                        ..self
                    }
                    .deliver_current(),
                    Phase::OneByOne(i) => failed.poison(i, policy),
                }
            }
        }
    }

    fn advance(self, next: usize) -> (Self, Next) {
        if next >= self.len {
            return (self, Next::Done);
        }
        Self {
            phase: Phase::OneByOne(next),
            attempts: 0,
            ..self
        }
        .deliver_current()
    }

    fn deliver_current(self) -> (Self, Next) {
        (self, Next::Deliver(self.range()))
    }

    fn poison(self, i: usize, policy: Policy) -> (Self, Next) {
        let state = Self {
            phase: Phase::OneByOne(i),
            ..self
        };
        let next = match policy.on_failure {
            OnFailure::Skip => Next::Skip(i),
            OnFailure::DeadLetter => Next::DeadLetter(i),
            // Unreachable through `step` (Block always retries); retrying is the safe reading.
            OnFailure::Block => Next::Retry(i..i + 1),
        };
        (state, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;
    use Next::*;

    fn policy(max_attempts: u32, on_failure: OnFailure) -> Policy {
        Policy {
            max_attempts,
            on_failure,
        }
    }

    /// Runs `events` from a fresh batch of `len` and returns every step taken.
    fn run(len: usize, p: Policy, events: &[Event]) -> Vec<Next> {
        let (mut state, first) = BatchState::start(len);
        let mut steps = vec![first];
        for e in events {
            let (s, next) = state.step(*e, p);
            state = s;
            steps.push(next);
        }
        steps
    }

    #[test]
    fn decision_table() {
        let dl = policy(2, OnFailure::DeadLetter);
        let skip = policy(2, OnFailure::Skip);
        let block = policy(2, OnFailure::Block);
        // (name, len, policy, events, steps taken)
        type Case = (&'static str, usize, Policy, Vec<Event>, Vec<Next>);
        let cases: Vec<Case> = vec![
            ("empty batch", 0, dl, vec![], vec![Done]),
            (
                "accepted at once",
                3,
                dl,
                vec![Accepted],
                vec![Deliver(0..3), Done],
            ),
            (
                "accepted on the retry",
                3,
                dl,
                vec![Refused, Accepted],
                vec![Deliver(0..3), Retry(0..3), Done],
            ),
            (
                "block retries without end, never splits",
                3,
                block,
                vec![Refused, Refused, Refused, Refused, Accepted],
                vec![
                    Deliver(0..3),
                    Retry(0..3),
                    Retry(0..3),
                    Retry(0..3),
                    Retry(0..3),
                    Done,
                ],
            ),
            (
                "exhausted batch splits; only the middle record is poison",
                3,
                dl,
                vec![
                    Refused, Refused, Accepted, Refused, Refused, Resolved, Accepted,
                ],
                vec![
                    Deliver(0..3),
                    Retry(0..3),
                    Deliver(0..1),
                    Deliver(1..2),
                    Retry(1..2),
                    DeadLetter(1),
                    Deliver(2..3),
                    Done,
                ],
            ),
            (
                "skip instead of dead letter",
                2,
                skip,
                vec![Refused, Refused, Refused, Refused, Resolved, Accepted],
                vec![
                    Deliver(0..2),
                    Retry(0..2),
                    Deliver(0..1),
                    Retry(0..1),
                    Skip(0),
                    Deliver(1..2),
                    Done,
                ],
            ),
            (
                "a single-record batch is poison without a split",
                1,
                skip,
                vec![Refused, Refused, Resolved],
                vec![Deliver(0..1), Retry(0..1), Skip(0), Done],
            ),
            (
                "last record poison ends the batch",
                2,
                dl,
                vec![Refused, Refused, Accepted, Refused, Refused, Resolved],
                vec![
                    Deliver(0..2),
                    Retry(0..2),
                    Deliver(0..1),
                    Deliver(1..2),
                    Retry(1..2),
                    DeadLetter(1),
                    Done,
                ],
            ),
            (
                "maxAttempts 1: no retry at all",
                2,
                policy(1, OnFailure::DeadLetter),
                vec![Refused, Refused, Resolved, Accepted],
                vec![
                    Deliver(0..2),
                    Deliver(0..1),
                    DeadLetter(0),
                    Deliver(1..2),
                    Done,
                ],
            ),
            (
                "a transient failure of one record alone is retried, not poison",
                2,
                policy(3, OnFailure::Skip),
                vec![
                    Refused, Refused, Refused, Refused, Refused, Accepted, Accepted,
                ],
                vec![
                    Deliver(0..2),
                    Retry(0..2),
                    Retry(0..2),
                    Deliver(0..1),
                    Retry(0..1),
                    Retry(0..1),
                    Deliver(1..2),
                    Done,
                ],
            ),
        ];
        for (name, len, p, events, want) in cases {
            assert_eq!(run(len, p, &events), want, "{name}");
        }
    }

    #[test]
    fn attempts_count_per_record() {
        let p = policy(3, OnFailure::DeadLetter);
        let (s, _) = BatchState::start(2);
        let (s, _) = s.step(Refused, p);
        assert_eq!(s.attempts, 1);
        let (s, _) = s.step(Refused, p);
        let (s, next) = s.step(Refused, p);
        assert_eq!(next, Deliver(0..1));
        assert_eq!(s.attempts, 0, "a record alone starts its own count");
        let (s, _) = s.step(Refused, p);
        let (s, _) = s.step(Refused, p);
        let (s, next) = s.step(Refused, p);
        assert_eq!(next, DeadLetter(0));
        assert_eq!(s.attempts, 3, "the envelope reports the record's attempts");
        let (s, next) = s.step(Resolved, p);
        assert_eq!((s.attempts, next), (0, Deliver(1..2)));
    }
}
