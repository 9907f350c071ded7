//! Table-driven tests of the status builder.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kcg_worker::store::schema::{ClientRow, ShardInfo};

const G: &str = "ns/group";

fn ts(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(secs).unwrap()
}

fn client(id: &str) -> ClientRow {
    ClientRow {
        pk: G.into(),
        sk: format!("client#{id}"),
        client_id: id.into(),
        pod: format!("pod-{id}"),
        heartbeat: 7,
        heartbeat_at_ms: 1_700_000_000_000,
        started_at_ms: 1_700_000_000_000,
        owned_shards: 0,
        lease_changes: 0,
        shard_changes: None,
        last_error: None,
        last_error_reason: None,
        expires_at: 0,
        streams: None,
        streams_digest: None,
    }
}

fn shard(i: u32) -> String {
    format!("shardId-{i:012}")
}

fn open(i: u32) -> ShardInfo {
    ShardInfo {
        starting_sequence: None,
        shard_id: shard(i),
        parent: None,
        adjacent_parent: None,
        closed: false,
    }
}

fn cache(stream: &str, shards: Vec<ShardInfo>) -> ShardCacheRow {
    ShardCacheRow {
        pk: G.into(),
        sk: format!("shards#{stream}"),
        stream: stream.into(),
        shards,
        refreshed_at_ms: 0,
        refreshed_by: "a".into(),
    }
}

fn lease(stream: &str, i: u32, owner: Option<&str>) -> LeaseRow {
    LeaseRow {
        pk: G.into(),
        sk: format!("lease#{stream}#{}", shard(i)),
        stream: stream.into(),
        shard_id: shard(i),
        owner: owner.map(str::to_owned),
        lease_counter: 1,
        checkpoint: None,
        checkpoint_sub_sequence: None,
        ended: false,
        millis_behind: None,
        lag_at_ms: None,
        updated_at_ms: 0,
        shard_start: None,
    }
}

/// A group of `n_clients` clients ("c0", "c1", ...) on stream "s" with `n_shards` shards
/// split into contiguous ranges, everything healthy.
fn healthy(n_clients: u32, n_shards: u32) -> StatusInput {
    let ids: Vec<String> = (0..n_clients).map(|i| format!("c{i}")).collect();
    let leases = (0..n_shards)
        .map(|s| {
            let owner = &ids[(s * n_clients / n_shards.max(1)) as usize];
            lease("s", s, Some(owner))
        })
        .collect();
    StatusInput {
        generation: Some(3),
        streams: vec!["s".into()],
        desired_replicas: n_clients as i32,
        suspended: false,
        selector: "app.kubernetes.io/instance=group".into(),
        deployment: Some(DeploymentState::all_ready(n_clients as i32)),
        snapshot: Some(GroupSnapshot {
            clients: ids.iter().map(|i| client(i)).collect(),
            shard_caches: vec![cache("s", (0..n_shards).map(open).collect())],
            leases,
        }),
        live_clients: ids.into_iter().collect(),
        previous_conditions: vec![],
        now: ts(1000),
        problems: vec![],
    }
}

fn cond<'a>(s: &'a KinesisConsumerGroupStatus, t: &str) -> &'a Condition {
    conditions::find(&s.conditions, t).unwrap_or_else(|| panic!("no {t} condition"))
}

fn ranges(s: &KinesisConsumerGroupStatus) -> Vec<(String, u32, u32, i32)> {
    let num = |id: &str| id.trim_start_matches("shardId-").parse::<u32>().unwrap();
    s.streams[0]
        .ranges
        .iter()
        .map(|r| (r.client.clone(), num(&r.first), num(&r.last), r.count))
        .collect()
}

