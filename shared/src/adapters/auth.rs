//! Bearer JWT validation: who is calling.
//!
//! Tokens are issued by the host app and signed with HS256 using a key from Secrets Manager.
//! The algorithm is pinned (so `none`, HS384, RS256 and friends are refused), `exp` is
//! required, `exp`/`nbf` are checked with a small leeway, and `iss`/`aud` when configured.
//! The user id is `sub`. Failures are logged as security events without the token.
//!
//! Key rotation without downtime: a token may be signed with the secret's current version
//! (AWSCURRENT) or, for a grace period after that version was created, its previous one
//! (AWSPREVIOUS), so tokens minted before the host app switched keys keep working. A token
//! whose signature matches none of the held keys makes the container read the secret again
//! (at most once per `SECRET_RELOAD_INTERVAL`) before it is refused, so a new key works in
//! warm containers as soon as it is put; and keys older than `KEYS_MAX_AGE` are read again
//! before a token is checked, so a key taken out of the secret stops working within that time.

use crate::adapters::http::ApiError;
use crate::adapters::reload::{Reloadable, Reloading, Source};
use crate::domain::secret::Secret;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use lambda_http::Request;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use time::OffsetDateTime;

/// Clock skew tolerated between the host app and this service.
pub const LEEWAY_SECS: u64 = 30;
/// Longest `sub` accepted; user ids become part of storage keys.
pub const MAX_USER_ID_LEN: usize = 256;
/// Held JWT keys are read again at the first request after they are this old, so a key taken
/// out of the secret (docs/OPERATIONS.md, "A leaked key") is refused everywhere within it.
pub const KEYS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// Longest token accepted (the host app's are a few hundred bytes): bigger ones are refused
/// before any decoding work.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The authenticated caller: the JWT's `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// A user id is 1–256 characters without control characters.
    pub fn parse(raw: &str) -> Option<Self> {
        let valid =
            !raw.is_empty() && raw.len() <= MAX_USER_ID_LEN && !raw.chars().any(char::is_control);
        valid.then(|| Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a token was refused; for logs only (the client always sees one 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("critical header extension not supported")]
    CriticalExtension,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("missing or invalid claim")]
    Claims,
    #[error("token lives longer than JWT_MAX_LIFETIME_SECONDS allows")]
    Lifetime,
}

/// The keys tokens may be signed with, as read from Secrets Manager.
#[derive(Clone, PartialEq)]
pub struct JwtKeys {
    /// The secret's current version (AWSCURRENT).
    pub current: Secret,
    /// Its previous version (AWSPREVIOUS) and the end of that version's grace period.
    pub previous: Option<(Secret, OffsetDateTime)>,
}

impl JwtKeys {
    pub fn current_only(current: Secret) -> Self {
        Self {
            current,
            previous: None,
        }
    }
}

/// The held keys, ready to verify with: each as stored and, when they differ, without
/// surrounding whitespace.
struct KeyRing {
    keys: JwtKeys,
    current: Vec<DecodingKey>,
    previous: Vec<DecodingKey>,
}

impl KeyRing {
    fn new(keys: JwtKeys) -> Self {
        let previous = keys
            .previous
            .as_ref()
            .map(|(secret, _)| decoding_keys(secret))
            .unwrap_or_default();
        Self {
            current: decoding_keys(&keys.current),
            previous,
            keys,
        }
    }

    /// Whether the previous key is still in its grace period at `now`.
    fn previous_accepted(&self, now: OffsetDateTime) -> bool {
        self.keys
            .previous
            .as_ref()
            .is_some_and(|(_, until)| now < *until)
    }
}

fn decoding_keys(secret: &Secret) -> Vec<DecodingKey> {
    let (raw, trimmed) = (secret.expose(), secret.expose().trim());
    let mut keys = vec![DecodingKey::from_secret(trimmed.as_bytes())];
    if raw != trimmed {
        keys.push(DecodingKey::from_secret(raw.as_bytes()));
    }
    keys
}

impl Reloadable for KeyRing {
    type Value = JwtKeys;

    fn value(&self) -> &JwtKeys {
        &self.keys
    }
}

