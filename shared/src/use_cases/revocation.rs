//! Revoking refresh tokens at Klaviyo. A token that leaves a connection (disconnect,
//! reconnect, switch to an API key, a refresh whose result could not be stored) is first
//! queued as a `PendingRevocation`, in the same transaction that removes it from its
//! connection; then it is revoked inline within a small budget, and the queue item deleted.
//! Whatever the inline attempt does not finish (Klaviyo down, the Lambda ending), the refresh
//! job does. So a token is never just dropped.

use crate::adapters::crypto::{CryptoError, Sealer};
use crate::adapters::klaviyo::{Klaviyo, KlaviyoError, REVOKE_TIMEOUT};
use crate::adapters::store::{Claim, Store, StoreError};
use crate::domain::model::{AuthType, Connection, PendingRevocation};
use crate::domain::secret::Secret;
use futures::StreamExt;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Attempts inside one request, and the time they may take together.
const ATTEMPTS_IN_REQUEST: u32 = 3;
const REQUEST_BUDGET: Duration = Duration::from_secs(5);
/// The whole inline step after a queued revocation (open the token, revoke it, delete the
/// queue item) stops after this long; the refresh job finishes what it did not.
pub const INLINE_BUDGET: Duration = REQUEST_BUDGET;
/// Reads and writes of a replacement when the connection changes in between (a refresh).
pub const REPLACE_ATTEMPTS: u32 = 2;
/// Pending revocations the refresh job works on at once.
pub const JOB_CONCURRENCY: usize = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Retry schedule of the refresh job: 1 min, 2 min, 4 min … capped at 6 hours.
const JOB_BACKOFF_BASE_SECS: i64 = 60;
const JOB_BACKOFF_MAX_SECS: i64 = 6 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// Klaviyo could not be reached; a pending revocation will finish it.
    Deferred,
    /// Nothing to revoke (API key), or nothing that could ever be revoked.
    Nothing,
}

/// What one pass over due pending revocations did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PendingSummary {
    pub finished: u64,
    /// The token could no longer be valid (or is the stored one after all); the record was
    /// dropped.
    pub expired: u64,
    pub deferred: u64,
    /// AWS refused a step (permissions, key state); left due, and the run fails.
    pub refused: u64,
    /// Klaviyo refused the client secret; left due as it was, and the run fails.
    pub client_rejected: u64,
}

#[derive(Debug, Clone)]
pub struct Revoker {
    store: Store,
    sealer: Sealer,
    klaviyo: Klaviyo,
}

impl Revoker {
    pub fn new(store: Store, sealer: Sealer, klaviyo: Klaviyo) -> Self {
        Self {
            store,
            sealer,
            klaviyo,
        }
    }

