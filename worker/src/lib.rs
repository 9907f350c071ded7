//! kcg-worker: the consumer engine of kcg, a Kinesis consumer group coordinated through one
//! DynamoDB table.

pub mod assignment;
pub mod backoff;
pub mod config;
pub mod delivery;
pub mod efo;
pub mod engine;
pub mod fence;
pub mod get_records_codec;
pub mod handoff;
pub mod health;
pub mod incarnation;
pub mod kinesis;
pub mod kinesis_clock;
pub mod kpl;
pub mod membership;
pub mod metrics;
pub mod position;
pub mod reader;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
