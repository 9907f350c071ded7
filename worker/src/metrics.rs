//! Prometheus metrics of one worker. Names carry units (`_seconds`, `_total`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-shard series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    /// Stream name as configured.
    pub stream: String,
    /// Shard id.
    pub shard: String,
}

/// Labels of per-stream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// Stream name as configured.
    pub stream: String,
}

/// Labels of error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short machine-readable reason, e.g. `Throttled`, `HandlerFailing`.
    pub reason: String,
}

/// Labels of state-store request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The operation, e.g. `heartbeat`, `load_group`, `checkpoint`, `take_lease`.
    pub operation: String,
}

/// Labels of the tick-length histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `leader` or `member`: the role this client had in that tick.
    pub role: String,
}

/// Buckets of the tick and duty histograms, 1 ms to 32 s: doubling up to 128 ms, then at
/// the fractions and multiples of the default 1 s heartbeat (a quarter, a half, one...), so
/// "ticks within half a heartbeat" is a bucket boundary.
const TICK_BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0,
    32.0,
];

fn tick_histogram() -> Histogram {
    Histogram::new(TICK_BUCKETS)
}

/// Every metric a worker exports, registered in one [`Registry`].
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Records acknowledged by the handler.
    pub records_delivered: Family<StreamLabels, Counter>,
    /// Payload bytes acknowledged by the handler.
    pub bytes_delivered: Family<StreamLabels, Counter>,
    /// Batches acknowledged by the handler.
    pub batches_delivered: Family<StreamLabels, Counter>,
    /// Batches the handler rejected (each retry counts).
    pub delivery_failures: Family<StreamLabels, Counter>,
    /// Time the handler took per batch.
    pub delivery_duration: Histogram,
    /// Handler calls repeated after a refusal (`delivery.retry`), per shard.
    pub handler_retries: Family<ShardLabels, Counter>,
    /// Records skipped after exhausting their attempts (`onFailure: Skip`), per shard.
    pub records_skipped: Family<ShardLabels, Counter>,
    /// Records written to the dead-letter target (`onFailure: DeadLetter`), per shard.
    pub records_dead_lettered: Family<ShardLabels, Counter>,
    /// GetRecords calls made.
    pub get_records_calls: Family<StreamLabels, Counter>,
    /// SubscribeToShard calls made (enhanced fan-out).
    pub subscribe_calls: Family<StreamLabels, Counter>,
    /// Kinesis or DynamoDB errors, by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// MillisBehindLatest of the last GetRecords (or subscription event), per owned shard,
    /// in seconds.
    pub behind_latest: Family<ShardLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Leases this client holds.
    pub leases_held: Gauge,
    /// Leases taken over (claimed) by this client.
    pub leases_acquired: Counter,
    /// Leases released by this client.
    pub leases_released: Counter,
    /// Conditional writes that lost a race.
    pub lease_conflicts: Counter,
    /// Checkpoints written to the state store.
    pub checkpoints_written: Counter,
    /// Heartbeats written.
    pub heartbeats: Counter,
    /// Read units the state store reported for this client's reads (its `ConsumedCapacity`):
    /// what the coordination's reads cost on an on-demand table.
    pub state_store_read_units: Counter<f64, AtomicU64>,
    /// 1 while this client is the group leader.
    pub is_leader: Gauge,
    /// Live clients this client sees in the group.
    pub live_clients: Gauge,
    /// Times this client's set of owned shards changed (a rebalance reached it).
    pub rebalances: Counter,
    /// State-store requests, by operation.
    pub store_requests: Family<OperationLabels, Counter>,
    /// Length of one membership tick (heartbeat, reads, planning, handoffs), by role.
    pub tick_duration: Family<RoleLabels, Histogram, fn() -> Histogram>,
    /// Length of one background run of the leader's duties (pruning, shard caches, lease
    /// creation).
    pub leader_duties_duration: Histogram,
    /// KPL aggregates that failed their checksum or did not parse, delivered raw.
    pub deaggregation_failures: Family<ShardLabels, Counter>,
}

