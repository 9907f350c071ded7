//! Replacing the lease rows of a deleted stream's shards, once the stream was recreated
//! under its name (see [`crate::incarnation`]): the leader rewrites each such row as a fresh,
//! unowned one for the shard now listed, so the group reads the new stream from its start
//! position and never from the deleted stream's checkpoints or ends.

use super::*;

impl Engine {
    /// Replaces every lease row in `snap` that belongs to an older incarnation of one of our
    /// streams, conditional on the counter read (concurrently, bounded), and updates `snap`
    /// to match.
    pub(super) async fn replace_older_leases(&mut self, snap: &mut GroupSnapshot) {
        let older: Vec<(ShardKey, u64, String)> = incarnation::older_leases(snap)
            .into_iter()
            .filter(|(l, _)| self.led_streams.contains(&l.stream))
            .map(|(l, start)| {
                let key = ShardKey::new(&l.stream, &l.shard_id);
                (key, l.lease_counter, start.to_owned())
            })
            .collect();
        if older.is_empty() {
            return;
        }
        let this = &*self;
        let writes = older.iter().map(|(key, counter, start)| async move {
            let res = this
                .io(
                    "replace_lease",
                    this.store.replace_lease(
                        this.group(),
                        &key.stream,
                        &key.shard_id,
                        *counter,
                        start,
                    ),
                )
                .await;
            (key, counter, start, res)
        });
        let mut replaced = Vec::new();
        for (key, counter, start, res) in bounded(writes.collect()).await {
            match res {
                Ok(()) => {
                    info!(stream = %key.stream, shard = %key.shard_id, "replaced the lease row of a deleted stream's shard (stream recreated under its name)");
                    replaced.push((key, counter + 1, start));
                }
                // Its owner or someone else moved it: look again.
                Err(StoreError::Conflict { .. }) => self.read_all_leases = true,
                Err(e) => self.note_store("replace_lease", &e),
            }
        }
        if replaced.is_empty() {
            return;
        }
        for (key, counter, start) in replaced {
            if let Some(l) = snap
                .leases
                .iter_mut()
                .find(|l| l.stream == key.stream && l.shard_id == key.shard_id)
            {
                *l = fresh_row(self.group(), key, counter, start);
            }
        }
        self.shards_changed();
    }
}

impl Engine {
    /// Replaces a row we just claimed or resumed under `counter` that turned out to be of
    /// an older incarnation (see [`Engine::replace_older_leases`]).
    pub(super) async fn replace_claimed_older(
        &mut self,
        key: &ShardKey,
        counter: u64,
        start: &str,
    ) {
        let res = self
            .io(
                "replace_lease",
                self.store
                    .replace_lease(self.group(), &key.stream, &key.shard_id, counter, start),
            )
            .await;
        match res {
            Ok(()) => {
                info!(stream = %key.stream, shard = %key.shard_id, "claimed the lease row of a deleted stream's shard; replaced it");
                self.shards_changed();
            }
            Err(StoreError::Conflict { .. }) => self.read_leases = true,
            Err(e) => self.note_store("replace_lease", &e),
        }
    }
}

/// The row [`StateStore::replace_lease`] leaves: unowned, no checkpoint, stamped for the
/// shard now listed.
fn fresh_row(group: &str, key: &ShardKey, counter: u64, start: &str) -> LeaseRow {
    LeaseRow {
        lease_counter: counter,
        shard_start: Some(start.to_owned()),
        ..LeaseRow::unowned(group, &key.stream, &key.shard_id, now_ms())
    }
}
