//! Reader supervision: carrying out the handoff actions (claim, resume, release, abandon),
//! spawning one reader per owned shard, reaping finished ones and writing their releases.

use super::start::{parent_read_to_end, start_config};
use super::supervise::supervise;
use super::*;

impl Engine {
    /// Carries out one tick's actions. The lease writes of claims and resumes run
    /// concurrently (bounded): each may take up to the op timeout with a slow store, and
    /// one after the other they would stretch the tick by that much per shard.
    /// While the store is overloaded, [`pacing`](super::pacing) limits how many of them one
    /// tick sends, our own leases (resumes) first.
    pub(super) async fn act_all(&mut self, actions: Vec<Action>, snap: &GroupSnapshot) {
        let mut wanted = Vec::new();
        for action in actions {
            match action {
                Action::Claim { key, from } => wanted.push((key, Some(from))),
                Action::Resume(key) => wanted.push((key, None)),
                other => self.act(other, snap).await,
            }
        }
        wanted.sort_by_key(|(_, claim)| claim.is_some());
        let mut writes = Vec::new();
        for (key, claim) in wanted {
            if self.pending_release.contains_key(&key) {
                continue;
            }
            let Some(idx) = self.stream_index(&key.stream) else {
                continue;
            };
            let Some(client) = self.streams[idx].client.clone() else {
                continue;
            };
            let start = incarnation::listed_start(snap, &key).map(str::to_owned);
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            let (group, me) = (self.group().to_owned(), self.me().to_owned());
            let op_timeout = self.op_timeout();
            writes.push(async move {
                let res = match &claim {
                    Some(from) => {
                        let stamp = ClaimStamp {
                            shard_start: start.as_deref(),
                            first_claim_at_ms: first_claim_time(&client),
                        };
                        io_bounded(
                            &metrics,
                            store.table(),
                            "claim",
                            op_timeout,
                            store.claim_lease_detailed(
                                &group,
                                &key.stream,
                                &key.shard_id,
                                &me,
                                from.as_ref().map(|(o, c)| (o.as_str(), *c)),
                                stamp,
                            ),
                        )
                        .await
                    }
                    None => {
                        io_bounded(
                            &metrics,
                            store.table(),
                            "resume",
                            op_timeout,
                            store.resume_lease(&group, &key.stream, &key.shard_id, &me),
                        )
                        .await
                    }
                };
                (key, idx, claim, start, res)
            });
        }
        // Futures do nothing until polled: those past the limit are dropped unsent.
        let limit = self.write_pacing.limit();
        if writes.len() > limit {
            debug!(
                wanted = writes.len(),
                limit, "state store overloaded; pacing claims and resumes"
            );
            writes.truncate(limit);
            self.read_leases = true;
        }
        let results = bounded(writes).await;
        let unanswered = results
            .iter()
            .filter(|r| matches!(r.4, Err(StoreError::Unavailable { .. })))
            .count();
        self.write_pacing.record(results.len(), unanswered);
        if !results.is_empty() {
            // Won or lost, the lease rows changed: read them again next tick.
            self.read_leases = true;
        }
        for (key, idx, claim, start, res) in results {
            if res.is_ok() {
                self.leases_changed();
            }
            let unseen = match &res {
                Err(StoreError::Unavailable { .. }) => Some(reads::Unseen::NoAnswer),
                Err(StoreError::Conflict { .. }) => Some(reads::Unseen::Refused),
                _ => None,
            };
            if let Some(outcome) = unseen {
                // The row may name us, now or once the write lands. Read it with our range
                // meanwhile, even if the plan moves it away, or a live owner would hold a
                // shard it does not read until the safety net.
                let window = self.config.tuning.client_timeout;
                let until = reads::watch_until(outcome, Instant::now(), window);
                self.unanswered_claims.insert(key.clone(), until);
            }
            if let (Ok(claimed), Some(start)) = (&res, &start)
                && incarnation::is_older(&claimed.row, Some(start))
            {
                // A row of a deleted stream's shard, not stamped (an older worker's) but with
                // that stream's checkpoint: never read from it; make it fresh, and claim it
                // again next tick.
                self.replace_claimed_older(&key, claimed.row.lease_counter, start)
                    .await;
                continue;
            }
            match (claim, res) {
                (Some(from), Ok(claimed)) => {
                    let row = &claimed.row;
                    self.metrics.leases_acquired.inc();
                    match &from {
                        Some((old, _)) => {
                            info!(stream = %key.stream, shard = %key.shard_id, from = %old, checkpoint = ?row.checkpoint_position(), "took over expired lease")
                        }
                        None => {
                            info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?row.checkpoint_position(), "claimed lease")
                        }
                    }
                    let fresh = no_checkpoint_start(
                        self.streams[idx].config.start_position,
                        parent_read_to_end(snap, &key),
                        claimed.first_claim,
                        claimed.first_claimed_at_ms,
                        claimed.reset_to,
                    );
                    self.spawn_reader(key, idx, &claimed.row, fresh);
                }
                (None, Ok(claimed)) => {
                    info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?claimed.row.checkpoint_position(), "resuming owned shard");
                    let fresh = no_checkpoint_start(
                        self.streams[idx].config.start_position,
                        parent_read_to_end(snap, &key),
                        false,
                        claimed.first_claimed_at_ms,
                        claimed.reset_to,
                    );
                    self.spawn_reader(key, idx, &claimed.row, fresh);
                }
                (claim, Err(StoreError::Conflict { .. })) => {
                    self.metrics.lease_conflicts.inc();
                    if claim.is_some() {
                        debug!(stream = %key.stream, shard = %key.shard_id, "lost claim race");
                    }
                }
                (Some(_), Err(e)) => self.note_store("claim", &e),
                (None, Err(e)) => self.note_store("resume", &e),
            }
        }
    }

    pub(super) async fn act(&mut self, action: Action, snap: &GroupSnapshot) {
        match action {
            // Claims and resumes go through `act_all`, concurrently.
            Action::Claim { .. } | Action::Resume(_) => {}
            // Our heartbeat keeps every lease we read alive.
            Action::Renew(_) => {}
            Action::Release(key) => {
                if let Some(o) = self.owned.get_mut(&key) {
                    match o.stopping {
                        None => {
                            info!(stream = %key.stream, shard = %key.shard_id, "shard leaves our range; draining");
                            o.stopping = Some(Instant::now());
                            o.stop.cancel();
                        }
                        // A batch the handler keeps failing must not pin the shard here
                        // forever: after the shutdown bound, cut it off and hand over what
                        // was acknowledged (the next owner redelivers the rest).
                        Some(since) if since.elapsed() > self.config.tuning.shutdown_timeout => {
                            warn!(stream = %key.stream, shard = %key.shard_id, "in-flight batch did not finish within the shutdown bound; handing the shard over");
                            o.kill.cancel();
                        }
                        Some(_) => {}
                    }
                } else if !self.pending_release.contains_key(&key) {
                    // Owned but not read (e.g. ended before a restart of its reader): the
                    // counter of the row as read.
                    let counter = snap
                        .leases
                        .iter()
                        .find(|l| l.stream == key.stream && l.shard_id == key.shard_id)
                        .map(|l| l.lease_counter);
                    if let Some(counter) = counter {
                        self.release(key, counter, CheckpointUpdate::default())
                            .await;
                    }
                }
            }
            Action::Abandon(key) => {
                warn!(stream = %key.stream, shard = %key.shard_id, "lease taken over; abandoning shard");
                self.abandon(&key).await;
            }
            Action::Wait(key) => {
                debug!(stream = %key.stream, shard = %key.shard_id, "waiting for the owner to release");
            }
        }
    }

    pub(super) fn stream_index(&self, name: &str) -> Option<usize> {
        self.streams.iter().position(|s| s.config.name == name)
    }

    pub(super) fn spawn_reader(
        &mut self,
        key: ShardKey,
        stream_index: usize,
        row: &LeaseRow,
        fresh: FreshStart,
    ) {
        self.generations += 1;
        let Some(client) = self.streams[stream_index].client.clone() else {
            return;
        };
        let tuning = &self.config.tuning;
        let initial = ShardProgress {
            acked: row.checkpoint_position(),
            ..ShardProgress::default()
        };
        let (progress_tx, progress_rx) = watch::channel(initial);
        // Never later than our other readers' (see `FenceBook::fence`). (Always there:
        // ticks run after registering.)
        let Some((deadline, fence)) = self.book.fence(self.generations, self.fencing_margin())
        else {
            return;
        };
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let task = ShardTask {
            client,
            stream: start_config(&self.streams[stream_index].config, row, fresh),
            shard_id: key.shard_id.clone(),
            checkpoint: row.checkpoint_position(),
            failure: self.failure.clone(),
            fence: fence.clone(),
            lease_counter: row.lease_counter,
        };
        let span = info_span!("shard", group = %self.config.group, client = %self.identity.client_id, stream = %key.stream, shard = %key.shard_id);
        let reader = reader::read_shard(
            task,
            tuning.clone(),
            self.handler.clone(),
            self.metrics.clone(),
            progress_tx,
            stop.clone(),
        );
        let join = tokio::spawn(
            supervise(
                tokio::spawn(reader.instrument(span.clone())),
                fence,
                kill.clone(),
                self.done_tx.clone(),
                (key.clone(), self.generations),
            )
            .instrument(span),
        );
        self.owned.insert(
            key,
            Owned {
                generation: self.generations,
                stop,
                kill,
                progress: progress_rx,
                deadline,
                join,
                counter: row.lease_counter,
                stopping: None,
                written: CheckpointUpdate {
                    position: row.checkpoint_position(),
                    ended: false,
                    millis_behind: row.millis_behind,
                    lag_at_ms: row.lag_at_ms,
                },
                last_checkpoint: Instant::now(),
            },
        );
        self.metrics.leases_held.set(self.owned.len() as i64);
    }

    /// Stops a reader at once (we no longer own its lease) and writes nothing.
    pub(super) async fn abandon(&mut self, key: &ShardKey) {
        if let Some(o) = self.owned.remove(key) {
            o.kill.cancel();
            let _ = o.join.await;
        }
        self.leases_changed();
        self.metrics.leases_held.set(self.owned.len() as i64);
    }

    /// A supervisor finished: write the final checkpoint and release (or, when fenced or
    /// killed, write nothing). Returns whether the shard ended.
    pub(super) async fn reap(&mut self, key: &ShardKey, generation: u64) -> bool {
        if self
            .owned
            .get(key)
            .is_none_or(|o| o.generation != generation)
        {
            return false; // an earlier, abandoned reader of this shard
        }
        let Some(o) = self.owned.remove(key) else {
            return false;
        };
        let outcome = match o.join.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        self.metrics.leases_held.set(self.owned.len() as i64);
        let last = o.progress.borrow().clone();
        match outcome {
            Outcome::Finished(p) => {
                let ended = p.ended;
                if ended {
                    info!(stream = %key.stream, shard = %key.shard_id, "shard read to its end");
                    self.refresh_caches = true;
                }
                self.release(key.clone(), o.counter, final_update(&p)).await;
                ended
            }
            Outcome::Failed(msg) => {
                error!(stream = %key.stream, shard = %key.shard_id, error = %msg, "reader failed; releasing to retry");
                self.note("ReaderFailed", msg);
                self.release(key.clone(), o.counter, final_update(&last))
                    .await;
                false
            }
            Outcome::Fenced => {
                warn!(stream = %key.stream, shard = %key.shard_id, "heartbeats failed for too long; reader stopped so another client may take over");
                self.note(
                    "LeaseRenewalFailed",
                    format!(
                        "could not confirm our heartbeat in time, which keeps the lease of {key}; stopped reading it"
                    ),
                );
                // It may be ours still (resumed under a new counter) or taken: look.
                self.read_leases = true;
                false
            }
            // Killed while draining for a release: hand over what was acknowledged.
            Outcome::Killed if o.stopping.is_some() => {
                self.release(key.clone(), o.counter, final_update(&last))
                    .await;
                false
            }
            Outcome::Killed => false,
        }
    }

    /// Releases a lease we hold under `counter`, with its final checkpoint; kept for retry
    /// when the store is unavailable.
    pub(super) async fn release(&mut self, key: ShardKey, counter: u64, cp: CheckpointUpdate) {
        let res = self
            .io(
                "release",
                self.store.release_lease(
                    self.group(),
                    &key.stream,
                    &key.shard_id,
                    self.me(),
                    counter,
                    &cp,
                ),
            )
            .await;
        match res {
            Ok(_) => {
                if cp.ended {
                    // Its children may be consumable now: every member plans anew.
                    self.shards_changed();
                } else {
                    self.leases_changed();
                }
                self.metrics.leases_released.inc();
                if cp.position.is_some() || cp.ended {
                    self.metrics.checkpoints_written.inc();
                }
                info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?cp.position, ended = cp.ended, "released lease");
            }
            Err(StoreError::Conflict { .. }) => {
                self.metrics.lease_conflicts.inc();
                self.read_leases = true;
                debug!(stream = %key.stream, shard = %key.shard_id, "lease was no longer ours at release");
            }
            Err(e) => {
                self.note_store("release", &e);
                self.pending_release.insert(key, (counter, cp));
            }
        }
    }

    pub(super) async fn retry_pending_releases(&mut self) {
        let pending = std::mem::take(&mut self.pending_release);
        for (key, (counter, cp)) in pending {
            self.release(key, counter, cp).await;
        }
    }
}

