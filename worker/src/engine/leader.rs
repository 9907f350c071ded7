//! The leader's duties: pruning dead clients, refreshing shard caches (ListShards, deleting
//! the leases of trimmed shards, writing the cache) and creating lease rows for consumable
//! shards.
//!
//! They run as one background task at a time, never inside the tick: the tick's heartbeat
//! keeps the leader's own leases alive, and at thousands of shards (or with a slow store)
//! the duties can take longer than the fencing margin. The tick decides what a run does
//! ([`Engine::lead`]), the run works on its own copy of the group view, and a later tick
//! applies what it did ([`Engine::collect_duties`]). Each duty of a run does at most
//! [`DUTY_WRITES_PER_RUN`] writes; the rest is left to the next run, so a run acts on a view
//! at most a few rounds of writes old. A run that outlives our leadership is harmless:
//! every write it makes is conditional or idempotent (see `docs/state-store.md`).

use super::*;
use crate::store::schema::ClientRow;

/// Writes one duty (pruning, deleting trimmed leases, creating leases) makes per run: a few
/// rounds of [`WRITES_IN_FLIGHT`].
const DUTY_WRITES_PER_RUN: usize = 8 * WRITES_IN_FLIGHT;

/// What one run of the duties is asked to do, decided by the tick.
struct DutyJob {
    /// The group as the tick saw it (the run's own copy).
    snap: GroupSnapshot,
    /// Clients whose heartbeat stood still for the timeout.
    dead: Vec<ClientRow>,
    /// Refresh the shard caches of these streams (all configured ones, or none).
    refresh: Vec<(String, Option<Arc<StreamClient>>)>,
    /// Create missing lease rows (only when `snap`'s lease rows were read this tick).
    create: bool,
}

/// What a run did, applied by the next tick.
#[derive(Default)]
pub(super) struct DutyReport {
    /// Shard-cache rows written.
    caches: Vec<ShardCacheRow>,
    /// Lease rows deleted (trimmed shards).
    deleted: Vec<ShardKey>,
    /// A refresh was asked for and did not complete (Kinesis or the store failed, or the
    /// budget left trimmed leases): ask again.
    refresh_again: bool,
    /// The budget left lease rows to create: re-read the leases so the next run sees them.
    more_to_create: bool,
    /// Problems met, for the client row and the error counter.
    issues: Vec<Issue>,
}

/// The store access a run needs, owned so it can run as its own task.
struct DutyCtx {
    store: StateStore,
    metrics: Arc<Metrics>,
    group: String,
    me: String,
    op_timeout: Duration,
    report: DutyReport,
}

impl Engine {
    /// The leader's part of a tick: starts a run of the duties unless one is running:
    /// pruning when we lead the group (`group_leader`), the rest for the streams we lead.
    /// `read`: the lease rows in `snap` were read this tick (creating missing leases waits
    /// for such a tick, so it never acts on an old view).
    pub(super) fn lead(
        &mut self,
        snap: &GroupSnapshot,
        group_leader: bool,
        read: bool,
        now: Instant,
    ) {
        for l in snap.leases.iter().filter(|l| l.ended) {
            // A newly ended shard: its children may be listed now.
            self.refresh_caches |= self
                .known_ended
                .insert(ShardKey::new(&l.stream, &l.shard_id));
        }
        prune_known_ended(&mut self.known_ended, snap);
        if self.duties.as_ref().is_some_and(|d| !d.is_finished()) {
            return; // still busy; its results and what is due now come at a later tick
        }
        let missing_cache = self
            .led_streams
            .iter()
            .any(|s| !snap.shard_caches.iter().any(|c| &c.stream == s));
        let refresh =
            self.refresh_caches || missing_cache || self.ticks.is_multiple_of(REFRESH_EVERY_TICKS);
        // Cleared now, set again by the report if the refresh does not complete (and by a
        // shard ending meanwhile).
        self.refresh_caches = false;
        let job = DutyJob {
            snap: snap.clone(),
            dead: snap
                .clients
                .iter()
                .filter(|c| group_leader && c.client_id != self.me())
                .filter(|c| !self.clients.is_alive(&c.client_id, now))
                .cloned()
                .collect(),
            refresh: if refresh {
                self.streams
                    .iter()
                    .filter(|s| self.led_streams.contains(&s.config.name))
                    .map(|s| (s.config.name.clone(), s.client.clone()))
                    .collect()
            } else {
                Vec::new()
            },
            create: read,
        };
        let ctx = DutyCtx {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            group: self.group().to_owned(),
            me: self.me().to_owned(),
            op_timeout: self.op_timeout(),
            report: DutyReport::default(),
        };
        let names: Vec<String> = self.led_streams.iter().cloned().collect();
        let duration = self.metrics.leader_duties_duration.clone();
        self.duties = Some(tokio::spawn(
            async move {
                let started = Instant::now();
                let report = ctx.run(job, &names).await;
                duration.observe(started.elapsed().as_secs_f64());
                report
            }
            .instrument(info_span!("leader_duties")),
        ));
    }

