//! `GET /api/oauth/connect/klaviyo` (start OAuth) and
//! `POST /api/oauth/connect/klaviyo/api-key` (connect with a private API key).

use crate::auth::JwtVerifier;
use crate::context::{Environment, InitError};
use crate::http::{ApiError, Web, require_method};
use http::Method;
use lambda_http::{Body, Request, Response};

pub struct Connect {
    web: Web,
    auth: JwtVerifier,
}

impl Connect {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        Ok(Self {
            web: env.web(),
            auth: env.jwt_verifier().await?,
        })
    }

    pub async fn handle(&self, req: Request) -> Result<Response<Body>, lambda_http::Error> {
        Ok(self.web.serve(&req, || self.respond(&req)).await)
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let is_api_key_route = req.uri().path().trim_end_matches('/').ends_with("/api-key");
        if is_api_key_route {
            require_method(req, Method::POST, "POST, OPTIONS")?;
        } else {
            require_method(req, Method::GET, "GET, OPTIONS")?;
        }
        let _user = self.auth.authenticate(req)?;
        Err(ApiError::NotImplemented)
    }
}
