//! Compiler-checked caching for async services, on Redis or an embedded in-process backend.
//!
//! ```
//! use cache_runtime::{cached, db::MarketData};
//! # #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
//! # pub struct Quote { price: f64 }
//! # #[derive(Debug)] pub struct FeedError;
//!
//! #[cached(db = MarketData, prefix = "market", ttl = 300)]
//! async fn quote(symbol: &str) -> Result<Quote, FeedError> {
//!     Ok(Quote { price: 150.25 })
//! }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! assert_eq!(quote("AAPL").await.unwrap(), Quote { price: 150.25 }); // miss: runs the body
//! assert_eq!(quote("AAPL").await.unwrap(), Quote { price: 150.25 }); // hit
//! # });
//! ```
//!
//! The runtime is chosen by [`init`], or read from the environment on the first cached call
//! ([`CacheConfig::from_env`]): Redis when `REDIS_URL`/`REDIS_HOST` is set, otherwise the embedded
//! backend. See README for the options, the key format and what happens when Redis fails.

#![deny(missing_docs)]

#[cfg(feature = "admin")]
pub mod admin;
mod backend;
mod background;
mod clock;
mod config;
pub mod db;
mod error;
mod flight;
mod functions;
mod handle;
mod invalidate;
mod key;
mod near;
mod policy;
mod read_through;
pub mod registry;
mod runtime;
mod shape;
mod spec;
mod stats;
pub mod telemetry;
mod value;

pub use backend::BackendInfo;
pub use cache_macros::{cached, cached_impl, invalidate, invalidates};
pub use config::{
    BackendKind, CacheConfig, ClusterTarget, ConfigError, DiskTarget, Environment, RedisTarget,
    SentinelTarget, DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DISK_MAX_SIZE, DEFAULT_INVALIDATION_RECHECK, DEFAULT_LEASE_TTL, DEFAULT_MEMORY_CAPACITY,
    DEFAULT_MEMORY_MAX_BYTES, DEFAULT_NEAR_CAPACITY, DEFAULT_NEAR_MAX_BYTES, DEFAULT_OP_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT, MAX_BATCH_QUEUE, MAX_NEAR_BYTES, MAX_POOL_SIZE, MAX_SETTING,
};
pub use error::{BackendError, CacheError, RedisFailure};
pub use handle::{prefix_problem, Cache};
pub use key::KeyBuilder;
pub use near::NearStatus;
pub use runtime::{global, init, init_from_env, Runtime, ShutdownGuard, Unflushed};
pub use stats::{PrefixStats, StatsSnapshot};
pub use value::Format;

/// Not a public API: what `#[cached]` expands into. May change in any release.
#[doc(hidden)]
pub mod __private;
