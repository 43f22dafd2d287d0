//! `GET /klaviyo/oauthcallback`: where Klaviyo sends the browser back after consent.

use crate::context::{Environment, InitError};
use crate::http::{ApiError, Web, require_method};
use http::Method;
use lambda_http::{Body, Request, Response};

pub struct Callback {
    web: Web,
}

impl Callback {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        Ok(Self { web: env.web() })
    }

    pub async fn handle(&self, req: Request) -> Result<Response<Body>, lambda_http::Error> {
        Ok(self.web.serve(&req, || self.respond(&req)).await)
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        require_method(req, Method::GET, "GET")?;
        Err(ApiError::NotImplemented)
    }
}
