//! The leader's duties: pruning dead clients, refreshing shard caches, deleting the leases
//! of trimmed shards and creating lease rows for consumable shards.

use super::*;

impl Engine {
    /// The leader's duties of one tick: pruning when we lead the group (`group_leader`),
    /// the rest for the streams we lead. `read`: the lease rows in `snap` were read this
    /// tick (creating missing leases waits for such a tick, so it never acts on an old
    /// view). Writes of one duty run concurrently, bounded.
    pub(super) async fn lead(
        &mut self,
        snap: &mut GroupSnapshot,
        group_leader: bool,
        read: bool,
        now: Instant,
    ) {
        if group_leader {
            self.prune_dead_clients(snap, now).await;
        }

        let mut newly_ended = false;
        for l in snap.leases.iter().filter(|l| l.ended) {
            newly_ended |= self
                .known_ended
                .insert(ShardKey::new(&l.stream, &l.shard_id));
        }
        let missing_cache = self
            .led_streams
            .iter()
            .any(|s| !snap.shard_caches.iter().any(|c| &c.stream == s));
        if self.refresh_caches
            || newly_ended
            || missing_cache
            || self.ticks.is_multiple_of(REFRESH_EVERY_TICKS)
        {
            self.refresh_shard_caches(snap).await;
        }
        prune_known_ended(&mut self.known_ended, snap);
        self.replace_older_leases(snap).await;
        if read {
            self.create_missing_leases(snap).await;
        }
    }

    /// Prunes clients whose heartbeat stood still for the timeout, conditional on the
    /// counter we watched, so a client that just came back is kept.
    async fn prune_dead_clients(&mut self, snap: &GroupSnapshot, now: Instant) {
        let this = &*self;
        let dead = snap
            .clients
            .iter()
            .filter(|c| c.client_id != this.me() && !this.clients.is_alive(&c.client_id, now));
        let writes = dead.map(|c| async move {
            let res = this
                .io(
                    "prune",
                    this.store
                        .prune_client(this.group(), &c.client_id, c.heartbeat),
                )
                .await;
            (c, res)
        });
        for (c, res) in bounded(writes.collect()).await {
            match res {
                Ok(()) => info!(dead = %c.client_id, pod = %c.pod, "pruned dead client"),
                Err(StoreError::Conflict { .. }) => {
                    debug!(client = %c.client_id, "client came back; not pruned")
                }
                Err(e) => self.note_store("prune", &e),
            }
        }
    }

