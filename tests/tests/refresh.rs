//! The scheduled refresh against moto and the Klaviyo sandbox. The job runs in this process
//! (the same library the `refresh` function runs) so that two runs can overlap for real;
//! one test goes through the function over the local Lambda invoke API.
//!
//! Tests run in parallel and any run refreshes every due connection, so assertions are on
//! each test's own connections' end state (and on what the sandbox received for them),
//! never on another run's counts.

use e2e::{
    accounts_of, connect_api_key, connect_due, connect_klaviyo, connected_id, environment, http,
    inject_fault, invoke_refresh, klaviyo_account, refresh_grants, refresh_job, refresh_tokens,
    register_api_key, sandbox_url, token_for, unique,
};
use serde_json::json;
use shared::refresh::{AccessTokenError, AccessTokens, KlaviyoCredential};
use shared::store::ConnectionKey;
use shared::{Connection, ConnectionStatus, Credentials, Secret, UserId};
use time::{Duration, OffsetDateTime};

async fn stored(user: &str, id: &str) -> Connection {
    environment()
        .await
        .store()
        .get_connection(&UserId::parse(user).unwrap(), id)
        .await
        .expect("connection stored")
}

async fn tokens_of(connection: &Connection) -> (String, String) {
    match Credentials::open(&environment().await.sealer(), connection)
        .await
        .unwrap()
    {
        Credentials::OAuth {
            access_token,
            refresh_token,
        } => (
            access_token.expose().to_owned(),
            refresh_token.expose().to_owned(),
        ),
        Credentials::ApiKey(_) => panic!("OAuth expected"),
    }
}

/// Makes a connection due now, as if time had passed.
async fn make_due(user: &str, id: &str) {
    let store = environment().await.store();
    let mut connection = stored(user, id).await;
    connection.refresh_due_at = Some(OffsetDateTime::now_utc() - Duration::seconds(1));
    let version = connection.version;
    store
        .update_connection_if_version(&connection, version)
        .await
        .unwrap();
}

#[tokio::test]
async fn due_connections_are_refreshed_and_others_left_alone() {
    let user = unique("user");
    let token = token_for(&user).await;
    let (due_account, fresh_account) = (klaviyo_account(), klaviyo_account());
    let due_id = connect_due(&token, &due_account).await;
    connect_klaviyo(&token, &fresh_account, None).await;
    let before = stored(&user, &due_id).await;
    let (_, old_refresh) = tokens_of(&before).await;

    refresh_job().await.run(None).await;

    let after = stored(&user, &due_id).await;
    assert_eq!(refresh_grants(&due_account).await, 1);
    assert_eq!(after.version, before.version + 1);
    assert_eq!(after.status, ConnectionStatus::Active);
    assert!(after.last_refreshed_at.is_some());
    let lifetime = after.access_token_expires_at.unwrap() - OffsetDateTime::now_utc();
    assert!(
        lifetime > Duration::minutes(55),
        "the new token's expires_in: {lifetime}"
    );
    assert_eq!(
        after.refresh_due_at,
        Some(after.access_token_expires_at.unwrap() - Duration::minutes(15))
    );
    let (_, new_refresh) = tokens_of(&after).await;
    assert_ne!(new_refresh, old_refresh, "rotated");
    assert_eq!(
        refresh_tokens(&due_account, "active").await,
        vec![new_refresh]
    );
    assert_eq!(
        refresh_tokens(&due_account, "rotated").await,
        vec![old_refresh]
    );

    assert_eq!(
        refresh_grants(&fresh_account).await,
        0,
        "not due: Klaviyo not called"
    );
    let listed = accounts_of(&token).await;
    let refreshed = listed.iter().find(|a| a["id"] == due_id.as_str()).unwrap();
    assert!(refreshed["lastRefreshedAt"].is_string());
}

