//! Typed configuration, read from the environment once at start-up and validated there.
//!
//! Every URL, table, key and secret is a setting (names in SPEC.md) so the same binaries run
//! locally, in tests and on AWS. A missing or malformed setting fails start-up with a
//! message naming it. Secrets themselves are not here: only the ARNs of the Secrets Manager
//! entries that hold them (see `context`).

use crate::domain::model::{RefreshPolicy, USE_RECORDED_EVERY};
use crate::domain::rate_limit::RateLimit;
use std::net::IpAddr;
use url::Url;

pub const DEFAULT_SCOPES: &str = "accounts:read profiles:read campaigns:read campaigns:write templates:read templates:write lists:read";
pub const DEFAULT_AUTHORIZE_URL: &str = "https://www.klaviyo.com/oauth/authorize";
pub const DEFAULT_OAUTH_BASE: &str = "https://a.klaviyo.com";
pub const DEFAULT_API_BASE: &str = "https://a.klaviyo.com/api";
pub const DEFAULT_API_REVISION: &str = "2025-10-15";

/// A setting that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {name} {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(name: &'static str, problem: impl Into<String>) -> Self {
        Self {
            name,
            problem: problem.into(),
        }
    }

    /// A setting the function needs that is not set.
    pub fn missing(name: &'static str) -> Self {
        Self::new(name, "is missing (set it in the environment)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub table_name: String,
    pub kms_key_id: String,
    pub klaviyo: KlaviyoConfig,
    pub jwt: JwtConfig,
    /// Where the browser is sent after the OAuth callback; no trailing slash.
    pub frontend_url: Url,
    /// Exact origins (`scheme://host[:port]`) allowed to call the API from a browser: the
    /// frontend's own, and any `ALLOWED_ORIGINS` adds.
    pub allowed_origins: Vec<String>,
    /// Connections the refresh job works on at once (`REFRESH_CONCURRENCY`, 1–256).
    pub refresh_concurrency: usize,
    /// How OAuth connections are kept fresh (`REFRESH_POLICY`: `usage-aware` by default, or
    /// `eager`; with `REFRESH_ACTIVE_WINDOW` and `REFRESH_IDLE_INTERVAL`, each a duration
    /// such as `24h`, `90m` or `2d` from 1 hour to 30 days, 24 hours by default).
    pub refresh_policy: RefreshPolicy,
    /// Connect attempts (OAuth starts and API keys together) one user may make per window
    /// (`CONNECT_RATE_LIMIT`, 1–10,000, default 10, per `CONNECT_RATE_WINDOW_SECONDS`,
    /// 1–86,400, default 60).
    pub connect_rate: RateLimit,
    /// Whether an OAuth connect waits for the user's own session to complete it
    /// (`CONNECT_COMPLETION`, `required` by default, or `off`).
    pub connect_completion: ConnectCompletion,
    /// The EventBridge bus connection events go to (`EVENT_BUS_NAME`); only the `events`
    /// function needs it.
    pub event_bus_name: Option<String>,
}

/// `CONNECT_COMPLETION`: `Required` parks the callback's result until the user who started the flow
/// completes it from their own session (`crate::use_cases::complete`); `Off` connects at the
/// callback, so whoever's browser follows an authorize URL connects their Klaviyo account to the
/// user who started it (SECURITY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCompletion {
    Required,
    Off,
}

#[derive(Debug, Clone)]
pub struct KlaviyoConfig {
    pub client_id: String,
    pub client_secret_arn: String,
    pub redirect_uri: Url,
    pub scopes: Vec<String>,
    pub authorize_url: Url,
    /// Token at `{oauth_base}/oauth/token`, revoke at `{oauth_base}/oauth/revoke`.
    pub oauth_base: Url,
    /// Accounts at `{api_base}/accounts/`.
    pub api_base: Url,
    pub api_revision: String,
}

impl KlaviyoConfig {
    pub fn token_url(&self) -> String {
        join(&self.oauth_base, "/oauth/token")
    }