#[test]
fn compact_ranges_table() {
    type Case = (
        &'static str,
        Vec<(&'static str, Option<&'static str>)>,
        Vec<(&'static str, &'static str, &'static str, usize)>,
    );
    let cases: Vec<Case> = vec![
        ("empty", vec![], vec![]),
        (
            "one owner",
            vec![("1", Some("a")), ("2", Some("a"))],
            vec![("a", "1", "2", 2)],
        ),
        (
            "two runs",
            vec![("1", Some("a")), ("2", Some("b")), ("3", Some("b"))],
            vec![("a", "1", "1", 1), ("b", "2", "3", 2)],
        ),
        (
            "gap splits a run",
            vec![("1", Some("a")), ("2", None), ("3", Some("a"))],
            vec![("a", "1", "1", 1), ("a", "3", "3", 1)],
        ),
        (
            "interleaved",
            vec![("1", Some("a")), ("2", Some("b")), ("3", Some("a"))],
            vec![("a", "1", "1", 1), ("b", "2", "2", 1), ("a", "3", "3", 1)],
        ),
        ("all unowned", vec![("1", None), ("2", None)], vec![]),
    ];
    for (name, input, want) in cases {
        let input: Vec<(String, Option<String>)> = input
            .into_iter()
            .map(|(s, o)| (s.to_owned(), o.map(str::to_owned)))
            .collect();
        let got: Vec<_> = compact_ranges("s", &input)
            .into_iter()
            .map(|r| (r.client, r.first_shard, r.last_shard, r.count))
            .collect();
        let want: Vec<_> = want
            .into_iter()
            .map(|(c, f, l, n)| (c.to_owned(), f.to_owned(), l.to_owned(), n))
            .collect();
        assert_eq!(got, want, "case {name}");
    }
}

#[test]
fn human_millis_table() {
    for (ms, want) in [
        (0, "0s"),
        (-5, "0s"),
        (850, "850ms"),
        (1_000, "1s"),
        (12_345, "12s"),
        (60_000, "1m"),
        (192_000, "3m12s"),
        (3_600_000, "1h"),
        (7_500_000, "2h5m"),
    ] {
        assert_eq!(human_millis(ms), want, "{ms}");
    }
}

#[test]
fn healthy_group_reports_clients_leader_ranges_and_all_conditions() {
    let s = build_status(healthy(3, 6));
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!((s.replicas, s.ready_replicas), (3, 3));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=group")
    );
    assert_eq!(s.leader.as_deref(), Some("c0"));
    assert_eq!(s.client_count, 3);
    assert_eq!(s.shard_count, 6);
    let clients: Vec<_> = s
        .clients
        .iter()
        .map(|c| (c.id.as_str(), c.pod.as_str(), c.index, c.owned_shards))
        .collect();
    assert_eq!(
        clients,
        vec![
            ("c0", "pod-c0", 0, 2),
            ("c1", "pod-c1", 1, 2),
            ("c2", "pod-c2", 2, 2)
        ]
    );
    assert_eq!(s.clients[0].last_heartbeat, "2023-11-14T22:13:20Z");
    assert_eq!(
        ranges(&s),
        vec![
            ("c0".into(), 0, 1, 2),
            ("c1".into(), 2, 3, 2),
            ("c2".into(), 4, 5, 2)
        ]
    );
    assert_eq!(s.streams[0].open_shards, 6);
    assert_eq!(s.streams[0].closed_shards_draining, 0);
    for (t, status, reason) in [
        (READY, TRUE, "Ready"),
        (BALANCED, TRUE, "Balanced"),
        (PROGRESSING, FALSE, "Stable"),
        (DEGRADED, FALSE, "AsExpected"),
    ] {
        let c = cond(&s, t);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, reason),
            "{t}: {}",
            c.message
        );
        assert_eq!(c.last_transition_time, Time(ts(1000)));
    }
}

