//! `kcg-operator checkpoints show|reset`: a group's per-shard checkpoints, and moving them
//! for reprocessing (TrimHorizon, Latest or a timestamp).
//!
//! A reset rewrites lease rows (see docs/state-store.md, "Resetting checkpoints"): checkpoint,
//! owner and lag removed, `ended` cleared, `resetTo` set; the engine starts such a shard at
//! `resetTo` (see `kcg_worker::handoff::no_checkpoint_start`). It refuses while any client
//! of the group is alive, and every write is conditional on the row it read, so a worker that
//! comes back meanwhile is never overwritten. The decisions are pure functions below.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kcg_worker::assignment::ShardKey;
use kcg_worker::incarnation;
use kcg_worker::store::schema::{GroupSnapshot, ResetTo};
use kcg_worker::store::{ResetSeen, StateStore, StoreError};

use crate::controller::DynamoClients;

/// Which group's rows a `checkpoints` command works on.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The state-store table.
    #[arg(long)]
    pub table: String,
    /// The group, NAMESPACE/NAME.
    #[arg(long)]
    pub group: String,
    /// Only this stream (name or ARN as configured); default: every stream of the group.
    #[arg(long)]
    pub stream: Option<String>,
    /// AWS region of the table (default: the AWS default chain's).
    #[arg(long)]
    pub region: Option<String>,
}

/// Arguments of `checkpoints`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print each shard's checkpoint, owner, lag and whether it ended.
    Show(Target),
    /// Move the checkpoints of a stopped group so its next readers start at TrimHorizon,
    /// Latest or a timestamp. Refuses while a worker of the group is alive.
    Reset(ResetArgs),
}

/// Arguments of `checkpoints reset`.
#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The group and streams.
    #[command(flatten)]
    pub target: Target,
    /// Where the next readers start: TrimHorizon (the oldest retained record), Latest
    /// (records that arrive after this reset) or AtTimestamp=<RFC 3339 time>, e.g.
    /// AtTimestamp=2026-01-02T15:04:05Z.
    #[arg(long, value_parser = parse_to)]
    pub to: ResetTarget,
    /// How long a client's heartbeat must stand still before it counts as stopped: the
    /// group's tuning.clientTimeout. The command waits up to this long when the table still
    /// holds client rows or owned leases (a crashed worker), and not at all when it holds none.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub client_timeout: Duration,
}

/// What `--to` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTarget {
    /// Records that arrive after the reset: written as `AtTimestamp=<reset time>`, so what
    /// arrives between the reset and the group's start is read too.
    Latest,
    /// A position stored as is.
    At(ResetTo),
}

fn parse_to(text: &str) -> Result<ResetTarget, String> {
    if text == "Latest" {
        return Ok(ResetTarget::Latest);
    }
    text.parse()
        .map(ResetTarget::At)
        .map_err(|e| format!("{e} (or Latest)"))
}

impl ResetTarget {
    /// The restart point to store, `now` standing for Latest.
    pub fn resolve(self, now: jiff::Timestamp) -> ResetTo {
        match self {
            ResetTarget::Latest => ResetTo::AtTimestamp(now),
            ResetTarget::At(to) => to,
        }
    }
}

/// Runs a `checkpoints` command.
pub async fn run(command: Command) -> anyhow::Result<String> {
    let target = match &command {
        Command::Show(t) => t,
        Command::Reset(r) => &r.target,
    };
    if !target.group.contains('/') {
        bail!("--group must be NAMESPACE/NAME, got {:?}", target.group);
    }
    let dynamo = DynamoClients::from_env().await;
    let store = StateStore::new(
        dynamo.client(target.region.as_deref()).await,
        target.table.clone(),
    );
    match command {
        Command::Show(t) => show(&store, &t).await,
        Command::Reset(r) => reset(&store, &r).await,
    }
}

