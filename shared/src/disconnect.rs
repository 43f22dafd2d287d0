//! `DELETE /api/oauth/accounts/{accountId}`: remove a connection and revoke its token.

use crate::auth::JwtVerifier;
use crate::context::{Environment, InitError};
use crate::http::{ApiError, Web, path_param, require_method};
use http::Method;
use lambda_http::{Body, Request, Response};

pub const ROUTE_PREFIX: &str = "/api/oauth/accounts/";

pub struct Disconnect {
    web: Web,
    auth: JwtVerifier,
}

impl Disconnect {
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
        require_method(req, Method::DELETE, "DELETE, OPTIONS")?;
        let _user = self.auth.authenticate(req)?;
        let _account_id = path_param(req, "accountId", ROUTE_PREFIX)
            .ok_or(ApiError::NotFound("No such account."))?;
        Err(ApiError::NotImplemented)
    }
}
