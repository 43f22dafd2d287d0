//! Start-up: what every function builds once per container. Configuration is read and validated,
//! AWS is configured once (timeouts, retries, `AWS_ENDPOINT_URL`), and the secrets a function needs
//! are fetched from Secrets Manager once and kept. The Klaviyo client secret is read again when
//! Klaviyo rejects it (`crate::adapters::klaviyo`) and by the refresh job at the start of every
//! run, so putting a new value takes effect without a redeploy. A client secret put with a trailing
//! newline (`file://secret.txt`) is trimmed; the JWT key is accepted both ways
//! (`crate::adapters::auth`), since the host app may sign with either. The JWT key is read with its
//! previous version, accepted for `JWT_PREVIOUS_KEY_GRACE_SECONDS` after the current one was
//! created, and read again when a token matches neither and every five minutes
//! (`crate::adapters::auth`).
//!
//! A bad setting stops start-up (nothing can fix it but a deploy). Secrets Manager being
//! down does not: an HTTP function that could not fetch its secrets at start-up answers 503
//! (the callback: its failure redirect) and tries again on the next request, so a blip during
//! a cold start costs one request, not a crash loop.

use crate::adapters::auth::{JwtKeys, JwtVerifier};
use crate::adapters::config::{Config, ConfigError};
use crate::adapters::crypto::Sealer;
use crate::adapters::event_bus::EventBus;
use crate::adapters::http::{ApiError, FrontendRedirects, Web};
use crate::adapters::klaviyo::Klaviyo;
use crate::adapters::reload::Source;
use crate::adapters::store::Store;
use crate::domain::secret::Secret;
use crate::use_cases::events::Publisher;
use crate::use_cases::revocation::Revoker;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata};
use lambda_http::{Body, Request, Response};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

/// Why a function could not start. `Debug` prints the same sentence as `Display` so the
/// runtime's start-up failure message names the setting at fault.
#[derive(thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not read the secret named by {setting}: {reason}")]
    Secret {
        setting: &'static str,
        reason: String,
    },
    #[error("could not set up the Klaviyo client: {0}")]
    Klaviyo(String),
    #[error("another JWT crypto provider was fixed before this service's (HMAC on ring)")]
    JwtCrypto,
}

impl fmt::Debug for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Configuration plus the shared AWS configuration, from which each function takes the
/// clients and secrets it uses.
#[derive(Debug, Clone)]
pub struct Environment {
    pub config: Config,
    sdk: SdkConfig,
}

impl Environment {
    pub async fn load() -> Result<Self, InitError> {
        let config = Config::from_env().inspect_err(log_failure)?;
        Ok(Self {
            config,
            sdk: load_aws().await,
        })
    }

    pub fn store(&self) -> Store {
        Store::new(
            aws_sdk_dynamodb::Client::new(&self.sdk),
            &self.config.table_name,
        )
    }

    pub fn sealer(&self) -> Sealer {
        Sealer::new(aws_sdk_kms::Client::new(&self.sdk), &self.config.kms_key_id)
    }

    pub fn web(&self) -> Web {
        Web::new(self.config.allowed_origins.clone())
    }

    /// Fetches the HS256 keys once and builds the verifier, which reads them again when a
    /// token matches none of them.
    pub async fn jwt_verifier(&self) -> Result<JwtVerifier, InitError> {
        if !crate::adapters::auth::install_jwt_crypto() {
            log_failure(&InitError::JwtCrypto);
            return Err(InitError::JwtCrypto);
        }
        let keys = self.jwt_keys(false).await.inspect_err(log_failure)?;
        let jwt = &self.config.jwt;
        if jwt.issuer.is_none() || jwt.audience.is_none() {
            // The template always sets both; without them any token signed with this key
            // (a password reset, an invitation) is a session here.
            tracing::warn!(
                event = "jwt_claims_unchecked",
                "JWT_ISSUER or JWT_AUDIENCE is not set: tokens are not checked for them"
            );
        }
        Ok(
            JwtVerifier::new(keys, jwt.issuer.as_deref(), jwt.audience.as_deref())
                .with_max_lifetime(jwt.max_lifetime_secs)
                .with_key_source(Arc::new(JwtKeySecret(self.clone()))),
        )
    }

