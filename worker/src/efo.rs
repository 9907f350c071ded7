//! Enhanced fan-out: a leased shard's records pushed through SubscribeToShard instead of
//! polled with GetRecords. Only the source differs: delivery, commit tracking, checkpoints,
//! lag and issues go through the same [`Reader`] steps as polling.
//!
//! A subscription lasts up to 5 minutes; the reader then subscribes again after the
//! continuation sequence number of the last event it delivered (AFTER_SEQUENCE_NUMBER), so
//! nothing is skipped or repeated. The first subscription starts where the polling reader's
//! first iterator would (the checkpoint, else the configured start). The last event of a
//! closed shard carries its ChildShards: the shard then ends exactly like a polled shard
//! end (once every batch is committed), and the leader's shard listing starts the children
//! after their parents. The decisions are the pure functions below, table-tested.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::SubscribeToShardEventStream;
use tracing::{debug, info, warn};

use crate::config::StreamConfig;
use crate::kinesis::{ErrorKind, IteratorStart, ShardSubscription};
use crate::position::Position;
use crate::reader::{Exit, Issue, Reader, iterator_start, kinesis_backoff, pin_start};

/// Kinesis allows one SubscribeToShard call per second per shard and consumer.
pub const MIN_SUBSCRIBE_GAP: Duration = Duration::from_secs(1);

/// Kinesis pushes an event at least every few seconds on a live subscription, records or
/// not; this long without one means the connection is dead, and the reader subscribes again.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the next subscription starts: right after the continuation sequence number of
/// the last event delivered, when there is one (it is at or past the last delivered
/// record); else where the polling reader would take its next iterator (after the last
/// delivered record, the pinned first start, or the configured start).
pub fn subscribe_start(
    continuation: Option<&str>,
    delivered: Option<&Position>,
    pinned: Option<&IteratorStart>,
    stream: &StreamConfig,
) -> IteratorStart {
    match continuation {
        Some(c) if !c.is_empty() => IteratorStart::After(c.to_owned()),
        _ => iterator_start(delivered, pinned, stream),
    }
}

/// What an event means beyond its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventStep {
    /// More will come: remember the continuation.
    Continue,
    /// The shard is closed and read to its end (the event names its children, or carries
    /// no continuation).
    ShardEnd,
}

/// The step for an event with this continuation and this many child shards. Pure.
pub fn event_step(continuation: &str, child_shards: usize) -> EventStep {
    if child_shards > 0 || continuation.is_empty() {
        EventStep::ShardEnd
    } else {
        EventStep::Continue
    }
}

/// What the reader does when a subscription fails (the call, or the open event stream).
/// Every failure drops the subscription and waits (backoff) before the next one; whether
/// it is shown as an issue is [`crate::reader::should_report`]'s call, as for polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureAction {
    /// Look the stream consumer up (or register it) again before the next subscription:
    /// a "not found" may mean it was deregistered.
    pub forget_consumer: bool,
}

/// The reaction to a failed subscription. Pure.
pub fn on_subscription_error(kind: ErrorKind) -> FailureAction {
    FailureAction {
        forget_consumer: kind == ErrorKind::StreamNotFound,
    }
}

