//! The JSON lines of KCL's MultiLangDaemon protocol, in the shapes the real record-processor
//! libraries read and write (npm `aws-kcl` 2.x `lib/kcl/kcl_manager.js`, PyPI `amazon-kclpy`
//! 3.x `amazon_kclpy/messages.py`): one JSON object per line, `action` names the message.
//!
//! kclpy decodes every JSON object through a hook that requires an `action` key, nested
//! records included: that is why each record carries `"action": "record"`.

use serde::{Deserialize, Serialize};

use crate::delivery::{Record, ser_base64};

/// The actions kcg asks a processor to perform; a `status` message names one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Start on a shard at a checkpoint.
    Initialize,
    /// Handle a batch of records.
    ProcessRecords,
    /// The shard was read to its end: the processor must checkpoint.
    ShardEnded,
    /// The processor is about to be stopped: last chance to checkpoint.
    ShutdownRequested,
    /// Another worker owns the shard now: checkpointing is no longer possible.
    LeaseLost,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Initialize => "initialize",
            Action::ProcessRecords => "processRecords",
            Action::ShardEnded => "shardEnded",
            Action::ShutdownRequested => "shutdownRequested",
            Action::LeaseLost => "leaseLost",
        })
    }
}

/// A message kcg writes to the processor's stdin.
#[derive(Debug, Serialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum ToProcessor<'a> {
    /// `initialize`: the shard and the checkpoint the processor starts after (or KCL's
    /// sentinel `TRIM_HORIZON` / `LATEST` / `AT_TIMESTAMP` for a shard without checkpoint).
    #[serde(rename_all = "camelCase")]
    Initialize {
        /// The shard id.
        shard_id: &'a str,
        /// The checkpoint's sequence number, or the sentinel.
        sequence_number: &'a str,
        /// The checkpoint's sub-sequence number (0 without aggregation).
        sub_sequence_number: u64,
    },
    /// `processRecords`: one batch, in shard order.
    #[serde(rename_all = "camelCase")]
    ProcessRecords {
        /// The records.
        records: Vec<RecordMessage<'a>>,
        /// MillisBehindLatest of the GetRecords call that returned them.
        millis_behind_latest: Option<i64>,
    },
    /// The answer to a processor's checkpoint request.
    Checkpoint(CheckpointReply),
    /// `shardEnded`: the processor must call `checkpoint()` before answering.
    ShardEnded,
    /// `shutdownRequested`: the processor may checkpoint before answering.
    ShutdownRequested,
    /// `leaseLost`: checkpointing is no longer possible.
    LeaseLost,
}

impl ToProcessor<'_> {
    /// The action a `status` answer to this message names (`None` for a checkpoint reply,
    /// which is not answered).
    pub fn action(&self) -> Option<Action> {
        match self {
            ToProcessor::Initialize { .. } => Some(Action::Initialize),
            ToProcessor::ProcessRecords { .. } => Some(Action::ProcessRecords),
            ToProcessor::Checkpoint(_) => None,
            ToProcessor::ShardEnded => Some(Action::ShardEnded),
            ToProcessor::ShutdownRequested => Some(Action::ShutdownRequested),
            ToProcessor::LeaseLost => Some(Action::LeaseLost),
        }
    }
}

/// kcg's answer to a checkpoint request: the request's position echoed back, and the
/// name of the KCL exception when it was refused (the libraries raise it to the processor:
/// kclpy as `CheckpointError(error)`, aws-kcl as the callback's `err`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointReply {
    /// The requested sequence number (`null`: "everything delivered so far").
    pub sequence_number: Option<String>,
    /// The requested sub-sequence number.
    pub sub_sequence_number: Option<u64>,
    /// KCL exception name, e.g. `IllegalArgumentException`; absent on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

/// One record of a `processRecords` message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordMessage<'a> {
    /// Always `record` (kclpy's decoder dispatches on it).
    action: &'static str,
    /// Payload, base64.
    #[serde(serialize_with = "ser_base64")]
    data: &'a [u8],
    partition_key: &'a str,
    sequence_number: &'a str,
    sub_sequence_number: u64,
    /// Unix milliseconds (kclpy does `int(...)` on it, so never null: 0 when unknown).
    approximate_arrival_timestamp: i64,
}

impl<'a> From<&'a Record> for RecordMessage<'a> {
    fn from(r: &'a Record) -> Self {
        Self {
            action: "record",
            data: &r.data,
            partition_key: &r.partition_key,
            sequence_number: &r.sequence,
            sub_sequence_number: r.sub_sequence.unwrap_or(0),
            approximate_arrival_timestamp: r.arrival.map_or(0, |t| t.as_millisecond()),
        }
    }
}

/// A message the processor writes to its stdout.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase", deny_unknown_fields)]
pub enum FromProcessor {
    /// The processor finished the action `responseFor`.
    #[serde(rename_all = "camelCase")]
    Status {
        /// The action it answers.
        response_for: Action,
    },
    /// Checkpoint request; no sequence number means "everything delivered so far".
    #[serde(rename_all = "camelCase")]
    Checkpoint {
        /// The sequence number to checkpoint at.
        #[serde(default)]
        sequence_number: Option<String>,
        /// Its sub-sequence number (aws-kcl never sends one).
        #[serde(default)]
        sub_sequence_number: Option<u64>,
    },
}

