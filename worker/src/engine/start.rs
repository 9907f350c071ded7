//! Where a reader starts when its lease holds no checkpoint.

use super::*;

/// Whether one of the shard's parents (per the leader's cache) has an ended lease here.
pub(super) fn parent_read_to_end(snap: &GroupSnapshot, key: &ShardKey) -> bool {
    let Some(info) = snap
        .shard_caches
        .iter()
        .find(|c| c.stream == key.stream)
        .and_then(|c| c.shards.iter().find(|s| s.shard_id == key.shard_id))
    else {
        return false;
    };
    info.parents().any(|p| {
        snap.leases
            .iter()
            .any(|l| l.stream == key.stream && l.shard_id == p && l.ended)
    })
}

/// The stream config a reader gets: the configured one, with the start position replaced
/// as [`no_checkpoint_start`] decided when the lease holds no checkpoint.
pub(super) fn start_config(
    configured: &StreamConfig,
    row: &LeaseRow,
    fresh: FreshStart,
) -> StreamConfig {
    let mut stream = configured.clone();
    if row.checkpoint.is_some() {
        return stream;
    }
    match fresh {
        FreshStart::Configured => {}
        FreshStart::TrimHorizon => {
            stream.start_position = StartPosition::TrimHorizon;
            stream.start_timestamp = None;
        }
        FreshStart::AtTimestampMs(ms) => {
            if let Ok(t) = jiff::Timestamp::from_millisecond(ms) {
                stream.start_position = StartPosition::AtTimestamp;
                stream.start_timestamp = Some(t);
            }
        }
    }
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_config_table() {
        let configured: StreamConfig =
            serde_yaml::from_str("name: s\nstartPosition: Latest").expect("stream");
        let row = |cp: Option<&str>| LeaseRow {
            owner: Some("me".into()),
            lease_counter: 1,
            checkpoint: cp.map(str::to_owned),
            ..LeaseRow::unowned("ns/g", "s", "x", 0)
        };
        let ts = |ms: i64| jiff::Timestamp::from_millisecond(ms).ok();
        // (name, checkpoint, decision, want position, want timestamp)
        let cases = [
            (
                "configured",
                None,
                FreshStart::Configured,
                StartPosition::Latest,
                None,
            ),
            (
                "child",
                None,
                FreshStart::TrimHorizon,
                StartPosition::TrimHorizon,
                None,
            ),
            (
                "handoff",
                None,
                FreshStart::AtTimestampMs(1_700_000_000_000),
                StartPosition::AtTimestamp,
                ts(1_700_000_000_000),
            ),
            (
                "a checkpoint wins",
                Some("42"),
                FreshStart::TrimHorizon,
                StartPosition::Latest,
                None,
            ),
        ];
        for (name, cp, fresh, pos, at) in cases {
            let got = start_config(&configured, &row(cp), fresh);
            assert_eq!(
                (got.start_position, got.start_timestamp),
                (pos, at),
                "{name}"
            );
        }
    }
}
