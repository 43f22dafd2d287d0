//! DynamoDB access against the local DynamoDB, through the real SDK.

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::{environment, setting, unique};
use shared::adapters::store::{DUE_INDEX, refresh_bucket};
use shared::{
    AuthType, Connection, ConnectionStatus, PendingAuthorization, SealedBlob, Secret, StoreError,
    UserId,
};
use time::{Duration, OffsetDateTime};

fn pending(state: &str, user: &UserId, expires_in: Duration) -> PendingAuthorization {
    let now = OffsetDateTime::now_utc();
    PendingAuthorization {
        state_hash: PendingAuthorization::hash_state(state),
        user_id: user.clone(),
        account_name: "Main store".into(),
        code_verifier: Secret::new("v".repeat(64)),
        created_at: now,
        expires_at: now + expires_in,
    }
}

fn connection(user: &UserId, klaviyo_account: &str, auth_type: AuthType) -> Connection {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let expires = now + Duration::hours(1);
    let oauth = auth_type == AuthType::OAuth;
    Connection {
        id: Connection::id_for(user, klaviyo_account),
        user_id: user.clone(),
        account_name: "Main store".into(),
        klaviyo_account_id: klaviyo_account.into(),
        klaviyo_account_name: "Acme Inc".into(),
        auth_type,
        status: ConnectionStatus::Active,
        scopes: vec!["accounts:read".into(), "lists:read".into()],
        connected_at: now,
        updated_at: now,
        last_refreshed_at: None,
        access_token_expires_at: oauth.then_some(expires),
        refresh_due_at: oauth.then_some(expires - Duration::minutes(15)),
        refresh_failures: 0,
        authorized_at: now,
        status_reason: None,
        degraded: false,
        last_verified_at: None,
        last_used_at: None,
        credentials: SealedBlob::from_bytes(vec![1, 0, 1, 42]),
        version: 0,
    }
}

fn user() -> UserId {
    UserId::parse(&unique("user")).unwrap()
}

