//! Listing, disconnecting (with revocation at Klaviyo, now or deferred to the refresh job)
//! and connecting with a private API key, end to end over HTTP.

use e2e::{
    accounts_of, api_url, connect_api_key, connect_klaviyo, connected_id, disconnect, environment,
    http, inject_fault, invoke_refresh, issued_tokens, klaviyo_account, list_accounts,
    pending_revocations, received, refresh_tokens, register_api_key, settings_page, token_for,
    unique,
};
use serde_json::{Value, json};
use shared::{Connection, Credentials, UserId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const FIELDS: [&str; 12] = [
    "id",
    "platform",
    "accountName",
    "connectedAt",
    "klaviyoAccountId",
    "klaviyoAccountName",
    "authType",
    "status",
    "scopes",
    "lastRefreshedAt",
    "accessTokenExpiresAt",
    "lastVerifiedAt",
];

fn is_rfc3339_utc(value: &Value) -> bool {
    value
        .as_str()
        .and_then(|s| {
            OffsetDateTime::parse(s, &Rfc3339)
                .ok()
                .filter(|_| s.ends_with('Z'))
        })
        .is_some()
}

async fn stored(user: &str, id: &str) -> Option<Connection> {
    environment()
        .await
        .store()
        .get_connection(&UserId::parse(user).unwrap(), id)
        .await
        .ok()
}

#[tokio::test]
async fn the_list_shows_only_the_callers_connections_newest_first() {
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (alice_token, bob_token) = (token_for(&alice).await, token_for(&bob).await);
    let (oauth_account, key_account) = (klaviyo_account(), klaviyo_account());
    assert!(accounts_of(&alice_token).await.is_empty());

    connect_klaviyo(&alice_token, &oauth_account, Some("Main store")).await;
    let key = register_api_key(&key_account).await;
    let (status, _) = connect_api_key(
        &alice_token,
        &json!({"apiKey": key, "accountName": "Outlet"}),
    )
    .await;
    assert_eq!(status, 201);
    connect_klaviyo(&bob_token, &klaviyo_account(), None).await;

    let (status, body) = list_accounts(&alice_token).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    let accounts = body["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2, "only alice's");
    let (newest, oldest) = (&accounts[0], &accounts[1]);
    for account in accounts {
        let keys: Vec<&str> = account
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = FIELDS.to_vec();
        expected.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, expected, "exactly the documented fields");
        assert_eq!(account["platform"], "klaviyo");
        assert_eq!(account["status"], "active");
        assert!(is_rfc3339_utc(&account["connectedAt"]), "{account}");
        assert!(account["lastRefreshedAt"].is_null());
        assert!(
            is_rfc3339_utc(&account["lastVerifiedAt"]),
            "checked at connect: {account}"
        );
    }
    assert_eq!(newest["klaviyoAccountId"], key_account.as_str());
    assert_eq!(newest["authType"], "api_key");
    assert_eq!(newest["accountName"], "Outlet");
    assert!(newest["accessTokenExpiresAt"].is_null());
    assert_eq!(oldest["klaviyoAccountId"], oauth_account.as_str());
    assert_eq!(
        oldest["klaviyoAccountName"],
        format!("Org of {oauth_account}")
    );
    assert_eq!(oldest["authType"], "oauth");
    assert_eq!(oldest["accountName"], "Main store");
    assert!(is_rfc3339_utc(&oldest["accessTokenExpiresAt"]));
    assert!(
        oldest["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("accounts:read"))
    );

    let text = body.to_string();
    let tokens = issued_tokens(&oauth_account).await;
    for token in [
        &tokens["access_tokens"][0]["token"],
        &tokens["refresh_tokens"][0]["token"],
    ] {
        assert!(
            !text.contains(token.as_str().unwrap()),
            "no token in the list"
        );
    }
    assert!(!text.contains(&key), "no API key in the list");

    let bobs = accounts_of(&bob_token).await;
    assert_eq!(bobs.len(), 1);
    assert!(!accounts.iter().any(|a| a["id"] == bobs[0]["id"]));
}

#[tokio::test]
async fn disconnect_removes_the_connection_and_revokes_its_token_at_klaviyo() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let refresh = refresh_tokens(&account, "active").await;

    let (status, body) = disconnect(&token, &id).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"success": true, "message": "Account disconnected successfully"})
    );
    assert!(
        accounts_of(&token).await.is_empty(),
        "gone from the list at once"
    );
    assert!(stored(&user, &id).await.is_none());

    assert_eq!(refresh_tokens(&account, "revoked").await, refresh);
    let revocations = received(&account, "revoke").await;
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0]["form"]["token"], refresh[0].as_str());
    assert_eq!(revocations[0]["form"]["token_type_hint"], "refresh_token");
    assert!(
        revocations[0]["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Basic ")
    );
    assert_eq!(
        pending_revocations(&id).await,
        0,
        "no token material left behind"
    );

    let (status, _) = disconnect(&token, &id).await;
    assert_eq!(status, 404, "already gone");
}