/// What one line of the processor's stdout is.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Empty: both libraries write a newline before and after each message.
    Blank,
    /// Not a protocol message: the processor's (or one of its libraries') own output, which
    /// the libraries explicitly allow on stdout. Logged, then ignored.
    Output(String),
    /// A protocol message.
    Message(FromProcessor),
}

/// A JSON object with an `action` key that is not a valid processor message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid message from the record processor: {reason}: {line}")]
pub struct BadMessage {
    /// What is wrong with it.
    pub reason: String,
    /// The line, cut to a readable length.
    pub line: String,
}

/// Classifies one stdout line. Only a JSON object with an `action` counts as a message;
/// a malformed one is an error (the processor speaks the protocol wrongly).
pub fn parse_line(line: &str) -> Result<Line, BadMessage> {
    let text = line.trim();
    if text.is_empty() {
        return Ok(Line::Blank);
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return Ok(Line::Output(text.to_owned()));
    };
    if value.get("action").is_none() {
        return Ok(Line::Output(text.to_owned()));
    }
    serde_json::from_value(value)
        .map(Line::Message)
        .map_err(|e| BadMessage {
            reason: e.to_string(),
            line: text.chars().take(200).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_to_the_processor() {
        let rec = Record {
            stream: "s".into(),
            shard_id: "shardId-000000000001".into(),
            sequence: "4959".into(),
            sub_sequence: None,
            partition_key: "cat".into(),
            explicit_hash_key: None,
            data: b"meow".to_vec(),
            arrival: Some("2026-11-28T17:44:39.5Z".parse().unwrap()),
        };
        let no_arrival = Record {
            arrival: None,
            ..rec.clone()
        };
        let user_record = Record {
            sub_sequence: Some(2),
            ..rec.clone()
        };
        let cases: Vec<(ToProcessor, serde_json::Value)> = vec![
            (
                ToProcessor::Initialize {
                    shard_id: "shardId-000000000001",
                    sequence_number: "TRIM_HORIZON",
                    sub_sequence_number: 0,
                },
                json!({"action": "initialize", "shardId": "shardId-000000000001",
                       "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0}),
            ),
            (
                ToProcessor::ProcessRecords {
                    records: vec![(&rec).into(), (&no_arrival).into(), (&user_record).into()],
                    millis_behind_latest: Some(12),
                },
                json!({"action": "processRecords", "millisBehindLatest": 12, "records": [
                    {"action": "record", "data": "bWVvdw==", "partitionKey": "cat",
                     "sequenceNumber": "4959", "subSequenceNumber": 0,
                     "approximateArrivalTimestamp": 1_795_887_879_500_i64},
                    {"action": "record", "data": "bWVvdw==", "partitionKey": "cat",
                     "sequenceNumber": "4959", "subSequenceNumber": 0,
                     "approximateArrivalTimestamp": 0},
                    {"action": "record", "data": "bWVvdw==", "partitionKey": "cat",
                     "sequenceNumber": "4959", "subSequenceNumber": 2,
                     "approximateArrivalTimestamp": 1_795_887_879_500_i64},
                ]}),
            ),
            (
                ToProcessor::Checkpoint(CheckpointReply {
                    sequence_number: None,
                    sub_sequence_number: None,
                    error: None,
                }),
                json!({"action": "checkpoint", "sequenceNumber": null, "subSequenceNumber": null}),
            ),
            (
                ToProcessor::Checkpoint(CheckpointReply {
                    sequence_number: Some("1".into()),
                    sub_sequence_number: Some(0),
                    error: Some("IllegalArgumentException"),
                }),
                json!({"action": "checkpoint", "sequenceNumber": "1", "subSequenceNumber": 0,
                       "error": "IllegalArgumentException"}),
            ),
            (ToProcessor::ShardEnded, json!({"action": "shardEnded"})),
            (
                ToProcessor::ShutdownRequested,
                json!({"action": "shutdownRequested"}),
            ),
            (ToProcessor::LeaseLost, json!({"action": "leaseLost"})),
        ];
        for (msg, want) in cases {
            assert_eq!(serde_json::to_value(&msg).unwrap(), want, "{msg:?}");
        }
    }

    #[test]
    fn lines_from_the_processor() {
        use FromProcessor::*;
        let ok = |l: &str| parse_line(l).unwrap();
        let cases = [
            ("", Line::Blank),
            ("   ", Line::Blank),
            (
                "hello from print()",
                Line::Output("hello from print()".into()),
            ),
            ("{not json", Line::Output("{not json".into())),
            (
                r#"{"level": "info"}"#,
                Line::Output(r#"{"level": "info"}"#.into()),
            ),
            (
                r#"{"action": "status", "responseFor": "processRecords"}"#,
                Line::Message(Status {
                    response_for: Action::ProcessRecords,
                }),
            ),
            (
                // aws-kcl: `checkpoint(cb)` sends a null sequence and no sub-sequence.
                r#"{"action":"checkpoint","sequenceNumber":null}"#,
                Line::Message(Checkpoint {
                    sequence_number: None,
                    sub_sequence_number: None,
                }),
            ),
            (
                r#"{"action": "checkpoint", "sequenceNumber": "456", "subSequenceNumber": 3}"#,
                Line::Message(Checkpoint {
                    sequence_number: Some("456".into()),
                    sub_sequence_number: Some(3),
                }),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(ok(line), want, "{line:?}");
        }
        for bad in [
            r#"{"action": "dance"}"#,
            r#"{"action": "status"}"#,
            r#"{"action": "status", "responseFor": "nap"}"#,
            r#"{"action": "checkpoint", "sequenceNumber": 456}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
    }
}
