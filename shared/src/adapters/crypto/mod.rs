//! Sealing of credentials before they touch DynamoDB: KMS envelope encryption.
//!
//! A new connection's seal asks KMS for a fresh AES-256 data key (one `GenerateDataKey`),
//! encrypts with AES-256-GCM locally and stores the KMS-encrypted data key beside the
//! ciphertext. Each open is one `Decrypt` plus local AES-GCM; a refresh re-seals with the
//! data key its open recovered (fresh nonce), so it costs one KMS call, not two.
//!
//! Binding (format version 2): the KMS encryption context carries service, user id and
//! purpose; the AEAD associated data carries service, user id, connection id and purpose.
//! A blob copied to another user's row fails at KMS; to another connection of the same user,
//! or used for another purpose, it fails at AES-GCM. The connection id is left out of the KMS
//! context because it is derived from the Klaviyo account id, which the OAuth callback learns
//! only from Klaviyo: this way the data key is fetched while Klaviyo is asked (one wait less).
//! Version 1 blobs (connection id also in the KMS context) still open and re-seal as v1.
//!
//! Blob layout, both versions (integers big-endian):
//! `version | u16 len | encrypted data key | 12-byte nonce | AES-GCM ciphertext and 16-byte tag`.

mod credentials;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use aws_sdk_kms::error::{DisplayErrorContext, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use rand::RngCore;
use std::collections::HashMap;
use std::fmt;
use zeroize::Zeroizing;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const SERVICE: &str = "klaviyo-connect";

/// What a sealed blob holds; part of the binding, so one purpose cannot be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    OAuthTokens,
    ApiKey,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OAuthTokens => "oauth_tokens",
            Self::ApiKey => "api_key",
        }
    }
}

/// Whose secret this is and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealContext {
    pub user_id: String,
    pub connection_id: String,
    pub purpose: Purpose,
}

impl SealContext {
    pub fn new(
        user_id: impl Into<String>,
        connection_id: impl Into<String>,
        purpose: Purpose,
    ) -> Self {
        Self {
            user_id: user_id.into(),
            connection_id: connection_id.into(),
            purpose,
        }
    }

    /// The binding of this context's data key in KMS for blob `version`.
    fn key_binding(&self, version: u8) -> KeyBinding {
        KeyBinding {
            user_id: self.user_id.clone(),
            purpose: self.purpose,
            connection_id: (version == FORMAT_V1).then(|| self.connection_id.clone()),
        }
    }

    /// Length-prefixed so that no two different contexts encode alike.
    fn associated_data(&self, version: u8) -> Vec<u8> {
        let mut aad = vec![version];
        for part in [
            SERVICE,
            &self.user_id,
            &self.connection_id,
            self.purpose.as_str(),
        ] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }
}

/// What a data key is bound to in KMS (its encryption context): user and purpose, plus the
/// connection for version 1 keys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyBinding {
    user_id: String,
    purpose: Purpose,
    connection_id: Option<String>,
}

impl KeyBinding {
    fn version(&self) -> u8 {
        if self.connection_id.is_some() {
            FORMAT_V1
        } else {
            FORMAT_V2
        }
    }

    fn encryption_context(&self) -> HashMap<String, String> {
        let mut context = HashMap::from([
            ("service".to_owned(), SERVICE.to_owned()),
            ("user_id".to_owned(), self.user_id.clone()),
            ("purpose".to_owned(), self.purpose.as_str().to_owned()),
        ]);
        if let Some(connection_id) = &self.connection_id {
            context.insert("connection_id".to_owned(), connection_id.clone());
        }
        context
    }
}

