//! Each function's worst-case time, worked out from the timeouts and budgets the code uses, so
//! a test can hold it against the function's Lambda `Timeout` in template.yaml
//! (tests/tests/template.rs). A function that outlives its timeout is killed between two
//! writes; one that fits always finishes what it started (API Gateway may answer the browser
//! 503 after 30 s, but the function still completes its writes).
//!
//! The model is a sum of sequential steps, each at its bound: an AWS call at `AWS_CALL_TIMEOUT`
//! (retries included), a Klaviyo call at `REQUEST_TIMEOUT`, an inline revocation at
//! `INLINE_BUDGET`; concurrent steps count as their slowest one. Secrets are counted once: an HTTP
//! function that could not read them at start-up reads them on its first request, and a warm
//! container reads the JWT keys again when they are five minutes old or a token matches none of
//! them (`crate::adapters::auth`); one request makes at most one of these reads, since a read
//! counts for at least a minute. A call Klaviyo refuses with `invalid_client` may read the client
//! secret again and be made once more (`crate::adapters::klaviyo`); inline revocations stay inside
//! their budget either way.

use crate::adapters::klaviyo::{REQUEST_TIMEOUT, REVOKE_TIMEOUT};
use crate::context::AWS_CALL_TIMEOUT;
use crate::use_cases::refresh::{DEADLINE_MARGIN, LEASE, WRITE_ATTEMPTS, WRITE_RETRY_PAUSE};
use crate::use_cases::revocation::{INLINE_BUDGET, REPLACE_ATTEMPTS};
use std::fmt;
use std::time::Duration;

/// The sequential steps of one function's slowest path.
#[derive(Debug, Clone)]
pub struct Budget {
    steps: Vec<(&'static str, Duration)>,
}

impl Budget {
    fn new() -> Self {
        Self { steps: Vec::new() }
    }

    fn step(mut self, what: &'static str, time: Duration) -> Self {
        self.steps.push((what, time));
        self
    }

    fn repeat(mut self, times: u32, what: &'static str, each: Duration) -> Self {
        self.steps.push((what, each * times));
        self
    }

    pub fn total(&self) -> Duration {
        self.steps.iter().map(|(_, time)| *time).sum()
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, time) in &self.steps {
            writeln!(f, "  {:>6.1} s  {what}", time.as_secs_f64())?;
        }
        write!(f, "  {:>6.1} s  in all", self.total().as_secs_f64())
    }
}

const AWS: Duration = AWS_CALL_TIMEOUT;
const KLAVIYO: Duration = REQUEST_TIMEOUT;

/// An HTTP function's request starts with reading its secrets when start-up could not, or with
/// reading the JWT keys again (never both: a read counts for at least a minute).
fn http_request() -> Budget {
    Budget::new().step(
        "Secrets Manager (start-up's read, or the JWT keys again)",
        AWS,
    )
}

/// One attempt of `Revoker::replace`.
const REPLACE_ATTEMPT: &str = "read + transaction + re-read after a conflict, per attempt";

/// Reading and replacing a connection, queueing the replaced token (`Revoker::replace`).
fn replace(budget: Budget) -> Budget {
    budget
        .repeat(REPLACE_ATTEMPTS, REPLACE_ATTEMPT, AWS * 3)
        .step("inline revocation of the replaced token", INLINE_BUDGET)
}

/// One refresh under a lease: take the lease, open the tokens, ask Klaviyo, store the result
/// (retried), and if it cannot be stored, queue or revoke the new token.
pub fn refresh_item() -> Budget {
    Budget::new()
        .step("take the lease", AWS)
        .step("KMS Decrypt", AWS)
        .step("Klaviyo token refresh", KLAVIYO)
        .step(
            "after invalid_client: the secret again, the refresh again",
            AWS + KLAVIYO,
        )
        .repeat(
            WRITE_ATTEMPTS,
            "store the result + re-read after a conflict, per attempt",
            AWS * 2 + WRITE_RETRY_PAUSE,
        )
        .step("re-read after a failed write (did it land?)", AWS)
        .step("queue the unstored token", AWS)
        .step(
            "or revoke it (again after invalid_client, with the secret read again)",
            REVOKE_TIMEOUT * 2 + AWS,
        )
}

/// One pending revocation in the job: open, revoke, delete or reschedule.
pub fn revocation_item() -> Budget {
    Budget::new()
        .step("read the connection (is the token stored after all?)", AWS)
        .step("KMS Decrypt", AWS)
        .step("Klaviyo revoke", REVOKE_TIMEOUT)
        .step(
            "after invalid_client: the secret again, the revoke again",
            AWS + REVOKE_TIMEOUT,
        )
        .step("delete or reschedule", AWS)
}

