//! The `token` function (credentials for the host app's own services), invoked as host services
//! invoke it (the Lambda Invoke API, locally `cargo lambda watch`'s), against moto and the
//! Klaviyo sandbox: what it answers, what Klaviyo received, what it costs a warm container.

use e2e::fault_proxy::{Failure, Matcher, Stage};
use e2e::lambda::Outcome;
use e2e::{
    connect_api_key, connect_due, connected_id, environment, inject_fault, klaviyo_account,
    minutes_from_now, refresh_grants, register_api_key, remove_app, rewrite, stored, time_of,
    token_for, unique,
};
use serde_json::{Value, json};
use shared::Credentials;
use time::OffsetDateTime;

/// Invokes the token function as a host service does, with any request.
async fn credential(request: Value) -> Value {
    let response = e2e::http()
        .post(format!(
            "{}/2015-03-31/functions/token/invocations",
            e2e::api_url()
        ))
        .json(&request)
        .send()
        .await
        .expect("the token function is served");
    assert_eq!(response.status(), 200, "answers, never function errors");
    assert!(response.headers().get("x-amz-function-error").is_none());
    response.json().await.expect("JSON")
}

async fn for_connection(user: &str, id: &str) -> Value {
    credential(json!({"userId": user, "connectionId": id})).await
}

/// The stored access token of an OAuth connection.
async fn stored_access_token(user: &str, id: &str) -> String {
    match Credentials::open(&environment().await.sealer(), &stored(user, id).await)
        .await
        .unwrap()
    {
        Credentials::OAuth { access_token, .. } => access_token.expose().to_owned(),
        other => panic!("OAuth tokens expected, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oauth_connection_gets_its_stored_access_token_with_its_expiry() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;

    let answer = for_connection(&user, &id).await;
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await)
    );
    assert_eq!(answer["authType"], "oauth");
    assert_eq!(answer["klaviyoAccountId"], account.as_str());
    let expires = time_of(&answer["expiresAt"]);
    assert!(expires > OffsetDateTime::now_utc() + time::Duration::minutes(2));
    assert_eq!(
        Some(expires),
        stored(&user, &id).await.access_token_expires_at
    );
    assert_eq!(refresh_grants(&account).await, 0, "no refresh needed");
    // The answer works at Klaviyo's accounts endpoint.
    let accounts = e2e::http()
        .get(format!("{}/api/accounts/", e2e::sandbox_url()))
        .header("authorization", answer["authorization"].as_str().unwrap())
        .header("revision", "2025-10-15")
        .send()
        .await
        .unwrap();
    assert_eq!(accounts.status(), 200);
}

#[tokio::test]
async fn an_api_key_connection_gets_its_key_and_no_expiry() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let key = register_api_key(&account).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, 201);
    let id = body["account"]["id"].as_str().unwrap();

    let answer = for_connection(&user, id).await;
    assert_eq!(answer["authorization"], format!("Klaviyo-API-Key {key}"));
    assert_eq!(answer["authType"], "api_key");
    assert_eq!(answer["klaviyoAccountId"], account.as_str());
    assert!(answer["expiresAt"].is_null());
}

#[tokio::test]
async fn a_token_with_less_than_two_minutes_left_is_refreshed_first() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    let before = stored(&user, &id).await;

    let answer = for_connection(&user, &id).await;
    assert_eq!(refresh_grants(&account).await, 1, "refreshed just in time");
    let after = stored(&user, &id).await;
    assert!(after.access_token_expires_at > before.access_token_expires_at);
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await),
        "the new token, as stored"
    );
    assert_eq!(
        Some(time_of(&answer["expiresAt"])),
        after.access_token_expires_at
    );
    // Asked again: the stored one, no second refresh.
    let again = for_connection(&user, &id).await;
    assert_eq!(again["authorization"], answer["authorization"]);
    assert_eq!(refresh_grants(&account).await, 1);
}

