//! Ordered commits: the checkpoint only advances through a contiguous prefix of committed
//! batches, however the handler interleaves its commits.
//!
//! [`CommitQueue`] is the pure bookkeeping (table-tested); [`CommitTracker`] wraps it for one
//! shard with a lock and a watch channel the reader listens on; [`CommitToken`] is the handle
//! a manual-commit handler receives with each batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Identifies one batch within one shard's tracker.
pub type BatchId = u64;

/// Pure bookkeeping of batches handed out and committed, in hand-out order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitQueue {
    /// Last sequence of the contiguous committed prefix (the checkpoint candidate).
    committed: Option<String>,
    /// Batches handed out and not yet part of the prefix: (id, last sequence, committed).
    pending: VecDeque<(BatchId, String, bool)>,
    next_id: BatchId,
}

impl CommitQueue {
    /// A queue whose prefix starts at `checkpoint`.
    pub fn new(checkpoint: Option<String>) -> Self {
        Self {
            committed: checkpoint,
            pending: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Registers the next batch (ending at `last_sequence`) and returns its id.
    pub fn begin(&mut self, last_sequence: &str) -> BatchId {
        let id = self.next_id;
        self.next_id += 1;
        self.pending
            .push_back((id, last_sequence.to_owned(), false));
        id
    }

    /// Marks `id` committed; returns true when the prefix advanced.
    pub fn commit(&mut self, id: BatchId) -> bool {
        if let Some(entry) = self.pending.iter_mut().find(|e| e.0 == id) {
            entry.2 = true;
        }
        let mut advanced = false;
        while self.pending.front().is_some_and(|e| e.2) {
            if let Some((_, seq, _)) = self.pending.pop_front() {
                self.committed = Some(seq);
                advanced = true;
            }
        }
        advanced
    }

    /// Forgets `id` if it is still pending and the most recent batch: the handler refused it,
    /// and the reader will hand the same records out again under a new id.
    pub fn abort(&mut self, id: BatchId) {
        if self.pending.back().is_some_and(|e| e.0 == id && !e.2) {
            self.pending.pop_back();
        }
    }

    /// Last sequence of the committed prefix.
    pub fn committed(&self) -> Option<&str> {
        self.committed.as_deref()
    }

    /// Batches handed out but not yet in the committed prefix.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// What the reader sees of a tracker: the committed prefix and how many batches wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitState {
    /// Last sequence of the contiguous committed prefix.
    pub committed: Option<String>,
    /// Batches handed out and not yet in that prefix.
    pub pending: usize,
}

/// One shard's commit bookkeeping, shared by the reader and the tokens it hands out.
#[derive(Clone, Debug)]
pub struct CommitTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug)]
struct TrackerInner {
    queue: Mutex<CommitQueue>,
    state: watch::Sender<CommitState>,
}

impl CommitTracker {
    /// A tracker whose committed prefix starts at `checkpoint`.
    pub fn new(checkpoint: Option<String>) -> Self {
        let (state, _) = watch::channel(CommitState {
            committed: checkpoint.clone(),
            pending: 0,
        });
        Self {
            inner: Arc::new(TrackerInner {
                queue: Mutex::new(CommitQueue::new(checkpoint)),
                state,
            }),
        }
    }

    fn update<R>(&self, f: impl FnOnce(&mut CommitQueue) -> R) -> R {
        // A poisoned lock only means a panic elsewhere; the queue is still consistent
        // because every mutation is a single step.
        let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut q);
        let next = CommitState {
            committed: q.committed().map(str::to_owned),
            pending: q.pending(),
        };
        self.inner.state.send_if_modified(|s| {
            if *s != next {
                *s = next;
                true
            } else {
                false
            }
        });
        r
    }

    /// Registers a batch ending at `last_sequence`; the token commits it.
    pub fn begin(&self, last_sequence: &str) -> CommitToken {
        let id = self.update(|q| q.begin(last_sequence));
        CommitToken {
            tracker: self.clone(),
            id,
        }
    }

    /// Withdraws batch `id` if it is still the newest pending one (the handler refused it).
    pub fn abort(&self, id: BatchId) {
        self.update(|q| q.abort(id));
    }

    /// The current committed prefix and pending count.
    pub fn state(&self) -> CommitState {
        self.inner.state.borrow().clone()
    }

    /// A receiver that wakes on every change of [`CommitTracker::state`].
    pub fn subscribe(&self) -> watch::Receiver<CommitState> {
        self.inner.state.subscribe()
    }
}

