//! A value built from a secret, read again from where the secret is kept (Secrets Manager)
//! when it stops working: the Klaviyo client credentials (`klaviyo`) and the JWT keys
//! (`auth`). Reads are rate-limited, a failed read counting as one, so neither a failing
//! Secrets Manager nor a stream of bad requests costs more than one read per interval; callers
//! that arrive during a read queue behind it and then find the value fresh.

use crate::domain::secret::SECRET_RELOAD_INTERVAL;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Where a secret is kept.
pub trait Source<V>: Send + Sync {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<V, String>> + Send + '_>>;
}

/// What is held: built from a secret's value, and keeping that value so a new one is told
/// from it.
pub trait Reloadable: Send + Sync {
    type Value: PartialEq + Send;
    fn value(&self) -> &Self::Value;
}

struct Reload<V> {
    source: Arc<dyn Source<V>>,
    /// Held while reading, so concurrent callers cause one read.
    loaded_at: tokio::sync::Mutex<Instant>,
}

pub struct Reloading<T: Reloadable> {
    current: RwLock<Arc<T>>,
    reload: Option<Reload<T::Value>>,
}

impl<T: Reloadable> Reloading<T> {
    pub fn new(initial: T) -> Self {
        Self::held(Arc::new(initial))
    }

    fn held(current: Arc<T>) -> Self {
        Self {
            current: RwLock::new(current),
            reload: None,
        }
    }

    /// The same value, read again from `source` when asked; the value held counts as just
    /// read.
    pub fn with_source(&self, source: Arc<dyn Source<T::Value>>) -> Self {
        Self {
            reload: Some(Reload {
                source,
                loaded_at: tokio::sync::Mutex::new(Instant::now()),
            }),
            ..Self::held(self.current())
        }
    }

    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the value again unless it was read within `fresh`, and holds `build(value)` if
    /// the value is new (`build` is called only then). `Ok(true)` when it was new.
    pub async fn reload(
        &self,
        fresh: Duration,
        build: impl FnOnce(T::Value) -> T,
    ) -> Result<bool, String> {
        let Some(reload) = &self.reload else {
            return Ok(false);
        };
        let mut loaded_at = reload.loaded_at.lock().await;
        self.read_again(reload, &mut loaded_at, fresh, build).await
    }

    /// Whether something other than `used` is held now: another caller installed a new value
    /// while this one waited, or a read made now (if the last one is older than
    /// `SECRET_RELOAD_INTERVAL`) finds a new value, held as `build(value)`.
    pub async fn reloaded_since(
        &self,
        used: &Arc<T>,
        build: impl FnOnce(T::Value) -> T,
    ) -> Result<bool, String> {
        let Some(reload) = &self.reload else {
            return Ok(false);
        };
        let mut loaded_at = reload.loaded_at.lock().await;
        if !Arc::ptr_eq(&self.current(), used) {
            return Ok(true);
        }
        self.read_again(reload, &mut loaded_at, SECRET_RELOAD_INTERVAL, build)
            .await
    }

    /// The caller holds `loaded_at`'s lock.
    async fn read_again(
        &self,
        reload: &Reload<T::Value>,
        loaded_at: &mut Instant,
        fresh: Duration,
        build: impl FnOnce(T::Value) -> T,
    ) -> Result<bool, String> {
        if loaded_at.elapsed() < fresh {
            return Ok(false);
        }
        *loaded_at = Instant::now();
        let value = reload.source.fetch().await?;
        if value == *self.current().value() {
            return Ok(false);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(build(value));
        Ok(true)
    }
}
