//! `DELETE /api/oauth/accounts/{accountId}`: remove a connection and revoke its token.
//!
//! The connection leaves the list at once. For OAuth connections, one transaction deletes it
//! and records a pending revocation holding its (still sealed) tokens, while the tokens are
//! opened concurrently; then the refresh token is revoked at Klaviyo (with retries inside the
//! request) and the pending revocation deleted. If Klaviyo cannot be reached, the disconnect
//! still succeeds and the refresh job finishes the revocation. At most four sequential waits:
//! read, transaction ∥ KMS, revoke, delete (a fifth, a read of the queue item, when the
//! transaction's answer is not a success).

use crate::adapters::auth::{JwtVerifier, UserId};
use crate::adapters::crypto::Sealer;
use crate::adapters::http::{ApiError, json, path_param, require_method, unavailable};
use crate::adapters::store::{Store, StoreError};
use crate::context::{Endpoint, Environment, InitError};
use crate::domain::model::{AuthType, Connection, Credentials, PendingRevocation};
use crate::use_cases::revocation::{Revocation, Revoker};
use http::{Method, StatusCode};
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use time::OffsetDateTime;

pub const ROUTE_PREFIX: &str = "/api/oauth/accounts/";
/// How often the read-then-write is retried when the connection changes in between (a
/// refresh writing new tokens).
pub const ATTEMPTS: u32 = 3;

const NOT_FOUND: ApiError = ApiError::NotFound("Account not found.");

#[derive(Serialize)]
struct Disconnected {
    success: bool,
    message: &'static str,
}

pub struct Disconnect {
    auth: JwtVerifier,
    store: Store,
    sealer: Sealer,
    revoker: Revoker,
}

impl Endpoint for Disconnect {
    async fn build(env: &Environment) -> Result<Self, InitError> {
        let (klaviyo, auth) = env.klaviyo_and_jwt_verifier().await?;
        Ok(Self {
            auth,
            store: env.store(),
            sealer: env.sealer(),
            revoker: env.revoker(klaviyo),
        })
    }

    async fn respond(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        require_method(req, Method::DELETE, "DELETE, OPTIONS")?;
        let user = self.auth.authenticate(req).await?;
        // Ids are UUIDs; anything else cannot exist (and is answered like a stranger's id).
        let id = path_param(req, "accountId", ROUTE_PREFIX)
            .and_then(|id| Connection::parse_id(&id))
            .ok_or(NOT_FOUND)?;
        let revocation = self.remove(&user, &id).await?;
        tracing::info!(event = "klaviyo_disconnected", user_id = %user, connection_id = %id, revocation = ?revocation, "connection removed");
        Ok(json(
            StatusCode::OK,
            &Disconnected {
                success: true,
                message: "Account disconnected successfully",
            },
        ))
    }
}

impl Disconnect {
    async fn remove(&self, user: &UserId, id: &str) -> Result<Revocation, ApiError> {
        for _ in 0..ATTEMPTS {
            let connection = match self.store.get_connection(user, id).await {
                Ok(connection) => connection,
                Err(StoreError::NotFound) => return Err(NOT_FOUND),
                Err(e) => return Err(unavailable("dynamodb", &e)),
            };
            if connection.auth_type == AuthType::ApiKey {
                match self.store.delete_connection_if_version(&connection).await {
                    Ok(()) => return Ok(Revocation::Nothing),
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(unavailable("dynamodb", &e)),
                }
            }
            let pending = PendingRevocation::for_connection(&connection, OffsetDateTime::now_utc());
            let (removed, opened) = tokio::join!(
                self.store
                    .remove_connection_and_queue_revocation(&connection, &pending),
                Credentials::open(&self.sealer, &connection),
            );
            match removed {
                Ok(()) => {}
                // An attempt whose answer was lost may have landed (a retry then meets a
                // transaction still in progress, or the connection already gone): the queue
                // item, whose id only this request knows, tells.
                Err(e) => match self.store.get_pending_revocation(&pending.id).await {
                    Ok(_) => {}
                    Err(_) if matches!(e, StoreError::Conflict) => continue,
                    Err(_) => return Err(unavailable("dynamodb", &e)),
                },
            }
            // The connection is gone and its token safely queued; now try to finish.
            return Ok(match opened.as_ref().map(Credentials::refresh_token) {
                Ok(Some(token)) => self.revoker.finish_queued(&pending, token).await,
                Ok(None) => Revocation::Nothing,
                Err(e) => {
                    tracing::warn!(event = "revocation_failed", connection_id = %id, reason = %e, "could not open the tokens; the refresh job will retry");
                    Revocation::Deferred
                }
            });
        }
        tracing::warn!(connection_id = %id, "connection kept changing during disconnect");
        Err(ApiError::Unavailable)
    }
}