    /// Applies the report of a finished run (if any) to `snap` and to our state. Never waits.
    pub(super) async fn collect_duties(&mut self, snap: &mut GroupSnapshot) {
        if !self.duties.as_ref().is_some_and(|d| d.is_finished()) {
            return;
        }
        let Some(run) = self.duties.take() else {
            return;
        };
        let report = match run.await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "leader duties failed");
                self.refresh_caches = true;
                return;
            }
        };
        for issue in report.issues {
            self.note(&issue.reason, issue.message);
        }
        self.refresh_caches |= report.refresh_again;
        if report.more_to_create {
            // The next batch is chosen from every row, as read.
            self.read_all_leases = true;
        }
        if !report.deleted.is_empty() {
            let deleted: BTreeSet<ShardKey> = report.deleted.into_iter().collect();
            snap.leases
                .retain(|l| !deleted.contains(&ShardKey::new(&l.stream, &l.shard_id)));
        }
        if !report.caches.is_empty() {
            for row in report.caches {
                match snap
                    .shard_caches
                    .iter_mut()
                    .find(|c| c.stream == row.stream)
                {
                    Some(c) => *c = row,
                    None => snap.shard_caches.push(row),
                }
            }
            // Tell the group: new shards may be consumable now.
            self.shards_changed();
        }
    }

    /// Stops a run still going (shutdown).
    pub(super) fn abort_duties(&mut self) {
        if let Some(run) = self.duties.take() {
            run.abort();
        }
    }
}

impl DutyCtx {
    async fn run(mut self, mut job: DutyJob, names: &[String]) -> DutyReport {
        self.prune_dead_clients(job.dead).await;
        for (name, client) in std::mem::take(&mut job.refresh) {
            self.refresh_shard_cache(&name, client.as_deref(), &mut job.snap)
                .await;
        }
        if job.create {
            self.create_missing_leases(&job.snap, names).await;
        }
        self.report
    }

