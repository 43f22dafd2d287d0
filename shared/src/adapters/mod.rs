//! What the use cases talk to: DynamoDB (`store`), KMS sealing (`crypto`), Klaviyo (`klaviyo`),
//! HTTP requests and responses (`http`), bearer JWTs (`auth`), settings (`config`), the AWS SDK's
//! HTTP client (`aws_http`), the event bus (`event_bus`), secrets read again when they stop working
//! (`reload`) and logs (`telemetry`). Adapters never call a use case, and call each other only
//! through the types they share.

pub mod auth;
pub mod aws_http;
pub mod config;
pub mod crypto;
pub mod event_bus;
pub mod http;
pub mod klaviyo;
pub mod reload;
pub mod store;
pub mod telemetry;
