//! One round of the membership loop: checkpoints, read the client rows (and the
//! lease rows when something changed), lead when we are the lowest live client, plan, and
//! carry out the handoff actions.

use super::*;
use crate::store::Consistency;
use crate::store::schema::{ClientRow, lease_sk, streams_digest};

/// How many heartbeats after a new wait began [`Engine::recheck`] may run.
const RECHECK_WINDOW_TICKS: u32 = 3;

impl Engine {
    /// One round of the loop (see the module doc), timed.
    pub(super) async fn tick(&mut self) {
        let started = Instant::now();
        self.phases = Phases::new(started);
        self.tick_once().await;
        let took = started.elapsed();
        if took > self.config.tuning.heartbeat_interval / 2 {
            // Past half a heartbeat a tick delays claims and releases noticeably: say where
            // the time went.
            warn!(took_ms = took.as_millis() as u64, phases = %self.phases, "slow tick");
        }
        // The role this tick decided (a tick that could not read the group keeps the last).
        let role = if self.metrics.is_leader.get() == 1 {
            "leader"
        } else {
            "member"
        };
        self.metrics
            .tick_duration
            .get_or_create(&RoleLabels {
                role: role.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    async fn tick_once(&mut self) {
        self.health.tick();
        self.ticks += 1;
        self.connect_streams().await;
        self.phases.mark("connect");
        if !self.book.ok() {
            // The last heartbeat failed (reported by `on_beat`): the checkpoints, releases
            // and reads would each wait out their own timeout too, stretching the tick
            // while achieving nothing. Readers fence themselves by the last confirmed
            // heartbeat anyway.
            self.finish_tick();
            return;
        }
        self.write_checkpoints().await;
        self.phases.mark("checkpoints");
        self.retry_pending_releases().await;
        self.phases.mark("releases");

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
        // Each stream is planned over the live clients that read it, and kept (cache, lease
        // rows) by the lowest of them: old and new pods of a rollout that changed the
        // stream list agree on every shard.
        let names = self.stream_names();
        let mine = streams_digest(&names);
        self.learn_client_streams(&clients, &mine).await;
        self.readers = assignment::Readers::new(&live, |c| {
            if c == self.me() {
                return Some(names.as_slice());
            }
            let row = clients.iter().find(|r| r.client_id == c)?;
            client_streams::stream_list(row, &mine, &names, &self.client_lists)
        });
        self.led_streams = names
            .iter()
            .filter(|n| self.readers.leader_of(n) == Some(self.me()))
            .cloned()
            .collect();
        self.metrics.is_leader.set(i64::from(leader));
        self.metrics.live_clients.set(live.len() as i64);

        let changes = reads::change_marks(&clients);
        // A stream we read without its shard cache (a new group, whose leader has not
        // written it when we last read everything): its shards cannot be planned until a
        // whole read finds it.
        let missing_cache = names
            .iter()
            .any(|n| !self.snap.shard_caches.iter().any(|c| &c.stream == n));
        let read = reads::lease_read(reads::ReadInput {
            ticks_since_full: self.ticks - self.leases_read_at,
            asked: self.read_leases || self.unanswered_claims.values().any(|u| *u > now),
            asked_full: self.read_all_leases,
            missing_cache,
            ticks_since_caches: self.ticks - self.caches_read_at.max(self.leases_read_at),
            live_changed: live != self.last_live,
            moved: reads::moved(&self.last_changes, &changes),
        });
        self.phases.mark("clients");
        self.last_live = live.clone();
        self.last_changes = changes;
        let mut read_all = false;
        if read == reads::LeaseRead::MissingCaches
            && let Err(e) = self.read_missing_caches(&names).await
        {
            self.note_store("load_shard_caches", &e);
            self.finish_tick();
            return;
        }
        if read != reads::LeaseRead::None {
            match self.read_lease_rows(read == reads::LeaseRead::All).await {
                Ok(all) => read_all = all,
                Err(e) => {
                    self.note_store("load_leases", &e);
                    self.finish_tick();
                    return;
                }
            }
        }
        self.phases
            .mark(if read_all { "all leases" } else { "leases" });
        let mut snap = std::mem::take(&mut self.snap);
        snap.clients = clients;
        self.clients_read_at = now;
        self.collect_duties(&mut snap).await;
        if leader || !self.led_streams.is_empty() {
            self.lead(&snap, leader, read_all, now);
            // Rows of a deleted stream's shards are replaced here, not in the background
            // run: rare, a few conditional writes, and the plan below must not claim them.
            self.replace_older_leases(&mut snap).await;
            self.phases.mark("lead");
        }
        self.apply_plan(snap, now).await;
        self.finish_tick();
    }

    /// Between ticks, while we wait for live owners to release shards planned for us (a
    /// join, a rebalance): re-reads the lease rows only and claims what was released, so a
    /// release is taken up within a fraction of a heartbeat instead of two heartbeats (the
    /// releaser's next heartbeat, then our next tick). Judges owners as of the last client
    /// read, like the tick that made that read. See [`Engine::recheck_due`].
    pub(super) async fn recheck(&mut self) {
        self.last_recheck = Instant::now();
        match self.read_lease_rows(false).await {
            Ok(_) => {
                let snap = std::mem::take(&mut self.snap);
                self.apply_plan(snap, self.clients_read_at).await;
            }
            // The next tick reads again; a failing store is reported by it.
            Err(e) => debug!(error = %e, "lease re-read between ticks failed"),
        }
    }

    /// Looks for the shard caches of the streams in `names` that our snapshot lacks, and
    /// adds those found (the rows of our range, which a found cache may widen, are read
    /// after it).
    async fn read_missing_caches(&mut self, names: &[String]) -> Result<(), StoreError> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !self.snap.shard_caches.iter().any(|c| &c.stream == *n))
            .cloned()
            .collect();
        let group = self.group().to_owned();
        // Counted from the attempt: a read that fails waits its 5 ticks too, or a slow store
        // would get it from every worker at every tick.
        self.caches_read_at = self.ticks;
        let found = self
            .io(
                "load_shard_caches",
                self.store.load_shard_caches(&group, &missing),
            )
            .await?;
        self.snap.shard_caches.extend(found);
        Ok(())
    }

    /// Re-reads lease rows into our snapshot: every row and the shard caches when `all`,
    /// else only the rows of our range ([`Engine::our_lease_rows`]), falling back to every
    /// row when they lie too spread. Returns whether every row was read.
    async fn read_lease_rows(&mut self, all: bool) -> Result<bool, StoreError> {
        let res = self.try_read_lease_rows(all).await;
        if res.is_err() {
            // The signal that asked for this read has been consumed: ask again, or a missed
            // shard change would wait for the safety net.
            self.read_leases = true;
            self.read_all_leases |= all;
        }
        res
    }

    async fn try_read_lease_rows(&mut self, all: bool) -> Result<bool, StoreError> {
        let read_started = Instant::now();
        let ranges = if all {
            None
        } else {
            let ours = self.our_lease_rows();
            reads::lease_ranges(self.snap.leases.iter().map(|l| l.sk.as_str()), &ours)
        };
        let group = self.group().to_owned();
        let read_all = match ranges {
            None => {
                let read = self
                    .io_paged("load_leases", self.store.load_leases(&group))
                    .await?;
                self.snap.leases = read.leases;
                self.snap.shard_caches = read.shard_caches;
                self.leases_read_at = self.ticks;
                self.read_all_leases = false;
                true
            }
            Some(ranges) => {
                let queries = ranges
                    .iter()
                    .map(|(first, last)| self.store.load_lease_range(&group, first, last));
                let read = self
                    .io("load_lease_range", futures::future::try_join_all(queries))
                    .await?;
                reads::merge_ranges(
                    &mut self.snap.leases,
                    &ranges,
                    read.into_iter().flatten().collect(),
                );
                false
            }
        };
        self.read_leases = false;
        // The rows of claims whose answer was lost were in this read: it shows those that
        // landed (the row names us: resumed or released by the plan). One sent too late for
        // it may land later still.
        self.unanswered_claims
            .retain(|_, until| reads::still_watched(*until, read_started));
        Ok(read_all)
    }

    /// The sort keys of the lease rows that concern us: the shards the plan gives us (as
    /// of our snapshot and the last client read), those we read or still have to release,
    /// and those whose row names us.
    fn our_lease_rows(&self) -> BTreeSet<String> {
        let names = self.stream_names();
        let snap = incarnation::current(&self.snap);
        let plan = assignment::plan_by_readers(
            &assignment::streams_from_snapshot(&names, &snap),
            &self.readers,
        );
        let me = self.me();
        plan.iter()
            .filter(|(_, owner)| owner.as_str() == me)
            .map(|(key, _)| key)
            .chain(self.owned.keys())
            .chain(self.pending_release.keys())
            .chain(self.unanswered_claims.keys())
            .map(|key| lease_sk(&key.stream, &key.shard_id))
            .chain(
                self.snap
                    .leases
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some(me))
                    .map(|l| l.sk.clone()),
            )
            .collect()
    }

