//! Kinesis' clock, as its answers tell it. Every Kinesis response carries a `Date` header
//! (whole seconds, the service's clock); the offset between it and our wall clock at the
//! moment the answer arrived gives "now" on Kinesis' clock. What a worker records for
//! others to compare with Kinesis' arrival timestamps (the first claim of a LATEST shard)
//! uses it, so a pod whose clock is off does not move that point.
//!
//! The header is truncated to the second and read after the answer travelled, so the
//! estimate is early by up to about a second plus the answer's transit: a start position
//! taken from it can only include a few more records, never skip any.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef;
use aws_smithy_types::date_time::{DateTime, Format};

/// Marks the offset as not measured yet.
const UNKNOWN: i64 = i64::MIN;

/// Kinesis' clock relative to ours. Cheap to clone; clones share the measurement.
#[derive(Clone, Debug)]
pub struct KinesisClock {
    offset_ms: Arc<AtomicI64>,
}

impl Default for KinesisClock {
    fn default() -> Self {
        Self {
            offset_ms: Arc::new(AtomicI64::new(UNKNOWN)),
        }
    }
}

impl KinesisClock {
    /// Now on Kinesis' clock (Unix ms), from our wall clock `local_now_ms`; `None` before
    /// any answer was seen.
    pub fn now_ms(&self, local_now_ms: i64) -> Option<i64> {
        match self.offset_ms.load(Ordering::Relaxed) {
            UNKNOWN => None,
            offset => Some(local_now_ms.saturating_add(offset)),
        }
    }

    /// Records an answer's `Date` header, received at `local_ms` on our wall clock.
    /// Headers that do not parse are ignored.
    pub fn observe(&self, date: &str, local_ms: i64) {
        if let Some(offset) = offset_ms(date, local_ms) {
            self.offset_ms.store(offset, Ordering::Relaxed);
        }
    }

    /// The interceptor that feeds this clock from every response of a client.
    pub fn interceptor(&self) -> DateHeader {
        DateHeader(self.clone())
    }
}

/// Kinesis' clock minus ours, from a `Date` header (RFC 7231, e.g. `Fri, 04 Dec 2026
/// 00:22:17 GMT`) received at `local_ms`.
pub fn offset_ms(date: &str, local_ms: i64) -> Option<i64> {
    let at = DateTime::from_str(date.trim(), Format::HttpDate).ok()?;
    let at_ms = at.to_millis().ok()?;
    Some(at_ms - local_ms)
}

/// Reads the `Date` header of every response into a [`KinesisClock`].
#[derive(Debug)]
pub struct DateHeader(KinesisClock);

impl Intercept for DateHeader {
    fn name(&self) -> &'static str {
        "kcg.KinesisClock"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            self.0.observe(date, crate::store::now_ms());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_table() {
        // 2026-12-04T00:22:17Z
        let kinesis = 1_796_343_737_000;
        let cases = [
            (
                "same clock",
                "Fri, 04 Dec 2026 00:22:17 GMT",
                kinesis,
                Some(0),
            ),
            (
                "ours two minutes ahead",
                "Fri, 04 Dec 2026 00:22:17 GMT",
                kinesis + 120_000,
                Some(-120_000),
            ),
            (
                "ours behind, answer within the second",
                "Fri, 04 Dec 2026 00:22:17 GMT",
                kinesis - 5_400,
                Some(5_400),
            ),
            ("not a date", "yesterday", kinesis, None),
        ];
        for (name, date, local, want) in cases {
            assert_eq!(offset_ms(date, local), want, "{name}");
        }
    }

    #[test]
    fn clock_is_unknown_until_an_answer_came() {
        let clock = KinesisClock::default();
        assert_eq!(clock.now_ms(1_000), None);
        clock.observe("Fri, 04 Dec 2026 00:22:17 GMT", 1_796_343_737_000 + 120_000);
        assert_eq!(clock.clone().now_ms(2_000_000), Some(2_000_000 - 120_000));
        clock.observe("garbage", 0);
        assert_eq!(clock.now_ms(0), Some(-120_000), "kept");
    }
}
