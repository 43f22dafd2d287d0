//! Completion bound to the user's own session (`CONNECT_COMPLETION=required`, the local
//! stack's setting): the callback parks Klaviyo's answer, and only the session of the user who
//! started the flow turns it into a connection. The attack it stops, end to end: an attacker
//! starts a connect and has a victim follow the authorize URL; the victim approves at
//! Klaviyo, and the victim's own page completes with the victim's session. Nothing is
//! connected to either, and the tokens Klaviyo issued are revoked. Also: replays, expiry,
//! concurrent completions, a request that dies between its two writes, DynamoDB failing
//! under the completion, a signed-out page declining, the rate limit, and the one-step flow
//! with completion off.

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::fault_proxy::{Failure, Matcher, Stage};
use e2e::lambda::{ApiRequest, LocalLambda};
use e2e::{
    accounts_of, api_url, auth_url, authorize, callback_request, complete, completion_attempts,
    completion_of, environment, http, invoke_refresh, klaviyo_account, land, location, raw_item,
    received, refresh_tokens, setting, settings_page, token_for, unique,
};
use futures::future::join_all;
use serde_json::json;
use shared::ParkedConnection;
use std::collections::HashMap;

/// `POST /api/oauth/connect/klaviyo/decline` without a JWT, as a signed-out page sends it.
async fn decline(handle: &str) -> serde_json::Value {
    let (status, body) = e2e::answer(
        http()
            .post(format!("{}/api/oauth/connect/klaviyo/decline", api_url()))
            .json(&json!({ "completion": handle })),
        "decline",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"success": true, "message": "Nothing was connected."})
    );
    body
}

/// The one body every refused completion gets.
fn assert_refused(status: reqwest::StatusCode, body: &serde_json::Value, what: &str) {
    assert_eq!(status, 404, "{what}: {body}");
    assert_eq!(body["success"], false, "{what}");
    assert_eq!(body["error"]["code"], "not_found", "{what}");
    assert_eq!(
        body["error"]["message"],
        "This connection could not be finished: it is unknown, expired, already used, or was started by another user.",
        "{what}"
    );
}

/// The parked item for `handle`, read straight from the table.
async fn parked_item(handle: &str) -> Option<HashMap<String, AttributeValue>> {
    raw_item(
        format!("REVOKE#{}", ParkedConnection::hash_handle(handle)),
        "REVOKE",
    )
    .await
}

/// Moves a parked result's completion window (and the revocation due after it) into the
/// past, as if the user had waited longer than ten minutes.
async fn backdate(handle: &str) {
    let sdk = shared::context::aws_sdk_config().await;
    let past = (e2e::now() - 120).to_string();
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(setting("TABLE_NAME"))
        .key(
            "pk",
            AttributeValue::S(format!("REVOKE#{}", ParkedConnection::hash_handle(handle))),
        )
        .key("sk", AttributeValue::S("REVOKE".into()))
        .update_expression("SET complete_by = :past, due_at = :past")
        .condition_expression("attribute_exists(pk)")
        .expression_attribute_values(":past", AttributeValue::N(past))
        .send()
        .await
        .expect("backdate the parked result");
}

/// A user who approved a connect of a fresh Klaviyo account: their token, the account and
/// the handle their page received.
async fn approved() -> (String, String, String) {
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let landed = land(&token, &account, None).await;
    let handle = completion_of(&landed).expect("parked for completion");
    (token, account, handle)
}