    pub fn revoke_url(&self) -> String {
        join(&self.oauth_base, "/oauth/revoke")
    }

    pub fn accounts_url(&self) -> String {
        join(&self.api_base, "/accounts/")
    }
}

/// `base` has no trailing slash by construction except the bare root `/` the URL type keeps.
fn join(base: &Url, path: &str) -> String {
    format!("{}{path}", base.as_str().trim_end_matches('/'))
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret_arn: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Longest `exp - iat` accepted (`JWT_MAX_LIFETIME_SECONDS`, 60–86,400); tokens must
    /// then carry `iat`. Unset: no cap.
    pub max_lifetime_secs: Option<u64>,
    /// How long after the key's current version was created its previous version is still
    /// accepted (`JWT_PREVIOUS_KEY_GRACE_SECONDS`, 0–604,800, default a day); 0: never.
    pub previous_key_grace_secs: u64,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of the environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Lookup(&lookup);
        let frontend_url = env.frontend_url("FRONTEND_URL")?;
        // The frontend's own origin always; ALLOWED_ORIGINS adds to it.
        let mut allowed_origins = vec![frontend_url.origin().ascii_serialization()];
        if let Some(list) = env.optional("ALLOWED_ORIGINS") {
            for origin in parse_origins("ALLOWED_ORIGINS", &list)? {
                if !allowed_origins.contains(&origin) {
                    allowed_origins.push(origin);
                }
            }
        }
        Ok(Self {
            table_name: env.table_name("TABLE_NAME")?,
            kms_key_id: env.token("KMS_KEY_ID")?,
            klaviyo: KlaviyoConfig {
                client_id: env.token("KLAVIYO_CLIENT_ID")?,
                client_secret_arn: env.token("KLAVIYO_CLIENT_SECRET_ARN")?,
                redirect_uri: env.url("KLAVIYO_REDIRECT_URI", None)?,
                scopes: env.scopes("KLAVIYO_SCOPES")?,
                authorize_url: env.url("KLAVIYO_AUTHORIZE_URL", Some(DEFAULT_AUTHORIZE_URL))?,
                oauth_base: env.base_url("KLAVIYO_OAUTH_BASE", DEFAULT_OAUTH_BASE)?,
                api_base: env.base_url("KLAVIYO_API_BASE", DEFAULT_API_BASE)?,
                api_revision: env.revision("KLAVIYO_API_REVISION")?,
            },
            jwt: JwtConfig {
                secret_arn: env.token("JWT_SECRET_ARN")?,
                issuer: env.optional("JWT_ISSUER"),
                audience: env.optional("JWT_AUDIENCE"),
                max_lifetime_secs: match env.optional("JWT_MAX_LIFETIME_SECONDS") {
                    Some(_) => {
                        Some(env.bounded("JWT_MAX_LIFETIME_SECONDS", 0, 60..=86_400)? as u64)
                    }
                    None => None,
                },
                previous_key_grace_secs: env.bounded(
                    "JWT_PREVIOUS_KEY_GRACE_SECONDS",
                    86_400,
                    0..=604_800,
                )? as u64,
            },
            frontend_url,
            allowed_origins,
            refresh_concurrency: env.bounded("REFRESH_CONCURRENCY", 16, 1..=256)?,
            refresh_policy: env.refresh_policy()?,
            connect_rate: RateLimit {
                limit: env.bounded("CONNECT_RATE_LIMIT", 10, 1..=10_000)? as u32,
                window_secs: env.bounded("CONNECT_RATE_WINDOW_SECONDS", 60, 1..=86_400)? as u32,
            },
            event_bus_name: match env.optional("EVENT_BUS_NAME") {
                Some(name) => Some(env.bus_name("EVENT_BUS_NAME", name)?),
                None => None,
            },
            connect_completion: match env.optional("CONNECT_COMPLETION").as_deref() {
                None | Some("required") => ConnectCompletion::Required,
                Some("off") => ConnectCompletion::Off,
                Some(_) => {
                    return Err(ConfigError::new(
                        "CONNECT_COMPLETION",
                        "must be `required` or `off`",
                    ));
                }
            },
        })
    }
}