    /// The key's current version and, within its grace period, the previous one, read at
    /// once. A key shorter than 32 bytes (256 bits, RFC 7518 §3.2) is refused: tokens signed
    /// with it could be forged by guessing it. The previous version is only ever a bonus: if
    /// it is short or its grace is over, only the current key is accepted. If it cannot be
    /// read, a start-up goes on with the current key alone, and a read again (`again`) fails,
    /// so that the keys held stay (sessions on the previous key are not refused because of
    /// an outage) and the read is tried again a minute later.
    async fn jwt_keys(&self, again: bool) -> Result<JwtKeys, InitError> {
        let (setting, arn) = ("JWT_SECRET_ARN", &self.config.jwt.secret_arn);
        let grace_secs = self.config.jwt.previous_key_grace_secs;
        let previous = async {
            match grace_secs {
                0 => Ok(None),
                _ => {
                    self.secret_version(setting, arn, Some(PREVIOUS_STAGE))
                        .await
                }
            }
        };
        let (current, previous) = tokio::join!(self.secret_version(setting, arn, None), previous);
        let current = current?.ok_or(InitError::Secret {
            setting,
            reason: "the secret has no current version".into(),
        })?;
        let key = long_enough(current.value)?;
        let until = current
            .created
            .map(|created| created + time::Duration::seconds(grace_secs as i64));
        let ignored = |e: InitError| {
            tracing::warn!(event = "jwt_previous_key_ignored", error = %e, "the JWT key's previous version is not accepted");
            None
        };
        let previous = match (previous, until) {
            (Err(e), _) if again => return Err(e),
            (Err(e), _) => ignored(e),
            (Ok(Some(previous)), Some(until)) if OffsetDateTime::now_utc() < until => {
                match long_enough(previous.value) {
                    Ok(previous) => (previous != key).then_some((previous, until)),
                    Err(e) => ignored(e),
                }
            }
            _ => None,
        };
        Ok(JwtKeys {
            current: key,
            previous,
        })
    }

    /// Fetches the Klaviyo client secret and builds the client, which reads it again from
    /// the same place when Klaviyo rejects it.
    pub async fn klaviyo(&self) -> Result<Klaviyo, InitError> {
        let secret = self
            .klaviyo_client_secret()
            .await
            .inspect_err(log_failure)?;
        let klaviyo = Klaviyo::new(&self.config.klaviyo, &secret)
            .map_err(InitError::Klaviyo)
            .inspect_err(log_failure)?;
        Ok(klaviyo.with_secret_source(Arc::new(KlaviyoClientSecret(self.clone()))))
    }

    async fn klaviyo_client_secret(&self) -> Result<Secret, InitError> {
        self.secret(
            "KLAVIYO_CLIENT_SECRET_ARN",
            &self.config.klaviyo.client_secret_arn,
        )
        .await
        .map(|secret| Secret::new(secret.expose().trim()))
    }

    /// Both secrets at once: start-up waits for one Secrets Manager round trip, not two.
    pub async fn klaviyo_and_jwt_verifier(&self) -> Result<(Klaviyo, JwtVerifier), InitError> {
        let (klaviyo, verifier) = tokio::join!(self.klaviyo(), self.jwt_verifier());
        Ok((klaviyo?, verifier?))
    }

    /// The connection events' publisher; `EVENT_BUS_NAME` must be set.
    pub fn publisher(&self) -> Result<Publisher, InitError> {
        let bus = self
            .config
            .event_bus_name
            .as_deref()
            .ok_or_else(|| InitError::Config(ConfigError::missing("EVENT_BUS_NAME")));
        let bus = bus.inspect_err(log_failure)?;
        Ok(Publisher::new(EventBus::new(
            aws_sdk_eventbridge::Client::new(&self.sdk),
            bus,
        )))
    }

