//! One round of the membership loop: heartbeat, checkpoints, read the client rows (and the
//! lease rows when something changed), lead when we are the lowest live client, plan, and
//! carry out the handoff actions.

use super::*;
use crate::store::Consistency;
use crate::store::schema::ClientRow;

impl Engine {
    /// One round of the loop (see the module doc).
    pub(super) async fn tick(&mut self) {
        self.health.tick();
        self.ticks += 1;
        self.connect_streams().await;
        if !self.heartbeat().await {
            // The store did not answer: the checkpoints, releases and reads would each wait
            // out their own timeout too, stretching the tick while achieving nothing.
            // Readers fence themselves by the last confirmed heartbeat anyway.
            self.finish_tick();
            return;
        }
        self.write_checkpoints().await;
        self.retry_pending_releases().await;

        let Some((clients, now, mut live)) = self.read_clients().await else {
            self.finish_tick();
            return;
        };
        // We are alive by definition while we run; others judge us by our heartbeats.
        if !live.iter().any(|c| c == self.me()) {
            live.push(self.me().to_owned());
            live.sort();
        }
        let leader = membership::leader(&live) == Some(self.me());
        self.metrics.is_leader.set(i64::from(leader));
        self.metrics.live_clients.set(live.len() as i64);

        let changes = reads::lease_changes(&clients);
        let read = reads::read_leases(reads::ReadInput {
            ticks_since_read: self.ticks - self.leases_read_at,
            asked: self.read_leases,
            live_changed: live != self.last_live,
            changes_moved: changes != self.last_changes,
        });
        self.last_live = live.clone();
        self.last_changes = changes;
        if read {
            match self
                .io("load_leases", self.store.load_leases(self.group()))
                .await
            {
                Ok(s) => {
                    self.snap = s;
                    self.leases_read_at = self.ticks;
                    self.read_leases = false;
                }
                Err(e) => {
                    self.note_store("load_leases", &e);
                    self.finish_tick();
                    return;
                }
            }
        }
        let mut snap = std::mem::take(&mut self.snap);
        snap.clients = clients;
        if leader {
            self.lead(&mut snap, read, now).await;
        }

        // A lease is as alive as its owner's heartbeat.
        for owner in snap.leases.iter().filter_map(|l| l.owner.as_deref()) {
            self.clients.note_owner(owner, now);
        }
        self.clients
            .forget(|id| snap.leases.iter().any(|l| l.owner.as_deref() == Some(id)));
        let views: BTreeMap<ShardKey, LeaseView> = snap
            .leases
            .iter()
            .map(|l| {
                let stale = l
                    .owner
                    .as_deref()
                    .is_some_and(|o| o != self.me() && !self.clients.is_alive(o, now));
                let view = LeaseView {
                    owner: l.owner.clone(),
                    counter: l.lease_counter,
                    ended: l.ended,
                    stale,
                };
                (ShardKey::new(&l.stream, &l.shard_id), view)
            })
            .collect();

        let names: Vec<String> = self.streams.iter().map(|s| s.config.name.clone()).collect();
        let plan = assignment::plan(&assignment::streams_from_snapshot(&names, &snap), &live);
        let reading: BTreeSet<ShardKey> = self.owned.keys().cloned().collect();
        let actions = handoff::decide(HandoffInput {
            me: self.me(),
            plan: &plan,
            leases: &views,
            reading: &reading,
        });
        // Our plan is not applied yet (a claim, a release, a wait): look again next tick.
        if actions.iter().any(|a| !matches!(a, Action::Renew(_))) {
            self.read_leases = true;
        }
        self.act_all(actions, &snap).await;
        self.snap = snap;
        self.finish_tick();
    }

    /// Reads the client rows and observes them: eventually consistent (half the read units),
    /// unless that read would have us judge a client dead; then the judgment is made on a
    /// consistent read, so no takeover or prune ever rests on a stale view (see
    /// docs/state-store.md, "Reads"). Returns the rows, when they were observed and the live
    /// ids; `None` (noted) when the store failed.
    async fn read_clients(&mut self) -> Option<(Vec<ClientRow>, Instant, Vec<String>)> {
        let group = self.group();
        let cheap = self
            .io(
                "load_clients",
                self.store.load_clients_read(group, Consistency::Eventual),
            )
            .await;
        let rows = match cheap {
            Ok(rows) => rows,
            Err(e) => {
                self.note_store("load_clients", &e);
                return None;
            }
        };
        let now = Instant::now();
        let mut probe = self.clients.clone();
        let live = probe.observe(&rows, now);
        let watched = rows
            .iter()
            .map(|c| c.client_id.as_str())
            .chain(self.last_live.iter().map(String::as_str))
            .chain(self.snap.leases.iter().filter_map(|l| l.owner.as_deref()));
        if !reads::judges_dead(&probe, watched, self.me(), now) {
            self.clients = probe;
            return Some((rows, now, live));
        }
        let strong = self
            .io(
                "load_clients_consistent",
                self.store.load_clients_read(group, Consistency::Strong),
            )
            .await;
        match strong {
            Ok(rows) => {
                let now = Instant::now();
                let live = self.clients.observe(&rows, now);
                Some((rows, now, live))
            }
            Err(e) => {
                self.note_store("load_clients", &e);
                None
            }
        }
    }

    /// Our lease set changed (or, for the leader, a shard cache): tell the group with the
    /// next heartbeat, and re-read the leases ourselves.
    pub(super) fn leases_changed(&mut self) {
        self.lease_changes += 1;
        self.read_leases = true;
    }

    /// The fencing margin: how long after a confirmed heartbeat was sent our readers may
    /// still read. Observers wait `clientTimeout` from a moment after it; the
    /// `heartbeatInterval` kept back is the reader's time to stop.
    pub(super) fn fencing_margin(&self) -> Duration {
        let t = &self.config.tuning;
        t.client_timeout.saturating_sub(t.heartbeat_interval)
    }

    pub(super) fn finish_tick(&mut self) {
        // The metric mirrors this engine's store (each engine has its own).
        let units = self.store.read_units() - self.metrics.state_store_read_units.get();
        if units > 0.0 {
            self.metrics.state_store_read_units.inc_by(units);
        }
        self.metrics.leases_held.set(self.owned.len() as i64);
        let owned: BTreeSet<ShardKey> = self.owned.keys().cloned().collect();
        if owned != self.last_owned {
            self.metrics.rebalances.inc();
            self.last_owned = owned;
        }
        self.last_issue = self.tick_issue.take();
    }
}
