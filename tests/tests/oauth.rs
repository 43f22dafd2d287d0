//! Connect with Klaviyo end to end: the functions under `cargo lambda watch`, the Klaviyo
//! sandbox and moto, all over real HTTP. Each test uses its own user and Klaviyo account, so
//! faults injected for one never touch another.

use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use e2e::{
    api_url, auth_url, authorize, complete, completion_of, connect, connect_klaviyo, environment,
    http, inject_fault, issued_tokens, klaviyo_account, location, raw_item, received,
    refresh_tokens, setting, settings_page, token_for, unique,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::{AuthType, Connection, ConnectionStatus, Credentials, PendingAuthorization, UserId};
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

const CONNECTED: &str = "connected=klaviyo";
const FAILED: &str = "error=klaviyo_connection_failed";
const DENIED: &str = "error=klaviyo_access_denied";

fn query(url: &url::Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

/// The completion handle of a successful callback's redirect, asserting its shape: the
/// settings page, `connected=klaviyo`, and a 43-character handle.
fn parked(landed: &str) -> String {
    let handle = completion_of(landed).unwrap_or_else(|| panic!("no completion in {landed}"));
    assert_eq!(
        landed,
        format!("{}&completion={handle}", settings_page(CONNECTED))
    );
    assert_eq!(handle.len(), 43, "32 random bytes, base64url");
    handle
}

async fn connections(user: &str) -> Vec<Connection> {
    environment()
        .await
        .store()
        .list_connections(&UserId::parse(user).unwrap())
        .await
        .unwrap()
}

async fn raw_pending(state: &str) -> Option<HashMap<String, AttributeValue>> {
    let pk = format!("STATE#{}", PendingAuthorization::hash_state(state));
    raw_item(pk, "STATE").await
}

async fn raw_connection(connection: &Connection) -> HashMap<String, AttributeValue> {
    let (pk, sk) = (
        format!("USER#{}", connection.user_id),
        format!("CONN#{}", connection.id),
    );
    raw_item(pk, &sk).await.expect("stored")
}

async fn client_secret() -> String {
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(setting("KLAVIYO_CLIENT_SECRET_ARN"))
        .send()
        .await
        .unwrap()
        .secret_string
        .unwrap()
}

#[tokio::test]
async fn connect_returns_an_authorize_url_and_stores_a_pending_authorization() {
    let user = unique("user");
    let token = token_for(&user).await;
    let started = OffsetDateTime::now_utc().unix_timestamp();
    let url = auth_url(&token, Some("  Main store  ")).await;

    assert_eq!(
        format!("{}://{}{}", url.scheme(), url.authority(), url.path()),
        setting("KLAVIYO_AUTHORIZE_URL")
    );
    let q = query(&url);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], setting("KLAVIYO_CLIENT_ID"));
    assert_eq!(q["redirect_uri"], setting("KLAVIYO_REDIRECT_URI"));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert_eq!(q["state"].len(), 43, "32 random bytes, base64url");
    let scopes: Vec<&str> = q["scope"].split(' ').collect();
    assert!(
        scopes.contains(&"accounts:read") && scopes.contains(&"lists:read"),
        "{scopes:?}"
    );

    let item = raw_pending(&q["state"])
        .await
        .expect("pending authorization stored by state hash");
    assert_eq!(item["user_id"], AttributeValue::S(user.clone()));
    assert_eq!(
        item["account_name"],
        AttributeValue::S("Main store".into()),
        "trimmed"
    );
    let expires: i64 = item["expires_at"].as_n().unwrap().parse().unwrap();
    assert!(
        (started + 590..=started + 615).contains(&expires),
        "expires in 10 minutes"
    );
    let verifier = item["code_verifier"].as_s().unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)),
        q["code_challenge"]
    );
    assert!(
        !format!("{item:?}").contains(&q["state"]),
        "the state itself is not stored"
    );

    let again = auth_url(&token, None).await;
    assert_ne!(query(&again)["state"], q["state"], "fresh state per call");
    assert_ne!(
        query(&again)["code_challenge"],
        q["code_challenge"],
        "fresh verifier per call"
    );
}

#[tokio::test]
async fn account_names_are_validated() {
    let token = token_for(&unique("user")).await;
    let too_long = "x".repeat(101);
    for bad in ["", "   ", "tab\there", "nul\u{0}", too_long.as_str()] {
        let (status, body) = connect(&token, Some(bad)).await;
        assert_eq!(status, 400, "{bad:?}");
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "invalid_account_name", "{bad:?}");
    }
    let (status, _) = connect(&token, Some(&"é".repeat(100))).await;
    assert_eq!(status, 200, "100 characters are fine");
}

