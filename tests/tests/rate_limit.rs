//! Per-user rate limiting on the connect routes (OAuth start and API key share one budget;
//! completions and connection tests have their own), kept in DynamoDB with a TTL and
//! answered with 429 and `retry-after`.

use e2e::{
    api_url, connect, connect_api_key, environment, http, klaviyo_account, raw_item, received,
    register_api_key, token_for, unique,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Sends `attempt` until it is limited (at most two windows' worth, since a window may roll
/// over mid-loop) and returns how many were admitted and the limited response's
/// `retry-after` and body.
async fn until_limited(
    limit: u32,
    attempt: impl Fn() -> reqwest::RequestBuilder,
) -> (u32, u64, Value) {
    for admitted in 0..=2 * limit {
        let response = attempt().send().await.expect("the function answers");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .expect("retry-after is whole seconds");
            return (admitted, retry_after, response.json().await.unwrap());
        }
        assert!(
            response.status().is_success() || response.status() == StatusCode::BAD_REQUEST,
            "admitted attempts answer normally: {}",
            response.status()
        );
    }
    panic!("never limited after {} attempts", 2 * limit + 1);
}

#[tokio::test]
async fn oauth_starts_are_limited_per_user_with_retry_after() {
    let rate = environment().await.config.connect_rate;
    let user = unique("user");
    let token = token_for(&user).await;
    let url = format!("{}/api/oauth/connect/klaviyo", api_url());
    let (admitted, retry_after, body) =
        until_limited(rate.limit, || http().get(&url).bearer_auth(&token)).await;
    assert!(
        (rate.limit..=2 * rate.limit).contains(&admitted),
        "{admitted} admitted with a limit of {}",
        rate.limit
    );
    assert!((1..=u64::from(rate.window_secs)).contains(&retry_after));
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "rate_limited");

    // The counter is in the table, at the limit, and expires when its window ends.
    let now = e2e::now();
    let window = rate.window_at(time::OffsetDateTime::from_unix_timestamp(now).unwrap());
    let counter = match raw_item(
        format!("RATE#{user}"),
        &format!("CONNECT#{}", window.starts_at),
    )
    .await
    {
        Some(item) => item,
        // The window rolled over between the 429 and this read: the previous one holds it.
        None => raw_item(
            format!("RATE#{user}"),
            &format!("CONNECT#{}", window.starts_at - i64::from(rate.window_secs)),
        )
        .await
        .expect("the rate counter is stored"),
    };
    assert_eq!(counter["hits"].as_n().unwrap(), &rate.limit.to_string());
    let expires_at: i64 = counter["expires_at"].as_n().unwrap().parse().unwrap();
    assert!(
        expires_at > now - i64::from(rate.window_secs)
            && expires_at <= now + i64::from(rate.window_secs)
    );

    // Another user is not affected.
    let (status, body) = connect(&token_for(&unique("user")).await, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn api_key_checks_are_limited_before_klaviyo_is_asked() {
    let rate = environment().await.config.connect_rate;
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let key = register_api_key(&account).await;
    let url = format!("{}/api/oauth/connect/klaviyo/api-key", api_url());
    let body = json!({"apiKey": key, "accountName": "Rate limited"});
    let (admitted, retry_after, limited) = until_limited(rate.limit, || {
        http().post(&url).bearer_auth(&token).json(&body)
    })
    .await;
    assert!((rate.limit..=2 * rate.limit).contains(&admitted));
    assert!(retry_after >= 1);
    assert_eq!(limited["error"]["code"], "rate_limited");
    // Every admitted attempt asked Klaviyo once; the limited one never reached it.
    assert_eq!(
        received(&account, "accounts").await.len(),
        admitted as usize
    );

    // Straight after, the OAuth route shares the budget (unless the window just rolled).
    let (status, body) = connect_api_key(&token, &body).await;
    if retry_after > 2 {
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        let (status, _) = connect(&token, None).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
}

#[tokio::test]
async fn connection_tests_have_a_limit_of_their_own_before_klaviyo_is_asked() {
    let rate = environment().await.config.connect_rate;
    let token = token_for(&unique("user")).await;
    let account = klaviyo_account();
    let key = register_api_key(&account).await;
    let (status, connected) = connect_api_key(&token, &json!({"apiKey": key})).await;
    assert_eq!(status, StatusCode::CREATED, "{connected}");
    let id = connected["account"]["id"].as_str().unwrap().to_owned();
    let url = format!("{}/api/oauth/accounts/{id}/verify", api_url());
    let (admitted, retry_after, limited) =
        until_limited(rate.limit, || http().post(&url).bearer_auth(&token)).await;
    assert!((rate.limit..=2 * rate.limit).contains(&admitted));
    assert!(retry_after >= 1);
    assert_eq!(limited["error"]["code"], "rate_limited");
    // The connect itself and every admitted test asked Klaviyo; the limited one did not.
    assert_eq!(
        received(&account, "accounts").await.len(),
        admitted as usize + 1
    );
    // Connecting is counted apart (unless the window just rolled, it is not limited).
    let other = register_api_key(&klaviyo_account()).await;
    let (status, body) = connect_api_key(&token, &json!({"apiKey": other})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
