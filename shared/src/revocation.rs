//! Revoking refresh tokens at Klaviyo: now, with a few quick retries inside the request, or
//! later, through a `PendingRevocation` the refresh job finishes. A token that leaves a
//! connection (disconnect, reconnect, switch to an API key) is never just dropped.

use crate::crypto::Sealer;
use crate::klaviyo::{Klaviyo, KlaviyoError, REVOKE_TIMEOUT};
use crate::model::{AuthType, Connection, Credentials, PendingRevocation};
use crate::secret::Secret;
use crate::store::{Store, StoreError};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Attempts inside one request, and the time they may take together.
const ATTEMPTS_IN_REQUEST: u32 = 3;
const REQUEST_BUDGET: Duration = Duration::from_secs(5);
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
    /// The token could no longer be valid; the record was dropped.
    pub expired: u64,
    pub deferred: u64,
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

    /// The OAuth tokens of `previous` were replaced (reconnect, switch to an API key):
    /// revoke the old refresh token now, or queue it.
    pub async fn revoke_replaced(&self, previous: &Connection) -> Revocation {
        if previous.auth_type != AuthType::OAuth {
            return Revocation::Nothing;
        }
        let outcome = match Credentials::open(&self.sealer, previous).await {
            Ok(credentials) => match credentials.refresh_token() {
                Some(token) => self.revoke_now(token).await.map_err(|e| e.to_string()),
                None => return Revocation::Nothing,
            },
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => Revocation::Revoked,
            Err(reason) => {
                let pending =
                    PendingRevocation::for_connection(previous, OffsetDateTime::now_utc());
                log_deferred(&pending, &reason);
                match self.store.put_pending_revocation(&pending).await {
                    Ok(()) => Revocation::Deferred,
                    Err(e) => {
                        tracing::error!(
                            event = "revocation_lost",
                            connection_id = %previous.id,
                            error = %e,
                            "could not revoke a replaced refresh token nor queue its revocation"
                        );
                        Revocation::Nothing
                    }
                }
            }
        }
    }

    /// Finishes a queued revocation whose token is at hand (disconnect): on success the
    /// queue item, the last copy of the token, is deleted; otherwise it stays for the job.
    pub async fn finish_queued(&self, pending: &PendingRevocation, token: &Secret) -> Revocation {
        match self.revoke_now(token).await {
            Ok(()) => {
                self.forget(pending).await;
                Revocation::Revoked
            }
            Err(e) => {
                log_deferred(pending, &e.to_string());
                Revocation::Deferred
            }
        }
    }

    /// The refresh job's step: try every due pending revocation once.
    pub async fn finish_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<PendingSummary, StoreError> {
        let mut summary = PendingSummary::default();
        for pending in self.store.due_pending_revocations(now, limit).await? {
            if pending.expires_at <= now {
                // Unused for 90 days: Klaviyo has expired the token itself.
                self.forget(&pending).await;
                summary.expired += 1;
                continue;
            }
            let result = match pending.open(&self.sealer).await {
                Ok(credentials) => match credentials.refresh_token() {
                    Some(token) => self.klaviyo.revoke(token).await.map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    self.forget(&pending).await;
                    tracing::info!(event = "revocation_finished", connection_id = %pending.connection_id, attempts = pending.attempts + 1, "pending revocation finished");
                    summary.finished += 1;
                }
                Err(reason) => {
                    let mut next = pending.clone();
                    next.attempts += 1;
                    next.due_at = now + time::Duration::seconds(job_backoff_secs(next.attempts));
                    log_deferred(&next, &reason);
                    match self.store.reschedule_pending_revocation(&next).await {
                        Ok(()) | Err(StoreError::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                    summary.deferred += 1;
                }
            }
        }
        Ok(summary)
    }

    async fn forget(&self, pending: &PendingRevocation) {
        if let Err(e) = self.store.delete_pending_revocation(&pending.id).await {
            // Harmless: the next run revokes again (Klaviyo answers 200 for revoked tokens)
            // and deletes it then; TTL removes it in the end.
            tracing::warn!(event = "revocation_cleanup_failed", id = %pending.id, error = %e, "could not delete a finished pending revocation");
        }
    }
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