#[tokio::test]
async fn the_full_flow_connects_the_account_with_sealed_tokens() {
    let user = unique("user");
    let account = klaviyo_account();
    let token = token_for(&user).await;
    let auth = auth_url(&token, Some("Main store")).await;
    let callback = authorize(&auth, &account, true).await;
    assert!(
        callback.starts_with(&setting("KLAVIYO_REDIRECT_URI")),
        "{callback}"
    );
    let before = OffsetDateTime::now_utc();
    let handle = parked(&location(&callback).await);
    assert!(
        connections(&user).await.is_empty(),
        "nothing is connected until the user's session completes it"
    );
    // Parked under the handle's hash, the tokens sealed: the table never holds the handle.
    let parked_item = raw_item(
        format!("REVOKE#{}", shared::ParkedConnection::hash_handle(&handle)),
        "REVOKE",
    )
    .await
    .expect("parked under the handle's hash");
    let (status, body) = complete(&token, &handle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["account"]["klaviyoAccountId"], account.as_str());
    assert_eq!(body["account"]["accountName"], "Main store");
    assert_eq!(body["account"]["status"], "active");

    let listed = connections(&user).await;
    assert_eq!(listed.len(), 1);
    let connection = &listed[0];
    assert_eq!(
        connection.id,
        Connection::id_for(&UserId::parse(&user).unwrap(), &account)
    );
    assert_eq!(connection.klaviyo_account_id, account);
    assert_eq!(connection.klaviyo_account_name, format!("Org of {account}"));
    assert_eq!(connection.account_name, "Main store");
    assert_eq!(connection.auth_type, AuthType::OAuth);
    assert_eq!(connection.status, ConnectionStatus::Active);
    assert!(connection.scopes.contains(&"accounts:read".to_owned()));
    assert_eq!(connection.version, 1);
    let expires = connection
        .access_token_expires_at
        .expect("OAuth tokens expire");
    let lifetime = expires - before;
    assert!(
        lifetime > Duration::minutes(59) && lifetime <= Duration::minutes(61),
        "from expires_in: {lifetime}"
    );
    assert_eq!(
        connection.refresh_due_at,
        Some(expires - Duration::minutes(15))
    );

    // The tokens the sandbox issued are in the item only sealed.
    let tokens = issued_tokens(&account).await;
    let access = tokens["access_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let refresh = tokens["refresh_tokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for raw in [
        format!("{:?}", raw_connection(connection).await),
        format!("{parked_item:?}"),
    ] {
        assert!(
            !raw.contains(&access) && !raw.contains(&refresh) && !raw.contains(&handle),
            "tokens must be sealed, the handle kept only hashed"
        );
    }
    let opened = Credentials::open(&environment().await.sealer(), connection)
        .await
        .unwrap();
    let Credentials::OAuth {
        access_token,
        refresh_token,
    } = opened
    else {
        panic!("OAuth credentials expected");
    };
    assert_eq!(
        (access_token.expose(), refresh_token.expose()),
        (access.as_str(), refresh.as_str())
    );

    // What Klaviyo received: the code exchange with Basic auth and the PKCE verifier...
    let exchanges = received(&account, "token").await;
    assert_eq!(exchanges.len(), 1);
    let exchange = &exchanges[0];
    let basic = STANDARD.encode(format!(
        "{}:{}",
        setting("KLAVIYO_CLIENT_ID"),
        client_secret().await
    ));
    assert_eq!(
        exchange["headers"]["authorization"],
        format!("Basic {basic}")
    );
    assert_eq!(exchange["form"]["grant_type"], "authorization_code");
    assert_eq!(
        exchange["form"]["redirect_uri"],
        setting("KLAVIYO_REDIRECT_URI")
    );
    assert!(
        exchange["form"].get("client_secret").is_none(),
        "the secret travels only in the header"
    );
    let verifier = exchange["form"]["code_verifier"].as_str().unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)),
        query(&auth)["code_challenge"]
    );
    // ...and the account fetch with the revision header and the new access token.
    let fetches = received(&account, "accounts").await;
    assert_eq!(fetches.len(), 1);
    assert_eq!(fetches[0]["headers"]["revision"], "2025-10-15");
    assert_eq!(fetches[0]["headers"]["accept"], "application/vnd.api+json");
    assert_eq!(
        fetches[0]["headers"]["authorization"],
        format!("Bearer {access}")
    );
}