/// KMS errors that retrying will not fix (permissions, a disabled or missing key) are
/// `Refused`, so callers can raise them instead of backing off quietly.
fn kms_error<E, R>(error: SdkError<E, R>) -> CryptoError
where
    E: std::error::Error + aws_sdk_kms::error::ProvideErrorMetadata + 'static,
    R: fmt::Debug,
{
    let refused = error
        .as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| {
            matches!(
                code,
                "AccessDeniedException"
                    | "DisabledException"
                    | "KMSInvalidStateException"
                    | "NotFoundException"
                    // KMS_KEY_ID names another key than the one that sealed: configuration,
                    // not a credential that no longer opens.
                    | "IncorrectKeyException"
            )
        });
    let message = DisplayErrorContext(&error).to_string();
    if refused {
        // A policy or key policy missing an action, or a disabled key: the alarm pages.
        tracing::error!(event = "aws_access_denied", service = "kms", error = %message, "KMS refused a call");
        CryptoError::Refused(message)
    } else {
        CryptoError::Unavailable(message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// KMS could not be reached or failed for a reason that may pass; retry later.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// KMS refused: the role may not use the key, or the key is disabled or gone. A
    /// configuration fault that retrying will not fix.
    #[error("KMS refused: {0}")]
    Refused(String),
    /// The blob does not open under this context: tampered, moved, or not ours.
    #[error("sealed data does not open in this context")]
    CannotOpen,
    /// The blob is not a sealed blob of a version we know.
    #[error("sealed data is malformed: {0}")]
    Malformed(&'static str),
}

/// Sealed bytes as stored. `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob(Vec<u8>);

impl SealedBlob {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Splits a v1 blob into its parts, refusing anything truncated or of another version.
    fn parts(&self) -> Result<BlobParts<'_>, CryptoError> {
        let (&version, rest) = self
            .0
            .split_first()
            .ok_or(CryptoError::Malformed("empty"))?;
        if version != FORMAT_V1 && version != FORMAT_V2 {
            return Err(CryptoError::Malformed("unknown format version"));
        }
        let (len, rest) = rest
            .split_at_checked(2)
            .ok_or(CryptoError::Malformed("truncated header"))?;
        let key_len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let (encrypted_key, rest) = rest
            .split_at_checked(key_len)
            .ok_or(CryptoError::Malformed("truncated data key"))?;
        let (nonce, ciphertext) = rest
            .split_at_checked(NONCE_LEN)
            .ok_or(CryptoError::Malformed("truncated nonce"))?;
        if encrypted_key.is_empty() || ciphertext.len() < TAG_LEN {
            return Err(CryptoError::Malformed("truncated ciphertext"));
        }
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| CryptoError::Malformed("truncated nonce"))?;
        Ok(BlobParts {
            version,
            encrypted_key,
            nonce,
            ciphertext,
        })
    }
}

struct BlobParts<'a> {
    version: u8,
    encrypted_key: &'a [u8],
    nonce: [u8; NONCE_LEN],
    /// AES-GCM output: ciphertext followed by the tag.
    ciphertext: &'a [u8],
}

impl fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedBlob({} bytes)", self.0.len())
    }
}

/// A data key: from `Sealer::data_key` for a new seal (possibly fetched while other work
/// runs), or recovered by `Sealer::open_with_key` to re-seal the same secret's successor.
/// The plaintext key is zeroized on drop.
pub struct DataKey {
    plaintext: Zeroizing<[u8; KEY_LEN]>,
    encrypted: Vec<u8>,
    binding: KeyBinding,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"[redacted]")
            .field("binding", &self.binding)
            .finish()
    }
}

impl DataKey {
    /// Builds a key from parts; KMS-free so the format can be unit-tested.
    fn from_parts(
        plaintext: &[u8],
        encrypted: Vec<u8>,
        binding: KeyBinding,
    ) -> Result<Self, CryptoError> {
        let key: [u8; KEY_LEN] = plaintext.try_into().map_err(|_| {
            CryptoError::Unavailable("KMS returned a data key of the wrong size".into())
        })?;
        if encrypted.is_empty() || encrypted.len() > u16::MAX as usize {
            return Err(CryptoError::Unavailable(
                "KMS returned an unusable encrypted data key".into(),
            ));
        }
        Ok(Self {
            plaintext: Zeroizing::new(key),
            encrypted,
            binding,
        })
    }

