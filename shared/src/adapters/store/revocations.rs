//! Pending revocations: a refresh token that left its connection, kept (sealed) until it is
//! revoked at Klaviyo, due on the `due-index` for the refresh job's pass.

use super::*;

impl Store {
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

#[derive(Serialize, Deserialize)]
pub(super) struct RevocationRecord {
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
