//! Per-group gauges for alerting and autoscaling on lag:
//! `kcg_operator_group_max_lag_seconds{namespace,group,stream}`,
//! `kcg_operator_group_shards{namespace,group}` and `kcg_operator_group_clients{namespace,group}`.
//!
//! They are set from every status the operator computes (so they move with the status, every
//! refresh) and removed when the group is deleted, so a gone group leaves no stale series
//! behind for an alert or a scaler to act on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::crd::KinesisConsumerGroupStatus;

/// Labels of the per-group gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// Namespace of the KinesisConsumerGroup.
    pub namespace: String,
    /// Name of the KinesisConsumerGroup.
    pub group: String,
}

/// Labels of the per-stream lag gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// Namespace of the KinesisConsumerGroup.
    pub namespace: String,
    /// Name of the KinesisConsumerGroup.
    pub group: String,
    /// The stream as named in the spec.
    pub stream: String,
}

/// What the gauges of one group should read, decided from its status.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupValues {
    /// Consumable shards over all streams.
    pub shards: i64,
    /// Live clients.
    pub clients: i64,
    /// Largest lag per stream, in seconds, for the streams whose lag is known (a stream
    /// nobody has read yet has no series rather than a misleading 0).
    pub lag_seconds: BTreeMap<String, f64>,
}

impl GroupValues {
    /// The gauge values of `status`. Pure.
    pub fn from_status(status: &KinesisConsumerGroupStatus) -> Self {
        Self {
            shards: i64::from(status.shard_count),
            clients: i64::from(status.client_count),
            lag_seconds: status
                .streams
                .iter()
                .filter_map(|s| {
                    s.max_lag_millis
                        .map(|ms| (s.name.clone(), ms.max(0) as f64 / 1000.0))
                })
                .collect(),
        }
    }
}

/// The per-group gauges, and which stream series each group has, to remove them.
#[derive(Default)]
pub struct GroupMetrics {
    max_lag: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    shards: Family<GroupLabels, Gauge>,
    clients: Family<GroupLabels, Gauge>,
    streams: Mutex<HashMap<GroupLabels, BTreeSet<String>>>,
}

impl GroupMetrics {
    /// Creates the gauges and registers them in `registry` (prefix `kcg_operator`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "group_max_lag_seconds",
            "Largest MillisBehindLatest over a stream's shards, in seconds, per group and stream",
            m.max_lag.clone(),
        );
        registry.register(
            "group_shards",
            "Consumable shards of a group over all its streams",
            m.shards.clone(),
        );
        registry.register(
            "group_clients",
            "Live clients (workers) of a group",
            m.clients.clone(),
        );
        m
    }

    /// Sets the gauges of group `namespace/group` from its freshly computed status; a
    /// stream that no longer has a lag (or left the spec) loses its series.
    pub fn observe(&self, namespace: &str, group: &str, status: &KinesisConsumerGroupStatus) {
        let values = GroupValues::from_status(status);
        let key = GroupLabels {
            namespace: namespace.to_owned(),
            group: group.to_owned(),
        };
        self.shards.get_or_create(&key).set(values.shards);
        self.clients.get_or_create(&key).set(values.clients);
        let now: BTreeSet<String> = values.lag_seconds.keys().cloned().collect();
        let before = self.lock().insert(key.clone(), now).unwrap_or_default();
        for stream in before.difference(&values.lag_seconds.keys().cloned().collect()) {
            self.max_lag.remove(&stream_labels(&key, stream));
        }
        for (stream, seconds) in &values.lag_seconds {
            self.max_lag
                .get_or_create(&stream_labels(&key, stream))
                .set(*seconds);
        }
    }

    /// Removes every series of group `namespace/group` (it was deleted).
    pub fn forget(&self, namespace: &str, group: &str) {
        let key = GroupLabels {
            namespace: namespace.to_owned(),
            group: group.to_owned(),
        };
        self.shards.remove(&key);
        self.clients.remove(&key);
        for stream in self.lock().remove(&key).unwrap_or_default() {
            self.max_lag.remove(&stream_labels(&key, &stream));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupLabels, BTreeSet<String>>> {
        // A poisoned lock only means a panic elsewhere; the map holds plain values.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stream_labels(group: &GroupLabels, stream: &str) -> StreamLabels {
    StreamLabels {
        namespace: group.namespace.clone(),
        group: group.group.clone(),
        stream: stream.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::StreamStatus;

    fn status(
        shards: i32,
        clients: i32,
        lags: &[(&str, Option<i64>)],
    ) -> KinesisConsumerGroupStatus {
        KinesisConsumerGroupStatus {
            shard_count: shards,
            client_count: clients,
            streams: lags
                .iter()
                .map(|(name, ms)| StreamStatus {
                    name: (*name).into(),
                    max_lag_millis: *ms,
                    ..StreamStatus::default()
                })
                .collect(),
            ..KinesisConsumerGroupStatus::default()
        }
    }

    /// Name, status, shards, clients, lag seconds per stream.
    type Case = (
        &'static str,
        KinesisConsumerGroupStatus,
        i64,
        i64,
        &'static [(&'static str, f64)],
    );

    #[test]
    fn values_from_status() {
        let cases: &[Case] = &[
            ("empty status", status(0, 0, &[]), 0, 0, &[]),
            (
                "lag in seconds per stream",
                status(8, 3, &[("orders", Some(1500)), ("clicks", Some(0))]),
                8,
                3,
                &[("clicks", 0.0), ("orders", 1.5)],
            ),
            (
                "unknown lag: no series",
                status(4, 2, &[("orders", None)]),
                4,
                2,
                &[],
            ),
        ];
        for (name, s, shards, clients, lags) in cases {
            let v = GroupValues::from_status(s);
            assert_eq!((v.shards, v.clients), (*shards, *clients), "{name}");
            let want: BTreeMap<String, f64> =
                lags.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
            assert_eq!(v.lag_seconds, want, "{name}");
        }
    }

    #[test]
    fn observe_sets_and_forget_removes() {
        let mut registry = Registry::with_prefix("kcg_operator");
        let m = GroupMetrics::register(&mut registry);
        let text = |r: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, r).unwrap();
            out
        };
        m.observe(
            "ns",
            "g",
            &status(4, 2, &[("a", Some(2500)), ("b", Some(100))]),
        );
        let t = text(&registry);
        for want in [
            "kcg_operator_group_max_lag_seconds{namespace=\"ns\",group=\"g\",stream=\"a\"} 2.5",
            "kcg_operator_group_max_lag_seconds{namespace=\"ns\",group=\"g\",stream=\"b\"} 0.1",
            "kcg_operator_group_shards{namespace=\"ns\",group=\"g\"} 4",
            "kcg_operator_group_clients{namespace=\"ns\",group=\"g\"} 2",
        ] {
            assert!(t.contains(want), "{want} missing in:\n{t}");
        }
        // Stream b left the spec: its series goes.
        m.observe("ns", "g", &status(4, 2, &[("a", Some(0))]));
        let t = text(&registry);
        assert!(!t.contains("stream=\"b\""), "{t}");
        assert!(t.contains("stream=\"a\"} 0.0"), "{t}");
        m.forget("ns", "g");
        let t = text(&registry);
        assert!(!t.contains("group=\"g\""), "{t}");
    }
}
