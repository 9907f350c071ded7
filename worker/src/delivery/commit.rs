//! Ordered commits: the checkpoint only advances through a contiguous prefix of committed
//! batches, however the handler interleaves its commits. Positions are
//! [`Position`]s (sequence, optional sub-sequence), so a handler may also checkpoint inside a
//! batch, down to one user record of a KPL aggregate.
//!
//! [`CommitQueue`] is the pure bookkeeping (table-tested); [`CommitTracker`] wraps it for one
//! shard with a lock and a watch channel the reader listens on; [`CommitToken`] is the handle
//! a manual-commit handler receives with each batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::position::Position;

/// Identifies one batch within one shard's tracker.
pub type BatchId = u64;

/// Pure bookkeeping of batches handed out and committed, in hand-out order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitQueue {
    /// End of the contiguous committed prefix (the checkpoint candidate).
    committed: Option<Position>,
    /// Batches handed out and not yet part of the prefix, in hand-out order.
    pending: VecDeque<Entry>,
    next_id: BatchId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    id: BatchId,
    /// Position of the batch's last record.
    last: Position,
    committed: bool,
    /// Records up to here are done though the batch is not committed yet
    /// ([`CommitToken::checkpoint`]); applies once every earlier batch is committed.
    partial: Option<Position>,
    /// Its token was dropped without commit: it will never be committed, so the reader
    /// must redeliver from the committed prefix (see [`CommitQueue::restart`]).
    abandoned: bool,
}

