//! Security cases not covered elsewhere: a sealed credential copied onto another user's row
//! does not open, and oversized, control-character and non-UTF-8 inputs get clear 4xx
//! answers in the one error shape (never a 5xx, never an echo). The JWT forgery matrix is in
//! http_edge.rs, state replay and open redirects in oauth.rs, IDOR in accounts.rs.

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::lambda::{ApiRequest, LocalLambda};
use e2e::{
    api_url, connected_id, environment, http, klaviyo_account, raw_item, setting, token_for, unique,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{AccessTokenError, AccessTokens, Credentials, UserId};

#[tokio::test]
async fn a_ciphertext_copied_onto_another_users_row_does_not_open() {
    let (alice, bob) = (unique("alice"), unique("bob"));
    let alice_id = connected_id(&token_for(&alice).await, &klaviyo_account()).await;
    let bob_id = connected_id(&token_for(&bob).await, &klaviyo_account()).await;

    // An attacker with write access to the table moves Alice's sealed tokens to Bob's row.
    let alice_row = raw_item(format!("USER#{alice}"), &format!("CONN#{alice_id}"))
        .await
        .expect("Alice's row");
    let sealed = alice_row["credentials"].clone();
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(setting("TABLE_NAME"))
        .key("pk", AttributeValue::S(format!("USER#{bob}")))
        .key("sk", AttributeValue::S(format!("CONN#{bob_id}")))
        .update_expression("SET credentials = :c")
        .expression_attribute_values(":c", sealed)
        .send()
        .await
        .unwrap();

    let env = environment().await;
    let store = env.store();
    let sealer = env.sealer();
    let bob_user = UserId::parse(&bob).unwrap();
    let moved = store.get_connection(&bob_user, &bob_id).await.unwrap();
    assert!(
        Credentials::open(&sealer, &moved).await.is_err(),
        "bound to Alice's user and connection id by the KMS context and the AAD"
    );
    let alice_user = UserId::parse(&alice).unwrap();
    let original = store.get_connection(&alice_user, &alice_id).await.unwrap();
    assert!(
        Credentials::open(&sealer, &original).await.is_ok(),
        "Alice's still opens"
    );

    // What a consumer of the tokens sees for Bob: an error, never Alice's token.
    let tokens = AccessTokens::new(&env, env.klaviyo().await.unwrap());
    match tokens.for_connection(&bob_user, &bob_id).await {
        Err(AccessTokenError::Unavailable(_)) | Err(AccessTokenError::NeedsReauth) => {}
        other => panic!(
            "Bob must not get a credential: {:?}",
            other.map(|_| "a credential")
        ),
    }
}

/// Sends `request` and checks the error shape, the status and that nothing of `echo` comes
/// back.
async fn refused(request: reqwest::RequestBuilder, status: StatusCode, code: &str, echo: &str) {
    let response = request.send().await.expect("the function answers");
    assert_eq!(response.status(), status, "{}", response.url().path());
    assert_eq!(
        response.headers()["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], code, "{text}");
    if !echo.is_empty() {
        assert!(!text.contains(echo), "the input is not echoed: {text}");
    }
}

#[tokio::test]
async fn oversized_and_control_character_inputs_get_clear_4xx_errors() {
    let token = token_for(&unique("user")).await;
    let base = api_url();
    let connect = format!("{base}/api/oauth/connect/klaviyo");
    let key_route = format!("{base}/api/oauth/connect/klaviyo/api-key");
    let long_name = "n".repeat(10_000);
    for name in [
        long_name.as_str(),
        "bell\u{7}",
        "nul\u{0}name",
        "esc\u{1b}[31m",
        "line\nbreak",
        "   ",
        "x\u{85}y",
    ] {
        let request = http()
            .get(&connect)
            .bearer_auth(&token)
            .query(&[("accountName", name)]);
        refused(
            request,
            StatusCode::BAD_REQUEST,
            "invalid_account_name",
            &long_name,
        )
        .await;
    }
    let key = "pk_sandbox_0123456789abcdef";
    for body in [
        json!({"apiKey": key, "accountName": "tab\there"}),
        json!({"apiKey": key, "accountName": "x".repeat(101)}),
    ] {
        let request = http().post(&key_route).bearer_auth(&token).json(&body);
        refused(
            request,
            StatusCode::BAD_REQUEST,
            "invalid_account_name",
            key,
        )
        .await;
    }
    for bad_key in [
        "pk_with\u{0}nul_0123456789",
        "pk_\u{202e}0123456789abc",
        &format!("pk_{}", "a".repeat(3000)),
    ] {
        let request = http()
            .post(&key_route)
            .bearer_auth(&token)
            .json(&json!({"apiKey": bad_key}));
        refused(request, StatusCode::BAD_REQUEST, "invalid_api_key", bad_key).await;
    }
    let huge = json!({"apiKey": key, "accountName": "n".repeat(8 * 1024)});
    let request = http().post(&key_route).bearer_auth(&token).json(&huge);
    refused(
        request,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "",
    )
    .await;
    // Ids that are not connection ids, however odd: the same 404 as a stranger's id.
    for id in [
        "%00",
        "%0A%0D",
        "..%2F..%2Fetc",
        &"a".repeat(4096),
        "%F0%9F%92%A3",
    ] {
        let request = http()
            .delete(format!("{base}/api/oauth/accounts/{id}"))
            .bearer_auth(&token);
        refused(request, StatusCode::NOT_FOUND, "not_found", "").await;
    }
    // A huge Authorization header is just an invalid token.
    let request = http()
        .get(format!("{base}/api/oauth/accounts"))
        .header("authorization", format!("Bearer {}", "x".repeat(32 * 1024)));
    refused(request, StatusCode::UNAUTHORIZED, "unauthorized", "").await;
}

/// A body that is not UTF-8 reaches Lambda base64-encoded from API Gateway. `cargo lambda
/// watch` cannot carry it, so this sends the API Gateway event to the function directly.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_400_not_a_crash() {
    let connect = LocalLambda::start("connect", &[]).await;
    let token = token_for(&unique("user")).await;
    for (content_type, status, code) in [
        ("application/json", 400, "invalid_json"),
        ("application/octet-stream", 415, "unsupported_media_type"),
    ] {
        let reply = connect
            .http(
                ApiRequest::new("POST", "/api/oauth/connect/klaviyo/api-key")
                    .bearer(&token)
                    .header("content-type", content_type)
                    .binary_body(&[0xff, 0xfe, 0x17, b'{', 0x80]),
            )
            .await;
        assert_eq!(reply.status, status, "{content_type}: {}", reply.body);
        assert_eq!(reply.json()["error"]["code"], code);
        assert!(reply.header("strict-transport-security").is_some());
    }
    // The process is still serving.
    let reply = connect
        .http(ApiRequest::new("GET", "/api/oauth/connect/klaviyo").bearer(&token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
