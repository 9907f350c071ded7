//! Membership: who is alive, who leads, and who we are.
//!
//! Pods' wall clocks differ, so nothing here compares another pod's timestamp with ours.
//! A client is judged by watching its heartbeat counter: if the counter has not changed
//! for `timeout` as measured on OUR monotonic clock, it is dead. This is how KCL's lease
//! counter works, and it makes skew irrelevant. A lease is as alive as its owner.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::store::schema::ClientRow;

/// Tracks counters (client heartbeats or lease counters) and when each last changed, on the
/// observer's monotonic clock. Used by the engine and by the operator's status builder.
#[derive(Clone, Debug)]
pub struct Liveness<K> {
    timeout: Duration,
    seen: HashMap<K, Seen>,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    counter: u64,
    changed_at: Instant,
}

impl<K: Eq + Hash + Clone> Liveness<K> {
    /// A tracker that declares a counter stale after `timeout` without change.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            seen: HashMap::new(),
        }
    }

    /// The timeout it judges with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records that `key`'s counter was `counter` at `now`. A new key, or a counter that
    /// differs from the last observed one, (re)starts its clock.
    pub fn observe(&mut self, key: K, counter: u64, now: Instant) {
        match self.seen.get_mut(&key) {
            Some(s) if s.counter == counter => {}
            Some(s) => {
                s.counter = counter;
                s.changed_at = now;
            }
            None => {
                self.seen.insert(
                    key,
                    Seen {
                        counter,
                        changed_at: now,
                    },
                );
            }
        }
    }

    /// Alive: never seen (alive until proven stale), or its counter changed less than
    /// `timeout` ago on our clock.
    pub fn is_alive(&self, key: &K, now: Instant) -> bool {
        self.seen
            .get(key)
            .is_none_or(|s| now.saturating_duration_since(s.changed_at) < self.timeout)
    }

    /// Stale: we have watched `key` sit at exactly `counter` for at least `timeout`. A
    /// counter we have not observed (or that just moved) is not stale.
    pub fn is_stale_at(&self, key: &K, counter: u64, now: Instant) -> bool {
        self.seen.get(key).is_some_and(|s| {
            s.counter == counter && now.saturating_duration_since(s.changed_at) >= self.timeout
        })
    }

    /// Restarts at `now` the clock of every key that was still alive at `last_sight`, our
    /// last good read before a stretch in which we could not read. Whatever the others did
    /// in that stretch we did not see, and an outage that hid them from us most likely kept
    /// their heartbeats from landing too; keys already stale at `last_sight` stay stale.
    pub fn restart_after_blind(&mut self, last_sight: Instant, now: Instant) {
        for s in self.seen.values_mut() {
            if last_sight.saturating_duration_since(s.changed_at) < self.timeout {
                s.changed_at = now;
            }
        }
    }

    /// When `key` turns stale if its counter does not move again: when its current value
    /// was first seen plus the timeout. `None` for a key never observed.
    pub fn stale_from(&self, key: &K) -> Option<Instant> {
        self.seen.get(key).map(|s| s.changed_at + self.timeout)
    }

    /// The last counter value observed for `key`.
    pub fn counter(&self, key: &K) -> Option<u64> {
        self.seen.get(key).map(|s| s.counter)
    }

    /// Forgets keys that are gone (deleted rows), so the map does not grow forever.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

/// What a reader of the group's status (the operator, `kcg-operator status`) makes of one
/// read of the client rows (`None`: the read failed): the ids of the live clients, sorted,
/// as a member judges them ([`ClientWatch`]). A failed read is time not counted against
/// anyone, so after an outage of the store the status does not call every client dead on
/// its first good read. Rows gone are forgotten: the status shows present clients only.
pub fn observe_clients(
    watch: &mut ClientWatch,
    clients: Option<&[ClientRow]>,
    now: Instant,
) -> Vec<String> {
    let Some(clients) = clients else {
        watch.lost_sight();
        return Vec::new();
    };
    let live = watch.observe(clients, now);
    watch.forget(|_| false);
    live
}