async fn load(store: &StateStore, t: &Target) -> anyhow::Result<GroupSnapshot> {
    let snap = store
        .load_group(&t.group)
        .await
        .with_context(|| format!("reading group {} from table {}", t.group, t.table))?;
    if let Some(s) = &t.stream
        && !snap.leases.iter().any(|l| &l.stream == s)
        && !snap.shard_caches.iter().any(|c| &c.stream == s)
    {
        bail!(
            "group {} has no rows for stream {s:?} in table {}",
            t.group,
            t.table
        );
    }
    if snap.leases.is_empty() && snap.shard_caches.is_empty() {
        bail!(
            "group {} has no shards in table {} (check --group and --table)",
            t.group,
            t.table
        );
    }
    Ok(snap)
}

async fn show(store: &StateStore, t: &Target) -> anyhow::Result<String> {
    let snap = load(store, t).await?;
    let resets = store
        .lease_resets(&t.group)
        .await
        .context("reading reset points")?;
    Ok(render_show(
        &snap,
        &resets,
        t.stream.as_deref(),
        jiff::Timestamp::now().as_millisecond(),
    ))
}

/// The `show` table: one line per lease row (of `stream`, when given), then the clients.
pub fn render_show(
    snap: &GroupSnapshot,
    resets: &BTreeMap<(String, String), ResetTo>,
    stream: Option<&str>,
    now_ms: i64,
) -> String {
    let mut rows = vec![
        [
            "STREAM",
            "SHARD",
            "CHECKPOINT",
            "OWNER",
            "ENDED",
            "LAG",
            "NEXT START",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for l in snap
        .leases
        .iter()
        .filter(|l| stream.is_none_or(|s| s == l.stream))
    {
        let lag = match (l.millis_behind, l.lag_at_ms) {
            (Some(mb), Some(at)) => format!(
                "{} ({} ago)",
                crate::status::human_millis(mb.max(0)),
                crate::status::human_millis((now_ms - at).max(0))
            ),
            (Some(mb), None) => crate::status::human_millis(mb.max(0)),
            _ => "-".to_owned(),
        };
        let key = ShardKey::new(&l.stream, &l.shard_id);
        let next = match (
            &l.checkpoint,
            resets.get(&(l.stream.clone(), l.shard_id.clone())),
        ) {
            // The workers replace such a row; its shard starts like a new one.
            _ if incarnation::is_older(l, incarnation::listed_start(snap, &key)) => {
                "configured start (row of a deleted stream of this name)".to_owned()
            }
            (Some(_), _) => "after checkpoint".to_owned(),
            (None, Some(to)) => to.to_string(),
            (None, None) => "configured start".to_owned(),
        };
        rows.push(vec![
            l.stream.clone(),
            l.shard_id.clone(),
            l.checkpoint.clone().unwrap_or_else(|| "-".into()),
            l.owner.clone().unwrap_or_else(|| "-".into()),
            l.ended.to_string(),
            lag,
            next,
        ]);
    }
    let mut out = crate::cli::columns(&rows);
    if snap.clients.is_empty() {
        out.push_str("clients: none\n");
    } else {
        out.push_str("clients (heartbeat counter, last heartbeat by the client's clock):\n");
        for c in &snap.clients {
            out.push_str(&format!(
                "  {}  {}  {} ago\n",
                c.client_id,
                c.heartbeat,
                crate::status::human_millis((now_ms - c.heartbeat_at_ms).max(0))
            ));
        }
    }
    out
}

/// One lease write of a reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetWrite {
    /// Stream.
    pub stream: String,
    /// Shard.
    pub shard_id: String,
    /// The row as read; the write requires it unchanged.
    pub seen: ResetSeen,
}

/// The writes of a reset: every lease row of the selected streams, and a new row for each
/// shard of their shard caches that has none yet (a child never claimed), so it too starts
/// at the reset point rather than by the parent rule. Rows of closed shards are reset too:
/// with `ended` cleared, parents are read again (from the reset point) before their
/// children, which keeps the order per partition key after resharding.
pub fn plan_reset(snap: &GroupSnapshot, stream: Option<&str>) -> Vec<ResetWrite> {
    let selected = |s: &str| stream.is_none_or(|want| want == s);
    let mut writes: Vec<ResetWrite> = snap
        .leases
        .iter()
        .filter(|l| selected(&l.stream))
        .map(|l| ResetWrite {
            stream: l.stream.clone(),
            shard_id: l.shard_id.clone(),
            seen: ResetSeen::Row {
                owner: l.owner.clone(),
                counter: l.lease_counter,
            },
        })
        .collect();
    let have: BTreeSet<(&str, &str)> = snap
        .leases
        .iter()
        .map(|l| (l.stream.as_str(), l.shard_id.as_str()))
        .collect();
    for c in snap.shard_caches.iter().filter(|c| selected(&c.stream)) {
        for s in &c.shards {
            if !have.contains(&(c.stream.as_str(), s.shard_id.as_str())) {
                writes.push(ResetWrite {
                    stream: c.stream.clone(),
                    shard_id: s.shard_id.clone(),
                    seen: ResetSeen::Missing,
                });
            }
        }
    }
    writes.sort_by(|a, b| (&a.stream, &a.shard_id).cmp(&(&b.stream, &b.shard_id)));
    writes
}

/// What moved between two reads of a group: clients whose heartbeat changed or that
/// appeared, and owners of leases whose counter changed. Any of them is a live worker.
/// Pure; counters, never clocks (see docs/state-store.md, "Why counters, not clocks").
pub fn moved(before: &GroupSnapshot, after: &GroupSnapshot) -> Vec<String> {
    let mut live = BTreeSet::new();
    for c in &after.clients {
        let was = before.clients.iter().find(|b| b.client_id == c.client_id);
        if was.is_none_or(|b| b.heartbeat != c.heartbeat) {
            live.insert(format!("client {}", c.client_id));
        }
    }
    for l in &after.leases {
        let was = before
            .leases
            .iter()
            .find(|b| b.stream == l.stream && b.shard_id == l.shard_id);
        if was.is_some_and(|b| b.lease_counter != l.lease_counter) {
            let by = l.owner.as_deref().unwrap_or("a worker");
            live.insert(format!("lease {}/{} (by {by})", l.stream, l.shard_id));
        }
    }
    live.into_iter().collect()
}

/// Whether anything in the group could still be alive: client rows or owned leases.
pub fn needs_watch(snap: &GroupSnapshot) -> bool {
    !snap.clients.is_empty() || snap.leases.iter().any(|l| l.owner.is_some())
}

fn refusal(group: &str, what: &[String]) -> anyhow::Error {
    let name = group.split_once('/').map_or(group, |(_, n)| n);
    let ns = group.split_once('/').map_or("default", |(ns, _)| ns);
    anyhow::anyhow!(
        "group {group} is still running ({}): stop it first with `kubectl -n {ns} patch kcg {name} --type merge -p '{{\"spec\":{{\"suspend\":true}}}}'` (outside Kubernetes, stop the kcg-worker processes), wait until its workers are gone (`kcg-operator checkpoints show` lists no clients), then reset again",
        what.join(", ")
    )
}

async fn reset(store: &StateStore, args: &ResetArgs) -> anyhow::Result<String> {
    let t = &args.target;
    let mut snap = load(store, t).await?;
    // A single read cannot tell a live client from a dead one: watch the counters for up
    // to a client timeout, and refuse as soon as one moves.
    if needs_watch(&snap) {
        let first = snap.clone();
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            snap = load(store, t).await?;
            let live = moved(&first, &snap);
            if !live.is_empty() {
                return Err(refusal(&t.group, &live));
            }
            if start.elapsed() >= args.client_timeout {
                break;
            }
        }
    }
    let to = args.to.resolve(jiff::Timestamp::now());
    let writes = plan_reset(&snap, t.stream.as_deref());
    let mut done = 0;
    for w in &writes {
        match store
            .reset_lease(
                &t.group,
                &w.stream,
                &w.shard_id,
                &w.seen,
                to,
                incarnation::listed_start(&snap, &ShardKey::new(&w.stream, &w.shard_id)),
            )
            .await
        {
            Ok(()) => done += 1,
            Err(e @ StoreError::Conflict { .. }) => {
                return Err(refusal(
                    &t.group,
                    &[format!(
                        "lease {}/{} changed while resetting; {done} of {} shards were reset: {e}",
                        w.stream,
                        w.shard_id,
                        writes.len()
                    )],
                ));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "resetting {}/{} ({done} of {} shards were reset; run the reset again)",
                        w.stream,
                        w.shard_id,
                        writes.len()
                    )
                });
            }
        }
    }
    let stale = snap.clients.len();
    let mut out = format!(
        "reset {done} shards of group {} to {to}; the next workers start there\n",
        t.group
    );
    if stale > 0 {
        out.push_str(&format!(
            "{stale} client rows without a heartbeat for {:?} were treated as stopped\n",
            args.client_timeout
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcg_worker::store::schema::{ClientRow, LeaseRow, ShardCacheRow, ShardInfo};

    fn lease(shard: &str, owner: Option<&str>, counter: u64, ended: bool) -> LeaseRow {
        LeaseRow {
            owner: owner.map(str::to_owned),
            lease_counter: counter,
            ended,
            checkpoint: Some("49".into()),
            ..LeaseRow::unowned("ns/g", "s", shard, 0)
        }
    }

    fn client(id: &str, heartbeat: u64) -> ClientRow {
        ClientRow {
            pk: "ns/g".into(),
            sk: format!("client#{id}"),
            client_id: id.into(),
            pod: "p".into(),
            heartbeat,
            heartbeat_at_ms: 0,
            started_at_ms: 0,
            owned_shards: 0,
            last_error: None,
            last_error_reason: None,
            expires_at: 0,
            streams: None,
            streams_digest: None,
            lease_changes: 0,
            shard_changes: None,
        }
    }

    fn shard(id: &str, parent: Option<&str>) -> ShardInfo {
        ShardInfo {
            starting_sequence: None,
            shard_id: id.into(),
            parent: parent.map(str::to_owned),
            adjacent_parent: None,
            closed: parent.is_none(),
        }
    }

    fn snap(clients: Vec<ClientRow>, leases: Vec<LeaseRow>) -> GroupSnapshot {
        GroupSnapshot {
            clients,
            shard_caches: vec![ShardCacheRow {
                pk: "ns/g".into(),
                sk: "shards#s".into(),
                stream: "s".into(),
                shards: vec![
                    shard("0", None),
                    shard("1", Some("0")),
                    shard("2", Some("0")),
                ],
                refreshed_at_ms: 0,
                refreshed_by: "c".into(),
            }],
            leases,
        }
    }

    #[test]
    fn moved_names_live_clients_and_leases() {
        let base = snap(
            vec![client("a", 5), client("b", 9)],
            vec![lease("0", Some("a"), 3, false), lease("1", None, 1, false)],
        );
        // (name, after, want)
        let cases = [
            ("nothing moved", base.clone(), vec![]),
            (
                "a heartbeat moved",
                snap(vec![client("a", 6), client("b", 9)], base.leases.clone()),
                vec!["client a"],
            ),
            (
                "a client came back",
                snap(
                    vec![client("a", 5), client("b", 9), client("c", 1)],
                    base.leases.clone(),
                ),
                vec!["client c"],
            ),
            (
                "a lease was claimed",
                snap(
                    base.clients.clone(),
                    vec![
                        lease("0", Some("a"), 3, false),
                        lease("1", Some("d"), 2, false),
                    ],
                ),
                vec!["lease s/1 (by d)"],
            ),
            (
                "a client left (deregistered): not live",
                snap(vec![client("a", 5)], base.leases.clone()),
                vec![],
            ),
        ];
        for (name, after, want) in cases {
            assert_eq!(moved(&base, &after), want, "{name}");
        }
    }

    #[test]
    fn plan_covers_every_row_and_unclaimed_children() {
        let s = snap(
            vec![],
            vec![
                lease("0", Some("dead"), 7, true),
                lease("1", None, 2, false),
            ],
        );
        let got = plan_reset(&s, None);
        let want = vec![
            ResetWrite {
                stream: "s".into(),
                shard_id: "0".into(),
                seen: ResetSeen::Row {
                    owner: Some("dead".into()),
                    counter: 7,
                },
            },
            ResetWrite {
                stream: "s".into(),
                shard_id: "1".into(),
                seen: ResetSeen::Row {
                    owner: None,
                    counter: 2,
                },
            },
            ResetWrite {
                stream: "s".into(),
                shard_id: "2".into(),
                seen: ResetSeen::Missing,
            },
        ];
        assert_eq!(got, want);
        assert!(plan_reset(&s, Some("other")).is_empty());
        assert_eq!(plan_reset(&s, Some("s")), want);
    }

    #[test]
    fn watch_only_when_something_could_be_alive() {
        assert!(!needs_watch(&snap(vec![], vec![lease("0", None, 1, true)])));
        assert!(needs_watch(&snap(vec![client("a", 1)], vec![])));
        assert!(needs_watch(&snap(
            vec![],
            vec![lease("0", Some("a"), 1, false)]
        )));
    }

    #[test]
    fn to_parses_the_three_positions() {
        let t: jiff::Timestamp = "2026-01-02T15:04:05Z".parse().unwrap();
        assert_eq!(parse_to("Latest"), Ok(ResetTarget::Latest));
        assert_eq!(
            parse_to("TrimHorizon"),
            Ok(ResetTarget::At(ResetTo::TrimHorizon))
        );
        assert_eq!(
            parse_to("AtTimestamp=2026-01-02T15:04:05Z"),
            Ok(ResetTarget::At(ResetTo::AtTimestamp(t)))
        );
        assert!(parse_to("Earliest").unwrap_err().contains("or Latest"));
        assert_eq!(
            ResetTarget::Latest.resolve(t),
            ResetTo::AtTimestamp(t),
            "Latest is the reset time"
        );
    }

    #[test]
    fn show_marks_rows_of_a_deleted_stream() {
        // Shard 2 of the listed stream starts at 500; the row's checkpoint (49) and stamp
        // come from the deleted stream of that name.
        let mut s = snap(vec![], vec![lease("2", None, 3, true)]);
        s.shard_caches[0].shards[2].starting_sequence = Some("500".into());
        s.leases[0].shard_start = Some("40".into());
        let text = render_show(&s, &BTreeMap::new(), None, 10_000);
        let line = text.lines().nth(1).expect("row");
        assert!(
            line.ends_with("configured start (row of a deleted stream of this name)"),
            "{text}"
        );
        // The reset stamps the row for the shard now listed.
        assert_eq!(
            incarnation::listed_start(&s, &ShardKey::new("s", "2")),
            Some("500")
        );
    }

    #[test]
    fn show_lists_checkpoint_owner_ended_lag_and_next_start() {
        let mut l0 = lease("0", None, 7, true);
        l0.millis_behind = Some(1500);
        l0.lag_at_ms = Some(8_000);
        let mut l1 = lease("1", Some("w-1"), 2, false);
        l1.checkpoint = None;
        let s = snap(vec![client("w-1", 4)], vec![l0, l1]);
        let resets = BTreeMap::from([(("s".to_owned(), "1".to_owned()), ResetTo::TrimHorizon)]);
        let text = render_show(&s, &resets, None, 10_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("CHECKPOINT") && lines[0].contains("NEXT START"),
            "{text}"
        );
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1]),
            [
                "s",
                "0",
                "49",
                "-",
                "true",
                "1s",
                "(2s",
                "ago)",
                "after",
                "checkpoint"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            ["s", "1", "-", "w-1", "false", "-", "TrimHorizon"]
        );
        assert!(text.contains("w-1  4"), "{text}");
    }
}
