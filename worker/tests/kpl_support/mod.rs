//! KPL aggregates made by AWS's own aggregation library (PyPI aws-kinesis-agg, through
//! `worker/tests/kpl_aggregate.py`), shared by the deaggregation and multiLang tests.
#![allow(dead_code)] // each test binary uses a subset

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;

/// One user record for the aggregator.
pub struct User {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: String,
}

pub fn user(partition_key: &str, data: &str) -> User {
    User {
        partition_key: partition_key.into(),
        explicit_hash_key: None,
        data: data.into(),
    }
}

/// A Kinesis record to put: the aggregator's output, or a plain record.
pub struct Put {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

pub fn plain(id: &str) -> Put {
    Put {
        partition_key: id.into(),
        explicit_hash_key: None,
        data: id.as_bytes().to_vec(),
    }
}

/// Aggregates each list of user records into one Kinesis record with the real library.
pub fn aggregate(python: &str, aggregates: &[Vec<User>]) -> Vec<Put> {
    let input: Vec<Vec<serde_json::Value>> = aggregates
        .iter()
        .map(|users| {
            users
                .iter()
                .map(|u| {
                    serde_json::json!({
                        "partitionKey": u.partition_key,
                        "explicitHashKey": u.explicit_hash_key,
                        "data": u.data,
                    })
                })
                .collect()
        })
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kpl_aggregate.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run kpl_aggregate.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(&input).expect("json"))
        .expect("write stdin");
    let out = child.wait_with_output().expect("kpl_aggregate.py");
    assert!(out.status.success(), "kpl_aggregate.py failed");
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("its JSON");
    records
        .into_iter()
        .map(|r| Put {
            partition_key: r["partitionKey"].as_str().expect("pk").to_owned(),
            explicit_hash_key: r["explicitHashKey"].as_str().map(str::to_owned),
            data: base64::engine::general_purpose::STANDARD
                .decode(r["data"].as_str().expect("data"))
                .expect("base64"),
        })
        .collect()
}
