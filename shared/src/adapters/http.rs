//! HTTP edge: the one error shape, security headers and CORS on every response, and request
//! helpers that work behind API Gateway HTTP API and under `cargo lambda watch` alike.
//!
//! Use-case modules return `Result<Response<Body>, ApiError>`; `Web::serve` turns that into
//! the final response, so the mapping from error to status and body lives here only.

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::Future;

/// Everything a client can get wrong or a dependency can fail with, as the client sees it.
/// Messages are fixed sentences or built from validated input, never from secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: Cow<'static, str>,
    },
    #[error("Missing or invalid access token.")]
    Unauthorized,
    #[error("This origin is not allowed to call the API.")]
    OriginNotAllowed,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("Method not allowed.")]
    MethodNotAllowed { allow: &'static str },
    #[error("Request body must be JSON (content-type: application/json).")]
    UnsupportedMediaType,
    #[error("Request body is larger than {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("Too many requests; retry after {retry_after_secs} seconds.")]
    RateLimited { retry_after_secs: u64 },
    #[error("{message}")]
    Upstream {
        code: &'static str,
        message: &'static str,
    },
    #[error("The service is temporarily unavailable; please retry.")]
    Unavailable,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Upstream { code, .. } => code,
            Self::Unauthorized => "unauthorized",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable => "service_unavailable",
        }
    }

    /// `{"success":false,"error":{"code":…,"message":…}}` with the headers the status needs.
    pub fn to_response(&self) -> Response<Body> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            success: bool,
            error: Detail<'a>,
        }
        #[derive(Serialize)]
        struct Detail<'a> {
            code: &'a str,
            message: String,
        }
        let body = Envelope {
            success: false,
            error: Detail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = json(self.status(), &body);
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}

/// A JSON response. Serializing our own response types cannot fail; if it ever did, the
/// client still gets valid JSON.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    let mut response = Response::new(Body::Text(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A 302 to a URL the service built itself (never one taken from the request).
pub fn redirect(location: &url::Url) -> Response<Body> {
    let mut response = Response::new(Body::Empty);
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(location.as_str()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Where the OAuth callback sends the browser: only ever `<FRONTEND_URL>/settings?…` with a
/// query the service chose, so nothing in a request can redirect a user elsewhere.
#[derive(Debug, Clone)]
pub struct FrontendRedirects {
    settings: url::Url,
}

impl FrontendRedirects {
    pub fn new(frontend_url: &url::Url) -> Self {
        let mut settings = frontend_url.clone();
        let path = format!("{}/settings", frontend_url.path().trim_end_matches('/'));
        settings.set_path(&path);
        settings.set_query(None);
        settings.set_fragment(None);
        Self { settings }
    }

    /// `<FRONTEND_URL>/settings?<key>=<value>`.
    pub fn settings(&self, key: &str, value: &str) -> Response<Body> {
        self.settings_with(&[(key, value)])
    }

    /// `<FRONTEND_URL>/settings?<key>=<value>&…`.
    pub fn settings_with(&self, pairs: &[(&str, &str)]) -> Response<Body> {
        let mut url = self.settings.clone();
        url.query_pairs_mut().extend_pairs(pairs);
        redirect(&url)
    }
}

/// Logs a dependency failure (without secrets: errors carry none) and answers 503.
pub fn unavailable(what: &'static str, error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(dependency = what, error = %error, "dependency failed");
    ApiError::Unavailable
}

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
const CORS_ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
const CORS_ALLOW_HEADERS: &str = "authorization, content-type";
const CORS_MAX_AGE_SECS: &str = "600";
/// Response headers a browser page may read besides the CORS-safelisted ones: a 429's
/// `retry-after`, so the page can say when to try again.
const CORS_EXPOSE_HEADERS: &str = "retry-after";

/// The response policy every HTTP function shares: CORS allowlist and security headers.
#[derive(Debug, Clone)]
pub struct Web {
    allowed_origins: Vec<String>,
}

impl Web {
    pub fn new(allowed_origins: Vec<String>) -> Self {
        Self { allowed_origins }
    }

    /// Answers a CORS preflight itself; otherwise runs `route`, maps its error to the one
    /// error shape, and decorates whatever comes out with security and CORS headers.
    pub async fn serve<F, Fut>(&self, req: &Request, route: F) -> Response<Body>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Response<Body>, ApiError>>,
    {
        let origin = self.allowed_origin(req);
        let is_preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let response = if is_preflight {
            match origin {
                Some(_) => preflight_response(),
                None => {
                    tracing::warn!(
                        event = "cors_rejected",
                        path = req.uri().path(),
                        "preflight from an origin not in ALLOWED_ORIGINS"
                    );
                    ApiError::OriginNotAllowed.to_response()
                }
            }
        } else {
            route().await.unwrap_or_else(|error| {
                tracing::info!(
                    status = error.status().as_u16(),
                    code = error.code(),
                    path = req.uri().path(),
                    "request refused"
                );
                error.to_response()
            })
        };
        decorate(response, origin)
    }

    /// The request's Origin if it is on the allowlist (compared exactly, case-insensitively).
    fn allowed_origin<'r>(&self, req: &'r Request) -> Option<&'r HeaderValue> {
        let origin = req.headers().get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(text))
            .then_some(origin)
    }
}

