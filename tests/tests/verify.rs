//! "Test connection" (`POST /api/oauth/accounts/{id}/verify`) and the refresh job's daily
//! check of API keys, through the running functions, moto and the Klaviyo sandbox: what
//! Klaviyo received, what was stored, what the user is told.

use e2e::{
    accounts_of, connect_api_key, connect_due, connected_id, due_now, http, invoke_refresh,
    klaviyo_account, raw_item, received, refresh_grants, register_api_key, remove_app,
    revoke_api_key, sandbox_url, stored, time_of, token_for, unique, verify,
};
use serde_json::{Value, json};
use shared::domain::model::{KEY_CHECK_INTERVAL, KEY_CHECK_MIN_GAP, StatusReason, key_check_due};
use shared::{ConnectionStatus, Credentials};
use time::OffsetDateTime;

/// Tests here that run the refresh job take turns: a run takes every due connection, other
/// tests' included.
static REFRESH_RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `Authorization` headers of the accounts calls the sandbox received for `account`.
async fn accounts_calls(account: &str) -> Vec<String> {
    received(account, "accounts")
        .await
        .iter()
        .map(|r| {
            r["headers"]["authorization"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Connects `account` by a fresh private key; returns the connection's id and the key.
async fn connect_by_key(token: &str, account: &str) -> (String, String) {
    let key = register_api_key(account).await;
    let (status, body) = connect_api_key(token, &json!({"apiKey": key})).await;
    assert_eq!(status, 201, "{body}");
    (body["account"]["id"].as_str().unwrap().to_owned(), key)
}

async fn rename_organization(account: &str, name: &str) {
    let response = http()
        .put(format!("{}/sandbox/accounts/{account}", sandbox_url()))
        .json(&json!({"organization_name": name, "access_token_ttl_secs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

fn account_of(body: &Value) -> &Value {
    assert_eq!(body["success"], true, "{body}");
    &body["account"]
}

#[tokio::test]
async fn a_test_asks_klaviyo_with_the_stored_token_and_records_the_answer() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let before = accounts_of(&token).await[0].clone();
    let calls = accounts_calls(&account).await.len();
    rename_organization(&account, "Renamed in Klaviyo").await;

    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 200, "{body}");
    let tested = account_of(&body);
    assert_eq!(tested["status"], "active");
    assert_eq!(tested["id"], id.as_str());
    assert!(time_of(&tested["lastVerifiedAt"]) > time_of(&before["lastVerifiedAt"]));
    assert_eq!(tested["klaviyoAccountName"], "Renamed in Klaviyo");
    assert_eq!(
        tested["accessTokenExpiresAt"], before["accessTokenExpiresAt"],
        "no refresh"
    );
    assert!(tested.get("statusReason").is_none());

    // Klaviyo was asked once, with the stored access token.
    let stored_token = match Credentials::open(
        &e2e::environment().await.sealer(),
        &stored(&user, &id).await,
    )
    .await
    .unwrap()
    {
        Credentials::OAuth { access_token, .. } => access_token,
        other => panic!("OAuth tokens expected, got {other:?}"),
    };
    let calls_now = accounts_calls(&account).await;
    assert_eq!(calls_now.len(), calls + 1);
    assert_eq!(
        calls_now.last().unwrap(),
        &format!("Bearer {}", stored_token.expose())
    );
    assert_eq!(refresh_grants(&account).await, 0);
    // The list shows what the test recorded.
    assert_eq!(&accounts_of(&token).await[0], tested);
}

#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_before_the_test() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    let before = stored(&user, &id).await;

    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 200, "{body}");
    let tested = account_of(&body);
    assert_eq!(tested["status"], "active");
    assert_eq!(refresh_grants(&account).await, 1, "refreshed first");
    let after = stored(&user, &id).await;
    assert!(after.access_token_expires_at > before.access_token_expires_at);
    assert!(after.last_verified_at > before.last_verified_at);
    // Tested with the new token, not the one about to expire.
    let Credentials::OAuth { access_token, .. } =
        Credentials::open(&e2e::environment().await.sealer(), &after)
            .await
            .unwrap()
    else {
        panic!("OAuth tokens expected");
    };
    assert_eq!(
        accounts_calls(&account).await.last().unwrap(),
        &format!("Bearer {}", access_token.expose())
    );
    let item = raw_item(format!("USER#{user}"), &format!("CONN#{id}"))
        .await
        .unwrap();
    assert!(!item.contains_key("lease_owner"), "the lease is given back");
}

#[tokio::test]
async fn an_app_removed_in_klaviyo_is_found_by_the_test_and_klaviyo_is_not_asked_again() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    remove_app(&account).await;

    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 200, "{body}");
    let tested = account_of(&body);
    assert_eq!(tested["status"], "needs_reauth");
    assert_eq!(tested["statusReason"], "refresh_refused");
    // The refused access token was not the verdict: the refresh token was asked, and refused.
    assert_eq!(refresh_grants(&account).await, 1);
    let connection = stored(&user, &id).await;
    assert_eq!(connection.status, ConnectionStatus::NeedsReauth);
    assert_eq!(connection.status_reason, Some(StatusReason::RefreshRefused));
    assert_eq!(connection.refresh_due_at, None, "off the refresh schedule");

    // Testing again answers the same without calling Klaviyo.
    let (calls, grants) = (
        accounts_calls(&account).await.len(),
        refresh_grants(&account).await,
    );
    let (status, again) = verify(&token, &id).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(account_of(&again)["status"], "needs_reauth");
    assert_eq!(accounts_calls(&account).await.len(), calls);
    assert_eq!(refresh_grants(&account).await, grants);

    // Reconnecting makes it active again.
    let again_id = connected_id(&token, &account).await;
    assert_eq!(again_id, id);
    let (_, body) = verify(&token, &id).await;
    assert_eq!(account_of(&body)["status"], "active");
}

#[tokio::test]
async fn a_key_deleted_in_klaviyo_needs_reauth_with_its_reason() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let (id, key) = connect_by_key(&token, &account).await;
    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(account_of(&body)["status"], "active");
    assert_eq!(
        accounts_calls(&account).await.last().unwrap(),
        &format!("Klaviyo-API-Key {key}")
    );

    revoke_api_key(&key).await;
    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 200, "{body}");
    let tested = account_of(&body);
    assert_eq!(tested["status"], "needs_reauth");
    assert_eq!(tested["statusReason"], "api_key_refused");
    assert!(!body.to_string().contains(&key), "the key is never echoed");
    let connection = stored(&user, &id).await;
    assert_eq!(connection.status_reason, Some(StatusReason::ApiKeyRefused));
    assert_eq!(connection.refresh_due_at, None, "no more daily checks");

    // A new key for the same account makes it active again.
    let (again, _) = connect_by_key(&token, &account).await;
    assert_eq!(again, id);
    assert_eq!(accounts_of(&token).await[0]["status"], "active");
}