impl CommitQueue {
    /// A queue whose prefix starts at `checkpoint`.
    pub fn new(checkpoint: Option<Position>) -> Self {
        Self {
            committed: checkpoint,
            pending: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Registers the next batch (ending at `last`) and returns its id.
    pub fn begin(&mut self, last: Position) -> BatchId {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push_back(Entry {
            id,
            last,
            committed: false,
            partial: None,
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
        self.advance()
    }

    /// Marks the records of batch `id` up to `upto` done (the batch stays pending; at or
    /// past its last record it counts as committed). Returns true when the prefix advanced.
    pub fn commit_partial(&mut self, id: BatchId, upto: Position) -> bool {
        if let Some(entry) = self.pending.iter_mut().find(|e| e.id == id) {
            if upto >= entry.last {
                entry.committed = true;
                entry.abandoned = false;
            } else if entry.partial.as_ref().is_none_or(|p| *p < upto) {
                entry.partial = Some(upto);
            }
        }
        self.advance()
    }

    /// Moves the prefix through the committed batches at the front, then into the first
    /// uncommitted one as far as it was partially committed. Never moves backwards.
    fn advance(&mut self) -> bool {
        let before = self.committed.clone();
        while self.pending.front().is_some_and(|e| e.committed) {
            // A batch handed out again after a partial checkpoint inside it (the poison
            // path's one-at-a-time retries) may end before the prefix: keep the prefix.
            if let Some(e) = self.pending.pop_front()
                && self.committed.as_ref().is_none_or(|c| *c < e.last)
            {
                self.committed = Some(e.last);
            }
        }
        if let Some(p) = self.pending.front().and_then(|e| e.partial.clone())
            && self.committed.as_ref().is_none_or(|c| *c < p)
        {
            self.committed = Some(p);
        }
        self.committed != before
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

    /// Sets the committed prefix to `position`: for handlers that checkpoint positions of
    /// their own choosing instead of committing batches (KCL record processors). Ignored
    /// while batches are pending, which such handlers never leave.
    pub fn checkpoint_at(&mut self, position: Position) {
        if self.pending.is_empty() {
            self.committed = Some(position);
        }
    }

    /// Forgets every pending batch (their late commits are ignored: ids are never reused)
    /// and returns the committed prefix the reader redelivers after.
    pub fn restart(&mut self) -> Option<Position> {
        self.pending.clear();
        self.committed.clone()
    }

    /// End of the committed prefix.
    pub fn committed(&self) -> Option<&Position> {
        self.committed.as_ref()
    }

    /// Batches handed out but not yet in the committed prefix.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// What the reader sees of a tracker: the committed prefix and how many batches wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitState {
    /// End of the contiguous committed prefix.
    pub committed: Option<Position>,
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
    pub fn new(checkpoint: Option<Position>) -> Self {
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
            committed: q.committed().cloned(),
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

    /// Registers a batch whose last record is at `last`; the token commits it.
    pub fn begin(&self, last: Position) -> CommitToken {
        let id = self.update(|q| q.begin(last));
        CommitToken {
            tracker: self.clone(),
            id,
            settled: false,
        }
    }

    /// Moves the committed prefix to `position` (see [`CommitQueue::checkpoint_at`]).
    pub fn checkpoint_at(&self, position: Position) {
        self.update(|q| q.checkpoint_at(position));
    }

    /// Forgets every pending batch and returns the committed prefix to redeliver after
    /// (the reader's reaction to [`CommitState::abandoned`]).
    pub fn restart(&self) -> Option<Position> {
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

    /// Marks the batch's records up to `upto` (a record's [`Position`], e.g. from
    /// `Record::position`) processed without committing the whole batch: the checkpoint may
    /// move there once every earlier batch is committed. For a handler that finishes a
    /// batch piece by piece; commit (or drop) the token when the batch is done.
    pub fn checkpoint(&self, upto: Position) {
        let id = self.id;
        self.tracker.update(|q| q.commit_partial(id, upto));
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

    /// `"10"` is the whole record 10, `"10/2"` user record 2 of the aggregate at 10.
    fn p(s: &str) -> Position {
        Position::parse(s)
    }

    fn shown(c: Option<&Position>) -> Option<String> {
        c.map(Position::to_string)
    }

    /// Steps: `b<pos>` begins a batch ending at pos, `c<n>` commits the n-th begun batch,
    /// `a<n>` aborts it, `p<n>@<pos>` commits it partially up to pos, `k<pos>` checkpoints
    /// at pos without a batch; after each step the
    /// committed prefix is checked.
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
            // Partial commits move the prefix into the front batch only.
            (
                "partial",
                Some("5"),
                &[
                    ("b10/3", Some("5")),
                    ("b20", Some("5")),
                    ("p1@20/0", Some("5")), // batch 1 waits for batch 0
                    ("p0@10/1", Some("10/1")),
                    ("p0@10/0", Some("10/1")), // never backwards
                    ("c0", Some("20/0")),      // then batch 1's partial applies
                    ("p1@20", Some("20")),     // up to its last record: committed
                ],
            ),
            // Checkpointed inside a batch, refused, then handed out again one record at a
            // time: committing the first record keeps the prefix where it was.
            (
                "split after a partial checkpoint",
                None,
                &[
                    ("b5", None),
                    ("p0@3", Some("3")),
                    ("a0", Some("3")),
                    ("b1", Some("3")),
                    ("c1", Some("3")),
                    ("b4", Some("3")),
                    ("c2", Some("4")),
                ],
            ),
            // A processor's own checkpoints (no batches pending) set the prefix; with a
            // batch pending they are ignored.
            (
                "checkpoint at",
                Some("5"),
                &[
                    ("k20/1", Some("20/1")),
                    ("k30", Some("30")),
                    ("b40", Some("30")),
                    ("k40", Some("30")),
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
            let mut q = CommitQueue::new(start.map(p));
            let mut ids = Vec::new();
            for (step, want) in steps.iter() {
                let (op, arg) = step.split_at(1);
                match op {
                    "b" => ids.push(q.begin(p(arg))),
                    "p" => {
                        let (n, upto) = arg.split_once('@').unwrap();
                        q.commit_partial(ids[n.parse::<usize>().unwrap()], p(upto));
                    }
                    "c" => {
                        let n: usize = arg.parse().unwrap();
                        q.commit(ids.get(n).copied().unwrap_or(999));
                    }
                    "a" => q.abort(ids[arg.parse::<usize>().unwrap()]),
                    "k" => q.checkpoint_at(p(arg)),
                    _ => unreachable!(),
                }
                assert_eq!(
                    shown(q.committed()),
                    want.map(str::to_owned),
                    "{name}: after {step}"
                );
            }
        }
    }

    #[test]
    fn dropped_token_abandons_and_restart_redelivers_from_prefix() {
        let t = CommitTracker::new(Some(p("5")));
        let a = t.begin(p("10"));
        let b = t.begin(p("20"));
        let c = t.begin(p("30"));
        a.commit();
        drop(b); // never committed
        let st = t.state();
        assert!(
            st.abandoned,
            "a dropped token must not pin the queue silently"
        );
        assert_eq!(st.committed, Some(p("10")));
        assert_eq!(t.restart(), Some(p("10")), "redeliver after the prefix");
        assert_eq!(
            t.state(),
            CommitState {
                committed: Some(p("10")),
                pending: 0,
                abandoned: false,
            }
        );
        // A late commit of a forgotten batch changes nothing (no skip past "20").
        c.commit();
        assert_eq!(t.state().committed, Some(p("10")));
        // Committed and aborted tokens do not abandon on drop.
        let d = t.begin(p("20"));
        d.commit();
        let e = t.begin(p("30"));
        e.abort();
        assert_eq!(t.state().committed, Some(p("20")));
        assert!(!t.state().abandoned);
        // Refusing a batch: the token is dropped, then the batch withdrawn: not abandoned.
        let f = t.begin(p("30"));
        let id = f.id();
        drop(f);
        assert!(t.state().abandoned);
        t.abort(id);
        assert!(!t.state().abandoned);
        assert_eq!(t.state().pending, 0);
        // A partial checkpoint through the token moves the prefix into the batch.
        let g = t.begin(p("40/9"));
        g.checkpoint(p("40/4"));
        assert_eq!(t.state().committed, Some(p("40/4")));
        assert_eq!(t.state().pending, 1);
        g.commit();
        assert_eq!(t.state().committed, Some(p("40/9")));
    }

    #[tokio::test]
    async fn tracker_publishes_changes() {
        let t = CommitTracker::new(None);
        let mut rx = t.subscribe();
        let a = t.begin(p("1"));
        let b = t.begin(p("2"));
        assert_eq!(t.state().pending, 2);
        b.commit();
        assert_eq!(t.state().committed, None);
        rx.borrow_and_update();
        a.commit();
        rx.changed().await.unwrap();
        assert_eq!(
            *rx.borrow(),
            CommitState {
                committed: Some(p("2")),
                pending: 0,
                abandoned: false,
            }
        );
    }
}
