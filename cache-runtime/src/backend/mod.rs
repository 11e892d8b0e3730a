//! The stores behind the cache, side by side, each in its own folder or file: [`memory`]
//! (embedded, the default with nothing configured) and [`redis`] (with its scripts and batcher).
//! [`Backend`] dispatches to one of them; every Redis call goes through the circuit breaker
//! ([`breaker`]) and is bounded by the configured timeout. It is an enum rather than a trait
//! object so the hit path makes no virtual call and boxes no future. Choosing a store is the one
//! `match` in [`Backend::new`].

pub(crate) mod breaker;
pub(crate) mod memory;
pub(crate) mod redis;

pub(crate) use self::redis::batch;

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
    /// The lease is ours, granted while the key's invalidation stamp was this (0: none): compute,
    /// renew while computing, and fill with our token and this stamp.
    Granted(u64),
    /// Another caller (maybe in another process) holds the lease: wait for its value.
    Busy,
}

/// What a lease-checked fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillOutcome {
    /// Written (under our lease, or after it aged out with no invalidation since it was granted).
    Written,
    /// Refused: an invalidation of the key came after the lease was granted. The value may be
    /// older than a write that has been acknowledged: it must not be served.
    Revoked,
    /// Not written: our lease aged out and another caller holds the key's lease now (it fills).
    /// No invalidation came since ours was granted, so the value itself is not stale.
    Superseded,
}

impl FillOutcome {
    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 | 2 => FillOutcome::Written,
            3 => FillOutcome::Superseded,
            _ => FillOutcome::Revoked,
        }
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Ours for another `lease_ttl`.
    Renewed,
    /// An invalidation revoked it: the value being computed must not be filled.
    Revoked,
    /// It aged out (and may be held by another caller now); not revoked. Renewal stops; the fill
    /// decides whether the value is still written.
    Lost,
}

/// A number no other caller will draw: a per-process random start, then a counter (lease tokens
/// and invalidation stamps). Never 0, which means "no stamp".
pub(crate) fn unique() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Relaxed));
    h.finish().max(1)
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
            BackendKind::Memory => Backend::Memory(memory::MemoryBackend::new(config)),
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

/// How long an invalidation stamp lives: fills whose lease aged out before the invalidation came
/// are refused for this long after it (their holders, renewing every third of `lease_ttl`, learn
/// of the revocation well before).
pub(crate) fn stamp_life(lease_ttl: Duration) -> Duration {
    lease_ttl.saturating_mul(4).max(Duration::from_secs(1))
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
                        Backend::Redis(r) => r.guarded(limit, r.$name(db, $($arg),*)).await,
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
            Backend::Redis(r) => match r.guarded(limit, r.get_with(db, key, &decode)).await {
                Err(e) if r.retry_on_timeout && e.is_timeout() => {
                    r.guarded(limit, r.get_with(db, key, &decode)).await
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
            Backend::Redis(r) => r.guarded(limit, r.get_many_with(db, keys, decode)).await,
            Backend::None => Ok(keys.iter().map(|_| None).collect()),
        }
    }

    /// Hands a handle's write (`set_behind`) to the batcher, with a ticket that a later `set` or
    /// `delete` of the key cancels or waits for; or back.
    pub(crate) fn offer_handle_write(&self, db: u8, write: batch::Write) -> Result<(), batch::Write> {
        match self {
            Backend::Redis(r) => r.batcher.offer_handle_write(db, write, || r.conn(db).ok()),
            Backend::Memory(_) | Backend::None => Err(write),
        }
    }

    /// Hands a write to the write-behind batcher (Redis, batching on, queue not full), or back.
    pub(crate) fn offer(&self, db: u8, write: batch::Write) -> Result<(), batch::Write> {
        match self {
            Backend::Redis(r) => r.batcher.offer(db, write, || r.conn(db).ok()),
            Backend::Memory(_) | Backend::None => Err(write),
        }
    }

    /// Waits until every write accepted so far has been answered, or `limit` has passed; how
    /// many writes were still unanswered then.
    pub(crate) async fn flush(&self, limit: Duration) -> usize {
        match self {
            Backend::Redis(r) => r.batcher.flush(limit).await,
            Backend::Memory(_) | Backend::None => 0,
        }
    }

    /// Flushes (within `limit`) and stops accepting writes for the background.
    pub(crate) async fn shutdown(&self, limit: Duration) -> usize {
        match self {
            Backend::Redis(r) => r.batcher.shutdown(limit).await,
            Backend::Memory(_) | Backend::None => 0,
        }
    }

    /// Cancels the queued handle writes of `key` and waits (within `limit`) for one already
    /// sent, so that a later write or delete of `key` lands after it.
    pub(crate) async fn supersede(&self, limit: Duration, db: u8, key: &str) {
        if let Backend::Redis(r) = self {
            r.batcher.supersede(limit, db, key).await;
        }
    }

    /// Whether the circuit breaker is open (Redis only).
    pub(crate) fn breaker_open(&self) -> bool {
        matches!(self, Backend::Redis(r) if r.breaker.is_open())
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
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        match self {
            Backend::Redis(r) => r
                .guarded(limit, r.get_with_generation(db, key, generation_key, generation_life, decode))
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
            Backend::Redis(r) => r.guarded(limit, r.acquire(db, key, ask, decode)).await,
            // Never asked: a runtime without a backend runs functions before any lookup.
            Backend::None => Err(BackendError::Bypassed),
        }
    }

    /// Extends a held lease by `lease` (see [`Renewal`]).
    pub(crate) async fn renew(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.renew(db, key, token, grant, lease)),
            Backend::Redis(r) => r.guarded(limit, r.renew(db, key, token, grant, lease)).await,
            Backend::None => Ok(Renewal::Lost),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fill(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError> {
        match self {
            Backend::Memory(m) => Ok(m.fill(db, key, token, grant, value, ttl)),
            Backend::Redis(r) => r.guarded(limit, r.fill(db, key, token, grant, value, ttl)).await,
            Backend::None => Ok(FillOutcome::Superseded),
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
            // Not through the breaker: giving a lease back is worth a try even while it is open.
            Backend::Redis(r) => bounded(limit, r.release(db, key, token)).await,
            Backend::None => Ok(()),
        }
    }

    /// Drops `key`, revokes its lease, and remembers for `stamp_life` that it was invalidated
    /// (so a fill whose lease aged out before is still refused).
    pub(crate) async fn invalidate(
        &self,
        limit: Duration,
        db: u8,
        key: &str,
        stamp_life: Duration,
    ) -> Result<(), BackendError> {
        match self {
            Backend::Memory(m) => {
                m.invalidate(db, key);
                Ok(())
            }
            Backend::Redis(r) => r.guarded(limit, r.invalidate(db, key, stamp_life)).await,
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
            Backend::Redis(r) => r.guarded(limit, r.bump_generation(db, generation_key, ttl)).await.map(Some),
            Backend::Memory(_) | Backend::None => Ok(None),
        }
    }

    pub(crate) async fn ping(&self, limit: Duration, db: u8) -> Result<(), BackendError> {
        match self {
            Backend::Redis(r) => r.guarded(limit, r.ping(db)).await,
            Backend::Memory(_) | Backend::None => Ok(()),
        }
    }
}
