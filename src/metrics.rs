//! Prometheus metrics of the operator. Names carry units (`_seconds`, `_total`; the
//! prometheus-client encoder appends `_total` to counters).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error kind, e.g. `Kube`, `StateStore`, `WorkersStillRunning`.
    pub reason: String,
}

/// Labels of the event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Event reason.
    pub reason: String,
}

/// Labels of the apply counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The applied object's kind: `ConfigMap`, `Deployment`.
    pub kind: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles run (`kcg_operator_reconcile_total`).
    pub reconciles: Counter,
    /// Reconciles that failed, by error kind (`kcg_operator_reconcile_errors_total`).
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration (`kcg_operator_reconcile_duration_seconds`).
    pub duration: Histogram,
    /// Status patches written (`kcg_operator_status_patches_total`); refreshes that change
    /// nothing write nothing.
    pub status_patches: Counter,
    /// Events published, by reason (`kcg_operator_events_total`).
    pub events: Family<EventLabels, Counter>,
    /// Per-group lag, shard and client gauges (`kcg_operator_group_*`).
    pub groups: crate::group_metrics::GroupMetrics,
    /// Server-side applies of owned objects, by kind (`kcg_operator_applies_total`); owned
    /// objects already as rendered are not applied, so this stays flat in a steady state.
    pub applies: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `kcg_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kcg_operator");
        let reconciles = Counter::default();
        registry.register("reconcile", "Reconciles run", reconciles.clone());
        let errors = Family::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error kind",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        let status_patches = Counter::default();
        registry.register(
            "status_patches",
            "Status patches written",
            status_patches.clone(),
        );
        let events = Family::default();
        registry.register(
            "events",
            "Kubernetes events published, by reason",
            events.clone(),
        );
        let groups = crate::group_metrics::GroupMetrics::register(&mut registry);
        let applies = Family::default();
        registry.register(
            "applies",
            "Server-side applies of owned objects, by kind",
            applies.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            status_patches,
            events,
            groups,
            applies,
        }
    }

    /// Starts timing a reconcile; the duration is observed when the guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a server-side apply of an owned object of `kind`.
    pub fn applies(&self, kind: &str) {
        self.applies
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Renders the registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_units() {
        let m = Metrics::new();
        drop(m.reconcile_started());
        m.reconcile_failed("Kube");
        let text = m.encode();
        for name in [
            "kcg_operator_reconcile_total 1",
            "kcg_operator_reconcile_errors_total{reason=\"Kube\"} 1",
            "kcg_operator_reconcile_duration_seconds_count 1",
            "kcg_operator_status_patches_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
    }
}