#[tokio::test]
async fn unknown_and_foreign_ids_get_the_same_404_and_change_nothing() {
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (alice_token, bob_token) = (token_for(&alice).await, token_for(&bob).await);
    let bobs_account = klaviyo_account();
    let bobs_id = connected_id(&bob_token, &bobs_account).await;

    let (status, foreign) = disconnect(&alice_token, &bobs_id).await;
    assert_eq!(status, 404);
    assert_eq!(foreign["error"]["code"], "not_found");
    for other in [
        uuid::Uuid::new_v4().to_string(),
        "not-a-uuid".into(),
        "a%2Fb".into(),
        "x".repeat(300),
    ] {
        let (status, body) = disconnect(&alice_token, &other).await;
        assert_eq!(status, 404, "{other}");
        assert_eq!(
            body, foreign,
            "same body whether it exists for someone else or not at all"
        );
    }
    assert_eq!(
        accounts_of(&bob_token).await.len(),
        1,
        "bob's connection intact"
    );
    assert!(
        received(&bobs_account, "revoke").await.is_empty(),
        "nothing revoked"
    );
}

#[tokio::test]
async fn concurrent_disconnects_of_one_connection_succeed_once() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let (a, b) = tokio::join!(disconnect(&token, &id), disconnect(&token, &id));
    let mut statuses = [a.0.as_u16(), b.0.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 404]);
    assert_eq!(refresh_tokens(&account, "revoked").await.len(), 1);
    assert!(accounts_of(&token).await.is_empty());
}

#[tokio::test]
async fn when_klaviyo_is_down_the_disconnect_succeeds_and_the_refresh_job_finishes_the_revocation()
{
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    inject_fault(
        json!({"endpoint": "revoke", "account": account, "kind": "status", "status": 503}),
    )
    .await;

    let (status, _) = disconnect(&token, &id).await;
    assert_eq!(status, 200, "the user is not held hostage by Klaviyo");
    assert!(accounts_of(&token).await.is_empty());
    assert!(
        received(&account, "revoke").await.len() >= 2,
        "retried within the request"
    );
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "not revoked yet"
    );
    assert_eq!(
        pending_revocations(&id).await,
        1,
        "queued for the refresh job"
    );

    // Klaviyo recovers; the next scheduled run finishes the job.
    e2e::clear_faults(&account).await;
    let summary = invoke_refresh().await;
    assert!(
        summary["revocations_finished"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert!(refresh_tokens(&account, "active").await.is_empty());
    assert_eq!(refresh_tokens(&account, "revoked").await.len(), 1);
    assert_eq!(
        pending_revocations(&id).await,
        0,
        "every trace of the token is gone"
    );
}

#[tokio::test]
async fn a_valid_api_key_is_checked_at_klaviyo_sealed_and_listed() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let key = register_api_key(&account).await;

    let (status, body) = connect_api_key(
        &token,
        &json!({"apiKey": key, "accountName": " Key store "}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["success"], true);
    let view = &body["account"];
    assert_eq!(view["authType"], "api_key");
    assert_eq!(view["status"], "active");
    assert_eq!(view["accountName"], "Key store");
    assert_eq!(view["klaviyoAccountId"], account.as_str());
    assert_eq!(view["klaviyoAccountName"], format!("Org of {account}"));
    assert!(view["accessTokenExpiresAt"].is_null());
    assert!(!body.to_string().contains(&key), "the key is never echoed");
    assert_eq!(
        accounts_of(&token).await[0],
        *view,
        "listed exactly as returned"
    );

    let fetches = received(&account, "accounts").await;
    assert_eq!(fetches.len(), 1);
    assert_eq!(
        fetches[0]["headers"]["authorization"],
        format!("Klaviyo-API-Key {key}")
    );
    assert_eq!(fetches[0]["headers"]["revision"], "2025-10-15");

    let connection = stored(&user, view["id"].as_str().unwrap()).await.unwrap();
    // Never refreshed; checked again once a day, at the connection's own time of day.
    let due = connection
        .refresh_due_at
        .expect("scheduled for its daily check");
    assert_eq!(
        due,
        shared::domain::model::key_check_due(&connection.id, due)
    );
    assert!(
        due > time::OffsetDateTime::now_utc() + shared::domain::model::KEY_CHECK_MIN_GAP
            - time::Duration::minutes(1)
    );
    assert_eq!(connection.access_token_expires_at, None);
    assert!(connection.last_verified_at.is_some(), "checked at connect");
    assert!(!format!("{:?}", connection.credentials.as_bytes()).contains(&key));
    let opened = Credentials::open(&environment().await.sealer(), &connection)
        .await
        .unwrap();
    assert_eq!(
        opened,
        Credentials::ApiKey(shared::Secret::new(key.clone()))
    );

    // Disconnecting an API-key connection revokes nothing at Klaviyo.
    let (status, _) = disconnect(&token, &connection.id).await;
    assert_eq!(status, 200);
    assert!(received(&account, "revoke").await.is_empty());
    assert!(accounts_of(&token).await.is_empty());
}

#[tokio::test]
async fn a_rejected_key_is_a_400_and_klaviyo_trouble_a_502_or_429() {
    let user = unique("user");
    let token = token_for(&user).await;
    let unknown = format!("pk_sandbox_{}", uuid::Uuid::new_v4().simple());
    let (status, body) = connect_api_key(&token, &json!({"apiKey": unknown})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body.to_string().contains(&unknown));

    let account = klaviyo_account();
    let key = register_api_key(&account).await;
    inject_fault(json!({"endpoint": "accounts", "account": account, "kind": "status", "status": 503, "times": 1})).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "klaviyo_unavailable");

    inject_fault(json!({"endpoint": "accounts", "account": account, "kind": "rate_limit", "retry_after": 7, "times": 1})).await;
    let response = http()
        .post(format!("{}/api/oauth/connect/klaviyo/api-key", api_url()))
        .bearer_auth(&token)
        .json(&json!({"apiKey": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");

    assert!(
        accounts_of(&token).await.is_empty(),
        "nothing stored on any failure"
    );
    let (status, _) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, 201, "works once Klaviyo recovers");
}

#[tokio::test]
async fn bad_api_key_requests_get_clear_4xx_errors_that_never_echo_the_key() {
    let token = token_for(&unique("user")).await;
    let url = format!("{}/api/oauth/connect/klaviyo/api-key", api_url());
    let secretish = "pk_sandbox_do_not_echo_0123456789";
    let big = json!({"apiKey": secretish, "accountName": "x".repeat(5000)}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "application/json",
            format!("{{\"apiKey\": \"{secretish}\""),
            400,
            "invalid_json",
        ),
        (
            "text/plain",
            json!({"apiKey": secretish}).to_string(),
            415,
            "unsupported_media_type",
        ),
        ("application/json", big, 413, "payload_too_large"),
        (
            "application/json",
            json!({"accountName": "x"}).to_string(),
            400,
            "invalid_body",
        ),
        (
            "application/json",
            json!({"apiKey": secretish, "extra": 1}).to_string(),
            400,
            "invalid_body",
        ),
        (
            "application/json",
            json!({"apiKey": 12345}).to_string(),
            400,
            "invalid_body",
        ),
        (
            "application/json",
            json!({"apiKey": "sk_not_a_private_key_123"}).to_string(),
            400,
            "invalid_api_key",
        ),
        (
            "application/json",
            json!({"apiKey": secretish, "accountName": "a\u{1}b"}).to_string(),
            400,
            "invalid_account_name",
        ),
        ("application/json", "[]".into(), 400, "invalid_body"),
        ("application/json", String::new(), 400, "invalid_json"),
    ];
    for (content_type, body, status, code) in cases {
        let response = http()
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{body:.80}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], code, "{body:.80}");
        assert!(!answer.to_string().contains(secretish));
    }
}