/// Reads the reader's shard through SubscribeToShard until it ends or the reader stops.
pub(crate) async fn run(r: &mut Reader) -> Result<(), Exit> {
    let client = r.task.client.clone();
    let shard: Arc<str> = Arc::from(r.task.shard_id.as_str());
    let Some(name) = r.task.stream.consumer.name.clone() else {
        // The engine fills in the default name (WorkerConfig::with_consumer_names).
        r.set_issue(Some(Issue {
            reason: "InvalidSpec".into(),
            message: format!(
                "stream {}: enhanced fan-out needs streams[].consumer.name",
                client.name
            ),
        }));
        r.stop.cancelled().await;
        return Err(Exit::Stopped);
    };
    let mut subscription: Option<ShardSubscription> = None;
    let mut continuation: Option<String> = None;
    let mut backoff = kinesis_backoff();
    let mut last_subscribe: Option<Instant> = None;
    loop {
        if r.stop.is_cancelled() {
            return Err(Exit::Stopped);
        }
        if r.make_room().await? {
            // Redelivering from the committed prefix: a new subscription from there.
            subscription = None;
            continuation = None;
            continue;
        }
        let Some(events) = subscription.as_mut() else {
            if let Some(at) = last_subscribe {
                let gap = MIN_SUBSCRIBE_GAP.saturating_sub(at.elapsed());
                if !gap.is_zero() {
                    r.sleep(gap).await?;
                }
            }
            let stop = r.stop.clone();
            let consumer = tokio::select! {
                c = client.consumer_arn(&name) => c,
                _ = stop.cancelled() => return Err(Exit::Stopped),
            };
            let consumer = match consumer {
                Ok(arn) => arn,
                Err(e) => {
                    r.kinesis_failed(&e, &backoff);
                    let d = backoff.next_delay();
                    r.sleep(d).await?;
                    continue;
                }
            };
            let start = subscribe_start(
                continuation.as_deref(),
                r.delivered.as_ref(),
                r.pinned.as_ref(),
                &r.task.stream,
            );
            debug!(?start, consumer = %name, "subscribing to the shard");
            let requested_at = jiff::Timestamp::now();
            last_subscribe = Some(Instant::now());
            r.m.metrics.subscribe_calls.get_or_create(&r.m.stream).inc();
            let got = tokio::select! {
                s = client.subscribe(&consumer, &shard, &start) => s,
                _ = stop.cancelled() => return Err(Exit::Stopped),
            };
            match got {
                Ok(s) => {
                    if r.pinned.is_none() {
                        r.pinned = pin_start(&start, requested_at);
                    }
                    subscription = Some(s);
                }
                Err(e) => {
                    if on_subscription_error(e.kind()).forget_consumer {
                        client.forget_consumer().await;
                    }
                    r.kinesis_failed(&e, &backoff);
                    let d = backoff.next_delay();
                    r.sleep(d).await?;
                }
            }
            continue;
        };
        let stop = r.stop.clone();
        let got = tokio::select! {
            e = tokio::time::timeout(IDLE_TIMEOUT, events.recv()) => e,
            _ = stop.cancelled() => return Err(Exit::Stopped),
        };
        match got {
            Err(_) => {
                warn!(
                    idle_secs = IDLE_TIMEOUT.as_secs(),
                    "no event on the subscription; subscribing again"
                );
                subscription = None;
            }
            // Subscriptions end after 5 minutes: go on from the last event.
            Ok(Ok(None)) => {
                debug!(resume_after = ?continuation, "subscription ended; subscribing again");
                subscription = None;
            }
            Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => {
                backoff.reset();
                let children = event.child_shards.as_deref().unwrap_or_default();
                let step = event_step(&event.continuation_sequence_number, children.len());
                if step == EventStep::ShardEnd {
                    let ids: Vec<&str> = children.iter().map(|c| c.shard_id.as_str()).collect();
                    info!(children = ?ids, "subscription reached the shard's end");
                }
                let records = client.records(&shard, event.records);
                match r.accept(records, Some(event.millis_behind_latest)).await {
                    Ok(()) => {}
                    Err(Exit::Rewind) => {
                        // The handler lost its place: a new subscription after the
                        // committed position.
                        r.rewind();
                        subscription = None;
                        continuation = None;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                match step {
                    EventStep::Continue => {
                        continuation = Some(event.continuation_sequence_number);
                    }
                    EventStep::ShardEnd => {
                        subscription = None;
                        if r.finish().await? {
                            return Ok(());
                        }
                        continuation = None;
                    }
                }
            }
            Ok(Ok(Some(other))) => debug!(event = ?other, "unknown subscription event; ignored"),
            Ok(Err(e)) => {
                subscription = None;
                let e = client.subscription_error(&shard, e);
                if on_subscription_error(e.kind()).forget_consumer {
                    client.forget_consumer().await;
                }
                r.kinesis_failed(&e, &backoff);
                let d = backoff.next_delay();
                r.sleep(d).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::should_report;

    #[test]
    fn subscribe_start_table() {
        let latest: StreamConfig = serde_yaml::from_str("name: s").unwrap();
        let trim: StreamConfig =
            serde_yaml::from_str("name: s\nstartPosition: TrimHorizon").unwrap();
        let pinned = IteratorStart::TrimHorizon;
        let after = |s: &str| IteratorStart::After(s.into());
        // (name, continuation, delivered, pinned, stream, want)
        let cases = [
            (
                "first subscription, no checkpoint",
                None,
                None,
                None,
                &latest,
                IteratorStart::Latest,
            ),
            (
                "from the checkpoint",
                None,
                Some("5"),
                None,
                &latest,
                after("5"),
            ),
            (
                "configured start",
                None,
                None,
                None,
                &trim,
                IteratorStart::TrimHorizon,
            ),
            (
                "resubscribe after the last event, even past the last record",
                Some("9"),
                Some("7"),
                None,
                &latest,
                after("9"),
            ),
            (
                "resubscribe before any record: never LATEST again",
                None,
                None,
                Some(pinned.clone()),
                &latest,
                pinned.clone(),
            ),
            (
                "an empty continuation counts as none",
                Some(""),
                Some("7"),
                None,
                &latest,
                after("7"),
            ),
        ];
        for (name, cont, delivered, pinned, stream, want) in cases {
            let delivered = delivered.map(Position::parse);
            assert_eq!(
                subscribe_start(cont, delivered.as_ref(), pinned.as_ref(), stream),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn event_step_table() {
        let cases = [
            ("495", 0, EventStep::Continue),
            ("495", 2, EventStep::ShardEnd), // a split's last event
            ("495", 1, EventStep::ShardEnd), // a merge's
            ("", 0, EventStep::ShardEnd),    // closed, no continuation
        ];
        for (cont, children, want) in cases {
            assert_eq!(event_step(cont, children), want, "{cont:?} {children}");
        }
    }

    /// What a failed subscription does, and when the user hears of it: `(kind, forget the
    /// consumer, reported on the first failure, reported once it persists)`.
    #[test]
    fn subscription_error_table() {
        use ErrorKind::*;
        let cases = [
            // The previous owner's subscription is still open (or the consumer is not
            // ACTIVE yet): normal right after a handoff, shown only when it lasts.
            (InUse, false, false, true),
            // LimitExceeded (1 subscribe/s per shard) and other throttling.
            (Throttled, false, false, true),
            // The consumer (or the stream) is gone: look it up or register it again.
            (StreamNotFound, true, true, true),
            // The shard is gone (trimmed): reported; the engine takes it away.
            (ShardNotFound, false, true, true),
            // A trimmed or invalid starting sequence number: reported, retried.
            (InvalidRequest, false, true, true),
            (AccessDenied, false, true, true),
            (Unavailable, false, true, true),
        ];
        for (kind, forget, first, persisting) in cases {
            assert_eq!(
                on_subscription_error(kind).forget_consumer,
                forget,
                "{kind:?}"
            );
            assert_eq!(should_report(kind, 1), first, "{kind:?} first");
            assert_eq!(should_report(kind, 6), persisting, "{kind:?} persisting");
        }
    }
}
