//! Secrets as operators put them: the Klaviyo client secret changes without a redeploy and a
//! wrong one pages; a value put with a trailing newline is the value.
//!
//! After the first deploy the functions hold the template's generated placeholder until the
//! operator puts the real secret. Against the local stack: functions started with a
//! placeholder fail a connect with `invalid_client` and log `klaviyo_client_rejected` at error
//! level (the KlaviyoClientRejected alarm's filter); the refresh run fails without touching the
//! connection; `put-secret-value` sets the right one (with a trailing newline, as
//! `file://secret.txt` would); the next refresh run and the next callback succeed with no
//! restart.
//!
//! This binary changes the stack's secrets, so its tests run one at a time (cargo runs test
//! binaries one after another), and each secret is put back however a test ends.

use e2e::lambda::{LocalLambda, Outcome};
use e2e::{
    callback_request, connect_due, klaviyo_account, setting, settings_page, stored, token_for,
    unique,
};
use shared::domain::secret::SECRET_RELOAD_INTERVAL;
use std::time::{Duration, Instant};

async fn secrets() -> aws_sdk_secretsmanager::Client {
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_secretsmanager::Client::new(&sdk)
}

/// One test at a time: they change secrets every function reads.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn get_secret(setting_name: &str) -> String {
    secrets()
        .await
        .get_secret_value()
        .secret_id(setting(setting_name))
        .send()
        .await
        .expect("read the secret")
        .secret_string
        .expect("a value")
}

async fn put_secret(setting_name: &str, value: &str) {
    secrets()
        .await
        .put_secret_value()
        .secret_id(setting(setting_name))
        .secret_string(value)
        .send()
        .await
        .expect("put the secret");
}

async fn put_client_secret(value: &str) {
    put_secret("KLAVIYO_CLIENT_SECRET_ARN", value).await;
}

/// Puts a secret's value back when dropped, even if the test failed half-way.
struct RestoreOnDrop {
    setting: &'static str,
    value: String,
}

impl RestoreOnDrop {
    async fn new(setting: &'static str) -> Self {
        Self {
            setting,
            value: get_secret(setting).await,
        }
    }
}

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        let (setting, value) = (self.setting, self.value.clone());
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(put_secret(setting, &value));
        })
        .join()
        .expect("restore the secret");
    }
}

fn scheduled_event() -> serde_json::Value {
    serde_json::from_str(include_str!("../../events/scheduled.json")).expect("event fixture")
}

/// The accounts route, with a valid token for a new user signed with `key`.
async fn list_signed_with(accounts: &LocalLambda, key: &str) -> e2e::lambda::HttpReply {
    let token = e2e::sign(
        jsonwebtoken::Algorithm::HS256,
        key,
        &e2e::claims(&unique("user")),
    );
    accounts
        .http(e2e::lambda::ApiRequest::new("GET", "/api/oauth/accounts").bearer(&token))
        .await
}

/// Log lines of a function with the given `event`, parsed.
fn events(log: &str, event: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["event"] == event)
        .collect()
}

