//! DynamoDB persistence: one table, items told apart by key prefix (design in README.md).
//!
//! | item                  | pk                    | sk              |
//! |-----------------------|-----------------------|-----------------|
//! | pending authorization | `STATE#<sha256 state>`| `STATE`         |
//! | connection            | `USER#<user id>`      | `CONN#<conn id>`|
//! | pending revocation    | `REVOKE#<id>`         | `REVOKE`        |
//! | parked connection     | `REVOKE#<sha256 handle>` | `REVOKE`     |
//! | rate-limit counter    | `RATE#<user id>`      | `<scope>#<window start>` |
//!
//! Connections due for refresh (OAuth) or for their daily check (API keys) and pending
//! revocations also carry `due_bucket`/`due_at`,
//! the keys of the sparse `due-index` GSI the refresh job queries (never a Scan). Items that expire carry
//! `expires_at` (epoch seconds), the table's TTL attribute; TTL deletes only eventually, so
//! every read checks expiry itself. A parked connection (an OAuth result waiting for its
//! completion) is a pending revocation with the connection's details beside the tokens: due
//! when its completion window has passed, so the refresh job revokes it unless a completion
//! deletes it first.

use crate::auth::UserId;
use crate::crypto::SealedBlob;
use crate::model::{
    AuthType, Connection, ConnectionStatus, ParkedConnection, PendingAuthorization,
    PendingRevocation, StatusReason,
};
use crate::rate_limit::{Admission, RateWindow, Scope};
use crate::secret::Secret;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, Put, ReturnValue, TransactWriteItem, Update,
};
use serde::{Deserialize, Serialize};
use serde_dynamo::aws_sdk_dynamodb_1::{from_item, to_item};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
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

/// Where a connection lives, as the due index gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub user_id: UserId,
    pub connection_id: String,
}

/// One page of connections due for refresh and where the next page starts.
#[derive(Debug, Default)]
pub struct DuePage {
    pub keys: Vec<ConnectionKey>,
    pub next: Option<HashMap<String, AttributeValue>>,
}

/// The result of an upsert: what is stored now, and what it replaced.
#[derive(Debug)]
pub struct Upserted {
    pub connection: Connection,
    pub previous: Option<Connection>,
}

/// A parked connection one completion request holds (`Store::claim_parked`): only that
/// request's transaction may turn it into a connection.
#[derive(Debug, Clone)]
pub struct Claim {
    pub handle_hash: String,
    pub owner: String,
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

    // ---- pending authorizations ------------------------------------------------------

    pub async fn put_pending(&self, pending: &PendingAuthorization) -> Result<(), StoreError> {
        let record = PendingRecord::from(pending);
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(record).map_err(corrupt)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await?;
        Ok(())
    }

