//! `GET /api/oauth/connect/klaviyo` (start OAuth), `POST /api/oauth/connect/klaviyo/complete`
//! (finish it from the user's session, `crate::use_cases::complete`), `POST
//! /api/oauth/connect/klaviyo/decline` (withdraw it when the page cannot) and `POST
//! /api/oauth/connect/klaviyo/api-key` (connect with a private API key).

use crate::adapters::auth::{JwtVerifier, UserId};
use crate::adapters::crypto::{Purpose, Sealer};
use crate::adapters::http::{ApiError, json, json_body, query_param, require_method, unavailable};
use crate::adapters::klaviyo::{ApiCredential, Klaviyo, KlaviyoError};
use crate::adapters::store::Store;
use crate::context::{Endpoint, Environment, InitError};
use crate::domain::model::{
    AuthType, Connection, ConnectionStatus, Credentials, KEY_CHECK_MIN_GAP,
    PENDING_AUTHORIZATION_TTL, PendingAuthorization, key_check_due, parse_account_name,
};
use crate::domain::rate_limit::{Admission, RateLimit, RateWindow, Scope};
use crate::domain::secret::Secret;
use crate::use_cases::accounts::AccountView;
use crate::use_cases::complete::Completer;
use crate::use_cases::revocation::Revoker;
use crate::use_cases::verify::Verifier;
use http::{Method, StatusCode};
use lambda_http::{Body, Request, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Largest API-key request body accepted.
pub const MAX_API_KEY_BODY: usize = 4 * 1024;

pub struct Connect {
    auth: JwtVerifier,
    store: Store,
    sealer: Sealer,
    klaviyo: Klaviyo,
    revoker: Revoker,
    rate: RateLimit,
    completer: Completer,
    verifier: Verifier,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApiKeyRequest {
    api_key: Secret,
    #[serde(default)]
    account_name: Option<String>,
}

#[derive(Serialize)]
struct CreatedBody {
    success: bool,
    account: AccountView,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthUrlBody {
    auth_url: String,
}

impl Endpoint for Connect {
    async fn build(env: &Environment) -> Result<Self, InitError> {
        let (klaviyo, auth) = env.klaviyo_and_jwt_verifier().await?;
        let revoker = env.revoker(klaviyo.clone());
        Ok(Self {
            auth,
            store: env.store(),
            sealer: env.sealer(),
            completer: Completer::new(env.store(), revoker.clone(), env.config.connect_rate),
            verifier: Verifier::new(env, klaviyo.clone()),
            revoker,
            klaviyo,
            rate: env.config.connect_rate,
        })
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().trim_end_matches('/');
        if path.ends_with("/verify") {
            require_method(req, Method::POST, "POST, OPTIONS")?;
            let user = self.auth.authenticate(req).await?;
            return self.verifier.respond(user, req).await;
        }
        if path.ends_with("/api-key") {
            require_method(req, Method::POST, "POST, OPTIONS")?;
            let user = self.auth.authenticate(req).await?;
            return self.connect_api_key(user, req).await;
        }
        if path.ends_with("/decline") {
            require_method(req, Method::POST, "POST, OPTIONS")?;
            return self.completer.decline(req).await;
        }
        if path.ends_with("/complete") {
            require_method(req, Method::POST, "POST, OPTIONS")?;
            let user = self.auth.authenticate(req).await?;
            return self.completer.complete(user, req).await;
        }
        require_method(req, Method::GET, "GET, OPTIONS")?;
        let user = self.auth.authenticate(req).await?;
        self.start_oauth(user, req).await
    }
}

impl Connect {
    /// Stores state and PKCE verifier as a pending authorization (keyed by the state's
    /// hash, expiring in 10 minutes) and returns the Klaviyo authorize URL.
    async fn start_oauth(&self, user: UserId, req: &Request) -> Result<Response<Body>, ApiError> {
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
        let window = self.rate.window_at(now);
        let admission = self
            .store
            .put_pending_counted(&pending, &window)
            .await
            .map_err(|e| unavailable("dynamodb", &e))?;
        admit(admission, &pending.user_id, &window)?;
        tracing::info!(event = "oauth_started", user_id = %pending.user_id, "authorization started");
        Ok(json(
            StatusCode::OK,
            &AuthUrlBody {
                auth_url: authorization.url.to_string(),
            },
        ))
    }

    /// Validates a private API key against Klaviyo, then seals and stores it on the
    /// connection for that Klaviyo account (replacing OAuth tokens there, whose refresh token
    /// is queued for revocation in the same write and then revoked).
    async fn connect_api_key(
        &self,
        user: UserId,
        req: &Request,
    ) -> Result<Response<Body>, ApiError> {
        let body: ApiKeyRequest = json_body(req, MAX_API_KEY_BODY)?;
        let account_name = parse_account_name(body.account_name.as_deref())
            .map_err(|message| ApiError::bad_request("invalid_account_name", message))?;
        if !looks_like_private_key(body.api_key.expose()) {
            return Err(ApiError::bad_request(
                "invalid_api_key",
                "apiKey must be a Klaviyo private API key (it starts with pk_).",
            ));
        }
        // Counted before Klaviyo is asked, so guessing keys costs the caller, not Klaviyo's
        // per-account limit.
        count_attempt(&self.store, self.rate, &user, Scope::Connect).await?;
        // The data key (bound to user and purpose) is fetched while Klaviyo checks the key.
        let (account, key) = tokio::join!(
            self.klaviyo.account(ApiCredential::ApiKey(&body.api_key)),
            self.sealer.data_key(user.as_str(), Purpose::ApiKey),
        );
        let account = account.map_err(key_validation_error)?;
        let key = key.map_err(|e| unavailable("kms", &e))?;
        let id = Connection::id_for(&user, &account.id);
        let sealed = Credentials::ApiKey(body.api_key)
            .seal(&key, user.as_str(), &id)
            .map_err(|e| unavailable("sealing", &e))?;
        let now = OffsetDateTime::now_utc();
        let connection = Connection {
            // The refresh job checks the key again once a day, at the connection's own time.
            refresh_due_at: Some(key_check_due(&id, now + KEY_CHECK_MIN_GAP)),
            id,
            user_id: user,
            account_name,
            klaviyo_account_id: account.id,
            klaviyo_account_name: account.organization_name,
            auth_type: AuthType::ApiKey,
            status: ConnectionStatus::Active,
            // A private key's scopes are fixed in Klaviyo and not reported by the API.
            scopes: Vec::new(),
            connected_at: now,
            updated_at: now,
            last_refreshed_at: None,
            access_token_expires_at: None,
            refresh_failures: 0,
            authorized_at: now,
            status_reason: None,
            degraded: false,
            last_verified_at: Some(now),
            last_used_at: None,
            credentials: sealed,
            version: 0,
        };
        // OAuth tokens this replaces are queued for revocation in the same transaction that
        // stores the key, and revoked only once it is stored.
        let stored = match self.revoker.replace(&connection).await {
            Ok(stored) => stored,
            Err(e) => return Err(unavailable("dynamodb", &e)),
        };
        log_connected(&stored);
        Ok(json(
            StatusCode::CREATED,
            &CreatedBody {
                success: true,
                account: AccountView::from(&stored),
            },
        ))
    }
}

/// Counts one attempt of `user` in `scope` that writes nothing else with it.
pub(crate) async fn count_attempt(
    store: &Store,
    rate: RateLimit,
    user: &UserId,
    scope: Scope,
) -> Result<(), ApiError> {
    let window = rate.window_at(OffsetDateTime::now_utc());
    let admission = store
        .count_attempt(user, scope, &window)
        .await
        .map_err(|e| unavailable("dynamodb", &e))?;
    admit(admission, user, &window)
}

/// A limited request is a 429 telling the caller when its window resets.
fn admit(admission: Admission, user: &UserId, window: &RateWindow) -> Result<(), ApiError> {
    match admission {
        Admission::Admitted => Ok(()),
        Admission::Limited => {
            let retry_after_secs = window.retry_after_secs(OffsetDateTime::now_utc());
            tracing::warn!(
                event = "connect_rate_limited",
                user_id = %user,
                retry_after_secs,
                "connect rate limit reached"
            );
            Err(ApiError::RateLimited { retry_after_secs })
        }
    }
}

/// The log line of every connection made (OAuth completed or at the callback, API key).
pub(crate) fn log_connected(connection: &Connection) {
    tracing::info!(
        event = "klaviyo_connected",
        auth_type = match connection.auth_type {
            AuthType::OAuth => "oauth",
            AuthType::ApiKey => "api_key",
        },
        user_id = %connection.user_id,
        connection_id = %connection.id,
        klaviyo_account_id = %connection.klaviyo_account_id,
        version = connection.version,
        "Klaviyo account connected"
    );
}

/// `pk_` and 10–128 letters, digits or underscores: the shape of Klaviyo private keys.
fn looks_like_private_key(key: &str) -> bool {
    key.strip_prefix("pk_").is_some_and(|rest| {
        (10..=128).contains(&rest.len())
            && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

fn key_validation_error(error: KlaviyoError) -> ApiError {
    match error {
        KlaviyoError::Rejected { .. } => {
            ApiError::bad_request("invalid_api_key", "Klaviyo rejected this API key.")
        }
        other => klaviyo_failure(
            other,
            "Klaviyo could not be reached to validate the key; please try again.",
        ),
    }
}

/// Klaviyo could not answer a call made for the user (checking a key, testing a connection):
/// its rate limiting is passed on as a 429 with its `Retry-After`, anything else is a 502
/// with `message`.
pub(crate) fn klaviyo_failure(error: KlaviyoError, message: &'static str) -> ApiError {
    match error {
        KlaviyoError::RateLimited { retry_after } => ApiError::RateLimited {
            retry_after_secs: retry_after.map_or(1, |d| d.as_secs().max(1)),
        },
        other => {
            tracing::warn!(event = "klaviyo_unavailable", error = %other, "Klaviyo could not answer");
            ApiError::Upstream {
                code: "klaviyo_unavailable",
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_shape() {
        assert!(looks_like_private_key("pk_sandbox_key_0123456789"));
        assert!(!looks_like_private_key("pk_short"));
        assert!(!looks_like_private_key("sk_sandbox_key_0123456789"));
        assert!(!looks_like_private_key("pk_with space 0123456789"));
        assert!(!looks_like_private_key(&format!("pk_{}", "a".repeat(129))));
    }
}
