//! kcg-worker: the consumer engine of kcg, a Kinesis consumer group coordinated through one
//! DynamoDB table.

pub mod config;
pub mod delivery;
pub mod health;
pub mod kinesis;
pub mod metrics;
pub mod reader;
pub mod server;
pub mod telemetry;
pub mod store;
pub mod assignment;
pub mod engine;
pub mod handoff;
pub mod membership;
