//! `GET /api/oauth/connect/klaviyo` (start OAuth) and
//! `POST /api/oauth/connect/klaviyo/api-key` (connect with a private API key).

use crate::auth::JwtVerifier;
use crate::context::{Environment, InitError};
use crate::http::{ApiError, Web, json, query_param, require_method, unavailable};
use crate::klaviyo::Klaviyo;
use crate::model::{PENDING_AUTHORIZATION_TTL, PendingAuthorization, parse_account_name};
use crate::store::Store;
use http::{Method, StatusCode};
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use time::OffsetDateTime;

pub struct Connect {
    web: Web,
    auth: JwtVerifier,
    store: Store,
    klaviyo: Klaviyo,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthUrlBody {
    auth_url: String,
}

impl Connect {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        Ok(Self {
            web: env.web(),
            auth: env.jwt_verifier().await?,
            store: env.store(),
            klaviyo: env.klaviyo().await?,
        })
    }

    pub async fn handle(&self, req: Request) -> Result<Response<Body>, lambda_http::Error> {
        Ok(self.web.serve(&req, || self.respond(&req)).await)
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let is_api_key_route = req.uri().path().trim_end_matches('/').ends_with("/api-key");
        if is_api_key_route {
            require_method(req, Method::POST, "POST, OPTIONS")?;
            let _user = self.auth.authenticate(req)?;
            return Err(ApiError::NotImplemented);
        }
        require_method(req, Method::GET, "GET, OPTIONS")?;
        let user = self.auth.authenticate(req)?;
        self.start_oauth(user, req).await
    }

    /// Stores state and PKCE verifier as a pending authorization (keyed by the state's
    /// hash, expiring in 10 minutes) and returns the Klaviyo authorize URL.
    async fn start_oauth(
        &self,
        user: crate::UserId,
        req: &Request,
    ) -> Result<Response<Body>, ApiError> {
        let account_name = parse_account_name(query_param(req, "accountName").as_deref())
            .map_err(|message| ApiError::bad_request("invalid_account_name", message))?;
        let authorization = self.klaviyo.authorization_request();
        let now = OffsetDateTime::now_utc();
        let pending = PendingAuthorization {
            state_hash: PendingAuthorization::hash_state(authorization.state.expose()),
            user_id: user,
            account_name,
            code_verifier: authorization.code_verifier,
            created_at: now,
            expires_at: now + PENDING_AUTHORIZATION_TTL,
        };
        self.store
            .put_pending(&pending)
            .await
            .map_err(|e| unavailable("dynamodb", &e))?;
        tracing::info!(event = "oauth_started", user_id = %pending.user_id, "authorization started");
        Ok(json(
            StatusCode::OK,
            &AuthUrlBody {
                auth_url: authorization.url.to_string(),
            },
        ))
    }
}
