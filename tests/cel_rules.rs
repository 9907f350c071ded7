//! Every CEL rule (`x-kubernetes-validations`) of the CRD, evaluated offline with kube's `cel`
//! feature: for each rule at least one object it admits and one it rejects, with the message
//! the user sees. `every_rule_is_tested` fails when a rule is added without cases here.

mod crd_support;

use crd_support::rule_messages::*;
use crd_support::{cel_errors, schema, valid_group};
use serde_json::{Value, json};

/// A valid group with `f` applied to its spec.
fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut g = valid_group();
    f(&mut g["spec"]);
    g
}

fn accepts(name: &str, obj: &Value) {
    let errs = cel_errors(obj);
    assert!(errs.is_empty(), "{name}: expected admission, got {errs:#?}");
}

/// Rejected by exactly the rule whose message starts with `message` (possibly several times,
/// e.g. once per bad field), and by no other rule.
fn rejects(name: &str, obj: &Value, message: &str) {
    let errs = cel_errors(obj);
    assert!(
        !errs.is_empty(),
        "{name}: expected rejection with {message:?}, was admitted"
    );
    for e in &errs {
        assert!(
            e.contains(message),
            "{name}: expected only {message:?}, got {errs:#?}"
        );
    }
}

fn stream(name: &str) -> Value {
    json!({"name": name})
}

#[test]
fn the_base_object_is_admitted() {
    accepts("base", &valid_group());
}

#[test]
fn stream_name_or_arn() {
    for ok in [
        "orders",
        "Orders_v2.events-1",
        &"a".repeat(128),
        "arn:aws:kinesis:us-east-1:123456789012:stream/orders",
        "arn:aws-cn:kinesis:cn-north-1:123456789012:stream/orders",
        "arn:aws-us-gov:kinesis:us-gov-west-1:123456789012:stream/orders",
    ] {
        accepts(ok, &with(|s| s["streams"] = json!([stream(ok)])));
    }
    for bad in [
        "orders stream",
        "orders/2",
        &"a".repeat(129),
        "arn:aws:kinesis:us-east-1:12345:stream/orders",
        "arn:aws:sqs:us-east-1:123456789012:orders",
        "arn:aws:kinesis:us-east-1:123456789012:stream/",
    ] {
        rejects(
            bad,
            &with(|s| s["streams"] = json!([stream(bad)])),
            STREAM_NAME,
        );
    }
}

#[test]
fn role_arn() {
    for ok in [
        "arn:aws:iam::123456789012:role/kcg-reader",
        "arn:aws:iam::123456789012:role/team/path/kcg-reader",
        "arn:aws-cn:iam::123456789012:role/r",
    ] {
        accepts(ok, &with(|s| s["streams"][0]["roleArn"] = json!(ok)));
    }
    for bad in [
        "kcg-reader",
        "arn:aws:iam::123456789012:user/bob",
        "arn:aws:iam::1234:role/r",
        "arn:aws:sts::123456789012:assumed-role/r/s",
        "arn:aws:iam::123456789012:role/",
    ] {
        rejects(
            bad,
            &with(|s| s["streams"][0]["roleArn"] = json!(bad)),
            ROLE_ARN,
        );
    }
}

#[test]
fn consumer_name() {
    for ok in ["kcg.ns.orders", "a", "A_b-c.9", &"x".repeat(128)] {
        accepts(
            ok,
            &with(|s| s["streams"][0]["consumer"] = json!({"mode": "EnhancedFanOut", "name": ok})),
        );
    }
    accepts(
        "no name: the default",
        &with(|s| s["streams"][0]["consumer"] = json!({"mode": "EnhancedFanOut"})),
    );
    for bad in ["a/b", "with space", "ns:orders"] {
        rejects(
            bad,
            &with(|s| s["streams"][0]["consumer"] = json!({"name": bad})),
            CONSUMER_NAME,
        );
    }
}

#[test]
fn regions_of_streams_and_table() {
    for ok in [
        "us-east-1",
        "eu-central-1",
        "us-gov-west-1",
        "ap-southeast-2",
    ] {
        accepts(
            ok,
            &with(|s| {
                s["streams"][0]["region"] = json!(ok);
                s["stateStore"]["region"] = json!(ok);
            }),
        );
    }
    for bad in ["US-EAST-1", "useast1", "us-east", "us_east_1", "1-us-east"] {
        rejects(
            bad,
            &with(|s| s["streams"][0]["region"] = json!(bad)),
            REGION,
        );
        rejects(
            bad,
            &with(|s| s["stateStore"]["region"] = json!(bad)),
            REGION,
        );
    }
}

