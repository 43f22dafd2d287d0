//! The control API tests use: inject faults, read what was received, set up accounts and
//! API keys, and play the user who removes the app in Klaviyo.
//!
//! - `GET    /sandbox/health`
//! - `POST   /sandbox/faults`                 a `Fault` as JSON
//! - `DELETE /sandbox/faults[?account=X]`     clear faults (for one account, or all)
//! - `GET    /sandbox/requests[?account=X&endpoint=token]`   what was received
//! - `GET    /sandbox/tokens?account=X`       tokens issued for an account, with status
//! - `PUT    /sandbox/accounts/{id}`          `{"organization_name", "access_token_ttl_secs"}`
//! - `POST   /sandbox/api-keys`               `{"key", "account", "organization_name"?}`
//! - `POST   /sandbox/api-keys/revoke`        `{"key"}`: the user deleted the key in Klaviyo
//! - `POST   /sandbox/accounts/{id}/revoke-all`   the user removed the app: every token dies
//! - `POST   /sandbox/accounts/{id}/expire-access-tokens`
//! - `POST   /sandbox/accounts/{id}/tokens`    `{"count": N}`: mint N token pairs (seeding
//!   benchmarks without N browser flows)
//! - `POST   /sandbox/client-secret`          `{"secret"}`: the app's client secret is
//!   regenerated in Klaviyo; the old one stops working at once (tokens already issued stay)

use crate::state::{Account, Endpoint, Fault, Sandbox};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

type App = State<Arc<Sandbox>>;

pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/sandbox/health", get(|| async { "ok" }))
        .route(
            "/sandbox/faults",
            post(add_fault).delete(clear_faults).get(list_faults),
        )
        .route("/sandbox/requests", get(requests))
        .route("/sandbox/tokens", get(tokens))
        .route("/sandbox/accounts/{id}", put(put_account))
        .route("/sandbox/api-keys", post(add_api_key))
        .route("/sandbox/api-keys/revoke", post(revoke_api_key))
        .route("/sandbox/accounts/{id}/revoke-all", post(revoke_all))
        .route(
            "/sandbox/accounts/{id}/expire-access-tokens",
            post(expire_access_tokens),
        )
        .route("/sandbox/accounts/{id}/tokens", post(mint_tokens))
        .route("/sandbox/client-secret", post(regenerate_client_secret))
}

#[derive(Deserialize)]
struct ClientSecret {
    secret: String,
}

async fn regenerate_client_secret(State(sandbox): App, Json(new): Json<ClientSecret>) -> Response {
    sandbox.regenerate_client_secret(new.secret);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct Filter {
    account: Option<String>,
    endpoint: Option<Endpoint>,
}

async fn add_fault(State(sandbox): App, Json(fault): Json<Fault>) -> Response {
    sandbox.state().faults.push(fault);
    StatusCode::CREATED.into_response()
}

async fn clear_faults(State(sandbox): App, Query(filter): Query<Filter>) -> Response {
    let mut state = sandbox.state();
    match filter.account {
        Some(account) => state
            .faults
            .retain(|f| f.account.as_deref() != Some(account.as_str())),
        None => state.faults.clear(),
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn list_faults(State(sandbox): App) -> Response {
    Json(sandbox.state().faults.clone()).into_response()
}

async fn requests(State(sandbox): App, Query(filter): Query<Filter>) -> Response {
    let state = sandbox.state();
    let matching: Vec<_> = state
        .requests
        .iter()
        .filter(|r| {
            filter
                .account
                .as_ref()
                .is_none_or(|a| r.account.as_ref() == Some(a))
        })
        .filter(|r| filter.endpoint.is_none_or(|e| r.endpoint == e))
        .cloned()
        .collect();
    Json(matching).into_response()
}

async fn tokens(State(sandbox): App, Query(filter): Query<Filter>) -> Response {
    let state = sandbox.state();
    let mine = |account: &str| filter.account.as_deref().is_none_or(|a| a == account);
    let access: Vec<_> = state
        .access_tokens
        .iter()
        .filter(|(_, g)| mine(&g.account))
        .map(|(token, g)| json!({"token": token, "account": g.account, "revoked": g.revoked, "expires_at": g.expires_at, "family": g.family}))
        .collect();
    let refresh: Vec<_> = state
        .refresh_tokens
        .iter()
        .filter(|(_, g)| mine(&g.account))
        .map(|(token, g)| json!({"token": token, "account": g.account, "status": g.status, "family": g.family}))
        .collect();
    Json(json!({"access_tokens": access, "refresh_tokens": refresh})).into_response()
}

async fn put_account(
    State(sandbox): App,
    Path(id): Path<String>,
    Json(account): Json<Account>,
) -> Response {
    sandbox.state().accounts.insert(id, account);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct NewApiKey {
    key: String,
    account: String,
    organization_name: Option<String>,
}

async fn add_api_key(State(sandbox): App, Json(new): Json<NewApiKey>) -> Response {
    let mut state = sandbox.state();
    state.ensure_account(&new.account, new.organization_name.as_deref());
    state.api_keys.insert(new.key, new.account);
    StatusCode::CREATED.into_response()
}

#[derive(Deserialize)]
struct KeyToRevoke {
    key: String,
}

/// 204 when the key existed (and no longer works), 404 when it did not.
async fn revoke_api_key(State(sandbox): App, Json(revoke): Json<KeyToRevoke>) -> Response {
    match sandbox.state().api_keys.remove(&revoke.key) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn revoke_all(State(sandbox): App, Path(id): Path<String>) -> Response {
    let mut state = sandbox.state();
    let families: Vec<String> = state
        .refresh_tokens
        .values()
        .filter(|g| g.account == id)
        .map(|g| g.family.clone())
        .collect();
    for family in families {
        state.revoke_family(&family);
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct Mint {
    count: usize,
}

/// At most this many pairs per call.
const MAX_MINT: usize = 10_000;

async fn mint_tokens(
    State(sandbox): App,
    Path(id): Path<String>,
    Json(mint): Json<Mint>,
) -> Response {
    if mint.count > MAX_MINT {
        return (
            StatusCode::BAD_REQUEST,
            format!("count must be at most {MAX_MINT}"),
        )
            .into_response();
    }
    let mut state = sandbox.state();
    state.ensure_account(&id, None);
    let scopes = "accounts:read lists:read";
    let pairs: Vec<_> = (0..mint.count)
        .map(|_| {
            let family = crate::state::random_token();
            let (access, refresh, ttl) = state.issue_tokens(&id, scopes, &family);
            json!({"access_token": access, "refresh_token": refresh, "expires_in": ttl})
        })
        .collect();
    Json(pairs).into_response()
}

async fn expire_access_tokens(State(sandbox): App, Path(id): Path<String>) -> Response {
    let mut state = sandbox.state();
    for grant in state.access_tokens.values_mut().filter(|g| g.account == id) {
        grant.expires_at = 0;
    }
    StatusCode::NO_CONTENT.into_response()
}
