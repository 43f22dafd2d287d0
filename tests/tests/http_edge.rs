//! The functions over real HTTP under `cargo lambda watch`: routing with the production
//! paths, authentication, the error shape, security headers and CORS on every response.

use e2e::{api_url, claims, http, jwt_key, now, setting, sign, token_for, unique};
use jsonwebtoken::Algorithm;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

const SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    ),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

/// Every route that takes a JWT, with its method.
fn protected_routes() -> Vec<(Method, String)> {
    vec![
        (Method::GET, "/api/oauth/connect/klaviyo".into()),
        (Method::POST, "/api/oauth/connect/klaviyo/api-key".into()),
        (Method::GET, "/api/oauth/accounts".into()),
        (
            Method::DELETE,
            format!("/api/oauth/accounts/{}", unique("acct")),
        ),
    ]
}

fn assert_security_headers(response: &Response) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(
            response.headers().get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on {} {}",
            response.status(),
            response.url()
        );
    }
}

async fn error_body(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "{}", response.url());
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_security_headers(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], code);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "only success and error: {body}"
    );
    body
}

#[tokio::test]
async fn protected_routes_refuse_requests_without_a_valid_token() {
    let client = http();
    let key = jwt_key().await;
    let user = unique("user");
    let mut expired = claims(&user);
    expired["exp"] = json!(now() - 600);
    let bad_tokens = [
        None,
        Some("Bearer".to_owned()),
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some("Bearer not-a-jwt".to_owned()),
        Some(format!("Bearer {}", sign(Algorithm::HS256, &key, &expired))),
        Some(format!(
            "Bearer {}",
            sign(Algorithm::HS256, "wrong-secret", &claims(&user))
        )),
        Some(format!(
            "Bearer {}",
            sign(Algorithm::HS384, &key, &claims(&user))
        )),
    ];
    for (method, path) in protected_routes() {
        for authorization in &bad_tokens {
            let mut request = client.request(method.clone(), format!("{}{path}", api_url()));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body = error_body(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
            let text = body.to_string();
            assert!(!text.contains(&key), "no secret in the error body");
        }
    }
}

#[tokio::test]
async fn a_valid_token_gets_past_authentication_on_every_protected_route() {
    let client = http();
    let token = token_for(&unique("user")).await;
    for (method, path) in protected_routes() {
        let response = client
            .request(method.clone(), format!("{}{path}", api_url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_ne!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        assert!(response.status().as_u16() < 500, "{method} {path}");
        assert_security_headers(&response);
        // Answered by our handler (its JSON), not by the local router.
        let body: Value = response.json().await.unwrap();
        assert!(
            body.get("success").is_some() || body.get("authUrl").is_some(),
            "{method} {path}: {body}"
        );
    }
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow() {
    let client = http();
    let token = token_for(&unique("user")).await;
    let cases = [
        (Method::POST, "/api/oauth/accounts".to_owned(), "GET"),
        (
            Method::GET,
            format!("/api/oauth/accounts/{}", unique("acct")),
            "DELETE",
        ),
        (Method::PUT, "/api/oauth/connect/klaviyo".to_owned(), "GET"),
        (
            Method::GET,
            "/api/oauth/connect/klaviyo/api-key".to_owned(),
            "POST",
        ),
        (Method::POST, "/klaviyo/oauthcallback".to_owned(), "GET"),
    ];
    for (method, path, allowed) in cases {
        let response = client
            .request(method.clone(), format!("{}{path}", api_url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains(allowed), "{method} {path}: allow {allow}");
        error_body(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
    }
}

#[tokio::test]
async fn cors_preflight_and_responses_follow_the_allowlist() {
    let client = http();
    let allowed = setting("ALLOWED_ORIGINS");
    let url = format!("{}/api/oauth/accounts", api_url());

    let preflight = client
        .request(Method::OPTIONS, &url)
        .header("origin", &allowed)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        allowed.as_str()
    );
    assert!(
        preflight.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    assert!(
        preflight.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("GET")
    );
    assert_security_headers(&preflight);

    for origin in [
        "https://evil.example.com",
        "null",
        &format!("{allowed}.evil.example.com"),
    ] {
        let refused = client
            .request(Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
            .await
            .unwrap();
        assert!(
            refused
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{origin}"
        );
        error_body(refused, StatusCode::FORBIDDEN, "origin_not_allowed").await;

        let plain = client
            .get(&url)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert!(
            plain.headers().get("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }

    // An error response to an allowed origin is still readable by the page.
    let denied = client
        .get(&url)
        .header("origin", &allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(
        denied.headers()["access-control-allow-origin"],
        allowed.as_str()
    );
    error_body(denied, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn the_callback_needs_no_token_and_carries_security_headers() {
    let response = http()
        .get(format!(
            "{}/klaviyo/oauthcallback?code=x&state=y",
            api_url()
        ))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);
    assert_security_headers(&response);
}