    pub(super) async fn refresh_shard_caches(&mut self, snap: &mut GroupSnapshot) {
        let mut all_ok = true;
        for i in 0..self.streams.len() {
            let Some(client) = self.streams[i].client.clone() else {
                all_ok = false;
                continue;
            };
            let name = self.streams[i].config.name.clone();
            if !self.led_streams.contains(&name) {
                continue;
            }
            // Bounded like the store calls: the next heartbeat comes after this in the same
            // loop and must never wait behind a hung Kinesis.
            let shards = match list_shards_bounded(&client, self.op_timeout()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(stream = %name, error = %e, "ListShards failed");
                    self.note(e.reason(), e.to_string());
                    all_ok = false;
                    continue;
                }
            };
            let trimmed = trimmed_leases(&name, &shards, &snap.leases);
            let existing = snap.shard_caches.iter().position(|c| c.stream == name);
            if existing.is_some_and(|i| snap.shard_caches[i].shards == shards) {
                // Unchanged: save the write.
                self.delete_trimmed_leases(&name, &trimmed, snap).await;
                continue;
            }
            let row = ShardCacheRow {
                pk: self.group().to_owned(),
                sk: shards_sk(&name),
                stream: name.clone(),
                shards,
                refreshed_at_ms: now_ms(),
                refreshed_by: self.me().to_owned(),
            };
            match self
                .io("put_shard_cache", self.store.put_shard_cache(&row))
                .await
            {
                Ok(()) => {
                    info!(stream = %name, shards = row.shards.len(), "shard cache updated");
                    match existing {
                        Some(i) => snap.shard_caches[i] = row,
                        None => snap.shard_caches.push(row),
                    }
                    // Tell the group: new shards may be consumable now.
                    self.leases_changed();
                    // Only now that no cache lists them: a trimmed shard whose row is gone
                    // counts as ended only while it is missing from the cache too.
                    self.delete_trimmed_leases(&name, &trimmed, snap).await;
                }
                Err(e) => {
                    self.note_store("put_shard_cache", &e);
                    all_ok = false;
                }
            }
        }
        self.refresh_caches = !all_ok;
    }

    /// Deletes the lease rows of `stream`'s trimmed shards (see [`trimmed_leases`]), once
    /// the cache that no longer lists them is written, and forgets them in `snap` so the
    /// next refresh does not delete them again before the lease rows are re-read.
    async fn delete_trimmed_leases(
        &mut self,
        stream: &str,
        trimmed: &[String],
        snap: &mut GroupSnapshot,
    ) {
        let this = &*self;
        let writes = trimmed.iter().map(|shard_id| async move {
            let res = this
                .io(
                    "delete_lease",
                    this.store.delete_lease(this.group(), stream, shard_id),
                )
                .await;
            (shard_id, res)
        });
        let mut gone = BTreeSet::new();
        for (shard_id, res) in bounded(writes.collect()).await {
            match res {
                Ok(()) => {
                    debug!(stream = %stream, shard = %shard_id, "deleted lease of a trimmed shard");
                    gone.insert(shard_id.clone());
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => self.note_store("delete_lease", &e),
            }
        }
        snap.leases
            .retain(|l| l.stream != stream || !gone.contains(&l.shard_id));
    }

    /// Creates an unowned lease row for every consumable shard lacking one, so the status
    /// shows unassigned shards. (Claiming creates missing rows too; this is for visibility.)
    pub(super) async fn create_missing_leases(&mut self, snap: &GroupSnapshot) {
        let names: Vec<String> = self.led_streams.iter().cloned().collect();
        let missing: Vec<(String, String)> = assignment::streams_from_snapshot(&names, snap)
            .into_iter()
            .flat_map(|s| {
                let stream = s.stream;
                s.consumable
                    .into_iter()
                    .map(move |shard| (stream.clone(), shard))
            })
            .filter(|(stream, shard)| {
                !snap
                    .leases
                    .iter()
                    .any(|l| &l.stream == stream && &l.shard_id == shard)
            })
            .collect();
        let this = &*self;
        let writes = missing.iter().map(|(stream, shard)| {
            let start = incarnation::listed_start(snap, &ShardKey::new(stream, shard));
            this.io(
                "create_lease",
                this.store
                    .create_lease_at(this.group(), stream, shard, start),
            )
        });
        for res in bounded(writes.collect()).await {
            if let Err(e) = res {
                self.note_store("create_lease", &e);
            }
        }
    }
}

/// Lease rows of `stream` that can go: the shard is no longer listed (trimmed after the
/// retention period), it was read to its end, and nobody owns it. A parent missing from
/// the cache counts as ended for its children, so deleting such a row changes no decision;
/// rows of shards that did not end are kept, in case a listing was incomplete.
pub(super) fn trimmed_leases(
    stream: &str,
    listed: &[ShardInfo],
    leases: &[LeaseRow],
) -> Vec<String> {
    leases
        .iter()
        .filter(|l| l.stream == stream && l.ended && l.owner.is_none())
        .filter(|l| !listed.iter().any(|s| s.shard_id == l.shard_id))
        .map(|l| l.shard_id.clone())
        .collect()
}

/// ListShards, bounded by `limit`; a timeout counts as Kinesis being unavailable.
pub(super) async fn list_shards_bounded(
    client: &StreamClient,
    limit: Duration,
) -> Result<Vec<ShardInfo>, KinesisError> {
    match tokio::time::timeout(limit, client.list_shards()).await {
        Ok(res) => res,
        Err(_) => Err(KinesisError::Call {
            kind: ErrorKind::Unavailable,
            operation: "ListShards",
            stream: client.name.clone(),
            message: format!("no answer within {limit:?}"),
        }),
    }
}

