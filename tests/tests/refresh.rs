//! The scheduled refresh against moto and the Klaviyo sandbox. The job runs in this process
//! (the same library the `refresh` function runs) so that two runs can overlap for real;
//! one test goes through the function over the local Lambda invoke API.
//!
//! Tests run in parallel and any run refreshes every due connection. So each test makes its
//! connections due only once everything else is in place (faults injected, grants revoked,
//! leases taken), and waits for the end state rather than assuming its own run got there
//! first: another run may hold the lease and still be finishing.

use e2e::{
    accounts_of, connect_api_key, connect_klaviyo, connected_id, environment, http, inject_fault,
    invoke_refresh, klaviyo_account, minutes_from_now, refresh_grants, refresh_job, refresh_tokens,
    register_api_key, rewrite, sandbox_url, stored, token_for, unique,
};
use serde_json::json;
use shared::use_cases::refresh::{AccessTokenError, AccessTokens, KlaviyoCredential};
use shared::{Connection, ConnectionStatus, Credentials, Secret, UserId};
use time::{Duration, OffsetDateTime};

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

/// Makes a connection due now, as if time had passed: its access token expires in a minute.
async fn make_due(user: &str, id: &str) {
    rewrite(user, id, |c| {
        c.access_token_expires_at = Some(minutes_from_now(1));
        c.refresh_due_at = Some(minutes_from_now(0) - Duration::seconds(1));
    })
    .await;
}

