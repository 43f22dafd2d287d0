//! `Secret`: the one type every token, key, verifier and client secret lives in.
//!
//! The value is zeroized on drop (via `secrecy`), is never printed by `Debug`, and has no
//! `Display` or `Serialize`, so it cannot reach a log line or a response body by accident.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A secret that stopped working (Klaviyo refused the client secret, a JWT matched no key) is
/// read again from Secrets Manager at most this often per container.
pub const SECRET_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The plaintext, for the one place that must send or seal it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl Clone for Secret {
    fn clone(&self) -> Self {
        Self::new(self.expose())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time comparison is not needed here: secrets are compared only in tests
        // and when deciding whether a rotated token differs from the stored one.
        self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

/// For unit tests of what reads a secret again: a value a test changes, as a container sees it
/// in Secrets Manager, and how many times it was read.
#[cfg(test)]
pub(crate) struct Held<T> {
    value: std::sync::Mutex<T>,
    reads: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl<T: Clone> Held<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: std::sync::Mutex::new(value),
            reads: Default::default(),
        }
    }

    pub(crate) fn set(&self, value: T) {
        *self.value.lock().unwrap() = value;
    }

    /// The value, counted as a read.
    pub(crate) fn read(&self) -> T {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.value.lock().unwrap().clone()
    }

    pub(crate) fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let secret = Secret::new("pk_live_do_not_print");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "pk_live_do_not_print");
    }

    #[test]
    fn deserializes_from_a_json_string() {
        let secret: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(secret.expose(), "abc");
    }
}
