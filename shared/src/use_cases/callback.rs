//! `GET /klaviyo/oauthcallback`: where Klaviyo sends the browser back after consent.
//!
//! Always answers with a redirect to `<FRONTEND_URL>/settings`: on success
//! `?connected=klaviyo&completion=<handle>` (or `?connected=klaviyo` with
//! `CONNECT_COMPLETION=off`), `?error=klaviyo_access_denied` when the user clicked Deny, and
//! `?error=klaviyo_connection_failed` for everything else. The steps, each failing closed:
//! consume the pending state once; exchange the code with the PKCE verifier; fetch the
//! Klaviyo account; seal the tokens; then park the result for the user's own session to
//! complete (`crate::use_cases::complete`), or with completion off upsert the connection. Tokens
//! obtained for a flow that then fails are revoked, so no grant is left behind unstored.

use crate::adapters::config::ConnectCompletion;
use crate::adapters::crypto::{CryptoError, Purpose, Sealer};
use crate::adapters::http::{ApiError, FrontendRedirects, query_param, require_method};
use crate::adapters::klaviyo::{ApiCredential, Klaviyo, KlaviyoError, TokenSet};
use crate::adapters::store::{Store, StoreError};
use crate::context::{Endpoint, Environment, InitError};
use crate::domain::model::{
    AuthType, Connection, ConnectionStatus, Credentials, ParkedConnection, PendingRevocation,
    REFRESH_LEAD,
};
use crate::domain::secret::Secret;
use crate::use_cases::revocation::{INLINE_BUDGET, Revoker};
use http::Method;
use lambda_http::{Body, Request, Response};
use time::OffsetDateTime;

/// Longest `code`/`state` accepted; Klaviyo's are far shorter.
const MAX_PARAMETER_LEN: usize = 2048;

pub struct Callback {
    frontend: FrontendRedirects,
    store: Store,
    sealer: Sealer,
    klaviyo: Klaviyo,
    revoker: Revoker,
    completion: ConnectCompletion,
}

/// What a successful callback did.
enum Outcome {
    /// Parked for the user's own session to complete, under this handle.
    Parked(Connection, Secret),
    Connected(Connection),
}

