//! A faster decoder for GetRecords responses, plugged into the AWS SDK's Kinesis client.
//!
//! Why: on a full page (up to 10,000 records) the SDK's generic, schema-driven JSON codec is
//! the largest single cost of reading: more than kcg's whole engine. This module decodes the
//! same awsJson 1.1 body with `serde_json` (strings borrowed where they have no escapes) and
//! the SDK's own base64 decoder, and builds the SDK's own [`GetRecordsOutput`]. Everything
//! else stays the SDK's: signing, endpoints, retries, timeouts, and every error response.
//!
//! How it plugs in: [`GetRecordsCodec`] is a client-level interceptor. For GetRecords calls
//! only, it wraps the operation's response deserializer: a successful response is decoded
//! here; an error status, or a body this decoder does not accept, goes to the SDK's own
//! deserializer unchanged, so the worst case is the SDK's speed, never a different answer.
//! One difference: the output carries no request id (the SDK's setter is crate-private).

use std::borrow::Cow;

use aws_sdk_kinesis::config::{
    ConfigBag, FrozenLayer, Intercept, RuntimeComponents, RuntimePlugin,
};
use aws_sdk_kinesis::operation::get_records::{GetRecords, GetRecordsInput, GetRecordsOutput};
use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{ChildShard, EncryptionType, HashKeyRange, Record};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextMut, Error, Output,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, OrchestratorError};
use aws_smithy_runtime_api::client::ser_de::{DeserializeResponse, SharedResponseDeserializer};
use serde::Deserialize;

/// Client interceptor that decodes successful GetRecords responses with [`decode`].
#[derive(Debug)]
pub struct GetRecordsCodec {
    /// The GetRecords operation's own config layer, which holds the SDK's deserializer (the
    /// fallback): the layer is shareable, the deserializer alone is not.
    sdk: Option<FrozenLayer>,
}

impl Default for GetRecordsCodec {
    fn default() -> Self {
        Self {
            sdk: GetRecords::new().config(),
        }
    }
}

impl Intercept for GetRecordsCodec {
    fn name(&self) -> &'static str {
        "kcg.GetRecordsCodec"
    }

    // Runs once per call, before the first attempt, so retries reuse the same deserializer.
    // The interceptor state is the top layer of the bag: it wins over the operation's layer.
    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let is_get_records = context.input().downcast_ref::<GetRecordsInput>().is_some();
        if let (true, Some(sdk)) = (is_get_records, &self.sdk) {
            let fast = SharedResponseDeserializer::new(FastThenSdk { sdk: sdk.clone() });
            cfg.interceptor_state().store_put(fast);
        }
        Ok(())
    }
}

/// Decodes a 2xx body with [`decode`]; hands anything else to the SDK's deserializer.
#[derive(Debug)]
struct FastThenSdk {
    sdk: FrozenLayer,
}

impl DeserializeResponse for FastThenSdk {
    fn deserialize_nonstreaming_with_config(
        &self,
        response: &HttpResponse,
        cfg: &ConfigBag,
    ) -> Result<Output, OrchestratorError<Error>> {
        if response.status().is_success() {
            if let Some(output) = response.body().bytes().and_then(decode) {
                #[cfg(test)]
                tests::FAST_DECODES.with(|n| n.set(n.get() + 1));
                return Ok(Output::erase(output));
            }
            tracing::debug!("GetRecords answer not in the expected shape: the SDK decodes it");
        }
        match self.sdk.load::<SharedResponseDeserializer>() {
            Some(sdk) => sdk.deserialize_nonstreaming_with_config(response, cfg),
            None => Err(OrchestratorError::other(
                "the SDK's GetRecords config has no response deserializer",
            )),
        }
    }
}

/// The GetRecords response body (awsJson 1.1). Unknown members are ignored, like the SDK does.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Page {
    #[serde(default)]
    records: Option<Vec<SdkRecord>>,
    #[serde(default)]
    next_shard_iterator: Option<String>,
    #[serde(default)]
    millis_behind_latest: Option<i64>,
    #[serde(default)]
    child_shards: Option<Vec<SdkChildShard>>,
}

/// One record, decoded straight into the SDK's type: no second list per page.
struct SdkRecord(Record);