#[test]
fn dead_clients_are_left_out_and_the_leader_is_the_lowest_live_id() {
    let mut input = healthy(3, 6);
    input.live_clients.remove("c0");
    let s = build_status(input);
    assert_eq!(s.leader.as_deref(), Some("c1"));
    assert_eq!(s.client_count, 2);
    assert_eq!(
        s.clients.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // c0's shards are held by a dead client: neither Ready nor Balanced, and a rebalance is due.
    assert_eq!(cond(&s, READY).reason, "ShardsUnowned");
    assert_eq!(cond(&s, BALANCED).reason, "StaleOwners");
    assert!(
        cond(&s, BALANCED)
            .message
            .contains("s/shardId-000000000000")
    );
    assert_eq!(cond(&s, PROGRESSING).reason, "Rebalancing");
    // The dead owner's shards are not listed as a range.
    assert_eq!(
        ranges(&s),
        vec![("c1".into(), 2, 3, 2), ("c2".into(), 4, 5, 2)]
    );
}

#[test]
fn lag_is_the_max_with_its_shard_and_ignores_ended_shards() {
    let mut input = healthy(2, 4);
    let snap = input.snapshot.as_mut().unwrap();
    snap.leases[0].millis_behind = Some(1_500);
    snap.leases[2].millis_behind = Some(90_000);
    snap.leases[3].millis_behind = Some(500_000);
    snap.leases[3].ended = true;
    snap.shard_caches[0].shards[3].closed = true;
    let s = build_status(input);
    assert_eq!(s.streams[0].max_lag_millis, Some(90_000));
    assert_eq!(
        s.streams[0].max_lag_shard.as_deref(),
        Some("shardId-000000000002")
    );
    assert_eq!(s.max_lag.as_deref(), Some("1m30s"));
    assert_eq!(s.max_lag_millis, Some(90_000), "the same lag, as a number");
    // The ended shard is neither open nor draining.
    assert_eq!(
        (
            s.streams[0].open_shards,
            s.streams[0].closed_shards_draining
        ),
        (3, 0)
    );
    assert_eq!(s.shard_count, 3);
}

#[test]
fn no_lag_reported_when_no_reader_measured_it() {
    let s = build_status(healthy(2, 4));
    assert!(s.streams[0].max_lag_millis.is_none() && s.streams[0].max_lag_shard.is_none());
    assert!(s.max_lag.is_none() && s.max_lag_millis.is_none());
}

#[test]
fn resharding_children_wait_for_parents_and_closed_parents_drain() {
    // shard 0 split into 1 and 2: 0 is closed and not yet read to its end.
    let mut input = healthy(1, 1);
    let snap = input.snapshot.as_mut().unwrap();
    snap.shard_caches[0].shards = vec![
        ShardInfo {
            starting_sequence: None,
            closed: true,
            ..open(0)
        },
        ShardInfo {
            starting_sequence: None,
            parent: Some(shard(0)),
            ..open(1)
        },
        ShardInfo {
            starting_sequence: None,
            parent: Some(shard(0)),
            ..open(2)
        },
    ];
    let s = build_status(input.clone());
    assert_eq!(
        (
            s.streams[0].open_shards,
            s.streams[0].closed_shards_draining
        ),
        (2, 1)
    );
    // Children are not consumable yet, so they do not count as unowned.
    assert_eq!(cond(&s, READY).status, TRUE, "{}", cond(&s, READY).message);
    assert_eq!(ranges(&s), vec![("c0".into(), 0, 0, 1)]);

    // Parent ended: children become consumable, and are unowned until someone takes them.
    let snap = input.snapshot.as_mut().unwrap();
    snap.leases[0].ended = true;
    let s = build_status(input.clone());
    assert_eq!(
        (
            s.streams[0].open_shards,
            s.streams[0].closed_shards_draining
        ),
        (2, 0)
    );
    assert_eq!(cond(&s, READY).reason, "ShardsUnowned");
    assert!(cond(&s, READY).message.contains("shardId-000000000001"));
    assert_eq!(cond(&s, BALANCED).reason, "UnownedShards");

    let snap = input.snapshot.as_mut().unwrap();
    snap.leases.push(lease("s", 1, Some("c0")));
    snap.leases.push(lease("s", 2, Some("c0")));
    let s = build_status(input);
    assert_eq!(cond(&s, READY).status, TRUE);
    assert_eq!(ranges(&s), vec![("c0".into(), 1, 2, 2)]);
}

#[test]
fn ready_table() {
    type Edit = fn(&mut StatusInput);
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        ("healthy", |_| {}, TRUE, "Ready"),
        ("suspended", |i| i.desired_replicas = 0, FALSE, "Suspended"),
        (
            "spec.suspend, pods still stopping",
            |i| {
                i.suspended = true;
                i.desired_replicas = 0;
            },
            FALSE,
            "Suspended",
        ),
        (
            "spec.suspend, store unreadable",
            |i| {
                i.suspended = true;
                i.desired_replicas = 0;
                i.snapshot = None;
            },
            FALSE,
            "Suspended",
        ),
        (
            "no deployment",
            |i| i.deployment = None,
            FALSE,
            "DeploymentMissing",
        ),
        (
            "pods not ready",
            |i| i.deployment.as_mut().unwrap().ready_replicas = 1,
            FALSE,
            "RolloutInProgress",
        ),
        (
            "deployment has not seen the new template",
            |i| i.deployment.as_mut().unwrap().observed_current = false,
            FALSE,
            "RolloutInProgress",
        ),
        (
            "an unowned shard",
            |i| i.snapshot.as_mut().unwrap().leases[1].owner = None,
            FALSE,
            "ShardsUnowned",
        ),
        (
            "a shard without a lease row",
            |i| {
                i.snapshot.as_mut().unwrap().leases.remove(0);
            },
            FALSE,
            "ShardsUnowned",
        ),
        (
            "shards not listed yet",
            |i| i.snapshot.as_mut().unwrap().shard_caches.clear(),
            FALSE,
            "ShardsNotListed",
        ),
        (
            "store unreadable",
            |i| i.snapshot = None,
            UNKNOWN,
            "StateStoreUnavailable",
        ),
    ];
    for (name, edit, status, reason) in cases {
        let mut input = healthy(2, 4);
        edit(&mut input);
        let s = build_status(input);
        let c = cond(&s, READY);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, reason),
            "case {name}: {}",
            c.message
        );
        assert!(!c.message.is_empty(), "case {name}");
    }
}

