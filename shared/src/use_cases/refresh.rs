//! Keeping OAuth tokens fresh: the scheduled job (EventBridge, every few minutes) and
//! just-in-time access tokens for the host app's own services (`AccessTokens`).
//!
//! The job finds the connections due (by `REFRESH_POLICY`: an access token that expires within 15
//! minutes, or an idle connection's daily keep-alive; `RefreshPolicy`) with one Query per
//! `due-index` bucket (never a Scan), streams them through a bounded number of workers, and stops
//! taking new work well before the Lambda deadline. Each connection is refreshed under a lease (a
//! conditional write with an expiry), so overlapping runs, retries and just-in-time refreshes never
//! refresh one connection twice. After taking the lease the connection is re-read (the lease write
//! returns it) and skipped if someone already refreshed it. Rotated tokens replace the old ones in
//! one write conditional on `version`. `invalid_grant` re-reads the stored token before marking the
//! connection `needs_reauth`; 429/5xx/timeouts keep the tokens and retry on a later run with
//! backoff. The data key for the new tokens is the one that opened the old ones (one KMS call,
//! before Klaviyo is called), so nothing after the rotation depends on KMS. Each run also finishes
//! pending revocations and logs one summary line.
//!
//! Each run reads the Klaviyo client secret first (one Secrets Manager call), so a secret put
//! after the deploy, or rotated, is used by the next run. `invalid_client` is a configuration
//! failure, not the connection's: the connection is left due and untouched, the run stops
//! taking work (every other refresh would be refused too) and ends as a failed invocation.

use crate::adapters::auth::UserId;
use crate::adapters::crypto::{CryptoError, DataKey, Sealer};
use crate::adapters::klaviyo::{ApiCredential, Klaviyo, KlaviyoAccount, KlaviyoError, TokenSet};
use crate::adapters::store::{ConnectionKey, DUE_BUCKETS, Store, StoreError};
use crate::context::{Environment, InitError};
use crate::domain::model::{
    AuthType, Connection, ConnectionStatus, Credentials, KEY_CHECK_MIN_GAP, PendingRevocation,
    RefreshPolicy, StatusReason, USE_RECORDED_EVERY, key_check_due,
};
use crate::domain::secret::Secret;
use crate::use_cases::revocation::Revoker;
use futures::StreamExt;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use time::OffsetDateTime;

/// How long a worker may hold a connection; far longer than one refresh takes (Klaviyo
/// calls time out after 6 s), short enough that a crashed worker delays nothing for long.
pub const LEASE: time::Duration = time::Duration::seconds(60);
/// Due connections read per Query page: keys only (the index projects nothing else), so a
/// page of 1,000 is about 100 KB in memory and one round trip; fewer, larger pages also
/// spare emulators that sort the whole table for every Query.
const PAGE_SIZE: i32 = 1000;
/// Stop taking new work this long before the Lambda deadline: longer than the worst case of
/// the one item a worker may have in flight (`crate::budget`).
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(85);
/// Budget when the invoker gives no deadline.
const DEFAULT_BUDGET: Duration = Duration::from_secs(240);
/// Pending revocations attempted per run.
const REVOCATIONS_PER_RUN: usize = 500;
/// Transient-failure backoff: 1 min, 2 min, 4 min … capped at 30 min.
const BACKOFF_BASE_SECS: i64 = 60;
const BACKOFF_MAX_SECS: i64 = 30 * 60;
/// Attempts to store a refresh result (each one AWS call, and a read after a conflict), and
/// the pause between them.
pub const WRITE_ATTEMPTS: u32 = 3;
pub const WRITE_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What one run did; logged as one line and returned to the invoker.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct RunSummary {
    pub selected: u64,
    pub refreshed: u64,
    /// API keys checked and still accepted (the daily check).
    pub keys_checked: u64,
    pub needs_reauth: u64,
    pub failed: u64,
    /// Results that could not be stored; any makes the run count as failed.
    pub write_failures: u64,
    /// Steps AWS refused (permissions, key state, a missing table); any makes the run fail.
    pub refused: u64,
    /// Klaviyo refused the client secret (`invalid_client`); any makes the run fail.
    pub client_rejected: u64,
    /// Reads of due work that failed (DynamoDB unavailable); any makes the run fail.
    pub read_failures: u64,
    pub skipped_locked: u64,
    pub revocations_finished: u64,
    pub duration_ms: u64,
}

impl RunSummary {
    /// A run that could not store some of its results failed: the invocation reports an
    /// error (Lambda's Errors metric, the failure destination), not just a log line.
    pub fn into_result(self) -> Result<Self, RunFailed> {
        if self.write_failures > 0
            || self.refused > 0
            || self.client_rejected > 0
            || self.read_failures > 0
        {
            Err(RunFailed(self))
        } else {
            Ok(self)
        }
    }
}

/// A run whose results could not all be stored, whose steps AWS refused, whose client secret
/// Klaviyo refused, or whose due work could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the refresh run failed (results not stored: {}, steps refused by AWS: {}, invalid_client: {}, failed reads: {}): {summary:?}", .0.write_failures, .0.refused, .0.client_rejected, .0.read_failures, summary = .0)]
pub struct RunFailed(pub RunSummary);

