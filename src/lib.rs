//! kcg-operator: reconciles `KinesisConsumerGroup` resources into worker Deployments and
//! reports the group's health from its DynamoDB state store.

pub mod api_problem;
pub mod apply;
pub mod checkpoints;
pub mod cli;
pub mod conditions;
pub mod consumer_admin;
pub mod controller;
pub mod crd;
pub mod crd_check;
pub mod disruption;
pub mod events;
pub mod finalizing;
pub mod group_metrics;
pub mod metrics;
pub mod observed;
pub mod owned;
pub mod reference;
pub mod resources;
pub mod server;
pub mod status;
pub mod store_admin;
pub mod telemetry;