#[test]
fn balanced_table() {
    type Edit = fn(&mut StatusInput);
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        ("even", |_| {}, TRUE, "Balanced"),
        (
            "off by one is fine",
            |i| {
                let snap = i.snapshot.as_mut().unwrap();
                snap.shard_caches[0].shards.push(open(4));
                snap.leases.push(lease("s", 4, Some("c0")));
            },
            TRUE,
            "Balanced",
        ),
        (
            "off by two is not",
            |i| {
                let l = &mut i.snapshot.as_mut().unwrap().leases;
                l[2].owner = Some("c0".into());
                l[3].owner = Some("c0".into());
            },
            FALSE,
            "Uneven",
        ),
        (
            "a live client with nothing",
            |i| {
                let snap = i.snapshot.as_mut().unwrap();
                snap.clients.push(client("c9"));
                // 4 shards over 3 clients where c9 owns none: 2/2/0.
                i.live_clients.insert("c9".into());
            },
            FALSE,
            "Uneven",
        ),
        (
            "unowned",
            |i| i.snapshot.as_mut().unwrap().leases[0].owner = None,
            FALSE,
            "UnownedShards",
        ),
        (
            "held by a dead client",
            |i| i.snapshot.as_mut().unwrap().leases[0].owner = Some("gone".into()),
            FALSE,
            "StaleOwners",
        ),
        (
            "no clients",
            |i| i.live_clients.clear(),
            FALSE,
            "StaleOwners",
        ),
        (
            "store unreadable",
            |i| i.snapshot = None,
            UNKNOWN,
            "StateStoreUnavailable",
        ),
        (
            "shards not listed yet",
            |i| {
                let snap = i.snapshot.as_mut().unwrap();
                snap.shard_caches.clear();
                snap.leases.clear();
            },
            UNKNOWN,
            "ShardsNotListed",
        ),
    ];
    for (name, edit, status, reason) in cases {
        let mut input = healthy(2, 4);
        edit(&mut input);
        let s = build_status(input);
        let c = cond(&s, BALANCED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, reason),
            "case {name}: {}",
            c.message
        );
    }
}