pub struct JwtVerifier {
    ring: Reloading<KeyRing>,
    validation: Validation,
    /// When set, tokens must carry `iat` and live at most this long (`exp - iat`).
    max_lifetime_secs: Option<u64>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Checks the JOSE header before the signature: exactly `alg: "HS256"`, and no `crit`,
/// because this verifier implements no JWS extensions and RFC 7515 (4.1.11) makes a token
/// whose critical extensions are not understood invalid. The library ignores `crit`.
pub fn check_header(token: &str) -> Result<(), AuthError> {
    use base64::Engine;
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    let (encoded, _) = token.split_once('.').ok_or(AuthError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| AuthError::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    if header.contains_key("crit") {
        return Err(AuthError::CriticalExtension);
    }
    match header.get("alg").and_then(serde_json::Value::as_str) {
        Some("HS256") => Ok(()),
        _ => Err(AuthError::Algorithm),
    }
}

/// `sub` is optional here so that its absence is reported as a missing claim by the
/// validation (not as a JSON error).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
}

impl JwtVerifier {
    /// A key put with a trailing newline (`--secret-string file://key.txt`) verifies tokens
    /// signed with the value as read from Secrets Manager and with the value as typed.
    pub fn new(keys: JwtKeys, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        install_jwt_crypto();
        Self {
            ring: Reloading::new(KeyRing::new(keys)),
            validation,
            max_lifetime_secs: None,
        }
    }

    /// Reads the keys again from `source` when a token matches none of them and when they are
    /// `KEYS_MAX_AGE` old, the ones it was built with counting as just read.
    pub fn with_key_source(mut self, source: Arc<dyn Source<JwtKeys>>) -> Self {
        self.ring = self.ring.with_source(source);
        self
    }

    /// Refuses tokens without `iat` or living longer than `max` (`JWT_MAX_LIFETIME_SECONDS`):
    /// a host app that mints sessions for a day cannot hand out one for a year by mistake.
    pub fn with_max_lifetime(mut self, max: Option<u64>) -> Self {
        self.max_lifetime_secs = max;
        self
    }

    /// Checks `token` against the keys held now (no Secrets Manager call).
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_with(&self.ring.current(), token)
    }

    fn verify_with(&self, ring: &KeyRing, token: &str) -> Result<UserId, AuthError> {
        check_header(token)?;
        let now = OffsetDateTime::now_utc();
        let mut by_previous = false;
        let mut outcome = self.decode(&ring.current, token);
        if matches!(outcome, Err(AuthError::Signature)) && ring.previous_accepted(now) {
            outcome = self.decode(&ring.previous, token);
            by_previous = true;
        }
        let user = self.check_claims(outcome?, now)?;
        if by_previous {
            // Operators watch this fall to zero before the grace period ends (docs/OPERATIONS.md).
            tracing::info!(
                event = "jwt_previous_key_used",
                user_id = %user,
                "a token signed with the previous JWT key was accepted"
            );
        }
        Ok(user)
    }

    fn decode(
        &self,
        keys: &[DecodingKey],
        token: &str,
    ) -> Result<jsonwebtoken::TokenData<Claims>, AuthError> {
        let mut outcome = Err(AuthError::Signature);
        for key in keys {
            outcome = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
                .map_err(|e| classify(e.kind()));
            if !matches!(outcome, Err(AuthError::Signature)) {
                break;
            }
        }
        outcome
    }

    fn check_claims(
        &self,
        data: jsonwebtoken::TokenData<Claims>,
        now: OffsetDateTime,
    ) -> Result<UserId, AuthError> {
        if let Some(max) = self.max_lifetime_secs {
            let issued = data.claims.iat.as_ref().and_then(serde_json::Value::as_i64);
            let expires = data.claims.exp.as_ref().and_then(serde_json::Value::as_i64);
            if !lifetime_within(issued, expires, max, now.unix_timestamp()) {
                return Err(AuthError::Lifetime);
            }
        }
        match data.claims.sub {
            Some(serde_json::Value::String(sub)) => UserId::parse(&sub).ok_or(AuthError::Claims),
            _ => Err(AuthError::Claims),
        }
    }

