//! Removal of a group's rows from the state-store table, for `onDelete: Delete`.
//!
//! Only the operator deletes whole groups, so this lives here rather than in the worker's
//! store layer: Query the keys under the group's partition key, then BatchWriteItem deletes
//! in chunks of 25, retrying unprocessed items with backoff.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, WriteRequest};
use kcg_worker::store::schema::{PK, SK};

/// BatchWriteItem accepts at most 25 requests.
const BATCH: usize = 25;
/// Attempts per batch before giving up (unprocessed items are throttling, usually).
const MAX_ATTEMPTS: u32 = 8;

/// Errors while deleting a group's rows.
#[derive(Debug, thiserror::Error)]
pub enum StoreAdminError {
    /// Listing the group's keys failed.
    #[error("querying the rows of group {group} in table {table}: {source}")]
    Query {
        /// Group id.
        group: String,
        /// Table.
        table: String,
        /// SDK error (its Display includes the service message).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A batch delete failed.
    #[error("deleting rows of group {group} in table {table}: {source}")]
    Delete {
        /// Group id.
        group: String,
        /// Table.
        table: String,
        /// SDK error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// DynamoDB kept returning unprocessed items.
    #[error(
        "deleting rows of group {group} in table {table}: {left} rows still unprocessed after {MAX_ATTEMPTS} attempts"
    )]
    Unprocessed {
        /// Group id.
        group: String,
        /// Table.
        table: String,
        /// Rows left.
        left: usize,
    },
}

/// The SDK error with its whole source chain as text (the service's message is in a source).
fn sdk_error<E, R>(
    e: aws_sdk_dynamodb::error::SdkError<E, R>,
) -> Box<dyn std::error::Error + Send + Sync>
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    aws_sdk_dynamodb::error::DisplayErrorContext(e)
        .to_string()
        .into()
}

/// Deletes every row whose partition key is `group`. Returns how many rows were deleted.
/// Idempotent: a second call finds nothing and deletes nothing.
pub async fn delete_group(
    client: &Client,
    table: &str,
    group: &str,
) -> Result<usize, StoreAdminError> {
    let keys = group_keys(client, table, group).await?;
    let total = keys.len();
    for chunk in keys.chunks(BATCH) {
        let mut pending: Vec<WriteRequest> = chunk
            .iter()
            .map(|key| {
                let delete = DeleteRequest::builder()
                    .set_key(Some(key.clone()))
                    .build()
                    .map_err(|e| StoreAdminError::Delete {
                        group: group.to_owned(),
                        table: table.to_owned(),
                        source: Box::new(e),
                    })?;
                Ok(WriteRequest::builder().delete_request(delete).build())
            })
            .collect::<Result<_, StoreAdminError>>()?;
        let mut attempt = 0;
        while !pending.is_empty() {
            if attempt == MAX_ATTEMPTS {
                return Err(StoreAdminError::Unprocessed {
                    group: group.to_owned(),
                    table: table.to_owned(),
                    left: pending.len(),
                });
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
            attempt += 1;
            let out = client
                .batch_write_item()
                .request_items(table, std::mem::take(&mut pending))
                .send()
                .await
                .map_err(|e| StoreAdminError::Delete {
                    group: group.to_owned(),
                    table: table.to_owned(),
                    source: sdk_error(e),
                })?;
            pending = out
                .unprocessed_items
                .and_then(|mut m| m.remove(table))
                .unwrap_or_default();
        }
    }
    tracing::info!(
        group,
        table,
        rows = total,
        "deleted the group's state-store rows"
    );
    Ok(total)
}

/// The (pk, sk) keys of every row of the group.
async fn group_keys(
    client: &Client,
    table: &str,
    group: &str,
) -> Result<Vec<HashMap<String, AttributeValue>>, StoreAdminError> {
    let mut keys = Vec::new();
    let mut start: Option<HashMap<String, AttributeValue>> = None;
    loop {
        let result = client
            .query()
            .table_name(table)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", AttributeValue::S(group.to_owned()))
            .projection_expression("#pk, #sk")
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await;
        // No table, no rows: deleting a group whose table is gone must not block forever.
        if let Err(e) = &result
            && e.as_service_error()
                .is_some_and(|se| se.is_resource_not_found_exception())
        {
            return Ok(Vec::new());
        }
        let out = result.map_err(|e| StoreAdminError::Query {
            group: group.to_owned(),
            table: table.to_owned(),
            source: sdk_error(e),
        })?;
        keys.extend(out.items.unwrap_or_default());
        match out.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => break,
        }
    }
    Ok(keys)
}