#[test]
fn progressing_table() {
    type Edit = fn(&mut StatusInput);
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        ("steady", |_| {}, FALSE, "Stable"),
        (
            "new template rolling",
            |i| i.deployment.as_mut().unwrap().updated_replicas = 1,
            TRUE,
            "RollingOut",
        ),
        ("scale-up", |i| i.desired_replicas = 3, TRUE, "RollingOut"),
        (
            "suspended, pods stopping",
            |i| {
                i.suspended = true;
                i.desired_replicas = 0;
            },
            TRUE,
            "RollingOut",
        ),
        (
            "suspended, pods gone",
            |i| {
                i.suspended = true;
                i.desired_replicas = 0;
                i.deployment = Some(DeploymentState::all_ready(0));
                i.snapshot.as_mut().unwrap().clients.clear();
            },
            FALSE,
            "Suspended",
        ),
        (
            "lease handoff",
            |i| i.snapshot.as_mut().unwrap().leases[0].owner = None,
            TRUE,
            "Rebalancing",
        ),
        (
            "uneven",
            |i| {
                let l = &mut i.snapshot.as_mut().unwrap().leases;
                l[2].owner = Some("c0".into());
                l[3].owner = Some("c0".into());
            },
            TRUE,
            "Rebalancing",
        ),
    ];
    for (name, edit, status, reason) in cases {
        let mut input = healthy(2, 4);
        edit(&mut input);
        let s = build_status(input);
        let c = cond(&s, PROGRESSING);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, reason),
            "case {name}: {}",
            c.message
        );
    }
}