/// The time a claim records if it is the shard's first: now on Kinesis' clock, which a
/// later owner of a LATEST shard compares with arrival timestamps (see
/// [`crate::kinesis_clock`]). Known from the stream's first answer, which connecting asks
/// for; our own clock only while Kinesis has not answered yet. Never waits: a claim must
/// not take longer than its store call.
fn first_claim_time(client: &StreamClient) -> i64 {
    client.kinesis_now_ms().unwrap_or_else(|| {
        debug!(stream = %client.name, "Kinesis' clock not known yet; the first-claim time is ours");
        now_ms()
    })
}

/// The release write for a reader's last progress: the acknowledged position, the end flag
/// and the lag.
pub(super) fn final_update(p: &ShardProgress) -> CheckpointUpdate {
    CheckpointUpdate {
        position: p.acked.clone(),
        ended: p.ended,
        millis_behind: p.millis_behind,
        lag_at_ms: p.lag_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{black_hole, sdk_config};
    use super::*;

    /// Claims against a store that never answers take one op timeout in all, not one per
    /// claim: the next heartbeat must not fall behind the fencing margin.
    #[tokio::test]
    async fn claims_of_one_tick_run_concurrently() {
        let (url, hole) = black_hole().await;
        let base = sdk_config(&url).await;
        let config: WorkerConfig = serde_yaml::from_str(
            "group: ns/g\nstreams:\n- name: s\nstateStore:\n  table: t\ndelivery:\n  stdout: {}\ntuning:\n  heartbeatInterval: 500ms\n",
        )
        .expect("config");
        let store = StateStore::new(aws_sdk_dynamodb::Client::new(&base), "t");
        struct Nop;
        impl BatchHandler for Nop {
            fn handle<'a>(
                &'a self,
                _b: &'a [crate::delivery::Record],
            ) -> futures::future::BoxFuture<'a, Result<(), crate::delivery::HandlerError>>
            {
                Box::pin(async { Ok(()) })
            }
        }
        let mut engine = Engine::new(
            config,
            Identity::new(Some("c1".into()), Some("pod".into())),
            store,
            base.clone(),
            Arc::new(Nop),
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(30))),
        );
        engine.connect_streams().await;
        assert!(engine.streams[0].client.is_some());
        let timeout = engine.op_timeout();
        let actions: Vec<Action> = (0..4)
            .map(|i| Action::Claim {
                key: ShardKey::new("s", format!("shardId-00000000000{i}")),
                from: None,
            })
            .chain([Action::Resume(ShardKey::new("s", "shardId-000000000009"))])
            .collect();
        let started = Instant::now();
        engine.act_all(actions, &GroupSnapshot::default()).await;
        let took = started.elapsed();
        assert!(
            took < timeout * 2,
            "5 claims/resumes took {took:?} with an op timeout of {timeout:?}"
        );
        assert!(engine.owned.is_empty());
        assert_eq!(
            engine.tick_issue.as_ref().map(|i| i.reason.as_str()),
            Some("StateStoreUnavailable")
        );
        hole.abort();
    }
}