/// Watches the clients of a group for a member: who is alive (for the leader and the
/// plan) and whether a lease owner is dead (its leases may be taken). A lease has no
/// liveness of its own: it lives as long as its owner's client row heartbeats.
///
/// An owner is dead when, on our clock, its `heartbeat` stood still for the timeout; or its
/// row has been gone for the timeout (a row we never saw counts from when a lease first
/// named it); or its row vanished after we had already watched it stand still for the
/// timeout (the leader pruned it). A row that reappears (the client registered again)
/// starts a new clock.
///
/// Only time we could watch counts: when our own heartbeat or client read failed
/// ([`ClientWatch::lost_sight`]), the first good read afterwards restarts the clock of
/// every client still alive before it. A store outage seen by the whole group therefore
/// kills nobody, while a client that really died during it is dead one timeout after our
/// first good read. Restarting only delays a taker, which fencing allows (see
/// `docs/state-store.md`, "Fencing").
#[derive(Clone, Debug)]
pub struct ClientWatch {
    heartbeats: Liveness<String>,
    present: HashMap<String, u64>,
    /// Our last good read of the client rows.
    last_read: Option<Instant>,
    /// A heartbeat or client read failed since `last_read`.
    blind: bool,
}

/// Counter value that stands for "no client row" in [`ClientWatch`]'s tracker. Heartbeats
/// count up from 1 and never reach it.
const ABSENT: u64 = u64::MAX;

impl ClientWatch {
    /// A watch that declares a client dead after `timeout` without a heartbeat.
    pub fn new(timeout: Duration) -> Self {
        Self {
            heartbeats: Liveness::new(timeout),
            present: HashMap::new(),
            last_read: None,
            blind: false,
        }
    }

    /// The timeout this watch judges by.
    pub fn timeout(&self) -> Duration {
        self.heartbeats.timeout()
    }

    /// Our own heartbeat or client read failed: the time until the next good read is not
    /// counted against anyone.
    pub fn lost_sight(&mut self) {
        self.blind = true;
    }

    /// Observes one read of the client rows at `now` and returns the live ids, sorted.
    pub fn observe(&mut self, clients: &[ClientRow], now: Instant) -> Vec<String> {
        if let (true, Some(last)) = (self.blind, self.last_read) {
            self.heartbeats.restart_after_blind(last, now);
        }
        self.blind = false;
        self.last_read = Some(now);
        let rows: HashMap<String, u64> = clients
            .iter()
            .map(|c| (c.client_id.clone(), c.heartbeat))
            .collect();
        for (id, hb) in &rows {
            self.heartbeats.observe(id.clone(), *hb, now);
        }
        for id in self.present.keys() {
            // Vanished while alive: it counts as dead only after the timeout. Vanished after
            // standing still that long: it stays dead.
            if !rows.contains_key(id) && self.heartbeats.is_alive(id, now) {
                self.heartbeats.observe(id.clone(), ABSENT, now);
            }
        }
        self.present = rows;
        let mut live: Vec<String> = self
            .present
            .keys()
            .filter(|id| self.heartbeats.is_alive(id, now))
            .cloned()
            .collect();
        live.sort();
        live
    }

    /// Notes that `owner` holds a lease. An owner never seen in a client row is watched as
    /// absent from `now` on: it may have registered after our client read.
    pub fn note_owner(&mut self, owner: &str, now: Instant) {
        let id = owner.to_owned();
        if self.heartbeats.counter(&id).is_none() {
            self.heartbeats.observe(id, ABSENT, now);
        }
    }

    /// Whether `client` is alive at `now`: present or gone for less than the timeout. A
    /// client never observed is alive.
    pub fn is_alive(&self, client: &str, now: Instant) -> bool {
        self.heartbeats.is_alive(&client.to_owned(), now)
    }