impl<'de> Deserialize<'de> for SdkRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let r = RawRecord::deserialize(d)?;
        let data = aws_smithy_types::base64::decode(&*r.data).map_err(D::Error::custom)?;
        Record::builder()
            .sequence_number(r.sequence_number)
            .set_approximate_arrival_timestamp(
                r.approximate_arrival_timestamp.map(DateTime::from_secs_f64),
            )
            .data(Blob::new(data))
            .partition_key(r.partition_key)
            .set_encryption_type(r.encryption_type.as_deref().map(EncryptionType::from))
            .build()
            .map(SdkRecord)
            .map_err(D::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRecord<'a> {
    sequence_number: String,
    #[serde(default)]
    approximate_arrival_timestamp: Option<f64>,
    /// Base64 text; borrowed unless the encoder escaped a character (e.g. `\/`).
    #[serde(borrow)]
    data: Cow<'a, str>,
    partition_key: String,
    #[serde(borrow, default)]
    encryption_type: Option<Cow<'a, str>>,
}

/// A child shard of an ended shard, decoded straight into the SDK's type.
struct SdkChildShard(ChildShard);

impl<'de> Deserialize<'de> for SdkChildShard {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let c = RawChildShard::deserialize(d)?;
        let range = HashKeyRange::builder()
            .starting_hash_key(c.hash_key_range.starting_hash_key)
            .ending_hash_key(c.hash_key_range.ending_hash_key)
            .build()
            .map_err(D::Error::custom)?;
        ChildShard::builder()
            .shard_id(c.shard_id)
            .set_parent_shards(Some(c.parent_shards))
            .hash_key_range(range)
            .build()
            .map(SdkChildShard)
            .map_err(D::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawChildShard {
    shard_id: String,
    #[serde(default)]
    parent_shards: Vec<String>,
    hash_key_range: RawHashKeyRange,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHashKeyRange {
    starting_hash_key: String,
    ending_hash_key: String,
}

/// Decodes a GetRecords response body into the SDK's output type, or `None` when the body
/// is not the expected shape (the caller then uses the SDK's own deserializer).
pub fn decode(body: &[u8]) -> Option<GetRecordsOutput> {
    // One UTF-8 check of the whole body (ASCII fast path) instead of one per string.
    let page: Page = serde_json::from_str(std::str::from_utf8(body).ok()?).ok()?;
    // The wrappers have the SDK types' layout, so these reuse the lists' allocations.
    GetRecordsOutput::builder()
        .set_records(Some(
            page.records
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.0)
                .collect(),
        ))
        .set_next_shard_iterator(page.next_shard_iterator)
        .set_millis_behind_latest(page.millis_behind_latest)
        .set_child_shards(
            page.child_shards
                .map(|children| children.into_iter().map(|c| c.0).collect()),
        )
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_kinesis::error::ProvideErrorMetadata;
    use aws_smithy_runtime_api::client::http::{
        HttpConnector, HttpConnectorFuture, SharedHttpConnector, http_client_fn,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// Answers every request with the same status and body: the two decoders must then
    /// produce the same result from the same bytes.
    #[derive(Debug, Clone)]
    struct Canned {
        status: u16,
        body: &'static str,
    }

    impl HttpConnector for Canned {
        fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
            let status = StatusCode::try_from(self.status).expect("valid status");
            let mut response = HttpResponse::new(status, SdkBody::from(self.body));
            response
                .headers_mut()
                .insert("content-type", "application/x-amz-json-1.1");
            HttpConnectorFuture::ready(Ok(response))
        }
    }

    fn client(canned: Canned, codec: bool) -> aws_sdk_kinesis::Client {
        let mut config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .http_client(http_client_fn(move |_, _| {
                SharedHttpConnector::new(canned.clone())
            }))
            // Errors must come back at once, not after the SDK's retries.
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled());
        if codec {
            config = config.interceptor(GetRecordsCodec::default());
        }
        aws_sdk_kinesis::Client::from_conf(config.build())
    }

    thread_local! {
        /// Responses this thread decoded with [`decode`] inside the SDK (not the fallback).
        pub(super) static FAST_DECODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    const SEQ1: &str = "49650000000000000000000000000000000000000000000000000001";

    /// Every shape a GetRecords answer takes: a full page, escapes, an ended shard with
    /// children, an empty page, and errors (which the SDK's deserializer must still type).
    #[tokio::test]
    async fn same_output_as_the_sdk_decoder() {
        // (name, status, body, decoded by `decode` rather than by the SDK's fallback)
        let cases: &[(&str, u16, &str, bool)] = &[
            (
                "records",
                200,
                r#"{"Records":[{"SequenceNumber":"49650000000000000000000000000000000000000000000000000001","ApproximateArrivalTimestamp":1764360000.123,"Data":"aGVsbG8=","PartitionKey":"k-1","EncryptionType":"NONE"},{"SequenceNumber":"49650000000000000000000000000000000000000000000000000002","ApproximateArrivalTimestamp":1764360001,"Data":"\/\/8=","PartitionKey":"k\"2\u00e9","EncryptionType":"KMS"}],"NextShardIterator":"AAAA","MillisBehindLatest":42,"Unknown":{"x":[1,2]}}"#,
                true,
            ),
            (
                "shard end with children",
                200,
                r#"{"Records":[],"MillisBehindLatest":0,"ChildShards":[{"ShardId":"shardId-000000000002","ParentShards":["shardId-000000000000","shardId-000000000001"],"HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"340282366920938463463374607431768211455"}}]}"#,
                true,
            ),
            (
                "null iterator, no records member",
                200,
                r#"{"NextShardIterator":null,"MillisBehindLatest":0}"#,
                true,
            ),
            (
                "expired iterator",
                400,
                r#"{"__type":"ExpiredIteratorException","message":"Iterator expired"}"#,
                false,
            ),
            (
                "throughput exceeded",
                400,
                r#"{"__type":"com.amazonaws.kinesis.v20131202#ProvisionedThroughputExceededException","message":"Rate exceeded"}"#,
                false,
            ),
            ("not JSON", 200, "<html>proxy error</html>", false),
        ];
        for (name, status, body, fast_path) in cases {
            let canned = Canned {
                status: *status,
                body,
            };
            let call = |codec| {
                let c = client(canned.clone(), codec);
                async move { c.get_records().shard_iterator("it").send().await }
            };
            let before = FAST_DECODES.with(|n| n.get());
            let fast = call(true).await;
            let decoded = FAST_DECODES.with(|n| n.get()) - before;
            assert_eq!(
                decoded,
                usize::from(*fast_path),
                "{name}: decoded by kcg's decoder"
            );
            let sdk = call(false).await;
            assert_eq!(FAST_DECODES.with(|n| n.get()) - before, decoded, "{name}");
            match (fast, sdk) {
                (Ok(fast), Ok(sdk)) => {
                    assert_eq!(fast, sdk, "{name}");
                    assert!(*fast_path, "{name}: answered by the SDK's decoder");
                }
                (Err(fast), Err(sdk)) => {
                    let (fast, sdk) = (fast.into_service_error(), sdk.into_service_error());
                    assert_eq!(fast.code(), sdk.code(), "{name}");
                    assert_eq!(fast.message(), sdk.message(), "{name}");
                    assert_eq!(
                        fast.is_expired_iterator_exception(),
                        sdk.is_expired_iterator_exception(),
                        "{name}"
                    );
                }
                (fast, sdk) => panic!("{name}: decoders disagree: {fast:?} vs {sdk:?}"),
            }
        }
    }

    #[test]
    fn decodes_a_page_and_rejects_other_shapes() {
        let body = format!(
            r#"{{"Records":[{{"SequenceNumber":"{SEQ1}","Data":"aGVsbG8=","PartitionKey":"k"}}],"NextShardIterator":"AAAA"}}"#
        );
        let out = decode(body.as_bytes()).expect("decoded");
        assert_eq!(out.records()[0].data().as_ref(), b"hello");
        assert_eq!(out.records()[0].sequence_number(), SEQ1);
        assert_eq!(out.next_shard_iterator(), Some("AAAA"));
        // Not the expected shape: None, so the SDK's deserializer decides.
        for bad in [
            "not json",
            r#"{"Records":[{"SequenceNumber":"1","PartitionKey":"k"}]}"#,
            r#"{"Records":[{"SequenceNumber":"1","Data":"***","PartitionKey":"k"}]}"#,
            r#"{"Records":{}}"#,
        ] {
            assert!(decode(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
