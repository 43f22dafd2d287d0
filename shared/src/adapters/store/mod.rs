//! DynamoDB persistence: one table, items told apart by key prefix (design in
//! docs/ARCHITECTURE.md).
//!
//! | item                  | pk                    | sk              |
//! |-----------------------|-----------------------|-----------------|
//! | pending authorization | `STATE#<sha256 state>`| `STATE`         |
//! | connection            | `USER#<user id>`      | `CONN#<conn id>`|
//! | pending revocation    | `REVOKE#<id>`         | `REVOKE`        |
//! | parked connection     | `REVOKE#<sha256 handle>` | `REVOKE`     |
//! | rate-limit counter    | `RATE#<user id>`      | `<scope>#<window start>` |
//!
//! Connections due for refresh (OAuth) or for their daily check (API keys) and pending revocations
//! also carry `due_bucket`/`due_at`, the keys of the sparse `due-index` GSI the refresh job queries
//! (never a Scan). Items that expire carry `expires_at` (epoch seconds), the table's TTL attribute;
//! TTL deletes only eventually, so every read checks expiry itself. A parked connection (an OAuth
//! result waiting for its completion) is a pending revocation with the connection's details beside
//! the tokens: due when its completion window has passed, so the refresh job revokes it unless a
//! completion deletes it first.
//!
//! This file is the core every record kind uses (the client, the item keys, the errors); each
//! kind's reads and writes are in a file of its own: `connections`, `authorizations` (pending
//! authorizations and parked completions), `revocations`, `rate_limits`.

mod authorizations;
mod connections;
mod rate_limits;
mod revocations;

pub use authorizations::Claim;
#[cfg(test)]
pub(crate) use connections::image_of;
pub use connections::{ConnectionKey, DuePage, Upserted, connection_from_image};

use crate::adapters::auth::UserId;
use crate::adapters::crypto::SealedBlob;
use crate::domain::model::{
    AuthType, Connection, ConnectionStatus, ParkedConnection, PendingAuthorization,
    PendingRevocation, StatusReason,
};
use crate::domain::rate_limit::{Admission, RateWindow, Scope};
use crate::domain::secret::Secret;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, Put, ReturnValue, TransactWriteItem, Update,
};
use serde::{Deserialize, Serialize};
use serde_dynamo::aws_sdk_dynamodb_1::{from_item, to_item};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use time::OffsetDateTime;

/// Name of the GSI the refresh job queries.
pub const DUE_INDEX: &str = "due-index";
/// Due items are spread over this many index partitions per kind so that a large fleet does
/// not make one hot partition; the refresh job queries each bucket (and can fan out by it).
pub const DUE_BUCKETS: u8 = 16;

type Item = HashMap<String, AttributeValue>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("item not found")]
    NotFound,
    #[error("the item changed since it was read")]
    Conflict,
    #[error("DynamoDB unavailable: {0}")]
    Unavailable(String),
    /// DynamoDB refused: the role may not perform the action, or the table is missing. A
    /// configuration fault that retrying will not fix.
    #[error("DynamoDB refused: {0}")]
    Refused(String),
    #[error("stored item is malformed: {0}")]
    Corrupt(String),
}

impl<E, R> From<SdkError<E, R>> for StoreError
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    fn from(error: SdkError<E, R>) -> Self {
        let refused = error
            .as_service_error()
            .and_then(|e| e.code())
            .is_some_and(|code| {
                matches!(code, "AccessDeniedException" | "ResourceNotFoundException")
            });
        let message = DisplayErrorContext(&error).to_string();
        if refused {
            // A policy missing an action, or a missing table: the alarm on this event pages.
            tracing::error!(event = "aws_access_denied", service = "dynamodb", error = %message, "DynamoDB refused a call");
            Self::Refused(message)
        } else {
            Self::Unavailable(message)
        }
    }
}

fn is_condition_failure<E, R>(error: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    error
        .as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}

/// A write whose failed condition means there is nothing (more) to do.
fn done_unless_refused<T, E, R>(result: Result<T, SdkError<E, R>>) -> Result<(), StoreError>
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_condition_failure(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Which items of a cancelled transaction failed their condition (`None` when the
/// transaction was not cancelled, or failed for another reason).
fn failed_conditions<R>(error: &SdkError<TransactWriteItemsError, R>) -> Option<Vec<bool>> {
    let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
        error.as_service_error()
    else {
        return None;
    };
    Some(
        cancelled
            .cancellation_reasons()
            .iter()
            .map(|reason| reason.code() == Some("ConditionalCheckFailed"))
            .collect(),
    )
}

#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    table: String,
}

impl Store {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

// ---- item layout --------------------------------------------------------------------

const PENDING_SK: &str = "STATE";
const CONNECTION_SK_PREFIX: &str = "CONN#";
const REVOCATION_SK: &str = "REVOKE";
const REFRESH_BUCKET: &str = "refresh";
const REVOCATION_BUCKET: &str = "revoke";

fn revocation_pk(id: &str) -> String {
    format!("REVOKE#{id}")
}

fn pending_pk(state_hash: &str) -> String {
    format!("STATE#{state_hash}")
}

fn user_pk(user_id: &UserId) -> String {
    format!("USER#{}", user_id.as_str())
}

fn connection_sk(connection_id: &str) -> String {
    format!("{CONNECTION_SK_PREFIX}{connection_id}")
}

/// The `due-index` partition of a connection due for refresh: stable, spread by hash.
pub fn refresh_bucket(connection_id: &str) -> String {
    bucket_name(REFRESH_BUCKET, bucket_of(connection_id))
}

/// The `due-index` partition of a pending revocation.
pub fn revocation_bucket(id: &str) -> String {
    bucket_name(REVOCATION_BUCKET, bucket_of(id))
}

fn bucket_of(id: &str) -> u8 {
    Sha256::digest(id.as_bytes())[0] % DUE_BUCKETS
}

fn bucket_name(kind: &str, bucket: u8) -> String {
    format!("{kind}#{bucket:02}")
}

fn key(pk: String, sk: String) -> Item {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk)),
        ("sk".to_owned(), AttributeValue::S(sk)),
    ])
}

fn number(n: i64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_buckets_are_stable_and_bounded() {
        let bucket = refresh_bucket("6b1a4c52-0000-4d8b-9a53-2f1e7c0d3b21");
        assert_eq!(
            bucket,
            refresh_bucket("6b1a4c52-0000-4d8b-9a53-2f1e7c0d3b21")
        );
        let n: u8 = bucket.trim_start_matches("refresh#").parse().unwrap();
        assert!(n < DUE_BUCKETS);
        let distinct: std::collections::HashSet<_> = (0..200)
            .map(|i| refresh_bucket(&format!("conn-{i}")))
            .collect();
        assert_eq!(distinct.len(), DUE_BUCKETS as usize);
        assert!(revocation_bucket("x").starts_with("revoke#"));
    }
}
