//! Pending authorizations (an OAuth flow between connect and callback, under the state's
//! hash) and parked connections (an OAuth result between callback and completion, stored as
//! a pending revocation so the refresh job revokes it unless a completion takes it first).

use super::revocations::RevocationRecord;
use super::*;

/// A parked connection one completion request holds (`Store::claim_parked`): only that
/// request's transaction may turn it into a connection.
#[derive(Debug, Clone)]
pub struct Claim {
    pub handle_hash: String,
    pub owner: String,
}

impl Store {
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
                .map(|at| at - crate::domain::model::REFRESH_LEAD),
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
            ..crate::domain::model::sample_connection(now)
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
}
