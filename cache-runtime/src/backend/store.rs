//! What every store answers: the one interface the runtime calls, whatever is behind it. A store
//! bounds its own calls (the Redis store by `op_timeout`, through its breaker; the embedded one
//! answers at once).

use std::sync::Arc;
use std::time::Duration;

use super::protocol::{Acquired, BackendInfo, FillOutcome, LeaseAsk, Renewal, Write};
use crate::error::BackendError;
use crate::near::NearTier;

/// One store. Its async methods are called through [`super::Backend`], an enum (no boxed
/// futures, no virtual calls on the hit path), so the trait needs no object safety.
#[allow(async_fn_in_trait)]
pub(crate) trait Store {
    /// `memory`, `redis`, ...: for logs and `Runtime::backend_kind`.
    fn kind(&self) -> &'static str;

    /// Whether a function's generation lives in the runtime (the store is in-process) rather than
    /// in the store.
    fn keeps_generations_in_process(&self) -> bool {
        false
    }

    /// Reads `key` and hands its bytes to `decode` without copying them out of the reply.
    async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError>;

    /// Reads the entry and the function's generation (extending the generation key's life) in
    /// one round trip; `None` for the generation when the store does not keep it.
    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError>;

    /// Reads the entry and the time it has left (for `eager_refresh`). Two calls unless the
    /// store does better (Redis pipelines `GET` and `PTTL` in one round trip).
    async fn get_with_ttl<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<Duration>), BackendError> {
        let Some(found) = self.get_with(db, key, decode).await? else {
            return Ok((None, None));
        };
        Ok((Some(found), self.ttl(db, key).await?))
    }

    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError>;

    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError>;
    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError>;
    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError>;
    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError>;
    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError>;
    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError>;
    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError>;
    /// Removes every key under `prefix:` in `db`, and nothing else; how many.
    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError>;
    async fn ping(&self, db: u8) -> Result<(), BackendError>;
    /// Version, memory and keys per DB, for an operator.
    async fn info(&self) -> Result<BackendInfo, BackendError> {
        Ok(BackendInfo::default())
    }

    /// A fresh value (written at `ask.min_generation` or later), else the fill lease, else busy.
    async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError>;
    /// Extends a held lease by `lease`.
    async fn renew(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError>;
    /// The lease-checked fill.
    async fn fill(
        &self,
        db: u8,
        key: &str,
        lease: (u64, u64),
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError>;
    /// Gives the lease up if it is still held by `token`.
    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError>;
    /// Drops `key`, revokes its lease and changes its stamp (kept `stamp_life`).
    async fn invalidate(&self, db: u8, key: &str, stamp_life: Duration) -> Result<(), BackendError>;
    /// Raises a function's generation and returns it; `None` when the runtime keeps generations.
    async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        life: Duration,
    ) -> Result<Option<u64>, BackendError>;

    /// Whether the store takes writes for the background (a write it gives back is a direct one).
    fn writes_behind(&self) -> bool {
        false
    }
    /// Takes a write for the background, or gives it back for the caller to write directly.
    fn offer(&self, _db: u8, write: Write) -> Result<(), Write> {
        Err(write)
    }
    /// The same, for a handle's `set_behind`: a later write or delete of the key wins over it.
    fn offer_handle_write(&self, _db: u8, write: Write) -> Result<(), Write> {
        Err(write)
    }
    /// Cancels the queued handle writes of `key`, or waits (within `limit`) for one already sent.
    async fn supersede(&self, _limit: Duration, _db: u8, _key: &str) {}
    /// Waits (within `limit`) until every accepted write is answered; how many were not.
    async fn flush(&self, _limit: Duration) -> usize {
        0
    }
    /// Flushes, then takes no more writes for the background.
    async fn shutdown(&self, _limit: Duration) -> usize {
        0
    }
    /// Writes accepted for the background and not yet answered.
    fn queued(&self) -> usize {
        0
    }
    /// Whether a circuit breaker is skipping the store.
    fn breaker_open(&self) -> bool {
        false
    }
    /// Starts telling `near` of every change to keys under `prefixes` made by anyone, and
    /// trusting it while it does; `false` when this store cannot (then the near tier is not
    /// used with it). Called once per runtime.
    fn track(&self, _near: &Arc<NearTier>, _prefixes: Vec<String>) -> bool {
        false
    }
}