/// The outcome of one connection's refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Refreshed,
    /// Klaviyo accepted the credential (an API key's check, "Test connection").
    Verified,
    NeedsReauth,
    /// Transient trouble: tokens kept, retried later.
    Failed,
    /// The result could not be written (DynamoDB refused or failed): the run fails.
    WriteFailed,
    /// AWS refused a step (permissions, key state): a configuration fault; the run fails.
    Refused,
    /// Klaviyo refused the client secret: a configuration fault; the connection is left
    /// due, and the run stops and fails.
    ClientRejected,
    /// Another worker holds the lease (or the connection stopped being eligible).
    SkippedLocked,
    /// Already refreshed by someone else, reconnected or disconnected meanwhile.
    Skipped,
}

/// A refresh's new access token and when it expires.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub access_token: Secret,
    pub expires_at: OffsetDateTime,
}

impl Fresh {
    fn of(tokens: &TokenSet) -> Self {
        Self {
            access_token: tokens.access_token.clone(),
            expires_at: tokens.expires_at,
        }
    }
}

/// Refreshes one connection under its lease. Shared by the job and `AccessTokens`.
#[derive(Debug, Clone)]
pub struct Refresher {
    store: Store,
    sealer: Sealer,
    klaviyo: Klaviyo,
    policy: RefreshPolicy,
}

impl Refresher {
    pub fn new(env: &Environment, klaviyo: Klaviyo) -> Self {
        Self {
            store: env.store(),
            sealer: env.sealer(),
            klaviyo,
            policy: env.config.refresh_policy,
        }
    }

    /// Takes the lease of a due connection and refreshes it (OAuth) or checks it (API key).
    pub async fn refresh_due(&self, key: &ConnectionKey, owner: &str) -> Outcome {
        let now = OffsetDateTime::now_utc();
        let connection = match self
            .store
            .take_refresh_lease(key, owner, now, now + LEASE)
            .await
        {
            Ok(connection) => connection,
            Err(StoreError::Conflict) => return Outcome::SkippedLocked,
            Err(StoreError::NotFound) => return Outcome::Skipped,
            Err(e @ StoreError::Refused(_)) => return refused(&key.connection_id, &e),
            Err(e) => {
                tracing::warn!(error = %e, "could not take a refresh lease");
                return Outcome::Failed;
            }
        };
        if connection.refresh_due_at.is_none_or(|due| due > now) {
            // Refreshed by another worker between the index read and the lease.
            let _ = self.store.release_refresh_lease(key, owner).await;
            return Outcome::Skipped;
        }
        match connection.auth_type {
            AuthType::OAuth => self.refresh_leased(connection, now, owner).await.0,
            AuthType::ApiKey => self.check_key_leased(connection, now, owner).await,
        }
    }