/// The right to commit one batch. Commit it once the batch is durably processed; the
/// checkpoint moves past it only after every earlier batch of the shard is committed too.
/// Dropping a token without committing leaves the batch (and everything after it)
/// uncheckpointed: after a restart or handoff it is delivered again.
#[derive(Debug)]
#[must_use = "an uncommitted batch holds back the shard's checkpoint"]
pub struct CommitToken {
    tracker: CommitTracker,
    id: BatchId,
}

impl CommitToken {
    /// Marks the batch processed.
    pub fn commit(self) {
        let id = self.id;
        self.tracker.update(|q| q.commit(id));
    }

    /// Withdraws the batch (the handler refused it and it will be handed out again).
    pub fn abort(self) {
        let id = self.id;
        self.tracker.update(|q| q.abort(id));
    }

    /// This batch's id within its shard (monotonic).
    pub fn id(&self) -> BatchId {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps: `b<seq>` begins a batch ending at seq, `c<n>` commits the n-th begun batch,
    /// `a<n>` aborts it; after each step the committed prefix is checked.
    /// (step, committed prefix after it).
    type Steps = &'static [(&'static str, Option<&'static str>)];

    #[test]
    fn prefix_table() {
        let cases: &[(&str, Option<&str>, Steps)] = &[
            // In-order commits advance one by one.
            (
                "in order",
                None,
                &[
                    ("b10", None),
                    ("c0", Some("10")),
                    ("b20", Some("10")),
                    ("c1", Some("20")),
                ],
            ),
            // Batch 3 before batch 2: stays at batch 1 until 2 commits, then jumps to 3.
            (
                "out of order",
                Some("5"),
                &[
                    ("b10", Some("5")),
                    ("b20", Some("5")),
                    ("b30", Some("5")),
                    ("c0", Some("10")),
                    ("c2", Some("10")),
                    ("c1", Some("30")),
                ],
            ),
            // An aborted batch disappears; the re-delivery gets a new id.
            (
                "abort",
                None,
                &[
                    ("b10", None),
                    ("a0", None),
                    ("b10", None),
                    ("c1", Some("10")),
                ],
            ),
            // Committing twice or an unknown id changes nothing.
            (
                "idempotent",
                None,
                &[
                    ("b10", None),
                    ("c0", Some("10")),
                    ("c0", Some("10")),
                    ("c9", Some("10")),
                ],
            ),
            // Abort only withdraws the newest, still pending batch.
            (
                "abort older ignored",
                None,
                &[
                    ("b10", None),
                    ("b20", None),
                    ("a0", None),
                    ("c0", Some("10")),
                ],
            ),
        ];
        for (name, start, steps) in cases {
            let mut q = CommitQueue::new(start.map(str::to_owned));
            let mut ids = Vec::new();
            for (step, want) in steps.iter() {
                let (op, arg) = step.split_at(1);
                match op {
                    "b" => ids.push(q.begin(arg)),
                    "c" => {
                        let n: usize = arg.parse().unwrap();
                        q.commit(ids.get(n).copied().unwrap_or(999));
                    }
                    "a" => q.abort(ids[arg.parse::<usize>().unwrap()]),
                    _ => unreachable!(),
                }
                assert_eq!(q.committed(), *want, "{name}: after {step}");
            }
        }
    }

    #[tokio::test]
    async fn tracker_publishes_changes() {
        let t = CommitTracker::new(None);
        let mut rx = t.subscribe();
        let a = t.begin("1");
        let b = t.begin("2");
        assert_eq!(t.state().pending, 2);
        b.commit();
        assert_eq!(t.state().committed, None);
        rx.borrow_and_update();
        a.commit();
        rx.changed().await.unwrap();
        assert_eq!(
            *rx.borrow(),
            CommitState {
                committed: Some("2".into()),
                pending: 0
            }
        );
    }
}
