//! The stores behind the cache, side by side, each in its own folder or file: [`memory`]
//! (embedded, the default with nothing configured), [`disk`] (SQLite, shared by a machine's processes), [`redis`] (with its scripts, its batcher and
//! a [`breaker`] in front of it; one server), [`cluster`] and [`sentinel`] (the Redis store over
//! another deployment: only how connections are made and keys are named differs) and [`none`]. What they all answer is [`store::Store`]; what the
//! runtime and a store say to each other is [`protocol`].
//!
//! Adding a store: a folder implementing `Store` (or, for another Redis deployment,
//! `redis::Connections`), its line in `stores!` below, and its arm in [`Backend::new`], where
//! stores are chosen. Calls go through `Store::method(store, ..)`: a store's
//! inherent methods of the same names (its raw commands) are never reached by accident.

pub(crate) mod breaker;
pub(crate) mod cluster;
pub(crate) mod disk;
pub(crate) mod memory;
pub(crate) mod none;
pub(crate) mod protocol;
pub(crate) mod redis;
pub(crate) mod sentinel;
pub(crate) mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use self::protocol::BackendInfo;
pub(crate) use self::protocol::{stamp_life, unique, Acquired, FillOutcome, LeaseAsk, Renewal, Write};
pub(crate) use self::store::Store;
use crate::config::{BackendKind, CacheConfig};
use crate::error::BackendError;
use crate::near::NearTier;

