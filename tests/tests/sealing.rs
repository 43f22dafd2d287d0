//! KMS envelope sealing against the local KMS, through the real SDK.

use e2e::{environment, unique};
use shared::crypto::CryptoError;
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
    assert_eq!(blob.as_bytes()[0], 1, "format version 1");
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
    let mut future_version = bytes.to_vec();
    future_version[0] = 2;
    assert!(matches!(
        sealer
            .open(ctx, &SealedBlob::from_bytes(future_version))
            .await,
        Err(CryptoError::Malformed(_))
    ));
}