#[tokio::test]
async fn several_rotations_in_a_row_keep_exactly_the_latest_token() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    let job = refresh_job().await;
    let mut seen = vec![tokens_of(&stored(&user, &id).await).await.1];
    for round in 1..=3 {
        if round > 1 {
            make_due(&user, &id).await;
        }
        job.run(None).await;
        let (_, current) = tokens_of(&stored(&user, &id).await).await;
        assert!(
            !seen.contains(&current),
            "round {round}: a new refresh token"
        );
        seen.push(current);
    }
    assert_eq!(
        refresh_grants(&account).await,
        3,
        "one refresh per time it was due"
    );
    let latest = seen.last().unwrap().clone();
    assert_eq!(
        refresh_tokens(&account, "active").await,
        vec![latest.clone()]
    );

    // Klaviyo now refuses every earlier refresh token.
    let klaviyo = environment().await.klaviyo().await.unwrap();
    for old in &seen[..seen.len() - 1] {
        let refused = klaviyo
            .refresh(&Secret::new(old.clone()))
            .await
            .unwrap_err();
        assert!(refused.is_invalid_grant(), "{refused}");
    }
    // And the stored connection still works.
    let (access, _) = tokens_of(&stored(&user, &id).await).await;
    let account_seen = klaviyo
        .account(shared::klaviyo::ApiCredential::AccessToken(&Secret::new(
            access,
        )))
        .await
        .unwrap();
    assert_eq!(account_seen.id, account);
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_needs_reauth_and_klaviyo_is_not_called_again() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    // The user removed the app in Klaviyo.
    let removed = http()
        .post(format!(
            "{}/sandbox/accounts/{account}/revoke-all",
            sandbox_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);

    let job = refresh_job().await;
    job.run(None).await;
    let connection = stored(&user, &id).await;
    assert_eq!(connection.status, ConnectionStatus::NeedsReauth);
    assert_eq!(connection.refresh_due_at, None, "off the refresh schedule");
    let listed = accounts_of(&token).await;
    assert_eq!(listed[0]["status"], "needs_reauth");
    let attempts = refresh_grants(&account).await;
    assert_eq!(attempts, 1);

    job.run(None).await;
    assert_eq!(
        refresh_grants(&account).await,
        attempts,
        "never called again"
    );

    // Reconnecting makes it active again.
    connect_klaviyo(&token, &account, None).await;
    assert_eq!(stored(&user, &id).await.status, ConnectionStatus::Active);
}

#[tokio::test]
async fn transient_failures_keep_the_tokens_and_back_off() {
    let user = unique("user");
    let token = token_for(&user).await;
    let cases = [
        (json!({"kind": "rate_limit", "retry_after": 600}), 590, 610),
        (json!({"kind": "status", "status": 503}), 50, 70),
        (json!({"kind": "status", "status": 500}), 50, 70),
        (json!({"kind": "timeout"}), 50, 70),
        (json!({"kind": "malformed"}), 50, 70),
    ];
    let mut accounts = Vec::new();
    for (fault, _, _) in &cases {
        let account = klaviyo_account();
        let id = connect_due(&token, &account).await;
        let mut fault = fault.clone();
        fault["endpoint"] = json!("token");
        fault["account"] = json!(account);
        inject_fault(fault).await;
        accounts.push((account, id.clone(), stored(&user, &id).await));
    }

    let ran_at = OffsetDateTime::now_utc();
    refresh_job().await.run(None).await;

    for ((account, id, before), (fault, min_delay, max_delay)) in accounts.iter().zip(cases) {
        let after = stored(&user, id).await;
        assert_eq!(after.status, ConnectionStatus::Active, "{fault}");
        assert_eq!(
            after.credentials, before.credentials,
            "{fault}: tokens kept"
        );
        assert_eq!(after.refresh_failures, 1, "{fault}");
        let delay = after.refresh_due_at.unwrap() - ran_at;
        assert!(
            delay >= Duration::seconds(min_delay) && delay <= Duration::seconds(max_delay + 15),
            "{fault}: retried after {delay}"
        );
        assert_eq!(
            refresh_tokens(account, "active").await.len(),
            1,
            "{fault}: the grant is intact"
        );
        assert!(refresh_grants(account).await >= 1, "{fault}");
    }
}

#[tokio::test]
async fn two_concurrent_runs_refresh_each_connection_exactly_once() {
    let user = unique("user");
    let token = token_for(&user).await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        let account = klaviyo_account();
        let id = connect_due(&token, &account).await;
        accounts.push((account, id));
    }
    let (first, second) = (refresh_job().await, refresh_job().await);
    let (a, b) = tokio::join!(first.run(None), second.run(None));
    assert!(a.selected + b.selected >= 6, "{a:?} {b:?}");

    for (account, id) in &accounts {
        assert_eq!(
            refresh_grants(account).await,
            1,
            "{account}: refreshed once"
        );
        let (_, stored_refresh) = tokens_of(&stored(&user, id).await).await;
        assert_eq!(
            refresh_tokens(account, "active").await,
            vec![stored_refresh],
            "{account}"
        );
    }
}