    pub fn purpose(&self) -> Purpose {
        self.binding.purpose
    }

    /// Seals `plaintext` for `connection_id` with a fresh random nonce. Refuses a context the
    /// key is not bound to (another user or purpose, or, for a v1 key, another connection).
    pub fn seal(&self, context: &SealContext, plaintext: &[u8]) -> Result<SealedBlob, CryptoError> {
        let version = self.binding.version();
        if context.key_binding(version) != self.binding {
            return Err(CryptoError::CannotOpen);
        }
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = context.associated_data(version);
        let cipher = Aes256Gcm::new(self.plaintext.as_ref().into());
        // AES-GCM encryption only fails for inputs beyond 64 GiB. Random 96-bit nonces keep a
        // reused key safe far beyond the few thousand seals one connection ever makes.
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts any input under 64 GiB");
        let mut blob =
            Vec::with_capacity(1 + 2 + self.encrypted.len() + NONCE_LEN + ciphertext.len());
        blob.push(version);
        blob.extend_from_slice(&(self.encrypted.len() as u16).to_be_bytes());
        blob.extend_from_slice(&self.encrypted);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        Ok(SealedBlob(blob))
    }

    /// Opens `blob` without KMS if it was sealed with this very key (the wrapped copy it
    /// carries is this key's) for `context`: a refresh seals the new tokens with the key that
    /// opened the old ones, so whoever opened them once can open their successors. `None` when
    /// the blob was sealed with another key.
    pub fn open_own(
        &self,
        context: &SealContext,
        blob: &SealedBlob,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, CryptoError> {
        let parts = blob.parts()?;
        if parts.encrypted_key != self.encrypted.as_slice()
            || context.key_binding(parts.version) != self.binding
        {
            return Ok(None);
        }
        self.open(context, &parts).map(Some)
    }

    fn open(
        &self,
        context: &SealContext,
        parts: &BlobParts<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad = context.associated_data(parts.version);
        let cipher = Aes256Gcm::new(self.plaintext.as_ref().into());
        cipher
            .decrypt(
                &Nonce::from(parts.nonce),
                Payload {
                    msg: parts.ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::CannotOpen)
    }
}

/// Seals and opens with one KMS key.
#[derive(Debug, Clone)]
pub struct Sealer {
    kms: aws_sdk_kms::Client,
    key_id: String,
}

impl Sealer {
    pub fn new(kms: aws_sdk_kms::Client, key_id: impl Into<String>) -> Self {
        Self {
            kms,
            key_id: key_id.into(),
        }
    }

    /// One `GenerateDataKey` call: a key for `user_id`'s secrets of `purpose` (any of their
    /// connections; the connection is bound when sealing).
    pub async fn data_key(&self, user_id: &str, purpose: Purpose) -> Result<DataKey, CryptoError> {
        let binding = KeyBinding {
            user_id: user_id.to_owned(),
            purpose,
            connection_id: None,
        };
        let output = self
            .kms
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(binding.encryption_context()))
            .send()
            .await
            .map_err(kms_error)?;
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .map(Blob::into_inner)
                .ok_or_else(|| CryptoError::Unavailable("KMS returned no plaintext key".into()))?,
        );
        let encrypted = output
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| CryptoError::Unavailable("KMS returned no encrypted key".into()))?;
        DataKey::from_parts(&plaintext, encrypted, binding)
    }

    /// One KMS call, then local encryption.
    pub async fn seal(
        &self,
        context: SealContext,
        plaintext: &[u8],
    ) -> Result<SealedBlob, CryptoError> {
        self.data_key(&context.user_id, context.purpose)
            .await?
            .seal(&context, plaintext)
    }

    /// One `Decrypt` call (pinned to our key, with the context), then local decryption.
    pub async fn open(
        &self,
        context: SealContext,
        blob: &SealedBlob,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        Ok(self.open_with_key(context, blob).await?.0)
    }

    /// Like `open`, and also hands back the data key, so that a successor of the secret (a
    /// refreshed token) can be sealed without another KMS call.
    pub async fn open_with_key(
        &self,
        context: SealContext,
        blob: &SealedBlob,
    ) -> Result<(Zeroizing<Vec<u8>>, DataKey), CryptoError> {
        let parts = blob.parts()?;
        let binding = context.key_binding(parts.version);
        let output = self
            .kms
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(parts.encrypted_key))
            .set_encryption_context(Some(binding.encryption_context()))
            .send()
            .await
            .map_err(|e| match &e {
                SdkError::ServiceError(service)
                    if service.err().is_invalid_ciphertext_exception() =>
                {
                    CryptoError::CannotOpen
                }
                _ => kms_error(e),
            })?;
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .map(Blob::into_inner)
                .ok_or_else(|| CryptoError::Unavailable("KMS returned no plaintext key".into()))?,
        );
        let key = DataKey::from_parts(&plaintext, parts.encrypted_key.to_vec(), binding)?;
        let opened = key.open(&context, &parts)?;
        Ok((opened, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same key material under the binding `context` gets for blob `version`.
    fn key_for(context: &SealContext, version: u8) -> DataKey {
        DataKey::from_parts(
            &[7u8; KEY_LEN],
            b"encrypted-key".to_vec(),
            context.key_binding(version),
        )
        .unwrap()
    }

    fn ctx() -> SealContext {
        SealContext::new("user-1", "conn-1", Purpose::OAuthTokens)
    }

    fn open_locally(
        key: &DataKey,
        context: &SealContext,
        blob: &SealedBlob,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        key.open(context, &blob.parts()?)
    }

    #[test]
    fn format_round_trip_and_layout() {
        let blob = key_for(&ctx(), FORMAT_V2)
            .seal(&ctx(), b"secret tokens")
            .unwrap();
        let bytes = blob.as_bytes();
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(u16::from_be_bytes([bytes[1], bytes[2]]), 13);
        assert_eq!(&bytes[3..16], b"encrypted-key");
        assert_eq!(bytes.len(), 3 + 13 + NONCE_LEN + 13 + TAG_LEN);
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
        let key = key_for(&ctx(), FORMAT_V2);
        assert_eq!(
            open_locally(&key, &ctx(), &blob).unwrap().as_slice(),
            b"secret tokens"
        );
    }

    #[test]
    fn the_kms_binding_is_user_and_purpose_and_for_v1_also_the_connection() {
        let v2 = ctx().key_binding(FORMAT_V2).encryption_context();
        assert_eq!(v2.len(), 3);
        assert_eq!(v2["user_id"], "user-1");
        assert_eq!(v2["purpose"], "oauth_tokens");
        assert_eq!(v2["service"], SERVICE);
        let v1 = ctx().key_binding(FORMAT_V1).encryption_context();
        assert_eq!(v1["connection_id"], "conn-1");
    }

    #[test]
    fn the_connection_is_bound_through_the_associated_data() {
        let blob = key_for(&ctx(), FORMAT_V2).seal(&ctx(), b"secret").unwrap();
        for other in [
            SealContext::new("user-2", "conn-1", Purpose::OAuthTokens),
            SealContext::new("user-1", "conn-2", Purpose::OAuthTokens),
            SealContext::new("user-1", "conn-1", Purpose::ApiKey),
            // Same bytes split differently must not collide.
            SealContext::new("user-1c", "onn-1", Purpose::OAuthTokens),
        ] {
            assert!(matches!(
                open_locally(&key_for(&other, FORMAT_V2), &other, &blob),
                Err(CryptoError::CannotOpen)
            ));
        }
    }

    #[test]
    fn a_key_seals_only_for_what_it_is_bound_to() {
        let key = key_for(&ctx(), FORMAT_V2);
        // Any connection of the same user and purpose (the connection goes into the AAD).
        assert!(
            key.seal(
                &SealContext::new("user-1", "conn-9", Purpose::OAuthTokens),
                b"s"
            )
            .is_ok()
        );
        for other in [
            SealContext::new("user-2", "conn-1", Purpose::OAuthTokens),
            SealContext::new("user-1", "conn-1", Purpose::ApiKey),
        ] {
            assert!(matches!(
                key.seal(&other, b"s"),
                Err(CryptoError::CannotOpen)
            ));
        }
        // A version 1 key (recovered from a v1 blob) stays with its connection and format.
        let legacy = key_for(&ctx(), FORMAT_V1);
        let blob = legacy.seal(&ctx(), b"s").unwrap();
        assert_eq!(blob.as_bytes()[0], FORMAT_V1);
        assert_eq!(
            open_locally(&legacy, &ctx(), &blob).unwrap().as_slice(),
            b"s"
        );
        let elsewhere = SealContext::new("user-1", "conn-2", Purpose::OAuthTokens);
        assert!(matches!(
            legacy.seal(&elsewhere, b"s"),
            Err(CryptoError::CannotOpen)
        ));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let blob = key_for(&ctx(), FORMAT_V2).seal(&ctx(), b"secret").unwrap();
        let header = 3 + 13;
        for i in header..blob.as_bytes().len() {
            let mut bytes = blob.as_bytes().to_vec();
            bytes[i] ^= 0x01;
            let key = key_for(&ctx(), FORMAT_V2);
            assert!(
                open_locally(&key, &ctx(), &SealedBlob::from_bytes(bytes)).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn malformed_blobs_are_refused_without_panicking() {
        for bytes in [
            vec![],
            vec![2, 0, 1, 9],
            vec![
                3, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0,
            ],
            vec![1],
            vec![1, 0, 5, 1, 2],
            vec![1, 0, 1, 9, 0, 0, 0],
            vec![
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0,
            ],
        ] {
            assert!(matches!(
                SealedBlob::from_bytes(bytes).parts(),
                Err(CryptoError::Malformed(_))
            ));
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = key_for(&ctx(), FORMAT_V2);
        let printed = format!("{key:?} {:?}", key.seal(&ctx(), b"x"));
        assert!(printed.contains("[redacted]"));
        assert!(!printed.contains("7, 7"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn blob(key: &[u8], nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Vec<u8> {
        let mut bytes = vec![FORMAT_V1];
        bytes.extend_from_slice(&(key.len() as u16).to_be_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(nonce);
        bytes.extend_from_slice(ciphertext);
        bytes
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking_and_parts_rebuild_them(
            bytes in prop::collection::vec(any::<u8>(), 0..600)
        ) {
            let sealed = SealedBlob::from_bytes(bytes.clone());
            if let Ok(parts) = sealed.parts() {
                prop_assert_eq!(blob(parts.encrypted_key, &parts.nonce, parts.ciphertext), bytes);
            }
        }

        #[test]
        fn a_well_formed_blob_parses_and_every_truncation_is_refused(
            key in prop::collection::vec(any::<u8>(), 1..300),
            nonce in any::<[u8; NONCE_LEN]>(),
            ciphertext in prop::collection::vec(any::<u8>(), TAG_LEN..200),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = blob(&key, &nonce, &ciphertext);
            let sealed = SealedBlob::from_bytes(bytes.clone());
            let parts = sealed.parts().expect("well formed");
            prop_assert_eq!(parts.encrypted_key, &key[..]);
            prop_assert_eq!(parts.nonce, nonce);
            prop_assert_eq!(parts.ciphertext, &ciphertext[..]);
            // Everything up to the tag's last byte is needed.
            let shortest = bytes.len() - (ciphertext.len() - TAG_LEN);
            let truncated = SealedBlob::from_bytes(bytes[..cut.index(shortest)].to_vec());
            prop_assert!(truncated.parts().is_err());
        }
    }
}