#[tokio::test]
async fn reconnecting_the_same_account_updates_it_and_revokes_the_old_refresh_token() {
    let user = unique("user");
    let account = klaviyo_account();
    let token = token_for(&user).await;
    assert_eq!(
        connect_klaviyo(&token, &account, Some("First")).await,
        settings_page(CONNECTED)
    );
    let first = connections(&user).await.remove(0);
    let old_refresh = refresh_tokens(&account, "active").await;
    assert_eq!(old_refresh.len(), 1);

    assert_eq!(
        connect_klaviyo(&token, &account, Some("Second")).await,
        settings_page(CONNECTED)
    );
    let listed = connections(&user).await;
    assert_eq!(listed.len(), 1, "updated, not duplicated");
    let second = &listed[0];
    assert_eq!(second.id, first.id);
    assert_eq!(second.account_name, "Second");
    assert_eq!(second.connected_at, first.connected_at);
    assert_eq!(second.version, 2);
    assert_ne!(second.credentials, first.credentials);
    assert_eq!(
        refresh_tokens(&account, "revoked").await,
        old_refresh,
        "replaced token revoked"
    );
    assert_eq!(refresh_tokens(&account, "active").await.len(), 1);

    // A second Klaviyo account is a second connection.
    let other = klaviyo_account();
    assert_eq!(
        connect_klaviyo(&token, &other, None).await,
        settings_page(CONNECTED)
    );
    let listed = connections(&user).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].klaviyo_account_id, other, "newest first");
    assert_eq!(listed[0].account_name, "Klaviyo", "default label");
}

#[tokio::test]
async fn deny_lands_on_the_access_denied_page_and_spends_the_state() {
    let user = unique("user");
    let account = klaviyo_account();
    let auth = auth_url(&token_for(&user).await, None).await;
    let callback = authorize(&auth, &account, false).await;
    assert!(callback.contains("error=access_denied"), "{callback}");
    assert_eq!(location(&callback).await, settings_page(DENIED));
    assert!(connections(&user).await.is_empty());
    assert!(
        raw_pending(&query(&auth)["state"]).await.is_none(),
        "state consumed"
    );
    assert!(
        received(&account, "token").await.is_empty(),
        "no code exchange"
    );
}

#[tokio::test]
async fn a_state_works_once_and_the_callback_connects_nobody_by_itself() {
    let (alice, mallory) = (unique("alice"), unique("mallory"));
    let account = klaviyo_account();
    let alice_token = token_for(&alice).await;
    let auth = auth_url(&alice_token, None).await;
    let callback = authorize(&auth, &account, true).await;

    // Whoever's browser follows the callback (here one carrying another user's token), it
    // connects no one: the result waits for the session of the user who started the flow.
    let response = http()
        .get(&callback)
        .bearer_auth(token_for(&mallory).await)
        .send()
        .await
        .unwrap();
    let handle = parked(response.headers()["location"].to_str().unwrap());
    assert!(connections(&alice).await.is_empty());
    assert!(connections(&mallory).await.is_empty());

    // Replaying the same callback fails and changes nothing.
    assert_eq!(location(&callback).await, settings_page(FAILED));
    assert_eq!(
        received(&account, "token").await.len(),
        1,
        "the code was exchanged once"
    );

    // Alice's own session completes it.
    assert_eq!(complete(&alice_token, &handle).await.0, 200);
    let after = connections(&alice).await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].version, 1);
    assert!(connections(&mallory).await.is_empty());
}

#[tokio::test]
async fn unknown_expired_and_malformed_callbacks_fail_without_side_effects() {
    let user = unique("user");
    let store = environment().await.store();
    let expired_state = unique("expired-state");
    let now = OffsetDateTime::now_utc();
    store
        .put_pending(&PendingAuthorization {
            state_hash: PendingAuthorization::hash_state(&expired_state),
            user_id: UserId::parse(&user).unwrap(),
            account_name: "Late".into(),
            code_verifier: shared::Secret::new("v".repeat(43)),
            created_at: now - Duration::minutes(11),
            expires_at: now - Duration::minutes(1),
        })
        .await
        .unwrap();
    let callback = format!("{}/klaviyo/oauthcallback", api_url());
    let long = "s".repeat(5000);
    let cases = [
        format!("{callback}?code=abc&state={expired_state}"),
        format!("{callback}?code=abc&state={}", unique("never-issued")),
        callback.clone(),
        format!("{callback}?code=abc"),
        format!("{callback}?state={expired_state}"),
        format!("{callback}?code=&state="),
        format!("{callback}?code=abc&state={long}"),
        format!("{callback}?error=server_error&state={}", unique("s")),
        format!("{callback}?error=%0D%0Ainjected&state=x"),
    ];
    for url in cases {
        assert_eq!(location(&url).await, settings_page(FAILED), "{url}");
    }
    assert!(connections(&user).await.is_empty());
}