    /// The daily check of an API key whose lease `owner` holds: Klaviyo's accounts endpoint
    /// with the key. Accepted: checked again tomorrow at the connection's time of day;
    /// refused: `needs_reauth` (`api_key_refused`); Klaviyo unavailable: retried with backoff.
    async fn check_key_leased(
        &self,
        connection: Connection,
        now: OffsetDateTime,
        owner: &str,
    ) -> Outcome {
        let key = match Credentials::open(&self.sealer, &connection).await {
            Ok(Credentials::ApiKey(key)) => key,
            Ok(Credentials::OAuth { .. }) => {
                return self
                    .needs_reauth(
                        &connection,
                        StatusReason::ApiKeyRefused,
                        "not an API key",
                        owner,
                    )
                    .await;
            }
            Err(CryptoError::Unavailable(e)) => {
                return self.back_off(&connection, now, None, &e, owner).await;
            }
            Err(e @ CryptoError::Refused(_)) => return refused(&connection.id, &e),
            Err(e) => {
                return self
                    .needs_reauth(
                        &connection,
                        StatusReason::ApiKeyRefused,
                        &e.to_string(),
                        owner,
                    )
                    .await;
            }
        };
        match self.klaviyo.account(ApiCredential::ApiKey(&key)).await {
            Ok(account) => {
                self.record_verified(&connection, &account, now, owner)
                    .await
            }
            Err(e) if e.is_credential_refused() => {
                self.needs_reauth(&connection, StatusReason::ApiKeyRefused, "http_401", owner)
                    .await
            }
            Err(e) => {
                let retry_after = match &e {
                    KlaviyoError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                self.back_off(&connection, now, retry_after, &e.to_string(), owner)
                    .await
            }
        }
    }

    /// Klaviyo accepted the connection's credential at `now` (its accounts endpoint answered
    /// `account`): records when, and the organization's current name. An API key's next check
    /// is tomorrow at its time of day. Written under `owner`'s lease, which the write releases.
    pub(crate) async fn record_verified(
        &self,
        connection: &Connection,
        account: &KlaviyoAccount,
        now: OffsetDateTime,
        owner: &str,
    ) -> Outcome {
        if account.id != connection.klaviyo_account_id {
            // Never expected: not a verification of this connection; retried like a failure.
            tracing::error!(event = "klaviyo_account_mismatch", connection_id = %connection.id, "Klaviyo answered for another account than the one connected");
            return self
                .back_off(
                    connection,
                    now,
                    None,
                    "Klaviyo answered for another account",
                    owner,
                )
                .await;
        }
        let mut updated = connection.clone();
        updated.last_verified_at = Some(now);
        updated.updated_at = now;
        updated.klaviyo_account_name = account.organization_name.clone();
        if connection.auth_type == AuthType::ApiKey {
            updated.refresh_due_at = Some(key_check_due(&connection.id, now + KEY_CHECK_MIN_GAP));
            updated.refresh_failures = 0;
        }
        match self.write(&updated, connection.version, owner).await {
            Ok(()) => {
                tracing::info!(event = "connection_verified", connection_id = %connection.id, "Klaviyo accepted the credential");
                Outcome::Verified
            }
            Err(StoreError::Conflict) | Err(StoreError::NotFound) => Outcome::Skipped,
            Err(e) => {
                tracing::error!(event = "refresh_write_failed", connection_id = %connection.id, error = %e, "could not record a verification");
                Outcome::WriteFailed
            }
        }
    }

    /// Refreshes a connection whose lease `owner` holds. Every path writes the connection
    /// (which releases the lease) or leaves the lease to expire. Every write is fenced by the
    /// lease: it lands only while `owner` still holds an unexpired lease and the version is
    /// the one read, so a worker that outlived its lease cannot overwrite a newer result.
    /// Worst case (`crate::budget`): well inside the lease.
    pub async fn refresh_leased(
        &self,
        connection: Connection,
        now: OffsetDateTime,
        owner: &str,
    ) -> (Outcome, Option<Fresh>) {
        // One KMS call: the data key that opens the tokens also seals their successors.
        let (credentials, key) = match Credentials::open_with_key(&self.sealer, &connection).await {
            Ok(opened) => opened,
            Err(CryptoError::Unavailable(e)) => {
                return (self.back_off(&connection, now, None, &e, owner).await, None);
            }
            // Not the tokens' fault: the lease expires and the connection stays due.
            Err(e @ CryptoError::Refused(_)) => return (refused(&connection.id, &e), None),
            Err(e) => {
                return (
                    self.needs_reauth(
                        &connection,
                        StatusReason::RefreshRefused,
                        &e.to_string(),
                        owner,
                    )
                    .await,
                    None,
                );
            }
        };
        let Some(refresh_token) = credentials.refresh_token() else {
            return (
                self.needs_reauth(
                    &connection,
                    StatusReason::RefreshRefused,
                    "no refresh token",
                    owner,
                )
                .await,
                None,
            );
        };
        match self.klaviyo.refresh(refresh_token).await {
            Ok(tokens) => {
                self.store_refreshed(&connection, refresh_token, tokens, &key, now, owner)
                    .await
            }
            Err(e) if e.is_invalid_grant() => (self.invalid_grant(&connection, owner).await, None),
            Err(e) if e.is_invalid_client() => {
                let key = ConnectionKey {
                    user_id: connection.user_id.clone(),
                    connection_id: connection.id.clone(),
                };
                let _ = self.store.release_refresh_lease(&key, owner).await;
                (Outcome::ClientRejected, None)
            }
            Err(e) => {
                let retry_after = match &e {
                    KlaviyoError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                (
                    self.back_off(&connection, now, retry_after, &e.to_string(), owner)
                        .await,
                    None,
                )
            }
        }
    }

    async fn store_refreshed(
        &self,
        connection: &Connection,
        old_refresh_token: &Secret,
        tokens: TokenSet,
        key: &DataKey,
        now: OffsetDateTime,
        owner: &str,
    ) -> (Outcome, Option<Fresh>) {
        let rotated = tokens
            .refresh_token
            .as_ref()
            .is_some_and(|t| t.expose() != old_refresh_token.expose());
        let credentials = Credentials::OAuth {
            access_token: tokens.access_token.clone(),
            refresh_token: tokens
                .refresh_token
                .clone()
                .unwrap_or_else(|| old_refresh_token.clone()),
        };
        let mut updated = connection.clone();
        updated.credentials =
            match credentials.seal(key, connection.user_id.as_str(), &connection.id) {
                Ok(sealed) => sealed,
                Err(e) => {
                    return (
                        self.needs_reauth(
                            connection,
                            StatusReason::RefreshRefused,
                            &e.to_string(),
                            owner,
                        )
                        .await,
                        None,
                    );
                }
            };
        updated.access_token_expires_at = Some(tokens.expires_at);
        updated.refresh_due_at = Some(self.policy.next_refresh(connection, tokens.expires_at, now));
        updated.last_refreshed_at = Some(now);
        updated.updated_at = now;
        updated.refresh_failures = 0;
        updated.degraded = false;
        if let Some(scopes) = &tokens.scopes {
            updated.scopes = scopes.clone();
        }
        let mut attempt = 1;
        let failure = loop {
            match self.write_tokens(&updated, connection.version, owner).await {
                Ok(()) => {
                    tracing::info!(event = "token_refreshed", connection_id = %connection.id, rotated, "access token refreshed");
                    return (Outcome::Refreshed, Some(Fresh::of(&tokens)));
                }
                // Reconnected, disconnected or the lease lost meanwhile: these tokens belong
                // to nobody.
                Err(StoreError::Conflict) | Err(StoreError::NotFound) => break None,
                Err(e) if attempt < WRITE_ATTEMPTS => {
                    tracing::warn!(connection_id = %connection.id, attempt, error = %e, "could not store refreshed tokens; retrying");
                    tokio::time::sleep(WRITE_RETRY_PAUSE).await;
                    attempt += 1;
                }
                Err(e) => break Some(e),
            }
        };
        // After a failed write, whether it landed anyway (every answer lost): `None` when
        // even that cannot be read.
        let stored = match &failure {
            None => Some(false),
            Some(_) => self
                .store
                .stores_credentials(&updated.user_id, &updated.id, &updated.credentials)
                .await
                .ok(),
        };
        if stored == Some(true) {
            tracing::info!(event = "token_refreshed", connection_id = %connection.id, rotated, "access token refreshed (stored though its answer was lost)");
            return (Outcome::Refreshed, Some(Fresh::of(&tokens)));
        }
        if let Some(e) = &failure {
            // Logged at error level: the alarm on refresh write failures counts these.
            tracing::error!(
                event = "refresh_write_failed",
                connection_id = %connection.id,
                rotated,
                error = %e,
                "refreshed tokens could not be stored"
            );
        }
        if let Some(token) = tokens.refresh_token.as_ref().filter(|_| rotated) {
            // Klaviyo has rotated the token: the new refresh token is live and, as far as we
            // can tell, stored nowhere.
            self.abandon(&updated, token, stored == Some(false)).await;
        }
        match failure {
            Some(_) => (Outcome::WriteFailed, None),
            None => (Outcome::Skipped, None),
        }
    }

    /// The one write of a refresh result: the whole connection, fenced by the lease.
    async fn write(
        &self,
        updated: &Connection,
        expected_version: u64,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.store
            .update_leased_connection(updated, expected_version, owner, OffsetDateTime::now_utc())
            .await
            .map(|_| ())
    }

    /// Writes new tokens. A conflict may be this very write, applied by an attempt whose
    /// answer was lost and met by the SDK's retry: the stored blob is then the one just sealed
    /// (a fresh nonce makes every sealed blob unique), and the tokens are stored after all.
    async fn write_tokens(
        &self,
        updated: &Connection,
        expected_version: u64,
        owner: &str,
    ) -> Result<(), StoreError> {
        match self.write(updated, expected_version, owner).await {
            Err(StoreError::Conflict) => match self
                .store
                .stores_credentials(&updated.user_id, &updated.id, &updated.credentials)
                .await?
            {
                true => Ok(()),
                false => Err(StoreError::Conflict),
            },
            other => other,
        }
    }

    /// Tokens Klaviyo issued that could not be stored are queued for revocation (the job
    /// revokes them unless they turn out to be stored after all). If even that write fails,
    /// they are revoked at once when they are known not to be stored (`known_unstored`);
    /// otherwise revoking could break a connection whose write landed, so they are left and
    /// the event is raised.
    async fn abandon(&self, unstored: &Connection, refresh_token: &Secret, known_unstored: bool) {
        let pending = PendingRevocation::for_connection(unstored, OffsetDateTime::now_utc());
        let Err(e) = self.store.put_pending_revocation(&pending).await else {
            tracing::warn!(event = "refresh_result_abandoned", connection_id = %unstored.id, pending_revocation_id = %pending.id, "unstored refresh token queued for revocation");
            return;
        };
        let reason = if known_unstored {
            match self.klaviyo.revoke(refresh_token).await {
                Ok(()) => return,
                Err(reason) => reason.to_string(),
            }
        } else {
            "it may be stored after all (the write's outcome is unknown)".to_owned()
        };
        tracing::error!(event = "revocation_lost", connection_id = %unstored.id, error = %e, reason = %reason, "a refresh token that could not be stored could neither be queued nor revoked");
    }

    /// The refresh token was refused. Before giving up, re-read the stored connection: a
    /// concurrent rotation or reconnect may have replaced the token we used.
    async fn invalid_grant(&self, used: &Connection, owner: &str) -> Outcome {
        match self.store.get_connection(&used.user_id, &used.id).await {
            Ok(current) if current.version != used.version => Outcome::Skipped,
            Ok(current) => {
                self.needs_reauth(
                    &current,
                    StatusReason::RefreshRefused,
                    "invalid_grant",
                    owner,
                )
                .await
            }
            Err(StoreError::NotFound) => Outcome::Skipped,
            Err(e) => {
                tracing::warn!(error = %e, "could not re-read a connection after invalid_grant");
                Outcome::Failed
            }
        }
    }

    /// Off the refresh schedule until the user reconnects; Klaviyo is not called again.
    pub(crate) async fn needs_reauth(
        &self,
        connection: &Connection,
        why: StatusReason,
        reason: &str,
        owner: &str,
    ) -> Outcome {
        let mut updated = connection.clone();
        updated.status = ConnectionStatus::NeedsReauth;
        updated.status_reason = Some(why);
        updated.degraded = false;
        updated.refresh_due_at = None;
        updated.updated_at = OffsetDateTime::now_utc();
        match self.write(&updated, connection.version, owner).await {
            Ok(()) => {
                tracing::warn!(
                    event = match why {
                        StatusReason::RefreshRefused => "refresh_invalid_grant",
                        StatusReason::ApiKeyRefused => "api_key_refused",
                    },
                    user_id = %connection.user_id,
                    connection_id = %connection.id,
                    klaviyo_account_id = %connection.klaviyo_account_id,
                    reason,
                    "connection needs re-authorisation"
                );
                Outcome::NeedsReauth
            }
            Err(StoreError::Conflict) | Err(StoreError::NotFound) => Outcome::Skipped,
            Err(e) => {
                tracing::error!(event = "refresh_write_failed", connection_id = %connection.id, error = %e, "could not mark a connection needs_reauth");
                Outcome::WriteFailed
            }
        }
    }

    /// Keeps the tokens and schedules another try (after `Retry-After` when Klaviyo gave one).
    async fn back_off(
        &self,
        connection: &Connection,
        now: OffsetDateTime,
        retry_after: Option<Duration>,
        reason: &str,
        owner: &str,
    ) -> Outcome {
        let failures = connection.refresh_failures.saturating_add(1);
        let delay_secs = match retry_after {
            Some(after) => (after.as_secs() as i64).clamp(1, BACKOFF_MAX_SECS),
            None => backoff_secs(failures),
        };
        let mut updated = connection.clone();
        updated.refresh_failures = failures;
        updated.refresh_due_at = Some(now + time::Duration::seconds(delay_secs));
        // Calls with the stored access token fail now: the host app hears of it (an event).
        // Not for an idle connection (usage-aware), whose token is expired most of the time
        // and which nobody is calling; once degraded, it stays so until a refresh succeeds.
        updated.degraded = connection
            .access_token_expires_at
            .is_some_and(|expires| expires <= now)
            && (connection.degraded || self.policy.in_use(connection, now));
        tracing::warn!(
            event = "refresh_deferred",
            connection_id = %connection.id,
            failures,
            retry_in_secs = delay_secs,
            reason,
            "refresh failed; tokens kept, retrying later"
        );
        match self.write(&updated, connection.version, owner).await {
            Ok(()) | Err(StoreError::Conflict) | Err(StoreError::NotFound) => Outcome::Failed,
            Err(e) => {
                // The lease expires on its own; the connection stays due and is retried.
                tracing::error!(event = "refresh_write_failed", connection_id = %connection.id, error = %e, "could not record the refresh backoff");
                Outcome::WriteFailed
            }
        }
    }
}

/// AWS refused a step of one connection's refresh: logged for the alarm, counted to fail
/// the run.
fn refused(connection_id: &str, error: &dyn std::fmt::Display) -> Outcome {
    tracing::error!(event = "refresh_access_denied", connection_id = %connection_id, error = %error, "AWS refused a refresh step");
    Outcome::Refused
}

fn backoff_secs(failures: u32) -> i64 {
    (BACKOFF_BASE_SECS << failures.saturating_sub(1).min(10)).min(BACKOFF_MAX_SECS)
}

/// Yields the keys of due connections, bucket by bucket, one Query page at a time, as the
/// workers ask for them.
fn due_keys<'a>(
    store: &'a Store,
    until: OffsetDateTime,
    refused_reads: &'a AtomicU64,
    failed_reads: &'a AtomicU64,
) -> impl futures::Stream<Item = ConnectionKey> + 'a {
    struct Cursor {
        bucket: u8,
        start: Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>,
        buffer: VecDeque<ConnectionKey>,
    }
    let cursor = Cursor {
        bucket: 0,
        start: None,
        buffer: VecDeque::new(),
    };
    futures::stream::unfold(cursor, move |mut cursor| async move {
        loop {
            if let Some(key) = cursor.buffer.pop_front() {
                return Some((key, cursor));
            }
            if cursor.bucket >= DUE_BUCKETS {
                return None;
            }
            match store
                .due_connections(cursor.bucket, until, cursor.start.take(), PAGE_SIZE)
                .await
            {
                Ok(page) => {
                    cursor.buffer.extend(page.keys);
                    match page.next {
                        Some(next) => cursor.start = Some(next),
                        None => cursor.bucket += 1,
                    }
                }
                Err(e) => {
                    if matches!(e, StoreError::Refused(_)) {
                        refused_reads.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(event = "refresh_access_denied", bucket = cursor.bucket, error = %e, "AWS refused reading due connections");
                    } else {
                        failed_reads.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(event = "refresh_read_failed", bucket = cursor.bucket, error = %e, "could not read due connections");
                    }
                    cursor.bucket += 1;
                }
            }
        }
    })
}

