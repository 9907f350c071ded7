//! State-store semantics against a real DynamoDB (DynamoDB Local in CI).
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB`. When it is not set the tests print why and skip; when
//! it is set but unreachable they fail.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use kcg_worker::position::Position;
use kcg_worker::store::schema::{ShardCacheRow, ShardInfo, lease_sk, shards_sk};
use kcg_worker::store::{
    CheckpointUpdate, ClaimStamp, Consistency, HeartbeatUpdate, StateStore, StoreError,
};

#[path = "group_support/relay.rs"]
#[allow(dead_code)] // this binary uses a subset
mod relay;

use relay::Relay;

async fn store(test: &str) -> Option<StateStore> {
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        eprintln!(
            "SKIP {test}: AWS_ENDPOINT_URL_DYNAMODB is not set (start DynamoDB Local, see scripts/emulators.sh)"
        );
        return None;
    }
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let table = format!("kcg-test-{test}-{}", suffix());
    let store = StateStore::new(client, table);
    store.create_table().await.expect("create table");
    Some(store)
}

fn suffix() -> String {
    use rand::Rng;
    format!("{:08x}", rand::rng().random::<u32>())
}

const G: &str = "ns/group";

#[tokio::test]
async fn create_table_is_idempotent_and_missing_table_is_explained() {
    if std::env::var("AWS_ENDPOINT_URL_DYNAMODB").is_err() {
        eprintln!("SKIP: AWS_ENDPOINT_URL_DYNAMODB is not set");
        return;
    }
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let table = format!("kcg-test-create-{}", suffix());
    let store = StateStore::new(client.clone(), table.clone());

    let err = store
        .ensure_table(false)
        .await
        .expect_err("missing table must be an error");
    assert!(matches!(err, StoreError::TableMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&table) && msg.contains("stateStore.create"),
        "{msg}"
    );
    // Reads against a missing table classify the same way.
    let err = store
        .load_group(G)
        .await
        .expect_err("query on missing table");
    assert!(matches!(err, StoreError::TableMissing { .. }), "{err:?}");

    store.ensure_table(true).await.expect("create when missing");
    store.create_table().await.expect("second create is fine");
    store.ensure_table(false).await.expect("exists now");
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .expect("ttl");
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.attribute_name()),
        Some("expiresAt")
    );
    assert!(
        store
            .load_group(G)
            .await
            .expect("empty group")
            .clients
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_claimers_exactly_one_wins() {
    let Some(store) = store("claim").await else {
        return;
    };
    for shard in ["shardId-0", "shardId-1"] {
        // shardId-0 has a row, shardId-1 does not: claim creates it, still exclusively.
        if shard == "shardId-0" {
            assert!(store.create_lease(G, "s", shard).await.expect("create"));
            assert!(
                !store
                    .create_lease(G, "s", shard)
                    .await
                    .expect("create again"),
                "second create is a no-op"
            );
        }
        let claims = (0..8).map(|i| {
            let store = store.clone();
            async move {
                store
                    .claim_lease(G, "s", shard, &format!("c{i}"), None)
                    .await
            }
        });
        let results = futures::future::join_all(claims).await;
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{shard}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(e.is_conflict(), "losers get Conflict, got {e:?}");
            }
        }
        let snap = store.load_group(G).await.expect("load");
        let lease = snap
            .leases
            .iter()
            .find(|l| l.shard_id == shard)
            .expect("lease row");
        assert_eq!(lease.owner.as_deref(), winners[0].owner.as_deref());
        assert_eq!(lease.lease_counter, winners[0].lease_counter);
        assert!(!lease.ended);
    }
}

#[tokio::test]
async fn old_owner_cannot_write_after_takeover() {
    let Some(store) = store("steal").await else {
        return;
    };
    let a = store
        .claim_lease(G, "s", "sh", "a", None)
        .await
        .expect("a claims");
    let cp = |seq: &str| CheckpointUpdate {
        position: Some(Position::whole(seq)),
        ended: false,
        millis_behind: Some(5),
        lag_at_ms: Some(1),
    };
    let c1 = a.lease_counter;
    store
        .checkpoint(G, "s", "sh", "a", c1, &cp("100"))
        .await
        .expect("a checkpoints");
    let snap = store.load_group(G).await.expect("load");
    assert_eq!(
        snap.leases[0].lease_counter, c1,
        "a checkpoint leaves the counter"
    );
    // A write under an older counter (a late write of an earlier reader) is refused: it
    // cannot move the checkpoint back.
    let err = store
        .checkpoint(G, "s", "sh", "a", c1 - 1, &cp("50"))
        .await
        .expect_err("late write");
    assert!(err.is_conflict());
    // b watched a's heartbeat stand still: takeover conditional on (a, c1).
    let err = store
        .claim_lease(G, "s", "sh", "b", Some(("a", c1 - 1)))
        .await
        .expect_err("stale observation");
    assert!(err.is_conflict());
    let err = store
        .claim_lease(G, "s", "sh", "b", Some(("x", c1)))
        .await
        .expect_err("wrong owner");
    assert!(err.is_conflict());
    let b = store
        .claim_lease(G, "s", "sh", "b", Some(("a", c1)))
        .await
        .expect("b takes over");
    assert_eq!(b.owner.as_deref(), Some("b"));
    assert_eq!(b.lease_counter, c1 + 1, "a claim moves the counter");
    assert_eq!(
        b.checkpoint.as_deref(),
        Some("100"),
        "resume point comes with the claim"
    );
    // a lost it: every write is refused, the new owner's state is intact.
    for res in [
        store.checkpoint(G, "s", "sh", "a", c1, &cp("150")).await,
        store
            .release_lease(G, "s", "sh", "a", c1, &cp("150"))
            .await
            .map(|_| ()),
        store.resume_lease(G, "s", "sh", "a").await.map(|_| ()),
    ] {
        assert!(res.as_ref().is_err_and(StoreError::is_conflict), "{res:?}");
    }
    store
        .checkpoint(G, "s", "sh", "b", b.lease_counter, &cp("200"))
        .await
        .expect("b checkpoints");
    let snap = store.load_group(G).await.expect("load");
    assert_eq!(snap.leases[0].owner.as_deref(), Some("b"));
    assert_eq!(snap.leases[0].checkpoint.as_deref(), Some("200"));
    assert_eq!(snap.leases[0].millis_behind, Some(5));
}

/// A checkpoint inside a KPL aggregate is `checkpoint` + `checkpointSubSequence`; a later
/// whole-record checkpoint removes the sub-sequence, so the row never pairs a new sequence
/// with an old sub-sequence.
#[tokio::test]
async fn checkpoint_inside_an_aggregate_round_trips() {
    let Some(store) = store("subseq").await else {
        return;
    };
    let a = store
        .claim_lease(G, "s", "sh", "a", None)
        .await
        .expect("claim");
    let at = |p: Position| CheckpointUpdate {
        position: Some(p),
        ..Default::default()
    };
    store
        .checkpoint(
            G,
            "s",
            "sh",
            "a",
            a.lease_counter,
            &at(Position::sub("42", 3)),
        )
        .await
        .expect("checkpoint inside the aggregate");
    let snap = store.load_group(G).await.expect("load");
    assert_eq!(snap.leases[0].checkpoint.as_deref(), Some("42"));
    assert_eq!(snap.leases[0].checkpoint_sub_sequence, Some(3));
    assert_eq!(
        snap.leases[0].checkpoint_position(),
        Some(Position::sub("42", 3))
    );
    // Released inside the aggregate: the next owner gets the same position.
    store
        .release_lease(
            G,
            "s",
            "sh",
            "a",
            a.lease_counter,
            &at(Position::sub("42", 7)),
        )
        .await
        .expect("release");
    let b = store
        .claim_lease(G, "s", "sh", "b", None)
        .await
        .expect("claim b");
    assert_eq!(b.checkpoint_position(), Some(Position::sub("42", 7)));
    store
        .checkpoint(
            G,
            "s",
            "sh",
            "b",
            b.lease_counter,
            &at(Position::whole("50")),
        )
        .await
        .expect("whole record");
    let snap = store.load_group(G).await.expect("load");
    assert_eq!(snap.leases[0].checkpoint_sub_sequence, None);
    assert_eq!(
        snap.leases[0].checkpoint_position(),
        Some(Position::whole("50"))
    );
}

#[tokio::test]
async fn release_writes_final_checkpoint_and_frees_the_lease() {
    let Some(store) = store("release").await else {
        return;
    };
    let a = store
        .claim_lease(G, "s", "sh", "a", None)
        .await
        .expect("claim");
    store
        .release_lease(
            G,
            "s",
            "sh",
            "a",
            a.lease_counter,
            &CheckpointUpdate {
                position: Some(Position::whole("42")),
                ..Default::default()
            },
        )
        .await
        .expect("release");
    let snap = store.load_group(G).await.expect("load");
    let l = &snap.leases[0];
    assert_eq!(l.owner, None);
    assert_eq!(l.checkpoint.as_deref(), Some("42"));
    assert_eq!(
        l.lease_counter,
        a.lease_counter + 1,
        "release moves the counter"
    );
    // A checkpoint with no sequence leaves the stored one alone.
    let b = store
        .claim_lease(G, "s", "sh", "b", None)
        .await
        .expect("next owner claims at once");
    assert_eq!(b.checkpoint.as_deref(), Some("42"));
    store
        .checkpoint(
            G,
            "s",
            "sh",
            "b",
            b.lease_counter,
            &CheckpointUpdate {
                millis_behind: Some(0),
                ..Default::default()
            },
        )
        .await
        .expect("lag only");
    // The first claim is remembered: a later claim or resume is not "first".
    let first = store
        .claim_lease_detailed(G, "s", "fresh", "a", None, ClaimStamp::now())
        .await
        .expect("first claim");
    assert!(first.first_claim);
    let t = first.first_claimed_at_ms.expect("first claim time");
    let resumed = store
        .resume_lease(G, "s", "fresh", "a")
        .await
        .expect("resume");
    assert_eq!(
        (resumed.first_claim, resumed.first_claimed_at_ms),
        (false, Some(t))
    );
    assert_eq!(resumed.row.lease_counter, first.row.lease_counter + 1);
    assert!(
        store
            .resume_lease(G, "s", "fresh", "b")
            .await
            .is_err_and(|e| e.is_conflict())
    );
    store
        .release_lease(
            G,
            "s",
            "fresh",
            "a",
            resumed.row.lease_counter,
            &CheckpointUpdate::default(),
        )
        .await
        .expect("release fresh");
    let again = store
        .claim_lease_detailed(G, "s", "fresh", "b", None, ClaimStamp::now())
        .await
        .expect("second claim");
    assert_eq!(
        (again.first_claim, again.first_claimed_at_ms),
        (false, Some(t))
    );
    assert_eq!(again.row.checkpoint, None);
    // Ended: released with ended=true, never claimable again.
    store
        .release_lease(
            G,
            "s",
            "sh",
            "b",
            b.lease_counter,
            &CheckpointUpdate {
                position: Some(Position::whole("43")),
                ended: true,
                ..Default::default()
            },
        )
        .await
        .expect("release ended");
    let err = store
        .claim_lease(G, "s", "sh", "c", None)
        .await
        .expect_err("ended is not claimable");
    assert!(err.is_conflict());
    let snap = store.load_group(G).await.expect("load");
    let sh = snap
        .leases
        .iter()
        .find(|l| l.shard_id == "sh")
        .expect("row");
    assert!(sh.ended);
    assert_eq!(sh.checkpoint.as_deref(), Some("43"));
    // Unowned rows can be cleaned up; owned ones cannot.
    store
        .claim_lease(G, "s", "other", "c", None)
        .await
        .expect("claim other");
    assert!(
        store
            .delete_lease(G, "s", "other")
            .await
            .is_err_and(|e| e.is_conflict())
    );
    store
        .delete_lease(G, "s", "sh")
        .await
        .expect("delete unowned");
}

/// A restarted container of the same pod (same pod UID) replaces its predecessor's row, with
/// a heartbeat starting again; without a pod UID, or with another pod's, the id clashes.
#[tokio::test]
async fn register_in_the_same_pod_replaces_the_earlier_incarnation() {
    let Some(store) = store("pod-restart").await else {
        return;
    };
    let uid = Some("uid-1");
    store
        .register_in_pod(G, "w-1", "pod-1", 1, &[], uid)
        .await
        .expect("first incarnation");
    for _ in 0..3 {
        store
            .heartbeat(G, "w-1", &HeartbeatUpdate::default())
            .await
            .expect("heartbeat");
    }
    for (pod_uid, why) in [(None, "no pod UID"), (Some("uid-2"), "another pod's UID")] {
        let err = store
            .register_in_pod(G, "w-1", "pod-1", 2, &[], pod_uid)
            .await
            .expect_err(why);
        assert!(err.is_conflict(), "{why}: {err}");
    }
    store
        .register_in_pod(G, "w-1", "pod-1", 2, &[], uid)
        .await
        .expect("the restarted container");
    let clients = store.load_clients(G).await.expect("clients");
    assert_eq!(clients.len(), 1);
    assert_eq!(
        (clients[0].heartbeat, clients[0].started_at_ms),
        (1, 2),
        "the new incarnation's row, its heartbeat counted from 1 again"
    );
    // The pod UID stays on the row through heartbeats: the next restart proves it again.
    store
        .heartbeat(G, "w-1", &HeartbeatUpdate::default())
        .await
        .expect("heartbeat");
    store
        .register_in_pod(G, "w-1", "pod-1", 3, &[], uid)
        .await
        .expect("a second restart");
}

#[tokio::test]
async fn a_client_row_carries_a_digest_and_its_stream_list_lives_apart() {
    use kcg_worker::store::schema::{MAX_LAST_ERROR_CHARS, streams_digest};
    let Some(store) = store("clientlists").await else {
        return;
    };
    let streams: Vec<String> = (0..5)
        .map(|i| format!("orders-events-production-eu-west-1-{i}"))
        .collect();
    let row = store
        .register(G, "c1-abc", "pod-1", 1, &streams)
        .await
        .expect("register");
    store
        .register(G, "c2-abc", "pod-2", 1, &streams[..1])
        .await
        .expect("register c2");
    // The per-tick read returns the digest, not the list, and no list rows.
    let clients = store.load_clients(G).await.expect("clients");
    assert_eq!(clients.len(), 2);
    assert_eq!(clients[0], row);
    assert_eq!(row.streams, None);
    assert_eq!(row.streams_digest, Some(streams_digest(&streams)));
    let list = store
        .load_client_streams(G, "c1-abc")
        .await
        .expect("list")
        .expect("c1 has a list");
    assert_eq!(
        (list.streams.clone(), list.streams_digest.clone()),
        (streams.clone(), streams_digest(&streams))
    );
    // A long error is clipped in the row everyone reads.
    let long = "x".repeat(3 * MAX_LAST_ERROR_CHARS);
    store
        .heartbeat(
            G,
            "c1-abc",
            &HeartbeatUpdate {
                last_error: Some(("KinesisUnavailable".into(), long)),
                ..HeartbeatUpdate::default()
            },
        )
        .await
        .expect("heartbeat");
    let clients = store.load_clients(G).await.expect("clients");
    let err = clients[0].last_error.as_deref().expect("error recorded");
    assert_eq!(err.chars().count(), MAX_LAST_ERROR_CHARS);
    assert!(err.ends_with('…'));
    // Both rows go: a graceful stop, and a prune.
    store.deregister(G, "c1-abc").await.expect("deregister");
    store.prune_client(G, "c2-abc", 1).await.expect("prune");
    assert!(
        store
            .load_client_streams(G, "c1-abc")
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .load_client_streams(G, "c2-abc")
            .await
            .expect("read")
            .is_none()
    );
    assert!(store.load_group(G).await.expect("group").clients.is_empty());
}

#[tokio::test]
async fn heartbeat_and_conditional_prune() {
    let Some(store) = store("clients").await else {
        return;
    };
    store
        .register(G, "c1-abc", "pod-1", 1, &[])
        .await
        .expect("register");
    // A retry by the same incarnation (its first answer lost, its write landed) succeeds;
    // another incarnation under the same id is a clash.
    store
        .register(G, "c1-abc", "pod-1", 1, &[])
        .await
        .expect("the same incarnation registering again");
    let err = store
        .register(G, "c1-abc", "pod-1", 2, &[])
        .await
        .expect_err("another incarnation with the same id");
    assert!(err.is_conflict());
    let hb = store
        .heartbeat(
            G,
            "c1-abc",
            &HeartbeatUpdate {
                owned_shards: 3,
                lease_changes: 5,
                shard_changes: 2,
                last_error: Some(("HandlerFailing".into(), "sidecar answers 500".into())),
            },
        )
        .await
        .expect("heartbeat");
    assert_eq!(hb, 2);
    let snap = store.load_group(G).await.expect("load");
    let c = &snap.clients[0];
    assert_eq!(
        (
            c.heartbeat,
            c.owned_shards,
            c.lease_changes,
            c.shard_changes,
            c.pod.as_str()
        ),
        (2, 3, 5, Some(2), "pod-1")
    );
    // The member's per-tick read: the client rows only.
    assert_eq!(store.load_clients(G).await.expect("clients"), snap.clients);
    assert_eq!(c.last_error_reason.as_deref(), Some("HandlerFailing"));
    assert!(c.expires_at > c.heartbeat_at_ms / 1000, "TTL in the future");
    store
        .heartbeat(G, "c1-abc", &HeartbeatUpdate::default())
        .await
        .expect("heartbeat clears error");
    let snap = store.load_group(G).await.expect("load");
    assert_eq!(snap.clients[0].last_error, None);
    assert_eq!(snap.clients[0].heartbeat, 3);

    // The leader watched counter 2; the client moved on to 3: no prune.
    let err = store
        .prune_client(G, "c1-abc", 2)
        .await
        .expect_err("moved on");
    assert!(err.is_conflict());
    store
        .prune_client(G, "c1-abc", 3)
        .await
        .expect("prune the stuck counter");
    let err = store
        .heartbeat(G, "c1-abc", &HeartbeatUpdate::default())
        .await
        .expect_err("pruned");
    assert!(
        err.is_conflict(),
        "a pruned client learns it from its heartbeat"
    );
    store
        .register(G, "c2-def", "pod-2", 1, &[])
        .await
        .expect("register");
    store.deregister(G, "c2-def").await.expect("deregister");
    assert!(store.load_group(G).await.expect("load").clients.is_empty());
}

/// A member's per-tick read of 50 client rows (5-10 KB): an eventually consistent read costs
/// half the read units of a consistent one, as the store reports them from DynamoDB's
/// `ConsumedCapacity`; both return the same rows once the writes settled.
#[tokio::test]
async fn eventually_consistent_client_reads_cost_half() {
    let Some(store) = store("ecreads").await else {
        return;
    };
    for i in 0..50 {
        let id = format!("cost-{i:03}-abc123");
        store
            .register(G, &id, &format!("cost-{i:03}"), 1_764_806_400_000, &[])
            .await
            .expect("register");
    }
    let units = |f: f64| store.read_units() - f;
    let start = store.read_units();
    let strong = store
        .load_clients_read(G, Consistency::Strong)
        .await
        .expect("strong");
    let after_strong = units(start);
    let eventual = store
        .load_clients_read(G, Consistency::Eventual)
        .await
        .expect("eventual");
    let after_eventual = units(start) - after_strong;
    assert_eq!(strong.len(), 50);
    assert_eq!(eventual, strong);
    assert!(after_strong >= 2.0, "50 rows span more than 4 KB");
    assert_eq!(after_eventual * 2.0, after_strong);
}

#[tokio::test]
async fn a_range_read_returns_exactly_the_lease_rows_between_its_keys() {
    let Some(store) = store("rangeread").await else {
        return;
    };
    let shard = |i: usize| format!("shardId-{i:012}");
    for i in 0..12 {
        store
            .claim_lease(G, "s", &shard(i), "c-1", None)
            .await
            .expect("claim");
    }
    // Rows around the range that it must not return: another stream whose name extends
    // this one, a client row, a shard cache, another group.
    store
        .claim_lease(G, "s-2", &shard(5), "c-1", None)
        .await
        .expect("claim s-2");
    store
        .claim_lease("ns/other", "s", &shard(5), "c-1", None)
        .await
        .expect("claim other group");
    store
        .register(G, "c-1", "pod", 1, &[])
        .await
        .expect("register");
    let before = store.read_units();
    let got = store
        .load_lease_range(G, &lease_sk("s", &shard(3)), &lease_sk("s", &shard(7)))
        .await
        .expect("range");
    let ids: Vec<(&str, &str)> = got
        .iter()
        .map(|l| (l.stream.as_str(), l.shard_id.as_str()))
        .collect();
    let want: Vec<String> = (3..=7).map(shard).collect();
    assert_eq!(
        ids,
        want.iter().map(|s| ("s", s.as_str())).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|l| l.owner.as_deref() == Some("c-1")));
    // Five small rows: one read unit (a whole-group Query of this table costs the same, but
    // at a thousand shards the range is billed for its rows alone).
    assert_eq!(store.read_units() - before, 1.0);
    let none = store
        .load_lease_range(G, &lease_sk("s", &shard(20)), &lease_sk("s", &shard(30)))
        .await
        .expect("empty range");
    assert!(none.is_empty());
}

/// Writes 18 shard caches of 1,500 shards each into group `G` (`stream-00` to `stream-17`):
/// about 1.6 MB in one partition, more than one 1 MB Query page. Returns their shard list.
async fn two_pages_of_caches(store: &StateStore) -> Vec<ShardInfo> {
    let shards: Vec<ShardInfo> = (0..1500)
        .map(|i| ShardInfo {
            starting_sequence: None,
            shard_id: format!("shardId-{i:012}"),
            parent: (i > 0).then(|| format!("shardId-{:012}", i - 1)),
            adjacent_parent: None,
            closed: i % 2 == 0,
        })
        .collect();
    let streams: Vec<String> = (0..18).map(|i| format!("stream-{i:02}")).collect();
    let writes = streams.iter().map(|name| {
        let store = store.clone();
        let row = ShardCacheRow {
            pk: G.into(),
            sk: shards_sk(name),
            stream: name.clone(),
            shards: shards.clone(),
            refreshed_at_ms: 1,
            refreshed_by: "c".into(),
        };
        async move { store.put_shard_cache(&row).await }
    });
    for r in futures::future::join_all(writes).await {
        r.expect("put cache");
    }
    shards
}

#[tokio::test]
async fn a_paged_read_is_bounded_page_by_page() {
    let Some(direct) = store("pagebound").await else {
        return;
    };
    two_pages_of_caches(&direct).await;
    let relay = Relay::to_dynamodb().await;
    relay.delay(&["DynamoDB_20120810.Query"], Duration::from_millis(800));
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(relay.url())
        .load()
        .await;
    let via_relay = |page_timeout| {
        StateStore::new(aws_sdk_dynamodb::Client::new(&conf), direct.table())
            .with_page_timeout(page_timeout)
    };

    // Two pages, each answered 0.8 s late: 1.6 s in all, more than one page's bound of
    // 1.5 s, and still read, because each page is within it.
    let started = Instant::now();
    let read = via_relay(Duration::from_millis(1500))
        .load_leases(G)
        .await
        .expect("every page within its bound");
    assert_eq!(read.shard_caches.len(), 18, "both pages");
    assert!(
        relay.delayed_requests() >= 2,
        "every page went through the delay"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1600),
        "two delayed pages took {:?}",
        started.elapsed()
    );

    // A page later than its bound fails the read as the store being unavailable.
    let err = via_relay(Duration::from_millis(300))
        .load_leases(G)
        .await
        .expect_err("a page past its bound");
    assert!(
        matches!(err, StoreError::Unavailable { .. }) && err.to_string().contains("no page within"),
        "{err}"
    );
}

#[tokio::test]
async fn load_group_pages_and_isolates_groups() {
    let Some(store) = store("paging").await else {
        return;
    };
    let shards = two_pages_of_caches(&store).await;
    for i in 0..30 {
        store
            .create_lease(G, "stream-00", &format!("shardId-{i:012}"))
            .await
            .expect("lease");
    }
    store
        .register("ns/other", "x-1", "p", 1, &[])
        .await
        .expect("other group");
    store.register(G, "c-1", "p", 1, &[]).await.expect("client");
    store
        .create_lease("ns/other", "stream-00", "shardId-000000000000")
        .await
        .expect("other lease");

    let snap = store.load_group(G).await.expect("load");
    let got: BTreeSet<&str> = snap
        .shard_caches
        .iter()
        .map(|c| c.stream.as_str())
        .collect();
    assert_eq!(got.len(), 18, "every row across pages");
    assert!(snap.shard_caches.iter().all(|c| c.shards == shards));
    assert_eq!(snap.leases.len(), 30);
    assert_eq!(snap.clients.len(), 1, "other group's rows are not ours");
    // The two partial reads a member makes: client rows only; leases and caches only
    // (paged like the whole group).
    let clients = store.load_clients(G).await.expect("clients");
    assert_eq!(clients, snap.clients);
    let leases = store.load_leases(G).await.expect("leases");
    assert!(leases.clients.is_empty());
    assert_eq!(
        (leases.leases, leases.shard_caches),
        (snap.leases.clone(), snap.shard_caches.clone())
    );
    assert!(
        snap.leases
            .windows(2)
            .all(|w| w[0].shard_id < w[1].shard_id),
        "sorted"
    );
    let other = store.load_group("ns/other").await.expect("load other");
    assert_eq!(
        (
            other.clients.len(),
            other.leases.len(),
            other.shard_caches.len()
        ),
        (1, 1, 0)
    );
}

/// A stream that split and merged down to 10,000 shards (open and closed within retention),
/// with ids as long as Kinesis makes them: 5,000 closed roots, then children with one or
/// two parents.
fn big_shard_list(n: usize) -> Vec<ShardInfo> {
    let id = |i: usize| format!("shardId-{i:012}");
    let half = n / 2;
    (0..n)
        .map(|i| ShardInfo {
            starting_sequence: None,
            shard_id: id(i),
            parent: (i >= half).then(|| id(i - half)),
            adjacent_parent: (i >= half && i.is_multiple_of(7) && i - half + 1 < half)
                .then(|| id(i - half + 1)),
            closed: i < half,
        })
        .collect()
}

/// The part rows of a stream, as stored (sort keys).
async fn part_keys(store: &StateStore, stream: &str) -> Vec<String> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let out = client
        .query()
        .table_name(store.table())
        .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
        .expression_attribute_values(":pk", AttributeValue::S(G.into()))
        .expression_attribute_values(":p", AttributeValue::S(format!("shardpart#{stream}#")))
        .consistent_read(true)
        .send()
        .await
        .expect("query parts");
    out.items()
        .iter()
        .filter_map(|i| i.get("sk").and_then(|v| v.as_s().ok()).cloned())
        .collect()
}

#[tokio::test]
async fn missing_caches_are_read_alone_split_ones_joined() {
    let Some(store) = store("missingcaches").await else {
        return;
    };
    let cache = |stream: &str, shards: usize| ShardCacheRow {
        pk: G.into(),
        sk: shards_sk(stream),
        stream: stream.into(),
        shards: big_shard_list(shards),
        refreshed_at_ms: 1,
        refreshed_by: "leader-1".into(),
    };
    // "orders" is split into parts; "orders-2" (whose name extends it) and "audit" are
    // not asked for; "refunds" has no cache yet.
    let orders = cache("orders", 1_200);
    for row in [&orders, &cache("orders-2", 3), &cache("audit", 2)] {
        store.put_shard_cache(row).await.expect("put cache");
    }
    assert!(
        !part_keys(&store, "orders").await.is_empty(),
        "orders is split"
    );
    for i in 0..3 {
        store
            .claim_lease(G, "orders", &format!("shardId-{i:012}"), "c-1", None)
            .await
            .expect("claim");
    }
    let got = store
        .load_shard_caches(G, &["orders".to_owned(), "refunds".to_owned()])
        .await
        .expect("load caches");
    assert_eq!(got, vec![orders]);
    assert!(
        store
            .load_shard_caches(G, &["refunds".to_owned()])
            .await
            .expect("load none")
            .is_empty()
    );
}

#[tokio::test]
async fn shard_cache_of_10000_shards_round_trips_and_members_plan() {
    use kcg_worker::assignment::{plan, streams_from_snapshot};
    let Some(store) = store("bigcache").await else {
        return;
    };
    let stream = "arn:aws:kinesis:eu-west-1:123456789012:stream/orders-events-production";
    let mut row = ShardCacheRow {
        pk: G.into(),
        sk: shards_sk(stream),
        stream: stream.into(),
        shards: big_shard_list(10_000),
        refreshed_at_ms: 1,
        refreshed_by: "leader-1".into(),
    };
    // What the leader calls when the shard list changed.
    store
        .put_shard_cache(&row)
        .await
        .expect("put 10,000 shards");
    let first_parts = part_keys(&store, stream).await;
    assert_eq!(first_parts.len(), 20);

    // What the operator reads, and what a member reads.
    let snap = store.load_group(G).await.expect("load group");
    assert_eq!(snap.shard_caches, vec![row.clone()]);
    let member = store.load_leases(G).await.expect("load leases");
    assert_eq!(member.shard_caches, vec![row.clone()]);

    // Members plan from it: the 5,000 roots are consumable, spread over the clients; one
    // ended root makes its children consumable too.
    store
        .create_lease(G, stream, "shardId-000000000000")
        .await
        .expect("lease");
    let held = store
        .claim_lease(G, stream, "shardId-000000000000", "c-1", None)
        .await
        .expect("claim");
    let ended = CheckpointUpdate {
        position: Some(Position::whole("1")),
        ended: true,
        ..CheckpointUpdate::default()
    };
    store
        .release_lease(
            G,
            stream,
            "shardId-000000000000",
            "c-1",
            held.lease_counter,
            &ended,
        )
        .await
        .expect("end");
    let member = store.load_leases(G).await.expect("load leases");
    let shards = streams_from_snapshot(&[stream.to_owned()], &member);
    let consumable = &shards[0].consumable;
    assert_eq!(
        consumable.len(),
        5_000 - 1 + 1,
        "roots but the ended one, plus its child"
    );
    assert!(consumable.contains(&"shardId-000000005000".to_owned()));
    let live: Vec<String> = ["c-1", "c-2", "c-3"].map(str::to_owned).to_vec();
    let planned = plan(&shards, &live);
    assert_eq!(
        planned.len(),
        consumable.len(),
        "every consumable shard has an owner"
    );

    // A new shard: the cache is written again under a new generation and the old parts go.
    row.shards.push(ShardInfo {
        starting_sequence: None,
        shard_id: "shardId-000000010000".into(),
        parent: None,
        adjacent_parent: None,
        closed: false,
    });
    store
        .put_shard_cache(&row)
        .await
        .expect("put 10,001 shards");
    let second_parts = part_keys(&store, stream).await;
    assert_eq!(second_parts.len(), 21);
    assert!(second_parts.iter().all(|sk| !first_parts.contains(sk)));
    let snap = store.load_group(G).await.expect("load group");
    assert_eq!(snap.shard_caches, vec![row.clone()]);

    // A part missing under its head (a reader raced a rewrite that never finished): the
    // stream is left out rather than read short; the leader's next write repairs it.
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    client
        .delete_item()
        .table_name(store.table())
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S(G.into()))
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S(second_parts[3].clone()),
        )
        .send()
        .await
        .expect("delete a part");
    assert!(
        store
            .load_group(G)
            .await
            .expect("load")
            .shard_caches
            .is_empty()
    );
    store.put_shard_cache(&row).await.expect("rewrite");
    assert_eq!(
        store.load_leases(G).await.expect("load").shard_caches,
        vec![row.clone()]
    );

    // Trimmed down to a few shards: one row again, in the format every version reads, and
    // no parts left.
    row.shards.truncate(3);
    store.put_shard_cache(&row).await.expect("put 3 shards");
    assert!(part_keys(&store, stream).await.is_empty());
    let item = client
        .get_item()
        .table_name(store.table())
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S(G.into()))
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S(shards_sk(stream)),
        )
        .consistent_read(true)
        .send()
        .await
        .expect("get head");
    let legacy: ShardCacheRow =
        serde_dynamo::from_item(item.item().cloned().expect("head")).expect("old format");
    assert_eq!(legacy, row);
    assert_eq!(
        store.load_group(G).await.expect("load").shard_caches,
        vec![row]
    );
}

#[tokio::test]
async fn a_shard_cache_row_of_an_older_worker_is_read() {
    let Some(store) = store("legacycache").await else {
        return;
    };
    let row = ShardCacheRow {
        pk: G.into(),
        sk: shards_sk("s"),
        stream: "s".into(),
        shards: big_shard_list(40),
        refreshed_at_ms: 5,
        refreshed_by: "old-leader".into(),
    };
    // A newer leader wrote a split cache of the stream...
    let split = ShardCacheRow {
        shards: big_shard_list(1_200),
        ..row.clone()
    };
    store.put_shard_cache(&split).await.expect("split cache");
    assert_eq!(part_keys(&store, "s").await.len(), 3);
    // ...then an older leader (rolling upgrade) put its whole row over the head, with the
    // same serializer: that row is the cache, the parts it leaves behind are ignored.
    let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    client
        .put_item()
        .table_name(store.table())
        .set_item(Some(serde_dynamo::to_item(&row).expect("item")))
        .send()
        .await
        .expect("put legacy row");
    assert_eq!(
        store.load_group(G).await.expect("load").shard_caches,
        vec![row.clone()]
    );
    // The next write of a newer leader removes them.
    store.put_shard_cache(&row).await.expect("put");
    assert!(part_keys(&store, "s").await.is_empty());
    assert_eq!(
        store.load_group(G).await.expect("load").shard_caches,
        vec![row]
    );
}