impl Metrics {
    /// Creates and registers every metric under the `kcg_worker` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kcg_worker");
        let records_delivered = Family::default();
        registry.register(
            "records_delivered",
            "Records acknowledged by the handler",
            records_delivered.clone(),
        );
        let bytes_delivered = Family::default();
        registry.register(
            "delivered_bytes",
            "Payload bytes acknowledged by the handler",
            bytes_delivered.clone(),
        );
        let batches_delivered = Family::default();
        registry.register(
            "batches_delivered",
            "Batches acknowledged by the handler",
            batches_delivered.clone(),
        );
        let delivery_failures = Family::default();
        registry.register(
            "delivery_failures",
            "Batch deliveries that failed and will be retried",
            delivery_failures.clone(),
        );
        let delivery_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "delivery_duration_seconds",
            "Time the handler took per batch",
            delivery_duration.clone(),
        );
        let handler_retries = Family::default();
        registry.register(
            "handler_retries",
            "Handler calls repeated after a refusal",
            handler_retries.clone(),
        );
        let records_skipped = Family::default();
        registry.register(
            "records_skipped",
            "Records skipped after exhausting their delivery attempts (onFailure Skip)",
            records_skipped.clone(),
        );
        let records_dead_lettered = Family::default();
        registry.register(
            "records_dead_lettered",
            "Records written to the dead-letter target (onFailure DeadLetter)",
            records_dead_lettered.clone(),
        );
        let get_records_calls = Family::default();
        registry.register(
            "get_records_calls",
            "GetRecords calls made",
            get_records_calls.clone(),
        );
        let subscribe_calls = Family::default();
        registry.register(
            "subscribe_calls",
            "SubscribeToShard calls made (enhanced fan-out)",
            subscribe_calls.clone(),
        );
        let errors = Family::default();
        registry.register(
            "errors",
            "Kinesis, DynamoDB and handler errors by reason",
            errors.clone(),
        );
        let behind_latest = Family::default();
        registry.register(
            "behind_latest_seconds",
            "MillisBehindLatest of the last GetRecords, in seconds",
            behind_latest.clone(),
        );
        let leases_held = Gauge::default();
        registry.register(
            "leases_held",
            "Shard leases this client holds",
            leases_held.clone(),
        );
        let leases_acquired = Counter::default();
        registry.register(
            "leases_acquired",
            "Shard leases this client took",
            leases_acquired.clone(),
        );
        let leases_released = Counter::default();
        registry.register(
            "leases_released",
            "Shard leases this client released",
            leases_released.clone(),
        );
        let lease_conflicts = Counter::default();
        registry.register(
            "lease_conflicts",
            "Conditional state-store writes that lost a race",
            lease_conflicts.clone(),
        );
        let checkpoints_written = Counter::default();
        registry.register(
            "checkpoints_written",
            "Checkpoints written to the state store",
            checkpoints_written.clone(),
        );
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Heartbeats written", heartbeats.clone());
        let state_store_read_units = Counter::<f64, AtomicU64>::default();
        registry.register(
            "state_store_read_units",
            "Read capacity units the state store reported for this client's reads",
            state_store_read_units.clone(),
        );
        let is_leader = Gauge::default();
        registry.register(
            "is_leader",
            "1 while this client is the group leader",
            is_leader.clone(),
        );
        let live_clients = Gauge::default();
        registry.register(
            "live_clients",
            "Live clients this client sees in its group",
            live_clients.clone(),
        );
        let rebalances = Counter::default();
        registry.register(
            "rebalances",
            "Times this client's set of owned shards changed",
            rebalances.clone(),
        );
        let store_requests = Family::default();
        registry.register(
            "store_requests",
            "State-store requests by operation",
            store_requests.clone(),
        );
        let tick_duration = Family::new_with_constructor(tick_histogram as fn() -> Histogram);
        registry.register(
            "tick_duration_seconds",
            "Length of one membership tick, by role (leader or member)",
            tick_duration.clone(),
        );
        let leader_duties_duration = tick_histogram();
        registry.register(
            "leader_duties_duration_seconds",
            "Length of one background run of the leader's duties",
            leader_duties_duration.clone(),
        );
        let deaggregation_failures = Family::default();
        registry.register(
            "deaggregation_failures",
            "KPL aggregated records that failed their MD5 checksum or did not parse, delivered raw",
            deaggregation_failures.clone(),
        );
        Self {
            registry,
            records_delivered,
            bytes_delivered,
            batches_delivered,
            delivery_failures,
            delivery_duration,
            handler_retries,
            records_skipped,
            records_dead_lettered,
            get_records_calls,
            subscribe_calls,
            errors,
            behind_latest,
            leases_held,
            leases_acquired,
            leases_released,
            lease_conflicts,
            checkpoints_written,
            heartbeats,
            state_store_read_units,
            is_leader,
            live_clients,
            rebalances,
            store_requests,
            tick_duration,
            leader_duties_duration,
            deaggregation_failures,
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_units() {
        let m = Metrics::new();
        m.records_delivered
            .get_or_create(&StreamLabels { stream: "s".into() })
            .inc();
        m.bytes_delivered
            .get_or_create(&StreamLabels { stream: "s".into() })
            .inc_by(10);
        m.delivery_duration.observe(0.01);
        m.store_requests
            .get_or_create(&OperationLabels {
                operation: "heartbeat".into(),
            })
            .inc();
        m.tick_duration
            .get_or_create(&RoleLabels {
                role: "leader".into(),
            })
            .observe(0.002);
        let text = m.encode();
        for name in [
            "kcg_worker_records_delivered_total{stream=\"s\"} 1",
            "kcg_worker_delivered_bytes_total{stream=\"s\"} 10",
            "kcg_worker_delivery_duration_seconds_count 1",
            "kcg_worker_store_requests_total{operation=\"heartbeat\"} 1",
            "kcg_worker_leases_held 0",
            "kcg_worker_tick_duration_seconds_count{role=\"leader\"} 1",
            "kcg_worker_leader_duties_duration_seconds_count 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
