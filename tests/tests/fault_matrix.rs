//! The fault matrix: for each remote step (DynamoDB, KMS, Secrets Manager, Klaviyo's token,
//! accounts and revoke endpoints) and each failure (timeout, 5xx, throttling, malformed body,
//! connection refused), a function process whose endpoint for that step goes through a
//! loopback fault proxy gives the documented answer, writes nothing half-way, loses nothing,
//! and succeeds on retry once the fault clears. The five failures of a step run
//! concurrently, each with its own proxy and function processes.

use e2e::fault_proxy::{Failure, Matcher, Stage};
use e2e::lambda::{ApiRequest, HttpReply, LocalLambda};
use e2e::{
    accounts_of, authorize, callback_request, connect_attempts, connected_id, klaviyo_account,
    location, pending_revocations, refresh_tokens, register_api_key, settings_page, time_of,
    token_for, unique,
};
use futures::future::join_all;
use serde_json::json;
use std::future::Future;

const SECURITY_HEADERS: [&str; 5] = [
    "strict-transport-security",
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "cache-control",
];

/// Runs `cell` once per failure, all at once, and reports every failing cell together.
async fn each_failure<F, Fut>(step: &str, cell: F)
where
    F: Fn(Failure) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runs = Failure::ALL.map(|failure| {
        let run = tokio::spawn(cell(failure));
        async move { (failure, run.await) }
    });
    let failed: Vec<String> = join_all(runs)
        .await
        .into_iter()
        .filter_map(|(failure, result)| {
            result.err().map(|e| {
                let reason = e
                    .try_into_panic()
                    .ok()
                    .and_then(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    })
                    .unwrap_or_default();
                format!("{step} × {failure:?}: {reason}")
            })
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn assert_error(reply: &HttpReply, status: u16, code: &str, context: &str) {
    assert_eq!(reply.status, status, "{context}: {}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{context}"
    );
    for name in SECURITY_HEADERS {
        assert!(reply.header(name).is_some(), "{context}: {name} missing");
    }
    let body = reply.json();
    assert_eq!(body["success"], false, "{context}");
    assert_eq!(body["error"]["code"], code, "{context}: {body}");
}

fn redirected_to(reply: &HttpReply, outcome: &str, context: &str) {
    assert_eq!(reply.status, 302, "{context}: {}", reply.body);
    assert_eq!(
        reply.header("location"),
        Some(settings_page(outcome).as_str()),
        "{context}"
    );
}

fn list(token: &str) -> ApiRequest {
    ApiRequest::new("GET", "/api/oauth/accounts").bearer(token)
}

fn delete(token: &str, id: &str) -> ApiRequest {
    ApiRequest::new("DELETE", &format!("/api/oauth/accounts/{id}"))
        .bearer(token)
        .path_parameter("accountId", id)
}

fn verify(token: &str, id: &str) -> ApiRequest {
    ApiRequest::new("POST", &format!("/api/oauth/accounts/{id}/verify"))
        .bearer(token)
        .path_parameter("accountId", id)
}

fn api_key(token: &str, key: &str) -> ApiRequest {
    ApiRequest::new("POST", "/api/oauth/connect/klaviyo/api-key")
        .bearer(token)
        .json(&json!({"apiKey": key, "accountName": "Fault matrix"}))
}

/// A user half-way through both ways of connecting: Klaviyo's redirect back for a fresh OAuth
/// flow, and a valid API key for another account, with connect and callback processes behind
/// the proxies.
struct Connecting {
    stage: Stage,
    connect: LocalLambda,
    callback: LocalLambda,
    token: String,
    account: String,
    returning: ApiRequest,
    key: String,
}

impl Connecting {
    async fn new() -> Self {
        let stage = Stage::new().await;
        let (connect, callback) =
            tokio::join!(stage.function("connect"), stage.one_step_callback());
        let token = token_for(&unique("user")).await;
        let account = klaviyo_account();
        let returning = callback_request(&token, &account).await;
        let key = register_api_key(&klaviyo_account()).await;
        Self {
            stage,
            connect,
            callback,
            token,
            account,
            returning,
            key,
        }
    }
}

#[tokio::test]
async fn dynamodb_failures_are_503s_and_failed_redirects_and_lose_nothing() {
    let step = Matcher::AwsTarget("DynamoDB_20120810.");
    each_failure("DynamoDB", move |failure| async move {
        let stage = Stage::new().await;
        let (accounts, callback, disconnect) = tokio::join!(
            stage.function("accounts"),
            stage.one_step_callback(),
            stage.function("disconnect"),
        );
        let token = token_for(&unique("user")).await;
        let existing = connected_id(&token, &klaviyo_account()).await;
        let account = klaviyo_account();
        let returning = callback_request(&token, &account).await;

        stage.inject(step, failure).await;
        let (listed, landed, removed) = tokio::join!(
            accounts.http(list(&token)),
            callback.http(returning.clone()),
            disconnect.http(delete(&token, &existing)),
        );
        assert_error(&listed, 503, "service_unavailable", "list");
        redirected_to(&landed, "error=klaviyo_connection_failed", "callback");
        assert_error(&removed, 503, "service_unavailable", "disconnect");
        stage.clear(step).await;

        // Nothing was half-done: the connection is still there, the state still unused.
        let listed = accounts.http(list(&token)).await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(listed.json()["accounts"].as_array().unwrap().len(), 1);
        let landed = callback.http(returning).await;
        redirected_to(&landed, "connected=klaviyo", "the same callback, retried");
        let removed = disconnect.http(delete(&token, &existing)).await;
        assert_eq!(removed.status, 200, "{}", removed.body);
        let remaining = accounts_of(&token).await;
        assert_eq!(remaining.len(), 1);
        assert_eq!(remaining[0]["klaviyoAccountId"], account.as_str());
    })
    .await;
}

#[tokio::test]
async fn kms_failures_fail_the_flow_revoke_what_was_issued_and_store_nothing() {
    let step = Matcher::AwsTarget("TrentService.");
    each_failure("KMS", move |failure| async move {
        let Connecting {
            stage,
            connect,
            callback,
            token,
            account,
            returning,
            key,
        } = Connecting::new().await;

        stage.inject(step, failure).await;
        let (landed, keyed) = tokio::join!(
            callback.http(returning),
            connect.http(api_key(&token, &key)),
        );
        redirected_to(&landed, "error=klaviyo_connection_failed", "callback");
        assert_error(&keyed, 503, "service_unavailable", "api key");
        assert!(accounts_of(&token).await.is_empty(), "nothing stored");
        assert!(
            refresh_tokens(&account, "active").await.is_empty(),
            "the tokens that could not be stored were revoked"
        );
        stage.clear(step).await;

        let landed = callback
            .http(callback_request(&token, &account).await)
            .await;
        redirected_to(&landed, "connected=klaviyo", "a new attempt");
        let keyed = connect.http(api_key(&token, &key)).await;
        assert_eq!(keyed.status, 201, "{}", keyed.body);
        assert_eq!(accounts_of(&token).await.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn secrets_manager_failures_at_start_up_are_503s_until_it_recovers() {
    let step = Matcher::AwsTarget("secretsmanager.");
    each_failure("Secrets Manager", move |failure| async move {
        let stage = Stage::new().await;
        // Down before the functions start: their start-up fetch fails, and they start anyway.
        stage.inject(step, failure).await;
        let (accounts, callback) =
            tokio::join!(stage.function("accounts"), stage.one_step_callback());
        let token = token_for(&unique("user")).await;
        let account = klaviyo_account();
        let returning = callback_request(&token, &account).await;

        let (listed, landed) = tokio::join!(
            accounts.http(list(&token)),
            callback.http(returning.clone())
        );
        assert_error(&listed, 503, "service_unavailable", "list");
        redirected_to(&landed, "error=klaviyo_connection_failed", "callback");
        stage.clear(step).await;

        // The same processes fetch the secrets on the next request and keep them.
        let listed = accounts.http(list(&token)).await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        let landed = callback.http(returning).await;
        redirected_to(&landed, "connected=klaviyo", "the same callback, retried");
        assert_eq!(accounts_of(&token).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn klaviyo_token_failures_fail_the_flow_and_store_nothing() {
    let step = Matcher::Path("/oauth/token");
    each_failure("Klaviyo token", move |failure| async move {
        let stage = Stage::new().await;
        let callback = stage.one_step_callback().await;
        let token = token_for(&unique("user")).await;
        let account = klaviyo_account();
        let returning = callback_request(&token, &account).await;

        stage.inject(step, failure).await;
        let landed = callback.http(returning).await;
        redirected_to(&landed, "error=klaviyo_connection_failed", "callback");
        assert!(accounts_of(&token).await.is_empty(), "nothing stored");
        stage.clear(step).await;

        let landed = callback
            .http(callback_request(&token, &account).await)
            .await;
        redirected_to(&landed, "connected=klaviyo", "a new attempt");
        assert_eq!(accounts_of(&token).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn klaviyo_accounts_failures_fail_the_flow_or_the_key_check_and_revoke_new_tokens() {
    let step = Matcher::Path("/api/accounts");
    each_failure("Klaviyo accounts", move |failure| async move {
        let Connecting {
            stage,
            connect,
            callback,
            token,
            account,
            returning,
            key,
        } = Connecting::new().await;

        stage.inject(step, failure).await;
        let (landed, keyed) = tokio::join!(
            callback.http(returning),
            connect.http(api_key(&token, &key)),
        );
        redirected_to(&landed, "error=klaviyo_connection_failed", "callback");
        if failure == Failure::Throttled {
            assert_error(&keyed, 429, "rate_limited", "api key");
            assert_eq!(
                keyed.header("retry-after"),
                Some("1"),
                "Klaviyo's Retry-After"
            );
        } else {
            assert_error(&keyed, 502, "klaviyo_unavailable", "api key");
        }
        assert!(!keyed.body.contains(&key), "the key is never echoed");
        assert!(accounts_of(&token).await.is_empty(), "nothing stored");
        assert!(
            refresh_tokens(&account, "active").await.is_empty(),
            "the new tokens were revoked"
        );
        stage.clear(step).await;

        let landed = callback
            .http(callback_request(&token, &account).await)
            .await;
        redirected_to(&landed, "connected=klaviyo", "a new attempt");
        let keyed = connect.http(api_key(&token, &key)).await;
        assert_eq!(keyed.status, 201, "{}", keyed.body);
    })
    .await;
}

#[tokio::test]
async fn klaviyo_accounts_failures_leave_a_tested_connection_as_it_was() {
    let step = Matcher::Path("/api/accounts");
    each_failure(
        "Klaviyo accounts (Test connection)",
        move |failure| async move {
            let Connecting {
                stage,
                connect,
                callback,
                token,
                account,
                returning,
                key,
            } = Connecting::new().await;
            let landed = callback.http(returning).await;
            redirected_to(&landed, "connected=klaviyo", "callback");
            let keyed = connect.http(api_key(&token, &key)).await;
            assert_eq!(keyed.status, 201, "{}", keyed.body);
            let before = accounts_of(&token).await;
            assert_eq!(before.len(), 2);

            stage.inject(step, failure).await;
            for connection in &before {
                let id = connection["id"].as_str().unwrap();
                let tested = connect.http(verify(&token, id)).await;
                let what = format!("test of {}", connection["authType"]);
                if failure == Failure::Throttled {
                    assert_error(&tested, 429, "rate_limited", &what);
                    assert_eq!(
                        tested.header("retry-after"),
                        Some("1"),
                        "Klaviyo's Retry-After"
                    );
                } else {
                    assert_error(&tested, 502, "klaviyo_unavailable", &what);
                }
                assert!(!tested.body.contains(&key), "the key is never echoed");
            }
            // Nothing changed: still active, not verified again, the OAuth token not refreshed.
            assert_eq!(accounts_of(&token).await, before, "unchanged");
            assert_eq!(
                refresh_tokens(&account, "rotated").await.len(),
                0,
                "no refresh"
            );
            stage.clear(step).await;

            for connection in &before {
                let id = connection["id"].as_str().unwrap();
                let tested = connect.http(verify(&token, id)).await;
                assert_eq!(tested.status, 200, "{}", tested.body);
                let tested = tested.json();
                assert_eq!(tested["account"]["status"], "active");
                assert!(
                    time_of(&tested["account"]["lastVerifiedAt"])
                        > time_of(&connection["lastVerifiedAt"]),
                    "verified again: {tested}"
                );
            }
        },
    )
    .await;
}

#[tokio::test]
async fn klaviyo_revoke_failures_still_disconnect_and_leave_the_revocation_queued() {
    let step = Matcher::Path("/oauth/revoke");
    // Phase one for every failure at once: disconnect while revoke fails. The refresh job
    // finishes every due revocation it finds, so it runs only after all cells have looked.
    let cells = join_all(Failure::ALL.map(|failure| async move {
        let stage = Stage::new().await;
        let disconnect = stage.function("disconnect").await;
        let token = token_for(&unique("user")).await;
        let account = klaviyo_account();
        let id = connected_id(&token, &account).await;

        stage.inject(step, failure).await;
        let removed = disconnect.http(delete(&token, &id)).await;
        assert_eq!(removed.status, 200, "{failure:?}: {}", removed.body);
        assert!(accounts_of(&token).await.is_empty(), "{failure:?}: listed");
        if failure == Failure::Malformed {
            // RFC 7009: a 200 means revoked and its body is ignored, so a 200 with an
            // unexpected body confirms the revocation like any other 200.
            assert_eq!(pending_revocations(&id).await, 0, "confirmed by the 200");
        } else {
            let active = refresh_tokens(&account, "active").await.len();
            assert_eq!(active, 1, "{failure:?}: not revoked yet");
            assert_eq!(pending_revocations(&id).await, 1, "{failure:?}: queued");
        }
        stage.clear(step).await;
        (failure, account, id)
    }))
    .await;

    // Klaviyo is back: the next refresh run (not behind any proxy) finishes them all.
    e2e::invoke_refresh().await;
    for (failure, account, id) in cells {
        if failure == Failure::Malformed {
            continue;
        }
        assert!(
            refresh_tokens(&account, "active").await.is_empty(),
            "{failure:?}: revoked by the refresh job"
        );
        assert_eq!(
            pending_revocations(&id).await,
            0,
            "{failure:?}: every trace gone"
        );
    }
}

/// A transaction that took effect but whose answer was lost: the SDK retries it and the retry
/// meets the applied transaction (DynamoDB's idempotency token would absorb it; moto ignores
/// the token). Connect and disconnect recognise their own write and succeed, exactly once.
#[tokio::test]
async fn transactions_whose_answer_was_lost_take_effect_once() {
    let step = Matcher::AwsTarget("DynamoDB_20120810.TransactWriteItems");
    let stage = Stage::new().await;
    let (connect, disconnect) =
        tokio::join!(stage.function("connect"), stage.function("disconnect"));
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();

    // Connect: one pending authorization that works, counted once against the rate limit.
    stage.inject(step, Failure::LostAnswer).await;
    let started = connect
        .http(ApiRequest::new("GET", "/api/oauth/connect/klaviyo").bearer(&token))
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(stage.aws.hits(), 1, "the transaction's answer was lost");
    let auth = url::Url::parse(started.json()["authUrl"].as_str().expect("authUrl")).unwrap();
    let landed = location(&authorize(&auth, &account, true).await).await;
    let handle = e2e::completion_of(&landed).expect("parked for completion");
    assert_eq!(e2e::complete(&token, &handle).await.0, 200);
    assert_eq!(connect_attempts(&user).await, 1, "counted once");

    // Disconnect: removed, its refresh token revoked at Klaviyo, nothing left queued.
    let id = connected_id(&token, &account).await;
    stage.inject(step, Failure::LostAnswer).await;
    let removed = disconnect.http(delete(&token, &id)).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(stage.aws.hits(), 2, "the transaction's answer was lost");
    assert!(accounts_of(&token).await.is_empty());
    assert!(
        refresh_tokens(&account, "active").await.is_empty(),
        "revoked at Klaviyo"
    );
    assert_eq!(pending_revocations(&id).await, 0, "nothing left queued");
}

// ---- nothing lost between two writes ----------------------------------------------------
//
// Each step whose first write comes after Klaviyo has answered: the fault proxy fails the
// write (or applies it and loses the answer), and the test shows what is kept, what is
// revoked, and that a retry converges.

const TRANSACTION: Matcher = Matcher::AwsTarget("DynamoDB_20120810.TransactWriteItems");

/// A reconnect whose transaction fails keeps the old tokens working and revokes the new ones;
/// the retry replaces them and revokes the old refresh token through the queue written in the
/// same transaction. A lost answer takes effect once.
#[tokio::test]
async fn a_reconnect_whose_write_fails_keeps_the_old_tokens_and_revokes_the_new() {
    let stage = Stage::new().await;
    let callback = stage.one_step_callback().await;
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let original = refresh_tokens(&account, "active").await;
    assert_eq!(original.len(), 1);

    stage.inject(TRANSACTION, Failure::ServerError).await;
    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    redirected_to(&landed, "error=klaviyo_connection_failed", "write failed");
    assert_eq!(
        refresh_tokens(&account, "active").await,
        original,
        "the stored token still works; the unstored new one was revoked"
    );
    assert_eq!(pending_revocations(&id).await, 0, "nothing queued");
    stage.clear(TRANSACTION).await;

    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    redirected_to(&landed, "connected=klaviyo", "retried");
    let active = refresh_tokens(&account, "active").await;
    assert_eq!(active.len(), 1, "only the new token is live");
    assert_ne!(active, original, "the replaced token was revoked");
    assert_eq!(pending_revocations(&id).await, 0, "its queue item is gone");

    let hits = stage.aws.hits();
    stage.inject(TRANSACTION, Failure::LostAnswer).await;
    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    redirected_to(&landed, "connected=klaviyo", "answer lost, applied once");
    assert_eq!(
        stage.aws.hits(),
        hits + 1,
        "the transaction's answer was lost"
    );
    let latest = refresh_tokens(&account, "active").await;
    assert_eq!(
        latest.len(),
        1,
        "the stored token is live, the replaced one revoked"
    );
    assert_ne!(latest, active);
    assert_eq!(accounts_of(&token).await.len(), 1);
    assert_eq!(pending_revocations(&id).await, 0);
}

/// Switching from OAuth to an API key: the OAuth token is revoked only once the key is
/// stored, so a failed write leaves the OAuth connection working.
#[tokio::test]
async fn switching_to_an_api_key_revokes_the_oauth_token_only_once_the_key_is_stored() {
    let stage = Stage::new().await;
    let connect = stage.function("connect").await;
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let id = connected_id(&token, &account).await;
    let key = register_api_key(&account).await;

    stage.inject(TRANSACTION, Failure::ServerError).await;
    let keyed = connect.http(api_key(&token, &key)).await;
    assert_error(&keyed, 503, "service_unavailable", "write failed");
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "the OAuth token still works"
    );
    let listed = accounts_of(&token).await;
    assert_eq!(listed[0]["authType"], "oauth", "still the OAuth connection");
    stage.clear(TRANSACTION).await;

    let keyed = connect.http(api_key(&token, &key)).await;
    assert_eq!(keyed.status, 201, "{}", keyed.body);
    assert_eq!(
        keyed.json()["account"]["id"],
        id.as_str(),
        "the same connection"
    );
    assert!(
        refresh_tokens(&account, "active").await.is_empty(),
        "the replaced OAuth token was revoked"
    );
    assert_eq!(pending_revocations(&id).await, 0);
    assert_eq!(accounts_of(&token).await[0]["authType"], "api_key");
}
