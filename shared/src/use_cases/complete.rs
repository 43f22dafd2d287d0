//! `POST /api/oauth/connect/klaviyo/complete`: the user's own session finishes an OAuth
//! connect that the callback parked (`CONNECT_COMPLETION=required`).
//!
//! Whoever's browser follows an authorize URL finishes the flow at Klaviyo, so the callback
//! cannot know whether the person who clicked Allow is the user who started it (an attacker
//! can send a victim their own authorize URL). It parks the result under a one-time handle
//! and sends the browser to the settings page, which calls this route with the handle and the
//! session's JWT. Only the user who started the flow can turn the parked result into a
//! connection; anyone else, and an unknown, used or expired handle, gets one 404, and the
//! parked tokens are revoked.
//!
//! `POST /api/oauth/connect/klaviyo/decline` (no JWT) is for a page that holds a handle but
//! cannot complete it (nobody is signed in, or the session cannot be read): it revokes the
//! parked result at once, so a handle left in a signed-out browser (an attack's victim who
//! has no account with the host app) is not live for the rest of its window. Holding the
//! handle is the only capability it needs, and any holder could already burn it through the
//! completion route; it answers the same 200 whatever the handle was.
//!
//! Steps: count the attempt; claim the parked result for this request (one conditional
//! write, so two requests never both act on it); then either store the connection and delete
//! the parked result in one transaction, or revoke the parked tokens and delete it. A request
//! that dies in between leaves the parked result queued for revocation, which the refresh job
//! finishes once its window has passed: nothing live is ever forgotten.

use crate::adapters::auth::UserId;
use crate::adapters::http::{ApiError, json, json_body, unavailable};
use crate::adapters::store::{Claim, Store, StoreError};
use crate::domain::model::{Connection, ParkedConnection};
use crate::domain::rate_limit::{RateLimit, Scope};
use crate::domain::secret::Secret;
use crate::use_cases::accounts::AccountView;
use crate::use_cases::connect::{count_attempt, log_connected};
use crate::use_cases::revocation::{Revocation, Revoker};
use http::StatusCode;
use lambda_http::{Body, Request, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Largest completion request body accepted (as for an API key: room for any client's JSON).
pub const MAX_COMPLETE_BODY: usize = 4 * 1024;

/// One answer for every handle that does not complete, so a caller learns nothing from it.
const NOT_FOUND: ApiError = ApiError::NotFound(
    "This connection could not be finished: it is unknown, expired, already used, or was started by another user.",
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    completion: Secret,
}

#[derive(Serialize)]
struct Completed {
    success: bool,
    account: AccountView,
}

#[derive(Serialize)]
struct Declined {
    success: bool,
    message: &'static str,
}

/// Why a completion was refused, for the security event.
#[derive(Debug, Clone, Copy)]
enum Rejection {
    /// No parked result under the handle (never issued, already completed or rejected, or
    /// held by a concurrent request).
    Unknown,
    /// Started by another user: the attack this route exists for.
    OtherUser,
    Expired,
}

impl Rejection {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown_or_used",
            Self::OtherUser => "other_user",
            Self::Expired => "expired",
        }
    }
}

pub struct Completer {
    store: Store,
    revoker: Revoker,
    rate: RateLimit,
}

impl Completer {
    pub fn new(store: Store, revoker: Revoker, rate: RateLimit) -> Self {
        Self {
            store,
            revoker,
            rate,
        }
    }

