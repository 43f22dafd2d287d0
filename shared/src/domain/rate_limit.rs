//! Per-user rate limiting on the connect routes (OAuth start and API key together; completions and
//! "Test connection" on counters of their own): a fixed-window counter per user and scope, kept in
//! DynamoDB so every container sees the same count, with the table's TTL removing old windows. API
//! Gateway throttling protects the service as a whole; this stops one user (or one stolen token)
//! from filling the table with pending authorizations or spending Klaviyo's per-account rate limit
//! on key checks.

use time::OffsetDateTime;

/// At most `limit` requests per user in each fixed window of `window_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window_secs: u32,
}

/// The window a request falls in: which counter it increments and when that counter resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    /// Epoch seconds at which the window starts (part of the counter's key).
    pub starts_at: i64,
    /// Epoch seconds at which the next window starts; also the counter's TTL.
    pub ends_at: i64,
}

impl RateLimit {
    pub fn window_at(&self, now: OffsetDateTime) -> RateWindow {
        let width = i64::from(self.window_secs.max(1));
        let starts_at = now.unix_timestamp().div_euclid(width) * width;
        RateWindow {
            limit: self.limit,
            starts_at,
            ends_at: starts_at + width,
        }
    }
}

impl RateWindow {
    /// Whole seconds until the window resets, at least 1: the `retry-after` a limited
    /// request is told.
    pub fn retry_after_secs(&self, now: OffsetDateTime) -> u64 {
        (self.ends_at - now.unix_timestamp()).max(1) as u64
    }
}

/// What a counter counts. Completions have their own counter with the same limit, so a user
/// who started many flows can still finish the one they meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// OAuth starts and API keys.
    Connect,
    /// OAuth completions.
    Complete,
    /// "Test connection".
    Verify,
}

impl Scope {
    pub fn key(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Complete => "COMPLETE",
            Self::Verify => "VERIFY",
        }
    }
}

/// Whether a counted request may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    Limited,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    #[test]
    fn windows_are_aligned_and_reset_on_time() {
        let limit = RateLimit {
            limit: 10,
            window_secs: 60,
        };
        let window = limit.window_at(at(1_800_000_059));
        assert_eq!(window.starts_at, 1_800_000_000);
        assert_eq!(window.ends_at, 1_800_000_060);
        assert_eq!(limit.window_at(at(1_800_000_000)), window);
        assert_ne!(limit.window_at(at(1_800_000_060)), window);
        assert_ne!(limit.window_at(at(1_799_999_999)), window);
        assert_eq!(window.retry_after_secs(at(1_800_000_000)), 60);
        assert_eq!(window.retry_after_secs(at(1_800_000_059)), 1);
        // A clock that has moved past the window still asks for at least a second.
        assert_eq!(window.retry_after_secs(at(1_800_000_100)), 1);
        assert_eq!(window.limit, 10);
    }
}
