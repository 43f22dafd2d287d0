//! Sealing and opening the domain's credentials: the JSON a sealed blob holds, and the calls
//! that seal it with a data key or open it through KMS.

use super::{CryptoError, DataKey, Purpose, SealContext, SealedBlob, Sealer};
use crate::domain::model::{Connection, Credentials, PendingRevocation};
use crate::domain::secret::Secret;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Serialize)]
#[serde(untagged)]
enum PlainOut<'a> {
    OAuth {
        access_token: &'a str,
        refresh_token: &'a str,
    },
    ApiKey {
        api_key: &'a str,
    },
}

#[derive(Deserialize)]
struct OAuthIn {
    access_token: Secret,
    refresh_token: Secret,
}

#[derive(Deserialize)]
struct ApiKeyIn {
    api_key: Secret,
}

impl Credentials {
    /// Seals for `connection_id` of `user_id` with a data key for that user and this purpose.
    pub fn seal(
        &self,
        key: &DataKey,
        user_id: &str,
        connection_id: &str,
    ) -> Result<SealedBlob, CryptoError> {
        let context = SealContext::new(user_id, connection_id, self.purpose());
        let plain = match self {
            Self::OAuth {
                access_token,
                refresh_token,
            } => PlainOut::OAuth {
                access_token: access_token.expose(),
                refresh_token: refresh_token.expose(),
            },
            Self::ApiKey(key) => PlainOut::ApiKey {
                api_key: key.expose(),
            },
        };
        let bytes = Zeroizing::new(
            serde_json::to_vec(&plain).map_err(|_| CryptoError::Malformed("credentials"))?,
        );
        key.seal(&context, &bytes)
    }

    /// Opens a connection's credentials (one KMS call).
    pub async fn open(sealer: &Sealer, connection: &Connection) -> Result<Self, CryptoError> {
        let context = connection.seal_context(connection.credentials_purpose());
        Self::open_sealed(sealer, context, &connection.credentials).await
    }

    /// Opens a connection's credentials with a data key at hand, without KMS, if they were
    /// sealed with it (`DataKey::open_own`); `None` if they were not.
    pub fn open_with_known_key(
        key: &DataKey,
        connection: &Connection,
    ) -> Result<Option<Self>, CryptoError> {
        let purpose = connection.credentials_purpose();
        match key.open_own(&connection.seal_context(purpose), &connection.credentials)? {
            Some(bytes) => Self::parse(purpose, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Opens a connection's credentials and keeps the data key, so their successors (a
    /// refresh) are sealed without a second KMS call.
    pub async fn open_with_key(
        sealer: &Sealer,
        connection: &Connection,
    ) -> Result<(Self, DataKey), CryptoError> {
        let purpose = connection.credentials_purpose();
        let context = connection.seal_context(purpose);
        let (bytes, key) = sealer
            .open_with_key(context, &connection.credentials)
            .await?;
        Ok((Self::parse(purpose, &bytes)?, key))
    }

    /// Opens credentials sealed under `context` (one KMS call).
    pub async fn open_sealed(
        sealer: &Sealer,
        context: SealContext,
        blob: &SealedBlob,
    ) -> Result<Self, CryptoError> {
        let purpose = context.purpose;
        let bytes = sealer.open(context, blob).await?;
        Self::parse(purpose, &bytes)
    }

    fn parse(purpose: Purpose, bytes: &[u8]) -> Result<Self, CryptoError> {
        match purpose {
            Purpose::ApiKey => {
                serde_json::from_slice::<ApiKeyIn>(bytes).map(|p| Self::ApiKey(p.api_key))
            }
            Purpose::OAuthTokens => serde_json::from_slice::<OAuthIn>(bytes).map(|p| Self::OAuth {
                access_token: p.access_token,
                refresh_token: p.refresh_token,
            }),
        }
        .map_err(|_| CryptoError::Malformed("sealed credentials are not of the expected shape"))
    }
}

impl PendingRevocation {
    pub async fn open(&self, sealer: &Sealer) -> Result<Credentials, CryptoError> {
        let context = SealContext::new(
            self.user_id.as_str(),
            &self.connection_id,
            Purpose::OAuthTokens,
        );
        Credentials::open_sealed(sealer, context, &self.credentials).await
    }
}