    async fn io<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        io_bounded(&self.metrics, self.store.table(), op, self.op_timeout, fut).await
    }

    fn note_store(&mut self, what: &str, e: &StoreError) {
        warn!(error = %e, "{what} failed");
        self.report.issues.push(Issue {
            reason: e.reason().to_owned(),
            message: e.to_string(),
        });
    }

    /// Prunes clients whose heartbeat stood still for the timeout, conditional on the
    /// counter we watched, so a client that just came back is kept.
    async fn prune_dead_clients(&mut self, mut dead: Vec<ClientRow>) {
        dead.truncate(DUTY_WRITES_PER_RUN);
        let this = &*self;
        let writes = dead.iter().map(|c| async move {
            let res = this
                .io(
                    "prune",
                    this.store
                        .prune_client(&this.group, &c.client_id, c.heartbeat),
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

    /// Lists `name`'s shards, deletes the leases of trimmed ones and writes the cache if it
    /// changed (into `snap` too, for the lease creation after it).
    async fn refresh_shard_cache(
        &mut self,
        name: &str,
        client: Option<&StreamClient>,
        snap: &mut GroupSnapshot,
    ) {
        let Some(client) = client else {
            self.report.refresh_again = true;
            return;
        };
        let shards = match list_shards_bounded(client, self.op_timeout).await {
            Ok(s) => s,
            Err(e) => {
                warn!(stream = %name, error = %e, "ListShards failed");
                self.report.issues.push(Issue {
                    reason: e.reason().to_owned(),
                    message: e.to_string(),
                });
                self.report.refresh_again = true;
                return;
            }
        };
        let trimmed = trimmed_leases(name, &shards, &snap.leases);
        let existing = snap.shard_caches.iter().position(|c| c.stream == name);
        if existing.is_some_and(|i| snap.shard_caches[i].shards == shards) {
            // Unchanged: save the write.
            self.delete_trimmed_leases(name, trimmed, snap).await;
            return;
        }
        let row = ShardCacheRow {
            pk: self.group.clone(),
            sk: shards_sk(name),
            stream: name.to_owned(),
            shards,
            refreshed_at_ms: now_ms(),
            refreshed_by: self.me.clone(),
        };
        match self
            .io("put_shard_cache", self.store.put_shard_cache(&row))
            .await
        {
            Ok(()) => {
                info!(stream = %name, shards = row.shards.len(), "shard cache updated");
                match existing {
                    Some(i) => snap.shard_caches[i] = row.clone(),
                    None => snap.shard_caches.push(row.clone()),
                }
                self.report.caches.push(row);
                // Only now that no cache lists them: a trimmed shard whose row is gone
                // counts as ended only while it is missing from the cache too.
                self.delete_trimmed_leases(name, trimmed, snap).await;
            }
            Err(e) => {
                self.note_store("put_shard_cache", &e);
                self.report.refresh_again = true;
            }
        }
    }

    /// Deletes the lease rows of `stream`'s trimmed shards (see [`trimmed_leases`]), once
    /// the cache that no longer lists them is written, and forgets them in `snap`.
    async fn delete_trimmed_leases(
        &mut self,
        stream: &str,
        mut trimmed: Vec<String>,
        snap: &mut GroupSnapshot,
    ) {
        if trimmed.len() > DUTY_WRITES_PER_RUN {
            trimmed.truncate(DUTY_WRITES_PER_RUN);
            self.report.refresh_again = true;
        }
        let this = &*self;
        let writes = trimmed.iter().map(|shard_id| async move {
            let res = this
                .io(
                    "delete_lease",
                    this.store.delete_lease(&this.group, stream, shard_id),
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
        self.report
            .deleted
            .extend(gone.into_iter().map(|s| ShardKey::new(stream, &s)));
    }

    /// Creates an unowned lease row for every consumable shard lacking one, so the status
    /// shows unassigned shards. (Claiming creates missing rows too; this is for visibility.)
    async fn create_missing_leases(&mut self, snap: &GroupSnapshot, names: &[String]) {
        let mut missing = missing_leases(names, snap);
        if missing.len() > DUTY_WRITES_PER_RUN {
            missing.truncate(DUTY_WRITES_PER_RUN);
            self.report.more_to_create = true;
        }
        let this = &*self;
        let writes = missing.iter().map(|k| {
            let start = incarnation::listed_start(snap, k);
            this.io(
                "create_lease",
                this.store
                    .create_lease_at(&this.group, &k.stream, &k.shard_id, start),
            )
        });
        for res in bounded(writes.collect()).await {
            if let Err(e) = res {
                self.note_store("create_lease", &e);
            }
        }
    }
}

/// Consumable shards of the configured streams (`names`) that have no lease row.
fn missing_leases(names: &[String], snap: &GroupSnapshot) -> Vec<ShardKey> {
    let have: BTreeSet<ShardKey> = snap
        .leases
        .iter()
        .map(|l| ShardKey::new(&l.stream, &l.shard_id))
        .collect();
    assignment::streams_from_snapshot(names, snap)
        .into_iter()
        .flat_map(|s| {
            let stream = s.stream;
            s.consumable
                .into_iter()
                .map(move |shard| ShardKey::new(&stream, &shard))
        })
        .filter(|k| !have.contains(k))
        .collect()
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
            shard_id: "s-1".into(),
            parent: Some("s-0".into()),
            adjacent_parent: None,
            closed: false,
            starting_sequence: None,
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
            shard_id: id.into(),
            parent: None,
            adjacent_parent: None,
            closed: true,
            starting_sequence: None,
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
