//! The domain: a user's `Connection` to a Klaviyo account, the `PendingAuthorization`
//! that exists between clicking "Connect" and Klaviyo's redirect back, and the
//! `ParkedConnection` that waits for the user's own session to complete it.

use crate::adapters::auth::UserId;
use crate::adapters::crypto::{Purpose, SealContext, SealedBlob};
use crate::domain::secret::Secret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

/// How long a user has to finish Klaviyo's consent screen.
pub const PENDING_AUTHORIZATION_TTL: time::Duration = time::Duration::minutes(10);

/// How long a parked OAuth result waits for its completion.
pub const COMPLETION_TTL: time::Duration = time::Duration::minutes(10);
/// The refresh job revokes a parked result nobody completed this long after its deadline, so
/// a completion that is still writing when the deadline passes cannot race the revocation.
pub const COMPLETION_GRACE: time::Duration = time::Duration::minutes(1);

/// A Klaviyo refresh token unused this long has expired; a revocation still pending after
/// that has nothing left to revoke.
pub const REFRESH_TOKEN_IDLE_LIFETIME: time::Duration = time::Duration::days(90);

/// The refresh job renews an access token this long before it expires.
pub const REFRESH_LEAD: time::Duration = time::Duration::minutes(15);
/// API-key connections are checked against Klaviyo once a day, each at its own time of day.
pub const KEY_CHECK_INTERVAL: time::Duration = time::Duration::days(1);
/// The next scheduled check is the connection's time of day at least this long after the
/// last one: runs every few minutes start each check a little after its time, so the next
/// day's time is still ahead, and no key is checked twice within this span.
pub const KEY_CHECK_MIN_GAP: time::Duration = time::Duration::hours(23);
/// A connection's use is recorded at most this often.
pub const USE_RECORDED_EVERY: time::Duration = time::Duration::hours(1);
/// Never schedule the next refresh sooner than this (tokens with a very short life).
pub const MIN_REFRESH_INTERVAL: time::Duration = time::Duration::seconds(60);
/// Default and limits of the user's label for a connection.
pub const DEFAULT_ACCOUNT_NAME: &str = "Klaviyo";
pub const MAX_ACCOUNT_NAME_CHARS: usize = 100;

/// Namespace for connection ids (UUID v5 of user id and Klaviyo account id).
const CONNECTION_NAMESPACE: Uuid = Uuid::from_u128(0x6b1a_4c52_8f0e_4d8b_9a53_2f1e_7c0d_3b21);

/// State between `connect` and `callback`, keyed by a hash of the OAuth `state` so the
/// table never holds the value an attacker would need to complete someone's flow.
#[derive(Debug, Clone)]
pub struct PendingAuthorization {
    pub state_hash: String,
    pub user_id: UserId,
    pub account_name: String,
    pub code_verifier: Secret,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

impl PendingAuthorization {
    /// Hex SHA-256 of the OAuth `state` sent to Klaviyo.
    pub fn hash_state(state: &str) -> String {
        hex(&Sha256::digest(state.as_bytes()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    #[serde(rename = "oauth")]
    OAuth,
    ApiKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    Active,
    NeedsReauth,
}

/// Why a connection needs re-authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusReason {
    /// Klaviyo refused the refresh token (`invalid_grant`: the app was removed in Klaviyo, or
    /// the token expired unused).
    RefreshRefused,
    /// Klaviyo refused the private API key.
    ApiKeyRefused,
}

/// One user's link to one Klaviyo account. Connecting the same Klaviyo account again (by
/// either method) updates this connection: its id is derived from user and Klaviyo account,
/// so it is stable across reconnects and a concurrent double connect cannot duplicate it.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    pub id: String,
    pub user_id: UserId,
    pub account_name: String,
    pub klaviyo_account_id: String,
    pub klaviyo_account_name: String,
    pub auth_type: AuthType,
    pub status: ConnectionStatus,
    pub scopes: Vec<String>,
    pub connected_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub last_refreshed_at: Option<OffsetDateTime>,
    pub access_token_expires_at: Option<OffsetDateTime>,
    /// When the refresh job should next look at it (refresh an OAuth token, check an API key);
    /// `None` when it never should (connections needing re-authorisation).
    pub refresh_due_at: Option<OffsetDateTime>,
    /// Transient refresh failures in a row; drives the retry backoff.
    pub refresh_failures: u32,
    /// When the user granted the current credentials (connect, reconnect, a switch of method);
    /// refreshes keep it. A change is a re-authorisation.
    pub authorized_at: OffsetDateTime,
    /// Why the connection needs re-authorisation (set with `NeedsReauth`, cleared with it).
    pub status_reason: Option<StatusReason>,
    /// Refreshes keep failing for transient reasons and the access token has expired: calls
    /// with this connection fail until a refresh succeeds.
    pub degraded: bool,
    /// When Klaviyo's accounts endpoint last accepted the credential (connect, "Test
    /// connection", the daily check of an API key).
    pub last_verified_at: Option<OffsetDateTime>,
    /// When a credential for it was last handed out to a host service (the token function),
    /// to the hour: written at most once an hour.
    pub last_used_at: Option<OffsetDateTime>,
    /// Tokens or API key, sealed to (user id, connection id, purpose).
    pub credentials: SealedBlob,
    /// Incremented by every write; conditional writes compare it.
    pub version: u64,
}

impl Connection {
    pub fn id_for(user_id: &UserId, klaviyo_account_id: &str) -> String {
        let name = format!("{}\n{}", user_id.as_str(), klaviyo_account_id);
        Uuid::new_v5(&CONNECTION_NAMESPACE, name.as_bytes()).to_string()
    }