#[tokio::test]
async fn errors_are_answers_in_one_shape() {
    let owner = unique("user");
    let token = token_for(&owner).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let stranger = unique("user");
    for (request, code) in [
        (json!({"userId": stranger, "connectionId": id}), "not_found"),
        (
            json!({"userId": owner, "connectionId": uuid::Uuid::new_v4().to_string()}),
            "not_found",
        ),
        (
            json!({"userId": owner, "connectionId": "not-a-uuid"}),
            "not_found",
        ),
        (json!({"userId": owner}), "invalid_request"),
        (json!({"userId": "", "connectionId": id}), "invalid_request"),
        (
            json!({"userId": owner, "connectionId": id, "extra": 1}),
            "invalid_request",
        ),
        (json!("just a string"), "invalid_request"),
        (json!(vec![0; 500_000]), "invalid_request"),
    ] {
        let answer = credential(request.clone()).await;
        assert_eq!(answer["error"]["code"], code, "{request}: {answer}");
        assert!(answer["error"]["message"].is_string());
        assert!(answer.get("authorization").is_none());
    }

    // The user removed the app in Klaviyo: once the refresh finds out, needs_reauth.
    remove_app(&account).await;
    let (status, _) = e2e::verify(&token, &id).await;
    assert_eq!(status, 200);
    let answer = for_connection(&owner, &id).await;
    assert_eq!(answer["error"]["code"], "needs_reauth", "{answer}");
}

#[tokio::test]
async fn with_klaviyo_down_a_token_that_still_works_is_handed_out_and_refreshes_wait_for_the_backoff()
 {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connect_due(&token, &account).await;
    inject_fault(json!({"endpoint": "token", "kind": "status", "status": 503, "account": account}))
        .await;
    // A minute left: the refresh fails, the stored token still works for that minute.
    let answer = for_connection(&user, &id).await;
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await),
        "{answer}"
    );
    let grants = refresh_grants(&account).await;
    assert!(grants >= 1);
    assert_eq!(stored(&user, &id).await.refresh_failures, 1, "backing off");
    // Asked again during the backoff: the same token, and Klaviyo is not asked again.
    assert_eq!(for_connection(&user, &id).await, answer);
    assert_eq!(refresh_grants(&account).await, grants);
    e2e::clear_faults(&account).await;

    // Expired and still backing off: unavailable at once, without asking Klaviyo.
    rewrite(&user, &id, |c| {
        c.access_token_expires_at = Some(OffsetDateTime::now_utc() - time::Duration::seconds(1));
    })
    .await;
    assert_eq!(
        for_connection(&user, &id).await["error"]["code"],
        "unavailable"
    );
    assert_eq!(refresh_grants(&account).await, grants);
}