#[tokio::test]
async fn switching_between_oauth_and_an_api_key_keeps_one_connection() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    connect_klaviyo(&token, &account, Some("Store")).await;
    let oauth = accounts_of(&token).await.remove(0);
    let oauth_refresh = refresh_tokens(&account, "active").await;

    let key = register_api_key(&account).await;
    let (status, body) =
        connect_api_key(&token, &json!({"apiKey": key, "accountName": "Store"})).await;
    assert_eq!(status, 201);
    assert_eq!(body["account"]["id"], oauth["id"], "same connection");
    assert_eq!(body["account"]["authType"], "api_key");
    assert_eq!(body["account"]["connectedAt"], oauth["connectedAt"]);
    assert_eq!(
        refresh_tokens(&account, "revoked").await,
        oauth_refresh,
        "the OAuth token was revoked"
    );
    assert_eq!(accounts_of(&token).await.len(), 1);

    assert_eq!(
        connect_klaviyo(&token, &account, None).await,
        settings_page("connected=klaviyo")
    );
    let listed = accounts_of(&token).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], oauth["id"]);
    assert_eq!(listed[0]["authType"], "oauth");
    let connection = stored(&user, oauth["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(connection.version, 3);
    assert!(
        connection.refresh_due_at.is_some(),
        "back on the refresh schedule"
    );
}

#[tokio::test]
async fn a_revocation_that_times_out_is_retried_then_deferred_without_failing_the_disconnect() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    inject_fault(json!({"endpoint": "revoke", "account": account, "kind": "timeout"})).await;
    let started = std::time::Instant::now();
    let (status, _) = disconnect(&token, &id).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "bounded by the request budget"
    );
    assert_eq!(
        received(&account, "revoke").await.len(),
        2,
        "one retry after a timeout"
    );
    assert_eq!(pending_revocations(&id).await, 1);
    e2e::clear_faults(&account).await;
}
