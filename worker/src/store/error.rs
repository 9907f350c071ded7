//! State-store errors, classified so the engine can tell "lost a race" from "store is down".

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What went wrong talking to the state store. Every variant names the table and the
/// operation (and the group and row key where there is one), so a log line says where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write failed: another client won the race, or we no longer own the
    /// lease / the row moved on. Not an outage; the caller re-reads and re-plans.
    #[error("conditional {op} on table {table}, group {group}, key {key} failed: {what}")]
    Conflict {
        /// Table name.
        table: String,
        /// Operation, e.g. `claim`.
        op: &'static str,
        /// Group id.
        group: String,
        /// Sort key of the row.
        key: String,
        /// Which condition did not hold.
        what: &'static str,
    },
    /// Network error, timeout, throttling or a 5xx: retry later.
    #[error("state store unavailable: {op} on table {table}: {message}")]
    Unavailable {
        /// Table name.
        table: String,
        /// Operation.
        op: &'static str,
        /// The SDK's error with its causes.
        message: String,
    },
    /// The table does not exist.
    #[error(
        "state-store table {table} does not exist: create it with `kcg-worker create-table --table {table}` (or aws dynamodb create-table --cli-input-json file://worker/create-table.json), or set stateStore.create: true"
    )]
    TableMissing {
        /// Table name.
        table: String,
    },
    /// The credentials may not use the table.
    #[error("access denied: {op} on table {table}: {message}")]
    AccessDenied {
        /// Table name.
        table: String,
        /// Operation.
        op: &'static str,
        /// The SDK's error.
        message: String,
    },
    /// A row could not be (de)serialized.
    #[error("row {key} in table {table}, group {group}: {message}")]
    Decode {
        /// Table name.
        table: String,
        /// Group id.
        group: String,
        /// Sort key of the row.
        key: String,
        /// The serde_dynamo error.
        message: String,
    },
    /// Anything else the service rejected (validation errors and the like).
    #[error("{op} on table {table} failed: {message}")]
    Other {
        /// Table name.
        table: String,
        /// Operation.
        op: &'static str,
        /// The SDK's error with its causes.
        message: String,
    },
}

impl StoreError {
    /// Machine-readable reason, as written to a client row's `lastErrorReason` and used as
    /// the `reason` label of the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Conflict { .. } => "LeaseConflict",
            StoreError::Unavailable { .. } => "StateStoreUnavailable",
            StoreError::TableMissing { .. } => "TableNotFound",
            StoreError::AccessDenied { .. } => "AccessDenied",
            StoreError::Decode { .. } => "StateStoreDecode",
            StoreError::Other { .. } => "StateStoreError",
        }
    }

    /// True for a lost race / not-owner outcome of a conditional write.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// Where a failed request happened, to build a [`StoreError`] with context.
pub(crate) struct Ctx<'a> {
    pub table: &'a str,
    pub op: &'static str,
    pub group: &'a str,
    pub key: &'a str,
    /// The condition a ConditionalCheckFailed means did not hold.
    pub what: &'static str,
}

/// Classifies an SDK error. ConditionalCheckFailed becomes `Conflict`; transport errors,
/// timeouts, throttling and 5xx become `Unavailable`.
pub(crate) fn classify<E, R>(err: SdkError<E, R>, ctx: Ctx<'_>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let table = ctx.table.to_owned();
    let op = ctx.op;
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or_default();
            let status = se.raw().status_code();
            let message = DisplayErrorContext(&err).to_string();
            match code {
                "ConditionalCheckFailedException" => StoreError::Conflict {
                    table,
                    op,
                    group: ctx.group.to_owned(),
                    key: ctx.key.to_owned(),
                    what: ctx.what,
                },
                "ResourceNotFoundException" => StoreError::TableMissing { table },
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "MissingAuthenticationTokenException"
                | "ExpiredTokenException" => StoreError::AccessDenied { table, op, message },
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "InternalServerError"
                | "ServiceUnavailable"
                | "TransactionConflictException" => StoreError::Unavailable { table, op, message },
                _ if status >= 500 => StoreError::Unavailable { table, op, message },
                _ => StoreError::Other { table, op, message },
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable {
                table,
                op,
                message: DisplayErrorContext(&err).to_string(),
            }
        }
        _ => StoreError::Other {
            table,
            op,
            message: DisplayErrorContext(&err).to_string(),
        },
    }
}

/// The HTTP status of a raw response, abstracted so `classify` stays generic.
pub(crate) trait HasStatus {
    /// The HTTP status code.
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_dynamodb::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}
