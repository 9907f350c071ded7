//! The DynamoDB state store: schema and the thin I/O layer around it.
pub mod schema;
