//! Prometheus metrics of one worker. Names carry units (`_seconds`, `_total`).

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

/// Every metric a worker exports, registered in one [`Registry`].
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Records acknowledged by the handler.
    pub records_delivered: Family<StreamLabels, Counter>,
    /// Batches the handler rejected (each retry counts).
    pub delivery_failures: Family<StreamLabels, Counter>,
    /// Time the handler took per batch.
    pub delivery_duration: Histogram,
    /// GetRecords calls made.
    pub get_records_calls: Family<StreamLabels, Counter>,
    /// Kinesis or DynamoDB errors, by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// MillisBehindLatest of the last GetRecords, per owned shard, in seconds.
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
    /// 1 while this client is the group leader.
    pub is_leader: Gauge,
    /// Live clients this client sees in the group.
    pub live_clients: Gauge,
}

impl Metrics {
    /// Creates and registers every metric under the `kcg_worker` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kcg_worker");
        let records_delivered = Family::default();
        registry.register("records_delivered", "Records acknowledged by the handler", records_delivered.clone());
        let delivery_failures = Family::default();
        registry.register("delivery_failures", "Batch deliveries that failed and will be retried", delivery_failures.clone());
        let delivery_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("delivery_duration_seconds", "Time the handler took per batch", delivery_duration.clone());
        let get_records_calls = Family::default();
        registry.register("get_records_calls", "GetRecords calls made", get_records_calls.clone());
        let errors = Family::default();
        registry.register("errors", "Kinesis, DynamoDB and handler errors by reason", errors.clone());
        let behind_latest = Family::default();
        registry.register("behind_latest_seconds", "MillisBehindLatest of the last GetRecords, in seconds", behind_latest.clone());
        let leases_held = Gauge::default();
        registry.register("leases_held", "Shard leases this client holds", leases_held.clone());
        let leases_acquired = Counter::default();
        registry.register("leases_acquired", "Shard leases this client took", leases_acquired.clone());
        let leases_released = Counter::default();
        registry.register("leases_released", "Shard leases this client released", leases_released.clone());
        let lease_conflicts = Counter::default();
        registry.register("lease_conflicts", "Conditional state-store writes that lost a race", lease_conflicts.clone());
        let checkpoints_written = Counter::default();
        registry.register("checkpoints_written", "Checkpoints written to the state store", checkpoints_written.clone());
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Heartbeats written", heartbeats.clone());
        let is_leader = Gauge::default();
        registry.register("is_leader", "1 while this client is the group leader", is_leader.clone());
        let live_clients = Gauge::default();
        registry.register("live_clients", "Live clients this client sees in its group", live_clients.clone());
        Self {
            registry,
            records_delivered,
            delivery_failures,
            delivery_duration,
            get_records_calls,
            errors,
            behind_latest,
            leases_held,
            leases_acquired,
            leases_released,
            lease_conflicts,
            checkpoints_written,
            heartbeats,
            is_leader,
            live_clients,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
