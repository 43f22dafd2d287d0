//! `POST /api/oauth/accounts/{accountId}/verify`: "Test connection".
//!
//! Calls Klaviyo's accounts endpoint with the stored credential, refreshing an OAuth token
//! first when it has less than two minutes left, and records the answer: `lastVerifiedAt`
//! (and the organization's current name) when Klaviyo accepts it, `needs_reauth` when it
//! refuses it. An OAuth access token that Klaviyo refuses is not the verdict: the refresh
//! token is, so the token is refreshed and the call made once more (the user who removed the
//! app in Klaviyo gets `invalid_grant` and `needs_reauth` with reason `refresh_refused`).
//!
//! Everything is done under the connection's refresh lease, the one the job and just-in-time
//! refreshes take: a test never races a refresh (whose rotated token would otherwise be
//! lost), and every write is fenced by the lease and the version read. A connection that
//! needs re-authorisation is answered as it is: Klaviyo is not called again until the user
//! reconnects. Klaviyo unavailable or rate limiting: 502 or 429, nothing changed.

use crate::adapters::auth::UserId;
use crate::adapters::crypto::{CryptoError, Sealer};
use crate::adapters::http::{ApiError, json, path_param, tail_segment, unavailable};
use crate::adapters::klaviyo::{ApiCredential, Klaviyo, KlaviyoError};
use crate::adapters::store::{ConnectionKey, Store, StoreError};
use crate::context::Environment;
use crate::domain::model::{AuthType, Connection, ConnectionStatus, Credentials, StatusReason};
use crate::domain::rate_limit::{RateLimit, Scope};
use crate::domain::secret::Secret;
use crate::use_cases::accounts::AccountView;
use crate::use_cases::connect::{count_attempt, klaviyo_failure};
use crate::use_cases::disconnect::ROUTE_PREFIX;
use crate::use_cases::refresh::{AccessTokens, LEASE, Outcome, Refresher};
use http::StatusCode;
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use std::time::Duration;
use time::OffsetDateTime;

const NOT_FOUND: ApiError = ApiError::NotFound("Account not found.");
/// While another worker holds the lease (a refresh takes a second or two): how often to look
/// again, and how long to wait in all before answering 503.
pub const WAIT_FOR_LEASE: Duration = Duration::from_millis(250);
pub const LEASE_WAIT: Duration = Duration::from_secs(5);

#[derive(Serialize)]
struct Verified {
    success: bool,
    account: AccountView,
}

/// "Test connection" (served by the connect function, which holds every grant it needs).
#[derive(Debug, Clone)]
pub struct Verifier {
    store: Store,
    sealer: Sealer,
    klaviyo: Klaviyo,
    refresher: Refresher,
    rate: RateLimit,
}

/// What a test found, before it is written.
enum Verdict {
    Accepted(crate::adapters::klaviyo::KlaviyoAccount),
    Refused(StatusReason, String),
}

impl Verifier {
    pub fn new(env: &Environment, klaviyo: Klaviyo) -> Self {
        Self {
            refresher: Refresher::new(env, klaviyo.clone()),
            store: env.store(),
            sealer: env.sealer(),
            klaviyo,
            rate: env.config.connect_rate,
        }
    }

    /// The route: the account id from the path, the user from the JWT.
    pub async fn respond(&self, user: UserId, req: &Request) -> Result<Response<Body>, ApiError> {
        let id = account_id(req).ok_or(NOT_FOUND)?;
        count_attempt(&self.store, self.rate, &user, Scope::Verify).await?;
        let connection = self.verify(&user, &id).await?;
        Ok(json(
            StatusCode::OK,
            &Verified {
                success: true,
                account: AccountView::from(&connection),
            },
        ))
    }

    /// Tests the connection and answers it as stored afterwards.
    pub async fn verify(&self, user: &UserId, id: &str) -> Result<Connection, ApiError> {
        let key = ConnectionKey {
            user_id: user.clone(),
            connection_id: id.to_owned(),
        };
        let owner = format!("verify-{}", uuid::Uuid::new_v4());
        let Some(leased) = self.lease(&key, &owner).await? else {
            return self.current(&key).await;
        };
        let now = OffsetDateTime::now_utc();
        let credentials = match Credentials::open(&self.sealer, &leased).await {
            Ok(credentials) => credentials,
            Err(e @ (CryptoError::Unavailable(_) | CryptoError::Refused(_))) => {
                self.release(&key, &owner).await;
                return Err(unavailable("kms", &e));
            }
            // Unreadable credentials: nothing Klaviyo could accept; the user must connect again.
            Err(e) => {
                let reason = refusal(leased.auth_type);
                return self.refused(leased, reason, &e.to_string(), &owner).await;
            }
        };
        let verdict = match &credentials {
            Credentials::ApiKey(api_key) => {
                self.ask(ApiCredential::ApiKey(api_key), leased.auth_type)
                    .await
            }
            Credentials::OAuth { access_token, .. } => {
                let fresh = leased
                    .access_token_expires_at
                    .is_some_and(|expires| expires > now + AccessTokens::DEFAULT_MARGIN);
                // Expiring, or refused: the refresh token decides.
                if !fresh {
                    return self.refresh_and_ask(leased, now, &key, &owner).await;
                }
                match self
                    .ask(ApiCredential::AccessToken(access_token), AuthType::OAuth)
                    .await
                {
                    Ok(Verdict::Refused(..)) => {
                        return self.refresh_and_ask(leased, now, &key, &owner).await;
                    }
                    answer => answer,
                }
            }
        };
        match verdict {
            Ok(Verdict::Accepted(account)) => self.accepted(leased, &account, now, &owner).await,
            Ok(Verdict::Refused(reason, detail)) => {
                self.refused(leased, reason, &detail, &owner).await
            }
            Err(e) => {
                self.release(&key, &owner).await;
                Err(e)
            }
        }
    }

