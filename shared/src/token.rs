//! The `token` function: credentials for the host app's own services (Node, Python, Go, …),
//! which invoke it with IAM (`lambda:InvokeFunction`; it is not on the HTTP API).
//!
//! Request `{"userId","connectionId"}`; answer `{"authorization","authType",
//! "klaviyoAccountId","expiresAt"}`, the `Authorization` header to call Klaviyo's API with and,
//! for an access token, when it expires: at least two minutes from now (a token closer to its
//! expiry is refreshed first, under the same lease as the refresh job). Errors are answers,
//! not function failures: `{"error":{"code","message"}}` with `not_found`, `needs_reauth`,
//! `unavailable` or `invalid_request`.
//!
//! Every request reads the connection once (a strongly consistent GetItem). A warm container
//! keeps what it opened, with the `version` it was stored at: while the stored version is
//! unchanged and the token has its margin left, it is handed out again without KMS. Any write
//! to the connection (a refresh, a reconnect, needs_reauth) changes the version, so nothing
//! stale is ever handed out.

use crate::auth::UserId;
use crate::context::{Environment, InitError};
use crate::model::ConnectionStatus;
use crate::refresh::{AccessTokenError, AccessTokens, IssuedCredential, KlaviyoCredential};
use crate::store::{ConnectionKey, Store, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use time::OffsetDateTime;

/// Credentials a container keeps at most (a map cleared when full: a few hundred bytes each).
const CACHE_ENTRIES: usize = 10_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    user_id: String,
    connection_id: String,
}

/// A credential as opened from the stored connection at `version`.
struct Kept {
    version: u64,
    issued: IssuedCredential,
}

/// Where a handed-out credential came from (logged; the cost model counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Opened earlier by this container, the stored version unchanged: no KMS call.
    Kept,
    /// Opened from the stored connection: one KMS call.
    Stored,
    /// Refreshed first (or, with Klaviyo failing, the stored token while it still works).
    Refreshed,
}

/// Why no credential was handed out.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    InvalidRequest(&'static str),
    #[error("no such connection for this user")]
    NotFound,
    #[error("the connection needs re-authorisation: the user must reconnect in the settings page")]
    NeedsReauth,
    #[error("no usable credential right now; retry shortly")]
    Unavailable,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::NotFound => "not_found",
            Self::NeedsReauth => "needs_reauth",
            Self::Unavailable => "unavailable",
        }
    }
}

pub struct Tokens {
    store: Store,
    access: AccessTokens,
    kept: Mutex<HashMap<ConnectionKey, Kept>>,
}

impl Tokens {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        let klaviyo = env.klaviyo().await?;
        Ok(Self::new(&env, AccessTokens::new(&env, klaviyo)))
    }

    pub fn new(env: &Environment, access: AccessTokens) -> Self {
        Self {
            store: env.store(),
            access,
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// One invocation: the answer the caller gets, a credential or an error.
    pub async fn answer(&self, request: Value) -> Value {
        match self.handle(request).await {
            Ok((key, issued, account, source)) => {
                tracing::info!(event = "credential_issued", user_id = %key.user_id, connection_id = %key.connection_id, source = ?source, "credential handed out");
                let auth_type = match &issued.credential {
                    KlaviyoCredential::AccessToken(_) => "oauth",
                    KlaviyoCredential::ApiKey(_) => "api_key",
                };
                let header = issued.credential.authorization();
                // The boundary: the caller asked for exactly this header.
                json!({
                    "authorization": header.expose(),
                    "authType": auth_type,
                    "klaviyoAccountId": account,
                    "expiresAt": issued.expires_at.map(rfc3339),
                })
            }
            Err(error) => {
                tracing::info!(
                    event = "credential_refused",
                    code = error.code(),
                    "no credential handed out"
                );
                json!({"error": {"code": error.code(), "message": error.to_string()}})
            }
        }
    }

    async fn handle(
        &self,
        request: Value,
    ) -> Result<(ConnectionKey, IssuedCredential, String, Source), TokenError> {
        let request: TokenRequest = serde_json::from_value(request).map_err(|_| {
            TokenError::InvalidRequest(
                "the request must be {\"userId\": \"…\", \"connectionId\": \"…\"} and nothing else",
            )
        })?;
        let user_id = UserId::parse(&request.user_id).ok_or(TokenError::InvalidRequest(
            "userId must be 1-256 characters",
        ))?;
        // Connection ids are UUIDs; anything else cannot exist.
        if uuid::Uuid::try_parse(&request.connection_id).is_err() {
            return Err(TokenError::NotFound);
        }
        let key = ConnectionKey {
            user_id,
            connection_id: request.connection_id.to_ascii_lowercase(),
        };
        let connection = match self
            .store
            .get_connection(&key.user_id, &key.connection_id)
            .await
        {
            Ok(connection) => connection,
            Err(StoreError::NotFound) => {
                self.forget(&key);
                return Err(TokenError::NotFound);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read a connection for a credential");
                return Err(TokenError::Unavailable);
            }
        };
        if connection.status == ConnectionStatus::NeedsReauth {
            self.forget(&key);
            return Err(TokenError::NeedsReauth);
        }
        let account = connection.klaviyo_account_id.clone();
        let now = OffsetDateTime::now_utc();
        if self.access.usable_as_stored(&connection, now) {
            if let Some(issued) = self.kept(&key, connection.version) {
                return Ok((key, issued, account, Source::Kept));
            }
            let version = connection.version;
            let issued = self.access.stored(&connection).await.map_err(refused)?;
            self.keep(&key, version, &issued);
            return Ok((key, issued, account, Source::Stored));
        }
        let issued = self
            .access
            .issue(&key, Some(connection))
            .await
            .map_err(refused)?;
        Ok((key, issued, account, Source::Refreshed))
    }

    fn kept(&self, key: &ConnectionKey, version: u64) -> Option<IssuedCredential> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.get(key)
            .filter(|k| k.version == version)
            .map(|k| k.issued.clone())
    }

    fn keep(&self, key: &ConnectionKey, version: u64, issued: &IssuedCredential) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= CACHE_ENTRIES && !kept.contains_key(key) {
            kept.clear();
        }
        kept.insert(
            key.clone(),
            Kept {
                version,
                issued: issued.clone(),
            },
        );
    }

    fn forget(&self, key: &ConnectionKey) {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

fn refused(error: AccessTokenError) -> TokenError {
    match error {
        AccessTokenError::NotFound => TokenError::NotFound,
        AccessTokenError::NeedsReauth => TokenError::NeedsReauth,
        AccessTokenError::Unavailable(reason) => {
            tracing::warn!(reason = %reason, "no credential could be made ready");
            TokenError::Unavailable
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