#[tokio::test]
async fn the_attack_connects_nobody_and_revokes_the_victims_tokens() {
    let attacker = token_for(&unique("attacker")).await;
    let victim = token_for(&unique("victim")).await;
    let victims_klaviyo = klaviyo_account();

    // The attacker starts a connect with their own session and sends the victim the URL.
    let auth = auth_url(&attacker, Some("Collected")).await;
    // The victim's browser follows it, the victim approves at Klaviyo, and Klaviyo sends the
    // browser back through the callback to the victim's settings page.
    let callback = authorize(&auth, &victims_klaviyo, true).await;
    let landed = location(&callback).await;
    let handle = completion_of(&landed).expect("parked for completion");
    assert!(landed.starts_with(&settings_page("connected=klaviyo&completion=")));
    assert_eq!(refresh_tokens(&victims_klaviyo, "active").await.len(), 1);

    // The victim's page completes with the victim's session: refused.
    let (status, body) = complete(&victim, &handle).await;
    assert_refused(status, &body, "the victim's session");

    // Nothing is connected to either user, the tokens are revoked at Klaviyo, and nothing
    // of the flow is left in the table.
    assert!(
        accounts_of(&attacker).await.is_empty(),
        "the attacker got nothing"
    );
    assert!(accounts_of(&victim).await.is_empty());
    assert!(refresh_tokens(&victims_klaviyo, "active").await.is_empty());
    assert_eq!(refresh_tokens(&victims_klaviyo, "revoked").await.len(), 1);
    let revokes = received(&victims_klaviyo, "revoke").await;
    assert_eq!(revokes.len(), 1, "Klaviyo was asked to revoke once");
    assert_eq!(revokes[0]["form"]["token_type_hint"], "refresh_token");
    assert!(
        parked_item(&handle).await.is_none(),
        "nothing parked is left"
    );

    // The handle is spent: not even the attacker, who started the flow, can use it now.
    let (status, body) = complete(&attacker, &handle).await;
    assert_refused(status, &body, "the attacker afterwards");
    assert!(accounts_of(&attacker).await.is_empty());
}

/// The attack's victim may have no session with the host app at all (no account, another
/// browser): their page cannot complete, so it declines, and the grant is revoked at once
/// instead of staying live for the rest of its window.
#[tokio::test]
async fn a_page_without_a_session_declines_and_the_grant_is_revoked_at_once() {
    let attacker = token_for(&unique("attacker")).await;
    let victims_klaviyo = klaviyo_account();
    let auth = auth_url(&attacker, None).await;
    let landed = location(&authorize(&auth, &victims_klaviyo, true).await).await;
    let handle = completion_of(&landed).expect("parked");

    decline(&handle).await;
    assert!(refresh_tokens(&victims_klaviyo, "active").await.is_empty());
    assert_eq!(received(&victims_klaviyo, "revoke").await.len(), 1);
    assert!(parked_item(&handle).await.is_none());
    // The attacker, had the handle leaked, finds nothing to complete.
    let (status, body) = complete(&attacker, &handle).await;
    assert_refused(status, &body, "after the decline");
    assert!(accounts_of(&attacker).await.is_empty());

    // The same answer for handles that are unknown, malformed or already spent.
    for other in [handle.as_str(), &"A".repeat(43), "x"] {
        decline(other).await;
    }
}

#[tokio::test]
async fn a_handle_completes_once_and_a_replay_changes_nothing() {
    let (token, account, handle) = approved().await;
    let (status, body) = complete(&token, &handle).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account"]["authType"], "oauth");
    assert!(
        parked_item(&handle).await.is_none(),
        "the parked result became the connection"
    );

    let (status, body) = complete(&token, &handle).await;
    assert_refused(status, &body, "a replay");
    let listed = accounts_of(&token).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["klaviyoAccountId"], account.as_str());
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "a replay revokes nothing: the tokens are the connection's now"
    );
    assert!(received(&account, "revoke").await.is_empty());
}

