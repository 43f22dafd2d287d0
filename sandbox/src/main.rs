//! klaviyo-sandbox: a local stand-in for Klaviyo's OAuth and accounts endpoints, over real
//! HTTP, with fault injection and a record of what it received. For local runs and tests
//! only; it never touches the real Klaviyo.
//!
//! Klaviyo's side:
//! - `GET  /oauth/authorize`   approve (default) or deny, chosen per request with
//!   `sandbox_decision=approve|deny`; `sandbox_account=<id>` picks the Klaviyo account the
//!   user "selects" (`sandbox_org=<name>` names it)
//! - `POST /oauth/token`       Basic client auth; authorization_code (redirect_uri, one-time
//!   code, PKCE S256) and refresh_token (rotation: a used refresh token becomes invalid)
//! - `POST /oauth/revoke`      Basic client auth; revokes a refresh token and its access tokens
//! - `GET  /api/accounts/`     `revision` header; `Bearer <access token>` or
//!   `Klaviyo-API-Key <key>`; a JSON:API document like Klaviyo's
//!
//! Control API (for tests): see `control` below and docs/TESTING.md, "The Klaviyo sandbox".
//!
//! Configuration (the same variables the functions use): `KLAVIYO_CLIENT_ID`,
//! `KLAVIYO_CLIENT_SECRET_ARN` (read from Secrets Manager, honouring `AWS_ENDPOINT_URL`),
//! `KLAVIYO_REDIRECT_URI` (the one registered redirect URI). `--port N` (default 9100) on
//! 127.0.0.1.

mod control;
mod klaviyo;
mod state;

use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

pub use state::Sandbox;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let port = port_from_args()?;
    let sandbox = Arc::new(Sandbox::from_env().await?);
    let app = Router::new()
        .merge(klaviyo::routes())
        .merge(control::routes())
        .with_state(sandbox);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!("klaviyo-sandbox listening on http://{address}");
    axum::serve(listener, app).await?;
    Ok(())
}

fn port_from_args() -> Result<u16, String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--port") {
        Some(i) => args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| "usage: klaviyo-sandbox [--port N]".to_owned()),
        None => Ok(9100),
    }
}