#[test]
fn degraded_table() {
    type Edit = fn(&mut StatusInput);
    let cases: Vec<(&str, Edit, &str, &str, &str)> = vec![
        ("healthy", |_| {}, FALSE, "AsExpected", ""),
        (
            "stream not found on a worker",
            |i| {
                let c = &mut i.snapshot.as_mut().unwrap().clients[1];
                c.last_error_reason = Some("StreamNotFound".into());
                c.last_error = Some(
                    "ResourceNotFoundException: Stream orders under account 000000000000 not found"
                        .into(),
                );
            },
            TRUE,
            "StreamNotFound",
            "spec.streams[].name",
        ),
        (
            "access denied on both",
            |i| {
                for c in &mut i.snapshot.as_mut().unwrap().clients {
                    c.last_error_reason = Some("AccessDenied".into());
                    c.last_error = Some("AccessDeniedException: not authorized".into());
                }
            },
            TRUE,
            "AccessDenied",
            "and 1 more clients",
        ),
        (
            "handler failing",
            |i| {
                let c = &mut i.snapshot.as_mut().unwrap().clients[0];
                c.last_error_reason = Some("HandlerFailing".into());
                c.last_error = Some("POST http://localhost:9000: 503".into());
            },
            TRUE,
            "HandlerFailing",
            "spec.delivery",
        ),
        (
            "records dead-lettered",
            |i| {
                let c = &mut i.snapshot.as_mut().unwrap().clients[0];
                c.last_error_reason = Some("RecordsDeadLettered".into());
                c.last_error = Some("records the handler refuses on their own are dead-lettered to SQS queue https://sqs.us-east-1.amazonaws.com/1/dlq; last: sequence 4959 (2 attempts): bad amount".into());
            },
            TRUE,
            "RecordsDeadLettered",
            "replay them from the dead-letter target",
        ),
        (
            "dead-letter target failing",
            |i| {
                let c = &mut i.snapshot.as_mut().unwrap().clients[0];
                c.last_error_reason = Some("DeadLetterFailing".into());
                c.last_error = Some("record 4959 could not be dead-lettered".into());
            },
            TRUE,
            "DeadLetterFailing",
            "sqs:SendMessage",
        ),
        (
            "records skipped",
            |i| {
                let c = &mut i.snapshot.as_mut().unwrap().clients[0];
                c.last_error_reason = Some("RecordsSkipped".into());
                c.last_error = Some("records the handler refuses on their own are skipped; last: sequence 4959 (2 attempts): bad amount".into());
            },
            TRUE,
            "RecordsSkipped",
            "onFailure DeadLetter",
        ),
        (
            "a dead client's old error is ignored",
            |i| {
                let snap = i.snapshot.as_mut().unwrap();
                let mut dead = client("zz");
                dead.last_error_reason = Some("AccessDenied".into());
                snap.clients.push(dead);
            },
            FALSE,
            "AsExpected",
            "",
        ),
        (
            "state store unreadable (controller's own problem)",
            |i| {
                i.snapshot = None;
                i.problems.push(Problem::new(
                    "StateStoreUnavailable",
                    "querying table kcg-state: ResourceNotFoundException: Cannot do operations on a non-existent table",
                ));
            },
            TRUE,
            "StateStoreUnavailable",
            "non-existent table",
        ),
        (
            "invalid spec comes before worker errors",
            |i| {
                i.problems.push(Problem::new(
                    "InvalidSpec",
                    "tuning.clientTimeout: must be at least 8s with tuning.heartbeatInterval 2s",
                ));
                let c = &mut i.snapshot.as_mut().unwrap().clients[0];
                c.last_error_reason = Some("HandlerFailing".into());
            },
            TRUE,
            "InvalidSpec",
            "clientTimeout",
        ),
        (
            "pods cannot be created: the API server's words are shown",
            |i| {
                let d = i.deployment.as_mut().unwrap();
                (d.replicas, d.ready_replicas) = (0, 0);
                d.failure = DeploymentState::failure_of(&[deployment_condition(
                    "ReplicaFailure",
                    "True",
                    "FailedCreate",
                    "pods \"orders-6f8b649ffd-\" is forbidden: error looking up service account team-a/kcg-worker: serviceaccount \"kcg-worker\" not found",
                )]);
            },
            TRUE,
            "PodsNotCreated",
            "serviceaccount \"kcg-worker\" not found",
        ),
        (
            "rollout past its progress deadline",
            |i| {
                i.deployment.as_mut().unwrap().failure =
                    DeploymentState::failure_of(&[deployment_condition(
                        "Progressing",
                        "False",
                        "ProgressDeadlineExceeded",
                        "ReplicaSet \"orders-6f8b649ffd\" has timed out progressing.",
                    )]);
            },
            TRUE,
            "RolloutStalled",
            "has timed out progressing",
        ),
        (
            "the controller's own problem comes before the Deployment's",
            |i| {
                i.problems.push(Problem::new(
                    "InvalidSpec",
                    "tuning.pollInterval: too short",
                ));
                i.deployment.as_mut().unwrap().failure =
                    Some(Problem::new("PodsNotCreated", "quota exceeded"));
            },
            TRUE,
            "InvalidSpec",
            "PodsNotCreated: quota exceeded",
        ),
    ];
    for (name, edit, status, reason, needle) in cases {
        let mut input = healthy(2, 4);
        edit(&mut input);
        let s = build_status(input);
        let c = cond(&s, DEGRADED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (status, reason),
            "case {name}: {}",
            c.message
        );
        assert!(
            c.message.contains(needle),
            "case {name}: {:?} lacks {needle:?}",
            c.message
        );
        if status == TRUE {
            assert!(
                c.message.contains("fix:"),
                "case {name}: message must say what to fix"
            );
        }
    }
}