#[tokio::test]
async fn unknown_and_malformed_handles_are_the_same_404() {
    let token = token_for(&unique("user")).await;
    for handle in [
        "A".repeat(43),
        "short".to_owned(),
        "x".repeat(600),
        format!("{}=", "A".repeat(42)),
        String::new(),
    ] {
        let (status, body) = complete(&token, &handle).await;
        assert_refused(status, &body, &handle);
    }
    // A body without a handle is bad input, not an unknown handle.
    let (status, body) = e2e::answer(
        http()
            .post(format!("{}/api/oauth/connect/klaviyo/complete", api_url()))
            .bearer_auth(&token)
            .json(&json!({"completion": 42})),
        "complete",
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn an_expired_handle_is_refused_and_its_tokens_revoked() {
    let (token, account, handle) = approved().await;
    backdate(&handle).await;
    let (status, body) = complete(&token, &handle).await;
    assert_refused(status, &body, "expired");
    assert!(accounts_of(&token).await.is_empty());
    assert!(refresh_tokens(&account, "active").await.is_empty());
    assert_eq!(received(&account, "revoke").await.len(), 1);
    assert!(parked_item(&handle).await.is_none());
}

#[tokio::test]
async fn concurrent_completions_by_the_right_user_connect_once() {
    let (token, account, handle) = approved().await;
    let answers = join_all((0..4).map(|_| complete(&token, &handle))).await;
    let won: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .collect();
    assert_eq!(won.len(), 1, "exactly one completes: {answers:?}");
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_refused(*status, body, "a concurrent duplicate");
    }
    let listed = accounts_of(&token).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], won[0].1["account"]["id"]);
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "the losers revoked nothing"
    );
    assert!(received(&account, "revoke").await.is_empty());
}

/// Parked results nobody completes (the tab was closed, the page crashed, the browser
/// belonged to an attack's victim who never saw a page) are revoked by the refresh job once
/// their window has passed; before that the job leaves them alone.
#[tokio::test]
async fn parked_results_nobody_completes_are_revoked_by_the_refresh_job() {
    let (token, account, handle) = approved().await;
    invoke_refresh().await;
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "still waiting for completion"
    );
    assert!(parked_item(&handle).await.is_some());

    backdate(&handle).await;
    invoke_refresh().await;
    assert!(refresh_tokens(&account, "active").await.is_empty());
    assert_eq!(received(&account, "revoke").await.len(), 1);
    assert!(
        parked_item(&handle).await.is_none(),
        "the last copy is gone"
    );
    let (status, body) = complete(&token, &handle).await;
    assert_refused(status, &body, "after the job");
    assert!(accounts_of(&token).await.is_empty());
}

/// A completion that claimed the parked result and then died before its transaction (the
/// Lambda timed out or crashed between the two writes): the user's retry is refused (the
/// claim is not theirs), and the job revokes the result when its window has passed. Nothing
/// live is forgotten.
#[tokio::test]
async fn a_completion_that_dies_between_its_writes_leaves_nothing_live() {
    let (token, account, handle) = approved().await;
    let store = environment().await.store();
    store
        .claim_parked(
            &ParkedConnection::hash_handle(&handle),
            "a-request-that-died",
        )
        .await
        .expect("claimed by the request that died");

    let (status, body) = complete(&token, &handle).await;
    assert_refused(status, &body, "held by another request");
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "a request that does not hold the claim revokes nothing"
    );

    backdate(&handle).await;
    invoke_refresh().await;
    assert!(refresh_tokens(&account, "active").await.is_empty());
    assert!(parked_item(&handle).await.is_none());
    assert!(accounts_of(&token).await.is_empty());
}

const TRANSACTION: Matcher = Matcher::AwsTarget("DynamoDB_20120810.TransactWriteItems");

fn complete_request(token: &str, handle: &str) -> ApiRequest {
    ApiRequest::new("POST", "/api/oauth/connect/klaviyo/complete")
        .bearer(token)
        .json(&json!({ "completion": handle }))
}

