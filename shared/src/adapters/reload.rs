//! A value built from a secret, read again from where the secret is kept (Secrets Manager)
//! when it stops working: the Klaviyo client credentials (`klaviyo`) and the JWT keys
//! (`auth`). Reads are rate-limited, a failed read counting as one, so neither a failing
//! Secrets Manager nor a stream of bad requests costs more than one read per interval; callers
//! that arrive during a read queue behind it and then find the value fresh. Ages are measured by
//! the wall clock as well as the monotonic one, which may not advance while Lambda freezes the
//! environment.

use crate::domain::secret::SECRET_RELOAD_INTERVAL;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
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
    last: tokio::sync::Mutex<LastRead>,
}

/// When the value was last read, by both clocks: the monotonic one may stand still while
/// Lambda freezes the environment between requests, the wall clock does not. And whether that
/// read failed: a failed read is tried again after `SECRET_RELOAD_INTERVAL`, however long the
/// caller would otherwise wait, so an outage does not keep a stale value for a whole `fresh`.
struct LastRead {
    at: Instant,
    wall: SystemTime,
    failed: bool,
}

impl LastRead {
    fn now(failed: bool) -> Self {
        Self {
            at: Instant::now(),
            wall: SystemTime::now(),
            failed,
        }
    }

    fn age(&self) -> Duration {
        let wall = SystemTime::now()
            .duration_since(self.wall)
            .unwrap_or_default();
        self.at.elapsed().max(wall)
    }

    /// Whether a read now would be within `fresh` of the last one.
    fn within(&self, fresh: Duration) -> bool {
        let fresh = match self.failed {
            true => fresh.min(SECRET_RELOAD_INTERVAL),
            false => fresh,
        };
        self.age() < fresh
    }
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
                last: tokio::sync::Mutex::new(LastRead::now(false)),
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
        let mut last = reload.last.lock().await;
        self.read_again(reload, &mut last, fresh, build).await
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
        let mut last = reload.last.lock().await;
        if !Arc::ptr_eq(&self.current(), used) {
            return Ok(true);
        }
        self.read_again(reload, &mut last, SECRET_RELOAD_INTERVAL, build)
            .await
    }

    /// The caller holds `last`'s lock.
    async fn read_again(
        &self,
        reload: &Reload<T::Value>,
        last: &mut LastRead,
        fresh: Duration,
        build: impl FnOnce(T::Value) -> T,
    ) -> Result<bool, String> {
        if last.within(fresh) {
            return Ok(false);
        }
        let read = reload.source.fetch().await;
        *last = LastRead::now(read.is_err());
        let value = read?;
        if value == *self.current().value() {
            return Ok(false);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(build(value));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A value built from a string.
    struct Built(String);

    impl Reloadable for Built {
        type Value = String;

        fn value(&self) -> &String {
            &self.0
        }
    }

    /// A source that can be made to fail.
    #[derive(Default)]
    struct Flaky {
        value: Mutex<String>,
        failing: AtomicBool,
        reads: AtomicUsize,
    }

    impl Source<String> for Flaky {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let read = match self.failing.load(Ordering::SeqCst) {
                true => Err("Secrets Manager unavailable".to_owned()),
                false => Ok(self.value.lock().unwrap().clone()),
            };
            Box::pin(async move { read })
        }
    }

    /// A failed read keeps the value held and is tried again a minute later, not a whole
    /// `fresh` later; after a good read, `fresh` applies again.
    #[tokio::test(start_paused = true)]
    async fn a_failed_read_is_tried_again_after_the_interval() {
        let source = Arc::new(Flaky::default());
        *source.value.lock().unwrap() = "one".into();
        let held = Reloading::new(Built("one".into())).with_source(source.clone());
        let fresh = Duration::from_secs(300);
        let reads = || source.reads.load(Ordering::SeqCst);

        tokio::time::advance(fresh).await;
        source.failing.store(true, Ordering::SeqCst);
        assert!(held.reload(fresh, Built).await.is_err());
        assert_eq!((reads(), held.current().0.as_str()), (1, "one"));

        source.failing.store(false, Ordering::SeqCst);
        *source.value.lock().unwrap() = "two".into();
        tokio::time::advance(SECRET_RELOAD_INTERVAL - Duration::from_secs(1)).await;
        assert_eq!(held.reload(fresh, Built).await, Ok(false));
        assert_eq!(reads(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(held.reload(fresh, Built).await, Ok(true));
        assert_eq!((reads(), held.current().0.as_str()), (2, "two"));

        tokio::time::advance(SECRET_RELOAD_INTERVAL).await;
        assert_eq!(held.reload(fresh, Built).await, Ok(false));
        assert_eq!(reads(), 2);
    }
}