    /// Takes the connection's lease, waiting while another worker holds it. `None` when the
    /// connection needs re-authorisation (it is answered as stored, without asking Klaviyo).
    async fn lease(
        &self,
        key: &ConnectionKey,
        owner: &str,
    ) -> Result<Option<Connection>, ApiError> {
        let give_up = std::time::Instant::now() + LEASE_WAIT;
        while std::time::Instant::now() < give_up {
            let now = OffsetDateTime::now_utc();
            match self
                .store
                .take_refresh_lease(key, owner, now, now + LEASE)
                .await
            {
                Ok(leased) => return Ok(Some(leased)),
                Err(StoreError::NotFound) => return Err(NOT_FOUND),
                Err(StoreError::Conflict) => {}
                Err(e) => return Err(unavailable("dynamodb", &e)),
            }
            // Missing, needing re-authorisation, or leased by another worker.
            match self
                .store
                .get_connection(&key.user_id, &key.connection_id)
                .await
            {
                Ok(c) if c.status == ConnectionStatus::NeedsReauth => return Ok(None),
                Ok(_) => tokio::time::sleep(WAIT_FOR_LEASE).await,
                Err(StoreError::NotFound) => return Err(NOT_FOUND),
                Err(e) => return Err(unavailable("dynamodb", &e)),
            }
        }
        tracing::warn!(connection_id = %key.connection_id, "connection stayed leased during a test");
        Err(ApiError::Unavailable)
    }

    /// Klaviyo's accounts endpoint with `credential`: accepted, refused (a 401: a key's
    /// verdict; an access token's is its refresh token's), or an error to answer (a 403 too:
    /// it can come from in front of Klaviyo, and must never cost the user the connection).
    async fn ask(
        &self,
        credential: ApiCredential<'_>,
        auth_type: AuthType,
    ) -> Result<Verdict, ApiError> {
        match self.klaviyo.account(credential).await {
            Ok(account) => Ok(Verdict::Accepted(account)),
            Err(e) if e.is_credential_refused() => {
                Ok(Verdict::Refused(refusal(auth_type), "http_401".to_owned()))
            }
            Err(e) => Err(klaviyo_error(e)),
        }
    }

    /// An OAuth connection whose access token is expiring or was refused: refresh it under the
    /// lease held (the refresh writes the result and releases the lease), then ask once more
    /// with the new token and record an acceptance under a new lease, if the connection is
    /// still the one just refreshed. While the job is backing off from Klaviyo failures, a test
    /// does not add a refresh of its own (nor count towards the backoff).
    async fn refresh_and_ask(
        &self,
        leased: Connection,
        now: OffsetDateTime,
        key: &ConnectionKey,
        owner: &str,
    ) -> Result<Connection, ApiError> {
        if leased.backing_off(now) {
            self.release(key, owner).await;
            return Err(ApiError::Upstream {
                code: "klaviyo_unavailable",
                message: BACKING_OFF,
            });
        }
        let refreshed_version = leased.version + 1;
        let (refresher, task_owner) = (self.refresher.clone(), owner.to_owned());
        // In a task of its own: a request that is cut off must not cancel a refresh between
        // Klaviyo's rotation and its write.
        let refreshed =
            tokio::spawn(async move { refresher.refresh_leased(leased, now, &task_owner).await })
                .await
                .unwrap_or((Outcome::Failed, None));
        let token: Secret = match refreshed {
            (Outcome::Refreshed, Some(fresh)) => fresh.access_token,
            (Outcome::NeedsReauth, _) => return self.current(key).await,
            // Reconnected or disconnected meanwhile: nothing was tested.
            (Outcome::Skipped, _) => return self.untested(key).await,
            (Outcome::WriteFailed | Outcome::Refused, _) => return Err(ApiError::Unavailable),
            _ => return Err(klaviyo_down()),
        };
        let account = match self
            .ask(ApiCredential::AccessToken(&token), AuthType::OAuth)
            .await?
        {
            Verdict::Accepted(account) => account,
            // Klaviyo accepted the refresh token a moment ago: the grant lives, whatever this
            // answer was. Not a verdict to act on.
            Verdict::Refused(..) => {
                tracing::warn!(connection_id = %key.connection_id, "Klaviyo refused an access token it had just issued");
                return Err(klaviyo_down());
            }
        };
        let Some(leased) = self.lease(key, owner).await? else {
            return self.current(key).await;
        };
        if leased.version != refreshed_version {
            // Changed since the refresh (a reconnect, another refresh): the answer was about
            // credentials that are no longer the stored ones.
            self.release(key, owner).await;
            return self.untested(key).await;
        }
        self.accepted(leased, &account, OffsetDateTime::now_utc(), owner)
            .await
    }

