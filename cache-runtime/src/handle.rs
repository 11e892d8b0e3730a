//! [`Cache`]: a typed handle for direct use, the equivalent of the teams' `BaseRedisCache[T]`.

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::protocol::FillOutcome;
use crate::backend::Store;
use crate::db::CacheDb;
use crate::error::CacheError;
use crate::runtime::Runtime;

/// Why a prefix breaks the naming rule, or `None` when it follows it (the rule `#[cached]`
/// applies at compile time, from the same function).
pub use cache_rules::prefix_problem;

/// Values of type `T` under `{prefix}:{key}` in DB `D`, each written with a TTL.
///
/// Same behaviour on every backend. It uses the runtime current where each call is made
/// ([`Runtime::current`]) unless [`Cache::with_runtime`] names one.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use cache_runtime::{db::MarketData, Cache, CacheConfig, Runtime};
///
/// let runtime = Runtime::new(CacheConfig::memory());
/// let prices = Cache::<MarketData, f64>::new("price", Duration::from_secs(60))?.with_runtime(runtime);
/// prices.set("AAPL", &150.25).await?;
/// assert_eq!(prices.get("AAPL").await?, Some(150.25));
/// assert!(prices.ttl("AAPL").await?.unwrap() <= Duration::from_secs(60));
/// # Ok::<(), cache_runtime::CacheError>(())
/// # }).unwrap();
/// ```
pub struct Cache<D: CacheDb, T> {
    prefix: String,
    default_ttl: Duration,
    runtime: Option<Runtime>,
    _types: PhantomData<fn() -> (D, T)>,
}

impl<D: CacheDb, T> Clone for Cache<D, T> {
    fn clone(&self) -> Self {
        Cache {
            prefix: self.prefix.clone(),
            default_ttl: self.default_ttl,
            runtime: self.runtime.clone(),
            _types: PhantomData,
        }
    }
}

impl<D: CacheDb, T> std::fmt::Debug for Cache<D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("db", &D::NAME)
            .field("prefix", &self.prefix)
            .field("default_ttl", &self.default_ttl)
            .finish()
    }
}

impl<D: CacheDb, T: Serialize + DeserializeOwned> Cache<D, T> {
    const DB: u8 = D::CHECKED_INDEX;

    /// A handle over `{prefix}:*` in DB `D`. The prefix follows the naming rule
    /// ([`prefix_problem`]) and the default TTL is more than zero: every entry expires.
    pub fn new(prefix: &str, default_ttl: Duration) -> Result<Self, CacheError> {
        // Evaluated at compile time for each `D`: a handle on DB 15 does not compile.
        const { assert!(Self::DB < crate::db::RESERVED_DB) };
        if let Some(problem) = prefix_problem(prefix) {
            return Err(CacheError::InvalidKey(format!("prefix `{prefix}`: {problem}")));
        }
        check_ttl(default_ttl)?;
        crate::registry::record_handle_prefix(D::INDEX, prefix); // `D::INDEX`: checked above
        Ok(Cache { prefix: prefix.to_owned(), default_ttl, runtime: None, _types: PhantomData })
    }

