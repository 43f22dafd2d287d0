//! Support for the end-to-end tests. They run against real processes started by
//! `make test` (scripts/test.sh): moto on loopback (DynamoDB, KMS, Secrets Manager) and
//! `cargo lambda watch` serving the five functions. Their settings arrive in the
//! environment, exactly as the functions get them.

pub mod fault_proxy;
pub mod lambda;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::Environment;

/// A setting of the running local stack; panics with directions when tests are run bare.
pub fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests need the local stack; run them with `make test`, or with `make dev` running after `eval \"$(scripts/local-stack.sh env)\"` (docs/TESTING.md)")
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
    let sdk = shared::context::aws_sdk_config().await;
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
    shared::adapters::auth::install_jwt_crypto();
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

/// Sends `request` and returns its status and JSON body.
pub async fn answer(request: reqwest::RequestBuilder, what: &str) -> (reqwest::StatusCode, Value) {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what} reachable: {e}"));
    let status = response.status();
    let body = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what} answers JSON: {e}"));
    (status, body)
}

/// An item read straight from the table (consistent), bypassing the store's decoding.
pub async fn raw_item(
    pk: String,
    sk: &str,
) -> Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .get_item()
        .table_name(setting("TABLE_NAME"))
        .key("pk", AttributeValue::S(pk))
        .key("sk", AttributeValue::S(sk.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("read the table")
        .item
}

/// Connect attempts counted against `user`'s rate limit, over every window still stored.
pub async fn connect_attempts(user: &str) -> u64 {
    attempts(user, "CONNECT#").await
}

/// Completions counted against `user`'s completion rate limit.
pub async fn completion_attempts(user: &str) -> u64 {
    attempts(user, "COMPLETE#").await
}

async fn attempts(user: &str, scope: &str) -> u64 {
    use aws_sdk_dynamodb::types::AttributeValue;
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .query()
        .table_name(setting("TABLE_NAME"))
        .key_condition_expression("pk = :pk AND begins_with(sk, :scope)")
        .expression_attribute_values(":pk", AttributeValue::S(format!("RATE#{user}")))
        .expression_attribute_values(":scope", AttributeValue::S(scope.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("query the table")
        .items()
        .iter()
        .filter_map(|item| item.get("hits")?.as_n().ok()?.parse::<u64>().ok())
        .sum()
}

/// An RFC 3339 time of an API answer (panics on anything else).
pub fn time_of(value: &Value) -> time::OffsetDateTime {
    let text = value.as_str().unwrap_or_else(|| panic!("a time: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("a time: {text}: {e}"))
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
    shared::http_client()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .expect("build HTTP client")
}

// ---- the Klaviyo sandbox and the OAuth flow ------------------------------------------

pub fn sandbox_url() -> String {
    setting("KLAVIYO_SANDBOX_URL")
}

/// Injects a fault into the sandbox (see sandbox/src/control.rs for the fields).
pub async fn inject_fault(fault: Value) {
    let response = http()
        .post(format!("{}/sandbox/faults", sandbox_url()))
        .json(&fault)
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 201, "fault accepted: {fault}");
}

/// Clears the sandbox's faults for `account` (Klaviyo answers normally again).
pub async fn clear_faults(account: &str) {
    let response = http()
        .delete(format!("{}/sandbox/faults", sandbox_url()))
        .query(&[("account", account)])
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 204);
}

/// What the sandbox received for `account` at `endpoint` (authorize, token, revoke, accounts).
pub async fn received(account: &str, endpoint: &str) -> Vec<Value> {
    http()
        .get(format!("{}/sandbox/requests", sandbox_url()))
        .query(&[("account", account), ("endpoint", endpoint)])
        .send()
        .await
        .expect("sandbox reachable")
        .json()
        .await
        .expect("sandbox answers JSON")
}

/// Tokens the sandbox issued for `account`: `{"access_tokens": [...], "refresh_tokens": [...]}`.
pub async fn issued_tokens(account: &str) -> Value {
    http()
        .get(format!("{}/sandbox/tokens", sandbox_url()))
        .query(&[("account", account)])
        .send()
        .await
        .expect("sandbox reachable")
        .json()
        .await
        .expect("sandbox answers JSON")
}

/// The refresh tokens issued for `account` with the given status (active, rotated, revoked).
pub async fn refresh_tokens(account: &str, status: &str) -> Vec<String> {
    issued_tokens(account).await["refresh_tokens"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|t| t["status"] == status)
        .map(|t| t["token"].as_str().expect("token").to_owned())
        .collect()
}

/// `GET /api/oauth/connect/klaviyo` as `token`; returns the status and body.
pub async fn connect(token: &str, account_name: Option<&str>) -> (reqwest::StatusCode, Value) {
    let mut request = http()
        .get(format!("{}/api/oauth/connect/klaviyo", api_url()))
        .bearer_auth(token);
    if let Some(name) = account_name {
        request = request.query(&[("accountName", name)]);
    }
    answer(request, "connect").await
}

/// Starts a connection and returns the authorize URL.
pub async fn auth_url(token: &str, account_name: Option<&str>) -> url::Url {
    let (status, body) = connect(token, account_name).await;
    assert_eq!(status, 200, "{body}");
    url::Url::parse(body["authUrl"].as_str().expect("authUrl")).expect("authUrl is a URL")
}

/// Plays the user at Klaviyo's consent screen: picks `account`, approves or denies.
/// Returns where Klaviyo sends the browser (the callback URL).
pub async fn authorize(auth_url: &url::Url, account: &str, approve: bool) -> String {
    let mut url = auth_url.clone();
    url.query_pairs_mut()
        .append_pair("sandbox_account", account)
        .append_pair("sandbox_org", &format!("Org of {account}"))
        .append_pair("sandbox_decision", if approve { "approve" } else { "deny" });
    location(url.as_str()).await
}

/// GETs `url` without following redirects and returns the `location` it redirects to.
pub async fn location(url: &str) -> String {
    let response = http().get(url).send().await.expect("reachable");
    assert_eq!(response.status(), 302, "{url} should redirect");
    response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// Klaviyo's redirect back to us, for a fresh authorization of `account` by `token`, as a
/// request for a local callback function (`lambda::LocalLambda`).
pub async fn callback_request(token: &str, account: &str) -> lambda::ApiRequest {
    let auth = auth_url(token, None).await;
    let callback = authorize(&auth, account, true).await;
    let url = url::Url::parse(&callback).expect("callback URL");
    lambda::ApiRequest::new(
        "GET",
        &format!("{}?{}", url.path(), url.query().unwrap_or("")),
    )
}

/// `<FRONTEND_URL>/settings?<outcome>`.
pub fn settings_page(outcome: &str) -> String {
    format!("{}/settings?{outcome}", setting("FRONTEND_URL"))
}

/// Where the browser lands after `user` started and approved a connect of Klaviyo `account`:
/// the callback's redirect, with its completion handle.
pub async fn land(token: &str, account: &str, account_name: Option<&str>) -> String {
    let auth = auth_url(token, account_name).await;
    let callback = authorize(&auth, account, true).await;
    location(&callback).await
}

/// The `completion` handle of a settings-page address, if it has one.
pub fn completion_of(address: &str) -> Option<String> {
    url::Url::parse(address)
        .ok()?
        .query_pairs()
        .find(|(name, _)| name == "completion")
        .map(|(_, value)| value.into_owned())
}

/// `POST /api/oauth/connect/klaviyo/complete` as `token` with `handle`.
pub async fn complete(token: &str, handle: &str) -> (reqwest::StatusCode, Value) {
    let request = http()
        .post(format!("{}/api/oauth/connect/klaviyo/complete", api_url()))
        .bearer_auth(token)
        .json(&serde_json::json!({ "completion": handle }));
    answer(request, "complete").await
}

/// The whole flow for `user` and Klaviyo `account`, completed from the same user's session
/// as the settings page does; returns where the browser landed, without the handle.
pub async fn connect_klaviyo(token: &str, account: &str, account_name: Option<&str>) -> String {
    let landed = land(token, account, account_name).await;
    let Some(handle) = completion_of(&landed) else {
        return landed;
    };
    let (status, body) = complete(token, &handle).await;
    assert_eq!(status, 200, "completion: {body}");
    landed.replace(&format!("&completion={handle}"), "")
}

/// A Klaviyo account id no other test uses (alphanumeric, like Klaviyo's).
pub fn klaviyo_account() -> String {
    format!("K{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

// ---- accounts, disconnect, API keys, the refresh job ---------------------------------

/// `GET /api/oauth/accounts` as `token`.
pub async fn list_accounts(token: &str) -> (reqwest::StatusCode, Value) {
    let request = http()
        .get(format!("{}/api/oauth/accounts", api_url()))
        .bearer_auth(token);
    answer(request, "accounts").await
}

/// The caller's accounts (asserting a 200).
pub async fn accounts_of(token: &str) -> Vec<Value> {
    let (status, body) = list_accounts(token).await;
    assert_eq!(status, 200, "{body}");
    body["accounts"].as_array().expect("accounts array").clone()
}

/// `DELETE /api/oauth/accounts/{id}` as `token`.
pub async fn disconnect(token: &str, id: &str) -> (reqwest::StatusCode, Value) {
    let request = http()
        .delete(format!("{}/api/oauth/accounts/{id}", api_url()))
        .bearer_auth(token);
    answer(request, "disconnect").await
}

/// Registers a fresh private API key for `account` in the sandbox and returns it.
pub async fn register_api_key(account: &str) -> String {
    let key = format!("pk_sandbox_{}", uuid::Uuid::new_v4().simple());
    let response = http()
        .post(format!("{}/sandbox/api-keys", sandbox_url()))
        .json(&serde_json::json!({"key": key, "account": account, "organization_name": format!("Org of {account}")}))
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 201);
    key
}

/// Plays the user who deletes a private API key in Klaviyo: the sandbox refuses it from now on.
pub async fn revoke_api_key(key: &str) {
    let response = http()
        .post(format!("{}/sandbox/api-keys/revoke", sandbox_url()))
        .json(&serde_json::json!({"key": key}))
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 204);
}

/// Plays the user who removes the app in Klaviyo: every token of `account` dies.
pub async fn remove_app(account: &str) {
    let response = http()
        .post(format!(
            "{}/sandbox/accounts/{account}/revoke-all",
            sandbox_url()
        ))
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 204);
}

/// `POST /api/oauth/accounts/{id}/verify` ("Test connection") as `token`.
pub async fn verify(token: &str, id: &str) -> (reqwest::StatusCode, Value) {
    let request = http()
        .post(format!("{}/api/oauth/accounts/{id}/verify", api_url()))
        .bearer_auth(token);
    answer(request, "verify").await
}

/// Makes a connection due for the refresh job now (its refresh or its key check).
pub async fn due_now(user: &str, id: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let sdk = shared::context::aws_sdk_config().await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .update_item()
        .table_name(setting("TABLE_NAME"))
        .key("pk", AttributeValue::S(format!("USER#{user}")))
        .key("sk", AttributeValue::S(format!("CONN#{id}")))
        .update_expression("SET due_at = :now")
        .condition_expression("attribute_exists(due_at)")
        .expression_attribute_values(":now", AttributeValue::N((now() - 1).to_string()))
        .send()
        .await
        .expect("bring the refresh forward");
}

/// `POST /api/oauth/connect/klaviyo/api-key` as `token` with a JSON body.
pub async fn connect_api_key(token: &str, body: &Value) -> (reqwest::StatusCode, Value) {
    let request = http()
        .post(format!("{}/api/oauth/connect/klaviyo/api-key", api_url()))
        .bearer_auth(token)
        .json(body);
    answer(request, "api-key route").await
}

/// Runs the refresh job once through the local Lambda invoke API and returns its summary.
pub async fn invoke_refresh() -> Value {
    let event: Value =
        serde_json::from_str(include_str!("../../events/scheduled.json")).expect("event fixture");
    let response = http()
        .post(format!(
            "{}/2015-03-31/functions/refresh/invocations",
            api_url()
        ))
        .json(&event)
        .send()
        .await
        .expect("refresh invocable");
    assert_eq!(response.status(), 200);
    response.json().await.expect("refresh returns its summary")
}

// ---- refresh ---------------------------------------------------------------------------

/// Sets how long the sandbox's access tokens for `account` live (and its name).
pub async fn set_token_lifetime(account: &str, seconds: u64) {
    let response = http()
        .put(format!("{}/sandbox/accounts/{account}", sandbox_url()))
        .json(&serde_json::json!({"organization_name": format!("Org of {account}"), "access_token_ttl_secs": seconds}))
        .send()
        .await
        .expect("sandbox reachable");
    assert_eq!(response.status(), 204);
}

/// Connects `account` for `token` with access tokens that expire in a minute, so the
/// connection is due for refresh at once; later tokens live an hour (not due again).
pub async fn connect_due(token: &str, account: &str) -> String {
    set_token_lifetime(account, 60).await;
    let id = connected_id(token, account).await;
    set_token_lifetime(account, 3600).await;
    id
}

/// Connects `account` through the whole OAuth flow and returns the connection's id.
pub async fn connected_id(token: &str, account: &str) -> String {
    let landed = connect_klaviyo(token, account, None).await;
    assert_eq!(landed, settings_page("connected=klaviyo"));
    accounts_of(token)
        .await
        .iter()
        .find(|a| a["klaviyoAccountId"] == account)
        .and_then(|a| a["id"].as_str())
        .expect("connected")
        .to_owned()
}

/// A connection as stored now (decoded by the store, as the functions read it).
pub async fn stored(user: &str, id: &str) -> shared::Connection {
    environment()
        .await
        .store()
        .get_connection(&shared::UserId::parse(user).unwrap(), id)
        .await
        .expect("connection stored")
}

/// Changes a stored connection as if time had passed (`change` edits it; the version moves
/// on as with any write), and returns it as stored.
pub async fn rewrite(
    user: &str,
    id: &str,
    change: impl FnOnce(&mut shared::Connection),
) -> shared::Connection {
    let mut connection = stored(user, id).await;
    change(&mut connection);
    let version = connection.version;
    environment()
        .await
        .store()
        .update_connection_if_version(&connection, version)
        .await
        .expect("rewrite a connection")
}

/// A time `minutes` from now, in whole seconds (as the store keeps times).
pub fn minutes_from_now(minutes: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("whole seconds")
        + time::Duration::minutes(minutes)
}

/// Pending revocations of a connection (read through the due index, as the job does).
pub async fn pending_revocations(connection_id: &str) -> usize {
    let far_future = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    environment()
        .await
        .store()
        .due_pending_revocations(far_future, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|p| p.connection_id == connection_id)
        .count()
}

/// How many refresh-token grants the sandbox received for `account`.
pub async fn refresh_grants(account: &str) -> usize {
    received(account, "token")
        .await
        .iter()
        .filter(|r| r["form"]["grant_type"] == "refresh_token")
        .count()
}

/// The refresh job, in this process, against the same stack the functions use.
pub async fn refresh_job() -> shared::use_cases::refresh::Refresh {
    let env = environment().await;
    let klaviyo = env.klaviyo().await.expect("Klaviyo client");
    shared::use_cases::refresh::Refresh::new(&env, klaviyo)
}

/// User plus system CPU time of a process (`self` or a pid), from `/proc/<pid>/stat`, for the
/// benchmarks. Clock ticks are 10 ms: meaningful summed over many requests, not for one.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