#[test]
fn last_transition_time_is_stable_across_refreshes_and_moves_on_flip() {
    let first = build_status(healthy(2, 4));
    // A refresh later with the same state keeps every transition time.
    let mut again = healthy(2, 4);
    again.previous_conditions = first.conditions.clone();
    again.now = ts(2000);
    let second = build_status(again);
    assert_eq!(
        first, second,
        "an unchanged group gives an identical status"
    );

    // One shard loses its owner: Ready, Balanced and Progressing flip, Degraded does not.
    let mut flip = healthy(2, 4);
    flip.previous_conditions = second.conditions.clone();
    flip.now = ts(3000);
    flip.snapshot.as_mut().unwrap().leases[0].owner = None;
    let third = build_status(flip);
    for t in [READY, BALANCED, PROGRESSING] {
        assert_eq!(cond(&third, t).last_transition_time, Time(ts(3000)), "{t}");
    }
    assert_eq!(cond(&third, DEGRADED).last_transition_time, Time(ts(1000)));
}

#[test]
fn status_of_1000_shards_and_100_clients_stays_under_64_kib() {
    let long_error = "x".repeat(10_000);
    for fragmented in [false, true] {
        let mut input = healthy(100, 1000);
        let snap = input.snapshot.as_mut().unwrap();
        for c in &mut snap.clients {
            c.client_id = format!(
                "{}-kcg-worker-7d9f8b6c5d-abcde-0123456789abcdef",
                c.client_id
            );
            c.pod = format!("{}-very-long-pod-name-for-a-consumer-group-worker", c.pod);
            c.last_error = Some(long_error.clone());
            c.last_error_reason = Some("HandlerFailing".into());
        }
        let ids: Vec<String> = snap.clients.iter().map(|c| c.client_id.clone()).collect();
        for (i, l) in snap.leases.iter_mut().enumerate() {
            // Fragmented: owners interleave, the worst case for ranges.
            let owner = if fragmented { i % 100 } else { i * 100 / 1000 };
            l.owner = Some(ids[owner].clone());
            l.millis_behind = Some(i as i64 * 1000);
        }
        input.live_clients = ids.into_iter().collect();
        input
            .problems
            .push(Problem::new("InvalidSpec", long_error.clone()));
        let s = build_status(input);
        let size = serde_json::to_vec(&s).unwrap().len();
        assert!(
            size < 64 * 1024,
            "fragmented={fragmented}: status is {size} bytes"
        );
        assert_eq!(s.client_count, 100);
        assert_eq!(s.shard_count, 1000);
        assert!(s.clients[0].last_error.as_ref().unwrap().chars().count() <= MAX_ERROR_CHARS);
        assert!(!s.streams[0].ranges.is_empty());
        if !fragmented {
            // The common case loses nothing: every client and one range per client.
            assert_eq!(s.clients.len(), 100);
            assert_eq!(s.streams[0].ranges.len(), 100);
        }
    }
}

#[test]
fn needs_write_ignores_fresh_heartbeats_only() {
    let base = build_status(healthy(2, 4));
    assert!(needs_write(None, &base), "first status is written");
    assert!(
        !needs_write(Some(&base), &base.clone()),
        "identical is not written"
    );

    let mut beat = base.clone();
    beat.clients[0].last_heartbeat = "2023-11-14T22:13:25Z".into(); // +5s
    assert!(
        !needs_write(Some(&base), &beat),
        "a heartbeat alone is not worth a write"
    );

    let mut stale = base.clone();
    stale.clients[0].last_heartbeat = "2023-11-14T22:14:30Z".into(); // +70s
    assert!(
        needs_write(Some(&base), &stale),
        "a published heartbeat 70s behind is refreshed"
    );

    let mut moved = beat.clone();
    moved.clients[0].owned_shards = 3;
    assert!(
        needs_write(Some(&base), &moved),
        "any other change is written"
    );

    let mut cond_flip = base.clone();
    cond_flip.conditions[0].status = "False".into();
    assert!(needs_write(Some(&base), &cond_flip));
}

