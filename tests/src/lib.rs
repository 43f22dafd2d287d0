//! Support for the end-to-end tests. They run against real processes started by
//! `make test` (scripts/test.sh): moto on loopback (DynamoDB, KMS, Secrets Manager) and
//! `cargo lambda watch` serving the five functions. Their settings arrive in the
//! environment, exactly as the functions get them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::Environment;

/// A setting of the running local stack; panics with directions when tests are run bare.
pub fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests need the local stack; run them with `make test`")
    })
}

/// The functions' environment, loaded the way the functions load it.
pub async fn environment() -> Environment {
    Environment::load()
        .await
        .unwrap_or_else(|e| panic!("{e}: run the tests with `make test`"))
}

/// The HS256 key the host app would sign with, read from the local Secrets Manager.
pub async fn jwt_key() -> String {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(setting("JWT_SECRET_ARN"))
        .send()
        .await
        .expect("read the JWT secret from the local Secrets Manager")
        .secret_string
        .expect("the JWT secret has a value")
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims the local stack accepts for `user`, valid for five minutes.
pub fn claims(user: &str) -> Value {
    json!({
        "sub": user,
        "iat": now(),
        "exp": now() + 300,
        "iss": setting("JWT_ISSUER"),
        "aud": setting("JWT_AUDIENCE"),
    })
}

pub fn sign(alg: Algorithm, key: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("sign a test token")
}

/// A valid token for `user`.
pub async fn token_for(user: &str) -> String {
    sign(Algorithm::HS256, &jwt_key().await, &claims(user))
}

/// A name no other test (or earlier run against the same stack) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Base URL of the functions under `cargo lambda watch`.
pub fn api_url() -> String {
    setting("LOCAL_API_URL")
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .expect("build HTTP client")
}
