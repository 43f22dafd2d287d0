//! klaviyo-connect's core: everything the Lambda functions do, so that each binary is a few
//! lines. The tree shows the layers:
//!
//! - `use_cases`: one module per thing the service does (`connect`, `callback`, `complete`,
//!   `accounts`, `disconnect`, `verify`, `refresh`, `token`, `events`, and `revocation`, which
//!   several share). This is where a request or an event goes.
//! - `adapters`: what the use cases talk to (`store`, `crypto`, `klaviyo`, `http`, `auth`,
//!   `config`, `aws_http`, `event_bus`, `reload`, `telemetry`).
//! - `domain`: the types both share (`model`, `secret`, `rate_limit`).
//! - `context`: start-up, which builds the adapters once per container and hands them to the
//!   use cases; `budget`: each function's worst-case time, from both layers' timeouts.
//!
//! Use cases call adapters, never the reverse; adapters call each other only through the
//! types they share (`shared/tests/layers.rs` fails the build otherwise).

pub mod adapters;
pub mod budget;
pub mod context;
pub mod domain;
pub mod use_cases;

pub use adapters::auth::{JwtVerifier, UserId};
pub use adapters::config::Config;
pub use adapters::crypto::{Purpose, SealContext, SealedBlob, Sealer};
pub use adapters::http::ApiError;
pub use adapters::store::{Store, StoreError};
pub use context::{Environment, InitError};
pub use domain::model::{
    AuthType, Connection, ConnectionStatus, Credentials, ParkedConnection, PendingAuthorization,
    PendingRevocation, RefreshPolicy,
};
pub use domain::secret::Secret;
pub use use_cases::refresh::{AccessTokenError, AccessTokens, KlaviyoCredential};

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
