//! Connections: one item per connected Klaviyo account under its user's partition (`USER#`,
//! `CONN#`), with its sealed credentials, status, version (optimistic concurrency), refresh
//! schedule on the `due-index` and the refresh lease.

use super::revocations::RevocationRecord;
use super::*;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use std::collections::hash_map::Entry;

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

impl Store {
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

    /// Takes the refresh lease of an active connection (an OAuth refresh, or the check of an API
    /// key): a conditional write that succeeds only if no unexpired lease is held, so two workers
    /// never refresh or check one connection at once. Returns the connection as stored now (the
    /// re-read). `Conflict` when leased by another worker or no longer eligible.
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
