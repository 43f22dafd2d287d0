//! The JWT matrix, with the HS256 key read from the local Secrets Manager the way the
//! functions read it.

use e2e::{claims, environment, jwt_key, now, sign, unique};
use jsonwebtoken::Algorithm;
use serde_json::json;
use shared::adapters::auth::AuthError;

fn b64(value: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn jwt_matrix() {
    let verifier = environment().await.jwt_verifier().await.unwrap();
    let key = jwt_key().await;
    let user = unique("user");
    let valid = claims(&user);
    let with = |field: &str, value: serde_json::Value| {
        let mut c = valid.clone();
        c[field] = value;
        c
    };
    let without = |field: &str| {
        let mut c = valid.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };

    assert_eq!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, &valid))
            .unwrap()
            .as_str(),
        user
    );

    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&valid)
    );
    let rs256_header = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "typ": "JWT"})),
        b64(&valid),
        "c2lnbmF0dXJl"
    );
    let cases = [
        (
            "expired",
            sign(Algorithm::HS256, &key, &with("exp", json!(now() - 600))),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            sign(Algorithm::HS256, &key, &with("nbf", json!(now() + 600))),
            AuthError::NotYetValid,
        ),
        (
            "wrong secret",
            sign(Algorithm::HS256, "not-the-secret", &valid),
            AuthError::Signature,
        ),
        ("alg none", unsigned, AuthError::Algorithm),
        (
            "HS384",
            sign(Algorithm::HS384, &key, &valid),
            AuthError::Algorithm,
        ),
        (
            "HS512",
            sign(Algorithm::HS512, &key, &valid),
            AuthError::Algorithm,
        ),
        ("RS256 header", rs256_header, AuthError::Algorithm),
        (
            "wrong issuer",
            sign(Algorithm::HS256, &key, &with("iss", json!("evil"))),
            AuthError::Issuer,
        ),
        (
            "wrong audience",
            sign(Algorithm::HS256, &key, &with("aud", json!("other"))),
            AuthError::Audience,
        ),
        (
            "missing issuer",
            sign(Algorithm::HS256, &key, &without("iss")),
            AuthError::Claims,
        ),
        (
            "missing audience",
            sign(Algorithm::HS256, &key, &without("aud")),
            AuthError::Claims,
        ),
        (
            "missing sub",
            sign(Algorithm::HS256, &key, &without("sub")),
            AuthError::Claims,
        ),
        (
            "numeric sub",
            sign(Algorithm::HS256, &key, &with("sub", json!(42))),
            AuthError::Claims,
        ),
        (
            "missing exp",
            sign(Algorithm::HS256, &key, &without("exp")),
            AuthError::Claims,
        ),
        ("garbage", "garbage".to_owned(), AuthError::Malformed),
        ("empty", String::new(), AuthError::Malformed),
        (
            "three dots of nothing",
            "..".to_owned(),
            AuthError::Malformed,
        ),
    ];
    for (name, token, expected) in cases {
        assert_eq!(verifier.verify(&token), Err(expected), "{name}");
    }
}

/// `JWT_MAX_LIFETIME_SECONDS` reaches the functions: with a five-minute cap, a token for five
/// minutes passes and one for fifteen (or one without `iat`) is a 401.
#[tokio::test]
async fn the_lifetime_cap_is_enforced_by_the_functions() {
    let accounts =
        e2e::lambda::LocalLambda::start("accounts", &[("JWT_MAX_LIFETIME_SECONDS", "300".into())])
            .await;
    let key = jwt_key().await;
    let list = |claims: serde_json::Value| {
        let token = sign(Algorithm::HS256, &key, &claims);
        let accounts = &accounts;
        async move {
            accounts
                .http(e2e::lambda::ApiRequest::new("GET", "/api/oauth/accounts").bearer(&token))
                .await
                .status
        }
    };
    let mut short = claims(&unique("user"));
    short["iat"] = json!(now());
    short["exp"] = json!(now() + 300);
    assert_eq!(list(short.clone()).await, 200);
    let mut long = short.clone();
    long["exp"] = json!(now() + 900);
    assert_eq!(list(long).await, 401);
    let mut no_iat = short;
    no_iat.as_object_mut().unwrap().remove("iat");
    assert_eq!(list(no_iat).await, 401);
}
