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

fn b64(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

/// `header.claims.HMAC-SHA256(key)` for any header, so the server's algorithm pinning (not
/// just the signature check) is what refuses it.
fn hmac_token(key: &str, header: &Value, claims: &Value) -> String {
    use sha2::{Digest, Sha256};
    let input = format!("{}.{}", b64(header), b64(claims));
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key.as_bytes()));
    } else {
        block[..key.len()].copy_from_slice(key.as_bytes());
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(input.as_bytes())
        .finalize();
    let mac = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    use base64::Engine;
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac);
    format!("{input}.{signature}")
}

async fn answer_status(token: &str) -> (StatusCode, Value) {
    let response = http()
        .get(format!("{}/api/oauth/accounts", api_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn protected_routes_refuse_requests_without_a_valid_token() {
    let client = http();
    let key = jwt_key().await;
    let user = unique("user");
    let valid = claims(&user);
    let with = |field: &str, value: Value| {
        let mut c = valid.clone();
        c[field] = value;
        c
    };
    let without = |field: &str| {
        let mut c = valid.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };
    let hs256 = |claims: &Value| sign(Algorithm::HS256, &key, claims);
    // Tokens whose header we write ourselves, signed with the right key by HMAC-SHA256.
    let forged = |header: Value, claims: &Value| hmac_token(&key, &header, claims);
    let genuine = hs256(&valid);
    let (genuine_head, _) = genuine.split_once('.').unwrap();
    let genuine_sig = genuine.rsplit('.').next().unwrap();
    let forgeries = [
        // alg none, unsigned and with an empty signature.
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&valid)
        ),
        format!("{}.{}", b64(&json!({"alg": "none"})), b64(&valid)),
        // Other algorithms, including RS256 "verified" with the HMAC key (key confusion).
        sign(Algorithm::HS384, &key, &valid),
        sign(Algorithm::HS512, &key, &valid),
        forged(json!({"alg": "RS256", "typ": "JWT"}), &valid),
        forged(json!({"alg": "hs256", "typ": "JWT"}), &valid),
        forged(
            json!({"alg": "HS256", "crit": ["exp"], "typ": "JWT"}),
            &valid,
        ),
        // A valid signature on different claims (payload swapped).
        format!(
            "{genuine_head}.{}.{genuine_sig}",
            b64(&with("sub", json!("someone-else")))
        ),
        // Wrong key; expired; not yet valid; wrong issuer and audience.
        sign(Algorithm::HS256, "wrong-secret", &valid),
        hs256(&with("exp", json!(now() - 600))),
        hs256(&with("nbf", json!(now() + 600))),
        hs256(&with("iss", json!("https://evil.example.com"))),
        hs256(&with("aud", json!("someone-else"))),
        // Missing or unusable claims.
        hs256(&without("exp")),
        hs256(&without("sub")),
        hs256(&with("sub", json!(""))),
        hs256(&with("sub", json!("u".repeat(257)))),
        hs256(&with("sub", json!("user\u{0}id"))),
        hs256(&with("sub", json!(42))),
        hs256(&with("exp", json!("tomorrow"))),
        // Garbage shapes.
        "not-a-jwt".to_owned(),
        "a.b.c".to_owned(),
        format!("{genuine}.extra"),
        "x".repeat(16 * 1024),
    ];
    // The hand-made HS256 path is sound: the same construction with the right header passes.
    let control = forged(json!({"alg": "HS256", "typ": "JWT"}), &valid);
    let (status, _) = answer_status(&control).await;
    assert_eq!(status, StatusCode::OK, "hand-signed HS256 control token");
    let mut bad_tokens = vec![
        None,
        Some("Bearer".to_owned()),
        Some("Bearer ".to_owned()),
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some(format!("Token {genuine}")),
        Some(genuine.clone()),
    ];
    bad_tokens.extend(forgeries.iter().map(|t| Some(format!("Bearer {t}"))));
    for (method, path) in protected_routes() {
        for authorization in &bad_tokens {
            let mut request = client.request(method.clone(), format!("{}{path}", api_url()));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            let shown: String = authorization
                .iter()
                .flat_map(|a| a.chars().take(80))
                .collect();
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.as_bytes()),
                Some(&b"Bearer"[..]),
                "{method} {path} with {shown:?}: {}",
                response.status()
            );
            let body = error_body(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
            let text = body.to_string();
            assert!(!text.contains(&key), "no secret in the error body");
            assert!(!text.contains(genuine_sig), "no token in the error body");
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

    // The frontend's own origin is always allowed; ALLOWED_ORIGINS only adds to it.
    let frontend = url::Url::parse(&setting("FRONTEND_URL")).unwrap();
    let frontend = frontend.origin().ascii_serialization();
    assert!(!allowed.split(',').any(|o| o.trim() == frontend));
    let own = client
        .request(Method::OPTIONS, &url)
        .header("origin", &frontend)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        own.headers()["access-control-allow-origin"],
        frontend.as_str()
    );

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

/// Paths no route names get the one error shape, with CORS for allowed origins (API
/// Gateway's `$default` route goes to the accounts function, as the local router does).
#[tokio::test]
async fn unknown_paths_get_404_in_the_one_error_shape_with_cors() {
    let allowed = setting("ALLOWED_ORIGINS");
    let token = token_for(&unique("user")).await;
    for path in [
        "/",
        "/api",
        "/api/oauth/unknown",
        "/api/oauth/accounts/a/b",
        "/favicon.ico",
    ] {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let response = http()
                .request(method.clone(), format!("{}{path}", api_url()))
                .header("origin", &allowed)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response
                    .headers()
                    .get("access-control-allow-origin")
                    .map(|v| v.to_str().unwrap()),
                Some(allowed.as_str()),
                "{method} {path}"
            );
            let body = error_body(response, StatusCode::NOT_FOUND, "not_found").await;
            assert_eq!(
                body["error"]["message"], "There is no such route.",
                "{body}"
            );
        }
    }
}
