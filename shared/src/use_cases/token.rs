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
//! Every request reads the connection once (a strongly consistent GetItem), and records the
//! use (`last_used_at`, at most once an hour: a conditional UpdateItem of that attribute
//! alone, which changes neither the version nor the credentials; for a connection the
//! usage-aware refresh policy counts as idle, the same write puts it back on the eager
//! schedule, `AccessTokens::note_use`). A warm container
//! keeps what it opened, with the sealed blob it opened it from: while the stored blob is that
//! very blob (every seal has a fresh nonce and data key, so new credentials never seal to the
//! same bytes) and the token has its margin left, it is handed out again without KMS. Not the
//! `version`: a disconnect and a reconnect start the same connection id at the same version
//! with new credentials. It also keeps the data key that opened them: a refresh seals the new
//! tokens with that same key, so they are opened without KMS too (a reconnect brings a new
//! key, which takes one KMS call).

use crate::adapters::auth::UserId;
use crate::adapters::crypto::{DataKey, SealedBlob};
use crate::adapters::store::{ConnectionKey, Store, StoreError};
use crate::context::{Environment, InitError};
use crate::domain::model::{Connection, ConnectionStatus};
use crate::use_cases::refresh::{
    AccessTokenError, AccessTokens, IssuedCredential, KlaviyoCredential,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

/// Credentials a container keeps at most (a map cleared when full: a few hundred bytes each).
const CACHE_ENTRIES: usize = 10_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    user_id: String,
    connection_id: String,
}

/// A credential as opened from the stored connection's `sealed` blob, and, for OAuth tokens,
/// the data key that opened it (which also opens what refreshes seal after it; an API key is
/// never resealed, so its key is not kept). Boxed in the map, so that growing the map moves
/// pointers, never copies of secrets left behind in freed memory.
struct Kept {
    sealed: SealedBlob,
    issued: IssuedCredential,
    key: Option<DataKey>,
}

/// Where a handed-out credential came from (logged; the cost model counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Opened earlier by this container from the blob still stored: no KMS call.
    Kept,
    /// Opened now with the data key this container kept: a refresh sealed new tokens with
    /// it. No KMS call.
    Reopened,
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
    env: Environment,
    store: Store,
    /// Built at start-up when the client secret can be read, otherwise by the first request
    /// that can (until then: `unavailable` answers, not a container that cannot start).
    access: OnceCell<AccessTokens>,
    kept: Mutex<HashMap<ConnectionKey, Box<Kept>>>,
}

impl Tokens {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        let tokens = Self {
            store: env.store(),
            env,
            access: OnceCell::new(),
            kept: Mutex::new(HashMap::new()),
        };
        // Built now so that warm requests never wait; a failure is logged and retried later.
        let _ = tokens.access().await;
        Ok(tokens)
    }

    async fn access(&self) -> Result<&AccessTokens, TokenError> {
        self.access
            .get_or_try_init(|| async {
                let klaviyo = self.env.klaviyo().await?;
                Ok::<_, InitError>(AccessTokens::new(&self.env, klaviyo))
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "the token function cannot start its work yet");
                TokenError::Unavailable
            })
    }

    /// One invocation: the answer the caller gets, a credential or an error. The payload is
    /// taken raw, so that anything at all is an answer (and never a tree built from megabytes
    /// of input).
    pub async fn answer(&self, request: &RawValue) -> Value {
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
        request: &RawValue,
    ) -> Result<(ConnectionKey, IssuedCredential, String, Source), TokenError> {
        let request: TokenRequest = serde_json::from_str(request.get()).map_err(|_| {
            TokenError::InvalidRequest(
                "the request must be {\"userId\": \"…\", \"connectionId\": \"…\"} and nothing else",
            )
        })?;
        let user_id = UserId::parse(&request.user_id).ok_or(TokenError::InvalidRequest(
            "userId must be 1-256 characters",
        ))?;
        let connection_id =
            Connection::parse_id(&request.connection_id).ok_or(TokenError::NotFound)?;
        let key = ConnectionKey {
            user_id,
            connection_id,
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
        let (issued, source) = match self.credential(&key, &connection, now).await {
            Ok(issued) => issued,
            Err(TokenError::Unavailable) => {
                // Asked for while Klaviyo fails: still a use (an idle connection whose
                // keep-alive keeps failing becomes Degraded once it is wanted).
                if let Ok(access) = self.access().await {
                    access.note_use(&key, &connection, now).await;
                }
                return Err(TokenError::Unavailable);
            }
            Err(e) => return Err(e),
        };
        if matches!(source, Source::Kept | Source::Reopened | Source::Stored) {
            // Best effort, at most once an hour: the answer does not wait on a failure.
            // (`issue`, behind `Source::Refreshed`, records its own.)
            self.access().await?.note_use(&key, &connection, now).await;
        }
        Ok((key, issued, account, source))
    }

    /// The credential for `connection` (just read): kept, opened, or refreshed first.
    async fn credential(
        &self,
        key: &ConnectionKey,
        connection: &Connection,
        now: OffsetDateTime,
    ) -> Result<(IssuedCredential, Source), TokenError> {
        let access = self.access().await?;
        if access.usable_as_stored(connection, now) {
            if let Some(kept) = self.kept(key, connection) {
                return Ok(kept);
            }
            let (issued, data_key) = access.stored_with_key(connection).await.map_err(refused)?;
            self.keep(key, &connection.credentials, &issued, data_key);
            return Ok((issued, Source::Stored));
        }
        let issued = access
            .issue(key, Some(connection.clone()))
            .await
            .map_err(refused)?;
        Ok((issued, Source::Refreshed))
    }

    /// What this container opened from exactly what `connection` stores now, or opens now
    /// with the data key it kept (new tokens a refresh sealed with it).
    fn kept(
        &self,
        key: &ConnectionKey,
        connection: &Connection,
    ) -> Option<(IssuedCredential, Source)> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let entry = kept.get_mut(key)?;
        if entry.sealed == connection.credentials
            && entry.issued.expires_at == connection.access_token_expires_at
        {
            return Some((entry.issued.clone(), Source::Kept));
        }
        let issued = IssuedCredential::open_with_known_key(entry.key.as_ref()?, connection)?;
        entry.sealed = connection.credentials.clone();
        entry.issued = issued.clone();
        Some((issued, Source::Reopened))
    }

    fn keep(
        &self,
        key: &ConnectionKey,
        sealed: &SealedBlob,
        issued: &IssuedCredential,
        data_key: DataKey,
    ) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= CACHE_ENTRIES && !kept.contains_key(key) {
            // Expired tokens first; if that is not enough, start over.
            let now = OffsetDateTime::now_utc();
            kept.retain(|_, k| k.issued.expires_at.is_none_or(|expires| expires > now));
            if kept.len() >= CACHE_ENTRIES {
                kept.clear();
            }
        }
        let data_key = match issued.credential {
            KlaviyoCredential::AccessToken(_) => Some(data_key),
            KlaviyoCredential::ApiKey(_) => None,
        };
        kept.insert(
            key.clone(),
            Box::new(Kept {
                sealed: sealed.clone(),
                issued: issued.clone(),
                key: data_key,
            }),
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