struct Lookup<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Lookup<'_, F> {
    /// A set, non-blank value, trimmed. Blank counts as unset so a template can pass "".
    fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.optional(name)
            .ok_or_else(|| ConfigError::new(name, "is missing (set it in the environment)"))
    }

    /// A required single word: ids, ARNs, names.
    fn token(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.required(name)?;
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::new(name, "must not contain whitespace"));
        }
        Ok(value)
    }

    fn bounded(
        &self,
        name: &'static str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let Some(raw) = self.optional(name) else {
            return Ok(default);
        };
        raw.parse()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ConfigError::new(
                    name,
                    format!(
                        "must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            })
    }

    /// `REFRESH_POLICY` and the two durations of the usage-aware one (which eager ignores,
    /// but they must still be well formed: a typo is not silently a default).
    fn refresh_policy(&self) -> Result<RefreshPolicy, ConfigError> {
        let RefreshPolicy::UsageAware {
            active_window,
            idle_interval,
        } = RefreshPolicy::default()
        else {
            unreachable!("the default policy is usage-aware");
        };
        // The window is at least two hours: a use is recorded at most once an hour, so a
        // service calling every half hour would otherwise look idle now and then.
        let active_window = self.duration("REFRESH_ACTIVE_WINDOW", active_window, 2)?;
        let idle_interval = self.duration("REFRESH_IDLE_INTERVAL", idle_interval, 1)?;
        match self.optional("REFRESH_POLICY").as_deref() {
            None | Some("usage-aware") => Ok(RefreshPolicy::UsageAware {
                active_window,
                idle_interval,
            }),
            Some("eager") => Ok(RefreshPolicy::Eager),
            Some(_) => Err(ConfigError::new(
                "REFRESH_POLICY",
                "must be `usage-aware` or `eager`",
            )),
        }
    }

    /// A duration of whole seconds, minutes, hours or days (`86400s`, `1440m`, `24h`, `1d`),
    /// from `min_hours` hours (how often a use is recorded, or twice that) to 30 days (well
    /// inside the 90 days a Klaviyo refresh token lives unused).
    fn duration(
        &self,
        name: &'static str,
        default: time::Duration,
        min_hours: i32,
    ) -> Result<time::Duration, ConfigError> {
        let Some(raw) = self.optional(name) else {
            return Ok(default);
        };
        let invalid = || {
            ConfigError::new(
                name,
                format!(
                    "must be a duration such as `24h`, `90m` or `2d` (s, m, h or d), from {min_hours}h to 30d"
                ),
            )
        };
        let split = raw.len() - raw.chars().last().map_or(0, char::len_utf8);
        let (digits, unit) = raw.split_at(split);
        let seconds_per = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(invalid()),
        };
        let value: i64 = match digits.bytes().all(|b| b.is_ascii_digit()) {
            true => digits.parse().map_err(|_| invalid())?,
            false => return Err(invalid()),
        };
        let duration = time::Duration::seconds(value.checked_mul(seconds_per).ok_or_else(invalid)?);
        (USE_RECORDED_EVERY * min_hours..=time::Duration::days(30))
            .contains(&duration)
            .then_some(duration)
            .ok_or_else(invalid)
    }

    /// An EventBridge bus name (1-256 of a-z A-Z 0-9 . _ -), or a bus ARN.
    fn bus_name(&self, name: &'static str, value: String) -> Result<String, ConfigError> {
        let valid = |s: &str| {
            (1..=256).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let ok = match value.strip_prefix("arn:") {
            Some(_) => value
                .rsplit_once(":event-bus/")
                .is_some_and(|(_, bus)| valid(bus)),
            None => valid(&value),
        };
        if !ok {
            return Err(ConfigError::new(
                name,
                "is not an EventBridge bus name (1-256 of a-z A-Z 0-9 . _ -) or bus ARN",
            ));
        }
        Ok(value)
    }

    fn table_name(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.token(name)?;
        let valid_chars = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !(3..=255).contains(&value.len()) || !valid_chars {
            return Err(ConfigError::new(
                name,
                "is not a valid DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)",
            ));
        }
        Ok(value)
    }

    fn url(&self, name: &'static str, default: Option<&str>) -> Result<Url, ConfigError> {
        let raw = match (self.optional(name), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_owned(),
            (None, None) => {
                return Err(ConfigError::new(
                    name,
                    "is missing (set it in the environment)",
                ));
            }
        };
        parse_url(name, &raw)
    }

    /// A URL other paths are appended to: no query or fragment, no trailing slash.
    fn base_url(&self, name: &'static str, default: &str) -> Result<Url, ConfigError> {
        let url = self.url(name, Some(default))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::new(name, "must not have a query or fragment"));
        }
        let trimmed = url.as_str().trim_end_matches('/').to_owned();
        parse_url(name, &trimmed)
    }

    fn frontend_url(&self, name: &'static str) -> Result<Url, ConfigError> {
        let raw = self.required(name)?;
        self.base_url(name, &raw)
    }

    fn scopes(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        let raw = self
            .optional(name)
            .unwrap_or_else(|| DEFAULT_SCOPES.to_owned());
        let scopes: Vec<String> = raw.split_whitespace().map(str::to_owned).collect();
        let valid = |s: &String| {
            s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, ':' | '_' | '-')
            })
        };
        if scopes.is_empty() || !scopes.iter().all(valid) {
            return Err(ConfigError::new(
                name,
                "must be space-separated Klaviyo scopes such as `accounts:read lists:read`",
            ));
        }
        Ok(scopes)
    }

    fn revision(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self
            .optional(name)
            .unwrap_or_else(|| DEFAULT_API_REVISION.to_owned());
        let (date, suffix) = value.split_once('.').unwrap_or((&value, "pre"));
        let date_ok = date.len() == 10
            && date.char_indices().all(|(i, c)| match i {
                4 | 7 => c == '-',
                _ => c.is_ascii_digit(),
            });
        if !date_ok || suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(ConfigError::new(
                name,
                "must be a Klaviyo revision date like 2025-10-15",
            ));
        }
        Ok(value)
    }
}

