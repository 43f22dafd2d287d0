//! `GET /api/oauth/accounts`: the caller's connections, newest first. One DynamoDB Query on
//! the caller's partition and no KMS call: the view never includes credentials. Every other
//! path comes here too (the `$default` route) and gets 404 `not_found` in the one error shape,
//! with CORS headers, so a browser can read it.

use crate::adapters::auth::JwtVerifier;
use crate::adapters::http::{ApiError, json, require_method, unavailable};
use crate::adapters::store::Store;
use crate::context::{Endpoint, Environment, InitError};
use crate::domain::model::{AuthType, Connection, ConnectionStatus, StatusReason};
use http::{Method, StatusCode};
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use time::OffsetDateTime;

/// A connection as the frontend sees it: every field SPEC lists, never a token or key.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    pub id: String,
    pub platform: &'static str,
    pub account_name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub connected_at: OffsetDateTime,
    pub klaviyo_account_id: String,
    pub klaviyo_account_name: String,
    pub auth_type: AuthType,
    pub status: ConnectionStatus,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_refreshed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub access_token_expires_at: Option<OffsetDateTime>,
    /// When Klaviyo last accepted the credential (connect, "Test connection", the daily check
    /// of an API key); `null` before the first check.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_verified_at: Option<OffsetDateTime>,
    /// Only for `needs_reauth`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<StatusReason>,
}

impl From<&Connection> for AccountView {
    fn from(c: &Connection) -> Self {
        Self {
            id: c.id.clone(),
            platform: "klaviyo",
            account_name: c.account_name.clone(),
            connected_at: c.connected_at,
            klaviyo_account_id: c.klaviyo_account_id.clone(),
            klaviyo_account_name: c.klaviyo_account_name.clone(),
            auth_type: c.auth_type,
            status: c.status,
            scopes: c.scopes.clone(),
            last_refreshed_at: c.last_refreshed_at,
            access_token_expires_at: c.access_token_expires_at,
            last_verified_at: c.last_verified_at,
            status_reason: match c.status {
                ConnectionStatus::Active => None,
                // Marked before reasons were recorded: only a refused refresh did that.
                ConnectionStatus::NeedsReauth => {
                    Some(c.status_reason.unwrap_or(StatusReason::RefreshRefused))
                }
            },
        }
    }
}

#[derive(Serialize)]
struct ListBody {
    success: bool,
    accounts: Vec<AccountView>,
}

const ROUTE: &str = "/api/oauth/accounts";

pub struct Accounts {
    auth: JwtVerifier,
    store: Store,
}

impl Endpoint for Accounts {
    async fn build(env: &Environment) -> Result<Self, InitError> {
        Ok(Self {
            auth: env.jwt_verifier().await?,
            store: env.store(),
        })
    }

    /// This function also receives every path no route names (API Gateway's `$default`).
    fn serves(path: &str) -> bool {
        matches!(path, ROUTE | "/api/oauth/accounts/")
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        require_method(req, Method::GET, "GET, OPTIONS")?;
        let user = self.auth.authenticate(req).await?;
        let connections = self
            .store
            .list_connections(&user)
            .await
            .map_err(|e| unavailable("dynamodb", &e))?;
        Ok(json(
            StatusCode::OK,
            &ListBody {
                success: true,
                accounts: connections.iter().map(AccountView::from).collect(),
            },
        ))
    }
}