/// The worst case of the function whose binary is `binary`, given its Lambda `timeout`
/// (the refresh job plans its work by its deadline). `None` for an unknown function.
pub fn worst_case(binary: &str, timeout: Duration) -> Option<Budget> {
    Some(match binary {
        // The slowest of its routes: an API key, a completion or a test (the OAuth start is two
        // AWS calls; a refused completion is a claim and an inline revocation).
        "connect" => {
            let api_key = replace(
                http_request()
                    .step("rate-limit counter", AWS)
                    .step("Klaviyo accounts ∥ KMS GenerateDataKey", KLAVIYO.max(AWS)),
            );
            let complete = http_request()
                .step("rate-limit counter", AWS)
                .step("claim the parked result (a read if the answer was lost)", AWS * 2)
                .repeat(REPLACE_ATTEMPTS, REPLACE_ATTEMPT, AWS * 3)
                .step(
                    "the replaced token revoked inline, or after a failed write: a read (did it land?) and the claim given back",
                    INLINE_BUDGET.max(AWS * 2),
                );
            let verify = worst_case("verify", timeout)?;
            [api_key, complete, verify]
                .into_iter()
                .max_by_key(Budget::total)
                .expect("three routes")
        }
        "callback" => {
            let budget = http_request()
                .step("consume the pending state", AWS)
                .step("Klaviyo code exchange", KLAVIYO)
                .step(
                    "after invalid_client: the secret again, the exchange again",
                    AWS + KLAVIYO,
                )
                .step("Klaviyo accounts ∥ KMS GenerateDataKey", KLAVIYO.max(AWS));
            // Stored: the replaced token is revoked inline. Not stored: a read tells whether it
            // was after all (a lost answer), then the new token is revoked inline instead.
            replace(budget).step("re-read after a failed write", AWS)
        }
        "accounts" => http_request().step("Query the user's connections", AWS),
        // "Test connection" (a route of the connect function, `crate::use_cases::verify`).
        "verify" => {
            let lease = (
                "take the lease, waiting while another worker holds it",
                crate::use_cases::verify::LEASE_WAIT
                    + crate::use_cases::verify::WAIT_FOR_LEASE
                    + AWS * 2,
            );
            http_request()
                .step("rate-limit counter", AWS)
                .step(lease.0, lease.1)
                .step("KMS Decrypt", AWS)
                .step("Klaviyo accounts", KLAVIYO)
                .step(
                    "the token refreshed under the lease",
                    refresh_item().total(),
                )
                .step("Klaviyo accounts with the new token", KLAVIYO)
                .step(lease.0, lease.1)
                .step("record the result", AWS)
                .step("read the connection as stored", AWS)
        }
        "disconnect" => http_request()
            .repeat(
                crate::use_cases::disconnect::ATTEMPTS,
                "read + (transaction ∥ KMS Decrypt) + read of the queue item, per attempt",
                AWS * 3,
            )
            .step("inline revocation", INLINE_BUDGET),
        // A credential: read the connection; at worst wait for another worker's refresh, then
        // refresh it under the lease (or open the stored one: a KMS call, less).
        "token" => Budget::new()
            .step("read the connection", AWS)
            .step(
                "wait while another worker refreshes it (reads and lease attempts)",
                crate::use_cases::refresh::AccessTokens::WAIT_IN_ALL + AWS * 2,
            )
            .step("read again and take the lease", AWS * 2)
            .step(
                "the token refreshed under the lease",
                refresh_item().total(),
            ),
        // One PutEvents call (a batch of ten changes makes at most ten events), its failed
        // entries tried again twice with pauses of 0.2 and 0.4 s.
        "events" => Budget::new().step(
            "PutEvents, three attempts with their pauses",
            AWS * crate::use_cases::events::PUT_ATTEMPTS
                + crate::use_cases::events::RETRY_PAUSE * 3,
        ),
        // The job stops taking work DEADLINE_MARGIN before its deadline; what is in flight
        // then is at most one item per worker, all in parallel.
        "refresh" => Budget::new()
            .step(
                "work until the stop line",
                timeout.saturating_sub(DEADLINE_MARGIN),
            )
            .step(
                "the slowest item in flight",
                refresh_item().total().max(revocation_item().total()),
            ),
        _ => return None,
    })
}

/// A refresh must end well inside its lease, or a second worker could start it.
pub fn refresh_fits_its_lease() -> bool {
    refresh_item().total() < LEASE.unsigned_abs()
}

/// What "Test connection" does under its first lease: open the credential, ask Klaviyo, and
/// refresh the token (whose write releases the lease).
pub fn test_under_its_lease() -> Budget {
    Budget::new()
        .step("KMS Decrypt", AWS)
        .step("Klaviyo accounts", KLAVIYO)
        .step(
            "the token refreshed under the lease",
            refresh_item().total(),
        )
}

/// A test must end its first lease's work inside the lease, like a refresh.
pub fn test_fits_its_lease() -> bool {
    test_under_its_lease().total() < LEASE.unsigned_abs()
}
