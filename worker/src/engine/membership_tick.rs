//! The per-tick writes of a member: its heartbeat, and renewing (or checkpointing) every
//! lease it reads.

use super::*;

impl Engine {
    /// Writes our heartbeat (registering again if the leader pruned us); false when the
    /// store could not be reached or refused it.
    pub(super) async fn heartbeat(&mut self) -> bool {
        let reader_issue = self
            .owned
            .values()
            .find_map(|o| o.progress.borrow().issue.clone());
        let issue = reader_issue.or_else(|| self.last_issue.clone());
        let update = HeartbeatUpdate {
            owned_shards: self.owned.len() as u32,
            last_error: issue.map(|i| (i.reason, i.message)),
        };
        let res = self
            .io(
                "heartbeat",
                self.store.heartbeat(self.group(), self.me(), &update),
            )
            .await;
        match res {
            Ok(_) => {
                self.metrics.heartbeats.inc();
                self.health.heartbeat_ok();
                true
            }
            Err(StoreError::Conflict { .. }) => {
                // The leader pruned us (it saw our heartbeat stand still): come back.
                warn!("our client row was pruned; registering again");
                let res = self
                    .io(
                        "register",
                        self.store
                            .register(self.group(), self.me(), &self.identity.pod),
                    )
                    .await;
                match res {
                    Ok(_) => {
                        self.health.heartbeat_ok();
                        true
                    }
                    Err(e) => {
                        self.note_store("register", &e);
                        false
                    }
                }
            }
            Err(e) => {
                self.note_store("heartbeat", &e);
                false
            }
        }
    }

    /// Renews every lease we read (a due checkpoint is the renewal), concurrently, and
    /// extends each reader's deadline from the time its successful request was sent.
    pub(super) async fn renew_and_checkpoint(&mut self) {
        let now = Instant::now();
        let interval = self.config.tuning.checkpoint_interval;
        let margin = self
            .config
            .tuning
            .client_timeout
            .saturating_sub(self.config.tuning.heartbeat_interval);
        let mut writes = Vec::new();
        for (key, o) in &self.owned {
            if o.join.is_finished() {
                continue;
            }
            let p = o.progress.borrow().clone();
            let update = CheckpointUpdate {
                sequence: p
                    .acked
                    .clone()
                    .filter(|a| Some(a) != o.written.sequence.as_ref()),
                ended: false,
                millis_behind: p.millis_behind,
                lag_at_ms: p.lag_at_ms,
            };
            let changed =
                update.sequence.is_some() || update.millis_behind != o.written.millis_behind;
            let checkpoint = changed && now.duration_since(o.last_checkpoint) >= interval;
            let store = self.store.clone();
            let (group, me) = (self.group().to_owned(), self.me().to_owned());
            let key = key.clone();
            let op_timeout = self.op_timeout();
            let metrics = self.metrics.clone();
            writes.push(async move {
                let sent = Instant::now();
                let res = if checkpoint {
                    io_bounded(
                        &metrics,
                        store.table(),
                        "checkpoint",
                        op_timeout,
                        store.checkpoint(&group, &key.stream, &key.shard_id, &me, &update),
                    )
                    .await
                } else {
                    io_bounded(
                        &metrics,
                        store.table(),
                        "renew",
                        op_timeout,
                        store.renew_lease(&group, &key.stream, &key.shard_id, &me),
                    )
                    .await
                };
                (key, sent, checkpoint.then_some(update), res)
            });
        }
        for (key, sent, checkpoint, res) in join_all(writes).await {
            match res {
                Ok(_) => {
                    let Some(o) = self.owned.get_mut(&key) else {
                        continue;
                    };
                    let _ = o.deadline.send(sent + margin);
                    if let Some(cp) = checkpoint {
                        self.metrics.checkpoints_written.inc();
                        if cp.sequence.is_some() {
                            o.written.sequence = cp.sequence;
                        }
                        o.written.millis_behind = cp.millis_behind;
                        o.written.lag_at_ms = cp.lag_at_ms;
                        o.last_checkpoint = sent;
                    }
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone took it over (our renewals must have failed for too long):
                    // stop at once and write nothing.
                    warn!(stream = %key.stream, shard = %key.shard_id, "lease lost; abandoning shard");
                    self.metrics.lease_conflicts.inc();
                    self.abandon(&key).await;
                }
                Err(e) => self.note_store("lease renewal", &e),
            }
        }
    }
}
