//! The sandbox's memory: configuration, issued grants, injected faults, received requests.

use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Requests kept for inspection; older ones are dropped.
const MAX_RECORDED: usize = 50_000;
pub const DEFAULT_ACCESS_TOKEN_TTL_SECS: u64 = 3600;
pub const DEFAULT_ACCOUNT: &str = "SbxAcct01";
/// Codes are valid for this long after authorize.
pub const CODE_TTL_SECS: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Authorize,
    Token,
    Revoke,
    Accounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with `status` (5xx by default 503) and a JSON error body.
    Status,
    /// 429 with `Retry-After: retry_after` seconds.
    RateLimit,
    /// Delay by `ms`, then answer normally.
    Latency,
    /// Hold the request for 30 s (longer than any client timeout), then 504.
    Timeout,
    /// 200 with a body that is not JSON.
    Malformed,
    /// OAuth `invalid_grant` (token endpoint).
    InvalidGrant,
}

/// A fault to inject: on `endpoint`, for requests about `account` (or every account),
/// `times` times (or until cleared).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub endpoint: Endpoint,
    pub kind: FaultKind,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub ms: Option<u64>,
    #[serde(default)]
    pub times: Option<u32>,
}

/// What the sandbox received, for tests to assert on.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub endpoint: Endpoint,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub form: BTreeMap<String, String>,
    pub account: Option<String>,
    pub at_ms: u128,
}

pub struct CodeGrant {
    pub account: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub scopes: String,
    pub issued_at: u64,
    pub used: bool,
}

#[derive(Clone, Serialize)]
pub struct AccessGrant {
    pub account: String,
    pub scopes: String,
    pub expires_at: u64,
    pub revoked: bool,
    pub family: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshStatus {
    Active,
    /// Used once; rotation replaced it.
    Rotated,
    Revoked,
}

#[derive(Clone, Serialize)]
pub struct RefreshGrant {
    pub account: String,
    pub scopes: String,
    pub status: RefreshStatus,
    pub family: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Account {
    pub organization_name: String,
    #[serde(default)]
    pub access_token_ttl_secs: Option<u64>,
}

#[derive(Default)]
pub struct State {
    pub codes: HashMap<String, CodeGrant>,
    pub access_tokens: HashMap<String, AccessGrant>,
    pub refresh_tokens: HashMap<String, RefreshGrant>,
    pub api_keys: HashMap<String, String>,
    pub accounts: HashMap<String, Account>,
    pub faults: Vec<Fault>,
    pub requests: VecDeque<Recorded>,
}

impl State {
    pub fn ensure_account(&mut self, id: &str, organization_name: Option<&str>) {
        let entry = self
            .accounts
            .entry(id.to_owned())
            .or_insert_with(|| Account {
                organization_name: format!("Sandbox Org {id}"),
                access_token_ttl_secs: None,
            });
        if let Some(name) = organization_name {
            entry.organization_name = name.to_owned();
        }
    }

    /// Issues an access and refresh token for `account` in token `family`.
    pub fn issue_tokens(
        &mut self,
        account: &str,
        scopes: &str,
        family: &str,
    ) -> (String, String, u64) {
        let ttl = self
            .accounts
            .get(account)
            .and_then(|a| a.access_token_ttl_secs)
            .unwrap_or(DEFAULT_ACCESS_TOKEN_TTL_SECS);
        let access = format!("sbx-at-{}", random_token());
        let refresh = format!("sbx-rt-{}", random_token());
        self.access_tokens.insert(
            access.clone(),
            AccessGrant {
                account: account.to_owned(),
                scopes: scopes.to_owned(),
                expires_at: now_secs() + ttl,
                revoked: false,
                family: family.to_owned(),
            },
        );
        self.refresh_tokens.insert(
            refresh.clone(),
            RefreshGrant {
                account: account.to_owned(),
                scopes: scopes.to_owned(),
                status: RefreshStatus::Active,
                family: family.to_owned(),
            },
        );
        (access, refresh, ttl)
    }

    /// Revokes every token of a family (one authorization and its rotations).
    pub fn revoke_family(&mut self, family: &str) {
        for grant in self
            .refresh_tokens
            .values_mut()
            .filter(|g| g.family == family)
        {
            grant.status = RefreshStatus::Revoked;
        }
        for grant in self
            .access_tokens
            .values_mut()
            .filter(|g| g.family == family)
        {
            grant.revoked = true;
        }
    }

    /// Every latency fault that applies (summed) and the first other fault that applies.
    /// Faults with a count are used up one per matching request.
    pub fn take_faults(
        &mut self,
        endpoint: Endpoint,
        account: Option<&str>,
    ) -> (Duration, Option<Fault>) {
        let applies = |f: &Fault| {
            f.endpoint == endpoint && f.account.as_deref().is_none_or(|a| Some(a) == account)
        };
        let mut delay = Duration::ZERO;
        let mut terminal = None;
        for fault in self.faults.iter_mut().filter(|f| applies(f)) {
            let take = fault.kind == FaultKind::Latency || terminal.is_none();
            if !take {
                continue;
            }
            if let Some(times) = fault.times.as_mut() {
                *times = times.saturating_sub(1);
            }
            if fault.kind == FaultKind::Latency {
                delay += Duration::from_millis(fault.ms.unwrap_or(0));
            } else {
                terminal = Some(fault.clone());
            }
        }
        self.faults.retain(|f| f.times != Some(0));
        (delay, terminal)
    }

    pub fn record(&mut self, recorded: Recorded) {
        if self.requests.len() >= MAX_RECORDED {
            self.requests.pop_front();
        }
        self.requests.push_back(recorded);
    }
}

pub struct Sandbox {
    pub client_id: String,
    /// Read from Secrets Manager at start; `POST /sandbox/client-secret` replaces it, as
    /// regenerating it in Klaviyo would.
    client_secret: Mutex<String>,
    pub redirect_uri: String,
    state: Mutex<State>,
}

impl Sandbox {
    pub async fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let client_id = var("KLAVIYO_CLIENT_ID")?;
        let redirect_uri = var("KLAVIYO_REDIRECT_URI")?;
        let secret_arn = var("KLAVIYO_CLIENT_SECRET_ARN")?;
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(Provider::Rustls(CryptoMode::Ring))
                    .build_https(),
            )
            .load()
            .await;
        let client_secret = aws_sdk_secretsmanager::Client::new(&sdk)
            .get_secret_value()
            .secret_id(&secret_arn)
            .send()
            .await
            .map_err(|e| format!("reading KLAVIYO_CLIENT_SECRET_ARN: {e}"))?
            .secret_string
            .ok_or("the Klaviyo client secret has no value")?;
        let mut state = State::default();
        state.ensure_account(DEFAULT_ACCOUNT, Some("Sandbox Store"));
        Ok(Self {
            client_id,
            client_secret: Mutex::new(client_secret),
            redirect_uri,
            state: Mutex::new(state),
        })
    }

    pub fn client_secret_is(&self, secret: &str) -> bool {
        *self.client_secret.lock().unwrap_or_else(|p| p.into_inner()) == secret
    }

    /// The app's client secret is regenerated: the old one stops working at once.
    pub fn regenerate_client_secret(&self, secret: String) {
        *self.client_secret.lock().unwrap_or_else(|p| p.into_inner()) = secret;
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters for a test double; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