#[tokio::test]
async fn only_the_owner_can_test_a_connection() {
    let owner = token_for(&unique("user")).await;
    let id = connected_id(&owner, &klaviyo_account()).await;
    let stranger = token_for(&unique("user")).await;
    for (token, id) in [
        (stranger.as_str(), id.as_str()),
        (owner.as_str(), "not-a-uuid"),
        (owner.as_str(), &uuid::Uuid::new_v4().to_string()),
    ] {
        let (status, body) = verify(token, id).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (status, _) = verify("not.a.jwt", &id).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_refresh_job_checks_each_api_key_once_a_day_at_its_own_time() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let connected_at = OffsetDateTime::now_utc();
    let (id, key) = connect_by_key(&token, &account).await;
    let connection = stored(&user, &id).await;
    let due = connection
        .refresh_due_at
        .expect("scheduled for its daily check");
    assert_eq!(
        due,
        key_check_due(&id, due),
        "on the connection's time of day"
    );
    assert!(due >= connected_at + KEY_CHECK_MIN_GAP - time::Duration::seconds(1));
    assert!(due < connected_at + KEY_CHECK_MIN_GAP + KEY_CHECK_INTERVAL);

    // Due: the job asks Klaviyo with the key and schedules tomorrow's check.
    due_now(&user, &id).await;
    let calls = accounts_calls(&account).await.len();
    let summary = invoke_refresh().await;
    assert!(summary["keys_checked"].as_u64().unwrap() >= 1, "{summary}");
    let calls_now = accounts_calls(&account).await;
    assert_eq!(calls_now.len(), calls + 1);
    assert_eq!(calls_now.last().unwrap(), &format!("Klaviyo-API-Key {key}"));
    let checked = stored(&user, &id).await;
    assert_eq!(checked.status, ConnectionStatus::Active);
    assert!(checked.last_verified_at > connection.last_verified_at);
    let next = checked.refresh_due_at.unwrap();
    assert_eq!(next, key_check_due(&id, next));
    assert!(next > OffsetDateTime::now_utc() + KEY_CHECK_MIN_GAP - time::Duration::minutes(1));

    // Not due: another run leaves it alone.
    invoke_refresh().await;
    assert_eq!(accounts_calls(&account).await.len(), calls + 1);

    // Klaviyo down at check time: kept, retried with backoff.
    e2e::inject_fault(json!({"endpoint": "accounts", "kind": "status", "status": 503, "account": account, "times": 1})).await;
    due_now(&user, &id).await;
    invoke_refresh().await;
    let deferred = stored(&user, &id).await;
    assert_eq!(deferred.status, ConnectionStatus::Active);
    assert_eq!(deferred.refresh_failures, 1);
    let retry = deferred.refresh_due_at.unwrap() - OffsetDateTime::now_utc();
    assert!(retry <= time::Duration::minutes(2), "retried soon: {retry}");

    // The key deleted in Klaviyo: needs_reauth at the next check, and never checked again.
    revoke_api_key(&key).await;
    due_now(&user, &id).await;
    let summary = invoke_refresh().await;
    assert!(summary["needs_reauth"].as_u64().unwrap() >= 1, "{summary}");
    let refused = stored(&user, &id).await;
    assert_eq!(refused.status, ConnectionStatus::NeedsReauth);
    assert_eq!(refused.status_reason, Some(StatusReason::ApiKeyRefused));
    assert_eq!(refused.refresh_due_at, None);
    let calls = accounts_calls(&account).await.len();
    invoke_refresh().await;
    assert_eq!(accounts_calls(&account).await.len(), calls);
    let listed = &accounts_of(&token).await[0];
    assert_eq!(listed["statusReason"], "api_key_refused");
}

#[tokio::test]
async fn a_403_never_costs_the_user_the_connection() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let (id, _key) = connect_by_key(&token, &account).await;
    // A 403 can come from scopes or from whatever stands in front of Klaviyo: not a verdict.
    e2e::inject_fault(json!({"endpoint": "accounts", "kind": "status", "status": 403, "account": account, "times": 2})).await;

    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "klaviyo_unavailable");
    assert_eq!(stored(&user, &id).await.status, ConnectionStatus::Active);

    due_now(&user, &id).await;
    let summary = invoke_refresh().await;
    assert_eq!(summary["needs_reauth"], 0, "{summary}");
    let checked = stored(&user, &id).await;
    assert_eq!(checked.status, ConnectionStatus::Active);
    assert_eq!(checked.refresh_failures, 1, "retried with backoff");
}

#[tokio::test]
async fn while_refreshes_back_off_a_test_adds_no_refresh_of_its_own() {
    let _turn = REFRESH_RUNS.lock().await;
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    e2e::inject_fault(
        json!({"endpoint": "token", "kind": "status", "status": 503, "account": account}),
    )
    .await;

    // The token is about to expire: the test refreshes first, and Klaviyo fails.
    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 502, "{body}");
    let grants = refresh_grants(&account).await;
    assert!(grants >= 1);
    let backing_off = stored(&user, &id).await;
    assert_eq!(backing_off.refresh_failures, 1);
    assert_eq!(backing_off.status, ConnectionStatus::Active);

    // Pressed again during the backoff: answered at once, Klaviyo not asked, backoff kept.
    let (status, body) = verify(&token, &id).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retried automatically"),
        "{body}"
    );
    assert_eq!(refresh_grants(&account).await, grants);
    assert_eq!(stored(&user, &id).await, backing_off);
    e2e::clear_faults(&account).await;
}