#[tokio::test]
async fn a_worker_that_crashed_holding_the_lease_delays_the_refresh_only_until_the_lease_expires() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    let store = environment().await.store();
    let key = ConnectionKey {
        user_id: UserId::parse(&user).unwrap(),
        connection_id: id.clone(),
    };
    // A worker takes the lease and dies before calling Klaviyo.
    let now = OffsetDateTime::now_utc();
    store
        .take_refresh_lease(&key, "crashed-worker", now, now + Duration::seconds(60))
        .await
        .unwrap();

    let job = refresh_job().await;
    job.run(None).await;
    assert_eq!(refresh_grants(&account).await, 0, "the lease is respected");
    let held = stored(&user, &id).await;
    assert_eq!(held.status, ConnectionStatus::Active, "still usable");
    assert!(
        held.refresh_due_at.unwrap() <= OffsetDateTime::now_utc(),
        "still due"
    );

    // Time passes: the lease expires (simulated by rewriting its expiry into the past).
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(e2e::setting("TABLE_NAME"))
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("USER#{user}")),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("CONN#{id}")),
        )
        .update_expression("SET lease_until = :past")
        .expression_attribute_values(
            ":past",
            aws_sdk_dynamodb::types::AttributeValue::N((now.unix_timestamp() - 1).to_string()),
        )
        .send()
        .await
        .unwrap();
    job.run(None).await;
    assert_eq!(refresh_grants(&account).await, 1);
    assert!(stored(&user, &id).await.last_refreshed_at.is_some());
}

#[tokio::test]
async fn the_function_runs_on_its_schedule_event_and_returns_its_summary() {
    let summary = invoke_refresh().await;
    for field in [
        "selected",
        "refreshed",
        "needs_reauth",
        "failed",
        "skipped_locked",
        "revocations_finished",
        "duration_ms",
    ] {
        assert!(summary[field].is_u64(), "{field} in {summary}");
    }
}

#[tokio::test]
async fn access_tokens_are_handed_out_fresh_and_refreshed_just_in_time() {
    let env = environment().await;
    let tokens = AccessTokens::new(&env, env.klaviyo().await.unwrap());
    let user = unique("user");
    let user_id = UserId::parse(&user).unwrap();
    let token = token_for(&user).await;

    // A fresh token is handed out as stored, without calling Klaviyo.
    let fresh_account = klaviyo_account();
    let fresh_id = connected_id(&token, &fresh_account).await;
    let handed = tokens.for_connection(&user_id, &fresh_id).await.unwrap();
    let (stored_access, _) = tokens_of(&stored(&user, &fresh_id).await).await;
    assert_eq!(
        handed,
        KlaviyoCredential::AccessToken(Secret::new(stored_access))
    );
    assert_eq!(refresh_grants(&fresh_account).await, 0);

    // One about to expire is refreshed first, and Klaviyo accepts the new one.
    let expiring_account = klaviyo_account();
    let expiring_id = connect_due(&token, &expiring_account).await;
    let handed = tokens.for_connection(&user_id, &expiring_id).await.unwrap();
    assert!(refresh_grants(&expiring_account).await >= 1);
    let KlaviyoCredential::AccessToken(access) = &handed else {
        panic!("bearer expected")
    };
    let (stored_access, _) = tokens_of(&stored(&user, &expiring_id).await).await;
    assert_eq!(access.expose(), stored_access);
    assert!(
        handed
            .authorization()
            .expose()
            .starts_with("Bearer sbx-at-")
    );
    let account = env
        .klaviyo()
        .await
        .unwrap()
        .account(shared::klaviyo::ApiCredential::AccessToken(access))
        .await
        .unwrap();
    assert_eq!(account.id, expiring_account);

    // API keys are handed out as keys; unknown and needs_reauth connections are errors.
    let key_account = klaviyo_account();
    let key = register_api_key(&key_account).await;
    let (_, body) = connect_api_key(&token, &json!({"apiKey": key})).await;
    let key_id = body["account"]["id"].as_str().unwrap();
    assert_eq!(
        tokens.for_connection(&user_id, key_id).await.unwrap(),
        KlaviyoCredential::ApiKey(Secret::new(key))
    );
    assert!(matches!(
        tokens
            .for_connection(&user_id, &uuid::Uuid::new_v4().to_string())
            .await,
        Err(AccessTokenError::NotFound)
    ));
    let store = env.store();
    let mut gone = stored(&user, &fresh_id).await;
    gone.status = ConnectionStatus::NeedsReauth;
    gone.refresh_due_at = None;
    let version = gone.version;
    store
        .update_connection_if_version(&gone, version)
        .await
        .unwrap();
    assert!(matches!(
        tokens.for_connection(&user_id, &fresh_id).await,
        Err(AccessTokenError::NeedsReauth)
    ));
}