    /// Revokes `token`, retrying 429 (after `Retry-After`), 5xx and timeouts (2 s each)
    /// while the request budget lasts.
    pub async fn revoke_now(&self, token: &Secret) -> Result<(), KlaviyoError> {
        let deadline = Instant::now() + REQUEST_BUDGET;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let error = match self.klaviyo.revoke(token).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let wait = match &error {
                KlaviyoError::RateLimited {
                    retry_after: Some(after),
                } => *after,
                _ => backoff,
            };
            // Start another attempt only if it can finish inside the budget.
            let next_attempt_ends = Instant::now() + wait + REVOKE_TIMEOUT;
            if !error.is_transient()
                || attempt >= ATTEMPTS_IN_REQUEST
                || next_attempt_ends > deadline
            {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    /// Stores `connection` in place of whatever is stored under its id (reconnect, switch to
    /// an API key), queueing the replaced OAuth refresh token's revocation in the same
    /// transaction, then revokes it inline (`INLINE_BUDGET`). Re-reads and retries when the
    /// connection changes in between (`REPLACE_ATTEMPTS`).
    pub async fn replace(&self, connection: &Connection) -> Result<Connection, StoreError> {
        self.replace_claiming(connection, None).await
    }

    /// `replace`, turning a claimed parked connection into `connection` in the same
    /// transaction (`Store::replace_connection`). `NotFound` when the claim no longer holds.
    pub async fn replace_claiming(
        &self,
        connection: &Connection,
        claim: Option<&Claim>,
    ) -> Result<Connection, StoreError> {
        for _ in 0..REPLACE_ATTEMPTS {
            let previous = match self
                .store
                .get_connection(&connection.user_id, &connection.id)
                .await
            {
                // What is stored is this very connection: an earlier attempt landed and its
                // answer was lost. It must not be replaced again (that would revoke it).
                Ok(previous) if previous.credentials == connection.credentials => {
                    return Ok(previous);
                }
                Ok(previous) => Some(previous),
                Err(StoreError::NotFound) => None,
                Err(e) => return Err(e),
            };
            let revocation = previous
                .as_ref()
                .filter(|p| p.auth_type == AuthType::OAuth)
                .map(|p| PendingRevocation::for_connection(p, OffsetDateTime::now_utc()));
            match self
                .store
                .replace_connection(connection, previous.as_ref(), revocation.as_ref(), claim)
                .await
            {
                Ok(stored) => {
                    if let Some(revocation) = &revocation {
                        self.finish_replaced(revocation).await;
                    }
                    return Ok(stored);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Revokes a queued token that is only in the queue item (a replaced connection's), within
    /// `INLINE_BUDGET`: opens it, revokes it and deletes the queue item.
    pub async fn finish_replaced(&self, pending: &PendingRevocation) -> Revocation {
        let attempt = async {
            let credentials = pending
                .open(&self.sealer)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(token) = credentials.refresh_token() {
                self.revoke_now(token).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        self.finish_inline(pending, attempt).await
    }

    /// Finishes a queued revocation whose token is at hand (disconnect): on success the
    /// queue item, the last copy of the token, is deleted; otherwise it stays for the job.
    /// Bounded by `INLINE_BUDGET`.
    pub async fn finish_queued(&self, pending: &PendingRevocation, token: &Secret) -> Revocation {
        let attempt = async { self.revoke_now(token).await.map_err(|e| e.to_string()) };
        self.finish_inline(pending, attempt).await
    }

    /// Runs a revocation `attempt` within `INLINE_BUDGET` and, when it succeeds, deletes the
    /// queue item; otherwise the item stays for the refresh job.
    async fn finish_inline(
        &self,
        pending: &PendingRevocation,
        attempt: impl std::future::Future<Output = Result<(), String>>,
    ) -> Revocation {
        let finished = async {
            attempt.await?;
            self.forget(pending).await;
            Ok::<_, String>(())
        };
        let reason = match tokio::time::timeout(INLINE_BUDGET, finished).await {
            Ok(Ok(())) => return Revocation::Revoked,
            Ok(Err(reason)) => reason,
            Err(_) => "the inline budget ran out".to_owned(),
        };
        log_deferred(pending, &reason);
        Revocation::Deferred
    }

    /// The refresh job's step: try due pending revocations once each, `JOB_CONCURRENCY` at a
    /// time, starting none after `stop_at`.
    pub async fn finish_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
        stop_at: Instant,
    ) -> Result<PendingSummary, StoreError> {
        let due = self.store.due_pending_revocations(now, limit).await?;
        let outcomes: Vec<Finished> = futures::stream::iter(due)
            .take_while(|_| std::future::ready(Instant::now() < stop_at))
            .map(|pending| self.finish_one(pending, now))
            .buffer_unordered(JOB_CONCURRENCY)
            .collect()
            .await;
        let mut summary = PendingSummary::default();
        for outcome in outcomes {
            match outcome {
                Finished::Revoked => summary.finished += 1,
                Finished::Expired => summary.expired += 1,
                Finished::Deferred => summary.deferred += 1,
                Finished::Refused => summary.refused += 1,
                Finished::ClientRejected => summary.client_rejected += 1,
            }
        }
        Ok(summary)
    }

    /// One queued revocation: one read, at most one KMS call, one Klaviyo call
    /// (`REVOKE_TIMEOUT`) and one write.
    async fn finish_one(&self, pending: PendingRevocation, now: OffsetDateTime) -> Finished {
        if pending.expires_at <= now {
            // Unused for 90 days: Klaviyo has expired the token itself.
            self.forget(&pending).await;
            return Finished::Expired;
        }
        // A token queued while the outcome of its own write was unknown may be stored after
        // all: it is the connection's live token then, and must not be revoked.
        match self
            .store
            .stores_credentials(
                &pending.user_id,
                &pending.connection_id,
                &pending.credentials,
            )
            .await
        {
            Ok(true) => {
                self.forget(&pending).await;
                return Finished::Expired;
            }
            Ok(false) => {}
            Err(StoreError::Refused(_)) => return Finished::Refused,
            Err(e) => {
                log_deferred(&pending, &e.to_string());
                return Finished::Deferred;
            }
        }
        let result = match pending.open(&self.sealer).await {
            Ok(credentials) => match credentials.refresh_token() {
                Some(token) => match self.klaviyo.revoke(token).await {
                    // Not the token's fault: no attempt counted, no backoff.
                    Err(e) if e.is_invalid_client() => return Finished::ClientRejected,
                    other => other.map_err(|e| e.to_string()),
                },
                None => Ok(()),
            },
            Err(CryptoError::Refused(_)) => return Finished::Refused,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                self.forget(&pending).await;
                tracing::info!(event = "revocation_finished", connection_id = %pending.connection_id, attempts = pending.attempts + 1, "pending revocation finished");
                Finished::Revoked
            }
            Err(reason) => {
                let mut next = pending.clone();
                next.attempts += 1;
                next.due_at = now + time::Duration::seconds(job_backoff_secs(next.attempts));
                log_deferred(&next, &reason);
                match self.store.reschedule_pending_revocation(&next).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    // It stays due and is tried again on the next run.
                    Err(e) => {
                        tracing::warn!(error = %e, "could not reschedule a pending revocation")
                    }
                }
                Finished::Deferred
            }
        }
    }

    async fn forget(&self, pending: &PendingRevocation) {
        if let Err(e) = self.store.delete_pending_revocation(&pending.id).await {
            // Harmless: the next run revokes again (Klaviyo answers 200 for revoked tokens)
            // and deletes it then; TTL removes it in the end.
            tracing::warn!(event = "revocation_cleanup_failed", id = %pending.id, error = %e, "could not delete a finished pending revocation");
        }
    }
}

enum Finished {
    Revoked,
    Expired,
    Deferred,
    Refused,
    ClientRejected,
}

fn job_backoff_secs(attempts: u32) -> i64 {
    let factor = 1i64 << attempts.saturating_sub(1).min(20);
    (JOB_BACKOFF_BASE_SECS * factor).min(JOB_BACKOFF_MAX_SECS)
}

fn log_deferred(pending: &PendingRevocation, reason: &str) {
    tracing::warn!(
        event = "revocation_failed",
        connection_id = %pending.connection_id,
        pending_revocation_id = %pending.id,
        attempts = pending.attempts,
        reason = %reason,
        "revocation at Klaviyo failed; the refresh job will retry"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_backoff_doubles_and_caps() {
        assert_eq!(job_backoff_secs(1), 60);
        assert_eq!(job_backoff_secs(2), 120);
        assert_eq!(job_backoff_secs(3), 240);
        assert_eq!(job_backoff_secs(30), JOB_BACKOFF_MAX_SECS);
    }
}
