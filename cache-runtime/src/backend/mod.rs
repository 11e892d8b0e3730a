//! The stores behind the cache, side by side: [`memory`] (embedded, the default with nothing
//! configured) and [`redis`]. [`Backend`] dispatches to one of them and bounds every call with the
//! configured timeout; it is an enum rather than a trait object so the hit path makes no virtual
//! call and boxes no future.

pub(crate) mod batch;
pub(crate) mod memory;
pub(crate) mod redis;

use std::future::Future;
use std::time::Duration;

use crate::config::{BackendKind, CacheConfig};
use crate::error::BackendError;

/// A miss asking for the fill lease of a key.
#[derive(Clone, Copy)]
pub(crate) struct LeaseAsk {
    /// Ours alone; the fill must carry it.
    pub(crate) token: u64,
    /// How long the lease lives if its holder never fills.
    pub(crate) ttl: Duration,
    /// A stored value older than this generation does not count as "filled meanwhile".
    pub(crate) min_generation: u64,
}

/// What a miss finds when it asks for the fill lease.
pub(crate) enum Acquired<T> {
    /// Someone filled the entry meanwhile (at the generation asked for or later).
    Value(T),
    /// The lease is ours: compute and fill with our token.
    Granted,
    /// Another caller (maybe in another process) holds the lease: wait for its value.
    Busy,
}

// One per runtime, behind its `Arc`: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Memory(memory::MemoryBackend),
    Redis(redis::RedisBackend),
    None,
}

impl Backend {
    pub(crate) fn new(config: &CacheConfig) -> Self {
        match &config.backend {
            BackendKind::Memory => Backend::Memory(memory::MemoryBackend::new(config.memory_capacity)),
            BackendKind::Redis(target) => Backend::Redis(redis::RedisBackend::new(target.clone(), config)),
            BackendKind::None => Backend::None,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
            Backend::None => "none",
        }
    }
}

/// Runs `op` with the runtime's bound on backend calls.
pub(crate) async fn bounded<T>(
    limit: Duration,
    op: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Timeout(limit)),
    }
}

/// One method per backend operation: memory answers at once, Redis within `limit`, none is empty.
macro_rules! dispatch {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, none = $none:expr;)*) => {
        impl Backend {
            $(
                pub(crate) async fn $name(&self, limit: Duration, db: u8, $($arg: $ty),*) -> Result<$ret, BackendError> {
                    match self {
                        Backend::Memory(m) => Ok(m.$name(db, $($arg),*)),
                        Backend::Redis(r) => bounded(limit, r.$name(db, $($arg),*)).await,
                        Backend::None => Ok($none),
                    }
                }
            )*
        }
    };
}

dispatch! {
    fn set(key: &str, value: &[u8], ttl: Duration) -> (), none = ();
    fn delete(key: &str) -> bool, none = false;
    fn set_many(items: &[(String, Vec<u8>)], ttl: Duration) -> (), none = ();
    fn delete_many(keys: &[String]) -> u64, none = 0;
    fn exists(key: &str) -> bool, none = false;
    fn expire(key: &str, ttl: Duration) -> bool, none = false;
    fn ttl(key: &str) -> Option<Duration>, none = None;
    fn clear(prefix: &str) -> u64, none = 0;
}

impl Backend {
    /// Reads `key` and hands its bytes to `decode` without copying them out of the reply.
    pub(crate) async fn get_with<T>(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.get_with(db, key, decode)),
            // The hit path: the connection's own response timeout (set to the same `op_timeout`)
            // bounds it, so no second timer is armed per lookup.
            Backend::Redis(r) => match r.get_with(db, key, &decode).await {
                Err(e) if r.retry_on_timeout && e.is_timeout() => {
                    bounded(limit, r.get_with(db, key, &decode)).await
                }
                result => result,
            },
            Backend::None => Ok(None),
        }
    }

    pub(crate) async fn get_many_with<T>(
        &self,
        limit: Duration,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.get_many_with(db, keys, decode)),
            Backend::Redis(r) => bounded(limit, r.get_many_with(db, keys, decode)).await,
            Backend::None => Ok(keys.iter().map(|_| None).collect()),
        }
    }

    /// Hands a write to the write-behind batcher (Redis, batching on, queue not full), or back.
    pub(crate) fn offer(&self, db: u8, write: batch::Write) -> Result<(), batch::Write> {
        match self {
            Backend::Redis(r) => r.batcher.offer(db, write, || r.conn(db).ok()),
            Backend::Memory(_) | Backend::None => Err(write),
        }
    }

    /// Waits until every write accepted so far has been answered.
    pub(crate) async fn flush(&self) {
        if let Backend::Redis(r) = self {
            r.batcher.flush().await;
        }
    }

    /// Flushes and stops accepting writes for the background.
    pub(crate) async fn shutdown(&self) {
        if let Backend::Redis(r) = self {
            r.batcher.shutdown().await;
        }
    }

    /// Writes accepted for the background and not yet answered.
    pub(crate) fn queued(&self) -> usize {
        match self {
            Backend::Redis(r) => r.batcher.queued(),
            Backend::Memory(_) | Backend::None => 0,
        }
    }

    /// Reads the entry, and (on Redis) the function's generation in the same round trip. The
    /// embedded backend keeps generations in the runtime, so it returns `None` for it.
    pub(crate) async fn get_with_generation<T>(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        generation_key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        match self {
            Backend::Redis(r) => bounded(limit, r.get_with_generation(db, key, generation_key, decode))
                .await
                .map(|(v, g)| (v, Some(g))),
            _ => Ok((self.get_with(limit, db, key, decode).await?, None)),
        }
    }

    pub(crate) async fn acquire<T>(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.acquire(db, key, ask, decode)),
            Backend::Redis(r) => bounded(limit, r.acquire(db, key, ask, decode)).await,
            Backend::None => Ok(Acquired::Granted),
        }
    }

    pub(crate) async fn fill(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        token: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.fill(db, key, token, value, ttl)),
            Backend::Redis(r) => bounded(limit, r.fill(db, key, token, value, ttl)).await,
            Backend::None => Ok(false),
        }
    }

    pub(crate) async fn release(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        token: u64,
    ) -> Result<(), BackendError> {
        match self {
            Backend::Memory(m) => {
                m.release(db, key, token);
                Ok(())
            }
            Backend::Redis(r) => bounded(limit, r.release(db, key, token)).await,
            Backend::None => Ok(()),
        }
    }

    pub(crate) async fn invalidate(&self, limit: Duration, db: u8, key: &str) -> Result<(), BackendError> {
        match self {
            Backend::Memory(m) => {
                m.invalidate(db, key);
                Ok(())
            }
            Backend::Redis(r) => bounded(limit, r.invalidate(db, key)).await,
            Backend::None => Ok(()),
        }
    }

    /// Raises a function's generation on Redis and returns it; the embedded backend's generations
    /// live in the runtime (`None`).
    pub(crate) async fn bump_generation(
        &self,
        limit: Duration,
        db: u8,
        generation_key: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, BackendError> {
        match self {
            Backend::Redis(r) => bounded(limit, r.bump_generation(db, generation_key, ttl)).await.map(Some),
            Backend::Memory(_) | Backend::None => Ok(None),
        }
    }

    pub(crate) async fn ping(&self, limit: Duration, db: u8) -> Result<(), BackendError> {
        match self {
            Backend::Redis(r) => bounded(limit, r.ping(db)).await,
            Backend::Memory(_) | Backend::None => Ok(()),
        }
    }
}
