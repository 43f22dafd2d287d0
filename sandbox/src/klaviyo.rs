//! Klaviyo's endpoints as the service sees them.

use crate::state::{
    CODE_TTL_SECS, DEFAULT_ACCOUNT, Endpoint, Fault, FaultKind, Recorded, RefreshStatus, Sandbox,
    now_ms, now_secs, random_token,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

type App = State<Arc<Sandbox>>;

pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/oauth/authorize", get(authorize))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/api/accounts/", get(accounts))
        .route("/api/accounts", get(accounts))
}

fn record(
    sandbox: &Sandbox,
    endpoint: Endpoint,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    form: &BTreeMap<String, String>,
    account: Option<&str>,
) {
    let query = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let headers = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    sandbox.state().record(Recorded {
        endpoint,
        method: method.to_string(),
        path: uri.path().to_owned(),
        query,
        headers,
        form: form.clone(),
        account: account.map(str::to_owned),
        at_ms: now_ms(),
    });
}

/// Applies injected faults: waits out latency, then returns the fault's answer if any.
async fn faults(sandbox: &Sandbox, endpoint: Endpoint, account: Option<&str>) -> Option<Response> {
    let (delay, fault) = sandbox.state().take_faults(endpoint, account);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fault = fault?;
    Some(fault_response(&fault).await)
}

async fn fault_response(fault: &Fault) -> Response {
    match fault.kind {
        FaultKind::Status => {
            let status = StatusCode::from_u16(fault.status.unwrap_or(503)).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (status, axum::Json(json!({"error": "server_error", "error_description": "injected fault"}))).into_response()
        }
        FaultKind::RateLimit => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, fault.retry_after.unwrap_or(1).to_string())],
            axum::Json(json!({"errors": [{"status": 429, "code": "throttled", "detail": "Request was throttled."}]})),
        )
            .into_response(),
        FaultKind::Timeout => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        FaultKind::Malformed => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html>this is not JSON</html>",
        )
            .into_response(),
        FaultKind::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "injected invalid_grant"),
        // Latency never ends a request by itself.
        FaultKind::Latency => StatusCode::OK.into_response(),
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn redirect(location: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location.to_owned())]).into_response()
}

fn page(status: StatusCode, message: &str) -> Response {
    (status, format!("klaviyo-sandbox: {message}\n")).into_response()
}

async fn authorize(
    State(sandbox): App,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let account = q
        .get("sandbox_account")
        .cloned()
        .unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned());
    record(
        &sandbox,
        Endpoint::Authorize,
        &method,
        &uri,
        &headers,
        &BTreeMap::new(),
        Some(&account),
    );
    if let Some(response) = faults(&sandbox, Endpoint::Authorize, Some(&account)).await {
        return response;
    }
    // Errors about the client or redirect URI must not redirect (RFC 6749 4.1.2.1).
    if q.get("client_id") != Some(&sandbox.client_id) {
        return page(StatusCode::BAD_REQUEST, "unknown client_id");
    }
    let Some(redirect_uri) = q
        .get("redirect_uri")
        .filter(|r| **r == sandbox.redirect_uri)
    else {
        return page(
            StatusCode::BAD_REQUEST,
            "redirect_uri is not registered for this app",
        );
    };
    let state = q.get("state").cloned().unwrap_or_default();
    let back = |params: &[(&str, &str)]| {
        let mut url = url::Url::parse(redirect_uri).expect("registered redirect URI is a URL");
        {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in params {
                pairs.append_pair(k, v);
            }
            if !state.is_empty() {
                pairs.append_pair("state", &state);
            }
        }
        redirect(url.as_str())
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return back(&[("error", "unsupported_response_type")]);
    }
    let challenge = q.get("code_challenge").cloned().unwrap_or_default();
    let challenge_ok = challenge.len() == 43
        && challenge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if q.get("code_challenge_method").map(String::as_str) != Some("S256") || !challenge_ok {
        return back(&[
            ("error", "invalid_request"),
            ("error_description", "PKCE S256 is required"),
        ]);
    }
    let decision = q.get("sandbox_decision").map(String::as_str);
    if decision.is_none() && wants_html(&headers) {
        // A person in a browser: ask them, as Klaviyo's consent screen does.
        return consent_page(&q);
    }
    if decision == Some("deny") {
        return back(&[
            ("error", "access_denied"),
            ("error_description", "The user denied access"),
        ]);
    }
    let code = format!("sbx-code-{}", random_token());
    {
        let mut state = sandbox.state();
        state.ensure_account(&account, q.get("sandbox_org").map(String::as_str));
        state.codes.insert(
            code.clone(),
            crate::state::CodeGrant {
                account: account.clone(),
                redirect_uri: redirect_uri.clone(),
                code_challenge: challenge,
                scopes: q.get("scope").cloned().unwrap_or_default(),
                issued_at: now_secs(),
                used: false,
            },
        );
    }
    back(&[("code", &code)])
}