    /// When `client` turns dead unless a later read shows its heartbeat moved (or its row
    /// back). `None` for a client never observed.
    pub fn dies_at(&self, client: &str) -> Option<Instant> {
        self.heartbeats.stale_from(&client.to_owned())
    }

    /// Forgets clients that have no row and own no lease any more (`owns` tells), so the
    /// tracker does not grow forever.
    pub fn forget(&mut self, owns: impl Fn(&str) -> bool) {
        let present = &self.present;
        self.heartbeats
            .retain(|id| present.contains_key(id) || owns(id));
    }
}

/// The leader: the lowest sorted live client id.
pub fn leader(live: &[String]) -> Option<&str> {
    live.iter().min().map(String::as_str)
}

/// Who this process is: its client id, the pod it runs in and when it started.
///
/// The client id is `<base>-<6 chars>`. Outside Kubernetes (no pod UID) the 6 chars are
/// random: every process is a new client, so two processes on one host never share an id or
/// take each other's leases. In a pod the operator renders (env `POD_UID`, the downward
/// API's `metadata.uid`) they are derived from the pod UID, so every incarnation of the pod's
/// worker container has the same id: a restarted container re-registers over its
/// predecessor's row and resumes that incarnation's leases at once (a conditional write that
/// moves each lease counter, so nothing the old process sent can land). That is safe because
/// the kubelet starts a container only after the previous one exited; and it keeps the sorted
/// ids, hence the leader and everyone's ranges, unchanged across a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `<base>-<suffix>`: random per process, or derived from the pod UID.
    pub client_id: String,
    /// Pod (or host) name, recorded separately for the controller.
    pub pod: String,
    /// The pod's UID, when the process runs in a pod that passes it (env `POD_UID`). Only one
    /// worker container per pod may have it: it makes that container's incarnations one
    /// client.
    pub pod_uid: Option<String>,
    /// When this incarnation started (Unix ms): its `startedAtMs`, which also tells a
    /// retried register our own row from another incarnation's.
    pub started_at_ms: i64,
}

impl Identity {
    /// Builds an identity. The id base is `client_id` if given, else the pod name (`pod`,
    /// env `POD_NAME`), else the host name; the suffix comes from env `POD_UID` when it is
    /// set, else it is random.
    pub fn new(client_id: Option<String>, pod: Option<String>) -> Self {
        Self::with_pod_uid(client_id, pod, std::env::var("POD_UID").ok())
    }

    /// [`Identity::new`] with the pod UID given (`None` or empty: not in a pod).
    pub fn with_pod_uid(
        client_id: Option<String>,
        pod: Option<String>,
        pod_uid: Option<String>,
    ) -> Self {
        let pod = pod
            .filter(|p| !p.is_empty())
            .or_else(|| std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()))
            .or_else(hostname)
            .unwrap_or_else(|| "kcg-worker".to_owned());
        let base = client_id
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| pod.clone());
        let pod_uid = pod_uid
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty());
        let suffix = pod_uid.as_deref().map_or_else(random_suffix, uid_suffix);
        Self {
            client_id: format!("{base}-{suffix}"),
            pod,
            pod_uid,
            started_at_ms: crate::store::now_ms(),
        }
    }
}

const SUFFIX_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const SUFFIX_LEN: usize = 6;