    /// A connection id as a caller sent it: ids are UUIDs (lower-cased here); anything else
    /// cannot name a connection.
    pub fn parse_id(raw: &str) -> Option<String> {
        Uuid::try_parse(raw)
            .ok()
            .map(|id| id.hyphenated().to_string())
    }

    /// Klaviyo has been failing for this connection and the refresh job is backing off
    /// (`Retry-After` included): nobody adds a refresh of their own before `refresh_due_at`.
    pub fn backing_off(&self, now: OffsetDateTime) -> bool {
        self.refresh_failures > 0 && self.refresh_due_at.is_some_and(|due| due > now)
    }
}

/// When an API-key connection is next checked: the first time at or after `not_before` that
/// falls on the connection's own time of day (a hash of its id), so a million keys connected
/// in the same minute are still checked evenly over the day, each once a day.
pub fn key_check_due(connection_id: &str, not_before: OffsetDateTime) -> OffsetDateTime {
    spread_due(connection_id, not_before, KEY_CHECK_INTERVAL)
}

/// The first time at or after `not_before` that falls on the connection's own point of each
/// `period` (a hash of its id, counted from the Unix epoch): connections that became due
/// together are spread evenly over the period.
fn spread_due(
    connection_id: &str,
    not_before: OffsetDateTime,
    period: time::Duration,
) -> OffsetDateTime {
    let period = period.whole_seconds().max(1);
    let digest = Sha256::digest(connection_id.as_bytes());
    let hash = u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"));
    let slot = (hash % period as u64) as i64;
    let start = not_before.unix_timestamp();
    let mut due = start.div_euclid(period) * period + slot;
    if due < start {
        due += period;
    }
    OffsetDateTime::from_unix_timestamp(due).unwrap_or(not_before)
}

/// How OAuth connections are kept fresh (`REFRESH_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshPolicy {
    /// Every connection refreshed `REFRESH_LEAD` before its access token expires, used or not
    /// (about 32 refreshes a day each).
    Eager,
    /// Connections in use (a credential handed out, or the user authorised them, within
    /// `active_window`) are kept fresh as with `Eager`; the others get one keep-alive refresh
    /// every `idle_interval`, each at its own point of the interval. The keep-alive keeps the
    /// refresh token alive (Klaviyo's die after 90 days unused) and finds a removed app
    /// within an interval. A credential handed out for an idle connection puts it back on the
    /// eager schedule (`due_when_used`), or is refreshed first when its token is too old.
    UsageAware {
        active_window: time::Duration,
        idle_interval: time::Duration,
    },
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self::UsageAware {
            active_window: time::Duration::hours(24),
            idle_interval: time::Duration::hours(24),
        }
    }
}

impl RefreshPolicy {
    /// Whether `connection` counts as in use at `now` (always, when eager).
    pub fn in_use(&self, connection: &Connection, now: OffsetDateTime) -> bool {
        match self {
            Self::Eager => true,
            Self::UsageAware { active_window, .. } => {
                let last = connection
                    .last_used_at
                    .map_or(connection.authorized_at, |used| {
                        used.max(connection.authorized_at)
                    });
                now - last < *active_window
            }
        }
    }

