//! Shared by the CRD, CEL and example tests: the generated schema, an OpenAPI v3 structural
//! checker (what the API server checks before CEL), and the CEL evaluation of every rule.
#![allow(dead_code)] // each test crate uses a different part

use kcg_operator::crd::KinesisConsumerGroup;
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::Value;

/// The `openAPIV3Schema` of the generated CRD, as JSON.
pub fn schema() -> Value {
    let crd = KinesisConsumerGroup::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Every problem the API server would report for `object`: schema (types, required fields,
/// enums, bounds, unknown fields) and CEL rules. Empty when the object would be admitted.
pub fn admission_errors(object: &Value) -> Vec<String> {
    let schema = schema();
    let mut errors = Vec::new();
    check_schema(&schema, object, "", &mut errors);
    if let Err(e) = Validator::new().validate(&schema, object, None) {
        errors.extend(e.into_vec().into_iter().map(|e| e.to_string()));
    }
    errors
}

/// Only the CEL rules' messages.
pub fn cel_errors(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => Vec::new(),
        Err(e) => e.into_vec().into_iter().map(|e| e.to_string()).collect(),
    }
}

/// A small structural OpenAPI v3 checker covering what our CRD uses. Unknown fields are
/// errors, as with `kubectl apply` (strict field validation is the default since 1.27).
pub fn check_schema(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{at}: must not be null"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            errors.push(format!("{at}: must be an integer or a string"));
        }
        return;
    }
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errors.push(format!(
            "{at}: {v} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(map) = v.as_object() else {
                errors.push(format!("{at}: must be an object"));
                return;
            };
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let req = req.as_str().unwrap();
                if !map.contains_key(req) {
                    errors.push(format!("{at}: required field {req} is missing"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, child) in map {
                let child_path = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check_schema(s, child, &child_path, errors);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    check_schema(s, child, &child_path, errors);
                } else {
                    // The root also allows apiVersion and kind; metadata is checked by the
                    // API server itself, not by the CRD schema.
                    let known = match path {
                        "" => ["apiVersion", "kind", "metadata"].contains(&k.as_str()),
                        "metadata" => true,
                        _ => preserve,
                    };
                    if !known {
                        errors.push(format!("{child_path}: unknown field"));
                    }
                }
            }
        }
        Some("array") => {
            let Some(items) = v.as_array() else {
                errors.push(format!("{at}: must be an array"));
                return;
            };
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.push(format!("{at}: must have at least {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(format!("{at}: must have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_schema(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Some("string") => {
            let Some(s) = v.as_str() else {
                errors.push(format!("{at}: must be a string"));
                return;
            };
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                errors.push(format!("{at}: longer than {max} characters"));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                errors.push(format!("{at}: shorter than {min} characters"));
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && s.parse::<jiff::Timestamp>().is_err()
            {
                errors.push(format!("{at}: must be an RFC 3339 date-time"));
            }
        }
        Some("integer") => {
            let Some(n) = v.as_i64() else {
                errors.push(format!("{at}: must be an integer"));
                return;
            };
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && (n as f64) < min
            {
                errors.push(format!("{at}: must be at least {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n as f64 > max
            {
                errors.push(format!("{at}: must be at most {max}"));
            }
        }
        Some("number") if !v.is_number() => errors.push(format!("{at}: must be a number")),
        Some("boolean") if !v.is_boolean() => errors.push(format!("{at}: must be a boolean")),
        _ => {}
    }
}

/// A valid group as JSON, for tests to mutate.
pub fn valid_group() -> Value {
    serde_json::json!({
        "apiVersion": "kcg.dev/v1alpha1",
        "kind": "KinesisConsumerGroup",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {
            "replicas": 2,
            "streams": [{"name": "orders"}],
            "stateStore": {"table": "kcg-state"},
            "delivery": {"stdout": {}}
        }
    })
}

/// The message of every CEL rule of the CRD, as the API server reports it. `cel_rules.rs`
/// proves each offline; the e2e suite sees the real API server reject with each.
pub mod rule_messages {
    pub const STREAM_NAME: &str = "name must be a Kinesis stream name";
    pub const ROLE_ARN: &str = "roleArn must be an IAM role ARN";
    pub const CONSUMER_NAME: &str = "consumer.name must be a Kinesis consumer name";
    pub const REGION: &str = "region must look like us-east-1";
    pub const TABLE: &str = "table must be a DynamoDB table name";
    pub const DURATION: &str = "must be a duration such as 500ms, 5s, 1m or 1m30s";
    pub const POLL_MIN: &str = "tuning.pollInterval must be at least 200ms";
    pub const MIN_CALL_MIN: &str = "tuning.minCallInterval must be at least 200ms";
    pub const HEARTBEAT_MIN: &str = "tuning.heartbeatInterval must be at least 100ms";
    pub const POSITIVE: &str = "must be a duration greater than 0s";
    pub const CLIENT_TIMEOUT: &str =
        "tuning.clientTimeout must be at least 4 x tuning.heartbeatInterval";
    pub const ONE_DELIVERY: &str = "delivery needs exactly one of stdout, http or multiLang";
    pub const UNIQUE_STREAMS: &str = "stream names must be unique";
    pub const AT_TIMESTAMP: &str = "startPosition AtTimestamp needs startTimestamp";
    pub const URL: &str = "url must be an http:// or https:// URL";
    pub const ONE_PDB_BOUND: &str =
        "podDisruptionBudget: set at most one of maxUnavailable or minAvailable";
    pub const DEAD_LETTER_NEEDED: &str = "delivery.onFailure DeadLetter needs delivery.deadLetter";
    pub const DEAD_LETTER_UNUSED: &str =
        "delivery.deadLetter is only used with delivery.onFailure: DeadLetter";
    pub const ONE_DEAD_LETTER: &str = "deadLetter needs exactly one of sqs or kinesis";
    pub const QUEUE_URL: &str = "queueUrl must be an http:// or https:// URL";
    pub const DEAD_LETTER_STREAM: &str = "stream must be a Kinesis stream name";
    pub const BACKOFF_MAX: &str =
        "delivery.retry.backoff.max must be at least delivery.retry.backoff.initial";

    /// The messages above, which must cover every rule in the schema.
    pub const ALL: &[&str] = &[
        STREAM_NAME,
        ROLE_ARN,
        CONSUMER_NAME,
        REGION,
        TABLE,
        DURATION,
        POLL_MIN,
        MIN_CALL_MIN,
        HEARTBEAT_MIN,
        POSITIVE,
        CLIENT_TIMEOUT,
        ONE_DELIVERY,
        UNIQUE_STREAMS,
        AT_TIMESTAMP,
        URL,
        ONE_PDB_BOUND,
        DEAD_LETTER_NEEDED,
        DEAD_LETTER_UNUSED,
        ONE_DEAD_LETTER,
        QUEUE_URL,
        DEAD_LETTER_STREAM,
        BACKOFF_MAX,
    ];
}