/// Six characters derived from the pod UID (a digest, so any UID format works and equal
/// UIDs always give equal suffixes, across versions too).
fn uid_suffix(uid: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(uid.as_bytes())
        .iter()
        .take(SUFFIX_LEN)
        .map(|b| SUFFIX_ALPHABET[usize::from(*b) % SUFFIX_ALPHABET.len()] as char)
        .collect()
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..SUFFIX_LEN)
        .map(|_| SUFFIX_ALPHABET[rng.random_range(0..SUFFIX_ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// One step of a liveness scenario: at `t` ms, observe `counter`, then expect alive.
    struct Step {
        t: u64,
        counter: Option<u64>,
        alive: bool,
    }

    #[test]
    fn liveness_table() {
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "never seen is alive",
                vec![Step {
                    t: 0,
                    counter: None,
                    alive: true,
                }],
            ),
            (
                "first sight starts the clock",
                vec![
                    Step {
                        t: 0,
                        counter: Some(5),
                        alive: true,
                    },
                    Step {
                        t: 999,
                        counter: Some(5),
                        alive: true,
                    },
                    Step {
                        t: 1000,
                        counter: Some(5),
                        alive: false,
                    },
                ],
            ),
            (
                "moving counter stays alive",
                vec![
                    Step {
                        t: 0,
                        counter: Some(1),
                        alive: true,
                    },
                    Step {
                        t: 800,
                        counter: Some(2),
                        alive: true,
                    },
                    Step {
                        t: 1600,
                        counter: Some(3),
                        alive: true,
                    },
                    Step {
                        t: 2500,
                        counter: Some(3),
                        alive: true,
                    },
                    Step {
                        t: 2600,
                        counter: Some(3),
                        alive: false,
                    },
                ],
            ),
            (
                "dead client that comes back is alive again",
                vec![
                    Step {
                        t: 0,
                        counter: Some(7),
                        alive: true,
                    },
                    Step {
                        t: 1500,
                        counter: Some(7),
                        alive: false,
                    },
                    Step {
                        t: 1600,
                        counter: Some(8),
                        alive: true,
                    },
                ],
            ),
            (
                "a counter going backwards (new row) is a change",
                vec![
                    Step {
                        t: 0,
                        counter: Some(9),
                        alive: true,
                    },
                    Step {
                        t: 900,
                        counter: Some(1),
                        alive: true,
                    },
                    Step {
                        t: 1800,
                        counter: Some(1),
                        alive: true,
                    },
                ],
            ),
        ];
        for (name, steps) in cases {
            let start = Instant::now();
            let mut l = Liveness::new(ms(1000));
            for step in steps {
                let now = start + ms(step.t);
                if let Some(c) = step.counter {
                    l.observe("x".to_owned(), c, now);
                }
                assert_eq!(
                    l.is_alive(&"x".to_owned(), now),
                    step.alive,
                    "{name} at t={}",
                    step.t
                );
            }
        }
    }

    #[test]
    fn stale_only_for_the_watched_counter() {
        let start = Instant::now();
        let mut l = Liveness::new(ms(1000));
        let k = ("s".to_owned(), "shard-0".to_owned());
        assert!(
            !l.is_stale_at(&k, 3, start + ms(5000)),
            "unobserved is never stale"
        );
        l.observe(k.clone(), 3, start);
        assert!(!l.is_stale_at(&k, 3, start + ms(999)));
        assert!(l.is_stale_at(&k, 3, start + ms(1000)));
        assert!(
            !l.is_stale_at(&k, 4, start + ms(1000)),
            "a different counter than watched"
        );
    }

    #[test]
    fn clock_skew_is_irrelevant() {
        // Two clients whose wall clocks are hours apart: their rows carry wildly different
        // heartbeatAtMs values. Only counter movement on our monotonic clock matters.
        let row = |id: &str, hb: u64, at_ms: i64| ClientRow {
            pk: "ns/g".into(),
            sk: format!("client#{id}"),
            client_id: id.into(),
            pod: id.into(),
            heartbeat: hb,
            heartbeat_at_ms: at_ms,
            started_at_ms: at_ms,
            owned_shards: 0,
            lease_changes: 0,
            shard_changes: None,
            last_error: None,
            last_error_reason: None,
            expires_at: 0,
            streams: None,
            streams_digest: None,
        };
        let start = Instant::now();
        let mut l = ClientWatch::new(ms(1000));
        // "fast" is 3 hours ahead, "slow" 3 hours behind, "stuck" has a current clock.
        let now_wall = 1_800_000_000_000i64;
        let hours = 3 * 3600 * 1000;
        let snap1 = vec![
            row("fast", 1, now_wall + hours),
            row("slow", 1, now_wall - hours),
            row("stuck", 1, now_wall),
        ];
        assert_eq!(
            observe_clients(&mut l, Some(&snap1), start),
            vec!["fast", "slow", "stuck"]
        );
        let snap2 = vec![
            row("fast", 2, now_wall + hours + 500),
            row("slow", 2, now_wall - hours + 500),
            row("stuck", 1, now_wall),
        ];
        assert_eq!(
            observe_clients(&mut l, Some(&snap2), start + ms(600)),
            vec!["fast", "slow", "stuck"]
        );
        let snap3 = vec![
            row("fast", 3, now_wall + hours + 1100),
            row("slow", 3, now_wall - hours + 1100),
            row("stuck", 1, now_wall),
        ];
        assert_eq!(
            observe_clients(&mut l, Some(&snap3), start + ms(1200)),
            vec!["fast", "slow"]
        );
        assert_eq!(leader(&["slow".into(), "fast".into()]), Some("fast"));
    }

    #[test]
    fn observe_clients_forgets_deleted_rows() {
        let start = Instant::now();
        let mut l = ClientWatch::new(ms(1000));
        let rows = [client_row("gone", 1)];
        assert_eq!(observe_clients(&mut l, Some(&rows), start), vec!["gone"]);
        observe_clients(&mut l, Some(&[]), start);
        assert_eq!(l.dies_at("gone"), None, "forgotten");
    }

    #[test]
    fn observe_clients_does_not_count_a_failed_read_against_anyone() {
        let start = Instant::now();
        let mut l = ClientWatch::new(ms(1000));
        let rows = [client_row("a", 7)];
        assert_eq!(observe_clients(&mut l, Some(&rows), start), vec!["a"]);
        // The store was out for 5 s (reads failed); "a" could not heartbeat either.
        assert!(observe_clients(&mut l, None, start + ms(2000)).is_empty());
        assert_eq!(
            observe_clients(&mut l, Some(&rows), start + ms(5000)),
            vec!["a"],
            "a read after an outage starts the clock again"
        );
        // Still standing one timeout after the first good read: dead.
        assert!(observe_clients(&mut l, Some(&rows), start + ms(6100)).is_empty());
        // Without the failed read, the same rows judge "a" dead at once.
        let mut seen = ClientWatch::new(ms(1000));
        observe_clients(&mut seen, Some(&rows), start);
        assert!(observe_clients(&mut seen, Some(&rows), start + ms(5000)).is_empty());
    }

    /// One read of a [`ClientWatch`] scenario: at `t` ms the client rows are `rows`
    /// (id, heartbeat) and leases name `owners`; then `x` must be alive (`true`) or dead.
    struct Read {
        t: u64,
        rows: &'static [(&'static str, u64)],
        owners: &'static [&'static str],
        alive: &'static [(&'static str, bool)],
    }

    #[test]
    fn client_watch_table() {
        const T: u64 = 1000; // the timeout
        let cases: Vec<(&str, Vec<Read>)> = vec![
            (
                "a moving heartbeat keeps its leases alive",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 900,
                        rows: &[("a", 2)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 1800,
                        rows: &[("a", 3)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                ],
            ),
            (
                "a heartbeat standing still for the timeout: dead",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: T - 1,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: T,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", false)],
                    },
                ],
            ),
            (
                "first sight starts the clock, whatever the value",
                vec![
                    Read {
                        t: 5000,
                        rows: &[("a", 77)],
                        owners: &[],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 5000 + T,
                        rows: &[("a", 77)],
                        owners: &[],
                        alive: &[("a", false)],
                    },
                ],
            ),
            (
                "a row that vanished while alive: dead only after the timeout",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 500,
                        rows: &[],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 500 + T - 1,
                        rows: &[],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: 500 + T,
                        rows: &[],
                        owners: &["a"],
                        alive: &[("a", false)],
                    },
                ],
            ),
            (
                "pruned after standing still: stays dead at once",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 4)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: T,
                        rows: &[("a", 4)],
                        owners: &["a"],
                        alive: &[("a", false)],
                    },
                    Read {
                        t: T + 100,
                        rows: &[],
                        owners: &["a"],
                        alive: &[("a", false)],
                    },
                ],
            ),
            (
                "an owner we never saw a row of: absent from its first mention",
                vec![
                    Read {
                        t: 0,
                        rows: &[],
                        owners: &["new"],
                        alive: &[("new", true)],
                    },
                    Read {
                        t: T - 1,
                        rows: &[],
                        owners: &["new"],
                        alive: &[("new", true)],
                    },
                    Read {
                        t: T,
                        rows: &[],
                        owners: &["new"],
                        alive: &[("new", false)],
                    },
                ],
            ),
            (
                "an owner that registered after our client read shows up: alive",
                vec![
                    Read {
                        t: 0,
                        rows: &[],
                        owners: &["new"],
                        alive: &[("new", true)],
                    },
                    Read {
                        t: 300,
                        rows: &[("new", 1)],
                        owners: &["new"],
                        alive: &[("new", true)],
                    },
                    Read {
                        t: 300 + T - 1,
                        rows: &[("new", 1)],
                        owners: &["new"],
                        alive: &[("new", true)],
                    },
                ],
            ),
            (
                "pruned, then registered again: a new clock",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 9)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: T,
                        rows: &[],
                        owners: &["a"],
                        alive: &[("a", false)],
                    },
                    Read {
                        t: T + 100,
                        rows: &[("a", 1)],
                        owners: &["a"],
                        alive: &[("a", true)],
                    },
                ],
            ),
            (
                "a client without leases whose row is gone is forgotten: unknown is alive",
                vec![
                    Read {
                        t: 0,
                        rows: &[("a", 1)],
                        owners: &[],
                        alive: &[("a", true)],
                    },
                    Read {
                        t: T,
                        rows: &[],
                        owners: &[],
                        alive: &[("a", true)],
                    },
                ],
            ),
        ];
        for (name, reads) in cases {
            let start = Instant::now();
            let mut w = ClientWatch::new(ms(T));
            for (i, r) in reads.iter().enumerate() {
                let now = start + ms(r.t);
                let rows: Vec<ClientRow> =
                    r.rows.iter().map(|(id, hb)| client_row(id, *hb)).collect();
                let live = w.observe(&rows, now);
                for o in r.owners {
                    w.note_owner(o, now);
                }
                w.forget(|id| r.owners.contains(&id));
                for (id, want) in r.alive {
                    assert_eq!(w.is_alive(id, now), *want, "{name}: read {i}, {id}");
                    if r.rows.iter().any(|(x, _)| x == id) {
                        assert_eq!(live.contains(&id.to_string()), *want, "{name}: live list");
                    }
                }
            }
        }
    }

    /// One read of a blindness scenario: whether our own store calls failed just before it
    /// (`blind`), then at `t` ms the rows are `rows`, the leases name `owners`, and `x`
    /// must be alive or dead.
    struct Sight {
        blind: bool,
        t: u64,
        rows: &'static [(&'static str, u64)],
        owners: &'static [&'static str],
        alive: bool,
    }

    #[test]
    fn client_watch_counts_only_time_it_could_watch() {
        const T: u64 = 1000; // the timeout
        let s = |blind, t, rows, alive| Sight {
            blind,
            t,
            rows,
            owners: &["x"],
            alive,
        };
        let cases: Vec<(&str, Vec<Sight>)> = vec![
            (
                "an outage seen by all: alive at the first good read, dead a timeout later",
                vec![
                    s(false, 0, &[("x", 1)], true),
                    s(true, 5000, &[("x", 1)], true),
                    s(false, 5000 + T - 1, &[("x", 1)], true),
                    s(false, 5000 + T, &[("x", 1)], false),
                ],
            ),
            (
                "a client that heartbeats again after the outage stays alive",
                vec![
                    s(false, 0, &[("x", 1)], true),
                    s(true, 5000, &[("x", 1)], true),
                    s(false, 5600, &[("x", 2)], true),
                    s(false, 5600 + T - 1, &[("x", 2)], true),
                ],
            ),
            (
                "dead before we went blind: stays dead",
                vec![
                    s(false, 0, &[("x", 1)], true),
                    s(false, T, &[("x", 1)], false),
                    s(true, 5000, &[("x", 1)], false),
                ],
            ),
            (
                "a long gap without a failed read counts (we were slow or paused, not blind)",
                vec![
                    s(false, 0, &[("x", 1)], true),
                    s(false, 5000, &[("x", 1)], false),
                ],
            ),
            (
                "blind twice in a row: the clock restarts at each first good read",
                vec![
                    s(false, 0, &[("x", 1)], true),
                    s(true, 900, &[("x", 1)], true),
                    s(true, 1800, &[("x", 1)], true),
                    s(false, 1800 + T, &[("x", 1)], false),
                ],
            ),
            (
                "an owner without a row: its absence clock restarts too",
                vec![
                    s(false, 0, &[], true),
                    s(true, 5000, &[], true),
                    s(false, 5000 + T, &[], false),
                ],
            ),
        ];
        for (name, reads) in cases {
            let start = Instant::now();
            let mut w = ClientWatch::new(ms(T));
            for (i, r) in reads.iter().enumerate() {
                let now = start + ms(r.t);
                if r.blind {
                    w.lost_sight();
                }
                let rows: Vec<ClientRow> =
                    r.rows.iter().map(|(id, hb)| client_row(id, *hb)).collect();
                w.observe(&rows, now);
                for o in r.owners {
                    w.note_owner(o, now);
                }
                assert_eq!(w.is_alive("x", now), r.alive, "{name}: read {i}");
            }
        }
    }

    fn client_row(id: &str, hb: u64) -> ClientRow {
        ClientRow::for_test(id, hb)
    }

    #[test]
    fn identities_are_unique_incarnations() {
        let a = Identity::with_pod_uid(None, Some("pod-7".into()), None);
        let b = Identity::with_pod_uid(None, Some("pod-7".into()), Some(String::new()));
        assert_eq!(a.pod, "pod-7");
        assert!(a.client_id.starts_with("pod-7-"));
        assert_ne!(
            a.client_id, b.client_id,
            "a restarted container is a new client"
        );
        assert_eq!((a.pod_uid, b.pod_uid), (None, None));
        let c = Identity::with_pod_uid(Some("given".into()), Some("pod-1".into()), None);
        assert!(c.client_id.starts_with("given-"));
        assert_eq!(c.pod, "pod-1");
    }

    #[test]
    fn incarnations_of_one_pod_share_the_id() {
        let uid = "0c6f1e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        let first = Identity::with_pod_uid(None, Some("w-abc".into()), Some(uid.into()));
        let restarted = Identity::with_pod_uid(None, Some("w-abc".into()), Some(uid.into()));
        assert_eq!(first.client_id, restarted.client_id);
        assert_eq!(first.pod_uid.as_deref(), Some(uid));
        let (base, suffix) = first.client_id.rsplit_once('-').unwrap();
        assert_eq!(base, "w-abc");
        assert_eq!(suffix.len(), SUFFIX_LEN);
        // Fixed across versions (MD5, not the std hasher): a restarted container may run a
        // newer image.
        assert_eq!(uid_suffix("x"), "n6mzc6");
        let other_pod = Identity::with_pod_uid(
            None,
            Some("w-abc".into()),
            Some("9d8c7b6a-0000-4000-8000-000000000000".into()),
        );
        assert_ne!(
            first.client_id, other_pod.client_id,
            "a new pod is a new client"
        );
    }
}