    pub fn revoker(&self, klaviyo: Klaviyo) -> Revoker {
        Revoker::new(self.store(), self.sealer(), klaviyo)
    }

    pub fn frontend(&self) -> FrontendRedirects {
        FrontendRedirects::new(&self.config.frontend_url)
    }

    /// A secret's `SecretString` is the value itself (one `put-secret-value` to rotate).
    async fn secret(&self, setting: &'static str, arn: &str) -> Result<Secret, InitError> {
        let current = self.secret_version(setting, arn, None).await?;
        current
            .map(|version| version.value)
            .ok_or(InitError::Secret {
                setting,
                reason: "the secret has no current version".into(),
            })
    }

    /// The version of a secret with staging label `stage` (AWSCURRENT when `None`), or `None`
    /// if no version has that label.
    async fn secret_version(
        &self,
        setting: &'static str,
        arn: &str,
        stage: Option<&str>,
    ) -> Result<Option<SecretVersion>, InitError> {
        let client = aws_sdk_secretsmanager::Client::new(&self.sdk);
        let result = client
            .get_secret_value()
            .secret_id(arn)
            .set_version_stage(stage.map(str::to_owned))
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                let code = e.as_service_error().and_then(ProvideErrorMetadata::code);
                if stage.is_some() && code == Some("ResourceNotFoundException") {
                    return Ok(None);
                }
                let reason = DisplayErrorContext(&e).to_string();
                if code == Some("AccessDeniedException") {
                    // A policy missing the secret: the alarm on this event pages.
                    tracing::error!(event = "aws_access_denied", service = "secretsmanager", error = %reason, "Secrets Manager refused a call");
                }
                return Err(InitError::Secret { setting, reason });
            }
        };
        let created = output
            .created_date
            .and_then(|at| OffsetDateTime::from_unix_timestamp(at.secs()).ok());
        let value = output
            .secret_string
            .filter(|value| !value.trim().is_empty())
            .map(Secret::new)
            .ok_or(InitError::Secret {
                setting,
                reason: "the secret has no SecretString value".into(),
            })?;
        Ok(Some(SecretVersion { value, created }))
    }
}

/// The staging label Secrets Manager gives the version a `put-secret-value` replaced.
const PREVIOUS_STAGE: &str = "AWSPREVIOUS";

/// One version of a secret: its value and when it was created.
struct SecretVersion {
    value: Secret,
    created: Option<OffsetDateTime>,
}

/// The JWT key in Secrets Manager, read again on demand.
struct JwtKeySecret(Environment);

impl Source<JwtKeys> for JwtKeySecret {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<JwtKeys, String>> + Send + '_>> {
        Box::pin(async move { self.0.jwt_keys(true).await.map_err(|e| e.to_string()) })
    }
}

/// The Klaviyo client secret in Secrets Manager, read again on demand.
struct KlaviyoClientSecret(Environment);