#[tokio::test]
async fn a_client_secret_put_after_start_up_is_used_without_a_restart() {
    let _serial = SERIAL.lock().await;
    let restore = RestoreOnDrop::new("KLAVIYO_CLIENT_SECRET_ARN").await;
    let real = restore.value.clone();

    // A connection due for refresh, made while the secret is right.
    let user = unique("user");
    let token = token_for(&user).await;
    let id = connect_due(&token, &klaviyo_account()).await;

    // The template's placeholder: the functions start with it.
    let placeholder = "generated-placeholder-not-the-klaviyo-client-secret";
    put_client_secret(placeholder).await;
    let callback =
        LocalLambda::start("callback", &[("CONNECT_COMPLETION", "off".to_owned())]).await;
    let refresh = LocalLambda::start("refresh", &[]).await;
    callback.init_duration().await;
    refresh.init_duration().await;
    let started = Instant::now();

    // A connect fails, and the failure pages.
    let account = klaviyo_account();
    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    assert_eq!(landed.status, 302, "{}", landed.body);
    assert_eq!(
        landed.header("location"),
        Some(settings_page("error=klaviyo_connection_failed").as_str())
    );
    let rejected = events(&callback.log(), "klaviyo_client_rejected");
    assert_eq!(rejected.len(), 1, "{}", callback.log());
    assert_eq!(rejected[0]["level"], "ERROR");
    assert!(
        !callback.log().contains(placeholder),
        "the secret is never logged"
    );

    // The refresh run fails (the Errors alarm and the failed-runs queue see it) and leaves the
    // connection due and untouched: the secret is at fault, not the connection.
    let before = stored(&user, &id).await;
    match refresh.invoke(scheduled_event()).await {
        Outcome::Error(error) => {
            let message = error.to_string();
            assert!(
                message.contains("invalid_client: ") && !message.contains("invalid_client: 0,"),
                "{message}"
            );
        }
        Outcome::Response(summary) => panic!("the run should fail: {summary}"),
    }
    assert!(!events(&refresh.log(), "klaviyo_client_rejected").is_empty());
    let after = stored(&user, &id).await;
    assert_eq!(after.version, before.version, "the connection is untouched");
    assert_eq!(after.refresh_failures, 0, "no backoff");

    // The operator puts the right secret.
    put_client_secret(&format!("{real}\n")).await;

    // The next run reads it at its start and refreshes the connection.
    match refresh.invoke(scheduled_event()).await {
        Outcome::Response(summary) => {
            assert_eq!(summary["client_rejected"], 0, "{summary}");
            assert!(summary["refreshed"].as_u64() >= Some(1), "{summary}");
        }
        Outcome::Error(error) => panic!("the run should succeed now: {error}"),
    }
    let refreshed = stored(&user, &id).await;
    assert!(refreshed.last_refreshed_at.is_some(), "{refreshed:?}");

    // The callback reads the secret again on its next rejection, at most once a minute, and
    // retries the exchange with the new one: the user's connect succeeds.
    let may_reload_at = started + SECRET_RELOAD_INTERVAL + Duration::from_secs(1);
    tokio::time::sleep_until(may_reload_at.into()).await;
    let landed = callback
        .http(callback_request(&token, &account).await)
        .await;
    assert_eq!(
        landed.header("location"),
        Some(settings_page("connected=klaviyo").as_str()),
        "{}",
        callback.log()
    );
    assert_eq!(
        events(&callback.log(), "klaviyo_client_secret_reloaded").len(),
        1
    );
    // Catching up with a new secret does not page: still the one rejection from before.
    assert_eq!(events(&callback.log(), "klaviyo_client_rejected").len(), 1);
}

/// `put-secret-value --secret-string file://key.txt` keeps the file's trailing newline. A host
/// app may sign with the value as it reads it back (newline included) or as it was typed:
/// both are accepted.
#[tokio::test]
async fn a_jwt_key_put_with_a_trailing_newline_is_the_key() {
    let _serial = SERIAL.lock().await;
    let restore = RestoreOnDrop::new("JWT_SECRET_ARN").await;
    put_secret("JWT_SECRET_ARN", &format!("{}\n", restore.value)).await;
    let accounts = LocalLambda::start("accounts", &[]).await;
    let as_stored = get_secret("JWT_SECRET_ARN").await;
    assert!(as_stored.ends_with('\n'));
    for key in [as_stored.as_str(), as_stored.trim()] {
        let listed = list_signed_with(&accounts, key).await;
        assert_eq!(listed.status, 200, "{key:?}: {}", listed.body);
        assert_eq!(listed.json()["success"], true);
    }
    let other = format!("{}x", as_stored.trim());
    assert_eq!(list_signed_with(&accounts, &other).await.status, 401);
}