    async fn accepted(
        &self,
        leased: Connection,
        account: &crate::adapters::klaviyo::KlaviyoAccount,
        now: OffsetDateTime,
        owner: &str,
    ) -> Result<Connection, ApiError> {
        let outcome = self
            .refresher
            .record_verified(&leased, account, now, owner)
            .await;
        self.written(outcome, &leased).await
    }

    async fn refused(
        &self,
        leased: Connection,
        reason: StatusReason,
        detail: &str,
        owner: &str,
    ) -> Result<Connection, ApiError> {
        let outcome = self
            .refresher
            .needs_reauth(&leased, reason, detail, owner)
            .await;
        self.written(outcome, &leased).await
    }

    /// The connection as stored after a write of the test's result.
    async fn written(&self, outcome: Outcome, leased: &Connection) -> Result<Connection, ApiError> {
        let key = ConnectionKey {
            user_id: leased.user_id.clone(),
            connection_id: leased.id.clone(),
        };
        match outcome {
            Outcome::Verified | Outcome::NeedsReauth => self.current(&key).await,
            // Changed or removed since it was leased: the result was not recorded.
            Outcome::Skipped | Outcome::SkippedLocked => self.untested(&key).await,
            // Klaviyo answered for another account: retried later like a failure.
            Outcome::Failed => Err(klaviyo_down()),
            _ => Err(ApiError::Unavailable),
        }
    }

    /// The connection changed while it was being tested, so the answer is about credentials
    /// it no longer holds: 404 if it is gone, otherwise 503 (the page may test again).
    async fn untested(&self, key: &ConnectionKey) -> Result<Connection, ApiError> {
        self.current(key).await?;
        Err(ApiError::Unavailable)
    }

    async fn current(&self, key: &ConnectionKey) -> Result<Connection, ApiError> {
        match self
            .store
            .get_connection(&key.user_id, &key.connection_id)
            .await
        {
            Ok(connection) => Ok(connection),
            Err(StoreError::NotFound) => Err(NOT_FOUND),
            Err(e) => Err(unavailable("dynamodb", &e)),
        }
    }

    async fn release(&self, key: &ConnectionKey, owner: &str) {
        if let Err(e) = self.store.release_refresh_lease(key, owner).await {
            tracing::warn!(connection_id = %key.connection_id, error = %e, "could not release a test's lease; it expires on its own");
        }
    }
}

/// Why a connection whose credential Klaviyo refuses needs re-authorisation.
fn refusal(auth_type: AuthType) -> StatusReason {
    match auth_type {
        AuthType::ApiKey => StatusReason::ApiKeyRefused,
        AuthType::OAuth => StatusReason::RefreshRefused,
    }
}

/// Klaviyo could not answer: the connection is unchanged and the page may try again.
fn klaviyo_error(error: KlaviyoError) -> ApiError {
    klaviyo_failure(error, UNREACHABLE)
}

/// The test could not be made (Klaviyo failing, or answering what cannot be acted on).
fn klaviyo_down() -> ApiError {
    ApiError::Upstream {
        code: "klaviyo_unavailable",
        message: UNREACHABLE,
    }
}

const UNREACHABLE: &str = "Klaviyo could not be reached to test the connection; please try again.";
const BACKING_OFF: &str = "Klaviyo is having trouble with this connection; it is retried automatically. Please test again later.";

/// The connection id of `/api/oauth/accounts/{accountId}/verify` (from the route, or from the
/// raw path without its `/verify`); anything but a UUID cannot exist (and is answered like a
/// stranger's id).
fn account_id(req: &Request) -> Option<String> {
    let id = path_param(req, "accountId", ROUTE_PREFIX).or_else(|| {
        let path = req.uri().path().trim_end_matches('/');
        tail_segment(path.strip_suffix("/verify")?, ROUTE_PREFIX)
    })?;
    Connection::parse_id(&id)
}