    /// Serves this handle from `runtime` instead of the current one.
    pub fn with_runtime(mut self, runtime: Runtime) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// The full key of `key`: `{prefix}:{key}`.
    pub fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }

    fn runtime(&self) -> Runtime {
        self.runtime.clone().unwrap_or_else(Runtime::current)
    }

    /// This handle's counters (its prefix's, under no function) in `rt`.
    fn counters(&self, rt: &crate::runtime::Inner) -> std::sync::Arc<crate::stats::Counters> {
        rt.stats.counters(Self::DB, &self.prefix, "")
    }

    /// The value under `key`, or `None`. A value that does not decode as `T` is an error.
    pub async fn get(&self, key: &str) -> Result<Option<T>, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let counters = self.counters(rt);
        let found = rt
            .backend
            .get_with(Self::DB, &self.key(key), |b| serde_json::from_slice::<T>(b))
            .await
            .inspect_err(|error| counters.failed(error))?;
        match found {
            Some(Ok(value)) => {
                counters.hit();
                Ok(Some(value))
            }
            Some(Err(e)) => {
                counters.decode_failure();
                counters.miss();
                Err(CacheError::Decode(e))
            }
            None => {
                counters.miss();
                Ok(None)
            }
        }
    }

    /// Stores `value` under `key` with the default TTL.
    pub async fn set(&self, key: &str, value: &T) -> Result<(), CacheError> {
        self.set_with_ttl(key, value, self.default_ttl).await
    }

    /// Stores `value` under `key` for `ttl` (more than zero, at most 365 days: otherwise
    /// [`CacheError::InvalidTtl`]). It lands after any earlier [`Cache::set_behind`] of `key`.
    pub async fn set_with_ttl(&self, key: &str, value: &T, ttl: Duration) -> Result<(), CacheError> {
        check_ttl(ttl)?;
        let bytes = serde_json::to_vec(value).map_err(CacheError::Encode)?;
        let runtime = self.runtime();
        let rt = runtime.inner();
        let counters = self.counters(rt);
        let key = self.key(key);
        rt.backend.supersede(rt.op_timeout, Self::DB, &key).await;
        let written = rt.backend.set(Self::DB, &key, &bytes, ttl).await;
        // A key of a `#[cached]` function written by hand: this process's near copy goes now.
        rt.near.forget(&key);
        written.inspect_err(|error| counters.failed(error))?;
        counters.fill();
        Ok(())
    }

    /// The values under `keys`, in order, in one round trip (`MGET`). A value that does not decode
    /// as `T` reads as `None` and is counted as a decode failure (one bad entry does not fail the
    /// batch).
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<T>>, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let counters = self.counters(rt);
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let found = rt
            .backend
            .get_many_with(Self::DB, &full, |b| serde_json::from_slice::<T>(b))
            .await
            .inspect_err(|error| counters.failed(error))?;
        Ok(found
            .into_iter()
            .map(|v| match v {
                Some(Ok(value)) => {
                    counters.hit();
                    Some(value)
                }
                Some(Err(_)) => {
                    counters.decode_failure();
                    counters.miss();
                    None
                }
                None => {
                    counters.miss();
                    None
                }
            })
            .collect())
    }

    /// Stores every `(key, value)` with the default TTL in one round trip (a pipeline of
    /// `SET ... PX`).
    pub async fn set_many(&self, items: &[(&str, &T)]) -> Result<(), CacheError> {
        let encoded = items
            .iter()
            .map(|(k, v)| Ok((self.key(k), serde_json::to_vec(v).map_err(CacheError::Encode)?)))
            .collect::<Result<Vec<_>, CacheError>>()?;
        let runtime = self.runtime();
        let rt = runtime.inner();
        let counters = self.counters(rt);
        for (key, _) in &encoded {
            rt.backend.supersede(rt.op_timeout, Self::DB, key).await;
        }
        let written = rt.backend.set_many(Self::DB, &encoded, self.default_ttl).await;
        encoded.iter().for_each(|(key, _)| rt.near.forget(key));
        written.inspect_err(|error| counters.failed(error))?;
        for _ in items {
            counters.fill();
        }
        Ok(())
    }

    /// Removes every key in one round trip (`UNLINK`); how many were there.
    pub async fn delete_many(&self, keys: &[&str]) -> Result<u64, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        for key in &full {
            rt.backend.supersede(rt.op_timeout, Self::DB, key).await;
        }
        let deleted = rt.backend.delete_many(Self::DB, &full).await;
        full.iter().for_each(|key| rt.near.forget(key));
        Ok(deleted.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Stores `value` under `key` with the default TTL, written behind the caller's back: on Redis
    /// it joins the runtime's write-behind batcher (pipelined with other writes) and this returns
    /// at once; when the queue is full, or after [`Runtime::shutdown`], it is written before this
    /// returns (counted in `direct_fills`), after an earlier `set_behind` of `key` already sent
    /// (waited for within `op_timeout`). [`Runtime::flush`] waits for it. A failure of the
    /// background write is counted (`backend_errors`, or `bypassed` when the breaker is open), not
    /// returned, and logged as any backend failure is: once per episode, by the breaker. A later `set`, `set_with_ttl`, `set_many`,
    /// `delete` or `delete_many` of `key` through a handle wins over it: it cancels it if still
    /// queued, or waits (within `op_timeout`) for it if already sent. (`expire` does not wait.)
    pub async fn set_behind(&self, key: &str, value: &T) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(value).map_err(CacheError::Encode)?;
        let runtime = self.runtime();
        let rt = runtime.inner();
        let counters = self.counters(rt);
        let done_counters = std::sync::Arc::clone(&counters);
        let done: crate::backend::protocol::Done = Box::new(move |result| match result {
            Ok(FillOutcome::Written) => done_counters.fill(),
            // Cancelled by a later write of the key (`supersede`), which counts for itself.
            Ok(FillOutcome::Superseded | FillOutcome::Revoked) => {}
            Err(error) => {
                done_counters.failed(&error);
                tracing::debug!(%error, "write-behind set failed");
            }
        });
        let key = self.key(key);
        // Written later: this process's near copy goes now, the store's notification does the
        // rest when it lands.
        rt.near.forget(&key);
        let write = crate::backend::Write {
            key,
            value: bytes.into(),
            ttl: self.default_ttl,
            lease: None,
            done: Some(done),
        };
        if let Err(write) = rt.backend.offer_handle_write(Self::DB, write) {
            if rt.backend.writes_behind() {
                counters.direct_fill(); // its queue was full or shut down
            }
            // Written directly, after the earlier set_behind of the key already sent.
            rt.backend.supersede(rt.op_timeout, Self::DB, &write.key).await;
            rt.backend
                .set(Self::DB, &write.key, &write.value, write.ttl)
                .await
                .inspect_err(|error| counters.failed(error))?;
            counters.fill();
        }
        Ok(())
    }

    /// Removes `key`; `true` if it was there. It lands after any earlier [`Cache::set_behind`]
    /// of `key`.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let key = self.key(key);
        rt.backend.supersede(rt.op_timeout, Self::DB, &key).await;
        let deleted = rt.backend.delete(Self::DB, &key).await;
        rt.near.forget(&key);
        Ok(deleted.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Whether `key` holds a live entry.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let found = rt.backend.exists(Self::DB, &self.key(key)).await;
        Ok(found.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Sets a new TTL (more than zero, at most 365 days) on `key`; `false` if it was not there.
    pub async fn expire(&self, key: &str, ttl: Duration) -> Result<bool, CacheError> {
        check_ttl(ttl)?;
        let runtime = self.runtime();
        let rt = runtime.inner();
        let key = self.key(key);
        let expired = rt.backend.expire(Self::DB, &key, ttl).await;
        rt.near.forget(&key);
        Ok(expired.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Time left before `key` expires, or `None` if it is not there (or, on Redis, if it has no
    /// expiry: a key written around this crate, which writes none without one).
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let left = rt.backend.ttl(Self::DB, &self.key(key)).await;
        Ok(left.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Removes every key under this handle's prefix, and nothing else (SCAN + UNLINK on Redis;
    /// never `KEYS`, never `FLUSHDB`). Returns how many were removed.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        // A clear walks the keyspace: give it many op timeouts, not one.
        let cleared = rt.backend.clear(Self::DB, &self.prefix).await;
        rt.near.flush();
        Ok(cleared.inspect_err(|error| self.counters(rt).failed(error))?)
    }

    /// Whether the backend answers (PING on Redis).
    pub async fn health_check(&self) -> Result<(), CacheError> {
        let runtime = self.runtime();
        let rt = runtime.inner();
        let answered = rt.backend.ping(Self::DB).await;
        Ok(answered.inspect_err(|error| self.counters(rt).failed(error))?)
    }
}

/// Every entry expires, within `cache_rules::MAX_TTL_SECONDS`: the rule `#[cached]` applies to its
/// `ttl` at compile time.
fn check_ttl(ttl: Duration) -> Result<(), CacheError> {
    if ttl.is_zero() || ttl > Duration::from_secs(cache_rules::MAX_TTL_SECONDS) {
        return Err(CacheError::InvalidTtl(ttl));
    }
    Ok(())
}
