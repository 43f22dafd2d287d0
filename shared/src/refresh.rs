//! The scheduled refresh job (EventBridge): refresh tokens before they expire and finish
//! pending revocations.

use crate::context::{Environment, InitError};
use crate::revocation::Revoker;
use serde::Serialize;
use std::time::Instant;
use time::OffsetDateTime;

/// Pending revocations attempted per run.
const REVOCATIONS_PER_RUN: usize = 500;

/// What one run did; logged as one line and returned to the invoker.
#[derive(Debug, Default, Serialize)]
pub struct RunSummary {
    pub selected: u64,
    pub refreshed: u64,
    pub needs_reauth: u64,
    pub failed: u64,
    pub skipped_locked: u64,
    pub revocations_finished: u64,
    pub duration_ms: u64,
}

pub struct Refresh {
    revoker: Revoker,
}

impl Refresh {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        let klaviyo = env.klaviyo().await?;
        Ok(Self {
            revoker: Revoker::new(env.store(), env.sealer(), klaviyo),
        })
    }

    pub async fn run(&self) -> RunSummary {
        let started = Instant::now();
        let mut summary = RunSummary::default();
        tracing::warn!(
            "token refresh is not implemented yet; only pending revocations are processed"
        );
        match self
            .revoker
            .finish_due(OffsetDateTime::now_utc(), REVOCATIONS_PER_RUN)
            .await
        {
            Ok(revocations) => {
                summary.revocations_finished = revocations.finished + revocations.expired;
                summary.failed += revocations.deferred;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not read pending revocations");
                summary.failed += 1;
            }
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            event = "refresh_summary",
            selected = summary.selected,
            refreshed = summary.refreshed,
            needs_reauth = summary.needs_reauth,
            failed = summary.failed,
            skipped_locked = summary.skipped_locked,
            revocations_finished = summary.revocations_finished,
            duration_ms = summary.duration_ms,
        );
        summary
    }
}