/// Declares [`Backend`], one variant per store, and `each_store!`, which runs an expression on
/// whichever store it holds (the `$d` is a `$` for the inner macro).
macro_rules! stores {
    ($d:tt $($variant:ident($store:ty)),* $(,)?) => {
        /// The configured store. An enum rather than a trait object, so the hit path makes no
        /// virtual call and boxes no future.
        // One per runtime, behind its `Arc`: the size difference costs nothing.
        #[allow(clippy::large_enum_variant)]
        pub(crate) enum Backend {
            $($variant($store)),*
        }

        macro_rules! each_store {
            ($d backend:expr, $d store:ident => $d body:expr) => {
                match $d backend {
                    $(Backend::$variant($d store) => $d body),*
                }
            };
        }

        pin_project_lite::pin_project! {
            /// The future of one call on whichever store the runtime has: as large as the
            /// largest store's, where an `async fn` matching over the stores is larger than that
            /// (the hit path's future is allocated per call: its size is a cost).
            #[project = EachProjection]
            pub(crate) enum Each<$($variant),*> {
                $($variant { #[pin] future: $variant }),*
            }
        }

        impl<Output, $($variant: Future<Output = Output>),*> Future for Each<$($variant),*> {
            type Output = Output;
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output> {
                match self.project() {
                    $(EachProjection::$variant { future } => future.poll(cx)),*
                }
            }
        }

        /// `each_store!` for a call that returns a future: the store's future, unawaited, in
        /// an [`Each`].
        macro_rules! each_future {
            ($d backend:expr, $d store:ident => $d body:expr) => {
                match $d backend {
                    $(Backend::$variant($d store) => Each::$variant { future: $d body }),*
                }
            };
        }
    };
}

stores!($
    Memory(memory::MemoryBackend),
    Disk(disk::DiskStore),
    Redis(redis::RedisStore<redis::Server>),
    Cluster(redis::RedisStore<cluster::ClusterNodes>),
    Sentinel(redis::RedisStore<sentinel::SentinelPrimary>),
    None(none::NoStore),
);

impl Backend {
    /// Where stores are chosen.
    pub(crate) fn new(config: &CacheConfig, near: &Arc<NearTier>) -> Self {
        match &config.backend {
            BackendKind::Memory => Backend::Memory(memory::MemoryBackend::new(config, near)),
            BackendKind::Disk(target) => Backend::Disk(disk::DiskStore::new(target, config)),
            BackendKind::Redis(target) => {
                Backend::Redis(redis::RedisStore::new(redis::Server::new(target.clone(), config), config))
            }
            BackendKind::Cluster(target) => Backend::Cluster(redis::RedisStore::new(
                cluster::ClusterNodes::new(target.clone(), config),
                config,
            )),
            BackendKind::Sentinel(target) => Backend::Sentinel(redis::RedisStore::new(
                sentinel::SentinelPrimary::new(target.clone(), config),
                config,
            )),
            BackendKind::None => Backend::None(none::NoStore),
        }
    }

    /// Whether caching is off: cached functions run without asking anything.
    pub(crate) fn is_none(&self) -> bool {
        matches!(self, Backend::None(_))
    }

    /// Whether answers come from this process without I/O (a loop of them must yield).
    pub(crate) fn is_in_process(&self) -> bool {
        matches!(self, Backend::Memory(_) | Backend::Disk(_))
    }
}

impl Store for Backend {
    fn kind(&self) -> &'static str {
        each_store!(self, s => Store::kind(s))
    }
    fn keeps_generations_in_process(&self) -> bool {
        each_store!(self, s => Store::keeps_generations_in_process(s))
    }
    // The hit path's two reads: not `async fn`s, see `Each`.
    fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> impl Future<Output = Result<Option<T>, BackendError>> {
        each_future!(self, s => Store::get_with(s, db, key, decode))
    }
    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        each_store!(self, s => Store::get_with_generation(s, db, key, generation_key, generation_life, decode).await)
    }
    fn get_with_ttl<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> impl Future<Output = Result<(Option<T>, Option<Duration>), BackendError>> {
        each_future!(self, s => Store::get_with_ttl(s, db, key, decode))
    }
    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        each_store!(self, s => Store::get_many_with(s, db, keys, decode).await)
    }
    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError> {
        each_store!(self, s => Store::set(s, db, key, value, ttl).await)
    }
    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        each_store!(self, s => Store::delete(s, db, key).await)
    }
    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        each_store!(self, s => Store::set_many(s, db, items, ttl).await)
    }
    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        each_store!(self, s => Store::delete_many(s, db, keys).await)
    }
    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        each_store!(self, s => Store::exists(s, db, key).await)
    }
    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        each_store!(self, s => Store::expire(s, db, key, ttl).await)
    }
    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        each_store!(self, s => Store::ttl(s, db, key).await)
    }
    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
        each_store!(self, s => Store::clear(s, db, prefix).await)
    }
    async fn ping(&self, db: u8) -> Result<(), BackendError> {
        each_store!(self, s => Store::ping(s, db).await)
    }
    async fn info(&self) -> Result<BackendInfo, BackendError> {
        each_store!(self, s => Store::info(s).await)
    }
    async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        each_store!(self, s => Store::acquire(s, db, key, ask, decode).await)
    }
    async fn renew(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError> {
        each_store!(self, s => Store::renew(s, db, key, token, grant, lease).await)
    }
    async fn fill(
        &self,
        db: u8,
        key: &str,
        lease: (u64, u64),
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError> {
        each_store!(self, s => Store::fill(s, db, key, lease, value, ttl).await)
    }
    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        each_store!(self, s => Store::release(s, db, key, token).await)
    }
    async fn invalidate(&self, db: u8, key: &str, stamp_life: Duration) -> Result<(), BackendError> {
        each_store!(self, s => Store::invalidate(s, db, key, stamp_life).await)
    }
    async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        life: Duration,
    ) -> Result<Option<u64>, BackendError> {
        each_store!(self, s => Store::bump_generation(s, db, generation_key, life).await)
    }
    fn writes_behind(&self) -> bool {
        each_store!(self, s => Store::writes_behind(s))
    }
    fn offer(&self, db: u8, write: Write) -> Result<(), Write> {
        each_store!(self, s => Store::offer(s, db, write))
    }
    fn offer_handle_write(&self, db: u8, write: Write) -> Result<(), Write> {
        each_store!(self, s => Store::offer_handle_write(s, db, write))
    }
    async fn supersede(&self, limit: Duration, db: u8, key: &str) {
        each_store!(self, s => Store::supersede(s, limit, db, key).await)
    }
    async fn flush(&self, limit: Duration) -> usize {
        each_store!(self, s => Store::flush(s, limit).await)
    }
    async fn shutdown(&self, limit: Duration) -> usize {
        each_store!(self, s => Store::shutdown(s, limit).await)
    }
    fn queued(&self) -> usize {
        each_store!(self, s => Store::queued(s))
    }
    fn breaker_open(&self) -> bool {
        each_store!(self, s => Store::breaker_open(s))
    }
    fn track(&self, near: &Arc<NearTier>, prefixes: Vec<String>) -> bool {
        each_store!(self, s => Store::track(s, near, prefixes))
    }
}