/// An HS256 key shorter than 32 bytes could be guessed: the functions refuse it, say which
/// setting is at fault, and answer 503 until a proper key is put.
#[tokio::test]
async fn a_short_jwt_key_is_refused_naming_the_setting() {
    let _serial = SERIAL.lock().await;
    let restore = RestoreOnDrop::new("JWT_SECRET_ARN").await;
    let short = "only-31-bytes-long-not-a-key!!!";
    assert_eq!(short.len(), 31);
    put_secret("JWT_SECRET_ARN", short).await;
    let accounts = LocalLambda::start("accounts", &[]).await;
    let refused = list_signed_with(&accounts, short).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "service_unavailable");
    let log = accounts.log();
    assert!(
        log.contains("JWT_SECRET_ARN") && log.contains("shorter than 32 bytes"),
        "{log}"
    );
    assert!(!log.contains(short), "the key is never logged");
    drop(restore);
    assert_eq!(
        accounts
            .http(
                e2e::lambda::ApiRequest::new("GET", "/api/oauth/accounts")
                    .bearer(&e2e::token_for(&unique("user")).await)
            )
            .await
            .status,
        200,
        "a proper key is picked up on the next request"
    );
}

/// Rotating the JWT key without downtime (docs/OPERATIONS.md): after `put-secret-value`, new
/// containers accept the new key and, for `JWT_PREVIOUS_KEY_GRACE_SECONDS`, the old one; a
/// container started before the put reads the keys again on the first token signed with the
/// new key, once its last read is `SECRET_RELOAD_INTERVAL` old; with a grace of 0 the old key
/// is refused at once. A key neither current nor previous is refused everywhere.
#[tokio::test]
async fn a_new_jwt_key_works_without_a_restart_and_the_old_one_during_its_grace() {
    let _serial = SERIAL.lock().await;
    let restore = RestoreOnDrop::new("JWT_SECRET_ARN").await;
    let old = restore.value.clone();
    let before = LocalLambda::start("accounts", &[]).await;
    let started = Instant::now();
    assert_eq!(list_signed_with(&before, &old).await.status, 200);

    let new = format!("test-only-jwt-key-{}", uuid::Uuid::new_v4().simple());
    put_secret("JWT_SECRET_ARN", &new).await;
    let after = LocalLambda::start("accounts", &[]).await;
    let strict = LocalLambda::start(
        "accounts",
        &[("JWT_PREVIOUS_KEY_GRACE_SECONDS", "0".to_owned())],
    )
    .await;
    let forged = format!("test-only-other-key-{}", uuid::Uuid::new_v4().simple());
    for (name, function, key, status) in [
        ("started after, new key", &after, &new, 200),
        ("started after, old key", &after, &old, 200),
        ("started after, another key", &after, &forged, 401),
        ("no grace, new key", &strict, &new, 200),
        ("no grace, old key", &strict, &old, 401),
        ("started before, old key", &before, &old, 200),
        (
            "started before, new key, read a moment ago",
            &before,
            &new,
            401,
        ),
    ] {
        let reply = list_signed_with(function, key).await;
        assert_eq!(reply.status, status, "{name}: {}", reply.body);
    }
    assert_eq!(events(&after.log(), "jwt_previous_key_used").len(), 1);
    assert!(events(&strict.log(), "jwt_previous_key_used").is_empty());

    tokio::time::sleep_until((started + SECRET_RELOAD_INTERVAL + Duration::from_secs(3)).into())
        .await;
    for (key, status) in [(&new, 200), (&old, 200), (&forged, 401)] {
        let reply = list_signed_with(&before, key).await;
        assert_eq!(reply.status, status, "started before: {}", reply.body);
    }
    assert_eq!(events(&before.log(), "jwt_keys_reloaded").len(), 1);
    let log = before.log() + &after.log();
    assert!(
        !log.contains(&new) && !log.contains(old.trim()),
        "no key is logged"
    );
}
