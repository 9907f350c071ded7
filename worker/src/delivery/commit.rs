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
    /// Batches handed out and not yet part of the prefix, in hand-out order.
    pending: VecDeque<Entry>,
    next_id: BatchId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    id: BatchId,
    last_sequence: String,
    committed: bool,
    /// Its token was dropped without commit: it will never be committed, so the reader
    /// must redeliver from the committed prefix (see [`CommitQueue::restart`]).
    abandoned: bool,
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
        self.pending.push_back(Entry {
            id,
            last_sequence: last_sequence.to_owned(),
            committed: false,
            abandoned: false,
        });
        id
    }

    /// Marks `id` committed; returns true when the prefix advanced.
    pub fn commit(&mut self, id: BatchId) -> bool {
        if let Some(entry) = self.pending.iter_mut().find(|e| e.id == id) {
            entry.committed = true;
            entry.abandoned = false;
        }
        let mut advanced = false;
        while self.pending.front().is_some_and(|e| e.committed) {
            if let Some(e) = self.pending.pop_front() {
                self.committed = Some(e.last_sequence);
                advanced = true;
            }
        }
        advanced
    }

    /// Forgets `id` if it is still pending and the most recent batch: the handler refused it,
    /// and the reader will hand the same records out again under a new id.
    pub fn abort(&mut self, id: BatchId) {
        // The refused batch's token was typically dropped first, which marked it
        // abandoned; a withdrawn batch is simply handed out again.
        if self
            .pending
            .back()
            .is_some_and(|e| e.id == id && !e.committed)
        {
            self.pending.pop_back();
        }
    }

    /// Marks `id` abandoned (its token was dropped without commit) if it is still pending:
    /// nothing after the committed prefix can be checkpointed any more, and the reader must
    /// redeliver from there. A batch refused with `Err` is withdrawn by [`Self::abort`]
    /// instead, which also clears this mark.
    pub fn abandon(&mut self, id: BatchId) {
        if let Some(e) = self.pending.iter_mut().find(|e| e.id == id && !e.committed) {
            e.abandoned = true;
        }
    }

    /// Whether a pending batch was abandoned.
    pub fn abandoned(&self) -> bool {
        self.pending.iter().any(|e| e.abandoned)
    }

    /// Sets the committed prefix to `sequence`: for handlers that checkpoint positions of
    /// their own choosing instead of committing batches (KCL record processors). Ignored
    /// while batches are pending, which such handlers never leave.
    pub fn checkpoint_at(&mut self, sequence: &str) {
        if self.pending.is_empty() {
            self.committed = Some(sequence.to_owned());
        }
    }

    /// Forgets every pending batch (their late commits are ignored: ids are never reused)
    /// and returns the committed prefix the reader redelivers after.
    pub fn restart(&mut self) -> Option<String> {
        self.pending.clear();
        self.committed.clone()
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
    /// A commit token was dropped without commit: the reader must redeliver from
    /// `committed` (otherwise the shard would wait forever).
    pub abandoned: bool,
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
            abandoned: false,
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
            abandoned: q.abandoned(),
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
            settled: false,
        }
    }

    /// Moves the committed prefix to `sequence` (see [`CommitQueue::checkpoint_at`]).
    pub fn checkpoint_at(&self, sequence: &str) {
        self.update(|q| q.checkpoint_at(sequence));
    }

    /// Forgets every pending batch and returns the committed prefix to redeliver after
    /// (the reader's reaction to [`CommitState::abandoned`]).
    pub fn restart(&self) -> Option<String> {
        self.update(|q| q.restart())
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
/// Dropping a token without committing abandons the batch: the reader reports it
/// (`HandlerFailing`) and delivers again everything after the last committed batch, so
/// nothing is skipped and the shard never waits forever.
#[derive(Debug)]
#[must_use = "an uncommitted batch holds back the shard's checkpoint"]
pub struct CommitToken {
    tracker: CommitTracker,
    id: BatchId,
    /// Committed or aborted: nothing to do on drop.
    settled: bool,
}

impl CommitToken {
    /// Marks the batch processed.
    pub fn commit(mut self) {
        self.settled = true;
        let id = self.id;
        self.tracker.update(|q| q.commit(id));
    }

    /// Withdraws the batch (the handler refused it and it will be handed out again).
    pub fn abort(mut self) {
        self.settled = true;
        let id = self.id;
        self.tracker.update(|q| q.abort(id));
    }

    /// This batch's id within its shard (monotonic).
    pub fn id(&self) -> BatchId {
        self.id
    }
}

impl Drop for CommitToken {
    fn drop(&mut self) {
        if !self.settled {
            let id = self.id;
            self.tracker.update(|q| q.abandon(id));
        }
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

    #[test]
    fn dropped_token_abandons_and_restart_redelivers_from_prefix() {
        let t = CommitTracker::new(Some("5".into()));
        let a = t.begin("10");
        let b = t.begin("20");
        let c = t.begin("30");
        a.commit();
        drop(b); // never committed
        let st = t.state();
        assert!(
            st.abandoned,
            "a dropped token must not pin the queue silently"
        );
        assert_eq!(st.committed.as_deref(), Some("10"));
        assert_eq!(
            t.restart().as_deref(),
            Some("10"),
            "redeliver after the prefix"
        );
        assert_eq!(
            t.state(),
            CommitState {
                committed: Some("10".into()),
                pending: 0,
                abandoned: false,
            }
        );
        // A late commit of a forgotten batch changes nothing (no skip past "20").
        c.commit();
        assert_eq!(t.state().committed.as_deref(), Some("10"));
        // Committed and aborted tokens do not abandon on drop.
        let d = t.begin("20");
        d.commit();
        let e = t.begin("30");
        e.abort();
        assert_eq!(t.state().committed.as_deref(), Some("20"));
        assert!(!t.state().abandoned);
        // Refusing a batch: the token is dropped, then the batch withdrawn: not abandoned.
        let f = t.begin("30");
        let id = f.id();
        drop(f);
        assert!(t.state().abandoned);
        t.abort(id);
        assert!(!t.state().abandoned);
        assert_eq!(t.state().pending, 0);
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
                pending: 0,
                abandoned: false,
            }
        );
    }
}