/// DynamoDB failing under the completion's transaction: a 503 that gives the claim back, so
/// the page's retry completes; an answer lost after the write landed is still a success.
#[tokio::test]
async fn a_completion_whose_write_fails_can_be_retried() {
    let stage = Stage::new().await;
    let connect = stage.function("connect").await;
    let (token, account, handle) = approved().await;

    stage.inject(TRANSACTION, Failure::ServerError).await;
    let failed = connect.http(complete_request(&token, &handle)).await;
    stage.clear(TRANSACTION).await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    assert_eq!(failed.json()["error"]["code"], "service_unavailable");
    assert!(accounts_of(&token).await.is_empty());
    assert!(
        parked_item(&handle).await.is_some(),
        "still parked, claim given back"
    );

    let retried = connect.http(complete_request(&token, &handle)).await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(accounts_of(&token).await.len(), 1);

    // Another flow whose transaction lands but whose answer is lost.
    let landed = land(&token, &account, None).await;
    let second = completion_of(&landed).unwrap();
    stage.inject(TRANSACTION, Failure::LostAnswer).await;
    let answered = connect.http(complete_request(&token, &second)).await;
    stage.clear(TRANSACTION).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    let listed = accounts_of(&token).await;
    assert_eq!(listed.len(), 1, "the reconnect updated the connection");
    assert_eq!(
        refresh_tokens(&account, "active").await.len(),
        1,
        "the new tokens are live, the replaced ones revoked"
    );

    // A transaction that lands while every answer to it is lost: the completion reads what
    // is stored, finds its own tokens and answers 200 rather than a 503 whose retry would
    // find the handle used.
    let landed = land(&token, &account, None).await;
    let third = completion_of(&landed).unwrap();
    stage.inject(TRANSACTION, Failure::LostAnswers).await;
    let answered = connect.http(complete_request(&token, &third)).await;
    stage.clear(TRANSACTION).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(
        answered.json()["account"]["id"],
        listed[0]["id"],
        "the same connection, updated"
    );
    assert!(parked_item(&third).await.is_none());
}

#[tokio::test]
async fn completions_are_rate_limited_per_user_on_their_own_counter() {
    let rate = environment().await.config.connect_rate;
    let user = unique("user");
    let token = token_for(&user).await;
    let unknown = "A".repeat(43);
    let mut limited = None;
    for attempt in 0..=2 * rate.limit {
        let response = http()
            .post(format!("{}/api/oauth/connect/klaviyo/complete", api_url()))
            .bearer_auth(&token)
            .json(&json!({ "completion": unknown }))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=u64::from(rate.window_secs)).contains(&retry_after));
            limited = Some(attempt);
            break;
        }
        assert_eq!(response.status(), 404);
    }
    let admitted = limited.expect("limited within two windows");
    assert!(
        (rate.limit..=2 * rate.limit).contains(&admitted),
        "{admitted}"
    );
    assert!(completion_attempts(&user).await >= u64::from(rate.limit));
    assert_eq!(
        e2e::connect_attempts(&user).await,
        0,
        "the connect counter is separate"
    );
}

/// `CONNECT_COMPLETION=off`: the one-step flow for host apps that accept the risk. The
/// callback connects at once, to the user who started the flow, whoever approved it: the
/// attack above succeeds, which is why it is not the default.
#[tokio::test]
async fn with_completion_off_the_callback_connects_whoever_started_the_flow() {
    let callback =
        LocalLambda::start("callback", &[("CONNECT_COMPLETION", "off".to_owned())]).await;
    let attacker = token_for(&unique("attacker")).await;
    let victims_klaviyo = klaviyo_account();
    let landed = callback
        .http(callback_request(&attacker, &victims_klaviyo).await)
        .await;
    assert_eq!(landed.status, 302, "{}", landed.body);
    assert_eq!(
        landed.header("location"),
        Some(settings_page("connected=klaviyo").as_str()),
        "no completion step"
    );
    let collected = accounts_of(&attacker).await;
    assert_eq!(collected.len(), 1, "the risk completion=required removes");
    assert_eq!(collected[0]["klaviyoAccountId"], victims_klaviyo.as_str());
}
