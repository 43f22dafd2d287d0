//! Klaviyo: the OAuth side (authorize URL with PKCE, code exchange, refresh, revoke) through
//! the `oauth2` crate, and the accounts endpoint of the API.
//!
//! All HTTP goes through one `reqwest` client (rustls, bounded timeouts, no redirects so a
//! token endpoint can never bounce credentials elsewhere). Token and revoke calls use HTTP
//! Basic client authentication and form bodies, as Klaviyo requires. 429 and 5xx answers are
//! surfaced as `KlaviyoError::RateLimited` / `Unavailable` with Klaviyo's `Retry-After`.
//!
//! The client secret can change while a container lives (the operator puts the real one after the
//! first deploy, or rotates it). When Klaviyo answers `invalid_client` the client logs
//! `klaviyo_client_rejected` at error level (an alarm pages on it: nothing can work until the
//! secret is right) and, at most once per `SECRET_RELOAD_INTERVAL`, reads the secret again from its
//! source (`crate::adapters::reload`); if it changed, the call is made once more with the new one.

use crate::adapters::config::KlaviyoConfig;
use crate::adapters::reload::{Reloadable, Reloading, Source};
use crate::domain::secret::Secret;
use http::header::{ACCEPT, AUTHORIZATION, HeaderMap, RETRY_AFTER};
use oauth2::AsyncHttpClient;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    HttpRequest, HttpResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, StandardErrorResponse, TokenResponse, TokenUrl,
};
use serde::Deserialize;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// Bytes of randomness in `state` and in the PKCE verifier (43 base64url characters each).
const RANDOM_BYTES: u32 = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one call to Klaviyo may take (connect included); calls are not retried inside a
/// request, except revocations (`crate::use_cases::revocation`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A revocation is tiny; a short timeout leaves room to retry one inside a request.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest response body read from Klaviyo; real ones are a few KB.
const MAX_RESPONSE_BODY: usize = 256 * 1024;

type OAuthClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KlaviyoError {
    /// Klaviyo answered with an OAuth error (`invalid_grant`, `invalid_client`, …) or refused
    /// the credentials on the API (401/403). Retrying will not help.
    #[error("Klaviyo refused the request: {code}")]
    Rejected { code: String },
    /// 429: retry after the given delay.
    #[error("Klaviyo rate limited the request")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeouts, connection failures: transient.
    #[error("Klaviyo unavailable: {0}")]
    Unavailable(String),
    /// Klaviyo answered something we cannot read.
    #[error("unexpected answer from Klaviyo: {0}")]
    Malformed(String),
}

impl KlaviyoError {
    /// The API answered 401: it does not accept the credential (a deleted key, a revoked
    /// token). A 403 is not this: it also comes from scopes, and from edges and firewalls in
    /// front of Klaviyo, and must never cost a user their connection.
    pub fn is_credential_refused(&self) -> bool {
        matches!(self, Self::Rejected { code } if code == "http_401")
    }

    /// The refresh token (or code) is no longer valid: the user must reconnect.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::Rejected { code } if code == "invalid_grant")
    }

    /// Klaviyo refused our client credentials: a configuration fault (the client secret is
    /// wrong), not the user's and not transient. Nothing can succeed until it is fixed.
    pub fn is_invalid_client(&self) -> bool {
        matches!(self, Self::Rejected { code } if code == "invalid_client")
    }

    /// Worth retrying later with the same credentials.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unavailable(_))
    }
}

/// The start of an authorization: the URL to send the browser to, and the two values that
/// must be kept (hashed state as the key, verifier as the value) until Klaviyo calls back.
pub struct AuthorizationRequest {
    pub url: url::Url,
    pub state: Secret,
    pub code_verifier: Secret,
}

impl fmt::Debug for AuthorizationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationRequest")
            .field("state", &self.state)
            .field("code_verifier", &self.code_verifier)
            .finish_non_exhaustive()
    }
}

/// Tokens from a code exchange or refresh.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    /// `None` when a refresh answer carried no new refresh token (the old one stays valid).
    pub refresh_token: Option<Secret>,
    pub expires_at: OffsetDateTime,
    /// Scopes Klaviyo granted, if it said.
    pub scopes: Option<Vec<String>>,
}

