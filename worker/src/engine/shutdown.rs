//! Graceful shutdown: drain the readers, release every lease with its final checkpoint,
//! deregister.

use super::readers::final_update;
use super::*;

impl Engine {
    pub(super) async fn shutdown(mut self) {
        let tuning = self.config.tuning.clone();
        let started = Instant::now();
        let deadline = started + tuning.shutdown_timeout;
        // Leave a share of the bound for the writes after the drain.
        let write_reserve = (tuning.shutdown_timeout / 4).min(Duration::from_secs(5));
        let drain_deadline = deadline - write_reserve;
        self.abort_duties();
        info!(shards = self.owned.len(), "shutting down: draining readers");
        for o in self.owned.values() {
            o.stop.cancel();
        }
        // Wait for the in-flight batches; the heartbeat task keeps running so no lease
        // expires mid-drain.
        let mut ticker = tokio::time::interval(tuning.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.owned.values().any(|o| !o.join.is_finished()) && Instant::now() < drain_deadline
        {
            tokio::select! {
                _ = tokio::time::sleep_until(drain_deadline.into()) => {}
                _ = ticker.tick() => {
                    if self.book.ok() {
                        self.write_checkpoints().await;
                    }
                }
                Some(event) = self.beat_rx.recv() => self.on_beat(event).await,
                _ = self.done_rx.recv() => {}
            }
            self.publish_update();
        }
        for o in self.owned.values() {
            if !o.join.is_finished() {
                warn!("in-flight batch did not finish within the shutdown bound; abandoning it");
                o.kill.cancel();
            }
        }
        // Final checkpoints and releases, concurrently, bounded by what is left.
        let owned = std::mem::take(&mut self.owned);
        let mut releases = Vec::new();
        for (key, o) in owned {
            let outcome = o.join.await;
            let last = o.progress.borrow().clone();
            let cp = match outcome {
                Ok(Outcome::Finished(p)) => final_update(&p),
                // Only acknowledged progress is ever published, so it is safe to record
                // even for a reader cut off mid-batch.
                Ok(Outcome::Killed | Outcome::Failed(_)) | Err(_) => final_update(&last),
                Ok(Outcome::Fenced) => continue,
            };
            releases.push((key, (o.counter, cp)));
        }
        releases.extend(std::mem::take(&mut self.pending_release));
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        let store = self.store.clone();
        let (group, me) = (self.group().to_owned(), self.me().to_owned());
        let writes = releases.into_iter().map(|(key, (counter, cp))| {
            let store = store.clone();
            let metrics = self.metrics.clone();
            let (group, me) = (group.clone(), me.clone());
            async move {
                let res = io_bounded(
                    &metrics,
                    store.table(),
                    "release",
                    remaining,
                    store.release_lease(&group, &key.stream, &key.shard_id, &me, counter, &cp),
                )
                .await;
                (key, cp, res)
            }
        });
        for (key, cp, res) in join_all(writes).await {
            match res {
                Ok(_) => {
                    self.metrics.leases_released.inc();
                    self.metrics.checkpoints_written.inc();
                    info!(stream = %key.stream, shard = %key.shard_id, checkpoint = ?cp.position, ended = cp.ended, "released lease");
                }
                Err(e) => {
                    warn!(stream = %key.stream, shard = %key.shard_id, error = %e, "could not release lease at shutdown; it will expire")
                }
            }
        }
        // No heartbeat may be in flight when we deregister (it would find no row and
        // report us pruned).
        self.stop_heartbeat().await;
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        match io_bounded(
            &self.metrics,
            self.store.table(),
            "deregister",
            remaining,
            self.store.deregister(self.group(), self.me()),
        )
        .await
        {
            Ok(()) => info!(elapsed = ?started.elapsed(), "deregistered; shutdown complete"),
            Err(e) => warn!(error = %e, "could not deregister; the leader will prune us"),
        }
        self.health.deregistered();
        self.metrics.leases_held.set(0);
        self.metrics.is_leader.set(0);
    }
}
