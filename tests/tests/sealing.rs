//! KMS envelope sealing against the local KMS, through the real SDK.

use e2e::{environment, unique};
use shared::adapters::crypto::CryptoError;
use shared::{Purpose, SealContext, SealedBlob};

fn context(user: &str, connection: &str, purpose: Purpose) -> SealContext {
    SealContext::new(user, connection, purpose)
}

#[tokio::test]
async fn seal_and_open_round_trip() {
    let sealer = environment().await.sealer();
    let (user, conn) = (unique("user"), unique("conn"));
    let secret = b"{\"access_token\":\"at-fake-123\",\"refresh_token\":\"rt-fake-456\"}";
    let blob = sealer
        .seal(context(&user, &conn, Purpose::OAuthTokens), secret)
        .await
        .unwrap();
    assert_eq!(blob.as_bytes()[0], 2, "format version 2");
    assert!(
        !blob.as_bytes().windows(11).any(|w| w == b"at-fake-123"),
        "plaintext must not appear"
    );
    let opened = sealer
        .open(context(&user, &conn, Purpose::OAuthTokens), &blob)
        .await
        .unwrap();
    assert_eq!(opened.as_slice(), secret);
}

#[tokio::test]
async fn sealing_twice_gives_different_ciphertexts() {
    let sealer = environment().await.sealer();
    let ctx = context("u", "c", Purpose::ApiKey);
    let a = sealer.seal(ctx.clone(), b"pk_fake").await.unwrap();
    let b = sealer.seal(ctx, b"pk_fake").await.unwrap();
    assert_ne!(a, b, "fresh data key and nonce per seal");
}

#[tokio::test]
async fn a_blob_does_not_open_for_another_user_connection_or_purpose() {
    let sealer = environment().await.sealer();
    let (user, conn) = (unique("user"), unique("conn"));
    let blob = sealer
        .seal(context(&user, &conn, Purpose::OAuthTokens), b"tokens")
        .await
        .unwrap();
    for other in [
        context("someone-else", &conn, Purpose::OAuthTokens),
        context(&user, "another-connection", Purpose::OAuthTokens),
        context(&user, &conn, Purpose::ApiKey),
    ] {
        let result = sealer.open(other.clone(), &blob).await;
        assert!(
            matches!(result, Err(CryptoError::CannotOpen)),
            "{other:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_anywhere_is_refused() {
    let sealer = environment().await.sealer();
    let ctx = context(&unique("user"), &unique("conn"), Purpose::ApiKey);
    let blob = sealer.seal(ctx.clone(), b"pk_fake_key").await.unwrap();
    let bytes = blob.as_bytes();
    let key_len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
    // In the encrypted data key, in the nonce, in the ciphertext and in the tag.
    for index in [
        3 + key_len / 2,
        3 + key_len + 1,
        bytes.len() - 20,
        bytes.len() - 1,
    ] {
        let mut tampered = bytes.to_vec();
        tampered[index] ^= 0x40;
        let result = sealer
            .open(ctx.clone(), &SealedBlob::from_bytes(tampered))
            .await;
        assert!(
            matches!(result, Err(CryptoError::CannotOpen)),
            "byte {index}: {result:?}"
        );
    }
    let truncated = SealedBlob::from_bytes(bytes[..bytes.len() / 2].to_vec());
    assert!(sealer.open(ctx.clone(), &truncated).await.is_err());
    // Relabelled as version 1, KMS is asked with the connection in the context: refused.
    let mut relabelled = bytes.to_vec();
    relabelled[0] = 1;
    assert!(matches!(
        sealer
            .open(ctx.clone(), &SealedBlob::from_bytes(relabelled))
            .await,
        Err(CryptoError::CannotOpen)
    ));
    let mut future_version = bytes.to_vec();
    future_version[0] = 3;
    assert!(matches!(
        sealer
            .open(ctx, &SealedBlob::from_bytes(future_version))
            .await,
        Err(CryptoError::Malformed(_))
    ));
}

/// Blobs written before format 2 (connection id also in the KMS context) still open, and a
/// refresh re-seals them as version 1 with the key it recovered.
#[tokio::test]
async fn a_version_1_blob_still_opens_and_reseals_as_version_1() {
    use aes_gcm::aead::{Aead, Payload};
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let (user, conn) = (unique("user"), unique("conn"));
    let sdk = shared::context::aws_sdk_config().await;
    let kms = aws_sdk_kms::Client::new(&sdk);
    let key = kms
        .generate_data_key()
        .key_id(e2e::setting("KMS_KEY_ID"))
        .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
        .encryption_context("service", "klaviyo-connect")
        .encryption_context("user_id", &user)
        .encryption_context("connection_id", &conn)
        .encryption_context("purpose", "api_key")
        .send()
        .await
        .unwrap();
    let mut aad = vec![1u8];
    for part in ["klaviyo-connect", user.as_str(), conn.as_str(), "api_key"] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    let nonce = [9u8; 12];
    let cipher = Aes256Gcm::new_from_slice(key.plaintext().unwrap().as_ref()).unwrap();
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: b"pk_legacy",
                aad: &aad,
            },
        )
        .unwrap();
    let encrypted = key.ciphertext_blob().unwrap().as_ref().to_vec();
    let mut blob = vec![1u8];
    blob.extend_from_slice(&(encrypted.len() as u16).to_be_bytes());
    blob.extend_from_slice(&encrypted);
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&ciphertext);

    let sealer = environment().await.sealer();
    let ctx = context(&user, &conn, Purpose::ApiKey);
    let (opened, recovered) = sealer
        .open_with_key(ctx.clone(), &SealedBlob::from_bytes(blob))
        .await
        .unwrap();
    assert_eq!(opened.as_slice(), b"pk_legacy");
    let resealed = recovered.seal(&ctx, b"pk_successor").unwrap();
    assert_eq!(resealed.as_bytes()[0], 1, "stays version 1");
    assert_eq!(
        sealer.open(ctx, &resealed).await.unwrap().as_slice(),
        b"pk_successor"
    );
    let elsewhere = context(&user, &unique("conn"), Purpose::ApiKey);
    assert!(
        recovered.seal(&elsewhere, b"x").is_err(),
        "a v1 key stays with its connection"
    );
}