/// The scheduled job.
pub struct Refresh {
    store: Store,
    klaviyo: Klaviyo,
    refresher: Refresher,
    revoker: Revoker,
    concurrency: usize,
    /// Set once a run has started: only the first may use the secret start-up just read.
    ran: AtomicBool,
}

/// The first run after start-up reads the client secret again unless start-up read it this
/// recently; every later run reads it at its start.
const SECRET_FRESH_AT_FIRST_RUN: Duration = Duration::from_secs(10);

impl Refresh {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        let klaviyo = env.klaviyo().await?;
        Ok(Self::new(&env, klaviyo))
    }

    pub fn new(env: &Environment, klaviyo: Klaviyo) -> Self {
        Self {
            store: env.store(),
            refresher: Refresher::new(env, klaviyo.clone()),
            revoker: env.revoker(klaviyo.clone()),
            klaviyo,
            concurrency: env.config.refresh_concurrency,
            ran: AtomicBool::new(false),
        }
    }

    /// One run: refresh everything due (until the time budget runs out), then finish pending
    /// revocations. `deadline` is the invocation's (work stops `DEADLINE_MARGIN` before it).
    pub async fn run(&self, deadline: Option<SystemTime>) -> RunSummary {
        let started = Instant::now();
        let budget = deadline
            .and_then(|d| d.duration_since(SystemTime::now()).ok())
            .map_or(DEFAULT_BUDGET, |left| left.saturating_sub(DEADLINE_MARGIN));
        let stop_at = started + budget;
        let owner = uuid::Uuid::new_v4().to_string();
        let until = OffsetDateTime::now_utc();
        let summary = Mutex::new(RunSummary::default());
        let (refused_reads, failed_reads) = (AtomicU64::new(0), AtomicU64::new(0));
        // Set by the first `invalid_client`: every other call would be refused too.
        let client_rejected = AtomicBool::new(false);
        let go_on = || Instant::now() < stop_at && !client_rejected.load(Ordering::Relaxed);

        let fresh = match self.ran.swap(true, Ordering::Relaxed) {
            false => SECRET_FRESH_AT_FIRST_RUN,
            true => Duration::ZERO,
        };
        if let Err(e) = self.klaviyo.reload_client_secret(fresh).await {
            tracing::warn!(error = %e, "could not read the Klaviyo client secret; using the one held");
        }

        due_keys(&self.store, until, &refused_reads, &failed_reads)
            .take_while(|_| std::future::ready(go_on()))
            .for_each_concurrent(self.concurrency, |key| {
                let (summary, owner, client_rejected) = (&summary, &owner, &client_rejected);
                async move {
                    let outcome = self.refresher.refresh_due(&key, owner).await;
                    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
                    s.selected += 1;
                    match outcome {
                        Outcome::Refreshed => s.refreshed += 1,
                        Outcome::Verified => s.keys_checked += 1,
                        Outcome::NeedsReauth => s.needs_reauth += 1,
                        Outcome::Failed => s.failed += 1,
                        Outcome::WriteFailed => s.write_failures += 1,
                        Outcome::Refused => s.refused += 1,
                        Outcome::ClientRejected => {
                            s.client_rejected += 1;
                            client_rejected.store(true, Ordering::Relaxed);
                        }
                        Outcome::SkippedLocked => s.skipped_locked += 1,
                        Outcome::Skipped => {}
                    }
                }
            })
            .await;

        let mut summary = summary.into_inner().unwrap_or_else(|p| p.into_inner());
        summary.refused += refused_reads.into_inner();
        summary.read_failures += failed_reads.into_inner();
        if go_on() {
            match self
                .revoker
                .finish_due(OffsetDateTime::now_utc(), REVOCATIONS_PER_RUN, stop_at)
                .await
            {
                Ok(revocations) => {
                    summary.revocations_finished = revocations.finished + revocations.expired;
                    summary.refused += revocations.refused;
                    summary.client_rejected += revocations.client_rejected;
                }
                Err(e @ StoreError::Refused(_)) => {
                    summary.refused += 1;
                    tracing::error!(event = "refresh_access_denied", error = %e, "AWS refused reading pending revocations");
                }
                Err(e) => {
                    summary.read_failures += 1;
                    tracing::error!(event = "refresh_read_failed", error = %e, "could not read pending revocations");
                }
            }
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            event = "refresh_summary",
            selected = summary.selected,
            refreshed = summary.refreshed,
            keys_checked = summary.keys_checked,
            needs_reauth = summary.needs_reauth,
            failed = summary.failed,
            write_failures = summary.write_failures,
            refused = summary.refused,
            client_rejected = summary.client_rejected,
            read_failures = summary.read_failures,
            skipped_locked = summary.skipped_locked,
            revocations_finished = summary.revocations_finished,
            duration_ms = summary.duration_ms,
        );
        summary
    }
}