#[test]
fn table_name() {
    for ok in ["kcg", "kcg-state", "team.kcg_state-2", &"t".repeat(255)] {
        accepts(ok, &with(|s| s["stateStore"]["table"] = json!(ok)));
    }
    for bad in ["ab", "kcg state", "kcg/state", "t@ble", ""] {
        rejects(bad, &with(|s| s["stateStore"]["table"] = json!(bad)), TABLE);
    }
}

#[test]
fn duration_format_on_every_duration_field() {
    let tuning = [
        "pollInterval",
        "minCallInterval",
        "checkpointInterval",
        "heartbeatInterval",
        "clientTimeout",
        "shutdownTimeout",
    ];
    for field in tuning {
        // A short heartbeat and a long client timeout keep the cross-field rule
        // (clientTimeout >= 4 x heartbeatInterval, or 2 x + 2s below 1s) satisfied for every
        // value below.
        let oks: &[&str] = if field == "clientTimeout" {
            &["2s200ms", "3s", "1m30s", "1h"]
        } else {
            &["1s", "500ms", "1m30s", "1h"]
        };
        for ok in oks {
            let obj = with(|s| {
                s["tuning"] = json!({"heartbeatInterval": "100ms", "clientTimeout": "4h"});
                s["tuning"][field] = json!(ok);
            });
            accepts(&format!("{field}={ok}"), &obj);
        }
        for bad in ["5", "5 s", "five", "1.5s", "-1s", "5sec", ""] {
            rejects(
                &format!("{field}={bad:?}"),
                &with(|s| s["tuning"] = json!({field: bad})),
                DURATION,
            );
        }
    }
    let http = |t: &str| {
        with(|s| s["delivery"] = json!({"http": {"url": "http://localhost:9000", "timeout": t}}))
    };
    accepts("http timeout", &http("30s"));
    rejects("http timeout", &http("30 seconds"), DURATION);
}

#[test]
fn poll_and_min_call_interval_minimum() {
    for (field, message) in [
        ("pollInterval", POLL_MIN),
        ("minCallInterval", MIN_CALL_MIN),
    ] {
        for ok in ["200ms", "1s", "1m"] {
            accepts(ok, &with(|s| s["tuning"] = json!({field: ok})));
        }
        for bad in ["199ms", "0s", "100ms"] {
            rejects(bad, &with(|s| s["tuning"] = json!({field: bad})), message);
        }
    }
}

#[test]
fn heartbeat_interval_minimum() {
    // A zero interval would make the worker spin (tokio's interval panics on it).
    for ok in ["100ms", "2s", "1m"] {
        accepts(
            ok,
            &with(|s| s["tuning"] = json!({"heartbeatInterval": ok, "clientTimeout": "5m"})),
        );
    }
    for bad in ["99ms", "0s", "0ms"] {
        rejects(
            bad,
            &with(|s| s["tuning"] = json!({"heartbeatInterval": bad})),
            HEARTBEAT_MIN,
        );
    }
}

#[test]
fn durations_that_must_be_positive() {
    for field in ["checkpointInterval", "shutdownTimeout"] {
        for ok in ["1ms", "5s", "1m30s"] {
            accepts(
                &format!("{field}={ok}"),
                &with(|s| s["tuning"] = json!({field: ok})),
            );
        }
        for bad in ["0s", "0ms", "0m0s"] {
            rejects(
                &format!("{field}={bad}"),
                &with(|s| s["tuning"] = json!({field: bad})),
                POSITIVE,
            );
        }
    }
    let http = |t: &str| {
        with(|s| s["delivery"] = json!({"http": {"url": "http://localhost:9000", "timeout": t}}))
    };
    accepts("http timeout 1ms", &http("1ms"));
    accepts("http timeout 30s", &http("30s"));
    rejects("http timeout 0s", &http("0s"), POSITIVE);
    rejects("http timeout 0ms", &http("0ms"), POSITIVE);
}