/// Keeps `known_ended` bounded: only shards still in a shard cache, or whose ended lease
/// row is still there (dropping those would make them "newly ended" again next tick).
pub(super) fn prune_known_ended(known: &mut BTreeSet<ShardKey>, snap: &GroupSnapshot) {
    let mut keep: BTreeSet<ShardKey> = BTreeSet::new();
    for c in &snap.shard_caches {
        for s in &c.shards {
            keep.insert(ShardKey::new(&c.stream, &s.shard_id));
        }
    }
    for l in snap.leases.iter().filter(|l| l.ended) {
        keep.insert(ShardKey::new(&l.stream, &l.shard_id));
    }
    known.retain(|k| keep.contains(k));
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{black_hole, ms, sdk_config};
    use super::*;

    #[test]
    fn trimmed_leases_table() {
        let lease = |stream: &str, shard: &str, owner: Option<&str>, ended: bool| LeaseRow {
            owner: owner.map(str::to_owned),
            lease_counter: 1,
            ended,
            ..LeaseRow::unowned("ns/g", stream, shard, 0)
        };
        let listed = vec![ShardInfo {
            starting_sequence: None,
            shard_id: "s-1".into(),
            parent: Some("s-0".into()),
            adjacent_parent: None,
            closed: false,
        }];
        let leases = vec![
            lease("a", "s-0", None, true),      // trimmed, ended, free: delete
            lease("a", "s-1", None, false),     // still listed: keep
            lease("a", "s-2", None, false),     // not listed but never ended: keep
            lease("a", "s-3", Some("c"), true), // owned: keep
            lease("b", "s-0", None, true),      // another stream: keep
        ];
        assert_eq!(
            trimmed_leases("a", &listed, &leases),
            vec!["s-0".to_owned()]
        );
    }

    #[test]
    fn prune_known_ended_table() {
        let info = |id: &str| ShardInfo {
            starting_sequence: None,
            shard_id: id.into(),
            parent: None,
            adjacent_parent: None,
            closed: true,
        };
        let lease = |shard: &str, ended: bool| LeaseRow {
            lease_counter: 1,
            ended,
            ..LeaseRow::unowned("ns/g", "a", shard, 0)
        };
        let snap = GroupSnapshot {
            shard_caches: vec![ShardCacheRow {
                pk: "ns/g".into(),
                sk: shards_sk("a"),
                stream: "a".into(),
                shards: vec![info("s-1")],
                refreshed_at_ms: 0,
                refreshed_by: "c".into(),
            }],
            leases: vec![lease("s-2", true), lease("s-3", false)],
            ..GroupSnapshot::default()
        };
        let mut known: BTreeSet<ShardKey> = ["s-1", "s-2", "s-3", "s-4"]
            .iter()
            .map(|s| ShardKey::new("a", *s))
            .chain([ShardKey::new("b", "s-1")])
            .collect();
        prune_known_ended(&mut known, &snap);
        // s-1: still cached; s-2: its ended row is still there; s-3 (row not ended), s-4
        // (gone) and another stream's shard absent from every cache: dropped.
        let want: BTreeSet<ShardKey> = [ShardKey::new("a", "s-1"), ShardKey::new("a", "s-2")]
            .into_iter()
            .collect();
        assert_eq!(known, want);
    }

    #[tokio::test]
    async fn list_shards_is_bounded() {
        let (url, hole) = black_hole().await;
        let base = sdk_config(&url).await;
        let stream: StreamConfig = serde_yaml::from_str("name: s").unwrap();
        let client = StreamClient::connect(&stream, &base).await.unwrap();
        let started = Instant::now();
        let res = list_shards_bounded(&client, ms(300)).await;
        assert!(started.elapsed() < ms(3000), "{:?}", started.elapsed());
        assert_eq!(res.unwrap_err().kind(), ErrorKind::Unavailable);
        hole.abort();
    }
}