fn preflight_response() -> Response<Body> {
    let mut response = Response::new(Body::Empty);
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(CORS_ALLOW_METHODS),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(CORS_ALLOW_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(CORS_MAX_AGE_SECS),
    );
    response
}

fn decorate(mut response: Response<Body>, origin: Option<&HeaderValue>) -> Response<Body> {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    // Responses differ by Origin, so caches must key on it even when no CORS header is set.
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE_HEADERS),
        );
    }
    response
}

/// Refuses any method but `allowed` with a 405 carrying `Allow`.
pub fn require_method(req: &Request, allowed: Method, allow: &'static str) -> Result<(), ApiError> {
    if req.method() == allowed {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed { allow })
    }
}

/// A query parameter, from the event's parsed parameters or, failing that, the raw URI.
pub fn query_param(req: &Request, name: &str) -> Option<String> {
    if let Some(value) = req
        .query_string_parameters_ref()
        .and_then(|params| params.first(name))
    {
        return Some(value.to_owned());
    }
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The path parameter `name` of a route ending in `/{name}`. API Gateway fills path
/// parameters; when they are absent (some local runners) the last segment after
/// `route_prefix` (e.g. `/api/oauth/accounts/`) is taken from the raw path, percent-decoded.
pub fn path_param(req: &Request, name: &str, route_prefix: &str) -> Option<String> {
    if let Some(value) = req
        .path_parameters_ref()
        .and_then(|params| params.first(name))
    {
        return Some(value.to_owned()).filter(|v| !v.is_empty());
    }
    tail_segment(req.uri().path(), route_prefix)
}

/// The single non-empty segment after the last `route_prefix` in `path`, percent-decoded.
pub fn tail_segment(path: &str, route_prefix: &str) -> Option<String> {
    let start = path.rfind(route_prefix)? + route_prefix.len();
    let raw = path[start..].trim_end_matches('/');
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let decoded = url::form_urlencoded::parse(format!("v={}", raw.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    Some(decoded).filter(|v| !v.is_empty())
}

/// Parses a JSON body: `application/json` required, at most `limit` bytes, and error messages
/// that never echo the body (it may hold an API key).
pub fn json_body<T: DeserializeOwned>(req: &Request, limit: usize) -> Result<T, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes: &[u8] = req.body().as_ref();
    if bytes.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Every body is an object: serde would also read a struct from an array of its fields.
    let is_object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if !is_object && serde_json::from_slice::<serde_json::Value>(bytes).is_ok() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "Request body must be a JSON object.",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(
            "invalid_body",
            "Request body does not have the expected fields and types.",
        ),
        _ => ApiError::bad_request("invalid_json", "Request body is not valid JSON."),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::Empty).unwrap()
    }

    fn web() -> Web {
        Web::new(vec!["https://app.example.com".into()])
    }

    fn body_json(response: &Response<Body>) -> serde_json::Value {
        serde_json::from_slice(response.body().as_ref()).unwrap()
    }

    #[tokio::test]
    async fn errors_have_one_shape_and_security_headers() {
        let req = request(Method::GET, "/api/oauth/accounts", &[]);
        let response = web()
            .serve(&req, || async { Err(ApiError::Unauthorized) })
            .await;
        assert_eq!(response.status(), 401);
        assert_eq!(
            body_json(&response),
            serde_json::json!({"success": false, "error": {"code": "unauthorized", "message": "Missing or invalid access token."}})
        );
        let headers = response.headers();
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["www-authenticate"], "Bearer");
        for (name, value) in SECURITY_HEADERS {
            assert_eq!(headers[name], value);
        }
        assert!(headers.get("access-control-allow-origin").is_none());
    }

    #[tokio::test]
    async fn rate_limit_carries_retry_after_and_405_carries_allow() {
        let req = request(Method::GET, "/x", &[]);
        let limited = web()
            .serve(&req, || async {
                Err(ApiError::RateLimited {
                    retry_after_secs: 7,
                })
            })
            .await;
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after"], "7");
        let wrong = web()
            .serve(&req, || async {
                Err(ApiError::MethodNotAllowed { allow: "GET" })
            })
            .await;
        assert_eq!(wrong.status(), 405);
        assert_eq!(wrong.headers()["allow"], "GET");
    }

    #[tokio::test]
    async fn cors_only_for_allowed_origins() {
        let ok = request(Method::GET, "/x", &[("origin", "https://app.example.com")]);
        let response = web()
            .serve(&ok, || async { Ok(json(StatusCode::OK, &1)) })
            .await;
        assert_eq!(
            response.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(
            response.headers()["access-control-expose-headers"],
            "retry-after"
        );

        for bad in [
            "https://evil.example.com",
            "null",
            "https://app.example.com.evil.com",
        ] {
            let req = request(Method::GET, "/x", &[("origin", bad)]);
            let response = web()
                .serve(&req, || async { Ok(json(StatusCode::OK, &1)) })
                .await;
            for name in [
                "access-control-allow-origin",
                "access-control-expose-headers",
            ] {
                assert!(response.headers().get(name).is_none(), "{bad}: {name}");
            }
        }
    }

    #[tokio::test]
    async fn preflight_is_answered_without_running_the_route() {
        let req = request(
            Method::OPTIONS,
            "/api/oauth/accounts",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "GET"),
            ],
        );
        let response = web()
            .serve(&req, || async {
                panic!("the route must not run for a preflight")
            })
            .await;
        assert_eq!(response.status(), 204);
        assert_eq!(
            response.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert!(
            response.headers()["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .contains("authorization")
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");

        let req = request(
            Method::OPTIONS,
            "/api/oauth/accounts",
            &[("origin", "null"), ("access-control-request-method", "GET")],
        );
        let response = web().serve(&req, || async { panic!("must not run") }).await;
        assert_eq!(response.status(), 403);
        assert_eq!(body_json(&response)["error"]["code"], "origin_not_allowed");
    }

    #[test]
    fn redirects_only_go_to_the_frontend_settings_page() {
        let frontend =
            FrontendRedirects::new(&url::Url::parse("https://app.example.com/").unwrap());
        let response = frontend.settings("error", "klaviyo_access_denied");
        assert_eq!(response.status(), 302);
        assert_eq!(
            response.headers()["location"],
            "https://app.example.com/settings?error=klaviyo_access_denied"
        );
        let nested = FrontendRedirects::new(&url::Url::parse("https://example.com/app/").unwrap());
        assert_eq!(
            nested.settings("connected", "klaviyo").headers()["location"],
            "https://example.com/app/settings?connected=klaviyo"
        );
    }

    #[test]
    fn path_parameter_falls_back_to_the_raw_path() {
        let prefix = "/api/oauth/accounts/";
        assert_eq!(
            tail_segment("/api/oauth/accounts/abc-123", prefix).as_deref(),
            Some("abc-123")
        );
        assert_eq!(
            tail_segment("/prod/api/oauth/accounts/abc/", prefix).as_deref(),
            Some("abc")
        );
        assert_eq!(
            tail_segment("/api/oauth/accounts/a%20b", prefix).as_deref(),
            Some("a b")
        );
        assert_eq!(
            tail_segment("/api/oauth/accounts/a+b", prefix).as_deref(),
            Some("a+b")
        );
        assert_eq!(tail_segment("/api/oauth/accounts/", prefix), None);
        assert_eq!(tail_segment("/api/oauth/accounts/a/b", prefix), None);
        assert_eq!(tail_segment("/other", prefix), None);

        let req = request(Method::DELETE, "/api/oauth/accounts/xyz", &[]);
        assert_eq!(
            path_param(&req, "accountId", prefix).as_deref(),
            Some("xyz")
        );
        let req = req.with_path_parameters(std::collections::HashMap::from([(
            "accountId".to_string(),
            "from-gateway".to_string(),
        )]));
        assert_eq!(
            path_param(&req, "accountId", prefix).as_deref(),
            Some("from-gateway")
        );
    }

    #[test]
    fn query_parameter_falls_back_to_the_raw_uri() {
        let req = request(Method::GET, "/cb?code=a%2Fb&state=s1", &[]);
        assert_eq!(query_param(&req, "code").as_deref(), Some("a/b"));
        assert_eq!(query_param(&req, "state").as_deref(), Some("s1"));
        assert_eq!(query_param(&req, "missing"), None);
    }

    #[test]
    fn json_body_checks_type_size_and_never_echoes_input() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Input {
            n: u32,
        }
        let with = |ct: &str, body: &str| {
            http::Request::builder()
                .method(Method::POST)
                .uri("/")
                .header("content-type", ct)
                .body(Body::Text(body.to_owned()))
                .unwrap()
        };
        assert!(
            json_body::<Input>(&with("application/json; charset=utf-8", r#"{"n":1}"#), 100).is_ok()
        );
        assert_eq!(
            json_body::<Input>(&with("text/plain", r#"{"n":1}"#), 100).unwrap_err(),
            ApiError::UnsupportedMediaType
        );
        assert_eq!(
            json_body::<Input>(&with("application/json", &"x".repeat(101)), 100).unwrap_err(),
            ApiError::PayloadTooLarge { limit: 100 }
        );
        assert_eq!(
            json_body::<Input>(&with("application/json", "{"), 100)
                .unwrap_err()
                .code(),
            "invalid_json"
        );
        let err =
            json_body::<Input>(&with("application/json", r#"{"n":"pk_secret"}"#), 100).unwrap_err();
        assert_eq!(err.code(), "invalid_body");
        assert!(!err.to_string().contains("pk_secret"));
        // The fields as an array (which serde would read into the struct) or a bare value.
        for body in ["[1]", " [1]", "1", "\"x\"", "null"] {
            let err = json_body::<Input>(&with("application/json", body), 100).unwrap_err();
            assert_eq!(err.code(), "invalid_body", "{body}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_path_parses_without_panicking(path in "\\PC*", prefix in "/[a-z/]{0,20}") {
            let _ = tail_segment(&path, &prefix);
        }

        #[test]
        fn an_encoded_segment_comes_back_exactly(segment in "\\PC{1,80}") {
            let encoded: String =
                url::form_urlencoded::byte_serialize(segment.as_bytes()).collect();
            // form encoding writes spaces as '+', which a path keeps literally: use %20.
            let encoded = encoded.replace('+', "%20");
            let path = format!("/api/oauth/accounts/{encoded}");
            prop_assert_eq!(tail_segment(&path, "/api/oauth/accounts/"), Some(segment));
        }

        #[test]
        fn more_than_one_segment_is_never_an_id(a in "[a-z0-9]{1,10}", b in "[a-z0-9]{1,10}") {
            let path = format!("/api/oauth/accounts/{a}/{b}");
            prop_assert_eq!(tail_segment(&path, "/api/oauth/accounts/"), None);
        }
    }
}
