//! kcg-operator: reconciles `KinesisConsumerGroup` resources into worker Deployments and
//! reports the group's health from its DynamoDB state store.

pub mod crd;
pub mod resources;
pub mod conditions;
pub mod events;
pub mod metrics;
pub mod status;
pub mod server;
pub mod store_admin;
pub mod telemetry;
pub mod controller;
pub mod cli;
pub mod reference;