#[test]
fn client_timeout_survives_one_failed_heartbeat() {
    // 4 x heartbeatInterval from 1s on; 2 x heartbeatInterval + 2s below (the store-call
    // timeout never drops under 1s). The same table as worker/src/config/timing.rs.
    for (hb, ct) in [
        ("2s", "8s"),
        ("1s", "4s"),
        ("1m", "4m"),
        ("100ms", "2s200ms"),
        ("500ms", "3s"),
        ("999ms", "3998ms"),
        ("1s", "1m30s"),
    ] {
        accepts(
            &format!("{hb}/{ct}"),
            &with(|s| s["tuning"] = json!({"heartbeatInterval": hb, "clientTimeout": ct})),
        );
    }
    for (hb, ct) in [
        // Twice the interval used to pass: readers fenced themselves at every tick.
        ("2s", "4s"),
        ("2s", "7999ms"),
        ("1m", "3m59s"),
        ("1s", "3999ms"),
        // Sub-second heartbeats: the 1s store-call timeout dominates.
        ("100ms", "2199ms"),
        ("100ms", "1s"),
        ("500ms", "2999ms"),
    ] {
        rejects(
            &format!("{hb}/{ct}"),
            &with(|s| s["tuning"] = json!({"heartbeatInterval": hb, "clientTimeout": ct})),
            CLIENT_TIMEOUT,
        );
    }
    // The API server applies defaults before CEL: a heartbeat of 3s against the default
    // client timeout of 10s is rejected too.
    rejects(
        "default clientTimeout",
        &with(|s| s["tuning"] = json!({"heartbeatInterval": "3s"})),
        CLIENT_TIMEOUT,
    );
}

#[test]
fn exactly_one_delivery() {
    accepts("stdout", &with(|s| s["delivery"] = json!({"stdout": {}})));
    accepts(
        "http",
        &with(|s| s["delivery"] = json!({"http": {"url": "http://localhost:9000/records"}})),
    );
    accepts(
        "multiLang",
        &with(|s| s["delivery"] = json!({"multiLang": {"command": ["python3", "app.py"]}})),
    );
    rejects("none", &with(|s| s["delivery"] = json!({})), ONE_DELIVERY);
    rejects(
        "stdout and multiLang",
        &with(|s| {
            s["delivery"] = json!({"stdout": {}, "multiLang": {"command": ["node", "app.js"]}})
        }),
        ONE_DELIVERY,
    );
    rejects(
        "both",
        &with(|s| {
            s["delivery"] = json!({"stdout": {}, "http": {"url": "http://localhost:9000/records"}})
        }),
        ONE_DELIVERY,
    );
}

#[test]
fn at_most_one_pdb_bound() {
    let pdb = |v: Value| with(|s| s["worker"] = json!({"podDisruptionBudget": v}));
    accepts("empty", &pdb(json!({})));
    accepts("disabled", &pdb(json!({"enabled": false})));
    accepts("maxUnavailable", &pdb(json!({"maxUnavailable": 1})));
    accepts("minAvailable", &pdb(json!({"minAvailable": "50%"})));
    rejects(
        "both",
        &pdb(json!({"maxUnavailable": 1, "minAvailable": 2})),
        ONE_PDB_BOUND,
    );
}

#[test]
fn unique_stream_names() {
    accepts(
        "two",
        &with(|s| s["streams"] = json!([stream("a1"), stream("b1")])),
    );
    accepts(
        "name and ARN of different streams",
        &with(|s| {
            s["streams"] = json!([
                stream("a1"),
                stream("arn:aws:kinesis:us-east-1:123456789012:stream/b1")
            ])
        }),
    );
    rejects(
        "dup",
        &with(|s| s["streams"] = json!([stream("a1"), stream("b1"), stream("a1")])),
        UNIQUE_STREAMS,
    );
    rejects(
        "dup with other settings",
        &with(|s| {
            s["streams"] = json!([stream("a1"), {"name": "a1", "startPosition": "TrimHorizon"}])
        }),
        UNIQUE_STREAMS,
    );
}

#[test]
fn at_timestamp_needs_start_timestamp() {
    accepts(
        "with timestamp",
        &with(
            |s| s["streams"] = json!([{"name": "o", "startPosition": "AtTimestamp", "startTimestamp": "2026-01-02T15:04:05Z"}]),
        ),
    );
    accepts(
        "trim horizon",
        &with(|s| s["streams"] = json!([{"name": "o", "startPosition": "TrimHorizon"}])),
    );
    accepts("default", &with(|s| s["streams"] = json!([{"name": "o"}])));
    rejects(
        "without timestamp",
        &with(|s| s["streams"] = json!([{"name": "o", "startPosition": "AtTimestamp"}])),
        AT_TIMESTAMP,
    );
}

#[test]
fn http_url() {
    for ok in [
        "http://localhost:9000/records",
        "https://sink.example.com",
        "http://127.0.0.1:8081",
    ] {
        accepts(ok, &with(|s| s["delivery"] = json!({"http": {"url": ok}})));
    }
    for bad in [
        "localhost:9000",
        "ftp://x.example.com",
        "http://a b",
        "http://",
        "",
    ] {
        rejects(
            bad,
            &with(|s| s["delivery"] = json!({"http": {"url": bad}})),
            URL,
        );
    }
}

