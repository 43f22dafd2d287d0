//! docs/openapi.yaml is the contract: every route the API serves (in template.yaml and in
//! the local router) is in it, and real responses from the running functions, including the
//! success paths a fuzzer cannot reach (a completed OAuth flow, a real API key, a disconnect),
//! match its statuses, headers and schemas. schemathesis (scripts/fuzz.sh) covers the
//! generated inputs.

use e2e::{
    api_url, authorize, completion_of, connect_api_key, http, klaviyo_account, register_api_key,
    token_for, unique,
};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::LazyLock;

fn repo_file(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"))
}

static OPENAPI: LazyLock<Value> = LazyLock::new(|| {
    serde_yaml_ng::from_str(&repo_file("docs/openapi.yaml")).expect("docs/openapi.yaml parses")
});

/// Follows a local `$ref` (`#/components/...`), if `node` is one.
fn resolve(node: &Value) -> &Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(pointer) => OPENAPI
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {pointer}")),
        None => node,
    }
}

/// Checks `body` against the schema at `pointer` with the whole document as the root, so
/// `$ref`s inside it resolve; formats (uri, uuid, date-time) are checked too.
fn assert_matches_schema(schema: &Value, body: &Value, context: &str) {
    let mut root = OPENAPI.clone();
    let object = root.as_object_mut().expect("document is an object");
    object.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    match schema.get("$ref") {
        Some(reference) => {
            object.insert("$ref".into(), reference.clone());
        }
        None => panic!("{context}: response schemas are $refs to components"),
    }
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .expect("the schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{context}: {body} breaks the contract: {errors:?}"
    );
}

