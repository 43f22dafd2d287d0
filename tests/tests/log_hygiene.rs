//! Log hygiene: a full journey through every function (connect, callback, completion, list,
//! API key, refresh, disconnect, and the usual failures) while the functions' complete output is
//! captured; no token, code, state, verifier, API key, client secret, JWT or Authorization
//! header value may appear in it.

use base64::Engine;
use e2e::{
    accounts_of, authorize, connect_api_key, connect_due, disconnect, http, invoke_refresh,
    issued_tokens, klaviyo_account, location, received, register_api_key, setting, token_for,
    unique,
};
use serde_json::{Value, json};

async fn secret_value(arn_setting: &str) -> String {
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(setting(arn_setting))
        .send()
        .await
        .unwrap()
        .secret_string
        .unwrap()
}

fn strings(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .filter_map(|v| v["token"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn no_secret_reaches_the_logs_of_a_full_journey() {
    let user = unique("user");
    let token = token_for(&user).await;
    let account = klaviyo_account();
    let mut secrets: Vec<(String, String)> = Vec::new();

    // OAuth: connect, consent, callback (and a replay).
    let auth = e2e::auth_url(&token, Some("Journey")).await;
    let state = auth
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let callback = authorize(&auth, &account, true).await;
    let code = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let landed = location(&callback).await;
    let handle = e2e::completion_of(&landed).expect("parked for completion");
    // A stranger's attempt with the handle is refused (a security event, the tokens revoked);
    // the flow is then repeated and completed by its user.
    let stranger = token_for(&unique("stranger")).await;
    assert_eq!(e2e::complete(&stranger, &handle).await.0, 404);
    let retried = e2e::land(&token, &account, Some("Journey")).await;
    let completed = e2e::completion_of(&retried).expect("parked again");
    assert_eq!(e2e::complete(&token, &completed).await.0, 200);
    assert!(
        location(&callback)
            .await
            .ends_with("klaviyo_connection_failed")
    );

    // The same account again, due for refresh, refreshed by the function; then listed.
    let due_account = klaviyo_account();
    let due_id = connect_due(&token, &due_account).await;
    let summary = invoke_refresh().await;
    assert!(summary["selected"].is_u64());
    assert_eq!(accounts_of(&token).await.len(), 2);

    // API key: rejected, then accepted.
    let key_account = klaviyo_account();
    let key = register_api_key(&key_account).await;
    let bogus = format!("pk_sandbox_bogus_{}", uuid::Uuid::new_v4().simple());
    assert_eq!(
        connect_api_key(&token, &json!({"apiKey": bogus})).await.0,
        400
    );
    assert_eq!(
        connect_api_key(&token, &json!({"apiKey": key})).await.0,
        201
    );

    // Failures that log security events.
    let refused = http()
        .get(format!("{}/api/oauth/accounts", e2e::api_url()))
        .header("authorization", format!("Bearer {token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Disconnect (revocation at Klaviyo).
    let (status, _) = disconnect(&token, &due_id).await;
    assert_eq!(status, 200);

    let exchanges = received(&account, "token").await;
    let verifier = exchanges[0]["form"]["code_verifier"]
        .as_str()
        .unwrap()
        .to_owned();
    let basic = exchanges[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    for account in [&account, &due_account] {
        let issued = issued_tokens(account).await;
        for t in strings(issued["access_tokens"].as_array().unwrap())
            .into_iter()
            .chain(strings(issued["refresh_tokens"].as_array().unwrap()))
        {
            secrets.push(("Klaviyo token".into(), t));
        }
    }
    let client_secret = secret_value("KLAVIYO_CLIENT_SECRET_ARN").await;
    let jwt_key = secret_value("JWT_SECRET_ARN").await;
    secrets.extend([
        ("JWT".into(), token.clone()),
        (
            "JWT signature".into(),
            token.rsplit('.').next().unwrap().to_owned(),
        ),
        ("state".into(), state),
        ("completion handle".into(), handle),
        ("completion handle".into(), completed),
        ("code".into(), code),
        ("PKCE verifier".into(), verifier),
        ("API key".into(), key),
        ("rejected API key".into(), bogus),
        ("client secret".into(), client_secret.clone()),
        ("Basic header".into(), basic),
        (
            "Basic credentials".into(),
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{client_secret}", setting("KLAVIYO_CLIENT_ID"))),
        ),
        ("JWT key".into(), jwt_key),
    ]);

    // Give the functions' output a moment to reach the file.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let log = std::fs::read_to_string(setting("FUNCTIONS_LOG")).expect("the functions' log");
    for event in [
        "oauth_started",
        "klaviyo_connected",
        "oauth_state_rejected",
        "oauth_awaiting_completion",
        "connect_completion_rejected",
        "refresh_summary",
        "auth_failure",
        "klaviyo_disconnected",
    ] {
        assert!(
            log.contains(event),
            "the log was captured ({event} missing)"
        );
    }
    for (what, value) in &secrets {
        assert!(value.len() >= 8, "{what} is long enough to search for");
        assert!(
            !log.contains(value.as_str()),
            "{what} appears in the functions' log"
        );
    }
}