    pub async fn complete(&self, user: UserId, req: &Request) -> Result<Response<Body>, ApiError> {
        let body: CompleteRequest = json_body(req, MAX_COMPLETE_BODY)?;
        count_attempt(&self.store, self.rate, &user, Scope::Complete).await?;
        let handle = body.completion.expose();
        if !ParkedConnection::is_well_formed(handle) {
            return Err(self.reject(&user, Rejection::Unknown, None).await);
        }
        let claim = Claim {
            handle_hash: ParkedConnection::hash_handle(handle),
            owner: uuid::Uuid::new_v4().to_string(),
        };
        let parked = match self
            .store
            .claim_parked(&claim.handle_hash, &claim.owner)
            .await
        {
            Ok(parked) => parked,
            Err(StoreError::NotFound) => {
                return Err(self.reject(&user, Rejection::Unknown, None).await);
            }
            Err(e) => return Err(unavailable("dynamodb", &e)),
        };
        let now = OffsetDateTime::now_utc();
        if parked.connection.user_id != user {
            return Err(self
                .reject(&user, Rejection::OtherUser, Some(&parked))
                .await);
        }
        if parked.complete_by <= now {
            return Err(self.reject(&user, Rejection::Expired, Some(&parked)).await);
        }
        let connection = Connection {
            connected_at: now,
            updated_at: now,
            authorized_at: now,
            ..parked.connection.clone()
        };
        let stored = match self
            .revoker
            .replace_claiming(&connection, Some(&claim))
            .await
        {
            Ok(stored) => stored,
            // The window closed while the connection was being written.
            Err(StoreError::NotFound) => {
                return Err(self.reject(&user, Rejection::Expired, Some(&parked)).await);
            }
            Err(e) => match self.store.get_connection(&user, &connection.id).await {
                // The write landed with its answer lost: this is the connection now, and a
                // retry would find the handle used.
                Ok(stored) if stored.credentials == connection.credentials => stored,
                _ => {
                    // Given back so the page can try again; if this fails too, the parked
                    // result is revoked once its window has passed.
                    if let Err(release) = self.store.release_claim(&claim).await {
                        tracing::warn!(error = %release, "could not release a completion claim");
                    }
                    return Err(unavailable("dynamodb", &e));
                }
            },
        };
        log_connected(&stored);
        Ok(json(
            StatusCode::OK,
            &Completed {
                success: true,
                account: AccountView::from(&stored),
            },
        ))
    }

    /// Revokes the parked result under the request's handle, if there is one nobody holds.
    pub async fn decline(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        let body: CompleteRequest = json_body(req, MAX_COMPLETE_BODY)?;
        let handle = body.completion.expose();
        if ParkedConnection::is_well_formed(handle) {
            let owner = uuid::Uuid::new_v4().to_string();
            match self
                .store
                .claim_parked(&ParkedConnection::hash_handle(handle), &owner)
                .await
            {
                Ok(parked) => {
                    let tokens = self.revoke(&parked).await;
                    tracing::warn!(
                        event = "connect_completion_declined",
                        started_by = %parked.connection.user_id,
                        klaviyo_account_id = %parked.connection.klaviyo_account_id,
                        tokens,
                        "a page that could not complete a connect withdrew it"
                    );
                }
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(unavailable("dynamodb", &e)),
            }
        }
        Ok(json(
            StatusCode::OK,
            &Declined {
                success: true,
                message: "Nothing was connected.",
            },
        ))
    }

    /// Revokes a claimed parked result now (within the inline budget); what does not finish
    /// stays queued and the refresh job revokes it once its window has passed.
    async fn revoke(&self, parked: &ParkedConnection) -> &'static str {
        match self.revoker.finish_replaced(&parked.revocation()).await {
            Revocation::Revoked => "revoked",
            Revocation::Deferred => "queued",
            Revocation::Nothing => "none",
        }
    }

    /// The 404 every refused completion gets. A parked result this request claimed is revoked.
    async fn reject(
        &self,
        user: &UserId,
        reason: Rejection,
        parked: Option<&ParkedConnection>,
    ) -> ApiError {
        let tokens = match parked {
            Some(parked) => self.revoke(parked).await,
            None => "none",
        };
        tracing::warn!(
            event = "connect_completion_rejected",
            reason = reason.as_str(),
            user_id = %user,
            started_by = parked.map(|p| p.connection.user_id.as_str()),
            klaviyo_account_id = parked.map(|p| p.connection.klaviyo_account_id.as_str()),
            tokens,
            "an OAuth completion was refused"
        );
        NOT_FOUND
    }
}