/// Why a callback did not connect an account; for logs (the browser sees two pages).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the user denied access")]
    Denied,
    #[error("Klaviyo returned error `{0}`")]
    Provider(String),
    #[error("code or state missing or malformed")]
    MissingParameters,
    #[error("state unknown, expired or already used")]
    StateRejected,
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("Klaviyo: {0}")]
    Klaviyo(#[from] KlaviyoError),
    #[error("sealing: {0}")]
    Crypto(#[from] CryptoError),
}

impl Endpoint for Callback {
    async fn build(env: &Environment) -> Result<Self, InitError> {
        let klaviyo = env.klaviyo().await?;
        Ok(Self {
            frontend: env.frontend(),
            store: env.store(),
            sealer: env.sealer(),
            revoker: env.revoker(klaviyo.clone()),
            klaviyo,
            completion: env.config.connect_completion,
        })
    }

    /// The browser came back from Klaviyo but the client secret cannot be read: the same
    /// failure page as any other failed connect, so the user can simply try again.
    fn unavailable(env: &Environment, req: &Request) -> Result<Response<Body>, ApiError> {
        require_method(req, Method::GET, "GET")?;
        tracing::warn!(
            event = "oauth_callback_failed",
            reason = "secrets unavailable",
            "connection failed"
        );
        let frontend = env.frontend();
        Ok(match query_param(req, "error").as_deref() {
            Some("access_denied") => frontend.settings("error", "klaviyo_access_denied"),
            _ => frontend.settings("error", "klaviyo_connection_failed"),
        })
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        require_method(req, Method::GET, "GET")?;
        Ok(match self.complete(req).await {
            Ok(Outcome::Parked(connection, handle)) => {
                tracing::info!(
                    event = "oauth_awaiting_completion",
                    user_id = %connection.user_id,
                    connection_id = %connection.id,
                    klaviyo_account_id = %connection.klaviyo_account_id,
                    "Klaviyo authorized; waiting for the user's session to complete"
                );
                self.frontend
                    .settings_with(&[("connected", "klaviyo"), ("completion", handle.expose())])
            }
            Ok(Outcome::Connected(connection)) => {
                crate::use_cases::connect::log_connected(&connection);
                self.frontend.settings("connected", "klaviyo")
            }
            Err(Failure::Denied) => {
                tracing::info!(event = "oauth_denied", "the user denied access at Klaviyo");
                self.frontend.settings("error", "klaviyo_access_denied")
            }
            Err(failure) => {
                match &failure {
                    Failure::StateRejected => tracing::warn!(
                        event = "oauth_state_rejected",
                        "callback with an unknown, expired or replayed state"
                    ),
                    other => {
                        tracing::warn!(event = "oauth_callback_failed", reason = %other, "connection failed")
                    }
                }
                self.frontend.settings("error", "klaviyo_connection_failed")
            }
        })
    }
}

impl Callback {
    async fn complete(&self, req: &Request) -> Result<Outcome, Failure> {
        let state = bounded(query_param(req, "state"));
        if let Some(error) = query_param(req, "error") {
            // Consume the state anyway so the pending authorization cannot be used later.
            if let Some(state) = &state {
                let _ = self
                    .store
                    .consume_pending(state.expose(), OffsetDateTime::now_utc())
                    .await;
            }
            return Err(if error == "access_denied" {
                Failure::Denied
            } else {
                Failure::Provider(
                    error
                        .chars()
                        .filter(char::is_ascii_graphic)
                        .take(64)
                        .collect(),
                )
            });
        }
        let (Some(code), Some(state)) = (bounded(query_param(req, "code")), state) else {
            return Err(Failure::MissingParameters);
        };
        let pending = match self
            .store
            .consume_pending(state.expose(), OffsetDateTime::now_utc())
            .await
        {
            Ok(pending) => pending,
            Err(StoreError::NotFound) => return Err(Failure::StateRejected),
            Err(e) => return Err(e.into()),
        };
        let tokens = self
            .klaviyo
            .exchange_code(&code, &pending.code_verifier)
            .await?;
        let connection = match self.new_connection(&pending, &tokens).await {
            Ok(connection) => connection,
            Err(failure) => {
                self.revoke_abandoned(&tokens).await;
                return Err(failure);
            }
        };
        if self.completion == ConnectCompletion::Required {
            // One write parks the result and queues its revocation for when the completion
            // window has passed. A failed write may have landed (then the job revokes it) or
            // not (then nothing else would): revoked now either way, which is harmless twice.
            let (parked, handle) = ParkedConnection::new(connection, OffsetDateTime::now_utc());
            return match self.store.park_connection(&parked).await {
                Ok(()) => Ok(Outcome::Parked(parked.connection, handle)),
                Err(e) => {
                    self.revoke_abandoned(&tokens).await;
                    Err(e.into())
                }
            };
        }
        // A reconnect replaces the old tokens and queues the old refresh token's revocation
        // in one transaction.
        match self.revoker.replace(&connection).await {
            Ok(stored) => Ok(Outcome::Connected(stored)),
            Err(e) => {
                match self.stored_after_all(&connection).await {
                    Some(true) => return Ok(Outcome::Connected(connection)),
                    Some(false) => self.revoke_abandoned(&tokens).await,
                    // Queued, the job revokes them unless they turn out to be stored.
                    None => self.queue_in_doubt(&connection).await,
                }
                Err(e.into())
            }
        }
    }

    /// After a failed write: whether it landed anyway (its answer lost), `None` when that
    /// cannot be read either. Revoking tokens that are stored would break the connection, so
    /// in doubt they are queued rather than revoked, and the user is told the connect failed
    /// (they can simply try again).
    async fn stored_after_all(&self, connection: &Connection) -> Option<bool> {
        match self
            .store
            .stores_credentials(&connection.user_id, &connection.id, &connection.credentials)
            .await
        {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::warn!(event = "revocation_skipped", connection_id = %connection.id, error = %e, "cannot tell whether the new tokens were stored; not revoking them");
                None
            }
        }
    }

    /// Tokens whose write may or may not have landed are queued for revocation; the refresh
    /// job revokes them only if they are not what the connection stores.
    async fn queue_in_doubt(&self, connection: &Connection) {
        let pending = PendingRevocation::for_connection(connection, OffsetDateTime::now_utc());
        if let Err(e) = self.store.put_pending_revocation(&pending).await {
            tracing::error!(event = "revocation_lost", connection_id = %connection.id, error = %e, "new tokens of unknown fate could neither be confirmed nor queued");
        }
    }

    /// The connection Klaviyo's answer makes: the account it names, the tokens sealed.
    async fn new_connection(
        &self,
        pending: &crate::domain::model::PendingAuthorization,
        tokens: &TokenSet,
    ) -> Result<Connection, Failure> {
        // The data key is bound to user and purpose (the connection goes into the AEAD), so
        // it is fetched while Klaviyo says which account this is.
        let (account, key) = tokio::join!(
            self.klaviyo
                .account(ApiCredential::AccessToken(&tokens.access_token)),
            self.sealer
                .data_key(pending.user_id.as_str(), Purpose::OAuthTokens),
        );
        let account = account?;
        let key = key?;
        let connection_id = Connection::id_for(&pending.user_id, &account.id);
        let refresh_token = tokens
            .refresh_token
            .clone()
            .ok_or_else(|| KlaviyoError::Malformed("no refresh token".into()))?;
        let credentials = Credentials::OAuth {
            access_token: tokens.access_token.clone(),
            refresh_token,
        };
        let sealed = credentials.seal(&key, pending.user_id.as_str(), &connection_id)?;
        let now = OffsetDateTime::now_utc();
        let connection = Connection {
            id: connection_id,
            user_id: pending.user_id.clone(),
            account_name: pending.account_name.clone(),
            klaviyo_account_id: account.id,
            klaviyo_account_name: account.organization_name,
            auth_type: AuthType::OAuth,
            status: ConnectionStatus::Active,
            scopes: tokens
                .scopes
                .clone()
                .unwrap_or_else(|| self.klaviyo.requested_scopes().to_vec()),
            connected_at: now,
            updated_at: now,
            last_refreshed_at: None,
            access_token_expires_at: Some(tokens.expires_at),
            refresh_due_at: Some(tokens.expires_at - REFRESH_LEAD),
            refresh_failures: 0,
            authorized_at: now,
            status_reason: None,
            degraded: false,
            // The account was just read with these tokens.
            last_verified_at: Some(now),
            last_used_at: None,
            credentials: sealed,
            version: 0,
        };
        Ok(connection)
    }

    /// The flow failed after Klaviyo issued tokens that nothing stores: revoke them now,
    /// within the inline budget (there is no connection to queue them on).
    async fn revoke_abandoned(&self, tokens: &TokenSet) {
        if let Some(token) = &tokens.refresh_token {
            let revoked = tokio::time::timeout(INLINE_BUDGET, self.revoker.revoke_now(token)).await;
            let reason = match revoked {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the inline budget ran out".to_owned(),
            };
            tracing::warn!(event = "revocation_failed", reason = %reason, "could not revoke tokens of a failed connection");
        }
    }
}

/// A present, non-empty parameter of sane length, kept as a secret (codes and states are
/// credentials while they are valid).
fn bounded(value: Option<String>) -> Option<Secret> {
    value
        .filter(|v| !v.is_empty() && v.len() <= MAX_PARAMETER_LEN)
        .map(Secret::new)
}
