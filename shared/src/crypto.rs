//! Sealing of credentials before they touch DynamoDB: KMS envelope encryption.
//!
//! Each seal asks KMS for a fresh AES-256 data key (one `GenerateDataKey`), encrypts with
//! AES-256-GCM locally and stores the KMS-encrypted data key beside the ciphertext. Each
//! open is one `Decrypt` plus local AES-GCM. The KMS encryption context and the AEAD
//! associated data both carry user id, connection id and purpose, so a sealed blob copied
//! to another row (or used for another purpose) does not open.
//!
//! Blob format, version 1 (all integers big-endian):
//! `0x01 | u16 len | encrypted data key | 12-byte nonce | AES-GCM ciphertext and 16-byte tag`.

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

    fn encryption_context(&self) -> HashMap<String, String> {
        HashMap::from([
            ("service".to_owned(), SERVICE.to_owned()),
            ("user_id".to_owned(), self.user_id.clone()),
            ("connection_id".to_owned(), self.connection_id.clone()),
            ("purpose".to_owned(), self.purpose.as_str().to_owned()),
        ])
    }

    /// Length-prefixed so that no two different contexts encode alike.
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = vec![FORMAT_V1];
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

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// KMS could not be reached or refused for a reason that may pass; retry later.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
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
        if version != FORMAT_V1 {
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
            encrypted_key,
            nonce,
            ciphertext,
        })
    }
}

struct BlobParts<'a> {
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

/// A fresh data key bound to one context. Obtain it with `Sealer::data_key` (possibly
/// concurrently with other work), then seal locally. The plaintext key is zeroized on drop.
pub struct DataKey {
    plaintext: Zeroizing<[u8; KEY_LEN]>,
    encrypted: Vec<u8>,
    context: SealContext,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"[redacted]")
            .field("context", &self.context)
            .finish()
    }
}

impl DataKey {
    /// Builds a key from parts; KMS-free so the format can be unit-tested.
    fn from_parts(
        plaintext: &[u8],
        encrypted: Vec<u8>,
        context: SealContext,
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
            context,
        })
    }

    pub fn context(&self) -> &SealContext {
        &self.context
    }

    pub fn seal(&self, plaintext: &[u8]) -> SealedBlob {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = self.context.associated_data();
        let cipher = Aes256Gcm::new(self.plaintext.as_ref().into());
        // AES-GCM encryption only fails for inputs beyond 64 GiB.
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
        blob.push(FORMAT_V1);
        blob.extend_from_slice(&(self.encrypted.len() as u16).to_be_bytes());
        blob.extend_from_slice(&self.encrypted);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        SealedBlob(blob)
    }

    fn open(
        &self,
        nonce: [u8; NONCE_LEN],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad = self.context.associated_data();
        let cipher = Aes256Gcm::new(self.plaintext.as_ref().into());
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
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

    /// One `GenerateDataKey` call.
    pub async fn data_key(&self, context: SealContext) -> Result<DataKey, CryptoError> {
        let output = self
            .kms
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.encryption_context()))
            .send()
            .await
            .map_err(|e| CryptoError::Unavailable(DisplayErrorContext(&e).to_string()))?;
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
        DataKey::from_parts(&plaintext, encrypted, context)
    }

    /// One KMS call, then local encryption.
    pub async fn seal(
        &self,
        context: SealContext,
        plaintext: &[u8],
    ) -> Result<SealedBlob, CryptoError> {
        Ok(self.data_key(context).await?.seal(plaintext))
    }

    /// One `Decrypt` call (pinned to our key, with the context), then local decryption.
    pub async fn open(
        &self,
        context: SealContext,
        blob: &SealedBlob,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let BlobParts {
            encrypted_key,
            nonce,
            ciphertext,
        } = blob.parts()?;
        let output = self
            .kms
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(encrypted_key))
            .set_encryption_context(Some(context.encryption_context()))
            .send()
            .await
            .map_err(|e| match &e {
                SdkError::ServiceError(service)
                    if service.err().is_invalid_ciphertext_exception()
                        || service.err().is_incorrect_key_exception() =>
                {
                    CryptoError::CannotOpen
                }
                _ => CryptoError::Unavailable(DisplayErrorContext(&e).to_string()),
            })?;
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .map(Blob::into_inner)
                .ok_or_else(|| CryptoError::Unavailable("KMS returned no plaintext key".into()))?,
        );
        DataKey::from_parts(&plaintext, encrypted_key.to_vec(), context)?.open(nonce, ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(context: SealContext) -> DataKey {
        DataKey::from_parts(&[7u8; KEY_LEN], b"encrypted-key".to_vec(), context).unwrap()
    }

    fn ctx() -> SealContext {
        SealContext::new("user-1", "conn-1", Purpose::OAuthTokens)
    }

    fn open_locally(key: &DataKey, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parts = blob.parts()?;
        key.open(parts.nonce, parts.ciphertext)
    }

    #[test]
    fn format_round_trip_and_layout() {
        let blob = key(ctx()).seal(b"secret tokens");
        let bytes = blob.as_bytes();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(u16::from_be_bytes([bytes[1], bytes[2]]), 13);
        assert_eq!(&bytes[3..16], b"encrypted-key");
        assert_eq!(bytes.len(), 3 + 13 + NONCE_LEN + 13 + TAG_LEN);
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            open_locally(&key(ctx()), &blob).unwrap().as_slice(),
            b"secret tokens"
        );
    }

    #[test]
    fn context_is_bound_through_the_associated_data() {
        let blob = key(ctx()).seal(b"secret");
        for other in [
            SealContext::new("user-2", "conn-1", Purpose::OAuthTokens),
            SealContext::new("user-1", "conn-2", Purpose::OAuthTokens),
            SealContext::new("user-1", "conn-1", Purpose::ApiKey),
            // Same bytes split differently must not collide.
            SealContext::new("user-1c", "onn-1", Purpose::OAuthTokens),
        ] {
            assert!(matches!(
                open_locally(&key(other), &blob),
                Err(CryptoError::CannotOpen)
            ));
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let blob = key(ctx()).seal(b"secret");
        let header = 3 + 13;
        for i in header..blob.as_bytes().len() {
            let mut bytes = blob.as_bytes().to_vec();
            bytes[i] ^= 0x01;
            assert!(
                open_locally(&key(ctx()), &SealedBlob::from_bytes(bytes)).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn malformed_blobs_are_refused_without_panicking() {
        for bytes in [
            vec![],
            vec![2, 0, 1, 9],
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
        let key = key(ctx());
        let printed = format!("{key:?} {:?}", key.seal(b"x"));
        assert!(printed.contains("[redacted]"));
        assert!(!printed.contains("7, 7"));
    }
}