/// Absolute http(s) URL; plain http only for loopback so that no secret travels in clear
/// text by a typo in a deployed stack.
fn parse_url(name: &'static str, raw: &str) -> Result<Url, ConfigError> {
    let url =
        Url::parse(raw).map_err(|e| ConfigError::new(name, format!("is not a valid URL ({e})")))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(ConfigError::new(
                name,
                "must use https (http is allowed only for loopback hosts)",
            ));
        }
        _ => return Err(ConfigError::new(name, "must be an http(s) URL")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(name, "must have a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(name, "must not contain credentials"));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Comma-separated exact origins. `*` and `null` are refused: credentials travel in the
/// Authorization header, and a wildcard or opaque origin would hand them to any page.
fn parse_origins(name: &'static str, raw: &str) -> Result<Vec<String>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|origin| {
            if origin == "*" || origin.eq_ignore_ascii_case("null") {
                return Err(ConfigError::new(
                    name,
                    format!("must list exact origins, not `{origin}`"),
                ));
            }
            let url = parse_url(name, origin)?;
            let normalized = url.origin().ascii_serialization();
            if url.path() != "/"
                || url.query().is_some()
                || normalized != origin.trim_end_matches('/').to_ascii_lowercase()
            {
                return Err(ConfigError::new(
                    name,
                    format!(
                        "entry `{origin}` must be an origin like https://app.example.com (no path)"
                    ),
                ));
            }
            Ok(normalized)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn base() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("TABLE_NAME", "klaviyo-connect"),
            ("KMS_KEY_ID", "arn:aws:kms:us-east-1:123456789012:key/abc"),
            ("KLAVIYO_CLIENT_ID", "client-id"),
            (
                "KLAVIYO_CLIENT_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:1:secret:k",
            ),
            (
                "KLAVIYO_REDIRECT_URI",
                "https://api.example.com/klaviyo/oauthcallback",
            ),
            (
                "JWT_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:1:secret:j",
            ),
            ("FRONTEND_URL", "https://app.example.com/"),
        ])
    }

    fn load(vars: &HashMap<&'static str, &'static str>) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| vars.get(name).map(|v| v.to_string()))
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = load(&base()).unwrap();
        assert_eq!(config.klaviyo.authorize_url.as_str(), DEFAULT_AUTHORIZE_URL);
        assert_eq!(config.klaviyo.oauth_base.as_str(), "https://a.klaviyo.com/");
        assert_eq!(config.klaviyo.api_base.as_str(), DEFAULT_API_BASE);
        assert_eq!(config.klaviyo.api_revision, "2025-10-15");
        assert_eq!(config.klaviyo.scopes.len(), 7);
        assert_eq!(config.frontend_url.as_str(), "https://app.example.com/");
        assert_eq!(config.allowed_origins, vec!["https://app.example.com"]);
        assert_eq!(config.jwt.issuer, None);
        assert_eq!(config.jwt.max_lifetime_secs, None);
        assert_eq!(config.jwt.previous_key_grace_secs, 86_400);
        assert_eq!(config.connect_completion, ConnectCompletion::Required);
        assert_eq!(config.event_bus_name, None);
        let mut bus = base();
        bus.insert("EVENT_BUS_NAME", "klaviyo-connect-events");
        assert_eq!(
            load(&bus).unwrap().event_bus_name.as_deref(),
            Some("klaviyo-connect-events")
        );
        let mut off = base();
        off.insert("CONNECT_COMPLETION", "off");
        assert_eq!(
            load(&off).unwrap().connect_completion,
            ConnectCompletion::Off
        );
        let mut vars = base();
        vars.insert("JWT_MAX_LIFETIME_SECONDS", "3600");
        assert_eq!(load(&vars).unwrap().jwt.max_lifetime_secs, Some(3600));
        assert_eq!(
            config.klaviyo.token_url(),
            "https://a.klaviyo.com/oauth/token"
        );
        assert_eq!(
            config.klaviyo.revoke_url(),
            "https://a.klaviyo.com/oauth/revoke"
        );
        assert_eq!(
            config.klaviyo.accounts_url(),
            "https://a.klaviyo.com/api/accounts/"
        );
    }

    #[test]
    fn every_required_setting_is_named_when_missing() {
        for name in [
            "TABLE_NAME",
            "KMS_KEY_ID",
            "KLAVIYO_CLIENT_ID",
            "KLAVIYO_CLIENT_SECRET_ARN",
            "KLAVIYO_REDIRECT_URI",
            "JWT_SECRET_ARN",
            "FRONTEND_URL",
        ] {
            let mut vars = base();
            vars.insert(name, "  ");
            let err = load(&vars).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn the_refresh_policy_is_usage_aware_unless_eager_is_asked_for() {
        let hours = time::Duration::hours;
        assert_eq!(
            load(&base()).unwrap().refresh_policy,
            RefreshPolicy::default()
        );
        let mut vars = base();
        vars.insert("REFRESH_ACTIVE_WINDOW", "150m");
        vars.insert("REFRESH_IDLE_INTERVAL", "2d");
        assert_eq!(
            load(&vars).unwrap().refresh_policy,
            RefreshPolicy::UsageAware {
                active_window: time::Duration::minutes(150),
                idle_interval: hours(48),
            }
        );
        vars.insert("REFRESH_POLICY", "eager");
        assert_eq!(load(&vars).unwrap().refresh_policy, RefreshPolicy::Eager);
        vars.insert("REFRESH_POLICY", "usage-aware");
        vars.insert("REFRESH_IDLE_INTERVAL", "3600s");
        assert!(matches!(
            load(&vars).unwrap().refresh_policy,
            RefreshPolicy::UsageAware { idle_interval, .. } if idle_interval == hours(1)
        ));
    }

    #[test]
    fn malformed_settings_are_named() {
        let cases = [
            ("TABLE_NAME", "a b"),
            ("TABLE_NAME", "x"),
            ("KLAVIYO_REDIRECT_URI", "not a url"),
            ("KLAVIYO_REDIRECT_URI", "http://api.example.com/cb"),
            ("KLAVIYO_OAUTH_BASE", "ftp://a.klaviyo.com"),
            ("KLAVIYO_API_BASE", "https://a.klaviyo.com/api?x=1"),
            ("KLAVIYO_SCOPES", "accounts:read, lists:read"),
            ("KLAVIYO_API_REVISION", "october"),
            ("REFRESH_CONCURRENCY", "0"),
            ("REFRESH_CONCURRENCY", "lots"),
            ("CONNECT_RATE_LIMIT", "0"),
            ("CONNECT_RATE_WINDOW_SECONDS", "-5"),
            ("JWT_MAX_LIFETIME_SECONDS", "59"),
            ("JWT_MAX_LIFETIME_SECONDS", "86401"),
            ("JWT_PREVIOUS_KEY_GRACE_SECONDS", "604801"),
            ("JWT_PREVIOUS_KEY_GRACE_SECONDS", "-1"),
            ("CONNECT_COMPLETION", "Required"),
            ("REFRESH_POLICY", "lazy"),
            ("REFRESH_ACTIVE_WINDOW", "24"),
            ("REFRESH_ACTIVE_WINDOW", "59m"),
            ("REFRESH_ACTIVE_WINDOW", "1h"),
            ("REFRESH_ACTIVE_WINDOW", "31d"),
            ("REFRESH_IDLE_INTERVAL", "1.5h"),
            ("REFRESH_IDLE_INTERVAL", "-2h"),
            ("REFRESH_IDLE_INTERVAL", "99999999999999999d"),
            ("REFRESH_IDLE_INTERVAL", "24 h"),
            ("EVENT_BUS_NAME", "bus with spaces"),
            ("EVENT_BUS_NAME", "arn:aws:events:us-east-1:1:rule/x"),
            ("CONNECT_COMPLETION", "no"),
            ("FRONTEND_URL", "https://user:pw@app.example.com"),
            ("ALLOWED_ORIGINS", "*"),
            ("ALLOWED_ORIGINS", "null"),
            ("ALLOWED_ORIGINS", "https://app.example.com/settings"),
        ];
        for (name, value) in cases {
            let mut vars = base();
            vars.insert(name, value);
            let err = load(&vars).unwrap_err();
            assert_eq!(err.name, name, "{value}: {err}");
        }
    }

    #[test]
    fn loopback_http_is_allowed_for_local_runs() {
        let mut vars = base();
        vars.insert("KLAVIYO_OAUTH_BASE", "http://127.0.0.1:9100/");
        vars.insert(
            "KLAVIYO_REDIRECT_URI",
            "http://127.0.0.1:9000/klaviyo/oauthcallback",
        );
        vars.insert(
            "ALLOWED_ORIGINS",
            "http://127.0.0.1:9300, http://localhost:9300, https://app.example.com",
        );
        vars.insert("KLAVIYO_API_REVISION", "2026-01-15.pre");
        let config = load(&vars).unwrap();
        assert_eq!(config.klaviyo.oauth_base.as_str(), "http://127.0.0.1:9100/");
        // The frontend's own origin first, then the ones ALLOWED_ORIGINS adds, once each.
        assert_eq!(
            config.allowed_origins,
            vec![
                "https://app.example.com",
                "http://127.0.0.1:9300",
                "http://localhost:9300"
            ]
        );
        assert_eq!(config.klaviyo.api_revision, "2026-01-15.pre");
    }
}