/// Browsers ask for HTML first; programs (the tests, curl) do not, and get the decision
/// they ask for with `sandbox_decision` (approve when absent).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

/// The consent screen: the app's request (scopes), the account to connect, Approve or Deny.
/// Submitting comes back here with every original parameter and `sandbox_decision`.
fn consent_page(q: &HashMap<String, String>) -> Response {
    let hidden: String = q
        .iter()
        .filter(|(name, _)| !name.starts_with("sandbox_"))
        .map(|(name, value)| {
            format!(
                r#"<input type="hidden" name="{}" value="{}">"#,
                escape(name),
                escape(value)
            )
        })
        .collect();
    let scopes: String = q
        .get("scope")
        .map(|scope| {
            scope
                .split_whitespace()
                .map(|s| format!("<li><code>{}</code></li>", escape(s)))
                .collect()
        })
        .unwrap_or_default();
    let account = escape(
        q.get("sandbox_account")
            .map_or(DEFAULT_ACCOUNT, String::as_str),
    );
    let organization = escape(q.get("sandbox_org").map_or("Sandbox Store", String::as_str));
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Authorize access · Klaviyo sandbox</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f3f1ec; color: #232323; margin: 0; }}
main {{ max-width: 30rem; margin: 3rem auto; background: #fff; border-radius: 12px; padding: 2rem; box-shadow: 0 4px 20px rgba(0,0,0,.08); }}
.brand {{ font-weight: 800; letter-spacing: .02em; }} .note {{ color: #666; font-size: .85rem; }}
label {{ display: block; font-weight: 600; margin-top: .75rem; }}
input[type=text] {{ font: inherit; width: 100%; padding: .45rem .6rem; box-sizing: border-box; border: 1px solid #aaa; border-radius: 6px; }}
.actions {{ display: flex; gap: .5rem; justify-content: flex-end; margin-top: 1.5rem; }}
button {{ font: inherit; font-weight: 600; padding: .55rem 1.1rem; border-radius: 6px; border: 1px solid #232323; background: #fff; cursor: pointer; }}
button[value=approve] {{ background: #232323; color: #fff; }}
:focus-visible {{ outline: 3px solid #f5a623; outline-offset: 2px; }}
</style></head>
<body><main>
<p class="brand">klaviyo · sandbox</p>
<h1>Allow access to your Klaviyo account?</h1>
<p>The app is asking for:</p><ul>{scopes}</ul>
<form method="get" action="/oauth/authorize">{hidden}
<label for="sandbox_account">Klaviyo account</label>
<input type="text" id="sandbox_account" name="sandbox_account" value="{account}" required>
<label for="sandbox_org">Organization name</label>
<input type="text" id="sandbox_org" name="sandbox_org" value="{organization}">
<div class="actions">
<button type="submit" name="sandbox_decision" value="deny">Deny</button>
<button type="submit" name="sandbox_decision" value="approve">Allow</button>
</div></form>
<p class="note">This is the local Klaviyo sandbox, not Klaviyo. Nothing here reaches the real Klaviyo.</p>
</main></body></html>"#
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1).
fn client_authenticated(sandbox: &Sandbox, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((id, secret)) = text.split_once(':') else {
        return false;
    };
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    decode(id).as_deref() == Some(sandbox.client_id.as_str())
        && decode(secret).is_some_and(|secret| sandbox.client_secret_is(&secret))
}

fn parse_form(headers: &HeaderMap, body: &Bytes) -> Option<BTreeMap<String, String>> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    is_form.then(|| url::form_urlencoded::parse(body).into_owned().collect())
}

/// What the token and revoke endpoints received.
struct Incoming<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

/// The common front of the token and revoke endpoints: record the request, apply injected
/// faults, then require a form body and HTTP Basic client authentication.
async fn oauth_front(
    sandbox: &Sandbox,
    endpoint: Endpoint,
    request: &Incoming<'_>,
    form: &BTreeMap<String, String>,
    account: Option<&str>,
) -> Option<Response> {
    record(
        sandbox,
        endpoint,
        request.method,
        request.uri,
        request.headers,
        form,
        account,
    );
    if let Some(response) = faults(sandbox, endpoint, account).await {
        return Some(response);
    }
    if parse_form(request.headers, request.body).is_none() {
        return Some(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected a form body",
        ));
    }
    if !client_authenticated(sandbox, request.headers) {
        return Some(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        ));
    }
    None
}

fn verifier_matches(verifier: &str, challenge: &str) -> bool {
    let shape_ok = (43..=128).contains(&verifier.len())
        && verifier
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c));
    shape_ok && URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge
}

async fn token(
    State(sandbox): App,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body).unwrap_or_default();
    let account = {
        let state = sandbox.state();
        match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => form
                .get("code")
                .and_then(|c| state.codes.get(c))
                .map(|g| g.account.clone()),
            Some("refresh_token") => form
                .get("refresh_token")
                .and_then(|t| state.refresh_tokens.get(t))
                .map(|g| g.account.clone()),
            _ => None,
        }
    };
    let request = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    if let Some(refusal) = oauth_front(
        &sandbox,
        Endpoint::Token,
        &request,
        &form,
        account.as_deref(),
    )
    .await
    {
        return refusal;
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let mut state = sandbox.state();
    let issued = match field("grant_type") {
        "authorization_code" => {
            let Some(grant) = state.codes.get_mut(field("code")) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown code");
            };
            if grant.used || now_secs() > grant.issued_at + CODE_TTL_SECS {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "code expired or already used",
                );
            }
            grant.used = true;
            if grant.redirect_uri != field("redirect_uri") {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "redirect_uri mismatch",
                );
            }
            if !verifier_matches(field("code_verifier"), &grant.code_challenge) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "PKCE verification failed",
                );
            }
            let (account, scopes) = (grant.account.clone(), grant.scopes.clone());
            let family = random_token();
            let (access, refresh, ttl) = state.issue_tokens(&account, &scopes, &family);
            (access, refresh, ttl, scopes)
        }
        "refresh_token" => {
            let Some(grant) = state.refresh_tokens.get_mut(field("refresh_token")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "unknown refresh token",
                );
            };
            if grant.status != RefreshStatus::Active {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "refresh token revoked or already used",
                );
            }
            grant.status = RefreshStatus::Rotated;
            let (account, scopes, family) = (
                grant.account.clone(),
                grant.scopes.clone(),
                grant.family.clone(),
            );
            let (access, refresh, ttl) = state.issue_tokens(&account, &scopes, &family);
            (access, refresh, ttl, scopes)
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported grant_type",
            );
        }
    };
    let (access, refresh, ttl, scopes) = issued;
    axum::Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": refresh,
        "scope": scopes,
    }))
    .into_response()
}