/// A warm container hands out what it opened while the stored credentials are unchanged: one
/// DynamoDB read and no KMS call; and it opens what a refresh sealed with the data key it
/// already holds without KMS too. Shown with KMS failing under a function process of its own.
/// A reconnect (a new data key) needs KMS.
#[tokio::test]
async fn a_warm_container_hands_out_what_it_opened_and_opens_refreshed_tokens_without_kms() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let stage = Stage::new().await;
    let function = stage.function("token").await;
    let ask = || function.invoke(json!({"userId": user, "connectionId": id}));
    let answered = |outcome: Outcome| match outcome {
        Outcome::Response(answer) => answer,
        Outcome::Error(error) => panic!("a function error: {error}"),
    };

    let first = answered(ask().await);
    assert!(first["authorization"].is_string(), "{first}");
    const KMS: Matcher = Matcher::AwsTarget("TrentService.");
    stage.inject(KMS, Failure::ServerError).await;
    let kept = answered(ask().await);
    assert_eq!(kept, first, "handed out again without KMS");

    // The refresh job refreshes it (new tokens, sealed with the same data key): opened
    // without KMS.
    let before = stored(&user, &id).await;
    e2e::due_now(&user, &id).await;
    e2e::refresh_job().await.run(None).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stored(&user, &id).await.version == before.version {
        assert!(std::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let refreshed = answered(ask().await);
    assert_eq!(
        refreshed["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await),
        "the refreshed token, opened without KMS"
    );
    assert_ne!(refreshed["authorization"], first["authorization"]);
    assert_eq!(
        Some(time_of(&refreshed["expiresAt"])),
        stored(&user, &id).await.access_token_expires_at
    );

    // A reconnect seals new tokens with a new data key: that needs KMS.
    connected_id(&token, &account).await;
    let refused = answered(ask().await);
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    stage.clear(KMS).await;
    let reopened = answered(ask().await);
    assert_eq!(
        reopened["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await)
    );
}

/// A disconnect and a reconnect start the same connection id over (the same version number)
/// with new credentials: what a warm container kept from before is never handed out.
#[tokio::test]
async fn after_a_disconnect_and_a_reconnect_the_new_credential_is_handed_out() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let old_key = register_api_key(&account).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": old_key})).await;
    assert_eq!(status, 201);
    let id = body["account"]["id"].as_str().unwrap().to_owned();
    let version = stored(&user, &id).await.version;
    assert_eq!(
        for_connection(&user, &id).await["authorization"],
        format!("Klaviyo-API-Key {old_key}")
    );

    let (status, _) = e2e::disconnect(&token, &id).await;
    assert_eq!(status, 200);
    // (Not asked in between: a not_found answer would make the container forget it anyway.)
    let new_key = register_api_key(&account).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": new_key})).await;
    assert_eq!(status, 201);
    assert_eq!(body["account"]["id"], id.as_str(), "the same connection id");
    assert_eq!(
        stored(&user, &id).await.version,
        version,
        "and the same version"
    );
    assert_eq!(
        for_connection(&user, &id).await["authorization"],
        format!("Klaviyo-API-Key {new_key}")
    );
}

/// A hand-out records the connection's use, at most once an hour, without touching its
/// version or credentials (what the usage-aware refresh will schedule by).
#[tokio::test]
async fn handing_out_records_the_use_at_most_once_an_hour() {
    let user = unique("user");
    let token = token_for(&user).await;
    let id = connected_id(&token, &klaviyo_account()).await;
    let before = stored(&user, &id).await;
    assert_eq!(before.last_used_at, None, "never handed out");

    let started = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let first = for_connection(&user, &id).await;
    let used = stored(&user, &id).await;
    let at = used.last_used_at.expect("the use is recorded");
    assert!(at >= started && at <= OffsetDateTime::now_utc(), "{at}");
    assert_eq!(
        used.version, before.version,
        "the version is the credentials'"
    );
    assert_eq!(used.credentials, before.credentials);

    // Within the hour: not written again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(for_connection(&user, &id).await, first);
    assert_eq!(stored(&user, &id).await.last_used_at, Some(at));

    // An hour later (the recorded use moved back): written again.
    rewrite(&user, &id, |c| {
        c.last_used_at = Some(at - time::Duration::minutes(61));
    })
    .await;
    for_connection(&user, &id).await;
    assert!(stored(&user, &id).await.last_used_at > Some(at - time::Duration::minutes(1)));
}

/// Makes a connection idle under the usage-aware policy, as after its last keep-alive: authorised
/// three days ago, never used, its token expiring in `expires_in` minutes and its next
/// keep-alive twenty hours away.
async fn idle(user: &str, id: &str, expires_in: i64) -> shared::Connection {
    rewrite(user, id, |c| {
        c.authorized_at = minutes_from_now(-3 * 24 * 60);
        c.last_used_at = None;
        c.access_token_expires_at = Some(minutes_from_now(expires_in));
        c.refresh_due_at = Some(minutes_from_now(20 * 60));
    })
    .await
}

/// Handed out for an idle connection whose token still works: the token as stored, and the
/// connection back on the eager schedule in the same write that records the use (no refresh).
#[tokio::test]
async fn a_credential_handed_out_for_an_idle_connection_puts_it_back_on_the_eager_schedule() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let before = idle(&user, &id, 50).await;

    let answer = for_connection(&user, &id).await;
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await)
    );
    let after = stored(&user, &id).await;
    let expires = before.access_token_expires_at.unwrap();
    assert_eq!(
        after.refresh_due_at,
        Some(expires - time::Duration::minutes(15)),
        "refreshed before it expires from now on"
    );
    assert!(after.last_used_at.is_some());
    assert_eq!(after.version, before.version, "credentials untouched");
    assert_eq!(refresh_grants(&account).await, 0, "no refresh of its own");
    // The due index carries it: the job finds it when due (here: made due now).
    e2e::due_now(&user, &id).await;
    e2e::refresh_job().await.run(None).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while refresh_grants(&account).await == 0 {
        assert!(std::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Handed out for an idle connection whose token has expired: refreshed first (the caller
/// waits for Klaviyo once), and kept fresh after.
#[tokio::test]
async fn an_idle_connection_whose_token_expired_is_refreshed_first_and_kept_fresh_after() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let before = idle(&user, &id, -120).await;

    let answer = for_connection(&user, &id).await;
    assert_eq!(refresh_grants(&account).await, 1, "refreshed first");
    let after = stored(&user, &id).await;
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", stored_access_token(&user, &id).await)
    );
    let expires = time_of(&answer["expiresAt"]);
    assert!(expires > OffsetDateTime::now_utc() + time::Duration::minutes(55));
    assert_eq!(after.access_token_expires_at, Some(expires));
    assert_eq!(
        after.refresh_due_at,
        Some(expires - time::Duration::minutes(15)),
        "in use now: refreshed before it expires"
    );
    assert!(after.last_used_at.is_some(), "the refresh recorded the use");
    assert_eq!(after.version, before.version + 1);
}