/// Asserts that `response` to `method template` is what docs/openapi.yaml documents, and
/// returns its JSON body (`Value::Null` when there is none).
async fn conforms(method: Method, template: &str, response: Response) -> Value {
    let status = response.status();
    let context = format!("{method} {template} -> {status}");
    let operation = &OPENAPI["paths"][template][method.as_str().to_lowercase()];
    assert!(operation.is_object(), "{context}: operation not documented");
    let documented = resolve(
        operation["responses"]
            .get(status.as_str())
            .unwrap_or_else(|| panic!("{context}: status not documented")),
    );
    for (name, header) in documented["headers"].as_object().into_iter().flatten() {
        let header = resolve(header);
        let value = response.headers().get(name).and_then(|v| v.to_str().ok());
        if header["required"] == true {
            let value = value.unwrap_or_else(|| panic!("{context}: missing header {name}"));
            if let Some(expected) = header["schema"]["const"].as_str() {
                assert_eq!(value, expected, "{context}: header {name}");
            }
            if let Some(pattern) = header["schema"]["pattern"].as_str() {
                let schema = json!({"type": "string", "pattern": pattern});
                assert!(
                    jsonschema::is_valid(&schema, &json!(value)),
                    "{context}: header {name}={value} does not match {pattern}"
                );
            }
        }
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("body");
    match documented["content"].as_object() {
        Some(content) => {
            let (media, spec) = content.iter().next().expect("one media type");
            assert_eq!(content_type.as_deref(), Some(media.as_str()), "{context}");
            let body: Value = serde_json::from_str(&text).expect("JSON body");
            assert_matches_schema(&spec["schema"], &body, &context);
            body
        }
        None => {
            assert!(text.is_empty(), "{context}: undocumented body {text}");
            Value::Null
        }
    }
}

/// `(METHOD, path)` for every operation in the contract.
fn documented_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in OPENAPI["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

const COMPLETE_ROUTE: &str = "/api/oauth/connect/klaviyo/complete";

#[test]
fn every_served_route_is_in_the_contract_and_nothing_else() {
    let documented: BTreeSet<String> = documented_routes().into_iter().map(|(_, p)| p).collect();
    let deployed: BTreeSet<String> = repo_file("template.yaml")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("RouteKey: ANY "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        deployed, documented,
        "template.yaml routes vs docs/openapi.yaml"
    );
    let cargo = repo_file("Cargo.toml");
    let router = cargo
        .split("[workspace.metadata.lambda.watch.router]")
        .nth(1)
        .expect("router table");
    let local: BTreeSet<String> = router
        .lines()
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter_map(|line| line.trim().strip_prefix('"'))
        .filter_map(|line| line.split('"').next())
        // The fallback for every other path (API Gateway's `$default`): answers 404 only.
        .filter(|path| !matches!(*path, "/" | "/{*path}"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        local, documented,
        "cargo lambda watch router vs docs/openapi.yaml"
    );
    // One operation per route, as SPEC lists them.
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/api/oauth/connect/klaviyo"),
        ("POST", "/api/oauth/connect/klaviyo/api-key"),
        ("POST", "/api/oauth/connect/klaviyo/complete"),
        ("POST", "/api/oauth/connect/klaviyo/decline"),
        ("GET", "/klaviyo/oauthcallback"),
        ("GET", "/api/oauth/accounts"),
        ("DELETE", "/api/oauth/accounts/{accountId}"),
        ("POST", "/api/oauth/accounts/{accountId}/verify"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(documented_routes(), expected);
}

#[tokio::test]
async fn the_whole_journey_matches_the_contract() {
    let token = token_for(&unique("user")).await;
    let base = api_url();
    let connect_path = "/api/oauth/connect/klaviyo";

    // Start OAuth, approve at Klaviyo, come back through the callback.
    let response = http()
        .get(format!("{base}{connect_path}"))
        .query(&[("accountName", "  Contract store  ")])
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body = conforms(Method::GET, connect_path, response).await;
    let auth_url = url::Url::parse(body["authUrl"].as_str().unwrap()).unwrap();
    let account = klaviyo_account();
    let callback = authorize(&auth_url, &account, true).await;
    let response = http().get(&callback).send().await.unwrap();
    let landed = response.headers()["location"].to_str().unwrap().to_owned();
    conforms(Method::GET, "/klaviyo/oauthcallback", response).await;

    // The page completes the connect from the user's session; a replay is the documented 404.
    let complete_path = "/api/oauth/connect/klaviyo/complete";
    let handle = completion_of(&landed).expect("the callback parks the result");
    for expected in [200, 404] {
        let response = http()
            .post(format!("{base}{complete_path}"))
            .bearer_auth(&token)
            .json(&json!({"completion": handle}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
        conforms(Method::POST, complete_path, response).await;
    }
    let decline_path = "/api/oauth/connect/klaviyo/decline";
    let response = http()
        .post(format!("{base}{decline_path}"))
        .json(&json!({"completion": handle}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    conforms(Method::POST, decline_path, response).await;

    // Denied and failed callbacks redirect the same documented way.
    let denied = authorize(&auth_url, &account, false).await;
    for url in [
        denied,
        format!("{base}/klaviyo/oauthcallback?code=x&state=never-issued"),
        format!("{base}/klaviyo/oauthcallback"),
    ] {
        let response = http().get(&url).send().await.unwrap();
        conforms(Method::GET, "/klaviyo/oauthcallback", response).await;
    }

    // An API key for a second Klaviyo account.
    let key_account = klaviyo_account();
    let key = register_api_key(&key_account).await;
    let response = http()
        .post(format!("{base}{connect_path}/api-key"))
        .bearer_auth(&token)
        .json(&json!({"apiKey": key, "accountName": "By key"}))
        .send()
        .await
        .unwrap();
    let created = conforms(Method::POST, "/api/oauth/connect/klaviyo/api-key", response).await;
    assert_eq!(created["account"]["authType"], "api_key");

    // Both are listed, each matching Account (nullable times included).
    let response = http()
        .get(format!("{base}/api/oauth/accounts"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let list = conforms(Method::GET, "/api/oauth/accounts", response).await;
    let accounts = list["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2);

    // Test both connections ("Test connection").
    let verify_path = "/api/oauth/accounts/{accountId}/verify";
    for account in accounts {
        let url = format!(
            "{base}/api/oauth/accounts/{}/verify",
            account["id"].as_str().unwrap()
        );
        let response = http().post(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let tested = conforms(Method::POST, verify_path, response).await;
        assert_eq!(tested["account"]["status"], "active");
    }

    // Disconnect both; a second delete is the documented 404.
    let delete_path = "/api/oauth/accounts/{accountId}";
    for account in accounts {
        let url = format!(
            "{base}/api/oauth/accounts/{}",
            account["id"].as_str().unwrap()
        );
        let response = http()
            .delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        conforms(Method::DELETE, delete_path, response).await;
        let response = http()
            .delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let body = conforms(Method::DELETE, delete_path, response).await;
        assert_eq!(body["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn every_documented_error_matches_the_contract() {
    let token = token_for(&unique("user")).await;
    let base = api_url();
    let key_route = "/api/oauth/connect/klaviyo/api-key";
    let cases: Vec<(Method, &str, reqwest::RequestBuilder)> = vec![
        // 401 on every protected route.
        (
            Method::GET,
            "/api/oauth/accounts",
            http().get(format!("{base}/api/oauth/accounts")),
        ),
        (
            Method::DELETE,
            "/api/oauth/accounts/{accountId}",
            http()
                .delete(format!("{base}/api/oauth/accounts/x"))
                .bearer_auth("not.a.jwt"),
        ),
        (
            Method::POST,
            "/api/oauth/accounts/{accountId}/verify",
            http().post(format!("{base}/api/oauth/accounts/x/verify")),
        ),
        // 404 for an id that is not the caller's.
        (
            Method::POST,
            "/api/oauth/accounts/{accountId}/verify",
            http()
                .post(format!(
                    "{base}/api/oauth/accounts/{}/verify",
                    uuid::Uuid::new_v4()
                ))
                .bearer_auth(&token),
        ),
        // 400, 413, 415.
        (
            Method::GET,
            "/api/oauth/connect/klaviyo",
            http()
                .get(format!(
                    "{base}/api/oauth/connect/klaviyo?accountName=%07bell"
                ))
                .bearer_auth(&token),
        ),
        (
            Method::POST,
            key_route,
            http()
                .post(format!("{base}{key_route}"))
                .bearer_auth(&token)
                .json(&json!({"apiKey": "pk_sandbox_unknown_0123456789"})),
        ),
        (
            Method::POST,
            key_route,
            http()
                .post(format!("{base}{key_route}"))
                .bearer_auth(&token)
                .json(&json!({"apiKey": "x".repeat(5000)})),
        ),
        (
            Method::POST,
            key_route,
            http()
                .post(format!("{base}{key_route}"))
                .bearer_auth(&token)
                .header("content-type", "text/plain")
                .body("pk_sandbox_0123456789"),
        ),
        // The completion route: 400 for a body without a handle, 404 for an unknown one.
        (
            Method::POST,
            COMPLETE_ROUTE,
            http()
                .post(format!("{base}{COMPLETE_ROUTE}"))
                .bearer_auth(&token)
                .json(&json!({"handle": "x"})),
        ),
        (
            Method::POST,
            COMPLETE_ROUTE,
            http()
                .post(format!("{base}{COMPLETE_ROUTE}"))
                .bearer_auth(&token)
                .json(&json!({"completion": "A".repeat(43)})),
        ),
        (
            Method::POST,
            COMPLETE_ROUTE,
            http()
                .post(format!("{base}{COMPLETE_ROUTE}"))
                .json(&json!({"completion": "A".repeat(43)})),
        ),
    ];
    for (method, template, request) in cases {
        let response = request.send().await.unwrap();
        let body = conforms(method, template, response).await;
        assert_eq!(body["success"], false);
    }

    // 405 on every route, with Allow; documented under each path's operation.
    for (method, path) in documented_routes() {
        let url = format!("{base}{}", path.replace("{accountId}", "x"));
        let other = if method == "PUT" {
            Method::PATCH
        } else {
            Method::PUT
        };
        let response = http()
            .request(other, &url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{url}");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        conforms(method, &path, response).await;
    }

    // 429 once the user's connect budget is spent.
    let rate = e2e::environment().await.config.connect_rate;
    let key = register_api_key(&klaviyo_account()).await;
    for _ in 0..=2 * rate.limit {
        let response = http()
            .get(format!("{base}/api/oauth/connect/klaviyo"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            conforms(Method::GET, "/api/oauth/connect/klaviyo", response).await;
            let (status, body) = connect_api_key(&token, &json!({"apiKey": key})).await;
            assert!(status == 429 || status == 201, "{status} {body}");
            return;
        }
    }
    panic!("the connect route never answered 429");
}