async fn revoke(
    State(sandbox): App,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body).unwrap_or_default();
    let token = form.get("token").cloned().unwrap_or_default();
    let account = {
        let state = sandbox.state();
        state
            .refresh_tokens
            .get(&token)
            .map(|g| g.account.clone())
            .or_else(|| state.access_tokens.get(&token).map(|g| g.account.clone()))
    };
    let request = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    if let Some(refusal) = oauth_front(
        &sandbox,
        Endpoint::Revoke,
        &request,
        &form,
        account.as_deref(),
    )
    .await
    {
        return refusal;
    }
    let mut state = sandbox.state();
    let family = state
        .refresh_tokens
        .get(&token)
        .map(|g| g.family.clone())
        .or_else(|| state.access_tokens.get(&token).map(|g| g.family.clone()));
    if let Some(family) = family {
        state.revoke_family(&family);
    }
    // RFC 7009: unknown tokens are answered like revoked ones.
    StatusCode::OK.into_response()
}

fn api_error(status: StatusCode, code: &str, detail: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/vnd.api+json")],
        axum::Json(json!({"errors": [{"id": random_token(), "status": status.as_u16(), "code": code, "title": code, "detail": detail}]})),
    )
        .into_response()
}

async fn accounts(State(sandbox): App, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (account, authorized) = {
        let state = sandbox.state();
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            match state.access_tokens.get(token) {
                Some(g) => (
                    Some(g.account.clone()),
                    !g.revoked
                        && g.expires_at > now_secs()
                        && g.scopes.split_whitespace().any(|s| s == "accounts:read"),
                ),
                None => (None, false),
            }
        } else if let Some(key) = authorization.strip_prefix("Klaviyo-API-Key ") {
            let account = state.api_keys.get(key).cloned();
            (account.clone(), account.is_some())
        } else {
            (None, false)
        }
    };
    record(
        &sandbox,
        Endpoint::Accounts,
        &method,
        &uri,
        &headers,
        &BTreeMap::new(),
        account.as_deref(),
    );
    if let Some(response) = faults(&sandbox, Endpoint::Accounts, account.as_deref()).await {
        return response;
    }
    if !headers.contains_key("revision") {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The revision header is required.",
        );
    }
    let Some(account) = account.filter(|_| authorized) else {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "not_authenticated",
            "Incorrect authentication credentials.",
        );
    };
    let organization_name = sandbox
        .state()
        .accounts
        .get(&account)
        .map(|a| a.organization_name.clone())
        .unwrap_or_else(|| format!("Sandbox Org {account}"));
    (
        [(header::CONTENT_TYPE, "application/vnd.api+json")],
        axum::Json(json!({
            "data": [{
                "type": "account",
                "id": account,
                "attributes": {
                    "test_account": true,
                    "contact_information": {
                        "default_sender_name": organization_name,
                        "default_sender_email": "owner@sandbox.invalid",
                        "website_url": "https://sandbox.invalid",
                        "organization_name": organization_name,
                        "street_address": {"address1": "1 Sandbox Way", "city": "Boston", "country": "US"}
                    },
                    "industry": "Software",
                    "timezone": "UTC",
                    "preferred_currency": "USD",
                    "public_api_key": account,
                    "locale": "en-US"
                },
                "links": {"self": format!("/api/accounts/{account}/")}
            }],
            "links": {"self": "/api/accounts/", "next": null, "prev": null}
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_consent_page_carries_the_request_back_and_escapes_what_it_echoes() {
        let query = HashMap::from([
            ("client_id".to_owned(), "app".to_owned()),
            ("state".to_owned(), r#""><script>x</script>"#.to_owned()),
            ("scope".to_owned(), "accounts:read lists:read".to_owned()),
            ("sandbox_decision".to_owned(), "approve".to_owned()),
        ]);
        let response = consent_page(&query);
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains(r#"<input type="hidden" name="client_id" value="app">"#));
        assert!(html.contains("&quot;&gt;&lt;script&gt;x&lt;/script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("<code>lists:read</code>"));
        // The decision is the button pressed, never a hidden field carried over.
        assert!(!html.contains(r#"type="hidden" name="sandbox_decision""#));
    }

    #[test]
    fn browsers_get_the_consent_page_and_programs_the_redirect() {
        let mut headers = HeaderMap::new();
        assert!(!wants_html(&headers));
        headers.insert(header::ACCEPT, "*/*".parse().unwrap());
        assert!(!wants_html(&headers));
        headers.insert(
            header::ACCEPT,
            "text/html,application/xhtml+xml,*/*;q=0.8".parse().unwrap(),
        );
        assert!(wants_html(&headers));
    }

    #[test]
    fn pkce_verification_follows_rfc_7636() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(verifier_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!verifier_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"
        ));
        assert!(!verifier_matches("short", "x"));
    }
}
