//! `kcg-operator checkpoints show|reset` against DynamoDB Local and kinesis-local, with real
//! engines reading the stream: a group reads everything, is stopped, its checkpoints are
//! shown, reset to a timestamp, and the next run delivers exactly the records from that
//! time on again. A reset is refused while a worker is alive, and goes through once a
//! crashed worker's heartbeat has stood still for the client timeout (its leases are taken
//! back conditionally). Needs the emulators (scripts/emulators.sh); skipped without them.

#[path = "../worker/tests/group_support/mod.rs"]
mod group_support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use group_support::{Env, env};

const BIN: &str = env!("CARGO_BIN_EXE_kcg-operator");

/// Runs `kcg-operator checkpoints <action> --table T --group G <extra>`.
fn checkpoints(g: &Env, action: &str, extra: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args([
            "checkpoints",
            action,
            "--table",
            &g.table,
            "--group",
            &g.group,
        ])
        .args(extra)
        .env("KCG_LOG_FORMAT", "text")
        .output()
        .expect("run kcg-operator")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_to_a_timestamp_redelivers_from_there_and_waits_for_a_stopped_group() {
    let Some(g) = env("ckpt", 2).await else {
        return;
    };
    let early = g.put("early", 20).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = g.put("late", 20).await;
    let all: BTreeSet<String> = early.union(&late).cloned().collect();
    let to = format!("AtTimestamp={at}");

    let e1 = g.start("e1");
    g.wait_delivered(&all, Duration::from_secs(30)).await;

    // Refused while the worker runs, with the way to stop it; nothing written.
    let out = checkpoints(&g, "reset", &["--to", &to, "--client-timeout", "3s"]);
    let (_, err) = text(&out);
    assert!(!out.status.success(), "reset of a live group must fail");
    let name = g.group.split_once('/').unwrap().1;
    assert!(
        err.contains(&format!(
            "kubectl -n test patch kcg {name} --type merge -p '{{\"spec\":{{\"suspend\":true}}}}'"
        )),
        "{err}"
    );
    assert!(err.contains("client e1-"), "names the live client: {err}");

    e1.stop().await;
    let snap = g.snapshot().await;
    assert!(snap.clients.is_empty(), "a graceful stop deregisters");
    assert!(snap.leases.iter().all(|l| l.checkpoint.is_some()));

    // show: each shard's checkpoint, no owner, not ended; no clients.
    let out = checkpoints(&g, "show", &[]);
    let (shown, err) = text(&out);
    assert!(out.status.success(), "{err}");
    for l in &snap.leases {
        let line = shown
            .lines()
            .find(|line| line.contains(&l.shard_id))
            .unwrap_or_else(|| panic!("{} missing: {shown}", l.shard_id));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[..5],
            [
                g.stream.as_str(),
                l.shard_id.as_str(),
                l.checkpoint.as_deref().unwrap(),
                "-",
                "false"
            ],
            "{shown}"
        );
    }
    assert!(shown.contains("clients: none"), "{shown}");

    // Reset to the timestamp: immediate (no client rows, nothing owned).
    let out = checkpoints(&g, "reset", &["--to", &to]);
    let (said, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        said.contains(&format!("reset 2 shards of group {} to {to}", g.group)),
        "{said}"
    );
    let shown = text(&checkpoints(&g, "show", &[])).0;
    assert_eq!(
        shown.matches(&to).count(),
        2,
        "both shards restart there: {shown}"
    );

    // The next run delivers the late records again, and none of the early ones.
    g.log.deliveries.lock().unwrap().clear();
    let e2 = g.start("e2");
    g.wait_delivered(&late, Duration::from_secs(30)).await;
    // Give a wrong early record time to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        g.log.distinct_ids(),
        late,
        "exactly the records from {at} on"
    );

    // A crashed worker: its client row stays and its heartbeat stands still. The reset
    // waits the client timeout, then takes its leases back.
    e2.crash().await;
    let owned = g
        .snapshot()
        .await
        .leases
        .iter()
        .filter(|l| l.owner.is_some())
        .count();
    assert_eq!(owned, 2, "the crashed worker still owns its leases");
    let out = checkpoints(
        &g,
        "reset",
        &["--to", "TrimHorizon", "--client-timeout", "2s"],
    );
    let (said, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(said.contains("1 client rows without a heartbeat"), "{said}");
    let snap = g.snapshot().await;
    assert!(
        snap.leases
            .iter()
            .all(|l| l.owner.is_none() && l.checkpoint.is_none() && !l.ended),
        "{:?}",
        snap.leases
    );
    g.log.deliveries.lock().unwrap().clear();
    let e3 = g.start("e3");
    g.wait_delivered(&all, Duration::from_secs(30)).await;
    e3.stop().await;
    g.cleanup().await;
}