/// The Klaviyo account behind a token or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlaviyoAccount {
    pub id: String,
    pub organization_name: String,
}

/// How a call to the API authenticates.
#[derive(Debug, Clone, Copy)]
pub enum ApiCredential<'a> {
    AccessToken(&'a Secret),
    ApiKey(&'a Secret),
}

/// The client credentials as last read: the OAuth client carrying them, and the secret for
/// the calls made without it (revocation).
struct ClientCredentials {
    oauth: OAuthClient,
    secret: Secret,
}

impl Reloadable for ClientCredentials {
    type Value = Secret;

    fn value(&self) -> &Secret {
        &self.secret
    }
}

#[derive(Clone)]
pub struct Klaviyo {
    http: reqwest::Client,
    oauth_http: OAuthHttp,
    /// The OAuth client without a secret; `credentials` holds it with the current one.
    unauthenticated: OAuthClient,
    credentials: Arc<Reloading<ClientCredentials>>,
    client_id: String,
    revoke_url: String,
    scopes: Vec<String>,
    accounts_url: String,
    revision: String,
}

impl fmt::Debug for Klaviyo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Klaviyo")
            .field("accounts_url", &self.accounts_url)
            .field("client_secret", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Klaviyo {
    /// Built once per container. URLs were validated by `Config`.
    pub fn new(config: &KlaviyoConfig, client_secret: &Secret) -> Result<Self, String> {
        let http = crate::http_client()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("klaviyo-connect/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let url_error = |e: url::ParseError| format!("Klaviyo URL: {e}");
        let unauthenticated = BasicClient::new(ClientId::new(config.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(config.authorize_url.clone()))
            .set_token_uri(TokenUrl::new(config.token_url()).map_err(url_error)?)
            .set_redirect_uri(RedirectUrl::from_url(config.redirect_uri.clone()));
        let credentials = credentials(&unauthenticated, client_secret.clone());
        Ok(Self {
            oauth_http: OAuthHttp(http.clone()),
            http,
            unauthenticated,
            credentials: Arc::new(Reloading::new(credentials)),
            client_id: config.client_id.clone(),
            revoke_url: config.revoke_url(),
            scopes: config.scopes.clone(),
            accounts_url: config.accounts_url(),
            revision: config.api_revision.clone(),
        })
    }

    /// Reads the client secret again from `source` after `invalid_client` (and when
    /// `reload_client_secret` asks), the one it was built with counting as just read.
    pub fn with_secret_source(mut self, source: Arc<dyn Source<Secret>>) -> Self {
        self.credentials = Arc::new(self.credentials.with_source(source));
        self
    }

    /// Reads the client secret again unless it was read within `fresh` (the refresh job does
    /// this at the start of every run). `Ok(true)` when it changed.
    pub async fn reload_client_secret(&self, fresh: Duration) -> Result<bool, String> {
        self.credentials
            .reload(fresh, |secret| self.holding(secret))
            .await
    }

    fn current(&self) -> Arc<ClientCredentials> {
        self.credentials.current()
    }

    /// The credentials for a new secret.
    fn holding(&self, secret: Secret) -> ClientCredentials {
        tracing::info!(
            event = "klaviyo_client_secret_reloaded",
            "a new Klaviyo client secret is in use"
        );
        credentials(&self.unauthenticated, secret)
    }

    /// Runs a call that authenticates as the client. On `invalid_client` the secret is read
    /// again (at most once per `SECRET_RELOAD_INTERVAL`, or when another call already did)
    /// and, if it changed, the call is made once more. Only a call that ends rejected raises
    /// `klaviyo_client_rejected`: a container that catches up with a rotation does not page.
    async fn as_client<T, F, Fut>(&self, call: F) -> Result<T, KlaviyoError>
    where
        F: Fn(Arc<ClientCredentials>) -> Fut,
        Fut: Future<Output = Result<T, KlaviyoError>>,
    {
        let used = self.current();
        let outcome = match call(used.clone()).await {
            Err(error) if error.is_invalid_client() => match self.reloaded_since(&used).await {
                true => call(self.current()).await,
                false => Err(error),
            },
            other => other,
        };
        if outcome.as_ref().is_err_and(KlaviyoError::is_invalid_client) {
            log_client_rejected();
        }
        outcome
    }

    /// Whether a secret other than `used` is in use now, reading it again if allowed. Callers
    /// queue behind one read (bounded by the AWS call timeout) and then find it fresh.
    async fn reloaded_since(&self, used: &Arc<ClientCredentials>) -> bool {
        match self
            .credentials
            .reloaded_since(used, |secret| self.holding(secret))
            .await
        {
            Ok(replaced) => replaced,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the Klaviyo client secret again");
                false
            }
        }
    }

    pub fn requested_scopes(&self) -> &[String] {
        &self.scopes
    }

    /// A fresh random `state` and PKCE (S256) pair, and the authorize URL carrying them.
    pub fn authorization_request(&self) -> AuthorizationRequest {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256_len(RANDOM_BYTES);
        let (url, state) = self
            .unauthenticated
            .authorize_url(|| CsrfToken::new_random_len(RANDOM_BYTES))
            .add_scopes(self.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .url();
        AuthorizationRequest {
            url,
            state: Secret::new(state.into_secret()),
            code_verifier: Secret::new(verifier.into_secret()),
        }
    }

    /// `grant_type=authorization_code` with the PKCE verifier and the redirect URI.
    pub async fn exchange_code(
        &self,
        code: &Secret,
        code_verifier: &Secret,
    ) -> Result<TokenSet, KlaviyoError> {
        let response = self
            .as_client(|client| async move {
                client
                    .oauth
                    .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
                    .set_pkce_verifier(PkceCodeVerifier::new(code_verifier.expose().to_owned()))
                    .request_async(&self.oauth_http)
                    .await
                    .map_err(token_error)
            })
            .await?;
        let tokens = token_set(&response);
        if tokens.refresh_token.is_none() {
            return Err(KlaviyoError::Malformed(
                "the code exchange returned no refresh token".into(),
            ));
        }
        Ok(tokens)
    }

    /// `grant_type=refresh_token`. A returned refresh token replaces the old one.
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenSet, KlaviyoError> {
        let token = RefreshToken::new(refresh_token.expose().to_owned());
        let response = self
            .as_client(|client| {
                let token = &token;
                async move {
                    client
                        .oauth
                        .exchange_refresh_token(token)
                        .request_async(&self.oauth_http)
                        .await
                        .map_err(token_error)
                }
            })
            .await?;
        Ok(token_set(&response))
    }

    /// Revokes a refresh token (RFC 7009: form `token`, `token_type_hint=refresh_token`,
    /// HTTP Basic client authentication). An unknown or already revoked token counts as
    /// revoked. Sent directly rather than through `oauth2`, whose revocation refuses any
    /// endpoint that is not https (the local sandbox is http on loopback).
    pub async fn revoke(&self, refresh_token: &Secret) -> Result<(), KlaviyoError> {
        self.as_client(|client| self.revoke_as(client, refresh_token))
            .await
    }

    async fn revoke_as(
        &self,
        client: Arc<ClientCredentials>,
        refresh_token: &Secret,
    ) -> Result<(), KlaviyoError> {
        let response = self
            .http
            .post(&self.revoke_url)
            .timeout(REVOKE_TIMEOUT)
            // RFC 6749 §2.3.1: both parts form-encoded, as `oauth2` sends them to the token
            // endpoint, so a secret with `+`, `/`, `=` or `:` authenticates the same at both.
            .basic_auth(
                form_encoded(&self.client_id),
                Some(form_encoded(client.secret.expose())),
            )
            .form(&[
                ("token", refresh_token.expose()),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        if let Some(error) = status_error(status, response.headers()) {
            return Err(error);
        }
        if status.is_success() {
            return Ok(());
        }
        #[derive(Deserialize)]
        struct OAuthError {
            error: String,
        }
        let body = read_limited(response, MAX_RESPONSE_BODY).await?;
        match serde_json::from_slice::<OAuthError>(&body) {
            Ok(e) if e.error == "invalid_grant" => Ok(()),
            Ok(e) => Err(KlaviyoError::Rejected { code: e.error }),
            Err(_) => Err(KlaviyoError::Malformed(format!("revoke answered {status}"))),
        }
    }

    /// `GET {api}/accounts/`: the account a token or API key belongs to.
    pub async fn account(
        &self,
        credential: ApiCredential<'_>,
    ) -> Result<KlaviyoAccount, KlaviyoError> {
        let authorization = match credential {
            ApiCredential::AccessToken(token) => format!("Bearer {}", token.expose()),
            ApiCredential::ApiKey(key) => format!("Klaviyo-API-Key {}", key.expose()),
        };
        let response = self
            .http
            .get(&self.accounts_url)
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/vnd.api+json")
            .header("revision", &self.revision)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        if let Some(error) = status_error(status, response.headers()) {
            return Err(error);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(KlaviyoError::Rejected {
                code: format!("http_{}", status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(KlaviyoError::Malformed(format!(
                "accounts answered {status}"
            )));
        }
        let body = read_limited(response, MAX_RESPONSE_BODY).await?;
        parse_account(&body)
    }
}

fn form_encoded(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn credentials(unauthenticated: &OAuthClient, secret: Secret) -> ClientCredentials {
    ClientCredentials {
        oauth: unauthenticated
            .clone()
            .set_client_secret(ClientSecret::new(secret.expose().to_owned())),
        secret,
    }
}

/// Logged at error level: the KlaviyoClientRejected alarm counts these.
fn log_client_rejected() {
    tracing::error!(
        event = "klaviyo_client_rejected",
        "Klaviyo refused the client id and secret (invalid_client): put the right client secret in Secrets Manager"
    );
}

/// Carries a classified failure through `oauth2`'s error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(KlaviyoError);

/// The HTTP client handed to `oauth2`: reqwest, with 429/5xx turned into errors that keep
/// the status and `Retry-After` (which `oauth2` itself would discard).
#[derive(Clone)]
struct OAuthHttp(reqwest::Client);

impl<'c> AsyncHttpClient<'c> for OAuthHttp {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

async fn send(
    http: &reqwest::Client,
    request: HttpRequest,
) -> Result<HttpResponse, TransportError> {
    let request =
        reqwest::Request::try_from(request).map_err(|e| TransportError(transport_error(e)))?;
    let response = http
        .execute(request)
        .await
        .map_err(|e| TransportError(transport_error(e)))?;
    if let Some(error) = status_error(response.status(), response.headers()) {
        return Err(TransportError(error));
    }
    let mut builder = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = read_limited(response, MAX_RESPONSE_BODY)
        .await
        .map_err(TransportError)?;
    builder
        .body(body)
        .map_err(|e| TransportError(KlaviyoError::Malformed(e.to_string())))
}

fn status_error(status: reqwest::StatusCode, headers: &HeaderMap) -> Option<KlaviyoError> {
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Some(KlaviyoError::RateLimited {
            retry_after: retry_after(headers),
        });
    }
    status
        .is_server_error()
        .then(|| KlaviyoError::Unavailable(format!("HTTP {}", status.as_u16())))
}

/// `Retry-After` in seconds (Klaviyo sends seconds; an HTTP date is treated as absent).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}

/// Network failures never include the request body, so no secret can leak through them.
fn transport_error(error: reqwest::Error) -> KlaviyoError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response body unreadable"
    } else {
        "request failed"
    };
    KlaviyoError::Unavailable(kind.to_owned())
}

async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, KlaviyoError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > limit {
            return Err(KlaviyoError::Malformed("response too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn token_set(response: &oauth2::basic::BasicTokenResponse) -> TokenSet {
    let now = OffsetDateTime::now_utc();
    // Read expires_in from every answer. Without one, treat the token as due now so the
    // refresh job replaces it rather than trusting a guessed lifetime.
    let lifetime = response
        .expires_in()
        .and_then(|d| time::Duration::try_from(d).ok())
        .unwrap_or(time::Duration::ZERO);
    // Whole seconds: the refresh schedule is kept in epoch seconds.
    let expires_at = now + lifetime;
    let expires_at = expires_at.replace_nanosecond(0).unwrap_or(expires_at);
    TokenSet {
        access_token: Secret::new(response.access_token().secret().clone()),
        refresh_token: response
            .refresh_token()
            .map(|t| Secret::new(t.secret().clone())),
        expires_at,
        scopes: response
            .scopes()
            .map(|scopes| scopes.iter().map(|s| s.to_string()).collect()),
    }
}

fn token_error(
    error: RequestTokenError<TransportError, StandardErrorResponse<BasicErrorResponseType>>,
) -> KlaviyoError {
    match error {
        RequestTokenError::ServerResponse(response) => KlaviyoError::Rejected {
            code: response.error().as_ref().to_owned(),
        },
        RequestTokenError::Request(TransportError(inner)) => inner,
        RequestTokenError::Parse(e, _) => {
            KlaviyoError::Malformed(format!("token response: {}", e.path()))
        }
        RequestTokenError::Other(message) => KlaviyoError::Malformed(message),
    }
}

#[derive(Deserialize)]
struct AccountsDocument {
    data: Vec<AccountResource>,
}

#[derive(Deserialize)]
struct AccountResource {
    id: String,
    #[serde(default)]
    attributes: Option<AccountAttributes>,
}

#[derive(Deserialize)]
struct AccountAttributes {
    #[serde(default)]
    contact_information: Option<ContactInformation>,
}

#[derive(Deserialize)]
struct ContactInformation {
    #[serde(default)]
    organization_name: Option<String>,
}

/// `data[0].id` and `data[0].attributes.contact_information.organization_name`.
fn parse_account(body: &[u8]) -> Result<KlaviyoAccount, KlaviyoError> {
    let document: AccountsDocument = serde_json::from_slice(body).map_err(|_| {
        KlaviyoError::Malformed("accounts response is not the expected JSON:API document".into())
    })?;
    let account = document
        .data
        .into_iter()
        .next()
        .ok_or_else(|| KlaviyoError::Malformed("accounts response has no account".into()))?;
    let id_ok = !account.id.is_empty()
        && account.id.len() <= 64
        && account
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !id_ok {
        return Err(KlaviyoError::Malformed(
            "account id has an unexpected form".into(),
        ));
    }
    let organization_name = account
        .attributes
        .and_then(|a| a.contact_information)
        .and_then(|c| c.organization_name)
        .map(|name| {
            name.trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| account.id.clone());
    Ok(KlaviyoAccount {
        id: account.id,
        organization_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::config::Config;
    use crate::domain::secret::Held;
    use std::collections::HashMap;

    fn klaviyo() -> Klaviyo {
        let vars = HashMap::from([
            ("TABLE_NAME", "t-table"),
            ("KMS_KEY_ID", "k"),
            ("KLAVIYO_CLIENT_ID", "client-123"),
            ("KLAVIYO_CLIENT_SECRET_ARN", "arn"),
            (
                "KLAVIYO_REDIRECT_URI",
                "https://api.example.com/klaviyo/oauthcallback",
            ),
            ("JWT_SECRET_ARN", "arn"),
            ("FRONTEND_URL", "https://app.example.com"),
        ]);
        let config = Config::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        Klaviyo::new(&config.klaviyo, &Secret::new("unit-test-client-secret")).unwrap()
    }

    #[test]
    fn authorize_url_carries_everything_klaviyo_requires() {
        let request = klaviyo().authorization_request();
        let url = &request.url;
        assert_eq!(
            url.as_str().split('?').next(),
            Some("https://www.klaviyo.com/oauth/authorize")
        );
        let query: HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(query["response_type"], "code");
        assert_eq!(query["client_id"], "client-123");
        assert_eq!(
            query["redirect_uri"],
            "https://api.example.com/klaviyo/oauthcallback"
        );
        assert_eq!(query["scope"], crate::adapters::config::DEFAULT_SCOPES);
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(query["state"], request.state.expose());
        assert_eq!(request.state.expose().len(), 43);
        let verifier = request.code_verifier.expose();
        assert!((43..=128).contains(&verifier.len()));
        assert!(
            verifier
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
        );
        use base64::Engine;
        use sha2::Digest;
        let expected =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier));
        assert_eq!(query["code_challenge"], expected);
        assert!(
            !url.as_str().contains(verifier),
            "the verifier never leaves the service"
        );
        assert!(!url.as_str().contains("unit-test-client-secret"));
    }

    #[test]
    fn every_request_gets_fresh_randomness() {
        let k = klaviyo();
        let (a, b) = (k.authorization_request(), k.authorization_request());
        assert_ne!(a.state.expose(), b.state.expose());
        assert_ne!(a.code_verifier.expose(), b.code_verifier.expose());
    }

    #[test]
    fn parses_klaviyo_accounts_documents() {
        let body = br#"{"data":[{"type":"account","id":"XyZ123","attributes":{"contact_information":{"organization_name":"Acme Inc"}}}],"links":{}}"#;
        assert_eq!(
            parse_account(body).unwrap(),
            KlaviyoAccount {
                id: "XyZ123".into(),
                organization_name: "Acme Inc".into()
            }
        );
        let no_name = br#"{"data":[{"type":"account","id":"XyZ123","attributes":{}}]}"#;
        assert_eq!(parse_account(no_name).unwrap().organization_name, "XyZ123");
        for bad in [
            &br#"{"data":[]}"#[..],
            b"not json",
            br#"{"data":[{"id":"../../x"}]}"#,
            b"{}",
        ] {
            assert!(matches!(
                parse_account(bad),
                Err(KlaviyoError::Malformed(_))
            ));
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "-3".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    impl Source<Secret> for Held<String> {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Secret, String>> + Send + '_>> {
            let value = self.read();
            Box::pin(async move { Ok(Secret::new(value)) })
        }
    }

    #[tokio::test]
    async fn a_new_client_secret_replaces_the_held_one() {
        let source = Arc::new(Held::new("unit-test-client-secret".to_owned()));
        let k = klaviyo().with_secret_source(source.clone());
        let reads = || source.reads();
        // Read just now (at construction): a run start does not read it again.
        assert_eq!(
            k.reload_client_secret(Duration::from_secs(10)).await,
            Ok(false)
        );
        assert_eq!(reads(), 0);
        // Unchanged: nothing is replaced.
        assert_eq!(k.reload_client_secret(Duration::ZERO).await, Ok(false));
        assert_eq!(reads(), 1);
        source.set("rotated-client-secret".into());
        assert_eq!(k.reload_client_secret(Duration::ZERO).await, Ok(true));
        assert_eq!(k.current().secret.expose(), "rotated-client-secret");
        // Clones share the credentials.
        assert_eq!(k.clone().current().secret.expose(), "rotated-client-secret");
        // After a rejection within the interval: no read, unless another call already
        // installed a newer secret than the one the rejected call used.
        let used = k.current();
        assert!(!k.reloaded_since(&used).await);
        assert_eq!(reads(), 2);
        source.set("third-client-secret".into());
        k.reload_client_secret(Duration::ZERO).await.unwrap();
        assert!(k.reloaded_since(&used).await, "a newer secret is in use");
        assert_eq!(reads(), 3);
    }

    /// A source whose reads fail.
    struct Failing(std::sync::atomic::AtomicUsize);

    impl Source<Secret> for Failing {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Secret, String>> + Send + '_>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err("Secrets Manager unavailable".to_owned()) })
        }
    }

    /// A failed read counts as a read: callers after it do not each ask Secrets Manager
    /// again within the interval.
    #[tokio::test]
    async fn a_failed_read_is_not_repeated_by_every_caller() {
        let source = Arc::new(Failing(Default::default()));
        let k = klaviyo().with_secret_source(source.clone());
        assert!(k.reload_client_secret(Duration::ZERO).await.is_err());
        let used = k.current();
        for _ in 0..5 {
            assert!(!k.reloaded_since(&used).await);
        }
        assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(k.current().secret.expose(), "unit-test-client-secret");
    }

    #[test]
    fn errors_classify() {
        assert!(
            KlaviyoError::Rejected {
                code: "invalid_grant".into()
            }
            .is_invalid_grant()
        );
        assert!(
            !KlaviyoError::Rejected {
                code: "invalid_client".into()
            }
            .is_invalid_grant()
        );
        assert!(KlaviyoError::RateLimited { retry_after: None }.is_transient());
        assert!(KlaviyoError::Unavailable("x".into()).is_transient());
        assert!(!KlaviyoError::Malformed("x".into()).is_transient());
        let invalid_client = KlaviyoError::Rejected {
            code: "invalid_client".into(),
        };
        assert!(invalid_client.is_invalid_client() && !invalid_client.is_transient());
    }
}
