//! klaviyo-connect's core: everything the Lambda functions do, so that each binary is
//! a few lines. Infrastructure modules (`config`, `context`, `auth`, `crypto`, `store`,
//! `http`, `telemetry`) serve one module per use case (`connect`, `callback`, `complete`,
//! `accounts`, `disconnect`, `verify`, `refresh`, `token`, `events`), which is where a request goes.

pub mod accounts;
pub mod auth;
pub mod aws_http;
pub mod budget;
pub mod callback;
pub mod complete;
pub mod config;
pub mod connect;
pub mod context;
pub mod crypto;
pub mod disconnect;
pub mod events;
pub mod http;
pub mod klaviyo;
pub mod model;
pub mod rate_limit;
pub mod refresh;
pub mod revocation;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod verify;

pub use auth::{JwtVerifier, UserId};
pub use config::Config;
pub use context::{Environment, InitError};
pub use crypto::{Purpose, SealContext, SealedBlob, Sealer};
pub use http::ApiError;
pub use model::{
    AuthType, Connection, ConnectionStatus, Credentials, ParkedConnection, PendingAuthorization,
    PendingRevocation, RefreshPolicy,
};
pub use refresh::{AccessTokenError, AccessTokens, KlaviyoCredential};
pub use secret::Secret;
pub use store::{Store, StoreError};

/// A reqwest client builder, after installing this process's TLS crypto provider (ring), so that
/// nothing in the process ever picks another. Every reqwest client in the workspace starts here,
/// the AWS SDK's included (`aws_http`).
pub fn http_client() -> reqwest::ClientBuilder {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Err only when another provider is installed already, which then serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}
