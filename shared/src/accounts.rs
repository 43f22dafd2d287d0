//! `GET /api/oauth/accounts`: the caller's connections, newest first.

use crate::auth::JwtVerifier;
use crate::context::{Environment, InitError};
use crate::http::{ApiError, Web, require_method};
use http::Method;
use lambda_http::{Body, Request, Response};

pub struct Accounts {
    web: Web,
    auth: JwtVerifier,
}

impl Accounts {
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
        require_method(req, Method::GET, "GET, OPTIONS")?;
        let _user = self.auth.authenticate(req)?;
        Err(ApiError::NotImplemented)
    }
}