#[tokio::test]
async fn nothing_in_the_request_chooses_where_the_browser_goes() {
    let user = unique("user");
    let account = klaviyo_account();
    let auth = auth_url(&token_for(&user).await, None).await;
    let callback = authorize(&auth, &account, true).await;
    let tampered = format!(
        "{callback}&redirect_uri=https://evil.example.com&next=https://evil.example.com&return_to=//evil.example.com"
    );
    parked(&location(&tampered).await);
    let forged = format!(
        "{}/klaviyo/oauthcallback?next=https://evil.example.com&error=access_denied",
        api_url()
    );
    assert_eq!(location(&forged).await, settings_page(DENIED));
}

/// Runs the flow with `fault` injected for a fresh account; returns the account.
async fn flow_with_fault(user: &str, endpoint: &str, fault: Value) -> (String, String) {
    let account = klaviyo_account();
    let mut fault = fault;
    fault["endpoint"] = json!(endpoint);
    fault["account"] = json!(account);
    let auth = auth_url(&token_for(user).await, None).await;
    let callback = authorize(&auth, &account, true).await;
    inject_fault(fault).await;
    (account, location(&callback).await)
}

#[tokio::test]
async fn token_endpoint_failures_fail_the_flow_and_store_nothing() {
    let user = unique("user");
    for fault in [
        json!({"kind": "status", "status": 500}),
        json!({"kind": "status", "status": 503}),
        json!({"kind": "invalid_grant"}),
        json!({"kind": "rate_limit", "retry_after": 30}),
        json!({"kind": "malformed"}),
    ] {
        let (account, landed) = flow_with_fault(&user, "token", fault.clone()).await;
        assert_eq!(landed, settings_page(FAILED), "{fault}");
        assert_eq!(received(&account, "token").await.len(), 1, "{fault}");
        assert!(received(&account, "accounts").await.is_empty(), "{fault}");
    }
    assert!(connections(&user).await.is_empty());
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_fails_the_flow_within_the_client_timeout() {
    let user = unique("user");
    let started = std::time::Instant::now();
    let (_, landed) = flow_with_fault(&user, "token", json!({"kind": "timeout"})).await;
    assert_eq!(landed, settings_page(FAILED));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "gave up before the sandbox answered"
    );
    assert!(connections(&user).await.is_empty());
}

#[tokio::test]
async fn account_fetch_failures_fail_the_flow_and_revoke_the_new_tokens() {
    let user = unique("user");
    for fault in [
        json!({"kind": "status", "status": 503}),
        json!({"kind": "status", "status": 401}),
        json!({"kind": "rate_limit", "retry_after": 5}),
        json!({"kind": "malformed"}),
    ] {
        let (account, landed) = flow_with_fault(&user, "accounts", fault.clone()).await;
        assert_eq!(landed, settings_page(FAILED), "{fault}");
        assert!(
            refresh_tokens(&account, "active").await.is_empty(),
            "{fault}: no live grant left"
        );
        assert_eq!(
            refresh_tokens(&account, "revoked").await.len(),
            1,
            "{fault}"
        );
        let revocations = received(&account, "revoke").await;
        assert_eq!(revocations.len(), 1, "{fault}");
        assert_eq!(revocations[0]["form"]["token_type_hint"], "refresh_token");
    }
    assert!(connections(&user).await.is_empty());
}

#[tokio::test]
async fn klaviyo_latency_is_tolerated() {
    let user = unique("user");
    let (_, landed) = flow_with_fault(
        &user,
        "token",
        json!({"kind": "latency", "ms": 800, "times": 1}),
    )
    .await;
    let handle = parked(&landed);
    assert_eq!(complete(&token_for(&user).await, &handle).await.0, 200);
    assert_eq!(connections(&user).await.len(), 1);
}