    /// Plans from `full` (client rows read at `judged_at`, whose live clients and their
    /// streams are `self.readers`) and carries out our handoff actions. Owners are judged
    /// dead or alive at `judged_at`: a judgment is only as fresh as the client read it rests
    /// on (a heartbeat that landed since must not be missed), so a re-read of the leases
    /// alone never judges later.
    async fn apply_plan(&mut self, full: GroupSnapshot, judged_at: Instant) {
        let now = Instant::now();
        // Rows of a deleted stream's shards (recreated under its name) count as missing
        // until the leader replaced them.
        let snap = incarnation::current(&full);
        // A lease is as alive as its owner's heartbeat. An owner first named now is watched
        // from now (later is the safe side).
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
                    .is_some_and(|o| o != self.me() && !self.clients.is_alive(o, judged_at));
                let view = LeaseView {
                    owner: l.owner.clone(),
                    counter: l.lease_counter,
                    ended: l.ended,
                    stale,
                };
                (ShardKey::new(&l.stream, &l.shard_id), view)
            })
            .collect();

        let names = self.stream_names();
        let plan = assignment::plan_by_readers(
            &assignment::streams_from_snapshot(&names, &snap),
            &self.readers,
        );
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
        let waits: BTreeSet<ShardKey> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Wait(key) => Some(key.clone()),
                _ => None,
            })
            .collect();
        if !waits.is_subset(&self.waiting) {
            self.waiting_since = now;
        }
        self.waiting = waits;
        self.phases.mark("plan");
        self.act_all(actions, &snap).await;
        self.phases.mark("act");
        drop(snap);
        self.snap = full;
    }

    /// When to re-read the leases before the next tick (see [`Engine::recheck`]): every
    /// quarter heartbeat while we wait for releases, for at most [`RECHECK_WINDOW_TICKS`]
    /// heartbeats after a new wait began (a live owner releases within about one heartbeat
    /// plus its in-flight batch; a longer wait is left to the ticks, which keeps its cost
    /// bounded).
    pub(super) fn recheck_due(&self) -> Option<Instant> {
        recheck_at(&RecheckInput {
            waiting: !self.waiting.is_empty(),
            waiting_since: self.waiting_since,
            last_read: self.last_recheck.max(self.clients_read_at),
            heartbeat_age: self
                .book
                .sent()
                .map(|t| BootInstant::now().saturating_duration_since(t)),
            heartbeat_interval: self.config.tuning.heartbeat_interval,
        })
    }

    /// When a lease owner we watch turns dead if its heartbeat does not move (the earliest,
    /// among owners other than us): a tick then claims its shards at once, instead of up to
    /// a heartbeat later.
    pub(super) fn owner_dies_at(&self) -> Option<Instant> {
        self.snap
            .leases
            .iter()
            .filter_map(|l| l.owner.as_deref())
            .filter(|o| *o != self.me())
            .filter_map(|o| self.clients.dies_at(o))
            .filter(|at| *at > Instant::now())
            .min()
    }

    /// Reads the client rows and observes them: eventually consistent (half the read units),
    /// unless that read would have us judge a client dead; then the judgment is made on a
    /// consistent read, so no takeover or prune ever rests on a stale view (see
    /// docs/state-store.md, "Reads"). Returns the rows, when they were observed and the live
    /// ids; `None` (noted) when the store failed.
    async fn read_clients(&mut self) -> Option<(Vec<ClientRow>, Instant, Vec<String>)> {
        // A heartbeat that failed since the last read (while the last tick ran, say) counts
        // like a failed read: see `ClientWatch::lost_sight`.
        let failures = self.book.failures();
        if failures != self.beat_failures {
            self.beat_failures = failures;
            self.clients.lost_sight();
        }
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
                // We cannot see the group; see `ClientWatch::lost_sight`.
                self.clients.lost_sight();
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
                self.clients.lost_sight();
                self.note_store("load_clients", &e);
                None
            }
        }
    }

    /// Our lease set changed: tell the group with the next heartbeat, and re-read our
    /// rows ourselves.
    pub(super) fn leases_changed(&mut self) {
        self.lease_changes += 1;
        self.read_leases = true;
    }

    /// We changed what plans are made of (a shard cache, a shard read to its end, rows of a
    /// deleted stream replaced): tell the group, whose members then re-read every lease row.
    pub(super) fn shards_changed(&mut self) {
        self.shard_changes += 1;
        self.leases_changed();
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

/// What [`recheck_at`] decides from.
struct RecheckInput {
    /// Some shard planned for us is held by a live owner.
    waiting: bool,
    /// When a shard last joined the set we wait for.
    waiting_since: Instant,
    /// The last read of the lease rows (a tick's or a re-read's).
    last_read: Instant,
    /// How long ago our last confirmed heartbeat was sent (on the fencing clock).
    heartbeat_age: Option<Duration>,
    heartbeat_interval: Duration,
}

/// When the next lease re-read between ticks is due: a quarter heartbeat after the last
/// read, while we wait, within [`RECHECK_WINDOW_TICKS`] heartbeats of the wait's start, and
/// only while our heartbeats are confirmed (a claim then would start a reader that is
/// already past its deadline).
fn recheck_at(i: &RecheckInput) -> Option<Instant> {
    let hb = i.heartbeat_interval;
    let at = i.last_read + hb / 4;
    let window_end = i.waiting_since + hb * RECHECK_WINDOW_TICKS;
    let heartbeating = i.heartbeat_age.is_some_and(|age| age < hb * 2);
    (i.waiting && heartbeating && at < window_end).then_some(at)
}

/// Where one tick's time went, phase by phase, for the "slow tick" warning.
#[derive(Debug)]
pub(super) struct Phases {
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// A tick that started at `started`.
    pub(super) fn new(started: Instant) -> Self {
        Self {
            last: started,
            took: Vec::new(),
        }
    }

    /// Phase `name` ended now (it began where the last one ended).
    pub(super) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.took
            .push((name, now.saturating_duration_since(self.last)));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.took.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {} ms", took.as_millis())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::ms;
    use super::*;

    #[test]
    fn recheck_at_table() {
        let t0 = Instant::now();
        let at = |v: u64| t0 + ms(v);
        let base = || RecheckInput {
            waiting: true,
            waiting_since: at(0),
            last_read: at(1000),
            heartbeat_age: Some(ms(100)),
            heartbeat_interval: ms(1000),
        };
        let cases = [
            (
                "waiting: a quarter heartbeat after the last read",
                base(),
                Some(at(1250)),
            ),
            (
                "nothing to wait for",
                RecheckInput {
                    waiting: false,
                    ..base()
                },
                None,
            ),
            (
                "last chance inside the window",
                RecheckInput {
                    last_read: at(2700),
                    heartbeat_age: Some(ms(800)),
                    ..base()
                },
                Some(at(2950)),
            ),
            (
                "window over: the ticks take it from here",
                RecheckInput {
                    last_read: at(2750),
                    heartbeat_age: Some(ms(800)),
                    ..base()
                },
                None,
            ),
            (
                "a new wait opens a new window",
                RecheckInput {
                    waiting_since: at(2500),
                    last_read: at(2750),
                    heartbeat_age: Some(ms(800)),
                    ..base()
                },
                Some(at(3000)),
            ),
            (
                "heartbeats not confirmed for two intervals",
                RecheckInput {
                    heartbeat_age: Some(ms(2000)),
                    ..base()
                },
                None,
            ),
            (
                "never heartbeated",
                RecheckInput {
                    heartbeat_age: None,
                    ..base()
                },
                None,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(recheck_at(&input), want, "{name}");
        }
    }
}