impl Source<Secret> for KlaviyoClientSecret {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Secret, String>> + Send + '_>> {
        Box::pin(async move {
            self.0
                .klaviyo_client_secret()
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// What one HTTP function does once it has everything it needs, secrets included.
pub trait Endpoint: Sized + Send + Sync {
    /// Builds the endpoint: its clients, and whatever needs a secret.
    fn build(env: &Environment) -> impl Future<Output = Result<Self, InitError>> + Send;

    /// Answers one request (CORS, security headers and error mapping are done around it).
    fn respond(
        &self,
        req: &Request,
    ) -> impl Future<Output = Result<Response<Body>, ApiError>> + Send;

    /// Whether the endpoint answers `path` at all; other paths get 404 before anything is
    /// built (no secret is read for them).
    fn serves(_path: &str) -> bool {
        true
    }

    /// The answer while `build` fails (Secrets Manager unreachable): a 503 unless the
    /// endpoint knows better.
    fn unavailable(_env: &Environment, _req: &Request) -> Result<Response<Body>, ApiError> {
        Err(ApiError::Unavailable)
    }
}

/// An HTTP function: configuration checked at start-up, its endpoint built at start-up if
/// possible and otherwise on the first request that can, then kept for the container's life.
pub struct Function<T> {
    env: Environment,
    web: Web,
    endpoint: OnceCell<T>,
}

impl<T: Endpoint> Function<T> {
    pub async fn from_env() -> Result<Self, InitError> {
        let env = Environment::load().await?;
        let function = Self {
            web: env.web(),
            env,
            endpoint: OnceCell::new(),
        };
        // Built now so that warm requests never wait; a failure is logged and retried later.
        let _ = function.endpoint().await;
        Ok(function)
    }

    async fn endpoint(&self) -> Result<&T, InitError> {
        self.endpoint.get_or_try_init(|| T::build(&self.env)).await
    }

    pub async fn handle(&self, req: Request) -> Result<Response<Body>, lambda_http::Error> {
        let response = self
            .web
            .serve(&req, || async {
                if !T::serves(req.uri().path()) {
                    return Err(ApiError::NotFound("There is no such route."));
                }
                match self.endpoint().await {
                    Ok(endpoint) => endpoint.respond(&req).await,
                    Err(_) => T::unavailable(&self.env, &req),
                }
            })
            .await;
        Ok(response)
    }
}

fn log_failure(error: &impl fmt::Display) {
    tracing::error!(error = %error, "start-up failed");
}

/// Shortest HS256 key accepted (the hash's output size).
pub const MIN_JWT_KEY_BYTES: usize = 32;

/// The JWT key without its surrounding whitespace is at least `MIN_JWT_KEY_BYTES` long.
fn long_enough(key: Secret) -> Result<Secret, InitError> {
    match key.expose().trim().len() {
        MIN_JWT_KEY_BYTES.. => Ok(key),
        _ => Err(InitError::Secret {
            setting: "JWT_SECRET_ARN",
            reason: format!(
                "the key is shorter than {MIN_JWT_KEY_BYTES} bytes; put a random key of at least {MIN_JWT_KEY_BYTES} bytes"
            ),
        }),
    }
}

/// Longest wait to connect to an AWS endpoint.
pub const AWS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one attempt of an AWS call (DynamoDB and KMS answer in milliseconds).
pub const AWS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest an AWS call may take, retries included: the figure every time budget counts
/// (`crate::budget`).
pub const AWS_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts of one AWS call (throttling, 5xx, timeouts), within `AWS_CALL_TIMEOUT`.
pub const AWS_ATTEMPTS: u32 = 3;

/// The AWS configuration from the environment with this service's HTTPS client, for the
/// tools and tests that make SDK clients of their own.
pub async fn aws_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(crate::adapters::aws_http::client())
        .load()
        .await
}

/// Bounded waits on AWS so a slow dependency turns into a clear 503, not a Lambda timeout.
async fn load_aws() -> SdkConfig {
    aws_config_loader().load().await
}

/// The AWS configuration every function loads (HTTP client, timeouts, retries), before it
/// reads the environment; public for the benchmark of an SDK call (`tests/benches/sdk_call.rs`).
pub fn aws_config_loader() -> aws_config::ConfigLoader {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(AWS_CONNECT_TIMEOUT)
        .operation_attempt_timeout(AWS_ATTEMPT_TIMEOUT)
        .operation_timeout(AWS_CALL_TIMEOUT)
        .build();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(crate::adapters::aws_http::client())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(AWS_ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_keys_are_measured_without_surrounding_whitespace() {
        let short = "x".repeat(MIN_JWT_KEY_BYTES - 1);
        for key in [short.clone(), format!("{short}\n"), format!("   {short}  ")] {
            let error = long_enough(Secret::new(key)).unwrap_err().to_string();
            assert!(
                error.contains("JWT_SECRET_ARN") && error.contains("shorter than 32"),
                "{error}"
            );
        }
        assert!(long_enough(Secret::new("x".repeat(MIN_JWT_KEY_BYTES))).is_ok());
        assert!(
            long_enough(Secret::new(format!("{}\n", "é".repeat(16)))).is_ok(),
            "bytes"
        );
    }
}