/// Waits (up to 20 s) until `check` holds for the stored connection, and returns it.
async fn eventually(
    user: &str,
    id: &str,
    what: &str,
    check: impl Fn(&Connection) -> bool,
) -> Connection {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let connection = stored(user, id).await;
        if check(&connection) {
            return connection;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {connection:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn due_connections_are_refreshed_and_others_left_alone() {
    let user = unique("user");
    let token = token_for(&user).await;
    let (due_account, fresh_account) = (klaviyo_account(), klaviyo_account());
    let due_id = connected_id(&token, &due_account).await;
    let fresh_id = connected_id(&token, &fresh_account).await;
    make_due(&user, &due_id).await;
    let before = stored(&user, &due_id).await;
    let (_, old_refresh) = tokens_of(&before).await;

    refresh_job().await.run(None).await;

    let after = eventually(&user, &due_id, "refreshed", |c| c.version > before.version).await;
    assert_eq!(refresh_grants(&due_account).await, 1);
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
    assert_eq!(after.refresh_failures, 0);
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
    assert_eq!(stored(&user, &fresh_id).await.version, 1);
    let listed = accounts_of(&token).await;
    let refreshed = listed.iter().find(|a| a["id"] == due_id.as_str()).unwrap();
    assert!(refreshed["lastRefreshedAt"].is_string());
}

#[tokio::test]
async fn several_rotations_in_a_row_keep_exactly_the_latest_token() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let job = refresh_job().await;
    let mut seen = vec![tokens_of(&stored(&user, &id).await).await.1];
    for round in 1..=3 {
        make_due(&user, &id).await;
        let due_version = stored(&user, &id).await.version;
        job.run(None).await;
        let refreshed = eventually(&user, &id, "refreshed", |c| c.version > due_version).await;
        let (_, current) = tokens_of(&refreshed).await;
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
    assert_eq!(refresh_tokens(&account, "active").await, vec![latest]);

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
        .account(shared::adapters::klaviyo::ApiCredential::AccessToken(
            &Secret::new(access),
        ))
        .await
        .unwrap();
    assert_eq!(account_seen.id, account);
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_needs_reauth_and_klaviyo_is_not_called_again() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
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
    make_due(&user, &id).await;

    let job = refresh_job().await;
    job.run(None).await;
    let connection = eventually(&user, &id, "needs_reauth", |c| {
        c.status == ConnectionStatus::NeedsReauth
    })
    .await;
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
        let id = connected_id(&token, &account).await;
        let mut fault = fault.clone();
        fault["endpoint"] = json!("token");
        fault["account"] = json!(account);
        inject_fault(fault).await;
        accounts.push((account, id));
    }
    let ran_at = OffsetDateTime::now_utc();
    let mut befores = Vec::new();
    for (_, id) in &accounts {
        make_due(&user, id).await;
        befores.push(stored(&user, id).await);
    }

    refresh_job().await.run(None).await;

    for (((account, id), before), (fault, min_delay, max_delay)) in
        accounts.iter().zip(befores).zip(cases)
    {
        let after = eventually(&user, id, &fault.to_string(), |c| c.refresh_failures > 0).await;
        assert_eq!(after.status, ConnectionStatus::Active, "{fault}");
        assert_eq!(
            after.credentials, before.credentials,
            "{fault}: tokens kept"
        );
        assert_eq!(after.refresh_failures, 1, "{fault}");
        let delay = after.refresh_due_at.unwrap() - ran_at;
        assert!(
            delay >= Duration::seconds(min_delay) && delay <= Duration::seconds(max_delay + 30),
            "{fault}: retried after {delay}"
        );
        assert_eq!(
            refresh_tokens(account, "active").await.len(),
            1,
            "{fault}: the grant is intact"
        );
        assert_eq!(
            refresh_grants(account).await,
            1,
            "{fault}: one attempt, then backoff"
        );
    }
}

#[tokio::test]
async fn two_concurrent_runs_refresh_each_connection_exactly_once() {
    let user = unique("user");
    let token = token_for(&user).await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        let account = klaviyo_account();
        let id = connected_id(&token, &account).await;
        accounts.push((account, id));
    }
    for (_, id) in &accounts {
        make_due(&user, id).await;
    }
    let (first, second) = (refresh_job().await, refresh_job().await);
    tokio::join!(first.run(None), second.run(None));

    for (account, id) in &accounts {
        let refreshed = eventually(&user, id, "refreshed", |c| c.last_refreshed_at.is_some()).await;
        assert_eq!(
            refresh_grants(account).await,
            1,
            "{account}: refreshed once"
        );
        let (_, stored_refresh) = tokens_of(&refreshed).await;
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
    let id = connected_id(&token, &account).await;
    // A worker takes the lease of the due connection and dies before calling Klaviyo. (Due
    // and leased in one write, so no other run can slip in between.)
    let now = OffsetDateTime::now_utc();
    let sdk = shared::context::aws_sdk_config().await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let number = |n: i64| aws_sdk_dynamodb::types::AttributeValue::N(n.to_string());
    let item_key =
        |request: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder| {
            request
                .table_name(e2e::setting("TABLE_NAME"))
                .key(
                    "pk",
                    aws_sdk_dynamodb::types::AttributeValue::S(format!("USER#{user}")),
                )
                .key(
                    "sk",
                    aws_sdk_dynamodb::types::AttributeValue::S(format!("CONN#{id}")),
                )
        };
    item_key(dynamodb.update_item())
        .update_expression("SET due_at = :due, lease_owner = :owner, lease_until = :until")
        .condition_expression("attribute_not_exists(lease_until)")
        .expression_attribute_values(":due", number(now.unix_timestamp() - 1))
        .expression_attribute_values(
            ":owner",
            aws_sdk_dynamodb::types::AttributeValue::S("crashed-worker".into()),
        )
        .expression_attribute_values(":until", number(now.unix_timestamp() + 60))
        .send()
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
    item_key(dynamodb.update_item())
        .update_expression("SET lease_until = :past")
        .expression_attribute_values(":past", number(now.unix_timestamp() - 1))
        .send()
        .await
        .unwrap();
    job.run(None).await;
    eventually(&user, &id, "refreshed once the lease expired", |c| {
        c.last_refreshed_at.is_some()
    })
    .await;
    assert_eq!(refresh_grants(&account).await, 1);
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

    // One about to expire is refreshed first (here, or by a run that got there first), and
    // Klaviyo accepts the new one.
    let expiring_account = klaviyo_account();
    let expiring_id = connected_id(&token, &expiring_account).await;
    make_due(&user, &expiring_id).await;
    let handed = tokens.for_connection(&user_id, &expiring_id).await.unwrap();
    assert_eq!(refresh_grants(&expiring_account).await, 1);
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
        .account(shared::adapters::klaviyo::ApiCredential::AccessToken(
            access,
        ))
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
    rewrite(&user, &fresh_id, |c| {
        c.status = ConnectionStatus::NeedsReauth;
        c.refresh_due_at = None;
    })
    .await;
    assert!(matches!(
        tokens.for_connection(&user_id, &fresh_id).await,
        Err(AccessTokenError::NeedsReauth)
    ));
}

// ---- usage-aware refresh ---------------------------------------------------------------

/// Makes a connection authorised three days ago, last used `used_hours_ago` (if ever), and
/// due now, its access token expiring in `expires_in` minutes.
async fn idle_and_due(
    user: &str,
    id: &str,
    used_hours_ago: Option<i64>,
    expires_in: i64,
) -> Connection {
    rewrite(user, id, |c| {
        c.authorized_at = minutes_from_now(-3 * 24 * 60);
        c.last_used_at = used_hours_ago.map(|h| minutes_from_now(-h * 60));
        c.access_token_expires_at = Some(minutes_from_now(expires_in));
        c.refresh_due_at = Some(minutes_from_now(0) - Duration::seconds(1));
    })
    .await
}

#[tokio::test]
async fn connections_in_use_are_kept_fresh_and_idle_ones_get_a_keep_alive_a_day() {
    let user = unique("user");
    let token = token_for(&user).await;
    // Never used, used 25 hours ago (just outside the active window), used 2 hours ago.
    let cases = [(None, false), (Some(25), false), (Some(2), true)];
    let mut connections = Vec::new();
    for (used, _) in cases {
        let account = klaviyo_account();
        let id = connected_id(&token, &account).await;
        connections.push((account, id, used));
    }
    let mut befores = Vec::new();
    for (_, id, used) in &connections {
        befores.push(idle_and_due(&user, id, *used, 1).await);
    }
    let ran_at = OffsetDateTime::now_utc();

    refresh_job().await.run(None).await;

    for (((account, id, used), before), (_, in_use)) in connections.iter().zip(befores).zip(cases) {
        let after = eventually(&user, id, "refreshed", |c| c.version > before.version).await;
        assert_eq!(refresh_grants(account).await, 1, "used {used:?}: refreshed");
        let expires = after.access_token_expires_at.unwrap();
        let due = after.refresh_due_at.unwrap();
        if in_use {
            assert_eq!(due, expires - Duration::minutes(15), "used {used:?}");
        } else {
            // The keep-alive: the connection's own point of the day, within a day (the tests
            // in shared/src/domain/model.rs pin the point and the spread).
            let keep_alive =
                shared::RefreshPolicy::default().next_refresh(&before, expires, ran_at);
            assert_eq!(due, keep_alive, "used {used:?}: refreshed at {ran_at}");
            assert!(due <= ran_at + Duration::hours(24), "used {used:?}");
        }
        assert_eq!(
            after.last_used_at, before.last_used_at,
            "a refresh is no use"
        );
    }

    // Not due again: a second run leaves them all alone.
    refresh_job().await.run(None).await;
    for (account, _, used) in &connections {
        assert_eq!(refresh_grants(account).await, 1, "used {used:?}");
    }
}

/// `REFRESH_POLICY=eager`: idle connections are refreshed before they expire too. (Refreshed
/// under a lease this test takes itself: every other test's job run is usage-aware.)
#[tokio::test]
async fn the_eager_policy_keeps_idle_connections_fresh_too() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let key = shared::adapters::store::ConnectionKey {
        user_id: UserId::parse(&user).unwrap(),
        connection_id: id.clone(),
    };
    // Idle and not due, so that no other run takes it; then leased by this test.
    idle_and_due(&user, &id, None, 1).await;
    rewrite(&user, &id, |c| {
        c.refresh_due_at = Some(minutes_from_now(20 * 60))
    })
    .await;
    let mut env = environment().await;
    let now = OffsetDateTime::now_utc();
    let leased = env
        .store()
        .take_refresh_lease(&key, "eager-test", now, now + Duration::seconds(60))
        .await
        .unwrap();
    env.config.refresh_policy = shared::RefreshPolicy::Eager;
    let eager = shared::use_cases::refresh::Refresher::new(&env, env.klaviyo().await.unwrap());
    let (outcome, _) = eager.refresh_leased(leased, now, "eager-test").await;

    assert_eq!(outcome, shared::use_cases::refresh::Outcome::Refreshed);
    assert_eq!(refresh_grants(&account).await, 1);
    let after = stored(&user, &id).await;
    assert_eq!(
        after.refresh_due_at,
        Some(after.access_token_expires_at.unwrap() - Duration::minutes(15))
    );
}

/// An idle connection's token is expired most of the time and nobody calls with it: a failed
/// keep-alive backs off without a Degraded event. A connection in use is degraded.
#[tokio::test]
async fn a_failing_keep_alive_of_an_idle_connection_is_not_reported_degraded() {
    let user = unique("user");
    let token = token_for(&user).await;
    let mut connections = Vec::new();
    for used in [None, Some(1)] {
        let account = klaviyo_account();
        let id = connected_id(&token, &account).await;
        inject_fault(
            json!({"endpoint": "token", "account": account, "kind": "status", "status": 503}),
        )
        .await;
        connections.push((id, used));
    }
    for (id, used) in &connections {
        idle_and_due(&user, id, *used, -120).await;
    }

    refresh_job().await.run(None).await;

    for (id, used) in &connections {
        let after = eventually(&user, id, "backed off", |c| c.refresh_failures > 0).await;
        assert_eq!(after.refresh_failures, 1);
        assert_eq!(after.degraded, used.is_some(), "used {used:?}");
    }
}
