//! The per-tick writes of a member: a checkpoint for every lease whose position moved (its
//! heartbeat, which keeps all its leases alive, runs on its own schedule: [`super::heartbeat`]).

use super::*;

impl Engine {
    /// Writes a checkpoint for every reader whose acknowledged position moved and whose
    /// last checkpoint is at least `checkpointInterval` old, concurrently (bounded). Each
    /// write is conditional on the lease counter we hold.
    pub(super) async fn write_checkpoints(&mut self) {
        let now = Instant::now();
        let fence_now = BootInstant::now();
        let interval = self.config.tuning.checkpoint_interval;
        let mut due = Vec::new();
        for (key, o) in &self.owned {
            // Past its fencing deadline the shard may be someone else's: the write would be
            // refused by the counter anyway once it was taken, so do not send it.
            if o.join.is_finished() || o.deadline.expired(fence_now) {
                continue;
            }
            let p = o.progress.borrow().clone();
            if !checkpoint_due(
                p.acked.as_ref(),
                o.written.position.as_ref(),
                now.duration_since(o.last_checkpoint),
                interval,
            ) {
                continue;
            }
            let update = CheckpointUpdate {
                position: p.acked.clone(),
                ended: false,
                millis_behind: p.millis_behind,
                lag_at_ms: p.lag_at_ms,
            };
            due.push((key.clone(), o.counter, update));
        }
        if due.is_empty() {
            return;
        }
        let this = &*self;
        let (group, me) = (this.group(), this.me());
        let writes = due.into_iter().map(|(key, counter, update)| async move {
            let sent = Instant::now();
            let res = this
                .io(
                    "checkpoint",
                    this.store
                        .checkpoint(group, &key.stream, &key.shard_id, me, counter, &update),
                )
                .await;
            (key, sent, update, res)
        });
        for (key, sent, cp, res) in bounded(writes.collect()).await {
            match res {
                Ok(()) => {
                    self.metrics.checkpoints_written.inc();
                    let Some(o) = self.owned.get_mut(&key) else {
                        continue;
                    };
                    o.written = cp;
                    o.last_checkpoint = sent;
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone took it over (our heartbeats must have failed for too long):
                    // stop at once and write nothing.
                    warn!(stream = %key.stream, shard = %key.shard_id, "lease lost; abandoning shard");
                    self.metrics.lease_conflicts.inc();
                    self.abandon(&key).await;
                }
                Err(e) => self.note_store("checkpoint", &e),
            }
        }
    }
}

/// A checkpoint is due when the acknowledged position moved since the last write and that
/// write is at least `interval` old. An unmoved position (an idle shard) is never written
/// again; the final position is written by the release.
fn checkpoint_due(
    acked: Option<&Position>,
    written: Option<&Position>,
    since_written: Duration,
    interval: Duration,
) -> bool {
    acked.is_some() && acked != written && since_written >= interval
}

#[cfg(test)]
mod tests {
    use super::super::test_support::ms;
    use super::*;

    #[test]
    fn checkpoint_due_table() {
        let i = ms(1000);
        let cases = [
            ("nothing acknowledged yet", None, None, ms(5000), false),
            (
                "idle: position unmoved",
                Some("7"),
                Some("7"),
                ms(5000),
                false,
            ),
            (
                "moved, interval passed",
                Some("8"),
                Some("7"),
                ms(1000),
                true,
            ),
            (
                "moved, interval not passed",
                Some("8"),
                Some("7"),
                ms(999),
                false,
            ),
            (
                "first position of a fresh shard",
                Some("1"),
                None,
                ms(1000),
                true,
            ),
        ];
        for (name, acked, written, since, want) in cases {
            let (acked, written) = (acked.map(Position::parse), written.map(Position::parse));
            assert_eq!(
                checkpoint_due(acked.as_ref(), written.as_ref(), since, i),
                want,
                "{name}"
            );
        }
    }
}