    /// Checks `token` against keys read within `KEYS_MAX_AGE`; if its signature matches none
    /// of them, reads the keys again (when allowed) and checks it once more.
    pub async fn verify_fresh(&self, token: &str) -> Result<UserId, AuthError> {
        self.refresh_if_old().await;
        let ring = self.ring.current();
        match self.verify_with(&ring, token) {
            Err(AuthError::Signature) if self.reloaded_since(&ring).await => {
                self.verify_with(&self.ring.current(), token)
            }
            outcome => outcome,
        }
    }

    /// Reads the keys again if the last read is older than `KEYS_MAX_AGE`, so a key taken out
    /// of the secret stops working within that time even in a container that never sees a
    /// token it cannot verify. If the read fails the held keys stay (a Secrets Manager outage
    /// does not log everyone out) and the next read is an interval away.
    async fn refresh_if_old(&self) {
        if let Err(error) = self.ring.reload(KEYS_MAX_AGE, build_ring).await {
            tracing::warn!(event = "jwt_keys_unreadable", error = %error, "could not read the JWT keys again");
        }
    }

    /// Whether keys other than `used` are held now, reading them again if the last read is
    /// older than `SECRET_RELOAD_INTERVAL` (`crate::adapters::reload`): a stream of forged
    /// tokens costs one read of the secret (its two versions) per interval.
    async fn reloaded_since(&self, used: &Arc<KeyRing>) -> bool {
        match self.ring.reloaded_since(used, build_ring).await {
            Ok(reloaded) => reloaded,
            Err(error) => {
                tracing::warn!(event = "jwt_keys_unreadable", error = %error, "could not read the JWT keys again");
                false
            }
        }
    }

    /// The caller of `req`, or a 401. Refusals are logged as security events.
    pub async fn authenticate(&self, req: &Request) -> Result<UserId, ApiError> {
        let outcome = match bearer_token(req) {
            Some(token) => self.verify_fresh(token).await,
            None => Err(AuthError::Missing),
        };
        outcome.map_err(|reason| {
            tracing::warn!(
                event = "auth_failure",
                reason = %reason,
                method = %req.method(),
                path = req.uri().path(),
                "request refused: invalid bearer token"
            );
            ApiError::Unauthorized
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(req: &Request) -> Option<&str> {
    let value = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The ring for newly read keys.
fn build_ring(keys: JwtKeys) -> KeyRing {
    tracing::info!(event = "jwt_keys_reloaded", "new JWT keys are in use");
    KeyRing::new(keys)
}

/// Issued (not in the future, beyond the leeway), expiring after it was issued, and living at
/// most `max` seconds: so `exp` is at most `now + max + leeway` whatever the token claims
/// (an `iat` in milliseconds, or years ahead, cannot stretch it).
fn lifetime_within(iat: Option<i64>, exp: Option<i64>, max: u64, now: i64) -> bool {
    match (iat, exp) {
        (Some(iat), Some(exp)) => {
            iat <= now.saturating_add(LEEWAY_SECS as i64)
                && iat <= exp
                && exp.saturating_sub(iat) <= max as i64
        }
        _ => false,
    }
}

/// Makes HMAC on ring (the provider rustls uses) the process's JWT crypto: the verifier
/// needs HS256 alone, and `jsonwebtoken`'s own providers link RSA, ECDSA and EdDSA with it
/// (about 0.4 MB of each binary, #21). Signing also knows HS384 and HS512, for the tests'
/// refused tokens. Idempotent. False if another provider was fixed first (`jsonwebtoken`
/// fixes one at its first sign or verify; without a crypto feature that one panics on use):
/// start-up then fails rather than a request (`crate::context`).
pub fn install_jwt_crypto() -> bool {
    use jsonwebtoken::crypto::CryptoProvider;
    match CryptoProvider::install_default(&hmac_on_ring::PROVIDER) {
        Ok(()) => true,
        Err(installed) => std::ptr::eq(installed, &hmac_on_ring::PROVIDER),
    }
}

mod hmac_on_ring {
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
    use ring::hmac;

    pub static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: KeyUtils::new_unimplemented(),
    };

    /// One HMAC key and the JWT algorithm it serves.
    struct Hmac(hmac::Key, Algorithm);

    fn ring_algorithm(algorithm: &Algorithm) -> Result<hmac::Algorithm> {
        match algorithm {
            Algorithm::HS256 => Ok(hmac::HMAC_SHA256),
            Algorithm::HS384 => Ok(hmac::HMAC_SHA384),
            Algorithm::HS512 => Ok(hmac::HMAC_SHA512),
            _ => Err(ErrorKind::InvalidAlgorithm.into()),
        }
    }

    /// An RSA or EC key is never used as an HMAC secret (algorithm confusion).
    fn hmac_key(family: AlgorithmFamily) -> Result<()> {
        match family {
            AlgorithmFamily::Hmac => Ok(()),
            _ => Err(ErrorKind::InvalidKeyFormat.into()),
        }
    }

    fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        let ring = ring_algorithm(algorithm)?;
        hmac_key(key.family())?;
        Ok(Box::new(Hmac(
            hmac::Key::new(ring, key.as_bytes()),
            *algorithm,
        )))
    }

    /// HS256 only: the one algorithm this service accepts, whatever the validation says.
    fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        if *algorithm != Algorithm::HS256 {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        hmac_key(key.family())?;
        let secret = key.try_get_as_bytes()?;
        Ok(Box::new(Hmac(
            hmac::Key::new(hmac::HMAC_SHA256, secret),
            *algorithm,
        )))
    }

    impl signature::Signer<Vec<u8>> for Hmac {
        fn try_sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
            Ok(hmac::sign(&self.0, message).as_ref().to_vec())
        }
    }

    impl signature::Verifier<Vec<u8>> for Hmac {
        /// Constant time (ring's `verify`).
        fn verify(
            &self,
            message: &[u8],
            tag: &Vec<u8>,
        ) -> std::result::Result<(), signature::Error> {
            hmac::verify(&self.0, message, tag).map_err(|_| signature::Error::new())
        }
    }

    impl JwtSigner for Hmac {
        fn algorithm(&self) -> Algorithm {
            self.1
        }
    }

    impl JwtVerifier for Hmac {
        fn algorithm(&self) -> Algorithm {
            self.1
        }
    }
}

fn classify(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidSubject => AuthError::Claims,
        _ => AuthError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::secret::{Held, SECRET_RELOAD_INTERVAL};
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    const KEY: &str = "unit-test-key-not-a-real-secret";

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn sign(alg: Algorithm, claims: serde_json::Value) -> String {
        install_jwt_crypto();
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap()
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(
            JwtKeys::current_only(Secret::new(KEY)),
            Some("host-app"),
            Some("klaviyo-connect"),
        )
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "user-1", "exp": now() + 300, "iss": "host-app", "aud": "klaviyo-connect"})
    }