    /// Stores a pending authorization and counts it against the user's connect rate limit,
    /// in one transaction: a limited request writes nothing.
    pub async fn put_pending_counted(
        &self,
        pending: &PendingAuthorization,
        window: &RateWindow,
    ) -> Result<Admission, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(
                to_item(PendingRecord::from(pending)).map_err(corrupt)?,
            ))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(corrupt)?;
        let count = self.rate_counter(&pending.user_id, Scope::Connect, window);
        let count = Update::builder()
            .table_name(&self.table)
            .set_key(Some(count.key))
            .update_expression(count.expression)
            .condition_expression(count.condition)
            .set_expression_attribute_values(Some(count.values))
            .build()
            .map_err(corrupt)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(TransactWriteItem::builder().update(count).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(Admission::Admitted),
            Err(e) => match failed_conditions(&e).as_deref() {
                Some([_, true, ..]) => Ok(Admission::Limited),
                // The state is 32 random bytes, so only this request can have written it: an
                // attempt whose answer was lost landed, and the SDK's retry met it.
                // (DynamoDB's idempotency token prevents this; emulators may not.)
                Some([true, ..]) => Ok(Admission::Admitted),
                // A concurrent transaction on the same counter (retryable), or no answer.
                _ => Err(e.into()),
            },
        }
    }

    /// Counts one attempt that writes nothing else with it (an API-key check, a completion).
    pub async fn count_attempt(
        &self,
        user_id: &UserId,
        scope: Scope,
        window: &RateWindow,
    ) -> Result<Admission, StoreError> {
        let count = self.rate_counter(user_id, scope, window);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(count.key))
            .update_expression(count.expression)
            .condition_expression(count.condition)
            .set_expression_attribute_values(Some(count.values))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Admission::Admitted),
            Err(e) if is_condition_failure(&e) => Ok(Admission::Limited),
            Err(e) => Err(e.into()),
        }
    }

    /// `hits + 1` on the window's counter unless it already reached the limit; the counter
    /// expires (TTL) when its window ends.
    fn rate_counter(&self, user_id: &UserId, scope: Scope, window: &RateWindow) -> CounterUpdate {
        CounterUpdate {
            key: key(
                format!("RATE#{}", user_id.as_str()),
                format!("{}#{}", scope.key(), window.starts_at),
            ),
            expression: "ADD hits :one SET expires_at = :ends",
            condition: "attribute_not_exists(hits) OR hits < :limit",
            values: HashMap::from([
                (":one".to_owned(), number(1)),
                (":ends".to_owned(), number(window.ends_at)),
                (":limit".to_owned(), number(i64::from(window.limit))),
            ]),
        }
    }

    /// Deletes and returns the pending authorization for `state`, atomically, so a state
    /// completes at most once. Unknown, already consumed and expired all give `NotFound`.
    pub async fn consume_pending(
        &self,
        state: &str,
        now: OffsetDateTime,
    ) -> Result<PendingAuthorization, StoreError> {
        let hash = PendingAuthorization::hash_state(state);
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(pending_pk(&hash), PENDING_SK.to_owned())))
            .condition_expression("attribute_exists(pk) AND expires_at > :now")
            .expression_attribute_values(":now", number(now.unix_timestamp()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => {
                let item = output.attributes.ok_or(StoreError::NotFound)?;
                from_item::<PendingRecord>(item)
                    .map_err(corrupt)?
                    .try_into()
            }
            Err(e) if is_condition_failure(&e) => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    // ---- connections -----------------------------------------------------------------

    pub async fn get_connection(
        &self,
        user_id: &UserId,
        connection_id: &str,
    ) -> Result<Connection, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), connection_sk(connection_id))))
            .consistent_read(true)
            .send()
            .await?;
        let item = output.item.ok_or(StoreError::NotFound)?;
        decode_connection(item)
    }

    /// Whether the connection stores exactly `credentials` now: how a writer whose answer was
    /// lost tells that its write landed (a fresh nonce makes every sealed blob unique).
    pub async fn stores_credentials(
        &self,
        user_id: &UserId,
        connection_id: &str,
        credentials: &SealedBlob,
    ) -> Result<bool, StoreError> {
        match self.get_connection(user_id, connection_id).await {
            Ok(current) => Ok(current.credentials == *credentials),
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The user's connections, newest first (one paginated Query on the user's partition).
    pub async fn list_connections(&self, user_id: &UserId) -> Result<Vec<Connection>, StoreError> {
        let items: Vec<Item> = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", AttributeValue::S(user_pk(user_id)))
            .expression_attribute_values(
                ":prefix",
                AttributeValue::S(CONNECTION_SK_PREFIX.to_owned()),
            )
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
            .await?;
        let mut connections = items
            .into_iter()
            .map(decode_connection)
            .collect::<Result<Vec<_>, _>>()?;
        connections.sort_by(|a, b| {
            b.connected_at
                .cmp(&a.connected_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(connections)
    }

    /// Creates the connection or replaces its credentials and details, in one write.
    /// `connected_at` is kept from the first connect and `version` is incremented; the
    /// returned `previous` lets the caller revoke credentials it replaced.
    pub async fn upsert_connection(&self, connection: &Connection) -> Result<Upserted, StoreError> {
        let record = ConnectionRecord::from(connection);
        let mut update = UpdateBuilder::new(&record)?;
        update.set_if_not_exists("connected_at");
        let (expression, names, values) =
            update.finish("version = if_not_exists(version, :zero) + :one");
        let output = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(record.pk.clone(), record.sk.clone())))
            .update_expression(expression)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .expression_attribute_values(":zero", number(0))
            .expression_attribute_values(":one", number(1))
            .return_values(ReturnValue::AllOld)
            .send()
            .await?;
        let previous = match output.attributes {
            Some(item) if !item.is_empty() => Some(decode_connection(item)?),
            _ => None,
        };
        let mut stored = as_stored(connection);
        if let Some(previous) = &previous {
            stored.connected_at = previous.connected_at;
            stored.version = previous.version + 1;
        } else {
            stored.version = 1;
        }
        Ok(Upserted {
            connection: stored,
            previous,
        })
    }

    /// Stores `connection` in place of `previous` (as a new connection when `previous` is
    /// `None`), and in the same transaction queues `revocation`, the replaced refresh token's,
    /// so no crash can leave a token that left its connection live and forgotten.
    /// `connected_at` is kept from `previous` and the version becomes `previous.version + 1`.
    /// `Conflict` when the stored connection is no longer `previous`.
    ///
    /// With a `claim`, the same transaction deletes the claimed parked connection, if the
    /// claim is still held and its completion window open: the parked result becomes the
    /// connection exactly once, and never once the refresh job may revoke it (its revocation
    /// is due a minute after the window closes).
    /// `NotFound` when the claim no longer holds.
    pub async fn replace_connection(
        &self,
        connection: &Connection,
        previous: Option<&Connection>,
        revocation: Option<&PendingRevocation>,
        claim: Option<&Claim>,
    ) -> Result<Connection, StoreError> {
        let mut stored = as_stored(connection);
        stored.version = previous.map_or(1, |p| p.version + 1);
        if let Some(previous) = previous {
            stored.connected_at = previous.connected_at;
        }
        let mut put = Put::builder().table_name(&self.table).set_item(Some(
            to_item(ConnectionRecord::from(&stored)).map_err(corrupt)?,
        ));
        put = match previous {
            Some(previous) => put
                .condition_expression("version = :v")
                .expression_attribute_values(":v", number(previous.version as i64)),
            None => put.condition_expression("attribute_not_exists(pk)"),
        };
        let mut transaction = self.client.transact_write_items().transact_items(
            TransactWriteItem::builder()
                .put(put.build().map_err(corrupt)?)
                .build(),
        );
        if let Some(claim) = claim {
            let delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(
                    revocation_pk(&claim.handle_hash),
                    REVOCATION_SK.to_owned(),
                )))
                .condition_expression("claimed_by = :owner AND complete_by > :now")
                .expression_attribute_values(":owner", AttributeValue::S(claim.owner.clone()))
                .expression_attribute_values(
                    ":now",
                    number(OffsetDateTime::now_utc().unix_timestamp()),
                )
                .build()
                .map_err(corrupt)?;
            transaction =
                transaction.transact_items(TransactWriteItem::builder().delete(delete).build());
        }
        if let Some(revocation) = revocation {
            let queue = Put::builder()
                .table_name(&self.table)
                .set_item(Some(
                    to_item(RevocationRecord::from(revocation)).map_err(corrupt)?,
                ))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(corrupt)?;
            transaction =
                transaction.transact_items(TransactWriteItem::builder().put(queue).build());
        }
        let result = transaction.send().await;
        let Err(error) = result else {
            return Ok(stored);
        };
        let Some(failed) = failed_conditions(&error) else {
            return Err(error.into());
        };
        let failed_at = |index: Option<usize>| index.is_some_and(|i| failed.get(i) == Some(&true));
        let claim_index = claim.map(|_| 1);
        let revocation_index = revocation.map(|_| 1 + usize::from(claim.is_some()));
        // The revocation id is random: only this request can have written it, so an attempt
        // whose answer was lost landed and the SDK's retry met it.
        if failed_at(revocation_index) {
            return Ok(stored);
        }
        if failed_at(Some(0)) || failed_at(claim_index) {
            // Ours too if the stored credentials are the ones just sealed. Unknown whether it
            // landed (the read failed) is not a conflict: a retry would re-read.
            if self
                .stores_credentials(&stored.user_id, &stored.id, &stored.credentials)
                .await?
            {
                return Ok(stored);
            }
            if failed_at(claim_index) {
                return Err(StoreError::NotFound);
            }
        }
        Err(StoreError::Conflict)
    }

    /// Writes `connection` only if the stored version is still `expected_version` (and the
    /// connection still exists); the stored version becomes `expected_version + 1`.
    ///
    /// The whole record replaces the stored item (a conditional put): attributes the
    /// connection lacks, and the refresh lease, are gone afterwards. A put costs DynamoDB
    /// the same as an update of every attribute, and emulators evaluate it far faster than
    /// an update expression with twenty clauses.
    pub async fn update_connection_if_version(
        &self,
        connection: &Connection,
        expected_version: u64,
    ) -> Result<Connection, StoreError> {
        self.put_connection_if(connection, expected_version, None)
            .await
    }

    /// Writes a refresh result: like `update_connection_if_version`, and only while `owner`
    /// still holds an unexpired refresh lease on the connection (the write releases it).
    pub async fn update_leased_connection(
        &self,
        connection: &Connection,
        expected_version: u64,
        owner: &str,
        now: OffsetDateTime,
    ) -> Result<Connection, StoreError> {
        self.put_connection_if(connection, expected_version, Some((owner, now)))
            .await
    }

    async fn put_connection_if(
        &self,
        connection: &Connection,
        expected_version: u64,
        lease: Option<(&str, OffsetDateTime)>,
    ) -> Result<Connection, StoreError> {
        let mut stored = as_stored(connection);
        stored.version = expected_version + 1;
        let item = to_item(ConnectionRecord::from(&stored)).map_err(corrupt)?;
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .expression_attribute_values(":expected", number(expected_version as i64));
        put = match lease {
            None => put.condition_expression("attribute_exists(pk) AND version = :expected"),
            Some((owner, now)) => put
                .condition_expression(
                    "attribute_exists(pk) AND version = :expected \
                     AND lease_owner = :owner AND lease_until > :now",
                )
                .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
                .expression_attribute_values(":now", number(now.unix_timestamp())),
        };
        match put.send().await {
            Ok(_) => Ok(stored),
            Err(e) if is_condition_failure(&e) => Err(StoreError::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the connection if it is still at `connection.version`.
    pub async fn delete_connection_if_version(
        &self,
        connection: &Connection,
    ) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(
                user_pk(&connection.user_id),
                connection_sk(&connection.id),
            )))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", number(connection.version as i64))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// In one transaction: deletes the connection (if still at its version) and records the
    /// revocation its tokens need, so no crash can lose a token that was never revoked.
    pub async fn remove_connection_and_queue_revocation(
        &self,
        connection: &Connection,
        pending: &PendingRevocation,
    ) -> Result<(), StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(
                user_pk(&connection.user_id),
                connection_sk(&connection.id),
            )))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", number(connection.version as i64))
            .build()
            .map_err(corrupt)?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(
                to_item(RevocationRecord::from(pending)).map_err(corrupt)?,
            ))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(corrupt)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match failed_conditions(&e) {
                // The revocation id is random, so only this request can have written it: an
                // attempt whose answer was lost landed (deleting the connection with it), and
                // the SDK's retry met it. (DynamoDB's idempotency token prevents this;
                // emulators may not.)
                Some(failed) if failed.get(1) == Some(&true) => Ok(()),
                // The connection changed, or a concurrent transaction on the same item.
                Some(_) => Err(StoreError::Conflict),
                None => Err(e.into()),
            },
        }
    }

    // ---- refresh ----------------------------------------------------------------------

    /// A page of connections in `bucket` due by `until` (a Query on `due-index`).
    pub async fn due_connections(
        &self,
        bucket: u8,
        until: OffsetDateTime,
        start: Option<Item>,
        page_size: i32,
    ) -> Result<DuePage, StoreError> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(DUE_INDEX)
            .key_condition_expression("due_bucket = :bucket AND due_at <= :until")
            .expression_attribute_values(
                ":bucket",
                AttributeValue::S(bucket_name(REFRESH_BUCKET, bucket)),
            )
            .expression_attribute_values(":until", number(until.unix_timestamp()))
            .set_exclusive_start_key(start)
            .limit(page_size)
            .send()
            .await?;
        let keys = output
            .items
            .unwrap_or_default()
            .iter()
            .filter_map(|item| {
                let pk = item.get("pk")?.as_s().ok()?;
                let sk = item.get("sk")?.as_s().ok()?;
                Some(ConnectionKey {
                    user_id: UserId::parse(pk.strip_prefix("USER#")?)?,
                    connection_id: sk.strip_prefix(CONNECTION_SK_PREFIX)?.to_owned(),
                })
            })
            .collect();
        Ok(DuePage {
            keys,
            next: output.last_evaluated_key.filter(|k| !k.is_empty()),
        })
    }

    /// Takes the refresh lease of an active connection (an OAuth refresh, or the check of an
    /// API key): a conditional write that succeeds only if no unexpired lease is held, so two
    /// workers never refresh or check one connection at once. Returns the connection as stored now (the re-read).
    /// `Conflict` when leased by another worker or no longer eligible.
    pub async fn take_refresh_lease(
        &self,
        key: &ConnectionKey,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Connection, StoreError> {
        let result = self
            .update_connection_item(key)
            .update_expression("SET lease_owner = :owner, lease_until = :until")
            .condition_expression(
                "attribute_exists(pk) AND #status = :active \
                 AND (attribute_not_exists(lease_until) OR lease_until < :now)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":until", number(until.unix_timestamp()))
            .expression_attribute_values(":now", number(now.unix_timestamp()))
            .expression_attribute_values(":active", AttributeValue::S("active".into()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(output) => decode_connection(output.attributes.unwrap_or_default()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that a credential of the connection was handed out at `now`, unless that was
    /// recorded less than `every` ago: one conditional UpdateItem of that attribute alone, which
    /// leaves `version` and the lease as they are (nothing about the credentials changes).
    /// With `due` (when, and the version it was decided on), the same write moves the
    /// connection's refresh to then, if it is still at that version; if it no longer is, the
    /// use alone is recorded. `Ok(false)` when it was recent enough already (or the
    /// connection is gone).
    pub async fn record_use(
        &self,
        key: &ConnectionKey,
        now: OffsetDateTime,
        every: time::Duration,
        due: Option<(OffsetDateTime, u64)>,
    ) -> Result<bool, StoreError> {
        // Whole seconds in UTC: every stored value has the same length, so the string
        // comparison of the condition is the chronological one.
        let text = |at: OffsetDateTime| {
            at.to_offset(time::UtcOffset::UTC)
                .replace_nanosecond(0)
                .map_err(corrupt)?
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(corrupt)
        };
        let recent = "attribute_exists(pk) AND (attribute_not_exists(last_used_at) OR last_used_at < :since)";
        let mut update = self
            .update_connection_item(key)
            .expression_attribute_values(":now", AttributeValue::S(text(now)?))
            .expression_attribute_values(":since", AttributeValue::S(text(now - every)?));
        update = match due {
            None => update
                .update_expression("SET last_used_at = :now")
                .condition_expression(recent),
            Some((due, version)) => update
                .update_expression("SET last_used_at = :now, due_at = :due")
                .condition_expression(format!("{recent} AND version = :version"))
                .expression_attribute_values(":due", number(due.unix_timestamp()))
                .expression_attribute_values(":version", number(version as i64)),
        };
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) && due.is_some() => {
                Box::pin(self.record_use(key, now, every, None)).await
            }
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// An UpdateItem of one connection item (table and key set), for the caller's expressions.
    fn update_connection_item(&self, key: &ConnectionKey) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self::key(
                user_pk(&key.user_id),
                connection_sk(&key.connection_id),
            )))
    }

    /// Gives a lease back early (when a worker decides not to refresh after all).
    pub async fn release_refresh_lease(
        &self,
        key: &ConnectionKey,
        owner: &str,
    ) -> Result<(), StoreError> {
        let result = self
            .update_connection_item(key)
            .update_expression("REMOVE lease_owner, lease_until")
            .condition_expression("lease_owner = :owner")
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .send()
            .await;
        done_unless_refused(result)
    }

    // ---- pending revocations -----------------------------------------------------------

    pub async fn put_pending_revocation(
        &self,
        pending: &PendingRevocation,
    ) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(
                to_item(RevocationRecord::from(pending)).map_err(corrupt)?,
            ))
            .send()
            .await?;
        Ok(())
    }

    pub async fn get_pending_revocation(&self, id: &str) -> Result<PendingRevocation, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(revocation_pk(id), REVOCATION_SK.to_owned())))
            .consistent_read(true)
            .send()
            .await?;
        let item = output.item.ok_or(StoreError::NotFound)?;
        from_item::<RevocationRecord>(item)
            .map_err(corrupt)?
            .try_into()
    }

    /// Deleting the item deletes the last copy of the token material.
    pub async fn delete_pending_revocation(&self, id: &str) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(revocation_pk(id), REVOCATION_SK.to_owned())))
            .send()
            .await?;
        Ok(())
    }

    // ---- parked connections ----------------------------------------------------------

    /// Parks an OAuth result under its handle's hash (one write, which also queues its
    /// revocation for when the completion window has passed).
    pub async fn park_connection(&self, parked: &ParkedConnection) -> Result<(), StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(ParkedRecord::from(parked)).map_err(corrupt)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        // The handle is 32 random bytes: only this request can have written it, so an attempt
        // whose answer was lost landed and the SDK's retry met it.
        done_unless_refused(result)
    }

    /// Takes the parked connection under `handle_hash` for one completion request (`owner`),
    /// whatever its user or deadline (the caller decides), so that only that request can
    /// complete or reject it. `NotFound` when there is none, or another request holds it.
    pub async fn claim_parked(
        &self,
        handle_hash: &str,
        owner: &str,
    ) -> Result<ParkedConnection, StoreError> {
        let item_key = key(revocation_pk(handle_hash), REVOCATION_SK.to_owned());
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(item_key.clone()))
            .update_expression("SET claimed_by = :owner")
            .condition_expression(
                "attribute_exists(complete_by) AND attribute_not_exists(claimed_by)",
            )
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        let item = match result {
            Ok(output) => output.attributes.unwrap_or_default(),
            Err(e) if is_condition_failure(&e) => {
                // Ours after all if an attempt whose answer was lost landed.
                let output = self
                    .client
                    .get_item()
                    .table_name(&self.table)
                    .set_key(Some(item_key))
                    .consistent_read(true)
                    .send()
                    .await?;
                match output.item {
                    Some(item)
                        if item.get("claimed_by").and_then(|v| v.as_s().ok())
                            == Some(&owner.to_owned()) =>
                    {
                        item
                    }
                    _ => return Err(StoreError::NotFound),
                }
            }
            Err(e) => return Err(e.into()),
        };
        from_item::<ParkedRecord>(item).map_err(corrupt)?.try_into()
    }

    /// Gives a claim back (a completion that could not write), so the user can try again.
    pub async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                revocation_pk(&claim.handle_hash),
                REVOCATION_SK.to_owned(),
            )))
            .update_expression("REMOVE claimed_by")
            .condition_expression("claimed_by = :owner")
            .expression_attribute_values(":owner", AttributeValue::S(claim.owner.clone()))
            .send()
            .await;
        done_unless_refused(result)
    }

    /// Records another failed attempt and when to try next (if the item still exists).
    pub async fn reschedule_pending_revocation(
        &self,
        pending: &PendingRevocation,
    ) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                revocation_pk(&pending.id),
                REVOCATION_SK.to_owned(),
            )))
            .update_expression("SET attempts = :attempts, due_at = :due")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":attempts", number(i64::from(pending.attempts)))
            .expression_attribute_values(":due", number(pending.due_at.unix_timestamp()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` pending revocations due at `now`, oldest due first within each bucket:
    /// one Query per `due-index` bucket, then a read of each item (the index keeps keys only).
    pub async fn due_pending_revocations(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError> {
        let mut due = Vec::new();
        for bucket in 0..DUE_BUCKETS {
            if due.len() >= limit {
                break;
            }
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(DUE_INDEX)
                .key_condition_expression("due_bucket = :bucket AND due_at <= :now")
                .expression_attribute_values(
                    ":bucket",
                    AttributeValue::S(bucket_name(REVOCATION_BUCKET, bucket)),
                )
                .expression_attribute_values(":now", number(now.unix_timestamp()))
                .limit((limit - due.len()) as i32)
                .send()
                .await?;
            for item in output.items.unwrap_or_default() {
                let Some(id) = item
                    .get("pk")
                    .and_then(|v| v.as_s().ok())
                    .and_then(|pk| pk.strip_prefix("REVOKE#"))
                else {
                    continue;
                };
                match self.get_pending_revocation(id).await {
                    Ok(pending) => due.push(pending),
                    // Finished by someone else since the index was read.
                    Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(due)
    }
}

// ---- item layout --------------------------------------------------------------------

const PENDING_SK: &str = "STATE";
const CONNECTION_SK_PREFIX: &str = "CONN#";
const REVOCATION_SK: &str = "REVOKE";
const REFRESH_BUCKET: &str = "refresh";
const REVOCATION_BUCKET: &str = "revoke";

struct CounterUpdate {
    key: Item,
    expression: &'static str,
    condition: &'static str,
    values: Item,
}

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

/// `connection` as an item keeps it (the times every refresh writes, to the second; not
/// `authorized_at`, whose change within a second is a re-authorisation, nor the times the
/// user sees change on "Test connection"): what a write returns, so that what a caller
/// answers with is what a later read finds.
fn as_stored(connection: &Connection) -> Connection {
    let mut stored = connection.clone();
    stored.updated_at = to_the_second(stored.updated_at);
    stored.last_refreshed_at = stored.last_refreshed_at.map(to_the_second);
    stored.last_used_at = stored.last_used_at.map(to_the_second);
    stored
}

/// A time as connection items keep it: to the second (ten bytes fewer each).
fn to_the_second(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).unwrap_or(at)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

#[derive(Serialize, Deserialize)]
struct PendingRecord {
    pk: String,
    sk: String,
    user_id: String,
    account_name: String,
    code_verifier: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// Epoch seconds; also the table's TTL attribute.
    expires_at: i64,
}

impl From<&PendingAuthorization> for PendingRecord {
    fn from(p: &PendingAuthorization) -> Self {
        Self {
            pk: pending_pk(&p.state_hash),
            sk: PENDING_SK.to_owned(),
            user_id: p.user_id.as_str().to_owned(),
            account_name: p.account_name.clone(),
            code_verifier: p.code_verifier.expose().to_owned(),
            created_at: p.created_at,
            expires_at: p.expires_at.unix_timestamp(),
        }
    }
}

impl TryFrom<PendingRecord> for PendingAuthorization {
    type Error = StoreError;

    fn try_from(r: PendingRecord) -> Result<Self, StoreError> {
        Ok(Self {
            state_hash: r.pk.strip_prefix("STATE#").unwrap_or(&r.pk).to_owned(),
            user_id: UserId::parse(&r.user_id).ok_or_else(|| corrupt("pending user_id"))?,
            account_name: r.account_name,
            code_verifier: Secret::new(r.code_verifier),
            created_at: r.created_at,
            expires_at: OffsetDateTime::from_unix_timestamp(r.expires_at).map_err(corrupt)?,
        })
    }
}

/// A connection item. Every byte counts: a refresh writes the item twice (its lease, its
/// result), each billed per started KB of it (docs/COST.md). So the user and connection ids
/// are read from the keys rather than stored again (items written before still carry them,
/// ignored when read and removed by the next update), the times each refresh writes are kept
/// to the second, and a zero failure count is left out.
#[derive(Serialize, Deserialize)]
struct ConnectionRecord {
    pk: String,
    sk: String,
    account_name: String,
    klaviyo_account_id: String,
    klaviyo_account_name: String,
    auth_type: AuthType,
    status: ConnectionStatus,
    scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    connected_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    last_refreshed_at: Option<OffsetDateTime>,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    access_token_expires_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due_bucket: Option<String>,
    /// Epoch seconds when the refresh job should next look at this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due_at: Option<i64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    refresh_failures: u32,
    /// Absent on items written before it existed: the connection's first authorisation.
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    authorized_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_reason: Option<StatusReason>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    degraded: bool,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    last_verified_at: Option<OffsetDateTime>,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    last_used_at: Option<OffsetDateTime>,
    #[serde(with = "serde_bytes")]
    credentials: Vec<u8>,
    version: u64,
}

/// Attributes a connection may lack; a write that leaves them unset removes them. The
/// lease is never part of a record, so every full write also releases it.
const OPTIONAL_CONNECTION_ATTRIBUTES: [&str; 13] = [
    "refresh_failures",
    "connection_id",
    "user_id",
    "last_refreshed_at",
    "last_verified_at",
    "last_used_at",
    "access_token_expires_at",
    "status_reason",
    "degraded",
    "due_bucket",
    "due_at",
    "lease_owner",
    "lease_until",
];

impl From<&Connection> for ConnectionRecord {
    fn from(c: &Connection) -> Self {
        Self {
            pk: user_pk(&c.user_id),
            sk: connection_sk(&c.id),
            account_name: c.account_name.clone(),
            klaviyo_account_id: c.klaviyo_account_id.clone(),
            klaviyo_account_name: c.klaviyo_account_name.clone(),
            auth_type: c.auth_type,
            status: c.status,
            scopes: c.scopes.clone(),
            connected_at: c.connected_at,
            updated_at: to_the_second(c.updated_at),
            last_refreshed_at: c.last_refreshed_at.map(to_the_second),
            access_token_expires_at: c.access_token_expires_at,
            due_bucket: c.refresh_due_at.map(|_| refresh_bucket(&c.id)),
            due_at: c.refresh_due_at.map(OffsetDateTime::unix_timestamp),
            refresh_failures: c.refresh_failures,
            authorized_at: Some(c.authorized_at),
            status_reason: c.status_reason,
            degraded: c.degraded,
            last_verified_at: c.last_verified_at,
            last_used_at: c.last_used_at.map(to_the_second),
            credentials: c.credentials.as_bytes().to_vec(),
            version: c.version,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RevocationRecord {
    pk: String,
    sk: String,
    user_id: String,
    connection_id: String,
    #[serde(with = "serde_bytes")]
    credentials: Vec<u8>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    attempts: u32,
    due_bucket: String,
    due_at: i64,
    /// Epoch seconds; also the table's TTL attribute.
    expires_at: i64,
}

impl From<&PendingRevocation> for RevocationRecord {
    fn from(p: &PendingRevocation) -> Self {
        Self {
            pk: revocation_pk(&p.id),
            sk: REVOCATION_SK.to_owned(),
            user_id: p.user_id.as_str().to_owned(),
            connection_id: p.connection_id.clone(),
            credentials: p.credentials.as_bytes().to_vec(),
            created_at: p.created_at,
            attempts: p.attempts,
            due_bucket: revocation_bucket(&p.id),
            due_at: p.due_at.unix_timestamp(),
            expires_at: p.expires_at.unix_timestamp(),
        }
    }
}

impl TryFrom<RevocationRecord> for PendingRevocation {
    type Error = StoreError;

    fn try_from(r: RevocationRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.pk.strip_prefix("REVOKE#").unwrap_or(&r.pk).to_owned(),
            user_id: UserId::parse(&r.user_id).ok_or_else(|| corrupt("revocation user_id"))?,
            connection_id: r.connection_id,
            credentials: SealedBlob::from_bytes(r.credentials),
            created_at: r.created_at,
            attempts: r.attempts,
            due_at: OffsetDateTime::from_unix_timestamp(r.due_at).map_err(corrupt)?,
            expires_at: OffsetDateTime::from_unix_timestamp(r.expires_at).map_err(corrupt)?,
        })
    }
}

/// A pending revocation (the same attributes, so the refresh job's pass reads it as one) with
/// what the connection needs besides its tokens. Its `expires_at`, the TTL, is the tokens' idle
/// lifetime, not the completion window: TTL must not delete tokens before they are revoked.
#[derive(Serialize, Deserialize)]
struct ParkedRecord {
    #[serde(flatten)]
    revocation: RevocationRecord,
    /// Epoch seconds; the end of the completion window.
    complete_by: i64,
    account_name: String,
    klaviyo_account_id: String,
    klaviyo_account_name: String,
    scopes: Vec<String>,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    access_token_expires_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_by: Option<String>,
}

impl From<&ParkedConnection> for ParkedRecord {
    fn from(parked: &ParkedConnection) -> Self {
        let c = &parked.connection;
        Self {
            revocation: RevocationRecord::from(&parked.revocation()),
            complete_by: parked.complete_by.unix_timestamp(),
            account_name: c.account_name.clone(),
            klaviyo_account_id: c.klaviyo_account_id.clone(),
            klaviyo_account_name: c.klaviyo_account_name.clone(),
            scopes: c.scopes.clone(),
            access_token_expires_at: c.access_token_expires_at,
            claimed_by: None,
        }
    }
}

impl TryFrom<ParkedRecord> for ParkedConnection {
    type Error = StoreError;

    fn try_from(r: ParkedRecord) -> Result<Self, StoreError> {
        let revocation = PendingRevocation::try_from(r.revocation)?;
        let connection = Connection {
            id: revocation.connection_id,
            user_id: revocation.user_id,
            account_name: r.account_name,
            klaviyo_account_id: r.klaviyo_account_id,
            klaviyo_account_name: r.klaviyo_account_name,
            auth_type: AuthType::OAuth,
            status: ConnectionStatus::Active,
            scopes: r.scopes,
            connected_at: revocation.created_at,
            updated_at: revocation.created_at,
            last_refreshed_at: None,
            access_token_expires_at: r.access_token_expires_at,
            refresh_due_at: r
                .access_token_expires_at
                .map(|at| at - crate::model::REFRESH_LEAD),
            refresh_failures: 0,
            authorized_at: revocation.created_at,
            status_reason: None,
            degraded: false,
            // The callback read the account with these tokens.
            last_verified_at: Some(revocation.created_at),
            last_used_at: None,
            credentials: revocation.credentials,
            version: 0,
        };
        Ok(Self {
            handle_hash: revocation.id,
            connection,
            complete_by: OffsetDateTime::from_unix_timestamp(r.complete_by).map_err(corrupt)?,
        })
    }
}

fn decode_connection(item: Item) -> Result<Connection, StoreError> {
    record_to_connection(from_item(item).map_err(corrupt)?)
}

/// The connection an item of the table's stream holds; `None` for other kinds of item (and
/// for an empty image).
pub fn connection_from_image(item: serde_dynamo::Item) -> Result<Option<Connection>, StoreError> {
    let is_connection = matches!(
        item.inner().get("sk"),
        Some(serde_dynamo::AttributeValue::S(sk)) if sk.starts_with(CONNECTION_SK_PREFIX)
    );
    if !is_connection {
        return Ok(None);
    }
    record_to_connection(serde_dynamo::from_item(item).map_err(corrupt)?).map(Some)
}

/// A connection as the table's stream shows it (for tests of what reads the stream).
#[cfg(test)]
pub(crate) fn image_of(connection: &Connection) -> serde_dynamo::Item {
    serde_dynamo::to_item(ConnectionRecord::from(connection)).expect("a connection serializes")
}

fn record_to_connection(r: ConnectionRecord) -> Result<Connection, StoreError> {
    let user_id =
        r.pk.strip_prefix("USER#")
            .and_then(UserId::parse)
            .ok_or_else(|| corrupt("connection pk"))?;
    let id =
        r.sk.strip_prefix(CONNECTION_SK_PREFIX)
            .ok_or_else(|| corrupt("connection sk"))?
            .to_owned();
    Ok(Connection {
        id,
        user_id,
        account_name: r.account_name,
        klaviyo_account_id: r.klaviyo_account_id,
        klaviyo_account_name: r.klaviyo_account_name,
        auth_type: r.auth_type,
        status: r.status,
        scopes: r.scopes,
        connected_at: r.connected_at,
        updated_at: r.updated_at,
        last_refreshed_at: r.last_refreshed_at,
        access_token_expires_at: r.access_token_expires_at,
        refresh_due_at: r
            .due_at
            .map(OffsetDateTime::from_unix_timestamp)
            .transpose()
            .map_err(corrupt)?,
        refresh_failures: r.refresh_failures,
        authorized_at: r.authorized_at.unwrap_or(r.connected_at),
        status_reason: r.status_reason,
        degraded: r.degraded,
        last_verified_at: r.last_verified_at,
        last_used_at: r.last_used_at,
        credentials: SealedBlob::from_bytes(r.credentials),
        version: r.version,
    })
}

/// Builds `SET a = :a, … REMOVE x, …` for every attribute of a record except the key and
/// `version` (which each caller sets its own way).
struct UpdateBuilder {
    sets: Vec<String>,
    removes: Vec<String>,
    names: HashMap<String, String>,
    values: Item,
}

impl UpdateBuilder {
    fn new(record: &ConnectionRecord) -> Result<Self, StoreError> {
        let item = to_item(record).map_err(corrupt)?;
        let mut builder = Self {
            sets: Vec::new(),
            removes: Vec::new(),
            names: HashMap::new(),
            values: HashMap::new(),
        };
        let mut attributes: Vec<(String, AttributeValue)> = item
            .into_iter()
            .filter(|(name, _)| !matches!(name.as_str(), "pk" | "sk" | "version"))
            .collect();
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, value) in attributes {
            builder.names.insert(format!("#{name}"), name.clone());
            builder.values.insert(format!(":{name}"), value);
            builder.sets.push(format!("#{name} = :{name}"));
        }
        for name in OPTIONAL_CONNECTION_ATTRIBUTES {
            if let Entry::Vacant(slot) = builder.names.entry(format!("#{name}")) {
                builder.removes.push(slot.key().clone());
                slot.insert(name.to_owned());
            }
        }
        Ok(builder)
    }

    /// Keeps the stored value of `name` if there is one.
    fn set_if_not_exists(&mut self, name: &str) {
        let plain = format!("#{name} = :{name}");
        if let Some(set) = self.sets.iter_mut().find(|s| **s == plain) {
            *set = format!("#{name} = if_not_exists(#{name}, :{name})");
        }
    }

    fn finish(mut self, version_assignment: &str) -> (String, HashMap<String, String>, Item) {
        self.sets.push(version_assignment.to_owned());
        let mut expression = format!("SET {}", self.sets.join(", "));
        if !self.removes.is_empty() {
            expression.push_str(&format!(" REMOVE {}", self.removes.join(", ")));
        }
        (expression, self.names, self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_connection_is_stored_as_a_pending_revocation_and_read_back_whole() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let connection = Connection {
            credentials: SealedBlob::from_bytes(vec![2, 0, 1, 7, 7]),
            version: 0,
            last_verified_at: Some(now),
            ..crate::model::sample_connection(now)
        };
        let (parked, _handle) = ParkedConnection::new(connection, now);
        let item = to_item(ParkedRecord::from(&parked)).unwrap();
        assert!(matches!(
            item.get("credentials"),
            Some(AttributeValue::B(_))
        ));
        assert_eq!(
            item["pk"].as_s().unwrap(),
            &format!("REVOKE#{}", parked.handle_hash)
        );
        let read: ParkedConnection = from_item::<ParkedRecord>(item.clone())
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(read, parked);
        // The refresh job's pending-revocation pass reads the same item as a revocation.
        let revocation: PendingRevocation = from_item::<RevocationRecord>(item)
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(revocation, parked.revocation());
    }

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