/// Credentials to call Klaviyo's API with, as the host app's services need them.
#[derive(Debug, Clone, PartialEq)]
pub enum KlaviyoCredential {
    /// An OAuth access token: `Authorization: Bearer …`.
    AccessToken(Secret),
    /// A private API key: `Authorization: Klaviyo-API-Key …`.
    ApiKey(Secret),
}

impl KlaviyoCredential {
    /// The `Authorization` header value for Klaviyo's API.
    pub fn authorization(&self) -> Secret {
        match self {
            Self::AccessToken(token) => Secret::new(format!("Bearer {}", token.expose())),
            Self::ApiKey(key) => Secret::new(format!("Klaviyo-API-Key {}", key.expose())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessTokenError {
    #[error("no such connection")]
    NotFound,
    #[error("the connection needs re-authorisation: the user must reconnect")]
    NeedsReauth,
    #[error("could not get a valid token now; retry later: {0}")]
    Unavailable(String),
}

/// Just-in-time credentials for a connection: the stored access token while it has at
/// least `margin` left, otherwise a refresh under the same lease the job uses (waiting for
/// another worker's refresh when one holds the lease).
#[derive(Debug, Clone)]
pub struct AccessTokens {
    store: Store,
    sealer: Sealer,
    refresher: Refresher,
    margin: time::Duration,
}

/// A credential as handed out, and when it stops working (`None` for an API key).
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedCredential {
    pub credential: KlaviyoCredential,
    pub expires_at: Option<OffsetDateTime>,
}

impl AccessTokens {
    /// Tokens with less than two minutes left are refreshed before being handed out.
    pub const DEFAULT_MARGIN: time::Duration = time::Duration::minutes(2);
    const WAIT_FOR_OTHER_WORKER: Duration = Duration::from_millis(250);
    /// How long to wait in all for another worker's refresh before answering unavailable.
    pub const WAIT_IN_ALL: Duration = Duration::from_secs(10);

    pub fn new(env: &Environment, klaviyo: Klaviyo) -> Self {
        Self {
            store: env.store(),
            sealer: env.sealer(),
            refresher: Refresher::new(env, klaviyo),
            margin: Self::DEFAULT_MARGIN,
        }
    }

    /// The credential to call Klaviyo with for a connection (reads it first).
    pub async fn for_connection(
        &self,
        user_id: &UserId,
        connection_id: &str,
    ) -> Result<KlaviyoCredential, AccessTokenError> {
        let key = ConnectionKey {
            user_id: user_id.clone(),
            connection_id: connection_id.to_owned(),
        };
        let connection = match self.store.get_connection(user_id, connection_id).await {
            Ok(connection) => connection,
            Err(StoreError::NotFound) => return Err(AccessTokenError::NotFound),
            Err(e) => return Err(AccessTokenError::Unavailable(e.to_string())),
        };
        let now = OffsetDateTime::now_utc();
        if connection.status == ConnectionStatus::Active && self.usable_as_stored(&connection, now)
        {
            return Ok(self
                .stored_for_use(&key, &connection, now)
                .await?
                .credential);
        }
        Ok(self.issue(&key, Some(connection)).await?.credential)
    }

    /// Records that a credential of `connection` (as read before it was handed out, as
    /// stored) was handed out at `now`: at most once an hour, best effort (a failure is
    /// logged; the next hand-out tries again). An idle connection (usage-aware) goes back on
    /// the eager schedule in the same write. `issue` records its own hand-outs (a refresh it
    /// makes records the use in its write).
    pub async fn note_use(
        &self,
        key: &ConnectionKey,
        connection: &Connection,
        now: OffsetDateTime,
    ) {
        if connection
            .last_used_at
            .is_some_and(|at| at > now - USE_RECORDED_EVERY)
        {
            return;
        }
        let due = self
            .refresher
            .policy
            .due_when_used(connection, now)
            .map(|due| (due, connection.version));
        if let Err(e) = self
            .store
            .record_use(key, now, USE_RECORDED_EVERY, due)
            .await
        {
            tracing::warn!(connection_id = %key.connection_id, error = %e, "could not record a connection's use");
        }
    }

    /// Whether `connection`'s stored credential can be handed out as it is: an API key, or an
    /// access token with at least the margin left.
    pub fn usable_as_stored(&self, connection: &Connection, now: OffsetDateTime) -> bool {
        connection.auth_type == AuthType::ApiKey
            || connection
                .access_token_expires_at
                .is_some_and(|expires| expires > now + self.margin)
    }

    /// The credential for the connection `key` names, starting from `read` when the caller has
    /// just read it (one read fewer), refreshing it first when its token is about to expire.
    pub async fn issue(
        &self,
        key: &ConnectionKey,
        mut read: Option<Connection>,
    ) -> Result<IssuedCredential, AccessTokenError> {
        let unavailable = |e: &dyn std::fmt::Display| AccessTokenError::Unavailable(e.to_string());
        let owner = format!("jit-{}", uuid::Uuid::new_v4());
        let give_up = Instant::now() + Self::WAIT_IN_ALL;
        while Instant::now() < give_up {
            let connection = match read.take() {
                Some(connection) => connection,
                None => match self
                    .store
                    .get_connection(&key.user_id, &key.connection_id)
                    .await
                {
                    Ok(connection) => connection,
                    Err(StoreError::NotFound) => return Err(AccessTokenError::NotFound),
                    Err(e) => return Err(unavailable(&e)),
                },
            };
            if connection.status == ConnectionStatus::NeedsReauth {
                return Err(AccessTokenError::NeedsReauth);
            }
            let now = OffsetDateTime::now_utc();
            // Stored credentials are opened only when they are what is handed out; the
            // refresh path opens them itself (one KMS call either way).
            if self.usable_as_stored(&connection, now) {
                return self.stored_for_use(key, &connection, now).await;
            }
            let still_valid = connection
                .access_token_expires_at
                .is_some_and(|expires| expires > now);
            // No refresh of our own while the job backs off; the current token while it works.
            if connection.backing_off(now) {
                return match still_valid {
                    true => self.stored_for_use(key, &connection, now).await,
                    false => Err(AccessTokenError::Unavailable(
                        "Klaviyo is failing; the refresh is retried later".into(),
                    )),
                };
            }
            match self
                .store
                .take_refresh_lease(key, &owner, now, now + LEASE)
                .await
            {
                Ok(mut leased) if leased.version == connection.version => {
                    // Refreshed because a credential is handed out: the refresh records the
                    // use, and schedules the next one as for a connection in use.
                    leased.last_used_at = now.replace_nanosecond(0).ok();
                    // In a task of its own: a caller that gives up (drops this future) must not
                    // cancel a refresh after Klaviyo has rotated the token and before it is
                    // stored.
                    let (refresher, task_owner) = (self.refresher.clone(), owner.clone());
                    let refreshed = tokio::spawn(async move {
                        refresher.refresh_leased(leased, now, &task_owner).await
                    })
                    .await
                    .unwrap_or((Outcome::Failed, None));
                    match refreshed {
                        (Outcome::Refreshed, Some(fresh)) => {
                            return Ok(IssuedCredential {
                                credential: KlaviyoCredential::AccessToken(fresh.access_token),
                                expires_at: Some(fresh.expires_at),
                            });
                        }
                        (Outcome::NeedsReauth, _) => return Err(AccessTokenError::NeedsReauth),
                        // Klaviyo is having trouble: the current token still works until it
                        // actually expires.
                        (
                            Outcome::Failed
                            | Outcome::WriteFailed
                            | Outcome::Refused
                            | Outcome::ClientRejected,
                            _,
                        ) if still_valid => {
                            return self.stored_for_use(key, &connection, now).await;
                        }
                        (
                            Outcome::Failed
                            | Outcome::WriteFailed
                            | Outcome::Refused
                            | Outcome::ClientRejected,
                            _,
                        ) => {
                            return Err(AccessTokenError::Unavailable(
                                "Klaviyo refresh failed".into(),
                            ));
                        }
                        _ => {}
                    }
                }
                // Changed since we read it: read again.
                Ok(_) => {
                    let _ = self.store.release_refresh_lease(key, &owner).await;
                }
                // Another worker is refreshing it: wait for its result.
                Err(StoreError::Conflict) => tokio::time::sleep(Self::WAIT_FOR_OTHER_WORKER).await,
                Err(StoreError::NotFound) => return Err(AccessTokenError::NotFound),
                Err(e) => return Err(unavailable(&e)),
            }
        }
        Err(AccessTokenError::Unavailable(
            "the connection is busy being refreshed".into(),
        ))
    }

    /// The stored credentials of `connection` as read, handed out now: opened, and the use
    /// recorded.
    async fn stored_for_use(
        &self,
        key: &ConnectionKey,
        connection: &Connection,
        now: OffsetDateTime,
    ) -> Result<IssuedCredential, AccessTokenError> {
        let issued = self.stored(connection).await?;
        self.note_use(key, connection, now).await;
        Ok(issued)
    }

    /// The connection's stored credentials, as handed out (one KMS call).
    pub async fn stored(
        &self,
        connection: &Connection,
    ) -> Result<IssuedCredential, AccessTokenError> {
        Ok(self.stored_with_key(connection).await?.0)
    }

    /// Like `stored`, with the data key that opened them: it also opens what later refreshes
    /// seal (`IssuedCredential::open_with_known_key`), without KMS.
    pub async fn stored_with_key(
        &self,
        connection: &Connection,
    ) -> Result<(IssuedCredential, DataKey), AccessTokenError> {
        let (credentials, key) = Credentials::open_with_key(&self.sealer, connection)
            .await
            .map_err(|e| AccessTokenError::Unavailable(e.to_string()))?;
        Ok((IssuedCredential::of(credentials, connection), key))
    }
}

impl IssuedCredential {
    /// `credentials`, opened from `connection`, as handed out.
    fn of(credentials: Credentials, connection: &Connection) -> Self {
        let credential = match credentials {
            Credentials::ApiKey(key) => KlaviyoCredential::ApiKey(key),
            Credentials::OAuth { access_token, .. } => KlaviyoCredential::AccessToken(access_token),
        };
        Self {
            expires_at: match credential {
                KlaviyoCredential::ApiKey(_) => None,
                KlaviyoCredential::AccessToken(_) => connection.access_token_expires_at,
            },
            credential,
        }
    }

    /// `connection`'s credentials opened with `key`, without KMS, if they were sealed with it.
    /// A blob that carries this very key and still does not open was altered in the table: a
    /// security event (the caller then tries KMS, which refuses it too).
    pub fn open_with_known_key(key: &DataKey, connection: &Connection) -> Option<Self> {
        match Credentials::open_with_known_key(key, connection) {
            Ok(opened) => opened.map(|credentials| Self::of(credentials, connection)),
            Err(e) => {
                tracing::error!(event = "sealed_credentials_rejected", user_id = %connection.user_id, connection_id = %connection.id, error = %e, "stored credentials sealed with a known key do not open");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_secs(1), 60);
        assert_eq!(backoff_secs(2), 120);
        assert_eq!(backoff_secs(4), 480);
        assert_eq!(backoff_secs(50), BACKOFF_MAX_SECS);
    }

    #[test]
    fn credentials_build_the_authorization_header() {
        let bearer = KlaviyoCredential::AccessToken(Secret::new("at"));
        assert_eq!(bearer.authorization().expose(), "Bearer at");
        let key = KlaviyoCredential::ApiKey(Secret::new("pk_x"));
        assert_eq!(key.authorization().expose(), "Klaviyo-API-Key pk_x");
        assert_eq!(format!("{bearer:?}"), "AccessToken([redacted])");
    }
}