#[test]
fn failure_policy_and_dead_letter_target() {
    let delivery = |d: Value| {
        with(|s| {
            let mut full = json!({"stdout": {}});
            for (k, v) in d.as_object().expect("object") {
                full[k] = v.clone();
            }
            s["delivery"] = full;
        })
    };
    let sqs = json!({"sqs": {"queueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/dlq"}});
    accepts("block by default", &delivery(json!({})));
    accepts("skip", &delivery(json!({"onFailure": "Skip"})));
    accepts(
        "dead letter to sqs",
        &delivery(json!({"onFailure": "DeadLetter", "deadLetter": sqs})),
    );
    accepts(
        "dead letter to kinesis, other account",
        &delivery(
            json!({"onFailure": "DeadLetter", "deadLetter": {"kinesis": {
            "stream": "arn:aws:kinesis:eu-west-1:123456789012:stream/dlq",
            "region": "eu-west-1",
            "roleArn": "arn:aws:iam::123456789012:role/dlq-writer"}}}),
        ),
    );
    accepts(
        "retry",
        &delivery(
            json!({"retry": {"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "5s"}}}),
        ),
    );
    rejects(
        "dead letter without target",
        &delivery(json!({"onFailure": "DeadLetter"})),
        DEAD_LETTER_NEEDED,
    );
    rejects(
        "target without dead letter",
        &delivery(json!({"deadLetter": sqs})),
        DEAD_LETTER_UNUSED,
    );
    rejects(
        "target with skip",
        &delivery(json!({"onFailure": "Skip", "deadLetter": sqs})),
        DEAD_LETTER_UNUSED,
    );
    rejects(
        "no target kind",
        &delivery(json!({"onFailure": "DeadLetter", "deadLetter": {}})),
        ONE_DEAD_LETTER,
    );
    rejects(
        "both target kinds",
        &delivery(json!({"onFailure": "DeadLetter", "deadLetter": {
            "sqs": {"queueUrl": "https://q"}, "kinesis": {"stream": "dlq"}}})),
        ONE_DEAD_LETTER,
    );
    rejects(
        "queue url",
        &delivery(json!({"onFailure": "DeadLetter", "deadLetter": {"sqs": {"queueUrl": "dlq"}}})),
        QUEUE_URL,
    );
    rejects(
        "target stream",
        &delivery(json!({"onFailure": "DeadLetter", "deadLetter": {"kinesis": {"stream": "a b"}}})),
        DEAD_LETTER_STREAM,
    );
    rejects(
        "target region",
        &delivery(
            json!({"onFailure": "DeadLetter", "deadLetter": {"sqs": {"queueUrl": "https://q", "region": "EU"}}}),
        ),
        REGION,
    );
    rejects(
        "target role",
        &delivery(
            json!({"onFailure": "DeadLetter", "deadLetter": {"kinesis": {"stream": "dlq", "roleArn": "arn:aws:iam::1:role/r"}}}),
        ),
        ROLE_ARN,
    );
    rejects(
        "backoff max below initial",
        &delivery(json!({"retry": {"backoff": {"initial": "5s", "max": "1s"}}})),
        BACKOFF_MAX,
    );
    rejects(
        "backoff initial zero",
        &delivery(json!({"retry": {"backoff": {"initial": "0s"}}})),
        POSITIVE,
    );
    rejects(
        "backoff duration format",
        &delivery(json!({"retry": {"backoff": {"max": "5 s"}}})),
        DURATION,
    );
}

/// Every rule in the generated schema carries one of the messages tested above, and every
/// tested message exists in the schema.
#[test]
fn every_rule_is_tested() {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    for r in rules {
                        out.push(
                            r["message"]
                                .as_str()
                                .expect("every rule has a message")
                                .to_owned(),
                        );
                    }
                }
                m.values().for_each(|c| collect(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| collect(c, out)),
            _ => {}
        }
    }
    let mut messages = Vec::new();
    collect(&schema(), &mut messages);
    for m in &messages {
        assert!(
            ALL.iter().any(|t| m.starts_with(t)),
            "rule with message {m:?} has no test in cel_rules.rs"
        );
    }
    for t in ALL {
        assert!(
            messages.iter().any(|m| m.starts_with(t)),
            "tested message {t:?} is not in the CRD"
        );
    }
}