    /// When to refresh `connection` next, its access token renewed at `now` to expire at
    /// `expires_at`: shortly before it expires while in use, otherwise at the next keep-alive
    /// (never sooner than the eager time).
    pub fn next_refresh(
        &self,
        connection: &Connection,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        let eager = (expires_at - REFRESH_LEAD).max(now + MIN_REFRESH_INTERVAL);
        match self {
            Self::UsageAware { idle_interval, .. } if !self.in_use(connection, now) => {
                // The connection's next point: a keep-alive that ran at its point (a few
                // minutes late) finds the next one a whole interval later; the first after a
                // period of use comes within an interval.
                spread_due(&connection.id, now, *idle_interval).max(eager)
            }
            _ => eager,
        }
    }

    /// When an idle OAuth connection whose credential is handed out at `now` should be
    /// refreshed instead of at its keep-alive: `REFRESH_LEAD` before its token expires (now,
    /// if that has passed). `None` when nothing needs to change: eager, in use, not OAuth,
    /// backing off, or already due that soon.
    pub fn due_when_used(
        &self,
        connection: &Connection,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        if self.in_use(connection, now)
            || connection.auth_type != AuthType::OAuth
            || connection.status != ConnectionStatus::Active
            || connection.backing_off(now)
        {
            return None;
        }
        let expires_at = connection.access_token_expires_at?;
        let due = (expires_at - REFRESH_LEAD).max(now);
        connection
            .refresh_due_at
            .is_some_and(|scheduled| scheduled > due)
            .then_some(due)
    }
}

/// The user's label for a connection: absent means the default; otherwise trimmed, 1–100
/// characters, no control characters.
pub fn parse_account_name(raw: Option<&str>) -> Result<String, &'static str> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_ACCOUNT_NAME.to_owned());
    };
    let name = raw.trim();
    if name.is_empty() {
        return Err("accountName must not be empty.");
    }
    if name.chars().count() > MAX_ACCOUNT_NAME_CHARS {
        return Err("accountName must be at most 100 characters.");
    }
    if name.chars().any(char::is_control) {
        return Err("accountName must not contain control characters.");
    }
    Ok(name.to_owned())
}

/// What a connection's sealed blob holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Credentials {
    OAuth {
        access_token: Secret,
        refresh_token: Secret,
    },
    ApiKey(Secret),
}

impl Credentials {
    pub fn purpose(&self) -> Purpose {
        match self {
            Self::OAuth { .. } => Purpose::OAuthTokens,
            Self::ApiKey(_) => Purpose::ApiKey,
        }
    }

    pub fn refresh_token(&self) -> Option<&Secret> {
        match self {
            Self::OAuth { refresh_token, .. } => Some(refresh_token),
            Self::ApiKey(_) => None,
        }
    }
}

impl Connection {
    pub fn seal_context(&self, purpose: Purpose) -> SealContext {
        SealContext::new(self.user_id.as_str(), &self.id, purpose)
    }

    pub fn credentials_purpose(&self) -> Purpose {
        match self.auth_type {
            AuthType::OAuth => Purpose::OAuthTokens,
            AuthType::ApiKey => Purpose::ApiKey,
        }
    }
}

/// A refresh token that must still be revoked at Klaviyo (Klaviyo was unreachable when its
/// connection was disconnected or replaced). It keeps the connection's sealed tokens as they
/// were, still bound to the user and connection they were sealed for; the refresh job
/// retries until Klaviyo confirms or the token could no longer be valid (`expires_at`, also
/// the TTL), and then the item, the last trace of the token, is deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRevocation {
    pub id: String,
    pub user_id: UserId,
    pub connection_id: String,
    pub credentials: SealedBlob,
    pub created_at: OffsetDateTime,
    pub attempts: u32,
    /// When the refresh job should next try.
    pub due_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

impl PendingRevocation {
    /// For the OAuth tokens of `connection`, due at once.
    pub fn for_connection(connection: &Connection, now: OffsetDateTime) -> Self {
        let last_used = connection
            .last_refreshed_at
            .unwrap_or(connection.updated_at);
        Self {
            id: Uuid::new_v4().to_string(),
            user_id: connection.user_id.clone(),
            connection_id: connection.id.clone(),
            credentials: connection.credentials.clone(),
            created_at: now,
            attempts: 0,
            due_at: now,
            expires_at: last_used + REFRESH_TOKEN_IDLE_LIFETIME,
        }
    }
}