#[tokio::test]
async fn a_pending_authorization_is_consumed_exactly_once() {
    let store = environment().await.store();
    let user = user();
    let state = unique("state");
    store
        .put_pending(&pending(&state, &user, Duration::minutes(10)))
        .await
        .unwrap();

    let now = OffsetDateTime::now_utc();
    let consumed = store.consume_pending(&state, now).await.unwrap();
    assert_eq!(consumed.user_id, user);
    assert_eq!(consumed.account_name, "Main store");
    assert_eq!(consumed.code_verifier.expose(), "v".repeat(64));

    assert!(matches!(
        store.consume_pending(&state, now).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn expired_and_unknown_states_are_refused() {
    let store = environment().await.store();
    let state = unique("state");
    // TTL deletes only eventually, so an expired item can still be in the table.
    store
        .put_pending(&pending(&state, &user(), Duration::seconds(-1)))
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    assert!(matches!(
        store.consume_pending(&state, now).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.consume_pending(&unique("never-issued"), now).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn only_one_of_many_concurrent_consumes_wins() {
    let store = environment().await.store();
    let state = unique("state");
    store
        .put_pending(&pending(&state, &user(), Duration::minutes(10)))
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let attempts =
        futures::future::join_all((0..8).map(|_| store.consume_pending(&state, now))).await;
    assert_eq!(attempts.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        attempts
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::NotFound))
    );
}

#[tokio::test]
async fn the_table_stores_the_state_hash_not_the_state() {
    let env = environment().await;
    let state = unique("state");
    env.store()
        .put_pending(&pending(&state, &user(), Duration::minutes(10)))
        .await
        .unwrap();
    let raw = raw_client().await;
    let item = raw
        .get_item()
        .table_name(setting("TABLE_NAME"))
        .key(
            "pk",
            AttributeValue::S(format!(
                "STATE#{}",
                PendingAuthorization::hash_state(&state)
            )),
        )
        .key("sk", AttributeValue::S("STATE".into()))
        .send()
        .await
        .unwrap()
        .item
        .expect("stored under the hash");
    assert!(!format!("{item:?}").contains(&state));
    assert!(item.contains_key("expires_at"), "TTL attribute set");
}

async fn raw_client() -> aws_sdk_dynamodb::Client {
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_dynamodb::Client::new(&sdk)
}

#[tokio::test]
async fn connecting_the_same_klaviyo_account_again_updates_instead_of_duplicating() {
    let store = environment().await.store();
    let user = user();
    let first = connection(&user, "KLAV-A", AuthType::OAuth);
    let created = store.upsert_connection(&first).await.unwrap();
    assert!(created.previous.is_none());
    assert_eq!(created.connection.version, 1);

    let mut again = connection(&user, "KLAV-A", AuthType::ApiKey);
    again.connected_at = first.connected_at + Duration::hours(2);
    again.account_name = "Renamed".into();
    again.credentials = SealedBlob::from_bytes(vec![1, 0, 1, 43]);
    let updated = store.upsert_connection(&again).await.unwrap();
    let previous = updated.previous.expect("returns what it replaced");
    assert_eq!(previous.auth_type, AuthType::OAuth);
    assert_eq!(previous.credentials.as_bytes(), &[1, 0, 1, 42]);
    assert_eq!(updated.connection.version, 2);
    assert_eq!(
        updated.connection.connected_at, first.connected_at,
        "first connect time kept"
    );

    let listed = store.list_connections(&user).await.unwrap();
    assert_eq!(listed.len(), 1, "one connection per Klaviyo account");
    let stored = &listed[0];
    assert_eq!(stored.id, first.id);
    assert_eq!(stored.account_name, "Renamed");
    assert_eq!(stored.auth_type, AuthType::ApiKey);
    assert_eq!(stored.connected_at, first.connected_at);
    assert_eq!(stored.version, 2);
    assert_eq!(
        stored.access_token_expires_at, None,
        "API keys do not expire"
    );
    assert_eq!(stored.refresh_due_at, None, "API keys are never refreshed");
    assert_eq!(stored.credentials.as_bytes(), &[1, 0, 1, 43]);
}

#[tokio::test]
async fn lists_only_the_users_connections_newest_first() {
    let store = environment().await.store();
    let (alice, bob) = (user(), user());
    let mut older = connection(&alice, "KLAV-1", AuthType::OAuth);
    older.connected_at -= Duration::days(1);
    store.upsert_connection(&older).await.unwrap();
    store
        .upsert_connection(&connection(&alice, "KLAV-2", AuthType::ApiKey))
        .await
        .unwrap();
    store
        .upsert_connection(&connection(&bob, "KLAV-1", AuthType::OAuth))
        .await
        .unwrap();

    let listed = store.list_connections(&alice).await.unwrap();
    let accounts: Vec<_> = listed
        .iter()
        .map(|c| c.klaviyo_account_id.as_str())
        .collect();
    assert_eq!(accounts, ["KLAV-2", "KLAV-1"]);
    assert!(listed.iter().all(|c| c.user_id == alice));
    assert_eq!(store.list_connections(&bob).await.unwrap().len(), 1);
    assert!(store.list_connections(&user()).await.unwrap().is_empty());
    assert_ne!(
        Connection::id_for(&alice, "KLAV-1"),
        Connection::id_for(&bob, "KLAV-1"),
        "same Klaviyo account, different users: different connections"
    );
}

#[tokio::test]
async fn a_write_based_on_a_stale_version_is_refused() {
    let store = environment().await.store();
    let user = user();
    let stored = store
        .upsert_connection(&connection(&user, "KLAV-V", AuthType::OAuth))
        .await
        .unwrap()
        .connection;

    let mut refreshed = stored.clone();
    refreshed.credentials = SealedBlob::from_bytes(vec![1, 0, 1, 7]);
    refreshed.last_refreshed_at = Some(OffsetDateTime::now_utc().replace_nanosecond(0).unwrap());
    let written = store
        .update_connection_if_version(&refreshed, stored.version)
        .await
        .unwrap();
    assert_eq!(written.version, stored.version + 1);

    // A second writer that read the same version loses.
    let mut late = stored.clone();
    late.credentials = SealedBlob::from_bytes(vec![1, 0, 1, 8]);
    assert!(matches!(
        store
            .update_connection_if_version(&late, stored.version)
            .await,
        Err(StoreError::Conflict)
    ));
    let current = store.get_connection(&user, &stored.id).await.unwrap();
    assert_eq!(
        current.credentials.as_bytes(),
        &[1, 0, 1, 7],
        "the winner's write stands"
    );
    assert_eq!(current.version, stored.version + 1);
    assert_eq!(current.last_refreshed_at, refreshed.last_refreshed_at);

    // A conditional write never resurrects a connection that is gone.
    let mut ghost = connection(&user, "KLAV-GONE", AuthType::OAuth);
    ghost.version = 1;
    assert!(matches!(
        store.update_connection_if_version(&ghost, 1).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.get_connection(&user, &ghost.id).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn active_oauth_connections_are_on_the_due_index_and_api_keys_are_not() {
    let store = environment().await.store();
    let user = user();
    let oauth = connection(&user, "KLAV-DUE", AuthType::OAuth);
    let api_key = connection(&user, "KLAV-KEY", AuthType::ApiKey);
    store.upsert_connection(&oauth).await.unwrap();
    store.upsert_connection(&api_key).await.unwrap();

    let due_at = oauth.refresh_due_at.unwrap().unix_timestamp();
    let due = |bucket: String| async move {
        raw_client()
            .await
            .query()
            .table_name(setting("TABLE_NAME"))
            .index_name(DUE_INDEX)
            .key_condition_expression("due_bucket = :b AND due_at <= :t")
            .expression_attribute_values(":b", AttributeValue::S(bucket))
            .expression_attribute_values(":t", AttributeValue::N(due_at.to_string()))
            .send()
            .await
            .unwrap()
            .items
            .unwrap_or_default()
    };
    let sk = |c: &Connection| AttributeValue::S(format!("CONN#{}", c.id));
    assert!(
        due(refresh_bucket(&oauth.id))
            .await
            .iter()
            .any(|i| i.get("sk") == Some(&sk(&oauth)))
    );
    assert!(
        !due(refresh_bucket(&api_key.id))
            .await
            .iter()
            .any(|i| i.get("sk") == Some(&sk(&api_key)))
    );

    // Marking it needs_reauth takes it off the index.
    let stored = store.get_connection(&user, &oauth.id).await.unwrap();
    let mut reauth = stored.clone();
    reauth.status = ConnectionStatus::NeedsReauth;
    reauth.refresh_due_at = None;
    store
        .update_connection_if_version(&reauth, stored.version)
        .await
        .unwrap();
    assert!(
        !due(refresh_bucket(&oauth.id))
            .await
            .iter()
            .any(|i| i.get("sk") == Some(&sk(&oauth)))
    );
}