    #[test]
    fn bearer_token_parsing() {
        let token = |value: &str| {
            let req = http::Request::builder()
                .header("authorization", value)
                .body(lambda_http::Body::Empty)
                .unwrap();
            bearer_token(&req).map(str::to_owned)
        };
        assert_eq!(token("Bearer abc.def.ghi").as_deref(), Some("abc.def.ghi"));
        assert_eq!(token("bearer  abc").as_deref(), Some("abc"));
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer"), None);
    }

    #[test]
    fn accepts_a_valid_token() {
        let user = verifier()
            .verify(&sign(Algorithm::HS256, claims()))
            .unwrap();
        assert_eq!(user.as_str(), "user-1");
    }

    /// A key put with a trailing newline: tokens signed with it as read, or as typed, pass;
    /// an expired one is still reported as expired, and another key as a bad signature.
    #[test]
    fn a_key_with_surrounding_whitespace_verifies_both_ways() {
        let v = JwtVerifier::new(
            JwtKeys::current_only(Secret::new(format!("{KEY}\n"))),
            Some("host-app"),
            Some("klaviyo-connect"),
        );
        let with = |key: &str, claims: serde_json::Value| {
            install_jwt_crypto();
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(key.as_bytes()),
            )
            .unwrap()
        };
        assert!(v.verify(&with(KEY, claims())).is_ok());
        assert!(v.verify(&with(&format!("{KEY}\n"), claims())).is_ok());
        let mut expired = claims();
        expired["exp"] = json!(now() - LEEWAY_SECS as i64 - 60);
        assert_eq!(
            v.verify(&with(&format!("{KEY}\n"), expired)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&with("another-key", claims())),
            Err(AuthError::Signature)
        );
    }

    #[test]
    fn a_lifetime_cap_needs_iat_and_refuses_longer_tokens() {
        let v = verifier().with_max_lifetime(Some(3600));
        let mut c = claims();
        c["iat"] = json!(now());
        assert!(v.verify(&sign(Algorithm::HS256, c.clone())).is_ok());
        c["exp"] = json!(now() + 3601);
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, c)),
            Err(AuthError::Lifetime)
        );
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, claims())),
            Err(AuthError::Lifetime),
            "no iat"
        );
        assert!(
            verifier().verify(&sign(Algorithm::HS256, claims())).is_ok(),
            "no cap"
        );
        // Tokens that would stretch the cap: iat in the future or in milliseconds.
        let mut future = claims();
        future["iat"] = json!(now() + 10 * 365 * 86_400);
        future["exp"] = json!(now() + 10 * 365 * 86_400 + 60);
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, future)),
            Err(AuthError::Lifetime)
        );
        let mut millis = claims();
        millis["iat"] = json!(now() * 1000);
        millis["exp"] = json!(now() * 1000 + 900);
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, millis)),
            Err(AuthError::Lifetime)
        );
    }

    /// The provider itself verifies HS256 alone (the validation pins it too), with ring's
    /// constant-time comparison, and agrees with its own signatures.
    #[test]
    fn the_jwt_provider_verifies_hs256_alone() {
        use jsonwebtoken::crypto::{sign as raw_sign, verify as raw_verify};
        install_jwt_crypto();
        let (encoding, decoding) = (
            EncodingKey::from_secret(KEY.as_bytes()),
            DecodingKey::from_secret(KEY.as_bytes()),
        );
        let message = b"header.claims";
        let tag = raw_sign(message, &encoding, Algorithm::HS256).unwrap();
        assert!(raw_verify(&tag, message, &decoding, Algorithm::HS256).unwrap());
        assert!(!raw_verify(&tag, b"header.claimz", &decoding, Algorithm::HS256).unwrap());
        let other = DecodingKey::from_secret(b"another-unit-test-key-not-secret");
        assert!(!raw_verify(&tag, message, &other, Algorithm::HS256).unwrap());
        for algorithm in [
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::RS256,
            Algorithm::ES256,
        ] {
            let refused = raw_verify(&tag, message, &decoding, algorithm);
            assert!(refused.is_err(), "{algorithm:?}");
        }
        assert!(raw_sign(message, &encoding, Algorithm::RS256).is_err());
        // An RSA public key's bytes are not an HMAC secret, whatever the algorithm says.
        let rsa = DecodingKey::from_rsa_der(KEY.as_bytes());
        assert!(raw_verify(&tag, message, &rsa, Algorithm::HS256).is_err());
        assert!(install_jwt_crypto(), "ours, installed again");
    }

    fn signed_with(key: &str) -> String {
        install_jwt_crypto();
        encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn rotated(current: &str, previous: &str, until: OffsetDateTime) -> JwtKeys {
        JwtKeys {
            current: Secret::new(current),
            previous: Some((Secret::new(previous), until)),
        }
    }

    /// The previous key verifies until its grace period ends, and never stands in for a
    /// failure other than the signature.
    #[test]
    fn the_previous_key_is_accepted_during_its_grace_period_only() {
        let now = OffsetDateTime::now_utc();
        let new = "the-new-key-for-unit-tests-only";
        let within = JwtVerifier::new(
            rotated(new, KEY, now + time::Duration::minutes(5)),
            Some("host-app"),
            Some("klaviyo-connect"),
        );
        assert_eq!(within.verify(&signed_with(new)).unwrap().as_str(), "user-1");
        assert_eq!(within.verify(&signed_with(KEY)).unwrap().as_str(), "user-1");
        assert_eq!(
            within.verify(&signed_with("a-third-key")),
            Err(AuthError::Signature)
        );
        let mut expired = claims();
        expired["exp"] = json!(now.unix_timestamp() - LEEWAY_SECS as i64 - 60);
        assert_eq!(
            within.verify(&sign(Algorithm::HS256, expired)),
            Err(AuthError::Expired)
        );

        let over = JwtVerifier::new(
            rotated(new, KEY, now - time::Duration::seconds(1)),
            Some("host-app"),
            Some("klaviyo-connect"),
        );
        assert!(over.verify(&signed_with(new)).is_ok());
        assert_eq!(over.verify(&signed_with(KEY)), Err(AuthError::Signature));
    }

    impl Source<JwtKeys> for Held<JwtKeys> {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<JwtKeys, String>> + Send + '_>> {
            let keys = self.read();
            Box::pin(async move { Ok(keys) })
        }
    }

    /// A key put while the container runs: the first token signed with it makes the verifier
    /// read the keys again and passes; tokens with the old key pass as the previous one; a
    /// forged token causes no second read within the interval, and the first verifier without
    /// a source never reads.
    #[tokio::test(start_paused = true)]
    async fn a_token_with_an_unknown_key_makes_the_keys_be_read_again() {
        let new = "the-new-key-for-unit-tests-only";
        let source = Arc::new(Held::new(JwtKeys::current_only(Secret::new(KEY))));
        let reloading = verifier().with_key_source(source.clone());
        let reads = || source.reads();

        // Unchanged keys: a forged token is refused after one read, and the next within the
        // interval causes none.
        tokio::time::advance(SECRET_RELOAD_INTERVAL).await;
        assert_eq!(
            reloading.verify_fresh(&signed_with(new)).await,
            Err(AuthError::Signature)
        );
        assert_eq!(reads(), 1);

        // The operator puts a new key.
        source.set(rotated(
            new,
            KEY,
            OffsetDateTime::now_utc() + time::Duration::hours(1),
        ));
        assert_eq!(
            reloading.verify_fresh(&signed_with(new)).await,
            Err(AuthError::Signature),
            "read again within the interval"
        );
        assert_eq!(reads(), 1);
        tokio::time::advance(SECRET_RELOAD_INTERVAL).await;
        assert!(reloading.verify_fresh(&signed_with(new)).await.is_ok());
        assert_eq!(reads(), 2);
        assert!(reloading.verify_fresh(&signed_with(KEY)).await.is_ok());
        assert!(reloading.verify(&signed_with(new)).is_ok());
        assert_eq!(reads(), 2, "no read once the key is held");

        let without_source = verifier();
        assert_eq!(
            without_source.verify_fresh(&signed_with(new)).await,
            Err(AuthError::Signature)
        );
    }

    /// A key taken out of the secret (a leak: the leaked version's AWSPREVIOUS label removed)
    /// stops working within `KEYS_MAX_AGE` in a container that holds it as its current key,
    /// even if it never sees a token it cannot verify.
    #[tokio::test(start_paused = true)]
    async fn held_keys_are_read_again_once_they_are_old() {
        let source = Arc::new(Held::new(JwtKeys::current_only(Secret::new(KEY))));
        let held = verifier().with_key_source(source.clone());
        assert!(held.verify_fresh(&signed_with(KEY)).await.is_ok());
        assert_eq!(source.reads(), 0, "read at start-up, not again");

        source.set(JwtKeys::current_only(Secret::new(
            "the-key-put-after-a-leak-for-tests",
        )));
        tokio::time::advance(KEYS_MAX_AGE - Duration::from_secs(1)).await;
        assert!(held.verify_fresh(&signed_with(KEY)).await.is_ok());
        assert_eq!(source.reads(), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            held.verify_fresh(&signed_with(KEY)).await,
            Err(AuthError::Signature)
        );
        assert_eq!(source.reads(), 1, "one read, then refused without another");
        assert!(
            held.verify_fresh(&signed_with("the-key-put-after-a-leak-for-tests"))
                .await
                .is_ok()
        );
        assert_eq!(source.reads(), 1);
    }

    #[test]
    fn lifetime_bounds_are_exact() {
        let now = 1_800_000_000;
        assert!(lifetime_within(Some(now), Some(now + 3600), 3600, now));
        assert!(!lifetime_within(Some(now), Some(now + 3601), 3600, now));
        assert!(
            lifetime_within(Some(now + 30), Some(now + 90), 3600, now),
            "leeway"
        );
        assert!(!lifetime_within(Some(now + 31), Some(now + 90), 3600, now));
        assert!(
            !lifetime_within(Some(now), Some(now - 1), 3600, now),
            "iat after exp"
        );
        assert!(!lifetime_within(
            Some(now * 1000),
            Some(now + 60),
            3600,
            now
        ));
        assert!(!lifetime_within(None, Some(now + 60), 3600, now));
        assert!(!lifetime_within(Some(i64::MAX), Some(i64::MAX), 3600, now));
    }

    #[test]
    fn refuses_other_algorithms_and_bad_claims() {
        let v = verifier();
        assert_eq!(
            v.verify(&sign(Algorithm::HS384, claims())),
            Err(AuthError::Algorithm)
        );
        let mut c = claims();
        c["exp"] = json!(now() - LEEWAY_SECS as i64 - 60);
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, c)),
            Err(AuthError::Expired)
        );
        let mut c = claims();
        c["nbf"] = json!(now() + 600);
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, c)),
            Err(AuthError::NotYetValid)
        );
        let mut c = claims();
        c["iss"] = json!("someone-else");
        assert_eq!(v.verify(&sign(Algorithm::HS256, c)), Err(AuthError::Issuer));
        let mut c = claims();
        c["aud"] = json!("other-service");
        assert_eq!(
            v.verify(&sign(Algorithm::HS256, c)),
            Err(AuthError::Audience)
        );
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(v.verify(&sign(Algorithm::HS256, c)), Err(AuthError::Claims));
        let mut c = claims();
        c["sub"] = json!("");
        assert_eq!(v.verify(&sign(Algorithm::HS256, c)), Err(AuthError::Claims));
        assert_eq!(v.verify("not-a-jwt"), Err(AuthError::Malformed));
    }

    #[test]
    fn a_small_clock_skew_is_tolerated() {
        let mut c = claims();
        c["exp"] = json!(now() - 5);
        assert!(verifier().verify(&sign(Algorithm::HS256, c)).is_ok());
    }

    #[test]
    fn user_ids_are_bounded() {
        assert!(UserId::parse("").is_none());
        assert!(UserId::parse("a\u{0}b").is_none());
        assert!(UserId::parse(&"x".repeat(MAX_USER_ID_LEN + 1)).is_none());
        assert!(UserId::parse("auth0|5f7c8ec7c33c6c004bbafe82").is_some());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    fn token_with_header(header: &serde_json::Value) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            engine.encode(header.to_string()),
            engine.encode(r#"{"sub":"u"}"#),
            engine.encode([0u8; 32])
        )
    }

    /// Header fields other than `alg` and `crit`, with any JSON-ish values.
    fn extra_fields() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(("[a-z]{1,8}", "\\PC{0,20}"), 0..5).prop_map(|fields| {
            fields
                .into_iter()
                .filter(|(k, _)| k != "alg" && k != "crit")
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_text_is_checked_without_panicking(token in "\\PC{0,300}") {
            let _ = check_header(&token);
        }

        #[test]
        fn only_hs256_without_crit_passes_the_header_check(
            alg in prop_oneof![
                Just("HS256".to_owned()),
                Just("none".to_owned()),
                Just("hs256".to_owned()),
                Just("RS256".to_owned()),
                "[A-Za-z0-9]{0,8}",
            ],
            extra in extra_fields(),
            crit in any::<bool>(),
        ) {
            let mut header = serde_json::Map::new();
            for (k, v) in extra {
                header.insert(k, serde_json::Value::String(v));
            }
            header.insert("alg".into(), serde_json::Value::String(alg.clone()));
            if crit {
                header.insert("crit".into(), serde_json::json!(["b64"]));
            }
            let outcome = check_header(&token_with_header(&serde_json::Value::Object(header)));
            match (alg.as_str(), crit) {
                (_, true) => prop_assert_eq!(outcome, Err(AuthError::CriticalExtension)),
                ("HS256", false) => prop_assert_eq!(outcome, Ok(())),
                _ => prop_assert_eq!(outcome, Err(AuthError::Algorithm)),
            }
        }

        #[test]
        fn oversized_tokens_are_refused_before_decoding(extra in 1usize..1000) {
            let valid = token_with_header(&serde_json::json!({"alg": "HS256"}));
            prop_assert_eq!(check_header(&valid), Ok(()));
            let padding = "a".repeat(MAX_TOKEN_LEN + extra - valid.len());
            let token = format!("{valid}{padding}");
            prop_assert_eq!(check_header(&token), Err(AuthError::Malformed));
        }
    }
}