/// An OAuth result the callback parked until the user who started the flow completes it from
/// their own session (`CONNECT_COMPLETION=required`): the connection as it will be stored,
/// its tokens already sealed for it. It is stored as a pending revocation due when the
/// completion window has passed, so the one write that parks it also schedules its
/// revocation: a result nobody completes (a crash, a closed tab, an attack) is revoked by the
/// refresh job like any other token that left its connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedConnection {
    /// Hex SHA-256 of the completion handle: the table never holds the handle itself.
    pub handle_hash: String,
    pub connection: Connection,
    pub complete_by: OffsetDateTime,
}

impl ParkedConnection {
    /// Parks `connection` under a fresh handle; returns it and the handle for the browser.
    pub fn new(connection: Connection, now: OffsetDateTime) -> (Self, Secret) {
        let handle = random_handle();
        let parked = Self {
            handle_hash: Self::hash_handle(handle.expose()),
            connection,
            complete_by: now + COMPLETION_TTL,
        };
        (parked, handle)
    }

    /// Hex SHA-256 of a completion handle.
    pub fn hash_handle(handle: &str) -> String {
        hex(&Sha256::digest(handle.as_bytes()))
    }

    /// The shape of a handle this service issues: 43 base64url characters (32 bytes).
    pub fn is_well_formed(handle: &str) -> bool {
        handle.len() == HANDLE_CHARS
            && handle
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// The revocation the parked tokens are queued as: due once the completion window and
    /// its grace have passed.
    pub fn revocation(&self) -> PendingRevocation {
        let connection = &self.connection;
        PendingRevocation {
            id: self.handle_hash.clone(),
            user_id: connection.user_id.clone(),
            connection_id: connection.id.clone(),
            credentials: connection.credentials.clone(),
            created_at: connection.updated_at,
            attempts: 0,
            due_at: self.complete_by + COMPLETION_GRACE,
            expires_at: connection.updated_at + REFRESH_TOKEN_IDLE_LIFETIME,
        }
    }
}

/// Characters of a completion handle: 32 random bytes, base64url without padding.
const HANDLE_CHARS: usize = 43;

fn random_handle() -> Secret {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(bytes.as_mut());
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

/// An active OAuth connection of user `alice` to Klaviyo account `KLAV1`, for unit tests.
#[cfg(test)]
pub(crate) fn sample_connection(at: OffsetDateTime) -> Connection {
    let alice = UserId::parse("alice").expect("a user id");
    Connection {
        id: Connection::id_for(&alice, "KLAV1"),
        user_id: alice,
        account_name: "Main store".into(),
        klaviyo_account_id: "KLAV1".into(),
        klaviyo_account_name: "Org".into(),
        auth_type: AuthType::OAuth,
        status: ConnectionStatus::Active,
        scopes: vec!["accounts:read".into()],
        connected_at: at,
        updated_at: at,
        last_refreshed_at: None,
        access_token_expires_at: Some(at + time::Duration::hours(1)),
        refresh_due_at: Some(at + time::Duration::minutes(45)),
        refresh_failures: 0,
        authorized_at: at,
        status_reason: None,
        degraded: false,
        last_verified_at: None,
        last_used_at: None,
        credentials: SealedBlob::from_bytes(b"sealed-secret-bytes".to_vec()),
        version: 1,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_checks_fall_on_each_connections_time_of_day() {
        let at = |secs| OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let start = at(1_800_000_000);
        let first = key_check_due("c1", start);
        assert!(first >= start && first < start + KEY_CHECK_INTERVAL);
        // Checked a few minutes late, the next check is the same time the next day.
        let next = key_check_due("c1", first + time::Duration::minutes(4) + KEY_CHECK_MIN_GAP);
        assert_eq!(next - first, KEY_CHECK_INTERVAL);
        // On time exactly counts as due.
        assert_eq!(key_check_due("c1", first), first);
        // Ten thousand keys connected in the same second spread over the whole day.
        let mut hours = [0u32; 24];
        for i in 0..10_000 {
            let due = key_check_due(&format!("connection-{i}"), start);
            hours[((due - start).whole_hours()) as usize] += 1;
        }
        assert!(hours.iter().all(|&n| (300..=540).contains(&n)), "{hours:?}");
    }

    #[test]
    fn usage_aware_keeps_connections_in_use_fresh_and_idle_ones_alive() {
        let (hours, minutes) = (time::Duration::hours, time::Duration::minutes);
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let policy = RefreshPolicy::default();
        let expires = now + hours(1);
        let eager = expires - REFRESH_LEAD;
        let mut connection = sample_connection(now - time::Duration::days(3));

        // Authorised or used within the window: in use, refreshed before it expires.
        let mut fresh = connection.clone();
        fresh.authorized_at = now - hours(2);
        assert!(policy.in_use(&fresh, now));
        assert_eq!(policy.next_refresh(&fresh, expires, now), eager);
        connection.last_used_at = Some(now - hours(23));
        assert!(policy.in_use(&connection, now));
        assert_eq!(policy.next_refresh(&connection, expires, now), eager);

        // Idle: the keep-alive at the connection's own point of the day, within a day (never
        // before the eager time); a keep-alive run at its point finds the next a day later.
        connection.last_used_at = Some(now - hours(24));
        assert!(!policy.in_use(&connection, now));
        let keep_alive = policy.next_refresh(&connection, expires, now);
        assert!(
            keep_alive >= eager && keep_alive <= now + hours(24),
            "{keep_alive}"
        );
        let ran = keep_alive + minutes(4);
        assert_eq!(
            policy.next_refresh(&connection, ran + hours(1), ran),
            keep_alive + hours(24)
        );
        // Never sooner than eager (an interval shorter than the token's life).
        let hourly = RefreshPolicy::UsageAware {
            active_window: hours(1),
            idle_interval: hours(1),
        };
        assert!(
            hourly.next_refresh(&connection, now + hours(2), now) >= now + hours(2) - REFRESH_LEAD
        );

        // Eager: always in use.
        assert!(RefreshPolicy::Eager.in_use(&connection, now));
        assert_eq!(
            RefreshPolicy::Eager.next_refresh(&connection, expires, now),
            eager
        );
        // A token with a very short life is not refreshed in a loop.
        assert_eq!(
            RefreshPolicy::Eager.next_refresh(&connection, now + minutes(5), now),
            now + MIN_REFRESH_INTERVAL
        );

        // Idle connections spread over the interval.
        let mut slots = [0u32; 24];
        for i in 0..10_000 {
            let mut c = connection.clone();
            c.id = format!("connection-{i}");
            let due = spread_due(&c.id, now, hours(24));
            assert_eq!(policy.next_refresh(&c, expires, now), due.max(eager));
            slots[((due - now).whole_hours()) as usize] += 1;
        }
        assert!(slots.iter().all(|&n| (300..=540).contains(&n)), "{slots:?}");
    }

    #[test]
    fn a_credential_handed_out_for_an_idle_connection_brings_its_refresh_forward() {
        let hours = time::Duration::hours;
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let policy = RefreshPolicy::default();
        let mut idle = sample_connection(now - time::Duration::days(3));
        idle.access_token_expires_at = Some(now + hours(1));
        idle.refresh_due_at = Some(now + hours(20));
        assert_eq!(
            policy.due_when_used(&idle, now),
            Some(now + hours(1) - REFRESH_LEAD)
        );
        // Its token too close to expiry for the lead: due now.
        let mut closer = idle.clone();
        closer.access_token_expires_at = Some(now + time::Duration::minutes(10));
        assert_eq!(policy.due_when_used(&closer, now), Some(now));

        let unchanged = |c: &Connection| policy.due_when_used(c, now);
        let mut in_use = idle.clone();
        in_use.last_used_at = Some(now - hours(3));
        assert_eq!(unchanged(&in_use), None, "in use: already eager");
        let mut key = idle.clone();
        key.auth_type = AuthType::ApiKey;
        assert_eq!(unchanged(&key), None, "API keys keep their daily check");
        let mut backing_off = idle.clone();
        backing_off.refresh_failures = 2;
        assert_eq!(unchanged(&backing_off), None, "the backoff stands");
        let mut sooner = idle.clone();
        sooner.refresh_due_at = Some(now + time::Duration::minutes(30));
        assert_eq!(unchanged(&sooner), None, "already due sooner");
        let mut refused = idle.clone();
        refused.status = ConnectionStatus::NeedsReauth;
        refused.refresh_due_at = None;
        assert_eq!(unchanged(&refused), None);
        assert_eq!(RefreshPolicy::Eager.due_when_used(&idle, now), None);
    }

    #[test]
    fn connection_ids_are_stable_per_user_and_account() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let a1 = Connection::id_for(&alice, "KLAV1");
        assert_eq!(a1, Connection::id_for(&alice, "KLAV1"));
        assert_ne!(a1, Connection::id_for(&alice, "KLAV2"));
        assert_ne!(a1, Connection::id_for(&bob, "KLAV1"));
        // The separator keeps ("a\nb", "c") and ("a", "b\nc") apart only if ids have no
        // newline; Klaviyo account ids are alphanumeric, so they never do.
        assert_eq!(a1.len(), 36);
    }

    #[test]
    fn account_names_are_validated() {
        assert_eq!(parse_account_name(None).unwrap(), "Klaviyo");
        assert_eq!(
            parse_account_name(Some("  Main store ")).unwrap(),
            "Main store"
        );
        assert_eq!(
            parse_account_name(Some(&"é".repeat(100)))
                .unwrap()
                .chars()
                .count(),
            100
        );
        assert!(parse_account_name(Some(&"é".repeat(101))).is_err());
        assert!(parse_account_name(Some("   ")).is_err());
        assert!(parse_account_name(Some("")).is_err());
        assert!(parse_account_name(Some("a\nb")).is_err());
        assert!(parse_account_name(Some("a\u{7f}b")).is_err());
    }

    #[test]
    fn completion_handles_are_random_well_formed_and_stored_hashed() {
        let alice = UserId::parse("alice").unwrap();
        let now = OffsetDateTime::now_utc();
        let connection = Connection {
            user_id: alice.clone(),
            ..sample_connection(now)
        };
        let (parked, handle) = ParkedConnection::new(connection.clone(), now);
        let (_, other) = ParkedConnection::new(connection, now);
        assert!(ParkedConnection::is_well_formed(handle.expose()));
        assert_ne!(handle.expose(), other.expose());
        assert_eq!(
            parked.handle_hash,
            ParkedConnection::hash_handle(handle.expose())
        );
        assert_ne!(parked.handle_hash, handle.expose());
        assert_eq!(parked.complete_by, now + COMPLETION_TTL);
        let revocation = parked.revocation();
        assert_eq!(revocation.due_at, now + COMPLETION_TTL + COMPLETION_GRACE);
        assert_eq!(revocation.connection_id, parked.connection.id);
        for bad in [
            "",
            "short",
            &"a".repeat(44),
            &format!("{}=", "a".repeat(42)),
            &format!("{}/", "a".repeat(42)),
        ] {
            assert!(!ParkedConnection::is_well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn state_hash_is_hex_sha256() {
        let hash = PendingAuthorization::hash_state("abc");
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The `accountName` pattern clients see in docs/openapi.yaml (and schemathesis fuzzes
    /// with), so the contract and the parser cannot drift apart.
    fn published_pattern() -> regex::Regex {
        let doc: serde_json::Value =
            serde_yaml_ng::from_str(include_str!("../../../docs/openapi.yaml")).unwrap();
        let pattern = doc["components"]["schemas"]["AccountName"]["pattern"]
            .as_str()
            .expect("AccountName has a pattern");
        regex::Regex::new(pattern).expect("the pattern compiles")
    }

    /// Mostly the characters where trimming and control-character rules differ.
    fn tricky_text() -> impl Strategy<Value = String> {
        let char = prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => any::<char>(),
            1 => proptest::sample::select(vec![
                ' ', '\t', '\n', '\r', '\u{b}', '\u{c}', '\u{85}', '\u{a0}', '\u{1680}',
                '\u{2000}', '\u{200a}', '\u{2028}', '\u{202f}', '\u{3000}', '\u{0}', '\u{1c}',
                '\u{1f}', '\u{7f}', '\u{9f}', '\u{200b}', '\u{feff}', 'é', '漢',
            ]),
        ];
        let mixed = prop::collection::vec(char, 0..110).prop_map(String::from_iter);
        // Around the length limit: letters and (trimmable) spaces only.
        let near_limit = (
            "[ \u{3000}]{0,3}",
            "[a-zé漢]([a-z é]{93,101})[a-z漢]",
            "[ \t]{0,3}",
        )
            .prop_map(|(lead, core, tail)| format!("{lead}{core}{tail}"));
        prop_oneof![mixed, near_limit]
    }

    proptest! {
        #[test]
        fn account_names_follow_the_rules_and_the_published_pattern(raw in tricky_text()) {
            let parsed = parse_account_name(Some(&raw));
            if let Ok(name) = &parsed {
                prop_assert_eq!(name.as_str(), raw.trim());
                prop_assert!((1..=MAX_ACCOUNT_NAME_CHARS).contains(&name.chars().count()));
                prop_assert!(!name.chars().any(char::is_control));
            }
            let pattern = published_pattern();
            prop_assert_eq!(pattern.is_match(&raw), parsed.is_ok(), "{:?}", raw);
        }
    }
}