fn deployment_condition(t: &str, status: &str, reason: &str, message: &str) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(t.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..DeploymentCondition::default()
    }
}

#[test]
fn deployment_failure_table() {
    let cases: Vec<(&str, Vec<DeploymentCondition>, Option<&str>)> = vec![
        ("no conditions", vec![], None),
        (
            "a healthy rollout",
            vec![
                deployment_condition("Available", "True", "MinimumReplicasAvailable", "ok"),
                deployment_condition("Progressing", "True", "NewReplicaSetAvailable", "ok"),
            ],
            None,
        ),
        (
            "pods still starting: not a failure",
            vec![deployment_condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )],
            None,
        ),
        (
            "FailedCreate copied from the ReplicaSet",
            vec![
                deployment_condition("Progressing", "True", "NewReplicaSetCreated", "ok"),
                deployment_condition("ReplicaFailure", "True", "FailedCreate", "quota"),
            ],
            Some("PodsNotCreated"),
        ),
        (
            "a cleared ReplicaFailure",
            vec![deployment_condition(
                "ReplicaFailure",
                "False",
                "FailedCreate",
                "old",
            )],
            None,
        ),
        (
            "progress deadline exceeded",
            vec![deployment_condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                "timed out",
            )],
            Some("RolloutStalled"),
        ),
        (
            "both: the pods that cannot be created are the cause",
            vec![
                deployment_condition("Progressing", "False", "ProgressDeadlineExceeded", "t"),
                deployment_condition("ReplicaFailure", "True", "FailedCreate", "quota"),
            ],
            Some("PodsNotCreated"),
        ),
    ];
    for (name, conditions, want) in cases {
        let got = DeploymentState::failure_of(&conditions);
        assert_eq!(got.as_ref().map(|p| p.reason.as_str()), want, "case {name}");
    }
}

#[test]
fn ready_points_at_the_deployment_failure() {
    let mut input = healthy(2, 4);
    let d = input.deployment.as_mut().unwrap();
    (d.replicas, d.ready_replicas, d.updated_replicas) = (0, 0, 0);
    d.failure = Some(Problem::new("PodsNotCreated", "serviceaccount not found"));
    let s = build_status(input);
    let ready = cond(&s, READY);
    assert_eq!(ready.reason, "RolloutInProgress");
    assert!(
        ready
            .message
            .contains("PodsNotCreated: see the Degraded condition"),
        "{}",
        ready.message
    );
}

#[test]
fn lag_is_published_coarse() {
    let cases = [
        (0, 0),
        (850, 0),
        (1_500, 1_000),
        (59_999, 59_000),
        (60_000, 60_000),
        (64_321, 60_000),
        (129_999, 120_000),
        (-5, 0),
    ];
    for (ms, want) in cases {
        assert_eq!(coarse_lag_millis(ms), want, "{ms}");
    }
    let mut input = healthy(2, 4);
    let snap = input.snapshot.as_mut().unwrap();
    snap.leases[0].millis_behind = Some(61_234);
    let s = build_status(input);
    assert_eq!(s.streams[0].max_lag_millis, Some(60_000));
    assert_eq!(s.max_lag.as_deref(), Some("1m"));
}

#[test]
fn retry_counters_are_kept_out_of_messages() {
    let cases = [
        (
            "the handler refused a batch of 10 records (3 attempts): 500",
            "the handler refused a batch of 10 records: 500",
        ),
        ("throttled, attempt 4 of backoff", "throttled, of backoff"),
        (
            "record 4959 could not be dead-lettered (3 attempts); the shard waits: QueueDoesNotExist",
            "record 4959 could not be dead-lettered; the shard waits: QueueDoesNotExist",
        ),
        ("no counter here", "no counter here"),
        ("1 attempt (1 attempt)", "1 attempt"),
    ];
    for (msg, want) in cases {
        assert_eq!(without_counters(msg), want, "{msg}");
    }
}
